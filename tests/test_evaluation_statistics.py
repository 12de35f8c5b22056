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
