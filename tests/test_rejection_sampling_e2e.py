"""End to end: sample N completions scored by a verifier and a reward model, select, fine-tune."""

from __future__ import annotations

import math

import pytest

from rlhf_core.data.loading import read_jsonl
from rlhf_core.spec import parse_spec

pytestmark = pytest.mark.e2e


def test_sample_select_and_finetune_on_the_selection(tmp_path, tiny_spec_dict, prefect_api_url):
    from flows.pipeline import run_pipeline
    from registry.datasets import materialize_dataset

    stages = tiny_spec_dict["stages"]
    tiny_spec_dict["name"] = "rs"
    del stages["eval"]
    stages["sample"] = {
        "kind": "sample",
        "policy": "sft",
        "prompts": "data.prompts",
        "split": "eval",
        "n": 3,
        "generation": {"temperature": 1.0, "max_new_tokens": 6, "batch_size": 16},
        "rewards": [{"function": "arithmetic_exact"}, {"model": "rm", "weight": 0.5}],
    }
    stages["select"] = {"kind": "rejection_sampling", "completions": "sample", "strategy": "top_per_prompt"}
    stages["sft_rs"] = {
        "kind": "sft",
        "model": "sft",
        "data": "select.sft",
        "train": {"max_steps": 2, "batch_size": 4, "max_length": 64},
    }
    stages["prefs"] = {
        "kind": "label_preferences",
        "completions": "sample",
        "pairing": "all_pairs",
        "judge": [{"function": "arithmetic_exact"}, {"model": "rm", "weight": 0.5}],
    }
    stages["eval_bon"] = {  # best-of-N with the trained reward model as the selector
        "kind": "evaluate",
        "models": ["sft", "sft_rs"],
        "prompts": "data.prompts",
        "max_prompts": 10,
        "generation": {"max_new_tokens": 6},
        "best_of_n": {"n": 3, "rewards": [{"model": "rm"}], "generation": {"max_new_tokens": 6}},
    }
    home = tmp_path / "home"
    outcomes = {o.stage: o for o in run_pipeline(parse_spec(tiny_spec_dict), home=str(home))}

    completions_ref = outcomes["sample"].outputs["completions"]
    assert completions_ref.kind == "completions" and completions_ref.splits == {"eval": 20 * 3}
    rows = read_jsonl(materialize_dataset(completions_ref, tmp_path / "dl") / "eval.jsonl")
    assert {tuple(sorted(r["scores"])) for r in rows} == {("arithmetic_exact", "rm:rm")}
    for r in rows:  # the composite is the weighted sum of the named scores
        assert r["reward"] == pytest.approx(r["scores"]["arithmetic_exact"] + 0.5 * r["scores"]["rm:rm"])

    selected = read_jsonl(
        materialize_dataset(outcomes["select"].outputs["sft"], tmp_path / "dl2") / "train.jsonl"
    )
    assert len(selected) == 20  # one per prompt
    best = {}
    for r in rows:
        best[r["prompt"]] = max(best.get(r["prompt"], float("-inf")), r["reward"])
    assert sorted(s["reward"] for s in selected) == pytest.approx(sorted(best.values()))
    assert outcomes["sft_rs"].registered == "rs-sft_rs v1"

    prefs_ref = outcomes["prefs"].outputs["preferences"]
    assert prefs_ref.kind == "preference" and set(prefs_ref.splits) == {"train", "eval"}
    pairs = [
        p
        for split in prefs_ref.splits
        for p in read_jsonl(materialize_dataset(prefs_ref, tmp_path / "dl3") / f"{split}.jsonl")
    ]
    score = {(r["prompt"], r["completion"]): r["reward"] for r in rows}  # same judge as the sample rewards
    assert pairs and all(
        score[(p["prompt"], p["chosen"])] > score[(p["prompt"], p["rejected"])] for p in pairs
    )

    # `rlhf plan` computes the fingerprints the tasks computed, reward models of best_of_n included
    from flows.plan import plan_pipeline

    planned = plan_pipeline(parse_spec(tiny_spec_dict), set(), str(home))
    assert {p.stage: p.action for p in planned if p.stage in stages} == {name: "cached" for name in stages}

    report = outcomes["eval_bon"].outputs["report"].metrics
    for model in ("sft", "sft_rs"):
        m = report[model]
        assert m["eval/best_of_n/prompts"] == 10
        assert 0 <= m["eval/best_of_n/pass_at_1"] <= m["eval/best_of_n/pass_at_n"] <= 1
        assert m["eval/best_of_n/accuracy"] <= m["eval/best_of_n/pass_at_n"]
        assert math.isfinite(m["eval/best_of_n/selected_reward_mean"])


def test_policy_judge_that_cannot_parse_is_counted_then_fails_the_stage(
    tmp_path, tiny_spec_dict, prefect_api_url
):
    """A tiny random judge never writes [[A]]/[[B]]/[[C]]: every pair is counted as unparseable, none is kept,
    and the stage fails saying so (nothing is registered or recorded as its output)."""
    from flows.pipeline import run_pipeline
    from registry import stage_cache, tracking

    stages = tiny_spec_dict["stages"]
    tiny_spec_dict["name"] = "judge"
    del stages["eval"], stages["rm"]
    stages["sample"] = {
        "kind": "sample",
        "policy": "sft",
        "prompts": "data.prompts",
        "split": "eval",
        "max_prompts": 4,
        "n": 2,
        "generation": {"temperature": 1.0, "max_new_tokens": 6},
        "rewards": [{"function": "arithmetic_exact"}],
    }
    stages["prefs"] = {
        "kind": "label_preferences",
        "completions": "sample",
        "judge_policy": {"model": "base", "principles": ["Prefer the correct answer."], "max_new_tokens": 4},
    }
    with pytest.raises(ValueError, match=r"stage 'prefs': no preference pair left.*judge_unparseable"):
        run_pipeline(parse_spec(tiny_spec_dict), home=str(tmp_path / "home"))
    experiment = tracking.client().get_experiment_by_name("judge").experiment_id
    runs = tracking.client().search_runs([experiment], "tags.`rlhf.stage` = 'prefs'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert stage_cache.OUTPUT_TAG not in runs[0].data.tags
