"""Where a reward model is right and how sure it should be: held-out pairs broken down (book ch.5, RM
evaluation as RewardBench-style suites report it).

Every figure starts from the model's per-pair margin d = r(y_c|x) - r(y_r|x) on held-out preference
rows; a pair is ordered correctly when d > 0.

- accuracy by category (``eval/accuracy/<category>``, with ``eval/pairs/<category>``), when the rows
  carry a category column;
- accuracy by margin bucket: by the model's own |d| (``eval/by_margin/accuracy/<bucket>``, with
  ``eval/by_margin/pairs/<bucket>``) and, when the rows carry a labelled margin (a Likert difference,
  say), by that label (``eval/by_label_margin/...``). Buckets come from increasing edges
  e_1 < ... < e_k: [0, e_1), [e_1, e_2), ..., [e_k, inf), named ``0-e1``, ..., ``ek-inf``;
- calibration of the implied probability P(y_c > y_r) = sigma(d) (the Bradley-Terry model's own
  claim): each pair's confidence is max(sigma(d), 1 - sigma(d)) in [0.5, 1], bins split [0.5, 1] into
  equal widths, and the expected calibration error is
  ECE = sum_b (n_b / n) * |accuracy_b - mean confidence_b| (Guo et al. 2017; ``eval/calibration_ece``);
- agreement with a verifier: over the pairs where the verifier scores y_c and y_r differently, the
  share where the model orders them as the verifier does (``eval/verifier_agreement``; pairs the
  verifier ties are excluded and counted in ``eval/verifier_ties``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlhf_core.data.schemas import preference_parts
from rlhf_core.errors import UserError
from rlhf_core.rewards.scorers import verifier_function

if TYPE_CHECKING:
    from rlhf_core.spec.stages.reward_model import RewardEvalSpec

PREFIX = "eval/"


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin: [low, high), pairs in it, their mean confidence and observed accuracy."""

    low: float
    high: float
    pairs: int
    confidence: float  # mean max(sigma(d), 1 - sigma(d)); NaN when empty
    accuracy: float  # share with d > 0; NaN when empty


def bucket_names(edges: Sequence[float]) -> list[str]:
    """Names of the buckets of ``edges``: (0.5, 1) -> ['0-0.5', '0.5-1', '1-inf']."""
    bounds = [0.0, *edges]
    return [f"{low:g}-{high:g}" for low, high in zip(bounds, [*edges, math.inf], strict=True)]


def bucket_of(value: float, edges: Sequence[float]) -> str:
    """The bucket of ``|value|``: the first [e_i, e_{i+1}) holding it (lower edge included)."""
    names, magnitude = bucket_names(edges), abs(value)
    return names[sum(1 for edge in edges if magnitude >= edge)]


def metric_safe(name: str) -> str:
    """A category value as MLflow accepts it in a metric name (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^\w\-. /]", "_", str(name)) or "_"


def accuracy_by_group(differences: Sequence[float], groups: Sequence[str], prefix: str) -> dict[str, float]:
    """``<prefix>accuracy/<group>`` (share of d > 0) and ``<prefix>pairs/<group>`` per group."""
    counts: dict[str, list[int]] = {}
    for d, group in zip(differences, groups, strict=True):
        right_total = counts.setdefault(metric_safe(group), [0, 0])
        right_total[0] += d > 0
        right_total[1] += 1
    metrics: dict[str, float] = {}
    for group, (right, total) in sorted(counts.items()):
        metrics[f"{prefix}accuracy/{group}"] = right / total
        metrics[f"{prefix}pairs/{group}"] = float(total)
    return metrics


def reliability_bins(differences: Sequence[float], bins: int) -> list[ReliabilityBin]:
    """Confidence max(sigma(d), 1 - sigma(d)) against accuracy (d > 0), in ``bins`` equal bins of
    [0.5, 1]; the last bin includes 1."""
    width = 0.5 / bins
    members: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for d in differences:
        confidence = 1.0 / (1.0 + math.exp(-abs(d)))  # sigma(|d|) = max(sigma(d), 1 - sigma(d))
        index = min(int((confidence - 0.5) / width), bins - 1)
        members[index].append((confidence, d > 0))
    return [
        ReliabilityBin(
            low=0.5 + i * width,
            high=0.5 + (i + 1) * width,
            pairs=len(pairs),
            confidence=sum(c for c, _ in pairs) / len(pairs) if pairs else math.nan,
            accuracy=sum(r for _, r in pairs) / len(pairs) if pairs else math.nan,
        )
        for i, pairs in enumerate(members)
    ]


def expected_calibration_error(bins: Sequence[ReliabilityBin]) -> float:
    """ECE = sum_b (n_b / n) |accuracy_b - confidence_b| over the non-empty bins."""
    total = sum(b.pairs for b in bins)
    return sum(b.pairs / total * abs(b.accuracy - b.confidence) for b in bins if b.pairs)


def verifier_agreement(
    differences: Sequence[float], verdicts: Sequence[tuple[float, float]], prefix: str = "eval/"
) -> dict[str, float]:
    """Share of the pairs the verifier orders (its scores of y_c and y_r differ) that the model orders
    the same way; a model tie (d = 0) agrees with no order. Verifier ties are counted, not scored."""
    agree = ordered = ties = 0
    for d, (chosen_score, rejected_score) in zip(differences, verdicts, strict=True):
        if chosen_score == rejected_score:
            ties += 1
            continue
        ordered += 1
        agree += (d > 0 and chosen_score > rejected_score) or (d < 0 and chosen_score < rejected_score)
    metrics = {f"{prefix}verifier_pairs": float(ordered), f"{prefix}verifier_ties": float(ties)}
    if ordered:
        metrics[f"{prefix}verifier_agreement"] = agree / ordered
    return metrics


def breakdown_metrics(
    differences: Sequence[float],
    rows: Sequence[dict],
    spec: RewardEvalSpec,
    *,
    row_ids: Sequence[int] | None = None,
    source: str = "eval split",
) -> dict[str, float]:
    """The breakdowns ``spec`` asks for, from each pair's margin d and its preference row (same order):
    by category, by the model's |d| and the labelled margin, and agreement with the verifier.
    ``row_ids``: each row's index in ``source``, for errors (default: its position in ``rows``)."""
    ids = list(row_ids) if row_ids is not None else list(range(len(rows)))
    metrics = accuracy_by_group(
        differences, [bucket_of(d, spec.margin_edges) for d in differences], f"{PREFIX}by_margin/"
    )
    if spec.category_column is not None:
        categories = column_values(rows, ids, spec.category_column, "evaluation.category_column", source)
        metrics |= accuracy_by_group(differences, [str(c) for c in categories], PREFIX)
    if spec.label_margin_column is not None:
        labels = column_values(rows, ids, spec.label_margin_column, "evaluation.label_margin_column", source)
        buckets = [bucket_of(_number(v, spec.label_margin_column, i, source), spec.label_margin_edges)
                   for i, v in zip(ids, labels, strict=True)]  # fmt: skip
        metrics |= accuracy_by_group(differences, buckets, f"{PREFIX}by_label_margin/")
    if spec.verifier is not None:
        verify = verifier_function(spec.verifier, spec.verifier_options)
        verdicts = []
        for row in rows:
            _, chosen, rejected = preference_parts(row)
            verdicts.append((verify(chosen, row), verify(rejected, row)))
        metrics |= verifier_agreement(differences, verdicts, PREFIX)
    return metrics


def column_values(
    rows: Sequence[dict], row_ids: Sequence[int], column: str, option: str, source: str
) -> list[Any]:
    """Each row's ``column``; a row without it is an error naming the row and the option."""
    for i, row in zip(row_ids, rows, strict=True):
        if row.get(column) is None:
            raise UserError(
                f"{option} is {column!r}, but row {i} (0-based) of the {source} has no {column!r}; give "
                f"every row one, or remove {option}"
            )
    return [row[column] for row in rows]


def _number(value: Any, column: str, row: int, source: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(
            f"row {row} (0-based) of the {source}: column {column!r} is {value!r}, "
            "not a number (a labelled margin, e.g. a Likert difference)"
        ) from None
