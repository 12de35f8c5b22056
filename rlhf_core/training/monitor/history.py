"""The over-optimization monitor's history and the rules read from it: when to stop (book ch.14) and
which evaluated checkpoint is the best. Plain data, no torch: the plots and the tasks read it too."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Evaluation:
    """One evaluation of the policy after ``step`` optimizer steps."""

    step: int
    kl: float
    proxy: float
    gold: float
    sources: dict[str, float] = field(default_factory=dict)  # "proxy/<source>", "gold/<source>" means
    truncated_share: float = 0.0
    checkpoint: str | None = None  # weights file kept when this was the best gold so far


def gold_fell_while_proxy_rose(history: list[Evaluation], patience: int) -> bool:
    """True when gold fell strictly at each of the last ``patience`` evaluations and proxy ended the
    same span strictly higher than it began (a tie is neither a fall nor a rise)."""
    if len(history) < patience + 1:
        return False
    span = history[-(patience + 1) :]
    falls = all(later.gold < earlier.gold for earlier, later in zip(span, span[1:], strict=False))
    return falls and span[-1].proxy > span[0].proxy


def best_evaluation(history: list[Evaluation]) -> Evaluation:
    """The evaluation with the highest gold; of equal ones the earliest (the least optimized)."""
    return max(history, key=lambda e: (e.gold, -e.step))
