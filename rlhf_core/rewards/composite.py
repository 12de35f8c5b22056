"""Scoring completions with several reward sources and combining them (book ch.7, ch.9).

Each source is a reward function (a built-in or a user's, :mod:`rlhf_core.rewards.scorers`), a reward
model or a judge behind an endpoint (the last two scored by the ``model_scorers`` the caller built, e.g.
with :func:`rlhf_core.judging.endpoint_stage_judges.reward_scorers`); the composite reward is the
weighted sum  R(x, y) = sum_s w_s * r_s(x, y).  A source that returns NaN, infinity or a non-number is
an error naming the source and the row, or (``on_invalid='skip'``) drops the row and reports it; a row
is never dropped silently. A function that raises fails the stage naming the source (and the row, when
the function scores one row at a time), unless its ``on_error: zero`` turns a raising row into a score
of 0, counted in the ``errors`` metric.
Extra metrics a function returns are kept per row in ``reward_metrics`` (``<source>/<metric>``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

from rlhf_core.errors import UserError
from rlhf_core.rewards.reward_batch import RewardBatch
from rlhf_core.rewards.scorers import reward_scorer

# scores (prompt, completion) pairs in batches: a reward model (see reward_model_scoring) or an endpoint
# judge, whose unparseable answers score NaN
ModelScorer = Callable[[list[tuple[str, str]]], list[float]]


class RewardSource(Protocol):
    """One source of a composite reward (the spec's ``RewardSourceSpec`` is one)."""

    @property
    def name(self) -> str: ...  # the key of its score in ``scores``, and of its model scorer
    @property
    def function(self) -> str | None: ...  # a registered name or a reference; None: a reward model
    @property
    def options(self) -> dict: ...  # keyword options of the function; a reward model's scoring options
    @property
    def on_error(self) -> str: ...  # 'fail' or 'zero': what a raising function does to its row
    @property
    def weight(self) -> float: ...  # w_s


class RewardValueError(UserError):
    """A reward source returned a value that is not a finite number."""


class RewardSourceError(UserError):
    """A reward source raised instead of returning a score."""


def model_source_options(sources: Sequence[RewardSource]) -> dict[str, dict]:
    """Scoring options (``aggregation``, ``last_m``) of the reward-model sources among ``sources``, by
    source name, for :func:`rlhf_core.rewards.reward_model_scoring.load_reward_model_scorers`."""
    return {s.name: dict(s.options) for s in sources if s.function is None and s.options}


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
    extra: dict[str, list[float]] = {}
    for source in sources:
        try:
            if source.function is not None:
                batch = score_with_function(source, rows, stage)
                per_source[source.name] = batch.scores
                extra |= {f"{source.name}/{name}": values for name, values in batch.metrics.items()}
            else:
                scorer = _model_scorer(source, model_scorers, stage)
                pairs = [(r["prompt"], r["completion"]) for r in rows]
                # a rubric reads its items from each row; reward models and endpoints score the pair alone
                reads_rows = getattr(source, "rubric", None) is not None
                per_source[source.name] = scorer(pairs, rows) if reads_rows else scorer(pairs)  # type: ignore[call-arg]
        except UserError:
            raise
        except Exception as exc:  # a reward model's own failure: name the stage and the source
            raise RewardSourceError(
                f"stage '{stage}': reward source '{source.name}' raised {type(exc).__name__}: {exc}"
            ) from exc
    weights = {source.name: source.weight for source in sources}
    kept, problems = [], []
    for i, row in enumerate(rows):
        try:
            scores = {name: check_finite(values[i], name, i) for name, values in per_source.items()}
        except RewardValueError as exc:
            exc = RewardValueError(f"{exc}{_why_invalid(sources, exc)}")
            if on_invalid == "fail":
                raise RewardValueError(f"stage '{stage}': {exc}") from None
            problems.append(f"stage '{stage}': {exc}; completion dropped")
            continue
        reward = composite_reward(scores, weights)
        kept.append({**row, "scores": scores, "reward": reward, "reward_metrics": _row(extra, i)})
    return kept, problems


def _model_scorer(source: RewardSource, model_scorers: dict[str, ModelScorer], stage: str) -> ModelScorer:
    """The caller's scorer of a reward-model or endpoint source; a missing one is the caller's bug, named."""
    if source.name not in model_scorers:
        raise UserError(
            f"stage '{stage}': reward source '{source.name}' has no scorer in this stage "
            f"(scorers given: {sorted(model_scorers) or 'none'}); endpoint judges need the stage to build "
            "theirs with rlhf_core.judging.endpoint_stage_judges.reward_scorers"
        )
    return model_scorers[source.name]


def _why_invalid(sources: Sequence[RewardSource], exc: RewardValueError) -> str:
    """For an endpoint judge's NaN: what it means and how to change what happens."""
    endpoints = [s.name for s in sources if getattr(s, "endpoint", None) is not None]
    if not any(f"'{name}' returned nan" in str(exc) for name in endpoints):
        return ""
    return (
        " (the judge's answer had no parseable [[score: N]]; set the endpoint's on_unparseable: fail to "
        "stop with its answer, or let this stage skip invalid rewards)"
    )


def score_with_function(source: RewardSource, rows: list[dict], stage: str) -> RewardBatch:
    """The function's batch on ``rows``; on a raise, ``on_error: zero`` scores row by row, a raising row
    0 (counted in ``errors``), and ``fail`` names the source (and the row, found the same way)."""
    scorer = reward_scorer(source.function or "", source.options)
    completions = [row["completion"] for row in rows]
    try:
        return scorer(completions, rows)
    except UserError as exc:
        raise UserError(f"stage '{stage}': reward source '{source.name}': {exc}") from None
    except Exception:
        scores, errors, first = [], [], None
        for i, row in enumerate(rows):
            try:
                scores.append(scorer([row["completion"]], [row]).scores[0])
                errors.append(0.0)
            except Exception as exc:
                first = first if first is not None else (i, exc)
                scores.append(0.0)
                errors.append(1.0)
        if first is None:  # the batch raised, yet every row scores on its own
            return RewardBatch(scores)
        if source.on_error == "zero":
            return RewardBatch(scores, {"errors": errors})
        i, exc = first
        where = f" on row {i} (0-based)"
        raise RewardSourceError(
            f"stage '{stage}': reward source '{source.name}' raised {type(exc).__name__}{where}: {exc} "
            "(set on_error: zero on the source to score such rows 0 and count them)"
        ) from exc


def reward_metric_means(rows: list[dict]) -> dict[str, float]:
    """Mean of each extra metric the reward functions returned (``<source>/<metric>``) over ``rows``,
    NaN values (a row the function gave no such metric) left out."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for name, value in row.get("reward_metrics", {}).items():
            if isinstance(value, int | float) and math.isfinite(value):
                values.setdefault(name, []).append(float(value))
    return {name: sum(v) / len(v) for name, v in values.items() if v}


def _row(extra: dict[str, list[float]], i: int) -> dict[str, float]:
    return {name: values[i] for name, values in extra.items()}
