"""Every recipe, shrunk to seconds, runs through the real flow; ``rlhf plan`` then derives the very
fingerprints the run computed before calling each task, and finds every stage cached."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_core.spec import parse_spec, read_yaml
from rlhf_core.spec.compute import PROFILE_FILE  # recipes/profiles.yaml: compute profiles

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[1]
# online_dpo pairs only completions a verifier tells apart: a policy trained for two steps gets every
# answer wrong, so its rounds find no pair. tests/test_online_dpo_e2e.py runs the template instead.
NEEDS_A_TRAINED_POLICY = {"online_dpo"}
# a judge behind an endpoint: tests/test_endpoint_judge_e2e.py runs it against a real test server
NEEDS_A_SERVER = {"endpoint_judge_labeling"}
# the vLLM engine needs an attention head size >= 32, which the shrunk model has not:
# tests/test_engine_pipeline_e2e.py runs it (and kills and resumes it)
NEEDS_THE_ENGINE = {"grpo_vllm"}
# its system turn (the tools' declarations) needs the recipe's vocabulary and lengths:
# tests/test_tool_use_e2e.py runs it shrunk with those kept (and samples, selects and trains on episodes)
NEEDS_ITS_LENGTHS = {"tool_use"}
RECIPES = sorted(
    p
    for p in (REPO_ROOT / "recipes").glob("*.yaml")
    if p.stem not in NEEDS_A_TRAINED_POLICY | NEEDS_A_SERVER | NEEDS_THE_ENGINE | NEEDS_ITS_LENGTHS
    and p.name != PROFILE_FILE
)

# Field name -> small value, applied wherever the field appears in a recipe (no per-kind knowledge).
SMALL = {
    "max_steps": 2,
    "epochs": 1,
    "batch_size": 4,
    "max_length": 64,
    "max_new_tokens": 4,
    "max_prompts": 6,
}
TINY_MODEL = {"layers": 1, "heads": 2, "vocab_size": 320}


def shrink(node, key: str | None = None):
    """A copy of a recipe that keeps its stages and wiring but trains and samples almost nothing."""
    if isinstance(node, list):
        return [shrink(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, value in node.items():
        if k == "min_reward":
            continue  # a few untrained samples may all miss it, leaving nothing to select
        if k in SMALL and isinstance(value, int):
            out[k] = SMALL[k]
        elif k == "n" and isinstance(value, int):
            out[k] = 60 if key == "synthetic" else 2
        elif k == "k" and key == "pass_at_k":
            out[k] = [1, 2]  # pass@k needs k <= n (n shrinks to 2)
        elif k == "tiny":  # a quarter of the width keeps two models of other widths apart (a teacher)
            out[k] = {**value, **TINY_MODEL, "hidden_size": max(16, value.get("hidden_size", 128) // 4)}
        else:
            out[k] = shrink(value, k)
    if isinstance(out.get("train"), dict) and "max_steps" not in out["train"]:
        out["train"] = {**out["train"], "max_steps": SMALL["max_steps"]}
    if "rollouts" in out:  # a policy trained two steps never ends an answer in 4 tokens: score them anyway
        out["truncated"] = "score"
    return out


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_and_plan_agrees_on_every_fingerprint(recipe, tmp_path, prefect_api_url):
    from flows.pipeline import run_pipeline
    from flows.plan import plan_pipeline

    spec = parse_spec(shrink(read_yaml(recipe)), base_dir=recipe.parent)
    home = str(tmp_path / "home")
    outcomes = run_pipeline(spec, home=home)
    assert {o.status for o in outcomes} == {"ran"}
    planned = plan_pipeline(spec, set(), home)
    assert {p.stage: p.fingerprint for p in planned} == {o.stage: o.fingerprint for o in outcomes}
    assert {p.stage: p.action for p in planned} == {o.stage: "cached" for o in outcomes}
