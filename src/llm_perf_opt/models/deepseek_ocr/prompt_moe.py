"""A prompt's routed experts as Triton kernels: a counting sort by expert and two tiled grouped GEMMs (fast path).

The prefill's torch path for one MoE layer (``experts.grouped_experts_stacked``) is ~14 kernels at 913 prompt
tokens: a radix sort of the (token, pick) ids, a gather of the rows, ``searchsorted``, ``torch._grouped_mm``
twice with the SwiGLU between, a scatter for the inverse permutation, and the router's softmax / top-k kernels
before it.  On an H200 the grouped GEMMs move the used experts' weights (up to 440 MB per layer) at ~1 TB/s, and
the sorting and indexing around them cost ~50 us per layer.  ``infer.fast.prefill_experts=triton`` replaces them:

* :func:`align`, two launches: per-chunk expert histograms, then each chunk places its pairs at
  ``offs[e] + (pairs of e in earlier chunks) + (rank within the chunk)``: the same stable order as
  ``torch.sort(..., stable=True)``, plus the inverse permutation, the per-expert offsets and (optionally) the
  layer's routing counters, with no host sync;
* :func:`grouped_swiglu`: a grid over (row tile, column tile) where each expert's rows are cut into
  ``block_m`` tiles (an expert with no rows has none; tiles past the last are empty programs, so the grid
  depends only on the pair count and CUDA graphs can capture it).  A program gathers its tile's token rows
  itself (no gathered copy), runs them against one column tile of the expert's gate and up weights, and
  writes ``bf16(silu(bf16 g)) * bf16 u`` rounded to bf16 (torch's rounding points) at the rows' sorted
  positions;
* :func:`grouped_down`: the same tiling over the SwiGLU output and the down weights, bf16 out in sorted order,
  which ``kernels.moe_gather_combine`` un-permutes, weights and adds to the shared experts' output.

Programs of one column tile are adjacent in launch order and an expert's row tiles are consecutive, so the second
tile of an expert finds that weight tile in L2.  Results equal the torch path to bf16 rounding (the GEMMs sum in
another order); the sort is bit-identical.

Triton is optional, as for :mod:`kernels`: compiled on CUDA; on CPU tensors only under Triton's interpreter.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
from torch import Tensor

from llm_perf_opt.models.deepseek_ocr import kernels
from llm_perf_opt.models.deepseek_ocr.experts import silu_gate_up
from llm_perf_opt.models.deepseek_ocr.kernels import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from llm_perf_opt.models.deepseek_ocr.kernels import _dependent_launch, _round

__all__ = [
    "ALIGN_MAX_CHUNK",
    "ALIGN_MAX_CHUNKS",
    "DOWN_GEMM",
    "DOWN_GEMMS",
    "HAVE_TRITON",
    "INTERPRETED",
    "W_TMA",
    "Alignment",
    "GemmBlocks",
    "align",
    "align_ref",
    "fit_stages",
    "gemm_blocks",
    "gemm_stages",
    "grouped_down",
    "grouped_down_ref",
    "grouped_swiglu",
    "grouped_swiglu_ref",
    "row_tiles",
    "unavailable_reason",
]

# Whether the kernels below were decorated for Triton's interpreter (decided once, at import).
INTERPRETED: bool = HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

# The place kernel loads every chunk's histogram at once ([chunks, experts] int32): at most this many chunks.
ALIGN_MAX_CHUNKS = 256
# The largest chunk the place kernel takes: its scan of a chunk's one-hot rows ([chunk, 128] int32 for 64 experts)
# must fit a block's shared memory.  H200 (round 24, bench_batched's first fill of 64 Base pages: 108,672 pairs,
# 512-pair chunks): "out of resource: shared memory, Required: 262144, Hardware limit: 232448".  Past
# ALIGN_MAX_CHUNKS x this many pairs (~10,900 tokens at top-6: a batched prefill of many pages) :func:`align` sorts
# with torch (:func:`align_ref`, the same Alignment bit for bit; it reads the routing's size on the host).
ALIGN_MAX_CHUNK = 256


def unavailable_reason(device: torch.device | str) -> str:
    """'' when the kernels can run on ``device``, else why not (:func:`kernels.unavailable_reason`'s rules)."""
    return kernels.unavailable_reason(device, INTERPRETED, __name__)


def _require(op: str, device: torch.device) -> None:
    kernels._require(op, device, INTERPRETED, __name__)


class Alignment(NamedTuple):
    """The (token, pick) pairs of a routing sorted by expert, stable: ``order`` [P] int32, sorted position ->
    pair (token·k + pick); ``inverse`` [P] int64, pair -> sorted position; ``offs`` [E + 1] int32, expert e's
    pairs are sorted positions ``offs[e]:offs[e + 1]``."""

    order: Tensor
    inverse: Tensor
    offs: Tensor


class GemmBlocks(NamedTuple):
    """Launch settings of one grouped GEMM: rows per tile, output columns per tile, K per step, warps, stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# H200 defaults from benchmarks/bench_fusions.py --parts prompt_experts (round 13, call 3; one MoE layer at 913
# tokens, random top-6 of 64, timed from CUDA graphs): up + SwiGLU 0.134 ms at the first guess (64, 128, 64, 8, 3),
# 0.113 at (128, 64, 64, 8, 4), 0.110 at (128, 128, 64, 8, 3), torch._grouped_mm + silu_mul 0.124; down 0.065 at
# (64, 128, 64, 4, 4), 0.059 at (128, 128, 64, 8, 3), torch._grouped_mm 0.058.  Compiled for sm_90 with the
# launcher's specialisation (pointers, N and K divisible by 16), both defaults pipeline their K loop (16-byte async
# copies, three stages; the up GEMM four since round 20), use wgmma and do not spill (212 and 114 registers).  The
# interpreter runs programs one at a time with numpy: few, large tiles.
# Round 20 (the same bench, one layer at random routing, call 6): the up GEMM at four stages 0.110 -> 0.104 ms (2.67 ->
# 2.82 TB/s of expert weights; 192 KB of shared memory); the down GEMM at four stages 0.059 -> 0.062 (kept at three).
# Persistent programs walking the real tiles, one K loop flattened across each program's tiles (built in round 20,
# commit 46e2d99, then removed): up 0.113 at best, down 0.056 (one per SM, four stages) and 0.055 (64-row tiles, two
# per SM); the whole LM prefill with the persistent down GEMM read 3.38 -> 3.57, 3.37 -> 3.32 and 3.14 -> 3.35 ms on
# the dummy routing, 3.74 -> 3.61, 3.51 -> 3.46 and 3.37 -> 3.34 with the routing spread (bench_fast calls 3, 4, 7).
UP_BLOCKS = GemmBlocks(128, 128, 64, 8, 4)
DOWN_BLOCKS = GemmBlocks(128, 128, 64, 8, 3)
# A float32 model's up GEMM (gate and up, IEEE float32 on the CUDA cores): at the bf16 blocks its two [128, 128]
# float32 accumulators and float32 operand tiles need more than 255 registers a thread, and sm_90's ptxas spilled
# 34,360 bytes a thread (bench_kernels --sm90-check, round 23).  At [64, 128] tiles and 32-wide K steps it compiles
# to 244 registers without a spill (80 KB of shared memory at three stages).  The down GEMM fits at its bf16 blocks
# (255 registers, no spill; its stages fitted to shared memory by gemm_stages).  A correctness path, not timed.
FLOAT32_UP_BLOCKS = GemmBlocks(64, 128, 32, 8, 3)
# The down GEMM of infer.fast.prefill_experts=triton on a GPU where torch has grouped GEMMs: "triton"
# (:func:`grouped_down`) or "torch" (``torch._grouped_mm`` over the same sorted rows and offsets).  H200 (bench_fast,
# round 13, call 3, the graphed LM prefill on dummy routing): 3.69 ms with triton, 3.85 with torch.
DOWN_GEMMS = ("triton", "torch")
DOWN_GEMM = "triton"
# Whether the grouped GEMMs read their weight tiles through a TMA tensor descriptor (Hopper's copy engine: one
# thread issues a [BLOCK_N, BLOCK_K] tile, the loop's stages wait on barriers) instead of per-thread pointer loads
# (16-byte async copies).  Applies where N and K are whole tiles (DeepSeek-OCR's 896 and 1280 are); elsewhere the
# pointer loads run.  Off: slower on an H200 (round 15, bench_fast, the graphed LM prefill at the default blocks):
# 3.40 -> 3.64 ms on the dummy routing, 3.80 -> 3.91 with every expert read (the grouped GEMMs move the experts'
# weights at ~2.6 TB/s either way; both forms compile for sm_90 without spills, 212 / 171 registers for the up GEMM).
W_TMA = False


def gemm_blocks(which: str, interpreter: bool, float32: bool = False) -> GemmBlocks:
    """The default :class:`GemmBlocks` of ``which`` ("up" or "down") on a GPU (``float32``: for float32 operands),
    or under the interpreter."""
    if which not in ("up", "down"):
        raise ValueError(f"which must be 'up' or 'down', got {which!r}")
    if interpreter:
        return GemmBlocks(32, 64, 64, 4, 1)
    if which == "up":
        return FLOAT32_UP_BLOCKS if float32 else UP_BLOCKS
    return DOWN_BLOCKS


def row_tiles(n_pairs: int, n_experts: int, block_m: int) -> int:
    """Programs along the row axis of a grouped GEMM: an upper bound of Σ_e ceil(rows_e / block_m) over any
    routing of ``n_pairs`` pairs (each expert's last tile may be partial), so the grid depends only on sizes."""
    return -(-n_pairs // block_m) + n_experts


# ======================================================================================== kernels
if HAVE_TRITON:

    @triton.jit
    def _align_hist_kernel(
        ids_ptr,
        hist_ptr,
        P,
        E: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_E: tl.constexpr,
        USE_GDC: tl.constexpr = False,
    ):
        """Chunk c's histogram of expert ids: ``hist[c, e]`` = pairs c·BLOCK_P .. (c+1)·BLOCK_P - 1 routed to e."""
        if USE_GDC:
            _dependent_launch()
        c = tl.program_id(0)
        p = c * BLOCK_P + tl.arange(0, BLOCK_P)
        ids = tl.load(ids_ptr + p, mask=p < P, other=E).to(tl.int32)  # padding: id E, counted in no real bin
        e = tl.arange(0, BLOCK_E)
        onehot = (ids[:, None] == e[None, :]).to(tl.int32)
        tl.store(hist_ptr + c * BLOCK_E + e, tl.sum(onehot, axis=0))

    @triton.jit
    def _align_place_kernel(
        ids_ptr,
        hist_ptr,
        order_ptr,
        inverse_ptr,
        offs_ptr,
        counts_ptr,
        P,
        C,
        E: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_C: tl.constexpr,
        HAS_COUNTS: tl.constexpr,
        USE_GDC: tl.constexpr = False,
    ):
        """Chunk c's pairs to their sorted positions: ``offs[e]`` (all pairs with a smaller id) + the pairs of e
        in earlier chunks + the pair's rank among its chunk's pairs of e (an inclusive scan of the one-hot
        rows): a stable counting sort.  Chunk 0 also writes ``offs`` [E + 1] and adds the totals to ``counts``."""
        if USE_GDC:
            _dependent_launch()
        c = tl.program_id(0)
        e = tl.arange(0, BLOCK_E)
        cc = tl.arange(0, BLOCK_C)
        hist = tl.load(hist_ptr + cc[:, None] * BLOCK_E + e[None, :], mask=(cc < C)[:, None], other=0)
        total = tl.sum(hist, axis=0)  # [BLOCK_E]: pairs per expert (0 past E)
        offs = tl.cumsum(total, axis=0) - total  # exclusive: first sorted position of each expert
        earlier = tl.sum(tl.where((cc < c)[:, None], hist, 0), axis=0)
        base = offs + earlier
        p = c * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < P
        ids = tl.load(ids_ptr + p, mask=pmask, other=E).to(tl.int32)
        onehot = (ids[:, None] == e[None, :]).to(tl.int32)
        rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # earlier pairs of this chunk with my id
        pos = tl.sum(onehot * base[None, :], axis=1) + rank
        tl.store(order_ptr + pos, p, mask=pmask)
        tl.store(inverse_ptr + p, pos.to(tl.int64), mask=pmask)
        if c == 0:
            tl.store(offs_ptr + e, offs, mask=e <= E)  # offs[E] = P: BLOCK_E > E holds the end
            if HAS_COUNTS:
                emask = e < E
                old = tl.load(counts_ptr + e, mask=emask, other=0)
                tl.store(counts_ptr + e, old + total.to(tl.int64), mask=emask)

    @triton.jit
    def _tile_of(offs_ptr, t, E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
        """Row tile ``t`` -> (expert, first sorted row, end row of the expert); expert == E past the last tile.

        Each expert's rows are ceil(rows / BLOCK_M) tiles, in expert order: ``t`` falls in the expert whose
        inclusive tile count is the first above ``t``."""
        e = tl.arange(0, BLOCK_E)
        emask = e < E
        start = tl.load(offs_ptr + e, mask=emask, other=0)
        end = tl.load(offs_ptr + e + 1, mask=emask, other=0)
        tiles = (end - start + BLOCK_M - 1) // BLOCK_M
        cum = tl.cumsum(tiles, axis=0)
        expert = tl.sum((cum <= t).to(tl.int32), axis=0)
        mine = e == expert
        first_tile = tl.sum(tl.where(mine, cum - tiles, 0), axis=0)
        row0 = tl.sum(tl.where(mine, start, 0), axis=0) + (t - first_tile) * BLOCK_M
        return expert, row0, tl.sum(tl.where(mine, end, 0), axis=0)

    @triton.jit(do_not_specialize=["P"])
    def _grouped_gemm_kernel(
        a_ptr,
        order_ptr,
        offs_ptr,
        w_ptr,
        w_desc,
        out_ptr,
        P,
        N,
        K,
        E: tl.constexpr,
        TOP_K: tl.constexpr,
        GATHER: tl.constexpr,
        SWIGLU: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        EVEN_N: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        W_TMA: tl.constexpr = False,
        USE_GDC: tl.constexpr = False,
    ):
        """Program (row tile t, column tile nb) of one grouped GEMM over sorted rows.

        ``GATHER``: the A rows are token rows ``order[r] // TOP_K`` of ``a`` [T, K] (the up GEMM), else sorted
        rows of ``a`` [P, K] (the down GEMM).  ``SWIGLU``: ``w`` [E, 2N, K] holds gate rows then up rows; two
        accumulators, and the output is ``bf16(silu(bf16 g)) * bf16 u`` rounded; else ``w`` [E, N, K] and the
        output is the accumulator rounded.  ``out`` [P, N] at the sorted rows.  ``W_TMA`` (N and K whole tiles): the
        weight tiles come through ``w_desc``, a tensor descriptor of ``w`` as [E·rows, K] with [BLOCK_N, BLOCK_K]
        blocks (Hopper's TMA engine copies them, no per-thread addresses); else through pointers."""
        if USE_GDC:
            _dependent_launch()
        t = tl.program_id(0)
        nb = tl.program_id(1)
        expert, row0, row_end = _tile_of(offs_ptr, t, E, BLOCK_E, BLOCK_M)
        if expert < E:
            r = row0 + tl.arange(0, BLOCK_M)
            rmask = r < row_end
            if GATHER:  # noqa: SIM108 (a constexpr branch)
                arow = tl.load(order_ptr + r, mask=rmask, other=0) // TOP_K
            else:
                arow = r
            n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = n < N
            w_rows = 2 * N if SWIGLU else N
            w_base = w_ptr + expert.to(tl.int64) * w_rows * K
            w_row0 = expert * w_rows + nb * BLOCK_N  # the tile's first row of w as [E·rows, K] (W_TMA)
            a_rows = a_ptr + arow.to(tl.int64)[:, None] * K
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                a_mask = rmask[:, None]
                w_mask = nmask[:, None]
                if not EVEN_K:
                    a_mask = a_mask & (kk[None, :] < K)
                    w_mask = w_mask & (kk[None, :] < K)
                a = tl.load(a_rows + kk[None, :], mask=a_mask, other=0.0)
                if W_TMA:
                    w = w_desc.load([w_row0, k0])
                elif EVEN_N and EVEN_K:
                    w = tl.load(w_base + n[:, None] * K + kk[None, :])  # [BLOCK_N, BLOCK_K], contiguous along K
                else:
                    w = tl.load(w_base + n[:, None] * K + kk[None, :], mask=w_mask, other=0.0)
                if UPCAST:  # Triton's interpreter computes bf16 tl.dot wrongly; float32 operands are exact
                    a, w = a.to(tl.float32), w.to(tl.float32)
                acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
                if SWIGLU:
                    if W_TMA:
                        wu = w_desc.load([w_row0 + N, k0])
                    elif EVEN_N and EVEN_K:
                        wu = tl.load(w_base + (N + n)[:, None] * K + kk[None, :])
                    else:
                        wu = tl.load(w_base + (N + n)[:, None] * K + kk[None, :], mask=w_mask, other=0.0)
                    if UPCAST:
                        wu = wu.to(tl.float32)
                    acc_u = tl.dot(a, tl.trans(wu), acc_u, input_precision=PRECISION)
            dt = out_ptr.dtype.element_ty
            if SWIGLU:
                g = _round(acc, dt)  # the gate/up GEMM's output is in the activation dtype
                u = _round(acc_u, dt)
                act = _round(g / (1.0 + tl.exp(-g)), dt)  # F.silu rounds to the activation dtype
                val = _round(act * u, dt)
            else:
                val = _round(acc, dt)
            out = out_ptr + r.to(tl.int64)[:, None] * N + n[None, :]
            tl.store(out, val.to(dt), mask=rmask[:, None] & nmask[None, :])


# ======================================================================================== align
def align_ref(idx: Tensor, n_experts: int, counts: Tensor | None = None) -> Alignment:
    """:func:`align` in torch: a stable sort of the flattened ids, the inverse permutation by a scatter, offsets by
    ``searchsorted`` (the torch prefill path's steps); ``counts`` += the per-expert totals."""
    flat = idx.reshape(-1)
    _, order = torch.sort(flat, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=idx.device))
    bins = torch.bincount(flat, minlength=n_experts)
    offs = torch.zeros(n_experts + 1, dtype=torch.int32, device=idx.device)
    offs[1:] = torch.cumsum(bins, 0).to(torch.int32)
    if counts is not None:
        counts += bins.to(counts.dtype)
    return Alignment(order.to(torch.int32), inverse.to(torch.int64), offs)


def _align_chunk(n_pairs: int) -> int:
    """Pairs per chunk: 128, doubled until the chunks fit :data:`ALIGN_MAX_CHUNKS`."""
    chunk = 128
    while -(-n_pairs // chunk) > ALIGN_MAX_CHUNKS:
        chunk *= 2
    return chunk


def align(idx: Tensor, n_experts: int, counts: Tensor | None = None) -> Alignment:
    """The routing ``idx`` [T, k] (expert ids, any integer dtype) sorted by expert, stable, in two launches; the same
    :class:`Alignment` as :func:`align_ref`, bit for bit.  ``counts`` (int64 [E]): the picks per expert are added
    on the device (the routing counters)."""
    _require("align", idx.device)
    if idx.dim() != 2 or idx.dtype.is_floating_point:
        raise ValueError(f"idx must be integer expert ids [tokens, k], got {idx.dtype} {tuple(idx.shape)}")
    if counts is not None and (counts.shape != (n_experts,) or counts.dtype != torch.int64):
        raise ValueError(f"counts must be int64 [{n_experts}], got {counts.dtype} {tuple(counts.shape)}")
    idx = kernels._contig(idx, "idx")
    n_pairs = idx.numel()
    dev = idx.device
    chunk = _align_chunk(n_pairs)
    if chunk > ALIGN_MAX_CHUNK:  # the place kernel's scan would not fit a block's shared memory
        return align_ref(idx, n_experts, counts)
    chunks = max(1, -(-n_pairs // chunk))
    block_e = kernels._pow2(n_experts + 1)  # room for offs[E]
    hist = torch.empty((chunks, block_e), dtype=torch.int32, device=dev)
    order = torch.empty(n_pairs, dtype=torch.int32, device=dev)
    inverse = torch.empty(n_pairs, dtype=torch.int64, device=dev)
    offs = torch.empty(n_experts + 1, dtype=torch.int32, device=dev)
    _align_hist_kernel[(chunks,)](
        idx, hist, n_pairs, E=n_experts, BLOCK_P=chunk, BLOCK_E=block_e, num_warps=4, **kernels._pdl()
    )
    _align_place_kernel[(chunks,)](
        idx,
        hist,
        order,
        inverse,
        offs,
        offs if counts is None else counts,
        n_pairs,
        chunks,
        E=n_experts,
        BLOCK_P=chunk,
        BLOCK_E=block_e,
        BLOCK_C=kernels._pow2(chunks),
        HAS_COUNTS=counts is not None,
        num_warps=4,
        **kernels._pdl(),
    )
    return Alignment(order, inverse, offs)


# ======================================================================================== grouped GEMMs
def grouped_swiglu_ref(x: Tensor, order: Tensor, offs: Tensor, w13: Tensor, top_k: int) -> Tensor:
    """The up GEMM and SwiGLU of :func:`grouped_swiglu` in torch, expert by expert: sorted rows ``x[order // k]``
    times the expert's fused gate/up weights, bf16 output, then ``experts.silu_gate_up`` (the torch path's steps)."""
    rows = x.index_select(0, order.long() // top_k)
    out = torch.empty((rows.shape[0], w13.shape[1] // 2), dtype=x.dtype, device=x.device)
    bounds = offs.tolist()
    for e in range(w13.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = silu_gate_up(rows[lo:hi] @ w13[e].T)
    return out


def grouped_down_ref(act: Tensor, offs: Tensor, w2: Tensor) -> Tensor:
    """:func:`grouped_down` in torch, expert by expert: sorted rows of ``act`` times the expert's down weights."""
    out = torch.empty((act.shape[0], w2.shape[1]), dtype=act.dtype, device=act.device)
    bounds = offs.tolist()
    for e in range(w2.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = act[lo:hi] @ w2[e].T
    return out


@functools.cache
def _max_shared(device_index: int) -> int:
    """The shared memory a block may have on CUDA device ``device_index``, as Triton checks it at launch."""
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(device_index)["max_shared_mem"])


def fit_stages(stages: int, stage_bytes: int, limit: int) -> int:
    """The most pipeline stages up to ``stages`` whose shared memory fits ``limit`` bytes: a K loop software-
    pipelined over S stages keeps S - 1 steps' tiles (``stage_bytes`` each) in flight (an H200: a float32 up GEMM
    at [128, 128, 64] tiles and four stages asks for 3 x 96 KB = 294,912 bytes of the 232,448 a block may have;
    bf16 takes half).  At least one stage (a plain loop)."""
    while stages > 1 and (stages - 1) * stage_bytes > limit:
        stages -= 1
    return max(1, stages)


def gemm_stages(blocks: GemmBlocks, swiglu: bool, element_size: int, limit: int) -> int:
    """``blocks``' pipeline stages fitted to ``limit`` bytes of shared memory (:func:`fit_stages`) for operands of
    ``element_size`` bytes: a stage holds one [block_m, block_k] tile of A and one [block_n, block_k] tile of W, two
    with ``swiglu`` (gate and up).  Float32 operands take twice bf16's bytes a stage (a float32 model's up GEMM has
    blocks of its own, ``FLOAT32_UP_BLOCKS``, which fit at their three stages)."""
    bm, bn, bk, _, stages = blocks
    return fit_stages(stages, (bm * bk + (2 if swiglu else 1) * bn * bk) * element_size, limit)


def _launch_gemm(
    a: Tensor,
    order: Tensor,
    offs: Tensor,
    w: Tensor,
    out: Tensor,
    n: int,
    top_k: int,
    gather: bool,
    swiglu: bool,
    blocks: GemmBlocks,
) -> Tensor:
    n_pairs, k = out.shape[0], a.shape[1]
    n_experts = w.shape[0]
    bm, bn, bk, warps, stages = blocks
    if min(bm, bn, bk) < 16:
        raise ValueError(f"tl.dot needs blocks of at least 16, got {blocks}")
    interpreter = a.device.type != "cuda"
    precision = "ieee" if a.dtype == torch.float32 or interpreter else "tf32"
    if not interpreter:
        stages = gemm_stages(blocks, swiglu, a.element_size(), _max_shared(a.device.index or 0))
    grid = (row_tiles(n_pairs, n_experts, bm), -(-n // bn))
    w_tma = W_TMA and n % bn == 0 and k % bk == 0
    if w_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        w_desc: object = TensorDescriptor.from_tensor(w.view(-1, k), [bn, bk])
    else:
        w_desc = w  # not read
    _grouped_gemm_kernel[grid](
        a,
        order,
        offs,
        w,
        w_desc,
        out,
        n_pairs,
        n,
        k,
        E=n_experts,
        TOP_K=top_k,
        GATHER=gather,
        SWIGLU=swiglu,
        BLOCK_E=kernels._pow2(n_experts),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        EVEN_K=k % bk == 0,
        EVEN_N=n % bn == 0,
        PRECISION=precision,
        UPCAST=interpreter,
        W_TMA=w_tma,
        num_warps=warps,
        num_stages=stages,
        **kernels._pdl(),
    )
    return out


def _check_alignment(order: Tensor, offs: Tensor, n_experts: int) -> None:
    if order.dtype != torch.int32 or order.dim() != 1:
        raise ValueError(f"order must be int32 [pairs], got {order.dtype} {tuple(order.shape)}")
    if offs.dtype != torch.int32 or offs.shape != (n_experts + 1,):
        raise ValueError(
            f"offs must be int32 [{n_experts + 1}] (one per expert + the end), got {offs.dtype} {tuple(offs.shape)}"
        )


def grouped_swiglu(
    x: Tensor, order: Tensor, offs: Tensor, w13: Tensor, top_k: int, blocks: GemmBlocks | None = None
) -> Tensor:
    """SwiGLU of the routed experts' gate/up GEMM at the sorted rows: ``x`` [T, H] token rows, ``order`` / ``offs``
    from :func:`align`, ``w13`` [E, 2I, H] (gate rows, then up rows) -> [P, I] in the activation dtype, row r for
    sorted position r.  Equals :func:`grouped_swiglu_ref` to bf16 rounding (the K sum runs in another order)."""
    _require("grouped_swiglu", x.device)
    x, w13 = kernels._contig(x, "x"), kernels._contig(w13, "w13")
    n_experts, two_i, hidden = w13.shape
    _check_alignment(order, offs, n_experts)
    if x.dim() != 2 or x.shape[1] != hidden or two_i % 2 or x.dtype != w13.dtype:
        raise ValueError(
            f"x [T, {hidden}] and w13 [E, 2I, {hidden}] of one dtype expected, got x {x.dtype} "
            f"{tuple(x.shape)}, w13 {w13.dtype} {tuple(w13.shape)}"
        )
    if order.numel() != x.shape[0] * top_k:
        raise ValueError(f"order holds {order.numel()} pairs, expected tokens x k = {x.shape[0] * top_k}")
    inter = two_i // 2
    out = torch.empty((order.numel(), inter), dtype=x.dtype, device=x.device)
    blocks = blocks or gemm_blocks("up", x.device.type != "cuda", x.dtype == torch.float32)
    return _launch_gemm(x, order, offs, w13, out, inter, top_k, True, True, blocks)


def grouped_down(act: Tensor, offs: Tensor, w2: Tensor, blocks: GemmBlocks | None = None) -> Tensor:
    """The routed experts' down GEMM over sorted rows: ``act`` [P, I] (from :func:`grouped_swiglu`), ``w2`` [E, H, I]
    -> [P, H] in ``act``'s dtype at the same sorted rows (``kernels.moe_gather_combine`` un-permutes them)."""
    _require("grouped_down", act.device)
    act, w2 = kernels._contig(act, "act"), kernels._contig(w2, "w2")
    n_experts, hidden, inter = w2.shape
    if act.dim() != 2 or act.shape[1] != inter or act.dtype != w2.dtype:
        raise ValueError(f"act [P, {inter}] of w2's dtype expected, got {act.dtype} {tuple(act.shape)}")
    if offs.dtype != torch.int32 or offs.shape != (n_experts + 1,):
        raise ValueError(f"offs must be int32 [{n_experts + 1}], got {offs.dtype} {tuple(offs.shape)}")
    out = torch.empty((act.shape[0], hidden), dtype=act.dtype, device=act.device)
    blocks = blocks or gemm_blocks("down", act.device.type != "cuda", act.dtype == torch.float32)
    return _launch_gemm(act, offs, offs, w2, out, hidden, 1, False, False, blocks)
