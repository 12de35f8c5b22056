"""Tests for rlhf_core.modeling.trajectory_tokens: a tool-use episode's tokens, built turn by turn as a
rollout builds them, equal the written trajectory's tokens, and only the model's turns are masked in
(book ch.13 multi-turn episodes; ch.4 §4.3 masking)."""

from __future__ import annotations

import copy

import pytest

from rlhf_core.modeling.models import build_tiny_model
from rlhf_core.modeling.sft_tokens import TemplateError
from rlhf_core.modeling.tokenizer import CHATML_TEMPLATE, IM_END, tool_call_text
from rlhf_core.modeling.trajectory_tokens import continuation_ids, conversation_tokens, prompt_ids
from rlhf_core.rollout.token_scoring import encode_prompts
from rlhf_core.spec import TinyModelSource

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluates an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
    },
}
TOOLS = [CALCULATOR]
SYSTEM = {"role": "system", "content": "Use the calculator for arithmetic."}
QUESTION = {"role": "user", "content": "What is 17 * 23?"}
# What the model writes in its two turns (without the end-of-turn token, which it emits as a token).
TURN_1 = tool_call_text("calculator", {"expression": "17 * 23"})
TURN_2 = "17 * 23 = 391. The answer is 391."
CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "calculator", "arguments": {"expression": "17 * 23"}},
        }
    ],
}
RESULT = {"role": "tool", "tool_call_id": "c1", "name": "calculator", "content": "391"}
TRAJECTORY = [SYSTEM, QUESTION, CALL, RESULT, {"role": "assistant", "content": TURN_2}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), seed=0)[1]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def masked_runs(tokenizer, ids: list[int], mask: list[int], value: int) -> list[str]:
    """Decoded text of each maximal run of tokens whose mask is ``value``."""
    runs: list[list[int]] = []
    previous = None
    for token, m in zip(ids, mask, strict=True):
        if m == value:
            if previous != value:
                runs.append([])
            runs[-1].append(token)
        previous = m
    return [tokenizer.decode(run) for run in runs]


def test_only_the_assistant_turns_are_masked_in(tokenizer) -> None:
    ids, mask = conversation_tokens(tokenizer, TRAJECTORY, TOOLS, max_length=1024)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert masked_runs(tokenizer, ids, mask, 1) == [TURN_1 + IM_END, TURN_2 + IM_END]
    # Everything else is context: the system turn with the tools, the user and tool turns, every header.
    context = masked_runs(tokenizer, ids, mask, 0)
    assert context[0].startswith(
        "<|endoftext|><|im_start|>system\nUse the calculator for arithmetic.\n\n# Tools"
    )
    assert context[0].endswith("<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n")
    assert context[1] == "\n<|im_start|>tool\n391<|im_end|>\n<|im_start|>assistant\n"
    assert context[2] == "\n" and len(context) == 3


def test_the_episode_built_turn_by_turn_equals_the_written_trajectory(tokenizer) -> None:
    eos = tokenizer.eos_token_id
    first = prompt_ids(tokenizer, [SYSTEM, QUESTION], TOOLS)
    sampled_1 = [*encode(tokenizer, TURN_1), eos]  # the model's tokens end with the EOS it emitted
    between = continuation_ids(tokenizer, [SYSTEM, QUESTION], TURN_1, [RESULT], TOOLS)
    sampled_2 = [*encode(tokenizer, TURN_2), eos]
    ids = first + sampled_1 + between + sampled_2
    mask = [0] * len(first) + [1] * len(sampled_1) + [0] * len(between) + [1] * len(sampled_2)

    written_ids, written_mask = conversation_tokens(tokenizer, TRAJECTORY, TOOLS, max_length=1024)
    # The written trajectory ends with the newline the template puts after the last <|im_end|>; the
    # episode ends at the model's EOS.
    assert tokenizer.decode(written_ids[-1:]) == "\n" and written_mask[-1] == 0
    assert ids == written_ids[:-1]
    assert mask == written_mask[:-1]
    assert tokenizer.decode(between) == "\n<|im_start|>tool\n391<|im_end|>\n<|im_start|>assistant\n"


def test_the_model_text_may_carry_its_end_of_turn_token(tokenizer) -> None:
    plain = continuation_ids(tokenizer, [QUESTION], TURN_1, [RESULT], TOOLS)
    assert continuation_ids(tokenizer, [QUESTION], TURN_1 + IM_END, [RESULT], TOOLS) == plain


def test_a_simulated_user_reply_continues_the_episode(tokenizer) -> None:
    reply = {"role": "user", "content": "Now add 9."}
    ids = continuation_ids(tokenizer, [QUESTION], "391.", [reply])
    assert tokenizer.decode(ids) == "\n<|im_start|>user\nNow add 9.<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_ids_without_tools_are_the_rollout_prompt_ids(tokenizer) -> None:
    chat = [SYSTEM, QUESTION]
    assert prompt_ids(tokenizer, chat, []) == encode_prompts(tokenizer, [chat])[0]
    assert prompt_ids(tokenizer, chat, None) == encode_prompts(tokenizer, [chat])[0]
    with_tools = tokenizer.decode(prompt_ids(tokenizer, chat, TOOLS))
    assert '"name": "calculator"' in with_tools and with_tools.endswith("<|im_start|>assistant\n")


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer) -> None:
    # Like templates that drop a past turn's reasoning: an assistant turn renders differently once
    # something follows it, so the tokens after the model's EOS cannot be computed by appending.
    forgetful = copy.deepcopy(tokenizer)
    content = "{% set content = (message['content'] or '') | trim %}"
    assert content in CHATML_TEMPLATE
    forgetful.chat_template = CHATML_TEMPLATE.replace(
        content,
        content + "{% if role == 'assistant' and not loop.last %}"
        "{% set content = content.split('</think>')[-1] | trim %}{% endif %}",
    )
    with pytest.raises(TemplateError, match="prefix by prefix"):
        continuation_ids(forgetful, [QUESTION], "<think>17 * 20 + 17 * 3</think>" + TURN_1, [RESULT], TOOLS)


def test_a_template_whose_turns_do_not_end_with_the_eos_is_refused(tokenizer) -> None:
    other_eos = copy.deepcopy(tokenizer)
    other_eos.eos_token = "<|pad|>"  # the model would stop on a token the template never writes
    with pytest.raises(TemplateError, match="EOS token"):
        continuation_ids(other_eos, [QUESTION], TURN_1, [RESULT], TOOLS)


def test_max_length_cuts_ids_and_mask_together(tokenizer) -> None:
    ids, mask = conversation_tokens(tokenizer, TRAJECTORY, TOOLS, max_length=1024)
    cut_ids, cut_mask = conversation_tokens(tokenizer, TRAJECTORY, TOOLS, max_length=len(ids) - 5)
    assert cut_ids == ids[:-5] and cut_mask == mask[:-5]
