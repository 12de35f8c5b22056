"""The label_preferences stage's work in rlhf_core: reward-source judges and a policy judge, models loaded."""

from __future__ import annotations

import pytest
import torch

from rlhf_core.errors import UserError
from rlhf_core.judging.labeling import LabelingInputs, label_preferences
from rlhf_core.modeling.models import build_tiny_model, save_model
from rlhf_core.spec import LabelPreferencesStage, TinyModelSource
from rlhf_core.stage_environment import StageEnvironment

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [
    {"prompt": "What is 2 + 3?", "answer": 5, "completion": c}
    for c in ("The answer is 5.", "The answer is 6.", "five", "The answer is 5.")
] + [
    {"prompt": "What is 1 + 1?", "answer": 2, "completion": c}
    for c in ("The answer is 2.", "The answer is 3.")
]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    return str(save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model"))


def _stage(**fields) -> LabelPreferencesStage:
    return LabelPreferencesStage(kind="label_preferences", completions="sample", **fields)


def _env(tmp_path) -> StageEnvironment:
    return StageEnvironment.local("prefs", 0, tmp_path)


def test_a_verifier_judge_pairs_correct_over_wrong_and_counts_what_it_drops(tmp_path):
    stage = _stage(judge=[{"function": "arithmetic_exact"}], pairing="all_pairs")
    labeling = label_preferences(stage, LabelingInputs(ROWS), _env(tmp_path))
    report = labeling.report
    assert labeling.problems == []
    assert labeling.summary() == {"pairs": 3.0, "invalid_scores": 0.0, "dropped_tie": 1.0}
    assert sorted(p["prompt"] for rows in labeling.splits.values() for p in rows) == sorted(
        p["prompt"] for p in report.pairs
    )
    assert sorted((p["chosen"], p["rejected"]) for p in report.pairs) == [
        ("The answer is 2.", "The answer is 3."),
        ("The answer is 5.", "The answer is 6."),
        ("The answer is 5.", "five"),
    ]
    assert dict(report.dropped) == {"tie": 1}  # the two wrong answers of the first prompt


def test_a_reward_model_judge_is_loaded_from_its_directory(policy_dir, tmp_path):
    from transformers import AutoTokenizer

    from rlhf_core.modeling.reward_model import build_reward_model
    from rlhf_core.rewards.reward_model_scoring import load_reward_model_scorer

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    reward_model = build_reward_model(policy_dir, tokenizer)
    torch.nn.init.normal_(reward_model.score.weight, generator=torch.Generator().manual_seed(0))
    rm_dir = str(save_model(reward_model, tokenizer, tmp_path / "rm"))
    stage = _stage(judge=[{"model": "rm"}], pairing="best_vs_worst")
    report = label_preferences(stage, LabelingInputs(ROWS, {"rm:rm": rm_dir}), _env(tmp_path)).report
    score = dict(
        zip(
            [r["completion"] for r in ROWS],
            load_reward_model_scorer(rm_dir)([(r["prompt"], r["completion"]) for r in ROWS]),
            strict=True,
        )
    )
    assert len(report.pairs) == 2
    for pair in report.pairs:
        assert pair["margin"] == pytest.approx(score[pair["chosen"]] - score[pair["rejected"]])
        assert pair["margin"] > 0


def test_a_policy_judge_that_never_answers_leaves_no_pair_and_says_so(policy_dir, tmp_path):
    judge = {"model": "base", "principles": ["Prefer the correct answer."], "max_new_tokens": 3}
    with pytest.raises(UserError, match=r"stage 'prefs': no preference pair left.*judge_unparseable"):
        label_preferences(
            _stage(judge_policy=judge), LabelingInputs(ROWS, {"policy": policy_dir}), _env(tmp_path)
        )
