"""Offline token-level knowledge distillation (book ch.12): the student reads the data's completions with
teacher forcing, and at every completion token its next-token distribution is pulled toward the
frozen teacher's by the stage's divergence (``rlhf_core.losses.distillation``), optionally plus the
usual NLL of the completion tokens:

    L = sum_{i,t} m_{i,t} [D(pi_T(.|x, y_<t) , pi_theta(.|x, y_<t)) + w_sft (-log pi_theta(y_t|x, y_<t))]
        / sum_{i,t} m_{i,t}

with m_{i,t} = 1 on trained (assistant) tokens. Rows are tokenized, masked, packed and batched exactly as
the sft stage does (``rlhf_core.training.sft.trainer``), so a step's batches are a pure function of
(seed, step) and resume after a kill is exact through the shared loop
(``rlhf_core.training.engine.loop.run_optimizer_steps``). As in SFT, a step's loss is the sum over
all its trained tokens divided by their count, whatever the micro-batch split.

The teacher runs on the same device, in eval mode and without gradients, on the same batch; with
``top_k`` only its k likeliest tokens' log-probs per position are kept after its forward pass. Both
models' full (B, T, V) logits exist for one micro-batch at a time; a vocabulary padded differently in the
two heads is cut to the shorter (ids past the tokenizer's length never occur in the data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.losses.distillation import (
    Divergence,
    TeacherTopK,
    teacher_top_k,
    token_divergence,
    top_k_token_divergence,
)
from rlhf_core.losses.masking import masked_sum
from rlhf_core.modeling.modes import eval_mode
from rlhf_core.modeling.sft_tokens import IGNORE_INDEX, Row, collate, tokenize_sft_row, unpacked_rows
from rlhf_core.modeling.shared_tokenizer import check_shared_tokenizer
from rlhf_core.spec import LoraSpec
from rlhf_core.spec.stages.distillation import DistillTrainSpec
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.training.engine.loop import TOKENS, LogFn, StepContext, plan_steps, run_optimizer_steps
from rlhf_core.training.engine.lora import apply_lora
from rlhf_core.training.engine.result import TrainingResult
from rlhf_core.training.sft.trainer import build_rows, micro_batches_of_step


class DistillSettings(Protocol):
    """What the distillation reads of the stage (the spec's ``DistillStage``, resolved, is one)."""

    @property
    def loss(self) -> Divergence: ...
    @property
    def beta(self) -> float | None: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_k(self) -> int | None: ...  # None: the full vocabulary
    @property
    def sft_weight(self) -> float: ...
    @property
    def train(self) -> DistillTrainSpec: ...
    @property
    def lora(self) -> LoraSpec | None: ...


@dataclass(kw_only=True)
class DistillResult(TrainingResult):
    examples: int
    truncated_examples: int
    examples_without_labels: int
    trained_tokens: int
    heldout: dict[str, float] = field(default_factory=dict)  # eval/divergence_before, eval/divergence_after

    def summary(self) -> dict[str, float]:
        shown = {**super().summary(), "tokens_per_second": self.tokens_per_second}
        return shown | {k.replace("/", "_"): v for k, v in self.heldout.items()}


class _Plan(NamedTuple):
    rows: list[Row]
    steps_per_epoch: int


def _logits(model: PreTrainedModel, batch: dict[str, torch.Tensor], packed: bool, vocab: int) -> torch.Tensor:
    """(B, T-1, vocab) logits predicting tokens 1..T-1. Packed rows go in without an attention mask (their
    restarting position_ids separate the examples, as in the sft trainer)."""
    out = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=None if packed else batch["attention_mask"],
        use_cache=False,
    )
    return out.logits[:, :-1, :vocab]


@torch.no_grad()
def teacher_targets(
    teacher: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    packed: bool,
    vocab: int,
    settings: DistillSettings,
) -> torch.Tensor | TeacherTopK:
    """The teacher's side of one micro-batch: its (B, T-1, V) logits, or only their top-k."""
    logits = _logits(teacher, batch, packed, vocab)
    if settings.top_k is None:
        return logits
    return teacher_top_k(logits, settings.top_k, settings.temperature)


def loss_sums(
    student: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    teacher: torch.Tensor | TeacherTopK,
    packed: bool,
    vocab: int,
    settings: DistillSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted total, divergence sum, NLL sum) over the micro-batch's trained tokens."""
    logits = _logits(student, batch, packed, vocab)  # (B, T-1, V)
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX  # (B, T-1)
    options = {"divergence": settings.loss, "beta": settings.beta, "temperature": settings.temperature}
    if isinstance(teacher, TeacherTopK):
        per_token = top_k_token_divergence(logits, teacher, mask, **options)
    else:
        per_token = token_divergence(logits, teacher, mask, **options)
    divergence = masked_sum(per_token, mask)
    nll = torch.zeros((), device=logits.device)
    if settings.sft_weight > 0:
        nll = F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")
    return divergence + settings.sft_weight * nll, divergence, nll


def shared_vocabulary(student: PreTrainedModel, teacher: PreTrainedModel) -> int:
    """Logit columns both heads have (heads padded past the tokenizer differ only in unused ids)."""
    return min(
        student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    )


@torch.no_grad()
def mean_token_divergence(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    cfg: DistillTrainSpec,
    settings: DistillSettings,
) -> float:
    """The student's mean per-token divergence to the teacher over the completion tokens of ``records``
    (the stage's divergence, temperature and top-k; no NLL); nan when no row has a trained token."""
    examples = [tokenize_sft_row(r, tokenizer, cfg.max_length, cfg.mask) for r in records]
    rows = unpacked_rows([ex for ex in examples if ex.n_label_tokens > 0])
    device, vocab = next(student.parameters()).device, shared_vocabulary(student, teacher)
    total, tokens = 0.0, 0
    with eval_mode(student), eval_mode(teacher):
        for start in range(0, len(rows), cfg.batch_size):
            batch = collate(rows[start : start + cfg.batch_size], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            target = teacher_targets(teacher, batch, False, vocab, settings)
            _, divergence, _ = loss_sums(student, batch, target, False, vocab, settings)
            total += divergence.item()
            tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total / tokens if tokens else float("nan")


def train_distill(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    settings: DistillSettings,
    *,
    seed: int,
    checkpoint_dir: Path,
    log: LogFn | None = None,
) -> tuple[PreTrainedModel, DistillResult]:
    """Distil ``teacher`` into ``student`` on sft rows (``messages``, or ``prompt`` + ``completion``);
    resumes from ``checkpoint_dir``. Returns the trained student (LoRA merged in) and a summary."""
    cfg = settings.train
    torch.manual_seed(seed)
    rows, stats = build_rows(records, tokenizer, cfg, seed)
    steps_per_epoch, total_steps = plan_steps(len(rows), cfg)
    plan = _Plan(rows, steps_per_epoch)
    vocab = shared_vocabulary(student, teacher)
    teacher.eval().requires_grad_(False)
    model = apply_lora(student, settings.lora) if settings.lora is not None else student
    trained_tokens = 0

    def step_fn(step: int, ctx: StepContext) -> dict[str, float]:
        nonlocal trained_tokens
        teacher.to(ctx.device)  # a no-op after the first step
        micro = [collate(r, tokenizer.pad_token_id) for r in micro_batches_of_step(plan, cfg, seed, step)]
        step_tokens = max(1, sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro))
        sums = {"loss": 0.0, "divergence": 0.0, "nll": 0.0}
        real_tokens = 0
        for batch, counts in ctx.share(micro):
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            target = teacher_targets(teacher, batch, cfg.packing, vocab, settings)
            total, divergence, nll = ctx.forward(
                loss_sums, model, batch, target, cfg.packing, vocab, settings
            )
            ctx.backward(total / step_tokens * (1.0 if counts else 0.0))
            if counts:
                for name, value in (("loss", total), ("divergence", divergence), ("nll", nll)):
                    sums[name] += value.item() / step_tokens
                real_tokens += int(batch["attention_mask"].sum())
        trained_tokens += step_tokens
        if settings.sft_weight == 0:
            del sums["nll"]
        return {**sums, TOKENS: float(real_tokens)}

    trained, loop = run_optimizer_steps(
        model, cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch, seed=seed,
        checkpoint_dir=checkpoint_dir, step_fn=step_fn, log=log,
    )  # fmt: skip
    if settings.lora is not None:
        trained = trained.merge_and_unload().requires_grad_(True)
    trained.eval()
    result = DistillResult(
        steps=total_steps, resumed_from_step=loop.resumed_from_step,
        final_loss=loop.last_metrics.get("loss", float("nan")), trained_tokens=trained_tokens,
        input_tokens=loop.tokens, seconds=loop.seconds, **stats,
    )  # fmt: skip
    return trained, result


@dataclass(frozen=True)
class DistillInputs:
    """The ``distill`` stage's resolved inputs: both models (local directories or hub names, and the
    names the spec gives them, for errors) and the data's train (and eval) rows."""

    student_dir: str
    student_revision: str | None
    teacher_dir: str
    teacher_revision: str | None
    rows: list[dict]
    eval_rows: list[dict] | None = None
    student_name: str = "student"
    teacher_name: str = "teacher"


def distill_student(settings: DistillSettings, inputs: DistillInputs, env: StageEnvironment) -> DistillResult:
    """The ``distill`` stage's work: check that the two models share a tokenizer (before loading either
    model), load both, measure the held-out divergence, distil, measure again."""
    from rlhf_core.modeling.models import load_model, load_tokenizer

    check_shared_tokenizer(
        load_tokenizer(inputs.student_dir, revision=inputs.student_revision),
        load_tokenizer(inputs.teacher_dir, revision=inputs.teacher_revision),
        stage=env.stage, field="teacher", student_name=inputs.student_name, teacher_name=inputs.teacher_name,
    )  # fmt: skip
    student, tokenizer = load_model(inputs.student_dir, revision=inputs.student_revision)
    teacher, _ = load_model(inputs.teacher_dir, revision=inputs.teacher_revision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the loop will train
    student, teacher = student.to(device), teacher.to(device)
    heldout = (inputs.eval_rows or [])[: settings.train.eval_rows]
    before = (
        mean_token_divergence(student, teacher, tokenizer, heldout, settings.train, settings)
        if heldout
        else None
    )
    trained, result = train_distill(
        student, teacher, tokenizer, inputs.rows, settings, seed=env.seed, checkpoint_dir=env.checkpoint_dir,
        log=env.log,
    )  # fmt: skip
    if before is not None:
        teacher.to(next(trained.parameters()).device)
        after = mean_token_divergence(trained, teacher, tokenizer, heldout, settings.train, settings)
        result.heldout = {"eval/divergence_before": before, "eval/divergence_after": after}
    result.model, result.tokenizer = trained, tokenizer
    return result
