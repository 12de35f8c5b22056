"""Reward-model training (book ch.5): a scalar head on the policy's backbone, Bradley-Terry loss.

Architecture: ``AutoModelForSequenceClassification`` with one label on the policy checkpoint; the
score is read at the last non-padding token, which is the end-of-turn token ``<|im_end|>`` because
every (prompt, completion) is rendered with the chat template and trailing whitespace is stripped.
The score head starts at zero, so every reward is 0 and the loss is exactly ln 2 at initialisation.

Batching follows InstructGPT: a training row is one prompt with all of its preference pairs, so the
pairs of a prompt always share a batch and each prompt weighs the same (1/C(K,2) per pair). Within an
optimizer step, prompts are split into micro-batches by length (the step's loss does not depend on
the split). By default
the distinct completions of a prompt are scored in one row that holds the prompt once
(:mod:`rlhf_core.modeling.shared_prefix`): the same rewards and gradients as one row per sequence,
with each prompt processed once instead of twice per pair.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.losses.reward_model import bradley_terry_loss
from rlhf_core.modeling.preference_tokens import PromptPairs, encode_completion
from rlhf_core.rewards.reward_model_scoring import pair_rewards
from rlhf_core.spec import RewardTrainSpec
from rlhf_core.training.loop import TOKENS, BackwardFn, LogFn, plan_steps, rows_of_step, run_optimizer_steps

REWARD_PAD_TOKEN = "<|reward_pad|>"  # added when a policy tokenizer pads with its EOS


class OverlongPairError(ValueError):
    """A preference pair does not fit in ``max_length`` tokens."""


@dataclass
class RewardModelResult:
    steps: int
    resumed_from_step: int
    final_loss: float
    prompts: int
    pairs: int
    skipped_pairs: int
    seconds: float
    input_tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.input_tokens / self.seconds if self.seconds > 0 else 0.0


def build_reward_model(
    source: str | Path, tokenizer: PreTrainedTokenizerBase | None = None, revision: str | None = None
) -> PreTrainedModel:
    """A one-label sequence classifier on the backbone at ``source``, with a zero score head.

    With the policy's ``tokenizer``: a tokenizer whose pad token is its EOS (or missing) gets its own
    pad token, added to ``tokenizer`` in place. Transformers' classifier reads the reward at the last
    token that is not padding, so with pad == EOS it would skip the end-of-turn token the reward is
    trained at, and anyone loading the saved model with plain ``from_pretrained`` would get other
    rewards. Then the embeddings grow to the tokenizer's vocabulary (also for a hub model whose
    tokenizer gained chat tokens) and ``pad_token_id`` is set in the config.
    """
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, dtype=torch.float32, revision=revision
    )
    if tokenizer is not None:
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            tokenizer.add_special_tokens({"pad_token": REWARD_PAD_TOKEN})
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    head = model.score if hasattr(model, "score") else model.get_output_embeddings()
    torch.nn.init.zeros_(head.weight)
    if getattr(head, "bias", None) is not None:
        torch.nn.init.zeros_(head.bias)
    return model


def group_pairs(
    records: list[dict], tokenizer: PreTrainedTokenizerBase, cfg: RewardTrainSpec, source: str
) -> tuple[list[PromptPairs], int]:
    """Tokenize preference rows and group them by prompt; returns (groups, skipped overlong pairs)."""
    groups: dict[str, PromptPairs] = {}
    skipped = 0
    for i, row in enumerate(records):
        chosen = encode_completion(tokenizer, row["prompt"], row["chosen"])
        rejected = encode_completion(tokenizer, row["prompt"], row["rejected"])
        if max(len(chosen), len(rejected)) > cfg.max_length:
            if cfg.on_overlong == "fail":
                longest = max(len(chosen), len(rejected))
                raise OverlongPairError(
                    f"in {source}, row {i} (0-based): prompt + completion is {longest} tokens, longer than "
                    f"max_length {cfg.max_length}; raise max_length or set on_overlong: skip"
                )
            skipped += 1
            continue
        group = groups.setdefault(row["prompt"], PromptPairs())
        group.chosen.append(chosen)
        group.rejected.append(rejected)
        group.margins.append(float(row.get(cfg.margin_column, 0.0)) if cfg.margin_column else 0.0)
    return list(groups.values()), skipped


def pairs_loss(
    model: PreTrainedModel,
    groups: list[PromptPairs],
    pad_token_id: int,
    device: torch.device,
    shared_prefix: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """BT loss over the prompts in ``groups`` (all their completions scored in one forward pass)."""
    r_c, r_r, processed = pair_rewards(model, groups, pad_token_id, device, shared_prefix)
    prompt_ids = torch.tensor([i for i, g in enumerate(groups) for _ in g.chosen], device=device)
    margin = torch.tensor([m for g in groups for m in g.margins], device=device, dtype=r_c.dtype)
    loss = bradley_terry_loss(r_c, r_r, margin=margin, prompt_ids=prompt_ids)
    return loss, {
        "accuracy": float((r_c > r_r).float().mean()),
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
) -> tuple[PreTrainedModel, RewardModelResult]:
    """Train ``model`` (from ``build_reward_model``) on preference rows (prompt, chosen, rejected)."""
    torch.manual_seed(seed)
    groups, skipped = group_pairs(records, tokenizer, cfg, source)
    if not groups:
        raise ValueError(f"{source}: no preference pair fits in max_length {cfg.max_length}")
    random.Random(seed).shuffle(groups)
    steps_per_epoch, total_steps = plan_steps(len(groups), cfg)

    longest = [max(len(s) for s in g.chosen + g.rejected) for g in groups]

    def step_fn(step: int, backward: BackwardFn, device: torch.device) -> dict[str, float]:
        # The step's loss is the mean over all its prompts, however they are split into micro-batches,
        # so the step's prompts are regrouped by length: similar lengths share a micro-batch (less
        # padding), and the gradient is the same.
        step_rows = rows_of_step(len(groups), cfg, seed, step, steps_per_epoch)
        ids = sorted((i for part in step_rows for i in part), key=lambda i: longest[i])
        micro = [[groups[i] for i in ids[j : j + cfg.batch_size]] for j in range(0, len(ids), cfg.batch_size)]
        n_step = len(ids)
        totals = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, TOKENS: 0.0, "processed_tokens": 0.0}
        for part in micro:
            loss, stats = pairs_loss(model, part, tokenizer.pad_token_id, device, cfg.shared_prefix)
            weight = len(part) / n_step  # each prompt weighs the same across micro-batches
            backward(loss * weight)
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


@torch.no_grad()
def evaluate_reward_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    cfg: RewardTrainSpec,
    batch_size: int = 32,
) -> dict[str, float]:
    """Held-out BT loss, pairwise accuracy, mean margin and reward mean/std on preference rows."""
    model.eval()
    device = next(model.parameters()).device
    groups, skipped = group_pairs(records, tokenizer, cfg.model_copy(update={"on_overlong": "skip"}), "eval")
    chosen_scores: list[float] = []
    rejected_scores: list[float] = []
    for start in range(0, len(groups), batch_size):
        part = groups[start : start + batch_size]
        r_c, r_r, _ = pair_rewards(model, part, tokenizer.pad_token_id, device, cfg.shared_prefix)
        chosen_scores += r_c.float().cpu().tolist()
        rejected_scores += r_r.float().cpu().tolist()
    margins = [c - r for c, r in zip(chosen_scores, rejected_scores, strict=True)]
    every = chosen_scores + rejected_scores
    return {
        "eval/loss": statistics.fmean(math.log1p(math.exp(-m)) if m > -30 else -m for m in margins),
        "eval/accuracy": statistics.fmean(1.0 if m > 0 else 0.0 for m in margins),
        "eval/margin_mean": statistics.fmean(margins),
        "eval/reward_mean": statistics.fmean(every),
        "eval/reward_std": statistics.pstdev(every),
        "eval/pairs": float(len(margins)),
        "eval/skipped_pairs": float(skipped),
    }
