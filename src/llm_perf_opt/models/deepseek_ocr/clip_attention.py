"""CLIP's attention over a page's views in one Triton kernel (the vision fast path, ``infer.fast.clip_attention``).

CLIP's blocks (``clip.clip_block_views``) run a page's views as one token sequence: a Gundam page's 6 crops of 101
tokens, then its global view's 257.  Each image attends to its own tokens only (no mask inside an image, nothing
across images).  Per view, SDPA runs flash on 101- and 257-token sequences x 16 heads of 64: too few query blocks
to fill an H200, so the global view takes flash's split-KV form plus its combine kernel, and each view needs the
heads split out of the QKV GEMM's rows and the outputs gathered back (three attention kernels and the layout
copies per layer; H200, round 18 profile: 0.46 ms of the page's vision).  This kernel does one layer's attention
for every view in one launch:

* a program owns ``BLOCK_M`` queries of one image and one head; programs are numbered over the views' images in
  order (``n`` images of ``s`` tokens per view, at most two views), so the page's 7 images x 16 heads are one grid;
* q, k and v are read in place from the QKV GEMM's output rows ([T, 3 · heads · D]: no split, no permute) and the
  output is written as [T, heads · D], the rows the output projection reads;
* keys are walked ``BLOCK_N`` at a time over the image's ``s`` tokens (the last block masked past ``s``), with flash
  attention's online softmax in float32 (the prompt kernel's step, :func:`prompt_attention._attend_block`: ``exp2``
  with ``log2 e`` folded into the scale, P rounded to the input dtype for the P·V product, one division at the end).

Results equal SDPA's to bf16 rounding (sums in another order), not bit for bit.  Triton is optional, as for
:mod:`kernels`: compiled on CUDA; on CPU tensors only under Triton's interpreter.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from llm_perf_opt.models.deepseek_ocr import kernels
from llm_perf_opt.models.deepseek_ocr.kernels import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from llm_perf_opt.models.deepseek_ocr.prompt_attention import _attend_block

__all__ = [
    "BLOCKS",
    "HAVE_TRITON",
    "INTERPRETED",
    "unavailable_reason",
    "views_attention",
    "views_attention_ref",
]

# Whether the kernel below was decorated for Triton's interpreter (decided once, at import).
INTERPRETED: bool = HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = 1.4426950408889634

# (block_m, block_n, num_warps, num_stages) on a GPU: 64-query blocks give a 101-token crop two blocks and the
# 257-token global view five.  H200 (bench_fusions --parts clip_attention, round 19, from CUDA graphs, a Gundam page's
# views x 16 heads of 64): 0.008 ms here and at 2 stages; (64, 128, 4), (128, 64, 8) 0.011, (32, 32, 2) 0.013,
# (32, 64, 4) 0.014; SDPA per view with its layout copies 0.017
BLOCKS = (64, 64, 4, 3)


def unavailable_reason(device: torch.device | str) -> str:
    """'' when the kernel can run on ``device``, else why not (:func:`kernels.unavailable_reason`'s rules)."""
    return kernels.unavailable_reason(device, INTERPRETED, __name__)


def _check_views(views: tuple[tuple[int, int], ...], rows: int) -> None:
    if not views or any(n < 1 or s < 1 for n, s in views):
        raise ValueError(f"views must be (images, tokens) pairs of positive counts, got {views}")
    if sum(n * s for n, s in views) != rows:
        raise ValueError(f"views {views} hold {sum(n * s for n, s in views)} tokens, but qkv has {rows} rows")


def views_attention_ref(qkv: Tensor, views: tuple[tuple[int, int], ...], num_heads: int) -> Tensor:
    """Per view, SDPA over each image's tokens: ``qkv`` [T, 3 · heads · D] (the QKV GEMM's rows: q, k, v, each
    heads x D) holding, in order, each view's ``n`` images of ``s`` tokens (``views`` = ((n, s), ...),
    T = Σ n · s) -> [T, heads · D]."""
    rows, width = qkv.shape
    _check_views(views, rows)
    dim = width // 3
    head_dim = dim // num_heads
    outs, start = [], 0
    for n, s in views:
        part = qkv[start : start + n * s].view(n, s, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = part.unbind(0)
        outs.append(F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).reshape(n * s, dim))
        start += n * s
    return torch.cat(outs)


if HAVE_TRITON:
    # the view sizes stay runtime values: a count of 1 would otherwise be specialised into a constant, and the two
    # branches picking a program's view would then disagree on the type of the length they set
    @triton.jit(do_not_specialize=["N0", "S0", "N1", "S1"])
    def _views_attention_kernel(
        qkv_ptr,
        o_ptr,
        N0,
        S0,
        N1,
        S1,
        qk_scale,
        HEADS: tl.constexpr,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """One program: ``BLOCK_M`` queries of one image (programs numbered over the first view's ``N0`` images of
        ``S0`` tokens, then the second view's ``N1`` of ``S1``) and one head, over all of that image's keys."""
        pid = tl.program_id(0)
        head = tl.program_id(1)
        blocks0 = tl.cdiv(S0, BLOCK_M)
        if pid < N0 * blocks0:
            q_block = pid % blocks0
            seq = (pid // blocks0) * S0  # the image's first row
            length = S0
        else:
            blocks1 = tl.cdiv(S1, BLOCK_M)
            p = pid - N0 * blocks0
            q_block = p % blocks1
            seq = N0 * S0 + (p // blocks1) * S1
            length = S1
        ROW: tl.constexpr = 3 * HEADS * D  # a token's q, k and v in the QKV GEMM's output
        i = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
        imask = i < length
        d = tl.arange(0, D)
        rows = (seq + i).to(tl.int64)
        q = tl.load(qkv_ptr + rows[:, None] * ROW + head * D + d[None, :], mask=imask[:, None], other=0.0)
        if UPCAST:  # Triton's interpreter computes bf16 tl.dot wrongly; float32 operands are exact
            q = q.to(tl.float32)
        k_base = qkv_ptr + seq.to(tl.int64) * ROW + (HEADS + head) * D
        v_base = qkv_ptr + seq.to(tl.int64) * ROW + (2 * HEADS + head) * D
        # _attend_block's masked step keeps keys <= a query's position: every query here sees keys 0 .. length - 1
        last_key = tl.full([BLOCK_M], 0, tl.int32) + (length - 1)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        whole = length // BLOCK_N * BLOCK_N
        for n0 in range(0, whole, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                q, acc, m_i, l_i, k_base, v_base, ROW, ROW, n0, last_key, d, qk_scale, False, BLOCK_N, PRECISION,
                UPCAST,
            )  # fmt: skip
        for n0 in range(whole, length, BLOCK_N):  # the image's last, partial key block (0 or 1 of them)
            acc, m_i, l_i = _attend_block(
                q, acc, m_i, l_i, k_base, v_base, ROW, ROW, n0, last_key, d, qk_scale, True, BLOCK_N, PRECISION,
                UPCAST,
            )  # fmt: skip
        out = acc / l_i[:, None]
        o_rows = o_ptr + rows[:, None] * (HEADS * D) + head * D + d[None, :]
        tl.store(o_rows, out.to(o_ptr.dtype.element_ty), mask=imask[:, None])


def attention_kernel(
    qkv: Tensor, views: list[int], num_heads: int, block_m: int, block_n: int, warps: int, stages: int
) -> Tensor:
    """Launch :func:`_views_attention_kernel` (checked arguments; ``views`` flat: n0, s0[, n1, s1])."""
    rows, width = qkv.shape
    dim = width // 3
    head_dim = dim // num_heads
    n0, s0 = views[0], views[1]
    n1, s1 = (views[2], views[3]) if len(views) == 4 else (0, 1)
    blocks = n0 * triton.cdiv(s0, block_m) + n1 * triton.cdiv(s1, block_m)
    out = torch.empty((rows, dim), dtype=qkv.dtype, device=qkv.device)
    interpreter = qkv.device.type != "cuda"
    _views_attention_kernel[(blocks, num_heads)](
        qkv,
        out,
        n0,
        s0,
        n1,
        s1,
        head_dim**-0.5 * _LOG2E,
        HEADS=num_heads,
        D=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PRECISION="ieee" if interpreter or qkv.dtype == torch.float32 else "tf32",
        UPCAST=interpreter,
        num_warps=warps,
        num_stages=stages,
    )
    return out


if HAVE_TRITON and not INTERPRETED:

    @torch.library.custom_op("llm_perf_opt::clip_views_attention", mutates_args=())
    def _attention_op(
        qkv: Tensor, views: list[int], num_heads: int, block_m: int, block_n: int, warps: int, stages: int
    ) -> Tensor:
        return attention_kernel(qkv, views, num_heads, block_m, block_n, warps, stages)

    @_attention_op.register_fake
    def _(qkv: Tensor, views: list[int], num_heads: int, block_m: int, block_n: int, warps: int, stages: int) -> Tensor:
        return qkv.new_empty((qkv.shape[0], qkv.shape[1] // 3))


def views_attention(
    qkv: Tensor,
    views: tuple[tuple[int, int], ...],
    num_heads: int,
    blocks: tuple[int, int, int, int] | None = None,
) -> Tensor:
    """:func:`views_attention_ref` in one kernel launch: ``qkv`` [T, 3 · heads · D] contiguous (the QKV GEMM's
    output), at most two views; returns a contiguous [T, heads · D].  ``blocks``: (block_m, block_n, warps,
    stages).  Under ``torch.compile`` it is one custom op (``llm_perf_opt::clip_views_attention``)."""
    dev = qkv.device
    kernels._require("views_attention", dev, INTERPRETED, __name__)
    if qkv.dim() != 2 or qkv.shape[1] % 3 or not qkv.is_contiguous():
        raise ValueError(f"qkv must be a contiguous [T, 3 * heads * D] tensor, got {tuple(qkv.shape)}")
    rows, width = qkv.shape
    _check_views(views, rows)
    if len(views) > 2:
        raise ValueError(f"the kernel takes at most two views (a page's crops and its global view), got {views}")
    dim = width // 3
    head_dim = dim // max(num_heads, 1)
    if num_heads < 1 or dim % num_heads or head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"{dim} channels in {num_heads} heads: the head size must be a power of two >= 16")
    interpreter = dev.type != "cuda"
    block_m, block_n, warps, stages = blocks or ((16, 16, 4, 1) if interpreter else BLOCKS)
    if min(block_m, block_n) < 16:
        raise ValueError(f"tl.dot needs blocks of at least 16, got {block_m}, {block_n}")
    flat = [c for view in views for c in view]
    args = (qkv, flat, num_heads, block_m, block_n, warps, stages)
    return _attention_op(*args) if dev.type == "cuda" else attention_kernel(*args)
