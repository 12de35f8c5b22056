"""Direct alignment's data and reference pass: examples tokenized for the stage's loss, their sequences in
one forward pass (chosen and rejected, or a completion and KTO's mismatched one), and the reference
model's log-probs of every example, computed once and cached in a file keyed by the reference's digest,
the data's digest and the tokenization settings (:func:`reference_logprobs_key`).

KTO's KL reference point z_0 comes from mismatched pairs (x_i, y_{i+1}): the next example's completion
in data order, whose reference log-probs are cached with the rest.

A completion that is a tool-use trajectory carries a mask over its tokens (``PairTokens.chosen_mask``...):
its log-prob, for the policy and the reference alike, sums over the model's own tokens only, and its
length (for length-normalised losses) counts those tokens; tool results are context (book ch.13).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.errors import UserError
from rlhf_core.fingerprint import stage_fingerprint
from rlhf_core.losses.direct_alignment import DIRECT_ALIGNMENT_LOSSES
from rlhf_core.losses.language_model import IGNORE_INDEX, sequence_logprobs
from rlhf_core.modeling.completion_scoring import can_share_prefix, pack_completions, policy_token_logprobs
from rlhf_core.modeling.models import load_model
from rlhf_core.modeling.modes import eval_mode
from rlhf_core.modeling.preference_tokens import (
    CompletionTokens,
    LengthReport,
    PairTokens,
    tokenize_preference_rows,
    tokenize_unpaired_rows,
)
from rlhf_core.modeling.shared_prefix import CompletionTokenIndex
from rlhf_core.spec.stages.direct_alignment import DirectAlignmentStage

REFERENCE_BATCH = 32  # pairs per forward pass of the reference (no gradients)


def reference_logprobs_key(
    reference_digest: str, data_digest: str, stage: DirectAlignmentStage, split: str
) -> str:
    """Identity of a reference log-prob cache: reference weights, rows, split and tokenization settings
    (and, as for every fingerprint, the rlhf_core source and library versions)."""
    settings = {
        "max_length": stage.train.max_length,
        "on_overlong": stage.train.on_overlong,
        "shared_prefix": stage.train.shared_prefix,  # the same log-probs up to float rounding
        "split": split,
    }
    inputs = {"reference": reference_digest, "data": data_digest}
    return stage_fingerprint("reference_logprobs", settings, inputs, seed=0)


def reference_logprobs_file(
    cache_dir: Path, reference_digest: str, data_digest: str, stage: DirectAlignmentStage, split: str
) -> Path:
    """The file caching one split's reference log-probs under the shared ``cache_dir``: every stage and
    run on the same reference, rows and tokenization settings reads it."""
    key = reference_logprobs_key(reference_digest, data_digest, stage, split)
    return cache_dir / "reference_logprobs" / f"{key}.pt"


Example = PairTokens | CompletionTokens


def as_unpaired(pairs: list[PairTokens]) -> list[CompletionTokens]:
    """KTO from preference pairs: the chosen completion is desirable, the rejected one is not."""
    return [
        CompletionTokens(p.prompt, completion, label, p.row, mask)
        for p in pairs
        for completion, label, mask in ((p.chosen, True, p.chosen_mask), (p.rejected, False, p.rejected_mask))
    ]


def example_sequences(examples: list, ids: list[int]) -> list[tuple[list[int], list[int]]]:
    """The (prompt, completion) sequences of examples ``ids``: chosen then rejected of each pair, or
    each unpaired completion then the mismatched (x_i, y_{i+1}) that KTO's reference point needs."""
    if isinstance(examples[0], PairTokens):
        return [(examples[i].prompt, examples[i].chosen) for i in ids] + [
            (examples[i].prompt, examples[i].rejected) for i in ids
        ]
    n = len(examples)
    return [(examples[i].prompt, examples[i].completion) for i in ids] + [
        (examples[i].prompt, examples[(i + 1) % n].completion) for i in ids
    ]


def example_masks(examples: list, ids: list[int]) -> list[list[int] | None]:
    """The masks over the completions of :func:`example_sequences`, in the same order (None: all ones)."""
    if isinstance(examples[0], PairTokens):
        return [examples[i].chosen_mask for i in ids] + [examples[i].rejected_mask for i in ids]
    n = len(examples)
    return [examples[i].mask for i in ids] + [examples[(i + 1) % n].mask for i in ids]


def completion_batch(
    sequences: list[tuple[list[int], list[int]]],
    pad_token_id: int,
    masks: list[list[int] | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded (prompt + completion) rows with labels on the completion's tokens whose mask is 1."""
    width = max(len(prompt) + len(completion) for prompt, completion in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(sequences):
        n = len(prompt) + len(completion)
        ids[row, :n] = torch.tensor(prompt + completion)
        target = torch.tensor(completion)
        if masks is not None and masks[row] is not None:
            target[torch.tensor(masks[row]) == 0] = IGNORE_INDEX
        labels[row, len(prompt) : n] = target
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def model_tokens_only(
    index: CompletionTokenIndex, masks: list[list[int] | None], width: int
) -> CompletionTokenIndex:
    """The completion tokens of ``index`` whose mask is 1 (``masks[k]`` over sequence k's completion,
    ``width`` the longest completion): tool results never reach the LM head."""
    if all(m is None for m in masks):
        return index
    grid = torch.ones(len(masks), width, dtype=torch.bool)  # (sequences, longest completion)
    for k, m in enumerate(masks):
        if m is not None:
            grid[k, : len(m)] = torch.tensor(m, dtype=torch.bool)
    keep = grid[index.owner, index.position]  # (N,)
    return CompletionTokenIndex(*(getattr(index, f.name)[keep] for f in fields(index)))


def example_logprobs(
    model: PreTrainedModel, examples: list, ids: list[int], pad_token_id: int, shared_prefix: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, n) summed completion log-probs and (2, n) lengths of examples ``ids``, in one forward pass:
    row 0 chosen (or the completion), row 1 rejected (or the mismatched completion). Sums and lengths
    cover the tokens a completion's mask keeps (all of them without a mask).

    With ``shared_prefix`` (and a model that supports it) each example is one row holding its prompt
    once, followed by both completions; otherwise each sequence is its own right-padded row.
    """
    device = next(model.parameters()).device
    sequences, masks = example_sequences(examples, ids), example_masks(examples, ids)
    n = len(ids)
    if shared_prefix and can_share_prefix(model):
        # sequence k is chosen (k < n) or rejected (k >= n) of pair k % n: a pair shares one row
        packed = pack_completions(
            [x for x, _ in sequences], [y for _, y in sequences], [k % n for k in range(2 * n)],
            pad_token_id, shared_prefix=True,
        )  # fmt: skip
        packed.index = model_tokens_only(packed.index, masks, packed.width)
        packed = packed.to(device)
        token_logps, _ = policy_token_logprobs(model, packed)
        owner = packed.index.owner
        sums = token_logps.new_zeros(2 * n).index_add(0, owner, token_logps)
        lengths = torch.zeros(2 * n, dtype=torch.long, device=device).index_add(
            0, owner, torch.ones_like(owner)
        )
        return sums.view(2, n), lengths.view(2, n)
    batch = {k: v.to(device) for k, v in completion_batch(sequences, pad_token_id, masks).items()}
    sums, lengths = sequence_logprobs(
        model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"]
    )
    return sums.view(2, n), lengths.view(2, n)


@torch.no_grad()
def compute_reference_logprobs(
    model: PreTrainedModel, examples: list, pad_token_id: int, shared_prefix: bool = True
) -> torch.Tensor:
    """(N, 2) reference log-probs per example: chosen and rejected, or completion and mismatched."""
    out = torch.zeros(len(examples), 2, dtype=torch.float64)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    with eval_mode(model):
        for start in range(0, len(order), REFERENCE_BATCH):
            ids = order[start : start + REFERENCE_BATCH]
            sums, _ = example_logprobs(model, examples, ids, pad_token_id, shared_prefix)
            out[ids] = sums.double().cpu().T
    return out


def cached_reference_logprobs(
    cache_file: Path,
    reference: str | Callable[[], tuple[PreTrainedModel, int]],
    revision: str | None,
    examples: list,
    shared_prefix: bool = True,
) -> tuple[torch.Tensor, bool]:
    """The reference log-probs of ``examples`` from ``cache_file``, computed (and written atomically) on a
    miss; returns (log-probs, whether they came from the cache).

    ``reference`` is a model directory (loaded only on a miss, freed after) or a function returning an
    already loaded (model, pad token id).
    """
    if cache_file.exists():
        cached = torch.load(cache_file)
        if cached.shape[0] == len(examples):
            return cached, True
    if callable(reference):
        model, pad_token_id = reference()
    else:
        model, tokenizer = load_model(reference, revision=revision)
        pad_token_id = tokenizer.pad_token_id
    logprobs = compute_reference_logprobs(model, examples, pad_token_id, shared_prefix)
    del model
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    torch.save(logprobs, tmp)
    os.replace(tmp, cache_file)
    return logprobs, False


def tokenize_examples(
    rows: list[dict], tokenizer: PreTrainedTokenizerBase, stage: DirectAlignmentStage, source: str
) -> tuple[list, LengthReport]:
    """Rows as the examples the stage's loss trains on: pairs, or unpaired completions for KTO."""
    cfg, spec = stage.train, DIRECT_ALIGNMENT_LOSSES[stage.loss]
    options = {"max_length": cfg.max_length, "on_overlong": cfg.on_overlong, "source": source}
    if stage.unpaired_data is not None:
        return tokenize_unpaired_rows(rows, tokenizer, **options)
    pairs, report = tokenize_preference_rows(rows, tokenizer, **options)
    return (pairs if spec.paired else as_unpaired(pairs)), report


def check_labels(examples: list, stage_name: str, source: str) -> None:
    """KTO needs desirable and undesirable examples: its reference point compares the two."""
    labels = {e.label for e in examples}
    if len(labels) == 1:
        which = "desirable" if labels == {True} else "undesirable"
        raise UserError(f"stage '{stage_name}': every example of {source} is {which}; kto needs both labels")
