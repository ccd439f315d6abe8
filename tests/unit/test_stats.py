"""profiling/stats.py: Student-t CI of the mean, percentiles, non-finite filtering."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest

from llm_perf_opt.profiling.stats import Stats, percentiles, summarize, t_quantile_975


def test_summarize_known_values() -> None:
    st = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert st is not None
    assert st.n == 5
    assert st.mean == pytest.approx(3.0)
    assert st.std == pytest.approx(statistics.stdev([1, 2, 3, 4, 5]))  # sample std (ddof=1)
    assert (st.min, st.max) == (1.0, 5.0)
    assert st.p50 == pytest.approx(3.0)
    assert st.p90 == pytest.approx(4.6)
    assert st.p99 == pytest.approx(4.96)
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert st.ci95_low == pytest.approx(3.0 - half)
    assert st.ci95_high == pytest.approx(3.0 + half)
    assert st.ci95_half_width == pytest.approx(half)


def test_ci_is_interval_of_the_mean_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    small = summarize(rng.normal(10.0, 1.0, size=5).tolist())
    large = summarize(rng.normal(10.0, 1.0, size=500).tolist())
    assert small is not None and large is not None
    assert small.ci95_half_width is not None and large.ci95_half_width is not None
    # Interval of the mean (∝ std/√n), far narrower than the ±1.96·std spread of single samples.
    assert large.ci95_half_width == pytest.approx(1.96 * large.std / math.sqrt(500))
    assert large.ci95_half_width < small.ci95_half_width
    assert large.ci95_low < large.mean < large.ci95_high


def test_single_value_has_no_ci() -> None:
    st = summarize([7.5])
    assert st is not None
    assert st.n == 1 and st.mean == 7.5 and st.std == 0.0
    assert st.ci95_low is None and st.ci95_high is None
    assert st.ci95_half_width is None
    assert st.p50 == st.p99 == 7.5


def test_non_finite_and_none_are_dropped() -> None:
    st = summarize([float("nan"), 2.0, float("inf"), None, 4.0, float("-inf")])  # type: ignore[list-item]
    assert st is not None
    assert st.n == 2
    assert st.mean == pytest.approx(3.0)
    assert st.min == 2.0 and st.max == 4.0


@pytest.mark.parametrize("values", [[], [float("nan")], [None, float("inf")]])
def test_nothing_finite_gives_none(values: list) -> None:
    assert summarize(values) is None


def test_identical_values_give_zero_width_ci() -> None:
    st = summarize([3.0] * 4)
    assert st is not None
    assert st.std == 0.0
    assert st.ci95_low == st.ci95_high == 3.0
    assert st.ci95_half_width == 0.0


@pytest.mark.parametrize(
    ("dof", "expected"),
    [(1, 12.706), (2, 4.303), (4, 2.776), (20, 2.086), (21, 2.086), (24, 2.086), (25, 2.060), (29, 2.060),
     (59, 2.021), (60, 2.000), (119, 2.000), (120, 1.980), (121, 1.96), (10_000, 1.96)],
)  # fmt: skip
def test_t_quantile_table_and_rounding_down(dof: int, expected: float) -> None:
    assert t_quantile_975(dof) == expected


def test_t_quantile_is_monotone_non_increasing() -> None:
    qs = [t_quantile_975(d) for d in range(1, 200)]
    assert all(a >= b for a, b in itertools.pairwise(qs))
    assert qs[-1] == 1.96


@pytest.mark.parametrize("dof", [0, -1])
def test_t_quantile_rejects_bad_dof(dof: int) -> None:
    with pytest.raises(ValueError, match="dof"):
        t_quantile_975(dof)


def test_percentiles_default_and_custom() -> None:
    """Hand-computed order statistics (linear interpolation between ranks: rank h = q/100 · (n − 1))."""
    vals = list(range(1, 101))
    # h = 49.5 → 50 + 0.5·(51 − 50); h = 89.1 → 90 + 0.1; h = 98.01 → 99 + 0.01
    assert percentiles(vals) == pytest.approx([50.5, 90.1, 99.01])
    # unsorted input, unequal gaps: sorted 10, 20, 30, 40; h = 1.5 → 25, h = 2.7 → 37, h = 2.97 → 39.7
    assert percentiles([30.0, 10.0, 40.0, 20.0]) == pytest.approx([25.0, 37.0, 39.7])
    assert percentiles(vals, qs=(0, 100)) == [1.0, 100.0]
    assert percentiles([]) is None


def test_stats_is_frozen() -> None:
    st = summarize([1.0, 2.0])
    assert isinstance(st, Stats)
    with pytest.raises(AttributeError):
        st.mean = 0.0  # type: ignore[misc]
