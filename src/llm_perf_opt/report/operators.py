"""operators.md: the host-operator table of the profiler pass and the kernel table with its per-stage attribution
(kernels replayed from CUDA graphs included)."""

from __future__ import annotations

from llm_perf_opt.report.format import fmt, table
from llm_perf_opt.results.types import ProfileSummary, RunSummary


def operator_table(s: RunSummary, limit: int | None = None) -> str:
    assert s.profile is not None
    ops = s.profile.operators[:limit] if limit else s.profile.operators
    on_device = s.profile.sort_key == "self_device_ms"
    header = ["#", "operator", "calls"]
    header += ["self device ms", "total device ms"] if on_device else []
    header += ["self CPU ms", "total CPU ms", "% of total self"]
    rows = []
    for i, op in enumerate(ops, 1):
        row = [str(i), f"`{op.name}`", f"{op.calls:,}"]
        if on_device:
            row += [fmt(op.self_device_ms, 3), fmt(op.total_device_ms, 3)]
        row += [fmt(op.self_cpu_ms, 3), fmt(op.total_cpu_ms, 3), f"{op.pct_of_total:.2f}"]
        rows.append(row)
    return table(header, rows)


def render_operators(s: RunSummary) -> str:
    assert s.profile is not None
    p = s.profile
    shown = sum(op.pct_of_total for op in p.operators)
    lines = [
        f"# Operators — profiler pass on `{p.page_id}` ({p.max_new_tokens} new tokens)\n",
        f"Sorted by {p.sort_key.replace('_', ' ')}. Total self time over **all** operators: "
        f"**{p.total_self_ms:,.3f} ms** (the profiler's own total; self times add up, inclusive 'total' columns do "
        f"not and are shown for reading only). The {len(p.operators)} rows below cover {shown:.2f} % of it.\n",
        operator_table(s),
        "",
    ]
    if p.total_note:
        lines.insert(2, f"Note: {p.total_note}.\n")
    if p.range_checks:
        lines.append("## Cross-check: CUDA-event stage times vs the trace's GPU timeline\n")
        lines.append(
            "Our CUDA events (recorded on the stream at stage edges) against the same ranges' extent on the "
            "trace's GPU timeline (per occurrence the union over the streams its work ran on, occurrences summed "
            "as the events are); kernel busy = the time at "
            "least one kernel was running inside the range (busy ÷ span = GPU utilisation). "
            "The GPU span starts at the range's first kernel, the events at the moment the host enqueued the "
            "marker: for ranges shorter than a kernel launch (the projector) the difference is launch latency, "
            "not an error.\n"
        )
        lines.append(
            table(
                ["range", "CUDA events ms", "GPU span ms", "Δ", "kernel busy ms", "GPU busy"],
                [
                    [
                        c.name,
                        fmt(c.event_ms, 3),
                        fmt(c.gpu_span_ms, 3),
                        f"{100 * c.rel_diff:+.2f} %",
                        fmt(c.kernel_busy_ms, 3),
                        f"{100 * c.kernel_busy_ms / c.gpu_span_ms:.1f} %",
                    ]
                    for c in p.range_checks
                ],
            )
        )
        lines.append("")
    if p.range_ms:
        lines.append("## Named ranges in the pass\n")
        lines.append(
            "Host: inclusive wall time of the range on the host. GPU span: the range's extent on the GPU timeline, "
            "over every stream it ran on "
            "(CUDA runs only; n/a on CPU, where there is no device timeline).\n"
        )
        names = sorted(set(p.range_ms) | set(p.range_device_ms))
        lines.append(
            table(
                ["range", "host ms", "GPU span ms"],
                [[k, fmt(p.range_ms.get(k), 3), fmt(p.range_device_ms.get(k), 3)] for k in names],
            )
        )
        lines.append("")
    lines.append(_render_kernels(p))
    return "\n".join(lines)


def _short_kernel(name: str, width: int = 90) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _render_kernels(p: ProfileSummary) -> str:
    """Device kernels by name and by the stage that launched them (CUDA-graph replays included)."""
    k = p.kernels
    if k is None:
        return f"## Device kernels\n\nNot available: {p.kernels_reason or 'no kernel attribution recorded'}.\n"
    out = [
        "## Device time by stage\n",
        f"Every kernel, memcpy and memset of the pass ({k.device_total_ms:,.3f} ms of device time) mapped to the "
        "stage whose host range launched it (its launch call's correlation id; a CUDA-graph replay's kernels carry "
        f"the id of their `cudaGraphLaunch`, {k.graph_launches} graph launches here). "
        f"**{k.attributed_pct:.2f} %** of the device time is attributed to a stage and a kernel name."
        + (
            f" {k.stream_overlap_ms:,.3f} ms of kernel time overlapped the work before it on its stream (programmatic"
            " dependent launches: a kernel's programs start, and wait, while the one before it finishes) and is not"
            " counted: each kernel counts from the end of the one before it.\n"
            if k.stream_overlap_ms > 0.0005
            else "\n"
        ),
        table(
            ["stage", "device ms", "kernels", "of which graph-replayed ms", "% of device time"],
            [
                [
                    st.stage,
                    fmt(st.device_ms, 3),
                    f"{st.calls:,}",
                    fmt(st.graph_replayed_ms, 3),
                    f"{st.pct_of_device:.2f}",
                ]
                for st in k.stages
            ],
        ),
        "",
        "## Largest kernels of each stage\n",
        table(
            ["stage", "kernel", "calls", "device ms", "mean µs", "% of the stage"],
            [
                [
                    st.stage,
                    f"`{_short_kernel(r.name)}`",
                    f"{r.calls:,}",
                    fmt(r.device_ms, 3),
                    fmt(r.mean_device_us, 2),
                    f"{r.pct_of_device:.2f}",
                ]
                for st in k.stages
                for r in st.top_kernels
            ],
        ),
        "",
        f"## Top device kernels ({len(k.kernels)} of {k.n_kernel_names} names)\n",
        table(
            ["#", "kernel", "calls", "device ms", "mean µs", "% of device time"],
            [
                [
                    str(i),
                    f"`{_short_kernel(r.name)}`",
                    f"{r.calls:,}",
                    fmt(r.device_ms, 3),
                    fmt(r.mean_device_us, 2),
                    f"{r.pct_of_device:.2f}",
                ]
                for i, r in enumerate(k.kernels, 1)
            ],
        ),
        "",
    ]
    return "\n".join(out)
