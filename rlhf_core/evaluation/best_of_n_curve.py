"""Best-of-N curves: proxy and gold reward of the best-of-N selection against N (book ch.9 and ch.14).

Over-optimisation shows on such a curve: selecting harder by the proxy (a reward model) keeps raising
the proxy score of the pick while the gold score (a verifier, a held-out reward model) rises, then
flattens or falls (Gao et al. 2023 plot both against KL(pi_BoN || pi) <= log N - (N - 1) / N).

Each point comes from the same n samples per prompt, without resampling. Sort a prompt's samples by
proxy score, s_(1) <= ... <= s_(n). The pick of a uniformly random subset of size N is its top sample,
and the i-th lowest is the top of exactly C(i - 1, N - 1) of the C(n, N) subsets (those holding it and
N - 1 of the i - 1 below it), so

    E[proxy of the pick] = sum_i C(i - 1, N - 1) / C(n, N) * s_(i)
    E[gold of the pick]  = sum_i C(i - 1, N - 1) / C(n, N) * g_(i)

where g_(i) is the gold score of the i-th lowest by proxy: the unbiased estimate of best-of-N from n
>= N samples (the same counting as unbiased pass@k). Equal proxy scores go to the lower completion
index, as the best-of-N pick does (:mod:`rlhf_core.selection.best_of_n`). At N = 1 both are the means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

PREFIX = "eval/best_of_n"


def selection_weights(n: int, size: int) -> list[float]:
    """P(the i-th lowest of ``n`` samples is the top of a random subset of ``size``), for i = 1..n."""
    if not 1 <= size <= n:
        raise ValueError(f"a subset of size {size} needs 1 <= size <= n = {n}")
    subsets = math.comb(n, size)
    return [math.comb(i - 1, size - 1) / subsets for i in range(1, n + 1)]


def expected_best_of(proxy: Sequence[float], gold: Sequence[float], size: int) -> tuple[float, float]:
    """(E[proxy], E[gold]) of the top-by-proxy sample of a random ``size``-subset of one prompt's samples
    (given in completion-index order)."""
    order = sorted(range(len(proxy)), key=lambda j: (proxy[j], -j))  # ascending; a tie: lower index on top
    weights = selection_weights(len(proxy), size)
    return (
        sum(w * proxy[j] for w, j in zip(weights, order, strict=True)),
        sum(w * gold[j] for w, j in zip(weights, order, strict=True)),
    )


def best_of_n_curve(
    rows: Sequence[dict], gold: Sequence[float], sizes: Sequence[int]
) -> dict[int, tuple[float, float]]:
    """N -> (proxy, gold) of the best-of-N pick, averaged over prompts.

    ``rows`` are scored samples (``prompt_index``, ``completion_index``, proxy ``reward``) and ``gold``
    their gold scores, in the same order. A prompt with fewer than N samples is left out of that N.
    """
    by_prompt: dict[int, list[tuple[int, float, float]]] = {}
    for row, g in zip(rows, gold, strict=True):
        by_prompt.setdefault(row["prompt_index"], []).append((row["completion_index"], row["reward"], g))
    curve = {}
    for size in sizes:
        points = []
        for samples in by_prompt.values():
            if len(samples) >= size:
                ordered = sorted(samples)  # completion-index order
                points.append(expected_best_of([s[1] for s in ordered], [s[2] for s in ordered], size))
        if points:
            curve[size] = (
                math.fsum(p for p, _ in points) / len(points),
                math.fsum(g for _, g in points) / len(points),
            )
    return curve


def curve_metrics(curve: dict[int, tuple[float, float]]) -> dict[str, float]:
    """``eval/best_of_n/proxy_at_<N>`` and ``eval/best_of_n/gold_at_<N>`` for every N of the curve."""
    metrics: dict[str, float] = {}
    for size, (proxy, gold) in curve.items():
        metrics[f"{PREFIX}/proxy_at_{size}"] = proxy
        metrics[f"{PREFIX}/gold_at_{size}"] = gold
    return metrics


def kl_bound(size: int) -> float:
    """KL(pi_BoN || pi) <= log N - (N - 1) / N, in nats (Stiennon 2020; an upper bound, Beirami 2024)."""
    return math.log(size) - (size - 1) / size
