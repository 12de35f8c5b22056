"""Error bars for evaluation figures: seeded bootstrap confidence intervals and unbiased pass@k.

- ``bootstrap_interval``: the percentile bootstrap of a statistic (default: the mean) over per-prompt
  values, resampled with replacement ``resamples`` times from a seeded generator, so the same values
  and seed give the same interval. It reports the sample count and the resample count with the
  interval, as every evaluation figure should.
- ``pass_at_k``: the unbiased estimator of pass@k from n samples of which c are correct (Chen et al.
  2021, used by the book's evaluation chapter): 1 - C(n - c, k) / C(n, k), computed as a product so
  it stays exact for large n (n = 10, c = 3: k = 1 -> 0.3, k = 5 -> 1 - 21/252 = 0.9167).

The ``evaluate`` stage reports every figure with such an interval (``interval_metrics``: the
``<metric>_ci_low`` / ``_ci_high`` / ``_n`` entries of its report).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap confidence interval, and the counts behind it."""

    value: float
    low: float
    high: float
    confidence: float
    samples: int
    resamples: int


def bootstrap_interval(
    values: Sequence[float],
    *,
    seed: int,
    resamples: int = 1000,
    confidence: float = 0.95,
    statistic: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Interval:
    """Percentile bootstrap interval of ``statistic`` (the mean unless given; it maps a (R, n) tensor of
    resampled values to (R,)) over ``values``."""
    if not values:
        raise ValueError("a confidence interval needs at least one value")
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError("confidence must lie in (0, 1) and resamples be >= 1")
    stat = statistic or (lambda x: x.mean(dim=-1))
    data = torch.tensor(list(values), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(data), (resamples, len(data)), generator=generator)
    replicates = stat(data[picks])
    tail = (1 - confidence) / 2
    low, high = torch.quantile(replicates, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(float(stat(data[None])[0]), low, high, confidence, len(data), resamples)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def interval_metrics(
    name: str,
    values: Sequence[float],
    seed: int,
    statistic: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """``<name>_ci_low`` / ``_ci_high`` (95% percentile bootstrap, 1000 resamples, seeded) and ``_n``
    (the number of values resampled: prompts, completions or examples)."""
    interval = bootstrap_interval(values, seed=seed, statistic=statistic)
    return {
        f"{name}_ci_low": interval.low,
        f"{name}_ci_high": interval.high,
        f"{name}_n": float(interval.samples),
    }


def figure_with_interval(
    name: str,
    values: Sequence[float],
    seed: int,
    statistic: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """``<name>`` (the statistic of ``values``, default the mean) with its interval entries."""
    interval = bootstrap_interval(values, seed=seed, statistic=statistic)
    return {
        name: interval.value,
        f"{name}_ci_low": interval.low,
        f"{name}_ci_high": interval.high,
        f"{name}_n": float(interval.samples),
    }


def ratio_statistic(numerators: Sequence[float], denominators: Sequence[float]) -> Callable:
    """A bootstrap statistic for sum(numerators) / sum(denominators) over resampled items.

    Pass ``range(len(numerators))`` as the values: the resampled indices pick numerator and denominator
    together (e.g. a held-out loss is summed NLL over summed tokens, resampled by example).
    """
    num = torch.tensor(list(numerators), dtype=torch.float64)
    den = torch.tensor(list(denominators), dtype=torch.float64)

    def statistic(indices: torch.Tensor) -> torch.Tensor:
        picked = indices.long()
        return num[picked].sum(-1) / den[picked].sum(-1).clamp(min=1e-12)

    return statistic
