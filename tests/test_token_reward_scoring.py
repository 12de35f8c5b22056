"""Outcome and process reward models as reward sources (book ch.5): the scorer finds the model's kind
in its saved config, aggregates as the source's options say (checked against hand aggregations), refuses
options a model does not take, and serves as the best-of-N selector."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from rlhf_core.errors import UserError
from rlhf_core.modeling.models import build_tiny_model, load_model, save_model
from rlhf_core.modeling.reward_model import build_reward_model
from rlhf_core.modeling.token_reward_model import (
    DEFAULT_SEPARATOR,
    build_token_reward_model,
    encode_outcome,
    encode_steps,
    split_steps,
)
from rlhf_core.rewards.composite import model_source_options
from rlhf_core.rewards.reward_model_scoring import load_reward_model_scorer, load_reward_model_scorers
from rlhf_core.spec import RewardSourceSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = [
    ("What is 12 + 13?", "12 + 10 = 22\n<step>\n22 + 3 = 25\n<step>\nThe answer is 25."),
    ("What is 12 + 13?", "The answer is 26."),  # no separator: one step
    (
        "What is 4 * 11?",
        "4 * 10 = 40\n<step>\n4 * 1 = 4\n<step>\n40 + 4 = 44\n<step>\nThe answer is 44.\n<step>\n",
    ),
]


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


def _saved(policy, tmp_path, **kwargs) -> str:
    """A saved ORM/PRM whose head is random (so the probabilities differ from token to token)."""
    directory, tokenizer = policy
    model = build_token_reward_model(directory, **kwargs)
    torch.nn.init.normal_(model.score.weight, std=2.0, generator=torch.Generator().manual_seed(0))
    return str(save_model(model, tokenizer, tmp_path / "rm"))


def _probabilities(directory: str, ids: list[int], positions: list[int]) -> list[float]:
    """P(good) at ``positions``, straight from the saved model's forward pass on one unpadded row."""
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, positions]  # (P, C)
    if logits.shape[-1] == 3:
        return torch.softmax(logits, -1)[:, 2].tolist()
    return torch.sigmoid(logits[:, 0]).tolist()


ORM_HAND = {
    "mean": lambda p: sum(p) / len(p),
    "min": min,
    "product": lambda p: math.prod(p),
    "last_m": lambda p: sum(p[-3:]) / 3,  # options last_m: 3
}


@pytest.mark.parametrize("aggregation", sorted(ORM_HAND))
def test_an_orm_scores_the_hand_aggregation_of_its_token_probabilities(policy, tmp_path, aggregation):
    directory = _saved(policy, tmp_path, kind="outcome")
    options = {"aggregation": aggregation} | ({"last_m": 3} if aggregation == "last_m" else {})
    scores = load_reward_model_scorer(directory, options, source="rm:orm")(PAIRS)
    tokenizer = policy[1]
    for (prompt, completion), score in zip(PAIRS, scores, strict=True):
        tokens = encode_outcome(tokenizer, prompt, completion)
        p = _probabilities(directory, tokens.ids, list(range(tokens.start, len(tokens.ids))))
        assert score == pytest.approx(ORM_HAND[aggregation](p), rel=1e-5, abs=1e-7)


def test_an_orms_default_is_the_last_tokens_probability(policy, tmp_path):
    directory = _saved(policy, tmp_path, kind="outcome")
    tokens = encode_outcome(policy[1], *PAIRS[0])
    (last,) = _probabilities(directory, tokens.ids, [len(tokens.ids) - 1])
    assert load_reward_model_scorer(directory)(PAIRS[:1]) == [pytest.approx(last, rel=1e-5)]


PRM_HAND = {
    "min": min,
    "mean": lambda q: sum(q) / len(q),
    "product": lambda q: math.prod(q),
    "weighted": lambda q: sum((i + 1) * v for i, v in enumerate(q)) / sum(range(1, len(q) + 1)),
    "last": lambda q: q[-1],
}


@pytest.mark.parametrize("labels", ["binary", "three_class"])
@pytest.mark.parametrize("aggregation", sorted(PRM_HAND))
def test_a_prm_scores_the_hand_aggregation_of_its_step_probabilities(policy, tmp_path, aggregation, labels):
    directory = _saved(
        policy, tmp_path, kind="process", num_labels=3 if labels == "three_class" else 1, step_labels=labels
    )
    scores = load_reward_model_scorer(directory, {"aggregation": aggregation}, source="rm:prm")(PAIRS)
    for (prompt, completion), score in zip(PAIRS, scores, strict=True):
        steps = split_steps(completion, DEFAULT_SEPARATOR)  # 3, 1 and 4 steps
        tokens = encode_steps(policy[1], prompt, steps, DEFAULT_SEPARATOR)
        q = _probabilities(directory, tokens.ids, tokens.step_ends)
        assert len(q) == len(steps)
        assert score == pytest.approx(PRM_HAND[aggregation](q), rel=1e-5, abs=1e-7)


def test_options_a_model_does_not_take_fail_naming_the_source(policy, tmp_path):
    directory, tokenizer = policy
    bt = str(save_model(build_reward_model(directory, tokenizer), tokenizer, tmp_path / "bt"))
    with pytest.raises(UserError, match=r"reward source 'rm:rm'.*Bradley-Terry reward model"):
        load_reward_model_scorers({"rm:rm": bt}, {"rm:rm": {"aggregation": "min"}})
    assert len(load_reward_model_scorers({"rm:rm": bt})["rm:rm"]([PAIRS[1]])) == 1  # no options: fine
    orm = _saved(policy, tmp_path / "o", kind="outcome")
    with pytest.raises(UserError, match=r"'rm:orm': aggregation 'weighted' is not one of an outcome"):
        load_reward_model_scorer(orm, {"aggregation": "weighted"}, source="rm:orm")


def test_last_m_alone_is_an_orms_default_aggregation(policy, tmp_path):
    source = RewardSourceSpec(model="orm", options={"last_m": 2})
    orm = _saved(policy, tmp_path, kind="outcome")
    by_default = load_reward_model_scorer(orm, source.options, source=source.name)(PAIRS)
    explicit = load_reward_model_scorer(orm, {"aggregation": "last_m", "last_m": 2})(PAIRS)
    assert by_default == explicit
    prm = _saved(policy, tmp_path / "p", kind="process")
    with pytest.raises(
        UserError, match="reward source 'rm:prm': last_m goes with aggregation last_m, not 'min'"
    ):
        load_reward_model_scorer(prm, {"last_m": 2}, source="rm:prm")


def test_the_spec_checks_a_model_sources_options():
    source = RewardSourceSpec(model="prm", options={"aggregation": "weighted"})
    assert model_source_options([source, RewardSourceSpec(function="arithmetic_exact")]) == {
        "rm:prm:weighted": {"aggregation": "weighted"}
    }
    for options, message in [
        ({"aggregate": "min"}, r"options \['aggregate'\] are not a reward model's"),
        ({"aggregation": "median"}, "options.aggregation 'median' is not one of"),
        ({"aggregation": "last_m", "last_m": 0}, "options.last_m: a whole number of tokens >= 1"),
        ({"aggregation": "mean", "last_m": 2}, "options.last_m goes with aggregation: last_m"),
    ]:
        with pytest.raises(ValidationError, match=message):
            RewardSourceSpec(model="orm", options=options)


def test_a_prm_selects_best_of_n(policy, tmp_path):
    """Best-of-N with a PRM as the only reward source: the selected completion of each prompt is the one
    the PRM scores highest (min over its steps)."""
    from rlhf_core.evaluation.evaluate import best_of_n_metrics
    from rlhf_core.rewards.scorers import verifier_function
    from rlhf_core.rollout.sampling import sample_completions
    from rlhf_core.spec.stages.evaluation import BestOfNSpec

    directory = _saved(policy, tmp_path, kind="process")
    spec = BestOfNSpec(
        n=3, rewards=[{"model": "prm", "options": {"aggregation": "min"}}], generation={"max_new_tokens": 8}
    )
    scorers = load_reward_model_scorers({"rm:prm:min": directory}, model_source_options(spec.rewards))
    model, tokenizer = load_model(policy[0])
    prompts = [{"prompt": f"What is {a} + 3?", "answer": str(a + 3)} for a in range(4)]
    metrics = best_of_n_metrics(
        model, tokenizer, prompts, spec, verifier_function("arithmetic_exact", {}), scorers, 0, "eval"
    )
    rows, _, _ = sample_completions(model, tokenizer, prompts, 3, spec.generation, 0)
    scores = scorers["rm:prm:min"]([(r["prompt"], r["completion"]) for r in rows])
    best = [max(scores[i : i + 3]) for i in range(0, len(scores), 3)]
    assert metrics["eval/best_of_n/prompts"] == 4.0
    assert metrics["eval/best_of_n/selected_reward_mean"] == pytest.approx(sum(best) / 4, rel=1e-5)


def test_one_model_under_two_aggregations_is_two_sources():
    """Scorers are found by source name: the same model with other options is named apart, so neither
    is scored with the other's options."""
    names = [
        RewardSourceSpec(model=model, options=options).name
        for model, options in [
            ("prm", {}), ("prm", {"aggregation": "mean"}), ("orm", {"last_m": 4}),
            ("orm", {"aggregation": "last_m"}), ("orm", {"aggregation": "min"}),
        ]
    ]  # fmt: skip
    assert names == ["rm:prm", "rm:prm:mean", "rm:orm:last_4", "rm:orm:last_1", "rm:orm:min"]
