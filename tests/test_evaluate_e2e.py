"""End to end: an evaluate stage comparing a fine-tuned model with its base, through the real Prefect
flow and MLflow store: the figures on the stage run, report.md and the plots as its artifacts, the
Prefect markdown artifact, and the figures on each registered model's logged model (what the
registry's version page shows)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from rlhf_core.spec import parse_spec

pytestmark = pytest.mark.e2e
PIPELINE = "e2e-evalcmp"


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, prefect_api_url):
    from conftest import TINY_SPEC

    from flows.pipeline import run_pipeline

    spec = copy.deepcopy(TINY_SPEC)
    spec["name"] = PIPELINE
    spec["stages"]["sft"]["train"] |= {"max_steps": 8}
    spec["stages"]["eval"] |= {
        "max_prompts": 6,
        "generation": {"max_new_tokens": 4},
        "baseline": "base",
        "rewards": [{"model": "rm"}],
        "win_rate": {"judges": ["verifier", {"model": "rm"}]},
        "pass_at_k": {"n": 3, "k": [1, 3], "generation": {"max_new_tokens": 4}},
        "kl": {"samples_per_prompt": 2, "max_new_tokens": 4},
    }
    outcomes = run_pipeline(parse_spec(spec), home=str(tmp_path_factory.mktemp("home")))
    return {o.stage: o for o in outcomes}


def test_the_stage_run_holds_every_figure_with_its_interval(evaluation):
    from mlflow import MlflowClient

    outcome = evaluation["eval"]
    assert outcome.status == "ran"
    metrics = MlflowClient().get_run(outcome.run_id).data.metrics
    figures = ("win_rate/verifier", "win_rate/rm:rm", "tie_rate/rm:rm", "pass_at_1", "pass_at_3",
               "kl_to_reference", "length/mean", "length/p90", "nll", "reward/rm:rm", "accuracy")  # fmt: skip
    for figure in figures:
        for suffix in ("", "_ci_low", "_ci_high", "_n"):
            assert f"sft/eval/{figure}{suffix}" in metrics, f"sft/eval/{figure}{suffix}"
    assert metrics["sft/eval/win_rate/rm:rm_n"] == 6 and metrics["sft/eval/pass_at_3_n"] == 6
    assert metrics["sft/eval/pass_at_1"] <= metrics["sft/eval/pass_at_3"]
    assert metrics["sft/eval/nll"] == metrics["sft/eval/loss"]
    assert metrics["base/eval/kl_to_reference"] == 0.0  # the baseline is the reference
    assert not any(k.startswith("base/eval/win_rate/") for k in metrics)  # the baseline gets no win rate
    report = outcome.outputs["report"].metrics
    assert report["sft"]["eval/win_rate/verifier"] == metrics["sft/eval/win_rate/verifier"]


def test_report_table_and_plots_are_artifacts_of_the_stage_run(evaluation, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient()
    run_id = evaluation["eval"].run_id
    assert {"report.json", "report.md", "samples.json", "plots"} <= {
        a.path for a in client.list_artifacts(run_id)
    }
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/win_rate-rm-rm.png", "plots/kl_to_reference.png", "plots/reward_vs_kl.png"} <= plots
    png = client.download_artifacts(run_id, "plots/reward_vs_kl.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = Path(client.download_artifacts(run_id, "report.md", str(tmp_path))).read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | accuracy | pass_at_1 | pass_at_3 | win_rate/rm:rm |")
    assert rows[2].startswith("| base (baseline) |") and rows[3].startswith("| sft |")
    assert "n=6" in rows[3]


def test_the_table_is_a_prefect_markdown_artifact(evaluation):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            key = ArtifactFilterKey(any_=[f"{PIPELINE}-eval-report"])
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=key))

    (artifact,) = asyncio.run(read())
    assert artifact.type == "markdown" and artifact.task_run_id is not None
    assert "| sft |" in artifact.data and "win_rate/verifier" in artifact.data


def test_registered_versions_carry_their_figures(evaluation):
    from mlflow import MlflowClient

    from registry.model_metrics import version_metrics

    run = MlflowClient().get_run(evaluation["eval"].run_id).data.metrics
    sft = version_metrics(f"{PIPELINE}-sft", "1")
    assert sft["eval/win_rate/rm:rm"] == run["sft/eval/win_rate/rm:rm"]
    assert sft["eval/kl_to_reference_ci_high"] == run["sft/eval/kl_to_reference_ci_high"]
    base = version_metrics(f"{PIPELINE}-base", "1")
    assert base["eval/accuracy"] == run["base/eval/accuracy"] and "eval/win_rate/rm:rm" not in base
