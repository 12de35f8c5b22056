"""Advantage estimators of on-policy RL (book ch.6, "estimators and losses"; reference section 7).

Bandit-style estimators take one scalar reward per completion, with the G completions of a prompt
stored next to each other (rewards of shape (P * G,)), and give one advantage per completion,
broadcast to its tokens:

- ``grpo``:    A_i = (r_i - mean(r)) / (std(r) + eps)  (DeepSeekMath; std is the unbiased sample std,
               as ``torch.std`` and TRL compute it; eps 1e-4 as in the book's snippet)
- ``dr_grpo``: A_i = r_i - mean(r)                     (Liu et al. 2025: no std normalization)
- ``rloo``:    A_i = r_i - (1/(G-1)) sum_{j != i} r_j = G/(G-1) (r_i - mean(r))  (Kool 2019; Ahmadian 2024)
- ``reinforce``: A_i = r_i - b with b the batch mean (Williams 1992's baseline; the reference's
               "simplest baseline")

A group whose rewards are all equal gets advantage 0 for every completion under every group estimator
(DAPO's dynamic sampling drops such groups).

PPO's per-token advantages come from a value model by GAE (Schulman et al. 2015):
delta_t = r_t + gamma V(s_{t+1}) - V(s_t), A_t = sum_l (gamma lambda)^l delta_{t+l}, with V = 0 after the
last completion token; the value targets are A_t + V(s_t).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from rlhf_core.losses.masking import masked_mean, masked_sum, zero_padding

GroupEstimator = Literal["grpo", "dr_grpo", "rloo"]
GRPO_STD_EPS = 1e-4


def _grpo(grouped: torch.Tensor, centered: torch.Tensor, eps: float) -> torch.Tensor:
    return centered / (grouped.std(dim=1, keepdim=True) + eps)


def _dr_grpo(grouped: torch.Tensor, centered: torch.Tensor, eps: float) -> torch.Tensor:
    return centered


def _rloo(grouped: torch.Tensor, centered: torch.Tensor, eps: float) -> torch.Tensor:
    group_size = grouped.shape[1]
    return centered * group_size / (group_size - 1)


# estimator name -> fn((P, G) rewards, (P, G) rewards minus their group mean, eps) -> (P, G) advantages
GROUP_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "grpo": _grpo,
    "dr_grpo": _dr_grpo,
    "rloo": _rloo,
}


def group_advantages(
    rewards: torch.Tensor, group_size: int, estimator: GroupEstimator, eps: float = GRPO_STD_EPS
) -> torch.Tensor:
    """(P * G,) advantages of rewards laid out group by group (the G completions of a prompt together)."""
    if group_size < 2:
        raise ValueError(f"{estimator} compares the completions of a prompt: it needs group_size >= 2")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"unknown group estimator '{estimator}' (known: {', '.join(GROUP_ESTIMATORS)})")
    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    return GROUP_ESTIMATORS[estimator](grouped, centered, eps).reshape(-1)


def all_equal_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(P,) True for each group whose rewards are all equal (no learning signal under a group baseline)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


def batch_baseline_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE with the batch-mean baseline: A_i = r_i - mean_j r_j."""
    return rewards - rewards.mean()


def whiten(values: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) over ``mask`` positions (all when None); padding stays 0."""
    if mask is None:
        return (values - values.mean()) / (values.std(unbiased=False) + eps)
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean).square(), mask)
    return zero_padding((values - mean) / (variance.sqrt() + eps), mask)


def generalized_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) per token, and the value targets (returns = advantages + values).

    Args:
        rewards: (B, T) per-token rewards (e.g. -beta * KL on every token and the score on the last).
        values: (B, T) V(s_t) of the value model at each completion token.
        mask: (B, T) True on the policy's own tokens (right padding; in a multi-turn episode the
            environment's tokens between the model's turns are False too).
    Returns:
        advantages, returns: (B, T), 0 outside the mask, detached.

    lambda = 1 gives Monte-Carlo return minus V; lambda = 0 the one-step TD residual (tested). Positions
    outside the mask are not steps: the recursion carries over them, so in a multi-turn episode (book
    ch.13) the token before a tool's output bootstraps from the model's next token after it, and the
    episode's final reward reaches every turn.
    """
    mask = mask.bool()
    rewards, values = zero_padding(rewards.detach(), mask), zero_padding(values.detach(), mask)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):  # V after the last token is 0 (terminal)
        live = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(live, delta + gamma * lam * running, running)
        advantages[:, t] = torch.where(live, running, 0.0)
        next_value = torch.where(live, values[:, t], next_value)
    returns = zero_padding(advantages + values, mask)
    return advantages, returns


def sequence_rewards_to_tokens(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token rewards with each sequence's score on its last completion token (the last True of
    its mask: a multi-turn episode's mask has holes where the environment spoke)."""
    mask = mask.bool()
    lengths = mask.sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, -1).max(dim=1).values.clamp(min=0)
    out = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rows = torch.arange(mask.shape[0], device=mask.device)
    out[rows, last] = torch.where(lengths > 0, scores, torch.zeros_like(scores))
    return out


def sequence_kl(
    per_token_kl: torch.Tensor, mask: torch.Tensor, reduce: Literal["sum", "mean"]
) -> torch.Tensor:
    """(B,) KL of each completion from its per-token estimates: summed or averaged over its tokens (the
    book folds it into the reward without saying which; the companion code averages)."""
    if reduce == "sum":
        return masked_sum(per_token_kl, mask, dim=1)
    return masked_mean(per_token_kl, mask, dim=1)
