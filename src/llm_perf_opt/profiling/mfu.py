"""MFU, MBU and roofline placement: pure functions over FLOPs, bytes, seconds and device peaks.

Every figure that cannot be computed honestly comes back as ``Unavailable(reason)`` — never 0 and
never a default peak — so a report can print the reason next to the blank.  Inputs may themselves
be ``Unavailable`` (e.g. a peak ``hw.resolve_peak`` could not find) or ``None`` (not measured); the
first such input's reason is passed on.

* MFU = achieved FLOP/s / peak dense FLOP/s for the dtype.  A value above 1 means the FLOPs, the
  time or the peak are wrong (dense peaks are upper bounds), so it is returned as Unavailable.
* MBU = achieved bytes/s / peak memory bandwidth.  Values above 1 are returned as they are: the
  byte estimate is what the step must *logically* read, and L2 hits (e.g. a small model's weights
  staying in a 50 MB L2 across decode steps) can legitimately beat DRAM bandwidth.
* Roofline: attainable FLOP/s = min(peak FLOP/s, intensity × peak bandwidth).
"""

from __future__ import annotations

import math
from typing import Literal

import attrs

__all__ = [
    "RooflinePoint",
    "Unavailable",
    "achieved_bytes_per_s",
    "achieved_flops_per_s",
    "arithmetic_intensity",
    "mbu",
    "mfu",
    "ridge_point",
    "roofline_attainable_flops_per_s",
    "roofline_point",
]


@attrs.frozen
class Unavailable:
    """A figure that could not be computed, and why (shown in reports instead of a number)."""

    reason: str

    def __bool__(self) -> bool:
        # An unavailable figure must never pass for a truthy number in `if value:` checks.
        return False


Number = float | int
MaybeNumber = float | int | Unavailable | None


def _check(name: str, value: MaybeNumber, *, positive: bool = True) -> float | Unavailable:
    """The value as a float, or Unavailable saying why it cannot be used."""
    if isinstance(value, Unavailable):
        return value
    if value is None:
        return Unavailable(f"{name} not measured")
    if isinstance(value, bool):
        return Unavailable(f"{name} is a bool ({value}), not a number")
    v = float(value)
    if not math.isfinite(v):
        return Unavailable(f"{name} is not finite ({v})")
    if positive and v <= 0:
        return Unavailable(f"{name} must be > 0, got {v}")
    return v


def achieved_flops_per_s(flops: MaybeNumber, seconds: MaybeNumber) -> float | Unavailable:
    """FLOPs per second actually achieved."""
    f, s = _check("flops", flops), _check("seconds", seconds)
    if isinstance(f, Unavailable):
        return f
    if isinstance(s, Unavailable):
        return s
    return f / s


def mfu(flops: MaybeNumber, seconds: MaybeNumber, peak_flops_per_s: MaybeNumber) -> float | Unavailable:
    """Model FLOPs utilisation: ``flops / seconds / peak_flops_per_s`` (a fraction, not percent)."""
    rate = achieved_flops_per_s(flops, seconds)
    peak = _check("peak_flops_per_s", peak_flops_per_s)
    if isinstance(rate, Unavailable):
        return rate
    if isinstance(peak, Unavailable):
        return peak
    value = rate / peak
    if value > 1.0:
        return Unavailable(
            f"MFU {value:.3f} > 1 ({rate:.4g} FLOP/s achieved vs {peak:.4g} peak): FLOPs, timing or peak are wrong"
        )
    return value


def achieved_bytes_per_s(bytes_moved: MaybeNumber, seconds: MaybeNumber) -> float | Unavailable:
    b, s = _check("bytes", bytes_moved), _check("seconds", seconds)
    if isinstance(b, Unavailable):
        return b
    if isinstance(s, Unavailable):
        return s
    return b / s


def mbu(bytes_moved: MaybeNumber, seconds: MaybeNumber, peak_bw_bytes_per_s: MaybeNumber) -> float | Unavailable:
    """Memory bandwidth utilisation: ``bytes / seconds / peak_bw`` (may exceed 1 through cache hits)."""
    rate = achieved_bytes_per_s(bytes_moved, seconds)
    peak = _check("peak_bw_bytes_per_s", peak_bw_bytes_per_s)
    if isinstance(rate, Unavailable):
        return rate
    if isinstance(peak, Unavailable):
        return peak
    return rate / peak


def arithmetic_intensity(flops: MaybeNumber, bytes_moved: MaybeNumber) -> float | Unavailable:
    """FLOPs per byte of device-memory traffic."""
    f, b = _check("flops", flops), _check("bytes", bytes_moved)
    if isinstance(f, Unavailable):
        return f
    if isinstance(b, Unavailable):
        return b
    return f / b


def ridge_point(peak_flops_per_s: MaybeNumber, peak_bw_bytes_per_s: MaybeNumber) -> float | Unavailable:
    """Intensity (FLOP/byte) where the roofline turns from memory- to compute-bound."""
    return arithmetic_intensity(peak_flops_per_s, peak_bw_bytes_per_s)


def roofline_attainable_flops_per_s(
    intensity_flops_per_byte: MaybeNumber, peak_flops_per_s: MaybeNumber, peak_bw_bytes_per_s: MaybeNumber
) -> float | Unavailable:
    """``min(peak FLOP/s, intensity × peak bandwidth)``."""
    i = _check("arithmetic intensity", intensity_flops_per_byte)
    p = _check("peak_flops_per_s", peak_flops_per_s)
    bw = _check("peak_bw_bytes_per_s", peak_bw_bytes_per_s)
    for v in (i, p, bw):
        if isinstance(v, Unavailable):
            return v
    assert isinstance(i, float) and isinstance(p, float) and isinstance(bw, float)
    return min(p, i * bw)


@attrs.frozen
class RooflinePoint:
    """Where one stage sits on the device roofline."""

    intensity_flops_per_byte: float
    achieved_flops_per_s: float
    attainable_flops_per_s: float
    ridge_flops_per_byte: float
    bound: Literal["memory", "compute"]
    fraction_of_attainable: float


def roofline_point(
    flops: MaybeNumber,
    bytes_moved: MaybeNumber,
    seconds: MaybeNumber,
    peak_flops_per_s: MaybeNumber,
    peak_bw_bytes_per_s: MaybeNumber,
) -> RooflinePoint | Unavailable:
    """Place a measured stage on the roofline: its intensity, what it achieved, what it could attain."""
    intensity = arithmetic_intensity(flops, bytes_moved)
    achieved = achieved_flops_per_s(flops, seconds)
    ridge = ridge_point(peak_flops_per_s, peak_bw_bytes_per_s)
    attainable = roofline_attainable_flops_per_s(intensity, peak_flops_per_s, peak_bw_bytes_per_s)
    for v in (intensity, achieved, ridge, attainable):
        if isinstance(v, Unavailable):
            return v
    assert isinstance(intensity, float) and isinstance(achieved, float)
    assert isinstance(ridge, float) and isinstance(attainable, float)
    return RooflinePoint(
        intensity_flops_per_byte=intensity,
        achieved_flops_per_s=achieved,
        attainable_flops_per_s=attainable,
        ridge_flops_per_byte=ridge,
        bound="memory" if intensity < ridge else "compute",
        fraction_of_attainable=achieved / attainable,
    )
