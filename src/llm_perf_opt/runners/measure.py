"""Feeds the state of a run (session, records, config) into the measurement functions of ``profiling``.

The runner is the only layer that sees both the session and the results: here it picks the inputs
(pages, peaks, NVML summary, routing counters, the model for counted FLOPs) and hands the value objects
back to ``Stage1Run.summary``; ``profiling`` never sees a run and ``report`` never measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from llm_perf_opt.profiling import efficiency as E
from llm_perf_opt.profiling import flops as F
from llm_perf_opt.profiling import mfu as M
from llm_perf_opt.profiling.stats import summarize
from llm_perf_opt.results.types import (
    BatchRecord,
    Efficiency,
    HardwareInfo,
    ModelInfo,
    PageRecord,
    StageFlops,
    Stats,
    Unavailable,
)

if TYPE_CHECKING:
    from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession
    from llm_perf_opt.runners.run_state import Stage1Run
    from llm_perf_opt.runners.settings import RunSettings


def describe_hardware(settings: RunSettings, session: DeepSeekOCRSession) -> HardwareInfo:
    peak = settings.peak
    return E.describe_hardware(session.device, session.dtype, peak.flops_per_s, peak.bw_bytes_per_s)


def describe_model(settings: RunSettings, session: DeepSeekOCRSession) -> ModelInfo:
    backend = session.backend
    return ModelInfo(
        name=settings.model.name,
        backend=backend.name,
        weights=backend.weights_desc,
        dtype=str(session.dtype).replace("torch.", ""),
        params_total=session.params_total,
        params_activated_per_token=F.activated_params_per_token(backend.config),
        weights_bytes=session.weights_bytes,
        tokenizer=getattr(backend.tokenizer, "name", type(backend.tokenizer).__name__),
        optimisations=session.optimisations(),
        family=settings.model.family,
        stage_names=dict(backend.stage_names),
    )


def compute_efficiency(
    run: Stage1Run, ok: Sequence[PageRecord], final: bool = False
) -> tuple[list[StageFlops], list[Efficiency], dict[str, float], dict[str, Any], list[Unavailable], list[str]]:
    """FLOPs table, per-stage MFU/MBU, energy, MoE routing, what could not be computed, and notes."""
    session = run.session
    if session is None or not ok:
        return [], [], {}, {}, [], []
    cfg = session.backend.config
    dtype_bytes = 2 if session.dtype.itemsize == 2 else session.dtype.itemsize
    infer = run.settings.infer
    context = (infer.context_len_mode, run.settings.token_cap, infer.context_len_fixed)
    section = E.compute_efficiency(cfg, ok, run.hardware, dtype_bytes, context)
    unavailable = list(section.unavailable)
    notes: list[str] = graph_capture_notes(session) + fallback_notes(session) + compile_watch_notes(session)

    power = None
    if session.nvml is not None and session.nvml.available:
        summary = session.nvml.summary()
        power = None if isinstance(summary, M.Unavailable) else summary
    energy = E.energy_summary(ok, power, session.energy_unavailable_reason)
    unavailable += energy.unavailable
    notes += energy.notes

    routed = [
        (r.record, r.tokens_per_expert) for r in run.runs_for_flops if r.tokens_per_expert and r.record.repeat == 0
    ]
    routing = E.routing_summary(routed, cfg.language.num_experts_per_tok)
    if not routing and run.runs_for_flops and not any(r.tokens_per_expert for r in run.runs_for_flops):
        unavailable.append(
            Unavailable(
                "moe_routing",
                f"backend {session.backend.name} does not count tokens per expert (the native backend's model does)",
            )
        )

    flops_table = section.flops
    if final and run.static_flops is None and run.runs_for_flops and run.settings.profiling.static_compute:
        run.static_flops = _static_flops(run, notes)
    if not run.settings.profiling.static_compute:
        unavailable.append(
            Unavailable(
                "flops.counted",
                "profiling.static_compute=false: the counted-FLOPs pass (fvcore, FlopCounterMode) was switched off; "
                "analytic FLOPs only",
            )
        )
    if run.static_flops:
        flops_table = list(run.static_flops)
        flagged = [f.stage for f in flops_table if f.flagged]
        if flagged:
            notes.append(f"counted FLOPs differ from analytic by > 2 % (unexplained) for: {', '.join(flagged)}")
    return flops_table, section.efficiency, energy.energy, routing, unavailable, notes


def graph_capture_notes(session: DeepSeekOCRSession) -> list[str]:
    """One note per fast-path part whose CUDA-graph capture failed: it ran un-graphed, so its times are not the
    graphed path's (the Setup table lists the switches as configured, not what ran)."""
    errors = session.fast_model.graph_capture_errors() if session.fast_model is not None else {}
    return [
        f"CUDA-graph capture failed for the {part} ({why[:300]}): it ran un-graphed, so its times include the"
        " launch overhead a graph removes"
        for part, why in errors.items()
    ]


def compile_watch_notes(session: DeepSeekOCRSession) -> list[str]:
    """With the fast path: one note per compiler whose compiles cannot be counted here (``compiles.WATCH``), so a
    page whose timing holds one of them is not flagged ``one_time_setup``."""
    if session.fast_model is None:
        return []
    from llm_perf_opt.models.deepseek_ocr.compiles import WATCH

    return [
        f"{name} compiles are not counted ({why}): a page whose timing holds one is not flagged one_time_setup"
        for name, why in WATCH.install().unwatched.items()
    ]


def fallback_notes(session: DeepSeekOCRSession) -> list[str]:
    """One note per configured fast-path switch that did not apply on this GPU, and why (the Setup table lists
    the switches as configured)."""
    fallbacks = session.fast_model.fallbacks() if session.fast_model is not None else {}
    return [f"infer.fast.{switch} was configured but did not apply: {why[:300]}" for switch, why in fallbacks.items()]


def _static_flops(run: Stage1Run, notes: list[str]) -> list[StageFlops]:
    from llm_perf_opt.profiling.static_compute import static_compute
    from llm_perf_opt.report.static_compute import write_static_compute

    assert run.session is not None
    if run.session.backend.name != "native":
        notes.append(
            f"counted FLOPs (static compute) run on the native model only; backend {run.session.backend.name} "
            "has the same architecture, so the analytic FLOPs above apply"
        )
        return []
    first = run.runs_for_flops[0]
    model = run.session.model
    base = getattr(model, "base", None)
    if base is not None:  # the fast path: same function, but graph replays and Triton kernels hide the ops
        notes.append(
            "counted FLOPs are taken on the eager module forward of the same weights: the fast path computes the "
            "same function, but its CUDA-graph replays and Triton kernels are invisible to FLOP counters"
        )
        model = base
    try:
        rows = static_compute(model, first.prepared, run.session.device, run.session.dtype)
    except (RuntimeError, ValueError) as exc:
        notes.append(f"static compute (counted FLOPs) failed: {type(exc).__name__}: {exc}")
        return []
    write_static_compute(run.out, rows, first.record.page_id)
    return rows


def batch_aggregates(batches: Sequence[BatchRecord]) -> dict[str, Stats]:
    """Statistics of the batched-throughput phase: over batches, and TPOT over sequences."""
    series = {
        "pages_per_s": [b.pages_per_s for b in batches if b.pages_per_s],
        "output_tok_s": [b.output_tok_s for b in batches if b.output_tok_s],
        # the same with the batch's host preprocessing added to its time, and per page end to end
        "pages_per_s_with_preprocess": [
            b.pages_per_s_with_preprocess for b in batches if b.pages_per_s_with_preprocess
        ],
        "output_tok_s_with_preprocess": [
            b.output_tok_s_with_preprocess for b in batches if b.output_tok_s_with_preprocess
        ],
        "e2e_per_page_ms": [
            (b.preprocess_ms + b.prefill_ms + b.decode_ms) / len(b.page_ids)
            for b in batches
            if b.preprocess_ms is not None and b.page_ids
        ],
        "preprocess_ms": [b.preprocess_ms for b in batches if b.preprocess_ms is not None],
        "prefill_ms": [b.prefill_ms for b in batches],
        "vision_ms": [b.vision_ms for b in batches],
        "tpot_ms": [t for b in batches for t in b.tpot_ms],
        "slot_occupancy": [b.slot_occupancy for b in batches if b.slot_occupancy is not None],
        "refills": [float(b.fills - 1) for b in batches if b.batching == "continuous"],
        "vision_ahead_ms": [b.vision_ahead_ms for b in batches if b.vision_ahead_ms is not None],
        "pages_ahead": [float(b.pages_ahead) for b in batches if b.pages_ahead is not None],
        "prefill_ahead_ms": [b.prefill_ahead_ms for b in batches if b.prefill_ahead_ms is not None],
        "pages_prefilled_ahead": [
            float(b.pages_prefilled_ahead) for b in batches if b.pages_prefilled_ahead is not None
        ],
        "pages_prefilled_per_page": [
            float(b.pages_prefilled_per_page) for b in batches if b.pages_prefilled_per_page is not None
        ],
    }
    out = {}
    for name, values in series.items():
        stats = summarize(values)
        if stats is not None:
            out[name] = stats
    return out
