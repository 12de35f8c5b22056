"""End to end, through the Prefect flow and the MLflow store: the reward_model stage's held-out
breakdowns and reliability plot on its run, and an sft stage that learns verdicts registering a judge."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_core.spec import parse_spec

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The spec (a preference file with topic, Likert and answer columns; a reward model; a judge) and
    a home for its runs."""
    from rlhf_core.data.loading import write_jsonl
    from rlhf_core.data.synthetic import synthetic_records

    tmp = tmp_path_factory.mktemp("rm-eval")
    prompts = synthetic_records("arithmetic", "prompts", n=40, seed=0, max_operand=9)
    pairs = synthetic_records("arithmetic", "preference", n=40, seed=0, max_operand=9)
    rows = [
        {
            **pair,
            "answer": p["answer"],
            "topic": "plus" if "+" in pair["prompt"] else "other",
            "likert": i % 4,
        }
        for i, (pair, p) in enumerate(zip(pairs, prompts, strict=True))
    ]
    write_jsonl(rows, tmp / "pairs.jsonl")
    spec = {
        "name": "e2e-rmeval",
        "models": {"base": {"tiny": {"hidden_size": 32, "layers": 1, "heads": 2, "vocab_size": 320,
                                     "max_position_embeddings": 1024}}},
        "stages": {
            "data": {
                "kind": "dataset",
                "source": {"file": {"path": str(tmp / "pairs.jsonl"), "format": "preference"}},
                "splits": {"train": 0.5, "eval": 0.5},
            },
            "rm": {
                "kind": "reward_model", "model": "base", "data": "data.preferences",
                "train": {"max_steps": 2, "batch_size": 8, "max_length": 64},
                "evaluation": {"category_column": "topic", "label_margin_column": "likert",
                               "verifier": "arithmetic_exact"},
            },
            "judge": {
                "kind": "sft", "model": "base",
                "judge": {"preferences": "data.preferences", "principles": ["Prefer the correct sum."]},
                "train": {"max_steps": 2, "batch_size": 4, "max_length": 1024},
            },
            "tasks": {"kind": "dataset", "source": {"synthetic": {"n": 20, "max_operand": 9}}},
            "policy": {"kind": "sft", "model": "base", "data": "tasks.sft",
                       "train": {"max_steps": 2, "batch_size": 4, "max_length": 64}},
            "bon": {
                "kind": "evaluate", "models": ["policy"], "prompts": "tasks.prompts", "max_prompts": 4,
                "generation": {"max_new_tokens": 4},
                "best_of_n": {"n": 4, "rewards": [{"model": "rm"}], "curve": True,
                              "generation": {"max_new_tokens": 4}},
            },
        },
    }  # fmt: skip
    return spec, tmp / "home"


def _run(pipeline, stages: tuple[str, ...]) -> dict:
    from flows.pipeline import run_pipeline

    spec, home = pipeline
    chosen = {**spec, "stages": {k: v for k, v in spec["stages"].items() if k in stages}}
    return {o.stage: o for o in run_pipeline(parse_spec(chosen), home=str(home))}


@pytest.fixture(scope="module")
def outcomes(pipeline, prefect_api_url):
    return _run(pipeline, ("data", "rm"))


def test_the_reward_models_breakdowns_and_reliability_plot_are_on_its_run(outcomes, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient()
    run_id = outcomes["rm"].run_id
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval/pairs/plus"] + metrics.get("eval/pairs/other", 0) == metrics["eval/pairs"] == 20
    assert 0 <= metrics["eval/accuracy/plus"] <= 1 and 0 <= metrics["eval/calibration_ece"] <= 0.5
    # the synthetic rejected answer is always wrong: the verifier orders every pair
    assert metrics["eval/verifier_pairs"] == 20 and metrics["eval/verifier_ties"] == 0
    assert metrics["eval/verifier_agreement"] == metrics["eval/accuracy"]
    assert sum(v for k, v in metrics.items() if k.startswith("eval/by_label_margin/pairs/")) == 20
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/reliability.png", "plots/heldout_breakdown.json"} <= plots
    png = client.download_artifacts(run_id, "plots/reliability.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    version = client.get_model_version("e2e-rmeval-rm", outcomes["rm"].outputs["model"].registered_version)
    assert version.run_id == run_id  # the registered version's run holds the plot


def test_an_sft_stage_on_verdicts_registers_a_judge(pipeline, prefect_api_url):
    from mlflow import MlflowClient

    ref = _run(pipeline, ("data", "judge"))["judge"].outputs["model"]
    assert ref.role == "judge"
    version = MlflowClient().get_model_version(ref.registered_name, ref.registered_version)
    assert version.tags["rlhf.role"] == "judge"


def test_the_registered_versions_card_lists_the_heldout_figures(outcomes):
    from mlflow import MlflowClient

    from registry.model_metrics import version_metrics

    ref = outcomes["rm"].outputs["model"]
    figures = version_metrics(ref.registered_name, ref.registered_version)
    assert {"eval/accuracy", "eval/calibration_ece", "eval/verifier_agreement"} <= set(figures)
    card = MlflowClient().get_model_version(ref.registered_name, ref.registered_version).description
    assert "`eval/calibration_ece` = " in card
    assert "## Plots" in card and "`plots/reliability.png`" in card  # the reliability plot of its run


def test_an_evaluations_best_of_n_curve_is_on_the_evaluated_versions_card(pipeline, outcomes):
    """Book ch.5 / ch.14: the curve of proxy and gold reward against N is drawn by the evaluation and
    listed on the card of the version it measured."""
    from mlflow import MlflowClient

    ref = _run(pipeline, ("data", "rm", "tasks", "policy", "bon"))["policy"].outputs["model"]
    card = MlflowClient().get_model_version(ref.registered_name, ref.registered_version).description
    assert "## Plots" in card and "`plots/best_of_n_curve.png`" in card
    assert "`eval/best_of_n/gold_at_4` = " in card  # the curve's figures, measured against the verifier
