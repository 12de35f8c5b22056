"""The optimizer-step loop shared by every offline trainer (SFT, reward model, ...).

A trainer supplies ``step_fn(step, backward, device)``: it runs the forward/backward passes of the
micro-batches of global step ``step`` (calling ``backward(loss)``) and returns that step's metrics.
This loop owns everything around it: accelerate, AdamW, warmup + decay schedule, gradient clipping,
metrics every ``log_every`` steps, resumable checkpoints every ``checkpoint_every`` steps, and bf16
autocast when ``precision: bf16``.

With several processes (``compute.processes``; ``rlhf_core.training.data_parallel``) every rank runs
this loop on the same steps: ``step_fn`` runs only this rank's share of the step's micro-batches
(``local_share``) with losses normalised by the whole step's count, and returns its share's sums;
the loop sums gradients and metrics across ranks, logs and checkpoints from the main process, and
ends the other ranks with ``OtherRankFinished`` once training is done.

Exact resume relies on the trainer's batches being a pure function of (seed, step), or on the trainer
passing what else its steps depend on (a KL controller, a rollout position, ...) as ``extra_state``:
objects with ``state_dict()``/``load_state_dict()`` that every checkpoint saves and resume restores.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from rlhf_core.spec import OptimSpec
from rlhf_core.training import PROGRESS_METRIC, data_parallel
from rlhf_core.training.checkpoint import STATE_FILE, latest_checkpoint, load_checkpoint, save_checkpoint

LogFn = Callable[[dict[str, float], int], None]
BackwardFn = Callable[[torch.Tensor], None]
StepFn = Callable[[int, BackwardFn, torch.device], dict[str, float]]

TOKENS = "tokens"  # step_fn metric: real (non-padding) input tokens processed in the step


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
    # The schedule advances once per optimizer step: accelerate's default would step it once per
    # process (it assumes each process adds its own batch to the step; here the ranks share one).
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)
    processes = accelerator.num_processes
    data_parallel.check_supported(str(accelerator.distributed_type.value), processes)
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
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.register_for_checkpointing(*extra_state)  # save_state/load_state now carry them too
    start_step = _resume(accelerator, checkpoint_dir, total_steps, seed, log)
    identity = {"total_steps": total_steps, "seed": seed, "processes": processes}

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

    for step in range(start_step, total_steps):
        with autocast():
            metrics = step_fn(step, backward, accelerator.device)
        if processes > 1:  # the step's gradient and metrics: sums over every rank's share
            data_parallel.sum_gradients(params)
            metrics = data_parallel.sum_metrics(metrics)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
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
    if not accelerator.is_main_process:
        raise data_parallel.OtherRankFinished
    return accelerator.unwrap_model(model), result


def _resume(accelerator: Accelerator, checkpoint_dir: Path, total_steps: int, seed: int, log: LogFn) -> int:
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
