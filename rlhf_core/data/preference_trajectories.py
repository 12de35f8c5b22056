"""Preference pairs as trajectories: a prompt x and two continuations of messages (book ch.13, DPO over
trajectories for when to call a tool; ch.8 for DPO).

A pair of tool-use trajectories (``chosen`` and ``rejected`` whole conversations that share x, see
:mod:`rlhf_core.data.tool_messages`) continues x with several messages on each side: assistant turns that
call tools, the tools' results, the final answer. Direct alignment scores log pi(y|x) over the model's own
turns only, so it needs those continuations as messages rather than as text. :func:`preference_trajectories`
gives every valid ``preference`` row in that one form; a single-turn row's continuations are one assistant
message each, so single-turn and trajectory pairs go through the same code.
"""

from __future__ import annotations

from typing import NamedTuple

from rlhf_core.data.schemas import preference_parts
from rlhf_core.data.tool_messages import is_trajectory_pair, trajectory_message, trajectory_prompt_length


class TrajectoryParts(NamedTuple):
    """A preference pair as messages, whatever the row's shape."""

    prompt: list[dict]  # x, ending in a user turn
    chosen: list[dict]  # y_c: the messages after x, from an assistant turn to the final assistant turn
    rejected: list[dict]  # y_r, likewise
    tools: list[dict] | None  # the function declarations the model was shown (None: no tools)


def is_trajectory_row(row: dict) -> bool:
    """True for a valid ``preference`` row whose conversations use tools (assistant calls, tool results)."""
    return is_trajectory_pair(row.get("chosen"), row.get("rejected"))


def uses_tools(row: dict) -> bool:
    """True for a pair of trajectories or a row declaring tools: the model saw tools in either case."""
    return is_trajectory_row(row) or bool(row.get("tools"))


def preference_trajectories(row: dict) -> TrajectoryParts:
    """(x, y_c messages, y_r messages, tools) of a valid ``preference`` row of any shape.

    Trajectories split where x ends: after the last user turn both conversations share (a first tool
    call both make stays in y_c and y_r). Messages keep the keys the chat template reads for tool use
    (:func:`~rlhf_core.data.tool_messages.trajectory_message`). Other shapes give x and one assistant
    message per side, as :func:`~rlhf_core.data.schemas.preference_parts` reads them.
    """
    tools = row.get("tools") or None
    if is_trajectory_row(row):
        chosen, rejected = row["chosen"], row["rejected"]
        start = trajectory_prompt_length(chosen, rejected)
        prompt = [trajectory_message(m) for m in chosen[:start]]
        y_c = [trajectory_message(m) for m in chosen[start:]]
        y_r = [trajectory_message(m) for m in rejected[start:]]
        return TrajectoryParts(prompt, y_c, y_r, tools)
    x, y_c, y_r = preference_parts(row)
    assistant = [{"role": "assistant", "content": y_c}], [{"role": "assistant", "content": y_r}]
    return TrajectoryParts(x, *assistant, tools)
