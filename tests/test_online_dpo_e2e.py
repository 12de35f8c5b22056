"""Online / iterative DPO through the real flow: two rounds of sample -> judge -> optimise, each round
a set of ordinary stages with its own fingerprint, lineage from round to round, all cached on re-run."""

from __future__ import annotations

import pytest

from rlhf_core.spec import parse_spec

pytestmark = pytest.mark.e2e


def test_two_rounds_run_register_with_lineage_and_are_cached(tmp_path, tiny_spec_dict, prefect_api_url):
    from flows.pipeline import run_pipeline
    from flows.plan import plan_pipeline
    from registry import tracking

    stages = tiny_spec_dict["stages"]
    tiny_spec_dict["name"] = "online"
    del stages["eval"]
    stages["online"] = {
        "kind": "iterative_dpo",
        "policy": "sft",
        "prompts": "data.prompts",
        "rounds": 2,
        "max_prompts": 6,
        "n": 3,
        "generation": {"max_new_tokens": 6, "batch_size": 32},
        "judge": [{"model": "rm"}],  # continuous scores: no round ends without a pair
        "pairing": "all_pairs",
        "loss": "dpo",
        "train": {"max_steps": 2, "batch_size": 4, "max_length": 64, "lr": 1e-3},
    }
    spec = parse_spec(tiny_spec_dict)
    home = str(tmp_path / "home")
    outcomes = {o.stage: o for o in run_pipeline(spec, home=home)}
    rounds = ["online-r1-samples", "online-r1-pairs", "online-r1", "online-r2-samples", "online-r2-pairs"]
    assert all(outcomes[name].status == "ran" for name in [*rounds, "online"])
    assert outcomes["online-r1"].registered == "online-online-r1 v1"
    assert outcomes["online"].registered == "online-online v1"

    client = tracking.client()
    tags = client.get_model_version("online-online", "1").tags
    assert tags["rlhf.upstream_models"] == "online-online-r1:1"  # round 2 trained from round 1
    assert tags["rlhf.reference_model"] == "online-online-r1:1"  # reference 'previous'
    planned = {p.stage: p.action for p in plan_pipeline(spec, set(), home)}
    assert all(planned[name] == "cached" for name in [*rounds, "online"])
