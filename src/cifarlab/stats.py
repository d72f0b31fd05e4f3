"""Is a row of a sweep different from its baseline by more than seed-to-seed noise? Intervals over seeds, a
difference paired by seed, an exact permutation test, Holm's correction, and the seeds a real difference would need.

Pure numbers (scipy): report.py feeds it accuracies per seed. The choices, in one place (report.md repeats them):
- intervals are t-based: with 3-10 seeds a bootstrap has too few values to resample;
- Δ is paired by seed where both rows ran the same seeds (same seed = same split, init and batch order, so the
  pairing removes what the two rows share), Welch's unpaired difference otherwise;
- p is exact where it can be: a sign-flip test of the paired differences (2^n sign patterns), a label permutation
  test of the unpaired ones, both free of any normality assumption; past PERMUTATIONS patterns (17 paired seeds, 10
  a row unpaired) they are sampled, seeded, and their floor is far below any level that matters;
- seeds needed: a t-test's power (noncentral t) at the observed Δ and spread, and never fewer seeds than the
  permutation test needs to reach the level at all (2 / 2^n for n paired seeds).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

LEVEL = 0.95        # intervals
ALPHA = 0.05        # the corrected significance level of the verdicts
POWER = 0.80        # what "seeds needed" aims for
MAX_SEEDS = 1000    # beyond this, "seeds needed" says so instead of a number
PERMUTATIONS = 100_000  # exact below this many distinct permutations, Monte Carlo (seeded) above


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
    """row - baseline: the estimate, its interval, the two-sided p of "no difference", and what it rests on."""
    delta: float
    low: float
    high: float
    p: float
    paired: bool
    n: int           # seeds per row (paired: the shared seeds; unpaired: the smaller row)
    spread: float    # the standard deviation that the power calculation uses (of the differences, when paired)


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def _mean(d: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(d, axis=axis)


def compare(row: dict[int, float], baseline: dict[int, float]) -> Difference | None:
    """Compare per-seed values ({seed: value}): None when a side has no value; the difference alone (NaN interval
    and p) when a side has one."""
    if not row or not baseline:
        return None
    if len(row) < 2 or len(baseline) < 2:
        delta = statistics.fmean(row.values()) - statistics.fmean(baseline.values())
        return Difference(delta, math.nan, math.nan, math.nan, row.keys() == baseline.keys(),
                          min(len(row), len(baseline)), math.nan)
    if row.keys() == baseline.keys():
        seeds = sorted(row)
        d = np.array([row[s] - baseline[s] for s in seeds])
        low, high = mean_interval(d)
        p = stats.permutation_test((d,), _mean, permutation_type="samples", n_resamples=PERMUTATIONS,
                                   vectorized=True, rng=0).pvalue
        return Difference(float(d.mean()), low, high, float(p), True, len(d), float(np.std(d, ddof=1)))
    x, y = np.array(list(row.values())), np.array(list(baseline.values()))
    delta = float(x.mean() - y.mean())
    if np.ptp(x) == 0 and np.ptp(y) == 0:
        low = high = delta
    else:
        ci = stats.ttest_ind(x, y, equal_var=False).confidence_interval(LEVEL)
        low, high = float(ci.low), float(ci.high)
    p = stats.permutation_test((x, y), _mean_difference, permutation_type="independent",
                               n_resamples=PERMUTATIONS, vectorized=True, rng=0).pvalue
    spread = math.sqrt((x.var(ddof=1) + y.var(ddof=1)) / 2)  # the pooled standard deviation of one seed
    return Difference(delta, low, high, float(min(p, 1.0)), False, min(len(x), len(y)), spread)


def holm(p: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p values (scipy has none; statsmodels would bring pandas for five lines)."""
    p = np.asarray(p, dtype=float)
    m = len(p)
    order = np.argsort(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


def verdict(diff: Difference, p_holm: float, alpha: float = ALPHA) -> str:
    if p_holm < alpha:
        return "better" if diff.delta > 0 else "worse"
    return "not distinguishable"


def smallest_p(n: int, paired: bool) -> float:
    """The smallest two-sided p the exact permutation test can give with n seeds per row."""
    return min(1.0, 2 / (2 ** n if paired else math.comb(2 * n, n)))


def power(effect: float, n: int, paired: bool, alpha: float) -> float:
    """Two-sided t-test power at a standardized effect |Δ| / spread, with n seeds per row."""
    df = n - 1 if paired else 2 * n - 2
    nc = effect * math.sqrt(n if paired else n / 2)
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_needed(diff: Difference, alpha: float, target: float = POWER) -> float:
    """Seeds per row with which the observed Δ, at the observed spread, would be detected with `target` power at
    level alpha; inf when Δ is zero or the count passes MAX_SEEDS."""
    if diff.delta == 0:
        return math.inf
    for n in range(2, MAX_SEEDS + 1):
        if smallest_p(n, diff.paired) > alpha:
            continue
        if diff.spread == 0 or power(abs(diff.delta) / diff.spread, n, diff.paired, alpha) >= target:
            return n
    return math.inf
