"""Declared tools (book ch.13, function calling): schema checks, argument validation, running calls, and
the built-in calculator and python tools."""

from __future__ import annotations

import pytest

from rlhf_core.environments.builtin_tools import BUILTIN_TOOLS, builtin_tool, calculate
from rlhf_core.environments.tool_calls import ParsedCall
from rlhf_core.environments.tools import Tool, ToolError, check_tool, run_tool_calls, validate_arguments
from rlhf_core.errors import UserError
from rlhf_core.rewards.sandbox import available_sandbox

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"],
    "additionalProperties": False,
}


def forecast(city: str, days: int = 1) -> dict:
    if city == "Atlantis":
        raise LookupError("no station there")
    return {"city": city, "days": days, "sky": "clear"}


WEATHER = Tool("weather", "The sky over a city.", WEATHER_SCHEMA, forecast)


def test_declaration_is_the_openai_function_form():
    assert WEATHER.declaration() == {
        "type": "function",
        "function": {"name": "weather", "description": "The sky over a city.", "parameters": WEATHER_SCHEMA},
    }


def test_a_good_tool_passes_the_check():
    check_tool(WEATHER, "tools[0]")


@pytest.mark.parametrize(
    ("name", "parameters", "message"),
    [
        ("get-weather", WEATHER_SCHEMA, "tools[3]: tool name 'get-weather' must be an identifier"),
        ("w", {"type": "object", "properties": {"city": {"type": "strng"}}}, "not a valid JSON Schema at"),
        ("w", {"type": "object", "required": "city"}, "not a valid JSON Schema at required"),
        ("w", {"type": "string"}, 'must be a JSON Schema with "type": "object"'),
        ("w", {"properties": {}}, "got type None"),
        ("w", ["city"], "must be a JSON Schema object, got list"),
    ],
)
def test_check_tool_names_where_and_what_is_wrong(name, parameters, message):
    with pytest.raises(UserError, match="tools\\[3\\]") as error:
        check_tool(Tool(name, "d", parameters, forecast), "tools[3]")
    assert message in str(error.value)


def test_argument_validation_says_which_argument_and_what_was_expected():
    assert validate_arguments(WEATHER, {"city": "Oslo", "days": 2}) is None
    assert validate_arguments(WEATHER, {"days": 2}) == "arguments: 'city' is a required property"
    assert (
        validate_arguments(WEATHER, {"city": "Oslo", "days": "2"})
        == "argument days: '2' is not of type 'integer'"
    )
    assert (
        validate_arguments(WEATHER, {"city": "Oslo", "days": 0})
        == "argument days: 0 is less than the minimum of 1"
    )
    assert "'hours' was unexpected" in validate_arguments(WEATHER, {"city": "Oslo", "hours": 3})


def test_run_tool_calls_answers_every_call_and_never_raises():
    calls = [
        ParsedCall("weather", {"city": "Oslo", "days": 2}),
        ParsedCall("radar", {}),
        ParsedCall("weather", {"city": 7}),
        ParsedCall("weather", {"city": "Atlantis"}),
    ]
    run = run_tool_calls(calls, {"weather": WEATHER}, max_output_chars=1000, call_ids=["a", "b", "c", "d"])
    assert [m["tool_call_id"] for m in run.messages] == ["a", "b", "c", "d"]
    assert {m["role"] for m in run.messages} == {"tool"}
    assert [m["name"] for m in run.messages] == ["weather", "radar", "weather", "weather"]
    contents = [m["content"] for m in run.messages]
    assert contents[0] == '{"city": "Oslo", "days": 2, "sky": "clear"}'
    assert contents[1] == "error: there is no tool named 'radar' (tools: weather)"
    assert contents[2] == "error: weather: argument city: 7 is not of type 'string'"
    assert contents[3] == "error: weather failed: LookupError: no station there"
    assert (run.valid, run.invalid, run.failed) == (2, 2, 1)


def test_long_outputs_are_truncated_with_the_count_of_what_was_cut():
    echo = Tool(
        "echo", "Echo.", {"type": "object", "properties": {"text": {"type": "string"}}}, lambda text: text
    )
    run = run_tool_calls(
        [ParsedCall("echo", {"text": "x" * 250})], {"echo": echo}, max_output_chars=100, call_ids=["1"]
    )
    assert run.messages[0]["content"] == "x" * 100 + "\n[... 150 more characters cut]"
    short = run_tool_calls(
        [ParsedCall("echo", {"text": "x" * 100})], {"echo": echo}, max_output_chars=100, call_ids=["1"]
    )
    assert short.messages[0]["content"] == "x" * 100


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("2 + 3", "5"),
        ("(17 + 5) * 3 ** 2", "198"),  # 22 * 9
        ("-7 % 3", "2"),  # Python's modulo takes the divisor's sign
        ("7 // 2", "3"),
        ("7 / 2", "3.5"),
        ("6 / 3", "2.0"),  # true division gives a float
        ("2 ** -2", "0.25"),
        ("0.1 + 0.2", "0.30000000000000004"),  # floats printed with repr
        ("2 ** 100", "1267650600228229401496703205376"),  # integers exact
        ("-(-4)", "4"),
    ],
)
def test_calculator_values(expression, value):
    assert builtin_tool("calculator").function(expression=expression) == value


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("9**9**9", "too large"),  # 9**387420489: refused before computing
        ("10 ** 4000", "too large"),
        ("2**9000 * 2**9000", "too large"),
        ("1e308 * 10", "not a finite number"),
        ("10.0 ** 400", "too large"),
        ("1 / 0", "division by zero"),
        ("5 // 0", "division by zero"),
        ("3 % 0.0", "division by zero"),
        ("(-8) ** 0.5", "not a real number"),
        ("__import__('os').getcwd()", "is not allowed"),
        ("x + 1", "'x' is not allowed"),
        ("True + 1", "'True' is not allowed"),
        ("2 +", "is not an arithmetic expression"),
    ],
)
def test_calculator_refuses_with_a_readable_error(expression, reason):
    with pytest.raises(ToolError, match=reason):
        calculate(expression)


def test_calculator_refusal_reaches_the_model_as_an_error_message():
    tools = {"calculator": builtin_tool("calculator")}
    run = run_tool_calls(
        [ParsedCall("calculator", {"expression": "9**9**9"})], tools, max_output_chars=200, call_ids=["x"]
    )
    assert run.messages[0]["content"].startswith("error: the result is too large")
    assert (run.valid, run.failed) == (1, 1)


def test_builtin_tool_names_and_options_are_checked():
    assert set(BUILTIN_TOOLS) == {"calculator", "python"}
    with pytest.raises(
        UserError, match="unknown built-in tool 'search' \\(built-in tools: calculator, python\\)"
    ):
        builtin_tool("search")
    with pytest.raises(UserError, match="'python': invalid options: sandbox"):
        builtin_tool("python", sandbox="docker")
    with pytest.raises(UserError, match="'calculator' takes no options"):
        builtin_tool("calculator", precision=3)
    for name in BUILTIN_TOOLS:
        tool = builtin_tool(name, **({"sandbox": "none"} if name == "python" else {}))
        check_tool(tool, f"built-in {name}")


def _python_tool(sandbox: str):
    if sandbox == "bubblewrap" and not available_sandbox():
        pytest.skip("bubblewrap does not work on this machine (available_sandbox() is False)")
    return builtin_tool("python", sandbox=sandbox, timeout_seconds=2).function


@pytest.mark.parametrize("sandbox", ["bubblewrap", "none"])
def test_python_tool_returns_stdout(sandbox):
    run_code = _python_tool(sandbox)
    assert run_code(code="print(sum(range(10)))") == "45"
    assert run_code(code="x = 1") == "(no output: print what you want to see)"


@pytest.mark.parametrize("sandbox", ["bubblewrap", "none"])
def test_python_tool_reports_failures_and_timeouts(sandbox):
    run_code = _python_tool(sandbox)
    failed = run_code(code="print('before')\nraise ValueError('bad input')")
    assert failed.startswith("before\n[exit status 1]\n")
    assert failed.endswith("ValueError: bad input")
    assert run_code(code="print('start', flush=True)\nwhile True: pass") == "start\n[timed out after 2 s]"


def test_python_tool_in_bubblewrap_has_no_network_and_no_home():
    run_code = _python_tool("bubblewrap")
    probe = (
        "import os, socket\nprint(os.path.exists(os.path.expanduser('~')), os.path.exists('/etc/passwd'))\n"
    )
    probe += "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
    probe += "except OSError:\n    print('offline')"
    assert run_code(code=probe) == "False False\noffline"
