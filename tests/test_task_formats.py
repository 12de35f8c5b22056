"""Real task formats: GSM8K, MATH, MBPP and HumanEval rows in, prompts (with answers and tests) and SFT
rows out, checked by the real verifiers; column maps into nested columns; the hub path on local files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rlhf_core.data.loading import load_records, read_jsonl, read_rows
from rlhf_core.data.schemas import DataValidationError, validate_records
from rlhf_core.data.task_presets import TASK_PRESETS, last_boxed, task_rows
from rlhf_core.dataset_preparation import prepare_dataset
from rlhf_core.errors import UserError
from rlhf_core.rewards.scorers import reward_scorer
from rlhf_core.spec import DatasetStage
from rlhf_core.stage_environment import NoInputs, StageEnvironment

FIXTURES = Path(__file__).resolve().parents[1] / "recipes" / "data"
GSM8K_ROW = {
    "question": "Ann has 3 bags of 4 apples. How many apples?",
    "answer": "3*4 = <<3*4=12>>12\n#### 12",
}


def _preset(task: str, **kwargs) -> tuple[dict[str, list[dict]], list[str], list[dict]]:
    rows, columns = read_rows(str(FIXTURES / f"{task}_sample.jsonl"))
    outputs, problems = task_rows(rows, task, source=task, available=columns, **kwargs)
    return outputs, problems, rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _stage(source: dict, on_error: str = "fail") -> DatasetStage:
    return DatasetStage.model_validate({"kind": "dataset", "source": source, "on_error": on_error})


# --- presets on their fixtures --------------------------------------------------------------------


def test_gsm8k_preset_carries_every_column_and_the_final_answer() -> None:
    outputs, problems, source = _preset("gsm8k")
    prompts, sft = outputs["prompts"], outputs["sft"]
    assert problems == [] and len(prompts) == len(sft) == len(source) == 40
    for theirs, prompt_row, sft_row in zip(source, prompts, sft, strict=True):
        assert prompt_row["prompt"] == prompt_row["question"] == theirs["question"]
        assert prompt_row["solution"] == theirs["answer"]  # the worked solution, "...#### 72"
        assert prompt_row["answer"] == theirs["answer"].rsplit("#### ", 1)[1]  # the bare final answer
        assert "completion" not in prompt_row
        assert sft_row == {**prompt_row, "completion": sft_row["completion"]}
        assert "<<" not in sft_row["completion"] and sft_row["completion"].endswith(
            f"#### {prompt_row['answer']}"
        )
    assert validate_records(prompts, "prompts", source="t")[1] == []
    assert validate_records(sft, "sft", source="t")[1] == []


def test_gsm8k_reference_solutions_pass_math_answer() -> None:
    """The fixture is correct by the verifier the recipe trains against: each worked solution (the SFT
    target) scores 1.0 against its own prompts row, and 0.0 against the next row's answer."""
    outputs, _, _ = _preset("gsm8k")
    completions = [row["completion"] for row in outputs["sft"]]
    verify = reward_scorer("math_answer", verifier=True)
    assert verify(completions, outputs["prompts"]).scores == [1.0] * 40
    shifted = outputs["prompts"][1:] + outputs["prompts"][:1]
    assert sum(verify(completions, shifted).scores) < 5  # answers differ from row to row


def test_math_preset_takes_the_last_box_with_nested_braces() -> None:
    outputs, problems, source = _preset("math")
    assert problems == [] and len(outputs["prompts"]) == 30
    first = outputs["prompts"][0]
    assert (first["prompt"], first["answer"], first["level"], first["type"]) == (
        source[0]["problem"], "49", "Level 1", "Prealgebra"
    )  # fmt: skip
    answers = {row["answer"] for row in outputs["prompts"]}
    assert {"\\frac{13}{12}", "5\\sqrt{2}", "(-2, 8)"} <= answers
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None
    verify = reward_scorer("math_answer", verifier=True)
    completions = [row["completion"] for row in outputs["sft"]]
    assert verify(completions, outputs["prompts"]).scores == [1.0] * 30


needs_bwrap = pytest.mark.skipif(
    not __import__("rlhf_core.rewards.sandbox", fromlist=["x"]).available_sandbox(),
    reason="bubblewrap is not installed",
)


@needs_bwrap
def test_mbpp_preset_builds_prompts_with_tests_and_its_code_passes_them() -> None:
    outputs, problems, source = _preset("mbpp")
    assert problems == [] and len(outputs["prompts"]) == 30
    row = outputs["prompts"][0]
    assert row["prompt"].startswith(source[0]["text"]) and all(
        t in row["prompt"] for t in source[0]["test_list"]
    )
    assert row["tests"] == row["test_list"] == source[0]["test_list"]
    assert (row["setup"], row["task_id"], row["challenge_test_list"]) == ("", 601, [])
    completion = outputs["sft"][0]["completion"]
    assert completion.startswith("```python\ndef similar_elements(") and completion.endswith("\n```")
    assert "\r" not in completion
    verify = reward_scorer("code_tests", {"tests_column": "tests", "setup_column": "setup"}, verifier=True)
    completions = [r["completion"] for r in outputs["sft"]]
    assert verify(completions, outputs["prompts"]).scores == [1.0] * 30  # incl. the row with setup code
    assert verify(completions[1:2], outputs["prompts"][:1]).scores == [0.0]  # another task's code fails


HUMANEVAL = [
    {
        "task_id": "HumanEval/0",
        "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
        "entry_point": "add",
    },
    {
        "task_id": "HumanEval/1",
        "prompt": 'def evens(xs: list) -> list:\n    """The even numbers of xs, in order."""\n',
        "canonical_solution": "    return [x for x in xs if x % 2 == 0]\n",
        "test": "def check(candidate):\n    assert candidate([1, 2, 3, 4]) == [2, 4]\n",
        "entry_point": "evens",
    },
]


@needs_bwrap
def test_humaneval_preset_keeps_the_stub_and_its_solution_passes_check() -> None:
    outputs, problems = task_rows(HUMANEVAL, "humaneval", source="he")
    assert problems == []
    row = outputs["prompts"][0]
    assert row["stub"] == HUMANEVAL[0]["prompt"] and HUMANEVAL[0]["prompt"] in row["prompt"]
    assert (row["tests"], row["entry_point"], row["task_id"]) == (HUMANEVAL[0]["test"], "add", "HumanEval/0")
    options = {"tests_column": "tests", "entry_point_column": "entry_point"}
    verify = reward_scorer("code_tests", options, verifier=True)
    completions = [r["completion"] for r in outputs["sft"]]
    assert verify(completions, outputs["prompts"]).scores == [1.0, 1.0]
    assert verify(completions[::-1], outputs["prompts"]).scores == [0.0, 0.0]


# --- bad rows -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "bad_row", "column", "expected"),
    [
        ("gsm8k", {"question": "How many?", "answer": "It is 12."}, "answer", "#### <answer>"),
        ("math", {"problem": "What is 1+1?", "solution": "It is 2."}, "solution", "boxed"),
        ("mbpp", {"text": "Add.", "code": "def f(): pass", "test_list": [], "test_setup_code": ""},
         "test_list", "non-empty list of assert"),
        ("humaneval", {**HUMANEVAL[0], "test": "assert add(1, 2) == 3"}, "test", "check(candidate)"),
    ],
)  # fmt: skip
def test_a_bad_row_is_named_or_skipped(task, bad_row, column, expected) -> None:
    good = {"gsm8k": GSM8K_ROW, "humaneval": HUMANEVAL[1]}.get(task) or _preset(task)[2][0]
    rows = [good, bad_row, good]
    with pytest.raises(
        DataValidationError, match=rf"in src, row 1 \(0-based\), field '{column}': .*{re.escape(expected)}"
    ):
        task_rows(rows, task, source="src")
    outputs, problems = task_rows(rows, task, source="src", on_error="skip")
    assert len(outputs["prompts"]) == len(outputs["sft"]) == 2
    assert len(problems) == 1 and "row 1 (0-based)" in problems[0]


def test_dataset_stage_skips_a_bad_row_once_and_splits_both_outputs_alike(tmp_path: Path) -> None:
    rows = read_jsonl(FIXTURES / "gsm8k_sample.jsonl")
    rows[5] = {**rows[5], "answer": "no final answer line"}
    path = _write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    stage = _stage({"file": {"path": str(path), "task": "gsm8k"}}, on_error="skip")
    assert set(stage.output_types()) == {"prompts", "sft"}
    prepared = prepare_dataset(stage, NoInputs(), StageEnvironment.local("data", 0, tmp_path))
    assert len(prepared.problems) == 1 and "row 5 (0-based), field 'answer'" in prepared.problems[0]
    assert prepared.summary()["rejected_rows"] == 1.0
    prompts, sft = prepared.outputs["prompts"], prepared.outputs["sft"]
    assert prompts.splits == sft.splits == {"train": 35, "eval": 4}
    assert {"prompt", "answer", "solution", "question"} <= set(prompts.columns)
    eval_prompts = read_jsonl(prompts.directory / "eval.jsonl")
    eval_sft = read_jsonl(sft.directory / "eval.jsonl")
    assert [r["prompt"] for r in eval_prompts] == [r["prompt"] for r in eval_sft]  # the same held-out rows
    with pytest.raises(DataValidationError, match=r"row 5 \(0-based\), field 'answer'"):
        prepare_dataset(
            _stage({"file": {"path": str(path), "task": "gsm8k"}}), NoInputs(),
            StageEnvironment.local("data", 0, tmp_path / "fail"),
        )  # fmt: skip


# --- columns: overrides, paths, what travels --------------------------------------------------------


def test_user_columns_override_single_entries_of_the_preset(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "mine.jsonl", [{"q": GSM8K_ROW["question"], "answer": GSM8K_ROW["answer"]}] * 2
    )
    stage = _stage({"file": {"path": str(path), "task": "gsm8k", "columns": {"prompt": "q"}}})
    prepared = prepare_dataset(stage, NoInputs(), StageEnvironment.local("data", 0, tmp_path))
    row = read_jsonl(prepared.outputs["prompts"].directory / "train.jsonl")[0]
    assert (row["prompt"], row["answer"], row["q"]) == (GSM8K_ROW["question"], "12", GSM8K_ROW["question"])
    with pytest.raises(DataValidationError, match=r"column 'question' \(task 'gsm8k' reads it as 'prompt'\)"):
        prepare_dataset(
            _stage({"file": {"path": str(path), "task": "gsm8k"}}), NoInputs(),
            StageEnvironment.local("data", 0, tmp_path / "b"),
        )  # fmt: skip


def test_spec_rejects_unknown_roles_and_formats_a_preset_does_not_emit(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "g.jsonl", [GSM8K_ROW])
    with pytest.raises(
        ValueError, match=r"task 'gsm8k' reads the columns \['answer', 'prompt'\]; got unknown \['tests'\]"
    ):
        _stage({"file": {"path": str(path), "task": "gsm8k", "columns": {"tests": "x"}}})
    with pytest.raises(ValueError, match="format 'preference' is not one"):
        _stage({"file": {"path": str(path), "task": "gsm8k", "format": "preference"}})
    with pytest.raises(ValueError, match="give a format"):
        _stage({"file": {"path": str(path)}})
    only_sft = _stage({"file": {"path": str(path), "task": "gsm8k", "format": "sft"}})
    assert set(only_sft.output_types()) == {"sft"}
    assert set(TASK_PRESETS) == {"gsm8k", "math", "mbpp", "humaneval"}


def test_a_gsm8k_file_read_as_prompts_keeps_answer_and_list_columns(tmp_path: Path) -> None:
    """Without a preset, `format: prompts` with `columns: {prompt: question}` keeps every other column
    (the worked answer, a list of tests) in the rows that reach policy_gradient and evaluate."""
    rows = [{**GSM8K_ROW, "test_list": ["assert True"], "entry_point": "f"}] * 4
    path = _write_jsonl(tmp_path / "g.jsonl", rows)
    stage = _stage({"file": {"path": str(path), "format": "prompts", "columns": {"prompt": "question"}}})
    prepared = prepare_dataset(stage, NoInputs(), StageEnvironment.local("data", 0, tmp_path))
    written = read_jsonl(prepared.outputs["prompts"].directory / "train.jsonl")[0]
    assert written == {"prompt": GSM8K_ROW["question"], "answer": GSM8K_ROW["answer"],
                       "test_list": ["assert True"], "entry_point": "f"}  # fmt: skip


def test_column_paths_reach_into_nested_and_list_columns(tmp_path: Path) -> None:
    rows = [
        {"meta": {"question": "Capital of France?"}, "answers": {"text": ["Paris", "paris"]}, "id": 1},
        {"meta": {"question": "Capital of Peru?"}, "answers": {"text": ["Lima"]}, "id": 2},
    ]
    path = _write_jsonl(tmp_path / "nested.jsonl", rows)
    columns = {"prompt": "meta.question", "answer": "answers.text[0]", "aliases": "answers.text"}
    loaded = load_records(str(path), fmt="prompts", column_map=columns)
    assert loaded[0] == {
        **rows[0],
        "prompt": "Capital of France?",
        "answer": "Paris",
        "aliases": ["Paris", "paris"],
    }
    assert validate_records(loaded, "prompts", source="t")[1] == []
    with pytest.raises(DataValidationError, match=r"column 'extra.q' \(mapped to 'prompt'\); available"):
        load_records(str(path), fmt="prompts", column_map={"prompt": "extra.q"})
    missing = load_records(
        str(path), fmt="prompts", column_map={"prompt": "meta.question", "answer": "answers.text[1]"}
    )
    _, problems = validate_records(missing, "prompts", source="t", on_error="skip")
    assert problems == [] and missing[1]["answer"] is None  # row 1 has no second alias: null, as if absent


def test_a_list_of_accepted_answers_is_a_valid_prompts_answer() -> None:
    rows = [
        {"prompt": "x?", "answer": ["a", "b"]},
        {"prompt": "y?", "answer": "3"},
        {"prompt": "z?", "answer": []},
        {"prompt": "w?", "answer": 3},  # a number: write it as text
    ]
    valid, problems = validate_records(rows, "prompts", source="t", on_error="skip")
    assert valid == rows[:2]
    assert len(problems) == 2 and "row 2 (0-based), field 'answer'" in problems[0]
    assert "row 3 (0-based), field 'answer'" in problems[1]


# --- the hub path, offline ------------------------------------------------------------------------


def test_hub_source_reads_a_local_dataset_repository_folder(tmp_path: Path, monkeypatch) -> None:
    """`hub:` goes through datasets.load_dataset; a local folder laid out like a hub repository (split
    files by name) takes the same path without a network."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    repo = tmp_path / "gsm8k-repo"
    repo.mkdir()
    rows = read_jsonl(FIXTURES / "gsm8k_sample.jsonl")
    _write_jsonl(repo / "train.jsonl", rows[:30])
    _write_jsonl(repo / "test.jsonl", rows[30:])
    stage = _stage({"hub": {"hub": str(repo), "split": "test", "task": "gsm8k", "limit": 6}})
    prepared = prepare_dataset(stage, NoInputs(), StageEnvironment.local("data", 0, tmp_path))
    assert sum(prepared.outputs["prompts"].splits.values()) == 6
    written = {
        r["question"]
        for split in ("train", "eval")
        for r in read_jsonl(prepared.outputs["sft"].directory / f"{split}.jsonl")
    }
    assert written == {r["question"] for r in rows[30:36]}


def test_hub_source_reads_a_saved_dataset_with_nested_columns(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [
        {"problem": {"text": f"What is {i} + {i}?"}, "solution": f"It is $\\boxed{{{2 * i}}}$."}
        for i in range(5)
    ]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    stage = _stage(
        {"hub": {"hub": str(tmp_path / "saved"), "task": "math", "columns": {"prompt": "problem.text"}}}
    )
    prepared = prepare_dataset(stage, NoInputs(), StageEnvironment.local("data", 0, tmp_path))
    out = [
        r for s in ("train", "eval") for r in read_jsonl(prepared.outputs["prompts"].directory / f"{s}.jsonl")
    ]
    assert sorted((r["prompt"], r["answer"]) for r in out) == sorted(
        (f"What is {i} + {i}?", str(2 * i)) for i in range(5)
    )


def test_no_valid_row_left_counts_the_preset_rejections(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q?", "answer": "no hashes"}] * 2)
    with pytest.raises(UserError, match=r"no valid prompts rows left \(2 rejected\)"):
        prepare_dataset(
            _stage({"file": {"path": str(path), "task": "gsm8k"}}, on_error="skip"), NoInputs(),
            StageEnvironment.local("data", 0, tmp_path),
        )  # fmt: skip


def test_rlhf_validate_checks_a_task_sources_columns_before_anything_runs(tmp_path):
    """`rlhf validate` reads the first row of a task source: a column the preset needs and the file lacks
    is a spec error naming stage, field, the column and how to map it; mapping it makes the spec valid."""
    import yaml
    from typer.testing import CliRunner

    from cli.app import app

    (tmp_path / "mine.jsonl").write_text('{"q": "What is 2 + 2?", "answer": "2 + 2 = 4\\n#### 4"}\n')
    spec = {
        "name": "own-gsm8k",
        "models": {"base": {"tiny": {"hidden_size": 32, "layers": 1, "heads": 2, "vocab_size": 320}}},
        "stages": {"data": {"kind": "dataset", "source": {"file": {"path": "mine.jsonl", "task": "gsm8k"}}}},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    failed = CliRunner().invoke(app, ["validate", str(path)])
    assert failed.exit_code == 2
    assert "stage 'data', field source.file" in failed.output
    assert "expected column 'question'" in failed.output
    spec["stages"]["data"]["source"]["file"]["columns"] = {"prompt": "q"}
    path.write_text(yaml.safe_dump(spec))
    passed = CliRunner().invoke(app, ["validate", str(path)])
    assert passed.exit_code == 0, passed.output
