"""Data parallelism for the offline trainers: several processes share each optimizer step.

A stage with ``compute.processes: N`` runs N copies of its trainer, launched by ``accelerate launch``
(``runtime.multiprocess``). Every rank builds the same global step (its micro-batches are a pure function
of seed and step) and runs the forward/backward passes of its own share of them
(:func:`local_share`). The trainers normalise each micro-batch's loss by the count of the WHOLE step
(tokens, prompts, pairs), so the per-rank gradients add up to the one-process gradient:

    g = sum_{b in step} grad L_b / n_step = sum_{ranks r} sum_{b in share(r)} grad L_b / n_step

The loop sums the gradients across ranks once per step (:func:`sum_gradients`, an all-reduce over
gloo on CPU, NCCL on GPU) and the step's metrics likewise (:func:`sum_metrics`), so the optimizer
step, the clipping and the logged curve are those of one process up to float summation order.

Why not DDP's own gradient hooks: they only fire for a forward pass through the DDP wrapper, while
the losses run the backbone and the LM head separately (``rlhf_core.losses.language_model``: the
full (B, T, V) logits are never built). The explicit all-reduce gives the same averaged update, one
message per step instead of overlapped buckets.

FSDP2 (accelerate ``fsdp_version: 2``) is supported by running each loss inside the FSDP root's
forward (``StepContext.forward`` in ``rlhf_core.training.engine.loop``); its collectives run on every
forward and backward pass, so there every rank runs the same number of passes (:func:`balanced_share`
with ``equal_passes``). FSDP1 and DeepSpeed are refused (:func:`check_supported`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

from rlhf_core.errors import UserError

T = TypeVar("T")
BUCKET_ELEMENTS = 2**25  # gradient elements per all-reduce message (128 MiB in fp32)
# accelerate's DistributedType values whose prepared model is plain (NO) or DDP-wrapped
SUPPORTED = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA")


class OtherRankFinished(BaseException):  # noqa: N818 - a control-flow signal, not an error
    """Raised on every rank but the main one when training is done: evaluation, saving, logging and
    registration run on the main process only. ``runtime.multiprocess`` ends such a rank quietly."""


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside a distributed launch."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s share of ``items``: every ``world``-th item from ``rank`` on.

    Every item goes to exactly one rank, and counts differ by at most one. A rank may get nothing (fewer
    micro-batches than ranks): it contributes zero gradient, and no collective waits on its backward
    passes, because gradients are summed once per step, not per backward pass. Round robin over
    length-sorted micro-batches also gives the ranks similar amounts of tokens.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    return list(items[rank::world])


def balanced_share(items: Sequence[T], *, equal_passes: bool = False) -> list[tuple[T, bool]]:
    """This process's share of a step's micro-batches as (micro-batch, counts) pairs.

    ``counts`` is True for the share itself. With ``equal_passes`` (sharded training: every forward and
    backward pass is a collective) a rank with fewer micro-batches than ``ceil(len(items) / world)``
    makes up the difference with the step's first micro-batch and ``counts`` False: the trainer runs it
    with its loss multiplied by zero (a zero gradient, the same passes) and leaves it out of its metrics.
    Otherwise this is :func:`local_share`, every pair counting.
    """
    share = [(item, True) for item in local_share(items)]
    if equal_passes and items:
        _, world = rank_and_world()
        share += [(items[0], False)] * (-(-len(items) // world) - len(share))
    return share


def local_share(items: Sequence[T]) -> list[T]:
    """This process's share of a step's micro-batches (all of them in a single process)."""
    rank, world = rank_and_world()
    return list(items) if world == 1 else shard(items, rank, world)


@contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first (e.g. fills a cache), then the other ranks (which read it)."""
    rank, world = rank_and_world()
    if world > 1 and rank != 0:
        dist.barrier()
    yield
    if world > 1 and rank == 0:
        dist.barrier()


def sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """All-reduce (sum) the gradients of ``params`` across ranks, in place; a missing gradient counts
    as zero (a rank whose share of the step was empty)."""
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for param in params:
        groups.setdefault((param.grad.dtype, param.grad.device), []).append(param.grad)
    for grads in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for grad in grads:
            bucket.append(grad)
            size += grad.numel()
            if size >= BUCKET_ELEMENTS:
                _all_reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            _all_reduce_bucket(bucket)


def _all_reduce_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def sum_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The step's metrics summed over ranks (each rank returns its share's weighted sums; a key one
    rank lacks counts as zero there)."""
    gathered: list[dict[str, float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, metrics)
    keys = list(dict.fromkeys(k for part in gathered for k in part))
    return {k: float(sum(part.get(k, 0.0) for part in gathered)) for k in keys}


def check_supported(distributed_type: str, processes: int, *, sharded: bool = False) -> None:
    """Refuse accelerate setups whose model wrapper must see the forward pass (FSDP1, DeepSpeed, ...);
    ``sharded``: FSDP2, which the loop supports."""
    if distributed_type not in SUPPORTED and not (sharded and distributed_type == "FSDP"):
        raise UserError(
            f"accelerate runs this training as {distributed_type} with {processes} processes; the "
            "trainers support data parallelism only (distributed_type MULTI_GPU or MULTI_CPU): their "
            "losses call the backbone and the LM head directly, which FSDP and DeepSpeed wrappers do not "
            "see. Use a DDP accelerate config (or none), or FSDP with fsdp_version: 2, in "
            "compute.accelerate_config."
        )
