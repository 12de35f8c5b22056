"""Held-out evaluation of a reward model on preference rows (book ch.5).

The held-out loss is the training estimator itself (``bradley_terry_loss`` with the margin column and
the per-prompt 1/C(K,2) weights), so train and eval losses can be compared; pairwise accuracy and the
reward margin are per pair. With the stage's ``evaluation`` settings the same per-pair margins are
broken down by category, margin bucket, calibration and verifier agreement
(:mod:`rlhf_core.evaluation.reward_model_breakdown`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.evaluation.reward_model_breakdown import (
    ReliabilityBin,
    breakdown_metrics,
    expected_calibration_error,
    reliability_bins,
)
from rlhf_core.losses.reward_model import bradley_terry_loss
from rlhf_core.modeling.modes import eval_mode
from rlhf_core.modeling.preference_tokens import group_pairs
from rlhf_core.rewards.reward_model_scoring import pair_rewards
from rlhf_core.spec import RewardTrainSpec
from rlhf_core.spec.stages.reward_model import RewardEvalSpec


@dataclass
class HeldoutEvaluation:
    """The held-out figures (``eval/...``) and the reliability bins of the calibration plot."""

    metrics: dict[str, float]
    reliability: list[ReliabilityBin] = field(default_factory=list)


def evaluate_reward_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    cfg: RewardTrainSpec,
    batch_size: int = 32,
    evaluation: RewardEvalSpec | None = None,
) -> dict[str, float]:
    """The figures of :func:`heldout_evaluation`."""
    return heldout_evaluation(model, tokenizer, records, cfg, batch_size, evaluation).metrics


@torch.no_grad()
def heldout_evaluation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    cfg: RewardTrainSpec,
    batch_size: int = 32,
    evaluation: RewardEvalSpec | None = None,
    source: str = "eval split",
) -> HeldoutEvaluation:
    """Held-out BT loss, pairwise accuracy, mean margin and reward mean/std on preference rows, and the
    breakdowns ``evaluation`` asks for (calibration always: its ECE and bins).

    Pairs longer than ``cfg.max_length`` are skipped and counted (with none left, only the counts are
    returned). ``batch_size`` counts prompts per forward pass; ``source`` names the rows in errors.
    """
    device = next(model.parameters()).device
    groups, skipped = group_pairs(
        records, tokenizer, max_length=cfg.max_length, on_overlong="skip", margin_column=cfg.margin_column,
        source=source,
    )  # fmt: skip
    chosen, rejected = [], []
    with eval_mode(model):
        for start in range(0, len(groups), batch_size):
            part = groups[start : start + batch_size]
            r_c, r_r, _ = pair_rewards(model, part, tokenizer.pad_token_id, device, cfg.shared_prefix)
            chosen.append(r_c.float().cpu())
            rejected.append(r_r.float().cpu())
    if not groups:
        return HeldoutEvaluation({"eval/pairs": 0.0, "eval/skipped_pairs": float(skipped)})
    r_c, r_r = torch.cat(chosen), torch.cat(rejected)  # (P,) each, pairs in group order
    margin = torch.tensor([m for g in groups for m in g.margins], dtype=r_c.dtype)  # the margin column
    prompt_ids = torch.tensor([i for i, g in enumerate(groups) for _ in g.chosen])
    differences = [c - r for c, r in zip(r_c.tolist(), r_r.tolist(), strict=True)]
    every = r_c.tolist() + r_r.tolist()
    metrics = {
        "eval/loss": float(bradley_terry_loss(r_c, r_r, margin=margin, prompt_ids=prompt_ids)),
        "eval/accuracy": statistics.fmean(1.0 if d > 0 else 0.0 for d in differences),
        "eval/margin_mean": statistics.fmean(differences),
        "eval/reward_mean": statistics.fmean(every),
        "eval/reward_std": statistics.pstdev(every),
        "eval/pairs": float(len(differences)),
        "eval/skipped_pairs": float(skipped),
    }
    row_ids = [i for g in groups for i in g.rows]  # the row of each pair, in pair order
    bins = reliability_bins(differences, (evaluation or RewardEvalSpec()).calibration_bins)
    metrics["eval/calibration_ece"] = expected_calibration_error(bins)
    if evaluation is not None:
        rows = [records[i] for i in row_ids]
        metrics |= breakdown_metrics(differences, rows, evaluation, row_ids=row_ids, source=source)
    return HeldoutEvaluation(metrics, bins)
