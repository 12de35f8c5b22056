"""Tests for rlhf_core.modeling.sft_tokens: loss masking, packing, collation, and packed-loss equivalence."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_core.data.schemas import DataValidationError, validate_records
from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.errors import UserError
from rlhf_core.modeling.models import build_tiny_model
from rlhf_core.modeling.sft_tokens import (
    IGNORE_INDEX,
    Row,
    TokenizedExample,
    collate,
    pack_examples,
    tokenize_conversation,
    tokenize_sft_row,
    unpacked_rows,
)
from rlhf_core.modeling.tokenizer import IM_END
from rlhf_core.spec import SFTTrainSpec, TinyModelSource
from rlhf_core.training.sft.trainer import build_rows, token_loss_sum

TINY = TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320)
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
MULTI_TURN = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."},
    {"role": "user", "content": "What is 4 - 1?"},
    {"role": "assistant", "content": "4 - 1 = 3. The answer is 3."},
]


ANSWER_19 = {"role": "assistant", "content": "7 + 12 = 19. The answer is 19."}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(TINY, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def model64(tiny):
    """The tiny model in float64, so that a 1e-5 tolerance on summed losses measures leakage, not rounding.

    (In float32 a sum of ~40 token losses of ~5.7 each already carries ~1e-5 of rounding noise.)
    """
    return copy.deepcopy(tiny[0]).double().eval()


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[TokenizedExample]:
    """Four conversations of different lengths: three arithmetic ones, a two-turn one with a system turn."""
    records = synthetic_records("arithmetic", "sft", n=3, seed=0, max_operand=1000)
    conversations = [r["messages"] for r in records] + [[SYSTEM, *MULTI_TURN]]
    return [tokenize_conversation(c, tokenizer, max_length=256) for c in conversations]


def trained_spans(example: TokenizedExample, tokenizer) -> list[str]:
    """Decoded text of each maximal run of trained (label != -100) tokens."""
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token  # labels are aligned with input positions
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(token)
        previous = label
    return [tokenizer.decode(s) for s in spans]


# --- masking --------------------------------------------------------------------------------


def test_single_turn_trains_only_the_answer_and_its_end_of_turn(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "What is 7 + 12?"},
        {"role": "assistant", "content": "7 + 12 = 19. The answer is 19."},
    ]
    example = tokenize_conversation(messages, tokenizer, max_length=256)
    assert trained_spans(example, tokenizer) == ["7 + 12 = 19. The answer is 19." + IM_END]
    # Everything before the answer (bos, user turn, the "<|im_start|>assistant\n" header) is masked,
    # and so is the newline the template writes after <|im_end|>.
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(example.input_ids[:first]) == (
        "<|endoftext|><|im_start|>user\nWhat is 7 + 12?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert example.labels[-1] == IGNORE_INDEX and tokenizer.decode(example.input_ids[-1:]) == "\n"
    assert example.input_ids[-2] == tokenizer.convert_tokens_to_ids(IM_END) == example.labels[-2]
    assert not example.truncated


def test_all_assistant_trains_every_assistant_turn(tokenizer) -> None:
    example = tokenize_conversation(MULTI_TURN, tokenizer, max_length=256, mask="all_assistant")
    assert trained_spans(example, tokenizer) == [
        "2 + 3 = 5. The answer is 5." + IM_END,
        "4 - 1 = 3. The answer is 3." + IM_END,
    ]


def test_final_turn_trains_only_the_last_assistant_turn(tokenizer) -> None:
    example = tokenize_conversation(MULTI_TURN, tokenizer, max_length=256, mask="final_turn")
    assert trained_spans(example, tokenizer) == ["4 - 1 = 3. The answer is 3." + IM_END]
    every = tokenize_conversation(MULTI_TURN, tokenizer, max_length=256, mask="all_assistant")
    assert example.input_ids == every.input_ids  # masking changes labels, never the tokens


def test_system_turn_is_rendered_but_never_trained(tokenizer) -> None:
    with_system = tokenize_conversation([SYSTEM, *MULTI_TURN], tokenizer, max_length=256)
    without = tokenize_conversation(MULTI_TURN, tokenizer, max_length=256)
    assert trained_spans(with_system, tokenizer) == trained_spans(without, tokenizer)
    assert tokenizer.decode(with_system.input_ids).startswith(
        "<|endoftext|><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    )
    # The system turn adds exactly its own (masked) tokens in front.
    extra = len(with_system.input_ids) - len(without.input_ids)
    assert with_system.labels[extra + 1 :] == without.labels[1:] and extra > 0
    assert with_system.n_label_tokens == without.n_label_tokens


# --- prompt/completion rows: only the completion is trained ---------------------------------


@pytest.mark.parametrize("mask", ["all_assistant", "final_turn"])
def test_messages_rows_are_tokenized_as_their_conversation(tokenizer, mask: str) -> None:
    row = {"messages": [SYSTEM, *MULTI_TURN], "prompt": "an extra column"}
    assert tokenize_sft_row(row, tokenizer, 256, mask) == tokenize_conversation(
        row["messages"], tokenizer, 256, mask
    )


@pytest.mark.parametrize("completion", ["7 + 12 = 19. The answer is 19.", [ANSWER_19]])
def test_plain_prompt_trains_only_the_completion_and_its_end_of_turn(tokenizer, completion) -> None:
    example = tokenize_sft_row({"prompt": "What is 7 + 12?", "completion": completion}, tokenizer, 256)
    assert trained_spans(example, tokenizer) == ["7 + 12 = 19. The answer is 19." + IM_END]
    # The plain prompt is one user turn: the same tokens and labels as the equivalent messages row.
    same = tokenize_conversation([{"role": "user", "content": "What is 7 + 12?"}, ANSWER_19], tokenizer, 256)
    assert example == same


@pytest.mark.parametrize("mask", ["all_assistant", "final_turn"])
def test_assistant_turns_in_a_conversational_prompt_are_never_trained(tokenizer, mask: str) -> None:
    *context, last = MULTI_TURN  # system, user, assistant (2 + 3), user; completion: the 4 - 1 answer
    row = {"prompt": [SYSTEM, *context], "completion": [last]}
    example = tokenize_sft_row(row, tokenizer, 256, mask)
    assert trained_spans(example, tokenizer) == ["4 - 1 = 3. The answer is 3." + IM_END]
    # Whatever the mask says: as a messages row, all_assistant would also train the "2 + 3" answer.
    as_messages = tokenize_conversation([SYSTEM, *MULTI_TURN], tokenizer, 256, "all_assistant")
    assert example.input_ids == as_messages.input_ids
    assert len(trained_spans(as_messages, tokenizer)) == 2
    # Every token before the completion's content, the earlier answer included, has no label.
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert set(example.labels[:first]) == {IGNORE_INDEX}
    assert tokenizer.decode(example.input_ids[:first]) == (
        "<|endoftext|><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 5. The answer is 5.<|im_end|>\n"
        "<|im_start|>user\nWhat is 4 - 1?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert example.labels[-1] == IGNORE_INDEX  # the newline after the completion's <|im_end|>


# --- tool-use trajectories (book ch.13) ------------------------------------------------------

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluates an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
    },
}
CALL_TEXT = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "17 * 23"}}\n</tool_call>'
TOOL_ROW = {
    "tools": [CALCULATOR],
    "messages": [
        {"role": "user", "content": "What is 17 * 23?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": {"expression": "17 * 23"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "name": "calculator", "content": "391"},
        {"role": "assistant", "content": "17 * 23 = 391."},
    ],
}


@pytest.mark.parametrize("mask", ["all_assistant", "final_turn"])
def test_a_tool_trajectory_trains_the_calls_and_the_answer_never_the_results(tokenizer, mask: str) -> None:
    assert validate_records([TOOL_ROW], "sft", source="tools.jsonl")[0] == [TOOL_ROW]
    example = tokenize_sft_row(TOOL_ROW, tokenizer, 1024, mask)
    expected = [CALL_TEXT + IM_END, "17 * 23 = 391." + IM_END]
    assert trained_spans(example, tokenizer) == (expected if mask == "all_assistant" else expected[1:])
    text = tokenizer.decode(example.input_ids)
    assert '"name": "calculator", "description"' in text  # the row's tools reached the template
    assert "<|im_start|>tool\n391<|im_end|>" in text  # rendered as context, never trained (spans above)


def test_a_tool_row_needs_a_template_that_renders_tools(tokenizer) -> None:
    ignores_tools = copy.deepcopy(tokenizer)
    ignores_tools.chat_template = (
        "{% for m in messages %}{{ m['role'] + (m['content'] or '') }}<|im_end|>{% endfor %}"
    )
    with pytest.raises(UserError, match="ignores the tools"):
        tokenize_sft_row(TOOL_ROW, ignores_tools, 1024)
    without_tools = {"messages": TOOL_ROW["messages"]}  # no tools column: nothing to check
    assert tokenize_sft_row(without_tools, ignores_tools, 1024).n_label_tokens > 0


def _with(path: tuple, value) -> dict:
    """TOOL_ROW with the value at ``path`` (keys and indices) replaced; ``...`` deletes it."""
    row = copy.deepcopy(TOOL_ROW)
    *parents, last = path
    target = row
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return row


@pytest.mark.parametrize(
    ("row", "field", "expected"),
    [
        (_with(("messages", 2, "tool_call_id"), ...), "messages[2].tool_call_id", "the id of the call"),
        (_with(("messages", 2, "content"), None), "messages[2].content", "the tool's result as a string"),
        (
            _with(("messages", 1, "tool_calls", 0, "function", "arguments"), "17 * 23"),
            "messages[1].tool_calls[0].function.arguments",
            "a dict or a JSON object in a string",
        ),
        (
            _with(("messages", 1, "tool_calls"), {"name": "calculator"}),
            "messages[1].tool_calls",
            "a non-empty list of tool calls",
        ),
        (_with(("messages", 1, "tool_calls"), []), "messages[1].content", "a non-empty string"),
        (
            _with(("messages", 1, "tool_calls", 0, "function", "name"), ""),
            "messages[1].tool_calls[0].function.name",
            "non-empty string",
        ),
        (
            _with(("messages", 1), {"role": "assistant", "content": "Let me see."}),
            "messages[2].role",
            "right after",
        ),
        (_with(("tools",), {"name": "calculator"}), "tools", "a list of function declarations"),
        (_with(("tools", 0, "type"), "tool"), "tools[0]", "a function declaration"),
    ],
    ids=[
        "no-call-id",
        "no-result",
        "arguments-not-json",
        "calls-not-a-list",
        "no-calls-no-content",
        "no-name",
        "result-of-no-call",
        "tools-not-a-list",
        "not-a-function",
    ],
)
def test_bad_tool_rows_name_the_row_field_and_what_was_expected(row, field, expected) -> None:
    with pytest.raises(DataValidationError) as error:
        validate_records([TOOL_ROW, row], "sft", source="tools.jsonl")
    assert (error.value.row, error.value.field) == (1, field)
    assert str(error.value).startswith(f"in tools.jsonl, row 1 (0-based), field {field!r}: expected ")
    assert expected in error.value.expected


def test_null_fields_as_parquet_files_give_them_are_accepted(tokenizer) -> None:
    fields = {"content": None, "tool_calls": None, "tool_call_id": None, "name": None}
    row = copy.deepcopy(TOOL_ROW)
    row["messages"] = [{**fields, **m} for m in row["messages"]]  # every message has every field
    row["messages"][3]["tool_calls"] = []  # a plain answer stored with an empty list of calls
    assert validate_records([row], "sft", source="tools.parquet")[0] == [row]
    assert tokenize_sft_row(row, tokenizer, 1024) == tokenize_sft_row(TOOL_ROW, tokenizer, 1024)


def test_tool_messages_stay_out_of_preference_prompts() -> None:
    call = {**TOOL_ROW["messages"][1], "content": "Let me compute."}
    prompt = [
        TOOL_ROW["messages"][0],
        call,
        TOOL_ROW["messages"][2],
        {"role": "user", "content": "And 2 + 2?"},
    ]
    row = {"prompt": prompt, "chosen": "4.", "rejected": "5."}
    with pytest.raises(DataValidationError, match=r"field 'prompt\[2\]\.role'"):
        validate_records([row], "preference", source="prefs")


def test_truncation_cuts_tokens_and_labels_and_sets_the_flag(tokenizer) -> None:
    full = tokenize_conversation(MULTI_TURN, tokenizer, max_length=256)
    cut = tokenize_conversation(MULTI_TURN, tokenizer, max_length=20)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]
    exact = tokenize_conversation(MULTI_TURN, tokenizer, max_length=len(full.input_ids))
    assert not exact.truncated  # fitting exactly is not truncation


def test_build_rows_drops_examples_whose_answer_was_cut_off(tokenizer) -> None:
    records = synthetic_records("arithmetic", "sft", n=4, seed=0)
    # "<|endoftext|><|im_start|>user\nWhat is ..." is well over 8 tokens before the answer starts.
    with pytest.raises(ValueError, match="no training example"):
        build_rows(records, tokenizer, SFTTrainSpec(max_length=8), seed=0)
    long_record = {
        "messages": [
            {"role": "user", "content": "What is 1 + 1? " * 20},
            {"role": "assistant", "content": "2"},
        ]
    }
    rows, stats = build_rows([*records, long_record], tokenizer, SFTTrainSpec(max_length=80), seed=0)
    # The long question is cut at 80 tokens before its answer: counted, then dropped.
    assert stats == {"examples": 4, "truncated_examples": 1, "examples_without_labels": 1}
    # The 4 arithmetic examples (35..40 tokens each) pack two per 80-token row.
    assert [r.position_ids.count(0) for r in rows] == [2, 2]
    assert all(len(r.input_ids) <= 80 for r in rows)


# --- packing --------------------------------------------------------------------------------


def test_pack_examples_respects_max_length_and_keeps_every_token(examples) -> None:
    lengths = [len(ex.input_ids) for ex in examples]
    max_length = lengths[0] + lengths[1]  # the first two fit exactly; greedy packing must use that
    rows = pack_examples(examples, max_length)
    assert all(len(r.input_ids) <= max_length for r in rows)
    assert len(rows[0].input_ids) == max_length
    assert [t for r in rows for t in r.input_ids] == [t for ex in examples for t in ex.input_ids]
    # position_ids restart at 0 at every example boundary.
    assert [p for r in rows for p in r.position_ids] == [p for n in lengths for p in range(n)]
    # Labels are each example's own, except the first label of every example, which is -100.
    assert [t for r in rows for t in r.labels] == [
        t for ex in examples for t in [IGNORE_INDEX, *ex.labels[1:]]
    ]
    for row in rows:
        assert all(
            lab == IGNORE_INDEX for lab, pos in zip(row.labels, row.position_ids, strict=True) if pos == 0
        )


def test_first_label_of_every_example_is_masked() -> None:
    # Hand-made examples trained on every token (real ones start with bos, which is never trained).
    # In a packed row, token 8 would otherwise be "predicted" from token 7 of the previous example.
    examples = [TokenizedExample([5, 6, 7], [5, 6, 7]), TokenizedExample([8, 9], [8, 9])]
    (row,) = pack_examples(examples, max_length=5)
    assert row.labels == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]
    assert row.position_ids == [0, 1, 2, 0, 1]
    assert [r.labels for r in unpacked_rows(examples)] == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9]]
    assert len(pack_examples(examples, max_length=4)) == 2  # 3 + 2 tokens do not fit in 4


def test_pack_examples_greedy_row_count(examples) -> None:
    n = max(len(ex.input_ids) for ex in examples)
    # With max_length = longest example, no two examples fit together (all are > n/2 long).
    assert min(len(ex.input_ids) for ex in examples) > n / 2
    assert len(pack_examples(examples, n)) == len(examples)
    # With room for everything, one row.
    assert len(pack_examples(examples, sum(len(ex.input_ids) for ex in examples))) == 1


def test_collate_pads_right_with_ignored_labels_and_restarting_positions() -> None:
    rows = [Row([5, 6, 7], [IGNORE_INDEX, 6, 7], [0, 1, 2]), Row([8], [IGNORE_INDEX], [0])]
    batch = collate(rows, pad_token_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX] * 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    # Padding of a packed row is its own position run, so it is a separate "example" nothing attends to.
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]


# --- packed loss == loss of each example alone ----------------------------------------------


def example_spans(row: Row) -> list[tuple[int, int]]:
    """[start, end) of every example in a packed row (a new example starts where position_ids is 0)."""
    starts = [i for i, p in enumerate(row.position_ids) if p == 0]
    return list(zip(starts, [*starts[1:], len(row.position_ids)], strict=True))


def loss_of_span(
    model, batch: dict[str, torch.Tensor], row: int, start: int, end: int, packed: bool
) -> float:
    """token_loss_sum restricted to the labels of one example; the forward pass sees the whole batch."""
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    labels[row, start:end] = batch["labels"][row, start:end]
    with torch.no_grad():
        return token_loss_sum(model, {**batch, "labels": labels}, packed=packed).item()


def loss_alone(model, example: TokenizedExample, pad_token_id: int) -> float:
    with torch.no_grad():
        return token_loss_sum(model, collate(unpacked_rows([example]), pad_token_id), packed=False).item()


def test_packed_example_loss_equals_its_loss_alone(model64, tokenizer, examples) -> None:
    rows = pack_examples(examples, max_length=sum(len(ex.input_ids) for ex in examples))
    assert len(rows) == 1 and len(example_spans(rows[0])) == len(examples)
    batch = collate(rows, tokenizer.pad_token_id)
    alone = [loss_alone(model64, ex, tokenizer.pad_token_id) for ex in examples]
    packed = [loss_of_span(model64, batch, 0, s, e, packed=True) for s, e in example_spans(rows[0])]
    assert packed == pytest.approx(alone, rel=0, abs=1e-5)
    with torch.no_grad():
        whole_row = token_loss_sum(model64, batch, packed=True).item()
    assert whole_row == pytest.approx(sum(alone), rel=0, abs=1e-5)
    # A loss of ~ln(303) = 5.7 per trained token at initialisation: the sums are far from zero.
    assert all(a > 5 * ex.n_label_tokens for a, ex in zip(alone, examples, strict=True))

    # Negative control: the same row with an all-ones attention mask lets every example attend to the
    # ones before it. The first example is unchanged (causal), every later one changes by far more than
    # the tolerance; so the check above would catch leakage across boundaries.
    assert batch["attention_mask"].all()
    leaky = [loss_of_span(model64, batch, 0, s, e, packed=False) for s, e in example_spans(rows[0])]
    assert leaky[0] == pytest.approx(alone[0], rel=0, abs=1e-5)
    assert all(abs(leak - a) > 1e-3 for leak, a in zip(leaky[1:], alone[1:], strict=True))


def test_packed_batch_with_padding_matches_examples_alone(model64, tokenizer, examples) -> None:
    lengths = [len(ex.input_ids) for ex in examples]
    rows = pack_examples(examples, max_length=max(lengths[0] + lengths[1], lengths[2] + lengths[3]))
    assert [len(example_spans(r)) for r in rows] == [2, 2]
    batch = collate(rows, tokenizer.pad_token_id)
    assert not batch["attention_mask"].all()  # one of the two rows is right-padded
    packed = [
        loss_of_span(model64, batch, i, s, e, packed=True)
        for i, row in enumerate(rows)
        for s, e in example_spans(row)
    ]
    alone = [loss_alone(model64, ex, tokenizer.pad_token_id) for ex in examples]
    assert packed == pytest.approx(alone, rel=0, abs=1e-5)


def test_unpacked_right_padded_batch_matches_examples_alone(model64, tokenizer, examples) -> None:
    rows = unpacked_rows(examples)
    batch = collate(rows, tokenizer.pad_token_id)
    assert len({len(r.input_ids) for r in rows}) > 1  # lengths differ, so there is padding
    batched = [loss_of_span(model64, batch, i, 0, len(r.input_ids), packed=False) for i, r in enumerate(rows)]
    alone = [loss_alone(model64, ex, tokenizer.pad_token_id) for ex in examples]
    assert batched == pytest.approx(alone, rel=0, abs=1e-5)
    with torch.no_grad():
        total = token_loss_sum(model64, batch, packed=False).item()
    assert total == pytest.approx(sum(alone), rel=0, abs=1e-5)  # padding contributes no loss
