"""On-policy RL over multi-turn episodes (book ch.13): the environment's tokens carry no loss, advantage or
KL; GAE carries over them; a killed run resumes exactly with its trajectory buffer."""

from __future__ import annotations

import pytest
import torch

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.losses.advantages import generalized_advantages, sequence_rewards_to_tokens
from rlhf_core.modeling.models import build_tiny_model, load_model, save_model
from rlhf_core.modeling.reward_model import build_reward_model
from rlhf_core.modeling.sft_tokens import collate, tokenize_sft_row, unpacked_rows
from rlhf_core.spec import TinyModelSource
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from rlhf_core.training.policy_gradient.trainer import train_policy_gradient

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny policy taught for 40 steps to answer arithmetic briefly and end its turn (so its episodes
    have several turns within a few tokens each)."""
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    rows = synthetic_records("arithmetic", "sft", n=64, seed=1)
    batch = collate(unpacked_rows([tokenize_sft_row(r, tokenizer, 64) for r in rows]), tokenizer.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        optimizer.zero_grad()
        loss.loss.backward()
        optimizer.step()
    return str(save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model"))


def digit_share(rows):
    rewards = [sum(ch.isdigit() for ch in r["completion"]) / max(1, len(r["completion"])) for r in rows]
    return rewards, {"digits": rewards}


def _stage(algorithm: str, **overrides) -> PolicyGradientStage:
    spec = {
        "kind": "policy_gradient", "algorithm": algorithm, "policy": "policy", "prompts": "data.prompts",
        "rewards": [{"function": "answer_format"}], "rollouts": 3, "prompts_per_rollout": 4,
        "truncated": "score", "generation": {"max_new_tokens": 16, "temperature": 1.0},
        # a random policy is always wrong: every episode gets "try again" and a second turn
        "environment": {"name": "verifier_feedback", "verifier": "arithmetic_exact",
                        "options": {"max_attempts": 2}, "max_turns": 2},
        "train": {"lr": 3e-3, "batch_size": 8, "checkpoint_every": 100},
        **overrides,
    }  # fmt: skip
    return PolicyGradientStage.model_validate(spec)


def _train(model_dir, stage, checkpoint_dir, log=None):
    policy, tokenizer = load_model(model_dir)
    value = build_reward_model(model_dir) if stage.algorithm == "ppo" else None
    records = synthetic_records("arithmetic", "prompts", n=16, seed=0)
    return train_policy_gradient(
        policy, tokenizer, records, stage, digit_share, seed=0, checkpoint_dir=checkpoint_dir,
        value_model=value, log=log or (lambda metrics, step: None),
    )  # fmt: skip


def test_gae_over_a_masked_hole_equals_gae_on_the_model_tokens_alone():
    """The environment's tokens are not steps: GAE with holes in the mask equals GAE on the sequence with
    the holes cut out (the reward at the last model token, gamma and lambda below 1)."""
    torch.manual_seed(0)
    mask = torch.tensor(
        [[1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    values = torch.randn(mask.shape)
    rewards = (
        sequence_rewards_to_tokens(torch.tensor([1.0, -0.5]), mask) + 0.1 * torch.randn(mask.shape) * mask
    )
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    for row in range(2):
        keep = mask[row]
        compact, _ = generalized_advantages(
            rewards[row, keep][None], values[row, keep][None], keep[keep][None],
            gamma=0.9, lam=0.8,
        )  # fmt: skip
        torch.testing.assert_close(advantages[row, keep], compact[0])
        assert torch.all(advantages[row, ~keep] == 0) and torch.all(returns[row, ~keep] == 0)
    assert (
        sequence_rewards_to_tokens(torch.tensor([1.0, 2.0]), mask)[0, 8] == 1.0
    )  # the last True, not sum - 1


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_environment_tokens_carry_no_loss_kl_or_advantage(tiny, tmp_path, algorithm):
    stage = _stage(algorithm, kl={"beta": 0.1}, group_size=4 if algorithm == "grpo" else None,
                   prompts_per_rollout=4 if algorithm == "grpo" else 8)  # fmt: skip
    logged: list[tuple[int, dict]] = []
    trained, buffer_rollout, summary = _train_with_buffer(tiny, stage, tmp_path, logged)
    samples = buffer_rollout.rollout.samples
    assert samples.action_masks is not None and samples.episodes is not None
    holes = [m for m in samples.action_masks if not all(m)]
    assert holes, "the feedback environment's reply should sit between the model's two turns"
    mask = buffer_rollout.rollout.mask
    width = mask.shape[1]
    for i, actions in enumerate(samples.action_masks):
        expected = torch.zeros(width, dtype=torch.bool)
        expected[: len(actions)] = torch.tensor(actions)
        assert torch.equal(mask[i], expected)
    advantages = buffer_rollout.advantages
    if advantages.dim() == 2:  # PPO: per token, zero on the environment's tokens, carried across them
        assert torch.all(advantages[:, :width][~mask] == 0)
        first_turn_end = [m.index(False) - 1 for m in samples.action_masks if not all(m)]
        assert any(advantages[i, t] != 0 for i, t in enumerate(first_turn_end))
    episode = {
        k: v for step, metrics in logged for k, v in metrics.items() if k.startswith("rollout/episode/")
    }
    assert episode["rollout/episode/turns"] > 1 and "rollout/episode/attempts" in episode
    assert summary  # the run finished


def _train_with_buffer(model_dir, stage, tmp_path, logged):
    """Train (a checkpoint every step), and return the rollout buffer the last checkpoint holds."""
    from rlhf_core.training.engine.checkpoint import latest_checkpoint
    from rlhf_core.training.policy_gradient.rollouts import RolloutBuffer

    stage = stage.model_copy(update={"train": stage.train.model_copy(update={"checkpoint_every": 1})})
    trained, _, summary = _train(model_dir, stage, tmp_path / "ckpt", log=lambda m, s: logged.append((s, m)))
    buffer = RolloutBuffer()  # extra state: [prompt stream, rollout buffer, KL controller]
    state = torch.load(latest_checkpoint(tmp_path / "ckpt") / "custom_checkpoint_1.pkl", weights_only=False)
    buffer.load_state_dict(state)
    return trained, buffer, summary


def test_a_killed_episode_run_resumes_exactly(tiny, tmp_path):
    """Checkpoints in the middle of a rollout's updates: the trajectory buffer (tokens, action masks,
    episodes) comes back with the weights."""
    stage = _stage("grpo", group_size=4, update_epochs=2, minibatches=2, train={"lr": 3e-3, "batch_size": 8,
                   "checkpoint_every": 2})  # fmt: skip
    uninterrupted, _, _ = _train(tiny, stage, tmp_path / "a")

    class Crash(Exception):
        pass

    def crash_after_step_7(metrics, step):
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        _train(tiny, stage, tmp_path / "b", log=crash_after_step_7)
    resumed, _, summary = _train(tiny, stage, tmp_path / "b")
    assert summary.resumed_from_step == 6
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_per_turn_rewards_sit_on_the_last_token_of_their_turn_for_ppo():
    """An environment's per-turn rewards (book ch.13) are placed where the turn they reward ends; the rest
    of the episode's reward (the reward sources on the final answer) on its last own token."""
    from rlhf_core.rollout.episodes import EpisodeRecord
    from rlhf_core.training.policy_gradient.samples import Samples

    actions = [True, True, False, False, True, True]
    episode = EpisodeRecord([], 2, "done", {}, 0.35, ((1, 0.25), (5, 0.1)))
    samples = Samples(
        [[1]], [[5] * 6], [0], [False], torch.tensor([0.85], dtype=torch.float64), {}, [""], [""],
        action_masks=[actions], episodes=[episode],
    )  # fmt: skip
    mask = samples.token_mask([0], 6)
    assert samples.token_rewards(mask)[0].tolist() == pytest.approx([0, 0.25, 0, 0, 0, 0.5 + 0.1])


def test_the_policy_loss_and_its_gradient_count_only_the_model_tokens(tiny):
    """GRPO's loss over episodes, through the trainer's micro-batch loss, equals a plain computation from
    one forward pass: per sequence, -A_i times the mean ratio over the model's own tokens (ratio 1 at the
    first update), averaged over sequences; and so does its gradient. The environment's tokens are in
    the context but nowhere in the sum."""
    from rlhf_core.rollout.episodes import EpisodeRecord
    from rlhf_core.training.policy_gradient.rollouts import score_rollout
    from rlhf_core.training.policy_gradient.samples import Samples
    from rlhf_core.training.policy_gradient.trainer import PolicyGradientTrainer

    policy, tokenizer = load_model(tiny)
    stage = _stage("grpo", group_size=2, prompts_per_rollout=1, kl={"beta": 0.0})
    assert stage.resolved().aggregation == "sequence"
    prompt = [5, 6, 7, 8]
    completions = [[20, 21, 30, 31, 32, 22, 23], [24, 25, 26, 33, 34, 27]]
    actions = [[True, True, False, False, False, True, True], [True, True, True, False, False, True]]
    samples = Samples(
        [prompt, prompt], completions, [0, 0], [False, False], torch.tensor([1.0, 0.0], dtype=torch.float64),
        {}, ["", ""], ["", ""], action_masks=actions,
        episodes=[EpisodeRecord([], 2, "done", {}, None), EpisodeRecord([], 2, "done", {}, None)],
    )  # fmt: skip
    trainer = PolicyGradientTrainer(
        policy, tokenizer, [{"prompt": "x"}], stage.resolved(), lambda rows: ([0.0] * len(rows), {}), seed=0,
        stage_name="t", reference=None, value_model=None, log=None, log_samples=None,
    )  # fmt: skip
    rollout = score_rollout(samples, policy, None, None, tokenizer.pad_token_id, shared_prefix=False,
                            batch_size=8, need_old=False)  # fmt: skip
    advantages = torch.tensor([0.7, -0.7])
    trainer.buffer.rollout, trainer.buffer.advantages = rollout, advantages
    loss, _, _ = trainer.micro_batch_loss(rollout, [0, 1], torch.device("cpu"))
    policy.zero_grad()
    loss.backward()
    trainer_grads = [p.grad.clone() for p in policy.parameters()]

    policy.zero_grad()
    manual = 0.0
    for i, (completion, own) in enumerate(zip(completions, actions, strict=True)):
        ids = torch.tensor([prompt + completion])
        logits = policy(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        logps = torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]
        ratio = torch.exp(logps - logps.detach())[torch.tensor(own)]
        manual = manual + (-advantages[i] * ratio).mean() / len(completions)
    manual.backward()
    torch.testing.assert_close(loss, manual, atol=1e-6, rtol=0)
    for (name, p), got in zip(policy.named_parameters(), trainer_grads, strict=True):
        torch.testing.assert_close(got, p.grad, atol=1e-6, rtol=1e-4, msg=name)
