"""The promotion gate on hand-made figures, and the promote stage's spec checks."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from rlhf_core.evaluation.gate import GateFigureMissing, evaluate_gate
from rlhf_core.spec.stages.promotion import GateCondition, PromoteStage

FIGURES = {
    "eval/accuracy": 0.80,
    "eval/accuracy_ci_low": 0.74,
    "eval/accuracy_ci_high": 0.86,
    "eval/win_rate/verifier": 0.61,
    "eval/win_rate/verifier_ci_low": 0.52,
    "eval/win_rate/verifier_ci_high": 0.70,
}


def _gate(*conditions: dict) -> tuple[GateCondition, ...]:
    return tuple(GateCondition(**c) for c in conditions)


def test_every_condition_holds_and_the_figures_are_shown_with_their_interval():
    gate = _gate(
        {"metric": "win_rate/verifier", "min": 0.55}, {"metric": "win_rate/verifier_ci_low", "min": 0.5}
    )
    decision = evaluate_gate(gate, FIGURES, champion=None)
    assert decision.passed
    assert "win_rate/verifier=0.61 [0.52, 0.7] >= 0.55 (ok)" in decision.figures
    assert [c.passed for c in decision.checks] == [True, True]


def test_one_failed_condition_fails_the_gate_and_is_the_reason():
    gate = _gate({"metric": "win_rate/verifier", "min": 0.55}, {"metric": "eval/accuracy", "min": 0.9})
    decision = evaluate_gate(gate, FIGURES, champion=None)
    assert not decision.passed
    assert decision.reason == "accuracy=0.8 [0.74, 0.86] >= 0.9 (FAILED)"


def test_bounds_are_inclusive_and_max_works():
    assert evaluate_gate(_gate({"metric": "accuracy", "min": 0.8, "max": 0.8}), FIGURES, None).passed
    assert not evaluate_gate(_gate({"metric": "accuracy", "max": 0.79}), FIGURES, None).passed


def test_nan_never_passes():
    figures = {"eval/accuracy": math.nan}
    assert not evaluate_gate(_gate({"metric": "accuracy", "max": 1.0}), figures, None).passed
    champion = {"eval/accuracy": 0.5}
    assert not evaluate_gate(
        _gate({"metric": "accuracy", "max_drop_vs_champion": 1.0}), figures, champion
    ).passed


def test_champion_tolerance():
    gate = _gate({"metric": "accuracy", "max_drop_vs_champion": 0.02})
    assert evaluate_gate(gate, FIGURES, {"eval/accuracy": 0.82}).passed  # 0.80 >= 0.82 - 0.02
    failed = evaluate_gate(gate, FIGURES, {"eval/accuracy": 0.83}, champion_label="champion v3")
    assert not failed.passed
    assert "champion v3 0.83 - 0.02 (FAILED)" in failed.reason


def test_no_champion_passes_but_a_champion_without_the_figure_fails():
    gate = _gate({"metric": "accuracy", "max_drop_vs_champion": 0.0})
    first = evaluate_gate(gate, FIGURES, None)
    assert first.passed and "no champion yet" in first.reason
    unmeasured = evaluate_gate(gate, FIGURES, {}, champion_label="champion v1")
    assert not unmeasured.passed
    assert "champion v1 has no recorded 'accuracy'" in unmeasured.reason


def test_a_figure_the_report_lacks_names_the_condition_and_what_there_is():
    with pytest.raises(GateFigureMissing) as err:
        evaluate_gate(
            _gate({"metric": "win_rate/rm", "min": 0.5}, {"metric": "accuracy", "min": 0}),
            FIGURES,
            None,
            stage="ship",
        )
    assert "stage 'ship', field gate[0].metric" in str(err.value)
    assert "win_rate/verifier" in str(err.value) and "'win_rate/rm'" in str(err.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"gate": [{"metric": "accuracy"}]}, "has no bound"),
        ({"gate": [{"metric": "accuracy", "min": 0.9, "max": 0.1}]}, "is above max"),
        ({"gate": [{"metric": "accuracy", "max_drop_vs_champion": -1}]}, "greater than or equal to 0"),
        ({"gate": []}, "give at least one condition"),
        ({"alias": "candidate"}, "'candidate' is the alias every new version gets"),
        ({"alias": "prod", "previous_alias": "prod"}, "must differ"),
    ],
)
def test_spec_errors(fields, message):
    stage = {
        "kind": "promote",
        "model": "sft",
        "evaluation": "eval.report",
        "gate": [{"metric": "accuracy", "min": 0}],
    }
    with pytest.raises(ValidationError, match=message):
        PromoteStage(**{**stage, **fields})


def test_the_stage_decision_reads_its_model_in_the_report_and_names_what_was_evaluated(tmp_path):
    from rlhf_core.errors import UserError
    from rlhf_core.evaluation.gate import PromotionInputs, decide_promotion
    from rlhf_core.stage_environment import StageEnvironment

    stage = PromoteStage(
        kind="promote", model="sft", evaluation="eval.report", gate=[{"metric": "accuracy", "min": 0.85}]
    )
    env = StageEnvironment.local("promote", 0, tmp_path)
    decision = decide_promotion(stage, PromotionInputs({"sft": FIGURES, "base": {}}, "eval"), env)
    assert not decision.passed and decision.summary() == {"promoted": 0.0}
    with pytest.raises(UserError, match=r"stage 'promote', field evaluation: .* stage 'eval' has no figures "
                       r"for model 'sft' \(it evaluated: base\)"):  # fmt: skip
        decide_promotion(stage, PromotionInputs({"base": FIGURES}, "eval"), env)
