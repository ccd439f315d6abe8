"""stakeholder_summary.md (one screen for people who will not read the tables) and assumptions.md (every
modelling assumption behind the run's derived figures), both rendered from RunSummary like report.md."""

from __future__ import annotations

from typing import Any

from llm_perf_opt.report.format import stage_label
from llm_perf_opt.results.types import RunSummary, Stats

NA = "n/a"


def _num(value: float | None, unit: str, digits: int = 2) -> str:
    return NA if value is None else f"{value:,.{digits}f} {unit}"


def _median(st: Stats | None, unit: str) -> str:
    """Median with its 95 % interval when there is one."""
    if st is None:
        return NA
    text = _num(st.p50, unit)
    if st.median_ci95_low is not None and st.median_ci95_high is not None:
        text += f" (95 % CI {st.median_ci95_low:,.2f} – {st.median_ci95_high:,.2f})"
    return text + f", n={st.n}"


def stage_shares(s: RunSummary) -> list[tuple[str, float]]:
    """Mean ms per page of each disjoint stage a user waits for (host preprocessing, vision, LM prefill, decode),
    largest first.  Absent stages are left out, not counted as 0."""

    def mean(key: str) -> float | None:
        st = s.aggregates.get(key)
        return st.mean if st is not None else None

    pre, vis, pref, dec = mean("preprocess_ms"), mean("vision_ms"), mean("prefill_ms"), mean("decode_ms")
    parts = {
        "host preprocessing": pre,
        stage_label(s, "vision (SAM + CLIP + projector)"): vis,
        "prefill LM (first token)": None if pref is None or vis is None else max(pref - vis, 0.0),
        "decode (tokens 2..N)": dec,
    }
    return sorted(((k, v) for k, v in parts.items() if v is not None), key=lambda kv: -kv[1])


def render_stakeholder_summary(s: RunSummary) -> str:
    cfg: dict[str, Any] = s.run.config
    infer = cfg.get("infer", {}) or {}
    device = s.hardware.gpu_name or s.hardware.device
    lines = [
        f"# Summary — {s.model.name} on {device}\n",
        f"Run `{s.run.run_id}` ({s.run.status}), {len(s.ok_pages)} page runs over "
        f"{len({p.page_id for p in s.pages})} page(s), token cap {infer.get('max_new_tokens')}, weights: "
        f"{s.model.weights}. Details: [report.md](report.md); assumptions: [assumptions.md](assumptions.md).\n",
    ]
    if s.quality is not None:
        lines.append(s.quality.line() + "\n")
    shares = stage_shares(s)
    total = sum(v for _, v in shares)
    if shares and total > 0:
        top, top_ms = shares[0]
        lines.append(f"**Where the time goes:** {top} dominates — {100 * top_ms / total:.0f} % of a page's time "
                     f"({top_ms:,.1f} of {total:,.1f} ms per page, mean).\n")  # fmt: skip
        lines += [f"- {k}: {v:,.1f} ms ({100 * v / total:.0f} %)" for k, v in shares]
        lines.append("")
        if top.startswith("decode"):
            watch = ("TPOT (ms per output token, median)", s.aggregates.get("tpot_ms"), "ms/token",
                     "decode dominates, so the time per output token sets the page time")  # fmt: skip
        elif top.startswith("host"):
            watch = ("host preprocessing per page (median)", s.aggregates.get("preprocess_ms"), "ms",
                     "the host, not the model, is the bottleneck")  # fmt: skip
        else:
            watch = ("TTFT (time to first token, median)", s.aggregates.get("prefill_ms"), "ms",
                     "vision + prefill dominate, so the first token sets the page time")  # fmt: skip
        label, st, unit, why = watch
        lines.append(f"**The one figure to watch:** {label} = {_median(st, unit)} — {why}.\n")
    else:
        lines.append("**Where the time goes:** n/a (no page was measured).\n")
    headline = [
        ("TTFT (median)", _median(s.aggregates.get("prefill_ms"), "ms")),
        ("TPOT (median)", _median(s.aggregates.get("tpot_ms"), "ms/token")),
        ("end to end per page (median)", _median(s.aggregates.get("e2e_ms"), "ms")),
    ]
    lines += ["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in headline]
    rw = s.runaway
    if rw is not None and rw.runaway:
        lines.append(
            f"\n**Runaway pages:** {rw.runaway} of {rw.page_runs} page runs ({100 * rw.share_of_page_runs:.0f} %) hit "
            f"the token cap or looped, taking {_pct(rw.share_of_decode_time)} of decode time."
        )
    if s.model.weights == "dummy":
        lines.append(
            f"\nWeights are random (dummy): timings and FLOPs are those of this model's shapes "
            f"({s.model.params_total:,} parameters), its decoded text and stopping points are not a trained model's."
        )
    if s.failed_pages:
        lines.append(f"\n{len(s.failed_pages)} page run(s) failed; see report.md.")
    return "\n".join(lines) + "\n"


def _pct(v: float | None) -> str:
    return NA if v is None else f"{100 * v:.0f} %"


def render_assumptions(s: RunSummary) -> str:
    cfg: dict[str, Any] = s.run.config
    infer = cfg.get("infer", {}) or {}
    prof = cfg.get("profiling", {}) or {}
    mode = infer.get("context_len_mode") or "auto"
    context = {
        "auto": "each decode step at its real context (prompt + tokens generated so far)",
        "max": "every decode step at prompt + infer.max_new_tokens (the original convention: an upper bound)",
        "fixed": f"every decode step at infer.context_len_fixed = {infer.get('context_len_fixed')} keys",
    }.get(str(mode), str(mode))
    hw = s.hardware
    clock = "CUDA events on the stream" if hw.device.startswith("cuda") else "host clock (perf_counter)"
    items = [
        (
            "Timing",
            [
                stage_label(s, "Prefill (TTFT) = vision (SAM, CLIP, projector)")
                + " + the first language-model forward, ending when token 1 exists; host preprocessing (image "
                "decode, resize, tiling) is timed separately, not in TTFT.",
                "Decode = tokens 2..N, one forward each on the KV cache; TPOT = decode time ÷ (tokens − 1).",
                f"Clock: {clock}; "
                f"{prof.get('warmup_rounds', 'n/a')} warm-up round(s) before the timed repeats; the profiler pass is "
                "separate and not in the statistics.",
            ],
        ),
        (
            "Statistics",
            [
                "Pooled over pages × repeats. Centre: the median, with a distribution-free 95 % interval from order "
                "statistics (scipy.stats.quantile_test; none below 6 samples). The Student-t 95 % interval of the mean "
                "is shown only with no outlier and when it lies inside the data.",
                "Outlier: a sample above 3× the median of its metric (the quality line: 3× the page's median).",
            ],
        ),
        (
            "FLOPs and MFU",
            [
                "One multiply-add = 2 FLOPs everywhere (fvcore's multiply-add counts are doubled).",
                "Analytic FLOPs follow each page's real shapes: image views, prompt length, activated experts only "
                "(top-k routed + shared per token).",
                f"Decode FLOPs: infer.context_len_mode={mode}: {context}.",
                "MFU = Σ FLOPs ÷ Σ seconds over measured pages ÷ peak FLOP/s (time-weighted, not a mean of ratios).",
                f"Peak FLOP/s: {_rate(hw.peak_flops_per_s, 'FLOP/s')} ({hw.peak_flops_source or 'none'}); "
                f"peak bandwidth: {_rate(hw.peak_bw_bytes_per_s, 'B/s')} ({hw.peak_bw_source or 'none'}). "
                "Decimal prefixes (1 T = 10¹²) for both; memory sizes (weights, KV cache, peaks) are binary "
                "(GiB = 2³⁰ B).",
            ],
        ),
        (
            "Bytes and MBU (modelled, not measured)",
            [
                "Decode bytes = activated weights read per step + the KV cache read over the live context + the new "
                "K/V written; activations ignored: a lower bound, so MBU is a lower bound too.",
                "Other stages: bytes ≥ weights + stage inputs/outputs (lower bound); FLOP/byte is then an upper bound, "
                "enough to place a stage on the roofline's compute- or memory-bound side.",
            ],
        ),
        (
            "Runaway pages",
            [
                f"A page run is runaway when it hits the token cap ({infer.get('max_new_tokens')}) or its last "
                f"{s.runaway.window_tokens if s.runaway else 48} tokens repeat with a period of at most "
                f"{s.runaway.max_period if s.runaway else 16} tokens.",
            ],
        ),
        (
            "Measurement quality",
            [
                "Noisy when a stage varies > 15 % (CV) between repeats of a page, > 1 % of decode steps (or any "
                "repeat of another stage) exceed 3× their page's median, other processes use > 25 % of the usable "
                "cores, the run queue during the run exceeds the host's CPUs (backed out of the 1-minute load "
                "average's 5-s updates: the minute before the run is not counted), or NVML saw the GPU clocks "
                "lowered (power/thermal).",
            ],
        ),
        (
            "Model and weights",
            [
                f"Weights: {s.model.weights} ({s.model.dtype}). Dummy (random) weights give this model's shapes and "
                f"FLOPs ({s.model.params_total:,} parameters) but not a trained model's text, stopping points or "
                "expert routing.",
                f"Decoding: temperature {infer.get('temperature')}, no_repeat_ngram_size "
                f"{infer.get('no_repeat_ngram_size')}, ignore_eos {infer.get('ignore_eos')}.",
            ],
        ),
    ]
    lines = [
        f"# Assumptions — run `{s.run.run_id}`\n",
        "Every modelling choice behind the derived figures of [report.md](report.md). Measured figures (times, "
        "memory peaks, energy) rest only on the timing rules.\n",
    ]
    for title, bullets in items:
        lines.append(f"## {title}\n")
        lines += [f"- {b}" for b in bullets]
        lines.append("")
    return "\n".join(lines)


def _rate(value: float | None, unit: str) -> str:
    if value is None:
        return NA
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:,.2f} {prefix}{unit}"
    return f"{value:,.0f} {unit}"
