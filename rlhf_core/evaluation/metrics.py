"""Basic evaluation: held-out loss/perplexity on assistant tokens, verifiable accuracy, samples."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.losses.language_model import IGNORE_INDEX
from rlhf_core.modeling.modes import eval_mode
from rlhf_core.rewards.functions import RewardFunction
from rlhf_core.rollout.generation import generate_completions
from rlhf_core.training.sft_data import collate, tokenize_sft_row, unpacked_rows


@torch.no_grad()
def heldout_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    *,
    max_length: int,
    batch_size: int = 16,
) -> dict[str, float]:
    """Mean next-token loss over the trained tokens of ``records`` (SFT rows: ``messages``, or ``prompt`` +
    ``completion``) and its perplexity exp(loss)."""
    from rlhf_core.training.sft import token_loss_sum

    examples = [tokenize_sft_row(r, tokenizer, max_length) for r in records]
    rows = unpacked_rows([ex for ex in examples if ex.n_label_tokens > 0])
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = {
                k: v.to(device)
                for k, v in collate(rows[start : start + batch_size], tokenizer.pad_token_id).items()
            }
            total += float(token_loss_sum(model, batch, packed=False))
            tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = total / max(tokens, 1)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": float(tokens)}


@dataclass
class AccuracyReport:
    accuracy: float
    rows: list[dict[str, str | bool]]


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
    engine: str = "native",
) -> AccuracyReport:
    """Fraction of prompts whose completion the verifier accepts (scores 1.0); rows keep
    prompt/answer/completion/verdict."""
    prompts = [r["prompt"] for r in records]
    completions = generate_completions(
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
    for record, completion in zip(records, completions, strict=True):
        rows.append(
            {
                "prompt": record["prompt"],
                "answer": str(record.get("answer", "")),
                "completion": completion,
                "correct": verifier(completion, record) == 1.0,
            }
        )
    accuracy = sum(bool(r["correct"]) for r in rows) / max(len(rows), 1)
    return AccuracyReport(accuracy, rows)
