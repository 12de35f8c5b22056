"""Golden values for the reward-model loss and rejection-sampling selection (book ch.5 and ch.9)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.losses.reward_model import bradley_terry_loss, pairwise_accuracy
from rlhf_core.selection.rejection_sampling import top_k_overall, top_k_overall_flat, top_per_prompt

# The book's worked example (ch.9): M = 5 prompts, N = 4 completions.
R = [
    [0.7, 0.3, 0.5, 0.2],
    [0.4, 0.8, 0.6, 0.5],
    [0.9, 0.3, 0.4, 0.7],
    [0.2, 0.5, 0.8, 0.6],
    [0.5, 0.4, 0.3, 0.6],
]


def test_bt_loss_is_ln2_when_scores_are_equal():
    r = torch.randn(7)
    assert bradley_terry_loss(r, r.clone()).item() == pytest.approx(math.log(2), abs=1e-7)


def test_bt_loss_golden_value_and_margin():
    # -log sigmoid(1) = log(1 + e^-1) = 0.31326...; with margin 1 the logit is 0 -> ln 2
    chosen, rejected = torch.tensor([2.0]), torch.tensor([1.0])
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    assert bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0])).item() == pytest.approx(
        math.log(2)
    )


def test_k_completions_weight_each_prompt_equally():
    # prompt 0 has 3 pairs with logit 0 (loss ln2 each); prompt 1 has 1 pair with logit 1.
    chosen = torch.tensor([0.0, 0.0, 0.0, 2.0])
    rejected = torch.tensor([0.0, 0.0, 0.0, 1.0])
    prompts = torch.tensor([0, 0, 0, 1])
    expected = (math.log(2) + math.log1p(math.exp(-1))) / 2  # mean of the per-prompt means
    assert bradley_terry_loss(chosen, rejected, prompt_ids=prompts).item() == pytest.approx(
        expected, abs=1e-6
    )
    unweighted = (3 * math.log(2) + math.log1p(math.exp(-1))) / 4
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(unweighted, abs=1e-6)


def test_pairwise_accuracy_counts_ties_as_wrong():
    assert pairwise_accuracy(
        torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])
    ).item() == pytest.approx(1 / 3)


def test_top_per_prompt_matches_the_book():
    assert [j + 1 for j in top_per_prompt(R)] == [1, 2, 1, 3, 4]  # the book is 1-indexed


def test_top_k_overall_matches_the_book_order():
    assert top_k_overall_flat(R, 5) == [8, 5, 14, 0, 11]
    assert top_k_overall(R, 5) == [(2, 0), (1, 1), (3, 2), (0, 0), (2, 3)]
    # the book's argsort(R_flat)[-K:] selects the same set
    flat = [r for row in R for r in row]
    assert set(sorted(range(len(flat)), key=flat.__getitem__)[-5:]) == {8, 5, 14, 0, 11}


def test_top_k_overall_rejects_bad_k_and_ragged_rows():
    with pytest.raises(ValueError, match="1..20"):
        top_k_overall(R, 21)
    with pytest.raises(ValueError, match="same number"):
        top_k_overall([[1.0, 2.0], [1.0]], 1)


def _rows(matrix):
    return [
        {"prompt_index": i, "completion_index": j, "prompt": f"p{i}", "completion": f"c{i}{j}", "reward": r}
        for i, row in enumerate(matrix)
        for j, r in enumerate(row)
    ]


def test_select_completions_reproduces_the_worked_example():
    from rlhf_core.selection.rejection_sampling import select_completions, to_sft_records

    per_prompt = select_completions(_rows(R), "top_per_prompt")
    assert [r["completion"] for r in per_prompt] == ["c00", "c11", "c20", "c32", "c43"]
    overall = select_completions(_rows(R), "top_k_overall", k=5)
    assert [r["completion"] for r in overall] == ["c20", "c11", "c32", "c00", "c23"]
    assert [r["completion"] for r in select_completions(_rows(R), "top_k_overall", k=5, min_reward=0.75)] == [
        "c20",
        "c11",
        "c32",
    ]
    sft = to_sft_records(per_prompt[:1])
    assert sft == [
        {
            "messages": [{"role": "user", "content": "p0"}, {"role": "assistant", "content": "c00"}],
            "reward": 0.7,
        }
    ]


def test_rejection_sampling_stage_selects_sft_rows_and_fails_when_nothing_is_kept(tmp_path):
    from rlhf_core.errors import UserError
    from rlhf_core.selection.rejection_sampling import SelectionInputs, select_sft_records
    from rlhf_core.spec import RejectionSamplingStage
    from rlhf_core.stage_environment import StageEnvironment

    stage = RejectionSamplingStage(kind="rejection_sampling", completions="sample", min_reward=0.75)
    env = StageEnvironment.local("rs", 0, tmp_path)
    selection = select_sft_records(stage, SelectionInputs(_rows(R)), env)
    records, summary = selection.records, selection.summary()
    # top per prompt is c00, c11, c20, c32, c43 (0.7, 0.8, 0.9, 0.8, 0.6); three reach 0.75
    assert [r["messages"][1]["content"] for r in records] == ["c11", "c20", "c32"]
    assert summary == {
        "selected": 3.0,
        "candidates": 20.0,
        "selected_reward_mean": pytest.approx((0.8 + 0.9 + 0.8) / 3),
        "all_reward_mean": pytest.approx(sum(map(sum, R)) / 20),
    }
    with pytest.raises(UserError, match=r"stage 'rs': the selection kept no completion \(min_reward 0.95\)"):
        select_sft_records(stage.model_copy(update={"min_reward": 0.95}), SelectionInputs(_rows(R)), env)


def test_best_of_n_on_the_worked_example():
    """R of the book's example; say completions c01, c11, c21, c22, c32 and c33 are correct."""
    from rlhf_core.selection.best_of_n import best_of_n

    correct = {"c01", "c11", "c21", "c22", "c32", "c33"}
    report = best_of_n(_rows(R), lambda row: row["completion"] in correct)
    # the top-reward picks are c00, c11, c20, c32, c43: two of them (c11, c32) are correct
    assert [r["completion"] for r in report.selected] == ["c00", "c11", "c20", "c32", "c43"]
    assert report.best_of_n == pytest.approx(2 / 5)
    assert report.pass_at_1 == pytest.approx((1 / 4 + 1 / 4 + 2 / 4 + 2 / 4 + 0) / 5)  # 0.3
    assert report.pass_at_n == pytest.approx(4 / 5)  # every prompt but the last has a correct answer
    assert report.selected_reward_mean == pytest.approx((0.7 + 0.8 + 0.9 + 0.8 + 0.6) / 5)
    assert report.metrics()["eval/best_of_n/accuracy"] == report.best_of_n
    # a verifier used as the reward makes best-of-N reach pass@N exactly
    verified = [{**row, "reward": float(row["completion"] in correct)} for row in _rows(R)]
    assert best_of_n(verified, lambda row: row["completion"] in correct).best_of_n == pytest.approx(4 / 5)


def test_scoring_nan_fails_with_the_row_or_skips_and_reports():
    from rlhf_core.rewards import REWARD_FUNCTIONS, RewardValueError, score_completions
    from rlhf_core.spec import RewardSourceSpec

    rows = [
        {"prompt": "What is 1 + 1?", "answer": "2", "completion": c} for c in ("The answer is 2.", "3", "x")
    ]
    sources = (RewardSourceSpec(function="arithmetic_exact"), RewardSourceSpec(model="rm", weight=0.5))
    scorer = {"rm:rm": lambda pairs: [1.0, float("nan"), -1.0]}
    with pytest.raises(RewardValueError, match=r"stage 's': reward source 'rm:rm' returned nan for row 1"):
        score_completions(rows, sources, scorer, on_invalid="fail", stage="s")
    kept, problems = score_completions(rows, sources, scorer, on_invalid="skip", stage="s")
    assert [r["reward"] for r in kept] == [1.0 + 0.5, 0.0 - 0.5]
    assert len(problems) == 1 and "row 1" in problems[0]
    assert set(REWARD_FUNCTIONS) >= {"arithmetic_exact", "answer_format", "length_penalty"}


def test_one_registry_of_reward_functions_marks_the_verifiers():
    from rlhf_core.errors import UserError
    from rlhf_core.rewards import REGISTRY, REWARD_FUNCTIONS, VERIFIERS, verifier_function

    assert set(REWARD_FUNCTIONS) <= set(REGISTRY)
    assert "arithmetic_exact" in VERIFIERS and "answer_format" not in VERIFIERS
    # the evaluate stage's `verifier: arithmetic` is the registered arithmetic_exact reward
    record = {"prompt": "What is 2 + 3?", "answer": "5"}
    for completion, expected in (("The answer is 5.", 1.0), ("The answer is 6.", 0.0)):
        assert verifier_function("arithmetic")(completion, record) == expected
        assert verifier_function("arithmetic_exact")(completion, record) == expected
        assert REWARD_FUNCTIONS["arithmetic_exact"](completion, record) == expected
    with pytest.raises(UserError, match="'answer_format' is a reward function but not a verifier"):
        verifier_function("answer_format")
    with pytest.raises(UserError, match="unknown verifier 'exact' .built-in: .*arithmetic_exact"):
        verifier_function("exact")


def test_unknown_reward_function_fails_validation(tiny_spec_dict):
    from rlhf_core.spec import SpecError, parse_spec

    tiny_spec_dict["stages"]["sample"] = {
        "kind": "sample",
        "policy": "sft",
        "prompts": "data.prompts",
        "rewards": [{"function": "exact_math"}, {"model": "sft"}],
    }
    with pytest.raises(SpecError) as info:
        parse_spec(tiny_spec_dict)
    text = str(info.value)
    assert "stage 'sample', field rewards.0" in text and "unknown reward function 'exact_math'" in text


def _judged(prompt, scored):
    return [{"prompt": prompt, "completion": text, "judge_score": s} for text, s in scored]


def test_label_pairs_best_vs_worst_and_all_pairs():
    from rlhf_core.judging.preferences import label_pairs

    rows = _judged("p", [("a", 0.9), ("b", 0.1), ("c", 0.5)]) + _judged("q", [("x", 1.0), ("y", 0.0)])
    best = label_pairs(rows, pairing="best_vs_worst", min_margin=0.0, on_tie="skip", stage="s")
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in best.pairs] == [
        ("p", "a", "b"),
        ("q", "x", "y"),
    ]
    assert best.pairs[0]["margin"] == pytest.approx(0.8)
    every = label_pairs(rows, pairing="all_pairs", min_margin=0.0, on_tie="skip", stage="s")
    # K = 3 distinct completions give C(3, 2) = 3 pairs, K = 2 gives 1
    assert sorted((p["chosen"], p["rejected"]) for p in every.pairs) == [
        ("a", "b"),
        ("a", "c"),
        ("c", "b"),
        ("x", "y"),
    ]


def test_label_pairs_ties_low_margins_and_duplicates():
    from rlhf_core.judging.preferences import TiedPreferenceError, label_pairs

    rows = (
        _judged("tie", [("a", 1.0), ("b", 1.0)])
        + _judged("close", [("c", 0.55), ("d", 0.5)])
        + _judged("dup", [("e", 1.0), ("e", 0.0)])
    )
    report = label_pairs(rows, pairing="best_vs_worst", min_margin=0.1, on_tie="skip", stage="s")
    assert report.pairs == []
    assert dict(report.dropped) == {"tie": 1, "low_margin": 1, "single_completion": 1}
    with pytest.raises(TiedPreferenceError, match="stage 's'.*'tie'.*on_tie: skip"):
        label_pairs(rows, pairing="best_vs_worst", min_margin=0.0, on_tie="fail", stage="s")


def test_policy_judge_needs_both_orders_to_agree_and_reports_parse_failures():
    from rlhf_core.judging import JudgeParseError, judge_pairs, judge_prompt

    def judge(prompts):  # prefers whichever response contains "42", wherever it is shown
        outputs = []
        for p in prompts:
            a = p.split("[Response A]\n")[1].split("\n\n")[0]
            b = p.split("[Response B]\n")[1].split("\n\n")[0]
            if "garbled" in a + b:
                outputs.append("I cannot decide")
            else:
                outputs.append("[[A]]" if "42" in a else "[[B]]" if "42" in b else "Always A. [[A]]")
        return outputs

    pairs = [("q", "42", "41"), ("q", "40", "42"), ("q", "1", "2"), ("q", "garbled", "x")]
    verdicts = judge_pairs(judge, ["Be correct."], pairs)
    assert verdicts[:3] == ["first", "second", "tie"]  # the always-A judge is caught by the swap
    assert isinstance(verdicts[3], JudgeParseError)
    assert "- Be correct." in judge_prompt(["Be correct."], "q", "a", "b")
