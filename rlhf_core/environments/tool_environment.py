"""The ``tools`` environment: the model may call tools until it answers (book ch.13, the orchestration
loop: "while the response has tool calls, run them and append their results; else return the answer").

Options (the spec's ``environment.options``):

- ``tools``: built-in tool names (``calculator``, ``python``), ``{"builtin": "python", "sandbox":
  "none", ...}`` for a built-in with options, or a user's function ``{"function": "tools.py:lookup"``
  (or ``"pkg.module:lookup"``), ``"name"`` (default: the function's name), ``"description"`` (default:
  its docstring), ``"parameters"`` (a JSON Schema of type object)``}``;
- ``call_style``: how the model writes calls, ``hermes`` (JSON in ``<tool_call>`` blocks; default) or
  ``pythonic`` (``[fn(a=1)]``, Llama 3.2), see :mod:`rlhf_core.environments.tool_calls`;
- ``max_calls``: tool calls per episode (default 8); a turn whose calls would go past it ends the
  episode without running them (a finished step carries no messages, by the protocol of
  :class:`~rlhf_core.environments.base.StepResult`: the metric ``calls_over_limit`` records it);
- ``max_output_chars``: a tool result longer than this is truncated (default 1000);
- ``system_prompt``: a system message put first when the row's prompt has none;
- ``prompt_column``: the row's column holding the prompt, text or a list of messages (default prompt).

The constructor's ``base_dir`` is where relative ``file.py`` references are found (the spec's folder).

Each step's metrics: ``tool_calls`` (calls the model attempted, malformed ones included),
``valid_tool_calls`` (known tool, arguments fit its schema), ``invalid_tool_calls`` (malformed, unknown
tool or arguments rejected), ``tool_errors`` (valid calls whose function failed), ``calls_over_limit``
(calls not run because of ``max_calls``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlhf_core.environments.base import EpisodeStart, Message, StepResult
from rlhf_core.environments.builtin_tools import builtin_tool
from rlhf_core.environments.tool_calls import ParsedCall, parse_tool_calls
from rlhf_core.environments.tools import Tool, check_tool, run_tool_calls
from rlhf_core.errors import UserError
from rlhf_core.rewards.user_functions import is_reference, load_function, parse_reference

_WHERE = "environment 'tools'"


class ToolEnvironmentOptions(BaseModel):
    """Options of the ``tools`` environment (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tools: list[str | dict[str, Any]] = Field(
        min_length=1,
        description="Built-in tool names, {builtin: name, ...options}, or user functions {function: "
        "'file.py:fn', name, description, parameters (JSON Schema)}.",
    )
    call_style: Literal["hermes", "pythonic"] = Field(
        "hermes", description="How the model writes calls: <tool_call> JSON blocks, or a [fn(a=1)] list."
    )
    max_calls: int = Field(8, ge=0, description="Tool calls allowed per episode; past it the episode ends.")
    max_output_chars: int = Field(
        1000, ge=1, description="Tool results are truncated to this many characters."
    )
    system_prompt: str | None = Field(None, description="System message put first when the prompt has none.")
    prompt_column: str = Field("prompt", description="Row column holding the prompt (text or messages).")


def resolve_tools(specs: list[str | dict[str, Any]], base_dir: str | Path = ".") -> dict[str, Tool]:
    """The tools the ``tools`` option names, by name, each checked; a UserError names the bad entry."""
    tools: dict[str, Tool] = {}
    for index, spec in enumerate(specs):
        where = f"{_WHERE}, tools[{index}]"
        tool = _resolve_tool(spec, where, base_dir)
        check_tool(tool, where)
        if tool.name in tools:
            raise UserError(f"{where}: a second tool named {tool.name!r}; tool names must be unique")
        tools[tool.name] = tool
    return tools


def user_tool_references(specs: list[str | dict[str, Any]]) -> list[str]:
    """The function references of the user's tools (for the stage's fingerprint)."""
    return [spec["function"] for spec in specs if isinstance(spec, dict) and "function" in spec]


def _resolve_tool(spec: str | dict[str, Any], where: str, base_dir: str | Path) -> Tool:
    if isinstance(spec, str):
        return builtin_tool(spec)
    if "builtin" in spec:
        options = {key: value for key, value in spec.items() if key != "builtin"}
        return builtin_tool(spec["builtin"], **options)
    if "function" not in spec:
        raise UserError(f"{where}: expected a built-in tool name, {{builtin: name}} or {{function: ...}}")
    unknown = sorted(set(spec) - {"function", "name", "description", "parameters"})
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(unknown)} (keys: function, name, description, parameters)"
        )
    reference = spec["function"]
    if not isinstance(reference, str) or not is_reference(reference):
        raise UserError(f"{where}: function {reference!r}: expected 'file.py:function' or 'module:function'")
    try:
        function = load_function(parse_reference(reference, base_dir))
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    if "parameters" not in spec:
        raise UserError(f"{where}: tool {reference} needs 'parameters', a JSON Schema of its arguments")
    description = spec.get("description") or inspect.getdoc(function)
    if not description:
        raise UserError(f"{where}: tool {reference} needs a 'description' (or a docstring) for the model")
    name = spec.get("name") or reference.rpartition(":")[2]
    return Tool(name=name, description=description, parameters=spec["parameters"], function=function)


class ToolEnvironment:
    """One episode in which the model may call tools before it answers; see the module docstring.

    Malformed calls (text that looks like a call but cannot be read) are answered with a ``user``
    message, not a ``tool`` one: a tool message must answer a call id, and a call that was never read
    has none (chat templates pair each tool result with a call of the assistant turn). Calls that were
    read but name an unknown tool or give arguments the schema rejects do have ids, so they get ``tool``
    messages holding the error.
    """

    def __init__(self, base_dir: str | Path = ".", **options: Any) -> None:
        try:
            self.options = ToolEnvironmentOptions(**options)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise UserError(f"{_WHERE}: invalid options: {problems}") from None
        self.tools = resolve_tools(self.options.tools, base_dir)
        self.turn = 0
        self.calls_made = 0

    def reset(self, row: dict) -> EpisodeStart:
        """The row's prompt as messages (a system prompt first when set and missing) and the tools."""
        messages = _prompt_messages(row, self.options.prompt_column)
        if self.options.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.options.system_prompt})
        self.turn, self.calls_made = 0, 0
        return EpisodeStart(messages=messages, tools=[tool.declaration() for tool in self.tools.values()])

    def step(self, assistant: Message) -> StepResult:
        """Run the turn's calls and answer with their results; a turn without calls is the answer."""
        parsed = parse_tool_calls(assistant.get("content") or "", self.options.call_style)
        attempted = len(parsed.calls) + len(parsed.errors)
        call_ids = [f"call_{self.turn}_{k}" for k in range(len(parsed.calls))]
        record = _assistant_record(parsed.content, parsed.calls, call_ids)
        if parsed.errors:  # the conversation keeps what the model really wrote, malformed call and all
            record = {"role": "assistant", "content": assistant.get("content") or ""}
        self.turn += 1
        metrics = {"tool_calls": float(attempted), "valid_tool_calls": 0.0, "tool_errors": 0.0}
        metrics |= {"invalid_tool_calls": float(len(parsed.errors)), "calls_over_limit": 0.0}
        if attempted == 0:
            return StepResult(done=True, assistant=record, metrics=metrics)
        if self.calls_made + attempted > self.options.max_calls:
            metrics["calls_over_limit"] = float(attempted)
            return StepResult(done=True, assistant=record, metrics=metrics)
        self.calls_made += attempted
        run = run_tool_calls(
            parsed.calls, self.tools, max_output_chars=self.options.max_output_chars, call_ids=call_ids
        )
        metrics["valid_tool_calls"] = float(run.valid)
        metrics["invalid_tool_calls"] += run.invalid
        metrics["tool_errors"] = float(run.failed)
        messages = list(run.messages)
        if parsed.errors:
            messages.append(
                {"role": "user", "content": _malformed_message(parsed.errors, self.options.call_style)}
            )
        return StepResult(messages=messages, assistant=record, metrics=metrics)


def _prompt_messages(row: dict, column: str) -> list[Message]:
    if column not in row:
        raise UserError(
            f"{_WHERE}: the row has no column '{column}' (its columns: {', '.join(map(str, row))}); "
            "set the option prompt_column"
        )
    prompt = row[column]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
        return [dict(message) for message in prompt]
    raise UserError(
        f"{_WHERE}: column '{column}' must hold text or a non-empty list of {{role, content}} messages, "
        f"got {prompt!r:.80}"
    )


def _assistant_record(content: str, calls: list[ParsedCall], call_ids: list[str]) -> Message:
    """The assistant turn as the conversation records it: its text and its calls in OpenAI form."""
    record: Message = {"role": "assistant", "content": content}
    if calls:
        record["tool_calls"] = [
            {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call, call_id in zip(calls, call_ids, strict=True)
        ]
    return record


def _malformed_message(errors: list[str], style: str) -> str:
    expected = {
        "hermes": '<tool_call>\n{"name": "tool_name", "arguments": {"argument": "value"}}\n</tool_call>',
        "pythonic": '[tool_name(argument="value")]',
    }[style]
    lines = "\n".join(f"- {error}" for error in errors)
    return f"Some tool calls could not be read and were not run:\n{lines}\nWrite each call as:\n{expected}"
