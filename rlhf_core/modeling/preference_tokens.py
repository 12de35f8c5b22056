"""Preference pairs as token ids, for every pairwise trainer (reward model, DPO) and reward scoring.

A (prompt, completion) is rendered as one chat with the chat template and ends at the end-of-turn
token (trailing whitespace stripped): where a reward model reads its score, and where a sequence's
log-probability ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from rlhf_core.errors import UserError


class OverlongPairError(UserError):
    """A preference pair does not fit in ``max_length`` tokens."""


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


def group_pairs(
    records: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    on_overlong: Literal["fail", "skip"] = "fail",
    margin_column: str | None = None,
    source: str = "preferences",
) -> tuple[list[PromptPairs], int]:
    """Tokenize preference rows (prompt, chosen, rejected) and group them by prompt.

    A pair longer than ``max_length`` tokens fails naming its row in ``source``, or is skipped and
    counted. ``margin_column`` holds a per-pair margin m(y_c, y_r) (0 without it). Returns (groups in
    order of first appearance, skipped pairs).
    """
    groups: dict[str, PromptPairs] = {}
    skipped = 0
    for i, row in enumerate(records):
        chosen = encode_completion(tokenizer, row["prompt"], row["chosen"])
        rejected = encode_completion(tokenizer, row["prompt"], row["rejected"])
        if max(len(chosen), len(rejected)) > max_length:
            if on_overlong == "fail":
                longest = max(len(chosen), len(rejected))
                raise OverlongPairError(
                    f"in {source}, row {i} (0-based): prompt + completion is {longest} tokens, longer than "
                    f"max_length {max_length}; raise max_length or set on_overlong: skip"
                )
            skipped += 1
            continue
        group = groups.setdefault(row["prompt"], PromptPairs())
        group.chosen.append(chosen)
        group.rejected.append(rejected)
        group.margins.append(float(row.get(margin_column, 0.0)) if margin_column else 0.0)
    return list(groups.values()), skipped


def pad_batch(sequences: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token lists into (B, T) input ids and attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}
