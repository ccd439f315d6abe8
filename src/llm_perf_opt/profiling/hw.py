"""Hardware facts for MFU/MBU: a sourced peak table, device detection, and an NVML power sampler.

Peaks are **dense** (no 2:4 sparsity) figures from NVIDIA's datasheets, in FLOP/s and bytes/s.
Where a datasheet prints only the with-sparsity tensor-core figure (marked ``*``), the dense figure
is half of it; each entry names its document and URL so a reader can check it.  Fields named
``*_flops`` hold FLOP **per second** (the names follow the project brief).

A device the table does not know (or the CPU) gets ``Unavailable`` with the reason, never a guess;
``resolve_peak`` lets the user's override win and labels it as such.

``NvmlSampler`` samples power, clocks, temperature and throttle reasons of one GPU on a bounded
background thread.  Without NVML (no driver, CPU-only machine) it becomes a null sampler whose
results are ``Unavailable`` with NVML's own error text.
"""

from __future__ import annotations

import collections
import importlib
import itertools
import platform
import re
import threading
import time
from collections.abc import Sequence
from types import ModuleType, TracebackType
from typing import Any, Literal, NamedTuple

import attrs

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.profiling.mfu import Unavailable

__all__ = [
    "PEAK_TABLE",
    "DeviceFacts",
    "EnergyReading",
    "NvmlSample",
    "NvmlSampler",
    "PeakSource",
    "PeakSpec",
    "PowerSummary",
    "ResolvedPeak",
    "detect_device",
    "energy_from_counter_j",
    "energy_from_power_j",
    "match_peak",
    "peak_flops_for_dtype",
    "resolve_peak",
    "throttle_reason_names",
]

_T = 1e12  # tera
_P = 1e15  # peta
_GBPS = 1e9
_TBPS = 1e12


@attrs.frozen
class PeakSpec:
    """Dense peak throughput of one GPU model (FLOP/s, bytes/s) and where the numbers come from."""

    name: str
    bf16_dense_flops: float  # FLOP/s, tensor cores, FP32 accumulate, no sparsity
    fp16_dense_flops: float  # FLOP/s, tensor cores, FP32 accumulate, no sparsity
    tf32_flops: float  # FLOP/s, tensor cores, no sparsity (used for fp32 only when TF32 matmul is on)
    fp32_flops: float  # FLOP/s, CUDA cores (non-tensor)
    mem_bw_bytes_per_s: float
    source_title: str
    source_url: str
    patterns: tuple[str, ...] = ()  # regexes over the normalised device name (see match_peak)
    exclude: tuple[str, ...] = ()  # regexes that veto a match (other variants of the same chip)
    notes: str = ""

    @property
    def source(self) -> str:
        return f"{self.source_title} <{self.source_url}>"


_H100_DS = (
    "NVIDIA H100 Tensor Core GPU Datasheet",
    "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet",
)
_A100_DS = (
    "NVIDIA A100 Tensor Core GPU Datasheet",
    "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
)
_A100_40_DS = (
    "NVIDIA A100 Tensor Core GPU Datasheet (40GB, 2020)",
    "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet.pdf",
)
_HALF = "dense = half of the datasheet's with-sparsity tensor figure"

PEAK_TABLE: tuple[PeakSpec, ...] = (
    PeakSpec(
        name="NVIDIA H100 SXM5 80GB",
        bf16_dense_flops=1979 * _T / 2,
        fp16_dense_flops=1979 * _T / 2,
        tf32_flops=989 * _T / 2,
        fp32_flops=67 * _T,
        mem_bw_bytes_per_s=3.35 * _TBPS,
        source_title=_H100_DS[0],
        source_url=_H100_DS[1],
        patterns=(r"\bH100\b.*\b(SXM\d?|HBM3)\b",),
        exclude=(r"\bPCIE\b", r"\bNVL\b", r"\bHBM2E\b"),
        notes=f"H100 SXM column; {_HALF}",
    ),
    PeakSpec(
        name="NVIDIA H100 PCIe 80GB",
        bf16_dense_flops=1513 * _T / 2,
        fp16_dense_flops=1513 * _T / 2,
        tf32_flops=756 * _T / 2,
        fp32_flops=51 * _T,
        mem_bw_bytes_per_s=2.0 * _TBPS,
        source_title=_H100_DS[0],
        source_url=_H100_DS[1],
        patterns=(r"\bH100\b.*\bPCIE\b",),
        exclude=(r"\bNVL\b",),
        notes=f"H100 PCIe column; {_HALF}",
    ),
    PeakSpec(
        name="NVIDIA H200 SXM 141GB",
        bf16_dense_flops=1979 * _T / 2,
        fp16_dense_flops=1979 * _T / 2,
        tf32_flops=989 * _T / 2,
        fp32_flops=67 * _T,
        mem_bw_bytes_per_s=4.8 * _TBPS,
        source_title="NVIDIA H200 Tensor Core GPU (product page, specifications table)",
        source_url="https://www.nvidia.com/en-us/data-center/h200/",
        patterns=(r"\bH200\b",),
        exclude=(r"\bNVL\b",),
        notes=f"H200 SXM column; {_HALF}",
    ),
    PeakSpec(
        name="NVIDIA A100 SXM4 80GB",
        bf16_dense_flops=312 * _T,
        fp16_dense_flops=312 * _T,
        tf32_flops=156 * _T,
        fp32_flops=19.5 * _T,
        mem_bw_bytes_per_s=2039 * _GBPS,
        source_title=_A100_DS[0],
        source_url=_A100_DS[1],
        patterns=(r"\bA100\b.*\bSXM\d?\b.*\b80\s?GB\b", r"\bA100\b.*\b80\s?GB\b.*\bSXM\d?\b"),
        notes="A100 80GB SXM column (dense figures printed without *)",
    ),
    PeakSpec(
        name="NVIDIA A100 SXM4 40GB",
        bf16_dense_flops=312 * _T,
        fp16_dense_flops=312 * _T,
        tf32_flops=156 * _T,
        fp32_flops=19.5 * _T,
        mem_bw_bytes_per_s=1555 * _GBPS,
        source_title=_A100_40_DS[0],
        source_url=_A100_40_DS[1],
        patterns=(r"\bA100\b.*\bSXM\d?\b.*\b40\s?GB\b", r"\bA100\b.*\b40\s?GB\b.*\bSXM\d?\b"),
        notes="A100 40GB SXM column",
    ),
    PeakSpec(
        name="NVIDIA A100 PCIe 80GB",
        bf16_dense_flops=312 * _T,
        fp16_dense_flops=312 * _T,
        tf32_flops=156 * _T,
        fp32_flops=19.5 * _T,
        mem_bw_bytes_per_s=1935 * _GBPS,
        source_title=_A100_DS[0],
        source_url=_A100_DS[1],
        patterns=(r"\bA100\b.*\bPCIE\b.*\b80\s?GB\b", r"\bA100\b.*\b80\s?GB\b.*\bPCIE\b"),
        notes="A100 80GB PCIe column",
    ),
    PeakSpec(
        name="NVIDIA A100 PCIe 40GB",
        bf16_dense_flops=312 * _T,
        fp16_dense_flops=312 * _T,
        tf32_flops=156 * _T,
        fp32_flops=19.5 * _T,
        mem_bw_bytes_per_s=1555 * _GBPS,
        source_title=_A100_40_DS[0],
        source_url=_A100_40_DS[1],
        patterns=(r"\bA100\b.*\bPCIE\b.*\b40\s?GB\b", r"\bA100\b.*\b40\s?GB\b.*\bPCIE\b"),
        notes="A100 40GB PCIe column",
    ),
    PeakSpec(
        name="NVIDIA L40S",
        bf16_dense_flops=362.05 * _T,
        fp16_dense_flops=362.05 * _T,
        tf32_flops=183 * _T,
        fp32_flops=91.6 * _T,
        mem_bw_bytes_per_s=864 * _GBPS,
        source_title="NVIDIA L40S GPU Datasheet",
        source_url="https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413",
        patterns=(r"\bL40S\b",),
        notes="dense figures printed beside the * sparsity ones",
    ),
    PeakSpec(
        name="NVIDIA L4",
        bf16_dense_flops=242 * _T / 2,
        fp16_dense_flops=242 * _T / 2,
        tf32_flops=120 * _T / 2,
        fp32_flops=30.3 * _T,
        mem_bw_bytes_per_s=300 * _GBPS,
        source_title="NVIDIA L4 Tensor Core GPU Datasheet",
        source_url="https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet",
        patterns=(r"\bL4\b",),
        notes=_HALF,
    ),
    PeakSpec(
        name="NVIDIA GeForce RTX 4090",
        bf16_dense_flops=165.2 * _T,
        fp16_dense_flops=165.2 * _T,
        tf32_flops=82.6 * _T,
        fp32_flops=82.6 * _T,
        mem_bw_bytes_per_s=1008 * _GBPS,
        source_title="NVIDIA Ada GPU Architecture whitepaper, Appendix A (GeForce RTX 4090)",
        source_url="https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf",
        patterns=(r"\bRTX 4090\b",),
        exclude=(r"\b4090\s?D\b", r"\bLAPTOP\b", r"\bMOBILE\b"),
        notes="FP32-accumulate tensor rates (what PyTorch matmuls use); the FP16-accumulate rate is 2x (330.3)",
    ),
    PeakSpec(
        name="NVIDIA B200 (HGX, 1000 W)",
        bf16_dense_flops=36 * _P / 8 / 2,
        fp16_dense_flops=36 * _P / 8 / 2,
        tf32_flops=18 * _P / 8 / 2,
        fp32_flops=600 * _T / 8,
        mem_bw_bytes_per_s=64 * _TBPS / 8,
        source_title="NVIDIA HGX Platform, HGX B200 specifications (8-GPU figures)",
        source_url="https://www.nvidia.com/en-us/data-center/hgx/",
        patterns=(r"\bB200\b",),
        notes=(
            "per GPU = 8-GPU figure / 8; " + _HALF + "; TF32/FP32 differ slightly between NVIDIA documents "
            "(e.g. 1.1 PF / 80 TF in the DGX B200 material), BF16/FP16 2.25 PF dense agree"
        ),
    ),
)


def _normalise_name(device_name: str) -> str:
    name = device_name.upper().replace("-", " ").replace("_", " ")
    return re.sub(r"\s+", " ", name).strip()


def match_peak(device_name: str) -> PeakSpec | None:
    """The table entry for a device name as CUDA/NVML report it, or None when unknown or ambiguous.

    Matches "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB",
    "NVIDIA H200", "NVIDIA L40S", ...; a bare "NVIDIA A100" (form factor unknown) or a variant not in
    the table (H100 NVL, H200 NVL, GH200, L40, RTX 4090 D) gives None rather than a wrong peak.
    """
    name = _normalise_name(device_name)
    hits = [
        spec
        for spec in PEAK_TABLE
        if any(re.search(p, name) for p in spec.patterns) and not any(re.search(x, name) for x in spec.exclude)
    ]
    return hits[0] if len(hits) == 1 else None


DtypeName = Literal["bf16", "fp16", "tf32", "fp32"]
_DTYPE_ALIASES: dict[str, DtypeName] = {
    "bfloat16": "bf16",
    "bf16": "bf16",
    "torch.bfloat16": "bf16",
    "float16": "fp16",
    "fp16": "fp16",
    "half": "fp16",
    "torch.float16": "fp16",
    "tf32": "tf32",
    "float32": "fp32",
    "fp32": "fp32",
    "float": "fp32",
    "torch.float32": "fp32",
}


def _dtype_key(dtype: object) -> DtypeName | None:
    return _DTYPE_ALIASES.get(str(dtype).lower())


def peak_flops_for_dtype(spec: PeakSpec, dtype: object, allow_tf32: bool = False) -> float | Unavailable:
    """The spec's dense FLOP/s for the matmul dtype; fp32 uses the TF32 rate only when TF32 is on."""
    key = _dtype_key(dtype)
    if key is None:
        return Unavailable(f"no peak for dtype {dtype!r} (known: bf16, fp16, tf32, fp32)")
    if key == "fp32" and allow_tf32:
        key = "tf32"
    return {
        "bf16": spec.bf16_dense_flops,
        "fp16": spec.fp16_dense_flops,
        "tf32": spec.tf32_flops,
        "fp32": spec.fp32_flops,
    }[key]


@attrs.frozen
class PeakSource:
    """Where the peak FLOP/s and the peak bandwidth came from (each may differ: one can be overridden)."""

    flops: str
    bw: str

    def __str__(self) -> str:
        return self.flops if self.flops == self.bw else f"FLOP/s: {self.flops}; bandwidth: {self.bw}"


class ResolvedPeak(NamedTuple):
    """``(peak_flops_per_s, peak_bw_bytes_per_s, source)``; unpacks like a 3-tuple."""

    flops_per_s: float | Unavailable
    bw_bytes_per_s: float | Unavailable
    source: PeakSource


def _positive_override(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    v = float(value)
    if not v > 0 or v == float("inf"):
        raise ConfigError(f"{name} must be a positive number, got {value!r}", hint=f"e.g. {name}=989e12 or null")
    return v


def resolve_peak(
    device_name: str | None,
    dtype: object,
    override_flops: float | None = None,
    override_bw: float | None = None,
    allow_tf32: bool = False,
) -> ResolvedPeak:
    """Peak FLOP/s for ``dtype`` and peak bandwidth for ``device_name``, each with its source.

    A user override (config ``peak.flops_per_s`` / ``peak.bw_bytes_per_s``) wins and is labelled
    "user override".  The CPU, an unknown GPU or an unknown dtype give ``Unavailable`` with the reason.
    """
    o_flops = _positive_override("peak.flops_per_s", override_flops)
    o_bw = _positive_override("peak.bw_bytes_per_s", override_bw)
    hint = "set peak.flops_per_s / peak.bw_bytes_per_s to compute MFU/MBU"
    spec: PeakSpec | None = None
    why: str | None = None
    if device_name is None or not device_name.strip():
        why = f"device name unknown; {hint}"
    elif _normalise_name(device_name) == "CPU" or _normalise_name(device_name).startswith("CPU "):
        why = f"device is the CPU ({device_name}): no sourced peak for CPUs; {hint}"
    else:
        spec = match_peak(device_name)
        if spec is None:
            why = f"{device_name!r} is not in the sourced peak table (hw.PEAK_TABLE); {hint}"

    flops: float | Unavailable
    bw: float | Unavailable
    if o_flops is not None:
        flops, flops_src = o_flops, "user override (peak.flops_per_s)"
    elif spec is not None:
        flops = peak_flops_for_dtype(spec, dtype, allow_tf32)
        mode = " with TF32 matmul" if allow_tf32 and _dtype_key(dtype) == "fp32" else ""
        flops_src = (
            "unavailable" if isinstance(flops, Unavailable) else f"{spec.name}, dense {dtype}{mode}: {spec.source}"
        )
    else:
        assert why is not None
        flops, flops_src = Unavailable(why), "unavailable"
    if o_bw is not None:
        bw, bw_src = o_bw, "user override (peak.bw_bytes_per_s)"
    elif spec is not None:
        bw, bw_src = spec.mem_bw_bytes_per_s, f"{spec.name}: {spec.source}"
    else:
        assert why is not None
        bw, bw_src = Unavailable(why), "unavailable"
    return ResolvedPeak(flops, bw, PeakSource(flops=flops_src, bw=bw_src))


# --------------------------------------------------------------------------------------------------
# Device detection
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class DeviceFacts:
    """What this machine is: the fields HardwareInfo needs, plus a few that explain the numbers."""

    device: str
    gpu_name: str | None
    driver: str | None
    cuda: str | None
    torch: str
    cpu: str
    compute_capability: tuple[int, int] | None = None
    total_memory_bytes: int | None = None
    multiprocessors: int | None = None
    pci_bus_id: str | None = None
    notes: tuple[str, ...] = ()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError as exc:  # not Linux: fall back to platform's answer, noting nothing is lost
        return platform.processor() or f"{platform.machine()} (cpu model unknown: {exc.strerror})"
    return platform.processor() or platform.machine()


def nvml_driver_version() -> str | Unavailable:
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError as exc:
        return Unavailable(f"pynvml not importable: {exc}")
    try:
        nvml.nvmlInit()
    except Exception as exc:  # pynvml raises NVMLError subclasses; keep the text as the reason
        return Unavailable(f"NVML unavailable: {exc}")
    try:
        version = nvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception as exc:
        return Unavailable(f"NVML driver version query failed: {exc}")
    finally:
        nvml.nvmlShutdown()


def detect_device(device: object) -> DeviceFacts:
    """Facts about ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``)."""
    import torch

    dev = torch.device(str(device))
    notes: list[str] = []
    if dev.type != "cuda":
        return DeviceFacts(
            device=str(dev),
            gpu_name=None,
            driver=None,
            cuda=torch.version.cuda,
            torch=torch.__version__,
            cpu=cpu_name(),
        )
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    bus = None
    pci = [getattr(props, a, None) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
    if all(isinstance(v, int) for v in pci):
        bus = f"{pci[0]:08X}:{pci[1]:02X}:{pci[2]:02X}.0"
    driver = nvml_driver_version()
    if isinstance(driver, Unavailable):
        notes.append(driver.reason)
    return DeviceFacts(
        device=f"cuda:{index}",
        gpu_name=torch.cuda.get_device_name(index),
        driver=None if isinstance(driver, Unavailable) else driver,
        cuda=torch.version.cuda,
        torch=torch.__version__,
        cpu=cpu_name(),
        compute_capability=(props.major, props.minor),
        total_memory_bytes=int(props.total_memory),
        multiprocessors=int(props.multi_processor_count),
        pci_bus_id=bus,
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------------------------------
# NVML sampling and energy
# --------------------------------------------------------------------------------------------------

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


def benchmark_header(device: object) -> dict[str, str]:
    """GPU, driver, torch, CUDA and the UTC time, for the header of a benchmark result file."""
    import datetime as dt

    facts = detect_device(device)
    return {
        "gpu": facts.gpu_name or "cpu",
        "driver": facts.driver or ("unknown" if facts.gpu_name else "-"),
        "torch": facts.torch,
        "cuda": str(facts.cuda) if facts.gpu_name else "-",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def gpu_tag(gpu_name: str) -> str:
    """Short lower-case tag for result file names: 'h100', 'h200', 'a100', 'l40s', else the name's last word."""
    for tag in ("H100", "H200", "A100", "L40S", "L4"):
        if re.search(rf"\b{tag}\b", gpu_name.upper()):
            return tag.lower()
    words = gpu_name.split()
    return words[-1].lower() if words else "cpu"
