"""End to end (book ch.13): recipes/tool_use.yaml, shrunk, through the real flow, with a `sample` stage
in the tools environment whose successful episodes `rejection_sampling` keeps as SFT trajectories that
an `sft` stage trains on."""

from __future__ import annotations

import pytest

from rlhf_core.data.loading import read_jsonl
from rlhf_core.data.schemas import validate_records
from rlhf_core.spec import parse_spec, read_yaml
from tests.test_recipes_e2e import REPO_ROOT, shrink

pytestmark = pytest.mark.e2e

RECIPE = REPO_ROOT / "recipes" / "tool_use.yaml"


def _shrunk_recipe() -> dict:
    """The recipe shrunk like every recipe (tests/test_recipes_e2e.py), but with room for its system turn:
    the tools' declarations take ~210 tokens with the recipe's 1024-token vocabulary."""
    raw = shrink(read_yaml(RECIPE))
    raw["models"]["base"]["tiny"]["vocab_size"] = 1024
    stages = raw["stages"]
    for name in ("sft", "sft_direct", "dpo"):
        stages[name]["train"]["max_length"] = 384
    stages["grpo"] |= {"rollouts": 2, "prompts_per_rollout": 2, "group_size": 2}
    stages["samples"] = {
        "kind": "sample", "policy": "sft", "prompts": "problems.prompts", "split": "eval", "n": 2,
        "max_prompts": 4, "environment": stages["grpo"]["environment"],
        "generation": {"temperature": 1.0, "max_new_tokens": 4},
        "rewards": [{"function": "arithmetic_exact"}],
    }  # fmt: skip
    stages["kept"] = {"kind": "rejection_sampling", "completions": "samples", "strategy": "top_per_prompt"}
    train = {"max_steps": 2, "batch_size": 2, "max_length": 384}
    stages["sft_again"] = {"kind": "sft", "model": "sft", "data": "kept.sft", "train": train}
    return raw


def test_the_tool_use_recipe_runs_and_episodes_become_sft_trajectories(tmp_path, prefect_api_url):
    from flows.pipeline import run_pipeline
    from registry.datasets import materialize_dataset

    spec = parse_spec(_shrunk_recipe(), base_dir=RECIPE.parent)
    outcomes = {o.stage: o for o in run_pipeline(spec, home=str(tmp_path / "home"))}
    assert {o.status for o in outcomes.values()} == {"ran"}

    def rows(stage: str, output: str, split: str) -> list[dict]:
        return read_jsonl(
            materialize_dataset(outcomes[stage].outputs[output], tmp_path / stage) / f"{split}.jsonl"
        )

    trajectories = rows("trajectories", "sft", "train")
    roles = [m["role"] for m in trajectories[0]["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"] and trajectories[0]["tools"]

    episodes = rows("samples", "completions", "eval")
    assert len(episodes) == 4 * 2
    for row in episodes:
        assert row["messages"][0] == {"role": "user", "content": row["prompt"]}
        assert row["turns"] >= 1 and row["outcome"] in ("done", "turn_limit", "length", "context_limit")
        assert row["tools"][0]["function"]["name"] == "calculator" and "gold_tool_calls" in row
        assert set(row["scores"]) == {"arithmetic_exact"}

    kept = rows("kept", "sft", "train")
    assert len(kept) == 4  # the best episode of each prompt
    validate_records(kept, "sft", source="kept.sft")  # trajectories as SFT rows, tools included
    assert all(row["messages"][0]["role"] == "user" and row["tools"] for row in kept)
    assert outcomes["sft_again"].registered == "tool-use-sft_again v1"

    with_tool = outcomes["eval_with_tool"].outputs["report"].metrics
    for model in ("sft", "grpo"):
        figures = with_tool[model]
        assert {"eval/accuracy", "eval/pass_hat_2", "eval/episode/turns", "eval/tool_call_match"} <= set(
            figures
        )
        assert figures["eval/pass_hat_2"] <= figures["eval/pass_at_1"] <= figures["eval/pass_at_2"]
    assert "eval/episode/turns" not in outcomes["eval_without_tool"].outputs["report"].metrics["grpo"]
