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

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.losses.language_model import next_token_nll_sum
from rlhf_core.modeling.sft_tokens import (
    IGNORE_INDEX,
    Row,
    collate,
    pack_examples,
    tokenize_sft_row,
    unpacked_rows,
)
from rlhf_core.spec import LoraSpec, SFTTrainSpec
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.training.engine.loop import (
    TOKENS,
    LogFn,
    StepContext,
    plan_steps,
    rows_of_step,
    run_optimizer_steps,
)
from rlhf_core.training.engine.lora import apply_lora
from rlhf_core.training.engine.result import TrainingResult


@dataclass(kw_only=True)
class SFTResult(TrainingResult):
    examples: int
    truncated_examples: int
    examples_without_labels: int
    trained_tokens: int

    def summary(self) -> dict[str, float]:
        """The figures shown in the pipeline summary."""
        shown = {
            "final_train_loss": self.final_loss,
            "steps": float(self.steps),
            "tokens_per_second": self.tokens_per_second,
        }
        if self.resumed_from_step:
            shown["resumed_from_step"] = float(self.resumed_from_step)
        return shown


@dataclass
class _Plan:
    rows: list[Row]
    steps_per_epoch: int
    total_steps: int


def build_rows(
    records: list[dict], tokenizer: PreTrainedTokenizerBase, cfg: SFTTrainSpec, seed: int
) -> tuple[list[Row], dict[str, int]]:
    """Tokenize, mask and (optionally) pack the training conversations."""
    examples = [tokenize_sft_row(r, tokenizer, cfg.max_length, cfg.mask) for r in records]
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


def micro_batches_of_step(plan: _Plan, cfg: SFTTrainSpec, seed: int, step: int) -> list[list[Row]]:
    """The micro-batches of global optimizer step ``step`` (0-based).

    Without packing, the step's rows are split into micro-batches by length, so each micro-batch pads
    to a similar length. The step's loss (summed over all its trained tokens, divided by their count)
    and so its update do not depend on the split. Packed rows are all about ``max_length`` long and
    keep their shuffled order.
    """
    groups = rows_of_step(len(plan.rows), cfg, seed, step, plan.steps_per_epoch)
    if not cfg.packing:
        ids = sorted((i for group in groups for i in group), key=lambda i: len(plan.rows[i].input_ids))
        groups = [ids[j : j + cfg.batch_size] for j in range(0, len(ids), cfg.batch_size)]
    return [[plan.rows[i] for i in group] for group in groups]


def token_loss_sum(model: PreTrainedModel, batch: dict[str, torch.Tensor], packed: bool) -> torch.Tensor:
    """Sum over trained tokens of -log pi(y_t | x, y_<t); labels are aligned with input positions.

    Packed rows go in without an attention mask and with the KV cache off: that is the only way
    transformers separates packed examples by their restarting ``position_ids``. The loss never builds
    the full (B, T, V) logits (``rlhf_core.losses.language_model``).
    """
    return next_token_nll_sum(
        model,
        batch["input_ids"],
        batch["labels"],
        position_ids=batch["position_ids"],
        attention_mask=None if packed else batch["attention_mask"],
    )


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
    """Fine-tune ``model`` on sft rows (``messages``, or ``prompt`` + ``completion``: the completion
    alone is trained); resumes from ``checkpoint_dir``.

    Returns the trained model (LoRA adapters merged in) and a summary.
    """
    torch.manual_seed(seed)
    rows, stats = build_rows(records, tokenizer, cfg, seed)
    steps_per_epoch, total_steps = plan_steps(len(rows), cfg)
    plan = _Plan(rows, steps_per_epoch, total_steps)

    if lora is not None:
        model = apply_lora(model, lora)

    trained_tokens = 0  # label tokens trained by this process (after a resume: since the resume)

    def step_fn(step: int, ctx: StepContext) -> dict[str, float]:
        nonlocal trained_tokens
        micro = [
            collate(rows_, tokenizer.pad_token_id) for rows_ in micro_batches_of_step(plan, cfg, seed, step)
        ]
        step_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        loss_sum, real_tokens = 0.0, 0
        # all of them, or this rank's share; normalised by the whole step (sharded: plus zero-weighted
        # repeats, so every rank runs as many passes)
        for batch, counts in ctx.share(micro):
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            loss = ctx.forward(token_loss_sum, model, batch, cfg.packing) / max(step_tokens, 1)
            if not counts:
                ctx.backward(loss * 0.0)
                continue
            ctx.backward(loss)
            loss_sum += loss.item()
            real_tokens += int(batch["attention_mask"].sum())
        trained_tokens += step_tokens
        return {"loss": loss_sum, TOKENS: float(real_tokens)}

    trained, loop = run_optimizer_steps(
        model,
        cfg,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        step_fn=step_fn,
        log=log,
    )
    if lora is not None:
        # peft froze every base weight; once merged, the model is a plain model again and trains like one.
        trained = trained.merge_and_unload().requires_grad_(True)
    trained.eval()
    result = SFTResult(
        steps=total_steps,
        resumed_from_step=loop.resumed_from_step,
        final_loss=loop.last_metrics.get("loss", float("nan")),
        trained_tokens=trained_tokens,
        input_tokens=loop.tokens,
        seconds=loop.seconds,
        **stats,
    )
    return trained, result


class SFTSettings(Protocol):
    """What the ``sft`` stage's work reads of the stage (the spec's ``SFTStage`` is one)."""

    @property
    def train(self) -> SFTTrainSpec: ...
    @property
    def lora(self) -> LoraSpec | None: ...  # None: all weights train


@dataclass(frozen=True)
class SFTInputs:
    """The ``sft`` stage's resolved inputs: the model to fine-tune and the rows of its train split."""

    model_dir: str  # a local directory or a hub name
    revision: str | None
    rows: list[dict]


def supervised_fine_tune(stage: SFTSettings, inputs: SFTInputs, env: StageEnvironment) -> SFTResult:
    """The ``sft`` stage's work: load the model at ``inputs.model_dir`` and fine-tune it on the rows;
    the result carries the trained model and its tokenizer."""
    from rlhf_core.modeling.models import load_model

    model, tokenizer = load_model(inputs.model_dir, revision=inputs.revision)
    trained, result = train_sft(
        model, tokenizer, inputs.rows, stage.train, seed=env.seed, checkpoint_dir=env.checkpoint_dir,
        lora=stage.lora, log=env.log,
    )  # fmt: skip
    result.model, result.tokenizer = trained, tokenizer
    return result
