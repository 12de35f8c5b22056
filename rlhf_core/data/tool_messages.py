"""Shapes of tool-use data in ``sft`` and ``preference`` rows (book ch.13, tool use and function calling).

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

A ``preference`` row of trajectories (DPO over trajectories, ch.13 with ch.8) has ``chosen`` and
``rejected`` as whole conversations: they share their first messages up to a user turn (the prompt x)
and then each continues with the model's turns and the tool results they got, ending in an assistant
turn. :func:`trajectory_prompt_length` finds where x ends; :func:`check_trajectory_pair` checks the
continuations.
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


# --- preference pairs of trajectories --------------------------------------------------------------


def has_tool_use(messages: Any) -> bool:
    """True when a list of messages holds a ``tool`` message or an assistant turn with ``tool_calls``."""
    return isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or bool(m.get("tool_calls"))) for m in messages
    )


def is_trajectory_pair(chosen: Any, rejected: Any) -> bool:
    """Whether ``chosen`` and ``rejected`` are conversations and at least one of them uses tools."""
    both_lists = isinstance(chosen, list) and isinstance(rejected, list)
    return both_lists and (has_tool_use(chosen) or has_tool_use(rejected))


def trajectory_message(msg: dict) -> dict:
    """A valid message with the keys the chat template reads: role and content (None as ''), an assistant
    turn's ``tool_calls`` when it makes some, a tool message's ``tool_call_id`` (and ``name``)."""
    out = {"role": msg["role"], "content": msg.get("content") or ""}
    if msg.get("tool_calls"):
        out["tool_calls"] = msg["tool_calls"]
    if msg["role"] == "tool":
        out["tool_call_id"] = msg["tool_call_id"]
        if msg.get("name") is not None:
            out["name"] = msg["name"]
    return out


def _shared_length(chosen: list[dict], rejected: list[dict]) -> int:
    """How many leading messages the two conversations have in common."""
    pairs = zip(chosen, rejected, strict=False)
    differs = (i for i, (a, b) in enumerate(pairs) if trajectory_message(a) != trajectory_message(b))
    return next(differs, min(len(chosen), len(rejected)))


def trajectory_prompt_length(chosen: list[dict], rejected: list[dict]) -> int:
    """The number of messages of x: the shared messages up to and including the last shared user turn
    (0 when they share none). Turns both sides share after it (the same first tool call) stay in y."""
    shared = _shared_length(chosen, rejected)
    users = [i for i in range(shared) if chosen[i]["role"] == "user"]
    return users[-1] + 1 if users else 0


_PROMPT = "the prompt x is the turns 'chosen' and 'rejected' share up to their last shared 'user' turn"


def _check_continuation(chat: list[dict], start: int, column: str) -> Problem | None:
    """y = chat[start:]: an assistant turn first, then tool results and assistant turns only, each later
    assistant turn right after tool results (a model turn without calls ends the trajectory)."""
    for j in range(start, len(chat)):
        role, field = chat[j]["role"], f"{column}[{j}].role"
        if j == start and role != "assistant":
            return field, f"an 'assistant' turn first after the prompt ({_PROMPT}), got {role!r}"
        if role not in ("assistant", "tool"):
            return field, f"only 'assistant' and 'tool' messages after the prompt ({_PROMPT}), got {role!r}"
        if role == "assistant" and j > start and chat[j - 1]["role"] != "tool":
            return field, (
                "tool results ('tool' messages) before another assistant turn: a turn without tool calls "
                "ends the trajectory"
            )
    return None


def check_trajectory_pair(chosen: list[dict], rejected: list[dict]) -> Problem | None:
    """A pair of trajectories whose conversations are each valid (tool use allowed, ending in an
    assistant turn): they share x, ending in a user turn, and differ in their continuations y_c, y_r."""
    start = trajectory_prompt_length(chosen, rejected)
    if start == 0:
        i = _shared_length(chosen, rejected)
        return f"rejected[{i}]", (
            f"the turn chosen[{i}]: the two conversations must start with the same turns up to a 'user' "
            f"turn ({_PROMPT})"
        )
    if [trajectory_message(m) for m in chosen] == [trajectory_message(m) for m in rejected]:
        return "rejected", "a trajectory different from 'chosen' (they are identical)"
    return _check_continuation(chosen, start, "chosen") or _check_continuation(rejected, start, "rejected")
