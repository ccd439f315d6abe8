"""The single PyTorch-profiler pass and its operator table.

Totals never double count: the "% of total" column divides an operator's *self* time by the sum of all
self times (every operator, not only the top K), and inclusive ("total") times are shown only for
reading.  On CUDA the table is sorted by self device time, on CPU by self CPU time.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from llm_perf_opt.results.types import UNATTRIBUTED, OperatorRow, ProfileSummary

RANGE_NAMES = ("preprocess", "prefill", "decode", "sam", "clip", "projector")


def _device_us(evt: Any, attr: str) -> float:
    # torch >= 2.4 names it *_device_time_total; older releases *_cuda_time_total.
    for name in (attr, attr.replace("device", "cuda")):
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


# Host-side events the profiler itself emits.  CUPTI's "Activity Buffer Request" can carry the device time
# of kernels that ran while it was open (seen with torch 2.11 on an H200: +24 us on 140 us of kernels), which
# would count those kernels twice; it is not an operator of the profiled program.
PROFILER_INTERNAL = frozenset({"Activity Buffer Request"})


def operator_table(prof: Any, on_device: bool, top_k: int) -> tuple[list[OperatorRow], float, str]:
    """Top-K operators by self time and the grand total of self times (ms).

    The profiler lists host-side operators (``aten::mm``) *and* the device kernels they launch
    (``nvjet_…``) as separate entries, and an operator's self device time already contains its kernels:
    summing both would count every kernel twice.  Rows are therefore host-side operators only; the total
    is the sum of all kernel (device-side) time, and device time not under any operator gets its own row,
    so the rows and the total describe the same work exactly once.
    """
    from torch.autograd import DeviceType

    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    user_ranges = set(RANGE_NAMES) | {"decode_step"}
    host = [e for e in events if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU]
    ops = [e for e in host if e.key not in user_ranges and e.key not in PROFILER_INTERNAL]
    extra: list[OperatorRow] = []
    if on_device:
        sort_key = "self_device_ms"
        # Device-side entries are kernels/memcpys plus our ranges mirrored on the GPU timeline
        # (gpu_user_annotation, same names): the mirrors span kernels already counted, so leave them out.
        kernels = [
            e
            for e in events
            if getattr(e, "device_type", DeviceType.CPU) != DeviceType.CPU and e.key not in user_ranges
        ]
        total_us = sum(_device_us(e, "self_device_time_total") for e in kernels)
        attributed_us = sum(_device_us(e, "self_device_time_total") for e in ops)
        unattributed_us = total_us - attributed_us
        # Operators can claim slightly more device time than the kernel list holds (attribution of async
        # copies); the total is then the operators' sum, so rows and total never disagree.
        total_us = max(total_us, attributed_us)
        if unattributed_us > 0:  # kernels launched directly inside our ranges, or outside any op
            n_k = sum(int(e.count) for e in kernels)
            extra.append(OperatorRow(name=UNATTRIBUTED, calls=n_k, self_device_ms=unattributed_us / 1e3,
                                     total_device_ms=unattributed_us / 1e3, self_cpu_ms=0.0, total_cpu_ms=0.0,
                                     pct_of_total=100.0 * unattributed_us / total_us))  # fmt: skip
        ops.sort(key=lambda e: _device_us(e, "self_device_time_total"), reverse=True)
    else:
        sort_key = "self_cpu_ms"
        ops.sort(key=lambda e: float(e.self_cpu_time_total), reverse=True)
        total_us = sum(float(e.self_cpu_time_total) for e in ops)
    rows = []
    for e in ops:
        self_dev = _device_us(e, "self_device_time_total") / 1e3 if on_device else None
        tot_dev = _device_us(e, "device_time_total") / 1e3 if on_device else None
        key_us = _device_us(e, "self_device_time_total") if on_device else float(e.self_cpu_time_total)
        rows.append(
            OperatorRow(
                name=e.key,
                calls=int(e.count),
                self_device_ms=self_dev,
                total_device_ms=tot_dev,
                self_cpu_ms=float(e.self_cpu_time_total) / 1e3,
                total_cpu_ms=float(e.cpu_time_total) / 1e3,
                pct_of_total=(100.0 * key_us / total_us) if total_us > 0 else 0.0,
            )
        )
    rows = sorted(rows + extra, key=lambda r: (r.self_device_ms or 0.0) if on_device else r.self_cpu_ms, reverse=True)
    return rows[:top_k], total_us / 1e3, sort_key


def range_times_ms(prof: Any, on_device: bool) -> dict[str, float]:
    """Inclusive time of our named ranges as the profiler saw them (CPU wall of the range on CPU)."""
    out: dict[str, float] = {}
    for e in prof.key_averages():
        if e.key in RANGE_NAMES:
            out[e.key] = float(e.cpu_time_total) / 1e3
    return out


def run_profiler_pass(
    fn: Callable[[], Any],
    device: torch.device,
    preset: Any,
    out_dir: Path,
    page_id: str,
    max_new_tokens: int,
    top_k: int,
    export_trace: bool,
) -> tuple[ProfileSummary, Any]:
    """Run ``fn`` once under the profiler; write trace.json.gz; return the summary and fn's result."""
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU]
    wanted = [str(a).lower() for a in (preset.get("activities") or ["cpu"])]
    if on_device and "cuda" in wanted:
        activities.append(ProfilerActivity.CUDA)
    on_device = ProfilerActivity.CUDA in activities
    with profile(
        activities=activities,
        record_shapes=bool(preset.get("record_shapes", False)),
        profile_memory=bool(preset.get("profile_memory", False)),
        with_stack=bool(preset.get("with_stack", False)),
    ) as prof:
        result = fn()
    rows, total_ms, sort_key = operator_table(prof, on_device, top_k)
    trace_file = None
    if export_trace:
        raw = out_dir / "trace.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(out_dir / "trace.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
        trace_file = "trace.json.gz"
    summary = ProfileSummary(
        page_id=page_id,
        max_new_tokens=max_new_tokens,
        sort_key=sort_key,
        total_self_ms=total_ms,
        operators=rows,
        range_ms=range_times_ms(prof, on_device),
        trace_file=trace_file,
    )
    return summary, result


def gpu_ranges_ms(trace_gz: Path, names: tuple[str, ...] = RANGE_NAMES) -> dict[str, tuple[float, float]]:
    """Per named range: (GPU-side span, kernel busy time inside it) in ms, summed over its occurrences.

    The span is the GPU-timeline extent of the range (what a CUDA-event pair on the stream measures);
    the busy time is the sum of kernel durations inside it, so busy / span is the GPU utilisation.
    """
    with gzip.open(trace_gz, "rt") as fh:
        trace = json.load(fh)
    events = trace.get("traceEvents", [])
    ranges = [e for e in events if e.get("cat") == "gpu_user_annotation" and e.get("name") in names]
    kernels = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("cat") == "kernel"]
    kernels.sort()
    out: dict[str, tuple[float, float]] = {}
    for r in ranges:
        r0, r1 = float(r["ts"]), float(r["ts"]) + float(r.get("dur", 0))
        busy = sum(k1 - k0 for k0, k1 in kernels if k0 >= r0 and k1 <= r1)
        span, prev_busy = out.get(r["name"], (0.0, 0.0))
        out[r["name"]] = (span + (r1 - r0) / 1e3, prev_busy + busy / 1e3)
    return out
