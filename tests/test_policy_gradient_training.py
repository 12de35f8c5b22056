"""On-policy RL on a tiny model: every algorithm trains (reward rises on an easy reward, weights change),
the ratio is 1 at the first update of a rollout, a killed run resumes exactly, and bad input stops with
a message naming the stage."""

from __future__ import annotations

import statistics

import pytest
import torch

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.errors import NonFiniteLossError, UserError
from rlhf_core.modeling.models import build_tiny_model, save_model
from rlhf_core.modeling.reward_model import build_reward_model
from rlhf_core.spec import TinyModelSource
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from rlhf_core.training.policy_gradient.trainer import reference_provider, train_policy_gradient

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    directory = save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model")
    return str(directory), tokenizer


def _policy(tiny):
    from rlhf_core.modeling.models import load_model

    return load_model(tiny[0])


def _records(n=16):
    return synthetic_records("arithmetic", "prompts", n=n, seed=0)


def digit_share(rows):
    """An easy reward: the share of digit characters in the completion."""
    rewards = [sum(ch.isdigit() for ch in r["completion"]) / max(1, len(r["completion"])) for r in rows]
    return rewards, {"digits": rewards}


def _stage(algorithm, **overrides):
    spec = {
        "kind": "policy_gradient",
        "algorithm": algorithm,
        "policy": "policy",
        "prompts": "data.prompts",
        "rewards": [{"function": "answer_format"}],
        "rollouts": 3,
        "prompts_per_rollout": 4,
        "truncated": "score",
        "generation": {"max_new_tokens": 6, "temperature": 1.0},
        **overrides,
    }
    spec["train"] = {"lr": 3e-3, "batch_size": 8, "checkpoint_every": 100, **overrides.get("train", {})}
    if algorithm in ("reinforce", "ppo"):
        spec.setdefault("prompts_per_rollout", 8)
    return PolicyGradientStage.model_validate(spec)


def _train(tiny, stage, tmp_path, reward_fn=digit_share, **kw):
    policy, tokenizer = _policy(tiny)
    value = build_reward_model(tiny[0]) if stage.algorithm == "ppo" else None
    logged: list[tuple[int, dict]] = []
    trained, _, summary = train_policy_gradient(
        policy, tokenizer, _records(), stage, reward_fn, seed=0, checkpoint_dir=tmp_path / "ckpt",
        value_model=value, log=lambda metrics, step: logged.append((step, metrics)), **kw,
    )  # fmt: skip
    return trained, logged, summary


ALGORITHMS = ["reinforce", "rloo", "ppo", "grpo", "dr_grpo", "dapo", "gspo", "cispo"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_raises_an_easy_reward(tiny, tmp_path, algorithm):
    """12 rollouts at a high learning rate for the tiny model, no KL term: the mean reward of the last
    three rollouts clearly exceeds that of the first three (measured: ~0.03 -> 0.3-0.6)."""
    overrides = {"rollouts": 12, "kl": {"beta": 0.0}, "train": {"lr": 2e-2, "log_every": 1}}
    if algorithm in ("ppo", "reinforce"):
        overrides |= {"prompts_per_rollout": 16}
    if algorithm == "ppo":
        overrides |= {"update_epochs": 2}
    stage = _stage(algorithm, **overrides)
    start = {k: v.clone() for k, v in _policy(tiny)[0].state_dict().items()}
    trained, logged, summary = _train(tiny, stage, tmp_path)
    assert summary.steps == 12 * stage.update_epochs * stage.minibatches
    rewards = [m["rollout/reward_mean"] for _, m in logged if "rollout/reward_mean" in m]
    # the stage's headline numbers are the last rollout's (what `rlhf run` and the summary metrics show)
    headline = summary.summary()
    assert headline["reward_mean"] == rewards[-1]
    assert {"completion_length", "truncated_share", "rollouts", "steps"} <= set(headline)
    assert statistics.fmean(rewards[-3:]) > statistics.fmean(rewards[:3]) + 0.05, (algorithm, rewards)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, start[k])]
    assert changed


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_the_kl_term_holds_the_policy_near_the_reference(tiny, tmp_path, algorithm):
    """Same run with and without a KL penalty (in the reward for ppo, in the loss for grpo): the KL to the
    reference at the end is smaller with it."""
    kl_at_end = {}  # beta 0.6: the KL ends 0.13-0.33 of the unpenalised one on grpo over seeds 0-3
    for beta in (0.0, 0.6):
        overrides = {"rollouts": 10, "kl": {"beta": beta}, "train": {"lr": 2e-2}}
        if algorithm == "ppo":
            overrides |= {"prompts_per_rollout": 16}
        _, logged, _ = _train(tiny, _stage(algorithm, **overrides), tmp_path / str(beta))
        if beta == 0.0:
            assert not any("train/kl" in m or "rollout/kl" in m for _, m in logged)  # beta 0: no reference
            _, logged, _ = _train(
                tiny, _stage(algorithm, **{**overrides, "kl": {"beta": 1e-9}}), tmp_path / "tiny"
            )
        kl_at_end[beta] = statistics.fmean([m["train/kl"] for _, m in logged if "train/kl" in m][-3:])
    assert kl_at_end[0.6] < 0.7 * kl_at_end[0.0], kl_at_end


def test_ratio_is_one_at_the_first_update_of_each_rollout(tiny, tmp_path):
    stage = _stage("grpo", update_epochs=2, minibatches=2)
    _, logged, _ = _train(tiny, stage, tmp_path)
    by_step = {step: m for step, m in logged if "train/ratio_mean" in m}
    for first_update in (1, 5, 9):  # steps 1, 5, 9 start rollouts 1, 2, 3 (4 updates each)
        metrics = by_step[first_update]
        assert metrics["train/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        assert metrics["train/approx_kl"] == pytest.approx(0.0, abs=1e-10)
        assert metrics["train/clip_fraction"] == 0.0
    assert any(by_step[s]["train/approx_kl"] > 0 for s in (2, 3, 4))  # later updates are off-policy


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_a_killed_run_resumes_exactly(tiny, tmp_path, algorithm):
    """Checkpoints land in the middle of a rollout's updates (4 per rollout, every 2 steps): the rollout
    buffer, the KL controller state and the prompt cursor come back with the weights."""
    overrides = {"update_epochs": 2, "minibatches": 2, "rollouts": 3, "train": {"checkpoint_every": 2},
                 "kl": {"beta": 0.1, "target": 0.5, "horizon": 100}}  # fmt: skip
    if algorithm == "ppo":
        overrides["prompts_per_rollout"] = 8
    stage = _stage(algorithm, **overrides)
    uninterrupted, _, _ = _train(tiny, stage, tmp_path / "a")

    class Crash(Exception):
        pass

    def crash_after_step_7(metrics, step):
        if step == 7:
            raise Crash

    policy, tokenizer = _policy(tiny)
    value = build_reward_model(tiny[0]) if algorithm == "ppo" else None
    with pytest.raises(Crash):
        train_policy_gradient(
            policy, tokenizer, _records(), stage, digit_share, seed=0, checkpoint_dir=tmp_path / "b",
            value_model=value, log=crash_after_step_7,
        )  # fmt: skip
    policy, tokenizer = _policy(tiny)
    value = build_reward_model(tiny[0]) if algorithm == "ppo" else None
    resumed, _, summary = train_policy_gradient(
        policy, tokenizer, _records(), stage, digit_share, seed=0, checkpoint_dir=tmp_path / "b",
        value_model=value,
    )  # fmt: skip
    assert summary.resumed_from_step == 6
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_beta_zero_loads_no_reference(tiny):
    policy, _ = _policy(tiny)
    assert reference_provider(policy, _stage("grpo", kl={"beta": 0.0}), None) is None
    assert reference_provider(policy, _stage("dapo"), None) is None  # dapo's default beta is 0
    assert reference_provider(policy, _stage("grpo"), None) is not None


def test_settings_that_do_not_apply_are_refused():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        _stage("grpo", group_size=1)
    with pytest.raises(ValueError, match="epochs: not used by on-policy RL"):
        _stage("grpo", train={"epochs": 3})
    stage = _stage("ppo")  # read again from its JSON, as a rank's job or a work pool's call does
    assert PolicyGradientStage.model_validate(stage.model_dump(mode="json")) == stage
    assert _stage("grpo", train={"max_steps": 2}).train.max_steps == 2  # caps rollouts x updates
    with pytest.raises(ValueError, match="which engine transformers does not return; use native or vllm"):
        _stage("grpo", generation={"engine": "transformers"})
    with pytest.raises(ValueError, match="with generation.engine: native there is none"):
        _stage("grpo", tis_cap=2.0)
    assert _stage("grpo", tis_cap=2.0, generation={"engine": "vllm"}).tis_cap == 2.0
    with pytest.raises(ValueError, match="do not split into 3 minibatches"):
        _stage("grpo", minibatches=3)  # 4 prompts x 8 = 32 completions


def test_no_eos_in_any_completion_stops_naming_the_stage(tiny, tmp_path):
    stage = _stage("grpo", truncated="zero", generation={"max_new_tokens": 1, "temperature": 1.0})

    def never_eos(rows):  # the 1-token completions are EOS only by chance; make the check certain
        return [0.0] * len(rows), {"zero": [0.0] * len(rows)}

    policy, tokenizer = _policy(tiny)
    tokenizer = type(tokenizer).from_pretrained(tiny[0])
    tokenizer.eos_token = tokenizer.pad_token  # a token the policy never samples
    with pytest.raises(UserError, match="stage 'rl': rollout 1: no completion ended with EOS"):
        train_policy_gradient(
            policy, tokenizer, _records(), stage, never_eos, seed=0, checkpoint_dir=tmp_path, stage_name="rl"
        )


def test_a_reward_source_that_raises_names_the_stage_and_source(tiny, tmp_path):
    from rlhf_core.rewards.functions import REWARD_FUNCTIONS
    from rlhf_core.training.policy_gradient.rollouts import reward_function

    stage = _stage("grpo", rewards=[{"function": "arithmetic_exact"}])
    broken = reward_function(stage.rewards, {}, "rl")
    with pytest.raises(UserError, match="stage 'rl': reward source 'arithmetic_exact' raised"):
        broken([{"prompt": "1+1", "completion": "2"}])  # the row has no 'answer' field
    assert "arithmetic_exact" in REWARD_FUNCTIONS


def test_a_nan_loss_stops_naming_the_stage_and_step(tiny, tmp_path):
    stage = _stage("ppo", prompts_per_rollout=4)
    policy, tokenizer = _policy(tiny)
    value = build_reward_model(tiny[0])
    with torch.no_grad():
        value.score.weight.fill_(float("nan"))  # the value head diverged
    with pytest.raises(NonFiniteLossError, match="stage 'rl': the ppo loss is nan at step 1"):
        train_policy_gradient(
            policy, tokenizer, _records(), stage, digit_share, seed=0, checkpoint_dir=tmp_path,
            stage_name="rl", value_model=value,
        )  # fmt: skip


def test_a_value_model_with_another_tokenizer_is_refused(tiny):
    from rlhf_core.modeling.models import build_tiny_model as build
    from rlhf_core.training.policy_gradient.stage import check_value_tokenizer

    _, policy_tokenizer = tiny
    same_plus_pad = type(policy_tokenizer).from_pretrained(tiny[0])
    same_plus_pad.add_special_tokens({"pad_token": "<|reward_pad|>"})  # what a reward model may add
    check_value_tokenizer(policy_tokenizer, same_plus_pad, "rl")
    _, other = build(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=300), seed=1)
    with pytest.raises(UserError, match="field ppo.value_model: its tokenizer is not the policy's"):
        check_value_tokenizer(policy_tokenizer, other, "rl")


def test_the_value_model_has_its_own_learning_rate(tiny, tmp_path):
    """ppo.value_lr: a value model at a vanishing rate barely moves while the policy trains at train.lr."""
    moved = {}
    for value_lr in (None, 1e-12):
        stage = _stage("ppo", rollouts=2, prompts_per_rollout=8, ppo={"value_lr": value_lr})
        policy, tokenizer = _policy(tiny)
        value = build_reward_model(tiny[0])
        start = value.score.weight.detach().clone(), policy.lm_head.weight.detach().clone()
        trained, value, _ = train_policy_gradient(
            policy, tokenizer, _records(), stage, digit_share, seed=0,
            checkpoint_dir=tmp_path / str(value_lr), value_model=value,
        )  # fmt: skip
        moved[value_lr] = (
            float((value.score.weight.detach() - start[0]).abs().max()),
            float((trained.lm_head.weight.detach() - start[1]).abs().max()),
        )
    assert moved[None][0] > 1e-4 and moved[None][1] > 1e-4
    assert moved[1e-12][0] < 1e-9 and moved[1e-12][1] > 1e-4


def test_the_prompt_stream_shuffles_each_epoch_and_resumes_at_its_cursor():
    from rlhf_core.training.engine.loop import epoch_order
    from rlhf_core.training.policy_gradient.rollouts import PromptStream

    stream = PromptStream(5, seed=3)
    taken = stream.take(7) + stream.take(8)
    assert taken == epoch_order(5, 3, 0) + epoch_order(5, 3, 1) + epoch_order(5, 3, 2)
    resumed = PromptStream(5, seed=3)
    resumed.load_state_dict({"cursor": 7})
    assert resumed.take(8) == taken[7:]


def test_every_algorithm_dispatches_through_the_tables():
    """Each entry of the spec's ALGORITHMS names an estimator and a loss the tables hold; only GAE reads a
    value model, and only DAPO turns on dynamic sampling and the overlong penalty by default."""
    from rlhf_core.losses.policy_gradient import POLICY_LOSSES
    from rlhf_core.spec.stages.policy_gradient import ALGORITHMS
    from rlhf_core.training.policy_gradient.algorithms import (
        ADVANTAGE_ESTIMATORS,
        Settings,
        needs_value_model,
    )
    from rlhf_core.training.policy_gradient.rollouts import overlong_cache

    for name, defaults in ALGORITHMS.items():
        assert defaults.estimator in ADVANTAGE_ESTIMATORS, name
        assert defaults.loss in POLICY_LOSSES, name
    stages = {name: _stage(name) for name in ALGORITHMS}
    assert [n for n, s in stages.items() if needs_value_model(s)] == ["ppo"]
    assert [n for n, s in stages.items() if Settings.of(s).dynamic_sampling] == ["dapo"]
    assert {n: overlong_cache(s) for n, s in stages.items() if overlong_cache(s)} == {"dapo": 1}  # 6 // 4


@pytest.mark.parametrize(
    "updates, log_every, logged_rollouts",
    [(1, 2, [2, 4, 5]), (1, 10, [5]), (2, 3, [2, 3, 5]), (3, 1, [1, 2, 3, 4, 5])],
)
def test_rollout_metrics_follow_log_every(tiny, tmp_path, updates, log_every, logged_rollouts):
    """5 rollouts of ``updates`` steps: a rollout's metrics are logged when the loop logs one of its
    steps (every ``log_every`` steps and the last), at the step after its collection; e.g. 2 updates,
    log_every 3: steps 3 (rollout 2), 6 (rollout 3), 9 and 10 (rollout 5)."""
    stage = _stage("grpo", rollouts=5, update_epochs=updates, train={"log_every": log_every})
    _, logged, _ = _train(tiny, stage, tmp_path)
    rollout_steps = [step for step, m in logged if "rollout/reward_mean" in m]
    assert rollout_steps == [(r - 1) * updates + 1 for r in logged_rollouts]
