"""Reward sources: built-in and user reward functions and verifiers, reward-model scoring, composites.

- :mod:`~rlhf_core.rewards.functions`: the registry of built-in reward functions (verifiers marked);
- :mod:`~rlhf_core.rewards.user_functions`: a user's function by reference (``rewards.py:score``,
  ``my_pkg.rewards:score``), its checks and its code digest;
- :mod:`~rlhf_core.rewards.scorers`: one batched scorer for any ``function:`` value;
- :mod:`~rlhf_core.rewards.composite`: scoring rows with several sources and their weighted sum;
- :mod:`~rlhf_core.rewards.verifiers`: the standard verifiers (math answers, code tests, formats);
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
)
from rlhf_core.rewards.reward_batch import RewardBatch
from rlhf_core.rewards.scorers import reward_scorer, verifier_function
from rlhf_core.rewards.user_functions import batched

__all__ = [
    "REGISTRY",
    "REWARD_FUNCTIONS",
    "VERIFIERS",
    "ModelScorer",
    "RegisteredReward",
    "RewardBatch",
    "RewardFunction",
    "RewardValueError",
    "batched",
    "check_finite",
    "composite_reward",
    "reward_scorer",
    "score_completions",
    "verifier_function",
]
