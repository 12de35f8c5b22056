"""Outcome reward models (book ch.5) on a tiny model: tokens, ln 2 at initialisation, learning, held-out
figures, resume, and the stage spec."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.errors import UserError
from rlhf_core.evaluation.token_reward_model import evaluate_outcome_model, ranking_figures
from rlhf_core.modeling.models import build_tiny_model, save_model
from rlhf_core.modeling.token_reward_examples import outcome_examples
from rlhf_core.modeling.token_reward_model import build_token_reward_model, encode_outcome, reward_kind
from rlhf_core.spec.stages.outcome_process_rewards import OutcomeRewardModelStage, OutcomeRewardTrainSpec
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.training.token_reward_model.trainer import (
    TokenRewardInputs,
    fit_outcome_reward_model,
    train_token_reward_model,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = synthetic_records("arithmetic", "outcome", n=48, seed=0, max_operand=30)
# a signal a 32-wide one-layer model learns in a few steps: worked solutions right, refusals wrong
EASY = [
    {**row, "completion": "I do not know.", "correct": False} if not row["correct"] else row for row in ROWS
]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    model, tokenizer = build_tiny_model(TinyShape, 0)
    return str(save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model")), tokenizer


class TinyShape:  # the tiny decoder of the other reward-model tests
    hidden_size, layers, heads, vocab_size, intermediate_size, max_position_embeddings = (
        32,
        1,
        2,
        320,
        None,
        256,
    )


def test_completion_tokens_are_exactly_the_completion_and_the_turn_end(policy):
    _, tokenizer = policy
    tokens = encode_outcome(tokenizer, ROWS[0]["prompt"], ROWS[0]["completion"])
    completion = tokenizer.decode(tokens.ids[tokens.start :])
    assert completion == ROWS[0]["completion"] + tokenizer.eos_token
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": ROWS[0]["prompt"]}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(tokens.ids[: tokens.start]) == prompt


def test_loss_is_ln2_at_initialisation_and_falls(policy, tmp_path):
    directory, tokenizer = policy
    model = build_token_reward_model(directory, kind="outcome")
    assert reward_kind(model.config) == "outcome"
    examples, _ = outcome_examples(EASY, tokenizer, 256, "fail", "outcomes")
    cfg = OutcomeRewardTrainSpec(max_steps=30, lr=3e-3, batch_size=16, grad_accum=1, log_every=1)
    logged: list[dict] = []
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained, result = train_token_reward_model(
        model, examples, cfg, "token", pad_token_id=tokenizer.pad_token_id, seed=0,
        checkpoint_dir=tmp_path / "ckpt", log=lambda m, s: logged.append(m),
    )  # fmt: skip
    # zero head: every p_t = 1/2, so every sequence's mean BCE is ln 2
    assert logged[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.final_loss < math.log(2) - 0.05
    assert not torch.equal(before["score.weight"], trained.score.weight)


def test_heldout_figures_at_initialisation(policy):
    """All scores tie at 1/2 with a zero head: top-1 is the share of correct completions among each
    prompt's completions (1 of 2), pairwise accuracy counts every tie 1/2."""
    directory, tokenizer = policy
    figures = evaluate_outcome_model(
        build_token_reward_model(directory, kind="outcome"), tokenizer, ROWS[:10], "token"
    )
    assert figures["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert figures["eval/top1_accuracy"] == pytest.approx(0.5)
    assert figures["eval/pairwise_accuracy"] == pytest.approx(0.5)
    assert figures["eval/reward_correct_mean"] == pytest.approx(0.5)


def test_ranking_figures_by_hand():
    # prompt a: correct 0.9, wrong 0.4, wrong 0.95 -> top-1 wrong; pairs: (0.9 > 0.4) yes, (0.9 > 0.95) no
    # prompt b: correct 0.3, correct 0.3 -> top-1 correct, no pair; prompt c: one completion, left out
    scores = [0.9, 0.4, 0.95, 0.3, 0.3, 0.7]
    correct = [True, False, False, True, True, False]
    figures = ranking_figures(scores, correct, ["a", "a", "a", "b", "b", "c"])
    assert figures["eval/top1_accuracy"] == pytest.approx(0.5)
    assert figures["eval/pairwise_accuracy"] == pytest.approx(0.5)
    assert figures["eval/reward_correct_mean"] == pytest.approx((0.9 + 0.3 + 0.3) / 3)
    assert figures["eval/reward_incorrect_mean"] == pytest.approx((0.4 + 0.95 + 0.7) / 3)


def test_the_stage_trains_evaluates_and_resumes(policy, tmp_path):
    directory, _ = policy
    stage = OutcomeRewardModelStage(
        kind="outcome_reward_model", model="sft", data="data.outcomes", loss="sequence",
        train={"max_steps": 4, "batch_size": 8, "grad_accum": 1, "lr": 3e-3, "checkpoint_every": 2},
    )  # fmt: skip
    env = StageEnvironment.local("orm", 0, tmp_path)
    inputs = TokenRewardInputs(directory, None, ROWS[:40], ROWS[40:], "data.outcomes")
    result = fit_outcome_reward_model(stage, inputs, env)
    assert {"eval/loss", "eval/top1_accuracy", "eval/pairwise_accuracy"} <= set(result.heldout)
    assert result.summary()["steps"] == 4.0 and result.resumed_from_step == 0
    again = fit_outcome_reward_model(stage, inputs, env)  # resumes from the checkpoint of step 2 ...
    assert again.resumed_from_step == 2  # ... and ends with the same weights (exact resume)
    for name, p in result.model.named_parameters():
        assert torch.equal(p, dict(again.model.named_parameters())[name])


def test_an_overlong_row_is_named(policy):
    _, tokenizer = policy
    with pytest.raises(UserError, match=r"outcomes, row 0 \(0-based\): \d+ tokens, longer than max_length 8"):
        outcome_examples(ROWS[:1], tokenizer, 8, "fail", "outcomes")
    assert outcome_examples(ROWS[:3], tokenizer, 8, "skip", "outcomes") == ([], 3)


def test_stage_defaults_follow_the_companion_and_refuse_unknown_losses():
    stage = OutcomeRewardModelStage(kind="outcome_reward_model", model="sft", data="data.outcomes")
    assert (stage.loss, stage.train.lr, stage.train.batch_size * stage.train.grad_accum) == (
        "token",
        1e-5,
        32,
    )
    assert stage.train.epochs == 1 and stage.train.schedule == "linear"
    with pytest.raises(ValidationError, match="loss"):
        OutcomeRewardModelStage(kind="outcome_reward_model", model="sft", data="data.outcomes", loss="pairs")
