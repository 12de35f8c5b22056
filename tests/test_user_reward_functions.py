"""A user's own reward function by reference (``rewards.py:score``, ``package.module:score``).

What a user bringing a task would check: the function gets the completion and every column of its row,
per completion or batched, with the spec's options; a bad reference fails when the spec is read, naming
stage and field; a function that raises or returns a non-number fails the stage naming the source and
the row (or scores it 0 and counts it); its code is part of the fingerprint, and helpers it imports from
its folder are too.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from rlhf_core.errors import UserError
from rlhf_core.fingerprint import describe_part_changes, fingerprint_parts
from rlhf_core.rewards import score_completions
from rlhf_core.spec import RewardSourceSpec, SpecError, parse_spec

REWARDS = '''
import math

def gsm8k_correct(completion, row, bonus=0.0):
    """1 when the last number of the completion is the row's answer (+ bonus)."""
    numbers = [t.strip(".,$") for t in completion.split() if t.strip(".,$").lstrip("-").isdigit()]
    right = bool(numbers) and numbers[-1] == row["final"]
    return (1.0 + bonus if right else 0.0), {"has_number": float(bool(numbers))}

def lengths(completions, rows, scale=1.0):
    return [scale * len(c) for c in completions]

def explode(completion, row):
    if "boom" in completion:
        raise ValueError("cannot score " + completion)
    return 1.0

def not_a_number(completion, row):
    return float("nan") if "nan" in completion else "high"

def too_few(completions, rows):
    return [1.0]

def no_row(completion):
    return 1.0

LIMIT = 3
'''


def _rows():
    return [
        {"prompt": "Tom has 3 apples and buys 4. How many?", "final": "7", "completion": "He has 7 apples."},
        {"prompt": "5 pens cost $10. One pen?", "final": "2", "completion": "Each costs $3."},
        {"prompt": "2 + 2?", "final": "4", "completion": "boom"},
    ]


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    (tmp_path / "rewards.py").write_text(REWARDS)
    return tmp_path


def _source(task_dir: Path, function: str, **fields) -> RewardSourceSpec:
    return RewardSourceSpec.model_validate({"function": function, **fields}, context={"base_dir": task_dir})


def test_a_file_next_to_the_spec_scores_each_row_with_its_columns_options_and_metrics(task_dir):
    source = _source(task_dir, "rewards.py:gsm8k_correct", options={"bonus": 0.5})
    assert source.name == "rewards.py:gsm8k_correct"
    assert source.function == f"{task_dir / 'rewards.py'}:gsm8k_correct"  # absolute: runs from anywhere
    kept, problems = score_completions(_rows()[:2], [source], {}, on_invalid="fail", stage="grpo")
    assert problems == [] and [r["reward"] for r in kept] == [1.5, 0.0]
    assert [r["reward_metrics"]["rewards.py:gsm8k_correct/has_number"] for r in kept] == [1.0, 1.0]


def test_a_batched_function_is_called_once_with_the_whole_batch(task_dir):
    source = _source(task_dir, "rewards.py:lengths", options={"scale": 2.0}, weight=0.5)
    kept, _ = score_completions(_rows(), [source], {}, on_invalid="fail", stage="s")
    assert [r["reward"] for r in kept] == [0.5 * 2.0 * len(r["completion"]) for r in _rows()]


def test_an_importable_module_is_named_by_module_path(tmp_path, monkeypatch):
    package = tmp_path / "my_task"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(
        "def score(completion, row):\n    return float(len(completion) > 3)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    source = RewardSourceSpec(function="my_task.scoring:score")
    kept, _ = score_completions(_rows(), [source], {}, on_invalid="fail", stage="s")
    assert [r["reward"] for r in kept] == [1.0, 1.0, 1.0]
    sys.modules.pop("my_task.scoring", None), sys.modules.pop("my_task", None)


@pytest.mark.parametrize(
    ("function", "options", "message"),
    [
        ("missing.py:score", {}, r"Python file .*missing.py \(of a function reference\) does not exist"),
        ("rewards.py:nothing", {}, r"has no function 'nothing' \(functions there: explode, gsm8k_correct"),
        ("rewards.py:LIMIT", {}, r"rewards.py:LIMIT is a int, not a function"),
        ("rewards.py:no_row", {}, r"takes \(completion\); expected \(completion, row, \*\*options\)"),
        ("rewards.py:gsm8k_correct", {"bonsu": 1}, r"takes no option 'bonsu' \(its options: bonus\)"),
        ("no_such_module_here:score", {}, r"module 'no_such_module_here' failed to import: ModuleNotFound"),
        ("rewards.py:", {}, r"expected 'file.py:function' or 'package.module:function'"),
        ("math_answr", {}, r"unknown reward function 'math_answr' \(built-in: .*arithmetic_exact"),
    ],
)
def test_a_bad_reference_fails_when_the_spec_is_read_naming_stage_and_field(
    task_dir, tiny_spec_dict, function, options, message
):
    tiny_spec_dict["stages"]["sample"] = {
        "kind": "sample",
        "policy": "sft",
        "prompts": "data.prompts",
        "rewards": [{"function": "arithmetic_exact"}, {"function": function, "options": options}],
    }
    with pytest.raises(SpecError, match=message) as info:
        parse_spec(tiny_spec_dict, base_dir=task_dir)
    assert "stage 'sample', field rewards.1" in str(info.value)


def test_a_file_that_fails_to_import_is_reported_in_one_line(task_dir, tiny_spec_dict):
    (task_dir / "broken.py").write_text("import json\nvalue = json.loads('{not json')\n")
    tiny_spec_dict["stages"]["eval"]["verifier"] = "broken.py:check"
    with pytest.raises(SpecError) as info:
        parse_spec(tiny_spec_dict, base_dir=task_dir)
    text = str(info.value)
    assert "stage 'eval': verifier: Python file" in text
    assert "broken.py failed to import: JSONDecodeError: Expecting property name" in text


def test_a_raising_row_fails_the_stage_naming_source_and_row_or_scores_zero_and_is_counted(task_dir):
    source = _source(task_dir, "rewards.py:explode")
    with pytest.raises(UserError, match=r"stage 'g': reward source 'rewards.py:explode' raised ValueError on "
                       r"row 2 \(0-based\): cannot score boom"):  # fmt: skip
        score_completions(_rows(), [source], {}, on_invalid="fail", stage="g")
    lenient = _source(task_dir, "rewards.py:explode", on_error="zero")
    kept, _ = score_completions(_rows(), [lenient], {}, on_invalid="fail", stage="g")
    assert [r["reward"] for r in kept] == [1.0, 1.0, 0.0]
    assert [r["reward_metrics"]["rewards.py:explode/errors"] for r in kept] == [0.0, 0.0, 1.0]


def test_non_numbers_and_wrong_counts_fail_naming_source_and_row(task_dir):
    rows = [{**_rows()[0], "completion": "nan"}, _rows()[1]]
    with pytest.raises(UserError, match=r"reward source 'rewards.py:not_a_number' returned nan for row 0"):
        score_completions(
            rows, [_source(task_dir, "rewards.py:not_a_number")], {}, on_invalid="fail", stage="s"
        )
    kept, problems = score_completions(
        rows, [_source(task_dir, "rewards.py:not_a_number")], {}, on_invalid="skip", stage="s"
    )
    assert kept == [] and "row 1" in problems[1] and "'high'" in problems[1]
    with pytest.raises(UserError, match=r"rewards.py:too_few returned 1 scores for 2 completions"):
        score_completions(rows, [_source(task_dir, "rewards.py:too_few")], {}, on_invalid="fail", stage="s")


def _sample_stage(task_dir: Path, tiny_spec_dict: dict):
    tiny_spec_dict["stages"]["sample"] = {
        "kind": "sample",
        "policy": "sft",
        "prompts": "data.prompts",
        "rewards": [{"function": "rewards.py:gsm8k_correct"}],
    }
    return parse_spec(tiny_spec_dict, base_dir=task_dir).stages["sample"]


def test_the_function_code_is_part_of_the_fingerprint_and_an_edit_is_named(task_dir, tiny_spec_dict):
    before = fingerprint_parts("sample", _sample_stage(task_dir, tiny_spec_dict), {}, 0)
    assert "function:rewards[0].function" in before
    again = fingerprint_parts("sample", _sample_stage(task_dir, tiny_spec_dict), {}, 0)
    assert again == before
    (task_dir / "rewards.py").write_text(REWARDS.replace("1.0 + bonus", "2.0 + bonus"))
    after = fingerprint_parts("sample", _sample_stage(task_dir, tiny_spec_dict), {}, 0)
    assert [line.split(" (")[0] for line in describe_part_changes(before, after)] == [
        "reward function rewards[0].function changed"
    ]


def test_a_helper_module_the_file_imports_from_its_folder_is_fingerprinted_too(task_dir, tiny_spec_dict):
    (task_dir / "answer_parsing.py").write_text("def last(words):\n    return words[-1]\n")
    (task_dir / "rewards.py").write_text(
        REWARDS
        + textwrap.dedent("""
            from answer_parsing import last

            def last_word(completion, row):
                return float(last(completion.split()) == row["final"])
        """)
    )
    before = fingerprint_parts("sample", _sample_stage(task_dir, tiny_spec_dict), {}, 0)
    (task_dir / "answer_parsing.py").write_text("def last(words):\n    return words[-1].strip('.')\n")
    sys.modules.pop("answer_parsing", None)
    after = fingerprint_parts("sample", _sample_stage(task_dir, tiny_spec_dict), {}, 0)
    assert before["function:rewards[0].function"] != after["function:rewards[0].function"]


def test_a_reward_file_travels_with_a_stage_to_a_worker_without_it(
    task_dir, tiny_spec_dict, tmp_path_factory
):
    """The stage runner's parameters carry the file and the helpers it imports; a worker that lacks them
    writes them into its cache and runs the same code (same digest), never another version."""
    from flows.stage_runner import call_parameters, rebuild_call, with_local_functions
    from rlhf_core.rewards.user_functions import parse_reference, reference_digest
    from runtime.stage_contract import RunContext, StageCall

    (task_dir / "answer_parsing.py").write_text("def last(words):\n    return words[-1]\n")
    (task_dir / "rewards.py").write_text(REWARDS + "\nfrom answer_parsing import last\n")
    stage = _sample_stage(task_dir, tiny_spec_dict)
    call = StageCall(name="sample", kind="sample", stage=stage, seed=0, fingerprint="f" * 64)
    ctx = RunContext(pipeline="p", experiment="p", experiment_id="1", parent_run_id="r", home=str(task_dir))
    params = call_parameters(ctx, call)
    reference = stage.rewards[0].function
    assert set(params["functions"][reference]) == {"rewards.py", "answer_parsing.py"}

    same_machine = with_local_functions(params["call"], params["functions"], tmp_path_factory.mktemp("c"))
    assert same_machine["stage"]["rewards"][0]["function"] == reference  # the file is here: used as is

    worker_cache = tmp_path_factory.mktemp("worker-cache")
    (task_dir / "rewards.py").write_text(REWARDS.replace("1.0 + bonus", "3.0 + bonus"))  # not what was sent
    moved = with_local_functions(params["call"], params["functions"], worker_cache)
    shipped = moved["stage"]["rewards"][0]["function"]
    assert shipped.startswith(str(worker_cache / "reward-functions"))
    rebuilt = rebuild_call(moved)
    kept, _ = score_completions(_rows()[:1], rebuilt.stage.rewards, {}, on_invalid="fail", stage="sample")
    assert kept[0]["reward"] == 1.0  # the code that was sent, not the edited file
    (task_dir / "rewards.py").write_text(REWARDS + "\nfrom answer_parsing import last\n")
    assert reference_digest(parse_reference(shipped)) == reference_digest(parse_reference(reference))


def test_extra_metrics_are_averaged_for_the_stage_summaries_leaving_out_rows_without_them(task_dir):
    from rlhf_core.rewards.composite import reward_metric_means
    from rlhf_core.rollout.sampling import SampleResult

    source = _source(task_dir, "rewards.py:gsm8k_correct")
    kept, _ = score_completions(_rows()[:2], [source], {}, on_invalid="fail", stage="s")
    kept.append({**kept[0], "reward_metrics": {"rewards.py:gsm8k_correct/has_number": float("nan")}})
    assert reward_metric_means(kept) == {"rewards.py:gsm8k_correct/has_number": 1.0}
    summary = SampleResult(kept, generated_tokens=6, generation_seconds=1.0).summary()
    assert summary["reward/rewards.py:gsm8k_correct/has_number"] == 1.0


def test_an_edit_in_a_long_lived_process_scores_with_the_edited_code(task_dir):
    """The scorer is cached by the code's digest: the code that scores is the code the fingerprint
    names, also when a worker process lives on across an edit of the file or of a helper it imports."""
    (task_dir / "parsing.py").write_text("FACTOR = 1.0\n")
    scaled = "from parsing import FACTOR\n\ndef score(c, row):\n    return FACTOR\n"
    (task_dir / "scaled.py").write_text(scaled)
    source = _source(task_dir, "scaled.py:score")
    first, _ = score_completions(_rows()[:1], [source], {}, on_invalid="fail", stage="s")
    (task_dir / "parsing.py").write_text("FACTOR = 2.0\n")
    again, _ = score_completions(_rows()[:1], [source], {}, on_invalid="fail", stage="s")
    assert (first[0]["reward"], again[0]["reward"]) == (1.0, 2.0)
