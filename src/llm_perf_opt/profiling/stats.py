"""Summary statistics over repeated measurements, built for small, skewed latency samples.

Latency samples are right-skewed with rare large outliers (a preempted step, a page that hit a cold cache),
and there are usually fewer than a dozen of them.  So the robust centre is the **median**, with a
distribution-free 95 % interval from order statistics (``scipy.stats.quantile_test``): exact coverage for
any continuous distribution, and its bounds are two of the samples, so it never leaves the data's range.
The Student-t interval of the **mean** is kept only where it means something (enough samples, no
outlier, and narrower than the data); otherwise it is None and ``mean_ci_reason`` says why.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as _sps

from llm_perf_opt.results.types import Stats

__all__ = ["Stats", "count_outliers", "median_ci95", "percentiles", "summarize", "t_quantile_975"]

# A sample above this multiple of the median is an outlier (issue 14: "e.g. > 3x median").
OUTLIER_X_MEDIAN = 3.0


def t_quantile_975(dof: int) -> float:
    """Two-sided 95 % Student-t quantile for ``dof`` degrees of freedom."""
    if dof < 1:
        raise ValueError("dof must be >= 1")
    return float(_sps.t.ppf(0.975, dof))


def count_outliers(arr: np.ndarray) -> int:
    """Samples above ``OUTLIER_X_MEDIAN`` × the median (0 when the median is not positive)."""
    med = float(np.median(arr))
    return int((arr > OUTLIER_X_MEDIAN * med).sum()) if med > 0 else 0


@functools.lru_cache(maxsize=256)
def _median_ci_ranks(n: int) -> tuple[int, int] | None:
    """0-based ranks of the order statistics that bound the 95 % median interval for n samples.

    The ranks depend on n only (binomial), so scipy is asked once per n, on the ranks themselves."""
    ci = _sps.quantile_test(np.arange(n, dtype=np.float64), q=0.0, p=0.5).confidence_interval(0.95)
    if not (math.isfinite(ci.low) and math.isfinite(ci.high)):
        return None
    return int(ci.low), int(ci.high)


def median_ci95(arr: np.ndarray) -> tuple[float, float] | None:
    """Distribution-free 95 % interval of the median (two order statistics); None when n is too small."""
    if arr.size < 2:
        return None
    ranks = _median_ci_ranks(int(arr.size))
    if ranks is None:
        return None
    srt = np.sort(arr)
    return float(srt[ranks[0]]), float(srt[ranks[1]])


def summarize(values: Sequence[float]) -> Stats | None:
    """Stats of the finite values; None when there are none (the caller records why)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return None
    n = int(arr.size)
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if n > 1 else 0.0
    lo: float | None = None
    hi: float | None = None
    vmin, vmax = float(arr.min()), float(arr.max())
    outliers = count_outliers(arr)
    reason: str | None = None
    if n < 2:
        reason = "one sample: no spread to estimate"
    else:
        half = t_quantile_975(n - 1) * std / math.sqrt(n)
        lo, hi = mean - half, mean + half
        if outliers:
            reason = f"{outliers} outlier(s) above {OUTLIER_X_MEDIAN:g}× the median pull the mean; use the median"
        elif lo < vmin or hi > vmax:
            reason = f"n={n} too small or too skewed: the interval of the mean is wider than the data"
        if reason is not None:
            lo = hi = None
    med_ci = median_ci95(arr)
    p50, p90, p99 = (float(x) for x in np.percentile(arr, [50, 90, 99]))
    return Stats(
        n=n, mean=mean, std=std, min=vmin, max=vmax, p50=p50, p90=p90, p99=p99, ci95_low=lo, ci95_high=hi,
        median_ci95_low=med_ci[0] if med_ci else None, median_ci95_high=med_ci[1] if med_ci else None,
        n_outliers=outliers, mean_ci_reason=reason,
    )  # fmt: skip


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> list[float] | None:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return None
    return [float(x) for x in np.percentile(arr, list(qs))]
