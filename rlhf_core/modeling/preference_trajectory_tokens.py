"""A preference pair of tool-use trajectories as token ids, with a mask on the model's own tokens (book
ch.13: in DPO over trajectories, tool outputs are masked; ch.8 for DPO).

x is the prompt rendered with the assistant generation header (and the row's tools), the ids a generation
starts from. y is the rest of the conversation up to the final end-of-turn token, cut into pieces at the
boundaries an episode has (:mod:`rlhf_core.modeling.trajectory_tokens`):

    x | assistant turn 1 (content, tool-call text, end-of-turn) | tool results + next generation header |
      assistant turn 2 ... | final assistant turn

Each piece is tokenized on its own, as a sampled episode's tokens are (the model's turns as it would emit
them, the environment's messages from the template), so the mask is exact by construction: 1 on the
model's pieces, 0 on the others. log pi(y|x) then sums over the model's tokens only; the tool results are
context. A single assistant turn is one model piece: the same ids as the single-turn tokenization.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from rlhf_core.modeling.sft_tokens import TemplateError, render_chat

Piece = tuple[str, bool]  # (text, written by the model)


def trajectory_pieces(
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[dict],
    continuation: list[dict],
    tools: list[dict] | None = None,
) -> tuple[str, list[Piece]]:
    """(x text with the generation header, y's pieces in order), y ending at the final end-of-turn token.

    A model piece runs from the end of an assistant generation header to the end of that turn's
    end-of-turn token; found by rendering prefixes, which needs a template where each message only
    appends text (else :class:`TemplateError`).
    """
    messages = [*prompt, *continuation]
    x_text = render_chat(tokenizer, prompt, tools, add_generation_prompt=True)
    full = render_chat(tokenizer, messages, tools).rstrip()
    pieces: list[Piece] = []
    cursor = len(x_text)
    for i in range(len(prompt), len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        header = render_chat(tokenizer, messages[:i], tools, add_generation_prompt=True)
        turn = render_chat(tokenizer, messages[: i + 1], tools).rstrip()
        if not (full.startswith(header) and full.startswith(turn) and cursor <= len(header) < len(turn)):
            raise TemplateError(
                "the chat template does not render the conversation prefix by prefix (the prompt with its "
                "generation header, then each turn appended); direct alignment needs the completion's "
                "tokens to follow the ids a generation starts from, and the model's turns told apart from "
                "tool results"
            )
        if cursor < len(header):
            pieces.append((full[cursor : len(header)], False))
        pieces.append((full[len(header) : len(turn)], True))
        cursor = len(turn)
    if not full.startswith(x_text) or cursor != len(full):
        raise TemplateError("the chat template does not render the conversation as the prompt followed by y")
    return x_text, pieces


def encode_pieces(tokenizer: PreTrainedTokenizerBase, pieces: list[Piece]) -> tuple[list[int], list[int]]:
    """y's ids, each piece tokenized on its own, and the mask: 1 on the model's pieces, 0 elsewhere."""
    ids: list[int] = []
    mask: list[int] = []
    for text, own in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(own)] * len(piece)
    return ids, mask
