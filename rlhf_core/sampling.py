"""The ``sample`` stage's work (book ch.9): N completions per prompt, scored by reward sources.

Rows of the completions dataset: ``prompt_index``, ``prompt``, ``answer`` (when the prompt has one),
``completion_index``, ``completion``, ``new_tokens``, ``scores`` (reward source name -> value) and
``reward`` (the weighted composite sum_s w_s * r_s).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rlhf_core.rewards import REWARD_FUNCTIONS, RewardValueError, check_finite
from rlhf_core.spec import RewardSourceSpec

# name of a reward-model source -> function scoring (prompt, completion) pairs in batches
ModelScorer = Callable[[list[tuple[str, str]]], list[float]]


@dataclass
class SampleResult:
    rows: list[dict]
    generated_tokens: int
    generation_seconds: float
    problems: list[str] = field(default_factory=list)

    @property
    def new_tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


def score_completions(
    rows: list[dict],
    sources: tuple[RewardSourceSpec, ...],
    model_scorers: dict[str, ModelScorer],
    *,
    on_invalid: str,
    stage: str,
) -> tuple[list[dict], list[str]]:
    """Add ``scores`` and the composite ``reward`` to each row; returns (kept rows, problems).

    A NaN or infinite score fails the stage naming the row, or (``on_invalid='skip'``) drops the row and
    reports it; a row is never dropped silently.
    """
    per_source: dict[str, list[float]] = {}
    for source in sources:
        if source.function is not None:
            fn = REWARD_FUNCTIONS[source.function]
            per_source[source.name] = [fn(row["completion"], row) for row in rows]
        else:
            per_source[source.name] = model_scorers[source.name](
                [(r["prompt"], r["completion"]) for r in rows]
            )
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
        kept.append({**row, "scores": scores, "reward": sum(weights[k] * v for k, v in scores.items())})
    return kept, problems
