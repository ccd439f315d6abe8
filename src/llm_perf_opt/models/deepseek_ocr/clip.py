"""CLIP-L/14 vision tower of DeepSeek-OCR, run on SAM features instead of its own patches.

DeepSeek-OCR never uses CLIP's patch convolution at inference: the SAM encoder's output grid
(1024 channels, 16×16 for the global view, 10×10 for a tile) *is* the patch embedding sequence.
The tower adds a CLS token and (resized) absolute positions, applies the pre-LayerNorm and the
transformer, and returns the last layer's hidden states without any post-LayerNorm (the checkpoint
has none).  Callers drop the CLS token before the projector.
"""

from __future__ import annotations

import math
from typing import Any, cast, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_perf_opt.errors import ModelLoadError
from llm_perf_opt.models.deepseek_ocr.config import ClipConfig
from llm_perf_opt.models.deepseek_ocr.graphs import ResizedTables, check_sdpa_policy

__all__ = [
    "CLIP_ATTENTION",
    "ClipAttention",
    "ClipBlock",
    "ClipEmbeddings",
    "ClipMlp",
    "ClipTransformer",
    "ClipVisionTower",
    "clip_block_fast",
    "clip_block_views",
    "clip_block_weights",
    "interpolate_clip_pos_embed",
    "quick_gelu",
]


# the fast blocks' attention (``infer.fast.clip_attention``): SDPA per view, or one Triton kernel over a page's views
# (:mod:`~llm_perf_opt.models.deepseek_ocr.clip_attention`)
CLIP_ATTENTION = ("sdpa", "triton")


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU; the weights were trained with it, not with erf GELU."""
    return x * torch.sigmoid(1.702 * x)


def interpolate_clip_pos_embed(pos_embed: Tensor, hw: tuple[int, int]) -> Tensor:
    """Fit the [1+S², C] position table (CLS first) to an h×w patch grid, keeping the CLS row as is.

    The table is trained for a 16×16 grid (224/14); a 640² tile yields 10×10 SAM tokens.  The grid
    part is resized with bicubic + antialias in float32 like the reference (which assumes a square
    grid; h×w is the natural generalisation and identical for squares).
    """
    src = math.isqrt(pos_embed.shape[0] - 1)
    if src * src != pos_embed.shape[0] - 1:
        raise ModelLoadError(f"CLIP position table has {pos_embed.shape[0]} rows, not 1 + a square grid")
    if (src, src) == hw:
        return pos_embed
    cls_pos, grid_pos = pos_embed[:1], pos_embed[1:]
    grid = grid_pos.reshape(1, src, src, -1).permute(0, 3, 1, 2).to(torch.float32)
    resized = F.interpolate(grid, size=hw, mode="bicubic", antialias=True, align_corners=False)
    resized = resized.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(hw[0] * hw[1], -1)
    return torch.cat([cls_pos, resized], dim=0)


class ClipEmbeddings(nn.Module):
    """CLS token + patch embeddings + absolute positions.

    ``position_ids`` is registered (non-persistent, absent from the checkpoint) only for key parity
    with the vendor module; ``forward`` reads ``position_embedding.weight`` directly, so a model
    built on the meta device and loaded with ``assign=True`` works without re-creating the buffer.
    """

    position_ids: Tensor

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(
            3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)
        self.register_buffer("position_ids", torch.arange(cfg.num_positions).expand((1, -1)), persistent=False)
        # the fast forward's position table per grid, resized once (:meth:`forward_fast`)
        self.resized_pos = ResizedTables(interpolate_clip_pos_embed)

    def forward(self, pixel_values: Tensor, patch_embeds: Tensor | None = None) -> Tensor:
        if patch_embeds is None:
            patch_embeds = self.patch_embedding(pixel_values)
        return self._embed(patch_embeds, interpolate_clip_pos_embed)

    def forward_fast(self, patch_embeds: Tensor) -> Tensor:
        """:meth:`forward` on given patch embeddings with the position table kept per grid (same values)."""
        return self._embed(patch_embeds, self.resized_pos)

    def _embed(self, patch_embeds: Tensor, positions: Any) -> Tensor:
        b, _, h, w = patch_embeds.shape
        tokens = patch_embeds.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(b, 1, -1)
        embeddings = torch.cat([cls, tokens], dim=1)
        return embeddings + positions(self.position_embedding.weight, (h, w))


class ClipAttention(nn.Module):
    """Full bidirectional self-attention with a fused qkv projection (the checkpoint's layout)."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ModelLoadError(f"CLIP width {cfg.hidden_size} is not divisible by {cfg.num_attention_heads} heads")
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size * 3, bias=True)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        qkv = self.qkv_proj(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.permute(0, 2, 1, 3).reshape(b, s, -1))


class ClipMlp(nn.Module):
    """fc1 → quick-GELU → fc2."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size)
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class ClipBlock(nn.Module):
    """Pre-norm residual block."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = ClipMlp(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def clip_block_fast(
    x: Tensor,
    weights: list[Tensor],
    num_heads: int,
    eps1: float,
    eps2: float,
    sdpa_policy: str = "model",
    attention: str = "sdpa",
) -> Tensor:
    """One :class:`ClipBlock` as a function of its weights (the fast path's ``torch.compile`` unit) over ``x``
    [B, S, dim]: :func:`clip_block_views` with the B images as one view.

    ``weights``: layer_norm1 w/b, qkv w/b, out_proj w/b, layer_norm2 w/b, fc1 w/b, fc2 w/b.  Same math.
    ``sdpa_policy``: the SDPA backend policy in force (a compiled block is specialised on it,
    :func:`~llm_perf_opt.models.deepseek_ocr.graphs.check_sdpa_policy`); ``attention``: :func:`clip_block_views`'.
    """
    b, s, dim = x.shape
    out = clip_block_views(x.reshape(b * s, dim), weights, num_heads, eps1, eps2, ((b, s),), sdpa_policy, attention)
    return out.view(b, s, dim)


def _views_attention(qkv: Tensor, views: tuple[tuple[int, int], ...], num_heads: int, attention: str) -> Tensor:
    """The views' attention from the QKV GEMM's rows: SDPA per view ("sdpa"), or one Triton kernel for all of them
    ("triton": :mod:`~llm_perf_opt.models.deepseek_ocr.clip_attention`, imported here so that Triton is imported
    only where that kernel runs)."""
    from llm_perf_opt.models.deepseek_ocr import clip_attention

    if attention == "triton":
        return clip_attention.views_attention(qkv, views, num_heads)
    if attention != "sdpa":
        raise ValueError(f"CLIP attention must be one of {CLIP_ATTENTION}, got {attention!r}")
    return clip_attention.views_attention_ref(qkv, views, num_heads)


def clip_block_views(
    x: Tensor,
    weights: list[Tensor],
    num_heads: int,
    eps1: float,
    eps2: float,
    views: tuple[tuple[int, int], ...],
    sdpa_policy: str = "model",
    attention: str = "sdpa",
) -> Tensor:
    """:class:`ClipBlock` over several views' tokens in one sequence: ``x`` [T, dim] holds, in order, each view's
    ``n`` images of ``s`` tokens (``views`` = ((n, s), ...), T = Σ n·s).  The norms, projections and MLP run once
    over all T rows (one GEMM per weight instead of one per view: at a Gundam page's 606 + 257 tokens the per-view
    GEMMs are too small to fill the GPU); each image attends to its own tokens only: SDPA per view
    (``attention="sdpa"``) or one Triton kernel over all views (``"triton"``, at most two views).  Per token the same
    math as the module's block.
    """
    check_sdpa_policy(sdpa_policy)
    n1w, n1b, qkv_w, qkv_b, o_w, o_b, n2w, n2b, f1w, f1b, f2w, f2b = weights
    dim = x.shape[-1]
    h = F.layer_norm(x, (dim,), n1w, n1b, eps1)
    qkv = F.linear(h, qkv_w, qkv_b)
    x = x + F.linear(_views_attention(qkv, views, num_heads, attention), o_w, o_b)
    h = F.layer_norm(x, (dim,), n2w, n2b, eps2)
    return x + F.linear(quick_gelu(F.linear(h, f1w, f1b)), f2w, f2b)


def clip_block_weights(layer: nn.Module) -> list[Tensor]:
    """A :class:`ClipBlock`'s weights in the order :func:`clip_block_fast` takes them."""
    blk = cast(ClipBlock, layer)
    a, m = blk.self_attn, blk.mlp
    return [
        blk.layer_norm1.weight,
        blk.layer_norm1.bias,
        a.qkv_proj.weight,
        a.qkv_proj.bias,
        a.out_proj.weight,
        a.out_proj.bias,
        blk.layer_norm2.weight,
        blk.layer_norm2.bias,
        m.fc1.weight,
        m.fc1.bias,
        m.fc2.weight,
        m.fc2.bias,
    ]


class ClipTransformer(nn.Module):
    """The layer stack; its own module so the keys read ``transformer.layers.N``.  The fast path runs its layers
    through :meth:`run_layers` with a :func:`clip_block_fast` (``ClipVisionTower.layer_fn``)."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipBlock(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: Tensor) -> Tensor:
        return self.run_layers(x, None)

    def run_layers(self, x: Tensor, layer_fn: Any) -> Tensor:
        """The layers through ``layer_fn`` (a :func:`clip_block_fast` signature), or as modules when it is None."""
        if layer_fn is None:
            for layer in self.layers:
                x = layer(x)
        else:
            for layer in self.layers:
                blk = cast(ClipBlock, layer)
                x = layer_fn(
                    x, clip_block_weights(blk), blk.self_attn.num_heads, blk.layer_norm1.eps, blk.layer_norm2.eps
                )
        return x

    def run_layers_views(self, x: Tensor, views: tuple[tuple[int, int], ...], views_layer_fn: Any) -> Tensor:
        """The layers over several views' tokens in one sequence (``x`` [T, dim]) through ``views_layer_fn`` (a
        :func:`clip_block_views` signature)."""
        for layer in self.layers:
            blk = cast(ClipBlock, layer)
            eps1, eps2 = blk.layer_norm1.eps, blk.layer_norm2.eps
            x = views_layer_fn(x, clip_block_weights(blk), blk.self_attn.num_heads, eps1, eps2, views)
        return x


class ClipVisionTower(nn.Module):
    """Embeddings → pre-LayerNorm → transformer; returns [B, 1 + h·w, hidden] including CLS.

    ``layer_fn`` (fast path, default None = the modules as written): with patch embeddings given, the whole tower
    runs :meth:`forward_fast` (its layers through ``layer_fn``, a :func:`clip_block_fast` signature), or
    ``forward_fn`` instead when set (the fast path's per-shape CUDA-graph replay of :meth:`forward_fast`, which so
    holds the embeddings and the pre-LayerNorm too, not only the layers).

    Several views' patch embeddings at once (a tuple: a page's tiles and its global view) give a tuple of outputs,
    one per view: view by view, or with ``views_layer_fn`` set (a :func:`clip_block_views` signature) as one
    sequence through :meth:`forward_views_fast` (or ``views_fn``, its CUDA-graph replay per shapes).
    """

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.pre_layernorm_epsilon)
        self.transformer = ClipTransformer(cfg)
        self.layer_fn: Any = None
        self.forward_fn: Any = None
        self.views_layer_fn: Any = None
        self.views_fn: Any = None

    @overload
    def forward(self, pixel_values: Tensor | None, patch_embeds: Tensor | None = None) -> Tensor: ...

    @overload
    def forward(self, pixel_values: Tensor | None, patch_embeds: tuple[Tensor, ...]) -> tuple[Tensor, ...]: ...

    def forward(
        self, pixel_values: Tensor | None, patch_embeds: Tensor | tuple[Tensor, ...] | None = None
    ) -> Tensor | tuple[Tensor, ...]:
        """``patch_embeds`` is SAM's [B, hidden, h, w] output (or a tuple of several views', see the class doc);
        ``pixel_values`` only matter without it."""
        if isinstance(patch_embeds, tuple):
            if self.views_layer_fn is None:
                return tuple(self.forward(pixel_values, p) for p in patch_embeds)
            views_out: tuple[Tensor, ...] = (
                self.forward_views_fast(*patch_embeds) if self.views_fn is None else self.views_fn(*patch_embeds)
            )
            return views_out
        if pixel_values is None and patch_embeds is None:
            raise ValueError("the CLIP tower needs pixel values or patch embeddings")
        if self.layer_fn is not None and patch_embeds is not None:
            out: Tensor = self.forward_fast(patch_embeds) if self.forward_fn is None else self.forward_fn(patch_embeds)
            return out
        x = self.embeddings(pixel_values, patch_embeds)
        return self.transformer(self.pre_layrnorm(x))

    def forward_fast(self, patch_embeds: Tensor) -> Tensor:
        """The tower on SAM's features: the embeddings with their kept position table, the pre-LayerNorm, and the
        layers through ``layer_fn`` (set by the fast path)."""
        x = self.pre_layrnorm(self.embeddings.forward_fast(patch_embeds))
        return self.transformer.run_layers(x, self.layer_fn)

    def forward_views_fast(self, *patch_embeds: Tensor) -> tuple[Tensor, ...]:
        """Several views' towers as one sequence: each view's embeddings (kept position tables), then the
        pre-LayerNorm and the layers (``views_layer_fn``) over all views' tokens at once, split back per view
        ([n, 1 + h·w, hidden] each, as :meth:`forward_fast` returns)."""
        embedded = [self.embeddings.forward_fast(p) for p in patch_embeds]
        views = tuple((int(e.shape[0]), int(e.shape[1])) for e in embedded)
        x = self.pre_layrnorm(torch.cat([e.reshape(-1, e.shape[-1]) for e in embedded]))
        x = self.transformer.run_layers_views(x, views, self.views_layer_fn)
        return tuple(
            part.view(n, s, -1) for part, (n, s) in zip(x.split([n * s for n, s in views]), views, strict=True)
        )
