"""NVML power/clock/temperature sampling of one GPU and the energy of a time window.

``NvmlSampler`` samples on a bounded background thread.  Without NVML (no driver, CPU-only machine) it
becomes a null sampler whose results are ``Unavailable`` with NVML's own error text.
"""

from __future__ import annotations

import collections
import importlib
import itertools
import threading
import time
from collections.abc import Sequence
from types import ModuleType, TracebackType
from typing import Any, Literal

import attrs

from llm_perf_opt.profiling.mfu import Unavailable

__all__ = [
    "EnergyReading",
    "NvmlSample",
    "NvmlSampler",
    "PowerSummary",
    "energy_from_counter_j",
    "energy_from_power_j",
    "throttle_reason_names",
]

_THROTTLE_BITS: tuple[tuple[int, str], ...] = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)


def throttle_reason_names(mask: int) -> tuple[str, ...]:
    """NVML clock-event (throttle) bitmask -> names; unknown bits are shown as hex."""
    names = [name for bit, name in _THROTTLE_BITS if mask & bit]
    rest = mask & ~sum(bit for bit, _ in _THROTTLE_BITS)
    if rest:
        names.append(f"0x{rest:x}")
    return tuple(names)


@attrs.frozen
class NvmlSample:
    """One reading; ``t_s`` is ``time.perf_counter()``; a field NVML could not read is None."""

    t_s: float
    power_w: float | None
    sm_clock_mhz: int | None
    mem_clock_mhz: int | None
    temperature_c: int | None
    throttle_reasons: int | None
    energy_mj: int | None  # nvmlDeviceGetTotalEnergyConsumption (mJ since driver load), when supported


@attrs.frozen
class EnergyReading:
    """Energy over a window and how it was obtained."""

    energy_j: float
    method: Literal["nvml_total_energy_counter", "power_trapezoid"]
    t0_s: float
    t1_s: float
    samples_in_window: int
    note: str = ""

    @property
    def mean_power_w(self) -> float:
        return self.energy_j / (self.t1_s - self.t0_s)


@attrs.frozen
class PowerSummary:
    """Aggregates over a window: mean/max power, clocks, hottest temperature, throttle reasons seen."""

    n_samples: int
    mean_power_w: float | None
    max_power_w: float | None
    mean_sm_clock_mhz: float | None
    min_sm_clock_mhz: int | None
    mean_mem_clock_mhz: float | None
    max_temperature_c: int | None
    throttle_reasons_seen: tuple[str, ...]


def _interp(samples: Sequence[NvmlSample], t: float, field: str) -> float | None:
    """Linear interpolation of ``field`` at ``t`` between the samples bracketing it."""
    for a, b in itertools.pairwise(samples):
        if a.t_s <= t <= b.t_s:
            va, vb = getattr(a, field), getattr(b, field)
            if va is None or vb is None:
                return None
            if b.t_s == a.t_s:
                return float(va)
            return float(va) + (float(vb) - float(va)) * (t - a.t_s) / (b.t_s - a.t_s)
    return None


def _window_check(samples: Sequence[NvmlSample], t0: float, t1: float) -> Unavailable | None:
    if not t1 > t0:
        return Unavailable(f"energy window must have t1 > t0 (got {t0}..{t1})")
    if len(samples) < 2:
        return Unavailable(f"only {len(samples)} NVML sample(s): need two around the window")
    if t0 < samples[0].t_s or t1 > samples[-1].t_s:
        return Unavailable(
            f"window {t0:.3f}..{t1:.3f} s not covered by samples {samples[0].t_s:.3f}..{samples[-1].t_s:.3f} s "
            "(sampler started late, stopped early, or the ring buffer dropped old samples)"
        )
    return None


def energy_from_counter_j(samples: Sequence[NvmlSample], t0_s: float, t1_s: float) -> EnergyReading | Unavailable:
    """Energy from NVML's cumulative energy counter, interpolated at the window edges."""
    bad = _window_check(samples, t0_s, t1_s)
    if bad is not None:
        return bad
    e0, e1 = _interp(samples, t0_s, "energy_mj"), _interp(samples, t1_s, "energy_mj")
    if e0 is None or e1 is None:
        return Unavailable("energy counter missing in the samples around the window")
    if e1 < e0:
        return Unavailable(f"energy counter went backwards ({e0:.0f} -> {e1:.0f} mJ): driver reloaded?")
    inside = sum(1 for s in samples if t0_s <= s.t_s <= t1_s)
    return EnergyReading((e1 - e0) / 1000.0, "nvml_total_energy_counter", t0_s, t1_s, inside)


def energy_from_power_j(samples: Sequence[NvmlSample], t0_s: float, t1_s: float) -> EnergyReading | Unavailable:
    """Energy by trapezoidal integration of sampled power over ``[t0_s, t1_s]`` (edges interpolated)."""
    bad = _window_check(samples, t0_s, t1_s)
    if bad is not None:
        return bad
    p0, p1 = _interp(samples, t0_s, "power_w"), _interp(samples, t1_s, "power_w")
    if p0 is None or p1 is None:
        return Unavailable("power missing in the samples around the window")
    points: list[tuple[float, float]] = [(t0_s, p0)]
    for s in samples:
        if t0_s < s.t_s < t1_s:
            if s.power_w is None:
                return Unavailable(f"power missing in the sample at {s.t_s:.3f} s")
            points.append((s.t_s, s.power_w))
    points.append((t1_s, p1))
    energy = sum((tb - ta) * (pa + pb) / 2.0 for (ta, pa), (tb, pb) in itertools.pairwise(points))
    return EnergyReading(energy, "power_trapezoid", t0_s, t1_s, len(points) - 2)


class NvmlSampler:
    """Background NVML sampler for one GPU, used as a context manager.

    Power is NVML's instantaneous field where the driver has it (``power_source == "instant"``),
    else ``nvmlDeviceGetPowerUsage`` (a lagging 1-s average on Ampere+).  Energy prefers the
    driver's cumulative energy counter, which needs no sampling assumptions; integrating sampled
    power is the fallback, and the result says which method it used.

    ``with NvmlSampler(index=0) as s: t0 = s.now_s(); ...; t1 = s.now_s()`` then
    ``s.energy_j(t0, t1)``.  Samples go into a ring buffer of ``max_samples`` (the oldest are
    dropped and counted), so memory stays bounded however long the run.  Sample times are
    ``time.perf_counter()``; mark windows with :meth:`now_s` (same clock).

    When NVML cannot start (no library, no driver, CPU machine) the sampler is a null object: no
    thread, no samples, and every result is ``Unavailable`` carrying NVML's error text.
    """

    def __init__(
        self,
        index: int = 0,
        interval_s: float = 0.05,
        max_samples: int = 100_000,
        nvml_module: ModuleType | Any | None = None,
        pci_bus_id: str | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        if max_samples < 2:
            raise ValueError(f"max_samples must be >= 2, got {max_samples}")
        self.index = index
        self.interval_s = interval_s
        self.max_samples = max_samples
        self.pci_bus_id = pci_bus_id
        self._nvml_injected = nvml_module
        self._nvml: Any = None
        self._handle: Any = None
        self._samples: collections.deque[NvmlSample] = collections.deque(maxlen=max_samples)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped_samples = 0
        self.unavailable_reason: str | None = None
        self.counter_supported = False
        self.read_errors: dict[str, str] = {}  # field -> first error text (a field may be unsupported)
        self.thread_error: str | None = None
        self.power_source: Literal["instant", "power_usage"] = "power_usage"

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None and self._handle is not None

    def __enter__(self) -> NvmlSampler:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Open NVML and start sampling; on failure become the null sampler (reason recorded)."""
        if self._nvml is not None:
            raise RuntimeError("NvmlSampler already started")
        try:
            nvml = self._nvml_injected if self._nvml_injected is not None else importlib.import_module("pynvml")
        except ImportError as exc:
            self.unavailable_reason = f"pynvml (nvidia-ml-py) not importable: {exc}"
            return
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded / ...: the text is the reason
            self.unavailable_reason = f"NVML unavailable: {exc}"
            return
        try:
            if self.pci_bus_id:
                self._handle = nvml.nvmlDeviceGetHandleByPciBusId(self.pci_bus_id)
            else:
                self._handle = nvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception as exc:
            self.unavailable_reason = f"NVML has no device {self.pci_bus_id or self.index}: {exc}"
            nvml.nvmlShutdown()
            return
        self._nvml = nvml
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            self.counter_supported = True
        except Exception as exc:  # NotSupported before Volta: integrate power instead, and say why
            self.read_errors["energy_mj"] = str(exc)
        if self._instant_power_mw() is not None:
            self.power_source = "instant"
        self._append(self._read())
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, take a last sample (so windows ending now are covered), close NVML."""
        if self._nvml is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 10 * self.interval_s))
            if self._thread.is_alive():
                self.thread_error = self.thread_error or "sampler thread did not stop within the join timeout"
            self._thread = None
        self._append(self._read())
        self._nvml.nvmlShutdown()
        self._nvml = None

    def now_s(self) -> float:
        """The sampler's clock (``time.perf_counter``), for marking energy windows."""
        return time.perf_counter()

    # -- sampling ----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self._append(self._read())
        except Exception as exc:  # a failing read must not kill the run silently: keep the text
            self.thread_error = f"sampler thread stopped: {type(exc).__name__}: {exc}"

    def _field(self, name: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(self._handle, *args)
        except Exception as exc:  # one unsupported field (e.g. power on some boards) leaves it None
            self.read_errors.setdefault(name, str(exc))
            return None

    def _instant_power_mw(self) -> float | None:
        """Instantaneous board power (field NVML_FI_DEV_POWER_INSTANT), or None where unsupported.

        ``nvmlDeviceGetPowerUsage`` is a 1-second running average on Ampere and newer, so it lags a
        burst of work: on an H100, 2 s of bf16 matmuls right after idle integrated to ~22 % less
        energy than the energy counter reported; with this field the two agreed within 2 %.
        """
        nvml = self._nvml
        field_id = getattr(nvml, "NVML_FI_DEV_POWER_INSTANT", None)
        if field_id is None or not hasattr(nvml, "nvmlDeviceGetFieldValues"):
            self.read_errors.setdefault("power_instant", "pynvml has no NVML_FI_DEV_POWER_INSTANT field")
            return None
        try:
            value = nvml.nvmlDeviceGetFieldValues(self._handle, [field_id])[0]
        except Exception as exc:  # old driver: no field API; fall back to the averaged reading
            self.read_errors.setdefault("power_instant", str(exc))
            return None
        if value.nvmlReturn != 0:
            self.read_errors.setdefault("power_instant", f"NVML return code {value.nvmlReturn}")
            return None
        member = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")[int(value.valueType)]
        return float(getattr(value.value, member))

    def _read(self) -> NvmlSample:
        nvml = self._nvml
        t = time.perf_counter()
        power_mw: float | None = None
        if self.power_source == "instant":
            power_mw = self._instant_power_mw()
        if power_mw is None:
            power_mw = self._field("power_w", nvml.nvmlDeviceGetPowerUsage)
        reasons_fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
        )
        if reasons_fn is None:
            self.read_errors.setdefault("throttle_reasons", "pynvml has no clock-event/throttle-reason query")
        return NvmlSample(
            t_s=t,
            power_w=None if power_mw is None else power_mw / 1000.0,
            sm_clock_mhz=self._field("sm_clock_mhz", nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM),
            mem_clock_mhz=self._field("mem_clock_mhz", nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_MEM),
            temperature_c=self._field("temperature_c", nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU),
            throttle_reasons=None if reasons_fn is None else self._field("throttle_reasons", reasons_fn),
            energy_mj=(
                self._field("energy_mj", nvml.nvmlDeviceGetTotalEnergyConsumption) if self.counter_supported else None
            ),
        )

    def _append(self, sample: NvmlSample) -> None:
        with self._lock:
            if len(self._samples) == self.max_samples:
                self.dropped_samples += 1
            self._samples.append(sample)

    def samples(self) -> list[NvmlSample]:
        """A copy of the samples held now (oldest first)."""
        with self._lock:
            return list(self._samples)

    # -- results -----------------------------------------------------------------------------------

    def _null(self) -> Unavailable | None:
        if self.unavailable_reason is not None:
            return Unavailable(self.unavailable_reason)
        if self._handle is None:
            return Unavailable("NVML sampler was never started (use it as a context manager)")
        return None

    def energy_j(self, t0_s: float, t1_s: float) -> EnergyReading | Unavailable:
        """Energy over ``[t0_s, t1_s]``: NVML's energy counter when supported, else ∫power dt."""
        null = self._null()
        if null is not None:
            return null
        samples = self.samples()
        if self.counter_supported:
            reading = energy_from_counter_j(samples, t0_s, t1_s)
            if not isinstance(reading, Unavailable):
                return reading
            fallback = energy_from_power_j(samples, t0_s, t1_s)
            if isinstance(fallback, Unavailable):
                return Unavailable(f"{reading.reason}; power integration also failed: {fallback.reason}")
            return attrs.evolve(fallback, note=f"energy counter unusable ({reading.reason}); integrated power")
        reading = energy_from_power_j(samples, t0_s, t1_s)
        if isinstance(reading, Unavailable):
            return reading
        why = self.read_errors.get("energy_mj", "not supported")
        return attrs.evolve(reading, note=f"energy counter unavailable ({why}); integrated power")

    def summary(self, t0_s: float | None = None, t1_s: float | None = None) -> PowerSummary | Unavailable:
        """Aggregates over the samples in ``[t0_s, t1_s]`` (all samples when omitted)."""
        null = self._null()
        if null is not None:
            return null
        lo = float("-inf") if t0_s is None else t0_s
        hi = float("inf") if t1_s is None else t1_s
        window = [s for s in self.samples() if lo <= s.t_s <= hi]
        if not window:
            return Unavailable(f"no NVML samples in window {t0_s}..{t1_s} (interval {self.interval_s} s)")

        def vals(field: str) -> list[float]:
            return [float(v) for s in window if (v := getattr(s, field)) is not None]

        power, sm, mem, temp = vals("power_w"), vals("sm_clock_mhz"), vals("mem_clock_mhz"), vals("temperature_c")
        mask = 0
        for s in window:
            mask |= s.throttle_reasons or 0
        return PowerSummary(
            n_samples=len(window),
            mean_power_w=sum(power) / len(power) if power else None,
            max_power_w=max(power) if power else None,
            mean_sm_clock_mhz=sum(sm) / len(sm) if sm else None,
            min_sm_clock_mhz=int(min(sm)) if sm else None,
            mean_mem_clock_mhz=sum(mem) / len(mem) if mem else None,
            max_temperature_c=int(max(temp)) if temp else None,
            throttle_reasons_seen=throttle_reason_names(mask),
        )
