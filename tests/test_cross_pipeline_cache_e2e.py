"""End to end: two pipelines with different names in one home share their data and SFT stages.

What a user would check: the second pipeline's plan and run show base, data and sft as ``cached``
from the first pipeline (its runs, its registered versions) and train only its own reward model; its
parent run says which run each reused stage came from; the reward model's lineage leads to the first
pipeline's SFT run and version; ``rlhf reproduce`` walks from it across both pipelines.
"""

from __future__ import annotations

import copy

import pytest
from typer.testing import CliRunner

from rlhf_core.spec import parse_spec

pytestmark = pytest.mark.e2e


def _specs():
    from conftest import TINY_SPEC

    shared = copy.deepcopy({k: TINY_SPEC[k] for k in ("seed", "models")})
    data = {"kind": "dataset", "source": {"synthetic": {"n": 60, "max_operand": 9}}}
    sft = copy.deepcopy(TINY_SPEC["stages"]["sft"])
    sft["train"].update(max_steps=4, checkpoint_every=4)
    rm = copy.deepcopy(TINY_SPEC["stages"]["rm"])
    rm["train"].update(max_steps=2)
    first = {**shared, "name": "share-a", "stages": {"data": data, "sft": sft}}
    second = {**shared, "name": "share-b", "stages": {"data": data, "sft": sft, "rm": rm}}
    return parse_spec(first), parse_spec(second)


@pytest.fixture(scope="module")
def two_pipelines(tmp_path_factory, prefect_api_url, one_torch_thread):
    from flows.pipeline import run_pipeline
    from flows.plan import plan_pipeline

    home = tmp_path_factory.mktemp("shared-home")
    first_spec, second_spec = _specs()
    first = {o.stage: o for o in run_pipeline(first_spec, home=str(home))}
    plan = {p.stage: p for p in plan_pipeline(second_spec, set(), str(home))}
    second = {o.stage: o for o in run_pipeline(second_spec, home=str(home))}
    return home, first, plan, second


def test_the_second_pipeline_takes_shared_stages_from_the_first_and_trains_only_its_own(two_pipelines):
    from mlflow import MlflowClient

    _, first, plan, second = two_pipelines
    assert {s: o.status for s, o in first.items()} == {"base": "ran", "data": "ran", "sft": "ran"}
    shared = ("base", "data", "sft")
    assert {s: (p.action, p.origin) for s, p in plan.items()} == {
        **{s: ("cached", "share-a") for s in shared},
        "rm": ("run", None),
    }
    assert "pipeline share-a" in plan["sft"].reason and plan["sft"].run_id == first["sft"].run_id

    assert {s: o.status for s, o in second.items()} == {**{s: "cached" for s in shared}, "rm": "ran"}
    experiment = MlflowClient().get_experiment_by_name("share-a").experiment_id
    for stage in shared:
        outcome = second[stage]
        assert outcome.run_id == first[stage].run_id and outcome.outputs == first[stage].outputs
        assert (outcome.origin.pipeline, outcome.origin.experiment_id) == ("share-a", experiment)
    assert second["sft"].registered == "share-a-sft v1"  # the version the first pipeline registered
    assert second["rm"].registered == "share-b-rm v1" and second["rm"].origin is None
    assert MlflowClient().search_model_versions("name = 'share-b-sft'") == []  # nothing re-registered


def test_the_parent_run_and_the_summary_name_the_producing_pipeline_and_run(two_pipelines):
    from mlflow import MlflowClient

    from cli.app import print_summary
    from cli.console import console
    from rlhf_core.settings import RLHFSettings

    home, first, _, second = two_pipelines
    parent = MlflowClient().get_run(second["rm"].run_id).data.tags["rlhf.pipeline_run_id"]
    tags = MlflowClient().get_run(parent).data.tags
    assert tags["stage.sft"].startswith(f"cached run={first['sft'].run_id} pipeline=share-a ")
    assert tags["stage.rm"] == f"ran run={second['rm'].run_id}"

    with console.capture() as captured:
        print_summary("share-b", list(second.values()), RLHFSettings(home=home))
    summary = captured.get()
    assert summary.count("from pipeline share-a") == 3, summary
    assert first["sft"].run_id[:8] in summary


def test_the_reward_models_lineage_leads_to_the_first_pipelines_sft_run(two_pipelines):
    from cli.app import app
    from registry.lineage import model_lineage

    home, first, _, _ = two_pipelines
    rm = model_lineage("models:/share-b-rm/1")
    assert rm.pipeline == "share-b"
    (sft,) = rm.upstream
    assert (sft.label, sft.run_id, sft.pipeline) == ("share-a-sft:1", first["sft"].run_id, "share-a")
    assert [u.label for u in sft.upstream] == ["share-a-base:1"]

    # reproduce walks from the version to share-b's pipeline run and reads the reused stages' records
    result = CliRunner().invoke(
        app, ["reproduce", "share-b-rm:1", "--home", str(home)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "all stages match" in result.output


def test_reproduce_finds_reused_stages_by_digest_when_the_pipeline_run_listed_none(two_pipelines):
    """A pipeline run that failed before listing its stages (no ``stage.<name>`` tags): the stages it
    reused from the other pipeline are found in that pipeline's experiment by the digests read."""
    from mlflow import MlflowClient

    from registry.lineage import producing_pipeline

    _, first, _, second = two_pipelines
    client = MlflowClient()
    parent = client.get_run(second["rm"].run_id).data.tags["rlhf.pipeline_run_id"]
    for key in [k for k in client.get_run(parent).data.tags if k.startswith("stage.")]:
        client.delete_tag(parent, key)
    record = producing_pipeline("share-b-rm:1")
    assert {name: s.run_id for name, s in record.stages.items()} == {
        **{name: first[name].run_id for name in ("base", "data", "sft")},
        "rm": second["rm"].run_id,
    }
