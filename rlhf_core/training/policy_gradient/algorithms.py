"""What each on-policy algorithm computes from a rollout (book ch.6): its settings with the defaults of
``algorithm:`` filled in, the advantages, the rollout's metrics and the policy loss.

| algorithm | advantages | policy loss |
|---|---|---|
| reinforce | reward minus the batch mean | -A log pi |
| rloo | leave-one-out within the group | -A log pi |
| ppo | GAE(gamma, lambda) on the value model, whitened | clipped ratio (+ value loss in the trainer) |
| grpo, dapo, gspo, cispo | (r - mean) / (std + 1e-4) per group | clipped ratio / sequence ratio / weight |
| dr_grpo | r - group mean | clipped ratio |

With the KL in the reward, beta x KL is subtracted per token (ppo) or per completion (reinforce, rloo)
before the advantages; with the KL in the loss the trainer adds beta x k3 per token.

Dispatch goes through tables, never through the algorithm's name: ``ADVANTAGE_ESTIMATORS`` (estimator ->
function, and whether it needs a value model), ``POLICY_LOSSES`` (:mod:`rlhf_core.losses.policy_gradient`)
and the rollout defaults of :mod:`.rollouts`, all keyed by the entries of the spec's ``ALGORITHMS``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf_core.losses.advantages import (
    GROUP_ESTIMATORS,
    all_equal_groups,
    batch_baseline_advantages,
    generalized_advantages,
    group_advantages,
    sequence_kl,
    whiten,
)
from rlhf_core.losses.kl import AdaptiveKLController, FixedKLController, kl_per_token
from rlhf_core.losses.masking import masked_mean
from rlhf_core.losses.policy_gradient import POLICY_LOSSES, PolicyLoss
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from rlhf_core.training.policy_gradient.episode_rollouts import episode_metrics
from rlhf_core.training.policy_gradient.rollouts import Rollout, rollout_defaults


@dataclass(frozen=True)
class Settings:
    """The stage's settings with the algorithm's defaults filled in."""

    estimator: str
    loss: str
    kl_placement: str
    kl_estimator: str
    aggregation: str
    clip_low: float
    clip_high: float
    group_size: int
    dynamic_sampling: bool
    updates_per_rollout: int
    need_old_pass: bool  # a no-grad policy pass at the rollout (else the first update's forward is pi_old)

    @staticmethod
    def of(stage: PolicyGradientStage) -> Settings:
        d = stage.defaults
        placement = stage.kl.placement or d.kl_placement
        updates = stage.update_epochs * stage.minibatches
        kl_at_rollout = stage.beta > 0 and (placement == "reward" or stage.kl.target is not None)
        return Settings(
            estimator=d.estimator,
            loss=d.loss,
            kl_placement=placement,
            kl_estimator=stage.kl.estimator or ("k1" if placement == "reward" else "k3"),
            aggregation=stage.aggregation or d.aggregation,
            clip_low=stage.clip_low if stage.clip_low is not None else d.clip[0],
            clip_high=stage.clip_high if stage.clip_high is not None else d.clip[1],
            group_size=stage.effective_group_size,
            dynamic_sampling=(
                stage.dynamic_sampling
                if stage.dynamic_sampling is not None
                else rollout_defaults(stage).dynamic_sampling
            ),
            updates_per_rollout=updates,
            # distillation's advantage reads pi_old at the rollout, before the first update
            need_old_pass=updates > 1 or kl_at_rollout or stage.distillation is not None,
        )


def kl_controller(stage: PolicyGradientStage) -> AdaptiveKLController | FixedKLController:
    if stage.kl.target is not None and stage.beta > 0:
        return AdaptiveKLController(stage.beta, stage.kl.target, stage.kl.horizon)
    return FixedKLController(stage.beta)


AdvantageResult = tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]
KLPenalty = tuple[float, torch.Tensor]  # (beta, (N, T) per-token KL) when the KL goes in the reward


def gae_advantages(
    rollout: Rollout, settings: Settings, stage: PolicyGradientStage, kl_penalty: KLPenalty | None
) -> AdvantageResult:
    """PPO: per-token rewards (the score on the last token, an environment's per-turn rewards on their
    turns' last tokens, minus beta x KL_t on every token when the KL goes in the reward), GAE on the value
    model's values, whitened when configured."""
    mask = rollout.mask
    token_rewards = rollout.samples.token_rewards(mask)
    if kl_penalty is not None:
        beta, kl_tokens = kl_penalty
        token_rewards = token_rewards - beta * kl_tokens
    advantages, returns = generalized_advantages(
        token_rewards, rollout.values, mask, stage.ppo.gamma, stage.ppo.lam
    )
    if stage.ppo.whiten_advantages:
        advantages = whiten(advantages, mask)
    residual = torch.where(mask, returns - rollout.values, 0.0)
    variance = masked_mean((returns - masked_mean(returns, mask)).square(), mask)
    residual_var = masked_mean((residual - masked_mean(residual, mask)).square(), mask)
    explained = float(1 - residual_var / variance) if variance > 0 else math.nan
    return advantages, returns, {"explained_variance": explained}


def _penalized_rewards(
    rollout: Rollout, stage: PolicyGradientStage, kl_penalty: KLPenalty | None
) -> torch.Tensor:
    """(N,) one reward per completion, minus beta x its KL when the KL goes in the reward."""
    rewards = rollout.samples.rewards.float()
    if kl_penalty is not None:
        beta, kl_tokens = kl_penalty
        rewards = rewards - beta * sequence_kl(kl_tokens, rollout.mask, stage.kl.reduce)
    return rewards


def batch_mean_advantages(
    rollout: Rollout, settings: Settings, stage: PolicyGradientStage, kl_penalty: KLPenalty | None
) -> AdvantageResult:
    """REINFORCE: each completion's reward minus the batch mean."""
    return batch_baseline_advantages(_penalized_rewards(rollout, stage, kl_penalty)), None, {}


def group_estimator_advantages(
    rollout: Rollout, settings: Settings, stage: PolicyGradientStage, kl_penalty: KLPenalty | None
) -> AdvantageResult:
    """RLOO, GRPO, Dr. GRPO: each reward against its prompt's group (``GROUP_ESTIMATORS``)."""
    rewards = _penalized_rewards(rollout, stage, kl_penalty)
    return group_advantages(rewards, settings.group_size, settings.estimator), None, {}


@dataclass(frozen=True)
class AdvantageEstimator:
    """How one estimator turns a rollout into advantages, and what it needs."""

    compute: Callable[[Rollout, Settings, PolicyGradientStage, KLPenalty | None], AdvantageResult]
    needs_value_model: bool = False  # values per token at the rollout, a value loss in every update


# ``AlgorithmDefaults.estimator`` -> its estimator
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": AdvantageEstimator(gae_advantages, needs_value_model=True),
    "batch_mean": AdvantageEstimator(batch_mean_advantages),
    **{name: AdvantageEstimator(group_estimator_advantages) for name in GROUP_ESTIMATORS},
}


def needs_value_model(stage: PolicyGradientStage) -> bool:
    """Whether the stage's estimator reads a value model (PPO's GAE)."""
    return ADVANTAGE_ESTIMATORS[stage.defaults.estimator].needs_value_model


def compute_advantages(
    rollout: Rollout, settings: Settings, stage: PolicyGradientStage, beta: float
) -> AdvantageResult:
    """Advantages ((N,) per completion, or (N, T) for PPO), PPO's value targets, and rollout metrics."""
    mask = rollout.mask
    metrics: dict[str, float] = {}
    kl_tokens = None
    if rollout.ref_logps is not None and rollout.old_logps is not None:
        kl_tokens = kl_per_token(rollout.old_logps, rollout.ref_logps, mask, settings.kl_estimator)
        metrics["kl"] = float(kl_per_token(rollout.old_logps, rollout.ref_logps, mask, "k1").sum(1).mean())
    in_reward = kl_tokens is not None and beta > 0 and settings.kl_placement == "reward"
    penalty = (beta, kl_tokens) if in_reward else None
    advantages, returns, estimator_metrics = ADVANTAGE_ESTIMATORS[settings.estimator].compute(
        rollout, settings, stage, penalty
    )
    return advantages, returns, {**metrics, **estimator_metrics}


def rollout_metrics(rollout: Rollout, settings: Settings) -> dict[str, float]:
    samples, mask = rollout.samples, rollout.mask
    rewards = samples.rewards.float()
    metrics = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(unbiased=False)),
        "completion_length": statistics.fmean(samples.lengths),
        "truncated_share": statistics.fmean(float(t) for t in samples.truncated),
    }
    if rollout.entropy is not None:
        metrics["entropy"] = float(masked_mean(rollout.entropy, mask))
    for name, scores in samples.source_scores.items():
        finite = [s for s in scores if not math.isnan(s)]
        if finite:
            metrics[f"reward/{name}"] = statistics.fmean(finite)
    if settings.group_size > 1:
        equal = all_equal_groups(rewards, settings.group_size)
        metrics["all_equal_groups_share"] = float(equal.float().mean())
    return metrics | episode_metrics(samples)


def policy_loss(
    settings: Settings,
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> PolicyLoss:
    """The algorithm's policy loss (``POLICY_LOSSES``) with its clip range."""
    loss = POLICY_LOSSES[settings.loss]
    return loss(logps, old_logps, advantages, mask, settings.clip_low, settings.clip_high)
