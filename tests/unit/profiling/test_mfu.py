"""MFU / MBU / roofline: plain arithmetic, and Unavailable (never 0) whenever a figure can't be computed."""

from __future__ import annotations

import math

import pytest

from llm_perf_opt.profiling.mfu import (
    RooflinePoint,
    Unavailable,
    achieved_bytes_per_s,
    achieved_flops_per_s,
    arithmetic_intensity,
    mbu,
    mfu,
    ridge_point,
    roofline_attainable_flops_per_s,
    roofline_point,
)


def test_mfu_and_mbu_arithmetic() -> None:
    assert mfu(500e12, 1.0, 1000e12) == pytest.approx(0.5)
    assert achieved_flops_per_s(3e12, 2.0) == pytest.approx(1.5e12)
    assert mbu(1.2e9, 0.001, 3.35e12) == pytest.approx(1.2e12 / 3.35e12)
    assert achieved_bytes_per_s(10, 2) == 5
    assert arithmetic_intensity(100.0, 50.0) == 2.0


@pytest.mark.parametrize(
    ("flops", "seconds", "peak", "fragment"),
    [
        (None, 1.0, 1e12, "flops not measured"),
        (1e9, 0.0, 1e12, "seconds must be > 0"),
        (1e9, -1.0, 1e12, "seconds must be > 0"),
        (1e9, 1.0, None, "peak_flops_per_s not measured"),
        (1e9, 1.0, Unavailable("CPU has no sourced peak"), "CPU has no sourced peak"),
        (0, 1.0, 1e12, "flops must be > 0"),
        (math.nan, 1.0, 1e12, "not finite"),
        (2e12, 1.0, 1e12, "MFU 2.000 > 1"),
    ],
)
def test_mfu_unavailable_with_reason(flops: object, seconds: object, peak: object, fragment: str) -> None:
    out = mfu(flops, seconds, peak)  # type: ignore[arg-type]
    assert isinstance(out, Unavailable)
    assert fragment in out.reason
    assert not out  # falsy, like "not measured": never usable as a number


def test_mbu_above_one_is_kept_cache_hits() -> None:
    assert mbu(4e12, 1.0, 3.35e12) == pytest.approx(4 / 3.35)


def test_mbu_unavailable() -> None:
    assert isinstance(mbu(1e9, 1.0, Unavailable("no bw")), Unavailable)
    assert isinstance(mbu(None, 1.0, 1e12), Unavailable)
    assert isinstance(arithmetic_intensity(1.0, 0), Unavailable)


def test_roofline() -> None:
    peak, bw = 1000e12, 4e12
    assert ridge_point(peak, bw) == pytest.approx(250.0)
    assert roofline_attainable_flops_per_s(10.0, peak, bw) == pytest.approx(40e12)
    assert roofline_attainable_flops_per_s(1000.0, peak, bw) == pytest.approx(peak)
    # Decode-like: 1.2 GFLOP over 1.2 GB in 1 ms -> intensity 1, memory-bound.
    pt = roofline_point(1.2e9, 1.2e9, 1e-3, peak, bw)
    assert isinstance(pt, RooflinePoint)
    assert pt.bound == "memory"
    assert pt.attainable_flops_per_s == pytest.approx(4e12)
    assert pt.fraction_of_attainable == pytest.approx(1.2e12 / 4e12)
    # Prefill-like: high intensity, compute-bound.
    pt2 = roofline_point(800e9, 1.5e9, 2e-3, peak, bw)
    assert isinstance(pt2, RooflinePoint) and pt2.bound == "compute"
    missing = roofline_point(1.0, 1.0, 1.0, Unavailable("peak unknown"), bw)
    assert isinstance(missing, Unavailable) and missing.reason == "peak unknown"
