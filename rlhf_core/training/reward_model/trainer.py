"""Reward-model training (book ch.5): Bradley-Terry (or Plackett-Luce) loss on a scalar head over the
policy's backbone.

The model comes from :func:`rlhf_core.modeling.reward_model.build_reward_model` (zero score head, so
the loss is ln 2 at initialisation); held-out evaluation is
:func:`rlhf_core.evaluation.reward_model.evaluate_reward_model`, with the same loss estimator.

Batching follows InstructGPT: a training row is one prompt with all of its preference pairs, so the
pairs of a prompt always share a batch and each prompt weighs the same (1/C(K,2) per pair). Within an
optimizer step, prompts are split into micro-batches by length (the step's loss does not depend on
the split). By default the distinct completions of a prompt are scored in one row that holds the
prompt once (:mod:`rlhf_core.modeling.shared_prefix`): the same rewards and gradients as one row per
sequence, with each prompt processed once instead of twice per pair.

With ``loss="plackett_luce"`` a prompt's pairs become one ranking of its distinct completions
(:mod:`rlhf_core.training.reward_model.listwise`), checked before training starts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.evaluation.reward_model import heldout_evaluation
from rlhf_core.evaluation.reward_model_breakdown import ReliabilityBin
from rlhf_core.losses.reward_model import bradley_terry_loss, pairwise_accuracy, plackett_luce_loss
from rlhf_core.modeling.models import load_tokenizer
from rlhf_core.modeling.preference_tokens import OverlongPairError, PromptPairs, group_pairs
from rlhf_core.modeling.reward_model import build_reward_model
from rlhf_core.rewards.reward_model_scoring import pair_rewards
from rlhf_core.spec import RewardTrainSpec
from rlhf_core.spec.stages.reward_model import RewardEvalSpec, RewardLoss
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
from rlhf_core.training.reward_model.listwise import prompt_ranking, ranked_rewards

HEADLINE_HELDOUT = ("eval/accuracy", "eval/margin_mean", "eval/loss", "eval/calibration_ece")


@dataclass(kw_only=True)
class RewardModelResult(TrainingResult):
    prompts: int
    pairs: int
    skipped_pairs: int
    heldout: dict[str, float] = field(default_factory=dict)  # heldout_evaluation on held-out rows
    reliability: list[ReliabilityBin] = field(default_factory=list)  # its calibration bins

    def summary(self) -> dict[str, float]:
        """Headline numbers: final train loss, steps, skipped pairs, held-out loss/accuracy/margin."""
        shown = {
            "final_train_loss": self.final_loss,
            "steps": float(self.steps),
            "skipped_pairs": float(self.skipped_pairs),
        }
        held = {k.replace("eval/", "heldout_"): v for k, v in self.heldout.items() if k in HEADLINE_HELDOUT}
        return shown | held


class RewardModelSettings(Protocol):
    """What the ``reward_model`` stage's work reads of the stage (the spec's ``RewardModelStage`` is one)."""

    @property
    def train(self) -> RewardTrainSpec: ...

    @property
    def loss(self) -> RewardLoss: ...

    @property
    def evaluation(self) -> RewardEvalSpec: ...


@dataclass(frozen=True)
class RewardModelInputs:
    """The ``reward_model`` stage's resolved inputs: the policy whose backbone the reward model starts
    from, and the preference rows of the train and (when the data has one) eval splits."""

    policy_dir: str  # a local directory or a hub name
    revision: str | None
    train_rows: list[dict]
    eval_rows: list[dict] | None = None  # None: no held-out evaluation
    data_name: str = "preferences"  # the preference data as the pipeline names it, for errors


def fit_reward_model(
    stage: RewardModelSettings, inputs: RewardModelInputs, env: StageEnvironment
) -> RewardModelResult:
    """The ``reward_model`` stage's work: a reward model on the policy at ``inputs.policy_dir``, trained
    on the train rows and, when given, evaluated on the eval rows (``result.heldout``, with the
    breakdowns of ``stage.evaluation`` and the calibration bins in ``result.reliability``).

    The policy's weights load once (into the classifier); its tokenizer may gain a pad token
    (``build_reward_model``) and comes back in the result, to be saved with the model.
    """
    tokenizer = load_tokenizer(inputs.policy_dir, revision=inputs.revision)
    model = build_reward_model(inputs.policy_dir, tokenizer, revision=inputs.revision)
    trained, result = train_reward_model(
        model, tokenizer, inputs.train_rows, stage.train, seed=env.seed, checkpoint_dir=env.checkpoint_dir,
        source=f"stage '{env.stage}' ({inputs.data_name} train split)", log=env.log, loss_name=stage.loss,
    )  # fmt: skip
    if inputs.eval_rows is not None:
        heldout = heldout_evaluation(
            trained, tokenizer, inputs.eval_rows, stage.train, evaluation=stage.evaluation,
            source=f"{inputs.data_name} eval split",
        )  # fmt: skip
        result.heldout, result.reliability = heldout.metrics, heldout.reliability
    result.model, result.tokenizer = trained, tokenizer
    return result


def pairs_loss(
    model: PreTrainedModel,
    groups: list[PromptPairs],
    pad_token_id: int,
    device: torch.device,
    shared_prefix: bool = True,
    loss_name: RewardLoss = "bradley_terry",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss over the prompts in ``groups`` (all their completions scored in one forward pass): BT
    over their pairs, or Plackett-Luce over each prompt's ranking."""
    r_c, r_r, processed = pair_rewards(model, groups, pad_token_id, device, shared_prefix)
    if loss_name == "plackett_luce":
        loss = plackett_luce_loss(*ranked_rewards(r_c, r_r, [prompt_ranking(g) for g in groups]))
    else:
        prompt_ids = torch.tensor([i for i, g in enumerate(groups) for _ in g.chosen], device=device)
        margin = torch.tensor([m for g in groups for m in g.margins], device=device, dtype=r_c.dtype)
        loss = bradley_terry_loss(r_c, r_r, margin=margin, prompt_ids=prompt_ids)
    return loss, {
        "accuracy": float(pairwise_accuracy(r_c, r_r)),
        "margin": float((r_c - r_r).detach().mean()),
        # tokens of the pairs as sequences (what one-row-per-sequence batching would feed the model)
        TOKENS: float(sum(len(s) for g in groups for s in g.chosen + g.rejected)),
        "processed_tokens": float(processed),
    }


def train_reward_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    cfg: RewardTrainSpec,
    *,
    seed: int,
    checkpoint_dir: Path,
    source: str = "preferences",
    log: LogFn | None = None,
    loss_name: RewardLoss = "bradley_terry",
) -> tuple[PreTrainedModel, RewardModelResult]:
    """Train ``model`` (from ``build_reward_model``) on preference rows (prompt, chosen, rejected) with
    the Bradley-Terry or the Plackett-Luce loss."""
    torch.manual_seed(seed)
    groups, skipped = group_pairs(
        records, tokenizer, max_length=cfg.max_length, on_overlong=cfg.on_overlong,
        margin_column=cfg.margin_column, source=source,
    )  # fmt: skip
    if not groups:
        raise OverlongPairError(f"{source}: no preference pair fits in max_length {cfg.max_length}")
    if loss_name == "plackett_luce":
        for group in groups:  # every prompt's pairs give one order, or training does not start
            prompt_ranking(group, source)
    random.Random(seed).shuffle(groups)
    steps_per_epoch, total_steps = plan_steps(len(groups), cfg)

    longest = [max(len(s) for s in g.chosen + g.rejected) for g in groups]

    def step_fn(step: int, ctx: StepContext) -> dict[str, float]:
        # The step's loss is the mean over all its prompts, however they are split into micro-batches,
        # so the step's prompts are regrouped by length: similar lengths share a micro-batch (less
        # padding), and the gradient is the same.
        step_rows = rows_of_step(len(groups), cfg, seed, step, steps_per_epoch)
        ids = sorted((i for part in step_rows for i in part), key=lambda i: longest[i])
        micro = [[groups[i] for i in ids[j : j + cfg.batch_size]] for j in range(0, len(ids), cfg.batch_size)]
        n_step = len(ids)
        totals = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, TOKENS: 0.0, "processed_tokens": 0.0}
        # all of them, or this rank's share (weights use the whole step); sharded: plus zero-weighted repeats
        for part, counts in ctx.share(micro):
            loss, stats = ctx.forward(
                pairs_loss, model, part, tokenizer.pad_token_id, ctx.device, cfg.shared_prefix, loss_name
            )
            weight = len(part) / n_step  # each prompt weighs the same across micro-batches
            if not counts:
                ctx.backward(loss * 0.0)
                continue
            ctx.backward(loss * weight)
            totals["loss"] += loss.item() * weight
            totals["accuracy"] += stats["accuracy"] * weight
            totals["margin"] += stats["margin"] * weight
            totals[TOKENS] += stats[TOKENS]
            totals["processed_tokens"] += stats["processed_tokens"]
        return totals

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
    trained.eval()
    result = RewardModelResult(
        steps=total_steps,
        resumed_from_step=loop.resumed_from_step,
        final_loss=loop.last_metrics.get("loss", float("nan")),
        prompts=len(groups),
        pairs=sum(len(g.chosen) for g in groups),
        skipped_pairs=skipped,
        seconds=loop.seconds,
        input_tokens=loop.tokens,
    )
    return trained, result
