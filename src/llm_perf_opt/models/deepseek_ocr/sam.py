"""SAM ViT-B image encoder, the high-resolution half of DeepSeek-OCR's vision stack.

DeepSeek-OCR feeds every view (1024² global view, 640² tiles) through this encoder: 16×16 patches,
blocks that alternate windowed and global attention with decomposed relative positions, a neck down
to ``out_chans``, then two stride-2 convolutions that cut the token count by 16.  Its output is both
half of the projector's input and the CLIP tower's patch embeddings.

The position tables are trained for ``img_size``; other view sizes resize them on the fly exactly as
the reference does (bicubic with antialias for the absolute grid, linear for the relative tables),
so a 640² tile sees the same numbers as under the vendor's code.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_perf_opt.errors import ModelLoadError
from llm_perf_opt.models.deepseek_ocr.config import SamConfig
from llm_perf_opt.models.deepseek_ocr.graphs import ResizedTables, check_sdpa_policy

__all__ = [
    "LayerNorm2d",
    "SamAttention",
    "SamBlock",
    "SamEncoder",
    "SamMlp",
    "SamPatchEmbed",
    "decomposed_rel_pos_bias",
    "get_rel_pos",
    "interpolate_sam_pos_embed",
    "linear_gelu_tanh",
    "rel_pos_attention",
    "rel_pos_flex_attention",
    "rel_pos_terms",
    "rel_pos_triton_attention",
    "resample_rel_pos",
    "sam_block_fast",
    "window_partition",
    "window_unpartition",
]


def window_partition(x: Tensor, window_size: int) -> tuple[Tensor, tuple[int, int]]:
    """Cut a [B, H, W, C] grid into [B·nW, ws, ws, C] windows, zero-padding the bottom/right edge.

    Padding happens after ``norm1`` and the padded tokens are not masked: they take part in the
    window's attention as zero vectors, which is what the checkpoint was trained with.  Returns the
    padded size so :func:`window_unpartition` can crop it away again.
    """
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(windows: Tensor, window_size: int, padded_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: stitch windows back into [B, H, W, C] and drop the padding."""
    hp, wp = padded_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


def resample_rel_pos(rel_pos: Tensor, length: int) -> Tensor:
    """One axis' relative-position table [L, C] at ``length`` rows: as stored when it has them, else resampled
    linearly in float32 (and cast back) as the reference does (a 640² tile's 40-wide grid needs 2·40−1 rows of the
    2·64−1 stored for SAM-B's 1024² grid)."""
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(
        rel_pos.to(torch.float32).reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
        size=length,
        mode="linear",
    ).to(rel_pos.dtype)
    return resized.reshape(-1, length).permute(1, 0)


def get_rel_pos(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """Gather the [q_size, k_size, C] relative-position table for one axis.

    Global blocks store a table for the ``img_size`` grid (2·64−1 rows for SAM-B); a smaller view
    (a 640² tile gives a 40×40 grid) needs 2·40−1 rows, obtained by linear resampling in float32 as
    the reference does.  Unequal query/key sizes are scaled to the longer axis (never the case in
    self-attention, kept for exactness).
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    table = resample_rel_pos(rel_pos, max_rel_dist)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[relative_coords.long()]


def rel_pos_terms(
    q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, q_size: tuple[int, int], k_size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """The two per-query tables of MViTv2's decomposed relative positions: ``q·R_h`` [B, heads, q_h, q_w, k_h]
    and ``q·R_w`` [B, heads, q_h, q_w, k_w] (from the *unscaled* query ``q`` [B, heads, q_h·q_w, head_dim]);
    key (kh, kw) gets ``rel_h[..., kh] + rel_w[..., kw]`` added to its logit."""
    q_h, q_w = q_size
    k_h, k_w = k_size
    b, n_heads, _, dim = q.shape
    r_q = q.reshape(b, n_heads, q_h, q_w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(q_h, k_h, rel_pos_h))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(q_w, k_w, rel_pos_w))
    return rel_h, rel_w


def decomposed_rel_pos_bias(
    q: Tensor,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> Tensor:
    """Additive attention bias [B, heads, q_h·q_w, k_h·k_w] of MViTv2's decomposed relative positions.

    SAM adds ``q·R_h`` and ``q·R_w`` (computed from the *unscaled* query) to the already scaled
    logits, so handing this bias to ``scaled_dot_product_attention`` as ``attn_mask`` reproduces the
    reference logits exactly.  ``q`` is [B, heads, q_h·q_w, head_dim].
    """
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, q_size, k_size)
    bias = rel_h[..., :, None] + rel_w[..., None, :]
    return bias.reshape(q.shape[0], q.shape[1], q_size[0] * q_size[1], k_size[0] * k_size[1])


_ONE_HOT: dict[tuple[int, int, torch.device, torch.dtype], Tensor] = {}


def _key_one_hot(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[h·w, h + w]: row n has a 1 at its key row ``n // w`` and at ``h + n % w`` (cached per shape when eager).

    Inside ``torch.compile`` it is built in the graph: a lookup of the module's cache there is guarded on, and
    the first call's miss fills the cache, so the second call failed the guard and compiled the block again
    (found by compiles.WATCH in round 32: every SAM block kind compiled twice with ``vision_graphs`` off, the second
    time inside a timed page)."""
    if torch.compiler.is_compiling():
        return _one_hot_table(h, w, device, dtype)
    key = (h, w, device, dtype)
    table = _ONE_HOT.get(key)
    if table is None:
        table = _ONE_HOT[key] = _one_hot_table(h, w, device, dtype)
    return table


def _one_hot_table(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    n = torch.arange(h * w, device=device)
    return torch.cat((F.one_hot(n // w, h), F.one_hot(n % w, w)), dim=-1).to(dtype)


def rel_pos_attention(
    q: Tensor, k: Tensor, v: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, hw: tuple[int, int]
) -> Tensor:
    """Attention with SAM's decomposed relative positions, without the dense [N, N] bias (fast path).

    The reference logits are ``scale·q·k + q·R_h[qh, kh] + q·R_w[qw, kw]``.  The two rel-pos terms are a
    dot product of the small per-query tables ``rel_h`` [.., N, h] and ``rel_w`` [.., N, w] with a one-hot
    code of the key's row and column, so appending them to ``scale·q`` and the one-hot code to ``k``
    gives the same logits from one plain (unmasked, ``scale=1``) attention: flash / cuDNN kernels apply,
    and nothing of size N×N is ever written.  ``v`` is zero-padded to the augmented head size (the kernels
    want equal head sizes) and the padding dropped from the output.  ``scale = head_dim**-0.5`` is a power
    of two for SAM (1/8), so ``scale·q`` is exact in bf16; the bias terms are summed in the kernel's
    float32 accumulator instead of being rounded to bf16 first, so this is at least as accurate.
    """
    h, w = hw
    b, n_heads, n, dim = q.shape
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, hw, hw)
    rel_h, rel_w = rel_h.reshape(b, n_heads, n, h), rel_w.reshape(b, n_heads, n, w)
    aug = dim + h + w
    pad = (-aug) % 8  # flash / cuDNN want head sizes that are multiples of 8
    q_parts = [q * dim**-0.5, rel_h, rel_w]
    k_parts = [k, _key_one_hot(h, w, q.device, q.dtype).expand(b, n_heads, n, h + w)]
    if pad:
        q_parts.append(q.new_zeros(b, n_heads, n, pad))
        k_parts.append(k.new_zeros(b, n_heads, n, pad))
    q_aug = torch.cat(q_parts, dim=-1)
    k_aug = torch.cat(k_parts, dim=-1)
    v_aug = F.pad(v, (0, aug + pad - dim))
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)
    return out[..., :dim]


def rel_pos_flex_attention(
    q: Tensor, k: Tensor, v: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, hw: tuple[int, int]
) -> Tensor:
    """Attention with SAM's decomposed relative positions at the real head size, through FlexAttention.

    The same logits as :func:`decomposed_rel_pos_bias` + SDPA: ``scale·q·k`` plus, inside the kernel (a
    ``score_mod``), the per-query tables ``rel_h`` [.., N, h] and ``rel_w`` [.., N, w] read at the key's row
    ``kv // w`` and column ``kv % w``.  Unlike :func:`rel_pos_attention` the q·k product and the value product
    stay at head size 64 (the augmented operands are 192 wide, v zero-padded to match), so the global blocks do
    about a third of the work; nothing of size N×N is written.  Fast only under ``torch.compile`` (the fast
    path compiles the block); called eagerly, FlexAttention runs its unfused reference (same numbers).
    """
    from torch.nn.attention.flex_attention import flex_attention

    h, w = hw
    b, n_heads, n, dim = q.shape
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, hw, hw)
    rel_h, rel_w = rel_h.reshape(b, n_heads, n, h), rel_w.reshape(b, n_heads, n, w)

    def rel_pos_bias(score: Tensor, bi: Tensor, hi: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        return score + rel_h[bi, hi, qi, ki // w] + rel_w[bi, hi, qi, ki % w]

    out = flex_attention(q, k, v, score_mod=rel_pos_bias, scale=dim**-0.5)
    assert isinstance(out, Tensor)  # no return_lse: one tensor
    return out


def rel_pos_triton_attention(
    q: Tensor, k: Tensor, v: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, hw: tuple[int, int]
) -> Tensor:
    """Attention with SAM's decomposed relative positions at head size 64 in one Triton kernel, the tables added
    per key row (:mod:`~llm_perf_opt.models.deepseek_ocr.sam_kernels`, imported here so that Triton is imported
    only when this kernel is chosen); same logits as :func:`decomposed_rel_pos_bias` + SDPA."""
    from llm_perf_opt.models.deepseek_ocr import sam_kernels

    return sam_kernels.rel_pos_triton_attention(q, k, v, rel_pos_h, rel_pos_w, hw)


@torch.library.custom_op("llm_perf_opt::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``gelu_tanh(x @ weight.T + bias)`` for 2-D ``x`` in one GEMM: on CUDA cuBLASLt applies bias and GELU in its
    epilogue (``torch._addmm_activation``), instead of a GEMM and a GELU pass over the [tokens, 4·dim] output.

    cuBLASLt's GELU is the tanh approximation, not the exact (erf) GELU SAM was trained with; the two differ by
    at most ~3e-4, a fraction of a bf16 step at the activations' size (H200, the Gundam tile batch against the
    float32 exact GELU: max |Δ| 0.0156 with the epilogue, 0.0161 for the exact GELU rounded to bf16).  A custom
    op so that ``torch.compile`` of a block keeps it one call (inductor would split it back into GEMM + GELU).
    Elsewhere the same tanh GELU after the GEMM (PyTorch's CPU ``_addmm_activation`` would apply the exact one).
    """
    if x.device.type == "cuda":
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    return F.gelu(torch.addmm(bias, x, weight.t()), approximate="tanh")


@linear_gelu_tanh.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


def _mlp_up(x: Tensor, weight: Tensor, bias: Tensor | None, epilogue: bool) -> Tensor:
    """SAM's MLP up projection and GELU: exact GELU after the GEMM, or (``epilogue``) :func:`linear_gelu_tanh`."""
    if not epilogue or bias is None:
        return F.gelu(F.linear(x, weight, bias))
    out = linear_gelu_tanh(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


# How a fast SAM block applies the relative positions (``FastConfig.sam_attention`` for the global blocks,
# ``sam_window_attention`` for the windowed ones): "augmented"
# (:func:`rel_pos_attention`, flash over 192-wide operands), "flex" (:func:`rel_pos_flex_attention`, head size
# 64, FlexAttention) or "triton" (:func:`rel_pos_triton_attention`, head size 64, the tables added per key row).
_REL_POS_ATTENTION = {
    "augmented": rel_pos_attention,
    "flex": rel_pos_flex_attention,
    "triton": rel_pos_triton_attention,
}
SAM_ATTENTION = tuple(_REL_POS_ATTENTION)


def sam_block_fast(
    x: Tensor,
    weights: list[Tensor | None],
    window_size: int,
    num_heads: int,
    eps: float,
    global_attention: str = "augmented",
    sdpa_policy: str = "model",
    window_attention: str = "augmented",
    gelu_epilogue: bool = False,
) -> Tensor:
    """One :class:`SamBlock` as a function of its weights (fast path; the unit ``torch.compile`` compiles).

    ``weights`` is :meth:`SamBlock.fast_weights`: norm1 w/b, qkv w/b, proj w/b, rel_pos_h/w (None without
    relative positions), norm2 w/b, lin1 w/b, lin2 w/b.  Same math as the module with ``fast`` attention;
    ``global_attention`` (:data:`SAM_ATTENTION`) picks the kernel of the global blocks (``window_size`` 0),
    ``window_attention`` that of the windowed blocks (14×14 windows: 196 keys); ``gelu_epilogue`` runs the MLP's
    up projection and GELU as one GEMM (:func:`linear_gelu_tanh`: the tanh GELU).  ``sdpa_policy``: the
    SDPA backend policy in force (:func:`~llm_perf_opt.models.deepseek_ocr.graphs.check_sdpa_policy`: a compiled
    block is specialised on it).
    """
    check_sdpa_policy(sdpa_policy)
    n1w, n1b, qkv_w, qkv_b, proj_w, proj_b, rel_h, rel_w, n2w, n2b, l1w, l1b, l2w, l2b = weights
    dim = x.shape[-1]
    shortcut = x
    x = F.layer_norm(x, (dim,), n1w, n1b, eps)
    hw = (x.shape[1], x.shape[2])
    padded_hw = hw
    if window_size > 0:
        x, padded_hw = window_partition(x, window_size)
    b, h, w, _ = x.shape
    assert qkv_w is not None and proj_w is not None
    qkv = F.linear(x, qkv_w, qkv_b).reshape(b, h * w, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if rel_h is not None and rel_w is not None:
        kind = global_attention if window_size == 0 else window_attention
        out = _REL_POS_ATTENTION[kind](q, k, v, rel_h, rel_w, (h, w))
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    x = F.linear(out.permute(0, 2, 1, 3).reshape(b, h, w, -1), proj_w, proj_b)
    if window_size > 0:
        x = window_unpartition(x, window_size, padded_hw, hw)
    x = shortcut + x
    assert l1w is not None and l2w is not None
    return x + F.linear(_mlp_up(F.layer_norm(x, (dim,), n2w, n2b, eps), l1w, l1b, gelu_epilogue), l2w, l2b)


def interpolate_sam_pos_embed(pos_embed: Tensor, hw: tuple[int, int]) -> Tensor:
    """Resize the [1, S, S, C] absolute position grid to the token grid of the current view.

    The checkpoint's grid is for 1024² inputs; tiles are smaller.  The reference resizes with
    bicubic + antialias (PIL-style kernel, also when upsampling) in float32, then casts back; any
    other kernel gives different numbers, so keep these flags.
    """
    if pos_embed.shape[1] == hw[0] and pos_embed.shape[2] == hw[1]:
        return pos_embed
    grid = pos_embed.permute(0, 3, 1, 2).to(torch.float32)
    resized = F.interpolate(grid, size=hw, mode="bicubic", antialias=True, align_corners=False)
    return resized.to(pos_embed.dtype).permute(0, 2, 3, 1)


class LayerNorm2d(nn.Module):
    """Channel LayerNorm for [B, C, H, W] maps, written out as the reference does.

    The explicit mean/variance (in the input dtype) keeps bf16 rounding identical to the vendor's
    model instead of the float32-internal ``F.layer_norm``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class SamPatchEmbed(nn.Module):
    """Non-overlapping patch conv; a module of its own only to produce the ``patch_embed.proj`` keys."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class SamMlp(nn.Module):
    """Block MLP with exact (erf) GELU, as SAM was trained."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden_dim)
        self.lin2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


class SamAttention(nn.Module):
    """Multi-head self-attention over a 2-D token grid, with optional decomposed relative positions.

    ``input_size`` is the grid the relative tables were trained for (the window for windowed blocks,
    ``img_size // patch_size`` for global ones); it only sizes the parameters.
    """

    def __init__(self, dim: int, num_heads: int, use_rel_pos: bool, input_size: tuple[int, int]) -> None:
        super().__init__()
        if dim % num_heads:
            raise ModelLoadError(f"SAM width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
        # Fast path switch (set by SamEncoder.fast): rel-pos folded into the attention operands, see
        # :func:`rel_pos_attention`.  Off by default: the code below is the reference-exact path.
        self.fast = False

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fast and self.use_rel_pos:
            out = rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (h, w))
            return self.proj(out.permute(0, 2, 1, 3).reshape(b, h, w, -1))
        bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w)) if self.use_rel_pos else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.permute(0, 2, 1, 3).reshape(b, h, w, -1)
        return self.proj(out)


class SamBlock(nn.Module):
    """Pre-norm transformer block; ``window_size`` 0 means global attention over the whole grid."""

    def __init__(self, cfg: SamConfig, window_size: int) -> None:
        super().__init__()
        dim = cfg.embed_dim
        grid = cfg.img_size // cfg.patch_size
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layernorm_eps)
        self.attn = SamAttention(
            dim,
            cfg.num_heads,
            cfg.use_rel_pos,
            (window_size, window_size) if window_size > 0 else (grid, grid),
        )
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layernorm_eps)
        self.mlp = SamMlp(dim, int(dim * cfg.mlp_ratio))

    def fast_weights(self) -> list[Tensor | None]:
        """The tensors :func:`sam_block_fast` takes, in its order."""
        a = self.attn
        rel = [a.rel_pos_h, a.rel_pos_w] if a.use_rel_pos else [None, None]
        return [
            self.norm1.weight,
            self.norm1.bias,
            a.qkv.weight,
            a.qkv.bias,
            a.proj.weight,
            a.proj.bias,
            *rel,
            self.norm2.weight,
            self.norm2.bias,
            self.mlp.lin1.weight,
            self.mlp.lin1.bias,
            self.mlp.lin2.weight,
            self.mlp.lin2.bias,
        ]

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            windows, padded_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(windows), self.window_size, padded_hw, hw)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class SamEncoder(nn.Module):
    """SAM ViT image encoder plus DeepSeek-OCR's two stride-2 convs (``net_2``, ``net_3``).

    Maps [B, 3, H, W] to [B, downsample_channels[-1], H/64, W/64]; H and W must be multiples of 64.
    """

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        if len(cfg.downsample_channels) != 2:
            raise ModelLoadError(
                f"SAM downsample_channels must name two convs (net_2, net_3), got {cfg.downsample_channels}"
            )
        self.cfg = cfg
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = SamPatchEmbed(cfg.patch_size, 3, cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, cfg.embed_dim))
        self.blocks = nn.ModuleList(
            SamBlock(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size) for i in range(cfg.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans, eps=cfg.layernorm_eps),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans, eps=cfg.layernorm_eps),
        )
        mid, out = cfg.downsample_channels
        self.net_2 = nn.Conv2d(cfg.out_chans, mid, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(mid, out, kernel_size=3, stride=2, padding=1, bias=False)
        self._fast = False
        # With ``fast``: run the blocks through this callable (``torch.compile(sam_block_fast)``, set by the fast
        # path's ``sam_compile``); None runs :func:`sam_block_fast` uncompiled.
        self.block_fn: Any = None
        # With ``fast``: a callable run instead of :meth:`_forward_fast` (the fast path's per-shape CUDA-graph
        # replay of it); None calls :meth:`_forward_fast` directly.
        self.forward_fn: Any = None
        # With ``fast``: the global and the windowed blocks' attention kernels (:data:`SAM_ATTENTION`,
        # ``FastConfig.sam_attention`` / ``sam_window_attention``)
        self.global_attention = "augmented"
        self.window_attention = "augmented"
        # With ``fast``: the MLPs' up projection + GELU as one GEMM with cuBLASLt's (tanh) GELU epilogue
        # (``FastConfig.sam_gelu_epilogue``)
        self.gelu_epilogue = False
        # With ``fast``: the position table resized per grid once (the reference path resizes on every call)
        self.resized_pos = ResizedTables(interpolate_sam_pos_embed)

    @property
    def fast(self) -> bool:
        """Fast-path switch (``FastConfig.sam_fast``), default off: the reference-exact forward.

        On: attention folds the relative positions into its operands (:func:`rel_pos_attention`, no N×N
        bias, flash-eligible) and the neck runs channels-last with ``F.layer_norm`` (float32 statistics
        instead of the reference's bf16 ones), so bf16 results differ from the default by rounding only.
        """
        return self._fast

    @fast.setter
    def fast(self, on: bool) -> None:
        self._fast = bool(on)
        for block in self.blocks:
            cast(SamBlock, block).attn.fast = self._fast

    def _neck_fast(self, x: Tensor) -> Tensor:
        """The neck on [B, H, W, C] tokens: 1×1 conv as a linear, LayerNorm over channels, channels-last convs."""
        conv1, conv3 = cast(nn.Conv2d, self.neck[0]), cast(nn.Conv2d, self.neck[2])
        ln1, ln2 = cast(LayerNorm2d, self.neck[1]), cast(LayerNorm2d, self.neck[3])
        c = int(conv1.weight.shape[0])
        x = F.linear(x, conv1.weight.view(c, -1))
        x = F.layer_norm(x, (c,), ln1.weight, ln1.bias, ln1.eps)
        x = conv3(x.permute(0, 3, 1, 2))  # a channels-last view: cuDNN keeps NHWC
        x = F.layer_norm(x.permute(0, 2, 3, 1), (c,), ln2.weight, ln2.bias, ln2.eps).permute(0, 3, 1, 2)
        return self.net_3(self.net_2(x)).contiguous()

    def _patch_embed_fast(self, x: Tensor) -> Tensor:
        """The stride-p patch conv as one GEMM over [B, H/p, W/p, 3·p·p] patches (cuDNN's implicit conv is slow)."""
        proj = self.patch_embed.proj
        p = self.cfg.patch_size
        b, c, hh, ww = x.shape
        patches = x.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, hh // p, ww // p, -1)
        return F.linear(patches, proj.weight.reshape(proj.weight.shape[0], -1), proj.bias)

    def _forward_fast(self, x: Tensor) -> Tensor:
        x = self._patch_embed_fast(x)
        x = x + self.resized_pos(self.pos_embed, (x.shape[1], x.shape[2]))
        fn = sam_block_fast if self.block_fn is None else self.block_fn
        for block in self.blocks:
            blk = cast(SamBlock, block)
            x = fn(
                x,
                blk.fast_weights(),
                blk.window_size,
                blk.attn.num_heads,
                blk.norm1.eps,
                self.global_attention,
                window_attention=self.window_attention,
                gelu_epilogue=self.gelu_epilogue,
            )
        return self._neck_fast(x)

    def forward(self, x: Tensor) -> Tensor:
        if self._fast:
            return self._forward_fast(x) if self.forward_fn is None else self.forward_fn(x)
        x = self.patch_embed(x)
        x = x + interpolate_sam_pos_embed(self.pos_embed, (x.shape[1], x.shape[2]))
        for block in self.blocks:
            x = block(x)
        x = self.neck(x.permute(0, 3, 1, 2))
        return self.net_3(self.net_2(x))
