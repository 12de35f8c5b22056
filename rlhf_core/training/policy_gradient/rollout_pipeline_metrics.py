"""What a person watching on-policy RL needs to see about the rollout pipeline: how stale the samples are
and who waited for whom.

- **Staleness** (``async/...``): of each rollout's completions, the share sampled 0, 1, ..., K policy
  versions behind the policy they train, its mean and maximum, and how many were dropped for being older
  than ``max_staleness``.
- **Idle shares** (``idle/...``), per rollout *cycle* (from the start of its collection to the end of its
  last update): the trainer's share spent waiting for completions, and the engine's share spent with
  nothing to generate. Synchronous: the trainer waits for all of generation and the engine for all of
  training, so the two add up to 1. Asynchronous: both fall as generation overlaps training; what is
  left says which side bounds the speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rlhf_core.training.policy_gradient.async_rollouts import staleness_counts


def staleness_metrics(
    versions: list[int], version: int, max_staleness: int, dropped: int
) -> dict[str, float]:
    """``async/...`` of a rollout at policy ``version`` whose completions were sampled by ``versions``."""
    lags = staleness_counts(versions, version)
    total = max(1, len(versions))
    metrics = {f"async/staleness_{lag}": lags.get(lag, 0) / total for lag in range(max_staleness + 1)}
    metrics["async/staleness_mean"] = sum(lag * n for lag, n in lags.items()) / total
    metrics["async/staleness_max"] = float(max(lags, default=0))
    metrics["async/dropped_stale"] = float(dropped)
    return metrics


@dataclass
class IdleClock:
    """Times one rollout cycle: :meth:`start` at its collection, :meth:`shares` after its last update.

    ``trainer_wait_s``: seconds the trainer waited for completions in this cycle; ``engine_busy_s``:
    seconds the engine generated (or took weights) in it. Both are given as running totals, the clock
    keeps the differences."""

    started: float | None = None
    marks: dict[str, float] = field(default_factory=dict)

    def start(self, trainer_wait_s: float, engine_busy_s: float) -> None:
        self.started = time.perf_counter()
        self.marks = {"trainer_wait_s": trainer_wait_s, "engine_busy_s": engine_busy_s}

    def shares(self, trainer_wait_s: float, engine_busy_s: float) -> dict[str, float]:
        """``idle/trainer_share`` and ``idle/engine_share`` of the cycle; {} before any :meth:`start`."""
        if self.started is None:
            return {}
        wall = max(time.perf_counter() - self.started, 1e-9)
        waited = trainer_wait_s - self.marks["trainer_wait_s"]
        busy = engine_busy_s - self.marks["engine_busy_s"]
        return {
            "idle/trainer_share": min(1.0, max(0.0, waited / wall)),
            "idle/engine_share": min(1.0, max(0.0, 1.0 - busy / wall)),
            "idle/cycle_s": wall,
        }
