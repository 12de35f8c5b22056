"""Outcome and process reward models (book ch.5): a per-token head on a policy's backbone.

Architecture: ``AutoModelForTokenClassification`` on the policy checkpoint, with one label (an ORM's
logit w_theta(s_t), or a binary PRM's step logit) or three (a PRM's -1/0/+1 ratings). The head starts
at zero, so every loss is ln 2 (or ln 3) at initialisation. The kind of model is recorded in its config
(``rlhf_reward_kind``: ``outcome`` or ``process``; a PRM also keeps its ``rlhf_step_separator`` and
``rlhf_step_labels``), so a scorer loading the saved model knows how to read it.

Tokens: a (prompt, completion) is the chat the policy sees, built piece by piece so that the completion's
tokens (ORM) and the last token of every step's separator (PRM) are known exactly, whatever a BPE
tokenizer would merge across those boundaries if the whole text were tokenized at once:

    ids = tokens(prompt rendered with the generation prompt)
        + tokens(step_1 + separator) + ... + tokens(step_K + separator)   (an ORM: tokens(completion))
        + tokens(end of the assistant turn, e.g. <|im_end|>)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForTokenClassification, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.data.schemas import prompt_messages
from rlhf_core.errors import UserError

RewardKind = Literal["bradley_terry", "outcome", "process"]
KIND_KEY = "rlhf_reward_kind"  # in the saved config: "outcome" or "process" (absent: Bradley-Terry)
SEPARATOR_KEY = "rlhf_step_separator"
LABELS_KEY = "rlhf_step_labels"  # "binary" or "three_class"
DEFAULT_SEPARATOR = "\n<step>\n"  # the book's companion code
_PLACEHOLDER = "\u2063"  # stands for the completion when the chat template is split around it


def build_token_reward_model(
    source: str | Path,
    *,
    kind: Literal["outcome", "process"],
    tokenizer: PreTrainedTokenizerBase | None = None,
    num_labels: int = 1,
    revision: str | None = None,
    separator: str = DEFAULT_SEPARATOR,
    step_labels: Literal["binary", "three_class"] = "binary",
) -> PreTrainedModel:
    """A token classifier on the backbone at ``source`` with a zero head, marked as an ORM or a PRM.

    No classifier dropout: the head reads the same hidden states in training and in scoring. With the
    policy's ``tokenizer``, the embeddings grow to its vocabulary (a hub tokenizer that gained chat or
    pad tokens) and the config takes its pad id.
    """
    config = AutoConfig.from_pretrained(source, revision=revision, num_labels=num_labels)
    config.classifier_dropout = 0.0
    model = AutoModelForTokenClassification.from_pretrained(
        source, config=config, dtype=torch.float32, revision=revision
    )
    if tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
    torch.nn.init.zeros_(model.score.weight)
    if model.score.bias is not None:
        torch.nn.init.zeros_(model.score.bias)
    setattr(model.config, KIND_KEY, kind)
    if kind == "process":
        setattr(model.config, SEPARATOR_KEY, separator)
        setattr(model.config, LABELS_KEY, step_labels)
    return model


def reward_kind(config) -> RewardKind:
    """What a saved reward model is, from its config: an ORM, a PRM, or (no marker) Bradley-Terry."""
    return getattr(config, KIND_KEY, None) or "bradley_terry"


@dataclass(frozen=True)
class ChatFrame:
    """The token ids around an assistant reply: the prompt with its generation prompt, and the turn end."""

    prefix: list[int]
    suffix: list[int]


def chat_frame(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict]) -> ChatFrame:
    """Split the chat template around the assistant's reply (trailing whitespace after the turn dropped,
    as the Bradley-Terry reward model's sequences end at the end-of-turn token)."""
    messages = prompt_messages(prompt)
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": _PLACEHOLDER}], tokenize=False
    ).rstrip()
    if not whole.startswith(head + _PLACEHOLDER):
        raise UserError(
            "the tokenizer's chat template does not render an assistant reply right after the generation "
            "prompt, so the completion's tokens cannot be located for an outcome/process reward model"
        )
    tail = whole[len(head) + len(_PLACEHOLDER) :]
    return ChatFrame(_tokens(tokenizer, head), _tokens(tokenizer, tail))


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


@dataclass(frozen=True)
class OutcomeTokens:
    """One (prompt, completion): its ids and where the completion starts (its tokens are ids[start:])."""

    ids: list[int]
    start: int


def encode_outcome(
    tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], completion: str
) -> OutcomeTokens:
    """Token ids of the chat prompt + completion + turn end; the completion and the turn end are labelled."""
    frame = chat_frame(tokenizer, prompt)
    return OutcomeTokens(frame.prefix + _tokens(tokenizer, completion) + frame.suffix, len(frame.prefix))


@dataclass(frozen=True)
class StepTokens:
    """One solution split in steps: its ids and the position of each step's last separator token."""

    ids: list[int]
    step_ends: list[int]


def encode_steps(
    tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], steps: list[str], separator: str
) -> StepTokens:
    """Token ids of prompt + (step + separator) for each step + turn end, built step by step."""
    frame = chat_frame(tokenizer, prompt)
    ids, ends = list(frame.prefix), []
    for step in steps:
        ids += _tokens(tokenizer, step + separator)
        ends.append(len(ids) - 1)  # the separator's last token ends the step
    return StepTokens(ids + frame.suffix, ends)


def split_steps(completion: str, separator: str) -> list[str]:
    """The steps of a completion written with ``separator`` between (or after) them; no separator: one
    step. Empty pieces (a trailing separator) are dropped; an empty completion is one empty step."""
    steps = [step for step in completion.split(separator) if step.strip()]
    return steps or [completion]


def pad_rows(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) input ids and a bool (B, T) mask of the real tokens."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    real = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        real[i, : len(s)] = True
    return ids, real


def positions_mask(shape: tuple[int, int], positions: list[list[int]]) -> torch.Tensor:
    """A bool (B, T) mask, True at ``positions[b]`` of each row b."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for b, row in enumerate(positions):
        mask[b, row] = True
    return mask


def token_logits(model: PreTrainedModel, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(B, T, C) head logits at every position of right-padded rows (fp32 even under bf16 autocast)."""
    return model(input_ids=ids, attention_mask=real.long()).logits.float()
