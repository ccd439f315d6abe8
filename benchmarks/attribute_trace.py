"""Kernel attribution of a committed profiler trace: device time per stage and the top kernels.

Re-reads a run's ``trace.json.gz`` (the profiler pass) with ``torch_profiler.kernel_attribution``, the code
that writes the kernel table of new runs' operators.md, so runs committed before that table existed can be
read the same way:

    PYTHONPATH=src python benchmarks/attribute_trace.py benchmarks/results/h200-fast/trace.json.gz [--top 10]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from llm_perf_opt.profiling.torch_profiler import kernel_attribution, trace_range_spans_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    with gzip.open(args.trace, "rt") as fh:
        events = json.load(fh).get("traceEvents", [])
    att = kernel_attribution(events, args.top)
    if att is None:
        raise SystemExit(f"{args.trace}: no device kernels in the trace (a CPU run?)")
    print(f"# {args.trace}\n")
    print(
        f"{att.device_total_ms:,.3f} ms of device time, {att.attributed_pct:.2f} % attributed to a stage; "
        f"{att.graph_launches} CUDA-graph launches; {att.n_kernel_names} kernel names.\n"
    )
    print("| stage | device ms | kernels | graph-replayed ms | % |\n|---|---:|---:|---:|---:|")
    for s in att.stages:
        print(f"| {s.stage} | {s.device_ms:,.3f} | {s.calls:,} | {s.graph_replayed_ms:,.3f} | {s.pct_of_device:.2f} |")
    print("\n| stage | kernel | calls | device ms | mean µs | % of the stage |\n|---|---|---:|---:|---:|---:|")
    for s in att.stages:
        for k in s.top_kernels:
            name = k.name if len(k.name) <= 80 else k.name[:79] + "…"
            cells = [s.stage, f"`{name}`", f"{k.calls:,}", f"{k.device_ms:,.3f}", f"{k.mean_device_us:,.2f}"]
            print("| " + " | ".join([*cells, f"{k.pct_of_device:.2f}"]) + " |")
    print("\n| kernel | calls | device ms | mean µs | % |\n|---|---:|---:|---:|---:|")
    for k in att.kernels:
        name = k.name if len(k.name) <= 80 else k.name[:79] + "…"
        print(f"| `{name}` | {k.calls:,} | {k.device_ms:,.3f} | {k.mean_device_us:,.2f} | {k.pct_of_device:.2f} |")
    spans = trace_range_spans_ms(events)
    print("\n| range | GPU span ms | kernel busy ms |\n|---|---:|---:|")
    for n, (span, busy) in sorted(spans.items()):
        print(f"| {n} | {span:,.3f} | {busy:,.3f} |")


if __name__ == "__main__":
    main()
