"""Is a row of a sweep different from its baseline by more than seed-to-seed noise? Intervals over seeds, a
difference paired by seed, one test whose interval and verdict agree, and the seeds a real difference would need.

Pure numbers (scipy): summary.py feeds it accuracies per seed. The choices, in one place (report.md repeats them):
- intervals of a row's mean are 95 % t-intervals: with 3-10 seeds a bootstrap has too few values to resample;
- Δ is paired on the seeds both rows ran (same seed = same split, init and batch order, so the pairing removes what
  the two rows share); a lost job costs one pair, not the pairing. Welch's unpaired difference only when fewer than
  two seeds are shared;
- the default test is the t-test that goes with the interval (paired t, or Welch), Bonferroni-adjusted over the m
  rows compared, and each Δ interval is drawn at the same adjusted level 1 - α/m from the same t distribution: so
  `better`/`worse` holds exactly when the printed interval excludes 0. (Holm rejects a little more often but has no
  simultaneous intervals that match its verdicts; Bonferroni's are the t-intervals at level 1 - α/m.)
- `exact`: the sign-flip test of the paired differences (label permutations when unpaired), free of normality, but
  with a floor: n paired seeds cannot give p below 2/2^n (0.0625 for 5), whatever the effect;
- seeds needed: the seeds per row at which the same test would detect the observed Δ at the observed spread with 80 %
  power (the noncentral t; for `exact`, never fewer than its floor allows).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

LEVEL = 0.95        # intervals of a row's mean
ALPHA = 0.05        # the family-wise level of the verdicts, over the rows compared
POWER = 0.80        # what "seeds needed" aims for
MAX_SEEDS = 1000    # beyond this, "seeds needed" says so instead of a number
PERMUTATIONS = 100_000  # the exact test: exact below this many distinct permutations, Monte Carlo (seeded) above
TESTS = ("t", "exact")
INCONCLUSIVE = "inconclusive"


def mean_interval(x: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """The t-based interval of the mean of x; NaNs for fewer than two values."""
    x = np.asarray(x, dtype=float)
    if len(x) < 2:
        return math.nan, math.nan
    if np.ptp(x) == 0:  # no spread: the interval is the value (scipy would warn about the zero variance)
        return float(x[0]), float(x[0])
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(level)
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class Difference:
    """row - baseline: the estimate, its interval at `level`, the two-sided p of "no difference" (raw and adjusted
    for the rows compared), the verdict, and what they rest on."""
    delta: float
    low: float
    high: float
    level: float         # of the interval: 1 - α/m
    p: float
    p_adjusted: float    # Bonferroni: min(1, m p)
    test: str            # "paired t", "Welch t", "sign-flip", "permutation"
    paired: bool
    n: int               # paired: the pairs; unpaired: the smaller row
    spread: float        # the standard deviation the power calculation uses (of the differences, when paired)
    same_side: int | None  # paired: how many of the n differences lie on Δ's side of 0
    verdict: str         # better, worse, inconclusive; "; seeds disagree" when same_side < n

    @property
    def tested(self) -> bool:
        return not math.isnan(self.p)


def testable(row: dict[int, float], baseline: dict[int, float]) -> bool:
    """Whether a test is possible: two shared seeds to pair, or two seeds on each side to compare unpaired."""
    return len(row.keys() & baseline.keys()) >= 2 or (len(row) >= 2 and len(baseline) >= 2)


def compare(row: dict[int, float], baseline: dict[int, float], rows: int = 1, test: str = "t",
            alpha: float = ALPHA) -> Difference | None:
    """Compare per-seed values ({seed: value}) as one of `rows` comparisons: None when a side has no value; the
    difference alone (NaN interval and p, no verdict) when no test is possible."""
    if test not in TESTS:
        raise ValueError(f"test={test!r}: must be one of {', '.join(TESTS)}")
    if not row or not baseline:
        return None
    level = 1 - alpha / rows
    shared = sorted(row.keys() & baseline.keys())
    if not testable(row, baseline):
        delta = statistics.fmean(row.values()) - statistics.fmean(baseline.values())
        return Difference(delta, math.nan, math.nan, level, math.nan, math.nan, "", len(shared) == len(row),
                          len(shared) or min(len(row), len(baseline)), math.nan, None, "")
    if len(shared) >= 2:
        d = np.array([row[s] - baseline[s] for s in shared])
        delta, low, high, p = _t_test(d, None, level)
        if test == "exact":
            p = float(stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=PERMUTATIONS,
                                             vectorized=True, rng=0).pvalue)
        side = int(np.sum(d > 0) if delta > 0 else np.sum(d < 0) if delta < 0 else 0)
        return _decided(delta, low, high, level, p, rows, "sign-flip" if test == "exact" else "paired t", True,
                        len(d), float(np.std(d, ddof=1)), side, alpha)
    x, y = np.array(list(row.values())), np.array(list(baseline.values()))
    delta, low, high, p = _t_test(x, y, level)
    if test == "exact":
        p = float(stats.permutation_test((x, y), _mean_difference, permutation_type="independent",
                                         n_resamples=PERMUTATIONS, vectorized=True, rng=0).pvalue)
    spread = math.sqrt((x.var(ddof=1) + y.var(ddof=1)) / 2)  # the pooled standard deviation of one seed
    return _decided(delta, low, high, level, min(p, 1.0), rows, "permutation" if test == "exact" else "Welch t",
                    False, min(len(x), len(y)), spread, None, alpha)


def _t_test(x: np.ndarray, y: np.ndarray | None, level: float) -> tuple[float, float, float, float]:
    """Δ, its t-interval at `level` and the two-sided p, all from one scipy result: the paired t-test on the
    differences x (y None), else Welch's test of x against y. Without any spread the interval is the value."""
    delta = float(x.mean() - (0.0 if y is None else y.mean()))
    if np.ptp(x) == 0 and (y is None or np.ptp(y) == 0):
        return delta, delta, delta, float(delta == 0)
    result = stats.ttest_1samp(x, 0.0) if y is None else stats.ttest_ind(x, y, equal_var=False)
    ci = result.confidence_interval(level)
    return delta, float(ci.low), float(ci.high), float(result.pvalue)


def _decided(delta, low, high, level, p, rows, test, paired, n, spread, side, alpha) -> Difference:
    p_adjusted = min(1.0, rows * p)
    if test in ("paired t", "Welch t"):  # the verdict is the interval's: both come from one t distribution
        verdict = "better" if low > 0 else "worse" if high < 0 else INCONCLUSIVE
    else:
        verdict = (INCONCLUSIVE if p_adjusted >= alpha or delta == 0 else "better" if delta > 0 else "worse")
    if verdict != INCONCLUSIVE and side is not None and side < n:
        verdict += "; seeds disagree"
    return Difference(delta, low, high, level, p, p_adjusted, test, paired, n, spread, side, verdict)


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def smallest_p(n: int, paired: bool) -> float:
    """The smallest two-sided p the exact permutation test can give with n seeds per row."""
    return min(1.0, 2 / (2 ** n if paired else math.comb(2 * n, n)))


def power(effect: float, n: int, paired: bool, alpha: float) -> float:
    """Two-sided power of the report's test at a standardized effect |Δ| / spread, with n seeds per row (the rows'
    spreads equal when unpaired)."""
    if not paired:
        return _welch_power(abs(effect), n, alpha)
    nc = abs(effect) * math.sqrt(n)  # the paired t statistic is noncentral t, exactly
    crit = stats.t.isf(alpha / 2, n - 1)
    # both tails as upper tails: scipy's noncentral t cdf returns NaN far in its lower tail
    return float(stats.nct.sf(crit, n - 1, nc) + stats.nct.sf(crit, n - 1, -nc))


_QUANTILES = (np.arange(100) + 0.5) / 100


def _welch_power(effect: float, n: int, alpha: float) -> float:
    """Welch's test has no closed-form power: given the two sample variances (u1, u2, in units of the true one) the
    statistic is normal over a known scale and its critical value is fixed by its Satterthwaite df, so the power is
    that normal probability averaged over the variances' chi-square distributions (a 100 x 100 quantile grid)."""
    u = stats.chi2.ppf(_QUANTILES, n - 1) / (n - 1)
    u1, u2 = np.meshgrid(u, u)
    df = (u1 + u2) ** 2 * (n - 1) / (u1 ** 2 + u2 ** 2)
    scale = stats.t.isf(alpha / 2, df) * np.sqrt((u1 + u2) / 2)  # reject when |N(nc, 1)| passes it
    nc = effect * math.sqrt(n / 2)
    return float(np.mean(stats.norm.sf(scale - nc) + stats.norm.sf(scale + nc)))


def seeds_needed(diff: Difference, alpha: float, target: float = POWER, exact: bool = False) -> float:
    """Seeds per row with which the observed Δ, at the observed spread, would be detected with `target` power at
    level alpha (the adjusted level of one row); inf when Δ is zero or the count passes MAX_SEEDS."""
    if diff.delta == 0:
        return math.inf

    def enough(n: int) -> bool:  # grows with n: the search below may bisect
        if exact and smallest_p(n, diff.paired) >= alpha:
            return False
        return diff.spread == 0 or power(diff.delta / diff.spread, n, diff.paired, alpha) >= target

    high = 2
    while not enough(high):
        if high >= MAX_SEEDS:
            return math.inf
        high = min(2 * high, MAX_SEEDS)
    low = high // 2  # not enough (or below 2)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return max(high, 2)
