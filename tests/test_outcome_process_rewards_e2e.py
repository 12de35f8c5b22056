"""End to end: synthetic worked solutions -> an ORM and a PRM (registered as reward models) -> both as
reward sources of a sample stage, aggregated as their options say."""

from __future__ import annotations

import pytest

from rlhf_core.data.loading import read_jsonl
from rlhf_core.spec import parse_spec

pytestmark = pytest.mark.e2e


def test_orm_and_prm_stages_register_reward_models_that_score_samples(
    tmp_path, tiny_spec_dict, prefect_api_url
):
    from mlflow import MlflowClient

    from flows.pipeline import run_pipeline
    from registry.datasets import materialize_dataset

    train = {"max_steps": 2, "batch_size": 8, "grad_accum": 1, "lr": 1e-3, "max_length": 96}
    tiny_spec_dict["name"] = "ormprm"
    tiny_spec_dict["stages"] = {
        # rows are split one by one: half for eval, so that some prompts keep both their completions there
        "data": {
            "kind": "dataset", "source": {"synthetic": {"n": 40, "max_operand": 30}},
            "splits": {"train": 0.5, "eval": 0.5},
        },
        "orm": {"kind": "outcome_reward_model", "model": "base", "data": "data.outcomes", "train": train},
        "prm": {
            "kind": "process_reward_model", "model": "base", "data": "data.step_labels",
            "labels": "three_class", "train": train,
        },
        "sample": {
            "kind": "sample", "policy": "base", "prompts": "data.prompts", "split": "eval", "n": 2,
            "generation": {"temperature": 1.0, "max_new_tokens": 6, "batch_size": 8},
            "rewards": [
                {"model": "orm", "options": {"aggregation": "last_m", "last_m": 2}},
                {"model": "prm", "options": {"aggregation": "weighted"}},
                {"model": "prm"},  # the same model with its default aggregation (min): another source
            ],
        },
    }  # fmt: skip
    outcomes = {o.stage: o for o in run_pipeline(parse_spec(tiny_spec_dict), home=str(tmp_path / "home"))}

    assert outcomes["data"].outputs["outcomes"].kind == "outcome"
    assert outcomes["data"].outputs["step_labels"].kind == "step_labels"
    for name in ("orm", "prm"):
        ref = outcomes[name].outputs["model"]
        assert ref.role == "reward" and outcomes[name].registered == f"ormprm-{name} v1"
    orm_run = MlflowClient().get_run(outcomes["orm"].run_id).data.metrics
    assert {"eval/top1_accuracy", "eval/pairwise_accuracy", "eval/reward_correct_mean"} <= set(orm_run)
    prm_run = MlflowClient().get_run(outcomes["prm"].run_id).data.metrics
    assert {"eval/step_accuracy", "eval/solution_accuracy"} <= set(prm_run)

    completions = outcomes["sample"].outputs["completions"]
    rows = read_jsonl(materialize_dataset(completions, tmp_path / "dl") / "eval.jsonl")
    assert rows and all(set(r["scores"]) == {"rm:orm:last_2", "rm:prm:weighted", "rm:prm"} for r in rows)
    assert all(r["scores"]["rm:prm"] <= r["scores"]["rm:prm:weighted"] + 1e-9 for r in rows)  # min <= mean
    assert all(0.0 < v < 1.0 for r in rows for v in r["scores"].values())  # probabilities
