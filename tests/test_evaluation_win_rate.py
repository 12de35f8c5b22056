"""Win rates against the baseline, counted from hand-made verdicts of each kind of judge."""

from __future__ import annotations

import re

import pytest

from rlhf_core.errors import UserError
from rlhf_core.evaluation.win_rate import (
    policy_verdicts,
    reward_verdicts,
    verifier_verdicts,
    win_rate_metrics,
)


def test_reward_judge_higher_score_wins_and_close_scores_tie_within_the_margin():
    candidate = [1.0, 0.2, 0.5, 0.50, 0.9]
    baseline = [0.0, 0.8, 0.5, 0.55, 0.85]
    assert reward_verdicts(candidate, baseline) == ["win", "loss", "tie", "loss", "win"]
    # |0.5 - 0.55| and |0.9 - 0.85| are within a 0.05 margin (up to float rounding: 0.0500...04 > 0.05)
    assert reward_verdicts(candidate, baseline, tie_margin=0.051) == ["win", "loss", "tie", "tie", "tie"]


def test_verifier_correct_beats_incorrect_and_equal_verdicts_tie():
    assert verifier_verdicts([True, False, True, False], [False, True, True, False]) == [
        "win", "loss", "tie", "tie",
    ]  # fmt: skip


def test_win_rate_counts_ties_as_half_and_reports_the_tie_rate():
    """2 wins, 1 loss, 1 tie: win rate (2 + 1/2) / 4 = 0.625, tie rate 1/4; n = 4 comparisons."""
    metrics = win_rate_metrics("rm:rm", ["win", "win", "loss", "tie"], seed=0)
    assert metrics["eval/win_rate/rm:rm"] == pytest.approx(0.625)
    assert metrics["eval/tie_rate/rm:rm"] == pytest.approx(0.25)
    assert metrics["eval/win_rate/rm:rm_n"] == 4 and metrics["eval/tie_rate/rm:rm_n"] == 4
    low, high = metrics["eval/win_rate/rm:rm_ci_low"], metrics["eval/win_rate/rm:rm_ci_high"]
    assert 0 <= low <= 0.625 <= high <= 1
    assert "eval/judge_unparseable/rm:rm" not in metrics
    # a model against itself: every comparison a tie, the win rate exactly 0.5 with a zero-width interval
    parity = win_rate_metrics("verifier", ["tie"] * 10, seed=0)
    assert parity["eval/win_rate/verifier"] == 0.5 == parity["eval/win_rate/verifier_ci_low"]
    assert parity["eval/win_rate/verifier_ci_high"] == 0.5 and parity["eval/tie_rate/verifier"] == 1.0


def test_win_rate_interval_resamples_prompts():
    """The interval is the bootstrap over prompts of the per-prompt scores 1 / 0.5 / 0: with 60 wins and
    40 losses it matches a binomial mean's width, about 2 x 1.96 x sqrt(0.24 / 100) = 0.19."""
    metrics = win_rate_metrics("verifier", ["win"] * 60 + ["loss"] * 40, seed=3)
    width = metrics["eval/win_rate/verifier_ci_high"] - metrics["eval/win_rate/verifier_ci_low"]
    assert width == pytest.approx(0.192, rel=0.2)
    assert metrics == win_rate_metrics("verifier", ["win"] * 60 + ["loss"] * 40, seed=3)  # seeded


def _rubric_judge(asked: list[str]):
    """A judge that prefers the response containing 'good', and writes [[C]] when neither or both do;
    it records the judge prompts it was given."""

    def generate(prompts: list[str]) -> list[str]:
        asked.extend(prompts)
        outputs = []
        for prompt in prompts:
            a = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]", prompt, re.S).group(1)
            b = re.search(r"\[Response B\]\n(.*?)\n\nExplain", prompt, re.S).group(1)
            if ("good" in a) == ("good" in b):
                outputs.append("Both alike. [[C]]")
            else:
                outputs.append("A is right. [[A]]" if "good" in a else "B is right. [[B]]")
        return outputs

    return generate


def test_policy_judge_is_asked_in_both_orders_and_must_agree_with_itself():
    asked: list[str] = []
    prompts = ["q1", "q2", "q3", "q4"]
    candidate = ["good answer", "bad answer", "same text", "meh"]
    baseline = ["bad answer", "good answer", "same text", "also meh"]
    verdicts = policy_verdicts(_rubric_judge(asked), ["Be correct."], prompts, candidate, baseline)
    assert verdicts == ["win", "loss", "tie", "tie"]  # q3: identical answers tie without asking
    assert len(asked) == 6  # 3 pairs x 2 orders
    assert "[Response A]\ngood answer" in asked[0] and "[Response A]\nbad answer" in asked[1]
    assert all("- Be correct." in p for p in asked)


def test_a_position_biased_judge_gives_ties_and_unparseable_verdicts_are_counted_or_fail():
    always_first = policy_verdicts(
        lambda ps: ["[[A]]"] * len(ps), ["p"], ["q1", "q2"], ["x", "y"], ["u", "v"]
    )
    assert always_first == ["tie", "tie"]  # [[A]] in both orders names each answer once: disagreement

    verdicts = policy_verdicts(
        lambda ps: ["no verdict here", "[[B]]", "[[A]]", "[[B]]"], ["p"], ["q1", "q2"], ["x", "y"], ["u", "v"]
    )
    assert isinstance(verdicts[0], UserError) and verdicts[1] == "win"
    metrics = win_rate_metrics("policy:judge", verdicts, seed=0)
    assert metrics["eval/judge_unparseable/policy:judge"] == 1
    assert metrics["eval/win_rate/policy:judge"] == 1.0 and metrics["eval/win_rate/policy:judge_n"] == 1
    with pytest.raises(UserError, match=r"stage 'ev', win_rate judge 'policy:judge': 1 verdict\(s\).*'q1'"):
        win_rate_metrics(
            "policy:judge", verdicts, seed=0, on_unparseable="fail", stage="ev", prompts=["q1", "q2"]
        )
    nothing = win_rate_metrics("policy:judge", verdicts[:1], seed=0)
    assert nothing == {
        "eval/judge_unparseable/policy:judge": 1.0,
        "eval/win_rate/policy:judge_n": 0.0,
        "eval/tie_rate/policy:judge_n": 0.0,
    }
