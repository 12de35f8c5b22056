"""Reading a model's tool calls out of its text, and writing them back (book ch.13, "Python vs JSON formats").

A model trained for function calling writes its calls in the format its chat template taught it. Two
styles are read here:

- ``hermes`` (Hermes, Qwen 2.5/3): one JSON object per call, each in its own block::

      <tool_call>
      {"name": "calculator", "arguments": {"expression": "2+3"}}
      </tool_call>

  ``arguments`` may also be a JSON string that holds an object (some models double-encode it).
- ``pythonic`` (Llama 3.2): a bracketed list of Python calls with keyword arguments::

      [calculator(expression="2+3"), lookup(city="Paris", limit=3)]

  parsed with :mod:`ast` (never evaluated); each argument must be a literal (string, number, boolean,
  None, or a list / dict / tuple of literals).

A malformed call is never an exception: it becomes one line in :attr:`CallParse.errors` (a turn the
environment answers with "your call could not be read: ..."), so RL can teach the format. The text
outside the calls is :attr:`CallParse.content`. :func:`format_tool_calls` writes calls in a style
(trajectories for SFT on tool use; ``parse_tool_calls(format_tool_calls(calls)).calls == calls``).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

CallStyle = Literal["hermes", "pythonic"]
CALL_STYLES: tuple[str, ...] = ("hermes", "pythonic")

_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_HERMES_OPEN = "<tool_call>"
# Where a pythonic call list may start: '[' then a name then '('.
_PYTHONIC_START = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")
_MAX_CLOSING_TRIES = 256  # ']' tried as the end of one candidate call list


@dataclass(frozen=True)
class ParsedCall:
    """One tool call: the tool's name and its arguments (keyword -> JSON-like value)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CallParse:
    """What a model's text holds: its text outside the calls (stripped), the calls read, and one line
    per call that could not be read."""

    content: str
    calls: list[ParsedCall]
    errors: list[str]


def parse_tool_calls(text: str, style: CallStyle) -> CallParse:
    """The calls written in ``text`` in ``style`` (see the module docstring); malformed ones in errors."""
    if style == "hermes":
        return _parse_hermes(text)
    if style == "pythonic":
        return _parse_pythonic(text)
    raise ValueError(f"unknown tool call style {style!r} (known: {', '.join(CALL_STYLES)})")


def format_tool_calls(calls: list[ParsedCall], style: CallStyle) -> str:
    """The text a model writes for ``calls`` in ``style``; empty when there are none."""
    if not calls:
        return ""
    if style == "hermes":
        blocks = [
            json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False) for call in calls
        ]
        return "\n".join(f"{_HERMES_OPEN}\n{block}\n</tool_call>" for block in blocks)
    if style == "pythonic":
        return "[" + ", ".join(_pythonic_call(call) for call in calls) + "]"
    raise ValueError(f"unknown tool call style {style!r} (known: {', '.join(CALL_STYLES)})")


def _pythonic_call(call: ParsedCall) -> str:
    keywords = ", ".join(f"{key}={value!r}" for key, value in call.arguments.items())
    return f"{call.name}({keywords})"


# --- hermes -----------------------------------------------------------------------------------------


def _parse_hermes(text: str) -> CallParse:
    calls: list[ParsedCall] = []
    errors: list[str] = []
    outside: list[str] = []
    position = 0
    for number, match in enumerate(_HERMES_BLOCK.finditer(text), start=1):
        outside.append(text[position : match.start()])
        position = match.end()
        call, error = _hermes_call(match.group(1))
        if error is not None:
            errors.append(f"tool call {number}: {error}")
        else:
            calls.append(call)
    rest = text[position:]
    unclosed = rest.find(_HERMES_OPEN)
    if unclosed >= 0:  # cut off, or the model forgot to close it: an attempted call
        errors.append(
            f"tool call {len(calls) + len(errors) + 1}: <tool_call> is never closed by </tool_call>"
        )
        rest = rest[:unclosed]
    outside.append(rest)
    return CallParse(content="".join(outside).strip(), calls=calls, errors=errors)


def _hermes_call(body: str) -> tuple[ParsedCall | None, str | None]:
    """One block's call, or the reason it cannot be read."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        return (
            None,
            f"not valid JSON ({error.msg} at line {error.lineno} column {error.colno}): {body.strip():.80}",
        )
    if not isinstance(value, dict):
        return (
            None,
            f'expected a JSON object {{"name": ..., "arguments": {{...}}}}, got {type(value).__name__}',
        )
    unexpected = sorted(set(value) - {"name", "arguments"})
    if unexpected:
        return None, f"unexpected key(s) {', '.join(map(repr, unexpected))}; expected 'name' and 'arguments'"
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return None, "missing 'name' (the tool's name, a string)"
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # double-encoded: a JSON string holding the object
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None, f"'arguments' of {name} is a string that is not a JSON object: {arguments:.80}"
    if not isinstance(arguments, dict):
        return None, f"'arguments' of {name} must be a JSON object, got {type(arguments).__name__}"
    return ParsedCall(name=name, arguments=arguments), None


# --- pythonic ---------------------------------------------------------------------------------------


def _parse_pythonic(text: str) -> CallParse:
    calls: list[ParsedCall] = []
    errors: list[str] = []
    outside: list[str] = []
    position = 0
    while (start := _PYTHONIC_START.search(text, position)) is not None:
        end, node = _call_list_at(text, start.start())
        if node is None:
            if end < 0:  # nothing from here parses: a call list the model got wrong
                errors.append(f"call list at character {start.start()}: not a valid Python list of calls")
            outside.append(text[position : start.end()])
            position = start.end()
            continue
        outside.append(text[position : start.start()])
        position = end
        for element in node.elts:
            call, error = _pythonic_element(element)
            if error is not None:
                errors.append(f"tool call {len(calls) + len(errors) + 1}: {error}")
            else:
                calls.append(call)
    outside.append(text[position:])
    return CallParse(content="".join(outside).strip(), calls=calls, errors=errors)


def _call_list_at(text: str, start: int) -> tuple[int, ast.List | None]:
    """The shortest ``[...]`` from ``start`` that parses as a Python expression: when it is a list whose
    first element is a call, (the index after it, the list); when it is something else, such as a list
    comprehension in prose, (start, None); when nothing parses, (-1, None)."""
    closing = start
    for _ in range(_MAX_CLOSING_TRIES):
        closing = text.find("]", closing + 1)
        if closing < 0:
            break
        try:
            tree = ast.parse(text[start : closing + 1], mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        if isinstance(tree.body, ast.List) and tree.body.elts and isinstance(tree.body.elts[0], ast.Call):
            return closing + 1, tree.body
        return start, None  # not a list of calls (e.g. `[f(x) for x in y]`): prose, not a call attempt
    return -1, None


def _pythonic_element(node: ast.expr) -> tuple[ParsedCall | None, str | None]:
    """One list element's call, or the reason it is not ``name(key=literal, ...)``."""
    source = ast.unparse(node)
    if not isinstance(node, ast.Call):
        return None, f"{source:.80} is not a call"
    if not isinstance(node.func, ast.Name):
        return None, f"{ast.unparse(node.func)!r} is not a plain tool name"
    name = node.func.id
    if node.args:
        return None, f"{name}: positional arguments are not allowed; write name=value for each argument"
    arguments: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            return None, f"{name}: '**{ast.unparse(keyword.value)}' is not allowed; write name=value"
        if keyword.arg in arguments:
            return None, f"{name}: argument {keyword.arg} is given twice"
        try:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            value = ast.unparse(keyword.value)
            return None, f"{name}: argument {keyword.arg}={value:.60} is not a literal value"
    return ParsedCall(name=name, arguments=arguments), None
