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
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from rlhf_core.losses.advantages import (
    all_equal_groups,
    batch_baseline_advantages,
    generalized_advantages,
    group_advantages,
    sequence_kl,
    sequence_rewards_to_tokens,
    whiten,
)
from rlhf_core.losses.kl import AdaptiveKLController, FixedKLController, kl_per_token
from rlhf_core.losses.masking import masked_mean
from rlhf_core.losses.policy_gradient import (
    PolicyLoss,
    cispo_loss,
    clipped_surrogate_loss,
    gspo_loss,
    reinforce_loss,
)
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from rlhf_core.training.policy_gradient.rollouts import Rollout


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
                stage.dynamic_sampling if stage.dynamic_sampling is not None else stage.algorithm == "dapo"
            ),
            updates_per_rollout=updates,
            need_old_pass=updates > 1 or kl_at_rollout,
        )


def kl_controller(stage: PolicyGradientStage) -> AdaptiveKLController | FixedKLController:
    if stage.kl.target is not None and stage.beta > 0:
        return AdaptiveKLController(stage.beta, stage.kl.target, stage.kl.horizon)
    return FixedKLController(stage.beta)


def compute_advantages(
    rollout: Rollout, settings: Settings, stage: PolicyGradientStage, beta: float
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """Advantages ((N,) per completion, or (N, T) for PPO), PPO's value targets, and rollout metrics."""
    samples, mask = rollout.samples, rollout.mask
    rewards = samples.rewards.float()
    metrics: dict[str, float] = {}
    kl_tokens = None
    if rollout.ref_logps is not None and rollout.old_logps is not None:
        kl_tokens = kl_per_token(rollout.old_logps, rollout.ref_logps, mask, settings.kl_estimator)
        metrics["kl"] = float(kl_per_token(rollout.old_logps, rollout.ref_logps, mask, "k1").sum(1).mean())
    in_reward = kl_tokens is not None and beta > 0 and settings.kl_placement == "reward"
    returns = None
    if settings.estimator == "gae":
        token_rewards = sequence_rewards_to_tokens(rewards, mask)
        if in_reward:
            token_rewards = token_rewards - beta * kl_tokens
        advantages, returns = generalized_advantages(
            token_rewards, rollout.values, mask, stage.ppo.gamma, stage.ppo.lam
        )
        if stage.ppo.whiten_advantages:
            advantages = whiten(advantages, mask)
        residual = torch.where(mask, returns - rollout.values, 0.0)
        variance = masked_mean((returns - masked_mean(returns, mask)).square(), mask)
        residual_var = masked_mean((residual - masked_mean(residual, mask)).square(), mask)
        metrics["explained_variance"] = float(1 - residual_var / variance) if variance > 0 else math.nan
        return advantages, returns, metrics
    if in_reward:
        rewards = rewards - beta * sequence_kl(kl_tokens, mask, stage.kl.reduce)
    if settings.estimator == "batch_mean":
        advantages = batch_baseline_advantages(rewards)
    else:
        advantages = group_advantages(rewards, settings.group_size, settings.estimator)
    return advantages, None, metrics


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
    return metrics


def policy_loss(
    settings: Settings,
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> PolicyLoss:
    if settings.loss == "reinforce":
        return reinforce_loss(logps, advantages, mask)
    clip = (settings.clip_low, settings.clip_high)
    if settings.loss == "clipped":
        return clipped_surrogate_loss(logps, old_logps, advantages, mask, *clip)
    if settings.loss == "gspo":
        return gspo_loss(logps, old_logps, advantages, mask, *clip)
    return cispo_loss(logps, old_logps, advantages, mask, *clip)
