"""The ``tools`` environment played by hand: reset, a turn of calls, an answer (book ch.13's loop)."""

from __future__ import annotations

import textwrap

import pytest

from rlhf_core.environments.base import Environment
from rlhf_core.environments.tool_calls import ParsedCall, format_tool_calls
from rlhf_core.environments.tool_environment import ToolEnvironment, user_tool_references
from rlhf_core.errors import UserError


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_a_whole_episode_calls_the_calculator_then_answers():
    env = ToolEnvironment(tools=["calculator"], system_prompt="Use tools when useful.")
    assert isinstance(env, Environment)
    start = env.reset({"prompt": "What is 17 * 23?", "answer": "391"})
    assert start.messages == [
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "What is 17 * 23?"},
    ]
    assert [declaration["function"]["name"] for declaration in start.tools] == ["calculator"]
    assert start.tools[0]["type"] == "function"

    call_turn = "Let me compute.\n" + format_tool_calls(
        [ParsedCall("calculator", {"expression": "17*23"})], "hermes"
    )
    step = env.step(assistant(call_turn))
    assert not step.done
    assert step.messages == [
        {"role": "tool", "tool_call_id": "call_0_0", "name": "calculator", "content": "391"}
    ]
    assert step.assistant == {
        "role": "assistant",
        "content": "Let me compute.",
        "tool_calls": [
            {
                "id": "call_0_0",
                "type": "function",
                "function": {"name": "calculator", "arguments": {"expression": "17*23"}},
            }
        ],
    }
    assert step.metrics == {
        "tool_calls": 1.0,
        "valid_tool_calls": 1.0,
        "invalid_tool_calls": 0.0,
        "tool_errors": 0.0,
        "calls_over_limit": 0.0,
    }

    answer = env.step(assistant("17 * 23 = 391"))
    assert answer.done and answer.messages == []
    assert answer.assistant == {"role": "assistant", "content": "17 * 23 = 391"}
    assert answer.metrics["tool_calls"] == 0.0


def test_a_prompt_of_messages_is_kept_and_its_own_system_message_wins():
    env = ToolEnvironment(tools=["calculator"], system_prompt="ignored")
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert env.reset({"prompt": prompt}).messages == prompt


def test_second_turn_ids_and_errors_of_each_kind():
    env = ToolEnvironment(tools=["calculator"], call_style="pythonic")
    env.reset({"prompt": "hi"})
    env.step(assistant('[calculator(expression="1+1")]'))
    step = env.step(
        assistant('[calculator(expression="1/0"), search(q="x"), calculator(expr="2")] [calculator(2)]')
    )
    assert [m["tool_call_id"] for m in step.messages[:3]] == ["call_1_0", "call_1_1", "call_1_2"]
    assert [m["content"] for m in step.messages[:3]] == [
        "error: division by zero",
        "error: there is no tool named 'search' (tools: calculator)",
        "error: calculator: arguments: 'expression' is a required property",
    ]
    # the call that could not be read has no id: it is answered in a user message
    assert step.messages[3]["role"] == "user"
    assert "positional arguments are not allowed" in step.messages[3]["content"]
    assert '[tool_name(argument="value")]' in step.messages[3]["content"]
    assert step.metrics == {
        "tool_calls": 4.0,
        "valid_tool_calls": 1.0,
        "invalid_tool_calls": 3.0,
        "tool_errors": 1.0,
        "calls_over_limit": 0.0,
    }
    assert not step.done


def test_a_turn_of_only_malformed_calls_asks_again_instead_of_ending():
    env = ToolEnvironment(tools=["calculator"])
    env.reset({"prompt": "hi"})
    step = env.step(
        assistant('<tool_call>{"name": "calculator", "arguments": {"expression": 1+1}}</tool_call>')
    )
    assert not step.done
    assert [m["role"] for m in step.messages] == ["user"]
    assert "not valid JSON" in step.messages[0]["content"]
    # the conversation records what the model wrote, the malformed call included
    assert step.assistant == {
        "role": "assistant",
        "content": '<tool_call>{"name": "calculator", "arguments": {"expression": 1+1}}</tool_call>',
    }
    assert step.metrics["invalid_tool_calls"] == 1.0


def test_calls_past_max_calls_are_not_run_and_end_the_episode():
    env = ToolEnvironment(tools=["calculator"], max_calls=3)
    env.reset({"prompt": "hi"})
    two = format_tool_calls([ParsedCall("calculator", {"expression": "1+1"})] * 2, "hermes")
    assert not env.step(assistant(two)).done
    over = env.step(assistant(two))  # 2 + 2 > 3
    assert over.done and over.messages == []
    assert over.metrics["calls_over_limit"] == 2.0 and over.metrics["valid_tool_calls"] == 0.0
    assert len(over.assistant["tool_calls"]) == 2


def test_user_function_tools_from_a_file(tmp_path):
    (tmp_path / "shop.py").write_text(
        textwrap.dedent(
            '''
            PRICES = {"apple": 0.5, "pear": 0.75}

            def price(item: str, count: int = 1) -> dict:
                """The price of `count` items."""
                return {"item": item, "total": PRICES[item] * count}
            '''
        )
    )
    parameters = {
        "type": "object",
        "properties": {"item": {"type": "string", "enum": ["apple", "pear"]}, "count": {"type": "integer"}},
        "required": ["item"],
    }
    tools = [
        {"function": "shop.py:price", "parameters": parameters},
        {"builtin": "python", "sandbox": "none"},
    ]
    env = ToolEnvironment(tools=tools, base_dir=tmp_path, max_output_chars=80)
    start = env.reset({"prompt": "Price of 4 pears?"})
    assert [d["function"]["name"] for d in start.tools] == ["price", "python"]
    assert start.tools[0]["function"]["description"] == "The price of `count` items."
    calls = [
        ParsedCall("price", {"item": "pear", "count": 4}),
        ParsedCall("price", {"item": "plum"}),
        ParsedCall("python", {"code": "print('y' * 100)"}),
    ]
    step = env.step(assistant(format_tool_calls(calls, "hermes")))
    contents = [m["content"] for m in step.messages]
    assert contents[0] == '{"item": "pear", "total": 3.0}'  # 0.75 * 4, from the user's own function
    assert contents[1] == "error: price: argument item: 'plum' is not one of ['apple', 'pear']"
    assert contents[2] == "y" * 80 + "\n[... 20 more characters cut]"
    assert step.metrics["valid_tool_calls"] == 2.0 and step.metrics["invalid_tool_calls"] == 1.0
    assert user_tool_references(tools) == ["shop.py:price"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tools": ["search"]}, "unknown built-in tool 'search'"),
        ({"tools": []}, "tools: List should have at least 1 item"),
        ({"tools": ["calculator"], "call_style": "xml"}, "call_style"),
        ({"tools": ["calculator"], "max_turns": 3}, "max_turns: Extra inputs are not permitted"),
        ({"tools": ["calculator", "calculator"]}, "tools[1]: a second tool named 'calculator'"),
        ({"tools": [{"function": "shop.py:price"}]}, "tools[0]: tool shop.py:price needs 'parameters'"),
        ({"tools": [{"function": "shop.py:nothing", "parameters": {}}]}, "has no function 'nothing'"),
        ({"tools": [{"function": "missing.py:f", "parameters": {}}]}, "does not exist"),
        (
            {"tools": [{"function": "shop.py:price", "parameters": {"type": "array"}}]},
            "tools[0]: parameters of",
        ),
        ({"tools": [{"function": "shop.py:price", "parameters": {}, "title": "x"}]}, "unknown key(s) title"),
        ({"tools": [{"name": "x"}]}, "tools[0]: expected a built-in tool name"),
    ],
)
def test_bad_options_are_user_errors_naming_the_entry(tmp_path, options, message):
    (tmp_path / "shop.py").write_text('def price(item):\n    """A price."""\n    return 1\n')
    with pytest.raises(UserError, match="environment 'tools'|built-in tool") as error:
        ToolEnvironment(base_dir=tmp_path, **options)
    assert message in str(error.value)


def test_a_row_without_its_prompt_column_is_a_user_error():
    env = ToolEnvironment(tools=["calculator"])
    with pytest.raises(UserError, match="no column 'prompt' \\(its columns: question\\)"):
        env.reset({"question": "2+2?"})
    with pytest.raises(UserError, match="must hold text or a non-empty list"):
        env.reset({"prompt": 5})
