"""Summary statistics over repeated measurements.

The 95 % confidence interval is the Student-t interval of the mean; ``compare`` uses CI overlap as
its noise test, so it must be the interval of the *mean*, not of single samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from llm_perf_opt.results.types import Stats

__all__ = ["Stats", "percentiles", "summarize", "t_quantile_975"]

# Two-sided 97.5 % quantiles of Student's t for small n-1 (scipy is not a dependency); beyond the
# table the normal quantile 1.96 is within 1 %.
_T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
    10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
    18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980,
}  # fmt: skip


def t_quantile_975(dof: int) -> float:
    """Student-t 0.975 quantile, conservative (rounds dof down to the nearest tabulated value)."""
    if dof < 1:
        raise ValueError("dof must be >= 1")
    if dof > 120:
        return 1.96
    best = max(k for k in _T975 if k <= dof)
    return _T975[best]


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
    if n > 1:
        half = t_quantile_975(n - 1) * std / math.sqrt(n)
        lo, hi = mean - half, mean + half
    p50, p90, p99 = (float(x) for x in np.percentile(arr, [50, 90, 99]))
    return Stats(
        n=n, mean=mean, std=std, min=float(arr.min()), max=float(arr.max()),
        p50=p50, p90=p90, p99=p99, ci95_low=lo, ci95_high=hi,
    )  # fmt: skip


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> list[float] | None:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return None
    return [float(x) for x in np.percentile(arr, list(qs))]
