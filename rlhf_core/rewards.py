"""Reward sources: functions that score a completion, by name, and their weighted composite.

Verifiable rewards (RLVR, book ch.7) are plain functions ``(completion, record) -> float`` where
``record`` is the prompt row (it may carry the reference ``answer``). They are registered by name so a
spec can refer to them declaratively; an unknown name fails spec validation. Reward models are the
other kind of source; they are scored in batches by ``rlhf_core.training.reward_model``.

The composite reward is the weighted sum  R(x, y) = sum_s w_s * r_s(x, y).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from rlhf_core.data.synthetic import is_correct

RewardFunction = Callable[[str, dict], float]


def arithmetic_exact(completion: str, record: dict) -> float:
    """1.0 when the completion's final answer equals the record's ``answer``, else 0.0."""
    return 1.0 if is_correct(completion, record["answer"]) else 0.0


def answer_format(completion: str, record: dict) -> float:
    """1.0 when the completion states its result as 'The answer is N.', else 0.0."""
    return 1.0 if re.search(r"The answer is -?\d+\.?\s*$", completion.strip()) else 0.0


def length_penalty(completion: str, record: dict, target_chars: int = 40) -> float:
    """-(characters beyond ``target_chars``) / target_chars: 0 for short completions, negative for long."""
    return -max(0, len(completion) - target_chars) / target_chars


REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "arithmetic_exact": arithmetic_exact,
    "answer_format": answer_format,
    "length_penalty": length_penalty,
}


class RewardValueError(ValueError):
    """A reward source returned a value that is not a finite number."""


def check_finite(value: float, source: str, row: int) -> float:
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise RewardValueError(f"reward source '{source}' returned {value!r} for row {row} (0-based)")
    return float(value)


def combine(scores: dict[str, float], weights: dict[str, float]) -> float:
    """Weighted sum of named scores."""
    return sum(weights[name] * value for name, value in scores.items())
