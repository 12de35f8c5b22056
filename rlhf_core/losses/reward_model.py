"""Reward-model losses (book ch.5).

Bradley-Terry: P(y_c > y_r | x) = sigma(r(x, y_c) - r(x, y_r)), trained by minimising the negative
log-likelihood of the human (or verifier) preference:

    L = -log sigma(r_c - r_r - m)          (ch.5, InstructGPT loss form; m = 0 without a margin)

``m`` is the Llama 2 margin (e.g. Likert 5 vs 2 gives m = 3). With K completions per prompt every
prompt contributes C(K, 2) pairs; InstructGPT puts them in one batch and weights each pair by
1 / C(K, 2) so prompts with many completions do not dominate:

    L = -(1 / #prompts) * sum_prompts (1 / C(K_p, 2)) * sum_pairs log sigma(r_c - r_r)

At initialisation (r_c == r_r) every form equals ln 2 ~ 0.6931.

Plackett-Luce (listwise, K-wise; Zhu et al. 2023, arXiv:2301.11270; book ch.5): a ranking sigma of K
completions, best first, is drawn by picking the best among all, then the best among the rest, ...:

    P(sigma | x) = prod_k exp(r_sigma(k)) / sum_{j >= k} exp(r_sigma(j))
    L = -log P(sigma | x)                  (per prompt, then averaged over prompts)

For K = 2 it is Bradley-Terry's -log sigma(r_c - r_r); at initialisation it equals log K!.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def plackett_luce_loss(rewards: torch.Tensor, mask: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Mean over prompts of -log P(sigma | x) under Plackett-Luce (see the module docstring).

    Args:
        rewards: (B, K) scores of up to K completions per prompt; padded entries may hold anything
            (inf, nan): they neither enter the loss nor receive a gradient.
        mask: (B, K) bool, True for a real completion.
        order: (B, K) long, ``order[b, k]`` the column of the completion ranked k-th (0 = best); padded
            columns may sit anywhere in it (they are skipped).
    Returns:
        scalar loss.
    """
    mask = mask.bool()
    safe = torch.where(mask, rewards, torch.zeros_like(rewards))  # garbage never reaches the arithmetic
    ranked = safe.gather(1, order)  # (B, K) best first
    ranked_mask = mask.gather(1, order)  # (B, K)
    k = torch.arange(order.shape[1], device=order.device)
    # pool[b, k, j]: completion at rank j competes at rank k (j >= k and real); a padded rank k keeps
    # only itself so that its (discarded) term stays finite
    pool = (k[None, :] >= k[:, None])[None] & ranked_mask[:, None, :]  # (B, K, K)
    pool = pool | (torch.eye(len(k), dtype=torch.bool, device=order.device)[None] & ~ranked_mask[:, :, None])
    competitors = torch.where(pool, ranked[:, None, :], torch.full_like(pool, -torch.inf, dtype=safe.dtype))
    terms = ranked - torch.logsumexp(competitors, dim=-1)  # (B, K) log-prob of each pick
    return -(terms * ranked_mask).sum(dim=1).mean()


def ranking_from_pairs(n_completions: int, pairs: Sequence[tuple[int, int]]) -> list[int]:
    """The total order, best first, that (winner, loser) pairs over completions 0..n-1 imply.

    Raises ``ValueError`` naming the completions when the pairs contradict each other (a cycle) or leave
    two of them unordered (no pair or chain of pairs between them). Each step takes the only completion
    no remaining one beats: it exists and is unique exactly when the pairs imply one total order.
    """
    beaten_by = [0] * n_completions
    beats: list[set[int]] = [set() for _ in range(n_completions)]
    for winner, loser in set(pairs):
        if winner == loser:
            raise ValueError(f"completion {winner} is both chosen and rejected in one pair")
        beats[winner].add(loser)
        beaten_by[loser] += 1
    remaining, order = set(range(n_completions)), []
    while remaining:
        top = sorted(c for c in remaining if beaten_by[c] == 0)
        if not top:
            raise ValueError(
                f"the pairs contradict each other (a cycle among completions {sorted(remaining)})"
            )
        if len(top) > 1:
            raise ValueError(f"the pairs do not order completions {top[0]} and {top[1]} against each other")
        order.append(top[0])
        remaining.remove(top[0])
        for loser in beats[top[0]]:
            beaten_by[loser] -= 1
    return order
