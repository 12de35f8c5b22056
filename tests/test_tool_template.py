"""Tests for the ChatML template's tool support (book ch.13): plain chats unchanged, tools in the system
turn, tool calls written as the model writes them, tool results as turns of their own, and the probe
that tells whether a template renders tools."""

from __future__ import annotations

import copy
import json

import jinja2
import pytest

from rlhf_core.errors import UserError
from rlhf_core.modeling.models import build_tiny_model
from rlhf_core.modeling.tokenizer import (
    CHATML_TEMPLATE,
    require_tool_support,
    supports_tools,
    tool_call_text,
)
from rlhf_core.spec import TinyModelSource

# The ChatML template as it was before tool support: plain conversations must render exactly like this.
PLAIN_CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set offset = 1 %}{% else %}{% set offset = 0 %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != ((loop.index0 - offset) % 2 == 0) and not "
    "(loop.index0 == 0 and message['role'] == 'system') %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
PLAIN_CHATS = [
    [{"role": "user", "content": "What is 7 + 12?"}],
    [SYSTEM, {"role": "user", "content": "What is 7 + 12?"}, {"role": "assistant", "content": "19."}],
    [
        {"role": "user", "content": "  hi  \n"},
        {"role": "assistant", "content": "Hello! How can I help?\n"},
        {"role": "user", "content": "What is 4 - 1?"},
        {"role": "assistant", "content": "4 - 1 = 3."},
    ],
    [
        SYSTEM,
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
]
CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluates an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}
QUESTION = {"role": "user", "content": "What is 17 * 23?"}


def call(name: str, arguments, call_id: str = "call_0") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def result(content: str, call_id: str = "call_0") -> dict:
    return {"role": "tool", "tool_call_id": call_id, "name": "calculator", "content": content}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), seed=0)[1]


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    old = copy.deepcopy(tokenizer)
    old.chat_template = PLAIN_CHATML_TEMPLATE
    return old


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


# --- plain conversations: byte for byte as before -------------------------------------------


@pytest.mark.parametrize("chat", PLAIN_CHATS, ids=["one-user", "system", "multi-turn", "system-multi"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_plain_conversations_render_exactly_as_the_old_template(
    tokenizer, plain_tokenizer, chat, generation_prompt
) -> None:
    assert tokenizer.chat_template == CHATML_TEMPLATE != PLAIN_CHATML_TEMPLATE
    new = render(tokenizer, chat, add_generation_prompt=generation_prompt)
    assert new == render(plain_tokenizer, chat, add_generation_prompt=generation_prompt)
    assert "tool" not in new


@pytest.mark.parametrize(
    "roles", [("user", "user"), ("assistant",), ("user", "assistant", "assistant"), ("system", "assistant")]
)
def test_plain_misuse_still_raises_the_alternation_error(tokenizer, plain_tokenizer, roles) -> None:
    chat = [{"role": role, "content": "x"} for role in roles]
    for tok in (tokenizer, plain_tokenizer):
        with pytest.raises(jinja2.TemplateError, match="must alternate"):
            render(tok, chat)


# --- tools in the system turn ---------------------------------------------------------------


def test_tools_are_declared_after_the_system_prompt(tokenizer) -> None:
    text = render(tokenizer, [SYSTEM, QUESTION], tools=[CALCULATOR], add_generation_prompt=True)
    system_turn, rest = text.split("<|im_end|>\n", 1)
    assert system_turn.startswith("<|endoftext|><|im_start|>system\nYou are a helpful assistant.\n\n# Tools")
    # each declaration is its JSON on a line of its own inside <tools></tools>
    assert f"\n<tools>\n{json.dumps(CALCULATOR)}\n</tools>\n" in system_turn
    assert '<tool_call>\n{"name": <function name>, "arguments": ' in system_turn
    assert rest == "<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n"


def test_tools_without_a_system_prompt_get_a_system_turn_of_their_own(tokenizer) -> None:
    with_system = render(tokenizer, [SYSTEM, QUESTION], tools=[CALCULATOR])
    alone = render(tokenizer, [QUESTION], tools=[CALCULATOR])
    assert alone == with_system.replace("You are a helpful assistant.\n\n", "", 1)
    assert alone.startswith("<|endoftext|><|im_start|>system\n# Tools\n")
    second = copy.deepcopy(CALCULATOR)
    second["function"]["name"] = "lookup"
    both = render(tokenizer, [QUESTION], tools=[CALCULATOR, second])
    assert f"<tools>\n{json.dumps(CALCULATOR)}\n{json.dumps(second)}\n</tools>" in both


# --- tool calls and results -----------------------------------------------------------------


def assistant_turn(text: str) -> str:
    return f"<|im_start|>assistant\n{text}<|im_end|>\n"


@pytest.mark.parametrize("content", [None, "", "Let me compute that."])
def test_a_tool_call_is_written_as_the_model_writes_it(tokenizer, content) -> None:
    turn = {
        "role": "assistant",
        "content": content,
        "tool_calls": [call("calculator", {"expression": "17 * 23"})],
    }
    text = render(tokenizer, [QUESTION, turn], tools=[CALCULATOR])
    block = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "17 * 23"}}\n</tool_call>'
    assert block == tool_call_text("calculator", {"expression": "17 * 23"})
    assert text.endswith(assistant_turn(f"{content}\n{block}" if content else block))


def test_parsing_the_model_text_and_rendering_it_gives_the_text_back(tokenizer) -> None:
    calls = [("calculator", {"expression": "2 ** 10"}), ("lookup", {"city": "Zürich", "n": [1, 2.5, None]})]
    model_text = "Two calls.\n" + "\n".join(tool_call_text(name, args) for name, args in calls)
    parsed = [json.loads(block.split("</tool_call>")[0]) for block in model_text.split("<tool_call>\n")[1:]]
    turn = {
        "role": "assistant",
        "content": "Two calls.",
        "tool_calls": [call(p["name"], p["arguments"], f"c{i}") for i, p in enumerate(parsed)],
    }
    assert render(tokenizer, [QUESTION, turn]).endswith(assistant_turn(model_text))


def test_string_arguments_are_written_as_they_are(tokenizer) -> None:
    raw = '{"expression":"1+1"}'  # compact JSON as some datasets store it
    turn = {"role": "assistant", "content": "", "tool_calls": [call("calculator", raw)]}
    expected = '<tool_call>\n{"name": "calculator", "arguments": {"expression":"1+1"}}\n</tool_call>'
    assert render(tokenizer, [QUESTION, turn]).endswith(assistant_turn(expected))
    assert tool_call_text("calculator", raw) == expected


def test_tool_results_are_turns_of_their_own_and_may_follow_each_other(tokenizer) -> None:
    turn = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            call("calculator", {"expression": "17 * 23"}, "a"),
            call("calculator", {"expression": "1"}, "b"),
        ],
    }
    chat = [QUESTION, turn, result("391", "a"), result(" 1\n", "b"), {"role": "assistant", "content": "391."}]
    text = render(tokenizer, chat, tools=[CALCULATOR])
    assert text.endswith(
        "<|im_start|>tool\n391<|im_end|>\n<|im_start|>tool\n1<|im_end|>\n" + assistant_turn("391.")
    )
    # and the model may be asked to go on after a result
    after_result = render(tokenizer, chat[:3], tools=[CALCULATOR], add_generation_prompt=True)
    assert after_result.endswith("<|im_start|>tool\n391<|im_end|>\n<|im_start|>assistant\n")


def test_a_user_turn_may_follow_a_tool_result(tokenizer) -> None:
    turn = {"role": "assistant", "content": None, "tool_calls": [call("calculator", {"expression": "1"})]}
    chat = [QUESTION, turn, result("1"), {"role": "user", "content": "Thanks, and 2?"}]
    assert render(tokenizer, chat).endswith("<|im_start|>user\nThanks, and 2?<|im_end|>\n")


@pytest.mark.parametrize("before", [[QUESTION], [], [SYSTEM]])
def test_a_tool_result_that_answers_no_assistant_turn_is_refused(tokenizer, before) -> None:
    with pytest.raises(jinja2.TemplateError, match="A tool message must follow an assistant message"):
        render(tokenizer, [*before, result("391")])


def test_tool_conversations_render_prefix_by_prefix(tokenizer) -> None:
    turn = {"role": "assistant", "content": "", "tool_calls": [call("calculator", {"expression": "17 * 23"})]}
    chat = [
        SYSTEM,
        QUESTION,
        turn,
        result("391"),
        result("ok", "call_1"),
        {"role": "assistant", "content": "391."},
    ]
    full = render(tokenizer, chat, tools=[CALCULATOR])
    for i in range(1, len(chat) + 1):
        assert full.startswith(render(tokenizer, chat[:i], tools=[CALCULATOR]))


# --- does a template render tools? ----------------------------------------------------------


def test_supports_tools_tells_chatml_from_a_template_that_ignores_them(tokenizer, plain_tokenizer) -> None:
    assert supports_tools(tokenizer)
    assert not supports_tools(plain_tokenizer)
    require_tool_support(tokenizer, "stage 'grpo' (model 'sft')")
    with pytest.raises(
        UserError,
        match=r"^stage .grpo. \(model .sft.\): .*ignores the tools.*whose chat template renders tools",
    ):
        require_tool_support(plain_tokenizer, "stage 'grpo' (model 'sft')")


def test_a_template_that_fails_on_tools_does_not_support_them(tokenizer) -> None:
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = "{% for t in tools %}{{ raise_exception('no tools here') }}{% endfor %}"
    assert not supports_tools(broken)
