"""Analytic FLOPs of DeepSeek-OCR-2's vision stage, beside v1's (:mod:`llm_perf_opt.profiling.flops`).

Same conventions as v1 (a multiply-add is 2 FLOPs; matrix work only, so q/k/v bias adds, norms, SiLU, RoPE
and residual adds are left out; attention counts the useful pairs).  SAM and the projector are v1's formulas
(the projector maps the N query outputs per view, 896 → 1280); the language model is v1's
(:func:`llm_perf_opt.profiling.flops.prefill_flops` etc. apply unchanged).  New here is the encoder:

* every layer runs on **2N positions** (N SAM tokens + N learned queries) for a view with N SAM tokens
  (N = 144 for a 768-px tile, 256 for the 1024-px global view);
* **GQA**: q and o are ``hidden × heads·head_dim``, k and v only ``hidden × kv_heads·head_dim``; the attention
  products run for every query head;
* **SwiGLU**: gate, up (``hidden → ffn``) and down (``ffn → hidden``);
* **the prefix mask**: image rows attend to the N image tokens only, query row i to the N image tokens and
  queries ≤ i, so the useful pairs are ``N² + N² + N(N+1)/2`` of the ``(2N)²`` a math kernel computes
  (:func:`encoder_attention_pairs`).  ``useful=False`` gives the full grid, which is what
  ``torch.utils.flop_counter`` and fvcore count for SDPA with a mask.

At full size the encoder is 210.6 GFLOP per 768-px tile and 380.5 per global view (useful pairs; 213.2 and
389.0 over the full grid, the figures issue 20 quotes), against CLIP's ≈ 62 and 162 in v1.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig
from llm_perf_opt.models.deepseek_ocr2.config import DeepseekOCR2Config, EncoderConfig
from llm_perf_opt.profiling.flops import (
    FlopsBreakdown,
    PageFlops,
    View,
    activated_params_per_token,
    attention_flops,
    linear_flops,
    page_flops_with_vision,
    param_counts,
    projector_flops,
    sam_flops,
    sam_output_grid,
    stage_min_bytes,
)

__all__ = [
    "ParamCountsV2",
    "encoder_attention_pairs",
    "encoder_flops",
    "encoder_params",
    "page_flops_v2",
    "param_counts_v2",
    "stage_min_bytes_v2",
    "v2_views",
    "vision_flops_v2",
]


def encoder_attention_pairs(n_image: int, useful: bool = True) -> int:
    """Query/key pairs of one head over one view's 2N positions: the prefix mask's kept pairs, or the full grid."""
    if n_image < 0:
        raise ValueError(f"n_image must be >= 0, got {n_image}")
    if not useful:
        return (2 * n_image) ** 2
    return n_image * n_image + n_image * n_image + n_image * (n_image + 1) // 2


def encoder_flops(enc: EncoderConfig, n_image: int, batch: int = 1, useful: bool = True) -> FlopsBreakdown:
    """The Qwen2-style encoder on ``batch`` views of ``n_image`` SAM tokens each (2N positions per view)."""
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    h, hd, ffn, n = enc.hidden_size, enc.head_dim, enc.intermediate_size, enc.num_layers
    rows = batch * 2 * n_image
    q_width, kv_width = enc.num_attention_heads * hd, enc.num_key_value_heads * hd
    pairs = encoder_attention_pairs(n_image, useful)
    # attention_flops over a 1×pairs "grid" gives 2·batch·heads·pairs·(d + dv): the products per kept pair.
    core = attention_flops(1, pairs, enc.num_attention_heads, hd, causal=False, batch=batch)
    comps = {
        "attn.q_proj": n * linear_flops(rows, h, q_width),
        "attn.kv_proj": n * 2 * linear_flops(rows, h, kv_width),
        "attn.core": n * core,
        "attn.o_proj": n * linear_flops(rows, q_width, h),
        "mlp.gate_up": n * 2 * linear_flops(rows, h, ffn),
        "mlp.down": n * linear_flops(rows, ffn, h),
    }
    kind = "prefix-mask pairs" if useful else "full (2N)² grid"
    notes = [
        f"encoder batch {batch}: {n_image} SAM tokens + {n_image} queries = {2 * n_image} positions, "
        f"attention over {kind} ({pairs} per head)"
    ]
    return FlopsBreakdown.of("encoder", comps, notes)


def v2_views(cfg: DeepseekOCR2Config, n_tiles: int, base_size: int | None = None) -> tuple[View, ...]:
    """Vision inputs of one page: ``n_tiles`` tiles of ``image_size`` (none if 0), then the global view."""
    if n_tiles < 0:
        raise ValueError(f"n_tiles must be >= 0, got {n_tiles}")
    base = base_size or cfg.base_size
    views: list[View] = []
    if n_tiles:
        views.append((n_tiles, cfg.image_size, cfg.image_size))
    views.append((1, base, base))
    return tuple(views)


def vision_flops_v2(
    cfg: DeepseekOCR2Config, views: Sequence[View], useful: bool = True
) -> tuple[FlopsBreakdown, FlopsBreakdown, FlopsBreakdown]:
    """(SAM, encoder, projector) FLOPs for a page's views, each ``(count, height, width)``, batched per size."""
    sam_total = FlopsBreakdown.of("sam", {})
    enc_total = FlopsBreakdown.of("encoder", {})
    proj_total = FlopsBreakdown.of("projector", {})
    for count, height, width in views:
        if count <= 0:
            continue
        sam_total = sam_total + sam_flops(cfg.sam, height, width, batch=count)
        gh, gw = sam_output_grid(cfg.sam, height, width)
        enc_total = enc_total + encoder_flops(cfg.encoder, gh * gw, batch=count, useful=useful)
        proj_total = proj_total + projector_flops(cfg.projector, count * gh * gw)
    return sam_total, enc_total, proj_total


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class ParamCountsV2:
    """Parameters per component of DeepSeek-OCR-2 and those one decoded token activates (the LM's, as in v1)."""

    sam_model: int
    encoder: int
    projector: int
    view_separator: int
    language_model: int  # embeddings, decoder layers, final norm (lm_head separate)
    lm_head: int
    activated_per_token: int

    @property
    def total(self) -> int:
        return self.sam_model + self.encoder + self.projector + self.view_separator + self.language_model + self.lm_head


def encoder_params(enc: EncoderConfig) -> int:
    """Layers (GQA projections with q/k/v bias, SwiGLU, two norms), final norm and the two query tables."""
    h, hd, ffn = enc.hidden_size, enc.head_dim, enc.intermediate_size
    q, kv = enc.num_attention_heads * hd, enc.num_key_value_heads * hd
    layer = (h * q + q) + 2 * (h * kv + kv) + q * h + 3 * h * ffn + 2 * h
    return enc.num_layers * layer + h + (enc.query_768_tokens + enc.query_1024_tokens) * h


def param_counts_v2(cfg: DeepseekOCR2Config) -> ParamCountsV2:
    """Parameters from the config alone; SAM and the language model through v1's formulas (same modules)."""
    v1 = param_counts(DeepseekOCRConfig(sam=cfg.sam, language=cfg.language))
    return ParamCountsV2(
        sam_model=v1.sam_model,
        encoder=encoder_params(cfg.encoder),
        projector=cfg.projector.input_dim * cfg.projector.n_embed + cfg.projector.n_embed,
        view_separator=cfg.projector.n_embed,
        language_model=v1.embed_tokens + v1.final_norm + v1.decoder_layers_total,
        lm_head=v1.lm_head,
        activated_per_token=activated_params_per_token(DeepseekOCRConfig(language=cfg.language)),
    )


# --------------------------------------------------------------------------------------------------
# A page, in the session's stage names
# --------------------------------------------------------------------------------------------------


def page_flops_v2(
    cfg: DeepseekOCR2Config, views: Sequence[View], prompt_len: int, n_generated: int, lm_head_positions: int = 1
) -> PageFlops:
    """Every stage of one v2 page; the encoder fills :class:`PageFlops`' second vision slot (``clip``), as the
    encoder's time fills the record's ``clip_ms``: the language-model stages are v1's formulas."""
    return page_flops_with_vision(
        cfg.language, vision_flops_v2(cfg, views), views, prompt_len, n_generated, lm_head_positions
    )


def stage_min_bytes_v2(
    cfg: DeepseekOCR2Config, views: Sequence[View], prompt_len: int, dtype_bytes: int
) -> dict[str, int]:
    """v1's lower bounds of the prefill stages' traffic (weights once + stage I/O), with the encoder in the
    ``clip`` slot: it reads its weights and the SAM tokens and writes the N query outputs per view."""
    pc = param_counts_v2(cfg)
    v1 = stage_min_bytes(DeepseekOCRConfig(sam=cfg.sam, language=cfg.language), (), prompt_len, dtype_bytes)
    out = {"sam": pc.sam_model * dtype_bytes, "clip": pc.encoder * dtype_bytes, "projector": pc.projector * dtype_bytes}
    width, n_embed = cfg.encoder.hidden_size, cfg.projector.n_embed
    for count, height, width_px in views:
        gh, gw = sam_output_grid(cfg.sam, height, width_px)
        pixels = count * 3 * height * width_px
        sam_out = count * cfg.sam.downsample_channels[-1] * gh * gw
        enc_out = count * gh * gw * width
        out["sam"] += (pixels + sam_out) * dtype_bytes
        out["clip"] += (sam_out + enc_out) * dtype_bytes
        out["projector"] += (enc_out + count * gh * gw * n_embed) * dtype_bytes
    out["vision"] = out["sam"] + out["clip"] + out["projector"]
    out["prefill_lm"] = v1["prefill_lm"]
    out["prefill"] = out["vision"] + out["prefill_lm"]
    return out
