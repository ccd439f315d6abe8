"""The single PyTorch-profiler pass and its operator table.

Totals never double count: the "% of total" column divides an operator's *self* time by the sum of all
self times (every operator, not only the top K), and inclusive ("total") times are shown only for
reading.  On CUDA the table is sorted by self device time, on CPU by self CPU time.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from llm_perf_opt.results.types import (
    UNATTRIBUTED,
    KernelAttribution,
    KernelRow,
    OperatorRow,
    ProfileSummary,
    StageDeviceTime,
)

# "encoder": DeepSeek-OCR-2's second vision stage (v1's is "clip")
RANGE_NAMES = ("preprocess", "prefill", "decode", "sam", "clip", "encoder", "projector")


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


def operator_table(prof: Any, on_device: bool, top_k: int) -> tuple[list[OperatorRow], float, str, str | None]:
    """Top-K operators by self time, the grand total of self times (ms), the sort key and a note on the total.

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
    note: str | None = None
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
        # Operators can claim more device time than the kernel list holds (attribution of async copies): the
        # total stays what the kernels measured and the excess is stated, never folded into the total.
        if unattributed_us < 0:
            note = (
                f"host operators claim {-unattributed_us / 1e3:.3f} ms more device time than all kernels of the "
                f"pass ({total_us / 1e3:.3f} ms): some device time is attributed to two operators (async copies?), "
                "so the % column adds up to more than 100 % and no row holds unattributed device time"
            )
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
    return rows[:top_k], total_us / 1e3, sort_key, note


def range_times_ms(prof: Any) -> dict[str, float]:
    """Inclusive host wall time (ms) of our named ranges, from their host-side entries only.

    On CUDA the profiler also lists each range's mirror on the GPU timeline under the same name, with zero
    host time; letting that entry overwrite the host one reported 0 ms for every range with device work.
    The mirrors' GPU spans come from the trace (``trace_range_spans_ms``).
    """
    from torch.autograd import DeviceType

    out: dict[str, float] = {}
    for e in prof.key_averages():
        if e.key in RANGE_NAMES and getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU:
            out[e.key] = out.get(e.key, 0.0) + float(e.cpu_time_total) / 1e3
    return out


# Stages of the kernel attribution, by the innermost host range a kernel was launched in.
RANGE_STAGE = {
    "preprocess": "preprocess",
    "sam": "sam",
    "clip": "clip",
    "encoder": "encoder",
    "projector": "projector",
    "prefill": "prefill_lm",  # prefill outside sam/clip/projector: embedding scatter + LM forward + first pick
    "decode": "decode",
    "decode_step": "decode",
}
STAGE_ORDER = ("preprocess", "sam", "clip", "encoder", "projector", "prefill_lm", "decode")
OUTSIDE_STAGES = "[launched outside every stage range]"
DEVICE_CATS = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
GRAPH_LAUNCH = "cudaGraphLaunch"
STAGE_TOP_KERNELS = 5


def _innermost(ranges: list[tuple[float, float, str]], ts: float) -> str | None:
    """Name of the innermost range (sorted by start) containing ``ts``; ranges nest, so the latest start wins."""
    best: str | None = None
    for start, end, name in ranges:
        if start > ts:
            break
        if start <= ts <= end:
            best = name
    return best


def stream_busy_us(kernels: list[dict[str, Any]]) -> dict[int, float]:
    """Each device event's share of its stream's busy time (µs, by ``id`` of the event): its duration from the
    later of its start and the end of everything before it on the same stream (device ``pid``, stream ``tid``).
    One stream runs its work in order, so only an overlap with the previous work (a programmatic dependent
    launch's programs waiting for it) is cut; the shares then add up to the time the stream was busy.  Work on
    different streams may overlap and is counted in full."""
    return {key: busy for key, (busy, _idle) in stream_shares_us(kernels).items()}


def stream_shares_us(kernels: list[dict[str, Any]]) -> dict[int, tuple[float, float]]:
    """Each device event's (busy, idle) µs on its stream, by ``id`` of the event: busy as :func:`stream_busy_us`
    counts it; idle from the end of everything before it on the same stream to its start, when it starts later
    (the stream waited: on a launch, on the host), 0 for a stream's first event.  Per stream, busy + idle add up
    to the span from its first start to its last end."""
    return {id(e): (busy, idle) for e, busy, idle, _ in stream_walk(kernels)}


def stream_walk(kernels: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], float, float, dict[str, Any] | None]]:
    """Each stream's device events in start order, each as (event, busy µs, idle µs, the event whose end the
    stream had reached before it: the latest-ending one so far, None for a stream's first) — the walk behind
    :func:`stream_shares_us`, with what an idle gap waited after (e.g. the last kernel of a graph replay)."""
    by_stream: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for k in kernels:
        by_stream.setdefault((k.get("pid"), k.get("tid")), []).append(k)
    for evs in by_stream.values():
        frontier = -math.inf
        last: dict[str, Any] | None = None
        for e in sorted(evs, key=lambda e: float(e["ts"])):
            start = float(e["ts"])
            end = start + float(e.get("dur", 0))
            busy = max(0.0, end - max(start, frontier))
            yield e, busy, (max(0.0, start - frontier) if frontier > -math.inf else 0.0), last
            if end > frontier:
                frontier, last = end, e


def kernel_attribution(events: list[dict[str, Any]], top_k: int) -> KernelAttribution | None:
    """Kernel table and per-stage device time from the trace's events; None when the trace holds no kernel.

    A kernel's correlation id names the runtime call that launched it (``cudaLaunchKernel``, or
    ``cudaGraphLaunch`` for every kernel of a CUDA-graph replay); that call's host timestamp falls inside the
    host range (``user_annotation``) it was made from, which names the stage.  A kernel whose launch is not
    in the trace falls back to the GPU-timeline range (``gpu_user_annotation``) it ran in.

    Each kernel counts from the end of the one before it on its stream (:func:`stream_busy_us`): under
    programmatic dependent launches a kernel's programs start, and wait, while its predecessor finishes, and
    summing raw durations would count that stretch twice.
    """
    kernels = [e for e in events if e.get("cat") in DEVICE_CATS and e.get("ph") == "X"]
    if not kernels:
        return None
    busy = stream_busy_us(kernels)
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in (e.get("args") or {})
    }
    host_ranges: dict[Any, list[tuple[float, float, str]]] = {}
    for e in events:
        if e.get("cat") == "user_annotation" and e.get("name") in RANGE_STAGE:
            start = float(e["ts"])
            host_ranges.setdefault(e.get("tid"), []).append((start, start + float(e.get("dur", 0)), e["name"]))
    gpu_ranges = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"])
        for e in events
        if e.get("cat") == "gpu_user_annotation" and e.get("name") in RANGE_STAGE
    )
    for ranges in host_ranges.values():
        ranges.sort()
    by_name: dict[str, list[float]] = {}
    by_stage: dict[str, list[float]] = {}  # stage -> [device us, calls, graph-replayed us]
    by_stage_name: dict[tuple[str, str], list[float]] = {}  # (stage, kernel) -> [device us, calls]
    graph_corr: set[Any] = set()
    for k in kernels:
        dur = busy[id(k)]
        launch = launches.get((k.get("args") or {}).get("correlation"))
        if launch is not None:
            where = _innermost(host_ranges.get(launch.get("tid"), []), float(launch["ts"]))
            graphed = launch.get("name") == GRAPH_LAUNCH
            if graphed:
                graph_corr.add(launch["args"]["correlation"])
        else:
            where = _innermost(gpu_ranges, float(k["ts"]))
            graphed = False
        stage = RANGE_STAGE.get(where or "", OUTSIDE_STAGES)
        name_acc = by_name.setdefault(str(k.get("name")), [0.0, 0.0])
        name_acc[0] += dur
        name_acc[1] += 1
        pair = by_stage_name.setdefault((stage, str(k.get("name"))), [0.0, 0.0])
        pair[0] += dur
        pair[1] += 1
        acc = by_stage.setdefault(stage, [0.0, 0.0, 0.0])
        acc[0] += dur
        acc[1] += 1
        acc[2] += dur if graphed else 0.0
    total_us = sum(v[0] for v in by_name.values())

    def pct(us: float) -> float:
        return 100.0 * us / total_us if total_us > 0 else 0.0

    rows = sorted(by_name.items(), key=lambda kv: kv[1][0], reverse=True)
    kernel_rows = [
        KernelRow(name=n, calls=int(c), device_ms=us / 1e3, mean_device_us=us / c, pct_of_device=pct(us))
        for n, (us, c) in rows[:top_k]
    ]
    order = [*STAGE_ORDER, OUTSIDE_STAGES]

    def stage_top(stage: str, stage_us: float) -> list[KernelRow]:
        mine = sorted(((n, v) for (st, n), v in by_stage_name.items() if st == stage), key=lambda kv: -kv[1][0])
        return [
            KernelRow(
                name=n,
                calls=int(c),
                device_ms=us / 1e3,
                mean_device_us=us / c,
                pct_of_device=100.0 * us / stage_us if stage_us > 0 else 0.0,
            )
            for n, (us, c) in mine[:STAGE_TOP_KERNELS]
        ]

    stages = [
        StageDeviceTime(
            stage=s,
            device_ms=v[0] / 1e3,
            calls=int(v[1]),
            graph_replayed_ms=v[2] / 1e3,
            pct_of_device=pct(v[0]),
            top_kernels=stage_top(s, v[0]),
        )
        for s in order
        if (v := by_stage.get(s)) is not None
    ]
    attributed_us = sum(v[0] for s, v in by_stage.items() if s != OUTSIDE_STAGES)
    return KernelAttribution(
        device_total_ms=total_us / 1e3,
        attributed_pct=pct(attributed_us),
        graph_launches=len(graph_corr),
        n_kernel_names=len(by_name),
        stream_overlap_ms=(sum(float(k.get("dur", 0)) for k in kernels) - total_us) / 1e3,
        kernels=kernel_rows,
        stages=stages,
    )


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """``intervals`` (start, end) sorted, with overlapping or touching ones merged into one."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _range_occurrences(
    events: list[dict[str, Any]], names: tuple[str, ...]
) -> dict[str, list[list[tuple[float, float]]]]:
    """Per named range, its occurrences' GPU-timeline intervals (µs): one merged list per host occurrence.

    Kineto writes one device-side mirror (``gpu_user_annotation``) per host occurrence *and stream*: its user-event
    map is keyed by device and stream, and the mirror carries the host occurrence's ``External id``.  One occurrence
    whose work runs on two streams at once (the fast prefill: the global view's chain, the shared experts' stream)
    has two overlapping mirrors; adding their lengths counted the overlap twice (round 22's GPU suite: a prefill span
    of 17.7 ms against 16.2 ms of CUDA events).  So the mirrors of one occurrence are merged into their union, and
    occurrences stay apart: summed, as a CUDA-event pair around each of them is (SAM on the tiles' chain and on the
    global view's is two occurrences, each timed by its own hook).  A mirror without an ``External id`` is an
    occurrence of its own."""
    groups: dict[tuple[str, object], list[tuple[float, float]]] = {}
    for i, e in enumerate(events):
        if e.get("cat") == "gpu_user_annotation" and e.get("name") in names:
            start = float(e["ts"])
            occurrence = (e.get("args") or {}).get("External id", ("no id", i))
            groups.setdefault((e["name"], occurrence), []).append((start, start + float(e.get("dur", 0))))
    out: dict[str, list[list[tuple[float, float]]]] = {}
    for (name, _), intervals in groups.items():
        out.setdefault(name, []).append(_merged(intervals))
    return out


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def trace_range_spans_ms(
    events: list[dict[str, Any]], names: tuple[str, ...] = RANGE_NAMES
) -> dict[str, tuple[float, float]]:
    """Per named range: (GPU-side span, kernel busy time inside it) in ms, from the trace's events.

    The span is per host occurrence the union of the range's device-side mirrors over the streams it ran on, summed
    over occurrences (what a CUDA-event pair around each occurrence measures; :func:`_range_occurrences`).  The busy
    time is, per occurrence, how long at least one kernel lying wholly inside its span was running (concurrent
    kernels on two streams count once), so busy / span is the GPU utilisation and never exceeds 1.
    """
    kernels = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events if e.get("cat") == "kernel"]
    out: dict[str, tuple[float, float]] = {}
    for name, occurrences in _range_occurrences(events, names).items():
        span = busy = 0.0
        for intervals in occurrences:
            inside = [(k0, k1) for k0, k1 in kernels if any(r0 <= k0 and k1 <= r1 for r0, r1 in intervals)]
            span += _length(intervals)
            busy += _length(_merged(inside))
        out[name] = (span / 1e3, busy / 1e3)
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
    rows, total_ms, sort_key, note = operator_table(prof, on_device, top_k)
    trace_file = None
    raw = out_dir / "trace.json"
    events: list[dict[str, Any]] = []
    if export_trace or on_device:  # on CUDA the trace is where kernels meet their launches and ranges
        prof.export_chrome_trace(str(raw))
        if on_device:
            with open(raw) as fh:
                events = json.load(fh).get("traceEvents", [])
        if export_trace:
            with open(raw, "rb") as src, gzip.open(out_dir / "trace.json.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            trace_file = "trace.json.gz"
        raw.unlink()
    attribution = kernel_attribution(events, top_k) if on_device else None
    ranges = trace_range_spans_ms(events)
    if attribution is not None:
        kernels_reason = None
    elif on_device:
        kernels_reason = "the profiler trace holds no device kernel (CUPTI saw no activity)"
    else:
        kernels_reason = "no device kernels: the profiler pass ran without CUDA activity (CPU run)"
    summary = ProfileSummary(
        page_id=page_id,
        max_new_tokens=max_new_tokens,
        sort_key=sort_key,
        total_self_ms=total_ms,
        operators=rows,
        range_ms=range_times_ms(prof),
        trace_file=trace_file,
        range_device_ms={name: span for name, (span, _) in ranges.items()},
        range_busy_ms={name: busy for name, (_, busy) in ranges.items()},
        kernels=attribution,
        kernels_reason=kernels_reason,
        total_note=note,
    )
    return summary, result
