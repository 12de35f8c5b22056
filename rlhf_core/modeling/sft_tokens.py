"""SFT rows as token ids, for the SFT trainer and held-out evaluation: chat template, loss masking, packing.

Masking (book ch.4 §4.3): only assistant tokens are trained; prompt tokens get the label -100.
Two multi-turn options: ``all_assistant`` trains every assistant turn, ``final_turn`` only the last.
Each trained span covers the assistant's content and its end-of-turn token (so the model learns to
stop), not the role header the template writes before it. A prompt/completion row trains its completion
only, whatever the option: assistant turns inside its prompt are context (``tokenize_sft_row``).

Tool-use conversations (book ch.13) mask the same way: an assistant turn that calls tools trains its
``<tool_call>`` text and end-of-turn token; ``tool`` messages (results the environment wrote) are never
trained. A row's ``tools`` (function declarations) go to the chat template, which must render them.

Packing concatenates examples into rows of at most ``max_length`` tokens. ``position_ids`` restart at 0
for every example; with ``attention_mask=None`` and no KV cache, transformers then keeps packed examples
from attending to each other (checked by ``tests/test_sft_data.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from rlhf_core.data.schemas import sft_messages
from rlhf_core.errors import UserError
from rlhf_core.losses.language_model import IGNORE_INDEX
from rlhf_core.modeling.tokenizer import require_tool_support


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class Row:
    """One training row: a single example, or several packed ones with restarting positions."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)


class TemplateError(UserError):
    """The chat template renders a conversation in a way masking cannot follow."""


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The conversation as text through the chat template; ``tools`` passed only when there are some, so a
    conversation without tools renders as it always did, whatever the template does with ``tools=``."""
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, mask: str, tools: list[dict] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return its text and the character spans of the trained assistant turns.

    A span runs from the end of the assistant generation header to the end of the turn's end-of-turn
    token, found by rendering prefixes: this needs a template where each message only appends text.
    """
    text = render_chat(tokenizer, messages, tools)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if mask == "final_turn":
        turns = turns[-1:]
    spans = []
    for i in turns:
        start = len(render_chat(tokenizer, messages[:i], tools, add_generation_prompt=True))
        upto = render_chat(tokenizer, messages[: i + 1], tools)
        end = len(upto.rstrip())
        if not text.startswith(upto[:end]) or start >= end:
            raise TemplateError(
                "the chat template does not render conversations prefix by prefix; "
                "loss masking needs a template where each turn only appends text"
            )
        spans.append((start, end))
    return text, spans


def tokenize_conversation(
    messages: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    mask: str = "all_assistant",
    tools: list[dict] | None = None,
) -> TokenizedExample:
    """Token ids and labels of one conversation; labels are -100 outside trained assistant spans."""
    text, spans = assistant_spans(messages, tokenizer, mask, tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for tok, (begin, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    ids = enc["input_ids"]
    truncated = len(ids) > max_length
    return TokenizedExample(ids[:max_length], labels[:max_length], truncated)


def tokenize_sft_row(
    row: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, mask: str = "all_assistant"
) -> TokenizedExample:
    """Token ids and labels of one ``sft`` row of either shape.

    A ``messages`` row is masked as ``mask`` says; a ``prompt`` + ``completion`` row trains the completion
    only (see :func:`rlhf_core.data.schemas.sft_messages`). A row's ``tools`` column goes to the chat
    template, which must render it (else the model would learn calls to functions it was never shown).
    """
    messages, completion_only = sft_messages(row)
    tools = row.get("tools") or None
    if tools:
        require_tool_support(tokenizer, "SFT data with a 'tools' column")
    mask = "final_turn" if completion_only else mask
    return tokenize_conversation(messages, tokenizer, max_length, mask, tools)


def pack_examples(examples: list[TokenizedExample], max_length: int) -> list[Row]:
    """Greedy in-order packing into rows of at most ``max_length`` tokens.

    The first label of every example is -100: in a packed row it would otherwise be "predicted" from
    the previous example's last token.
    """
    rows: list[Row] = []
    current = Row()
    for ex in examples:
        if len(ex.input_ids) > max_length:
            raise ValueError(
                f"example of {len(ex.input_ids)} tokens is longer than max_length {max_length}; "
                "truncate before packing"
            )
        if current.input_ids and len(current.input_ids) + len(ex.input_ids) > max_length:
            rows.append(current)
            current = Row()
        current.input_ids += ex.input_ids
        current.labels += [IGNORE_INDEX, *ex.labels[1:]]
        current.position_ids += list(range(len(ex.input_ids)))
    if current.input_ids:
        rows.append(current)
    return rows


def unpacked_rows(examples: list[TokenizedExample]) -> list[Row]:
    return [
        Row(ex.input_ids, [IGNORE_INDEX, *ex.labels[1:]], list(range(len(ex.input_ids)))) for ex in examples
    ]


def collate(rows: list[Row], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into tensors.

    ``attention_mask`` marks real tokens. Packed batches must not pass it to the model (position_ids
    separate the examples; see ``token_loss_sum``); padding at the end of a packed row gets label -100
    and its own position run, so it never influences real tokens (the model is causal).
    """
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        position_ids[i, :n] = torch.tensor(r.position_ids)
        position_ids[i, n:] = torch.arange(width - n)
        attention_mask[i, :n] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
    }
