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
    loss_file = copy / "training" / "sft" / "trainer.py"
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


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One tracking store for the cross-pipeline tests (each test uses its own fingerprints)."""
    return tmp_path_factory.mktemp("shared-home")


def _pipeline_context(home, name: str):
    """A new pipeline run of ``name`` (its own experiment, a new parent run) in the store of ``home``."""
    from registry import tracking
    from rlhf_core.settings import RLHFSettings
    from runtime.stage_contract import RunContext

    settings = RLHFSettings(home=home)
    tracking.configure(settings)
    experiment = tracking.ensure_experiment(name, settings)
    parent = tracking.start_pipeline_run(experiment, name, {})
    return RunContext(
        pipeline=name, experiment_id=experiment, parent_run_id=parent, home=str(settings.resolved_home())
    )


def test_a_fingerprint_finished_in_another_pipeline_is_reused_with_its_origin(shared_store):
    """Pipeline A runs the stage; pipeline B (another experiment) gets it as 'cached from pipeline a',
    with A's run, A's experiment and A's pipeline run, and its body never runs."""
    from registry import stage_cache
    from runtime import stage_reports
    from runtime.stage_execution import execute_stage

    a, b = _pipeline_context(shared_store, "a"), _pipeline_context(shared_store, "b")
    assert a.experiment_id != b.experiment_id
    ran = execute_stage(a, _call("c" * 64), lambda call, run: {"out": _ref("s")})
    assert ran.status == "ran" and ran.origin is None

    found = stage_cache.find_cached_stage(b.experiment_id, "c" * 64)
    assert found is not None and found.run_id == ran.run_id
    assert (found.origin.experiment_id, found.origin.pipeline) == (a.experiment_id, "a")
    assert found.origin.pipeline_run_id == a.parent_run_id
    assert stage_cache.find_cached_stage(None, "c" * 64).run_id == ran.run_id  # a pipeline with no experiment

    def must_not_run(call, run):
        raise AssertionError("a stage finished in another pipeline ran again")

    reused = execute_stage(b, _call("c" * 64), must_not_run)
    assert (reused.status, reused.run_id, reused.outputs) == ("cached", ran.run_id, ran.outputs)
    assert reused.origin is not None
    assert (reused.origin.pipeline, reused.origin.experiment_id) == ("a", a.experiment_id)
    assert reused.origin.pipeline_run_id == a.parent_run_id
    assert stage_reports.stage_summary_line(reused).startswith("s: cached from pipeline a")
    markdown = stage_reports.stage_markdown(reused, reused.experiment_of_run(b.experiment_id), None)
    assert f"#/experiments/{a.experiment_id}/runs/{ran.run_id}" in markdown  # the run's page is in A
    assert "| produced by | pipeline `a`" in markdown and a.parent_run_id in markdown
    table = stage_reports.results_markdown([reused], b.experiment_id)
    assert "cached from pipeline a" in table and f"#/experiments/{a.experiment_id}/runs/" in table

    # A's own re-run of the fingerprint is a plain cache hit: no origin to show
    again = execute_stage(a, _call("c" * 64), must_not_run)
    assert (again.status, again.origin) == ("cached", None)


def test_the_pipelines_own_run_of_a_fingerprint_wins_over_a_newer_one_elsewhere(shared_store):
    from registry import stage_cache
    from runtime.stage_execution import execute_stage

    a, b = _pipeline_context(shared_store, "a"), _pipeline_context(shared_store, "b")
    older = execute_stage(a, _call("d" * 64), lambda call, run: {"out": _ref("s")})
    forced_b = b.model_copy(update={"forced": ("s",)})
    newer = execute_stage(forced_b, _call("d" * 64), lambda call, run: {"out": _ref("s")})
    assert newer.status == "ran" and newer.run_id != older.run_id
    assert stage_cache.find_cached_stage(a.experiment_id, "d" * 64).run_id == older.run_id
    assert stage_cache.find_cached_stage(b.experiment_id, "d" * 64).run_id == newer.run_id
    third = _pipeline_context(shared_store, "c")  # no run of its own: the newest of all
    assert stage_cache.find_cached_stage(third.experiment_id, "d" * 64).run_id == newer.run_id


def test_an_interrupted_run_of_another_pipeline_is_resumed_where_it_is(shared_store):
    """Same fingerprint, same work: B resumes the run A left with a checkpoint; the run stays in A's
    experiment and B's outcome says so."""
    from registry import stage_cache, tracking
    from runtime.stage_execution import execute_stage

    a, b = _pipeline_context(shared_store, "a"), _pipeline_context(shared_store, "b")

    def crashes_after_a_checkpoint(call, run):
        checkpoint = run.work_dir / "checkpoints" / "step-4"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text('{"step": 4}')
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        execute_stage(a, _call("b" * 64), crashes_after_a_checkpoint)
    interrupted = stage_cache.find_interrupted_run(b.experiment_id, "b" * 64)
    assert interrupted is not None and stage_cache.run_origin(interrupted).pipeline == "a"

    resumed_from = []
    outcome = execute_stage(
        b, _call("b" * 64), lambda call, run: resumed_from.append(run.resumed) or {"out": _ref("s")}
    )
    assert resumed_from == [True]
    assert (outcome.status, outcome.run_id) == ("resumed", interrupted)
    assert (outcome.origin.pipeline, outcome.origin.experiment_id) == ("a", a.experiment_id)
    run = tracking.client().get_run(interrupted)
    assert run.info.experiment_id == a.experiment_id and run.info.status == "FINISHED"
    assert run.data.tags["rlhf.pipeline_run_id"] == b.parent_run_id  # B's pipeline run finished it
    assert stage_cache.find_cached_stage(b.experiment_id, "b" * 64).run_id == interrupted


def _recipe_fingerprints(recipe: str, stages: tuple[str, ...]) -> dict[str, str]:
    """Fingerprints of ``stages`` of a recipe, given the same upstream refs for every recipe (equal
    fingerprints upstream mean equal refs: the reused ones)."""
    from conftest import REPO_ROOT

    from flows.stage_calls import base_model_call, stage_call
    from rlhf_core.refs import ModelRef
    from rlhf_core.spec import load_spec

    spec = load_spec(REPO_ROOT / "recipes" / recipe)
    model = ModelRef(uri="m", digest="model", tokenizer_digest="tok", stage="x", base_model="base")
    data = {
        name: DatasetRef(uri="d", digest=name, kind=kind, splits={"train": 1}, columns=("c",), stage="data")
        for name, kind in (("sft", "sft"), ("preferences", "preference"), ("prompts", "prompts"))
    }
    outputs = {"base": {"model": model}, "sft": {"model": model}, "data": data}
    calls = {
        name: base_model_call(spec, name) if name in spec.models else stage_call(spec, name, outputs)
        for name in stages
    }
    return {name: call.fingerprint for name, call in calls.items()}


def test_recipes_that_say_they_share_stages_have_equal_fingerprints():
    """What the recipe comments promise: every recipe's base and data are the quickstart's; grpo_rlvr's
    SFT is dpo.yaml's; instructgpt_ppo's SFT and reward model are instructgpt_rm.yaml's. A home that ran
    one reuses them in the others."""
    quickstart = _recipe_fingerprints("quickstart.yaml", ("base", "data"))
    for recipe in ("grpo_rlvr.yaml", "dpo.yaml", "instructgpt_rm.yaml", "rejection_sampling.yaml"):
        assert _recipe_fingerprints(recipe, ("base", "data")) == quickstart, recipe
    assert _recipe_fingerprints("grpo_rlvr.yaml", ("sft",)) == _recipe_fingerprints("dpo.yaml", ("sft",))
    rm_recipe = _recipe_fingerprints("instructgpt_rm.yaml", ("sft", "rm"))
    assert _recipe_fingerprints("instructgpt_ppo.yaml", ("sft", "rm")) == rm_recipe
    assert _recipe_fingerprints("goodhart_monitor.yaml", ("sft", "rm")) == rm_recipe
    assert _recipe_fingerprints("quickstart.yaml", ("sft",)) != _recipe_fingerprints("dpo.yaml", ("sft",))


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
