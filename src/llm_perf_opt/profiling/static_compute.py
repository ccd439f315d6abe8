"""Static compute of the representative page: analytic FLOPs next to two counters, stage by stage.

Each stage is counted on its own inputs (the SAM, CLIP and projector modules on the page's real view
batches; the decoder prefill over the real prompt; one decode step at the first decode context), by
fvcore (×2: it counts multiply-adds) and by torch's FlopCounterMode.  Known convention gaps are
explained, not flagged: both counters count causal attention over the full square, the analytic count
only the kept lower triangle; the difference is computed exactly and subtracted before comparing.
Anything else above 2 % is flagged in the report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llm_perf_opt.models.deepseek_ocr2.config import DeepseekOCR2Config
from llm_perf_opt.profiling import flops as F
from llm_perf_opt.profiling.flop_count import CountedFlops, count_flop_counter, count_fvcore
from llm_perf_opt.profiling.flops_ocr2 import vision_flops_v2
from llm_perf_opt.results.types import StageFlops

log = logging.getLogger(__name__)
_Counted = tuple[CountedFlops | None, CountedFlops | None]
FLAG_REL_DIFF = 0.02


class _Call(nn.Module):
    """A module whose forward is ``fn``: fvcore traces modules, our stages are method calls."""

    def __init__(self, fn: Callable[..., torch.Tensor], owner: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.owner = owner

    def forward(self, *args: Any) -> torch.Tensor:
        return self.fn(*args)


def _count_both(
    module: nn.Module, inputs: tuple[Any, ...]
) -> tuple[CountedFlops | None, CountedFlops | None, list[str]]:
    notes: list[str] = []
    fv = fc = None
    try:
        fv = count_fvcore(module, inputs)
    except (RuntimeError, ValueError, TypeError, ImportError) as exc:
        notes.append(f"fvcore failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        log.debug("fvcore failed", exc_info=True)
    try:
        fc = count_flop_counter(module, *inputs)
    except (RuntimeError, ValueError, TypeError) as exc:
        notes.append(f"FlopCounterMode failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        log.debug("FlopCounterMode failed", exc_info=True)
    return fv, fc, notes


def _row(
    stage: str,
    analytic: float,
    counted: list[tuple[CountedFlops | None, CountedFlops | None]],
    components: dict[str, int],
    notes: list[str],
    explained_gap: float = 0.0,
    gap_reason: str = "causal gap",
    gap_detail: str = "counters count the full attention square, analytic the kept triangle",
) -> StageFlops:
    fv_vals = [c[0].total_flops for c in counted if c[0] is not None]
    fc_vals = [c[1].total_flops for c in counted if c[1] is not None]
    fv = float(sum(fv_vals)) if len(fv_vals) == len(counted) else None
    fc = float(sum(fc_vals)) if len(fc_vals) == len(counted) else None
    expected = analytic + explained_gap

    def rel(x: float | None) -> float | None:
        return None if x is None or expected == 0 else (x - expected) / expected

    r_fv, r_fc = rel(fv), rel(fc)
    flagged = any(r is not None and abs(r) > FLAG_REL_DIFF for r in (r_fv, r_fc))
    if explained_gap:
        notes = [
            *notes,
            f"Δ shown after the explained {gap_reason} of {explained_gap / 1e9:,.3f} GFLOP ({gap_detail})",
        ]
    skipped: set[str] = set()
    for pair in counted:
        for c in pair:
            if c is not None:
                skipped.update(c.skipped_ops)
    if skipped:
        notes = [
            *notes,
            "counted as 0 FLOPs (elementwise/data movement): "
            + ", ".join(sorted(skipped)[:12])
            + (" …" if len(skipped) > 12 else ""),
        ]
    return StageFlops(
        stage=stage,
        analytic_flops=float(analytic),
        fvcore_flops=fv,
        flop_counter_flops=fc,
        rel_diff_fvcore=r_fv,
        rel_diff_flop_counter=r_fc,
        flagged=flagged,
        note="; ".join(notes) or None,
        components={k: float(v) for k, v in components.items()},
    )


def _causal_gap(lang: Any, q_len: int) -> float:
    per_layer = F.attention_flops(q_len, q_len, lang.num_attention_heads, lang.head_dim, causal=False) - (
        F.attention_flops(q_len, q_len, lang.num_attention_heads, lang.head_dim, causal=True)
    )
    return float(per_layer * lang.num_hidden_layers)


@torch.no_grad()
def static_compute(model: Any, prepared: Any, device: torch.device, dtype: torch.dtype) -> list[StageFlops]:
    """Analytic vs fvcore vs FlopCounterMode per stage for one prepared page (no timing here)."""
    cfg = model.config
    crops = prepared.images_crop.to(device, dtype)
    ori = prepared.images_ori.to(device, dtype)
    views = [crops] if prepared.n_crops > 0 else []
    views.append(ori)
    view_shapes = [(int(v.shape[0]), int(v.shape[-2]), int(v.shape[-1])) for v in views]
    rows: list[StageFlops] = (
        _vision_rows_v2(model, views, view_shapes)
        if isinstance(cfg, DeepseekOCR2Config)
        else _vision_rows(model, views, view_shapes)
    )
    rows += _language_rows(model, prepared, crops, ori, device)
    return rows


def _vision_rows(model: Any, views: list[torch.Tensor], view_shapes: list[F.View]) -> list[StageFlops]:
    """DeepSeek-OCR (v1): SAM, CLIP (fed SAM's features) and the projector over [CLIP ‖ SAM] features."""
    m = model.model
    sam_a, clip_a, proj_a = F.vision_flops(model.config, view_shapes)
    rows: list[StageFlops] = []
    sam_counts, clip_counts, proj_counts, notes_v = [], [], [], []
    for pixels in views:
        sam_out = m.sam_model(pixels)
        clip_out = m.vision_model(pixels, sam_out)
        feats = torch.cat((clip_out[:, 1:], sam_out.flatten(2).permute(0, 2, 1)), dim=-1)
        fv, fc, n = _count_both(m.sam_model, (pixels,))
        sam_counts.append((fv, fc))
        notes_v += n
        fv, fc, n = _count_both(m.vision_model, (pixels, sam_out))
        clip_counts.append((fv, fc))
        notes_v += n
        fv, fc, n = _count_both(m.projector, (feats,))
        proj_counts.append((fv, fc))
        notes_v += n
    rows.append(_row("sam", sam_a.total_flops, sam_counts, sam_a.components_flops, list(dict.fromkeys(notes_v))))
    rows.append(_row("clip", clip_a.total_flops, clip_counts, clip_a.components_flops, []))
    rows.append(_row("projector", proj_a.total_flops, proj_counts, proj_a.components_flops, []))
    return rows


def _vision_rows_v2(model: Any, views: list[torch.Tensor], view_shapes: list[F.View]) -> list[StageFlops]:
    """DeepSeek-OCR-2: SAM, the Qwen2-style encoder (fed SAM's tokens) and the projector over its query outputs.

    The counters see the encoder's SDPA over the full (2N)² grid of each view; the analytic count keeps only the
    prefix mask's pairs, so the difference (exact, from the same formula with ``useful=False``) is the explained gap.
    """
    m = model.model
    cfg = model.config
    sam_a, enc_a, proj_a = vision_flops_v2(cfg, view_shapes)
    _, enc_full, _ = vision_flops_v2(cfg, view_shapes, useful=False)
    sam_counts: list[_Counted] = []
    enc_counts: list[_Counted] = []
    proj_counts: list[_Counted] = []
    notes: list[str] = []
    for pixels in views:
        sam_out = m.sam_model(pixels)
        enc_out = m.qwen2_model(sam_out)
        for counts, module, inputs in (
            (sam_counts, m.sam_model, (pixels,)),
            (enc_counts, m.qwen2_model, (sam_out,)),
            (proj_counts, m.projector, (enc_out,)),
        ):
            fv, fc, n = _count_both(module, inputs)
            counts.append((fv, fc))
            notes += n
    gap = float(enc_full.total_flops - enc_a.total_flops)
    return [
        _row("sam", sam_a.total_flops, sam_counts, sam_a.components_flops, list(dict.fromkeys(notes))),
        _row(
            "encoder",
            enc_a.total_flops,
            enc_counts,
            enc_a.components_flops,
            [],
            explained_gap=gap,
            gap_reason="attention-mask gap",
            gap_detail="counters count the encoder's masked attention over the full (2N)² grid, analytic the "
            "prefix mask's pairs",
        ),
        _row("projector", proj_a.total_flops, proj_counts, proj_a.components_flops, []),
    ]


def _language_rows(
    model: Any, prepared: Any, crops: torch.Tensor, ori: torch.Tensor, device: torch.device
) -> list[StageFlops]:
    """The decoder prefill over the real prompt and one decode step at the first decode context."""
    from llm_perf_opt.models.deepseek_ocr.kv_cache import StaticKVCache

    cfg = model.config
    rows: list[StageFlops] = []
    feats_all = model.encode_images(crops, ori, prepared.images_spatial_crop)
    embeds = model.embed_prompt(prepared.input_ids.to(device), prepared.images_seq_mask.to(device), [feats_all])
    prompt_len = int(embeds.shape[1])
    max_len = prompt_len + 2

    def prefill_fn(e: torch.Tensor) -> torch.Tensor:
        cache = StaticKVCache.for_model(model, batch=1, max_len=max_len)
        out: torch.Tensor = model.prefill(e, cache)
        return out

    lm = F.prefill_flops(cfg.language, prompt_len)
    fv, fc, n = _count_both(_Call(prefill_fn, model), (embeds,))
    rows.append(
        _row(
            "prefill_lm",
            lm.total_flops,
            [(fv, fc)],
            lm.components_flops,
            n,
            explained_gap=_causal_gap(cfg.language, prompt_len),
        )
    )

    cache = StaticKVCache.for_model(model, batch=1, max_len=max_len)
    model.prefill(embeds, cache)
    token = torch.zeros((1, 1), dtype=torch.long, device=device)
    step = F.decode_step_flops(cfg.language, prompt_len + 1)
    length = cache.length if hasattr(cache, "length") else prompt_len

    def decode_fn(t: torch.Tensor) -> torch.Tensor:
        # Each call must see the same context: rewind the cache to the prompt before the step.
        if hasattr(cache, "length"):
            cache.length = length
        out: torch.Tensor = model.decode_step(t, cache)
        return out

    fv, fc, n = _count_both(_Call(decode_fn, model), (token,))
    rows.append(
        _row(
            f"decode_step@{prompt_len + 1}",
            step.total_flops,
            [(fv, fc)],
            step.components_flops,
            [
                *n,
                "one decode step at the first decode context; the decode stage is the sum of such steps "
                "over growing contexts",
            ],
        )
    )
    return rows
