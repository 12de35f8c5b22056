"""Preference data for direct alignment: the row shapes of public datasets, unpaired (KTO) rows, and
their tokenization as prompt ids followed by completion ids."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from rlhf_core.data import (
    DataValidationError,
    load_records,
    preference_parts,
    prompt_key,
    read_jsonl,
    unpaired_parts,
    validate_records,
)
from rlhf_core.dataset_preparation import prepare_dataset
from rlhf_core.errors import UserError
from rlhf_core.modeling.models import build_tiny_model
from rlhf_core.modeling.preference_tokens import (
    ChatTemplateError,
    OverlongPairError,
    encode_completion,
    group_pairs,
    tokenize_preference_rows,
    tokenize_unpaired_rows,
)
from rlhf_core.modeling.tokenizer import CHATML_TEMPLATE, IM_END
from rlhf_core.rollout.generation import chat_prompt
from rlhf_core.spec import DatasetStage, TinyModelSource
from rlhf_core.stage_environment import NoInputs, StageEnvironment


def _chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


SYSTEM = ("system", "Be brief.")
# a multi-turn prompt with a system message and an earlier assistant turn (HH-RLHF, UltraFeedback)
HISTORY = _chat(SYSTEM, ("user", "What is 1 + 1?"), ("assistant", "1 + 1 = 2. The answer is 2."))
QUESTION = ("user", "What is 2 + 2?")
PROMPT = [*HISTORY, *_chat(QUESTION)]
Y_C, Y_R = "2 + 2 = 4. The answer is 4.", "2 + 2 = 5. The answer is 5."


def _implicit(chosen_prompt: list[dict], rejected_prompt: list[dict]) -> dict:
    return {
        "chosen": [*chosen_prompt, *_chat(("assistant", Y_C))],
        "rejected": [*rejected_prompt, *_chat(("assistant", Y_R))],
    }


# --- row shapes -----------------------------------------------------------------------------

SHAPES = {
    "plain": ({"prompt": "What is 2 + 2?", "chosen": Y_C, "rejected": Y_R}, _chat(QUESTION)),
    "conversational": (
        {"prompt": PROMPT, "chosen": _chat(("assistant", Y_C)), "rejected": _chat(("assistant", Y_R))},
        PROMPT,
    ),
    "conversational prompt, string replies": ({"prompt": PROMPT, "chosen": Y_C, "rejected": Y_R}, PROMPT),
    "implicit prompt": (_implicit(PROMPT, PROMPT), PROMPT),
    "implicit prompt, null prompt column": (  # a Parquet file mixing shapes
        {"prompt": None, **_implicit(_chat(QUESTION), _chat(QUESTION))},
        _chat(QUESTION),
    ),
    "implicit prompt, agreeing prompt column": (  # HuggingFaceH4/ultrafeedback_binarized
        {"prompt": "What is 2 + 2?", **_implicit(_chat(QUESTION), _chat(QUESTION))},
        _chat(QUESTION),
    ),
}  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
def test_every_row_shape_validates_and_normalises(shape: str) -> None:
    row, prompt = SHAPES[shape]
    extra = {**row, "score_chosen": 8.0}  # extra columns are kept
    assert validate_records([extra], "preference", source="prefs") == ([extra], [])
    assert preference_parts(row) == (prompt, Y_C, Y_R)
    assert tuple(preference_parts(row)) == (preference_parts(row).prompt, Y_C, Y_R)  # a plain tuple


def test_message_keys_other_than_role_and_content_are_dropped() -> None:
    tagged = [{**m, "name": "x"} for m in PROMPT]
    row = {"prompt": tagged, "chosen": Y_C, "rejected": Y_R}
    assert validate_records([row], "preference", source="p")[1] == []
    assert preference_parts(row).prompt == PROMPT
    assert tagged[0]["name"] == "x"  # the row is not modified


def test_prompt_key_groups_the_same_chat() -> None:
    assert prompt_key("What is 2 + 2?") == prompt_key(_chat(QUESTION))  # they render the same chat
    assert prompt_key(_chat(QUESTION)) == '[{"content": "What is 2 + 2?", "role": "user"}]'
    assert prompt_key(PROMPT) != prompt_key(_chat(QUESTION))
    assert len({prompt_key(SHAPES[s][1]) for s in SHAPES}) == 2


@pytest.mark.parametrize(
    ("bad", "field", "expected"),
    [
        # conversational prompt
        (
            {"prompt": [*HISTORY], "chosen": Y_C, "rejected": Y_R},
            "prompt[2].role",
            "the last message to be from 'user', got 'assistant'",
        ),
        (
            {"prompt": _chat(QUESTION, SYSTEM, QUESTION), "chosen": Y_C, "rejected": Y_R},
            "prompt[1].role",
            "a 'system' message only as the first message",
        ),
        ({"prompt": [], "chosen": Y_C, "rejected": Y_R}, "prompt", "a non-empty list of messages, got []"),
        (
            {"prompt": PROMPT, "chosen": _chat(("user", Y_C)), "rejected": Y_R},
            "chosen[0].role",
            "'assistant', got 'user'",
        ),
        (
            {"prompt": PROMPT, "chosen": [], "rejected": Y_R},
            "chosen",
            "a list with exactly one 'assistant' message, got 0 messages",
        ),
        (
            {"prompt": PROMPT, "chosen": Y_C, "rejected": None},
            "rejected",
            "a non-empty string or a list with one 'assistant' message, got None",
        ),
        (
            {"prompt": PROMPT, "chosen": _chat(("assistant", Y_C)), "rejected": f"{Y_C} "},
            "rejected",
            "a response different from 'chosen' (they are identical)",
        ),
        # implicit prompt
        (
            {"chosen": Y_C, "rejected": Y_R},
            "prompt",
            "a non-empty string or a list of messages ending in a 'user' turn "
            "(or whole conversations in 'chosen' and 'rejected'), got None",
        ),
        (
            _implicit(PROMPT, [*HISTORY[:2], *_chat(("assistant", "2."), QUESTION)]),
            "rejected[2]",
            "the turn chosen[2]: only the final turns may differ "
            "(the prompt is the turns 'chosen' and 'rejected' share)",
        ),
        (
            _implicit(PROMPT, _chat(QUESTION)),
            "rejected[0]",
            "the turn chosen[0]: only the final turns may differ",
        ),
        (
            {**_implicit(PROMPT, PROMPT), "rejected": Y_R},
            "rejected",
            "a whole conversation ending in a user then an assistant turn "
            "(the prompt is the turns 'chosen' and 'rejected' share), got '2 + 2 = 5. The answer is 5.'",
        ),
        (
            {"chosen": _chat(("assistant", Y_C)), "rejected": _chat(("assistant", Y_R))},
            "chosen",
            "a whole conversation ending in a user then an assistant turn "
            "(the prompt is the turns 'chosen' and 'rejected' share), got 1 message(s)",
        ),
        (
            {"chosen": _chat(QUESTION, ("user", Y_C)), "rejected": _chat(QUESTION, ("assistant", Y_R))},
            "chosen[1].role",
            "the last message to be from 'assistant', got 'user'",
        ),
        (
            _implicit(_chat(SYSTEM), _chat(SYSTEM)),
            "chosen[0].role",
            "a 'user' turn before the final 'assistant' turn, got 'system'",
        ),
        (
            {**_implicit(PROMPT, PROMPT), "rejected": [*PROMPT, *_chat(("assistant", Y_C))]},
            "rejected",
            "a response different from 'chosen' (they are identical)",
        ),
        (
            {**_implicit(_chat(QUESTION), _chat(QUESTION)), "prompt": "What is 3 + 3?"},
            "prompt",
            "the same turns as 'chosen' before its final one "
            "(the prompt is the turns 'chosen' and 'rejected' share), got 'What is 3 + 3?'",
        ),
    ],
)
def test_preference_row_errors_name_row_field_and_expectation(bad: dict, field: str, expected: str) -> None:
    good = SHAPES["plain"][0]
    with pytest.raises(DataValidationError) as info:
        validate_records([good, bad], "preference", source="prefs.jsonl")
    assert str(info.value).startswith(f"in prefs.jsonl, row 1 (0-based), field {field!r}: expected ")
    assert expected in str(info.value)
    assert info.value.row == 1 and info.value.field == field


# --- unpaired rows (KTO) --------------------------------------------------------------------

UNPAIRED = [
    {"prompt": "What is 2 + 2?", "completion": Y_C, "label": True},
    {"prompt": PROMPT, "completion": _chat(("assistant", Y_R)), "label": False},
    {"prompt": "What is 2 + 2?", "completion": Y_R, "label": 0},
    {"prompt": "What is 2 + 2?", "completion": Y_C, "label": 1},
]


def test_unpaired_rows_validate_and_normalise_with_0_1_labels() -> None:
    assert validate_records(UNPAIRED, "unpaired_preference", source="kto") == (UNPAIRED, [])
    parts = [unpaired_parts(r) for r in UNPAIRED]
    assert parts[1] == (PROMPT, Y_R, False)
    assert [p.label for p in parts] == [True, False, False, True]
    assert all(type(p.label) is bool for p in parts)


@pytest.mark.parametrize(
    ("bad", "field", "expected"),
    [
        ({**UNPAIRED[0], "label": "yes"}, "label", "true or false (is the completion desirable?), or 1 or 0"),
        ({**UNPAIRED[0], "label": 2}, "label", "got 2"),
        ({**UNPAIRED[0], "label": 1.0}, "label", "got 1.0"),
        ({k: v for k, v in UNPAIRED[0].items() if k != "label"}, "label", "got None"),
        ({**UNPAIRED[0], "completion": ""}, "completion", "a non-empty string or a list with one"),
        ({**UNPAIRED[0], "prompt": HISTORY}, "prompt[2].role", "the last message to be from 'user'"),
    ],
)  # fmt: skip
def test_unpaired_row_errors_name_row_and_field(bad: dict, field: str, expected: str) -> None:
    with pytest.raises(DataValidationError) as info:
        validate_records([UNPAIRED[0], bad], "unpaired_preference", source="kto.jsonl")
    assert str(info.value).startswith(f"in kto.jsonl, row 1 (0-based), field {field!r}: expected ")
    assert expected in str(info.value)


# --- loading and the dataset stage ----------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_implicit_prompt_file_needs_no_prompt_column(tmp_path: Path) -> None:
    row = SHAPES["implicit prompt"][0]
    path = _write_jsonl(tmp_path / "hh.jsonl", [row])
    assert load_records(str(path), fmt="preference") == [row]
    only_chosen = _write_jsonl(tmp_path / "bad.jsonl", [{"chosen": Y_C}])
    with pytest.raises(DataValidationError) as info:
        load_records(str(only_chosen), fmt="preference")
    assert (
        "columns ['prompt', 'chosen', 'rejected'] or ['chosen', 'rejected'] for format 'preference'"
        in str(info.value)
    )


THUMBS = [
    {"question": f"What is {i} + 1?", "response": f"{i} + 1 = {i + 1 + i % 2}.", "thumbs_up": int(i % 2 == 0)}
    for i in range(10)
]


def test_unpaired_file_loads_with_column_mapping(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "thumbs.jsonl", THUMBS)
    columns = {"prompt": "question", "completion": "response", "label": "thumbs_up"}
    rows = load_records(str(path), fmt="unpaired_preference", column_map=columns)
    assert rows[1] == {"prompt": "What is 1 + 1?", "completion": "1 + 1 = 3.", "label": 0}
    assert validate_records(rows, "unpaired_preference", source=str(path)) == (rows, [])
    with pytest.raises(DataValidationError, match=r"missing \['prompt', 'completion', 'label'\]"):
        load_records(str(path), fmt="unpaired_preference")


def test_dataset_stage_prepares_an_unpaired_file(tmp_path: Path) -> None:
    theirs = copy.deepcopy(THUMBS)
    theirs[4]["thumbs_up"] = "maybe"  # skipped and reported
    path = _write_jsonl(tmp_path / "thumbs.jsonl", theirs)
    columns = {"prompt": "question", "completion": "response", "label": "thumbs_up"}
    source = {"file": {"path": str(path), "format": "unpaired_preference", "columns": columns}}
    stage = DatasetStage.model_validate({"kind": "dataset", "source": source, "on_error": "skip"})
    assert {name: str(t) for name, t in stage.output_types().items()} == {
        "unpaired_preferences": "dataset:unpaired_preference"
    }
    prepared = prepare_dataset(stage, NoInputs(), StageEnvironment.local("kto_data", 0, tmp_path))
    out = prepared.outputs["unpaired_preferences"]
    assert out.kind == "unpaired_preference" and out.columns == ("completion", "label", "prompt")
    assert out.splits == {"train": 8, "eval": 1}
    assert prepared.problems == [
        "in stage 'kto_data' (unpaired_preferences), row 4 (0-based), field 'label': expected true or false "
        "(is the completion desirable?), or 1 or 0, got 'maybe'"
    ]
    rows = read_jsonl(out.directory / "train.jsonl") + read_jsonl(out.directory / "eval.jsonl")
    assert sorted(r["prompt"] for r in rows) == sorted(f"What is {i} + 1?" for i in range(10) if i != 4)
    assert validate_records(rows, "unpaired_preference", source="out")[1] == []


# --- tokenization ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)[1]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_and_completion_ids_are_what_generation_starts_from_and_samples(tokenizer) -> None:
    row = SHAPES["conversational"][0]
    (pair,), report = tokenize_preference_rows([row], tokenizer, max_length=256, source="prefs")
    # x: the whole conversation, then the generation header a sampler continues from
    generation_prompt = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert pair.prompt == _ids(tokenizer, generation_prompt)
    assert tokenizer.decode(pair.prompt).startswith("<|endoftext|><|im_start|>system\nBe brief.<|im_end|>")
    assert tokenizer.decode(pair.prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")
    # y: the completion's own tokens, then the end-of-turn token a sampler stops at
    assert tokenizer.decode(pair.chosen) == Y_C + IM_END
    assert tokenizer.decode(pair.rejected) == Y_R + IM_END
    assert pair.chosen == [*_ids(tokenizer, Y_C), tokenizer.eos_token_id]
    # and prompt + completion is the sequence a reward model scores
    assert pair.prompt + pair.chosen == encode_completion(tokenizer, PROMPT, Y_C)
    assert (pair.row, report.rows, report.truncated, report.skipped) == (0, 1, 0, 0)


def test_plain_prompt_ids_are_chat_prompt_and_every_shape_tokenizes_alike(tokenizer) -> None:
    plain, _ = tokenize_preference_rows([SHAPES["plain"][0]], tokenizer, max_length=256)
    assert plain[0].prompt == _ids(tokenizer, chat_prompt(tokenizer, "What is 2 + 2?"))
    assert plain[0].prompt + plain[0].rejected == encode_completion(tokenizer, "What is 2 + 2?", Y_R)
    rows = [SHAPES[s][0] for s in SHAPES]
    pairs, _ = tokenize_preference_rows(rows, tokenizer, max_length=256)
    tokens = {(tuple(p.prompt), tuple(p.chosen), tuple(p.rejected)) for p in pairs}
    assert len(tokens) == 2  # one tokenization per distinct prompt, whatever the row's shape


def test_truncate_prompt_cuts_the_prompt_from_the_left_and_keeps_completions_whole(tokenizer) -> None:
    rows = [SHAPES["conversational"][0], {**SHAPES["plain"][0], "rejected": "1 " * 40}]
    full, _ = tokenize_preference_rows(rows[:1], tokenizer, max_length=256)
    p, c, r = full[0].prompt, full[0].chosen, full[0].rejected
    longest = max(len(c), len(r))
    max_length = longest + 10  # room for the last 10 prompt tokens only
    assert len(p) > 10
    pairs, report = tokenize_preference_rows(
        rows, tokenizer, max_length=max_length, on_overlong="truncate_prompt", source="prefs"
    )
    assert len(_ids(tokenizer, rows[1]["rejected"])) >= max_length
    (pair,) = pairs  # the second pair's completion alone does not fit: dropped and counted
    assert pair.prompt == p[-10:] and (pair.chosen, pair.rejected) == (c, r)
    assert tokenizer.decode(pair.prompt).endswith("<|im_start|>assistant\n")
    assert len(pair.prompt) + longest == max_length
    assert (report.rows, report.kept, report.truncated, report.skipped) == (2, 1, 1, 1)
    assert report.metrics("train/") == {
        "train/rows": 2.0,
        "train/truncated_prompts": 1.0,
        "train/skipped_rows": 1.0,
    }


def test_a_completion_that_fills_max_length_keeps_one_prompt_token_or_is_dropped(tokenizer) -> None:
    (pair,), _ = tokenize_preference_rows([SHAPES["plain"][0]], tokenizer, max_length=256)
    longest = max(len(pair.chosen), len(pair.rejected))
    fits, report = tokenize_preference_rows(
        [SHAPES["plain"][0]], tokenizer, max_length=longest + 1, on_overlong="truncate_prompt"
    )
    assert fits[0].prompt == pair.prompt[-1:] and report.truncated == 1
    dropped, report = tokenize_preference_rows(
        [SHAPES["plain"][0]], tokenizer, max_length=longest, on_overlong="truncate_prompt"
    )
    assert dropped == [] and report.skipped == 1 and report.truncated == 0


def test_skip_drops_and_counts_and_fail_names_row_lengths_and_side(tokenizer) -> None:
    other = {"prompt": "What is 3 + 3?", "chosen": "3 + 3 = 6.", "rejected": "3 + 3 = 7."}
    rows = [SHAPES["plain"][0], {**SHAPES["plain"][0], "chosen": "1 " * 40}, other]
    pairs, report = tokenize_preference_rows(rows, tokenizer, max_length=64, on_overlong="skip")
    assert [p.row for p in pairs] == [0, 2] and (report.kept, report.skipped, report.truncated) == (2, 1, 0)
    with pytest.raises(OverlongPairError) as info:
        tokenize_preference_rows(rows, tokenizer, max_length=64, on_overlong="fail", source="prefs")
    prompt = len(_ids(tokenizer, chat_prompt(tokenizer, "What is 2 + 2?")))
    chosen = len(_ids(tokenizer, ("1 " * 40).strip())) + 1  # the template trims the text; then <|im_end|>
    rejected = len(_ids(tokenizer, Y_R)) + 1
    assert prompt + rejected <= 64 < prompt + chosen
    assert str(info.value) == (
        f"in prefs, row 1 (0-based): prompt + chosen is {prompt + chosen} tokens (prompt {prompt}, chosen "
        f"{chosen}, rejected {rejected}), longer than max_length 64; raise max_length, or set on_overlong: "
        "truncate_prompt (cut the prompt from the left) or skip"
    )
    assert isinstance(info.value, UserError)


def test_bad_options_are_rejected(tokenizer) -> None:
    with pytest.raises(ValueError, match="on_overlong"):
        tokenize_preference_rows([], tokenizer, max_length=64, on_overlong="truncate")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_length"):
        tokenize_unpaired_rows([], tokenizer, max_length=1)


def test_unpaired_rows_tokenize_with_their_labels(tokenizer) -> None:
    examples, report = tokenize_unpaired_rows(UNPAIRED, tokenizer, max_length=256, source="kto")
    assert [(e.row, e.label) for e in examples] == [(0, True), (1, False), (2, False), (3, True)]
    assert examples[0].prompt == _ids(tokenizer, chat_prompt(tokenizer, "What is 2 + 2?"))
    assert tokenizer.decode(examples[1].completion) == Y_R + IM_END
    generation_prompt = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert examples[1].prompt == _ids(tokenizer, generation_prompt)
    assert (report.rows, report.truncated, report.skipped) == (4, 0, 0)
    # lengths as for pairs: the long prompt is cut from the left, the completion kept whole
    room = len(examples[1].completion) + 5
    cut, report = tokenize_unpaired_rows(
        UNPAIRED[1:2], tokenizer, max_length=room, on_overlong="truncate_prompt"
    )
    assert cut[0].prompt == examples[1].prompt[-5:] and cut[0].completion == examples[1].completion
    assert report.truncated == 1
    with pytest.raises(
        OverlongPairError, match=r"^in kto, row 0 \(0-based\): prompt \+ completion is \d+ tok"
    ):
        tokenize_unpaired_rows(UNPAIRED, tokenizer, max_length=room, source="kto")


def test_a_chat_template_that_cannot_render_a_row_names_the_row(tokenizer) -> None:
    # two user turns in a row are a valid row, but ChatML wants alternating turns
    row = {"prompt": _chat(("user", "hi"), QUESTION), "chosen": Y_C, "rejected": Y_R}
    with pytest.raises(ChatTemplateError, match=r"^in prefs, row 0 \(0-based\): .*must alternate"):
        tokenize_preference_rows([row], tokenizer, max_length=256, source="prefs")


def test_a_template_whose_completion_does_not_follow_the_generation_prompt_is_refused(tokenizer) -> None:
    thinking = copy.deepcopy(tokenizer)  # the generation header opens a block the rendered turn lacks
    header = "{{ '<|im_start|>assistant\n' }}{% endif %}"
    assert header in CHATML_TEMPLATE
    thinking.chat_template = CHATML_TEMPLATE.replace(
        header, "{{ '<|im_start|>assistant\n<think>' }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match=r"^in kto, row 0 \(0-based\): the chat template does not"):
        tokenize_unpaired_rows(UNPAIRED, thinking, max_length=256, source="kto")


# --- grouping for the reward model ----------------------------------------------------------


def test_group_pairs_groups_by_prompt_whatever_the_shape(tokenizer) -> None:
    plain = SHAPES["plain"][0]
    other = {"prompt": "What is 3 + 3?", "chosen": "3 + 3 = 6.", "rejected": "3 + 3 = 7."}
    rows = [plain, SHAPES["conversational"][0], other, SHAPES["implicit prompt, agreeing prompt column"][0]]
    groups, skipped = group_pairs(rows, tokenizer, max_length=256)
    assert skipped == 0 and [len(g.chosen) for g in groups] == [2, 1, 1]  # rows 0 and 3: one prompt
    assert groups[0].chosen == [encode_completion(tokenizer, "What is 2 + 2?", Y_C)] * 2
    assert groups[1].rejected == [encode_completion(tokenizer, PROMPT, Y_R)]
