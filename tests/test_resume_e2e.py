"""Exact resume through the real command: SIGKILL ``rlhf run`` mid-training, run it again, compare weights.

Home A runs the pipeline uninterrupted. Home B runs the same spec held after the first checkpoint of the
stage under test (SFT, or DPO or GRPO after a short SFT; ``hold_after_first_checkpoint.py``), so it can
never finish that stage before the kill, is killed with SIGKILL once that checkpoint exists, and is run
again with the plain command: it must say the stage resumed, and its final weights must match home A's to
within 1e-5. Half of the stage's steps come after the checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.e2e


def _spec(tmp_path: Path, tiny_spec_dict: dict, stage: str) -> Path:
    tiny_spec_dict["name"] = "resume"
    stages = tiny_spec_dict["stages"]
    del stages["eval"], stages["rm"]
    long_run = {"max_steps": 20, "checkpoint_every": 10, "log_every": 10, "batch_size": 16}
    if stage == "sft":
        stages["sft"]["train"].update(long_run)
    elif stage == "grpo":  # 3 updates per rollout: the checkpoint at step 10 lands inside rollout 4
        stages["grpo"] = {
            "kind": "policy_gradient",
            "algorithm": "grpo",
            "policy": "sft",
            "prompts": "data.prompts",
            "rewards": [{"function": "arithmetic_exact"}, {"function": "answer_format", "weight": 0.5}],
            "kl": {"beta": 0.05, "target": 1.0, "horizon": 100},
            "rollouts": 7,
            "prompts_per_rollout": 4,
            "group_size": 4,
            "update_epochs": 3,
            "truncated": "score",
            "generation": {"max_new_tokens": 8},
            "train": {"checkpoint_every": 10, "log_every": 10, "batch_size": 16, "lr": 1e-3},
        }
    else:
        stages["dpo"] = {
            "kind": "direct_alignment",
            "policy": "sft",
            "data": "data.preferences",
            "train": {**long_run, "batch_size": 8, "lr": 1e-3, "max_length": 64},
        }
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict))
    return path


HOLD = Path(__file__).resolve().parent / "hold_after_first_checkpoint.py"


def _rlhf(spec: Path, home: Path, api_url: str, *, held: bool = False) -> list[str]:
    entry = [str(HOLD)] if held else ["-m", "cli.app"]
    return [sys.executable, *entry, "run", str(spec), "--home", str(home)]


def _env(api_url: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api_url, "COLUMNS": "200"}


def _final_weights(home: Path, stage: str) -> dict:
    (model_dir,) = (home / "work").glob(f"{stage}-*/model")
    return load_file(model_dir / "model.safetensors")


def _wait_for_checkpoint(home: Path, proc: subprocess.Popen, stage: str, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list((home / "work").glob(f"{stage}-*/checkpoints/step-*/trainer_state.json"))
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"rlhf run exited ({proc.returncode}) before writing a {stage} checkpoint")
        time.sleep(0.02)
    pytest.fail(f"no {stage} checkpoint appeared in time")


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo"])
def test_sigkill_mid_training_then_rerun_resumes_and_matches_uninterrupted(
    tmp_path, tiny_spec_dict, prefect_api_url, stage
):
    spec = _spec(tmp_path, tiny_spec_dict, stage)
    env = _env(prefect_api_url)
    cwd = Path(__file__).resolve().parents[1]

    home_a = tmp_path / "uninterrupted"
    subprocess.run(_rlhf(spec, home_a, prefect_api_url), env=env, cwd=cwd, check=True, capture_output=True)

    home_b = tmp_path / "killed"
    proc = subprocess.Popen(  # held after the stage's first checkpoint: the kill lands before its end
        _rlhf(spec, home_b, prefect_api_url, held=True),
        env={**env, "HOLD_AFTER_FIRST_CHECKPOINT_OF": stage},
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoint = _wait_for_checkpoint(home_b, proc, stage)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((home_b / "work").glob(f"{stage}-*/model")), "killed before the end, no final model"

    rerun = subprocess.run(
        _rlhf(spec, home_b, prefect_api_url), env=env, cwd=cwd, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming interrupted run" in rerun.stdout + rerun.stderr
    assert "resumed" in rerun.stdout
    assert "resumed_from_step" in rerun.stdout, f"checkpoint seen: {checkpoint}"

    a, b = _final_weights(home_a, stage), _final_weights(home_b, stage)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-5, f"max abs weight difference {worst}"
