"""Scoring completions with several reward sources and combining them (book ch.7, ch.9).

Each source is a registered reward function or a reward model; the composite reward is the weighted
sum  R(x, y) = sum_s w_s * r_s(x, y).  A source that returns NaN or infinity is an error naming the row,
or (``on_invalid='skip'``) drops the row and reports it; a row is never dropped silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

from rlhf_core.errors import UserError
from rlhf_core.rewards.functions import REWARD_FUNCTIONS

# scores (prompt, completion) pairs in batches, e.g. a reward model (see reward_model_scoring)
ModelScorer = Callable[[list[tuple[str, str]]], list[float]]


class RewardSource(Protocol):
    """One source of a composite reward (the spec's ``RewardSourceSpec`` is one)."""

    @property
    def name(self) -> str: ...  # the key of its score in ``scores``, and of its model scorer
    @property
    def function(self) -> str | None: ...  # a name in REWARD_FUNCTIONS; None: a reward model
    @property
    def weight(self) -> float: ...  # w_s


class RewardValueError(UserError):
    """A reward source returned a value that is not a finite number."""


class RewardSourceError(UserError):
    """A reward source raised instead of returning a score."""


def check_finite(value: float, source: str, row: int) -> float:
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise RewardValueError(f"reward source '{source}' returned {value!r} for row {row} (0-based)")
    return float(value)


def composite_reward(scores: dict[str, float], weights: dict[str, float]) -> float:
    """sum_s w_s * r_s over the named scores."""
    return sum(weights[name] * value for name, value in scores.items())


def score_completions(
    rows: list[dict],
    sources: Sequence[RewardSource],
    model_scorers: dict[str, ModelScorer],
    *,
    on_invalid: str,
    stage: str,
) -> tuple[list[dict], list[str]]:
    """Add ``scores`` (source name -> r_s) and the composite ``reward`` to each row.

    Rows need ``prompt`` and ``completion`` (and what the reward functions read, e.g. ``answer``);
    ``model_scorers`` maps the name of each reward-model source to its scorer. Returns (kept rows,
    problems).
    """
    per_source: dict[str, list[float]] = {}
    for source in sources:
        try:
            if source.function is not None:
                fn = REWARD_FUNCTIONS[source.function]
                per_source[source.name] = [fn(row["completion"], row) for row in rows]
            else:
                per_source[source.name] = model_scorers[source.name](
                    [(r["prompt"], r["completion"]) for r in rows]
                )
        except UserError:
            raise
        except Exception as exc:  # a reward function's own failure: name the stage and the source
            raise RewardSourceError(
                f"stage '{stage}': reward source '{source.name}' raised {type(exc).__name__}: {exc}"
            ) from exc
    weights = {source.name: source.weight for source in sources}
    kept, problems = [], []
    for i, row in enumerate(rows):
        try:
            scores = {name: check_finite(values[i], name, i) for name, values in per_source.items()}
        except RewardValueError as exc:
            if on_invalid == "fail":
                raise RewardValueError(f"stage '{stage}': {exc}") from None
            problems.append(f"stage '{stage}': {exc}; completion dropped")
            continue
        kept.append({**row, "scores": scores, "reward": composite_reward(scores, weights)})
    return kept, problems
