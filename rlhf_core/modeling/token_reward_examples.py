"""Rows of ``outcome`` and ``step_labels`` data as token examples for an ORM or a PRM (book ch.5), and
micro-batches of them as tensors, and the loss of a micro-batch by the objective's name.

An example holds its token ids, the positions that carry a label and the labels there: every
completion token (and the turn end) with the outcome r for an ORM; the last separator token of every
step with its rating for a PRM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.data.schemas import outcome_parts
from rlhf_core.errors import UserError
from rlhf_core.losses.outcome_process_rewards import (
    orm_sequence_loss,
    orm_token_loss,
    prm_binary_loss,
    prm_three_class_loss,
)
from rlhf_core.modeling.token_reward_model import encode_outcome, encode_steps, pad_rows, token_logits


@dataclass(frozen=True)
class LabelledTokens:
    """One training row as tokens: ``ids``, labelled ``positions`` and one label per position."""

    ids: list[int]
    positions: list[int]
    labels: list[float]  # ORM: r in {0, 1} at every position; PRM: the step rating (-1, 0 or 1)
    row: int  # the row's index in its split, for errors


@dataclass
class TokenBatch:
    """A right-padded micro-batch: ids and real-token mask (B, T), labelled positions (B, T) and labels
    there (B, T; 0 elsewhere), and each row's outcome r (B,; ORM)."""

    ids: torch.Tensor
    real: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    outcome: torch.Tensor

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(
            *(t.to(device) for t in (self.ids, self.real, self.mask, self.labels, self.outcome))
        )


def collate(examples: list[LabelledTokens], pad_token_id: int) -> TokenBatch:
    """Right-pad ``examples`` into one batch; labels sit at their positions (the ORM's r also per row)."""
    ids, real = pad_rows([e.ids for e in examples], pad_token_id)
    mask = torch.zeros_like(real)
    labels = torch.zeros(real.shape, dtype=torch.float32)
    for b, e in enumerate(examples):
        mask[b, e.positions] = True
        labels[b, e.positions] = torch.tensor(e.labels)
    outcome = torch.tensor([e.labels[0] for e in examples], dtype=torch.float32)
    return TokenBatch(ids, real, mask, labels, outcome)


# objective name -> loss of a micro-batch from its head logits (B, T, C)
OBJECTIVES: dict[str, Callable[[torch.Tensor, TokenBatch], torch.Tensor]] = {
    "token": lambda logits, b: orm_token_loss(logits[..., 0], b.outcome, b.mask),
    "sequence": lambda logits, b: orm_sequence_loss(logits[..., 0], b.outcome, b.mask),
    "binary": lambda logits, b: prm_binary_loss(logits[..., 0], (b.labels == 1).float(), b.mask),
    "three_class": lambda logits, b: prm_three_class_loss(logits, b.labels, b.mask),
}
PER_STEP = {"binary", "three_class"}  # PRM objectives: a step's loss averages labelled steps


def micro_batch_loss(
    model: PreTrainedModel, batch: TokenBatch, objective: str, device: torch.device
) -> tuple[torch.Tensor, float]:
    """The objective's mean over a micro-batch, and the real tokens it processed."""
    batch = batch.to(device)
    logits = token_logits(model, batch.ids, batch.real)  # (B, T, C)
    return OBJECTIVES[objective](logits, batch), float(batch.real.sum())


def _fits(length: int, max_length: int, on_overlong: str, row: int, source: str) -> bool:
    if length <= max_length:
        return True
    if on_overlong == "fail":
        raise UserError(
            f"{source}, row {row} (0-based): {length} tokens, longer than max_length {max_length} "
            "(raise max_length, or set on_overlong: skip)"
        )
    return False


def outcome_examples(
    rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int, on_overlong: str, source: str
) -> tuple[list[LabelledTokens], int]:
    """ORM examples of ``outcome`` rows (the label r on every completion token) and the rows skipped."""
    examples, skipped = [], 0
    for i, row in enumerate(rows):
        prompt, completion, correct = outcome_parts(row)
        tokens = encode_outcome(tokenizer, prompt, completion)
        if not _fits(len(tokens.ids), max_length, on_overlong, i, source):
            skipped += 1
            continue
        positions = list(range(tokens.start, len(tokens.ids)))
        examples.append(LabelledTokens(tokens.ids, positions, [float(correct)] * len(positions), i))
    return examples, skipped


def step_examples(
    rows: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    *,
    separator: str,
    max_steps: int,
    max_length: int,
    on_overlong: str,
    source: str,
) -> tuple[list[LabelledTokens], int]:
    """PRM examples of ``step_labels`` rows (the first ``max_steps`` steps; each rating at its step's
    end) and the rows skipped."""
    examples, skipped = [], 0
    for i, row in enumerate(rows):
        steps, labels = row["steps"][:max_steps], row["labels"][:max_steps]
        tokens = encode_steps(tokenizer, row["prompt"], steps, separator)
        if not _fits(len(tokens.ids), max_length, on_overlong, i, source):
            skipped += 1
            continue
        examples.append(LabelledTokens(tokens.ids, tokens.step_ends, [float(v) for v in labels], i))
    return examples, skipped


def check_step_labels(
    examples: list[LabelledTokens], labels: Literal["binary", "three_class"], source: str
) -> None:
    """Three-class training needs the -1/0/+1 ratings: data with only 0 and 1 is binary data, whose bad
    steps (0) would be read as neutral."""
    if labels == "three_class" and examples and not any(v < 0 for e in examples for v in e.labels):
        raise UserError(
            f"{source}: labels three_class reads the ratings -1 (bad), 0 (neutral), +1 (good), but no step "
            "is rated -1: these look like binary labels (0 bad, 1 good); use labels: binary"
        )
