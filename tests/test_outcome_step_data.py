"""The ``outcome`` and ``step_labels`` data formats (book ch.5): row checks naming the row and field,
dataset-stage formats, and the synthetic worked solutions with their labels."""

from __future__ import annotations

import pytest

from rlhf_core.data.schemas import DataValidationError, outcome_parts, validate_records
from rlhf_core.data.synthetic import ArithmeticProblem, is_correct, solution_steps, synthetic_records
from rlhf_core.spec import DatasetStage

GOOD_OUTCOME = {"prompt": "What is 1 + 2?", "completion": "The answer is 3.", "correct": True}
GOOD_STEPS = {"prompt": "What is 1 + 2?", "steps": ["1 + 0 = 1", "1 + 2 = 3"], "labels": [1, 0]}


@pytest.mark.parametrize(
    ("row", "field", "expected"),
    [
        ({**GOOD_OUTCOME, "correct": "yes"}, "correct", "true or false"),
        ({**GOOD_OUTCOME, "correct": 2}, "correct", "or 1 or 0, got 2"),
        ({**GOOD_OUTCOME, "completion": ""}, "completion", "a non-empty string"),
        ({**GOOD_OUTCOME, "prompt": None}, "prompt", "a non-empty string or a list of messages"),
    ],
)
def test_bad_outcome_rows_are_named(row, field, expected):
    with pytest.raises(
        DataValidationError, match=rf"in outcomes, row 1 \(0-based\), field '{field}': expected .*{expected}"
    ):
        validate_records([GOOD_OUTCOME, row], "outcome", source="outcomes")


@pytest.mark.parametrize(
    ("row", "field", "expected"),
    [
        ({**GOOD_STEPS, "labels": [1]}, "labels", "one label per step: 2 steps but 1 labels"),
        ({**GOOD_STEPS, "steps": ["1 + 0 = 1", "  "]}, r"steps\[1\]", "a non-empty string"),
        ({**GOOD_STEPS, "steps": []}, "steps", "a non-empty list of strings"),
        ({**GOOD_STEPS, "labels": [1, 2]}, r"labels\[1\]", r"0 or 1 \(bad/good\), or -1, 0, \+1"),
        ({**GOOD_STEPS, "labels": [True, 0]}, r"labels\[0\]", "0 or 1"),
        ({**GOOD_STEPS, "labels": "10"}, "labels", "a list with one label per step"),
    ],
)
def test_bad_step_label_rows_are_named(row, field, expected):
    with pytest.raises(
        DataValidationError, match=rf"row 0 \(0-based\), field '{field}': expected {expected}"
    ):
        validate_records([row], "step_labels", source="steps")


def test_skip_drops_bad_rows_and_reports_them():
    valid, problems = validate_records(
        [GOOD_STEPS, {**GOOD_STEPS, "labels": [1]}], "step_labels", source="s", on_error="skip"
    )
    assert valid == [GOOD_STEPS] and len(problems) == 1 and "row 1" in problems[0]
    assert outcome_parts({**GOOD_OUTCOME, "correct": 0}).correct is False


def test_dataset_stage_reads_the_formats_into_named_outputs(tmp_path):
    for fmt, output in [("outcome", "outcomes"), ("step_labels", "step_labels")]:
        stage = DatasetStage(
            kind="dataset", source={"file": {"path": str(tmp_path / "x.jsonl"), "format": fmt}}
        )
        assert {name: t.kind for name, t in stage.output_types().items()} == {output: fmt}


def test_synthetic_sources_add_outcomes_and_step_labels_for_arithmetic_only():
    arithmetic = DatasetStage(kind="dataset", source={"synthetic": {"n": 4}})
    assert set(arithmetic.output_types()) == {"sft", "preferences", "prompts", "outcomes", "step_labels"}
    tools = DatasetStage(kind="dataset", source={"synthetic": {"task": "tool_arithmetic", "n": 4}})
    assert set(tools.output_types()) == {"sft", "preferences", "prompts"}


def test_worked_solutions_compute_by_tens_and_units():
    assert solution_steps(ArithmeticProblem("What is 7 + 12?", 19)) == [
        "7 + 10 = 17",
        "17 + 2 = 19",
        "The answer is 19.",
    ]
    assert solution_steps(ArithmeticProblem("What is 7 * 12?", 84)) == [
        "7 * 10 = 70", "7 * 2 = 14", "70 + 14 = 84", "The answer is 84.",
    ]  # fmt: skip
    # a wrong first step carries on: later steps compute right from the wrong value
    assert solution_steps(ArithmeticProblem("What is 7 - 12?", -5), error_at=0, offset=2) == [
        "7 - 10 = -1", "-1 - 2 = -3", "The answer is -3.",
    ]  # fmt: skip


@pytest.mark.parametrize("operations", [("+", "-"), ("*",)])
def test_synthetic_rows_are_valid_deterministic_and_labelled_by_the_verifier(operations):
    outcomes = synthetic_records("arithmetic", "outcome", 30, seed=3, operations=operations)
    assert outcomes == synthetic_records("arithmetic", "outcome", 30, seed=3, operations=operations)
    assert validate_records(outcomes, "outcome", source="s") == (outcomes, [])
    problems = synthetic_records("arithmetic", "prompts", 30, seed=3, operations=operations)
    for i, row in enumerate(outcomes):  # each problem: its right solution, then a wrong one
        assert row["prompt"] == problems[i // 2]["prompt"]
        assert is_correct(row["completion"], problems[i // 2]["answer"]) == row["correct"] == (i % 2 == 0)
    steps = synthetic_records("arithmetic", "step_labels", 30, seed=3, operations=operations)
    assert validate_records(steps, "step_labels", source="s") == (steps, [])
    for row, problem in zip(steps, problems, strict=True):
        # good steps first, then (from the wrong step on) bad ones; the answer is right iff all are good
        labels = row["labels"]
        assert labels == sorted(labels, reverse=True) and set(labels) <= {1, -1}
        assert is_correct(row["steps"][-1], problem["answer"]) == all(v == 1 for v in labels)
    assert {tuple(r["labels"]) == (1,) * len(r["labels"]) for r in steps} == {True, False}


def test_a_prompts_outcome_rows_land_in_one_split(tmp_path):
    """Held-out top-1 and pairwise accuracy compare a prompt's completions: the dataset stage splits the
    distinct prompts of outcome rows, so no prompt is both trained on and held out."""
    import json

    from rlhf_core.data.loading import read_jsonl
    from rlhf_core.dataset_preparation import prepare_dataset
    from rlhf_core.stage_environment import NoInputs, StageEnvironment

    rows = [
        {"prompt": f"What is {i} + 1?", "completion": f"The answer is {i + 1 + wrong}.", "correct": not wrong}
        for i in range(20)
        for wrong in (0, 1, 2)[: 1 + i % 3]  # one to three completions per prompt
    ]
    path = tmp_path / "outcomes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = DatasetStage.model_validate(
        {"kind": "dataset", "source": {"file": {"path": str(path), "format": "outcome"}},
         "splits": {"train": 0.7, "eval": 0.3}}
    )  # fmt: skip
    out = prepare_dataset(stage, NoInputs(), StageEnvironment.local("data", 0, tmp_path)).outputs["outcomes"]
    train, held = (read_jsonl(out.directory / f"{s}.jsonl") for s in ("train", "eval"))
    assert len(train) + len(held) == len(rows)
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in held})
    assert len({r["prompt"] for r in held}) == 6  # 30% of the 20 prompts
