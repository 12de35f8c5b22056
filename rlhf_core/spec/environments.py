"""The ``environment:`` of a stage that runs multi-turn episodes (``sample``, ``evaluate``,
``policy_gradient``; book ch.13): which environment, its options and tools, and the episode's limits."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from rlhf_core.environments.registry import environment_factory
from rlhf_core.errors import UserError
from rlhf_core.spec.base import Strict
from rlhf_core.spec.function_references import RewardFunctionName


class ToolSpec(Strict):
    """A tool of the user's: a Python function, with the JSON Schema of its arguments."""

    function: RewardFunctionName = Field(
        description="The function the tool runs: 'tools.py:lookup' (a file next to the spec) or "
        "'my_pkg.tools:lookup'; called with the arguments as keyword arguments, returns text or JSON."
    )
    parameters: dict[str, Any] = Field(
        description="JSON Schema (type object) of the arguments; calls are validated against it."
    )
    name: str | None = Field(
        default=None, description="The tool's name as the model calls it (default: the function's name)."
    )
    description: str | None = Field(
        default=None, description="What the tool does, shown to the model (default: the docstring)."
    )


class BuiltinToolSpec(Strict):
    """A built-in tool with options, e.g. {builtin: python, options: {sandbox: none, timeout_seconds: 5}}."""

    builtin: str = Field(description="calculator or python.")
    options: dict[str, Any] = Field(default_factory=dict, description="The built-in's options.")


class EnvironmentSpec(Strict):
    """What the model talks to in an episode: tools it may call, a verifier that says 'try again', a
    simulated user, or your own class; episodes end when it is done or at ``max_turns``."""

    name: RewardFunctionName = Field(
        description="A built-in (tools, verifier_feedback, user_simulator) or your own class: "
        "'envs.py:MyEnv' (a file next to the spec) or 'my_pkg.envs:MyEnv', with reset(row) and "
        "step(assistant_message)."
    )
    tools: tuple[str | BuiltinToolSpec | ToolSpec, ...] = Field(
        default=(),
        description="The `tools` environment's tools: built-ins by name (calculator, python), with options "
        "({builtin: python, options: {sandbox: none}}), or your own functions with their JSON Schema.",
    )
    verifier: RewardFunctionName | None = Field(
        default=None,
        description="The `verifier_feedback` environment's verifier (a built-in or your own by reference).",
    )
    user: RewardFunctionName | None = Field(
        default=None,
        description="The `user_simulator` environment's function fn(messages, row) -> next user message or "
        "None (unset: the row's `followups` column).",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Further keyword arguments of the environment's class."
    )
    max_turns: int = Field(default=4, ge=1, le=64, description="Assistant turns per episode at most.")
    max_context_tokens: int | None = Field(
        default=None,
        ge=16,
        description="An episode stops (counted) before a turn that could go past this many tokens; "
        "unset: the policy's maximum sequence length.",
    )

    @model_validator(mode="after")
    def _environment_loads(self) -> EnvironmentSpec:
        try:
            environment_factory(self.name, self.constructor_options())
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return self

    def constructor_options(self) -> dict[str, Any]:
        """The keyword arguments the environment's class is made with."""
        options = dict(self.options)
        if self.tools:
            options["tools"] = [_tool_option(t) for t in self.tools]
        if self.verifier is not None:
            options["verifier"] = self.verifier
        if self.user is not None:
            options["function"] = self.user
        return options

    def factory(self):
        """A maker of fresh environments, one per episode."""
        return environment_factory(self.name, self.constructor_options())


def _tool_option(tool: str | BuiltinToolSpec | ToolSpec) -> str | dict[str, Any]:
    """A tool entry as the ``tools`` environment takes it."""
    if isinstance(tool, str):
        return tool
    if isinstance(tool, BuiltinToolSpec):
        return {"builtin": tool.builtin, **tool.options}
    return tool.model_dump(exclude_none=True)
