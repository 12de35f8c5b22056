"""Tools a model may call: a function with a JSON Schema for its arguments (book ch.13, function calling).

Function calling means the model's arguments must conform to a declared schema. A :class:`Tool` holds
the function and its declaration; :meth:`Tool.declaration` is the OpenAI form chat templates take as
``tools=``. :func:`run_tool_calls` is the orchestrator's "execute the call, append its result" step:
each call gets one ``tool`` message, and everything that can go wrong with a call (an unknown tool,
arguments the schema rejects, the function failing) becomes text the model reads ("error: ..."), never
an exception, so that a policy can learn from its mistakes. Long outputs are truncated (the book's
advice: tool outputs must not flood the context).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator

from rlhf_core.environments.tool_calls import ParsedCall
from rlhf_core.errors import UserError

ToolOutput = str | int | float | dict | list


class ToolError(Exception):
    """A tool's own readable failure ("division by zero"): the model reads ``error: <message>``."""


@dataclass(frozen=True)
class Tool:
    """A callable tool. ``parameters`` is a JSON Schema of type object describing the keyword arguments
    ``function`` is called with; its result (text, a number, or JSON-like data) is what the model reads."""

    name: str
    description: str
    parameters: dict
    function: Callable[..., ToolOutput]

    def declaration(self) -> dict:
        """The OpenAI-style function declaration (what a chat template's ``tools=`` takes)."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


def check_tool(tool: Tool, where: str) -> None:
    """Raise a UserError naming ``where`` and the tool when its name is not an identifier or its
    parameters are not a valid JSON Schema (draft 2020-12) of type object."""
    if not isinstance(tool.name, str) or not tool.name.isidentifier():
        raise UserError(f"{where}: tool name {tool.name!r} must be an identifier (letters, digits, _)")
    if not isinstance(tool.parameters, dict):
        raise UserError(
            f"{where}: parameters of tool {tool.name!r} must be a JSON Schema object, "
            f"got {type(tool.parameters).__name__}"
        )
    try:
        Draft202012Validator.check_schema(tool.parameters)
    except jsonschema.SchemaError as error:
        path = "/".join(map(str, error.absolute_path)) or "(top level)"
        raise UserError(
            f"{where}: parameters of tool {tool.name!r} are not a valid JSON Schema "
            f"at {path}: {error.message}"
        ) from None
    if tool.parameters.get("type") != "object":
        raise UserError(
            f'{where}: parameters of tool {tool.name!r} must be a JSON Schema with "type": "object" '
            f"(the tool's keyword arguments), got type {tool.parameters.get('type')!r}"
        )
    if not callable(tool.function):
        raise UserError(f"{where}: tool {tool.name!r} has no callable function")


def validate_arguments(tool: Tool, arguments: dict) -> str | None:
    """Why ``arguments`` do not fit the tool's schema (which argument, what was expected), or None."""
    validator = Draft202012Validator(tool.parameters)
    error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
    if error is None:
        return None
    path = ".".join(map(str, error.absolute_path))
    where = f"argument {path}" if path else "arguments"
    return f"{where}: {error.message}"


@dataclass(frozen=True)
class ToolRun:
    """The ``tool`` messages answering a turn's calls, in call order, and what became of the calls:
    ``valid`` (known tool, arguments fit its schema), ``invalid`` (unknown tool or arguments rejected:
    not run), ``failed`` (valid, but the function raised)."""

    messages: list[dict]
    valid: int
    invalid: int
    failed: int


def run_tool_calls(
    calls: list[ParsedCall], tools: dict[str, Tool], *, max_output_chars: int, call_ids: list[str]
) -> ToolRun:
    """Run each call and answer it with ``{"role": "tool", "tool_call_id", "name", "content"}``."""
    if len(call_ids) != len(calls):
        raise ValueError(f"{len(call_ids)} call ids for {len(calls)} calls")
    messages, valid, invalid, failed = [], 0, 0, 0
    for call, call_id in zip(calls, call_ids, strict=True):
        tool = tools.get(call.name)
        problem = _call_problem(call, tool, tools)
        if problem is not None:
            invalid += 1
            content = f"error: {problem}"
        else:
            valid += 1
            assert tool is not None
            content, raised = _call_tool(tool, call.arguments)
            failed += raised
        content = truncate_output(content, max_output_chars)
        messages.append({"role": "tool", "tool_call_id": call_id, "name": call.name, "content": content})
    return ToolRun(messages=messages, valid=valid, invalid=invalid, failed=failed)


def _call_problem(call: ParsedCall, tool: Tool | None, tools: dict[str, Tool]) -> str | None:
    if tool is None:
        known = ", ".join(sorted(tools)) or "none"
        return f"there is no tool named {call.name!r} (tools: {known})"
    problem = validate_arguments(tool, call.arguments)
    return None if problem is None else f"{call.name}: {problem}"


def _call_tool(tool: Tool, arguments: dict) -> tuple[str, bool]:
    """The tool's output as text, and whether it raised (its error is then the text)."""
    try:
        return output_text(tool.function(**arguments)), False
    except ToolError as error:
        return f"error: {error}", True
    except Exception as error:  # the model reads what went wrong; the stage goes on
        return f"error: {tool.name} failed: {type(error).__name__}: {error}", True


def output_text(output: Any) -> str:
    """What the model reads for a tool's result: text as is, anything else as JSON."""
    if isinstance(output, str):
        return output
    return json.dumps(output, ensure_ascii=False, default=str)


def truncate_output(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` characters, with a marker saying how many were cut."""
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}\n[... {len(text) - max_chars} more characters cut]"
