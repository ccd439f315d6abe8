"""A prompt's causal attention over the KV cache in one Triton kernel (the LM prefill, fast path).

The prefill's attention is ``F.scaled_dot_product_attention`` over the cache's strided views; at one page's 913
positions x 10 heads of 128 its flash backend picks the split-KV form (too few query blocks to fill an H200) and
a combine kernel: 29 us per layer from a CUDA graph (benchmarks/bench_fusions.py, round 13), 20 us here.  This kernel
(``infer.fast.prefill_attention=triton``):

* a program owns ``BLOCK_M`` queries of one (batch, head) and a chunk of their keys (``SPLIT_STEPS`` key blocks:
  the last query block's 15 at 913 positions are three chunks; a block's chunks are merged in order by the one that
  ends last), the heaviest (last) query blocks first, so the causal triangle's long rows start early; GQA reads kv
  head ``head // (heads / kv_heads)`` in place (no repeat);
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

__all__ = [
    "BLOCKS",
    "HAVE_TRITON",
    "INTERPRETED",
    "SPLIT_STEPS",
    "prompt_attention",
    "prompt_attention_ref",
    "split_counter_count",
    "split_counters",
    "unavailable_reason",
]

# Whether the kernel below was decorated for Triton's interpreter (decided once, at import).
INTERPRETED: bool = HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = 1.4426950408889634

# (block_m, block_n, num_warps, num_stages) on a GPU.  H200 (benchmarks/bench_fusions.py --parts attention, round 13,
# call 3, timed from CUDA graphs, 913 positions x 10 heads of 128): 0.020 ms here and at (128, 64, 8, 3), 0.022-0.026
# at the other swept settings; SDPA's flash 0.029 (split-KV + combine), cuDNN 0.019 (which plans per shape: left out
# of the model's SDPA policy)
BLOCKS = (64, 64, 4, 3)
# The split form (:func:`prompt_attention`'s ``split_steps``): a query block's keys in chunks of about this many
# ``block_n`` steps, a program each (0: off, one program per query block).  H200, round 21 (bench_fusions, 913
# positions x 10 heads of 128, from CUDA graphs, one run): one program per block 0.020 ms; chunks of 2 / 3 / 4 / 6 /
# 8 steps 0.034 / 0.026 / 0.025 / 0.018 / 0.018 (short chunks pay the merge: 32 KB of float32 partials each); the
# LM prefill paired with the unsplit kernel (bench_fast, six alternating rounds) -0.030 ms at 6, within the noise
SPLIT_STEPS = 6


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

    @triton.jit(do_not_specialize=["start", "SPLIT_STEPS", "SLOTS"])
    def _prompt_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        o_ptr,
        part_ptr,
        ml_ptr,
        count_ptr,
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
        SPLIT_STEPS,
        SLOTS,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        USE_GDC: tl.constexpr = False,
    ):
        """The prompt's causal attention, a query block's keys cut into up to ``SLOTS`` chunks of about
        ``SPLIT_STEPS`` key steps, a program per chunk (program (block·SLOTS + chunk, batch·head), the heaviest
        blocks first; chunks a block does not have return at once), so the causal triangle's long rows need not set
        the kernel's length.  ``SLOTS`` = 1 with ``SPLIT_STEPS`` past every block's length: a program per query
        block, over all of its keys (the form before round 21).  Keys are walked ``BLOCK_N`` at a time, first the
        steps every query of the block sees (no mask), then the diagonal ones with the causal mask.

        A block of ``n`` key steps (``u`` of them seen by every query) has ``c = ceil(n / SPLIT_STEPS)`` chunks; chunk
        j covers steps ``min(j·n // c, u - 1)`` up to the next chunk's first (the last: up to ``n``), so only the
        last holds the masked diagonal steps and every chunk starts on a step every query sees (no row of a chunk
        is all -inf; a chunk the clamp leaves empty contributes nothing).  One chunk: the output directly.  More:
        each chunk stores its float32 (m, l, acc) to scratch, adds to its block's counter (acq_rel), and the chunk
        that arrives last merges all of them in chunk order (so the result does not depend on which one that was),
        writes the output and re-arms the counter."""
        if USE_GDC:
            kernels._dependent_launch()
        n_blocks = tl.num_programs(0) // SLOTS
        pid_m = n_blocks - 1 - tl.program_id(0) // SLOTS  # the longest causal rows first
        chunk = tl.program_id(0) % SLOTS
        bh = tl.program_id(1)
        b = bh // HEADS
        head = bh % HEADS
        first_row = pid_m * BLOCK_M
        unmasked = (start + first_row + 1) // BLOCK_N  # steps every query of the block sees
        n_steps = tl.cdiv(start + tl.minimum(first_row + BLOCK_M, L), BLOCK_N)
        n_chunks = tl.maximum(1, tl.cdiv(n_steps, SPLIT_STEPS))
        if chunk < n_chunks:
            # inner boundaries at most unmasked - 1: every chunk after the first starts on a step all rows see (so
            # no row is all -inf there); chunk 0 starts at key 0, which every row sees.  More than one chunk means
            # n_steps > SPLIT_STEPS >= 2 and (block_m <= block_n) at most two masked steps: unmasked >= 1
            lo = tl.minimum(chunk * n_steps // n_chunks, unmasked - 1) if chunk > 0 else 0
            hi = tl.minimum((chunk + 1) * n_steps // n_chunks, unmasked - 1) if chunk + 1 < n_chunks else n_steps
            kv_head = head // GROUP
            rows = first_row + tl.arange(0, BLOCK_M)
            rmask = rows < L
            d = tl.arange(0, D)
            q = tl.load(
                q_ptr + b * s_qb + rows[:, None] * s_ql + head * s_qh + d[None, :], mask=rmask[:, None], other=0.0
            )
            if UPCAST:
                q = q.to(tl.float32)
            q_pos = start + tl.minimum(rows, L - 1)  # padding rows see what the last real query sees
            # int64: a cache's batch stride (heads x columns x D) times 63 passes 2**31 elements at ~26k columns
            k_base = k_ptr + b.to(tl.int64) * s_kb + kv_head * s_kh
            v_base = v_ptr + b.to(tl.int64) * s_vb + kv_head * s_vh
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
            for step in range(lo, tl.minimum(hi, unmasked)):
                acc, m_i, l_i = _attend_block(
                    q, acc, m_i, l_i, k_base, v_base, s_kn, s_vn, step * BLOCK_N, q_pos, d, qk_scale, False,
                    BLOCK_N, PRECISION, UPCAST,
                )  # fmt: skip
            for step in range(tl.maximum(lo, unmasked), hi):
                acc, m_i, l_i = _attend_block(
                    q, acc, m_i, l_i, k_base, v_base, s_kn, s_vn, step * BLOCK_N, q_pos, d, qk_scale, True,
                    BLOCK_N, PRECISION, UPCAST,
                )  # fmt: skip
            dt = o_ptr.dtype.element_ty
            o_rows = o_ptr + (b * L + rows)[:, None] * (HEADS * D) + head * D + d[None, :]
            if n_chunks == 1:
                tl.store(o_rows, (acc / l_i[:, None]).to(dt), mask=rmask[:, None])
            else:
                r = tl.arange(0, BLOCK_M)
                slot0 = (bh * n_blocks + pid_m) * SLOTS  # this block's first chunk slot
                tl.store(part_ptr + ((slot0 + chunk) * BLOCK_M + r[:, None]) * D + d[None, :], acc)
                tl.store(ml_ptr + ((slot0 + chunk) * 2) * BLOCK_M + r, m_i)
                tl.store(ml_ptr + ((slot0 + chunk) * 2 + 1) * BLOCK_M + r, l_i)
                # the chunk that arrives last merges: the barrier orders every thread's stores ahead of the
                # counter's release (one thread's add), the second one every thread's loads behind its acquire
                tl.debug_barrier()
                count = count_ptr + bh * n_blocks + pid_m
                done = tl.atomic_add(count, 1, sem="acq_rel", scope="gpu")
                tl.debug_barrier()
                if done == n_chunks - 1:
                    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
                    for j in range(0, n_chunks):
                        m = tl.maximum(m, tl.load(ml_ptr + ((slot0 + j) * 2) * BLOCK_M + r, cache_modifier=".cg"))
                    total = tl.zeros([BLOCK_M], dtype=tl.float32)
                    out = tl.zeros([BLOCK_M, D], dtype=tl.float32)
                    for j in range(0, n_chunks):
                        m_j = tl.load(ml_ptr + ((slot0 + j) * 2) * BLOCK_M + r, cache_modifier=".cg")
                        l_j = tl.load(ml_ptr + ((slot0 + j) * 2 + 1) * BLOCK_M + r, cache_modifier=".cg")
                        a_j = tl.load(
                            part_ptr + ((slot0 + j) * BLOCK_M + r[:, None]) * D + d[None, :], cache_modifier=".cg"
                        )
                        w = tl.exp2(m_j - m)  # a chunk with no step for a row: m_j = -inf, weight 0
                        total += l_j * w
                        out += a_j * w[:, None]
                    tl.store(o_rows, (out / total[:, None]).to(dt), mask=rmask[:, None])
                    tl.atomic_xchg(count, 0, sem="relaxed", scope="gpu")


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


def split_counter_count(batch: int, heads: int, length: int, block_m: int = 0) -> int:
    """How many counters :func:`prompt_attention`'s split form needs: one per (batch, head, query block) of a
    ``length``-query prompt (``block_m`` 0: the GPU default's)."""
    return batch * heads * -(-length // (block_m or BLOCKS[0]))


def split_counters(batch: int, heads: int, length: int, device: torch.device | str, block_m: int = 0) -> Tensor:
    """Zeroed int32 counters for :func:`prompt_attention`'s split form (:func:`split_counter_count` of them).  Keep
    them across calls and in a CUDA graph (the kernel leaves them at zero); one buffer serves any shorter prompt."""
    n = split_counter_count(batch, heads, length, block_m)
    return torch.zeros(n, dtype=torch.int32, device=torch.device(device))


def prompt_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    start: int,
    blocks: tuple[int, int, int, int] | None = None,
    split_steps: int | None = None,
    counters: Tensor | None = None,
) -> Tensor:
    """:func:`prompt_attention_ref` in one kernel; ``q`` [B, L, heads, D] may be a strided view (the rotary kernel's
    output), ``k``/``v`` [B, kv_heads, S, D] with unit stride along D (the cache's layers); returns a contiguous
    [B, L, heads, D] (reshape to [B, L, heads·D] is free).  ``blocks``: (block_m, block_n, warps, stages).

    ``split_steps`` (None: ``SPLIT_STEPS`` on a GPU, 0 under the interpreter; 0: off): a query block whose keys
    take more than that many ``block_n`` steps is split into chunks of about that many, a program each, merged by
    the chunk that finishes last (:func:`_prompt_attention_kernel`); ``counters``: :func:`split_counters` (None:
    zeroed per call)."""
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
    # the interpreter runs programs one after another: chunks there only add programs and merges (the tests pass
    # split_steps to check the split form on CPU)
    split = (0 if interpreter else SPLIT_STEPS) if split_steps is None else split_steps
    if split == 1 or split < 0:
        raise ValueError(f"split_steps must be 0 (off) or >= 2, got {split}")
    if split and block_m > block_n:
        raise ValueError(f"the split form needs block_m <= block_n, got {block_m}, {block_n}")
    out = torch.empty((bsz, length, heads, dim), dtype=q.dtype, device=dev)
    precision = "ieee" if q.dtype == torch.float32 or interpreter else "tf32"
    n_blocks = triton.cdiv(length, block_m)
    need = split_counter_count(bsz, heads, length, block_m)
    if not split:  # one chunk per query block: no partials, no counters (never touched; one-element stand-ins)
        slots, split = 1, 1 << 30
        counters = torch.empty(1, dtype=torch.int32, device=dev)
        parts_acc = parts_ml = torch.empty(1, dtype=torch.float32, device=dev)
    else:
        slots = max(1, triton.cdiv(triton.cdiv(start + length, block_n), split))
        if counters is None:
            counters = torch.zeros(need, dtype=torch.int32, device=dev)
        elif counters.dtype != torch.int32 or counters.dim() != 1 or counters.numel() < need or counters.device != dev:
            raise ValueError(
                f"counters must be int32 [>= {need}] on {dev} (batch x heads x query blocks; see split_counters), "
                f"got {counters.dtype} {tuple(counters.shape)} on {counters.device}"
            )
        parts_acc = torch.empty(need * slots * block_m * dim, dtype=torch.float32, device=dev)
        parts_ml = torch.empty(need * slots * 2 * block_m, dtype=torch.float32, device=dev)
    _prompt_attention_kernel[(n_blocks * slots, bsz * heads)](
        q,
        k,
        v,
        out,
        parts_acc,
        parts_ml,
        counters,
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
        split,
        slots,
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
