"""End to end: on-policy distillation (book ch.12) of the tiny base model from the pipeline's SFT model.

What a user would check: the stage runs with ``distillation: {teacher: sft}`` and no reward sources; its
run logs the reverse KL to the teacher per rollout and names the teacher in a tag of the registered
version; the teacher is an input of the stage like any reference, so changing the teacher's stage
re-runs the distillation while the student's stays cached.
"""

from __future__ import annotations

import copy

import pytest
import yaml

pytestmark = pytest.mark.e2e


def _spec(tmp_path, sft_lr: float = 1e-2):
    from conftest import TINY_SPEC

    spec = copy.deepcopy(TINY_SPEC)
    spec["name"] = "opd"
    stages = spec["stages"]
    del stages["rm"], stages["eval"]
    stages["data"]["source"]["synthetic"]["n"] = 60
    stages["sft"]["train"].update(max_steps=12, checkpoint_every=12, lr=sft_lr)
    stages["opd"] = {
        "kind": "policy_gradient",
        "algorithm": "grpo",
        "policy": "base",
        "prompts": "data.prompts",
        "distillation": {"teacher": "sft", "coef": 1.0},
        "kl": {"beta": 0.0},
        "rollouts": 2,
        "prompts_per_rollout": 2,
        "group_size": 4,
        "generation": {"max_new_tokens": 8},
        "train": {"batch_size": 8, "lr": 1e-3, "log_every": 1},
    }
    path = tmp_path / "opd.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_distillation_stage_logs_the_reverse_kl_names_its_teacher_and_reruns_when_it_changes(
    tmp_path, prefect_api_url, one_torch_thread
):
    from mlflow import MlflowClient

    from flows.pipeline import run_pipeline
    from flows.plan import plan_pipeline
    from rlhf_core.spec import load_spec

    home = str(tmp_path / "home")
    outcomes = {o.stage: o for o in run_pipeline(load_spec(_spec(tmp_path)), home=home)}
    assert {s: o.status for s, o in outcomes.items()} == dict.fromkeys(("base", "data", "sft", "opd"), "ran")
    client = MlflowClient()
    run = client.get_run(outcomes["opd"].run_id)
    history = client.get_metric_history(run.info.run_id, "rollout/distill/reverse_kl")
    assert len(history) == 2 and all(m.value > 0.05 for m in history), history  # another model
    assert "rollout/distill/advantage_mean" in run.data.metrics
    tags = client.get_model_version("opd-opd", "1").tags
    assert tags["rlhf.teacher_model"] == "opd-sft:1" != tags["rlhf.upstream_models"], tags

    changed = _spec(tmp_path, sft_lr=5e-3)  # another teacher
    plan = {p.stage: p.action for p in plan_pipeline(load_spec(changed), set(), home)}
    assert plan == {"base": "cached", "data": "cached", "sft": "run", "opd": "run"}
