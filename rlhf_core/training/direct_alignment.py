"""Direct alignment (book ch.8): DPO and its family, trained against cached reference log-probs.

1. Pairs are tokenized as a sampled completion would follow its prompt (``tokenize_preference_rows``).
2. The reference model's log-probs log pi_ref(y|x) of every chosen and rejected completion are computed
   once, before training, and cached in a file keyed by the reference's digest, the data's digest and
   the tokenization settings (:func:`reference_logprobs_key`): training holds no reference model, and
   a second stage on the same pairs and reference (another beta, another loss) reuses the file.
   Reference-free losses (SimPO, ORPO) compute none.
3. Each optimizer step takes the step's pairs (a pure function of seed and step, so resume is exact),
   regroups them by length into micro-batches, and sends the chosen and the rejected sequences of a
   micro-batch through the policy in one forward pass; log-probs are summed over completion tokens
   only, the LM head never building the full (B, T, V) log-softmax (``sequence_logprobs``).
4. The loss is the stage's entry of ``DIRECT_ALIGNMENT_LOSSES``; logged per step: loss, implicit reward
   accuracy and margin, chosen/rejected rewards and policy log-probs. The book's displacement (both
   log-probs fall, the rejected more, while the margin widens) shows in those curves.

KTO trains on unpaired examples: here each pair gives a desirable (chosen) and an undesirable
(rejected) example, and the KL reference point z_0 comes from mismatched pairs (x_i, y_{i+1}) of the
step, whose reference log-probs are cached with the rest.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.errors import UserError
from rlhf_core.fingerprint import stage_fingerprint
from rlhf_core.losses.direct_alignment import DIRECT_ALIGNMENT_LOSSES, LossSpec
from rlhf_core.losses.language_model import IGNORE_INDEX, sequence_logprobs
from rlhf_core.modeling.models import load_model
from rlhf_core.modeling.modes import eval_mode
from rlhf_core.modeling.preference_tokens import PairTokens, tokenize_preference_rows
from rlhf_core.spec.stages.direct_alignment import DirectAlignmentStage
from rlhf_core.training.loop import TOKENS, BackwardFn, LogFn, plan_steps, rows_of_step, run_optimizer_steps
from rlhf_core.training.sft import apply_lora

REFERENCE_BATCH = 32  # pairs per forward pass of the reference (no gradients)


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite: training stops, nothing is registered."""


@dataclass
class DirectAlignmentResult:
    steps: int
    resumed_from_step: int
    final_loss: float
    pairs: int
    truncated_pairs: int
    skipped_pairs: int
    reference_cached: bool
    seconds: float
    input_tokens: int
    heldout: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        shown = {
            "final_train_loss": self.final_loss,
            "steps": float(self.steps),
            "pairs": float(self.pairs),
            "skipped_pairs": float(self.skipped_pairs),
            "truncated_pairs": float(self.truncated_pairs),
            "tokens_per_second": self.input_tokens / self.seconds if self.seconds > 0 else 0.0,
        }
        shown |= {k.replace("eval/", "heldout_"): v for k, v in self.heldout.items() if k in HELDOUT_SHOWN}
        return shown


HELDOUT_SHOWN = ("eval/loss", "eval/accuracy", "eval/margin")


def reference_logprobs_key(
    reference_digest: str, data_digest: str, stage: DirectAlignmentStage, split: str
) -> str:
    """Identity of a reference log-prob cache: reference weights, rows, split and tokenization settings
    (and, as for every fingerprint, the rlhf_core source and library versions)."""
    settings = {
        "max_length": stage.train.max_length,
        "on_overlong": stage.train.on_overlong,
        "split": split,
    }
    inputs = {"reference": reference_digest, "data": data_digest}
    return stage_fingerprint("reference_logprobs", settings, inputs, seed=0)


def pair_batch(pairs: list[PairTokens], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows: the chosen sequences of ``pairs``, then their rejected ones (2B, T); labels
    carry the completion tokens only."""
    sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    return completion_batch(sequences, pad_token_id)


def completion_batch(
    sequences: list[tuple[list[int], list[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded (prompt + completion) rows with labels on the completion only."""
    width = max(len(prompt) + len(completion) for prompt, completion in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(sequences):
        n = len(prompt) + len(completion)
        ids[row, :n] = torch.tensor(prompt + completion)
        labels[row, len(prompt) : n] = torch.tensor(completion)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def completion_logprobs(
    model: PreTrainedModel, sequences: list[tuple[list[int], list[int]]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log pi(completion | prompt), completion length) per (prompt, completion), one forward."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in completion_batch(sequences, pad_token_id).items()}
    return sequence_logprobs(
        model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"]
    )


def mismatched(pairs: list[PairTokens]) -> list[tuple[list[int], list[int]]]:
    """(x_i, y_{i+1}) for KTO's KL reference point: each prompt with the next pair's chosen completion."""
    return [(p.prompt, pairs[(i + 1) % len(pairs)].chosen) for i, p in enumerate(pairs)]


@torch.no_grad()
def compute_reference_logprobs(
    model: PreTrainedModel, pairs: list[PairTokens], pad_token_id: int, with_mismatched: bool
) -> torch.Tensor:
    """(N, 3) reference log-probs per pair: chosen, rejected, and the mismatched (x_i, y_{i+1}) (KTO)."""
    out = torch.zeros(len(pairs), 3, dtype=torch.float64)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt) + len(pairs[i].chosen))
    kl_pairs = mismatched(pairs) if with_mismatched else []
    with eval_mode(model):
        for start in range(0, len(order), REFERENCE_BATCH):
            ids = order[start : start + REFERENCE_BATCH]
            sequences = [(pairs[i].prompt, pairs[i].chosen) for i in ids]
            sequences += [(pairs[i].prompt, pairs[i].rejected) for i in ids]
            sequences += [kl_pairs[i] for i in ids] if with_mismatched else []
            sums, _ = completion_logprobs(model, sequences, pad_token_id)
            columns = sums.double().cpu().view(-1, len(ids)).T  # (n, 2 or 3)
            out[ids, : columns.shape[1]] = columns
    return out


def cached_reference_logprobs(
    cache_file: Path,
    reference_dir: str,
    revision: str | None,
    pairs: list[PairTokens],
    with_mismatched: bool,
) -> tuple[torch.Tensor, bool]:
    """The reference log-probs of ``pairs`` from ``cache_file``, computed (and written atomically) on a
    miss; returns (log-probs, whether they came from the cache). The reference model is freed after."""
    if cache_file.exists():
        cached = torch.load(cache_file)
        if cached.shape[0] == len(pairs):
            return cached, True
    model, tokenizer = load_model(reference_dir, revision=revision)
    logprobs = compute_reference_logprobs(model, pairs, tokenizer.pad_token_id, with_mismatched)
    del model
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    torch.save(logprobs, tmp)
    os.replace(tmp, cache_file)
    return logprobs, False


def loss_options(stage: DirectAlignmentStage, spec: LossSpec) -> dict[str, float]:
    """The loss's keyword hyperparameters from the stage (beta and ``loss_options``), checked by name."""
    known = spec.hyperparameters
    unknown = sorted(set(stage.loss_options) - set(known))
    if unknown:
        allowed = ", ".join(f"{k} (default {v})" for k, v in known.items())
        raise UserError(
            f"loss '{stage.loss}' has no option(s) {', '.join(unknown)}; it takes: {allowed or 'none'}"
        )
    options = dict(stage.loss_options)
    if stage.beta is not None:
        if "beta" not in known:
            raise UserError(f"loss '{stage.loss}' takes no beta; its options: {', '.join(known)}")
        options["beta"] = stage.beta
    return options


def step_losses(
    spec: LossSpec,
    options: dict[str, float],
    policy: dict[str, torch.Tensor],
    reference: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example losses and the logged quantities for one micro-batch.

    ``policy`` holds the (B,) summed log-probs and lengths of chosen, rejected (and mismatched for KTO);
    ``reference`` is the (B, 3) slice of the cached reference log-probs, or None (reference-free).
    """
    tensors = {
        "policy_chosen_logps": policy["chosen"],
        "policy_rejected_logps": policy["rejected"],
        "chosen_lengths": policy["chosen_lengths"],
        "rejected_lengths": policy["rejected_lengths"],
    }
    if reference is not None:
        reference = reference.to(policy["chosen"].dtype)
        tensors |= {"reference_chosen_logps": reference[:, 0], "reference_rejected_logps": reference[:, 1]}
    if not spec.paired:  # KTO: chosen desirable, rejected undesirable, z_0 from the mismatched pairs
        n = policy["chosen"].shape[0]
        tensors = {
            "policy_logps": torch.cat([policy["chosen"], policy["rejected"]]),
            "reference_logps": torch.cat([reference[:, 0], reference[:, 1]]),
            "desirable": torch.arange(2 * n, device=reference.device) < n,
            "policy_kl_logps": policy["mismatched"],
            "reference_kl_logps": reference[:, 2],
        }
    result = spec.fn(*(tensors[name] for name in spec.inputs), **options)
    logged = {
        "chosen_reward": result.chosen_rewards.mean(),
        "rejected_reward": result.rejected_rewards.mean(),
        "chosen_logp": policy["chosen"].detach().mean(),
        "rejected_logp": policy["rejected"].detach().mean(),
        **{k: v.mean() for k, v in result.metrics.items()},
    }
    if spec.paired:
        logged["accuracy"] = (result.chosen_rewards > result.rejected_rewards).float().mean()
        logged["margin"] = (result.chosen_rewards - result.rejected_rewards).mean()
    return result.losses, logged


def micro_batch_logprobs(
    model: PreTrainedModel, pairs: list[PairTokens], pad_token_id: int, with_mismatched: bool
) -> dict[str, torch.Tensor]:
    """Chosen and rejected (and mismatched) sequences of ``pairs`` through the policy in one forward."""
    sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    sequences += mismatched(pairs) if with_mismatched else []
    sums, lengths = completion_logprobs(model, sequences, pad_token_id)
    n = len(pairs)
    out = {
        "chosen": sums[:n],
        "rejected": sums[n : 2 * n],
        "chosen_lengths": lengths[:n],
        "rejected_lengths": lengths[n : 2 * n],
    }
    if with_mismatched:
        out["mismatched"] = sums[2 * n :]
    return out


def train_direct_alignment(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[PairTokens],
    reference: torch.Tensor | None,
    stage: DirectAlignmentStage,
    *,
    seed: int,
    checkpoint_dir: Path,
    stage_name: str = "direct_alignment",
    log: LogFn | None = None,
) -> tuple[PreTrainedModel, dict]:
    """Optimise ``model`` on tokenized ``pairs`` with the stage's loss; ``reference`` is the (N, 3)
    cached reference log-probs (None for reference-free losses). Resumes from ``checkpoint_dir``."""
    spec = DIRECT_ALIGNMENT_LOSSES[stage.loss]
    options = loss_options(stage, spec)
    cfg = stage.train
    torch.manual_seed(seed)
    if stage.lora is not None:
        model = apply_lora(model, stage.lora)
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    steps_per_epoch, total_steps = plan_steps(len(pairs), cfg)
    length = [len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs]

    def step_fn(step: int, backward: BackwardFn, device: torch.device) -> dict[str, float]:
        # the step's loss is the mean over its pairs however they are split, so similar lengths share a
        # micro-batch (less padding) and the gradient is unchanged
        picked = [
            order[i] for part in rows_of_step(len(pairs), cfg, seed, step, steps_per_epoch) for i in part
        ]
        picked.sort(key=lambda i: length[i])
        totals: dict[str, float] = {TOKENS: 0.0}
        for start in range(0, len(picked), cfg.batch_size):
            ids = picked[start : start + cfg.batch_size]
            part = [pairs[i] for i in ids]
            policy = micro_batch_logprobs(model, part, tokenizer.pad_token_id, not spec.paired)
            ref = reference[ids].to(device) if reference is not None else None
            losses, logged = step_losses(spec, options, policy, ref)
            loss = losses.mean()
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"stage '{stage_name}': the {stage.loss} loss is {loss.item()} at step {step + 1}; "
                    "training stops, the last checkpoint is kept and nothing is registered (lower lr?)"
                )
            weight = len(ids) / len(picked)
            backward(loss * weight)
            for key, value in {"loss": loss.detach(), **logged}.items():
                totals[key] = totals.get(key, 0.0) + float(value) * weight
            totals[TOKENS] += float(sum(len(p.prompt) * 2 + len(p.chosen) + len(p.rejected) for p in part))
        return totals

    trained, loop = run_optimizer_steps(
        model, cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch, seed=seed,
        checkpoint_dir=checkpoint_dir, step_fn=step_fn, log=log,
    )  # fmt: skip
    if stage.lora is not None:
        trained = trained.merge_and_unload()
    return trained, {
        "steps": total_steps,
        "resumed_from_step": loop.resumed_from_step,
        "final_loss": loop.last_metrics.get("loss", math.nan),
        "seconds": loop.seconds,
        "input_tokens": loop.tokens,
    }


@torch.no_grad()
def evaluate_direct_alignment(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[PairTokens],
    reference: torch.Tensor | None,
    stage: DirectAlignmentStage,
) -> dict[str, float]:
    """Held-out loss, implicit reward accuracy and margin, rewards and log-probs on ``pairs``."""
    spec = DIRECT_ALIGNMENT_LOSSES[stage.loss]
    options = loss_options(stage, spec)
    totals: dict[str, float] = {}
    with eval_mode(model):
        for start in range(0, len(pairs), REFERENCE_BATCH):
            part = pairs[start : start + REFERENCE_BATCH]
            policy = micro_batch_logprobs(model, part, tokenizer.pad_token_id, not spec.paired)
            ref = reference[start : start + len(part)] if reference is not None else None
            losses, logged = step_losses(spec, options, policy, ref)
            weight = len(part) / len(pairs)
            for key, value in {"loss": losses.mean(), **logged}.items():
                totals[f"eval/{key}"] = totals.get(f"eval/{key}", 0.0) + float(value) * weight
    totals["eval/pairs"] = float(len(pairs))
    return totals


def run_direct_alignment(
    policy_dir: str,
    revision: str | None,
    train_rows: list[dict],
    eval_rows: list[dict] | None,
    stage: DirectAlignmentStage,
    *,
    reference_dir: str | None,
    reference_revision: str | None,
    reference_cache: dict[str, Path],
    seed: int,
    checkpoint_dir: Path,
    stage_name: str,
    source: str,
    log: LogFn | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, DirectAlignmentResult]:
    """The ``direct_alignment`` stage's work: tokenize, cache reference log-probs, train, evaluate.

    ``reference_cache`` maps split ('train', 'eval') -> cache file (see :func:`reference_logprobs_key`).
    """
    model, tokenizer = load_model(policy_dir, revision=revision)
    spec = DIRECT_ALIGNMENT_LOSSES[stage.loss]
    loss_options(stage, spec)  # bad options fail before any work
    cfg = stage.train
    splits = {"train": train_rows, **({"eval": eval_rows} if eval_rows else {})}
    tokenized, reports = {}, {}
    for split, rows in splits.items():
        tokenized[split], reports[split] = tokenize_preference_rows(
            rows, tokenizer, max_length=cfg.max_length, on_overlong=cfg.on_overlong,
            source=f"{source} ({split} split)",
        )  # fmt: skip
    if not tokenized["train"]:
        raise UserError(f"stage '{stage_name}': no preference pair fits in max_length {cfg.max_length}")
    references: dict[str, torch.Tensor | None] = {split: None for split in tokenized}
    from_cache = False
    if spec.needs_reference:
        for split, pairs in tokenized.items():
            if pairs:
                references[split], from_cache = cached_reference_logprobs(
                    reference_cache[split], reference_dir or policy_dir,
                    reference_revision if reference_dir else revision, pairs, not spec.paired,
                )  # fmt: skip
    trained, loop = train_direct_alignment(
        model, tokenizer, tokenized["train"], references["train"], stage, seed=seed,
        checkpoint_dir=checkpoint_dir, stage_name=stage_name, log=log,
    )  # fmt: skip
    heldout = {}
    if tokenized.get("eval"):
        heldout = evaluate_direct_alignment(trained, tokenizer, tokenized["eval"], references["eval"], stage)
    train_report = reports["train"]
    result = DirectAlignmentResult(
        steps=loop["steps"],
        resumed_from_step=loop["resumed_from_step"],
        final_loss=loop["final_loss"],
        pairs=len(tokenized["train"]),
        truncated_pairs=train_report.truncated,
        skipped_pairs=train_report.skipped,
        reference_cached=from_cache,
        seconds=loop["seconds"],
        input_tokens=loop["input_tokens"],
        heldout=heldout,
    )
    return trained, tokenizer, result

