"""Bootstrap confidence intervals and unbiased pass@k against hand-derived values."""

from __future__ import annotations

import math
import random

import pytest

from rlhf_core.evaluation.statistics import bootstrap_interval, pass_at_k


def test_pass_at_k_matches_the_reference_values_and_the_combinatorial_form():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 0.9167
    for n, c, k in [(20, 0, 3), (20, 20, 3), (16, 5, 4), (8, 7, 2), (200, 17, 50)]:
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(5, 6, 1)


def test_bootstrap_interval_is_seeded_covers_the_mean_and_narrows_with_more_samples():
    rng = random.Random(0)
    few = [float(rng.random() < 0.4) for _ in range(50)]
    many = [float(rng.random() < 0.4) for _ in range(2000)]
    a = bootstrap_interval(few, seed=1)
    assert a == bootstrap_interval(few, seed=1)  # the same values and seed give the same interval
    assert a.low <= a.value <= a.high and a.samples == 50 and a.resamples == 1000
    assert a.value == pytest.approx(sum(few) / 50)
    wide, narrow = (
        a.high - a.low,
        bootstrap_interval(many, seed=1).high - bootstrap_interval(many, seed=1).low,
    )
    # a binomial mean's 95% interval is about 2 x 1.96 x sqrt(p(1-p)/n): ~0.27 at n = 50, ~0.043 at 2000
    assert wide == pytest.approx(2 * 1.96 * math.sqrt(0.24 / 50), rel=0.25)
    assert narrow == pytest.approx(2 * 1.96 * math.sqrt(0.24 / 2000), rel=0.25)
    median = bootstrap_interval([1.0, 2.0, 3.0, 100.0], seed=0, statistic=lambda x: x.median(dim=-1).values)
    assert median.value == 2.0  # torch's lower median
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_interval([], seed=0)


def test_bootstrap_interval_covers_the_true_mean_at_about_the_nominal_rate():
    """200 simulated datasets of 100 Bernoulli(0.3) draws: the 95% interval should contain 0.3 in about
    95% of them (the percentile bootstrap runs a little under nominal at this size)."""
    rng = random.Random(12)
    covered = 0
    for trial in range(200):
        values = [float(rng.random() < 0.3) for _ in range(100)]
        interval = bootstrap_interval(values, seed=trial, resamples=500)
        covered += interval.low <= 0.3 <= interval.high
    assert 0.90 <= covered / 200 <= 0.99


def test_interval_entries_and_a_ratio_statistic_resample_pairs_together():
    from rlhf_core.evaluation.statistics import figure_with_interval, interval_metrics, ratio_statistic

    entries = interval_metrics("eval/x", [1.0, 2.0, 3.0], seed=0)
    assert set(entries) == {"eval/x_ci_low", "eval/x_ci_high", "eval/x_n"} and entries["eval/x_n"] == 3
    assert figure_with_interval("eval/x", [1.0, 2.0, 3.0], seed=0) == {"eval/x": 2.0, **entries}
    # NLL sums 2, 9, 1 over 1, 3, 1 tokens: the ratio of sums (12 / 5), not the mean of ratios (5 / 3)
    nll = figure_with_interval("eval/nll", range(3), 0, ratio_statistic([2.0, 9.0, 1.0], [1, 3, 1]))
    assert nll["eval/nll"] == pytest.approx(12 / 5)
    assert 1.0 <= nll["eval/nll_ci_low"] <= 12 / 5 <= nll["eval/nll_ci_high"] <= 3.0  # per-example ratios
