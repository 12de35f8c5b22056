"""Per-token policy-gradient losses of on-policy RL (book ch.6; reference section 7.2), and PPO's value loss.

Every function takes (B, T) log-probs of the sampled completion tokens under the policy being trained
(``logps``, with gradient) and, where the loss has an importance ratio, under the policy that sampled
them (``old_logps``, no gradient), a (B, T) ``mask`` True on completion tokens, and advantages of shape
(B,) (one per completion, broadcast to its tokens) or (B, T). Each returns the (B, T) per-token loss,
0 outside the mask, to be reduced by :func:`rlhf_core.losses.masking.aggregate_loss`; padding values
never reach an exponential, so garbage there cannot turn the loss or its gradient into NaN.

The book's comparison table, with c(x) = clip(x, 1 - e_lo, 1 + e_hi):

| loss | importance ratio | clipping | per-token loss |
|---|---|---|---|
| ``reinforce`` (REINFORCE, RLOO) | none | none | -A_t log pi(a_t) |
| ``clipped`` (PPO, GRPO, DAPO) | token: rho_t = pi/pi_old | objective | max(-A rho_t, -A c(rho_t)) |
| ``gspo`` (GSPO) | sequence: s_i = exp(mean_t log rho_t) | objective | max(-A s_i, -A c(s_i)) |
| ``cispo`` (CISPO) | token | the weight, stop-gradient | -sg(c(rho_t)) A log pi(a_t) |

PPO's clip (Schulman 2017): the objective is min(rho A, clip(rho) A); its only zero-gradient regions are
A > 0 with rho > 1 + e and A < 0 with rho < 1 - e (tested on both sides). At the first step on a rollout
rho = 1 and the clipped loss has the gradient of -A log pi.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf_core.losses.masking import masked_mean, zero_padding


@dataclass
class PolicyLoss:
    """(B, T) per-token loss (0 outside the mask) and what is logged about it."""

    per_token: torch.Tensor
    clipped: torch.Tensor  # (B, T) bool: tokens where the clip (or the weight's bound) was active
    log_ratio: torch.Tensor  # (B, T) log pi - log pi_old (0 for reinforce and outside the mask), detached


def _per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return advantages[:, None].expand_as(like) if advantages.dim() == 1 else advantages


def reinforce_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> PolicyLoss:
    """REINFORCE / RLOO: -A log pi(a_t | s_t) (Williams 1992; the book's ``-(seq_log_probs * A)``)."""
    advantages = _per_token(advantages, logps).detach()
    per_token = zero_padding(-advantages * logps, mask)
    zeros = torch.zeros_like(logps).detach()
    return PolicyLoss(per_token, torch.zeros_like(mask, dtype=torch.bool), zeros)


def clipped_surrogate_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> PolicyLoss:
    """PPO / GRPO / DAPO: max(-A rho_t, -A clip(rho_t, 1 - clip_low, 1 + clip_high)), rho_t = pi/pi_old.

    ``clip_low`` != ``clip_high`` is DAPO's clip-higher (e.g. 0.2 / 0.28)."""
    advantages = zero_padding(_per_token(advantages, logps).detach(), mask)
    log_ratio = zero_padding(logps - old_logps.detach(), mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = zero_padding(torch.maximum(unclipped, clipped), mask)
    return PolicyLoss(per_token, (clipped > unclipped) & mask.bool(), log_ratio.detach())


def gspo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> PolicyLoss:
    """GSPO (Zheng et al. 2025): the sequence-level, length-normalized ratio
    s_i = (pi(a_i)/pi_old(a_i))^(1/|a_i|) = exp(mean_t log rho_t), clipped in the objective and applied to
    every token of a_i (the per-token loss is the sequence's, so ``sequence`` aggregation gives
    (1/G) sum_i max(-A_i s_i, -A_i clip(s_i))). The paper clips at 3e-4 / 4e-4."""
    if advantages.dim() != 1:
        raise ValueError("GSPO takes one advantage per completion (shape (B,))")
    log_ratio = zero_padding(logps - old_logps.detach(), mask)
    sequence_ratio = torch.exp(masked_mean(log_ratio, mask, dim=1))  # (B,)
    advantages = advantages.detach()
    unclipped = -advantages * sequence_ratio
    clipped = -advantages * sequence_ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_sequence = torch.maximum(unclipped, clipped)
    per_token = zero_padding(per_sequence[:, None].expand_as(logps), mask)
    was_clipped = (clipped > unclipped)[:, None].expand_as(mask) & mask.bool()
    return PolicyLoss(per_token, was_clipped, log_ratio.detach())


def cispo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> PolicyLoss:
    """CISPO (MiniMax-M1 2025): -sg(clip(rho_t, 1 - clip_low, 1 + clip_high)) A_t log pi(a_t); the weight
    is clipped, not the objective, so every token keeps a gradient. The book's equation normalizes by
    the batch's token count (``token`` aggregation)."""
    advantages = zero_padding(_per_token(advantages, logps).detach(), mask)
    log_ratio = zero_padding(logps - old_logps.detach(), mask).detach()
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = zero_padding(-weight * advantages * logps, mask)
    return PolicyLoss(per_token, (weight != ratio) & mask.bool(), log_ratio)


def _reinforce_from_ratio_args(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> PolicyLoss:
    """:func:`reinforce_loss` behind the common signature (it reads no pi_old and no clip)."""
    return reinforce_loss(logps, advantages, mask)


# loss name (``AlgorithmDefaults.loss``) -> fn(logps, old_logps, advantages, mask, clip_low, clip_high)
POLICY_LOSSES: dict[str, Callable[..., PolicyLoss]] = {
    "reinforce": _reinforce_from_ratio_args,
    "clipped": clipped_surrogate_loss,
    "gspo": gspo_loss,
    "cispo": cispo_loss,
}


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> torch.Tensor:
    """(B, T) PPO value loss: max(0.5 (V - R)^2, 0.5 (V_clip - R)^2) with
    V_clip = clamp(V, V_old - clip, V_old + clip); no clipping when ``clip`` is None."""
    values = zero_padding(values, mask)
    old_values, returns = zero_padding(old_values.detach(), mask), zero_padding(returns.detach(), mask)
    loss = 0.5 * (values - returns).square()
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, 0.5 * (clipped - returns).square())
    return zero_padding(loss, mask)


def soft_overlong_penalty(lengths: torch.Tensor, max_length: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong penalty per completion: 0 up to max_length - cache tokens, then falling
    linearly to -1 at max_length, -1 beyond (l_max 512, cache 128: 384 -> 0, 448 -> -0.5, 512 -> -1)."""
    safe = max_length - cache
    lengths = lengths.to(torch.float64)
    ramp = (safe - lengths) / cache
    penalty = torch.where(lengths <= safe, torch.zeros_like(lengths), ramp)
    return torch.where(lengths > max_length, torch.full_like(lengths, -1.0), penalty)
