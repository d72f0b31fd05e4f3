"""The statistics of the sweep report (report/stats.py, report/summary.py) against scipy, against simulation, and on
cases a reader can check by hand."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from cifarlab.report import stats, summary as report
from cifarlab.report.results import Job, Row


def make_row(name: str, accs: dict[int, float]) -> Row:
    """A row of a sweep as sweep_results reads it, from {seed: percent}."""
    key = (("model/pool", name),)
    return Row(key, [Job(Path(f"{name}_s{s}"), key, s, {"test_acc": v / 100}) for s, v in accs.items()])


def test_identical_rows_give_p_1_and_are_inconclusive():
    row = {0: 71.2, 1: 70.8, 2: 71.5, 3: 70.9, 4: 71.1}
    d = stats.compare(row, dict(row))
    assert d.paired and d.n == 5 and d.test == "paired t"
    assert (d.delta, d.low, d.high, d.p) == (0.0, 0.0, 0.0, 1.0)
    assert d.verdict == "inconclusive"
    assert stats.seeds_needed(d, stats.ALPHA) == math.inf  # no difference to detect


PRINTED = re.compile(r"^(?P<delta>[+-][\d.]+) \[(?P<low>[+-][\d.]+), (?P<high>[+-][\d.]+)\]")


def random_table(rng: np.random.Generator) -> tuple[dict[int, float], list[dict[int, float]]]:
    """A baseline and 1-30 rows of 2-12 seeds: all seeds shared, partly shared, or none; effects from none to large,
    spreads from none to large; now and then a value repeated (ties) or a row with no spread at all."""
    n = int(rng.integers(2, 13))
    base_seeds = list(range(n))
    base = {s: 70 + rng.normal(0, 0.4) for s in base_seeds}
    rows = []
    for _ in range(int(rng.integers(1, 31))):
        shape = rng.choice(["paired", "partly", "unpaired"])
        if shape == "paired":
            seeds = base_seeds
        elif shape == "partly":  # lost jobs on either side: some seeds shared
            seeds = sorted(rng.choice(range(n + 3), size=int(rng.integers(2, n + 3)), replace=False).tolist())
        else:
            seeds = list(range(100, 100 + int(rng.integers(2, 13))))
        effect = rng.choice([0.0, rng.normal(0, 0.3), rng.normal(0, 3)])
        spread = rng.choice([0.0, 0.05, 0.3, 2.0])
        rows.append({s: base.get(s, 70 + rng.normal(0, 0.4)) + effect + rng.normal(0, spread) for s in seeds})
    return base, rows


@pytest.mark.slow  # hundreds of random tables
def test_verdicts_agree_with_the_printed_intervals_and_p_values_with_scipy_on_random_tables():
    rng = np.random.default_rng(0)
    kinds, verdicts = set(), set()
    for _ in range(120):
        base, rows = random_table(rng)
        baseline = make_row("max", base)
        grid = [make_row(f"r{i}", r) for i, r in enumerate(rows)]
        summary = report.summarize([baseline, *grid], baseline)
        header, body = report.table(summary)
        m = sum(stats.testable(r, base) for r in rows)
        assert header[2] == f"Δ vs baseline [{100 * (1 - 0.05 / m):.3g} % CI, {m} row{'s' if m > 1 else ''}]"
        for accs, s, printed in zip(rows, summary[1:], body[1:]):
            shared = sorted(accs.keys() & base.keys())
            if len(shared) >= 2:
                x, y = [accs[k] for k in shared], [base[k] for k in shared]
                kind, result = "paired t", scipy_stats.ttest_rel(x, y)
                assert s["pairs"] == len(shared)
            else:
                x, y = list(accs.values()), list(base.values())
                kind, result = "Welch t", scipy_stats.ttest_ind(x, y, equal_var=False)
            assert s["test"] == kind
            kinds.add(kind)
            delta = np.mean(x) - np.mean(y)
            assert s["delta"] == pytest.approx(delta, abs=1e-9)
            if np.ptp(np.subtract(x, y) if kind == "paired t" else x + y) > 1e-9:  # scipy needs a spread
                ci = result.confidence_interval(1 - 0.05 / m)
                assert s["p"] == pytest.approx(result.pvalue, rel=1e-9, abs=1e-300)
                assert (s["delta_ci_low"], s["delta_ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
                assert s["p_adjusted"] == pytest.approx(min(1, m * result.pvalue), rel=1e-9, abs=1e-300)
            low, high = (float(PRINTED.match(printed[2]).group(g)) for g in ("low", "high"))
            decided = s["verdict"] != "inconclusive"
            assert decided == (low > 0 or high < 0), (printed, s["verdict"])
            assert decided == (s["p_adjusted"] < 0.05)
            if decided:
                assert s["verdict"].startswith("better" if low > 0 else "worse")
                agree = s["same_side"] == s["pairs"] or s["same_side"] is None
                assert s["verdict"].endswith("seeds disagree") != agree
            verdicts.add(s["verdict"])
    assert kinds == {"paired t", "Welch t"}
    assert {"better", "worse", "inconclusive", "worse; seeds disagree", "better; seeds disagree"} <= verdicts


def test_an_interval_bound_near_zero_is_printed_with_its_sign():
    assert report.bound(0.0004, signed=True) == "+0.0004" and report.bound(-0.000012, True) == "-0.00001"
    assert report.bound(-0.0, True) == "+0.00" and report.bound(3.14159) == "3.14"


@pytest.mark.parametrize("n", [3, 5, 6, 7])
def test_the_exact_test_gives_a_constant_shift_its_floor_and_the_t_test_decides_it(n):
    base = {s: 70.0 + 0.37 * s for s in range(n)}
    row = {s: v + 0.5 for s, v in base.items()}
    exact = stats.compare(row, base, test="exact")
    # all n differences positive: of the 2^n sign patterns only this one and its mirror are as extreme
    assert exact.p == pytest.approx(2 / 2 ** n) == stats.smallest_p(n, paired=True)
    assert exact.verdict == ("better" if 2 / 2 ** n < stats.ALPHA else "inconclusive")  # 5 seeds cannot reach 5 %
    t = stats.compare(row, base)
    assert t.verdict == "better" and t.same_side == n and (t.low, t.high) == pytest.approx((0.5, 0.5))
    worse = stats.compare(base, row, test="exact")
    assert worse.delta == pytest.approx(-0.5) and worse.verdict == exact.verdict.replace("better", "worse")


def test_rows_with_other_seeds_are_compared_by_welch_and_by_an_exact_permutation_test():
    x, y = {0: 1.0, 1: 2.0, 2: 3.1}, {3: 4.0, 4: 5.2, 5: 6.0}
    d = stats.compare(x, y)
    welch = scipy_stats.ttest_ind([1, 2, 3.1], [4, 5.2, 6], equal_var=False)
    assert not d.paired and d.test == "Welch t" and d.same_side is None and d.delta == pytest.approx(-3.0333, abs=1e-4)
    assert (d.low, d.high) == pytest.approx(tuple(welch.confidence_interval(0.95)))
    assert d.p == pytest.approx(welch.pvalue)
    exact = stats.compare(x, y, test="exact")
    # every value of one row below every value of the other: 2 of the C(6, 3) = 20 splits are as extreme
    assert exact.test == "permutation" and exact.p == pytest.approx(2 / math.comb(6, 3))
    one_seed = stats.compare({0: 1.0}, {0: 2.0, 1: 3.0})  # the difference, and nothing to test it with
    assert one_seed.delta == pytest.approx(-1.5) and math.isnan(one_seed.p) and one_seed.verdict == ""
    assert stats.compare({}, {0: 2.0}) is None
    with pytest.raises(ValueError, match="test='z': must be one of t, exact"):
        stats.compare(x, y, test="z")


def test_a_lost_baseline_seed_keeps_the_row_paired():
    """The shipped example's shape (blurmax against max, 5 seeds): seed 3 of the baseline failed. Pairing on the 4
    seeds both rows have keeps the paired verdict; an unpaired test would compare across seeds instead."""
    base = {0: 73.1, 1: 72.7, 2: 73.5, 4: 72.9}
    row = {0: 77.6, 1: 77.2, 2: 77.8, 3: 77.3, 4: 77.4}
    d = stats.compare(row, base, rows=3)
    assert d.paired and d.n == 4 and d.test == "paired t" and d.verdict == "better" and d.same_side == 4
    shared = [0, 1, 2, 4]
    assert d.p == pytest.approx(scipy_stats.ttest_rel([row[s] for s in shared], [base[s] for s in shared]).pvalue)


def test_the_interval_of_a_mean_is_the_t_interval():
    low, high = stats.mean_interval([1, 2, 3, 4, 5])
    half = 2.7764 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4 df) x sd / sqrt(n)
    assert (low, high) == pytest.approx((3 - half, 3 + half), abs=1e-3)
    assert all(math.isnan(x) for x in stats.mean_interval([3.0]))


def simulated_power(effect: float, n: int, paired: bool, alpha: float, rng, reps: int = 20_000) -> float:
    """The share of simulated experiments (normal seeds, spread 1) in which the report's test rejects."""
    if paired:
        d = rng.normal(effect, 1.0, size=(reps, n))
        p = scipy_stats.ttest_1samp(d, 0.0, axis=1).pvalue
    else:
        x, y = rng.normal(effect, 1.0, size=(reps, n)), rng.normal(0.0, 1.0, size=(reps, n))
        p = scipy_stats.ttest_ind(x, y, axis=1, equal_var=False).pvalue
    return float(np.mean(p < alpha))


@pytest.mark.slow  # a simulation per effect size
@pytest.mark.parametrize("paired", [True, False])
def test_seeds_needed_matches_simulation_from_small_to_huge_effects_and_any_row_count(paired):
    rng = np.random.default_rng(1)
    tolerance = 0.015  # 20,000 experiments: the standard error of a power near 0.8 is 0.003
    for effect in (0.3, 0.7, 1.5, 3.0, 6.0, 10.0):
        for rows in (1, 3, 12, 30):
            alpha = stats.ALPHA / rows
            powers = [stats.power(effect, n, paired, alpha) for n in range(2, 60)]
            assert all(0 <= p <= 1 for p in powers), (effect, rows)  # NaN-free: NaN fails both comparisons
            d = stats.Difference(effect, 0, 0, 1 - alpha, 0.5, 1, "", paired, 3, 1.0, None, "inconclusive")
            n = stats.seeds_needed(d, alpha)
            assert stats.power(effect, n, paired, alpha) >= stats.POWER
            assert simulated_power(effect, n, paired, alpha, rng) >= stats.POWER - tolerance, (effect, rows, n)
            if n > 2:
                assert simulated_power(effect, n - 1, paired, alpha, rng) < stats.POWER + tolerance, (effect, rows, n)
            assert stats.power(effect, n, paired, alpha) == pytest.approx(
                simulated_power(effect, n, paired, alpha, rng), abs=tolerance)


def test_seeds_needed_for_the_exact_test_is_never_below_its_floor():
    no_spread = stats.Difference(1.0, 1, 1, 0.95, 0.25, 0.25, "sign-flip", True, 3, 0.0, 3, "inconclusive")
    assert stats.seeds_needed(no_spread, 0.05, exact=True) == 6      # 2 / 2^6 = 0.031 is the first below 0.05
    assert stats.seeds_needed(no_spread, 0.05 / 3, exact=True) == 7  # three rows: 2 / 2^7 = 0.016 < 0.0167
    assert stats.seeds_needed(no_spread, 0.05) == 2  # the t-test: no spread at all is told apart with two seeds
    hopeless = stats.Difference(0.001, 0, 0, 0.95, 0.9, 0.9, "paired t", True, 3, 10.0, 2, "inconclusive")
    assert stats.seeds_needed(hopeless, 0.05) == math.inf


def test_many_seeds_are_tested_exactly_in_a_second_with_sampled_sign_patterns():
    base = {s: 60 + 0.3 * ((s * 7) % 5) for s in range(24)}
    d = stats.compare({s: v + 0.1 for s, v in base.items()}, base, test="exact")
    assert d.paired and 0 < d.p <= 2 / (stats.PERMUTATIONS + 1)  # sampled: never 0, at its floor here
