"""Batched, KV-cached generation from chat prompts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The prompt as one user turn followed by the assistant generation header."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


@dataclass
class Generations:
    texts: list[str]
    new_tokens: list[int]  # generated tokens per completion, up to and including EOS


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
) -> Generations:
    """Complete each prompt (rendered with the chat template); stops at the tokenizer's EOS.

    Left padding keeps the last prompt token of every row at the same position, as batched decoding
    needs. ``temperature == 0`` is greedy. Sampling is seeded per batch from ``seed``, so the same call
    gives the same completions.
    """
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    seeds = torch.Generator().manual_seed(seed)
    result = Generations([], [])
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [chat_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            sampling = {"do_sample": False}
            if temperature > 0:
                sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=seeds)))
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                use_cache=True,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )  # (B, prompt_len + new)
            new = out[:, enc["input_ids"].shape[1] :]  # (B, new)
            result.texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
            result.new_tokens += _lengths_up_to_eos(new, tokenizer.eos_token_id)
    finally:
        tokenizer.padding_side = side
    return result


def generate_completions(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], **kwargs
) -> list[str]:
    """Completion texts only; see ``generate``."""
    return generate(model, tokenizer, prompts, **kwargs).texts


def _lengths_up_to_eos(new: torch.Tensor, eos_id: int) -> list[int]:
    """Generated length of each row: up to and including the first EOS, else the whole row."""
    lengths = []
    for row in new.tolist():
        lengths.append(row.index(eos_id) + 1 if eos_id in row else len(row))
    return lengths
