"""``policy_gradient`` in several processes (``compute.processes``), launched by accelerate with gloo on CPU.

1. Same rollouts, same curve: GRPO (KL in the loss), PPO (value model, GAE, whitening), REINFORCE (batch
   baseline, KL in the reward) and DAPO (dynamic sampling: refill rounds) trained by 2 ranks sample the
   completions one process samples (each sampling chunk has its own seed, whichever rank draws it), and
   log the loss and reward curves of 1 process and end at its weights, within float noise (only the
   float summation order of gradients and the scoring batches differ). The settings give the ranks
   unequal shares: 3 sampling chunks, micro-batches of 5 and 2 completions.
2. Resume: a 2-process run killed right after a checkpoint written in the middle of a rollout's updates
   resumes (buffer, KL controller and prompt cursor restored) to the uninterrupted 2-process weights.
3. Asynchronous rollouts in 2 ranks: each rank's background loop generates its chunks of a round, at
   most one version ahead.
4. FSDP2 (an accelerate config with fsdp_version 2): GRPO and PPO sharded over 2 ranks give the curves
   and weights of 1 process; killed mid-rollout, a sharded run resumes to the uninterrupted weights; a
   LoRA policy is refused sharded.
5. Refusals: a vLLM server placement and the monitor with several processes.

This file is also the script the ranks run (``accelerate launch <this file> ...``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from rlhf_core.stage_environment import StageEnvironment
from tests.test_multiprocess_training import (
    DDP_SETTINGS,
    _load,
    _max_diff,
    _rank_main,
    launch_ranks,
    launched,
)

# Measured on the 2-core CPU (fp32, gloo): the sampled rewards are identical, losses agree within 1e-6
# relative; the weights within 4e-5 (embedding rows of tokens the rollouts barely touch: their gradients
# are float noise, which AdamW scales up to steps of lr's size; every other tensor within 1e-5).
LOSS_ATOL = 1e-5
WEIGHT_ATOL = 2e-4

COMMON = {
    "kind": "policy_gradient", "policy": "p", "prompts": "d.prompts",
    "rewards": [{"function": "tests.test_multiprocess_policy_gradient:digit_share"}], "truncated": "score",
    "rollouts": 3,    "prompts_per_rollout": 6, "group_size": 4, "update_epochs": 2, "minibatches": 2,
    "generation": {"max_new_tokens": 8, "temperature": 1.0, "batch_size": 8},
    "train": {"lr": 5e-3, "batch_size": 5, "log_every": 1, "checkpoint_every": 2},
}  # fmt: skip
STAGES = {
    "grpo": {"algorithm": "grpo", "kl": {"beta": 0.1}},
    "ppo": {"algorithm": "ppo", "kl": {"beta": 0.05}},
    "reinforce": {"algorithm": "reinforce", "kl": {"beta": 0.05, "placement": "reward"}},
    "dapo": {"algorithm": "dapo", "rollouts": 2},
    # multi-turn episodes (book ch.13): each rank runs its chunks' episodes, gathered with their masks
    "grpo_episodes": {
        "algorithm": "grpo",
        "kl": {"beta": 0.1},
        "environment": {"name": "verifier_feedback", "verifier": "arithmetic_exact", "max_turns": 2},
    },
}
# asynchronous: each rank's background loop generates its chunks ahead; not comparable to one process
ASYNC_STAGES = {
    "grpo_async": {"algorithm": "grpo", "kl": {"beta": 0.1}, "async_rollouts": {"max_staleness": 1}}
}


def digit_share(completion: str, record: dict) -> float:
    """A reward the tiny random policy can move: the share of digits in its completion."""
    return sum(ch.isdigit() for ch in completion) / max(1, len(completion))


def _stage(name: str) -> PolicyGradientStage:
    return PolicyGradientStage.model_validate({**COMMON, **(STAGES | ASYNC_STAGES)[name]})


def _train_policy_gradient(name: str, policy_dir: str, work: Path, stop_after: int | None = None):
    """One policy_gradient stage body on fixed prompts; returns (loss and reward per step, policy)."""
    from rlhf_core.training.policy_gradient.stage import PolicyGradientInputs, optimize_on_rollouts

    curve: list[float] = []
    staleness: list[float] = []  # rollout/async/staleness_max, written next to the work for the test

    def log(metrics: dict[str, float], step: int) -> None:
        curve.extend(metrics[k] for k in ("train/loss", "rollout/reward_mean") if k in metrics)
        staleness.extend(v for k, v in metrics.items() if k == "rollout/async/staleness_max")
        if step == stop_after:
            os._exit(17)

    records = synthetic_records("arithmetic", "prompts", n=20, seed=0)
    env = StageEnvironment(name, 0, work, work / "cache", work / "ckpt", log=log)
    inputs = PolicyGradientInputs(policy_dir, None, records)
    model = optimize_on_rollouts(_stage(name), inputs, env).model
    if staleness:  # the main rank logs
        (work / "staleness.json").write_text(json.dumps(staleness))
    return curve, model


def _launch(out: Path, policy_dir: str, names: str, stop_after: int = 0):
    return launch_ranks(__file__, DDP_SETTINGS, out, policy_dir, names, stop_after)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> str:
    from rlhf_core.modeling.models import build_tiny_model, save_model
    from rlhf_core.spec import TinyModelSource

    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    return str(save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model"))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, policy_dir) -> Path:
    """Every algorithm above, and asynchronous GRPO, trained by 2 gloo ranks (one launch)."""
    names = ",".join([*STAGES, *ASYNC_STAGES])
    return launched(lambda: tmp_path_factory.mktemp("two"), _launch, policy_dir, names)


@pytest.mark.parametrize("name", list(STAGES))
def test_two_processes_give_the_curves_and_weights_of_one(name, policy_dir, two_process_run, tmp_path):
    from rlhf_core.modeling.models import load_model

    torch.set_num_threads(1)
    one_curve, one_model = _train_policy_gradient(name, policy_dir, tmp_path / name)
    one_weights = {k: v.detach() for k, v in one_model.state_dict().items()}
    two_curve, two_weights = _load(two_process_run, name)
    assert len(two_curve) == len(one_curve) > 4
    rewards = slice(0, None, COMMON["update_epochs"] * COMMON["minibatches"] + 1)  # reward, then losses
    assert one_curve[rewards] == two_curve[rewards]  # the very same samples
    worst_curve = max(abs(a - b) for a, b in zip(one_curve, two_curve, strict=True))
    worst_weight = _max_diff(one_weights, two_weights)
    print(f"{name}: curves within {worst_curve:.2e}, weights within {worst_weight:.2e}")
    assert worst_curve <= LOSS_ATOL
    assert worst_weight <= WEIGHT_ATOL
    start = {k: v for k, v in load_model(policy_dir)[0].state_dict().items() if k in one_weights}
    assert _max_diff(one_weights, start) > 1e-3  # it trained


def test_two_processes_with_asynchronous_rollouts_train_within_the_staleness_bound(
    policy_dir, two_process_run
):
    """Each rank's producer generates its chunks of a round one version ahead at most; the gathered round
    is the same on both ranks (their weights stay equal: one all-reduced update)."""
    from rlhf_core.modeling.models import load_model

    staleness = json.loads((two_process_run / "work" / "grpo_async" / "staleness.json").read_text())
    assert len(staleness) == COMMON["rollouts"] and staleness[0] == 0.0 and max(staleness) == 1.0
    _, weights = _load(two_process_run, "grpo_async")
    start = {k: v for k, v in load_model(policy_dir)[0].state_dict().items() if k in weights}
    assert _max_diff(weights, start) > 1e-3


def test_two_processes_killed_mid_rollout_resume_to_the_uninterrupted_weights(
    tmp_path, policy_dir, two_process_run
):
    """4 updates per rollout, a checkpoint every 2 steps: the step-2 checkpoint holds rollout 1's buffer
    in the middle of its updates; rank 0 dies after step 3 is logged."""
    out = tmp_path / "killed"
    killed = _launch(out, policy_dir, "grpo", stop_after=3)
    assert killed.returncode != 0
    ckpt = out / "work" / "grpo" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-")) == ["step-2"]
    assert json.loads((ckpt / "step-2" / "trainer_state.json").read_text())["processes"] == 2
    assert not (out / "grpo.json").exists()

    resumed = _launch(out, policy_dir, "grpo")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    curve, weights = _load(out, "grpo")
    reference_curve, reference = _load(two_process_run, "grpo")
    assert _max_diff(weights, reference) <= 1e-5
    assert curve[-1] == pytest.approx(reference_curve[-1], rel=1e-5)


def _launch_sharded(out: Path, policy_dir: str, names: str, stop_after: int = 0):
    from tests.test_fsdp_training import FSDP2_CONFIG

    out.mkdir(parents=True, exist_ok=True)
    config = out / "fsdp2.yaml"
    config.write_text(FSDP2_CONFIG)
    return launch_ranks(__file__, ["--config_file", str(config)], out, policy_dir, names, stop_after)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, policy_dir) -> Path:
    """GRPO and PPO trained by 2 ranks under an FSDP2 config (one launch)."""
    return launched(lambda: tmp_path_factory.mktemp("sharded"), _launch_sharded, policy_dir, "grpo,ppo")


@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_fsdp2_gives_the_curves_and_weights_of_one_process(name, policy_dir, sharded_run, tmp_path):
    """Sharded: the update's passes run inside the FSDP root (every rank as many), the rollouts decode
    and score with a whole copy gathered from the shards before each one; PPO's value model is sharded
    with the policy."""
    torch.set_num_threads(1)
    one_curve, one_model = _train_policy_gradient(name, policy_dir, tmp_path / "one")
    two_curve, two_weights = _load(sharded_run, name)
    rewards = slice(0, None, COMMON["update_epochs"] * COMMON["minibatches"] + 1)
    assert one_curve[rewards] == two_curve[rewards]  # the very same samples
    worst_curve = max(abs(a - b) for a, b in zip(one_curve, two_curve, strict=True))
    worst_weight = _max_diff({k: v.detach() for k, v in one_model.state_dict().items()}, two_weights)
    print(f"fsdp2 {name}: curves within {worst_curve:.2e}, weights within {worst_weight:.2e}")
    assert worst_curve <= LOSS_ATOL and worst_weight <= WEIGHT_ATOL


def test_fsdp2_killed_mid_rollout_resumes_to_the_uninterrupted_weights(policy_dir, sharded_run, tmp_path):
    """The sharded checkpoint at step 2 holds rollout 1's buffer in the middle of its updates."""
    out = tmp_path / "killed"
    killed = _launch_sharded(out, policy_dir, "grpo", stop_after=3)
    assert killed.returncode != 0 and not (out / "grpo.json").exists()
    ckpt = out / "work" / "grpo" / "ckpt"
    assert json.loads((ckpt / "step-2" / "trainer_state.json").read_text())["sharded"] is True
    resumed = _launch_sharded(out, policy_dir, "grpo")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert _max_diff(_load(out, "grpo")[1], _load(sharded_run, "grpo")[1]) <= 1e-5


def test_a_lora_policy_is_not_trained_sharded(policy_dir, tmp_path, monkeypatch):
    from rlhf_core.errors import UserError
    from rlhf_core.training.policy_gradient.stage import PolicyGradientInputs, optimize_on_rollouts

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    stage = PolicyGradientStage.model_validate({**COMMON, **STAGES["grpo"], "lora": {"r": 4}})
    env = StageEnvironment("grpo", 0, tmp_path, tmp_path / "cache", tmp_path / "ckpt")
    records = synthetic_records("arithmetic", "prompts", n=4, seed=0)
    with pytest.raises(UserError, match="stage 'grpo': a LoRA policy trains data-parallel, not sharded"):
        optimize_on_rollouts(stage, PolicyGradientInputs(policy_dir, None, records), env)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"generation": {"engine": "vllm", "vllm": {"placement": "server"}}}, "each rank starts its own"),
        ({"monitor": {"gold": [{"function": "arithmetic_exact"}], "prompts": "d.prompts"}}, "monitor"),
    ],
)
def test_what_runs_in_one_process_says_so(extra, message):
    """(A colocated vLLM engine is allowed: each rank starts its own beside it.)"""
    spec = {**COMMON, **STAGES["grpo"], **extra, "compute": {"processes": 2}}
    spec["generation"] = {**COMMON["generation"], **extra.get("generation", {})}
    stage = PolicyGradientStage.model_validate(spec)
    assert message in (stage.processes_problem() or "")
    one_process = PolicyGradientStage.model_validate({**spec, "compute": {"processes": 1}})
    assert one_process.processes_problem() is None
    colocated = {**spec, "monitor": None, "generation": {**COMMON["generation"], "engine": "vllm"}}
    assert PolicyGradientStage.model_validate(colocated).processes_problem() is None


if __name__ == "__main__":
    _rank_main(*sys.argv[1:], train=_train_policy_gradient)
