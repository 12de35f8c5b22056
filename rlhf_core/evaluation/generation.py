"""Batched, KV-cached generation from chat prompts."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The prompt as one user turn followed by the assistant generation header."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 32,
    seed: int = 0,
) -> list[str]:
    """Complete each prompt (rendered with the chat template); stops at the tokenizer's EOS.

    Left padding keeps the last prompt token of every row at the same position, as batched decoding
    needs. ``temperature == 0`` is greedy.
    """
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    generator_seed = torch.Generator().manual_seed(seed)
    completions: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [chat_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            sampling = (
                {"do_sample": True, "temperature": temperature, "top_p": 1.0}
                if temperature > 0
                else {"do_sample": False}
            )
            if temperature > 0:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator_seed)))
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                use_cache=True,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )  # (B, prompt_len + new)
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [c.strip() for c in completions]
