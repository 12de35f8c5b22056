"""How an outcome or a process reward model's probabilities become one reward r(x, y) (book ch.5).

Plain Python (no torch): the spec checks a reward source's options against these names.

ORM: p_t = sigma(w_theta(s_t)) at every completion token (and the turn end), aggregated by
    mean      (1/T) sum_t p_t
    min       min_t p_t                                  (tail risk: the least confident token)
    product   prod_t p_t = exp(sum_t log p_t)
    last_m    mean of the last m p_t (m = 1, the default, is the companion's sigma(last-token logit))
PRM: q_i = P(step i is good) at the end of each step (sigma of a binary head; the +1 class of a
three-class head), aggregated by
    min       min_i q_i                                  (fail fast: one bad step sinks the solution)
    mean      (1/K) sum_i q_i
    product   prod_i q_i                                 (all steps good, if they were independent)
    weighted  sum_i i * q_i / sum_i i                    (step i of K weighs i: later steps weigh more)
    last      q_K                                        (the final step's score)

A completion is split into steps by the separator its PRM was trained with (kept in the model's config);
one without the separator is one step.
"""

from __future__ import annotations

import math

from rlhf_core.errors import UserError

OUTCOME_AGGREGATIONS = ("last_m", "mean", "min", "product")  # the first is the default
PROCESS_AGGREGATIONS = ("min", "mean", "product", "weighted", "last")
SCORING_OPTIONS = ("aggregation", "last_m")


def _product(p: list[float]) -> float:
    return math.exp(sum(math.log(max(v, 1e-300)) for v in p))


def aggregate_outcome(p: list[float], aggregation: str = "last_m", last_m: int = 1) -> float:
    """One score from an ORM's per-token probabilities p_t (see the module's table)."""
    if aggregation == "mean":
        return sum(p) / len(p)
    if aggregation == "min":
        return min(p)
    if aggregation == "product":
        return _product(p)
    tail = p[-last_m:]
    return sum(tail) / len(tail)


def aggregate_steps(q: list[float], aggregation: str = "min") -> float:
    """One score from a PRM's per-step probabilities q_i (see the module's table)."""
    if aggregation == "mean":
        return sum(q) / len(q)
    if aggregation == "product":
        return _product(q)
    if aggregation == "weighted":
        weights = range(1, len(q) + 1)
        return sum(w * v for w, v in zip(weights, q, strict=True)) / sum(weights)
    if aggregation == "last":
        return q[-1]
    return min(q)


def check_scoring_options(kind: str, options: dict, source: str) -> dict:
    """The aggregation options of a reward source that reads a model of ``kind`` (defaults filled in);
    a Bradley-Terry model takes none, and each kind takes only its own aggregations."""
    if kind == "bradley_terry":
        if options:
            raise UserError(
                f"reward source '{source}': options {sorted(options)} aggregate per-token or per-step "
                "scores of an outcome or process reward model; this one is a Bradley-Terry reward model "
                "(one score per sequence): remove the options"
            )
        return {}
    allowed = OUTCOME_AGGREGATIONS if kind == "outcome" else PROCESS_AGGREGATIONS
    aggregation = options.get("aggregation", allowed[0])
    if aggregation not in allowed:
        article = "an" if kind == "outcome" else "a"
        raise UserError(
            f"reward source '{source}': aggregation {aggregation!r} is not one of {article} {kind} reward "
            f"model's {list(allowed)}"
        )
    if "last_m" in options and aggregation != "last_m":
        raise UserError(f"reward source '{source}': last_m goes with aggregation last_m, not {aggregation!r}")
    return {"aggregation": aggregation, **({"last_m": options.get("last_m", 1)} if kind == "outcome" else {})}
