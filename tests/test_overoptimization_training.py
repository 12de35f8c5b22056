"""The over-optimization monitor inside real training on a tiny model: it evaluates at 0, every N steps
and at the end, logs proxy/gold/KL, leaves the training itself untouched, stops when gold falls while
proxy rises (registering the best-gold weights), survives a kill and resume exactly, and runs in DPO."""

from __future__ import annotations

import pytest
import torch

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.modeling.models import build_tiny_model, load_model, save_model
from rlhf_core.spec import TinyModelSource
from rlhf_core.spec.stages.direct_alignment import DirectAlignmentStage
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from rlhf_core.training.monitor.overoptimization import MonitorInputs
from rlhf_core.training.policy_gradient.trainer import train_policy_gradient

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MONITOR_PROMPTS = synthetic_records("arithmetic", "prompts", n=40, seed=1)[:6]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    return str(save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model"))


def digit_share(rows):
    rewards = [sum(ch.isdigit() for ch in r["completion"]) / max(1, len(r["completion"])) for r in rows]
    return rewards, {"digits": rewards}


def _stage(monitor=None, **overrides):
    spec = {
        "kind": "policy_gradient", "algorithm": "grpo", "policy": "policy", "prompts": "data.prompts",
        "rewards": [{"function": "answer_format"}], "rollouts": 6, "prompts_per_rollout": 4,
        "truncated": "score", "kl": {"beta": 0.0}, "generation": {"max_new_tokens": 6, "temperature": 1.0},
        "train": {"lr": 2e-2, "batch_size": 8, "checkpoint_every": 100}, **overrides,
    }  # fmt: skip
    if monitor is not None:
        spec["monitor"] = monitor
    return PolicyGradientStage.model_validate(spec)


def _inputs(stage, tmp_path, scorers=None, proxy=None):
    proxy = proxy if proxy is not None else stage.monitor_proxy
    return MonitorInputs(stage.monitor, proxy, MONITOR_PROMPTS, scorers or {}, tmp_path / "monitor")


def _train(tiny, stage, ckpt, inputs=None, log=None):
    policy, tokenizer = load_model(tiny)
    logged: list[tuple[int, dict]] = []

    def record(metrics, step):
        logged.append((step, metrics))
        if log is not None:
            log(metrics, step)

    trained, _, summary = train_policy_gradient(
        policy, tokenizer, synthetic_records("arithmetic", "prompts", n=16, seed=0), stage, digit_share,
        seed=0, checkpoint_dir=ckpt, log=record, monitor_inputs=inputs,
    )  # fmt: skip
    return trained, logged, summary


MONITOR = {"every": 2, "gold": [{"function": "arithmetic_exact"}], "generation": {"max_new_tokens": 6}}


def test_the_monitor_logs_proxy_gold_and_kl_and_leaves_training_unchanged(tiny, tmp_path):
    plain, _, _ = _train(tiny, _stage(), tmp_path / "plain")
    stage = _stage(MONITOR)
    monitored, logged, summary = _train(tiny, stage, tmp_path / "ckpt", _inputs(stage, tmp_path))
    for (name, a), b in zip(plain.state_dict().items(), monitored.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # evaluations draw from their own generators, never the global RNG
    evaluations = {step: m for step, m in logged if "monitor/gold" in m}
    assert sorted(evaluations) == [0, 2, 4, 6]  # 6 rollouts of one update: 0, every 2, the end
    history = summary.monitor["history"]
    assert [e["step"] for e in history] == [0, 2, 4, 6]
    first = evaluations[0]
    assert first["monitor/kl"] == pytest.approx(0.0, abs=1e-6)  # pi is pi_ref before any update
    assert set(first) >= {"monitor/proxy", "monitor/gold", "monitor/proxy/answer_format",
                          "monitor/gold/arithmetic_exact", "monitor/truncated_share"}  # fmt: skip
    assert 0.0 <= first["monitor/gold"] <= 1.0
    assert any(abs(evaluations[s]["monitor/kl"]) > 1e-4 for s in (2, 4, 6))  # lr 2e-2 moves the policy
    assert summary.monitor["stopped_at_step"] is None
    assert summary.monitor["registered_step"] == 6  # no early_stop: the last weights


def counting_scorer(sign: float):
    """A stand-in reward model whose score moves by ``sign`` at each evaluation (0, sign, 2 sign, ...)."""
    calls = []

    def score(pairs):
        calls.append(1)
        return [sign * (len(calls) - 1)] * len(pairs)

    return score


def test_gold_falling_while_proxy_rises_stops_and_registers_the_best_gold_weights(tiny, tmp_path):
    """Gold (a stand-in reward model) falls at every evaluation and proxy rises: with patience 2 the
    evaluations at steps 0, 1, 2 make the rule fire at step 2; the loop runs no further step and the
    weights handed back are those of step 0, the best gold."""
    monitor = {"every": 1, "proxy": [{"model": "proxy_rm"}], "gold": [{"model": "gold_rm"}],
               "generation": {"max_new_tokens": 6}, "early_stop": {"patience": 2}}  # fmt: skip
    stage = _stage(monitor)
    scorers = {"rm:proxy_rm": counting_scorer(+1.0), "rm:gold_rm": counting_scorer(-1.0)}
    start = {k: v.clone() for k, v in load_model(tiny)[0].state_dict().items()}
    trained, logged, summary = _train(tiny, stage, tmp_path / "ckpt", _inputs(stage, tmp_path, scorers))
    assert summary.steps == 2 and summary.monitor["stopped_at_step"] == 2
    assert summary.monitor["best_step"] == 0 and summary.monitor["registered_step"] == 0
    assert "gold fell 2 evaluations in a row" in summary.monitor["reason"]
    assert max(step for step, m in logged if "train/loss" in m) == 2  # no update after the stop
    assert (2, {"monitor/stopped_at_step": 2.0, "monitor/best_step": 0.0}) in logged
    for name, value in trained.state_dict().items():
        assert torch.equal(value, start[name]), name
    assert [p.name for p in (tmp_path / "monitor").iterdir()] == ["best-step-0.safetensors"]


def test_a_killed_run_resumes_with_the_same_evaluations(tiny, tmp_path):
    """Checkpoints every 2 steps, evaluations every 3: the crash at step 5 resumes from the checkpoint of
    step 4, whose history holds the evaluations of steps 0 and 3; the run then repeats the evaluation
    history and the weights of an uninterrupted run (and keeps the best weights it needs)."""
    monitor = {**MONITOR, "every": 3, "early_stop": {"patience": 5}}
    stage = _stage(monitor, train={"lr": 2e-2, "batch_size": 8, "checkpoint_every": 2})
    uninterrupted, _, expected = _train(tiny, stage, tmp_path / "a", _inputs(stage, tmp_path / "a"))

    class Crash(Exception):
        pass

    def crash_at_step_5(metrics, step):
        if step == 5 and "train/loss" in metrics:
            raise Crash

    with pytest.raises(Crash):
        _train(tiny, stage, tmp_path / "b", _inputs(stage, tmp_path / "b"), log=crash_at_step_5)
    resumed, logged, summary = _train(tiny, stage, tmp_path / "b", _inputs(stage, tmp_path / "b"))
    assert summary.resumed_from_step == 4
    assert [s for s, m in logged if "monitor/gold" in m] == [6]  # 0 and 3 came back with the checkpoint
    assert summary.monitor == expected.monitor
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_direct_alignment_runs_the_monitor(tiny, tmp_path):
    from dataclasses import replace

    from rlhf_core.stage_environment import StageEnvironment
    from rlhf_core.training.direct_alignment.trainer import DirectAlignmentInputs, optimize_on_preferences

    pairs = synthetic_records("arithmetic", "preference", n=24, seed=0)
    monitor = {"every": 2, "proxy": [{"function": "answer_format"}], "generation": {"max_new_tokens": 6},
               "gold": [{"function": "arithmetic_exact"}]}  # fmt: skip
    stage = DirectAlignmentStage.model_validate(
        {
            "kind": "direct_alignment",
            "policy": "p",
            "data": "d.preferences",
            "monitor": monitor,
            "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "max_length": 64},
        }  # fmt: skip
    )
    logged: list[tuple[int, dict]] = []
    inputs = DirectAlignmentInputs(
        tiny, None, pairs, None, reference_digest="policy", data_digest="pairs", monitor_rows=MONITOR_PROMPTS
    )
    env = replace(StageEnvironment.local("dpo", 0, tmp_path), log=lambda m, s: logged.append((s, m)))
    result = optimize_on_preferences(stage, inputs, env)
    assert [e["step"] for e in result.monitor["history"]] == [0, 2, 3]
    assert [s for s, m in logged if "monitor/kl" in m] == [0, 2, 3]
    assert result.monitor["history"][0]["kl"] == pytest.approx(0.0, abs=1e-6)
