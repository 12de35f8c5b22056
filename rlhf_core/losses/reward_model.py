"""Reward-model losses (book ch.5).

Bradley-Terry: P(y_c > y_r | x) = sigma(r(x, y_c) - r(x, y_r)), trained by minimising the negative
log-likelihood of the human (or verifier) preference:

    L = -log sigma(r_c - r_r - m)          (ch.5, InstructGPT loss form; m = 0 without a margin)

``m`` is the Llama 2 margin (e.g. Likert 5 vs 2 gives m = 3). With K completions per prompt every
prompt contributes C(K, 2) pairs; InstructGPT puts them in one batch and weights each pair by
1 / C(K, 2) so prompts with many completions do not dominate:

    L = -(1 / #prompts) * sum_prompts (1 / C(K_p, 2)) * sum_pairs log sigma(r_c - r_r)

At initialisation (r_c == r_r) every form equals ln 2 ~ 0.6931.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    prompt_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean pairwise loss -log sigma(r_c - r_r - m).

    Args:
        rewards_chosen: (P,) scores of the chosen completions.
        rewards_rejected: (P,) scores of the rejected completions.
        margin: optional (P,) margins m(y_c, y_r) >= 0 (Llama 2).
        prompt_ids: optional (P,) ids grouping pairs by prompt; each prompt's pairs are averaged first,
            then prompts are averaged (weight 1/C(K,2) per pair, InstructGPT).
    Returns:
        scalar loss.
    """
    logits = rewards_chosen - rewards_rejected  # (P,)
    if margin is not None:
        logits = logits - margin
    losses = -F.logsigmoid(logits)  # (P,)
    if prompt_ids is None:
        return losses.mean()
    _, group = torch.unique(prompt_ids, return_inverse=True)
    n_groups = int(group.max()) + 1
    per_prompt_sum = torch.zeros(n_groups, dtype=losses.dtype, device=losses.device).index_add(
        0, group, losses
    )
    per_prompt_count = torch.bincount(group, minlength=n_groups).to(losses.dtype)
    return (per_prompt_sum / per_prompt_count).mean()


def pairwise_accuracy(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs the model orders correctly (ties count as wrong)."""
    return (rewards_chosen > rewards_rejected).float().mean()
