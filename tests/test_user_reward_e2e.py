"""End to end: GRPO trained on a reward of the user's own, in a file next to the spec.

What a user bringing a task would check: the pipeline runs with ``rewards.py:score`` as the GRPO
reward and as the evaluation's verifier; the function's extra metric is logged; the stage run and the
model card name the function and the digest of its code; editing the file re-runs exactly the stages
that use it (GRPO and the evaluation), while base, data and SFT stay cached.
"""

from __future__ import annotations

import copy

import pytest
import yaml

pytestmark = pytest.mark.e2e

REWARDS = '''
def score(completion, row, bonus=0.0):
    """1 (+ bonus) when the completion ends with the row's answer; reports whether it has a digit."""
    has_digit = any(ch.isdigit() for ch in completion)
    right = completion.strip().rstrip(".").endswith(str(row["answer"]))
    return (1.0 + bonus if right else 0.0), {"has_digit": float(has_digit)}
'''


def _spec(tmp_path):
    from conftest import TINY_SPEC

    spec = copy.deepcopy(TINY_SPEC)
    spec["name"] = "own-reward"
    stages = spec["stages"]
    del stages["rm"]
    stages["data"]["source"]["synthetic"]["n"] = 60
    stages["sft"]["train"].update(max_steps=4, checkpoint_every=4)
    stages["grpo"] = {
        "kind": "policy_gradient",
        "algorithm": "grpo",
        "policy": "sft",
        "prompts": "data.prompts",
        "rewards": [{"function": "rewards.py:score", "options": {"bonus": 0.5}}],
        "kl": {"beta": 0.0},
        "rollouts": 2,
        "prompts_per_rollout": 2,
        "group_size": 4,
        "truncated": "score",
        "generation": {"max_new_tokens": 8},
        "train": {"batch_size": 8, "lr": 1e-3, "log_every": 1},
    }
    stages["eval"].update(models=["sft", "grpo"], max_prompts=4, verifier="rewards.py:score")
    stages["eval"]["verifier_options"] = {}
    (tmp_path / "rewards.py").write_text(REWARDS)
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grpo_on_a_users_reward_file_logs_it_names_it_and_reruns_only_its_stages_after_an_edit(
    tmp_path, prefect_api_url, one_torch_thread
):
    from mlflow import MlflowClient

    from flows.pipeline import run_pipeline
    from flows.plan import plan_pipeline
    from registry.model_cards import model_card
    from rlhf_core.spec import load_spec

    home = str(tmp_path / "home")
    spec_path = _spec(tmp_path)
    outcomes = {o.stage: o for o in run_pipeline(load_spec(spec_path), home=home)}
    assert {s: o.status for s, o in outcomes.items()} == dict.fromkeys(
        ("base", "data", "sft", "grpo", "eval"), "ran"
    )
    client = MlflowClient()
    grpo_run = client.get_run(outcomes["grpo"].run_id)
    assert "rollout/reward/rewards.py:score/has_digit" in grpo_run.data.metrics
    tag = grpo_run.data.tags["rlhf.reward_functions"]
    assert tag.startswith("rewards[0].function=rewards.py:score@") and len(tag.split("@")[1]) == 12
    card = model_card("own-reward-grpo", "1")
    assert "reward functions" in card and "rewards.py:score@" in card

    (tmp_path / "rewards.py").write_text(REWARDS.replace("1.0 + bonus", "2.0 + bonus"))
    plan = {p.stage: p.action for p in plan_pipeline(load_spec(spec_path), set(), home)}
    assert plan == {"base": "cached", "data": "cached", "sft": "cached", "grpo": "run", "eval": "run"}
