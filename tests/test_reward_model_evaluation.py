"""Reward-model evaluation breakdowns (book ch.5): margin buckets, category accuracy, calibration and
verifier agreement, by hand on fixed margins; then on a real reward model's held-out pairs."""

from __future__ import annotations

import json
import math

import pytest

from rlhf_core.errors import UserError
from rlhf_core.evaluation.reward_model_breakdown import (
    accuracy_by_group,
    breakdown_metrics,
    bucket_names,
    bucket_of,
    expected_calibration_error,
    reliability_bins,
    verifier_agreement,
)
from rlhf_core.spec.stages.reward_model import RewardEvalSpec, RewardModelStage


def test_buckets_include_their_lower_edge_and_use_the_magnitude():
    edges = (0.5, 1.0, 2.0)
    assert bucket_names(edges) == ["0-0.5", "0.5-1", "1-2", "2-inf"]
    cases = {0.0: "0-0.5", 0.49: "0-0.5", 0.5: "0.5-1", -0.7: "0.5-1", 1.0: "1-2", -1.99: "1-2", 2.0: "2-inf"}
    for value, bucket in cases.items():
        assert bucket_of(value, edges) == bucket, value


def test_accuracy_by_category_counts_each_category():
    # d > 0 is right: chat 2 of 3, math 0 of 1 (d = 0 is not right), "code/x?" made metric-safe
    differences = [1.0, -0.5, 2.0, 0.0, 0.3]
    groups = ["chat", "chat", "chat", "math", "code/x?"]
    assert accuracy_by_group(differences, groups, "eval/") == {
        "eval/accuracy/chat": pytest.approx(2 / 3),
        "eval/pairs/chat": 3.0,
        "eval/accuracy/math": 0.0,
        "eval/pairs/math": 1.0,
        "eval/accuracy/code/x_": 1.0,
        "eval/pairs/code/x_": 1.0,
    }


def test_expected_calibration_error_on_a_hand_example():
    """Margins d with sigma(|d|) = 0.5, 0.75, 0.75, 0.95 (d = 0, ln 3, -ln 3, ln 19); five bins of 0.1.

    bin [0.5, 0.6): {0.5, wrong}          -> |0 - 0.5|    = 0.5,  weight 1/4
    bin [0.7, 0.8): {0.75 right, 0.75 wrong} -> |0.5 - 0.75| = 0.25, weight 2/4
    bin [0.9, 1.0]: {0.95 right}          -> |1 - 0.95|   = 0.05, weight 1/4
    ECE = (0.5 + 2 * 0.25 + 0.05) / 4 = 0.2625
    """
    differences = [0.0, math.log(3), -math.log(3), math.log(19)]
    bins = reliability_bins(differences, 5)
    assert [b.pairs for b in bins] == [1, 0, 2, 0, 1]
    assert bins[2].confidence == pytest.approx(0.75) and bins[2].accuracy == 0.5
    assert bins[4].confidence == pytest.approx(0.95) and bins[4].accuracy == 1.0
    assert math.isnan(bins[1].accuracy)
    assert expected_calibration_error(bins) == pytest.approx(0.2625)


def test_a_calibrated_model_has_small_ece_and_an_overconfident_one_large():
    """Pairs whose labels follow sigma(d) exactly (in each bin the right share equals the confidence)."""
    d = math.log(4)  # confidence 0.8: 8 of 10 such pairs right gives ECE 0
    calibrated = [d] * 8 + [-d] * 2
    assert expected_calibration_error(reliability_bins(calibrated, 10)) == pytest.approx(0.0, abs=1e-12)
    overconfident = [10.0] * 5 + [-10.0] * 5  # confidence ~1, half right
    assert expected_calibration_error(reliability_bins(overconfident, 10)) == pytest.approx(0.5, abs=1e-4)


def test_verifier_agreement_excludes_and_counts_verifier_ties():
    differences = [1.0, -1.0, 2.0, 0.0, 0.5]
    # pair 0: verifier prefers chosen, model too (agree); pair 1: verifier prefers rejected, model too
    # (agree); pair 2: verifier prefers rejected, model chosen (disagree); pair 3: model tie (disagree);
    # pair 4: verifier tie (excluded)
    verdicts = [(1.0, 0.0), (0.0, 1.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)]
    assert verifier_agreement(differences, verdicts) == {
        "eval/verifier_pairs": 4.0,
        "eval/verifier_ties": 1.0,
        "eval/verifier_agreement": 0.5,
    }


ROWS = [
    {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "The answer is 6.", "answer": "5",
     "topic": "add", "likert": 3},
    {"prompt": "What is 4 + 4?", "chosen": "The answer is 8.", "rejected": "The answer is 9.", "answer": "8",
     "topic": "add", "likert": 1},
    {"prompt": "What is 3 * 3?", "chosen": "The answer is 9.", "rejected": "The answer is 9!", "answer": "9",
     "topic": "mul", "likert": 2},
]  # fmt: skip


def test_breakdown_metrics_from_a_stage_spec():
    spec = RewardEvalSpec(
        category_column="topic",
        label_margin_column="likert",
        verifier="arithmetic_exact",
        margin_edges=(1.0,),
    )
    metrics = breakdown_metrics([1.5, -0.2, 0.4], ROWS, spec)
    assert metrics["eval/accuracy/add"] == 0.5 and metrics["eval/pairs/add"] == 2.0
    assert metrics["eval/accuracy/mul"] == 1.0
    assert metrics["eval/by_margin/accuracy/0-1"] == 0.5 and metrics["eval/by_margin/pairs/0-1"] == 2.0
    assert metrics["eval/by_margin/accuracy/1-inf"] == 1.0
    # label edges (1, 2, 3): likert 3 -> 3-inf, 1 -> 1-2, 2 -> 2-3
    assert metrics["eval/by_label_margin/accuracy/3-inf"] == 1.0
    assert metrics["eval/by_label_margin/accuracy/1-2"] == 0.0
    # the third pair's both answers are 9: a verifier tie; the model agrees on the first, not the second
    assert metrics["eval/verifier_ties"] == 1.0 and metrics["eval/verifier_agreement"] == 0.5


def test_a_missing_category_names_the_row_and_the_option():
    rows = [ROWS[0], {k: v for k, v in ROWS[1].items() if k != "topic"}]
    with pytest.raises(UserError, match=r"evaluation.category_column is 'topic', but row 7 \(0-based\)"):
        breakdown_metrics([1.0, 1.0], rows, RewardEvalSpec(category_column="topic"), row_ids=[3, 7])


def test_the_stage_spec_fills_the_label_margin_from_train_and_checks_edges():
    stage = RewardModelStage(kind="reward_model", model="sft", data="d.preferences",
                             train={"margin_column": "m"})  # fmt: skip
    assert stage.evaluation.label_margin_column == "m"
    with pytest.raises(ValueError, match="strictly increasing"):
        RewardEvalSpec(margin_edges=(1.0, 0.5))
    with pytest.raises(ValueError, match="verifier"):
        RewardEvalSpec(verifier="no_such_verifier")


def test_reliability_plot_and_breakdown_file_are_written(tmp_path):
    from rlhf_core.evaluation.reward_model_figures import write_reward_model_figures

    bins = reliability_bins([0.0, 1.0, -1.0, 3.0], 5)
    files = write_reward_model_figures({"eval/accuracy": 0.5}, bins, tmp_path, title="rm")
    assert [f.name for f in files] == ["reliability.png", "heldout_breakdown.json"]
    assert files[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(files[1].read_text())
    assert [b["pairs"] for b in saved["reliability"]] == [b.pairs for b in bins]
    assert saved["reliability"][1]["accuracy"] is None  # an empty bin


@pytest.mark.usefixtures("one_torch_thread")
def test_heldout_evaluation_breaks_down_a_real_reward_models_margins(tmp_path):
    """Through the reward model: the breakdowns equal those of the margins its scores give."""
    import torch

    from rlhf_core.evaluation.reward_model import heldout_evaluation
    from rlhf_core.modeling.models import build_tiny_model, save_model
    from rlhf_core.modeling.reward_model import build_reward_model
    from rlhf_core.rewards.reward_model_scoring import score_pairs
    from rlhf_core.spec import RewardTrainSpec, TinyModelSource

    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    directory = save_model(model, tokenizer, tmp_path / "policy")
    reward_model = build_reward_model(str(directory))
    torch.nn.init.normal_(reward_model.score.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    spec = RewardEvalSpec(category_column="topic", verifier="arithmetic_exact", calibration_bins=4)
    result = heldout_evaluation(reward_model, tokenizer, ROWS, RewardTrainSpec(), evaluation=spec)

    sequences = [(r["prompt"], r[k]) for r in ROWS for k in ("chosen", "rejected")]
    scores = score_pairs(reward_model, tokenizer, sequences)
    differences = [scores[2 * i] - scores[2 * i + 1] for i in range(len(ROWS))]
    expected = breakdown_metrics(differences, ROWS, spec)
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, abs=1e-5), name
    assert sum(b.pairs for b in result.reliability) == 3
    ece = expected_calibration_error(reliability_bins(differences, 4))
    assert result.metrics["eval/calibration_ece"] == pytest.approx(ece, abs=1e-5)
