"""What a batched reward function or verifier returns: one score per completion, plus named metrics.

Every scorer in :mod:`rlhf_core.rewards` (a built-in verifier, a user's function loaded by reference)
ends as a ``RewardBatch``: ``scores[i]`` is r(x_i, y_i) for the i-th (row, completion), and each entry
of ``metrics`` holds one float per completion too (e.g. ``tests_passed``, ``extracted``), logged as
their batch mean beside the reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RewardBatch:
    """Scores for a batch of completions, in order; ``metrics``: name -> one value per completion."""

    scores: list[float]
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, values in self.metrics.items():
            if len(values) != len(self.scores):
                raise ValueError(
                    f"metric '{name}' has {len(values)} values for {len(self.scores)} completions"
                )
