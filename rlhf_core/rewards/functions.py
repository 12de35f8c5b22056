"""Reward functions by name: the one registry behind the spec's ``function:`` sources and verifiers.

Verifiable rewards (RLVR, book ch.7) are plain functions ``(completion, record) -> float`` where
``record`` is the prompt row (it may carry the reference ``answer``). They are registered by name so a
spec can refer to them declaratively; an unknown name fails spec validation.

A verifier is a registered function marked ``verifier=True``: it returns 1.0 for a correct completion
and 0.0 otherwise, so it can serve as a reward (sample, label_preferences) and as the check of accuracy
(evaluate).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from rlhf_core.data.synthetic import is_correct
from rlhf_core.errors import UserError

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


@dataclass(frozen=True)
class RegisteredReward:
    """A named reward function; ``verifier`` when it returns 1.0 for a correct completion, else 0.0."""

    function: RewardFunction
    verifier: bool = False


REGISTRY: dict[str, RegisteredReward] = {
    "arithmetic_exact": RegisteredReward(arithmetic_exact, verifier=True),
    "answer_format": RegisteredReward(answer_format),  # 1/0 too, but it checks the form, not correctness
    "length_penalty": RegisteredReward(length_penalty),
}
REWARD_FUNCTIONS: dict[str, RewardFunction] = {name: entry.function for name, entry in REGISTRY.items()}
VERIFIERS: frozenset[str] = frozenset(name for name, entry in REGISTRY.items() if entry.verifier)
VERIFIER_ALIASES = {"arithmetic": "arithmetic_exact"}  # the evaluate stage's original `verifier: arithmetic`


def verifier_function(name: str) -> RewardFunction:
    """The registered verifier ``name`` (or a legacy alias of one); a UserError for anything else."""
    resolved = VERIFIER_ALIASES.get(name, name)
    if resolved not in VERIFIERS:
        what = "is a reward function but not a verifier" if resolved in REGISTRY else "is not registered"
        raise UserError(
            f"verifier '{name}' {what}; a verifier returns 1.0 for a correct completion and 0.0 otherwise "
            f"(verifiers: {', '.join(sorted(VERIFIERS))})"
        )
    return REGISTRY[resolved].function
