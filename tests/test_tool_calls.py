"""Reading tool calls from a model's text in the hermes and pythonic styles (book ch.13), and writing them."""

from __future__ import annotations

import pytest

from rlhf_core.environments.tool_calls import CallParse, ParsedCall, format_tool_calls, parse_tool_calls

CALLS = [
    ParsedCall("calculator", {"expression": "2+3"}),
    ParsedCall("lookup", {"city": "Zürich", "limit": 3, "tags": ["a", "b]"], "exact": True, "extra": None}),
    ParsedCall("now", {}),
]


@pytest.mark.parametrize("style", ["hermes", "pythonic"])
def test_formatted_calls_parse_back_to_the_same_calls(style):
    text = format_tool_calls(CALLS, style)
    assert parse_tool_calls(text, style) == CallParse(content="", calls=CALLS, errors=[])


@pytest.mark.parametrize("style", ["hermes", "pythonic"])
def test_text_without_calls_is_all_content(style):
    parsed = parse_tool_calls("  The answer is [5] (see above).  ", style)
    assert parsed == CallParse(content="The answer is [5] (see above).", calls=[], errors=[])


def test_hermes_blocks_with_text_around_them():
    text = (
        "Let me compute.\n<tool_call>\n"
        '{"name": "calculator", "arguments": {"expression": "17*3"}}\n</tool_call>\n'
        '<tool_call>{"name": "now"}</tool_call> then done'
    )
    parsed = parse_tool_calls(text, "hermes")
    assert parsed.calls == [ParsedCall("calculator", {"expression": "17*3"}), ParsedCall("now", {})]
    assert parsed.content == "Let me compute.\n\n then done"
    assert parsed.errors == []


def test_hermes_accepts_arguments_double_encoded_as_a_json_string():
    text = '<tool_call>{"name": "f", "arguments": "{\\"x\\": [1, 2]}"}</tool_call>'
    assert parse_tool_calls(text, "hermes").calls == [ParsedCall("f", {"x": [1, 2]})]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('{"name": "f", "arguments": {"x": 1}', "not valid JSON"),
        ('["f", {"x": 1}]', "expected a JSON object"),
        ('{"arguments": {"x": 1}}', "missing 'name'"),
        ('{"name": "", "arguments": {}}', "missing 'name'"),
        ('{"name": "f", "arguments": [1]}', "'arguments' of f must be a JSON object"),
        ('{"name": "f", "arguments": "x=1"}', "is a string that is not a JSON object"),
        ('{"name": "f", "args": {}}', "unexpected key(s) 'args'"),
    ],
)
def test_malformed_hermes_calls_are_error_lines_not_exceptions(body, reason):
    text = f'ok <tool_call>{body}</tool_call> <tool_call>{{"name": "g", "arguments": {{}}}}</tool_call>'
    parsed = parse_tool_calls(text, "hermes")
    assert parsed.calls == [ParsedCall("g", {})]  # the good call next to it is still read
    assert len(parsed.errors) == 1 and parsed.errors[0].startswith("tool call 1: ")
    assert reason in parsed.errors[0]
    assert parsed.content == "ok"


def test_an_unclosed_hermes_block_is_an_error_and_not_content():
    parsed = parse_tool_calls('Checking. <tool_call>{"name": "f", "argu', "hermes")
    assert parsed.calls == []
    assert parsed.errors == ["tool call 1: <tool_call> is never closed by </tool_call>"]
    assert parsed.content == "Checking."


def test_pythonic_list_with_text_around_it():
    text = "Sure: [calculator(expression=\"2+[3]\"), lookup(city='Paris', limit=-2)] ok"
    parsed = parse_tool_calls(text, "pythonic")
    assert parsed.calls == [
        ParsedCall("calculator", {"expression": "2+[3]"}),  # a ']' inside a string does not end the list
        ParsedCall("lookup", {"city": "Paris", "limit": -2}),
    ]
    assert parsed.content == "Sure:  ok"
    assert parsed.errors == []


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[f(1)]", "positional arguments are not allowed"),
        ("[f(a=x)]", "argument a=x is not a literal value"),
        ("[f(a=__import__('os').system('true'))]", "is not a literal value"),
        ("[f(**options)]", "'**options' is not allowed"),
        ("[f(a=1, a=2)]", "argument a is given twice"),
        ("[os.system(command='true')]", "'os.system' is not a plain tool name"),
    ],
)
def test_malformed_pythonic_calls_are_error_lines(text, reason):
    parsed = parse_tool_calls(text, "pythonic")
    assert parsed.calls == []
    assert len(parsed.errors) == 1 and reason in parsed.errors[0]


def test_a_bad_element_does_not_hide_the_good_calls_of_the_list():
    parsed = parse_tool_calls("[f(a=1), 3, g(b='x')]", "pythonic")
    assert parsed.calls == [ParsedCall("f", {"a": 1}), ParsedCall("g", {"b": "x"})]
    assert parsed.errors == ["tool call 2: 3 is not a call"]


def test_an_unparseable_pythonic_call_list_is_an_error_and_stays_in_content():
    parsed = parse_tool_calls("[f(a=1, ", "pythonic")
    assert parsed.calls == []
    assert parsed.errors == ["call list at character 0: not a valid Python list of calls"]
    assert parsed.content == "[f(a=1,"


def test_a_list_comprehension_in_prose_is_not_a_call():
    parsed = parse_tool_calls("Use [f(x) for x in xs] here.", "pythonic")
    assert parsed == CallParse(content="Use [f(x) for x in xs] here.", calls=[], errors=[])


def test_unknown_style_is_a_bug_not_a_user_error():
    with pytest.raises(ValueError, match="unknown tool call style 'xml'"):
        parse_tool_calls("", "xml")  # type: ignore[arg-type]
