"""Process reward models (book ch.5) on a tiny model: step boundaries in tokens, ln 2 / ln 3 at
initialisation, learning, label checks, held-out figures, and the stage spec."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.errors import UserError
from rlhf_core.evaluation.token_reward_model import evaluate_process_model
from rlhf_core.modeling.models import build_tiny_model, save_model
from rlhf_core.modeling.token_reward_examples import check_step_labels, step_examples
from rlhf_core.modeling.token_reward_model import (
    DEFAULT_SEPARATOR,
    LABELS_KEY,
    SEPARATOR_KEY,
    build_token_reward_model,
    encode_steps,
    split_steps,
)
from rlhf_core.spec.stages.outcome_process_rewards import ProcessRewardModelStage, ProcessRewardTrainSpec
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.training.token_reward_model.trainer import (
    TokenRewardInputs,
    fit_process_reward_model,
    train_token_reward_model,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = synthetic_records("arithmetic", "step_labels", n=64, seed=0, max_operand=30)


class TinyShape:  # the tiny decoder of the other reward-model tests
    hidden_size, layers, heads, vocab_size, intermediate_size, max_position_embeddings = (
        32,
        1,
        2,
        320,
        None,
        256,
    )


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    model, tokenizer = build_tiny_model(TinyShape, 0)
    return str(save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model")), tokenizer


def _stage(**fields) -> ProcessRewardModelStage:
    return ProcessRewardModelStage(
        kind="process_reward_model", model="sft", data="data.step_labels", **fields
    )


@pytest.mark.parametrize("separator", [DEFAULT_SEPARATOR, " ki", "\n\n"])
def test_every_step_ends_at_its_separators_last_token(policy, separator):
    """Built step by step, the ids up to each step end decode to the prompt and the steps so far, each
    with its separator, even where the tokenizer would merge text across the boundary."""
    _, tokenizer = policy
    steps = ["12 + 10 = 22", "22 + 3 = 25", "The answer is 25."]
    tokens = encode_steps(tokenizer, "What is 12 + 13?", steps, separator)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 13?"}], tokenize=False, add_generation_prompt=True
    )
    for k, end in enumerate(tokens.step_ends):
        text = "".join(step + separator for step in steps[: k + 1])
        assert tokenizer.decode(tokens.ids[: end + 1]) == prompt + text
    assert tokenizer.decode(tokens.ids[tokens.step_ends[-1] + 1 :]) == tokenizer.eos_token


def test_split_steps_inverts_the_separator():
    assert split_steps("a\n<step>\nb\n<step>\n", DEFAULT_SEPARATOR) == ["a", "b"]
    assert split_steps("one answer", DEFAULT_SEPARATOR) == ["one answer"]


@pytest.mark.parametrize(
    ("labels", "classes", "expected"), [("binary", 1, math.log(2)), ("three_class", 3, math.log(3))]
)
def test_loss_at_initialisation_then_it_falls(policy, tmp_path, labels, classes, expected):
    directory, tokenizer = policy
    model = build_token_reward_model(
        directory, kind="process", num_labels=classes, separator=DEFAULT_SEPARATOR, step_labels=labels
    )
    assert (
        getattr(model.config, LABELS_KEY) == labels
        and getattr(model.config, SEPARATOR_KEY) == DEFAULT_SEPARATOR
    )
    examples, _ = step_examples(
        ROWS,
        tokenizer,
        separator=DEFAULT_SEPARATOR,
        max_steps=12,
        max_length=256,
        on_overlong="fail",
        source="s",
    )
    cfg = ProcessRewardTrainSpec(
        max_steps=40, lr=3e-3, batch_size=16, grad_accum=1, warmup_ratio=0.0, log_every=1
    )
    logged: list[dict] = []
    _, result = train_token_reward_model(
        model, examples, cfg, labels, pad_token_id=tokenizer.pad_token_id, seed=0,
        checkpoint_dir=tmp_path / "ckpt", log=lambda m, s: logged.append(m),
    )  # fmt: skip
    assert logged[0]["train/loss"] == pytest.approx(expected, abs=1e-6)
    # the step ratings are unbalanced (about 2 good to 1 bad), so even the class prior lowers the loss
    assert min(m["train/loss"] for m in logged[-5:]) < expected - 0.05


def test_max_solution_steps_keeps_the_first_steps(policy):
    _, tokenizer = policy
    row = ROWS[0]
    (example,), _ = step_examples(
        [row],
        tokenizer,
        separator=DEFAULT_SEPARATOR,
        max_steps=2,
        max_length=256,
        on_overlong="fail",
        source="s",
    )
    assert len(example.positions) == 2 and example.labels == [float(v) for v in row["labels"][:2]]


def test_three_class_labels_refuse_binary_data(policy):
    _, tokenizer = policy
    binary = [{**row, "labels": [1 if v == 1 else 0 for v in row["labels"]]} for row in ROWS[:8]]
    examples, _ = step_examples(
        binary,
        tokenizer,
        separator=DEFAULT_SEPARATOR,
        max_steps=12,
        max_length=256,
        on_overlong="fail",
        source="s",
    )
    with pytest.raises(UserError, match="no step is rated -1.*use labels: binary"):
        check_step_labels(examples, "three_class", "s")
    check_step_labels(examples, "binary", "s")


def test_the_stage_trains_and_reports_step_and_solution_accuracy(policy, tmp_path):
    directory, tokenizer = policy
    stage = _stage(labels="three_class", train={"max_steps": 3, "batch_size": 8, "grad_accum": 1, "lr": 3e-3})
    env = StageEnvironment.local("prm", 0, tmp_path)
    result = fit_process_reward_model(stage, TokenRewardInputs(directory, None, ROWS[:48], ROWS[48:]), env)
    figures = result.heldout
    assert set(figures) >= {"eval/loss", "eval/step_accuracy", "eval/solution_accuracy"}
    assert 0.0 <= figures["eval/step_accuracy"] <= 1.0
    assert result.model.config.num_labels == 3


def test_heldout_figures_at_initialisation(policy):
    """Zero head, binary: every q_i = 1/2, no step predicted good (1/2 is not above 1/2); the step
    accuracy is the share of bad steps, every solution scores 1/2 and is called wrong."""
    directory, tokenizer = policy
    model = build_token_reward_model(directory, kind="process")
    rows = ROWS[:12]
    figures = evaluate_process_model(model, tokenizer, rows, _stage())
    labels = [v for row in rows for v in row["labels"]]
    assert figures["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert figures["eval/step_accuracy"] == pytest.approx(sum(v != 1 for v in labels) / len(labels))
    wrong = sum(any(v != 1 for v in row["labels"]) for row in rows)
    assert figures["eval/solution_accuracy"] == pytest.approx(wrong / len(rows))
    assert figures["eval/reward_correct_mean"] == pytest.approx(0.5)


def test_stage_spec_defaults_and_refusals():
    stage = _stage()
    assert stage.separator == DEFAULT_SEPARATOR  # the spec (torch-free) and the model module agree
    assert (stage.labels, stage.separator, stage.train.lr) == ("binary", "\n<step>\n", 5e-5)
    assert stage.train.batch_size * stage.train.grad_accum == 16 and stage.train.schedule == "constant"
    assert stage.train.max_solution_steps == 12
    with pytest.raises(ValidationError, match="only whitespace"):
        _stage(separator="\n")
    with pytest.raises(ValidationError, match="labels"):
        _stage(labels="five_class")
