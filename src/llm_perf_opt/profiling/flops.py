"""Analytic FLOPs, parameter counts and decode memory traffic of DeepSeek-OCR.

Conventions (every number in this module follows them, so stages can be added and compared):

* **A multiply-add counts as 2 FLOPs.**  ``linear_flops(t, i, o) == 2 * t * i * o``.  This is the unit
  of ``torch.utils.flop_counter`` and of vendor peak FLOP/s figures; fvcore counts one multiply-add as
  one "flop", so ``flop_count.count_fvcore`` doubles it.
* **Only matrix work is counted**: linear layers, convolutions, the attention products ``Q·Kᵀ`` and
  ``P·V`` and SAM's decomposed relative-position einsums (``q·Rh``, ``q·Rw``).  Elementwise work
  (bias adds, norms, activations, softmax, RoPE, residual adds, adding the rel-pos bias, position
  embedding interpolation) is left out: it is a few percent at most, no tensor core runs it, and the
  two counters we cross-check against leave it out too.
* **Causal attention counts useful FLOPs**: only the query/key pairs the mask keeps (the lower
  triangle *including* the diagonal).  A math SDPA kernel computes the full square and a flash
  kernel skips most of the masked blocks, so "useful" is the one kernel-independent choice; it is
  also what MFU should reward.  Both counters in ``flop_count`` count the full square, so causal
  stages differ from them by exactly ``attention_flops(causal=False) - attention_flops(causal=True)``.
* Shapes are the real ones: SAM's windowed blocks run attention (qkv, core, rel-pos, proj) on the
  token grid *padded* to a multiple of the window, exactly as ``window_partition`` does.

All functions are pure functions of the config and the shapes; results are frozen value objects
whose per-component dict sums to the total (checked on construction).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import attrs

from llm_perf_opt.models.deepseek_ocr.config import (
    ClipConfig,
    DeepseekOCRConfig,
    LanguageConfig,
    ProjectorConfig,
    SamConfig,
)

__all__ = [
    "DecodeBytes",
    "FlopsBreakdown",
    "PageFlops",
    "ParamCounts",
    "activated_params_per_token",
    "attention_flops",
    "batched_decode_bytes",
    "causal_pairs",
    "clip_flops",
    "conv2d_flops",
    "conv_out_size",
    "decode_bytes",
    "decode_bytes_per_step",
    "decode_flops",
    "decode_step_flops",
    "experts_read_note",
    "gundam_views",
    "kv_cache_bytes",
    "linear_flops",
    "lm_forward_flops",
    "page_flops",
    "param_counts",
    "prefill_flops",
    "projector_flops",
    "sam_flops",
    "sam_output_grid",
    "stage_min_bytes",
    "vision_flops",
]

View = tuple[int, int, int]  # (count, height_px, width_px) of one batch of vision inputs


# --------------------------------------------------------------------------------------------------
# Value objects
# --------------------------------------------------------------------------------------------------


def _check_total(instance: FlopsBreakdown, attribute: attrs.Attribute[int], value: int) -> None:
    total = sum(instance.components_flops.values())
    if value != total:
        raise ValueError(f"{instance.name}: total_flops {value} != sum of components {total}")


@attrs.frozen
class FlopsBreakdown:
    """FLOPs of one stage, split by component (component -> FLOPs); ``total_flops`` is their sum."""

    name: str
    components_flops: dict[str, int]
    total_flops: int = attrs.field(validator=_check_total)
    notes: tuple[str, ...] = ()

    @classmethod
    def of(cls, name: str, components: Mapping[str, int], notes: Iterable[str] = ()) -> FlopsBreakdown:
        comps = {k: int(v) for k, v in components.items()}
        return cls(name=name, components_flops=comps, total_flops=sum(comps.values()), notes=tuple(notes))

    def scaled(self, factor: int, name: str | None = None) -> FlopsBreakdown:
        """The same work ``factor`` times (a batch of identical views)."""
        return FlopsBreakdown.of(
            name or self.name, {k: v * factor for k, v in self.components_flops.items()}, self.notes
        )

    def __add__(self, other: FlopsBreakdown) -> FlopsBreakdown:
        keys = list(dict.fromkeys([*self.components_flops, *other.components_flops]))
        comps = {k: self.components_flops.get(k, 0) + other.components_flops.get(k, 0) for k in keys}
        notes = tuple(dict.fromkeys([*self.notes, *other.notes]))
        return FlopsBreakdown.of(self.name, comps, notes)


@attrs.frozen
class PageFlops:
    """Analytic FLOPs of one page, stage by stage, in the session's stage names.

    ``prefill`` is vision + LM prefill because the session's prefill timer spans both (upload →
    SAM/CLIP/projector → embed → LM forward → token 1); ``prefill_lm`` is the decoder part alone.
    """

    sam: FlopsBreakdown
    clip: FlopsBreakdown
    projector: FlopsBreakdown
    prefill_lm: FlopsBreakdown
    decode: FlopsBreakdown
    views: tuple[View, ...]
    prompt_len: int
    n_generated: int

    @property
    def vision_flops(self) -> int:
        return self.sam.total_flops + self.clip.total_flops + self.projector.total_flops

    @property
    def prefill_flops(self) -> int:
        return self.vision_flops + self.prefill_lm.total_flops

    @property
    def total_flops(self) -> int:
        return self.prefill_flops + self.decode.total_flops

    def stages(self) -> dict[str, int]:
        """Stage name -> FLOPs (``vision`` and ``prefill`` are sums of the stages before them)."""
        return {
            "sam": self.sam.total_flops,
            "clip": self.clip.total_flops,
            "projector": self.projector.total_flops,
            "vision": self.vision_flops,
            "prefill_lm": self.prefill_lm.total_flops,
            "prefill": self.prefill_flops,
            "decode": self.decode.total_flops,
            "total": self.total_flops,
        }


@attrs.frozen
class ParamCounts:
    """Parameters per component, with the same split as tests/fixtures/deepseek_ocr_real/param_counts.json."""

    sam_model: int
    clip: int
    projector: int
    image_newline_view_separator: int
    embed_tokens: int
    lm_head: int
    final_norm: int
    decoder_layers_total: int
    per_layer_self_attn: int
    per_layer_norms: int
    per_layer_dense_mlp: int
    per_layer_routed_expert: int
    n_routed_experts: int
    per_layer_shared_experts: int
    per_layer_gate: int

    @property
    def total(self) -> int:
        return (
            self.sam_model
            + self.clip
            + self.projector
            + self.image_newline_view_separator
            + self.embed_tokens
            + self.lm_head
            + self.final_norm
            + self.decoder_layers_total
        )


@attrs.frozen
class DecodeBytes:
    """Bytes one decode step (or a run of steps) must move from device memory, by component."""

    components_bytes: dict[str, int]
    total_bytes: int
    notes: tuple[str, ...] = ()

    @classmethod
    def of(cls, components: Mapping[str, int], notes: Iterable[str] = ()) -> DecodeBytes:
        comps = {k: int(v) for k, v in components.items()}
        return cls(components_bytes=comps, total_bytes=sum(comps.values()), notes=tuple(dict.fromkeys(notes)))


# --------------------------------------------------------------------------------------------------
# Primitive formulas
# --------------------------------------------------------------------------------------------------


def _nonneg(**values: int) -> None:
    for name, v in values.items():
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")


def linear_flops(tokens: int, in_features: int, out_features: int) -> int:
    """``tokens`` rows through a ``in_features -> out_features`` matrix (bias add not counted)."""
    _nonneg(tokens=tokens, in_features=in_features, out_features=out_features)
    return 2 * tokens * in_features * out_features


def conv_out_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output length of a convolution along one axis (PyTorch's floor formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv2d_flops(
    batch: int,
    in_channels: int,
    out_channels: int,
    kernel_h: int,
    kernel_w: int,
    out_h: int,
    out_w: int,
    groups: int = 1,
) -> int:
    """A 2-D convolution: every output element is a dot product of ``in/groups * kh * kw`` terms."""
    _nonneg(batch=batch, out_h=out_h, out_w=out_w)
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups={groups}")
    return 2 * batch * out_h * out_w * out_channels * (in_channels // groups) * kernel_h * kernel_w


def causal_pairs(q_len: int, kv_len: int) -> int:
    """Query/key pairs a causal mask keeps when the ``q_len`` queries are the last ``q_len`` of ``kv_len``.

    Query ``i`` (0-based among the new ones) sees ``kv_len - q_len + 1 + i`` keys, diagonal included:
    prefill (``q == kv == L``) gives ``L(L+1)/2``; one decode token gives ``kv_len``.
    """
    _nonneg(q_len=q_len, kv_len=kv_len)
    if q_len > kv_len:
        raise ValueError(f"causal attention needs q_len <= kv_len, got {q_len} > {kv_len}")
    return q_len * (kv_len - q_len + 1) + q_len * (q_len - 1) // 2


def attention_flops(
    q_len: int,
    kv_len: int,
    heads: int,
    head_dim: int,
    causal: bool,
    batch: int = 1,
    v_head_dim: int | None = None,
) -> int:
    """The two attention products ``Q·Kᵀ`` and ``P·V`` (projections excluded).

    Non-causal: ``2·q·kv·d`` for the scores plus ``2·q·kv·dv`` for the weighted sum, per head.
    Causal: the same per *kept* pair (lower triangle incl. diagonal, see :func:`causal_pairs`) —
    the "useful FLOPs" convention of this module, not what a math kernel executes.
    """
    _nonneg(q_len=q_len, kv_len=kv_len, heads=heads, head_dim=head_dim, batch=batch)
    dv = head_dim if v_head_dim is None else v_head_dim
    pairs = causal_pairs(q_len, kv_len) if causal else q_len * kv_len
    return 2 * batch * heads * pairs * (head_dim + dv)


# --------------------------------------------------------------------------------------------------
# Vision: SAM ViT-B, CLIP-L, projector
# --------------------------------------------------------------------------------------------------


def _sam_mlp_hidden(sam: SamConfig) -> int:
    return int(sam.embed_dim * sam.mlp_ratio)


def sam_output_grid(sam: SamConfig, height: int, width: int) -> tuple[int, int]:
    """Token grid after SAM's patch embed and the two stride-2 convs (net_2, net_3)."""
    gh, gw = conv_out_size(height, sam.patch_size, sam.patch_size), conv_out_size(width, sam.patch_size, sam.patch_size)
    for _ in sam.downsample_channels:
        gh, gw = conv_out_size(gh, 3, 2, 1), conv_out_size(gw, 3, 2, 1)
    return gh, gw


def sam_flops(sam: SamConfig, height: int, width: int, batch: int = 1) -> FlopsBreakdown:
    """SAM ViT-B image encoder on ``batch`` images of ``height × width`` pixels.

    Windowed blocks pad the token grid to a multiple of ``window_size`` and run qkv, attention,
    rel-pos and the output projection on the padded windows (padding tokens cost FLOPs too); global
    blocks attend over the whole grid.  The MLP runs on the unpadded grid.
    """
    _nonneg(batch=batch)
    d, heads = sam.embed_dim, sam.num_heads
    hd = d // heads
    gh, gw = conv_out_size(height, sam.patch_size, sam.patch_size), conv_out_size(width, sam.patch_size, sam.patch_size)
    tokens = gh * gw
    ws = sam.window_size
    ph, pw = (math.ceil(gh / ws) * ws, math.ceil(gw / ws) * ws) if ws > 0 else (gh, gw)
    n_win = (ph // ws) * (pw // ws) if ws > 0 else 0
    win_tokens = ws * ws

    n_global = sum(1 for i in range(sam.depth) if i in sam.global_attn_indexes)
    n_windowed = sam.depth - n_global if ws > 0 else 0
    n_global = sam.depth - n_windowed

    comps: dict[str, int] = {}
    comps["patch_embed"] = conv2d_flops(batch, 3, d, sam.patch_size, sam.patch_size, gh, gw)

    if n_windowed:
        padded = batch * n_win * win_tokens
        comps["windowed_attn.qkv"] = n_windowed * linear_flops(padded, d, 3 * d)
        comps["windowed_attn.core"] = n_windowed * attention_flops(
            win_tokens, win_tokens, heads, hd, causal=False, batch=batch * n_win
        )
        if sam.use_rel_pos:  # einsum bhwc,hkc->bhwk and bhwc,wkc->bhwk per window
            comps["windowed_attn.rel_pos"] = n_windowed * 2 * batch * n_win * heads * win_tokens * (ws + ws) * hd
        comps["windowed_attn.proj"] = n_windowed * linear_flops(padded, d, d)
    if n_global:
        g_tokens = batch * tokens
        comps["global_attn.qkv"] = n_global * linear_flops(g_tokens, d, 3 * d)
        comps["global_attn.core"] = n_global * attention_flops(tokens, tokens, heads, hd, causal=False, batch=batch)
        if sam.use_rel_pos:
            comps["global_attn.rel_pos"] = n_global * 2 * batch * heads * tokens * (gh + gw) * hd
        comps["global_attn.proj"] = n_global * linear_flops(g_tokens, d, d)

    hidden = _sam_mlp_hidden(sam)
    comps["mlp"] = sam.depth * (linear_flops(batch * tokens, d, hidden) + linear_flops(batch * tokens, hidden, d))
    oc = sam.out_chans
    comps["neck"] = conv2d_flops(batch, d, oc, 1, 1, gh, gw) + conv2d_flops(batch, oc, oc, 3, 3, gh, gw)
    ch, h, w = oc, gh, gw
    for i, out_ch in enumerate(sam.downsample_channels):
        h, w = conv_out_size(h, 3, 2, 1), conv_out_size(w, 3, 2, 1)
        comps[f"net_{i + 2}"] = conv2d_flops(batch, ch, out_ch, 3, 3, h, w)
        ch = out_ch
    notes = [
        f"SAM input {height}x{width}, batch {batch}: grid {gh}x{gw}; {n_windowed} windowed blocks on "
        f"{n_win} windows of {ws}x{ws} (grid padded to {ph}x{pw}), {n_global} global blocks on {tokens} tokens",
    ]
    return FlopsBreakdown.of("sam", comps, notes)


def clip_flops(clip: ClipConfig, feature_h: int, feature_w: int, batch: int = 1) -> FlopsBreakdown:
    """CLIP-L on SAM features: ``h·w`` patch tokens + CLS through ``num_layers`` pre-LN blocks.

    The CLIP patch-embedding conv is not run (SAM features replace it); position-embedding
    interpolation is elementwise and not counted.
    """
    _nonneg(batch=batch, feature_h=feature_h, feature_w=feature_w)
    d, heads, ffn = clip.hidden_size, clip.num_attention_heads, clip.ffn_hidden_size
    seq = feature_h * feature_w + 1
    rows = batch * seq
    n = clip.num_layers
    comps = {
        "attn.qkv": n * linear_flops(rows, d, 3 * d),
        "attn.core": n * attention_flops(seq, seq, heads, d // heads, causal=False, batch=batch),
        "attn.out_proj": n * linear_flops(rows, d, d),
        "mlp.fc1": n * linear_flops(rows, d, ffn),
        "mlp.fc2": n * linear_flops(rows, ffn, d),
    }
    return FlopsBreakdown.of("clip", comps, [f"CLIP batch {batch}: {seq} tokens ({feature_h}x{feature_w} + CLS)"])


def projector_flops(projector: ProjectorConfig, tokens: int) -> FlopsBreakdown:
    """Linear projector from concat(CLIP without CLS, SAM) features to the LM width, per image token."""
    if projector.projector_type != "linear":
        raise ValueError(f"projector_type {projector.projector_type!r} has no FLOPs formula here (only 'linear')")
    return FlopsBreakdown.of("projector", {"linear": linear_flops(tokens, projector.input_dim, projector.n_embed)})


def gundam_views(cfg: DeepseekOCRConfig, n_crops: int) -> tuple[View, ...]:
    """Vision inputs of one page in crop mode: the global view plus ``n_crops`` tiles (none if 0)."""
    _nonneg(n_crops=n_crops)
    views: list[View] = []
    if n_crops:
        views.append((n_crops, cfg.image_size, cfg.image_size))
    views.append((1, cfg.base_size, cfg.base_size))
    return tuple(views)


def vision_flops(
    cfg: DeepseekOCRConfig, views: Sequence[View]
) -> tuple[FlopsBreakdown, FlopsBreakdown, FlopsBreakdown]:
    """(SAM, CLIP, projector) FLOPs for the page's views, each ``(count, height, width)``.

    Views of one size run batched, so ``count`` identical views cost ``count`` times one view.
    """
    sam_total = FlopsBreakdown.of("sam", {})
    clip_total = FlopsBreakdown.of("clip", {})
    proj_total = FlopsBreakdown.of("projector", {})
    for count, h, w in views:
        if count <= 0:
            continue
        sam_total = sam_total + sam_flops(cfg.sam, h, w, batch=count)
        fh, fw = sam_output_grid(cfg.sam, h, w)
        clip_total = clip_total + clip_flops(cfg.clip, fh, fw, batch=count)
        proj_total = proj_total + projector_flops(cfg.projector, count * fh * fw)
    return sam_total, clip_total, proj_total


# --------------------------------------------------------------------------------------------------
# Language model
# --------------------------------------------------------------------------------------------------


def _moe_layers(lang: LanguageConfig) -> list[int]:
    return [i for i in range(lang.num_hidden_layers) if lang.is_moe_layer(i)]


def lm_forward_flops(
    lang: LanguageConfig, q_len: int, kv_len: int, lm_head_positions: int, name: str = "lm"
) -> FlopsBreakdown:
    """One decoder forward over ``q_len`` new tokens whose causal attention sees ``kv_len`` keys.

    Per layer: q/k/v/o projections, causal attention (useful pairs only), then layer 0's dense
    SiLU-gated MLP (gate/up/down) or the MoE: router gate, ``top_k`` routed experts per token and
    the shared experts as one MLP of width ``moe_intermediate_size * n_shared_experts``.  The
    lm_head runs on ``lm_head_positions`` rows only (1 when only the last logits are computed).
    """
    _nonneg(q_len=q_len, kv_len=kv_len, lm_head_positions=lm_head_positions)
    hid, hd = lang.hidden_size, lang.head_dim
    qh, kvh = lang.num_attention_heads, lang.num_key_value_heads
    n_layers = lang.num_hidden_layers
    moe = _moe_layers(lang)
    n_moe, n_dense = len(moe), n_layers - len(moe)
    shared_w = lang.moe_intermediate_size * lang.n_shared_experts
    comps = {
        "attn.q": n_layers * linear_flops(q_len, hid, qh * hd),
        "attn.kv": n_layers * 2 * linear_flops(q_len, hid, kvh * hd),
        "attn.core": n_layers * attention_flops(q_len, kv_len, qh, hd, causal=True),
        "attn.o": n_layers * linear_flops(q_len, qh * hd, hid),
        "mlp.dense": n_dense * 3 * linear_flops(q_len, hid, lang.intermediate_size),
        "moe.gate": n_moe * linear_flops(q_len, hid, lang.n_routed_experts),
        "moe.routed": n_moe * 3 * linear_flops(q_len * lang.num_experts_per_tok, hid, lang.moe_intermediate_size),
        "moe.shared": (n_moe * 3 * linear_flops(q_len, hid, shared_w)) if lang.n_shared_experts else 0,
        "lm_head": linear_flops(lm_head_positions, hid, lang.vocab_size),
    }
    return FlopsBreakdown.of(name, comps)


def prefill_flops(lang: LanguageConfig, prompt_len: int, lm_head_positions: int = 1) -> FlopsBreakdown:
    """LM prefill over the whole prompt (image tokens included), empty cache.

    ``lm_head_positions`` defaults to 1 (only the last position's logits, what generation needs);
    pass ``prompt_len`` when the implementation projects every position.
    """
    out = lm_forward_flops(lang, prompt_len, prompt_len, lm_head_positions, name="prefill_lm")
    note = f"prefill of {prompt_len} tokens; lm_head on {lm_head_positions} position(s)"
    return FlopsBreakdown.of(out.name, out.components_flops, [note])


def decode_step_flops(lang: LanguageConfig, context_len: int) -> FlopsBreakdown:
    """One decode step: one new token attending over ``context_len`` keys (itself included)."""
    if context_len < 1:
        raise ValueError(f"context_len must be >= 1, got {context_len}")
    return lm_forward_flops(lang, 1, context_len, 1, name="decode_step")


def decode_flops(lang: LanguageConfig, prompt_len: int, n_generated: int) -> FlopsBreakdown:
    """All decode steps that produce ``n_generated`` tokens after a prefill of ``prompt_len``.

    The first generated token comes out of prefill, so ``n_generated`` tokens take
    ``n_generated - 1`` decode steps; step ``i`` (1-based) feeds token ``i`` and attends over
    ``prompt_len + i`` keys.  Only attention grows with the context; it is summed in closed form.
    """
    _nonneg(prompt_len=prompt_len, n_generated=n_generated)
    steps = max(n_generated - 1, 0)
    if steps == 0:
        zero = {k: 0 for k in lm_forward_flops(lang, 1, 1, 1).components_flops}
        return FlopsBreakdown.of("decode", zero, [f"{n_generated} token(s) generated: no decode step ran"])
    one = lm_forward_flops(lang, 1, prompt_len + 1, 1)
    comps = {k: v * steps for k, v in one.components_flops.items()}
    # Σ_{i=1..steps} (prompt_len + i) keys for the attention products.
    keys_sum = steps * prompt_len + steps * (steps + 1) // 2
    hd = lang.head_dim
    comps["attn.core"] = lang.num_hidden_layers * 2 * lang.num_attention_heads * keys_sum * (hd + hd)
    note = (
        f"{steps} decode steps (the first of {n_generated} tokens comes from prefill); "
        f"contexts {prompt_len + 1}..{prompt_len + steps}"
    )
    return FlopsBreakdown.of("decode", comps, [note])


def page_flops(
    cfg: DeepseekOCRConfig,
    views: Sequence[View],
    prompt_len: int,
    n_generated: int,
    lm_head_positions: int = 1,
) -> PageFlops:
    """Every stage of one page: vision on ``views``, prefill of ``prompt_len``, ``n_generated`` tokens."""
    return page_flops_with_vision(
        cfg.language, vision_flops(cfg, views), views, prompt_len, n_generated, lm_head_positions
    )


def page_flops_with_vision(
    language: LanguageConfig,
    vision: tuple[FlopsBreakdown, FlopsBreakdown, FlopsBreakdown],
    views: Sequence[View],
    prompt_len: int,
    n_generated: int,
    lm_head_positions: int,
) -> PageFlops:
    """A page's stages from its vision breakdowns (SAM, the second tower, projector: a model's own) and the
    language model's prefill and decode, which DeepSeek-OCR and -OCR-2 share."""
    sam, second, proj = vision
    return PageFlops(
        sam=sam,
        clip=second,
        projector=proj,
        prefill_lm=prefill_flops(language, prompt_len, lm_head_positions),
        decode=decode_flops(language, prompt_len, n_generated),
        views=tuple(views),
        prompt_len=prompt_len,
        n_generated=n_generated,
    )


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


def _sam_params(sam: SamConfig) -> int:
    d, hd = sam.embed_dim, sam.embed_dim // sam.num_heads
    grid = sam.img_size // sam.patch_size
    hidden = _sam_mlp_hidden(sam)
    n = 3 * d * sam.patch_size**2 + d  # patch embed conv with bias
    n += grid * grid * d  # absolute pos_embed
    for i in range(sam.depth):
        n += 2 * 2 * d  # norm1, norm2
        n += d * 3 * d + 3 * d + d * d + d  # qkv, proj (bias)
        n += d * hidden + hidden + hidden * d + d  # mlp lin1, lin2
        if sam.use_rel_pos:
            size = grid if (i in sam.global_attn_indexes or sam.window_size == 0) else sam.window_size
            n += 2 * (2 * size - 1) * hd  # rel_pos_h, rel_pos_w
    oc = sam.out_chans
    n += d * oc + 2 * oc + oc * oc * 9 + 2 * oc  # neck: conv1x1, LN2d, conv3x3, LN2d (convs without bias)
    ch = oc
    for out_ch in sam.downsample_channels:
        n += ch * out_ch * 9
        ch = out_ch
    return n


def _clip_params(clip: ClipConfig) -> int:
    d, ffn = clip.hidden_size, clip.ffn_hidden_size
    n = d + 3 * d * clip.patch_size**2 + clip.num_positions * d + 2 * d  # CLS, patch conv, pos emb, pre-LN
    per_layer = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * ffn + ffn) + (ffn * d + d)
    return n + clip.num_layers * per_layer


def param_counts(cfg: DeepseekOCRConfig) -> ParamCounts:
    """Parameters per component, computed from the config (no weights needed)."""
    lang = cfg.language
    hid, hd = lang.hidden_size, lang.head_dim
    attn = hid * lang.num_attention_heads * hd * 2 + hid * lang.num_key_value_heads * hd * 2
    norms = 2 * hid
    dense = 3 * hid * lang.intermediate_size
    expert = 3 * hid * lang.moe_intermediate_size
    shared = expert * lang.n_shared_experts
    gate = lang.n_routed_experts * hid
    layers = 0
    for i in range(lang.num_hidden_layers):
        layers += attn + norms
        layers += (lang.n_routed_experts * expert + shared + gate) if lang.is_moe_layer(i) else dense
    return ParamCounts(
        sam_model=_sam_params(cfg.sam),
        clip=_clip_params(cfg.clip),
        projector=cfg.projector.input_dim * cfg.projector.n_embed + cfg.projector.n_embed,
        image_newline_view_separator=2 * cfg.projector.n_embed,
        embed_tokens=lang.vocab_size * hid,
        lm_head=lang.vocab_size * hid,
        final_norm=hid,
        decoder_layers_total=layers,
        per_layer_self_attn=attn,
        per_layer_norms=norms,
        per_layer_dense_mlp=dense,
        per_layer_routed_expert=expert,
        n_routed_experts=lang.n_routed_experts,
        per_layer_shared_experts=shared,
        per_layer_gate=gate,
    )


def _activated_weight_params(lang: LanguageConfig, experts_hit: Sequence[int]) -> dict[str, int]:
    """Decoder weights one token step touches, by component, given routed experts hit per MoE layer."""
    pc_attn = lang.hidden_size * lang.head_dim * (2 * lang.num_attention_heads + 2 * lang.num_key_value_heads)
    expert = 3 * lang.hidden_size * lang.moe_intermediate_size
    moe = _moe_layers(lang)
    n_dense = lang.num_hidden_layers - len(moe)
    return {
        "attn": lang.num_hidden_layers * pc_attn,
        "norms": lang.num_hidden_layers * 2 * lang.hidden_size + lang.hidden_size,
        "mlp.dense": n_dense * 3 * lang.hidden_size * lang.intermediate_size,
        "moe.gate": len(moe) * lang.n_routed_experts * lang.hidden_size,
        "moe.routed": sum(experts_hit) * expert,
        "moe.shared": len(moe) * expert * lang.n_shared_experts,
        "lm_head": lang.vocab_size * lang.hidden_size,
    }


def activated_params_per_token(cfg: DeepseekOCRConfig) -> int:
    """Decoder parameters one token uses: all dense weights, ``top_k`` routed experts per MoE layer,
    the lm_head and norms; the embedding table is a lookup, not a matmul, so it is excluded."""
    lang = cfg.language
    hits = [lang.num_experts_per_tok] * len(_moe_layers(lang))
    return sum(_activated_weight_params(lang, hits).values())


# --------------------------------------------------------------------------------------------------
# Decode memory traffic (for MBU)
# --------------------------------------------------------------------------------------------------


def kv_cache_bytes(lang: LanguageConfig, tokens: int, dtype_bytes: int) -> int:
    """K and V of ``tokens`` positions over all layers."""
    _nonneg(tokens=tokens, dtype_bytes=dtype_bytes)
    return 2 * lang.num_hidden_layers * lang.num_key_value_heads * lang.head_dim * tokens * dtype_bytes


def _experts_hit(
    lang: LanguageConfig, experts_hit_per_layer: Sequence[int] | None, batch: int
) -> tuple[list[int], list[str]]:
    moe = _moe_layers(lang)
    most = min(lang.n_routed_experts, lang.num_experts_per_tok * batch)  # distinct experts one step can hit
    if experts_hit_per_layer is None:
        if batch == 1:
            note = (
                f"routed experts hit not measured: assumed top_k={lang.num_experts_per_tok} per MoE layer "
                "(exact for one token at batch 1)"
            )
        else:
            note = (
                f"routed experts hit not measured: assumed min(n_routed, top_k*batch)={most} per MoE layer "
                "(upper bound: every token picks different experts)"
            )
        return [most] * len(moe), [note]
    hits = list(experts_hit_per_layer)
    if len(hits) == lang.num_hidden_layers:
        hits = [hits[i] for i in moe]
    elif len(hits) != len(moe):
        raise ValueError(
            f"experts_hit_per_layer has {len(hits)} entries; expected {len(moe)} (MoE layers) "
            f"or {lang.num_hidden_layers} (all layers)"
        )
    for h in hits:
        if not 0 <= h <= most:
            raise ValueError(
                f"experts_hit_per_layer entry {h} outside 0..{most}: one decode step of batch {batch} routes "
                f"{batch} token(s) to top_k={lang.num_experts_per_tok} experts each; a page-level union "
                "(e.g. the model's experts_hit_per_layer() since prefill) is not a per-step count"
            )
    return hits, ["routed experts hit: measured"]


def decode_bytes_per_step(
    cfg: DeepseekOCRConfig,
    context_len: int,
    dtype_bytes: int,
    experts_hit_per_layer: Sequence[int] | None = None,
    batch: int = 1,
) -> DecodeBytes:
    """Minimum device-memory traffic of one decode step at ``context_len`` keys (new token included).

    Weights actually read once each (shared by the batch): attention, norms, the dense MLP, router
    gates, shared experts, the routed experts hit in this step (``experts_hit_per_layer``, one
    entry per MoE layer or per layer; when None, ``top_k`` per MoE layer is assumed at batch 1 — exact
    there — and a note says so), the lm_head; per sequence: one embedding row, the K/V cache read
    over ``context_len`` positions and the new token's K/V written.  Activations are ignored
    (kilobytes at small batch).  A kernel that attends over a static cache's full ``max_len`` with a
    mask would read ``max_len`` rows: pass that as ``context_len`` to model it (the native decoder
    slices the cache to the live length, so ``context_len`` is right there).
    """
    if context_len < 1:
        raise ValueError(f"context_len must be >= 1, got {context_len}")
    if dtype_bytes <= 0:
        raise ValueError(f"dtype_bytes must be > 0, got {dtype_bytes}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    lang = cfg.language
    hits, notes = _experts_hit(lang, experts_hit_per_layer, batch)
    comps = {f"weights.{k}": v * dtype_bytes for k, v in _activated_weight_params(lang, hits).items()}
    comps["weights.embed_row"] = batch * lang.hidden_size * dtype_bytes
    comps["kv.read"] = batch * kv_cache_bytes(lang, context_len, dtype_bytes)
    comps["kv.write"] = batch * kv_cache_bytes(lang, 1, dtype_bytes)
    return DecodeBytes.of(comps, notes)


def decode_bytes(
    cfg: DeepseekOCRConfig,
    prompt_len: int,
    n_generated: int,
    dtype_bytes: int,
    experts_hit_per_layer: Sequence[int] | None = None,
) -> DecodeBytes:
    """Σ of :func:`decode_bytes_per_step` over the ``n_generated - 1`` steps of :func:`decode_flops` (batch 1).

    ``experts_hit_per_layer`` is a per-step count applied to every step; None assumes top_k (exact at
    batch 1).  Do not pass a page-level union of experts hit over all steps here.
    """
    _nonneg(prompt_len=prompt_len, n_generated=n_generated)
    steps = max(n_generated - 1, 0)
    if steps == 0:
        return DecodeBytes.of({}, [f"{n_generated} token(s) generated: no decode step ran"])
    first = decode_bytes_per_step(cfg, prompt_len + 1, dtype_bytes, experts_hit_per_layer)
    comps = {k: v * steps for k, v in first.components_bytes.items()}
    keys_sum = steps * prompt_len + steps * (steps + 1) // 2
    comps["kv.read"] = kv_cache_bytes(cfg.language, keys_sum, dtype_bytes)
    return DecodeBytes.of(comps, [*first.notes, f"{steps} decode steps"])


def batched_decode_bytes(
    lang: LanguageConfig,
    steps: int,
    row_steps: int,
    key_steps: int,
    dtype_bytes: int,
    experts_read: int | None = None,
    counted_steps: int = 0,
) -> DecodeBytes:
    """Minimum device-memory traffic of ``steps`` batched decode steps that computed ``row_steps`` rows in all
    and attended over ``key_steps`` keys in all (each row's own context, summed over rows and steps).

    Every step reads the weights once for all its rows: attention, norms, the dense MLP, router gates, shared
    experts, the lm_head, and the distinct routed experts its rows picked.  ``experts_read`` is those routed
    experts summed over MoE layers and over the ``counted_steps`` steps that counted them on the device; every
    other step is taken to read ``top_k`` per MoE layer, the fewest any row can pick, so then the total is a
    lower bound (a note says so).  Per row: one embedding row and the new token's K/V written; the K/V read is
    ``key_steps`` positions.  Activations are left out (kilobytes per row).
    """
    _nonneg(steps=steps, row_steps=row_steps, key_steps=key_steps, counted_steps=counted_steps)
    if dtype_bytes <= 0:
        raise ValueError(f"dtype_bytes must be > 0, got {dtype_bytes}")
    if counted_steps > steps or (experts_read is None) != (counted_steps == 0):
        raise ValueError(
            f"experts_read={experts_read} over counted_steps={counted_steps} of {steps} steps: a count needs its "
            "steps (at most all of them), and counted steps need a count"
        )
    moe = len(_moe_layers(lang))
    per_step = _activated_weight_params(lang, [0] * moe)
    comps = {f"weights.{k}": steps * v * dtype_bytes for k, v in per_step.items() if k != "moe.routed"}
    expert = 3 * lang.hidden_size * lang.moe_intermediate_size
    uncounted = steps - counted_steps
    comps["weights.moe.routed"] = ((experts_read or 0) + uncounted * moe * lang.num_experts_per_tok) * expert
    comps["weights.moe.routed"] *= dtype_bytes
    comps["weights.embed_row"] = row_steps * lang.hidden_size * dtype_bytes
    comps["kv.read"] = kv_cache_bytes(lang, key_steps, dtype_bytes)
    comps["kv.write"] = kv_cache_bytes(lang, row_steps, dtype_bytes)
    return DecodeBytes.of(comps, [experts_read_note(counted_steps, steps, lang.num_experts_per_tok)])


def experts_read_note(counted_steps: int, steps: int, top_k: int) -> str:
    """How :func:`batched_decode_bytes` took the routed experts of ``steps`` steps, ``counted_steps`` counted."""
    if counted_steps == steps:
        return "routed experts read: counted on the device in every step"
    return (
        f"routed experts read: counted on the device in {counted_steps:,} of {steps:,} steps; the other "
        f"{steps - counted_steps:,} taken as top_k={top_k} per MoE layer, the fewest a row picks (a lower bound)"
    )


def stage_min_bytes(cfg: DeepseekOCRConfig, views: Sequence[View], prompt_len: int, dtype_bytes: int) -> dict[str, int]:
    """Lower bounds of the device-memory traffic of the prefill stages of one page, for the roofline.

    Each stage must at least read its weights once and read its input / write its output tensors;
    traffic between the layers inside a stage (activations spilled to HBM) is left out, so these are
    lower bounds and the arithmetic intensities derived from them are upper bounds.  The LM prefill
    reads the routed experts its tokens hit: ``min(n_routed, prompt_len * top_k)`` per MoE layer (all
    of them for any real prompt), writes the prompt's K/V and reads one embedding row per token.
    """
    _nonneg(prompt_len=prompt_len, dtype_bytes=dtype_bytes)
    pc = param_counts(cfg)
    sam, clip, proj = cfg.sam, cfg.clip, cfg.projector
    out: dict[str, int] = {"sam": pc.sam_model * dtype_bytes, "clip": pc.clip * dtype_bytes,
                           "projector": pc.projector * dtype_bytes}  # fmt: skip
    for count, h, w in views:
        fh, fw = sam_output_grid(sam, h, w)
        pixels = count * 3 * h * w
        sam_out = count * sam.downsample_channels[-1] * fh * fw
        clip_out = count * (1 + fh * fw) * clip.hidden_size
        proj_out = count * fh * fw * proj.n_embed
        out["sam"] += (pixels + sam_out) * dtype_bytes
        out["clip"] += (pixels + sam_out + clip_out) * dtype_bytes
        out["projector"] += (count * fh * fw * proj.input_dim + proj_out) * dtype_bytes
    out["vision"] = out["sam"] + out["clip"] + out["projector"]
    lang = cfg.language
    hits = [min(lang.n_routed_experts, prompt_len * lang.num_experts_per_tok)] * len(_moe_layers(lang))
    weights = sum(_activated_weight_params(lang, hits).values()) * dtype_bytes
    out["prefill_lm"] = (
        weights + prompt_len * lang.hidden_size * dtype_bytes + kv_cache_bytes(lang, prompt_len, dtype_bytes)
    )
    out["prefill"] = out["vision"] + out["prefill_lm"]
    return out
