"""Supervised fine-tuning (book ch.4): next-token cross-entropy on assistant tokens only.

One readable loop: tokenize + mask -> (pack) -> per-epoch seeded shuffle -> gradient accumulation ->
clip -> AdamW -> warmup/decay schedule -> periodic resumable checkpoints.

Loss normalisation: each optimizer step averages over all trained tokens of that step, across its
micro-batches (sum of token losses / number of trained tokens), so gradient accumulation gives the
same update as one big batch.

Exact resume: the batch order of every epoch is a pure function of (seed, epoch), so the global step
fully determines the data position; model, optimizer, scheduler and RNG states come from the checkpoint.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from rlhf_core.spec import LoraSpec, SFTTrainSpec
from rlhf_core.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlhf_core.training.sft_data import (
    IGNORE_INDEX,
    Row,
    collate,
    pack_examples,
    tokenize_conversation,
    unpacked_rows,
)

LogFn = Callable[[dict[str, float], int], None]


@dataclass
class SFTResult:
    steps: int
    resumed_from_step: int
    final_loss: float
    examples: int
    truncated_examples: int
    examples_without_labels: int
    trained_tokens: int
    input_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.input_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Plan:
    rows: list[Row]
    steps_per_epoch: int
    total_steps: int


def build_rows(
    records: list[dict], tokenizer: PreTrainedTokenizerBase, cfg: SFTTrainSpec, seed: int
) -> tuple[list[Row], dict[str, int]]:
    """Tokenize, mask and (optionally) pack the training conversations."""
    examples = [tokenize_conversation(r["messages"], tokenizer, cfg.max_length, cfg.mask) for r in records]
    usable = [ex for ex in examples if ex.n_label_tokens > 0]
    stats = {
        "examples": len(usable),
        "truncated_examples": sum(ex.truncated for ex in examples),
        "examples_without_labels": len(examples) - len(usable),
    }
    if not usable:
        raise ValueError("no training example has an assistant token left after truncation to max_length")
    random.Random(seed).shuffle(usable)
    rows = pack_examples(usable, cfg.max_length) if cfg.packing else unpacked_rows(usable)
    return rows, stats


def plan_steps(n_rows: int, cfg: SFTTrainSpec) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps). ``max_steps`` wins over ``epochs`` when given."""
    micro_batches = math.ceil(n_rows / cfg.batch_size)
    per_epoch = max(1, math.ceil(micro_batches / cfg.grad_accum))
    return per_epoch, (cfg.max_steps or cfg.epochs * per_epoch)


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_rows, generator=generator).tolist()


def micro_batches_of_step(plan: _Plan, cfg: SFTTrainSpec, seed: int, step: int) -> list[list[Row]]:
    """The micro-batches of global optimizer step ``step`` (0-based)."""
    epoch, index = divmod(step, plan.steps_per_epoch)
    order = epoch_order(len(plan.rows), seed, epoch)
    rows_per_step = cfg.batch_size * cfg.grad_accum
    chosen = order[index * rows_per_step : (index + 1) * rows_per_step]
    return [
        [plan.rows[i] for i in chosen[j : j + cfg.batch_size]] for j in range(0, len(chosen), cfg.batch_size)
    ]


def token_loss_sum(model: PreTrainedModel, batch: dict[str, torch.Tensor], packed: bool) -> torch.Tensor:
    """Sum over trained tokens of -log pi(y_t | x, y_<t); labels are aligned with input positions.

    Packed rows go in without an attention mask and with the KV cache off: that is the only way
    transformers separates packed examples by their restarting ``position_ids``.
    """
    logits = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=None if packed else batch["attention_mask"],
        use_cache=False,
    ).logits  # (B, T, V)
    # Upcast half-precision logits for the log-softmax, but never downcast float64 ones.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1),
        batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def apply_lora(model: PreTrainedModel, lora: LoraSpec) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    cfg: SFTTrainSpec,
    *,
    seed: int,
    checkpoint_dir: Path,
    lora: LoraSpec | None = None,
    log: LogFn | None = None,
) -> tuple[PreTrainedModel, SFTResult]:
    """Fine-tune ``model`` on ``records`` (rows with ``messages``); resumes from ``checkpoint_dir``.

    Returns the trained model (LoRA adapters merged in) and a summary.
    """
    log = log or (lambda metrics, step: None)
    torch.manual_seed(seed)
    rows, stats = build_rows(records, tokenizer, cfg, seed)
    steps_per_epoch, total_steps = plan_steps(len(rows), cfg)
    plan = _Plan(rows, steps_per_epoch, total_steps)

    if lora is not None:
        model = apply_lora(model, lora)
    model.train()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        cfg.schedule,
        optimizer,
        num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start_step = 0
    if (ckpt := latest_checkpoint(checkpoint_dir)) is not None:
        state = load_checkpoint(accelerator, ckpt)
        if (state.get("total_steps"), state.get("seed")) != (total_steps, seed):
            raise ValueError(
                f"checkpoint {ckpt} was written for total_steps={state.get('total_steps')}, "
                f"seed={state.get('seed')}; this run has {total_steps}, {seed}. "
                "Delete the checkpoint directory to start over."
            )
        start_step = state["step"]
        log({"resumed_from_step": float(start_step)}, start_step)

    loss_value, input_tokens, trained_tokens = float("nan"), 0, 0
    started = time.perf_counter()
    for step in range(start_step, total_steps):
        micro = [
            collate(rows_, tokenizer.pad_token_id) for rows_ in micro_batches_of_step(plan, cfg, seed, step)
        ]
        step_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        loss_sum = 0.0
        for batch in micro:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            loss = token_loss_sum(model, batch, cfg.packing) / max(step_tokens, 1)
            accelerator.backward(loss)
            loss_sum += loss.item()
            input_tokens += int(batch["attention_mask"].sum())
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value, trained_tokens = loss_sum, trained_tokens + step_tokens

        done = step + 1
        if done % cfg.log_every == 0 or done == total_steps:
            metrics = {
                "train/loss": loss_value,
                "train/lr": scheduler.get_last_lr()[0],
                "train/epoch": done / steps_per_epoch,
                "train/tokens_per_second": input_tokens / max(time.perf_counter() - started, 1e-9),
            }
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            log(metrics, done)
        if done % cfg.checkpoint_every == 0 and done < total_steps:
            save_checkpoint(accelerator, checkpoint_dir, done, {"total_steps": total_steps, "seed": seed})

    trained = accelerator.unwrap_model(model)
    if lora is not None:
        # peft froze every base weight; once merged, the model is a plain model again and trains like one.
        trained = trained.merge_and_unload().requires_grad_(True)
    trained.eval()
    result = SFTResult(
        steps=total_steps,
        resumed_from_step=start_step,
        final_loss=loss_value,
        trained_tokens=trained_tokens,
        input_tokens=input_tokens,
        seconds=time.perf_counter() - started,
        **stats,
    )
    return trained, result
