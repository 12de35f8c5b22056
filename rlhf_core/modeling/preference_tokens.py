"""Preference data as token ids, for every pairwise trainer (reward model, DPO and its family, KTO).

Two ways to tokenize a prompt x and a completion y:

- one sequence (:func:`encode_completion`, :func:`group_pairs`): x and y as one chat, ending at the
  end-of-turn token (trailing whitespace stripped): where a reward model reads its score;
- x and y apart (:func:`tokenize_preference_rows`, :func:`tokenize_unpaired_rows`): x is the chat-templated
  prompt with the assistant generation header, the ids generation starts from
  (``rollout.generation.chat_prompt``); y is the rest of the chat, up to and including the end-of-turn
  token, as a sampled completion follows those ids. log pi(y|x) sums over y's tokens only.

Prompts are plain strings or conversations; rows of every shape go through
:func:`rlhf_core.data.schemas.preference_parts` (or ``unpaired_parts``) first. For direct alignment, a
preference row may be a pair of tool-use trajectories (book ch.13): y is then several turns, and a mask
on y marks the model's own tokens (:mod:`rlhf_core.modeling.preference_trajectory_tokens`); reward models
(:func:`group_pairs`) do not read trajectories yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import jinja2
import torch
from transformers import PreTrainedTokenizerBase

from rlhf_core.data.preference_trajectories import preference_trajectories, uses_tools
from rlhf_core.data.schemas import preference_parts, prompt_key, prompt_messages, unpaired_parts
from rlhf_core.errors import UserError
from rlhf_core.modeling.preference_trajectory_tokens import encode_pieces, trajectory_pieces
from rlhf_core.modeling.sft_tokens import TemplateError
from rlhf_core.modeling.tokenizer import require_tool_support

OnOverlong = Literal["truncate_prompt", "skip", "fail"]


class OverlongPairError(UserError):
    """A preference pair does not fit in ``max_length`` tokens."""


class ChatTemplateError(UserError):
    """The chat template cannot render a row, or renders prompt + completion other than as the prompt
    followed by the completion."""


@dataclass
class PromptPairs:
    """All preference pairs of one prompt, tokenized."""

    chosen: list[list[int]] = field(default_factory=list)
    rejected: list[list[int]] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # index of the row each pair came from


def encode_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], completion: str
) -> list[int]:
    """Token ids of prompt + completion as one chat, ending at the end-of-turn token.

    ``prompt`` is a plain string (one user turn) or a list of messages ending in a user turn.
    """
    messages = [*prompt_messages(prompt), {"role": "assistant", "content": completion}]
    text = tokenizer.apply_chat_template(messages, tokenize=False).rstrip()
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
    """Tokenize preference rows (any shape of ``preference_parts``) and group them by prompt.

    A pair longer than ``max_length`` tokens fails naming its row in ``source``, or is skipped and
    counted. ``margin_column`` holds a per-pair margin m(y_c, y_r) (0 without it). Returns (groups in
    order of first appearance, skipped pairs).
    """
    groups: dict[str, PromptPairs] = {}
    skipped = 0
    for i, row in enumerate(records):
        if uses_tools(row):
            raise UserError(
                f"in {source}, row {i} (0-based): a preference pair of tool-use trajectories (or with a "
                "'tools' column); reward models on trajectories are not supported yet (direct alignment "
                "trains on them)"
            )
        prompt, chosen_text, rejected_text = preference_parts(row)
        chosen = encode_completion(tokenizer, prompt, chosen_text)
        rejected = encode_completion(tokenizer, prompt, rejected_text)
        if max(len(chosen), len(rejected)) > max_length:
            if on_overlong == "fail":
                longest = max(len(chosen), len(rejected))
                raise OverlongPairError(
                    f"in {source}, row {i} (0-based): prompt + completion is {longest} tokens, longer than "
                    f"max_length {max_length}; raise max_length or set on_overlong: skip"
                )
            skipped += 1
            continue
        group = groups.setdefault(prompt_key(prompt), PromptPairs())
        group.chosen.append(chosen)
        group.rejected.append(rejected)
        group.margins.append(float(row.get(margin_column, 0.0)) if margin_column else 0.0)
        group.rows.append(i)
    return list(groups.values()), skipped


@dataclass(frozen=True)
class PairTokens:
    """One preference pair: x with the generation header, then y_c or y_r (each ending at end-of-turn).

    A mask over y_c or y_r (1: the model's own token, 0: a tool result or a template header between
    turns) is set for trajectories; None means all ones (a single assistant turn).
    """

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    row: int  # index of the row it came from
    chosen_mask: list[int] | None = None
    rejected_mask: list[int] | None = None


@dataclass(frozen=True)
class CompletionTokens:
    """One rated completion (KTO): x with the generation header, then y; ``label`` True if desirable."""

    prompt: list[int]
    completion: list[int]
    label: bool
    row: int  # index of the row it came from
    mask: list[int] | None = None  # over the completion, as PairTokens' masks (None: all ones)


@dataclass
class LengthReport:
    """What ``max_length`` did to the rows: none of them is dropped or cut without being counted here."""

    rows: int = 0  # rows read
    truncated: int = 0  # kept, with the prompt cut from the left
    skipped: int = 0  # dropped: on_overlong 'skip', or the completion alone does not fit

    @property
    def kept(self) -> int:
        return self.rows - self.skipped

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        return {
            f"{prefix}rows": float(self.rows),
            f"{prefix}truncated_prompts": float(self.truncated),
            f"{prefix}skipped_rows": float(self.skipped),
        }


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool, where: str
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"{where}: the chat template cannot render this conversation: {e}") from e


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode_apart(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict], completions: list[str], where: str
) -> tuple[list[int], list[list[int]]]:
    """(x ids with the generation header, [ids of each y up to its end-of-turn token])."""
    prompt_text = _render(tokenizer, prompt, True, where)
    encoded = []
    for completion in completions:
        full = _render(tokenizer, [*prompt, {"role": "assistant", "content": completion}], False, where)
        if not full.startswith(prompt_text):
            raise ChatTemplateError(
                f"{where}: the chat template does not render prompt + completion as the prompt (with its "
                "generation header) followed by the completion, which direct alignment needs: the "
                "completion's tokens must follow the ids a generation starts from"
            )
        encoded.append(_ids(tokenizer, full[len(prompt_text) :].rstrip()))
    return _ids(tokenizer, prompt_text), encoded


def _check_options(max_length: int, on_overlong: str) -> None:
    if on_overlong not in get_args(OnOverlong):
        raise ValueError(f"on_overlong must be one of {get_args(OnOverlong)}, got {on_overlong!r}")
    if max_length < 2:
        raise ValueError(
            f"max_length must be at least 2 (a prompt token and a completion token), got {max_length}"
        )


def _fit(
    prompt: list[int],
    completions: dict[str, list[int]],
    *,
    max_length: int,
    on_overlong: OnOverlong,
    where: str,
    report: LengthReport,
) -> list[int] | None:
    """The prompt ids to keep so that prompt + the longest completion fits ``max_length``, or None to drop.

    ``truncate_prompt`` cuts the prompt from the left and keeps every completion whole; at least one
    prompt token stays (its logits predict the first completion token), so a completion of
    ``max_length`` tokens or more is dropped and counted.
    """
    longest = max(len(ids) for ids in completions.values())
    if len(prompt) + longest <= max_length:
        return prompt
    if on_overlong == "fail":
        raise OverlongPairError(_overlong_message(prompt, completions, max_length, where))
    room = max_length - longest
    if on_overlong == "skip" or room < 1:
        report.skipped += 1
        return None
    report.truncated += 1
    return prompt[-room:]


def _overlong_message(
    prompt: list[int], completions: dict[str, list[int]], max_length: int, where: str
) -> str:
    too_long = " and ".join(
        f"prompt + {name} is {len(prompt) + len(ids)} tokens"
        for name, ids in completions.items()
        if len(prompt) + len(ids) > max_length
    )
    lengths = ", ".join(f"{name} {len(ids)}" for name, ids in {"prompt": prompt, **completions}.items())
    return (
        f"{where}: {too_long} ({lengths}), longer than max_length {max_length}; raise max_length, or set "
        "on_overlong: truncate_prompt (cut the prompt from the left) or skip"
    )


def _encode_pair(
    tokenizer: PreTrainedTokenizerBase, row: dict, where: str
) -> tuple[list[int], dict[str, tuple[list[int], list[int] | None]]]:
    """(x ids with the generation header, {"chosen"/"rejected": (y ids, mask over y or None)}) of a
    preference row of any shape, single-turn or trajectories; the row's tools go to the template."""
    parts = preference_trajectories(row)
    if parts.tools:
        require_tool_support(tokenizer, f"{where}: preference data with a 'tools' column")
    sides = {}
    try:
        for side, continuation in (("chosen", parts.chosen), ("rejected", parts.rejected)):
            x_text, pieces = trajectory_pieces(tokenizer, parts.prompt, continuation, parts.tools)
            ids, mask = encode_pieces(tokenizer, pieces)
            sides[side] = ids, (mask if 0 in mask else None)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"{where}: the chat template cannot render this conversation: {e}") from e
    except TemplateError as e:
        raise ChatTemplateError(f"{where}: {e}") from e
    return _ids(tokenizer, x_text), sides


def tokenize_preference_rows(
    rows: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    on_overlong: OnOverlong = "fail",
    source: str = "preferences",
) -> tuple[list[PairTokens], LengthReport]:
    """Valid ``preference`` rows of any shape as (x, y_c, y_r) token ids, for direct alignment.

    prompt + the longer completion fits ``max_length``: an overlong pair fails naming its row in
    ``source`` (``fail``), is dropped (``skip``), or has its prompt cut from the left (``truncate_prompt``;
    dropped if even the completion does not fit). Trajectories carry masks on y_c and y_r (the model's
    own tokens). Returns the pairs in row order and the counts.
    """
    _check_options(max_length, on_overlong)
    pairs, report = [], LengthReport(rows=len(rows))
    for i, row in enumerate(rows):
        where = f"in {source}, row {i} (0-based)"
        prompt, sides = _encode_pair(tokenizer, row, where)
        (chosen, chosen_mask), (rejected, rejected_mask) = sides["chosen"], sides["rejected"]
        completions = {"chosen": chosen, "rejected": rejected}
        kept = _fit(
            prompt, completions, max_length=max_length, on_overlong=on_overlong, where=where, report=report
        )
        if kept is not None:
            pairs.append(PairTokens(kept, chosen, rejected, i, chosen_mask, rejected_mask))
    return pairs, report


def tokenize_unpaired_rows(
    rows: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    on_overlong: OnOverlong = "fail",
    source: str = "unpaired_preferences",
) -> tuple[list[CompletionTokens], LengthReport]:
    """Valid ``unpaired_preference`` rows as (x, y, label) token ids, for KTO; lengths as in
    :func:`tokenize_preference_rows`."""
    _check_options(max_length, on_overlong)
    examples, report = [], LengthReport(rows=len(rows))
    for i, row in enumerate(rows):
        where = f"in {source}, row {i} (0-based)"
        x, y, label = unpaired_parts(row)
        prompt, (completion,) = _encode_apart(tokenizer, x, [y], where)
        sides = {"completion": completion}
        kept = _fit(prompt, sides, max_length=max_length, on_overlong=on_overlong, where=where, report=report)
        if kept is not None:
            examples.append(CompletionTokens(kept, completion, label, i))
    return examples, report


def pad_batch(sequences: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token lists into (B, T) input ids and attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}
