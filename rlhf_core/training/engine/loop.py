"""The optimizer-step loop shared by every offline trainer (SFT, reward model, ...).

A trainer supplies ``step_fn(step, ctx)``: it runs the forward/backward passes of the micro-batches of
global step ``step`` through the :class:`StepContext` the loop hands it (``ctx.share`` of the
micro-batches, ``ctx.forward`` for each loss, ``ctx.backward(loss)``, tensors on ``ctx.device``) and
returns that step's metrics. Everything a step may touch is in that object: no module state changes
what a step does.
This loop owns everything around it: accelerate, AdamW, warmup + decay schedule, gradient clipping,
metrics every ``log_every`` steps, resumable checkpoints every ``checkpoint_every`` steps, and bf16
autocast when ``precision: bf16``.

With several processes (``compute.processes``; ``rlhf_core.training.engine.data_parallel``) every rank runs
this loop on the same steps: ``step_fn`` runs only this rank's share of the step's micro-batches
(``ctx.share``) with losses normalised by the whole step's count, and returns its share's sums;
the loop sums gradients and metrics across ranks, logs and checkpoints from the main process, and
ends the other ranks with ``OtherRankFinished`` once training is done.

Sharded training (an accelerate config with ``distributed_type: FSDP`` and ``fsdp_version: 2``): the
trained model goes into FSDP2 behind a small root module whose forward runs a callable, and trainers
compute each micro-batch's loss through :meth:`StepContext.forward`. The losses call the backbone and
the LM head (or score head) directly, never the model's own forward; run inside the root's forward,
every FSDP hook still fires: the root unshards its parameters (embeddings, final norm, heads: whatever
no layer unit holds) before the loss and keeps them until its backward, and the layer units gather
theirs as the backbone calls them. FSDP reduce-scatters gradients after each backward pass, a
collective, so every rank must run the same number of forward/backward passes per step: trainers
iterate over ``ctx.share(micro_batches)`` (ranks short of a pass repeat a micro-batch with its loss
multiplied by zero). Gradients are sums (divide factor 1), as with the all-reduce of the data-parallel
path, so nothing else changes: clipping sees the sharded gradients (DTensors) and computes the global
norm, checkpoints are accelerate's (sharded when the config says so), and the trained model comes back
unsharded, on the main process only.

Exact resume relies on the trainer's batches being a pure function of (seed, step), or on the trainer
passing what else its steps depend on (a KL controller, a rollout position, ...) as ``extra_state``:
objects with ``state_dict()``/``load_state_dict()`` that every checkpoint saves and resume restores.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import get_scheduler

from rlhf_core.spec import OptimSpec
from rlhf_core.training import PROGRESS_METRIC
from rlhf_core.training.engine import data_parallel
from rlhf_core.training.engine.checkpoint import (
    STATE_FILE,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

T = TypeVar("T")
LogFn = Callable[[dict[str, float], int], None]
BackwardFn = Callable[[torch.Tensor], None]

TOKENS = "tokens"  # step_fn metric: real (non-padding) input tokens processed in the step


class _LossRoot(torch.nn.Module):
    """The FSDP root around a trained model: ``forward(fn, *args)`` is ``fn(*args)``, so a loss that
    calls the model's parts directly runs inside the root's forward, where FSDP gathers what it holds."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        # accelerate's transformer auto-wrap falls back on the model's own list of layer classes
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        """accelerate re-ties weights after moving a model to the meta device (cpu_ram_efficient_loading)."""
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights(*args, **kwargs)


@dataclass(frozen=True)
class StepContext:
    """What one optimizer step may touch, created by the loop and handed to ``step_fn(step, ctx)``.

    ``sharded_root`` is the FSDP root while a sharded run is in its steps (None otherwise): losses then
    run inside its forward, and every rank runs as many passes.
    """

    device: torch.device  # where this rank's tensors go
    backward: BackwardFn  # adds a micro-batch loss's gradient (outside autocast)
    sharded_root: torch.nn.Module | None = None

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``: a micro-batch's loss. In sharded training it runs inside the FSDP
        root's forward (see the module docstring); otherwise it is a call."""
        if self.sharded_root is not None:
            return self.sharded_root(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    def share(self, micro_batches: Sequence[T]) -> list[tuple[T, bool]]:
        """This rank's share of the step's micro-batches as (micro-batch, counts) pairs
        (:func:`data_parallel.balanced_share`; sharded: plus zero-weighted repeats)."""
        return data_parallel.balanced_share(micro_batches, equal_passes=self.sharded_root is not None)


StepFn = Callable[[int, StepContext], dict[str, float]]


class Stateful(Protocol):
    """Trainer state outside model, optimizer and scheduler that a checkpoint must carry."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class LoopResult:
    total_steps: int
    resumed_from_step: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def run_optimizer_steps(
    model: torch.nn.Module,
    cfg: OptimSpec,
    *,
    total_steps: int,
    steps_per_epoch: int,
    seed: int,
    checkpoint_dir: Path,
    step_fn: StepFn,
    log: LogFn | None = None,
    extra_state: Sequence[Stateful] = (),
    lr_of: Callable[[str], float | None] | None = None,
) -> tuple[torch.nn.Module, LoopResult]:
    """Train ``model`` for ``total_steps`` optimizer steps (resuming from ``checkpoint_dir``).

    ``extra_state`` objects are saved in every checkpoint and restored, in place, on resume. Several
    trained models (a policy and a value model) go in as one ``torch.nn.ModuleDict``: one optimizer,
    one checkpoint; frozen models (a reference policy, a reward model) stay with the trainer.
    ``lr_of(parameter name)`` may give some parameters their own peak learning rate (None: ``cfg.lr``);
    the schedule scales every rate alike.
    """
    model.train()
    accelerator = _accelerator()
    processes = accelerator.num_processes
    sharded = accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2
    data_parallel.check_supported(str(accelerator.distributed_type.value), processes, sharded=sharded)
    if log is None or not accelerator.is_main_process:  # one process writes the curve
        log = lambda metrics, step: None  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in named:
        rate = lr_of(name) if lr_of is not None else None
        groups.setdefault(cfg.lr if rate is None else rate, []).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": ps, "lr": rate} for rate, ps in groups.items()], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    scheduler = get_scheduler(
        cfg.schedule,
        optimizer,
        num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    if sharded:
        skeleton = _skeleton(model) if accelerator.is_main_process else None
        model, optimizer, scheduler = accelerator.prepare(_LossRoot(model), optimizer, scheduler)
        _sum_sharded_gradients(model)
        # fully_shard replaced every parameter by a sharded one (the optimizer holds the new ones)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    result = _steps(accelerator, model, optimizer, scheduler, params, cfg, total_steps, steps_per_epoch,
                    seed, checkpoint_dir, step_fn, log, extra_state, sharded)  # fmt: skip
    if sharded:
        full = _full_state_dict(model)  # a collective: every rank takes part, the main one gets it
        del model, optimizer, scheduler
        accelerator.free_memory()  # the shards and optimizer state go before the whole model comes in
        if not accelerator.is_main_process:
            raise data_parallel.OtherRankFinished
        return _fill(skeleton, full).to(accelerator.device), result
    if not accelerator.is_main_process:
        raise data_parallel.OtherRankFinished
    return accelerator.unwrap_model(model), result


def _accelerator() -> Accelerator:
    """accelerate for this launch. The schedule advances once per optimizer step: accelerate's default
    would step it once per process (it assumes each process adds its own batch to the step; here the
    ranks share one).

    accelerate turns an FSDP launch into FSDP only on accelerators: on CPU it stays MULTI_CPU (plain
    data parallelism), whatever the config says. FSDP2 works on CPU with gloo all the same, so a CPU
    launch with FSDP2 settings is switched to FSDP here, with the plugin read from the launch's
    settings, as accelerate does on GPUs; everything after (prepare, save_state, ...) is accelerate's
    own FSDP2 path.
    """
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)
    state = accelerator.state
    if (
        state.distributed_type == DistributedType.MULTI_CPU
        and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        and os.environ.get("FSDP_VERSION", "1") == "2"
    ):
        from accelerate import PartialState
        from accelerate.utils import FullyShardedDataParallelPlugin

        # both shared states: every AcceleratorState() copies the process-level one over its own
        PartialState().distributed_type = DistributedType.FSDP
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
    return accelerator


def _steps(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    params: list[torch.nn.Parameter],
    cfg: OptimSpec,
    total_steps: int,
    steps_per_epoch: int,
    seed: int,
    checkpoint_dir: Path,
    step_fn: StepFn,
    log: LogFn,
    extra_state: Sequence[Stateful],
    sharded: bool,
) -> LoopResult:
    processes = accelerator.num_processes
    accelerator.register_for_checkpointing(*extra_state)  # save_state/load_state now carry them too
    start_step = _resume(accelerator, checkpoint_dir, total_steps, seed, log, sharded)
    identity: dict[str, Any] = {"total_steps": total_steps, "seed": seed, "processes": processes}
    if sharded:  # a sharded checkpoint holds the model in FSDP's layout: only a sharded run resumes it
        identity["sharded"] = True

    result = LoopResult(total_steps=total_steps, resumed_from_step=start_step)
    started = time.perf_counter()
    # bf16 mixed precision: autocast around the step's forward passes only (the backward runs outside
    # it, as torch recommends). Not accelerate's mixed_precision: that is fixed once per process, and a
    # pipeline runs stages of different precisions in one process.
    device_type = accelerator.device.type
    autocast = partial(torch.autocast, device_type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    def backward(loss: torch.Tensor) -> None:
        with torch.autocast(device_type, enabled=False):
            accelerator.backward(loss)
        if sharded:
            # autocast keeps the bf16 copy of each weight for the whole step; a later micro-batch reusing
            # it reaches the weight through the first micro-batch's (older) cast node, which autograd runs
            # after FSDP has already reduce-scattered that layer's gradient: that part of it is lost.
            # A fresh cast per micro-batch keeps every weight gradient inside its layer's backward.
            torch.clear_autocast_cache()

    ctx = StepContext(accelerator.device, backward, sharded_root=model if sharded else None)
    for step in range(start_step, total_steps):
        with autocast():
            metrics = step_fn(step, ctx)
        if processes > 1:  # the step's gradient and metrics: sums over every rank's share
            if not sharded:  # FSDP has reduce-scattered the sums already
                data_parallel.sum_gradients(params)
            metrics = data_parallel.sum_metrics(metrics)
        if not cfg.max_grad_norm:
            grad_norm = None
        elif sharded:  # DTensor gradients: torch computes the norm over all shards
            grad_norm = _full(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.tokens += int(metrics.pop(TOKENS, 0))
        result.last_metrics = metrics

        done = step + 1
        if done % cfg.log_every == 0 or done == total_steps:
            shown = {f"train/{k}": v for k, v in metrics.items()}
            shown["train/lr"] = scheduler.get_last_lr()[0]
            shown["train/epoch"] = done / steps_per_epoch
            shown[PROGRESS_METRIC] = done / total_steps
            shown["train/tokens_per_second"] = result.tokens / max(time.perf_counter() - started, 1e-9)
            if grad_norm is not None:
                shown["train/grad_norm"] = float(grad_norm)
            log(shown, done)
        if done % cfg.checkpoint_every == 0 and done < total_steps:
            save_checkpoint(accelerator, checkpoint_dir, done, identity)
    result.seconds = time.perf_counter() - started
    return result


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _sum_sharded_gradients(model: torch.nn.Module) -> None:
    """Every FSDP unit reduces gradients by sum, not mean: the trainers' losses are already normalised
    by the whole step's count, as in the data-parallel path. A plain SUM collective too: FSDP would
    otherwise use AVG or PREMUL_SUM, which NCCL has and gloo (CPU) does not."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def launched_sharded() -> bool:
    """Whether this process was launched for FSDP2 training (accelerate's launch environment)."""
    return (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        and os.environ.get("FSDP_VERSION", "1") == "2"
    )


class UnshardedCopy:
    """A plain copy of a model that trains sharded, refreshed from the shards on demand: what a trainer
    runs where it calls the model outside the FSDP root's forward (on-policy RL's rollouts: decoding and
    scoring). Made from the model before it is sharded, as an empty skeleton (no memory until the first
    :meth:`refresh`); then it holds one whole, frozen copy of the weights on every rank."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = _skeleton(model)

    def refresh(self, root: torch.nn.Module) -> torch.nn.Module:
        """The copy with the sharded model's current weights (a collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(root.model, options=StateDictOptions(full_state_dict=True))
        with torch.no_grad():
            model = _fill(self.module, {k: v.detach() for k, v in state.items()})
        return model.eval().requires_grad_(False)


def _skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters are empty (on the meta device), buffers and structure kept
    (ties too): what the trained, gathered weights are put into once sharded training is done."""
    memo: dict[int, Any] = {
        id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


def _full_state_dict(root: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained model's whole (unsharded) state dict on the main process's CPU, {} on the others."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(root.model, options=options)


def _fill(skeleton: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The skeleton with the gathered weights: a plain module, its parameters' requires_grad as trained."""
    missing, unexpected = skeleton.load_state_dict(state, strict=False, assign=True)
    if hasattr(skeleton, "tie_weights"):
        skeleton.tie_weights()
    left = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if left or unexpected:
        raise RuntimeError(f"gathered state does not fit the model: missing {left}, unexpected {unexpected}")
    return skeleton


def _resume(
    accelerator: Accelerator, checkpoint_dir: Path, total_steps: int, seed: int, log: LogFn, sharded: bool
) -> int:
    """Restore the newest checkpoint, if any; returns the step to continue from."""
    ckpt = latest_checkpoint(checkpoint_dir)
    if ckpt is None:
        return 0
    saved = json.loads((ckpt / STATE_FILE).read_text())
    processes = accelerator.num_processes
    if (saved.get("total_steps"), saved.get("seed")) != (total_steps, seed):
        raise ValueError(
            f"checkpoint {ckpt} was written for total_steps={saved.get('total_steps')}, "
            f"seed={saved.get('seed')}; this run has {total_steps}, {seed}. "
            "Delete the checkpoint directory to start over."
        )
    if saved.get("processes", 1) != processes:  # each rank restores its own RNG state
        raise ValueError(
            f"checkpoint {ckpt} was written by {saved.get('processes', 1)} training process(es); this run "
            f"has {processes} (compute.processes). Resume with the same number of processes, or delete "
            "the checkpoint directory to start over."
        )
    if bool(saved.get("sharded", False)) != sharded:
        raise ValueError(
            f"checkpoint {ckpt} was written by {'sharded (FSDP)' if saved.get('sharded') else 'unsharded'} "
            f"training; this run is {'sharded' if sharded else 'unsharded'}. Resume with the same "
            "accelerate config, or delete the checkpoint directory to start over."
        )
    state = load_checkpoint(accelerator, ckpt)
    log({"resumed_from_step": float(state["step"])}, state["step"])
    return state["step"]


def plan_steps(n_rows: int, cfg: OptimSpec) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps). ``max_steps`` wins over ``epochs`` when given."""
    micro_batches = math.ceil(n_rows / cfg.batch_size)
    per_epoch = max(1, math.ceil(micro_batches / cfg.grad_accum))
    return per_epoch, (cfg.max_steps or cfg.epochs * per_epoch)


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """The shuffled row order of one epoch: a pure function of (seed, epoch), which makes resume exact."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_rows, generator=generator).tolist()


def rows_of_step(n_rows: int, cfg: OptimSpec, seed: int, step: int, steps_per_epoch: int) -> list[list[int]]:
    """Row indices of each micro-batch of global optimizer step ``step`` (0-based)."""
    epoch, index = divmod(step, steps_per_epoch)
    order = epoch_order(n_rows, seed, epoch)
    per_step = cfg.batch_size * cfg.grad_accum
    chosen = order[index * per_step : (index + 1) * per_step]
    return [chosen[j : j + cfg.batch_size] for j in range(0, len(chosen), cfg.batch_size)]
