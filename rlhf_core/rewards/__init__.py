"""Reward sources: registered reward functions and verifiers, reward-model scoring, composites.

- :mod:`~rlhf_core.rewards.functions`: the registry of named reward functions (verifiers marked);
- :mod:`~rlhf_core.rewards.composite`: scoring rows with several sources and their weighted sum;
- :mod:`~rlhf_core.rewards.reward_model_scoring`: r(x, y) from a trained reward model (imports torch,
  so it is not re-exported here: the spec imports this package for the function names).
"""

from rlhf_core.rewards.composite import (
    ModelScorer,
    RewardValueError,
    check_finite,
    composite_reward,
    score_completions,
)
from rlhf_core.rewards.functions import (
    REGISTRY,
    REWARD_FUNCTIONS,
    VERIFIERS,
    RegisteredReward,
    RewardFunction,
    verifier_function,
)

__all__ = [
    "REGISTRY",
    "REWARD_FUNCTIONS",
    "VERIFIERS",
    "ModelScorer",
    "RegisteredReward",
    "RewardFunction",
    "RewardValueError",
    "check_finite",
    "composite_reward",
    "score_completions",
    "verifier_function",
]
