"""Fingerprints and the stage life cycle (cache record in MLflow, lock against concurrent training)."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from rlhf_core.fingerprint import PACKAGE_ROOT, code_digest, stage_fingerprint
from rlhf_core.refs import DatasetRef
from rlhf_core.spec import SFTTrainSpec


def test_code_digest_changes_when_any_rlhf_core_file_changes(tmp_path):
    copy = tmp_path / "rlhf_core"
    shutil.copytree(PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_digest(copy)
    assert before == code_digest.__wrapped__(PACKAGE_ROOT)  # same files, same digest
    loss_file = copy / "training" / "sft.py"
    loss_file.write_text(loss_file.read_text() + "\n# a changed loss\n")
    assert code_digest.__wrapped__(copy) != before


def test_fingerprint_depends_on_config_inputs_and_seed():
    cfg = SFTTrainSpec()
    base = stage_fingerprint("sft", cfg, {"data": "d1"}, seed=0)
    assert base == stage_fingerprint("sft", SFTTrainSpec(), {"data": "d1"}, seed=0)
    assert base != stage_fingerprint("sft", SFTTrainSpec(lr=1e-4), {"data": "d1"}, seed=0)
    assert base != stage_fingerprint("sft", cfg, {"data": "d2"}, seed=0)
    assert base != stage_fingerprint("sft", cfg, {"data": "d1"}, seed=1)
    assert base != stage_fingerprint("dataset", cfg, {"data": "d1"}, seed=0)


@pytest.fixture
def run_context(tmp_path):
    from registry import tracking
    from rlhf_core.settings import RLHFSettings
    from runtime.stage_contract import RunContext

    settings = RLHFSettings(home=tmp_path / "home")
    tracking.configure(settings)
    experiment = tracking.ensure_experiment("locks", settings)
    parent = tracking.start_pipeline_run(experiment, "locks", {})
    return RunContext(
        pipeline="locks", experiment_id=experiment, parent_run_id=parent, home=str(settings.resolved_home())
    )


def _ref(stage: str) -> DatasetRef:
    return DatasetRef(
        uri="/nowhere", digest="abc", kind="sft", splits={"train": 1}, columns=("messages",), stage=stage
    )


def _call(fingerprint: str):
    from runtime.stage_contract import StageCall

    return StageCall(name="s", kind="dataset", stage=SFTTrainSpec(), seed=0, fingerprint=fingerprint)


def test_concurrent_identical_stages_train_once(run_context):
    """Two runs of one fingerprint at once: one computes, the other waits on the lock and gets a cache hit."""
    from runtime.stage_execution import execute_stage

    calls = []

    def body(call, run):
        calls.append(run.run_id)
        time.sleep(1.0)
        return {"out": _ref("s")}

    results = []

    def worker():
        results.append(execute_stage(run_context, _call("f" * 64), body))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(r.status for r in results) == ["cached", "ran"]
    assert results[0].run_id == results[1].run_id == calls[0]


def test_failed_stage_records_no_output_and_is_not_cached(run_context):
    from registry import stage_cache, tracking
    from runtime.stage_execution import execute_stage

    def failing(call, run):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        execute_stage(run_context, _call("e" * 64), failing)
    assert stage_cache.find_cached_stage(run_context.experiment_id, "e" * 64) is None
    failed = stage_cache.find_interrupted_run(run_context.experiment_id, "e" * 64)
    assert tracking.client().get_run(failed).info.status == "FAILED"

    outcome = execute_stage(run_context, _call("e" * 64), lambda call, run: {"out": _ref("s")})
    assert outcome.status == "ran"
    assert stage_cache.find_cached_stage(run_context.experiment_id, "e" * 64).run_id == outcome.run_id


class _FailedState:
    """Stands in for a Prefect state: ``result(raise_on_failure=False)`` returns the task's exception."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def result(self, raise_on_failure: bool = True):
        return self.exc


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        (ConnectionError("reset by peer"), True),
        (TimeoutError(), True),
        (RuntimeError("(sqlite3.OperationalError) database is locked"), True),
        (ValueError("stage 'data', row 3, field 'prompt': expected a non-empty string"), False),
        (RuntimeError("CUDA out of memory"), False),
        (ZeroDivisionError(), False),
    ],
)
def test_only_transient_failures_are_retried(exc, retried):
    from runtime.stage_tasks import is_transient_failure

    assert is_transient_failure(None, None, _FailedState(exc)) is retried


def test_a_kind_check_fails_before_any_stage_run_is_opened(run_context):
    """The sample task's check: a prompts dataset without the stage's split fails naming the field, and
    the experiment holds no stage run (only the pipeline's parent run)."""
    from registry import tracking
    from rlhf_core.errors import UserError
    from rlhf_core.refs import ModelRef
    from rlhf_core.spec import SampleStage
    from runtime.stage_contract import StageCall
    from runtime.stage_tasks import task_for_kind

    stage = SampleStage(
        kind="sample",
        policy="sft",
        prompts="data.prompts",
        split="test",
        rewards=[{"function": "answer_format"}],
    )
    prompts = DatasetRef(
        uri="/nowhere", digest="p", kind="prompts", splits={"train": 1}, columns=("prompt",), stage="data"
    )
    policy = ModelRef(uri="/m", digest="m", tokenizer_digest="t", stage="sft", base_model="b")
    call = StageCall(
        name="samples", kind="sample", stage=stage, seed=0, fingerprint="c" * 64,
        inputs={"policy": policy, "prompts": prompts},
    )  # fmt: skip
    expected = r"stage 'samples', field split: 'test' is not a split of data\.prompts \(it has: train\)"
    with pytest.raises(UserError, match=expected):
        task_for_kind("sample").fn(run_context, call)
    runs = tracking.client().search_runs([run_context.experiment_id])
    assert [r.info.run_id for r in runs] == [run_context.parent_run_id]


def test_a_rank_job_names_the_body_it_imports(run_context, tmp_path):
    """A rank finds its stage's body by the name the parent wrote, no task function re-run."""
    from runtime.multiprocess import RankJob
    from runtime.stage_contract import StageRun
    from tasks.train_sft import train_sft

    call = _call("d" * 64)
    run = StageRun("s", "run", call.fingerprint, tmp_path, False, run_context.settings(), run_context)
    job = RankJob.of(run_context, call, run, train_sft, tmp_path / "outputs.json")
    assert job.body == "tasks.train_sft:train_sft" and job.stage_body() is train_sft
    with pytest.raises(TypeError, match="a rank cannot import the body"):
        RankJob.of(run_context, call, run, lambda call, run: {}, tmp_path / "outputs.json")
