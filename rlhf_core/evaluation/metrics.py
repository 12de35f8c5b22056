"""Basic evaluation: held-out NLL/perplexity on assistant tokens, verifiable accuracy, response lengths."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.evaluation.statistics import figure_with_interval, interval_metrics, ratio_statistic
from rlhf_core.losses.language_model import sequence_logprobs
from rlhf_core.modeling.modes import eval_mode
from rlhf_core.modeling.sft_tokens import collate, tokenize_sft_row, unpacked_rows
from rlhf_core.rewards.functions import RewardFunction
from rlhf_core.rollout.engines.base import RolloutEngine
from rlhf_core.rollout.generation import generate


@torch.no_grad()
def heldout_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    *,
    max_length: int,
    batch_size: int = 16,
) -> tuple[list[float], list[int]]:
    """Per example: sum_t -log pi(y_t | x, y_<t) over its trained (assistant) tokens, and their count.

    ``records`` are SFT rows (``messages``, or ``prompt`` + ``completion``); examples without a trained
    token (cut off by ``max_length``) are left out.
    """
    examples = [tokenize_sft_row(r, tokenizer, max_length) for r in records]
    rows = unpacked_rows([ex for ex in examples if ex.n_label_tokens > 0])
    sums: list[float] = []
    counts: list[int] = []
    device = next(model.parameters()).device
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], tokenizer.pad_token_id)
            logps, tokens = sequence_logprobs(
                model, batch["input_ids"].to(device), batch["labels"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                position_ids=batch["position_ids"].to(device),
            )  # fmt: skip
            sums += (-logps.double()).tolist()
            counts += tokens.tolist()
    return sums, counts


def heldout_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    *,
    max_length: int,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out NLL per trained token of ``records`` (SFT rows) and its perplexity exp(loss).

    ``eval/nll`` = ``eval/loss`` = sum of the examples' NLL / their trained tokens, with a bootstrap
    interval that resamples examples (numerator and denominator together); ``eval/tokens`` counts them.
    """
    sums, counts = heldout_nll(model, tokenizer, records, max_length=max_length, batch_size=batch_size)
    tokens = sum(counts)
    loss = sum(sums) / max(tokens, 1)
    metrics = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": float(tokens)}
    if sums:
        metrics["eval/nll"] = loss
        metrics |= interval_metrics("eval/nll", range(len(sums)), seed, ratio_statistic(sums, counts))
    return metrics


def length_metrics(lengths: list[int], seed: int) -> dict[str, float]:
    """Response length in tokens (generated tokens, EOS included): mean, median (p50) and 90th
    percentile (linear interpolation), each with a bootstrap interval over the completions."""
    values = [float(n) for n in lengths]
    metrics = figure_with_interval("eval/length/mean", values, seed)
    for name, q in (("p50", 0.5), ("p90", 0.9)):
        metrics |= figure_with_interval(
            f"eval/length/{name}", values, seed, statistic=lambda x, q=q: torch.quantile(x, q, dim=-1)
        )
    return metrics


@dataclass
class AccuracyReport:
    accuracy: float
    rows: list[dict[str, str | bool | int]]


def verifiable_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    verifier: RewardFunction,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 32,
    seed: int = 0,
    engine: str | RolloutEngine = "native",
) -> AccuracyReport:
    """Fraction of prompts whose completion the verifier accepts (scores 1.0); rows keep
    prompt/answer/completion/verdict and the completion's length in tokens (``new_tokens``). ``engine``:
    an in-process loop by name, or an open rollout engine holding the model's weights."""
    prompts = [r["prompt"] for r in records]
    out = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        seed=seed,
        engine=engine,
    )
    rows = []
    for record, completion, length in zip(records, out.texts, out.new_tokens, strict=True):
        rows.append(
            {
                "prompt": record["prompt"],
                "answer": str(record.get("answer", "")),
                "completion": completion,
                "correct": verifier(completion, record) == 1.0,
                "new_tokens": length,
            }
        )
    accuracy = sum(bool(r["correct"]) for r in rows) / max(len(rows), 1)
    return AccuracyReport(accuracy, rows)
