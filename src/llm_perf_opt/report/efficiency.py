"""Hardware/model descriptions and the FLOPs → MFU/MBU section of a run.

FLOPs of every page are recomputed from what the page really did (its vision views, prompt length and
tokens generated), so the efficiency figures are ratios of sums over measured pages:
Σ FLOPs ÷ Σ seconds (time-weighted, not a mean of per-page ratios).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from llm_perf_opt.profiling import flops as F
from llm_perf_opt.profiling import mfu as M
from llm_perf_opt.profiling.hw import resolve_peak
from llm_perf_opt.results.types import Efficiency, HardwareInfo, ModelInfo, PageRecord, StageFlops, Unavailable

if TYPE_CHECKING:
    from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession
    from llm_perf_opt.runners.stage1 import Stage1Run

FLAG_REL_DIFF = 0.02


def describe_hardware(cfg: Any, session: DeepSeekOCRSession, env: dict[str, Any]) -> HardwareInfo:
    from llm_perf_opt.profiling.hw import detect_device

    facts = detect_device(session.device)
    name = facts.gpu_name or f"CPU {facts.cpu}"
    peak = cfg.get("peak") or {}
    resolved = resolve_peak(name, session.dtype, peak.get("flops_per_s"), peak.get("bw_bytes_per_s"))
    flops = resolved.flops_per_s if isinstance(resolved.flops_per_s, float) else None
    bw = resolved.bw_bytes_per_s if isinstance(resolved.bw_bytes_per_s, float) else None
    return HardwareInfo(
        device=facts.device,
        gpu_name=facts.gpu_name,
        driver=facts.driver,
        cuda=facts.cuda,
        torch=facts.torch,
        cpu=facts.cpu,
        peak_flops_per_s=flops,
        peak_flops_source=resolved.source.flops if flops else _reason(resolved.flops_per_s),
        peak_bw_bytes_per_s=bw,
        peak_bw_source=resolved.source.bw if bw else _reason(resolved.bw_bytes_per_s),
    )


def _reason(value: object) -> str | None:
    return value.reason if isinstance(value, M.Unavailable) else None


def describe_model(cfg: Any, session: DeepSeekOCRSession) -> ModelInfo:
    backend = session.backend
    model_cfg = backend.config
    return ModelInfo(
        name=str(cfg.model.get("name")),
        backend=backend.name,
        weights=backend.weights_desc,
        dtype=str(session.dtype).replace("torch.", ""),
        params_total=session.params_total,
        params_activated_per_token=F.activated_params_per_token(model_cfg),
        weights_bytes=session.weights_bytes,
        tokenizer=getattr(backend.tokenizer, "name", type(backend.tokenizer).__name__),
        optimisations=session.optimisations(),
    )


def page_flops_of(cfg: Any, rec: PageRecord) -> F.PageFlops | None:
    if not rec.vision_views or rec.prompt_tokens is None or rec.generated_tokens is None:
        return None
    views = [tuple(int(x) for x in v) for v in rec.vision_views]
    return F.page_flops(cfg, views, rec.prompt_tokens, rec.generated_tokens)  # type: ignore[arg-type]


def _stage_seconds(rec: PageRecord) -> dict[str, float | None]:
    def s(ms: float | None) -> float | None:
        return None if ms is None else ms / 1e3

    lm = None if rec.prefill_ms is None or rec.vision_ms is None else rec.prefill_ms - rec.vision_ms
    total = None if rec.prefill_ms is None or rec.decode_ms is None else rec.prefill_ms + rec.decode_ms
    return {
        "sam": s(rec.sam_ms),
        "clip": s(rec.clip_ms),
        "projector": s(rec.projector_ms),
        "vision": s(rec.vision_ms),
        "prefill_lm": s(lm),
        "prefill": s(rec.prefill_ms),
        "decode": s(rec.decode_ms),
        "total": s(total),
    }


STAGE_NOTES = {
    "prefill_lm": "prefill − vision: embedding scatter + LM forward + first-token pick",
    "total": "model level: all work ÷ prefill + decode time (vision counted once)",
}


def compute_efficiency(
    run: Stage1Run, ok: Sequence[PageRecord], final: bool = False
) -> tuple[list[StageFlops], list[Efficiency], dict[str, float], dict[str, Any], list[Unavailable], list[str]]:
    """FLOPs table, per-stage MFU/MBU, energy, MoE routing and what could not be computed."""
    unavailable: list[Unavailable] = []
    notes: list[str] = []
    if run.session is None or not ok:
        return [], [], {}, {}, unavailable, notes
    cfg = run.session.backend.config
    hw = run.hardware
    peak_flops = hw.peak_flops_per_s if hw else None
    peak_bw = hw.peak_bw_bytes_per_s if hw else None
    if peak_flops is None:
        unavailable.append(Unavailable("mfu", (hw.peak_flops_source if hw else None) or "no peak FLOP/s known"))
    if peak_bw is None:
        unavailable.append(Unavailable("mbu", (hw.peak_bw_source if hw else None) or "no peak bandwidth known"))
    dtype_bytes = 2 if run.session.dtype.itemsize == 2 else run.session.dtype.itemsize

    flops_sum: dict[str, float] = {}
    secs_sum: dict[str, float] = {}
    decode_bytes_sum = 0.0
    min_bytes_sum: dict[str, float] = {}
    decode_secs_for_bytes = 0.0
    per_page: list[F.PageFlops] = []
    for rec in ok:
        pf = page_flops_of(cfg, rec)
        if pf is None:
            continue
        per_page.append(pf)
        stages = pf.stages()
        for stage, secs in _stage_seconds(rec).items():
            if secs is None or secs <= 0 or stage not in stages:
                continue
            if stage == "decode" and (rec.generated_tokens or 0) < 2:
                continue
            flops_sum[stage] = flops_sum.get(stage, 0.0) + stages[stage]
            secs_sum[stage] = secs_sum.get(stage, 0.0) + secs
        views = [(int(v[0]), int(v[1]), int(v[2])) for v in rec.vision_views or []]
        for stage, nbytes in F.stage_min_bytes(cfg, views, rec.prompt_tokens or 0, dtype_bytes).items():
            min_bytes_sum[stage] = min_bytes_sum.get(stage, 0.0) + nbytes
        if rec.decode_ms and rec.decode_ms > 0 and rec.prompt_tokens and (rec.generated_tokens or 0) >= 2:
            db = F.decode_bytes(cfg, rec.prompt_tokens, rec.generated_tokens or 0, dtype_bytes)
            decode_bytes_sum += db.total_bytes
            decode_secs_for_bytes += rec.decode_ms / 1e3
    n_pages = max(len(per_page), 1)
    efficiency: list[Efficiency] = []
    for stage in ("sam", "clip", "projector", "vision", "prefill_lm", "prefill", "decode", "total"):
        if stage not in flops_sum:
            unavailable.append(Unavailable(f"mfu.{stage}", "no page with a positive time for this stage"))
            continue
        fl, sec = flops_sum[stage], secs_sum[stage]
        achieved = fl / sec
        mfu_v = M.mfu(fl, sec, peak_flops) if peak_flops else None
        bytes_moved = mbu_v = ai = None
        note = STAGE_NOTES.get(stage)
        if stage == "decode" and decode_secs_for_bytes > 0:
            bytes_moved = decode_bytes_sum / n_pages
            mbu_raw = M.mbu(decode_bytes_sum, decode_secs_for_bytes, peak_bw) if peak_bw else None
            mbu_v = mbu_raw if isinstance(mbu_raw, float) else None
            ai = fl / decode_bytes_sum if decode_bytes_sum else None
        elif stage in min_bytes_sum and min_bytes_sum[stage] > 0:
            # Lower bound of the traffic (weights + stage inputs/outputs): MBU is a lower bound, FLOP/byte an
            # upper bound; enough to place the stage on the roofline (compute- vs memory-bound side).
            bytes_moved = min_bytes_sum[stage] / n_pages
            mbu_raw = M.mbu(min_bytes_sum[stage], sec, peak_bw) if peak_bw else None
            mbu_v = mbu_raw if isinstance(mbu_raw, float) else None
            ai = fl / min_bytes_sum[stage]
            note = "; ".join(x for x in (note, "bytes ≥ weights + stage I/O (lower bound)") if x)
        efficiency.append(
            Efficiency(
                stage=stage,
                flops=fl / n_pages,
                seconds=sec / n_pages,
                achieved_flops_per_s=achieved,
                mfu=mfu_v if isinstance(mfu_v, float) else None,
                bytes_moved=bytes_moved,
                mbu=mbu_v,
                arithmetic_intensity=ai,
                reason=note,
            )
        )
    flops_table: list[StageFlops] = []
    if per_page:
        rep = per_page[0]
        flops_table = [
            StageFlops(stage=name, analytic_flops=float(bd.total_flops), components=dict(bd.components_flops))
            for name, bd in (
                ("sam", rep.sam),
                ("clip", rep.clip),
                ("projector", rep.projector),
                ("prefill_lm", rep.prefill_lm),
                ("decode", rep.decode),
            )
        ]
    if not any(r.peak_mem_allocated_bytes is not None for r in ok):
        unavailable.append(
            Unavailable(
                "peak_mem_allocated_bytes",
                "not a CUDA run: the allocator's peak counters exist on CUDA only; peak RSS of the process is shown",
            )
        )
    energy = _energy_summary(run, ok, unavailable)
    routing = routing_summary(run)
    if final and run.static_flops is None and run.runs_for_flops and run.cfg.profiling.get("static_compute", True):
        run.static_flops = _static_flops(run, notes)
    if run.static_flops:
        flops_table = list(run.static_flops)
        flagged = [f.stage for f in flops_table if f.flagged]
        if flagged:
            notes.append(f"counted FLOPs differ from analytic by > 2 % (unexplained) for: {', '.join(flagged)}")
    return flops_table, efficiency, energy, routing, unavailable, notes


def _static_flops(run: Stage1Run, notes: list[str]) -> list[StageFlops]:
    from llm_perf_opt.profiling.static_compute import static_compute, write_static_compute

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


def _energy_summary(run: Stage1Run, ok: Sequence[PageRecord], unavailable: list[Unavailable]) -> dict[str, float]:
    energies = [r.energy_j for r in ok if r.energy_j is not None]
    session = run.session
    if not energies:
        reason = (session.energy_unavailable_reason if session else None) or "no NVML samples covered the pages"
        unavailable.append(Unavailable("energy", reason))
        return {}
    tokens = sum(r.generated_tokens or 0 for r in ok if r.energy_j is not None)
    out = {"energy_total_j": float(sum(energies)), "energy_per_page_mean_j": float(sum(energies) / len(energies))}
    if tokens:
        out["energy_per_output_token_j"] = float(sum(energies) / tokens)
    if session is not None and session.nvml is not None and session.nvml.available:
        from llm_perf_opt.profiling.mfu import Unavailable as Missing

        summary = session.nvml.summary()
        if not isinstance(summary, Missing):
            for key in (
                "mean_power_w",
                "max_power_w",
                "mean_sm_clock_mhz",
                "min_sm_clock_mhz",
                "mean_mem_clock_mhz",
                "max_temperature_c",
            ):
                value = getattr(summary, key)
                if value is not None:
                    out[key] = float(value)
            if summary.throttle_reasons_seen:
                run.notes.append("GPU clock throttle reasons seen: " + ", ".join(summary.throttle_reasons_seen))
    return out


def routing_summary(run: Stage1Run) -> dict[str, Any]:
    """Tokens per expert per MoE layer, summed over the measured pages of the first timed repeat."""
    pages = [r for r in run.runs_for_flops if r.tokens_per_expert and r.record.repeat == 0]
    if not pages:
        return {}
    layers: dict[str, Any] = {}
    total_tokens = sum((r.record.prompt_tokens or 0) + max((r.record.generated_tokens or 1) - 1, 0) for r in pages)
    first = pages[0].tokens_per_expert
    assert first is not None
    for layer in first:
        counts = [0] * len(first[layer])
        for r in pages:
            assert r.tokens_per_expert is not None
            for i, c in enumerate(r.tokens_per_expert.get(layer, [])):
                counts[i] += c
        mean = sum(counts) / len(counts) if counts else 0.0
        layers[str(layer)] = {
            "experts_hit": sum(1 for c in counts if c),
            "max_tokens": max(counts) if counts else 0,
            "mean_tokens": mean,
            "imbalance": (max(counts) / mean) if mean else None,
            "tokens_per_expert": counts,
        }
    top_k = run.session.backend.config.language.num_experts_per_tok if run.session else None
    return {"pages": len(pages), "tokens": total_tokens, "top_k": top_k, "layers": layers}
