"""On-policy distillation (book ch.12) in the policy_gradient stage: the per-token advantage
coef * (log pi_T - log pi_old) lands on the model's own tokens after GRPO's normalisation; the update's
loss and gradient are the hand-computed ones; a student distilled from a sharper teacher moves toward it
(the reverse KL falls); a killed run resumes exactly; tokenizers and settings that do not fit are
refused."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.errors import UserError
from rlhf_core.modeling.models import build_tiny_model, load_model, save_model
from rlhf_core.modeling.sft_tokens import collate, tokenize_sft_row, unpacked_rows
from rlhf_core.modeling.shared_tokenizer import check_shared_tokenizer
from rlhf_core.rollout.episodes import EpisodeRecord
from rlhf_core.spec import TinyModelSource
from rlhf_core.spec.references import reference_fields
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from rlhf_core.training.policy_gradient.algorithms import Settings, compute_advantages
from rlhf_core.training.policy_gradient.distillation import Distiller
from rlhf_core.training.policy_gradient.rollouts import reward_completions, reward_function, score_rollout
from rlhf_core.training.policy_gradient.samples import Samples
from rlhf_core.training.policy_gradient.trainer import PolicyGradientTrainer, train_policy_gradient

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHAPE = TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(student dir, teacher dir): one tiny model taught arithmetic answers for 40 steps; the student is
    its copy after 5 steps, the teacher after all 40 (same tokenizer, a sharper and other distribution)."""
    model, tokenizer = build_tiny_model(SHAPE, 0)
    rows = synthetic_records("arithmetic", "sft", n=64, seed=1)
    batch = collate(unpacked_rows([tokenize_sft_row(r, tokenizer, 64) for r in rows]), tokenizer.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    root = tmp_path_factory.mktemp("opd")
    for step in range(1, 41):
        loss = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        optimizer.zero_grad()
        loss.loss.backward()
        optimizer.step()
        if step == 5:
            student = str(save_model(model, tokenizer, root / "student"))
    return student, str(save_model(model, tokenizer, root / "teacher"))


def _stage(algorithm="grpo", **overrides) -> PolicyGradientStage:
    spec = {
        "kind": "policy_gradient", "algorithm": algorithm, "policy": "sft", "prompts": "data.prompts",
        "distillation": {"teacher": "teacher_sft"}, "rollouts": 3, "prompts_per_rollout": 4,
        "group_size": 4, "kl": {"beta": 0.0}, "generation": {"max_new_tokens": 6, "temperature": 1.0},
        "train": {"lr": 3e-3, "batch_size": 8, "checkpoint_every": 100},
        **overrides,
    }  # fmt: skip
    return PolicyGradientStage.model_validate(spec)


def _episode_samples(rewards: list[float]) -> Samples:
    """Two completions of one prompt, each with environment tokens between two model turns."""
    completions = [[20, 21, 30, 31, 32, 22, 23], [24, 25, 26, 33, 34, 27]]
    actions = [[True, True, False, False, False, True, True], [True, True, True, False, False, True]]
    return Samples(
        [[5, 6, 7, 8]] * 2, completions, [0, 0], [False, False], torch.tensor(rewards, dtype=torch.float64),
        {}, ["", ""], ["", ""], action_masks=actions,
        episodes=[EpisodeRecord([], 2, "done", {}, None), EpisodeRecord([], 2, "done", {}, None)],
    )  # fmt: skip


def _hand_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of each completion token from one plain forward pass."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def test_the_advantage_adds_the_teacher_term_after_grpo_normalisation(tiny):
    """Rewards (1, 0) in a group of 2: GRPO gives +-0.5 / (std + 1e-4) with the unbiased std sqrt(0.5),
    i.e. +-0.70701, on every model token; the distillation term coef * (log pi_T - log pi_old) is added
    per token unscaled by that normalisation; environment tokens and padding get 0."""
    student, _ = load_model(tiny[0])
    teacher, tokenizer = load_model(tiny[1])
    stage = _stage(
        rewards=[{"function": "answer_format"}], group_size=2, distillation={"teacher": "t", "coef": 0.5}
    )
    samples = _episode_samples([1.0, 0.0])
    rollout = score_rollout(samples, student, None, None, tokenizer.pad_token_id, shared_prefix=False,
                            batch_size=8, need_old=True)  # fmt: skip
    estimator, _, _ = compute_advantages(rollout, Settings.of(stage), stage, 0.0)
    grpo = 0.5 / (0.5**0.5 + 1e-4)
    torch.testing.assert_close(estimator.float(), torch.tensor([grpo, -grpo]))

    total, metrics = Distiller(teacher, 0.5, tokenizer.pad_token_id, 8).add_to(estimator, rollout, student)
    assert total.shape == (2, 7)
    expected_terms, gaps = [], []
    with torch.no_grad():
        for i, (completion, own) in enumerate(zip(samples.completion_ids, samples.action_masks, strict=True)):
            gap = _hand_logps(teacher, [5, 6, 7, 8], completion) - _hand_logps(
                student, [5, 6, 7, 8], completion
            )
            own = torch.tensor(own)
            want = torch.where(own, [grpo, -grpo][i] + 0.5 * gap, 0.0)
            torch.testing.assert_close(total[i, : len(completion)], want, atol=1e-5, rtol=0)
            assert (total[i, len(completion) :] == 0).all()
            expected_terms.append(0.5 * gap[own])
            gaps.append(-gap[own])
    assert metrics["distill/reverse_kl"] == pytest.approx(float(torch.cat(gaps).mean()), abs=1e-5)
    assert metrics["distill/advantage_mean"] == pytest.approx(
        float(torch.cat(expected_terms).mean()), abs=1e-5
    )
    assert metrics["distill/reverse_kl"] > 0.1  # the teacher is another distribution: the test can fail


def test_a_teacher_equal_to_the_student_gives_no_distillation_advantage(tiny):
    """Pure OPD (no rewards): the estimator's part is 0 (all rewards 0, truncated or not) and a teacher
    identical to the student adds log pi - log pi = 0 on every token."""
    student, tokenizer = load_model(tiny[0])
    stage = _stage(rewards=[], group_size=2)
    assert stage.rewardless and stage.truncated == "penalty"
    rows = [{"prompt": "1+1", "completion": c, "completion_tokens": 6} for c in ("2", "22222")]
    rewards, _ = reward_completions(rows, [False, True], stage, reward_function((), {}, "opd"))
    assert rewards.tolist() == [0.0, 0.0]  # no reward for the truncation rule to replace
    samples = _episode_samples([0.0, 0.0])
    rollout = score_rollout(samples, student, None, None, tokenizer.pad_token_id, shared_prefix=False,
                            batch_size=8, need_old=True)  # fmt: skip
    estimator, _, _ = compute_advantages(rollout, Settings.of(stage), stage, 0.0)
    distiller = Distiller(copy.deepcopy(student), 1.0, tokenizer.pad_token_id, 8)
    total, metrics = distiller.add_to(estimator, rollout, student)
    torch.testing.assert_close(total, torch.zeros(2, 7), atol=1e-6, rtol=0)
    assert metrics["distill/reverse_kl"] == pytest.approx(0.0, abs=1e-6)


def test_the_micro_batch_loss_and_gradient_follow_the_per_token_advantage(tiny):
    """GRPO's loss with distillation, through the trainer's micro-batch loss, equals a plain computation
    from one forward pass: per sequence, the mean over its model tokens of -A_t x ratio_t (ratio 1 in
    value at the first update: pi_old is the same weights), averaged over sequences; so does its
    gradient, which is -mean A_t grad log pi_t (the advantage itself carries no gradient)."""
    student, _ = load_model(tiny[0])
    teacher, tokenizer = load_model(tiny[1])
    stage = _stage(group_size=2, prompts_per_rollout=1).resolved()
    samples = _episode_samples([0.0, 0.0])
    trainer = PolicyGradientTrainer(
        student, tokenizer, [{"prompt": "x"}], stage, lambda rows: ([0.0] * len(rows), {}), seed=0,
        stage_name="t", reference=None, value_model=None, log=None, log_samples=None, teacher=teacher,
    )  # fmt: skip
    assert trainer.settings.need_old_pass  # the term reads pi_old at the rollout
    rollout = score_rollout(samples, student, None, None, tokenizer.pad_token_id, shared_prefix=False,
                            batch_size=8, need_old=True)  # fmt: skip
    estimator, _, _ = compute_advantages(rollout, trainer.settings, stage, 0.0)
    advantages, _ = trainer.distiller.add_to(estimator, rollout, student)
    trainer.buffer.rollout, trainer.buffer.advantages = rollout, advantages
    loss, _, _ = trainer.micro_batch_loss(rollout, [0, 1], torch.device("cpu"))
    student.zero_grad()
    loss.backward()
    trainer_grads = [p.grad.clone() for p in student.parameters()]

    student.zero_grad()
    manual = 0.0
    for completion, own in zip(samples.completion_ids, samples.action_masks, strict=True):
        own = torch.tensor(own)
        with torch.no_grad():
            term = _hand_logps(teacher, [5, 6, 7, 8], completion) - _hand_logps(
                student, [5, 6, 7, 8], completion
            )
        logps = _hand_logps(student, [5, 6, 7, 8], completion)
        ratio = torch.exp(logps - logps.detach())
        manual = manual + (-term * ratio)[own].mean() / 2
    manual.backward()
    torch.testing.assert_close(loss, manual, atol=1e-5, rtol=0)
    for (name, p), got in zip(student.named_parameters(), trainer_grads, strict=True):
        torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=1e-3, msg=name)


def _train(tiny, stage, checkpoint_dir, log=None, teacher=True):
    student, tokenizer = load_model(tiny[0])
    return train_policy_gradient(
        student, tokenizer, synthetic_records("arithmetic", "prompts", n=32, seed=0), stage,
        lambda rows: ([0.0] * len(rows), {}), seed=0, checkpoint_dir=checkpoint_dir, log=log,
        teacher_model=load_model(tiny[1])[0] if teacher else None,
    )  # fmt: skip


def test_distilling_on_policy_lowers_the_reverse_kl_to_the_teacher(tiny, tmp_path):
    """Pure OPD (grpo, no rewards) for 30 rollouts of 8 prompts x 4: the per-token reverse KL estimate on
    the student's own samples falls clearly: the mean of the last three rollouts is under 0.6 x the first
    three's (measured: 4.26 -> 1.84 nats at lr 1e-2, 4.23 -> 1.96 at lr 5e-3)."""
    stage = _stage(rewards=[], rollouts=30, prompts_per_rollout=8, train={"lr": 1e-2, "batch_size": 16},
                   generation={"max_new_tokens": 8, "temperature": 1.0})  # fmt: skip
    logged: list[tuple[int, dict]] = []
    _, _, result = _train(tiny, stage, tmp_path, log=lambda metrics, step: logged.append((step, metrics)))
    rollouts = [m for _, m in logged if "rollout/distill/reverse_kl" in m]
    kls = [m["rollout/distill/reverse_kl"] for m in rollouts]
    assert len(kls) == 30
    assert all(
        m["rollout/distill/advantage_mean"] == pytest.approx(-k, abs=1e-5)
        for m, k in zip(rollouts, kls, strict=True)
    )
    assert statistics.fmean(kls[-3:]) < 0.6 * statistics.fmean(kls[:3]), kls
    assert result.last_rollout_metrics["distill/reverse_kl"] == kls[-1]
    assert result.summary()["distill/reverse_kl"] == kls[-1]  # a headline number of the stage


def test_a_killed_distillation_run_resumes_exactly(tiny, tmp_path):
    """Checkpoints every 2 steps, 4 updates per rollout: the advantages with the teacher's term come back
    with the rollout buffer, and the resumed run ends on the uninterrupted run's weights."""
    stage = _stage(rewards=[{"function": "answer_format"}], update_epochs=2, minibatches=2,
                   train={"checkpoint_every": 2, "batch_size": 8, "lr": 3e-3})  # fmt: skip
    uninterrupted, _, _ = _train(tiny, stage, tmp_path / "a")

    class Crash(Exception):
        pass

    def crash_after_step_7(metrics, step):
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        _train(tiny, stage, tmp_path / "b", log=crash_after_step_7)
    resumed, _, result = _train(tiny, stage, tmp_path / "b")
    assert result.resumed_from_step == 6
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_a_stage_with_distillation_needs_its_teacher(tiny, tmp_path):
    with pytest.raises(ValueError, match="distillation: give the teacher model"):
        _train(tiny, _stage(rewards=[]), tmp_path, teacher=False)


def test_a_teacher_with_another_tokenizer_is_refused_naming_both_models(tiny):
    _, tokenizer = load_model(tiny[0])
    names = {"stage": "opd", "field": "distillation.teacher", "student_name": "sft", "teacher_name": "big"}
    check_shared_tokenizer(tokenizer, load_model(tiny[1])[1], **names)
    _, other = build_tiny_model(SHAPE, seed=1)  # BPE merges learnt from another corpus
    with pytest.raises(UserError, match=r"stage 'opd', field distillation.teacher: the teacher 'big' .* "
                       r"student 'sft' \(vocabulary: token id \d+ is"):  # fmt: skip
        check_shared_tokenizer(tokenizer, other, **names)
    other_eos = type(tokenizer).from_pretrained(tiny[1])
    other_eos.eos_token = other_eos.pad_token
    with pytest.raises(UserError, match="special tokens: the student's eos_token is"):
        check_shared_tokenizer(tokenizer, other_eos, **names)


def test_the_stage_loads_and_checks_the_teacher(tiny, tmp_path):
    """``load_teacher``: a frozen teacher in eval mode; a teacher of another tokenizer stops before any
    training with the stage's references named."""
    from rlhf_core.training.policy_gradient.stage import PolicyGradientInputs, load_teacher

    _, tokenizer = load_model(tiny[0])
    stage = _stage(rewards=[])
    inputs = PolicyGradientInputs(tiny[0], None, [], teacher_dir=tiny[1])
    teacher = load_teacher(stage, inputs, tokenizer, "opd")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    model, other = build_tiny_model(SHAPE, seed=1)
    elsewhere = str(save_model(model, other, tmp_path / "other"))
    with pytest.raises(
        UserError, match="the teacher 'teacher_sft' does not share the tokenizer of the student 'sft'"
    ):
        load_teacher(stage, PolicyGradientInputs(tiny[0], None, [], teacher_dir=elsewhere), tokenizer, "opd")


def test_settings_that_do_not_fit_distillation_are_refused():
    with pytest.raises(ValueError, match="algorithm 'ppo' does not take .* GAE on a value model"):
        _stage("ppo", group_size=None)
    with pytest.raises(ValueError, match="algorithm 'gspo' does not take .* whole sequence"):
        _stage("gspo")
    with pytest.raises(ValueError, match="dynamic sampling would drop every group; set dynamic_sampling"):
        _stage("dapo", rewards=[])
    assert _stage("dapo", rewards=[], dynamic_sampling=False).resolved().dynamic_sampling is False
    assert _stage("dapo", rewards=[{"function": "answer_format"}]).resolved().dynamic_sampling
    with pytest.raises(ValueError, match="monitor.proxy: a distillation-only stage"):
        _stage(rewards=[], monitor={"gold": [{"function": "arithmetic_exact"}]})
    with pytest.raises(ValueError, match="or distillation"):
        _stage(rewards=[], distillation=None)
    for algorithm in ("reinforce", "rloo", "grpo", "dr_grpo", "cispo"):
        group = 1 if algorithm == "reinforce" else 4
        assert _stage(algorithm, rewards=[], group_size=group).distillation.coef == 1.0
    with pytest.raises(ValueError, match="greater than 0"):
        _stage(distillation={"teacher": "t", "coef": 0})


def test_the_teacher_is_a_reference_of_the_stage():
    """The teacher is found like any reference (plan, fingerprint, lineage) and a self-distillation
    setup (teacher = policy) is allowed."""
    stage = _stage(rewards=[], distillation={"teacher": "sft"})
    assert reference_fields(stage)["distillation.teacher"][0] == "sft"
    stage = _stage(rewards=[])
    assert PolicyGradientStage.model_validate(stage.model_dump(mode="json")) == stage


@pytest.mark.parametrize(
    "extra",
    [{"lora": {"r": 4}}, {"lora": {"r": 4}, "kl": {"beta": 0.1}}, {"async_rollouts": {"max_staleness": 1}}],
    ids=["lora", "lora_with_kl", "async"],
)
def test_the_stage_distils_a_lora_policy_and_with_asynchronous_rollouts(tiny, tmp_path, extra):
    """The stage's entry point with the teacher's directory: a LoRA policy (the teacher a whole model of
    its own) and asynchronous rollouts (pi_old and the teacher score each rollout when training reaches
    it) train, and every rollout logs its distillation metrics."""
    from rlhf_core.stage_environment import StageEnvironment
    from rlhf_core.training.policy_gradient.stage import PolicyGradientInputs, optimize_on_rollouts

    logged: list[dict] = []
    env = StageEnvironment("opd", 0, tmp_path, tmp_path / "cache", tmp_path / "ckpt",
                           log=lambda metrics, step: logged.append(metrics))  # fmt: skip
    records = synthetic_records("arithmetic", "prompts", n=16, seed=0)
    inputs = PolicyGradientInputs(tiny[0], None, records, teacher_dir=tiny[1])
    stage = _stage(rewards=[], **{"train": {"lr": 1e-2, "batch_size": 16, "log_every": 1}, **extra})
    result = optimize_on_rollouts(stage, inputs, env)
    kls = [m["rollout/distill/reverse_kl"] for m in logged if "rollout/distill/reverse_kl" in m]
    assert len(kls) == stage.rollouts and all(k > 0.1 for k in kls)
    start = load_model(tiny[0])[0].state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in result.model.state_dict().items())
    if "kl" in extra:  # the reference is the LoRA policy with its adapters off: the starting weights
        kl = [m["rollout/kl"] for m in logged if "rollout/kl" in m]
        assert len(kl) == stage.rollouts and abs(kl[0]) < 1e-5 and max(kl) > 1e-4
    if "async_rollouts" in extra:
        staleness = [m["rollout/async/staleness_max"] for m in logged if "rollout/async/staleness_max" in m]
        assert staleness[0] == 0.0 and max(staleness) <= 1.0


def test_multi_turn_episodes_get_the_term_on_the_models_turns_only(tiny):
    """A real rollout of episodes with a verifier that answers back (book ch.13), rewarded by the
    environment alone: the advantage is 0 on the environment's tokens and on padding, the estimator's
    plus the teacher's term on the model's own. (Roles swapped: the 40-step model ends its turns, so its
    episodes have several.)"""
    student, _ = load_model(tiny[1])
    teacher, tokenizer = load_model(tiny[0])
    stage = _stage(
        rewards=[], group_size=2, prompts_per_rollout=4,
        generation={"max_new_tokens": 16, "temperature": 1.0},
        environment={"name": "verifier_feedback", "verifier": "arithmetic_exact",
                     "options": {"max_attempts": 2}, "max_turns": 2},
    )  # fmt: skip
    records = synthetic_records("arithmetic", "prompts", n=8, seed=0)
    trainer = PolicyGradientTrainer(
        student, tokenizer, records, stage, lambda rows: ([0.0] * len(rows), {}), seed=0, stage_name="t",
        reference=None, value_model=None, log=None, log_samples=None, teacher=teacher,
    )  # fmt: skip
    trainer.collect(0, 0)
    rollout, advantages = trainer.buffer.rollout, trainer.buffer.advantages
    mask = rollout.mask
    environment_tokens = sum(
        length - own
        for length, own in zip(rollout.samples.lengths, rollout.samples.model_token_counts, strict=True)
    )
    assert environment_tokens > 0  # the verifier spoke between turns
    assert (advantages[~mask] == 0).all()
    estimator, _, _ = compute_advantages(rollout, trainer.settings, stage, 0.0)
    term = (advantages - estimator[:, None])[mask]
    assert rollout.metrics["distill/advantage_mean"] == pytest.approx(float(term.mean()), abs=1e-5)
    assert term.abs().max() > 0.1  # the teacher is another model: the term is there to see
