"""report.md, operators.md and predictions.md, rendered from RunSummary (nothing is computed twice).

"n/a" always comes with a reason in the "Not measured" section; no figure is shown as 0 when it was not
measured.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from llm_perf_opt.report.batched import render_batches
from llm_perf_opt.report.format import (
    NA,
    STAT_HEADER,
    fmt,
    fmt_bytes,
    fmt_bytes_dec,
    fmt_flops,
    fmt_pct,
    fmt_rate_bytes,
    md_escape,
    na,
    stage_label,
    stat_row,
    table,
)
from llm_perf_opt.report.operators import operator_table
from llm_perf_opt.results.types import (
    UNATTRIBUTED,
    PageRecord,
    RunSummary,
    Unavailable,
)

DECODE_KEYS = ("decode_ms", "tpot_ms", "decode_tok_s", "decode_step_p50_ms", "decode_step_p90_ms", "decode_step_p99_ms")


def missing_reason(s: RunSummary, key: str) -> str:
    """Why ``key`` has no aggregate: the run's own Unavailable entry, else the cause the records show."""
    by_metric = {u.metric: u.reason for u in s.unavailable}
    for metric in (key, key.removesuffix("_ms").removesuffix("_bytes")):
        if metric in by_metric:
            return by_metric[metric]
    ok = s.ok_pages
    if not ok:
        return "no page was measured"
    if key.startswith("energy") and "energy" in by_metric:
        return by_metric["energy"]
    if key.startswith("peak_mem_"):
        return by_metric.get("peak_mem_allocated_bytes", "not a CUDA run: the allocator's peaks exist on CUDA only")
    if key in DECODE_KEYS and all((p.generated_tokens or 0) < 2 for p in ok):
        return "no decode step: every page produced at most 1 token (infer.max_new_tokens=1 or eos first)"
    if key in ("sam_ms", "clip_ms", "projector_ms"):
        return f"the backend ({s.model.backend}) has no hooked {key.removesuffix('_ms')} module"
    if key == "kv_cache_bytes":
        return f"the backend ({s.model.backend}) keeps its own KV cache"
    return "no page recorded it"


LATENCY_ROWS = [
    ("TTFT (prefill: vision + first LM forward)", "prefill_ms", "ms"),
    ("  vision (SAM + CLIP + projector + layout)", "vision_ms", "ms"),
    ("    SAM", "sam_ms", "ms"),
    ("    CLIP", "clip_ms", "ms"),
    ("    projector", "projector_ms", "ms"),
    ("decode (tokens 2..N)", "decode_ms", "ms"),
    ("TPOT (decode ms / (tokens − 1))", "tpot_ms", "ms/token"),
    ("decode throughput", "decode_tok_s", "tok/s"),
    ("decode step p50 (per page)", "decode_step_p50_ms", "ms"),
    ("decode step p99 (per page)", "decode_step_p99_ms", "ms"),
    ("preprocess (host)", "preprocess_ms", "ms"),
    ("end to end (preprocess + prefill + decode)", "e2e_ms", "ms"),
    ("tokens generated", "generated_tokens", "tokens"),
    ("prompt length (text + image tokens)", "prompt_tokens", "tokens"),
    ("energy per page", "energy_j", "J"),
    ("energy per output token", "energy_per_token_j", "J/token"),
]


def _preset_text(cfg: dict[str, Any]) -> str:
    """The infer preset (reference infer() or a deployment such as vLLM) and its tile cap: config.yaml records the
    geometry that ran in ``model.preprocess`` (a preset's override folded in), so the cap is read there."""
    infer = cfg.get("infer") or {}
    pp = (cfg.get("model") or {}).get("preprocess") or {}
    name = str(infer.get("preset") or na("the run's config records no infer.preset"))
    if infer.get("mode"):
        name = f"{name} (mode {infer['mode']})"
    if not pp:
        return name
    if not pp.get("crop_mode"):
        return f"{name}: one view, no tiles"
    cap = pp.get("max_crops")
    return f"{name}: at most {cap} tiles" if cap is not None else f"{name}: tile cap not recorded"


def _ngram_extras(cfg: dict[str, Any]) -> str:
    infer = cfg.get("infer") or {}
    extras = []
    if infer.get("no_repeat_ngram_window") is not None:
        extras.append(f"window {infer['no_repeat_ngram_window']}")
    if infer.get("no_repeat_ngram_exempt_ids"):
        extras.append(f"exempt ids {list(infer['no_repeat_ngram_exempt_ids'])}")
    if infer.get("no_repeat_ngram_scope"):
        extras.append(f"over {'prompt + output' if infer['no_repeat_ngram_scope'] == 'sequence' else 'the output'}")
    return f" ({', '.join(extras)})" if extras else ""


def render_report(s: RunSummary, plots: dict[str, str] | None = None) -> str:
    plots = plots or {}
    r = s.run
    out: list[str] = []
    status = r.status.upper() + (f" — {r.status_reason}" if r.status_reason else "")
    out.append(f"# Stage-1 profile — {s.model.name} on {s.hardware.gpu_name or s.hardware.device}\n")
    out.append(
        f"**Status: {status}**  \nrun `{r.run_id}` · started {r.started_at} · "
        f"finished {r.finished_at or na('still running')}"
        f" · commit `{r.git_commit or na('not a git checkout')}`\n"
    )
    ok, failed = s.ok_pages, s.failed_pages
    if s.quality is not None:
        out.append(s.quality.line() + "  ")
        out.append(_host_line(s) + "\n")
    out.append(
        f"{len(ok)} page runs measured, {len(failed)} failed. Timing rules: prefill = vision + the first "
        "language-model forward, ending when token 1 exists (TTFT, host preprocessing excluded); decode = "
        "tokens 2..N, one forward each on the KV cache; CUDA events on CUDA, host clock on CPU. "
        "Statistics are over pages × repeats: the median with its distribution-free 95 % interval (order "
        "statistics, inside the data) leads; the mean's 95 % interval is shown only where it is meaningful. "
        "One-screen summary: [stakeholder_summary.md](stakeholder_summary.md); modelling assumptions: "
        "[assumptions.md](assumptions.md).\n"
    )

    out.append("## Setup\n")
    cfg = r.config
    rows = [
        ["model", f"{s.model.name} ({s.model.backend}, weights: {s.model.weights}, {s.model.dtype})"],
        [
            "parameters",
            f"{s.model.params_total:,} total; {_activated(s)} activated per decode token (incl. lm_head)",
        ],
        ["weights in memory", fmt_bytes(s.model.weights_bytes)],
        ["tokenizer", s.model.tokenizer],
        ["device", f"{s.hardware.device} — {s.hardware.gpu_name or s.hardware.cpu}"],
        [
            "torch / CUDA / driver",
            f"{s.hardware.torch} / {s.hardware.cuda or na('CPU build')} / {s.hardware.driver or na('no GPU driver')}",
        ],
        [
            "peak FLOP/s used for MFU",
            f"{fmt_flops(s.hardware.peak_flops_per_s)}/s — source: {s.hardware.peak_flops_source or NA}"
            if s.hardware.peak_flops_per_s
            else na(s.hardware.peak_flops_source or "no peak known"),
        ],
        [
            "peak bandwidth used for MBU",
            f"{fmt_rate_bytes(s.hardware.peak_bw_bytes_per_s)} — source: {s.hardware.peak_bw_source or NA}"
            if s.hardware.peak_bw_bytes_per_s
            else na(s.hardware.peak_bw_source or "no peak known"),
        ],
        ["dataset", f"{cfg.get('dataset', {}).get('name')} ({len({p.page_id for p in s.pages})} pages)"],
        ["repeats × token cap", f"{cfg.get('repeats')} × {cfg.get('infer', {}).get('max_new_tokens')}"],
        ["preset", _preset_text(cfg)],
        ["image geometry", _geometry(cfg.get("model", {}).get("preprocess") or {})],
        [
            "decoding",
            f"temperature {cfg.get('infer', {}).get('temperature')}, "
            f"no_repeat_ngram_size {cfg.get('infer', {}).get('no_repeat_ngram_size')}{_ngram_extras(cfg)}, "
            f"ignore_eos {cfg.get('infer', {}).get('ignore_eos')}",
        ],
        [
            "optimisations",
            ", ".join(f"{k}={'on' if v else 'off'}" for k, v in s.model.optimisations.items())
            or na("none reported by the backend"),
        ],
    ]
    out.append(table(["", ""], rows) + "\n")

    out.append("## Latency and throughput\n")
    rows = [
        stat_row(stage_label(s, label), s.aggregates.get(key), unit, reason=missing_reason(s, key))
        for label, key, unit in LATENCY_ROWS
    ]
    out.append(table(STAT_HEADER, rows) + "\n")
    if s.model.optimisations.get("vision_streams") and s.model.optimisations.get("clip_merged_views"):
        out.append(
            "SAM's time overlaps: with `infer.fast.vision_streams` a page's global view runs through SAM on a second "
            "CUDA stream beside its crops, so SAM's time (its crops' and its global view's intervals) includes time "
            "the two views shared the GPU; it can sum with CLIP and the projector to more than the vision time, and "
            "SAM's MFU reads low. CLIP then runs once over both views' tokens (`infer.fast.clip_merged_views`); "
            "`infer.fast.vision_streams=false` times the views' SAM one after the other.\n"
        )
    elif s.model.optimisations.get("vision_streams"):
        out.append(
            stage_label(s, "SAM, CLIP and projector overlap")
            + ": with `infer.fast.vision_streams` a page's global view runs on a second "
            "CUDA stream beside its crops, so each stage's time (its crops' and its global view's intervals) "
            "includes time the two views shared the GPU. The three can sum to more than the vision time, and "
            "per-stage MFU reads low; `infer.fast.vision_streams=false` times the views one after the other.\n"
        )
    if s.runaway is not None:
        out.append(_render_runaway(s) + "\n")

    out.append("## Memory\n")
    mem_rows = [
        ["weights", fmt_bytes(s.model.weights_bytes)],
        ["KV cache (preallocated, per page, mean)", _or_na(fmt_bytes(_mean(s, "kv_cache_bytes")), s, "kv_cache_bytes")],
        ["peak allocated (CUDA, max over pages)",
         _or_na(fmt_bytes(_max(s, "peak_mem_allocated_bytes")), s, "peak_mem_allocated_bytes")],
        ["peak reserved (CUDA, max over pages)",
         _or_na(fmt_bytes(_max(s, "peak_mem_reserved_bytes")), s, "peak_mem_reserved_bytes")],
        [_rss_label(s), _or_na(fmt_bytes(_max(s, "peak_rss_bytes")), s, "peak_rss_bytes")],
    ]  # fmt: skip
    out.append("Memory sizes are binary (KiB/MiB/GiB = 2¹⁰/2²⁰/2³⁰ bytes); rates elsewhere are decimal.\n")
    out.append(table(["", ""], mem_rows) + "\n")

    if s.flops or s.efficiency:
        out.append(_render_efficiency(s))
    if "stage_breakdown" in plots or "decode_steps" in plots:
        out.append("## Plots\n")
        for key, title in (
            ("stage_breakdown", "Where the time goes"),
            ("decode_steps", "Per-token decode latency"),
            ("latency_distribution", "Latency across repeats"),
            ("roofline", "Roofline (bytes modelled, a lower bound: points sit at or left of the truth)"),
        ):
            if key in plots:
                out.append(f"**{title}**\n\n![{title}]({plots[key]})\n")

    out.append("## Pages\n")
    out.append(_render_pages(s) + "\n")
    if failed:
        out.append("## Failed pages\n")
        out.append(
            table(
                ["page", "repeat", "error type", "reason"],
                [
                    [p.page_id, str(p.repeat), p.error_type or NA, " ".join((p.error or "").split()).replace("|", "/")]
                    for p in failed
                ],
            )
            + "\n"
        )
    flagged = [p for p in ok if p.flags]
    if flagged:
        out.append("## Flags\n")
        out.extend(f"- `{md_escape(p.page_id)}` repeat {p.repeat}: {'; '.join(p.flags)}" for p in flagged)
        out.append("")

    if s.profile is not None:
        prof = s.profile
        out.append("## Profiler pass (top operators)\n")
        out.append(
            f"One PyTorch-profiler pass on `{prof.page_id}` with {prof.max_new_tokens} new tokens, separate "
            f"from the timed repeats. Sorted by {prof.sort_key.replace('_', ' ')}; total self time "
            f"{prof.total_self_ms:,.2f} ms. Full table: [operators.md](operators.md)"
            + (f"; trace: [{prof.trace_file}]({prof.trace_file}) (open in Perfetto)" if prof.trace_file else "")
            + ".\n"
        )
        out.append(operator_table(s, limit=10) + "\n")
        if prof.kernels is not None:
            ka = prof.kernels
            top = ", ".join(f"{st.stage} {st.pct_of_device:.1f} %" for st in ka.stages)
            out.append(
                f"Kernel attribution: **{ka.attributed_pct:.2f} %** of the pass's {ka.device_total_ms:,.2f} ms of "
                f"device time is attributed to a stage and a kernel name ({top}; CUDA-graph replays included). "
                "Kernel table and per-stage breakdown: [operators.md](operators.md).\n"
            )
        unattributed = next((o for o in prof.operators if o.name == UNATTRIBUTED), None)
        if unattributed is not None and unattributed.pct_of_total > 50:
            out.append(
                f"{unattributed.pct_of_total:.0f} % of the device time is under no host operator: that is what "
                "kernels replayed from CUDA graphs look like (the fast path's vision, prefill and decode graphs "
                "launch them without any aten op). operators.md attributes them by launch: device time per stage "
                "and the kernels of each stage; "
                "`infer.fast.cuda_graphs=false infer.fast.vision_graphs=false` attributes them to operators, at "
                "un-graphed speed.\n"
            )

    if s.batches:
        out.append(render_batches(s) + "\n")
    if s.moe_routing:
        out.append("## MoE routing\n")
        out.append(_render_routing(s) + "\n")
    missing = list(s.unavailable)
    if plots and "roofline" not in plots:
        missing.append(
            Unavailable(
                "roofline plot",
                "needs both peak FLOP/s and peak bandwidth of the device (set peak.flops_per_s and "
                "peak.bw_bytes_per_s for a device without a sourced peak)",
            )
        )
    if missing:
        out.append("## Not measured\n")
        out.extend(f"- **{u.metric}**: {u.reason}" for u in missing)
        out.append("")
    if s.notes:
        out.append("## Notes\n")
        out.extend(f"- {n}" for n in s.notes)
        out.append("")
    out.append("Artifacts: " + " · ".join(f"[{name}]({name})" for name in artifacts(s)) + "\n")
    return "\n".join(out)


def artifacts(s: RunSummary) -> list[str]:
    """Files of the run directory that this summary implies exist (the README lists them all)."""
    names = ["metrics.json", "stakeholder_summary.md", "assumptions.md", "pages.jsonl", "predictions.md"]
    if s.profile is not None:
        names.append("operators.md")
        if s.profile.trace_file:
            names.append(s.profile.trace_file)
    if any(f.fvcore_flops is not None or f.flop_counter_flops is not None for f in s.flops):
        names += ["static_compute.md", "static_compute.json"]
    if s.batches:
        names.append("batches.jsonl")
    return [*names, "env.json", "inputs.yaml", "config.yaml", "run.log"]


def _host_line(s: RunSummary) -> str:
    q = s.quality
    assert q is not None
    parts = []
    h = q.host
    if h is not None:
        load = f"load average (1 min) {fmt(h.load_1m_mean)} mean, {fmt(h.load_1m_max)} max"
        if h.run_queue_mean is not None:
            load += (
                f", run queue during the run {fmt(h.run_queue_mean)} mean, {fmt(h.run_queue_max)} max over "
                f"{h.run_queue_updates} updates of the average (the minute before backed out; "
                f"{h.load_cpus or h.usable_cores} host CPUs)"
            )
        elif h.run_queue_updates is not None:
            load += f" (updated {h.run_queue_updates} time(s) in the run: mostly the minute before it)"
        other = (
            f"other processes {100 * h.other_cpu_share_mean:.0f} % of the cores "
            f"(max {100 * (h.other_cpu_share_max or 0):.0f} %)"
            if h.other_cpu_share_mean is not None
            else na(h.note or "other processes' CPU share not sampled")
        )
        parts.append(
            f"Host during the run: {h.usable_cores} usable cores; {load}; {other} "
            f"({h.samples} samples every {h.interval_s:g} s)"
        )
        if h.probe_ms_start is not None:
            end = f"{h.probe_ms_end:.2f} ms at the end" if h.probe_ms_end is not None else "no end probe yet"
            parts.append(
                f"Host speed probe ({h.probe_work}): {h.probe_ms_start:.2f} ms at the start, {end}; "
                "`compare` sets it against the other run's"
            )
    if q.cpu_threads:
        parts.append(f"CPU run: {q.cpu_threads}")
    if q.gpu_throttle_reasons:
        parts.append("GPU clock events seen: " + ", ".join(q.gpu_throttle_reasons))
    cv = ", ".join(f"{k} {100 * v:.1f} %" for k, v in q.stage_cv.items())
    if cv:
        parts.append(f"spread (CV, median over pages): {cv}")
    return ". ".join(parts) + "." if parts else ""


def _activated(s: RunSummary) -> str:
    value = s.model.params_activated_per_token
    return fmt(value) if value is not None else na("not derivable for this backend")


def _or_na(text: str, s: RunSummary, key: str) -> str:
    return na(missing_reason(s, key)) if text == NA else text


def _rss_label(s: RunSummary) -> str:
    """What the RSS peak covers: this run (the high-water mark reset before the model loaded), or the process's
    lifetime where the reset was refused (the run's notes say why)."""
    if any(n.startswith("peak_rss_bytes:") for n in s.notes):
        return "peak RSS of the process (host; its lifetime high-water mark: the reset was refused, see Notes)"
    return "peak RSS of the process (host; this run's high-water mark, reset before the model loaded)"


def _render_runaway(s: RunSummary) -> str:
    rw = s.runaway
    assert rw is not None
    lines = [
        "### Runaway pages\n",
        f"A page run is runaway when it hits the token cap or its last {rw.window_tokens} tokens repeat with a "
        f"period of at most {rw.max_period} tokens (a repetition loop). Such pages dominate decode time and distort "
        "tok/s, so decode throughput is given with and without them.\n",
        table(
            ["", "value"],
            [
                ["page runs hitting the token cap", f"{rw.hit_token_cap} of {rw.page_runs}"],
                ["page runs ending in a repetition loop", f"{rw.repetition_loop} of {rw.page_runs}"],
                ["runaway (either)", f"{rw.runaway} ({100 * rw.share_of_page_runs:.0f} % of page runs)"],
                ["their share of decode time",
                 na("no decode time") if rw.share_of_decode_time is None else f"{100 * rw.share_of_decode_time:.0f} %"],
                ["decode tok/s, all page runs (Σ tokens ÷ Σ decode s)",
                 fmt(rw.decode_tok_s_all) if rw.decode_tok_s_all is not None else na("no decode time")],
                ["decode tok/s without runaway page runs",
                 fmt(rw.decode_tok_s_without_runaway) if rw.decode_tok_s_without_runaway is not None
                 else na("every page run is runaway" if rw.runaway == rw.page_runs else "no decode time")],
            ],
        ),
    ]  # fmt: skip
    return "\n".join(lines)


def _mean(s: RunSummary, key: str) -> float | None:
    st = s.aggregates.get(key)
    return st.mean if st else None


def _max(s: RunSummary, key: str) -> float | None:
    st = s.aggregates.get(key)
    return st.max if st else None


def _render_pages(s: RunSummary) -> str:
    by_page: dict[str, list[PageRecord]] = defaultdict(list)
    for p in s.ok_pages:
        by_page[p.page_id].append(p)
    rows = []
    for page_id, recs in by_page.items():
        first = recs[0]

        def mean(key: str, recs: list[PageRecord] = recs) -> float | None:
            vals = [getattr(r, key) for r in recs if getattr(r, key) is not None]
            return sum(vals) / len(vals) if vals else None

        def cell(key: str, digits: int = 2, recs: list[PageRecord] = recs) -> str:
            value = mean(key, recs)
            if value is not None:
                return fmt(value, digits)
            if key in DECODE_KEYS and all((r.generated_tokens or 0) < 2 for r in recs):
                return na("1 token: no decode step")
            return na("not recorded")

        grid = f"{first.crop_grid[0]}×{first.crop_grid[1]}" if first.crop_grid else na("not recorded")
        size = f"{first.size_px[0]}×{first.size_px[1]}" if first.size_px else na("not recorded")
        loops = sorted({r.repetition_period for r in recs if r.repetition_period is not None})
        rows.append(
            [
                f"`{page_id}`",
                size,
                grid,
                fmt(first.n_tiles),
                fmt(first.image_tokens),
                fmt(first.prompt_tokens),
                str(len(recs)),
                cell("generated_tokens", 1),
                f"{sum(1 for r in recs if r.hit_token_cap)} of {len(recs)}",
                ("period " + ", ".join(map(str, loops))) if loops else "no",
                cell("vision_ms"),
                cell("prefill_ms"),
                cell("decode_ms"),
                cell("tpot_ms", 3),
            ]
        )
    header = [
        "page",
        "size px",
        "grid w×h",
        "tiles",
        "image tokens",
        "prompt tokens",
        "runs",
        "tokens out (mean)",
        "hit token cap",
        "repetition loop",
        "vision ms",
        "prefill ms",
        "decode ms",
        "TPOT ms",
    ]
    return table(header, rows)


def _render_efficiency(s: RunSummary) -> str:
    out = [
        "## FLOPs, MFU and MBU\n",
        "FLOPs count one multiply-add as 2 FLOPs everywhere (fvcore's counts, which are multiply-adds, are "
        "doubled). Analytic FLOPs follow the real shapes of each page (image views, prompt length, context length "
        "of every decode step, activated experts only). MFU = achieved FLOP/s ÷ peak FLOP/s of the device. "
        "FLOP/s and bytes are decimal (1 TFLOP = 10¹² FLOP, 1 GB = 10⁹ B), like the peaks; bytes are modelled "
        "(see assumptions.md), not measured.\n",
    ]
    if s.flops:
        rows = []
        counted_off = next((u.reason for u in s.unavailable if u.metric == "flops.counted"), None)
        not_counted = na("profiling.static_compute=false" if counted_off else "not counted: see Notes")
        for f in s.flops:
            flag = " ⚠" if f.flagged else ""

            def counted(text: str) -> str:
                return not_counted if text == NA else text

            rows.append(
                [
                    f.stage,
                    fmt_flops(f.analytic_flops),
                    counted(fmt_flops(f.fvcore_flops)),
                    counted(fmt_flops(f.flop_counter_flops)),
                    counted(fmt_pct(f.rel_diff_fvcore)),
                    counted(fmt_pct(f.rel_diff_flop_counter)) + flag,
                    f.note or "",
                ]
            )
        out.append("### Analytic vs counted FLOPs (representative page)\n")
        out.append(
            table(["stage", "analytic", "fvcore ×2", "FlopCounterMode", "Δ fvcore", "Δ FlopCounter", "note"], rows)
            + "\n"
        )
    if s.efficiency:
        rows = []
        no_peak = na("no peak FLOP/s: see Not measured")
        no_bw = na("no peak bandwidth: see Not measured")
        no_bytes = na("bytes not modelled for this stage")
        for e in s.efficiency:
            rows.append(
                [
                    e.stage,
                    fmt_flops(e.flops),
                    fmt(e.seconds * 1e3, 3) if e.seconds is not None else na("no time"),
                    f"{fmt_flops(e.achieved_flops_per_s)}/s" if e.achieved_flops_per_s else na("no time"),
                    fmt_pct(e.mfu) if e.mfu is not None else no_peak,
                    fmt_bytes_dec(e.bytes_moved) if e.bytes_moved is not None else no_bytes,
                    fmt_pct(e.mbu) if e.mbu is not None else (no_bytes if e.bytes_moved is None else no_bw),
                    fmt(e.arithmetic_intensity, 1) if e.arithmetic_intensity is not None else no_bytes,
                    e.reason or "",
                ]
            )
        out.append("### Efficiency per stage (mean over measured pages)\n")
        out.append(
            table(
                ["stage", "FLOPs / page", "time ms", "achieved", "MFU", "bytes read", "MBU", "FLOP/byte", "note"], rows
            )
            + "\n"
        )
    if s.energy:
        out.append("### Energy and clocks (NVML, during the timed repeats)\n")
        out.append(table(["quantity", "value"], [[_unit_label(k), fmt(v, 2)] for k, v in s.energy.items()]) + "\n")
    return "\n".join(out)


def _unit_label(key: str) -> str:
    for suffix, unit in (("_j", "J"), ("_w", "W"), ("_mhz", "MHz"), ("_c", "°C")):
        if key.endswith(suffix):
            return f"{key.removesuffix(suffix).replace('_', ' ')} ({unit})"
    return key.replace("_", " ")


def _render_routing(s: RunSummary) -> str:
    r = s.moe_routing
    lines = [
        f"Tokens routed per expert, summed over the {r.get('pages', NA)} page(s) of the first timed repeat "
        "(prefill + decode, "
        f"{r.get('tokens', NA)} tokens × top-{r.get('top_k', NA)}). Load imbalance = max ÷ mean tokens per "
        "expert (1.0 = perfectly balanced).\n"
    ]
    rows = [
        [
            str(layer),
            fmt(v.get("experts_hit")),
            fmt(v.get("max_tokens")),
            fmt(v.get("mean_tokens"), 1),
            fmt(v.get("imbalance"), 2),
        ]
        for layer, v in r.get("layers", {}).items()
    ]
    lines.append(table(["layer", "experts hit", "max tokens/expert", "mean tokens/expert", "imbalance"], rows))
    return "\n".join(lines)


def render_predictions(path: Path) -> str:
    lines = ["# Predictions\n"]
    if not path.exists():
        lines.append("_No page finished yet._")
        return "\n".join(lines) + "\n"
    seen: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash: its page's text is lost, the report is not
        if rec["page_id"] in seen:
            continue
        seen.add(rec["page_id"])
        note = (
            "" if rec.get("text_is_meaningful") else " _(dummy weights / stand-in tokenizer: text is not meaningful)_"
        )
        lines.append(f"## `{md_escape(rec['page_id'])}`{note}\n")
        lines.append(f"{len(rec['token_ids'])} tokens.\n")
        lines.append("```text\n" + rec["text"][:4000] + "\n```\n")
    return "\n".join(lines) + "\n"


def _geometry(pp: dict[str, Any]) -> str:
    """The view sizes the run used (config.yaml records them after any resolution mode): global view and tiles."""
    if not pp:
        return na("the run's config records no model.preprocess")
    crops = f"crops {pp.get('min_crops')}–{pp.get('max_crops')} tiles" if pp.get("crop_mode") else "crop off"
    return f"base {pp.get('base_size')} px, tile {pp.get('image_size')} px, {crops}"
