"""Asynchronous rollouts of ``policy_gradient`` (``async_rollouts: {max_staleness: K}``), with the native
loop in a background process as the engine (rlhf_core/rollout/engines/native_process.py).

1. K = 0 is the synchronous run, weight for weight.
2. K = 1, 2: each rollout's completions are at most K versions old (the first rollout's are current),
   their behaviour log-probs are kept (the mismatch at staleness 0 is exactly 0: the same weights
   scored them), staleness, idle shares and the importance-weight metrics are logged, and the worker
   process is gone after the stage.
3. A run stopped after a checkpoint in the middle of a rollout's updates resumes: the checkpointed
   rollout (with its versions) is trained on, and the rounds after it are generated again from the
   restored weights: the first one is current (staleness 0), never from weights that were not saved.
4. Dynamic sampling (DAPO) takes extra rounds from the producer; a round older than K is dropped and
   counted (the check behind the producer's own bound).
5. The engine dying mid-run fails the stage with an EngineError naming it, without hanging.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest
import torch

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.modeling.models import build_tiny_model, load_model, save_model
from rlhf_core.rollout.engines.base import EngineError
from rlhf_core.rollout.engines.native_process import NativeProcessEngine
from rlhf_core.spec import TinyModelSource
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.training.policy_gradient.rollout_sampling import sample_rollout
from rlhf_core.training.policy_gradient.rollouts import PromptStream
from rlhf_core.training.policy_gradient.samples import Samples
from rlhf_core.training.policy_gradient.stage import PolicyGradientInputs, optimize_on_rollouts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def digit_share(completion: str, record: dict) -> float:
    """A reward the tiny random policy can move: the share of digits in its completion."""
    return sum(ch.isdigit() for ch in completion) / max(1, len(completion))


REWARD = {"function": "tests.test_async_policy_gradient:digit_share"}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> str:
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    return str(save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model"))


def _stage(**overrides) -> PolicyGradientStage:
    spec = {
        "kind": "policy_gradient", "algorithm": "grpo", "policy": "p", "prompts": "d.prompts",
        "rewards": [REWARD], "truncated": "score", "rollouts": 5, "prompts_per_rollout": 4, "group_size": 4,
        "generation": {"max_new_tokens": 6, "temperature": 1.0, "batch_size": 16},
        "kl": {"beta": 0.05}, **overrides,
    }  # fmt: skip
    spec["train"] = {"lr": 5e-3, "batch_size": 8, "log_every": 1, **overrides.get("train", {})}
    return PolicyGradientStage.model_validate(spec)


def _run(stage, policy_dir, work, stop_at: int | None = None):
    """The stage body; returns (policy, [(step, metrics)]). ``stop_at``: interrupt after logging it."""
    logged: list[tuple[int, dict]] = []

    def log(metrics: dict[str, float], step: int) -> None:
        logged.append((step, metrics))
        if step == stop_at:
            raise KeyboardInterrupt  # as a kill would: the checkpoint before it is on disk

    env = StageEnvironment("grpo", 0, work, work / "cache", work / "ckpt", log=log)
    records = synthetic_records("arithmetic", "prompts", n=16, seed=0)
    result = optimize_on_rollouts(stage, PolicyGradientInputs(policy_dir, None, records), env)
    return result.model, logged


def _engine_workers() -> list:
    """This process's background decoding workers (other children, e.g. a verifier's pool, are not)."""
    return [child for child in multiprocessing.active_children() if child.name == NativeProcessEngine.name]


def _rollout_metrics(logged, name):
    return [(step, m[name]) for step, m in logged if name in m]


def test_max_staleness_0_is_the_synchronous_run(policy_dir, tmp_path):
    stage = _stage(rollouts=3)
    synchronous, _ = _run(stage, policy_dir, tmp_path / "sync")
    lockstep_stage = _stage(rollouts=3, async_rollouts={"max_staleness": 0})
    lockstep, logged = _run(lockstep_stage, policy_dir, tmp_path / "k0")
    for (name, a), b in zip(synchronous.state_dict().items(), lockstep.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [v for _, v in _rollout_metrics(logged, "rollout/async/staleness_max")] == [0.0] * 3
    assert stage.effective_tis_cap is None
    assert _stage(async_rollouts={"max_staleness": 1}).effective_tis_cap == 2.0


@pytest.mark.parametrize("k", [1, 2])
def test_rollouts_are_at_most_k_versions_old_and_corrected(policy_dir, tmp_path, k):
    trained, logged = _run(_stage(async_rollouts={"max_staleness": k}), policy_dir, tmp_path)
    staleness = [v for _, v in _rollout_metrics(logged, "rollout/async/staleness_max")]
    assert len(staleness) == 5
    assert staleness[0] == 0.0 and max(staleness) <= k and max(staleness) > 0  # it ran ahead
    assert all(v == 0.0 for _, v in _rollout_metrics(logged, "rollout/async/dropped_stale"))
    shares = [sum(m[f"rollout/async/staleness_{s}"] for s in range(k + 1)) for _, m in logged
              if "rollout/async/staleness_0" in m]  # fmt: skip
    assert shares == pytest.approx([1.0] * 5)
    mismatch = dict(_rollout_metrics(logged, "rollout/mismatch/kl_k3"))
    first = min(mismatch)
    assert mismatch[first] == pytest.approx(0.0, abs=1e-10)  # staleness 0: the very weights that sampled
    assert any(v > 0 for v in mismatch.values())  # older weights: a measurable lag
    assert _rollout_metrics(logged, "rollout/mismatch/tis_capped_share")
    for name in ("rollout/idle/trainer_share", "rollout/idle/engine_share"):
        shares = [v for _, v in _rollout_metrics(logged, name)]
        assert shares and all(0.0 <= v <= 1.0 for v in shares)
    start = load_model(policy_dir)[0].state_dict()
    assert max(float((trained.state_dict()[n] - w).abs().max()) for n, w in start.items()) > 1e-3
    assert not _engine_workers()  # the engine's worker is gone


def test_a_stopped_run_resumes_and_regenerates_what_was_in_flight(policy_dir, tmp_path):
    """2 updates per rollout, a checkpoint every 3 steps: step 3 is rollout 2's first update."""
    stage = _stage(
        rollouts=4, minibatches=2, async_rollouts={"max_staleness": 1}, train={"checkpoint_every": 3}
    )
    with pytest.raises(KeyboardInterrupt):
        _run(stage, policy_dir, tmp_path, stop_at=4)
    assert not _engine_workers()
    _, logged = _run(stage, policy_dir, tmp_path)
    assert logged[0] == (3, {"resumed_from_step": 3.0})
    staleness = _rollout_metrics(logged, "rollout/async/staleness_mean")
    assert [step for step, _ in staleness] == [5, 7]  # rollouts 3 and 4 were collected again
    assert staleness[0][1] == 0.0  # generated from the restored weights, not the lost run's
    assert [step for step, m in logged if "train/loss" in m] == [4, 5, 6, 7, 8]


def test_dynamic_sampling_takes_more_rounds_from_the_producer(policy_dir, tmp_path):
    stage = _stage(algorithm="dapo", rollouts=3, async_rollouts={"max_staleness": 1}, max_sampling_rounds=4)
    _, logged = _run(stage, policy_dir, tmp_path)
    assert len(_rollout_metrics(logged, "rollout/sampling_rounds")) == 3
    assert all(v <= 1 for _, v in _rollout_metrics(logged, "rollout/async/staleness_max"))


class _Rounds:
    """A round source whose rounds come from the given versions (a test double of RoundSource)."""

    def __init__(self, versions: list[int]) -> None:
        self.versions = list(versions)

    def sample_round(self, round_index: int, prompt_indices: list[int], version: int) -> Samples:
        n = len(prompt_indices) * 2
        return Samples(
            [[1]] * n, [[2, 3]] * n, [k // 2 for k in range(n)], [False] * n, torch.arange(n).double(),
            {}, ["x"] * n, ["p"] * n, None, [self.versions.pop(0)] * n,
        )  # fmt: skip


def test_rounds_older_than_max_staleness_are_dropped_and_counted():
    stage = _stage(prompts_per_rollout=3, group_size=2)
    prompts = PromptStream(12, seed=0)
    sampled = sample_rollout(
        _Rounds([3, 4, 6]), prompts, stage, dynamic_sampling=False, index=7, stage_name="s", max_staleness=2
    )  # fmt: skip
    assert sampled.dropped_stale == 12 and sampled.rounds == 1  # versions 3 and 4 are 4 and 3 behind
    assert sampled.samples.versions == [6] * 6
    assert prompts.cursor == 9  # the dropped rounds' prompts are spent


def test_the_engine_dying_mid_run_fails_the_stage_and_does_not_hang(policy_dir, tmp_path, monkeypatch):
    """The worker is killed after the second rollout's reward: the next round never comes."""
    import rlhf_core.training.policy_gradient.rollout_sampling as sampling

    calls = {"n": 0}
    reward_samples = sampling.reward_samples

    def reward_then_kill(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            for worker in _engine_workers():
                os.kill(worker.pid, signal.SIGKILL)
        return reward_samples(*args, **kwargs)

    monkeypatch.setattr(sampling, "reward_samples", reward_then_kill)
    with pytest.raises(EngineError, match="stage 'grpo'"):
        _run(_stage(async_rollouts={"max_staleness": 1}), policy_dir, tmp_path)
