"""Preference pairs as token ids, for every pairwise trainer (reward model, DPO) and reward scoring.

A (prompt, completion) is rendered as one chat with the chat template and ends at the end-of-turn
token (trailing whitespace stripped): where a reward model reads its score, and where a sequence's
log-probability ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class PromptPairs:
    """All preference pairs of one prompt, tokenized."""

    chosen: list[list[int]] = field(default_factory=list)
    rejected: list[list[int]] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)


def encode_completion(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> list[int]:
    """Token ids of prompt + completion as one chat, ending at the end-of-turn token."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False
    ).rstrip()
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pad_batch(sequences: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token lists into (B, T) input ids and attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}
