"""Tests for rlhf_core.data: synthetic task, validation, loading, splitting, digests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_core.data import (
    REQUIRED_COLUMNS,
    ArithmeticProblem,
    DataValidationError,
    arithmetic_corpus,
    directory_digest,
    extract_answer,
    file_digest,
    format_solution,
    generate_arithmetic,
    is_correct,
    load_records,
    read_jsonl,
    sft_messages,
    split_records,
    synthetic_records,
    to_preference_record,
    to_prompt_record,
    to_sft_record,
    validate_records,
    write_jsonl,
)
from rlhf_core.dataset_preparation import prepare_dataset
from rlhf_core.errors import UserError
from rlhf_core.spec import DatasetStage
from rlhf_core.stage_environment import NoInputs, StageEnvironment

# --- synthetic arithmetic -------------------------------------------------------------------


def test_generator_is_deterministic_per_seed() -> None:
    assert generate_arithmetic(50, seed=3) == generate_arithmetic(50, seed=3)
    assert generate_arithmetic(50, seed=3) != generate_arithmetic(50, seed=4)


def test_golden_first_problem_for_seed_0() -> None:
    # Derivation: random.Random(0) draws a = randint(0, 20) = 12, b = randint(0, 20) = 13,
    # then choice(("+", "-")) = "+", so the first problem is 12 + 13 = 25.
    rng = random.Random(0)
    assert (rng.randint(0, 20), rng.randint(0, 20), rng.choice(("+", "-"))) == (12, 13, "+")
    first = generate_arithmetic(1, seed=0)[0]
    assert first == ArithmeticProblem(question="What is 12 + 13?", answer=25)
    assert format_solution(first) == "12 + 13 = 25. The answer is 25."


def test_problems_respect_operands_and_operations() -> None:
    for p in generate_arithmetic(200, seed=1, max_operand=5, operations=("*",)):
        a, op, b = p.question.removeprefix("What is ").removesuffix("?").split(" ")
        assert op == "*" and 0 <= int(a) <= 5 and 0 <= int(b) <= 5
        assert p.answer == int(a) * int(b)


def test_unknown_operation_is_rejected() -> None:
    with pytest.raises(ValueError, match="operations"):
        generate_arithmetic(1, seed=0, operations=("/",))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7 + 12 = 19. The answer is 19.", 19),
        ("8 - 16 = -8. The answer is -8.", -8),
        ("The answer is 4. Wait, 5? The answer is 6.", 6),  # the last marked answer wins
        ("I think 3, no, 11", 11),  # no marker: the last integer
        ("no number here", None),
    ],
)
def test_extract_answer(text: str, expected: int | None) -> None:
    assert extract_answer(text) == expected


def test_is_correct() -> None:
    assert is_correct("7 + 12 = 19. The answer is 19.", 19)
    assert is_correct("The answer is -8.", "-8")
    assert not is_correct("7 + 12 = 20. The answer is 20.", 19)
    assert not is_correct("I don't know", 0)


def test_preference_record_chosen_correct_rejected_wrong() -> None:
    rng = random.Random(0)
    for p in generate_arithmetic(100, seed=2):
        row = to_preference_record(p, rng)
        assert row["prompt"] == p.question
        assert is_correct(row["chosen"], p.answer)
        assert not is_correct(row["rejected"], p.answer)
        assert 1 <= abs(extract_answer(row["rejected"]) - p.answer) <= 3


def test_unpaired_record_is_labelled_by_correctness() -> None:
    rows = synthetic_records("arithmetic", "unpaired_preference", 100, seed=0)
    problems = generate_arithmetic(100, seed=0)
    assert [r["label"] for r in rows] == [
        is_correct(r["completion"], p.answer) for r, p in zip(rows, problems, strict=True)
    ]
    assert 30 < sum(r["label"] for r in rows) < 70  # both kinds, drawn at random


def test_record_builders_and_dispatch_pass_validation() -> None:
    p = ArithmeticProblem("What is 7 + 12?", 19)
    assert to_sft_record(p)["messages"][-1] == {
        "role": "assistant",
        "content": "7 + 12 = 19. The answer is 19.",
    }
    assert to_prompt_record(p) == {"prompt": "What is 7 + 12?", "answer": "19"}
    for fmt in REQUIRED_COLUMNS:
        rows = synthetic_records("arithmetic", fmt, 20, seed=0)
        assert rows == synthetic_records("arithmetic", fmt, 20, seed=0)
        assert validate_records(rows, fmt, source="synthetic") == (rows, [])


def test_unknown_synthetic_task_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="arithmetic"):
        synthetic_records("chess", "sft", 1, seed=0)


def test_corpus_contains_questions_and_solutions() -> None:
    lines = arithmetic_corpus(10, seed=0)
    assert len(lines) == 20 and lines == arithmetic_corpus(10, seed=0)
    assert lines[0].startswith("What is ") and "The answer is" in lines[1]


# --- validation -----------------------------------------------------------------------------

GOOD = {
    "sft": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    "preference": {"prompt": "x", "chosen": "a", "rejected": "b"},
    "prompts": {"prompt": "x"},
    "unpaired_preference": {"prompt": "x", "completion": "a", "label": True},
}


def _sft(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def _chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


ANSWER = _chat(("assistant", "4"))


@pytest.mark.parametrize(
    ("fmt", "bad", "field"),
    [
        ("sft", {"id": 1}, "'messages'"),
        ("sft", {"messages": []}, "'messages'"),
        ("sft", _sft(("user", "hi"), ("bot", "x")), "'messages[1].role'"),
        ("sft", _sft(("user", "hi"), ("assistant", "")), "'messages[1].content'"),
        ("sft", _sft(("user", "hi"), ("assistant", "a"), ("user", "more")), "'messages[2].role'"),
        ("sft", _sft(("user", "hi"), ("system", "s"), ("assistant", "a")), "'messages[1].role'"),
        # prompt/completion rows
        ("sft", {"prompt": "2 + 2?"}, "'completion'"),
        ("sft", {"completion": "4"}, "'prompt'"),
        ("sft", {"prompt": "2 + 2?", "completion": ""}, "'completion'"),
        ("sft", {"prompt": "2 + 2?", "completion": "   "}, "'completion'"),
        ("sft", {"prompt": "", "completion": "4"}, "'prompt'"),
        ("sft", {"prompt": [], "completion": "4"}, "'prompt'"),
        ("sft", {"prompt": _chat(("user", "hi"), ("bot", "x")), "completion": "4"}, "'prompt[1].role'"),
        ("sft", {"prompt": _chat(("user", "hi"), ("system", "s")), "completion": "4"}, "'prompt[1].role'"),
        (
            "sft",
            {"prompt": _chat(("user", "2 + 2?"), ("assistant", "4")), "completion": "4"},
            "'prompt[1].role'",
        ),
        ("sft", {"prompt": "2 + 2?", "completion": []}, "'completion'"),
        ("sft", {"prompt": "2 + 2?", "completion": [*ANSWER, *ANSWER]}, "'completion'"),
        ("sft", {"prompt": "2 + 2?", "completion": _chat(("user", "4"))}, "'completion[0].role'"),
        ("sft", {"prompt": "2 + 2?", "completion": _chat(("assistant", ""))}, "'completion[0].content'"),
        ("sft", {"prompt": "2 + 2?", "completion": {"role": "assistant", "content": "4"}}, "'completion'"),
        ("preference", {"prompt": "x", "chosen": "a"}, "'rejected'"),
        ("preference", {"prompt": "  ", "chosen": "a", "rejected": "b"}, "'prompt'"),
        ("preference", {"prompt": "x", "chosen": "a", "rejected": "a"}, "'rejected'"),
        ("preference", {"chosen": "a", "rejected": "b"}, "'prompt'"),  # no prompt: chosen must be a chat
        ("preference", {"prompt": "x", "chosen": ANSWER, "rejected": "4"}, "'rejected'"),  # same reply
        ("unpaired_preference", {"prompt": "x", "completion": "a"}, "'label'"),
        ("unpaired_preference", {"prompt": "x", "completion": "a", "label": "no"}, "'label'"),
        ("unpaired_preference", {"prompt": "x", "completion": ANSWER * 2, "label": 1}, "'completion'"),
        ("prompts", {"question": "x"}, "'prompt'"),
        ("prompts", {"prompt": ""}, "'prompt'"),
        ("prompts", {"prompt": "x", "answer": 3}, "'answer'"),
    ],
)
def test_validation_error_names_source_row_and_field(fmt: str, bad: dict, field: str) -> None:
    with pytest.raises(DataValidationError, match="expected") as info:
        validate_records([GOOD[fmt], bad], fmt, source="my.jsonl")
    message = str(info.value)
    assert "my.jsonl" in message and "row 1" in message and f"field {field}" in message
    assert info.value.row == 1


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"id": 1}, "expected 'messages' (a chat) or 'prompt' + 'completion', got columns ['id']"),
        (
            {"prompt": "2 + 2?", "completion": ""},
            "a non-empty string or a list with one 'assistant' message, got ''",
        ),
        (
            {"prompt": "2 + 2?", "completion": [*ANSWER, *ANSWER]},
            "a list with exactly one 'assistant' message, got 2 messages",
        ),
        ({"prompt": "2 + 2?", "completion": _chat(("user", "4"))}, "expected 'assistant', got 'user'"),
        (
            {"prompt": _chat(("user", "2 + 2?"), ("assistant", "4")), "completion": "4"},
            "the last message to be from 'user', got 'assistant'",
        ),
    ],
)
def test_sft_row_errors_say_what_was_expected(bad: dict, expected: str) -> None:
    with pytest.raises(DataValidationError) as info:
        validate_records([bad], "sft", source="qa.jsonl")
    assert str(info.value).startswith("in qa.jsonl, row 0 (0-based), field ")
    assert expected in str(info.value)


def test_sft_row_with_both_shapes_is_rejected() -> None:
    row = {**GOOD["sft"], "prompt": "hi", "completion": "hello"}
    with pytest.raises(DataValidationError) as info:
        validate_records([row], "sft", source="mixed.jsonl")
    assert str(info.value) == (
        "in mixed.jsonl, row 0 (0-based): expected either 'messages' or 'prompt' + 'completion', "
        "not both (drop or rename one)"
    )


PROMPT_COMPLETION_ROWS = [
    {"prompt": "What is 2 + 2?", "completion": "2 + 2 = 4. The answer is 4."},
    {"prompt": _chat(("user", "What is 2 + 2?")), "completion": _chat(("assistant", "4"))},
    {  # TRL's conversational prompt-completion, multi-turn with a system message
        "prompt": _chat(("system", "Be brief."), ("user", "1 + 1?"), ("assistant", "2"), ("user", "2 + 2?")),
        "completion": _chat(("assistant", "4")),
    },
    {"prompt": "What is 2 + 2?", "completion": "4", "messages": None},  # a null column is absent
]


def test_prompt_completion_rows_are_valid_sft_rows() -> None:
    assert validate_records(PROMPT_COMPLETION_ROWS, "sft", source="qa") == (PROMPT_COMPLETION_ROWS, [])
    # A messages row may keep a 'prompt' column (e.g. HuggingFaceH4/ultrachat_200k): it is extra.
    ultrachat = {**GOOD["sft"], "prompt": "hi", "prompt_id": "0"}
    assert validate_records([ultrachat], "sft", source="uc") == ([ultrachat], [])


def test_sft_messages_turns_prompt_completion_into_a_conversation() -> None:
    plain, listed, multi, with_null = PROMPT_COMPLETION_ROWS
    expected = _chat(("user", "What is 2 + 2?"), ("assistant", "2 + 2 = 4. The answer is 4."))
    assert sft_messages(plain) == (expected, True)
    assert sft_messages(listed) == (_chat(("user", "What is 2 + 2?"), ("assistant", "4")), True)
    assert sft_messages(multi) == ([*multi["prompt"], *multi["completion"]], True)
    assert sft_messages(with_null) == (_chat(("user", "What is 2 + 2?"), ("assistant", "4")), True)
    assert multi["prompt"][-1] == {"role": "user", "content": "2 + 2?"}  # the row is not modified
    # A messages row is its own conversation; its mask setting decides what is trained.
    assert sft_messages(GOOD["sft"]) == (GOOD["sft"]["messages"], False)
    assert sft_messages({**GOOD["sft"], "prompt": "hi"}) == (GOOD["sft"]["messages"], False)


def test_data_errors_are_user_errors() -> None:
    assert issubclass(DataValidationError, UserError)
    error = DataValidationError("f.jsonl", "a JSON object", line=3)
    assert str(error) == "in f.jsonl, line 3: expected a JSON object"


def test_system_first_is_valid_and_extra_columns_kept() -> None:
    row = {**_sft(("system", "be brief"), ("user", "hi"), ("assistant", "ok")), "id": 7}
    assert validate_records([row], "sft", source="s") == ([row], [])


def test_skip_mode_drops_bad_rows_and_reports_each() -> None:
    rows = [
        GOOD["preference"],
        {"prompt": "x"},
        GOOD["preference"],
        {"prompt": "x", "chosen": "", "rejected": "b"},
    ]
    valid, problems = validate_records(rows, "preference", source="prefs", on_error="skip")
    assert valid == [rows[0], rows[2]]
    assert len(problems) == 2
    assert "row 1" in problems[0] and "'chosen'" in problems[0]
    assert "row 3" in problems[1] and "'chosen'" in problems[1]


# --- loading --------------------------------------------------------------------------------

THEIRS = [{"question": f"q{i}", "extra": i} for i in range(5)]


def _write(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in THEIRS), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(THEIRS), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(THEIRS), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_load_local_file_with_column_map(tmp_path: Path, kind: str) -> None:
    path = _write(tmp_path, kind)
    rows = load_records(str(path), fmt="prompts", column_map={"prompt": "question"})
    assert rows == [{"prompt": f"q{i}", "extra": i} for i in range(5)]
    assert load_records(str(path), fmt="prompts", column_map={"prompt": "question"}, limit=2) == rows[:2]


def test_load_without_required_column_lists_missing_and_available(tmp_path: Path) -> None:
    path = _write(tmp_path, "jsonl")
    with pytest.raises(DataValidationError, match=r"missing \['prompt'\].*'question'"):
        load_records(str(path), fmt="prompts")


def test_load_question_answer_file_as_sft_prompt_completion(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    theirs = [
        {"question": "What is 2 + 2?", "answer": "4", "id": 0},
        {"question": "1 + 1?", "answer": "2", "id": 1},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in theirs), encoding="utf-8")
    rows = load_records(str(path), fmt="sft", column_map={"prompt": "question", "completion": "answer"})
    assert rows == [
        {"prompt": "What is 2 + 2?", "completion": "4", "id": 0},
        {"prompt": "1 + 1?", "completion": "2", "id": 1},
    ]
    assert validate_records(rows, "sft", source=str(path)) == (rows, [])
    assert sft_messages(rows[0]) == (_chat(("user", "What is 2 + 2?"), ("assistant", "4")), True)


def test_sft_file_with_neither_shape_names_both_options(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"prompt": "2 + 2?", "answer": "4"}) + "\n", encoding="utf-8")
    with pytest.raises(DataValidationError) as info:
        load_records(str(path), fmt="sft")
    assert str(info.value) == (
        f"in {path}: expected columns ['messages'] or ['prompt', 'completion'] for format 'sft'; "
        "missing ['messages'] or ['completion'], available ['prompt', 'answer'] (use column_map to rename)"
    )


def _qa_stage(path: Path) -> DatasetStage:
    columns = {"prompt": "question", "completion": "answer"}
    source = {"file": {"path": str(path), "format": "sft", "columns": columns}}
    return DatasetStage.model_validate({"kind": "dataset", "source": source, "on_error": "skip"})


def test_dataset_stage_prepares_a_question_answer_file(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    theirs = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(10)]
    theirs[3]["answer"] = ""  # skipped and reported
    path.write_text("".join(json.dumps(r) + "\n" for r in theirs), encoding="utf-8")
    prepared = prepare_dataset(_qa_stage(path), NoInputs(), StageEnvironment.local("data", 0, tmp_path))
    out = prepared.outputs["sft"]
    assert (
        out.kind == "sft"
        and out.columns == ("completion", "prompt")
        and out.splits == {"train": 8, "eval": 1}
    )
    assert len(prepared.problems) == 1 and "row 3 (0-based), field 'completion'" in prepared.problems[0]
    assert out.directory == tmp_path / "data" / "sft"
    assert prepared.summary() == {"sft_rows": 9.0, "rejected_rows": 1.0}
    rows = read_jsonl(out.directory / "train.jsonl") + read_jsonl(out.directory / "eval.jsonl")
    assert sorted(r["completion"] for r in rows) == sorted(str(i + 1) for i in range(10) if i != 3)


def test_dataset_stage_without_a_valid_row_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "2 + 2?", "answer": ""}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"^stage 'data': no valid sft rows left \(1 rejected\)$"):
        prepare_dataset(_qa_stage(path), NoInputs(), StageEnvironment.local("data", 0, tmp_path))


def test_missing_mapped_column_lists_available(tmp_path: Path) -> None:
    path = _write(tmp_path, "parquet")
    with pytest.raises(DataValidationError, match=r"'query'.*available columns: \['question', 'extra'\]"):
        load_records(str(path), fmt="prompts", column_map={"prompt": "query"})


def test_bad_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"bad\.jsonl, line 3"):
        load_records(str(path), fmt="prompts")


def test_load_saved_dataset_directory(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(THEIRS)}).save_to_disk(str(tmp_path / "saved"))
    rows = load_records(str(tmp_path / "saved"), fmt="prompts", column_map={"prompt": "question"}, limit=3)
    assert rows == [{"prompt": f"q{i}", "extra": i} for i in range(3)]


def test_write_then_read_jsonl_roundtrip(tmp_path: Path) -> None:
    rows = [{"prompt": "¿qué es 2 + 2?", "b": 1, "a": [1, 2]}]
    path = tmp_path / "sub" / "out.jsonl"
    write_jsonl(rows, path)
    assert read_jsonl(path) == rows
    assert path.read_text(encoding="utf-8") == '{"a": [1, 2], "b": 1, "prompt": "¿qué es 2 + 2?"}\n'
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]  # no temp file left


# --- splits and digests ---------------------------------------------------------------------


def test_split_is_deterministic_and_preserves_rows() -> None:
    rows = [{"i": i} for i in range(101)]
    splits = split_records(rows, {"train": 0.8, "eval": 0.2}, seed=0)
    assert splits == split_records(rows, {"train": 0.8, "eval": 0.2}, seed=0)
    assert splits != split_records(rows, {"train": 0.8, "eval": 0.2}, seed=1)
    assert (len(splits["train"]), len(splits["eval"])) == (81, 20)  # 80.8 -> 80 + largest remainder
    assert sorted(r["i"] for s in splits.values() for r in s) == list(range(101))


def test_every_split_gets_a_row_when_possible() -> None:
    splits = split_records([{"i": i} for i in range(5)], {"train": 0.98, "eval": 0.01, "test": 0.01}, seed=0)
    assert [len(s) for s in splits.values()] == [3, 1, 1]


def test_split_fractions_must_sum_to_one() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        split_records([{"i": 0}], {"train": 0.8, "eval": 0.1}, seed=0)


def test_digests_change_with_content(tmp_path: Path) -> None:
    f = tmp_path / "d" / "a.txt"
    f.parent.mkdir()
    f.write_text("one")
    # sha256("one"), computed independently with hashlib
    assert file_digest(f) == "7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed"
    one = directory_digest(f.parent)
    assert directory_digest(f.parent) == one
    f.write_text("two")
    two = directory_digest(f.parent)
    assert two != one
    f.rename(f.parent / "b.txt")  # same contents, different name
    assert directory_digest(f.parent) not in (one, two)


def test_jsonl_keeps_the_key_order_of_values_a_chat_template_renders(tmp_path) -> None:
    """A tool declaration's keys reach the model in the order they have: the file must not reorder them,
    or a model fine-tuned on the file sees another system turn than the environment gives it."""
    tools = [{"type": "function", "function": {"name": "calculator", "description": "d", "parameters": {}}}]
    row = {"tools": tools, "messages": [{"role": "user", "content": "hi"}]}
    write_jsonl([row], tmp_path / "rows.jsonl")
    (back,) = read_jsonl(tmp_path / "rows.jsonl")
    assert json.dumps(back["tools"]) == json.dumps(tools)
    assert list(back) == ["messages", "tools"]  # columns sorted
