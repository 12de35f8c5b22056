"""The base of what every stage kind's work returns (``run(stage, inputs, env) -> result``).

A result says, besides what its kind produced:

- ``summary()``: the stage's key figures, shown in the pipeline summary and logged as ``summary/*`` on
  the stage run (a few numbers, not every metric);
- ``problems``: input rows or scores the work set aside, one line each (kept as a text artifact).

It is a plain base class, not a dataclass, so that any result type can derive from it: a dataclass
(frozen or not) or a pydantic model declares its own ``problems`` field when it has any.
"""

from __future__ import annotations

from collections.abc import Sequence


class StageResult:
    """Base of the result types of the stage kinds' entry points."""

    problems: Sequence[str] = ()

    def summary(self) -> dict[str, float]:
        """The stage's key figures for the pipeline summary."""
        raise NotImplementedError(f"{type(self).__name__} does not say its key figures (summary())")
