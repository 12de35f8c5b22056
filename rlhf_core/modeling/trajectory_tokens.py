"""Token ids of multi-turn episodes, where only the model's own tokens are trained (book ch.13).

In a tool-use episode the model writes a turn, the environment answers (tool results, a user's reply),
the model writes again. The sequence the policy is trained on is the model's sampled tokens interleaved
with the tokens of everything else: the first prompt, and after each model turn the environment's
messages and the next assistant generation header. Those come from the chat template, never from
re-tokenizing what the model wrote, so the log-probs scored later are those of the tokens it sampled:

    prompt_ids(x) + y_1 + continuation_ids(x, y_1, env_1) + y_2 + ...

where each y_t ends with the end-of-turn token (EOS) the model emitted. Only the y_t carry loss,
log-probs, KL and advantages; the rest is context (as a prompt is in ch.4's SFT masking).

For a written trajectory (SFT data, tests), :func:`conversation_tokens` tokenizes the whole conversation
and marks the assistant turns; for a well-behaved template the two constructions give the same ids
(``tests/test_trajectory_tokens.py`` checks it for ChatML).

The caller checks once that the template renders tools (:func:`rlhf_core.modeling.tokenizer.
require_tool_support`) before passing any; these functions pass ``tools`` on only when there are some.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from rlhf_core.losses.language_model import IGNORE_INDEX
from rlhf_core.modeling.sft_tokens import TemplateError, render_chat, tokenize_conversation

Message = dict


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Rendered text to ids, as prompts are encoded for rollouts (the template writes the special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], tools: list[dict] | None = None
) -> list[int]:
    """The episode's first prompt: ``messages`` with the assistant generation header, as token ids.

    Without tools, the same ids as :func:`rlhf_core.rollout.token_scoring.encode_prompts` gives for a
    conversational prompt.
    """
    return _encode(tokenizer, render_chat(tokenizer, messages, tools, add_generation_prompt=True))


def _end_of_turn(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], turn: Message, tools: list[dict] | None
) -> str:
    """The text of ``messages`` then the model's ``turn``, up to and including its end-of-turn token."""
    eos = tokenizer.eos_token
    header = render_chat(tokenizer, messages, tools, add_generation_prompt=True)
    head = render_chat(tokenizer, [*messages, turn], tools).rstrip()
    if not eos or not head.startswith(header) or not head.endswith(eos):
        raise TemplateError(
            "the chat template does not end an assistant turn with the EOS token "
            f"{eos!r} right after the generation header's text; multi-turn episodes need a template "
            "where the model's turn ends with the end-of-turn token it emits"
        )
    return head


def continuation_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    assistant_text: str,
    new_messages: list[Message],
    tools: list[dict] | None = None,
) -> list[int]:
    """The tokens that follow the model's EOS: the environment's ``new_messages`` and the next generation
    header, from the template.

    The model wrote ``assistant_text`` after the context ``messages`` (its sampled tokens end with the
    EOS it emitted; the text may or may not end with the EOS token's text). The result is
    render(messages + [assistant_text] + new_messages, generation header) minus the text up to and
    including the model's end-of-turn token. Raises :class:`TemplateError` when the template does not
    render that conversation as an extension of the model's turn (a template that rewrites earlier
    turns, e.g. one that drops past reasoning).
    """
    eos = tokenizer.eos_token or ""
    if eos and assistant_text.endswith(eos):  # decoded with its special tokens kept
        assistant_text = assistant_text[: -len(eos)]
    turn = {"role": "assistant", "content": assistant_text}
    head = _end_of_turn(tokenizer, messages, turn, tools)
    full = render_chat(tokenizer, [*messages, turn, *new_messages], tools, add_generation_prompt=True)
    if not full.startswith(head):
        raise TemplateError(
            "the chat template does not render a conversation prefix by prefix: the environment's "
            "messages change how the model's earlier turn is written; multi-turn episodes need a template "
            "where each message only appends text"
        )
    return _encode(tokenizer, full[len(head) :])


def conversation_tokens(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], tools: list[dict] | None, max_length: int
) -> tuple[list[int], list[int]]:
    """A whole written trajectory as (input_ids, assistant_mask), cut to ``max_length`` tokens.

    The mask is 1 on the tokens of every assistant turn (its content, its ``<tool_call>`` text and its
    end-of-turn token; not the role header) and 0 on everything else: system, user and tool turns and
    the template's headers and separators (the masking of ch.4 §4.3, with tool results as context).
    """
    example = tokenize_conversation(messages, tokenizer, max_length, "all_assistant", tools)
    mask = [int(label != IGNORE_INDEX) for label in example.labels]
    return example.input_ids, mask
