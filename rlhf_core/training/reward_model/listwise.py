"""K-wise preference data as rankings, for the Plackett-Luce reward-model loss (book ch.5).

Preference rows are pairs; a prompt with K completions arrives as up to C(K, 2) rows. Plackett-Luce
needs each prompt's completions in one order, best first: the total order its pairs imply
(:func:`rlhf_core.losses.reward_model.ranking_from_pairs`). Completions are told apart by their tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_core.errors import UserError
from rlhf_core.losses.reward_model import ranking_from_pairs
from rlhf_core.modeling.preference_tokens import PromptPairs


@dataclass(frozen=True)
class PromptRanking:
    """A prompt's distinct completions as pair slots, and their order best first."""

    slots: list[int]  # completion c is slots[c]: p (chosen of the prompt's pair p) or n_pairs + p (rejected)
    order: list[int]  # completions 0..K-1, best first
    n_pairs: int  # pairs of the prompt


def prompt_ranking(group: PromptPairs, source: str = "preferences") -> PromptRanking:
    """The ranking that ``group``'s pairs imply; a ``UserError`` naming the prompt's rows if none does."""
    n_pairs = len(group.chosen)
    completion_of: dict[tuple[int, ...], int] = {}
    slots: list[int] = []

    def completion(tokens: list[int], slot: int) -> int:
        if tuple(tokens) not in completion_of:
            completion_of[tuple(tokens)] = len(slots)
            slots.append(slot)
        return completion_of[tuple(tokens)]

    pairs = [
        (completion(c, p), completion(r, n_pairs + p))
        for p, (c, r) in enumerate(zip(group.chosen, group.rejected, strict=True))
    ]
    try:
        order = ranking_from_pairs(len(slots), pairs)
    except ValueError as problem:
        rows = ", ".join(str(row) for row in group.rows)
        completions = "; ".join(
            f"completion {c} = {'chosen' if s < n_pairs else 'rejected'} of row {group.rows[s % n_pairs]}"
            for c, s in enumerate(slots)
        )
        raise UserError(
            f"in {source}, the prompt of rows {rows} (0-based): loss plackett_luce needs its pairs to rank "
            f"its completions in one total order, but {problem} ({completions}); fix or drop these rows, "
            "or use loss: bradley_terry"
        ) from None
    return PromptRanking(slots, order, n_pairs)


def ranked_rewards(
    rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, rankings: list[PromptRanking]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair rewards (P,), the prompts' pairs one after another, as ``plackett_luce_loss``'s inputs.

    Returns the (B, K_max) rewards of each prompt's distinct completions (padded columns repeat a real
    reward, masked out), the (B, K_max) mask of real ones and the (B, K_max) order (padded columns last).
    """
    device = rewards_chosen.device
    n_pairs = len(rewards_chosen)
    by_slot = torch.cat([rewards_chosen, rewards_rejected])  # (2P,): chosen of every pair, then rejected
    k_max = max(len(r.order) for r in rankings)
    index = torch.zeros(len(rankings), k_max, dtype=torch.long, device=device)
    mask = torch.zeros(len(rankings), k_max, dtype=torch.bool, device=device)
    order = torch.arange(k_max, device=device).repeat(len(rankings), 1)
    first_pair = 0
    for b, ranking in enumerate(rankings):
        k = len(ranking.order)
        own = ranking.n_pairs
        # a prompt's slot s < own is chosen of its pair s, else rejected of its pair s - own
        index[b, :k] = torch.tensor(
            [first_pair + s if s < own else n_pairs + first_pair + s - own for s in ranking.slots]
        )
        mask[b, :k] = True
        order[b, :k] = torch.tensor(ranking.order)
        first_pair += own
    return by_slot[index], mask, order
