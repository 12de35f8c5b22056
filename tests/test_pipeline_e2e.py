"""End to end: the Prefect flow on a real temporary Prefect server and a real MLflow SQLite store.

What a user would check: one parent run with a nested run per stage, params and per-step metrics,
dataset inputs, registered versions with lineage tags and the ``candidate`` alias, a registered model
that loads back through ``models:/`` and generates text, a fully cached re-run, a one-parameter change
that re-runs only that stage and what is downstream, and a cache that needs no Prefect database.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_core.spec import parse_spec

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pipeline_home(tmp_path_factory, prefect_api_url):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def first_run(pipeline_home):
    from conftest import TINY_SPEC

    from flows.pipeline import run_pipeline

    spec = parse_spec(TINY_SPEC)
    return spec, run_pipeline(spec, home=str(pipeline_home))


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def test_first_run_runs_every_stage_in_order(first_run):
    _, outcomes = first_run
    assert [(o.stage, o.status) for o in outcomes] == [
        ("base", "ran"),
        ("data", "ran"),
        ("sft", "ran"),
        ("rm", "ran"),
        ("eval", "ran"),
    ]
    sft = outcomes[2]
    assert sft.registered == "e2e-sft v1"
    assert 0 < sft.metrics["final_train_loss"] < 10


def test_runs_are_nested_under_one_parent_with_params_metrics_and_inputs(first_run):
    _, outcomes = first_run
    client = _client()
    runs = {o.stage: client.get_run(o.run_id) for o in outcomes}
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs.values()}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.data.tags["rlhf.run_type"] == "pipeline"
    assert "rlhf.spec_digest" in parent.data.tags and "prefect.flow_run_id" in parent.data.tags
    sft = runs["sft"]
    assert sft.data.params["config.train.lr"] == "0.003"
    history = client.get_metric_history(sft.info.run_id, "train/loss")
    assert [m.step for m in history] == [4, 8, 12]
    contexts = {tag.value for d in sft.inputs.dataset_inputs for tag in d.tags}
    assert "sft.data" in contexts
    evaluation = runs["eval"].data.metrics
    assert {"sft/eval/loss", "sft/eval/accuracy", "base/eval/perplexity"} <= set(evaluation)
    # the SFT model must fit the held-out assistant tokens better than the random base model
    assert evaluation["sft/eval/loss"] < evaluation["base/eval/loss"]


def test_training_stages_report_progress_as_prefect_artifacts(first_run):
    """Each training stage keeps one progress artifact up to date; it ends at 100%."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def latest(key: str):
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )
        return found

    for stage in ("sft", "rm"):
        artifacts = asyncio.run(latest(f"e2e-{stage}-progress"))
        assert artifacts, f"no progress artifact for {stage}"
        assert {a.type for a in artifacts} == {"progress"}
        assert max(float(a.data) for a in artifacts) == 100.0
        assert any(a.task_run_id is not None for a in artifacts)


def test_registered_model_has_lineage_and_loads_by_alias(first_run):
    import mlflow

    _, outcomes = first_run
    data_ref = outcomes[1].outputs["sft"]
    version = _client().get_model_version_by_alias("e2e-sft", "candidate")
    assert str(version.version) == "1"
    tags = version.tags
    assert tags["rlhf.upstream_models"] == "e2e-base:1"
    assert tags["rlhf.dataset_digests"] == f"data.sft={data_ref.digest}"
    assert tags["rlhf.fingerprint"] == outcomes[2].fingerprint
    assert "rlhf.git_commit" in tags
    reward = _client().get_model_version_by_alias("e2e-rm", "candidate")
    assert reward.tags["rlhf.role"] == "reward" and reward.tags["rlhf.upstream_models"] == "e2e-sft:1"
    pipe = mlflow.transformers.load_model("models:/e2e-sft@candidate")
    text = pipe("What is 2 + 3?", max_new_tokens=5)[0]["generated_text"]
    assert isinstance(text, str) and len(text) > len("What is 2 + 3?")


def test_rerun_with_nothing_changed_is_fully_cached(first_run, pipeline_home):
    from flows.pipeline import run_pipeline

    spec, outcomes = first_run
    again = run_pipeline(spec, home=str(pipeline_home))
    assert [o.status for o in again] == ["cached"] * 5
    assert [o.run_id for o in again] == [o.run_id for o in outcomes]
    assert len(_client().search_model_versions("name='e2e-sft'")) == 1


def test_cache_record_lives_in_mlflow_not_prefect(first_run, pipeline_home):
    """``plan`` reads only MLflow: with no Prefect involved every stage is reported cached."""
    from flows.plan import plan_pipeline

    spec, _ = first_run
    assert [p.action for p in plan_pipeline(spec, set(), str(pipeline_home))] == ["cached"] * 5


def test_changing_one_parameter_reruns_that_stage_and_downstream_only(first_run, pipeline_home):
    """rm's learning rate changes: rm re-runs; its upstream and its sibling eval stay cached."""
    from conftest import TINY_SPEC

    from flows.pipeline import run_pipeline

    raw = {**TINY_SPEC, "stages": {**TINY_SPEC["stages"]}}
    raw["stages"]["rm"] = {**raw["stages"]["rm"], "train": {**raw["stages"]["rm"]["train"], "lr": 5e-4}}
    outcomes = run_pipeline(parse_spec(raw), home=str(pipeline_home))
    assert [(o.stage, o.status) for o in outcomes] == [
        ("base", "cached"),
        ("data", "cached"),
        ("sft", "cached"),
        ("rm", "ran"),
        ("eval", "cached"),
    ]
    assert outcomes[3].registered == "e2e-rm v2"


def test_force_reruns_stage_and_downstream(first_run, pipeline_home):
    from flows.pipeline import run_pipeline

    spec, _ = first_run
    outcomes = run_pipeline(spec, force=["sft"], home=str(pipeline_home))
    assert [(o.stage, o.status) for o in outcomes] == [
        ("base", "cached"),
        ("data", "cached"),
        ("sft", "ran"),
        ("rm", "ran"),
        ("eval", "ran"),
    ]


def test_local_model_directory_and_local_data_file(tmp_path, prefect_api_url):
    """The real-use path: a base model from a save_pretrained directory and rows from a JSONL file."""
    from flows.pipeline import run_pipeline
    from rlhf_core.data.loading import write_jsonl
    from rlhf_core.data.synthetic import synthetic_records
    from rlhf_core.modeling.models import build_tiny_model, save_model
    from rlhf_core.spec import TinyModelSource

    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    save_model(model, tokenizer, tmp_path / "my-model")
    rows = [{"conversation": r["messages"]} for r in synthetic_records("arithmetic", "sft", n=40, seed=1)]
    write_jsonl(rows, tmp_path / "rows.jsonl")
    spec = parse_spec(
        {
            "name": "local",
            "models": {"base": {"path": str(tmp_path / "my-model")}},
            "stages": {
                "data": {
                    "kind": "dataset",
                    "source": {
                        "file": {
                            "path": str(tmp_path / "rows.jsonl"),
                            "format": "sft",
                            "columns": {"messages": "conversation"},
                        }
                    },
                },
                "sft": {
                    "kind": "sft",
                    "model": "base",
                    "data": "data.sft",
                    "train": {"max_steps": 3, "batch_size": 4},
                },
            },
        }
    )
    outcomes = run_pipeline(spec, home=str(tmp_path / "home"))
    # a second home in the same process gets its own store (mlflow.set_tracking_uri leaks an env var)
    assert (tmp_path / "home" / "mlflow.db").exists()
    base, data, sft = (o.outputs for o in outcomes)
    assert base["model"].uri == str(tmp_path / "my-model") and base["model"].registered_name is None
    assert data["sft"].splits == {"train": 36, "eval": 4}
    assert sft["model"].registered_name == "local-sft"
    version = _client().get_model_version("local-sft", sft["model"].registered_version)
    assert version.tags["rlhf.upstream_models"] == str(tmp_path / "my-model")

    # editing the source file changes its digest: the data stage and everything after it re-run
    write_jsonl(rows[:-1], tmp_path / "rows.jsonl")
    again = run_pipeline(spec, home=str(tmp_path / "home"))
    assert [o.status for o in again] == ["cached", "ran", "ran"]


def test_bad_row_fails_the_stage_with_its_row_and_registers_nothing(tmp_path, prefect_api_url):
    import os
    import subprocess
    import sys

    import yaml

    from rlhf_core.data.loading import write_jsonl

    rows = [{"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}] * 3
    rows.append({"prompt": "What is 2 + 2?", "chosen": "  ", "rejected": "5"})
    write_jsonl(rows, tmp_path / "pairs.jsonl")
    spec = {
        "name": "badrows",
        "models": {"base": {"tiny": {"hidden_size": 32, "layers": 1, "heads": 2, "vocab_size": 320}}},
        "stages": {
            "data": {"kind": "dataset", "source": {"file": {"path": "pairs.jsonl", "format": "preference"}}}
        },
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    home = tmp_path / "home"
    result = subprocess.run(
        [sys.executable, "-m", "cli.app", "run", str(tmp_path / "bad.yaml"), "--home", str(home)],
        capture_output=True,
        text=True,
        env={**os.environ, "PREFECT_API_URL": prefect_api_url},
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert result.returncode == 2  # a user error: its message alone, no traceback
    assert "pipeline 'badrows' failed" in result.stderr
    assert "row 3" in result.stderr and "chosen" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr

    from registry import tracking
    from rlhf_core.settings import RLHFSettings

    tracking.configure(RLHFSettings(home=home))
    client = _client()
    experiment = client.get_experiment_by_name("badrows")
    runs = {r.data.tags.get("mlflow.runName"): r for r in client.search_runs([experiment.experiment_id])}
    assert runs["data"].info.status == "FAILED"
    assert "rlhf.output_ref" not in runs["data"].data.tags
    assert runs["badrows-pipeline"].info.status == "FAILED"


def test_prompts_without_answers_fail_the_evaluation_naming_a_row(tmp_path, prefect_api_url):
    """Accuracy needs an answer per prompt: a prompts file without them is an error, not a silent 0."""
    from flows.pipeline import run_pipeline
    from rlhf_core.data.loading import write_jsonl

    write_jsonl([{"prompt": f"What is {i} + 1?"} for i in range(20)], tmp_path / "prompts.jsonl")
    spec = parse_spec(
        {
            "name": "noanswers",
            "models": {"base": {"tiny": {"hidden_size": 32, "layers": 1, "heads": 2, "vocab_size": 320}}},
            "stages": {
                "data": {
                    "kind": "dataset",
                    "source": {"file": {"path": str(tmp_path / "prompts.jsonl"), "format": "prompts"}},
                },
                "eval": {"kind": "evaluate", "models": ["base"], "prompts": "data.prompts", "max_prompts": 4},
            },
        }
    )
    with pytest.raises(
        ValueError, match=r"stage 'eval', field prompts: 2 row\(s\) of data.prompts .* no 'answer'"
    ):
        run_pipeline(spec, home=str(tmp_path / "home"))
