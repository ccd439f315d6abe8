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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_perf_opt.errors import ModelLoadError
from llm_perf_opt.models.deepseek_ocr.config import SamConfig

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


def get_rel_pos(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """Gather the [q_size, k_size, C] relative-position table for one axis.

    Global blocks store a table for the ``img_size`` grid (2·64−1 rows for SAM-B); a smaller view
    (a 640² tile gives a 40×40 grid) needs 2·40−1 rows, obtained by linear resampling in float32 as
    the reference does.  Unequal query/key sizes are scaled to the longer axis (never the case in
    self-attention, kept for exactness).
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(
            rel_pos.to(torch.float32).reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
            size=max_rel_dist,
            mode="linear",
        ).to(rel_pos.dtype)
        table = resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        table = rel_pos
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[relative_coords.long()]


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
    q_h, q_w = q_size
    k_h, k_w = k_size
    r_h = get_rel_pos(q_h, k_h, rel_pos_h)
    r_w = get_rel_pos(q_w, k_w, rel_pos_w)
    b, n_heads, _, dim = q.shape
    r_q = q.reshape(b, n_heads, q_h, q_w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, r_h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, r_w)
    bias = rel_h[..., :, None] + rel_w[..., None, :]
    return bias.reshape(b, n_heads, q_h * q_w, k_h * k_w)


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

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
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

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = x + interpolate_sam_pos_embed(self.pos_embed, (x.shape[1], x.shape[2]))
        for block in self.blocks:
            x = block(x)
        x = self.neck(x.permute(0, 3, 1, 2))
        return self.net_3(self.net_2(x))
