"""On-policy RL in several processes (``compute.processes``): how the ranks share a rollout.

Every rank holds the whole policy (data parallelism) and runs the same rollout loop. The work of a
rollout is split, then gathered, so that every rank ends up with the same rollout and computes the same
advantages, KL controller update and prompt cursor (the state a checkpoint saves is identical on every
rank, and the main rank's copy restores them all):

1. **Sampling**: the round's prompts are cut into chunks of one decoding batch each
   (:func:`~.rollout_sampling.round_chunks`), each with its own seed; rank r samples and rewards chunks r,
   r + N, r + 2N, ... A chunk holds whole groups, so the G completions of a prompt are drawn together,
   and since a chunk's completions depend on its seed only, N ranks sample exactly what one process
   does. :func:`gather_samples` gives every rank the round's samples in chunk order.
2. **Scoring** (pi_old, pi_ref, PPO's values per token): rank r scores the groups g with g mod N = r
   and the grids are gathered (:func:`score_across_ranks`).
3. **Advantages** (group normalization, batch baselines, whitening, GAE) are computed by every rank on
   the whole gathered rollout: estimators that need the batch see the batch.
4. **Updates**: each mini-batch's micro-batches are shared by ``StepContext.share`` as in the offline
   trainers, losses normalised by the whole mini-batch, gradients summed by the loop.

Gathers go through ``torch.distributed.all_gather_object`` (rollouts are token ids and per-token floats:
small next to the model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rlhf_core.training.engine.data_parallel import rank_and_world
from rlhf_core.training.policy_gradient.rollouts import Rollout, engine_logp_grid, score_rollout
from rlhf_core.training.policy_gradient.samples import Samples

if TYPE_CHECKING:
    from rlhf_core.training.policy_gradient.rollout_sampling import SamplingChunk


def gather_objects(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (``[value]`` in a single process)."""
    _, world = rank_and_world()
    if world == 1:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def my_chunks(chunks: list[SamplingChunk]) -> list[SamplingChunk]:
    """This rank's chunks of a round: every N-th from its rank on."""
    rank, world = rank_and_world()
    return chunks[rank::world]


def gather_samples(local: Samples, chunks: list[SamplingChunk]) -> Samples:
    """The whole round's samples on every rank, in chunk order; ``local`` holds this rank's chunks
    (:func:`my_chunks`) in their order."""
    rank, world = rank_and_world()
    if world == 1:
        return local
    parts = gather_objects(local)
    pieces: dict[int, Samples] = {}
    for owner, part in enumerate(parts):
        first_group = 0
        for chunk in chunks[owner::world]:
            size = len(chunk.prompt_indices)
            pieces[chunk.index] = part.select_groups(list(range(first_group, first_group + size)))
            first_group += size
    return Samples.concat([pieces[chunk.index] for chunk in chunks])


def score_across_ranks(samples: Samples, *models: Any, **scoring: Any) -> Rollout:
    """:func:`~.rollouts.score_rollout` (same arguments) with the groups shared between the ranks (group
    g on rank g mod N) and the per-token grids gathered."""
    rank, world = rank_and_world()
    if world == 1:
        return score_rollout(samples, *models, **scoring)
    n_groups = max(samples.groups, default=-1) + 1
    mine = list(range(rank, n_groups, world))
    grids = None
    if mine:
        part = score_rollout(samples.select_groups(mine), *models, **scoring)
        grids = (part.old_logps, part.entropy, part.ref_logps, part.values)
    rows_of = {g: [i for i, gi in enumerate(samples.groups) if gi == g] for g in range(n_groups)}
    width = max(samples.lengths)
    full: list[torch.Tensor | None] = [None] * 4
    for owner, owned in enumerate(gather_objects(grids)):
        if owned is None:
            continue
        rows = [i for g in range(owner, n_groups, world) for i in rows_of[g]]
        for k, grid in enumerate(owned):
            if grid is None:
                continue
            if full[k] is None:
                full[k] = torch.zeros(len(samples.lengths), width, dtype=grid.dtype)
            full[k][rows, : grid.shape[1]] = grid
    return Rollout(samples, full[0], full[1], full[2], full[3], engine_logps=engine_logp_grid(samples))
