"""What an environment is: the other side of a multi-turn episode (book ch.13, tool use and function calling).

An *episode* starts from a prompt row. The environment's :meth:`Environment.reset` turns the row into the
first messages the model sees (and the tools it may call); then, turn by turn, the model writes an
assistant message and :meth:`Environment.step` answers it with the next messages (tool results in
``tool`` messages with their call id, a simulated user's reply, a verifier's "that is wrong, try
again"), a reward when it has one for that turn, and whether the episode is over. The orchestrator
(:mod:`rlhf_core.rollout.episodes`) runs many episodes at once, keeps the model's own tokens apart from
the environment's (only the former carry loss, log-probs, KL and advantages) and stops an episode that
reaches the turn limit.

Messages are OpenAI-style dicts:

- ``{"role": "assistant", "content": str, "tool_calls": [{"id": str, "type": "function",
  "function": {"name": str, "arguments": dict}}]}`` (``tool_calls`` only when there are calls);
- ``{"role": "tool", "tool_call_id": str, "name": str, "content": str}``;
- ``{"role": "user" | "system", "content": str}``.

An environment object lives for one episode (the orchestrator makes one per episode from its class and
options), so it may keep the episode's state on itself. A user's environment is a class named by
reference in the spec (``envs.py:MyEnvironment``, as reward functions are); its source is part of the
stage's fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Message = dict[str, Any]


@dataclass
class EpisodeStart:
    """What the model sees first: the conversation (ending in a user turn) and the tools it may call, as
    JSON-Schema function declarations (``{"type": "function", "function": {"name", "description",
    "parameters"}}``) handed to the chat template's own tool support (``tools=``); empty: no tools."""

    messages: list[Message]
    tools: list[dict] = field(default_factory=list)


@dataclass
class StepResult:
    """The environment's answer to one assistant turn.

    ``messages``: what comes back to the model (tool results, a user's reply); empty when ``done``.
    ``reward``: this turn's reward, when the environment gives one (summed over the episode, on top of the
    stage's reward sources, which score the final answer). ``done``: the episode is over.
    ``assistant``: the model's turn as the conversation should record it (its tool calls parsed into
    ``tool_calls``); None records the raw text. ``metrics``: counts for this turn (``tool_calls``,
    ``invalid_tool_calls``, ...), summed over the episode and logged.
    """

    messages: list[Message] = field(default_factory=list)
    reward: float | None = None
    done: bool = False
    assistant: Message | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """One episode's environment. Raising is a bug of the environment: the stage fails naming it."""

    def reset(self, row: dict) -> EpisodeStart:
        """The episode's first messages and tools, from the prompt row (every column of it)."""
        ...

    def step(self, assistant: Message) -> StepResult:
        """Answer the model's turn ``{"role": "assistant", "content": <the text it wrote>}``."""
        ...
