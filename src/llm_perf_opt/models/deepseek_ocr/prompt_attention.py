"""A prompt's causal attention over the KV cache in one Triton kernel (the LM prefill, fast path).

The prefill's attention is ``F.scaled_dot_product_attention`` over the cache's strided views; at one page's 913
positions x 10 heads of 128 its flash backend picks the split-KV form (too few query blocks to fill an H200) and
a combine kernel: 29 us per layer from a CUDA graph (benchmarks/bench_fusions.py, round 13), 20 us here.  This kernel
(``infer.fast.prefill_attention=triton``):

* a program owns ``BLOCK_M`` queries of one (batch, head), the heaviest (last) query blocks first, so the causal
  triangle's long rows start early; GQA reads kv head ``head // (heads / kv_heads)`` in place (no repeat);
* keys are walked ``BLOCK_N`` at a time up to the block's last visible position, first the blocks every query of
  the program sees (no mask), then the diagonal ones with the causal mask ``key <= start + query``, so a prompt
  continuing the cache (``start > 0``) is one call too;
* flash attention's online softmax in float32 (``exp2`` with ``log2 e`` folded into the scale), P rounded to the
  input dtype for the P·V product, the output divided once at the end and written as [B, L, heads, D], the
  layout the output projection reads (SDPA's [B, heads, L, D] needs a transposing copy).

Results equal SDPA's to bf16 rounding (sums in another order), not bit for bit.  Triton is optional, as for
:mod:`kernels`: compiled on CUDA; on CPU tensors only under Triton's interpreter.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from llm_perf_opt.models.deepseek_ocr import kernels
from llm_perf_opt.models.deepseek_ocr.kernels import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = ["BLOCKS", "HAVE_TRITON", "INTERPRETED", "prompt_attention", "prompt_attention_ref", "unavailable_reason"]

# Whether the kernel below was decorated for Triton's interpreter (decided once, at import).
INTERPRETED: bool = HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = 1.4426950408889634

# (block_m, block_n, num_warps, num_stages) on a GPU.  H200 (benchmarks/bench_fusions.py --parts attention, round 13,
# call 3, timed from CUDA graphs, 913 positions x 10 heads of 128): 0.020 ms here and at (128, 64, 8, 3), 0.022-0.026
# at the other swept settings; SDPA's flash 0.029 (split-KV + combine), cuDNN 0.019 (which plans per shape: left out
# of the model's SDPA policy)
BLOCKS = (64, 64, 4, 3)


def unavailable_reason(device: torch.device | str) -> str:
    """'' when the kernel can run on ``device``, else why not (:func:`kernels.unavailable_reason`'s rules)."""
    return kernels.unavailable_reason(device, INTERPRETED, __name__)


if HAVE_TRITON:

    @triton.jit
    def _attend_block(
        q,
        acc,
        m_i,
        l_i,
        k_base,
        v_base,
        s_kn,
        s_vn,
        n0,
        q_pos,
        d,
        qk_scale,
        MASKED: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """One step of the online softmax over keys ``n0 .. n0 + BLOCK_N - 1`` (causal mask when ``MASKED``)."""
        keys = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            kmask = keys <= tl.max(q_pos, axis=0)
            kt = tl.load(k_base + keys[:, None] * s_kn + d[None, :], mask=kmask[:, None], other=0.0)
            vt = tl.load(v_base + keys[:, None] * s_vn + d[None, :], mask=kmask[:, None], other=0.0)
        else:
            kt = tl.load(k_base + keys[:, None] * s_kn + d[None, :])
            vt = tl.load(v_base + keys[:, None] * s_vn + d[None, :])
        if UPCAST:
            kt, vt = kt.to(tl.float32), vt.to(tl.float32)
        s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * qk_scale
        if MASKED:
            s = tl.where(keys[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        return acc, m_new, l_i

    @triton.jit(do_not_specialize=["start"])
    def _prompt_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        o_ptr,
        s_qb,
        s_ql,
        s_qh,
        s_kb,
        s_kh,
        s_kn,
        s_vb,
        s_vh,
        s_vn,
        L,
        start,
        HEADS,
        GROUP,
        qk_scale,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        USE_GDC: tl.constexpr = False,
    ):
        if USE_GDC:
            kernels._dependent_launch()
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest causal rows first
        bh = tl.program_id(1)
        b = bh // HEADS
        head = bh % HEADS
        kv_head = head // GROUP
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < L
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * s_qb + rows[:, None] * s_ql + head * s_qh + d[None, :], mask=rmask[:, None], other=0.0)
        if UPCAST:  # Triton's interpreter computes bf16 tl.dot wrongly; float32 operands are exact
            q = q.to(tl.float32)
        # padding rows take the last real query's position: they see what it sees (never stored)
        q_pos = start + tl.minimum(rows, L - 1)
        k_base = k_ptr + b * s_kb + kv_head * s_kh
        v_base = v_ptr + b * s_vb + kv_head * s_vh
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        # keys every query of the block sees: 0 .. start + first row; whole blocks of them unmasked
        unmasked = (start + pid_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N
        for n0 in range(0, unmasked, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                q, acc, m_i, l_i, k_base, v_base, s_kn, s_vn, n0, q_pos, d, qk_scale, False, BLOCK_N, PRECISION, UPCAST
            )
        last = start + tl.minimum(pid_m * BLOCK_M + BLOCK_M, L)  # one past the block's last visible key
        for n0 in range(unmasked, last, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                q, acc, m_i, l_i, k_base, v_base, s_kn, s_vn, n0, q_pos, d, qk_scale, True, BLOCK_N, PRECISION, UPCAST
            )
        out = acc / l_i[:, None]
        dt = o_ptr.dtype.element_ty
        o_rows = o_ptr + (b * L + rows)[:, None] * (HEADS * D) + head * D + d[None, :]
        tl.store(o_rows, out.to(dt), mask=rmask[:, None])


def prompt_attention_ref(q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
    """Causal attention of the prompt's queries ``q`` [B, L, heads, D] (positions ``start .. start + L - 1``) over
    ``k``/``v`` [B, kv_heads, S >= start + L, D] (the cache, keys at their positions) -> [B, L, heads, D]: SDPA with
    an explicit position mask, GQA by repeating kv heads (the model's ``ForwardContext.attend``)."""
    length, heads = q.shape[1], q.shape[2]
    end = start + length
    k, v = k[:, :, :end], v[:, :, :end]
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    q_pos = torch.arange(start, end, device=q.device)[:, None]
    mask = torch.arange(end, device=q.device)[None, :] <= q_pos
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask)
    return out.transpose(1, 2)


def prompt_attention(
    q: Tensor, k: Tensor, v: Tensor, start: int, blocks: tuple[int, int, int, int] | None = None
) -> Tensor:
    """:func:`prompt_attention_ref` in one kernel; ``q`` [B, L, heads, D] may be a strided view (the rotary kernel's
    output), ``k``/``v`` [B, kv_heads, S, D] with unit stride along D (the cache's layers); returns a contiguous
    [B, L, heads, D] (reshape to [B, L, heads·D] is free).  ``blocks``: (block_m, block_n, warps, stages)."""
    dev = q.device
    kernels._require("prompt_attention", dev, INTERPRETED, __name__)
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"q [B, L, heads, D] and k, v [B, kv_heads, S, D] expected, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    bsz, length, heads, dim = q.shape
    kv_heads = k.shape[1]
    if k.shape[0] != bsz or k.shape[3] != dim or heads % kv_heads or dim & (dim - 1) or dim < 16:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)}: same batch and head size (a power of two "
            ">= 16), heads a multiple of kv_heads"
        )
    if start < 0 or start + length > k.shape[2]:
        raise ValueError(f"positions {start}..{start + length - 1} do not fit the {k.shape[2]} cached positions")
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError("q, k and v need unit stride along the head size")
    interpreter = dev.type != "cuda"
    block_m, block_n, warps, stages = blocks or ((16, 16, 4, 1) if interpreter else BLOCKS)
    if min(block_m, block_n) < 16:
        raise ValueError(f"tl.dot needs blocks of at least 16, got {block_m}, {block_n}")
    out = torch.empty((bsz, length, heads, dim), dtype=q.dtype, device=dev)
    precision = "ieee" if q.dtype == torch.float32 or interpreter else "tf32"
    _prompt_attention_kernel[(triton.cdiv(length, block_m), bsz * heads)](
        q,
        k,
        v,
        out,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        length,
        start,
        heads,
        heads // kv_heads,
        dim**-0.5 * _LOG2E,
        D=dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PRECISION=precision,
        UPCAST=interpreter,
        num_warps=warps,
        num_stages=stages,
        **kernels._pdl(),
    )
    return out
