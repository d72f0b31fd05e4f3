"""The statistics of the sweep report on cases a reader can check by hand (stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from cifarlab import stats


def test_identical_rows_give_p_1_and_are_not_distinguishable():
    row = {0: 71.2, 1: 70.8, 2: 71.5, 3: 70.9, 4: 71.1}
    d = stats.compare(row, dict(row))
    assert d.paired and d.n == 5
    assert (d.delta, d.low, d.high, d.p) == (0.0, 0.0, 0.0, 1.0)
    assert stats.verdict(d, stats.holm([d.p])[0]) == "not distinguishable"
    assert stats.seeds_needed(d, stats.ALPHA) == math.inf  # no difference to detect


@pytest.mark.parametrize("n", [3, 5, 6, 7])
def test_a_constant_shift_across_seeds_gets_the_smallest_p_the_sign_flip_test_can_give(n):
    base = {s: 70.0 + 0.37 * s for s in range(n)}
    row = {s: v + 0.5 for s, v in base.items()}
    d = stats.compare(row, base)
    # all n differences positive: of the 2^n sign patterns only this one and its mirror are as extreme
    assert d.p == pytest.approx(2 / 2 ** n) == stats.smallest_p(n, paired=True)
    assert d.delta == pytest.approx(0.5) and d.low == pytest.approx(0.5) and d.high == pytest.approx(0.5)
    expected = "better" if 2 / 2 ** n < stats.ALPHA else "not distinguishable"  # 5 seeds cannot reach 5 %
    assert stats.verdict(d, d.p) == expected
    worse = stats.compare(base, row)
    assert worse.delta == pytest.approx(-0.5) and stats.verdict(worse, worse.p) == expected.replace("better", "worse")


def test_rows_with_other_seeds_are_compared_unpaired_by_an_exact_permutation_test():
    d = stats.compare({0: 1.0, 1: 2.0, 2: 3.0}, {3: 4.0, 4: 5.0, 5: 6.0})
    assert not d.paired and d.delta == pytest.approx(-3.0)
    # every value of one row below every value of the other: 2 of the C(6, 3) = 20 splits are as extreme
    assert d.p == pytest.approx(2 / math.comb(6, 3))
    assert d.low < d.delta < d.high
    welch = scipy_stats.ttest_ind([1, 2, 3], [4, 5, 6], equal_var=False).confidence_interval()
    assert (d.low, d.high) == pytest.approx((welch.low, welch.high))
    one_seed = stats.compare({0: 1.0}, {0: 2.0, 1: 3.0})  # the difference, and nothing to test it with
    assert one_seed.delta == pytest.approx(-1.5) and math.isnan(one_seed.p) and math.isnan(one_seed.low)
    assert stats.compare({}, {0: 2.0}) is None


def test_holm_on_a_known_vector():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; running maximum 0.02, 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0]  # 0.5 x 2 capped at 1; 0.9 x 1 kept from falling below it
    assert stats.holm([0.2]) == [0.2]  # one comparison: nothing to correct


def test_the_interval_of_a_mean_is_the_t_interval():
    low, high = stats.mean_interval([1, 2, 3, 4, 5])
    half = 2.7764 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4 df) x sd / sqrt(n)
    assert (low, high) == pytest.approx((3 - half, 3 + half), abs=1e-3)
    assert all(math.isnan(x) for x in stats.mean_interval([3.0]))


def test_seeds_needed_reaches_80_percent_power_in_a_simulation():
    """The noncentral-t power the report uses, checked against simulated paired experiments."""
    rng = np.random.default_rng(0)
    d = stats.Difference(delta=0.3, low=0, high=0, p=0.5, paired=True, n=3, spread=0.4)
    n = stats.seeds_needed(d, stats.ALPHA)
    assert 8 <= n <= 30

    def simulated_power(n: int) -> float:
        x = rng.normal(d.delta, d.spread, size=(20_000, n))
        t = x.mean(1) / (x.std(1, ddof=1) / math.sqrt(n))
        return float(np.mean(np.abs(t) > scipy_stats.t.ppf(1 - stats.ALPHA / 2, n - 1)))

    assert simulated_power(n) >= stats.POWER - 0.015
    assert simulated_power(n - 1) < stats.POWER + 0.015
    assert stats.power(d.delta / d.spread, n, True, stats.ALPHA) == pytest.approx(simulated_power(n), abs=0.015)


def test_seeds_needed_is_never_below_what_the_exact_test_needs():
    no_spread = stats.Difference(delta=1.0, low=1, high=1, p=0.25, paired=True, n=3, spread=0.0)
    assert stats.seeds_needed(no_spread, 0.05) == 6      # 2 / 2^6 = 0.031 is the first below 0.05
    assert stats.seeds_needed(no_spread, 0.05 / 3) == 7  # three comparisons: 2 / 2^7 = 0.016 < 0.0167
    hopeless = stats.Difference(delta=0.001, low=0, high=0, p=0.9, paired=True, n=3, spread=10.0)
    assert stats.seeds_needed(hopeless, 0.05) == math.inf
