"""Best-of-N curves (book ch.9, ch.14): the unbiased expected pick against brute force over every
subset, the stage's options, the plot, and the figures of a real evaluation."""

from __future__ import annotations

import statistics
from itertools import combinations

import pytest

from rlhf_core.evaluation.best_of_n_curve import (
    best_of_n_curve,
    curve_metrics,
    expected_best_of,
    selection_weights,
)
from rlhf_core.spec import EvaluateStage
from rlhf_core.spec.stages.evaluation import BestOfNSpec

# one prompt's samples in completion-index order; proxy ties at 0.7 (samples 1 and 3) and 0.2 (0, 4)
PROXY = [0.2, 0.7, -1.0, 0.7, 0.2, 1.5]
GOLD = [1.0, 0.0, 3.0, 2.0, 5.0, -1.0]


def _brute_force(proxy: list[float], gold: list[float], size: int) -> tuple[float, float]:
    """Mean over all C(n, N) subsets of the pick's (proxy, gold): the top proxy, the lowest index on a tie."""
    picks = [max(subset, key=lambda j: (proxy[j], -j)) for subset in combinations(range(len(proxy)), size)]
    return statistics.fmean(proxy[j] for j in picks), statistics.fmean(gold[j] for j in picks)


@pytest.mark.parametrize("size", range(1, len(PROXY) + 1))
def test_the_unbiased_estimate_equals_enumerating_every_subset(size):
    expected = _brute_force(PROXY, GOLD, size)
    assert expected_best_of(PROXY, GOLD, size) == pytest.approx(expected, abs=1e-12)


def test_the_ends_of_the_curve_are_the_mean_and_the_best_of_all():
    assert expected_best_of(PROXY, GOLD, 1) == pytest.approx(
        (statistics.fmean(PROXY), statistics.fmean(GOLD))
    )
    assert expected_best_of(PROXY, GOLD, len(PROXY)) == (1.5, -1.0)  # the top sample, whose gold is worst
    assert sum(selection_weights(6, 3)) == pytest.approx(1.0)
    assert selection_weights(4, 2) == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6])  # C(i-1, 1) / C(4, 2)


def test_the_curve_averages_prompts_and_skips_those_with_too_few_samples():
    rows = [{"prompt_index": 0, "completion_index": j, "reward": r} for j, r in enumerate(PROXY)]
    rows += [{"prompt_index": 1, "completion_index": j, "reward": r} for j, r in enumerate([0.0, 1.0])]
    gold = [*GOLD, 10.0, 20.0]
    curve = best_of_n_curve(rows[::-1], gold[::-1], (1, 2, 6))  # any row order
    first_2, second_2 = expected_best_of(PROXY, GOLD, 2), (1.0, 20.0)  # N = 2 of 2 samples: the best
    assert curve[2] == pytest.approx(((first_2[0] + second_2[0]) / 2, (first_2[1] + second_2[1]) / 2))
    assert curve[6] == (1.5, -1.0)  # only the first prompt has 6 samples
    assert curve_metrics({2: (0.5, 0.25)}) == {
        "eval/best_of_n/proxy_at_2": 0.5,
        "eval/best_of_n/gold_at_2": 0.25,
    }


def test_curve_sizes_and_the_stage_options():
    rewards = [{"function": "answer_format"}]
    assert BestOfNSpec(n=8, rewards=rewards).curve_sizes() == (1, 2, 4, 8)
    assert BestOfNSpec(n=6, rewards=rewards).curve_sizes() == (1, 2, 4, 6)
    assert BestOfNSpec(n=2, rewards=rewards).curve_sizes() == (1, 2)
    with pytest.raises(ValueError, match="best_of_n.gold is the curve's gold reward: set curve: true"):
        BestOfNSpec(n=4, rewards=rewards, gold=[{"function": "arithmetic_exact"}])
    stage = EvaluateStage(
        kind="evaluate",
        models=["m"],
        prompts="data.prompts",
        best_of_n={"n": 4, "rewards": rewards, "curve": True},
    )
    assert {"best_of_n/proxy_at_4", "best_of_n/gold_at_1"} <= set(stage.measured_figures("m"))


def test_the_curve_plot_is_written(tmp_path):
    from rlhf_core.evaluation.plots import curve_points, write_plots

    report = {
        "base": {"eval/accuracy": 0.5} | curve_metrics({1: (0.1, 0.2), 2: (0.3, 0.3), 4: (0.6, 0.25)}),
        "sft": curve_metrics({1: (0.2, 0.4), 2: (0.5, 0.5), 4: (0.9, 0.45)}),
    }
    assert curve_points(report["sft"]) == {1: (0.2, 0.4), 2: (0.5, 0.5), 4: (0.9, 0.45)}
    written = write_plots(report, tmp_path)
    assert tmp_path / "best_of_n_curve.png" in written
    assert (tmp_path / "best_of_n_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.usefixtures("one_torch_thread")
def test_a_real_evaluation_reports_the_curve(tmp_path):
    """With the verifier as gold, gold at N = 1 is the mean correctness of all samples (pass_at_1); a
    proxy that is the verifier itself picks a correct sample whenever there is one (gold at n = pass@n)."""
    from rlhf_core.data.synthetic import synthetic_records
    from rlhf_core.evaluation.evaluate import evaluate_model
    from rlhf_core.modeling.models import build_tiny_model, save_model
    from rlhf_core.spec import TinyModelSource

    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    model_dir = str(save_model(model, tokenizer, tmp_path / "policy"))
    prompts = synthetic_records("arithmetic", "prompts", n=4, seed=1, max_operand=9)
    best_of_n = {"n": 4, "curve": True, "generation": {"max_new_tokens": 6}}
    stage = EvaluateStage(
        kind="evaluate", models=["base"], prompts="data.prompts", generation={"max_new_tokens": 2}, kl=None,
        best_of_n=best_of_n | {"rewards": [{"function": "arithmetic_exact"}]},
    )  # fmt: skip
    metrics = evaluate_model(model_dir, None, [], prompts, stage, {}, seed=0, stage_name="eval").metrics
    assert metrics["eval/best_of_n/gold_at_1"] == pytest.approx(metrics["eval/best_of_n/pass_at_1"])
    assert metrics["eval/best_of_n/gold_at_4"] == pytest.approx(metrics["eval/best_of_n/pass_at_n"])
    assert metrics["eval/best_of_n/proxy_at_4"] == pytest.approx(
        metrics["eval/best_of_n/selected_reward_mean"]
    )

    gold_stage = stage.model_copy(
        update={"best_of_n": BestOfNSpec(**best_of_n, rewards=[{"function": "length_penalty"}],
                                         gold=[{"function": "answer_format"}])}
    )  # fmt: skip
    gold_run = evaluate_model(model_dir, None, [], prompts, gold_stage, {}, seed=0, stage_name="eval").metrics
    assert {f"eval/best_of_n/gold_at_{n}" for n in (1, 2, 4)} <= set(gold_run)
    assert 0 <= gold_run["eval/best_of_n/gold_at_2"] <= 1  # answer_format gives 0 or 1
