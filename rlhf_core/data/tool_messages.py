"""Shapes of tool-use data in ``sft`` rows (book ch.13, tool use and function calling).

A tool-use trajectory is an OpenAI-style conversation (the shapes of ``rlhf_core.environments.base``):

- an assistant message may carry ``tool_calls`` (an empty list or null: none, as files with one schema
  for every message store them): a list of ``{"id": str, "type": "function",
  "function": {"name": str, "arguments": dict or a JSON string}}``; its ``content`` may then be empty
  or None (a turn that only calls tools);
- a ``tool`` message answers a call: ``{"role": "tool", "tool_call_id": str, "content": str}`` (and
  optionally the function's ``name``); it follows the assistant turn that made the call, or another
  tool message;
- the row's optional ``tools`` column lists the declarations the model was shown:
  ``{"type": "function", "function": {"name": str, "description": str, "parameters": dict}}``.

Optional fields may be null (a Parquet or Hub file gives every message every field). Each check returns
``(field, what was expected)`` for the first problem, or None (as in ``schemas``).
"""

from __future__ import annotations

import json
from typing import Any

Problem = tuple[str | None, str]


def _is_nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _check_arguments(arguments: Any, field: str) -> Problem | None:
    if isinstance(arguments, dict):
        return None
    if isinstance(arguments, str):
        try:
            if isinstance(json.loads(arguments), dict):
                return None
        except json.JSONDecodeError:
            pass
    return field, f"the call's arguments as a dict or a JSON object in a string, got {arguments!r:.80}"


def check_tool_call(call: Any, field: str) -> Problem | None:
    """One entry of an assistant's ``tool_calls``."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return (
            field,
            f'a dict {{"id", "type": "function", "function": {{"name", "arguments"}}}}, got {call!r:.80}',
        )
    if call.get("type", "function") != "function":
        return f"{field}.type", f"'function', got {call['type']!r}"
    if call.get("id") is not None and not isinstance(call["id"], str):
        return f"{field}.id", f"a string, got {call['id']!r}"
    if not _is_nonempty_str(call["function"].get("name")):
        return (
            f"{field}.function.name",
            f"the function's name as a non-empty string, got {call['function'].get('name')!r}",
        )
    return _check_arguments(call["function"].get("arguments"), f"{field}.function.arguments")


def check_assistant_calls(msg: dict, field: str) -> Problem | None:
    """An assistant message with ``tool_calls``: the calls, and content that is text or empty/None."""
    calls = msg["tool_calls"]
    if not isinstance(calls, list) or not calls:
        return f"{field}.tool_calls", f"a non-empty list of tool calls, got {calls!r:.80}"
    if msg.get("content") is not None and not isinstance(msg["content"], str):
        return (
            f"{field}.content",
            f"a string, empty or None when the turn only calls tools, got {msg['content']!r:.80}",
        )
    for i, call in enumerate(calls):
        if (problem := check_tool_call(call, f"{field}.tool_calls[{i}]")) is not None:
            return problem
    return None


def check_tool_message(msg: dict, field: str, previous: dict | None) -> Problem | None:
    """A ``tool`` message: its call id and content, and that it answers an assistant turn's calls."""
    if not _is_nonempty_str(msg.get("tool_call_id")):
        return (
            f"{field}.tool_call_id",
            f"the id of the call it answers (a non-empty string), got {msg.get('tool_call_id')!r}",
        )
    if not isinstance(msg.get("content"), str):
        return f"{field}.content", f"the tool's result as a string, got {msg.get('content')!r:.80}"
    if msg.get("name") is not None and not isinstance(msg["name"], str):
        return f"{field}.name", f"the function's name as a string, got {msg['name']!r}"
    answers_calls = previous is not None and (
        previous.get("role") == "tool" or (previous.get("role") == "assistant" and previous.get("tool_calls"))
    )
    if not answers_calls:
        return (
            f"{field}.role",
            "a 'tool' message right after an assistant turn with 'tool_calls' (or another tool message)",
        )
    return None


def check_tools_column(tools: Any) -> Problem | None:
    """The ``tools`` column: a list of function declarations (an empty list: no tools)."""
    if not isinstance(tools, list):
        return "tools", f"a list of function declarations, got {tools!r:.80}"
    for i, tool in enumerate(tools):
        field = f"tools[{i}]"
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(tool.get("function"), dict)
        ):
            expected = '{"type": "function", "function": {"name", "description", "parameters"}}'
            return field, f"a function declaration {expected}, got {tool!r:.80}"
        function = tool["function"]
        if not _is_nonempty_str(function.get("name")):
            return f"{field}.function.name", f"a non-empty string, got {function.get('name')!r}"
        if function.get("description") is not None and not isinstance(function["description"], str):
            return f"{field}.function.description", f"a string, got {function['description']!r:.80}"
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            return (
                f"{field}.function.parameters",
                f"a JSON Schema object (dict), got {function['parameters']!r:.80}",
            )
    return None
