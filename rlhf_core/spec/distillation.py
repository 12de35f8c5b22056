"""The ``distillation:`` block of the ``policy_gradient`` stage: on-policy distillation (OPD, book ch.12).

The student (the stage's policy) samples its rollouts as usual; a teacher model scores the sampled
tokens (no gradient, like the reference model), and every token the student wrote gets the dense
advantage (Lu 2025)

    A_t^OPD = coef * (log pi_T(a_t | s_t) - log pi_old(a_t | s_t)),

a per-token estimate of -KL(pi_theta || pi_T) on the student's own samples (reverse KL, mode-seeking;
MiniLLM, GKD), added to the algorithm's advantages after its own estimator (and its group normalisation)
ran. With reward sources the two combine; without any (and no environment) the advantage is the
distillation term alone. Student and teacher must share a tokenizer: the teacher reads the student's
token ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import Field

from rlhf_core.spec.base import Strict
from rlhf_core.spec.references import PolicyModel

if TYPE_CHECKING:
    from rlhf_core.spec.stages.policy_gradient import AlgorithmDefaults, PolicyGradientStage

# ``AlgorithmDefaults.loss`` values that take an advantage per token (gspo weighs a whole sequence by one)
PER_TOKEN_LOSSES = ("reinforce", "clipped", "cispo")
# ``AlgorithmDefaults.estimator`` values whose advantages a per-token term can be added to (gae, PPO's,
# would have to learn the term as a per-token reward through its value model instead)
ADDITIVE_ESTIMATORS = ("batch_mean", "rloo", "grpo", "dr_grpo")


class DistillationSpec(Strict):
    """On-policy distillation from a teacher that shares the policy's tokenizer (book ch.12)."""

    teacher: PolicyModel = Field(
        description=(
            "The teacher model, e.g. a larger model of the same family (same tokenizer: vocabulary and "
            "special tokens). It is held in memory beside the policy (one more model; on every rank with "
            "several processes) and scores each rollout's tokens once, without gradient."
        )
    )
    coef: float = Field(
        default=1.0,
        gt=0,
        description=(
            "Weight of the per-token advantage coef * (log pi_teacher - log pi_old) added to the "
            "algorithm's advantages (after their normalisation)."
        ),
    )


def distillation_problem(
    stage: PolicyGradientStage, algorithms: Mapping[str, AlgorithmDefaults]
) -> str | None:
    """Why ``stage.distillation`` cannot run with the rest of the stage (None when it can); ``algorithms``
    is the stage's table of algorithm defaults (to name the algorithms that fit)."""
    defaults = stage.defaults
    if defaults.estimator not in ADDITIVE_ESTIMATORS or defaults.loss not in PER_TOKEN_LOSSES:
        fitting = [
            name
            for name, d in algorithms.items()
            if d.estimator in ADDITIVE_ESTIMATORS and d.loss in PER_TOKEN_LOSSES
        ]
        why = (
            "its advantages come from GAE on a value model, which would have to learn it as a reward"
            if defaults.estimator not in ADDITIVE_ESTIMATORS
            else "its loss weighs a whole sequence by one advantage"
        )
        return (
            f"distillation adds a per-token advantage, which algorithm '{stage.algorithm}' does not take "
            f"({why}); use one of: {', '.join(fitting)}"
        )
    if stage.rewardless and stage.resolved().dynamic_sampling:
        return (
            "distillation without reward sources: every completion's reward is the same, so dynamic "
            "sampling would drop every group; set dynamic_sampling: false (or add rewards)"
        )
    if stage.rewardless and stage.monitor is not None and not stage.monitor.proxy:
        return (
            "monitor.proxy: a distillation-only stage optimizes no reward of its own; name the proxy "
            "reward sources, e.g. proxy: [{model: rm}]"
        )
    return None
