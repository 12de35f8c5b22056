"""Outcome and process reward-model training (book ch.5): a per-token head on the policy's backbone.

The model comes from :func:`rlhf_core.modeling.token_reward_model.build_token_reward_model` (zero
head: the loss is ln 2, or ln 3 for three classes, at initialisation); the losses are
:mod:`rlhf_core.losses.outcome_process_rewards`, picked by name
(:data:`rlhf_core.modeling.token_reward_examples.OBJECTIVES`); held-out
figures come from :mod:`rlhf_core.evaluation.token_reward_model`. Optimisation, checkpoints and resume
are the shared loop's (:func:`rlhf_core.training.engine.loop.run_optimizer_steps`).

A step's loss is the mean over its sequences (ORM) or over its labelled steps (PRM), however its rows
are split into micro-batches: each micro-batch's mean is weighted by its share of the step's units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from rlhf_core.errors import UserError
from rlhf_core.modeling.models import load_tokenizer
from rlhf_core.modeling.token_reward_examples import (
    PER_STEP,
    LabelledTokens,
    check_step_labels,
    collate,
    micro_batch_loss,
    outcome_examples,
    step_examples,
)
from rlhf_core.modeling.token_reward_model import build_token_reward_model
from rlhf_core.spec.stages.outcome_process_rewards import (
    OutcomeRewardModelStage,
    ProcessRewardModelStage,
    TokenRewardTrainSpec,
)
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.training.engine.loop import (
    TOKENS,
    LogFn,
    StepContext,
    plan_steps,
    rows_of_step,
    run_optimizer_steps,
)
from rlhf_core.training.engine.result import TrainingResult

HEADLINE_HELDOUT = ("eval/loss", "eval/top1_accuracy", "eval/pairwise_accuracy", "eval/step_accuracy")


@dataclass(kw_only=True)
class TokenRewardModelResult(TrainingResult):
    rows: int
    skipped_rows: int
    heldout: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Headline numbers: final train loss, steps, skipped rows and the main held-out figures."""
        shown = {"final_train_loss": self.final_loss, "steps": float(self.steps)}
        shown["skipped_rows"] = float(self.skipped_rows)
        held = {k.replace("eval/", "heldout_"): v for k, v in self.heldout.items() if k in HEADLINE_HELDOUT}
        return shown | held


@dataclass(frozen=True)
class TokenRewardInputs:
    """The stage's resolved inputs: the policy to start from, the train and (optional) eval rows."""

    policy_dir: str
    revision: str | None
    train_rows: list[dict]
    eval_rows: list[dict] | None = None
    data_name: str = "data"  # the data as the pipeline names it, for errors


def train_token_reward_model(
    model: PreTrainedModel,
    examples: list[LabelledTokens],
    cfg: TokenRewardTrainSpec,
    objective: str,
    *,
    pad_token_id: int,
    seed: int,
    checkpoint_dir: Path,
    log: LogFn | None = None,
) -> tuple[PreTrainedModel, TokenRewardModelResult]:
    """Train ``model`` on ``examples`` with the named objective (``OBJECTIVES``)."""
    torch.manual_seed(seed)
    units = [len(e.positions) if objective in PER_STEP else 1 for e in examples]
    steps_per_epoch, total_steps = plan_steps(len(examples), cfg)

    def step_fn(step: int, ctx: StepContext) -> dict[str, float]:
        micro = rows_of_step(len(examples), cfg, seed, step, steps_per_epoch)
        step_units = sum(units[i] for part in micro for i in part)
        totals = {"loss": 0.0, TOKENS: 0.0}
        for part, counts in ctx.share(micro):
            batch = collate([examples[i] for i in part], pad_token_id)
            loss, tokens = ctx.forward(micro_batch_loss, model, batch, objective, ctx.device)
            if not counts:  # a sharded run's zero-weighted repeat
                ctx.backward(loss * 0.0)
                continue
            weight = sum(units[i] for i in part) / step_units
            ctx.backward(loss * weight)
            totals["loss"] += loss.item() * weight
            totals[TOKENS] += tokens
        return totals

    trained, loop = run_optimizer_steps(
        model, cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch, seed=seed,
        checkpoint_dir=checkpoint_dir, step_fn=step_fn, log=log,
    )  # fmt: skip
    trained.eval()
    return trained, TokenRewardModelResult(
        steps=total_steps, resumed_from_step=loop.resumed_from_step,
        final_loss=loop.last_metrics.get("loss", float("nan")), rows=len(examples), skipped_rows=0,
        seconds=loop.seconds, input_tokens=loop.tokens,
    )  # fmt: skip


def fit_outcome_reward_model(
    stage: OutcomeRewardModelStage, inputs: TokenRewardInputs, env: StageEnvironment
) -> TokenRewardModelResult:
    """The ``outcome_reward_model`` stage's work: an ORM on the policy, trained on the outcome rows and,
    when given, evaluated on the eval rows (``result.heldout``)."""
    from rlhf_core.evaluation.token_reward_model import evaluate_outcome_model

    cfg, source = stage.train, f"stage '{env.stage}' ({inputs.data_name} train split)"
    tokenizer = load_tokenizer(inputs.policy_dir, revision=inputs.revision)
    examples, skipped = outcome_examples(
        inputs.train_rows, tokenizer, cfg.max_length, cfg.on_overlong, source
    )
    _check_some(examples, cfg, source)
    model = build_token_reward_model(
        inputs.policy_dir, kind="outcome", tokenizer=tokenizer, revision=inputs.revision
    )
    trained, result = train_token_reward_model(
        model, examples, cfg, stage.loss, pad_token_id=tokenizer.pad_token_id, seed=env.seed,
        checkpoint_dir=env.checkpoint_dir, log=env.log,
    )  # fmt: skip
    if inputs.eval_rows:
        result.heldout = evaluate_outcome_model(trained, tokenizer, inputs.eval_rows, stage.loss)
    result.skipped_rows, result.model, result.tokenizer = skipped, trained, tokenizer
    return result


def fit_process_reward_model(
    stage: ProcessRewardModelStage, inputs: TokenRewardInputs, env: StageEnvironment
) -> TokenRewardModelResult:
    """The ``process_reward_model`` stage's work: a PRM on the policy, trained on the step-label rows
    and, when given, evaluated on the eval rows (``result.heldout``)."""
    from rlhf_core.evaluation.token_reward_model import evaluate_process_model

    cfg, source = stage.train, f"stage '{env.stage}' ({inputs.data_name} train split)"
    tokenizer = load_tokenizer(inputs.policy_dir, revision=inputs.revision)
    examples, skipped = step_examples(
        inputs.train_rows, tokenizer, separator=stage.separator, max_steps=cfg.max_solution_steps,
        max_length=cfg.max_length, on_overlong=cfg.on_overlong, source=source,
    )  # fmt: skip
    _check_some(examples, cfg, source)
    check_step_labels(examples, stage.labels, source)
    model = build_token_reward_model(
        inputs.policy_dir, kind="process", tokenizer=tokenizer,
        num_labels=3 if stage.labels == "three_class" else 1, revision=inputs.revision,
        separator=stage.separator, step_labels=stage.labels,
    )  # fmt: skip
    trained, result = train_token_reward_model(
        model, examples, cfg, stage.labels, pad_token_id=tokenizer.pad_token_id, seed=env.seed,
        checkpoint_dir=env.checkpoint_dir, log=env.log,
    )  # fmt: skip
    if inputs.eval_rows:
        result.heldout = evaluate_process_model(trained, tokenizer, inputs.eval_rows, stage)
    result.skipped_rows, result.model, result.tokenizer = skipped, trained, tokenizer
    return result


def _check_some(examples: list[LabelledTokens], cfg: TokenRewardTrainSpec, source: str) -> None:
    if not examples:
        raise UserError(f"{source}: no row fits in max_length {cfg.max_length}")
