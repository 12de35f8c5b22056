"""End to end: a constitutional_revision stage in a pipeline (Prefect and MLflow running), its SFT rows
trained on by an sft stage and its preference pairs by a DPO stage, and a cache hit on the re-run."""

from __future__ import annotations

import pytest

from rlhf_core.data.loading import read_jsonl
from rlhf_core.spec import parse_spec

pytestmark = pytest.mark.e2e

TRAIN = {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "max_length": 96}


def test_revisions_feed_sft_and_dpo_and_a_rerun_hits_the_cache(tmp_path, tiny_spec_dict, prefect_api_url):
    from flows.pipeline import run_pipeline
    from registry.datasets import materialize_dataset

    tiny_spec_dict["name"] = "cai"
    tiny_spec_dict["stages"] = {
        "data": tiny_spec_dict["stages"]["data"],
        "cai": {
            "kind": "constitutional_revision", "policy": "base", "prompts": "data.prompts", "max_prompts": 8,
            "constitution": ["Be honest.", "Be harmless.", "Be concise."], "revisions": 2,
            "generation": {"max_new_tokens": 6, "temperature": 1.0}, "splits": {"train": 1.0},
        },
        "sft_cai": {"kind": "sft", "model": "base", "data": "cai.sft", "train": TRAIN},
        "dpo_cai": {"kind": "direct_alignment", "policy": "base", "data": "cai.preferences", "train": TRAIN},
    }  # fmt: skip
    spec, home = parse_spec(tiny_spec_dict), str(tmp_path / "home")
    outcomes = {o.stage: o for o in run_pipeline(spec, home=home)}

    sft_ref, pairs_ref = outcomes["cai"].outputs["sft"], outcomes["cai"].outputs["preferences"]
    assert sft_ref.kind == "sft" and pairs_ref.kind == "preference"
    rows = read_jsonl(materialize_dataset(sft_ref, tmp_path / "sft") / "train.jsonl")
    assert len(rows) == sft_ref.splits["train"] > 0
    for row in rows:
        assert len(row["principles"]) == len(row["critiques"]) == len(row["revisions"]) == 2
        assert row["completion"] == row["revisions"][-1]
    pairs = read_jsonl(materialize_dataset(pairs_ref, tmp_path / "pairs") / "train.jsonl")
    assert {(p["chosen"], p["rejected"]) for p in pairs} <= {
        (r["completion"], r["initial_completion"]) for r in rows
    }
    assert "model" in outcomes["sft_cai"].outputs and "model" in outcomes["dpo_cai"].outputs

    again = {o.stage: o for o in run_pipeline(parse_spec(tiny_spec_dict), home=home)}
    assert again["cai"].status == "cached" and again["cai"].outputs["sft"].digest == sft_ref.digest
