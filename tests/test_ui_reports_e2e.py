"""What a person sees of a pipeline run in both UIs, read back from the real MLflow store and Prefect API.

MLflow: each stage run logs the seed it used; the parent run has params, the spec's description and the
results, and each stage's key metrics as ``<stage>/<metric>``; logged models are named after their stage
(and still load into the next stage). Prefect: the flow run is named after the pipeline and tagged with
it and the spec digest; task runs are named after their stage; every stage, cached ones too, leaves one
markdown artifact linking to its MLflow run.
"""

from __future__ import annotations

import asyncio

import pytest

from rlhf_core.spec import parse_spec

pytestmark = pytest.mark.e2e

SPEC = {
    "name": "uiview",
    "description": "A tiny pipeline for the UI checks.",
    "seed": 7,
    "models": {"base": {"tiny": {"hidden_size": 32, "layers": 1, "heads": 2, "vocab_size": 320}}},
    "stages": {
        "data": {"kind": "dataset", "source": {"synthetic": {"n": 60, "max_operand": 9}}},
        "sft": {
            "kind": "sft",
            "model": "base",
            "data": "data.sft",
            "seed": 3,
            "train": {"max_steps": 2, "batch_size": 4, "max_length": 64, "log_every": 1},
        },
    },
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_api_url, one_torch_thread):
    """The pipeline run twice on one home: the second run takes every stage from cache."""
    from flows.pipeline import run_pipeline
    from runtime import progress

    home = str(tmp_path_factory.mktemp("home"))
    spec = parse_spec(SPEC)
    EVENTS.clear()
    with progress.subscribed(EVENTS.append):
        first = run_pipeline(spec, home=home)
        second = run_pipeline(spec, home=home)
    return spec, first, second


EVENTS: list = []


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def test_stage_runs_log_the_seed_they_used(runs):
    _, first, _ = runs
    by_stage = {o.stage: _client().get_run(o.run_id).data.params for o in first}
    assert by_stage["sft"]["seed"] == "3"  # the stage's own seed
    assert by_stage["data"]["seed"] == "7"  # the pipeline's
    assert by_stage["base"]["seed"] == "7"


def test_parent_run_has_params_description_and_results(runs):
    spec, first, _ = runs
    client = _client()
    parent = client.get_run(client.get_run(first[-1].run_id).data.tags["mlflow.parentRunId"])
    params = parent.data.params
    assert params["pipeline"] == "uiview" and params["seed"] == "7"
    assert params["spec_digest"] == spec.digest()
    assert params["stages"] == "data:dataset, sft:sft"
    assert params["stage.sft.seed"] == "3" and params["stage.sft.kind"] == "sft"
    description = parent.data.tags["mlflow.note.content"]
    assert description.startswith("A tiny pipeline for the UI checks.")
    assert "`sft` (sft)" in description and "## Results" in description
    sft = first[-1]
    assert f"#/experiments/{parent.info.experiment_id}/runs/{sft.run_id}" in description
    assert "uiview-sft v1" in description
    assert parent.data.metrics["sft/final_train_loss"] == pytest.approx(sft.metrics["final_train_loss"])
    assert parent.data.tags["prefect.flow_run_url"].endswith(parent.data.tags["prefect.flow_run_id"])
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_logged_models_are_named_after_their_stage(runs):
    _, first, _ = runs
    client = _client()
    for outcome in first:
        if outcome.stage in ("base", "sft"):
            model_id = outcome.outputs["model"].uri.removeprefix("models:/")
            assert client.get_logged_model(model_id).name == outcome.stage


def _flow_run_with_tasks_and_artifacts(flow_run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter

    async def read():
        async with get_client() as client:
            flow_run = await client.read_flow_run(flow_run_id)
            task_runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )
        return flow_run, task_runs, artifacts

    return asyncio.run(read())


@pytest.mark.parametrize("which", [1, 2], ids=["ran", "cached"])
def test_prefect_flow_run_is_named_tagged_and_every_stage_leaves_a_report(runs, which):
    spec, *outcomes_by_run = runs
    outcomes = outcomes_by_run[which - 1]
    assert {o.status for o in outcomes} == ({"ran"} if which == 1 else {"cached"})
    parent = _client().get_run(_client().get_run(outcomes[0].run_id).data.tags["mlflow.parentRunId"])
    if which == 2:  # cached outcomes point at the first run's stage runs; find the second parent
        parent = _client().get_run(
            _client()
            .search_runs(
                [parent.info.experiment_id],
                "tags.`rlhf.run_type` = 'pipeline'",
                order_by=["attributes.start_time DESC"],
            )[0]
            .info.run_id
        )
    flow_run, task_runs, artifacts = _flow_run_with_tasks_and_artifacts(
        parent.data.tags["prefect.flow_run_id"]
    )
    assert flow_run.name.startswith(f"uiview-{spec.digest()[:8]}-")
    assert {"pipeline:uiview", f"spec:{spec.digest()[:12]}"} <= set(flow_run.tags)
    assert sorted(t.name for t in task_runs) == ["base [base_model]", "data [dataset]", "sft [sft]"]
    reports = {a.key: a for a in artifacts if a.type == "markdown"}
    assert set(reports) == {"uiview-base-result", "uiview-data-result", "uiview-sft-result", "uiview-summary"}
    sft = next(o for o in outcomes if o.stage == "sft")
    text = reports["uiview-sft-result"].data
    assert f"#/experiments/{parent.info.experiment_id}/runs/{sft.run_id}" in text
    assert text.count("http://127.0.0.1:5000/") >= 2  # the run and the registered version
    assert "final_train_loss" in text and sft.fingerprint[:16] in text
    assert f"**{sft.status}**" in text
    assert reports["uiview-sft-result"].task_run_id is not None
    assert parent.info.run_id in reports["uiview-summary"].data


def test_stages_publish_progress_events_for_a_live_view(runs):
    """Started, one event per logged step with step/total and the metrics, then how it ended."""
    sft = [(e.event, e.status, e.step, e.total) for e in EVENTS if e.stage == "sft"]
    assert sft == [
        ("started", "running", None, None),
        ("step", "running", 1, 2),
        ("step", "running", 2, 2),
        ("finished", "ran", None, None),
        ("finished", "cached", None, None),
    ]
    step = next(e for e in EVENTS if e.stage == "sft" and e.event == "step")
    assert "train/loss" in step.metrics
    assert [e.status for e in EVENTS if e.stage == "data"] == ["running", "ran", "cached"]
