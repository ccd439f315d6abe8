"""SAM's attention with decomposed relative positions at head size 64, in one Triton kernel (fast path).

SAM's logits are ``scale·q·k + rel_h[q, key row] + rel_w[q, key column]`` with two small per-query tables
(:func:`llm_perf_opt.models.deepseek_ocr.sam.rel_pos_terms`).  ``sam_attention=augmented`` folds them into the
operands (q and k 64 + h + w wide, v zero-padded to match: three times the work of head size 64, on flash);
FlexAttention applies them per score and gathers both tables for every logit (7–24× slower on an H200).
This kernel (``sam_attention=triton``, the default: H200 fast vision 15.7 -> 14.1 ms per Gundam page) walks the
keys a few whole key *rows* at a time, so neither needs a gather:

* a program owns ``BLOCK_M`` queries of one (batch, head) and loads its ``rel_w`` rows once, a
  [BLOCK_M, BLOCK_N] tile laid out like the scores of one step (``BLOCK_N`` a power of two holding ``ROWS`` key
  rows of ``w`` columns each: column c is key row ``c // w``, key column ``c % w``; the padding columns from
  ``ROWS·w`` on get ``-inf``);
* a step takes the ``ROWS·w`` consecutive keys of its key rows: one [BLOCK_N, 64] tile of k and of v, and for
  each of its key rows one column of ``rel_h`` (contiguous over queries: the table is passed key-row major),
  added to that row's scores;
* with several key rows per step (``ROWS`` > 1) both tables' terms come from two small products with one-hot
  matrices instead: ``rel_h`` [BLOCK_M, the step's key rows] × [key row, column] and ``rel_w`` [BLOCK_M, w] ×
  [key column, column], on the tensor cores, each logit a single non-zero product (exact in float32);
* with ``PATCH_W`` (:class:`Blocks` ``patch_w``, dividing the grid's width) a step is a patch of key rows ×
  ``PATCH_W`` key columns instead of whole rows, both terms through the same one-hot products, ``rel_w``'s only
  ``PATCH_W`` (padded to 16) deep: the 640-px tiles' 40-wide grid in 8×8 patches fills every column of a 64-key
  step, where one row per step leaves 24 of 64 empty;
* the rest is flash attention's online softmax in float32 (``exp2`` with ``log2 e`` folded into the scale and
  the tables), P rounded to the input dtype for the P·V product, the output divided once at the end.

Waste: one key row per step in a 64-wide tile leaves a 40-wide grid (640-px tiles) 62.5 % useful, and a 14×14
window's 16-wide steps are too short to keep the tensor cores busy.  Several whole rows per step (one-hot products
with ``rel_w`` as deep as the padded row) measured no faster on an H200 (rounds 11, 15); 8×8 patches (round 16)
fill the tiles' steps and are their default (:data:`BY_GRID`: 0.219 vs 0.269 ms a global block of v1's six tiles);
the 1024-px view's 64-wide rows need no patches, and the windows keep one row per step
(:func:`attention_blocks`; ``bench_sam_attention.py --sweep`` times every form).  Against the
augmented operands' 3× that is still less work.  Scores are summed in another order than SDPA's, so results equal
the dense-bias reference to bf16 rounding, not bit for bit.

Triton is optional, as for :mod:`kernels`: compiled on CUDA; on CPU tensors only under Triton's interpreter
(``TRITON_INTERPRET=1`` before ``triton`` and this module are first imported).  On CUDA the kernel is wrapped
in a ``torch.library`` custom op (``llm_perf_opt::sam_rel_pos_attention``), so ``torch.compile`` of a SAM block
treats it as one opaque call and CUDA graphs capture it.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from torch import Tensor

from llm_perf_opt.models.deepseek_ocr import kernels
from llm_perf_opt.models.deepseek_ocr.kernels import HAVE_TRITON, KernelUnavailableError

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "BIAS_AFTER_GRIDS",
    "BIAS_IN_MMA",
    "BY_GRID",
    "GATHER_BLOCK",
    "GATHER_MAX_GRID",
    "HAVE_TRITON",
    "INTERPRETED",
    "ROW_TERM_IN_MAX",
    "TABLES",
    "TABLE_FORMS",
    "Blocks",
    "attention_blocks",
    "attention_kernel",
    "rel_pos_tables",
    "rel_pos_triton_attention",
    "tables_gather_kernel",
    "tables_kernel",
    "unavailable_reason",
]

# Whether the kernel below was decorated for Triton's interpreter (decided once, at import).
INTERPRETED: bool = HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = 1.4426950408889634


def unavailable_reason(device: torch.device | str) -> str:
    """'' when the kernel can run on ``device``, else why not (:func:`kernels.unavailable_reason`'s rules, for the
    way this module was decorated)."""
    return kernels.unavailable_reason(device, INTERPRETED, __name__)


if HAVE_TRITON:
    LOG2E = tl.constexpr(_LOG2E)  # the tables are scaled by it in the kernel (exp2 softmax)

    @triton.jit
    def _rel_pos_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        rh_ptr,
        rw_ptr,
        out_ptr,
        s_qb,
        s_qh,
        s_qn,
        s_kb,
        s_kh,
        s_kn,
        s_vb,
        s_vh,
        s_vn,
        N,
        HEADS,
        KH,
        KW,
        qk_scale,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ROWS: tl.constexpr,
        ROW_PAD: tl.constexpr,
        COL_PAD: tl.constexpr,
        STAGES: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        PREFETCH_RH: tl.constexpr = True,
        PATCH_W: tl.constexpr = 0,
        BIAS_ACC: tl.constexpr = False,
        FULL: tl.constexpr = False,
        BIAS_SCALE: tl.constexpr = 1.0,
        ROW_SHIFT: tl.constexpr = False,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // HEADS
        head = bh % HEADS
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        d = tl.arange(0, D)
        # a step's BLOCK_N key columns hold ROWS whole key rows, ROWS·KW consecutive keys: column c is key row
        # step·ROWS + seg[c], key column kcol[c]; columns from ROWS·KW on are padding
        cols = tl.arange(0, BLOCK_N)
        # PATCH_W > 0: a step is a patch of ROWS key rows x PATCH_W key columns (PATCH_W divides KW): column c is
        # patch row seg[c], patch column kcol[c], so a grid whose width is no power of two (40) needs no padding
        if PATCH_W > 0:
            seg = cols // PATCH_W
            kcol = cols - seg * PATCH_W
        else:
            seg = cols // KW
            kcol = cols - seg * KW
        cmask = seg < ROWS
        q = tl.load(q_ptr + b * s_qb + head * s_qh + rows[:, None] * s_qn + d[None, :], mask=rmask[:, None], other=0.0)
        if UPCAST:  # Triton's interpreter computes bf16 tl.dot wrongly; float32 operands are exact
            q = q.to(tl.float32)
        if ROWS > 1 or PATCH_W > 0:
            # both tables' terms of a step as products with one-hot matrices (column c's key row, its key column):
            # [BLOCK_M, ROW_PAD] x [ROW_PAD, BLOCK_N] and [BLOCK_M, COL_PAD] x [COL_PAD, BLOCK_N], one non-zero
            # product per logit each, so exact in float32; the padding columns are masked after (kmask)
            # BIAS_ACC: the one-hot entries are BIAS_SCALE (a power of two: exact), so the terms come out in the
            # score product's units and that product accumulates onto them
            one = BIAS_SCALE if BIAS_ACC else 1.0
            rsel = tl.arange(0, ROW_PAD)
            onehot_h = tl.where(rsel[:, None] == seg[None, :], one, 0.0).to(q.dtype)
            csel = tl.arange(0, COL_PAD)
            onehot_w = tl.where(csel[:, None] == kcol[None, :], one, 0.0).to(q.dtype)
            if PATCH_W == 0:  # whole rows: every step's columns (a patch loads its own columns in its step)
                rw_t = tl.load(
                    rw_ptr + (bh * N + rows[:, None]) * KW + csel[None, :],
                    mask=rmask[:, None] & (csel[None, :] < KW),
                    other=0.0,
                )
                if UPCAST:
                    rw_t = rw_t.to(tl.float32)
        else:
            # rel_w [B·heads, N, KW]: this program's rows, laid out like one step's scores; padding columns -inf
            rw = tl.load(
                rw_ptr + (bh * N + rows[:, None]) * KW + kcol[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
            )
            rw = tl.where(cmask[None, :], rw.to(tl.float32) * LOG2E, float("-inf"))
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        k_base = k_ptr + b * s_kb + head * s_kh
        v_base = v_ptr + b * s_vb + head * s_vh
        rh_row = rh_ptr + bh * KH * N + rows
        if PATCH_W > 0:  # noqa: SIM108  (a constexpr branch)
            steps = tl.cdiv(KH, ROWS) * (KW // PATCH_W)
        else:
            steps = tl.cdiv(KH, ROWS)
        rh_next = tl.load(rh_row, mask=rmask, other=0.0)
        for step in tl.range(0, steps, num_stages=STAGES):
            if PATCH_W > 0:  # patches row-major: the KW // PATCH_W patches of ROWS key rows, then the next rows
                kr0 = (step // (KW // PATCH_W)) * ROWS
                c0 = (step % (KW // PATCH_W)) * PATCH_W
                keys = (kr0 + seg) * KW + c0 + kcol
                kmask = cmask & (kr0 + seg < KH)  # the last patch row may hold fewer than ROWS key rows
                rw_t = tl.load(
                    rw_ptr + (bh * N + rows[:, None]) * KW + c0 + csel[None, :],
                    mask=rmask[:, None] & (csel[None, :] < PATCH_W),
                    other=0.0,
                )
                if UPCAST:
                    rw_t = rw_t.to(tl.float32)
            else:
                kr0 = step * ROWS
                keys = kr0 * KW + cols
                kmask = cmask & (keys < N)  # the last step may hold fewer than ROWS key rows
            kt = tl.load(k_base + keys[:, None] * s_kn + d[None, :], mask=kmask[:, None], other=0.0)
            vt = tl.load(v_base + keys[:, None] * s_vn + d[None, :], mask=kmask[:, None], other=0.0)
            # rel_h [B·heads, KH, N] (key-row major): each key row's term for every query, contiguous
            if ROWS > 1 or PATCH_W > 0:
                in_step = (rsel < ROWS) & (kr0 + rsel < KH)
                rh_t = tl.load(
                    rh_row[:, None] + (kr0 + rsel[None, :]) * N, mask=rmask[:, None] & in_step[None, :], other=0.0
                )
                if UPCAST:
                    rh_t = rh_t.to(tl.float32)
                terms = tl.dot(rh_t, onehot_h, input_precision="ieee")
                terms = tl.dot(rw_t, onehot_w, acc=terms, input_precision="ieee")
            else:  # one key row: its column broadcast; with PREFETCH_RH loaded one step ahead (latency hidden)
                if PREFETCH_RH:
                    rh0 = rh_next.to(tl.float32)
                    rh_next = tl.load(rh_row + tl.minimum(kr0 + 1, KH - 1) * N, mask=rmask, other=0.0)  # last: reread
                else:
                    rh0 = tl.load(rh_row + kr0 * N, mask=rmask, other=0.0).to(tl.float32)
                bias = tl.broadcast_to(rh0[:, None], (BLOCK_M, BLOCK_N))
            pv_dt = vt.dtype
            if UPCAST:
                kt, vt = kt.to(tl.float32), vt.to(tl.float32)
            if BIAS_ACC:  # (with the one-hot products only: their terms come out in the product's layout)
                # the position terms are the score product's accumulator (its units: the logit / qk_scale), so the
                # tensor cores add them and the one per-score multiply is the exponent's fused multiply-add
                s = tl.dot(q, tl.trans(kt), acc=terms, input_precision=PRECISION)
                if not FULL:  # padding columns, key rows past the grid: -inf (FULL: a step has none)
                    s = tl.where(kmask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
                p = tl.exp2(s * qk_scale - m_new[:, None])
            elif ROW_SHIFT and ROWS == 1 and PATCH_W == 0:
                # one key row a step: its rel_h term is one number per query, a shift of the query's whole row of
                # scores, so it moves into the row's max (a [BLOCK_M] vector) instead of being added to every score
                s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * qk_scale + rw
                shift = rh0 * LOG2E
                m_new = tl.maximum(m_i, tl.max(s, axis=1) + shift)
                p = tl.exp2(s - (m_new - shift)[:, None])
            else:
                s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * qk_scale
                # a constexpr branch (ruff's ternary would not do): padding columns, key rows past the grid get -inf
                if ROWS > 1 or PATCH_W > 0:
                    s = tl.where(kmask[None, :], s + terms * LOG2E, float("-inf"))
                else:
                    s = s + rw + bias * LOG2E
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p_in = p.to(pv_dt)  # P in the input dtype for the P·V product, as flash kernels do
            if UPCAST:
                p_in = p_in.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p_in, vt, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        # out [B, N, heads, D]: the layout the block's output projection reads (no permute copy)
        dst = out_ptr + ((b * N + rows[:, None]) * HEADS + head) * D + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=rmask[:, None])

    @triton.jit
    def _rel_pos_tables_kernel(
        q_ptr,
        pos_ptr,
        out_ptr,
        s_qb,
        s_qh,
        s_qn,
        HEADS,
        H,
        W,
        D: tl.constexpr,
        SIDE: tl.constexpr,
        ROW_TABLE: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """Program (line i, batch·head) of one table.  ``ROW_TABLE``: ``rel_h`` of query row i, whose W queries all
        read the position rows ``i − kh + H − 1`` (kh < H: one contiguous window of ``pos``, reversed), so the
        line's [W, H] block is one product q[row i] × window ᵀ, stored key-row major ([B·heads, H, N]).  Else
        ``rel_w`` of query column i: its H queries (strided by W) × rows ``i − kw + W − 1``, stored [B·heads, N, W].
        ``pos`` [2·keys − 1, D] contiguous, resampled for the grid; each entry one D-term dot product in float32,
        rounded to the output dtype once."""
        i = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // HEADS
        head = bh % HEADS
        n_tok = H * W
        j = tl.arange(0, SIDE)  # the line's queries
        kk = tl.arange(0, SIDE)  # key rows (ROW_TABLE) or key columns
        d = tl.arange(0, D)
        if ROW_TABLE:
            lines, line_len, keys = H, W, H
            n = i * W + j
        else:
            lines, line_len, keys = W, H, W
            n = j * W + i
        jm = j < line_len
        km = kk < keys
        if i < lines:
            qt = tl.load(q_ptr + b * s_qb + head * s_qh + n[:, None] * s_qn + d[None, :], mask=jm[:, None], other=0.0)
            pt = tl.load(pos_ptr + (i - kk + keys - 1)[:, None] * D + d[None, :], mask=km[:, None], other=0.0)
            if UPCAST:  # Triton's interpreter computes bf16 tl.dot wrongly; float32 operands are exact
                qt, pt = qt.to(tl.float32), pt.to(tl.float32)
            vals = tl.dot(qt, tl.trans(pt), input_precision=PRECISION)  # [query j, key kk]
            if ROW_TABLE:
                dst = out_ptr + (bh * H + kk[None, :]) * n_tok + n[:, None]
            else:
                dst = out_ptr + (bh * n_tok + n[:, None]) * W + kk[None, :]
            tl.store(dst, vals.to(out_ptr.dtype.element_ty), mask=jm[:, None] & km[None, :])

    @triton.jit
    def _rel_pos_tables_gather_kernel(
        q_ptr,
        pos_h_ptr,
        pos_w_ptr,
        rh_ptr,
        rw_ptr,
        s_qb,
        s_qh,
        s_qn,
        HEADS,
        H,
        W,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
        KH_PAD: tl.constexpr,
        KW_PAD: tl.constexpr,
        PH_PAD: tl.constexpr,
        PW_PAD: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """Program (block of ``BLOCK`` consecutive queries, batch·head): both tables from one read of q.  The block
        against every row of both resampled position tables (two products, [BLOCK, 2H − 1] and [BLOCK, 2W − 1],
        padded to powers of two), then each query's own entries gathered in registers: query (qh, qw) and key row
        kh take column ``qh − kh + H − 1`` of the first, key column kw column ``qw − kw + W − 1`` of the second.
        Stored as :func:`tables_kernel` stores them: ``rel_h`` [B·heads, H, N] key-row major, ``rel_w`` [B·heads, N,
        W].  Each entry the same 64-term dot product in float32 as there, rounded to the output dtype once."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // HEADS
        head = bh % HEADS
        n_tok = H * W
        n = pid * BLOCK + tl.arange(0, BLOCK)
        nm = n < n_tok
        d = tl.arange(0, D)
        qt = tl.load(q_ptr + b * s_qb + head * s_qh + n[:, None] * s_qn + d[None, :], mask=nm[:, None], other=0.0)
        ph = tl.arange(0, PH_PAD)
        pt_h = tl.load(pos_h_ptr + ph[:, None] * D + d[None, :], mask=(ph < 2 * H - 1)[:, None], other=0.0)
        pw = tl.arange(0, PW_PAD)
        pt_w = tl.load(pos_w_ptr + pw[:, None] * D + d[None, :], mask=(pw < 2 * W - 1)[:, None], other=0.0)
        if UPCAST:  # Triton's interpreter computes bf16 tl.dot wrongly; float32 operands are exact
            qt, pt_h, pt_w = qt.to(tl.float32), pt_h.to(tl.float32), pt_w.to(tl.float32)
        qh = n // W
        qw = n - qh * W
        kh = tl.arange(0, KH_PAD)
        all_h = tl.dot(qt, tl.trans(pt_h), input_precision=PRECISION)  # [query, position row]
        # padding key rows (kh >= H) and queries past the grid point outside [0, 2H − 2]: clamped, never stored
        pick_h = tl.minimum(tl.maximum(qh[:, None] - kh[None, :] + H - 1, 0), PH_PAD - 1)
        vals_h = tl.gather(all_h, pick_h, 1)
        dst_h = rh_ptr + (bh * H + kh[None, :]).to(tl.int64) * n_tok + n[:, None]
        tl.store(dst_h, vals_h.to(rh_ptr.dtype.element_ty), mask=nm[:, None] & (kh < H)[None, :])
        kw = tl.arange(0, KW_PAD)
        all_w = tl.dot(qt, tl.trans(pt_w), input_precision=PRECISION)
        pick_w = tl.minimum(tl.maximum(qw[:, None] - kw[None, :] + W - 1, 0), PW_PAD - 1)
        vals_w = tl.gather(all_w, pick_w, 1)
        dst_w = rw_ptr + (bh * n_tok + n[:, None]).to(tl.int64) * W + kw[None, :]
        tl.store(dst_w, vals_w.to(rw_ptr.dtype.element_ty), mask=nm[:, None] & (kw < W)[None, :])


class Blocks(NamedTuple):
    """One launch setting of the kernel: queries per program, key columns per step (a power of two holding
    ``rows`` whole key rows, or with ``patch_w`` a patch of ``rows`` key rows × ``patch_w`` key columns), warps,
    k/v pipeline stages."""

    block_m: int
    block_n: int
    rows: int
    warps: int
    stages: int
    patch_w: int = 0

    @property
    def one_hot(self) -> bool:
        """Whether a step's position terms come from the one-hot products (several key rows or a patch a step);
        else a step is one whole key row, its ``rel_w`` tile loaded once and its ``rel_h`` one column."""
        return self.rows > 1 or self.patch_w > 0


def _pow2(n: int) -> int:
    return max(16, kernels._pow2(n))  # at least 16: tl.dot's minimum


def _check_blocks(block_m: int, block_n: int, grid_w: int, patch_w: int = 0) -> None:
    """Refuse a block size that is not a power of two >= 16, a ``block_n`` narrower than one key row (or one patch
    row), or a ``patch_w`` that does not divide the grid's width (plain comparisons only: also traced by Dynamo,
    where ``grid_w`` may be symbolic)."""
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size and (size < 16 or size & (size - 1)):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {size}")
    if patch_w:
        if patch_w < 0 or grid_w % patch_w:
            raise ValueError(f"patch_w={patch_w} must divide the {grid_w}-wide key grid (or be 0: whole key rows)")
        if block_n and block_n < patch_w:
            raise ValueError(f"block_n={block_n} cannot hold one {patch_w}-wide patch row")
    elif block_n and block_n < grid_w:
        raise ValueError(f"block_n={block_n} cannot hold one {grid_w}-wide key row; use at least {_pow2(grid_w)}")


# Launch settings by key-grid width that replace attention_blocks' GPU defaults, as (block_m, block_n, warps,
# stages) or (block_m, block_n, warps, stages, patch_w), 0 keeping a field's default; an explicit argument still
# wins.  H200, round 16 (bench_sam_attention.py --sweep, the kernel alone on one global block's 6 tiles; bench_fast.py,
# the whole fast vision of a Gundam page, one run):
# * 40 (v1's 640-px tiles): 8x8 patches of 64 keys, 64 queries, 4 warps: 0.219 ms (216 TFLOP/s) against one row per
#   step's 0.269 (176); whole vision 10.50 ms against 10.75, SAM alone 8.10 ms, image features as close to eager
#   (max |diff| 0.172 vs 0.188).  128 queries / 8 warps and 16x8 patches were slower (10.93-10.96 ms).
# * 48 (v2's 768-px tiles): 8x8 patches, 128 queries, 8 warps, 3 stages: 0.341 ms (287 TFLOP/s) against 0.437 (224);
#   the kernel alone only: v2's whole vision has not been timed with it.
# The 1024-px view's 64-wide rows have no padding, and the 14x14 windows' several-rows steps were slower (round 15).
# Round 22 (bench_sam_attention --forms, the kernel alone, graph-timed; the position terms in the accumulator,
# BIAS_IN_MMA): the 640-px tiles' patches at 3 k/v stages 0.190 ms (248 TFLOP/s) against 2 stages' 0.203 (round
# 21's form: 0.210 vs 0.219); 8 warps at 64 queries 0.340, 128 queries 0.219-0.279.  In the 1024-px view 8x8
# patches (0.180-0.225) stay slower than its one-row steps (0.167).  v2's 128 queries at 4 warps / 3 stages 0.333 vs
# its 0.340 (within 2 %: not changed, v2's whole vision not timed).
BY_GRID: dict[int, tuple[int, ...]] = {40: (64, 64, 4, 3, 8), 48: (128, 64, 8, 3, 8)}


def attention_blocks(
    n_queries: int,
    grid_w: int,
    interpreter: bool,
    *,
    block_m: int = 0,
    block_n: int = 0,
    warps: int = 0,
    stages: int = 0,
    patch_w: int = 0,
) -> Blocks:
    """The launch setting for ``n_queries`` queries over a ``grid_w``-wide key grid; a non-zero argument overrides
    its field (``rows`` follows from ``block_n``: as many whole key rows as fit, at most the grid's; with
    ``patch_w``, as many patch rows).  A :data:`BY_GRID` entry's patch width comes with its ``block_n``: a caller's
    own ``block_n`` without ``patch_w`` means whole key rows, and its ``stages`` too come only with its ``block_n``.

    Default ``block_n``: ``grid_w`` rounded up to a power of two (one key row per step).  GPU: 64 queries per
    program at 4 warps, k/v tiles double-buffered (2 stages).  H200 sweep (``bench_sam_attention.py --sweep``,
    round 11), ms of the kernel alone on one block's views at v1's 640-px tiles ×6 / the 1024-px view / v2's
    768-px tiles ×6 / v1's 14×14 windows of the tiles: this 0.307 / 0.209 / 0.478 / 0.106; round 10's 128 queries
    at 8 warps 0.427 / 0.287 / 0.695 / 0.126; several key rows per 128-wide step (3 / 2 / 2 rows) 0.531 / 0.238 /
    0.543 at best, and 0.143 for four window rows per 64-wide step: the per-row ``rel_h`` selects cost more than the
    padding saved.  Those selects are now one-hot products (module docstring), not yet re-timed.
    Interpreter: 16-query programs, no pipelining (programs run one by one with numpy).  On a GPU, :data:`BY_GRID`
    replaces the defaults for the grid widths it names.  Raises ``ValueError`` for a block size that is not a power
    of two >= 16 or a ``block_n`` narrower than one key row.
    """
    if not interpreter and grid_w in BY_GRID:
        by_m, by_n, by_w, by_s, *by_p = BY_GRID[grid_w]
        if not block_n:  # the entry's key step, its patch width and k/v stages with it (a block_n given means
            # whole rows, at the default's stages: the entry's three stages of a 256-wide k/v tile would need more
            # shared memory than a block has, round 22's GPU suite)
            block_n, patch_w, stages = by_n, patch_w or (by_p[0] if by_p else 0), stages or by_s
        block_m, warps = block_m or by_m, warps or by_w
    if patch_w == grid_w:
        patch_w = 0  # a patch as wide as the grid is a whole key row
    _check_blocks(block_m, block_n, grid_w, patch_w)
    block_n = block_n or _pow2(patch_w or grid_w)
    auto = Blocks(16, block_n, 0, 1, 1) if interpreter else Blocks(64, block_n, 0, 4, 2)
    rows = min(block_n // (patch_w or grid_w), max(1, n_queries // grid_w))  # never more rows than the grid has
    return Blocks(block_m or auto.block_m, block_n, rows, warps or auto.warps, stages or auto.stages, patch_w)


TABLES: str = "triton"
"""How :func:`rel_pos_tables` computes the two tables: ``"triton"`` (the default: :func:`tables_kernel`, one program
per query row (``rel_h``) or column (``rel_w``), whose queries share one contiguous window of position rows, so each
is one small product written straight into the attention kernel's layout: q read twice, the tables written once, no
copies; on grids up to :data:`GATHER_MAX_GRID` wide, the windows', :func:`tables_gather_kernel` instead),
``"gather"`` (:func:`tables_gather_kernel` on every grid: both tables in one launch from one read of q, each query's
entries gathered from its block's product with every position row), ``"einsum"`` (:func:`sam.rel_pos_terms`'s two
einsums, the reference's form, batched over query rows) or ``"gemm"`` (one product of the queries with both axes'
resampled tables, then each query's own rows picked out).  A module setting, so ``bench_fast`` times the forms in
one run.

H200, round 16 (``bench_sam_attention --sweep``, each form compiled alone, graph-timed): per global block, 640-px
tiles (6) triton 0.030 ms, einsum 0.041, gemm 0.082; the 1024-px view 0.009 / 0.026 / 0.049; per windowed block,
tiles 0.024 / 0.053 / 0.028, the view's windows 0.014 / 0.029 / 0.016.  Over a Gundam page's 4 global and 8
windowed blocks the kernel form saves ~0.46 ms of the einsums' kernel time.
H200, round 15 (bench_fast, whole fast vision): einsum 11.32 ms, gemm 11.70; SAM's kernel time 8.66 vs 8.99 ms.
Under ``torch.compile`` the einsums become 32 sm80 batched GEMMs of 13.4 us (0.43 ms a page) plus layout copies; the
gemm form did not become the one dense GEMM it was meant to be: ``q`` is a strided view of the QKV output, so
inductor kept it batched over (batch, head), with a 158-wide output (not a multiple of 8: no Hopper kernel) on the
same sm80 kernels plus three gathers."""
TABLE_FORMS = ("einsum", "gemm", "triton", "gather")


def rel_pos_tables(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The kernel's two position tables from the *unscaled* query ``q`` [B, heads, h·w, C]: :func:`sam.rel_pos_terms`
    laid out as ``rel_h`` [B·heads, h (key row), h·w] (key-row major) and ``rel_w`` [B·heads, h·w, w (key column)],
    both contiguous in ``q.dtype``.

    Query (qh, qw) and key row kh take row ``qh − kh + h − 1`` of the resampled ``rel_pos_h`` (likewise for columns),
    so with :data:`TABLES` ``"gemm"`` one product ``q`` × [``rel_pos_h``; ``rel_pos_w``]ᵀ ([B·heads·N, 2h−1 + 2w−1],
    every query against every table row) holds all of them, and a gather picks each query's ``h`` + ``w``: twice the
    multiply-adds of the two einsums (small: a 64-deep product), in one dense GEMM instead of two products batched
    over query rows.  Each entry is the same 64-term dot product in float32, rounded to ``q.dtype`` once; only the
    order of its terms may differ from the einsums'."""
    from llm_perf_opt.models.deepseek_ocr.sam import rel_pos_terms, resample_rel_pos

    if TABLES not in TABLE_FORMS:
        raise ValueError(f"sam_kernels.TABLES must be one of {TABLE_FORMS}, got {TABLES!r}")
    h, w = hw
    b, n_heads, n, _ = q.shape
    if TABLES == "einsum":
        rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, hw, hw)  # [B, heads, h, w, kh], [B, heads, h, w, kw]
        rel_h = rel_h.permute(0, 1, 4, 2, 3).reshape(b * n_heads, h, n)
        return rel_h.contiguous(), rel_w.reshape(b * n_heads, n, w).contiguous()
    if TABLES in ("triton", "gather"):
        pos_h = resample_rel_pos(rel_pos_h, 2 * h - 1).to(q.dtype).contiguous()
        pos_w = resample_rel_pos(rel_pos_w, 2 * w - 1).to(q.dtype).contiguous()
        gather = TABLES == "gather" or max(h, w) <= GATHER_MAX_GRID
        if q.device.type == "cuda":
            return _tables_op(q, pos_h, pos_w, h, w, gather)
        return (tables_gather_kernel if gather else tables_kernel)(q, pos_h, pos_w, h, w)
    table = torch.cat((resample_rel_pos(rel_pos_h, 2 * h - 1), resample_rel_pos(rel_pos_w, 2 * w - 1)))
    full = torch.matmul(q, table.to(q.dtype).t()).view(b * n_heads, h, w, table.shape[0])
    rows = torch.arange(h, device=q.device)
    cols = torch.arange(w, device=q.device)
    pick_h = (rows[:, None] - rows[None, :] + h - 1).view(1, h, 1, h).expand(b * n_heads, h, w, h)  # [., qh, ., kh]
    pick_w = (cols[:, None] - cols[None, :] + 2 * h + w - 2).view(1, 1, w, w).expand(b * n_heads, h, w, w)
    rel_h = torch.gather(full, 3, pick_h).permute(0, 3, 1, 2).reshape(b * n_heads, h, n)
    rel_w = torch.gather(full, 3, pick_w).reshape(b * n_heads, n, w)
    return rel_h.contiguous(), rel_w.contiguous()


def tables_kernel(q: Tensor, pos_h: Tensor, pos_w: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """:data:`TABLES` ``"triton"``: ``rel_h`` [B·heads, h, N] and ``rel_w`` [B·heads, N, w] in ``q.dtype`` from the
    unscaled ``q`` [B, heads, N, C] (head dimension contiguous) and the position tables already resampled for the
    grid, ``pos_h`` [2h − 1, C] and ``pos_w`` [2w − 1, C] (contiguous, ``q.dtype``); two launches."""
    rel_h, rel_w = _tables_out(q, pos_h, pos_w, h, w, "tables_kernel")
    b, n_heads, _, dim = q.shape
    interpreter = q.device.type != "cuda"
    side = max(16, _pow2(max(h, w)))  # tl.dot wants at least 16 along each side
    for row_table, lines, pos, out in ((True, h, pos_h, rel_h), (False, w, pos_w, rel_w)):
        _rel_pos_tables_kernel[(lines, b * n_heads)](
            q,
            pos,
            out,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            n_heads,
            h,
            w,
            D=dim,
            SIDE=side,
            ROW_TABLE=row_table,
            PRECISION="ieee" if interpreter or q.dtype == torch.float32 else "tf32",
            UPCAST=interpreter,
            num_warps=4,
        )
    return rel_h, rel_w


def _tables_out(q: Tensor, pos_h: Tensor, pos_w: Tensor, h: int, w: int, op: str) -> tuple[Tensor, Tensor]:
    """The two tables' outputs, empty, after the checks both table kernels share (the device, the shapes)."""
    why = unavailable_reason(q.device)
    if why:
        raise KernelUnavailableError(f"sam_kernels.{op} cannot run on {q.device}: {why}")
    b, n_heads, n, dim = q.shape
    if n != h * w or q.stride(-1) != 1:
        raise ValueError(f"q must be [B, heads, {h}·{w}, C] with a contiguous head dimension, got {tuple(q.shape)}")
    for pos, size in ((pos_h, h), (pos_w, w)):
        if pos.shape != (2 * size - 1, dim) or not pos.is_contiguous() or pos.dtype != q.dtype:
            raise ValueError(
                f"position table [{2 * size - 1}, {dim}] contiguous in {q.dtype} expected, got {tuple(pos.shape)}"
            )
    rel_h = torch.empty((b * n_heads, h, n), device=q.device, dtype=q.dtype)
    rel_w = torch.empty((b * n_heads, n, w), device=q.device, dtype=q.dtype)
    return rel_h, rel_w


# Queries per program and warps of :func:`tables_gather_kernel` on a GPU (the interpreter: 16 queries).  H200,
# round 20 (``bench_sam_attention.py --tables``, compiled, graph-timed, q the block's strided view): 64 / 4 is within
# 0.001 ms of the best of six settings on every grid (16 / 1 to 128 / 8).
GATHER_BLOCK = (64, 4)
# The :data:`TABLES` ``"triton"`` form runs :func:`tables_gather_kernel` on grids at most this wide and
# :func:`tables_kernel` (a program per query line) on wider ones; 0: the line kernel everywhere (round 19).  H200,
# round 20 (``bench_sam_attention.py --tables``, both tables alone): the 14x14 windows (a program per window-head
# instead of 14 tiny ones per table) 0.052 -> 0.047 ms for the tiles' 54 windows, 0.042 -> 0.039 for the 1024-px
# view's 25; the global grids slower by the gather of a 128-wide product (40-wide tiles 0.032 -> 0.062 ms, 64-wide
# view 0.009 -> 0.023).
GATHER_MAX_GRID = 16


def tables_gather_kernel(
    q: Tensor, pos_h: Tensor, pos_w: Tensor, h: int, w: int, block: int = 0, warps: int = 0
) -> tuple[Tensor, Tensor]:
    """:data:`TABLES` ``"gather"``: :func:`tables_kernel`'s two tables in one launch that reads ``q`` once, a
    program per ``block`` consecutive queries (a power of two >= 16; default :data:`GATHER_BLOCK`) of one
    (batch, head): the block against every row of both position tables, each query's entries gathered in
    registers."""
    rel_h, rel_w = _tables_out(q, pos_h, pos_w, h, w, "tables_gather_kernel")
    b, n_heads, n, dim = q.shape
    interpreter = q.device.type != "cuda"
    block = block or (16 if interpreter else GATHER_BLOCK[0])
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16 (tl.dot), got {block}")
    _rel_pos_tables_gather_kernel[(triton.cdiv(n, block), b * n_heads)](
        q,
        pos_h,
        pos_w,
        rel_h,
        rel_w,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        n_heads,
        h,
        w,
        D=dim,
        BLOCK=block,
        KH_PAD=_pow2(h),
        KW_PAD=_pow2(w),
        PH_PAD=_pow2(2 * h - 1),
        PW_PAD=_pow2(2 * w - 1),
        PRECISION="ieee" if interpreter or q.dtype == torch.float32 else "tf32",
        UPCAST=interpreter,
        num_warps=warps or (1 if interpreter else GATHER_BLOCK[1]),
    )
    return rel_h, rel_w


def _check(q: Tensor, k: Tensor, v: Tensor, hw: tuple[int, int]) -> None:
    h, w = hw
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be [B, heads, N, C] of one shape, got {q.shape}, {k.shape}, {v.shape}")
    n, dim = q.shape[2], q.shape[3]
    if n != h * w:
        raise ValueError(f"{n} tokens do not fill the {h}x{w} grid")
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"head size must be a power of two >= 16 (tl.dot), got {dim}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k, v must be contiguous along the head dimension")


def attention_kernel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_h: Tensor,
    rel_w: Tensor,
    h: int,
    w: int,
    block_m: int,
    block_n: int,
    warps: int,
    stages: int,
    prefetch: bool = True,
    patch_w: int = 0,
) -> Tensor:
    """The kernel alone on the tables of :func:`rel_pos_tables` (no input checks): [B, N, heads, C] (contiguous)
    in ``q.dtype``.  ``block_m`` / ``block_n`` / ``warps`` / ``stages`` / ``patch_w`` override
    :func:`attention_blocks` where non-zero (``bench_sam_attention.py --sweep`` times this)."""
    b, n_heads, n, dim = q.shape
    interpreter = q.device.type != "cuda"
    blocks = attention_blocks(
        n, w, interpreter, block_m=block_m, block_n=block_n, warps=warps, stages=stages, patch_w=patch_w
    )
    out = torch.empty((b, n, n_heads, dim), device=q.device, dtype=q.dtype)
    _rel_pos_attention_kernel[(triton.cdiv(n, blocks.block_m), b * n_heads)](
        q,
        k,
        v,
        rel_h,
        rel_w,
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
        n,
        n_heads,
        h,
        w,
        dim**-0.5 * _LOG2E,
        D=dim,
        BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n,
        ROWS=blocks.rows,
        ROW_PAD=_pow2(blocks.rows),
        COL_PAD=_pow2(blocks.patch_w or w),
        STAGES=blocks.stages,
        PRECISION="ieee" if interpreter or q.dtype == torch.float32 else "tf32",
        UPCAST=interpreter,
        PREFETCH_RH=prefetch,
        PATCH_W=blocks.patch_w,
        **_term_forms(dim, h, w, blocks),
        num_warps=blocks.warps,
    )
    return out


BIAS_IN_MMA: bool = True
"""Whether, in the steps whose position terms are one-hot products (key patches, several key rows a step), those
terms are the score product's accumulator (``tl.dot(q, kᵀ, acc=terms)``), in the product's units (the one-hot
entries are log2 e / ``qk_scale`` = √64 = 8, a power of two: exact), so the tensor cores add them and the exponent's
one fused multiply-add applies the scale; else (round 21) each score is scaled and the terms scaled and added after
the product, and every step selects its padding columns even where it has none.  sm_90 PTX of the 640-px tiles' 8x8
patches: per thread and step, 34 multiplies and no selects instead of 64 and 32 (the same 34 exp2, 34 fused
multiply-adds), 167 registers instead of 179.  At head size 64 the softmax's per-score float32 and exp2 work is
about as slow as the MMA (4·64 multiply-adds per score), so those operations are much of the kernel's time.  One key
row a step keeps its form: there the terms are a loaded tile and a column, and as the accumulator they cost a
64×64 float32 layout conversion a step (sm_90 TTGIR), more than the two per-score operations they would save.  Only
where √(head size) is a power of two (16, 64, 256).  A module setting, read at each launch (a captured graph keeps
the form it was captured with), so ``bench_fast`` times both in one run."""


ROW_TERM_IN_MAX: bool = True
"""Staged in round 22, on since round 24: in the steps of one whole key row (the 1024-px view's global
blocks and the 14x14 windows), that row's ``rel_h`` term is one number per query, so it shifts the query's whole row
of the step's scores; with this on it joins the row's running max (one add per query) instead of every score (one
add per score), and the exponent subtracts the shifted max.  sm_90 PTX of the view's 64x64 step, per thread: 38
fused multiply-adds instead of 66, the rest the same (34 exp2, 32 multiplies of the accumulator's rescale).  Sums
in another order than the default's: equal to float32 rounding, checked against float64 on the CPU.
``bench_sam_attention --forms`` pairs it with the default on the one-row settings; ``bench_fast``'s settings part
flips it on the whole vision.  H200, round 24 (the kernel alone, paired, six rounds, all six faster): the view's
global blocks 0.1692 -> 0.1649 ms, the 640-px tiles' 14x14 windows 0.0677 -> 0.0650, the view's 0.0315 -> 0.0301
(outputs within 0.002 of the other form: bf16 rounding)."""

# Key-grid widths whose launch keeps round 21's form under BIAS_IN_MMA.  H200, round 22 (bench_sam_attention --forms,
# the kernel alone, paired over six rounds, all six agreeing): v2's 768-px tiles (48) at their BY_GRID setting (128
# queries, 8 warps, 3 stages, 8x8 patches) 0.338 -> 0.359 ms with the terms in the accumulator, where v1's 640-px
# tiles' 64-query 8x8 patches went 0.218 -> 0.202.
BIAS_AFTER_GRIDS: frozenset[int] = frozenset({48})


def _term_forms(dim: int, h: int, w: int, blocks: Blocks) -> dict[str, object]:
    """The kernel's position-term arguments for head size ``dim`` on an ``h``×``w`` key grid in ``blocks``' steps.
    One-hot steps: the :data:`BIAS_IN_MMA` form (not on :data:`BIAS_AFTER_GRIDS`), the terms' scale (√dim, exact
    only as a power of two) and whether every key step is full (no padding column, no key row past the grid: no
    select).  One-row steps: the :data:`ROW_TERM_IN_MAX` form."""
    row_shift = ROW_TERM_IN_MAX and not blocks.one_hot
    root = math.isqrt(dim)
    if not BIAS_IN_MMA or not blocks.one_hot or w in BIAS_AFTER_GRIDS or root * root != dim or root & (root - 1):
        return dict(BIAS_ACC=False, FULL=False, BIAS_SCALE=1.0, ROW_SHIFT=row_shift)
    full = blocks.rows * (blocks.patch_w or w) == blocks.block_n and h % blocks.rows == 0
    return dict(BIAS_ACC=True, FULL=full, BIAS_SCALE=float(root), ROW_SHIFT=row_shift)


if HAVE_TRITON and not INTERPRETED:

    @torch.library.custom_op("llm_perf_opt::sam_rel_pos_attention", mutates_args=())
    def _attention_op(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rel_h: Tensor,
        rel_w: Tensor,
        h: int,
        w: int,
        block_m: int,
        block_n: int,
        warps: int,
        stages: int,
        prefetch: bool,
        patch_w: int,
    ) -> Tensor:
        return attention_kernel(q, k, v, rel_h, rel_w, h, w, block_m, block_n, warps, stages, prefetch, patch_w)

    @_attention_op.register_fake
    def _(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rel_h: Tensor,
        rel_w: Tensor,
        h: int,
        w: int,
        block_m: int,
        block_n: int,
        warps: int,
        stages: int,
        prefetch: bool,
        patch_w: int,
    ) -> Tensor:
        b, n_heads, n, dim = q.shape
        return q.new_empty((b, n, n_heads, dim))

    @torch.library.custom_op("llm_perf_opt::sam_rel_pos_tables", mutates_args=())
    def _tables_op(q: Tensor, pos_h: Tensor, pos_w: Tensor, h: int, w: int, gather: bool) -> tuple[Tensor, Tensor]:
        return (tables_gather_kernel if gather else tables_kernel)(q, pos_h, pos_w, h, w)

    @_tables_op.register_fake
    def _(q: Tensor, pos_h: Tensor, pos_w: Tensor, h: int, w: int, gather: bool) -> tuple[Tensor, Tensor]:
        b, n_heads, n, _ = q.shape
        return q.new_empty((b * n_heads, h, n)), q.new_empty((b * n_heads, n, w))


def rel_pos_triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
    hw: tuple[int, int],
    *,
    block_m: int = 0,
    block_n: int = 0,
    num_warps: int = 0,
    stages: int = 0,
    prefetch_rh: bool = True,
    patch_w: int = 0,
) -> Tensor:
    """SAM attention with decomposed relative positions, head size kept: [B, heads, N, C] like SDPA's output.

    Same arguments and logits as :func:`sam.rel_pos_attention` (``q``, ``k``, ``v`` [B, heads, h·w, C], strided
    views allowed as long as the head dimension is contiguous; the checkpoint's ``rel_pos_h`` / ``rel_pos_w``
    tables, resampled for the grid ``hw``).  The result is a [B, heads, N, C] view of a [B, N, heads, C] tensor,
    so the caller's ``permute(0, 2, 1, 3).reshape`` to tokens costs no copy.  ``block_m`` (queries per program),
    ``block_n`` (key columns per step: as many whole key rows as fit), ``num_warps`` and ``stages`` (k/v
    pipelining) override :func:`attention_blocks` where non-zero;
    ``prefetch_rh=False`` loads each key row's ``rel_h`` column in its own step instead of one step ahead;
    ``patch_w`` (dividing the grid's width): each step is a patch of key rows × ``patch_w`` key columns instead of
    whole key rows (a 40-wide grid in 8×8 patches of 64 keys, no padding columns).
    """
    why = unavailable_reason(q.device)
    if why:
        raise KernelUnavailableError(f"sam_kernels.rel_pos_triton_attention cannot run on {q.device}: {why}")
    _check(q, k, v, hw)
    h, w = hw
    _check_blocks(block_m, block_n, w, patch_w)  # bad block sizes fail before any work
    rel_h, rel_w = rel_pos_tables(q, rel_pos_h, rel_pos_w, hw)
    args = (q, k, v, rel_h, rel_w, h, w, block_m, block_n, num_warps, stages, prefetch_rh, patch_w)
    out = _attention_op(*args) if q.device.type == "cuda" else attention_kernel(*args)
    return out.permute(0, 2, 1, 3)
