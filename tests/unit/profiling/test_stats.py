"""profiling/stats.py: median with an order-statistic interval (coverage on skewed samples), Student-t CI of
the mean where meaningful, outliers, percentiles, non-finite filtering."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest

from llm_perf_opt.profiling.stats import Stats, median_ci95, percentiles, summarize, t_quantile_975


def test_summarize_known_values() -> None:
    st = summarize([2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert st is not None
    assert st.n == 9
    assert st.mean == pytest.approx(6.0)
    assert st.std == pytest.approx(statistics.stdev(range(2, 11)))  # sample std (ddof=1)
    assert (st.min, st.max) == (2.0, 10.0)
    assert st.p50 == pytest.approx(6.0)
    half = 2.306 * st.std / 3  # t(0.975, 8) from the printed table
    assert st.ci95_low == pytest.approx(6.0 - half, rel=1e-3)
    assert st.ci95_high == pytest.approx(6.0 + half, rel=1e-3)
    assert st.ci95_half_width == pytest.approx(half, rel=1e-3)
    # n=9: P(Bin(9, 1/2) <= 1) = 10/512 per tail, so the 2nd and 8th order statistics bound the median.
    assert (st.median_ci95_low, st.median_ci95_high) == (3.0, 9.0)
    assert st.n_outliers == 0 and st.mean_ci_reason is None


def test_small_sample_mean_ci_is_dropped_with_a_reason() -> None:
    # n=3: the t interval (2 ± 4.303/√3 = 2 ± 2.48) is wider than the data (1..3): not shown, with the reason.
    st = summarize([1.0, 2.0, 3.0])
    assert st is not None
    assert st.ci95_low is None and st.ci95_high is None and st.ci95_half_width is None
    assert st.mean_ci_reason is not None and "wider than the data" in st.mean_ci_reason
    # n=3: the widest pair (min, max) covers the median with 1 - 2/8 = 75 % < 95 %: no interval.
    assert st.median_ci95_low is None and st.median_ci95_high is None
    five = summarize([1.0, 2.0, 3.0, 4.0, 5.0])  # n=5: (min, max) reaches 1 - 2/32 = 93.75 % only
    assert five is not None and five.median_ci95_low is None
    six = summarize([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # n=6: (min, max) reaches 1 - 2/64 = 96.9 %
    assert six is not None and (six.median_ci95_low, six.median_ci95_high) == (1.0, 6.0)


def test_outliers_counted_and_mean_ci_withdrawn() -> None:
    # The shape: TTFT ~12 ms with one 882 ms sample.
    values = [12.4, 12.9, 13.1, 12.7, 13.5, 12.6, 882.0, 13.0, 12.8]
    st = summarize(values)
    assert st is not None
    assert st.n_outliers == 1
    assert st.ci95_low is None and st.mean_ci_reason is not None and "outlier" in st.mean_ci_reason
    # Order statistics 2 and 8 of the sorted samples: inside the data, far from the outlier.
    srt = sorted(values)
    assert (st.median_ci95_low, st.median_ci95_high) == (srt[1], srt[7])


def _binomial_tail(n: int, k: int) -> float:
    """P(Bin(n, 1/2) <= k - 1), summed by hand."""
    return sum(math.comb(n, i) for i in range(k)) / 2**n


@pytest.mark.parametrize("n", [9, 20])
def test_median_interval_coverage_on_lognormal_samples(n: int) -> None:
    """Over many seeded lognormal samples the interval covers the true median (e^mu) at its exact rate.

    Oracle: the order-statistic interval [x_(k), x_(n+1-k)] covers the median with probability
    1 - 2 P(Bin(n, 1/2) <= k - 1) for any continuous distribution (k the largest rank reaching 95 %)."""
    mu, sigma, trials = 2.0, 1.0, 2000
    rng = np.random.default_rng(1234 + n)
    covered = 0
    for _ in range(trials):
        x = rng.lognormal(mu, sigma, size=n)
        ci = median_ci95(x)  # what summarize() reports as median_ci95_low/high
        assert ci is not None
        assert x.min() <= ci[0] <= ci[1] <= x.max()  # never leaves the data
        covered += ci[0] <= math.exp(mu) <= ci[1]
    k = max(k for k in range(1, n // 2 + 1) if 1 - 2 * _binomial_tail(n, k) >= 0.95)
    exact = 1 - 2 * _binomial_tail(n, k)
    se = math.sqrt(exact * (1 - exact) / trials)
    assert abs(covered / trials - exact) < 4 * se, (covered / trials, exact)


def test_t_interval_misleads_on_skewed_samples_where_the_median_interval_does_not() -> None:
    """Why the median leads: on lognormal(0, 1.5) samples of 9 the t interval of the mean often dips below 0;
    the median interval never does, and a mean interval that is shown lies inside the data."""
    rng = np.random.default_rng(7)
    negative = 0
    for _ in range(150):
        x = rng.lognormal(0.0, 1.5, size=9)
        negative += (x.mean() - 2.306 * x.std(ddof=1) / 3) < 0
        st = summarize(x.tolist())
        assert st is not None and st.median_ci95_low is not None and st.median_ci95_low > 0
        if st.ci95_low is not None:
            assert st.ci95_low >= x.min()
    assert negative > 15


def test_ci_is_interval_of_the_mean_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    small = summarize(rng.normal(10.0, 1.0, size=12).tolist())
    large = summarize(rng.normal(10.0, 1.0, size=500).tolist())
    assert small is not None and large is not None
    assert small.ci95_half_width is not None and large.ci95_half_width is not None
    # Interval of the mean (∝ std/√n), far narrower than the ±1.96·std spread of single samples.
    assert large.ci95_half_width == pytest.approx(1.965 * large.std / math.sqrt(500), rel=1e-3)
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
    [(1, 12.706), (2, 4.303), (4, 2.776), (8, 2.306), (20, 2.086), (60, 2.000), (120, 1.980)],
)  # values of the printed t table (two-sided 95 %)
def test_t_quantile_matches_the_table(dof: int, expected: float) -> None:
    assert t_quantile_975(dof) == pytest.approx(expected, abs=1e-3)


def test_t_quantile_is_monotone_non_increasing() -> None:
    qs = [t_quantile_975(d) for d in range(1, 200)]
    assert all(a >= b for a, b in itertools.pairwise(qs))
    assert qs[-1] == pytest.approx(1.96, abs=0.015)


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


def test_schema_1_0_metrics_still_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Files written before the median interval, quality and runaway fields existed read with their defaults."""
    import json

    from llm_perf_opt.results.serialize import read_summary, write_summary
    from tests.unit.builders import make_summary

    path = tmp_path / "metrics.json"
    write_summary(path, make_summary())
    raw = json.loads(path.read_text())
    raw["schema_version"] = "1.0"
    for st in raw["aggregates"].values():
        for key in ("median_ci95_low", "median_ci95_high", "n_outliers", "mean_ci_reason"):
            del st[key]
    del raw["quality"], raw["runaway"]
    path.write_text(json.dumps(raw))
    s = read_summary(path)
    assert s.quality is None and s.runaway is None
    assert s.aggregates["prefill_ms"].median_ci95_low is None and s.aggregates["prefill_ms"].n_outliers == 0
