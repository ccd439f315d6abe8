"""FLOPs → MFU/MBU per stage, energy and MoE routing of a run: functions of measured records, nothing else.

FLOPs of every page are recomputed from what the page really did (its vision views, prompt length and
tokens generated), so the efficiency figures are ratios of sums over measured pages:
Σ FLOPs ÷ Σ seconds (time-weighted, not a mean of per-page ratios).  Every input is an argument and every
output a ``results`` value object, so the runner decides what is measured and the report only formats it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig
from llm_perf_opt.models.deepseek_ocr2.config import DeepseekOCR2Config
from llm_perf_opt.profiling import flops as F
from llm_perf_opt.profiling import mfu as M
from llm_perf_opt.profiling.device import DeviceFacts, detect_device
from llm_perf_opt.profiling.flops_ocr2 import page_flops_v2, stage_min_bytes_v2
from llm_perf_opt.profiling.nvml import PowerSummary
from llm_perf_opt.profiling.peaks import resolve_peak
from llm_perf_opt.results.types import (
    BatchRecord,
    DecodeTraffic,
    Efficiency,
    HardwareInfo,
    PageRecord,
    StageFlops,
    Unavailable,
)

STAGES = ("sam", "clip", "projector", "vision", "prefill_lm", "prefill", "decode", "total")
STAGE_NOTES = {
    "decode": "bytes modelled (activated weights + KV cache read per step): a lower bound, so MBU is too",
    "prefill_lm": "prefill − vision: embedding scatter + LM forward + first-token pick",
    "total": "model level: all work ÷ prefill + decode time (vision counted once)",
}


@attrs.frozen
class EfficiencySection:
    """The FLOPs table (analytic, representative page), per-stage efficiency, and what could not be computed."""

    flops: list[StageFlops]
    efficiency: list[Efficiency]
    unavailable: list[Unavailable]


@attrs.frozen
class EnergySection:
    """Energy per page / token and NVML clock/power aggregates over the timed repeats."""

    energy: dict[str, float]
    unavailable: list[Unavailable]
    notes: list[str]


def describe_hardware(
    device: object, dtype: object, peak_flops_override: float | None, peak_bw_override: float | None
) -> HardwareInfo:
    """The device facts plus the peak used for MFU/MBU (a user override or the sourced datasheet entry)."""
    facts: DeviceFacts = detect_device(device)
    name = facts.gpu_name or f"CPU {facts.cpu}"
    resolved = resolve_peak(name, dtype, peak_flops_override, peak_bw_override)
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


def page_flops_of(
    cfg: DeepseekOCRConfig | DeepseekOCR2Config,
    rec: PageRecord,
    mode: str = "auto",
    cap: int | None = None,
    fixed: int | None = None,
) -> F.PageFlops | None:
    """FLOPs of what the page did; decode at each step's real context (auto), at prompt + cap for every step
    (max: the seed's convention, an upper bound) or at ``fixed`` keys for every step."""
    if not rec.vision_views or rec.prompt_tokens is None or rec.generated_tokens is None:
        return None
    views = [(int(v[0]), int(v[1]), int(v[2])) for v in rec.vision_views]
    pf = (
        page_flops_v2(cfg, views, rec.prompt_tokens, rec.generated_tokens)
        if isinstance(cfg, DeepseekOCR2Config)
        else F.page_flops(cfg, views, rec.prompt_tokens, rec.generated_tokens)
    )
    steps = rec.generated_tokens - 1
    if mode == "auto" or steps < 1:
        return pf
    context = rec.prompt_tokens + (cap or rec.generated_tokens) if mode == "max" else int(fixed or 1)
    one = F.decode_step_flops(cfg.language, context)
    decode = F.FlopsBreakdown.of(
        "decode",
        {k: v * steps for k, v in one.components_flops.items()},
        [f"{steps} decode steps, each at a context of {context} keys (infer.context_len_mode={mode})"],
    )
    return attrs.evolve(pf, decode=decode)


def stage_names_of(cfg: DeepseekOCRConfig | DeepseekOCR2Config) -> dict[str, str]:
    """Stage slot -> the model's name for it, where they differ: DeepSeek-OCR-2's second vision stage is its
    encoder (the record keeps v1's ``clip_ms`` slot; tables and reasons name the stage by model)."""
    return {"clip": "encoder"} if isinstance(cfg, DeepseekOCR2Config) else {}


def _v1_language(cfg: DeepseekOCRConfig | DeepseekOCR2Config) -> DeepseekOCRConfig:
    """Decode traffic is the language model's alone, and v2's language model is v1's."""
    return DeepseekOCRConfig(sam=cfg.sam, language=cfg.language) if isinstance(cfg, DeepseekOCR2Config) else cfg


def _min_bytes(
    cfg: DeepseekOCRConfig | DeepseekOCR2Config, views: list[F.View], prompt_len: int, dtype_bytes: int
) -> dict[str, int]:
    if isinstance(cfg, DeepseekOCR2Config):
        return stage_min_bytes_v2(cfg, views, prompt_len, dtype_bytes)
    return F.stage_min_bytes(cfg, views, prompt_len, dtype_bytes)


def _stage_seconds(rec: PageRecord) -> dict[str, float | None]:
    def s(ms: float | None) -> float | None:
        return None if ms is None else ms / 1e3

    lm = None if rec.prefill_ms is None or rec.vision_ms is None else rec.prefill_ms - rec.vision_ms
    # A page that produced one token ran no decode step: its whole model time is the prefill.
    no_decode = rec.decode_ms is None and (rec.generated_tokens or 0) < 2
    total = (
        None
        if rec.prefill_ms is None or (rec.decode_ms is None and not no_decode)
        else rec.prefill_ms + (rec.decode_ms or 0.0)
    )
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


def compute_efficiency(
    cfg: DeepseekOCRConfig | DeepseekOCR2Config,
    ok: Sequence[PageRecord],
    hardware: HardwareInfo | None,
    dtype_bytes: int,
    context: tuple[str, int | None, int | None] = ("auto", None, None),
) -> EfficiencySection:
    """Per-stage achieved FLOP/s, MFU, bytes and MBU over the successful pages ``ok``; ``context`` is
    (infer.context_len_mode, token cap, infer.context_len_fixed) for the decode FLOPs."""
    mode, cap, fixed = context
    unavailable: list[Unavailable] = []
    peak_flops = hardware.peak_flops_per_s if hardware else None
    peak_bw = hardware.peak_bw_bytes_per_s if hardware else None
    if peak_flops is None:
        reason = (hardware.peak_flops_source if hardware else None) or "no peak FLOP/s known"
        unavailable.append(Unavailable("mfu", reason))
    if peak_bw is None:
        unavailable.append(
            Unavailable("mbu", (hardware.peak_bw_source if hardware else None) or "no peak bandwidth known")
        )

    flops_sum: dict[str, float] = {}
    secs_sum: dict[str, float] = {}
    decode_bytes_sum = 0.0
    min_bytes_sum: dict[str, float] = {}
    decode_secs_for_bytes = 0.0
    per_page: list[F.PageFlops] = []
    for rec in ok:
        pf = page_flops_of(cfg, rec, mode, cap, fixed)
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
        for stage, nbytes in _min_bytes(cfg, views, rec.prompt_tokens or 0, dtype_bytes).items():
            min_bytes_sum[stage] = min_bytes_sum.get(stage, 0.0) + nbytes
        if rec.decode_ms and rec.decode_ms > 0 and rec.prompt_tokens and (rec.generated_tokens or 0) >= 2:
            db = F.decode_bytes(_v1_language(cfg), rec.prompt_tokens, rec.generated_tokens or 0, dtype_bytes)
            decode_bytes_sum += db.total_bytes
            decode_secs_for_bytes += rec.decode_ms / 1e3
    n_pages = max(len(per_page), 1)
    efficiency: list[Efficiency] = []
    names = stage_names_of(cfg)
    for slot in STAGES:
        stage = names.get(slot, slot)  # the model's name for the stage (v2: encoder); flops/secs are by slot
        if slot not in flops_sum:
            unavailable.append(Unavailable(f"mfu.{stage}", _no_time_reason(slot, ok)))
            continue
        fl, sec = flops_sum[slot], secs_sum[slot]
        achieved = fl / sec
        mfu_v = M.mfu(fl, sec, peak_flops) if peak_flops else None
        bytes_moved = mbu_v = ai = None
        mbu_raw: float | M.Unavailable | None = None
        note = STAGE_NOTES.get(stage)
        if stage == "decode" and decode_secs_for_bytes > 0:
            bytes_moved = decode_bytes_sum / n_pages
            mbu_raw = M.mbu(decode_bytes_sum, decode_secs_for_bytes, peak_bw) if peak_bw else None
            mbu_v = mbu_raw if isinstance(mbu_raw, float) else None
            ai = fl / decode_bytes_sum if decode_bytes_sum else None
        elif slot in min_bytes_sum and min_bytes_sum[slot] > 0:
            # Lower bound of the traffic (weights + stage inputs/outputs): MBU is a lower bound, FLOP/byte an
            # upper bound; enough to place the stage on the roofline (compute- vs memory-bound side).
            bytes_moved = min_bytes_sum[slot] / n_pages
            mbu_raw = M.mbu(min_bytes_sum[slot], sec, peak_bw) if peak_bw else None
            mbu_v = mbu_raw if isinstance(mbu_raw, float) else None
            ai = fl / min_bytes_sum[slot]
            note = "; ".join(x for x in (note, "bytes ≥ weights + stage I/O (lower bound)") if x)
        # mfu.py's contract: a value it cannot vouch for (MFU > 1: FLOPs, time or peak wrong) comes back with its
        # reason, and the blank in the table must carry that reason, not look like "no peak"
        for metric, value in ((f"mfu.{stage}", mfu_v), (f"mbu.{stage}", mbu_raw if bytes_moved is not None else None)):
            if isinstance(value, M.Unavailable):
                unavailable.append(Unavailable(metric, value.reason))
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
                (names.get("clip", "clip"), rep.clip),
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
    return EfficiencySection(flops=flops_table, efficiency=efficiency, unavailable=unavailable)


def _no_time_reason(stage: str, ok: Sequence[PageRecord]) -> str:
    """Why no page gave ``stage`` a positive time: the specific cause, not a generic 'no time'."""
    if stage == "decode" and all((r.generated_tokens or 0) < 2 for r in ok):
        return "no page decoded a second token (infer.max_new_tokens=1, or eos right after prefill): no decode step"
    if stage in ("sam", "clip", "projector") and all(getattr(r, f"{stage}_ms") is None for r in ok):
        return f"no {stage} time: the backend's {stage} module was not hooked"
    if not any(r.vision_views for r in ok):
        return "no page recorded its vision views: FLOPs cannot be derived"
    return "no page with a positive time for this stage (clock resolution: the stage measured <= 0 ms)"


def energy_summary(
    ok: Sequence[PageRecord], power: PowerSummary | None, unavailable_reason: str | None
) -> EnergySection:
    """Energy totals of the pages that have a reading, plus NVML power/clock aggregates when sampled."""
    energies = [r.energy_j for r in ok if r.energy_j is not None]
    if not energies:
        reason = unavailable_reason or "no NVML samples covered the pages"
        return EnergySection(energy={}, unavailable=[Unavailable("energy", reason)], notes=[])
    tokens = sum(r.generated_tokens or 0 for r in ok if r.energy_j is not None)
    out = {"energy_total_j": float(sum(energies)), "energy_per_page_mean_j": float(sum(energies) / len(energies))}
    if tokens:
        out["energy_per_output_token_j"] = float(sum(energies) / tokens)
    notes: list[str] = []
    if power is not None:
        for key in (
            "mean_power_w",
            "max_power_w",
            "mean_sm_clock_mhz",
            "min_sm_clock_mhz",
            "mean_mem_clock_mhz",
            "max_temperature_c",
        ):
            value = getattr(power, key)
            if value is not None:
                out[key] = float(value)
        if power.throttle_reasons_seen:
            notes.append("GPU clock throttle reasons seen: " + ", ".join(power.throttle_reasons_seen))
    return EnergySection(energy=out, unavailable=[], notes=notes)


def routing_summary(
    pages: Sequence[tuple[PageRecord, Mapping[Any, Sequence[int]]]], top_k: int | None
) -> dict[str, Any]:
    """Tokens per expert per MoE layer, summed over ``pages`` (record, tokens per expert by layer)."""
    if not pages:
        return {}
    layers: dict[str, Any] = {}
    total_tokens = sum((r.prompt_tokens or 0) + max((r.generated_tokens or 1) - 1, 0) for r, _ in pages)
    first = pages[0][1]
    for layer in first:
        counts = [0] * len(first[layer])
        for _, per_expert in pages:
            for i, c in enumerate(per_expert.get(layer, [])):
                counts[i] += c
        mean = sum(counts) / len(counts) if counts else 0.0
        layers[str(layer)] = {
            "experts_hit": sum(1 for c in counts if c),
            "max_tokens": max(counts) if counts else 0,
            "mean_tokens": mean,
            "imbalance": (max(counts) / mean) if mean else None,
            "tokens_per_expert": counts,
        }
    return {"pages": len(pages), "tokens": total_tokens, "top_k": top_k, "layers": layers}


def batched_decode_traffic(
    cfg: DeepseekOCRConfig | DeepseekOCR2Config,
    batches: Sequence[BatchRecord],
    dtype_bytes: int,
    hardware: HardwareInfo | None,
) -> DecodeTraffic | Unavailable:
    """The batched phase's decode steps: their minimum traffic (:func:`flops.batched_decode_bytes` per record: the
    weights once per step, the routed experts counted on the device where they were, each computed row's K/V) over
    their device time, and that rate against the peak bandwidth; or why it cannot be given."""
    lang = _v1_language(cfg).language
    old = [b for b in batches if b.decode_steps is None or b.row_steps is None or b.key_steps is None]
    if old:
        return Unavailable(
            "batched.decode_traffic",
            f"{len(old)} of {len(batches)} batched record(s) lack the decode steps' rows or keys (written before "
            "schema 1.8)",
        )
    over = [b for b in batches if (b.grouped_steps or 0) > (b.decode_steps or 0)]
    if over:
        return Unavailable(
            "batched.decode_traffic",
            f"{len(over)} batched record(s) count the routed experts over more steps than they ran "
            f"({over[0].grouped_steps} of {over[0].decode_steps}): the counts cannot be placed",
        )
    total: dict[str, int] = {}
    counted = steps = 0
    seconds = 0.0
    for b in batches:
        assert b.decode_steps is not None and b.row_steps is not None and b.key_steps is not None
        if not b.decode_steps:
            continue
        reads = b.routed_experts_read if b.grouped_steps else None
        n = (b.grouped_steps or 0) if reads is not None else 0
        db = F.batched_decode_bytes(
            lang,
            b.decode_steps,
            b.row_steps,
            b.key_steps,
            dtype_bytes,
            experts_read=None if reads is None else round(sum(reads) * n),
            counted_steps=n,
        )
        for k, v in db.components_bytes.items():
            total[k] = total.get(k, 0) + v
        counted += n
        steps += b.decode_steps
        seconds += b.decode_ms / 1e3
    if steps == 0 or seconds <= 0:
        return Unavailable("batched.decode_traffic", "no decode step ran in the batched phase")
    moved = sum(total.values())
    peak = hardware.peak_bw_bytes_per_s if hardware else None
    mbu = M.mbu(moved, seconds, peak) if peak else None
    why = None
    if isinstance(mbu, M.Unavailable):
        why, mbu = mbu.reason, None
    elif peak is None:
        why = (hardware.peak_bw_source if hardware else None) or "no peak bandwidth known"
    return DecodeTraffic(
        bytes_moved=moved,
        seconds=seconds,
        bytes_per_s=moved / seconds,
        mbu=mbu,
        lower_bound=counted < steps,
        note=F.experts_read_note(counted, steps, lang.num_experts_per_tok),
        weights_bytes=sum(v for k, v in total.items() if k.startswith("weights.")),
        kv_bytes=total.get("kv.read", 0) + total.get("kv.write", 0),
        mbu_unavailable=why,
    )
