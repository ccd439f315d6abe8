"""Sourced peak table: dense datasheet FLOP/s per dtype and memory bandwidth per GPU, and the peak a run uses.

Peaks are **dense** (no 2:4 sparsity) figures from NVIDIA's datasheets, in FLOP/s and bytes/s.
Where a datasheet prints only the with-sparsity tensor-core figure (marked ``*``), the dense figure
is half of it; each entry names its document and URL so a reader can check it.  Fields named
``*_flops`` hold FLOP **per second** (the names follow the project brief).

A device the table does not know (or the CPU) gets ``Unavailable`` with the reason, never a guess;
``resolve_peak`` lets the user's override win and labels it as such.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

import attrs

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.profiling.mfu import Unavailable

__all__ = ["PEAK_TABLE", "PeakSource", "PeakSpec", "ResolvedPeak", "match_peak", "peak_flops_for_dtype", "resolve_peak"]

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
