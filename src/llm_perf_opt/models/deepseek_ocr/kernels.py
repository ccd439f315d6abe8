"""Fused Triton kernels for one decode step (1..8 tokens) of DeepSeek-OCR's language model.

The torch decode step launches ~58 kernels per layer (norm casts, rotary, KV write, masked attention,
router GEMV + softmax + topk, sort-based grouped experts, weighted sum, residual adds).  These five ops
cover the same layer in ~9 launches (plus the QKV and o_proj GEMMs, which stay cuBLAS):

======================  =======  ==========================================================================
op                      kernels  replaces
======================  =======  ==========================================================================
:func:`add_rms_norm`    1        residual add + ``RMSNorm`` (float32 norm, cast, weight multiply)
:func:`rope_kv_write`   1        rotary on q and k, ``index_copy_`` of k and v into the cache
:func:`decode_attention` 2 (1)   masked matmul attention over ``max_len`` (split-K partials + combine; with
                                 ``counters`` the last split of a row-head combines: one launch)
:func:`linear_rows`     1        a decode projection (QKV, o_proj) for a few rows, instead of cuBLAS
:func:`moe_route`       1        float32 router GEMV, softmax, greedy top-k, routing counts
:func:`moe_experts`     2        sort/grouped-GEMM experts, SiLU gate, weighted sum, shared experts, residual
======================  =======  ==========================================================================

Beyond the decode step: :func:`moe_route_rows` routes many rows at once (a prompt's MoE layers: float32 logits
with ``tl.dot`` on the tensor cores, bf16 operands whose products are exact in float32, then every row's top-k),
:func:`moe_experts_grouped` runs the batched step's experts from 9 rows on.

Every op has a pure-torch ``<name>_ref`` with the same signature and the same rounding points as the
torch path it replaces; the tests hold the kernels to it.  All ops are CUDA-graph capturable: positions
are read on the device, scratch sizes depend only on host ints, nothing syncs with the host.

Triton is optional.  On CUDA the kernels run compiled; on CPU tensors they run only under Triton's
interpreter, which Triton picks when ``@triton.jit`` is applied: ``TRITON_INTERPRET=1`` must be in the
environment before ``triton`` itself is first imported (its own library functions, ``tl.sum`` & co., are
decorated then) and before this module is.  :func:`triton_available` says whether the kernels can run on
a device; the public ops raise :class:`KernelUnavailableError` naming what is missing otherwise.

Design notes (target: H100/H200 with Triton >= 3.2; only masked loads/stores, reductions, ``tl.where``,
``tl.exp``/``tl.exp2``/``tl.rsqrt``, bitcasts, ``tl.atomic_add``, ``tl.static_range``, constexpr blocks):

* decode is memory-bound (M <= 8 rows), so every matrix-vector product is a broadcast multiply +
  ``tl.sum`` over [rows, BLOCK_K] tiles loaded contiguously along the reduction dim (16-byte loads once
  the launcher has specialised the pointers and H / I as multiples of 16); no ``tl.dot``, whose M >= 16
  tiles would mostly multiply padding (the many-row kernels use it);
* block sizes are picked on the host (:func:`moe_block_sizes`, :func:`attention_splits`) so that a grid
  has >= ~2 programs per SM at T = 1 with ~4096-element tiles (no register spills on sm_90), and no attention
  program streams more than :data:`KEYS_PER_SPLIT` keys (the continuous step's long rows); keyword
  arguments of :func:`moe_experts` / :func:`decode_attention` override them
  (``benchmarks/bench_kernels.py --sweep`` times variants, ``--sm90-check`` compiles without a GPU);
* rounding: every place where the torch path materialises a bf16 tensor, the kernel rounds its float32
  value to bf16 too (:func:`_round`), so results match the torch path to the last bit wherever the
  float32 arithmetic is the same (residual adds, rotary, cache writes) and to bf16 rounding elsewhere
  (reductions summed in another order);
* launches: inside :func:`dependent_launches` (``infer.fast.pdl``) every kernel is launched as a
  programmatic dependent launch (Hopper's PDL, CUDA graphs keep it): its programs may be scheduled while the
  kernel before it in the stream still runs, and each first waits (``griddepcontrol.wait``) until that kernel
  has finished and its writes are visible, then lets the next kernel be scheduled.  Before the wait a kernel
  loads only what no kernel of the step writes (the GEMVs' weight tiles, the router's rows) or asks L2 for
  lines without reading them (the decode attention's K / V rows, ``ATTN_PREFETCH``), so results are
  bit-identical; what the overlap saves is launch and scheduling latency between the step's ~100 small Triton
  launches, and the weights' first memory round trip.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from llm_perf_opt.models.deepseek_ocr.experts import (
    combine_picks,
    grouped_experts_stacked,
    route_tokens,
    silu_gate_up,
)
from llm_perf_opt.models.deepseek_ocr.generation import unban_exempt

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # CPU-only installs without triton: the *_ref ops still work, the kernels raise
    HAVE_TRITON = False
    _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    HAVE_TRITON = True
    _TRITON_IMPORT_ERROR = ""

__all__ = [
    "DOWN_FORM",
    "DOWN_FORMS",
    "DOWN_SPLIT_STAGES",
    "GROUPED_MIN_ROWS",
    "HAVE_TRITON",
    "INTERPRETED",
    "KEYS_PER_SPLIT",
    "NGRAM_BLOCK_S",
    "NGRAM_BLOCK_V",
    "KernelUnavailableError",
    "add_rms_norm",
    "add_rms_norm_f32",
    "add_rms_norm_ref",
    "add_rms_norm_route",
    "add_rms_norm_route_ref",
    "attention_counters",
    "attention_splits",
    "decode_attention",
    "decode_attention_ref",
    "dependent_launches",
    "down_counter_count",
    "down_counters",
    "exact_bf16",
    "feed_back",
    "linear_block_sizes",
    "linear_rows",
    "linear_rows_ref",
    "moe_block_sizes",
    "moe_down_split_block_sizes",
    "moe_experts",
    "moe_experts_grouped",
    "moe_experts_ref",
    "moe_gather_combine",
    "moe_gather_combine_ref",
    "moe_grouped_block_sizes",
    "moe_route",
    "moe_route_ref",
    "moe_route_rows",
    "ngram_ban",
    "pick_token",
    "pick_token_ref",
    "prompt_rope_kv_write",
    "prompt_rope_kv_write_ref",
    "qkv_rope",
    "rope_kv_write",
    "rope_kv_write_ref",
    "route_flags",
    "route_rows_block_sizes",
    "silu_mul",
    "silu_mul_ref",
    "stack_always_on",
    "triton_available",
    "unavailable_reason",
]

# Weights per GEMV tile (per operand): 32 per thread at 4 warps, a few 16-byte loads in flight, no spills.
TILE_ELEMS = 4096
# The interpreter runs one program and one loop step at a time with numpy: few large tiles are fastest.
INTERPRETER_TILE_ELEMS = 1 << 16

# Whether the kernels below were decorated for Triton's interpreter (decided once, at import).
INTERPRETED: bool = HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"


class KernelUnavailableError(RuntimeError):
    """A Triton kernel was called where it cannot run (no Triton, or CPU tensors without the interpreter)."""


def unavailable_reason(device: torch.device | str, interpreted: bool | None = None, module: str = __name__) -> str:
    """'' when Triton kernels can run on ``device``, else why not.

    CUDA: Triton imported and the kernels were compiled-mode (not built for the interpreter).  CPU: the kernels
    were built for the interpreter (``TRITON_INTERPRET=1`` at import) and the variable is still set.
    ``interpreted`` / ``module``: how and where the kernels were decorated (default: this module's; another kernel
    module, e.g. ``sam_kernels``, passes its own).
    """
    dev = torch.device(device)
    interpreted = INTERPRETED if interpreted is None else interpreted
    if not HAVE_TRITON:
        return f"Triton is not importable ({_TRITON_IMPORT_ERROR}); install it (pip install triton)"
    if dev.type == "cuda":
        if not interpreted:
            return ""
        return "the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at import); unset it"
    if dev.type == "cpu":
        if interpreted and os.environ.get("TRITON_INTERPRET", "0") == "1":
            return ""
        return (
            f"CPU tensors run only under Triton's interpreter: set TRITON_INTERPRET=1 before {module} is first imported"
        )
    return f"device type {dev.type!r} is not supported"


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton ops can run on ``device`` (:func:`unavailable_reason` is empty)."""
    return not unavailable_reason(device)


def _require(op: str, device: torch.device, interpreted: bool | None = None, module: str = __name__) -> None:
    """Raise :class:`KernelUnavailableError` naming ``op`` and why, unless Triton kernels can run on ``device``
    (``interpreted`` / ``module``: another kernel module's, as for :func:`unavailable_reason`)."""
    why = unavailable_reason(device, interpreted, module)
    if why:
        name = module.rsplit(".", 1)[-1]
        raise KernelUnavailableError(f"{name}.{op} cannot run on {device}: {why} (or call {op}_ref)")


@functools.cache
def _sm_count(device: torch.device) -> int:
    """SMs to fill; 1 for the interpreter, which runs programs one after another (fewest is fastest)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 1


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _pow2_floor(n: int) -> int:
    return 1 << max(0, math.floor(math.log2(max(1, n))))


def _contig(t: Tensor, name: str) -> Tensor:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    return t


# Whether kernels launched now are programmatic dependent launches (:func:`dependent_launches`).
_DEPENDENT_LAUNCH: contextvars.ContextVar[bool] = contextvars.ContextVar("dependent_launch", default=False)


@contextlib.contextmanager
def dependent_launches(enabled: bool = True) -> Iterator[None]:
    """Launch every kernel of this module as a programmatic dependent launch (PDL, sm_90+) inside the block.

    Each kernel then waits on the device for the previous kernel in the stream (and its writes) before its
    first load, so results do not change; a CUDA graph captured inside the block keeps the dependent edges, so
    capturing is what matters, not replaying.  Under Triton's interpreter (no device) the flag does nothing.
    """
    token = _DEPENDENT_LAUNCH.set(enabled)
    try:
        yield
    finally:
        _DEPENDENT_LAUNCH.reset(token)


def _pdl() -> dict[str, bool]:
    """Launch options for one kernel: a dependent launch (and its wait compiled in) inside
    :func:`dependent_launches` on a device; nothing otherwise (the interpreter has no grid dependencies)."""
    if _DEPENDENT_LAUNCH.get() and not INTERPRETED:
        return {"USE_GDC": True, "launch_pdl": True}
    return {}


# ======================================================================================== kernels
if HAVE_TRITON:
    # splits whose partials one combine step loads at once (then sums in order): 19 splits at batch 1 are two steps
    COMBINE_CHUNK = tl.constexpr(16)

    @triton.jit
    def _dependent_launch():
        """First thing in a kernel launched as a dependent launch: wait until the kernel before it has finished
        and its writes are visible, then let the next kernel's programs be scheduled (they wait in turn)."""
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _prefetch_l2(ptr, n_elems, LANES: tl.constexpr):
        """Ask L2 for ``n_elems`` elements from ``ptr`` (``prefetch.global.L2``, one 128-byte line per lane and
        round; ``LANES`` = the program's threads, so each thread issues one): nothing is loaded into registers or
        waited for, and no value changes.  Compiled code only: the interpreter has no inline assembly."""
        per_line: tl.constexpr = 128 // (ptr.dtype.element_ty.primitive_bitwidth // 8)
        for l0 in range(0, tl.cdiv(n_elems, per_line), LANES):
            first = (l0 + tl.arange(0, LANES)) * per_line
            wanted = (first < n_elems).to(tl.int32)
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                "=r,l,r",
                [ptr + first, wanted],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )

    @triton.jit
    def _round(x, dt: tl.constexpr):
        """float32 ``x`` rounded to ``dt`` (round to nearest, ties to even), returned as float32.

        bf16 by integer ops on the float32 bits: the same value as the GPU's ``cvt.rn.bf16.f32`` (what
        ``.to(tl.bfloat16)`` compiles to), and also exact under Triton's interpreter, whose fp32->bf16 cast
        truncates; so the CPU tests check the rounding points bit for bit.  NaN payloads are not preserved.
        """
        if dt == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            return bits.to(tl.float32, bitcast=True)
        elif dt == tl.float32:
            return x
        else:
            return x.to(dt).to(tl.float32)

    @triton.jit
    def _row_block(row_ptr, kk, nmask, K, EVEN_K: tl.constexpr):
        """The ``kk`` block of one activation row (float32, zeros past ``K``) and the mask of the [rows, kk]
        weight tile it multiplies (``nmask``: which weight rows exist), for the GEMV kernels' K loops."""
        if EVEN_K:
            xv = tl.load(row_ptr + kk).to(tl.float32)
            tile_mask = nmask[:, None]
        else:
            kmask = kk < K
            xv = tl.load(row_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
            tile_mask = nmask[:, None] & kmask[None, :]
        return xv, tile_mask

    @triton.jit
    def _add_rms(
        x_row_ptr, res_row_ptr, cols, mask, H, eps, HAS_RESIDUAL: tl.constexpr, dt: tl.constexpr, CG: tl.constexpr
    ):
        """One row's ``x + residual`` (float32, rounded to ``dt`` as torch's sum is; ``x`` alone without a residual)
        and the reciprocal of its RMS: the add + RMSNorm math every norm-carrying kernel shares, so they reduce the
        row in the same way.  ``CG``: ``x`` is read past L1 (other programs of the same kernel wrote it)."""
        if CG:
            s = tl.load(x_row_ptr + cols, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        else:
            s = tl.load(x_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            s = _round(s + tl.load(res_row_ptr + cols, mask=mask, other=0.0).to(tl.float32), dt)
        return s, tl.rsqrt(tl.sum(s * s, axis=0) / H + eps)

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        normed_ptr,
        summed_ptr,
        f32_ptr,
        H,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_H: tl.constexpr,
        HAS_F32: tl.constexpr = False,
        USE_GDC: tl.constexpr = False,
    ):
        if USE_GDC:
            _dependent_launch()
        row = tl.program_id(0) * H
        _norm_row(
            x_ptr + row, res_ptr + row, w_ptr, normed_ptr + row, summed_ptr + row, f32_ptr + row, H, eps,
            HAS_RESIDUAL, BLOCK_H, HAS_F32, False,
        )  # fmt: skip

    @triton.jit
    def _norm_row(
        x_row,
        res_row,
        w_ptr,
        normed_row,
        summed_row,
        f32_row,
        H,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_H: tl.constexpr,
        HAS_F32: tl.constexpr,
        CG: tl.constexpr,
    ):
        """One row's residual add + RMSNorm (:func:`add_rms_norm`'s math and rounding points), stored: the sum (with
        a residual), the normed row and, with ``HAS_F32``, its float32 copy.  ``CG``: :func:`_add_rms`'s."""
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        dt = x_row.dtype.element_ty
        # hidden + residual is rounded to the activation dtype before the norm reads it
        s, rstd = _add_rms(x_row, res_row, cols, mask, H, eps, HAS_RESIDUAL, dt, CG)
        if HAS_RESIDUAL:
            tl.store(summed_row + cols, s.to(dt), mask=mask)
        normed = _round(s * rstd, dt)  # F.rms_norm in float32, then .to(x.dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        out_dt = normed_row.dtype.element_ty
        out = _round(w * normed, out_dt)
        tl.store(normed_row + cols, out.to(out_dt), mask=mask)
        if HAS_F32:  # the same rounded values in float32: what ``normed.float()`` would give the router
            tl.store(f32_row + cols, out, mask=mask)

    @triton.jit
    def _rotate(x, rolled_ptrs, mask, c, sn, dt: tl.constexpr):
        """RoPE of float32 ``x`` as torch's ``x * cos + x.roll(D/2) * signed_sin`` rounds it: both products and then
        their sum rounded to ``dt``; ``rolled_ptrs`` address ``roll(x, D/2)[i] = x[(i + D/2) mod D]`` (the sign of
        rotate_half is folded into the sin table).  Float32 result (rounded values)."""
        xr = tl.load(rolled_ptrs, mask=mask, other=0.0).to(tl.float32)
        return _round(_round(x * c, dt) + _round(xr * sn, dt), dt)

    @triton.jit
    def _prompt_rope_kv_kernel(
        qkv_ptr,
        cos_ptr,
        sin_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        L,
        start,
        max_len,
        s_cb,
        HQ: tl.constexpr,
        HK: tl.constexpr,
        D: tl.constexpr,
        BLOCK_H: tl.constexpr,
        USE_GDC: tl.constexpr = False,
    ):
        if USE_GDC:
            _dependent_launch()
        row = tl.program_id(0)  # one prompt token (batch row b, position l) and all its q, k and v heads
        b = row // L
        pos = row % L
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, D)
        n_heads: tl.constexpr = HQ + 2 * HK
        mask = (h < n_heads)[:, None] & (d < D)[None, :]
        src = qkv_ptr + row * n_heads * D
        x = tl.load(src + h[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + b * s_cb + pos * D + d).to(tl.float32)
        sn = tl.load(sin_ptr + b * s_cb + pos * D + d).to(tl.float32)
        dt = q_ptr.dtype.element_ty
        rolled = src + h[:, None] * D + ((d + D // 2) % D)[None, :]
        rot = _rotate(x, rolled, mask, c[None, :], sn[None, :], dt).to(dt)
        is_q = (h < HQ)[:, None]
        is_k = ((h >= HQ) & (h < HQ + HK))[:, None]
        is_v = ((h >= HQ + HK) & (h < n_heads))[:, None]
        tl.store(q_ptr + (row * HQ + h[:, None]) * D + d[None, :], rot, mask=mask & is_q)
        # this layer's cache [B, HK, max_len, D]: head hk's column start + pos (int64: B·HK·max_len·D passes 2**31
        # elements at 64 rows and ~26k columns)
        k_rows = (b.to(tl.int64) * HK + (h - HQ)) * max_len + start + pos
        tl.store(k_ptr + k_rows[:, None] * D + d[None, :], rot.to(k_ptr.dtype.element_ty), mask=mask & is_k)
        v_rows = (b.to(tl.int64) * HK + (h - HQ - HK)) * max_len + start + pos
        tl.store(v_ptr + v_rows[:, None] * D + d[None, :], x.to(v_ptr.dtype.element_ty), mask=mask & is_v)

    @triton.jit
    def _rope_kv_write_kernel(
        qkv_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        max_len,
        HQ: tl.constexpr,
        HK: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ROW_TABLES: tl.constexpr = False,
        POS_STRIDE: tl.constexpr = 0,
        USE_GDC: tl.constexpr = False,
    ):
        if USE_GDC:
            _dependent_launch()
        b = tl.program_id(0)
        h = tl.program_id(1)  # 0..HQ-1: q heads, HQ..HQ+HK-1: k heads, then v heads
        pos = tl.load(pos_ptr + b * POS_STRIDE)  # one column for every row (stride 0), or row b's own
        trow = b if ROW_TABLES else pos  # cos/sin row: this batch row's own position, or the shared one
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        dt = q_ptr.dtype.element_ty
        src = qkv_ptr + (b * (HQ + 2 * HK) + h) * D
        x = tl.load(src + d, mask=dmask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + trow * D + d, mask=dmask, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + trow * D + d, mask=dmask, other=0.0).to(tl.float32)
        rot = _rotate(x, src + (d + D // 2) % D, dmask, c, sn, dt).to(dt)
        hv = d * 0 + h  # the head index as a vector: masks stay [BLOCK_D] (the interpreter rejects scalar & vector)
        is_q = hv < HQ
        is_k = (hv >= HQ) & (hv < HQ + HK)
        is_v = hv >= HQ + HK
        tl.store(q_ptr + (b * HQ + h) * D + d, rot, mask=dmask & is_q)
        kv_row = (b.to(tl.int64) * HK + (h - HQ)) * max_len + pos  # int64: see _prompt_rope_kv_kernel
        tl.store(k_ptr + kv_row * D + d, rot, mask=dmask & is_k)
        v_row = (b.to(tl.int64) * HK + (h - HQ - HK)) * max_len + pos
        tl.store(v_ptr + v_row * D + d, x.to(v_ptr.dtype.element_ty), mask=dmask & is_v)

    @triton.jit
    def _attn_partial_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        pos_ptr,
        m_ptr,
        l_ptr,
        acc_ptr,
        qk_scale,
        max_len,
        HQ: tl.constexpr,
        HK: tl.constexpr,
        D: tl.constexpr,
        N_SPLITS,  # a runtime int: the continuous step's split count follows its key bucket, one compile for all
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        mask_ptr=None,
        mask_stride=0,
        HAS_MASK: tl.constexpr = False,
        POS_STRIDE: tl.constexpr = 0,
        key_limit=0,
        out_ptr=None,
        count_ptr=None,
        BLOCK_S: tl.constexpr = 1,
        FUSED_COMBINE: tl.constexpr = False,
        USE_GDC: tl.constexpr = False,
        PF_KV: tl.constexpr = False,
        PF_LANES: tl.constexpr = 128,
        first_ptr=None,
        FIRST_STRIDE: tl.constexpr = 0,
        HAS_FIRST: tl.constexpr = False,
    ):
        """``PF_KV`` (GPU only: :func:`_prefetch_l2`): before the dependent-launch wait, ask L2 for the K and V rows
        this program will read, by the position as it reads then.  Only a hint: the keys are loaded after the wait
        by the position read again, so a position the kernel before was still writing would cost a miss, not a
        value (the cache rows before it were written by earlier steps; row ``pos`` itself is written by the kernel
        before, and a prefetch only moves lines into L2, where that write lands).

        ``HAS_FIRST``: row b reads no key before ``first[b]`` (``first_ptr``, one per row or one for all): a split
        starts at the block holding it, and the keys before it in that block are not loaded.  The blocks skipped
        are the ones the splits' loops would have read at -inf scores only (the caller's mask hides them), which
        change no running max, sum or accumulator, so the rows' outputs keep their bits."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // HQ
        kvh = (bh % HQ) // (HQ // HK)
        # this (row, kv head)'s cache rows: the base in int64 (B·HK·max_len·D passes 2**31 elements at 64 rows and
        # ~26k columns), the offsets within it (max_len·D) in int32, so the loop's address math stays 32-bit
        kv_base = (b.to(tl.int64) * HK + kvh) * max_len * D
        k_head = k_ptr + kv_base
        v_head = v_ptr + kv_base
        if PF_KV:
            pf_lo, pf_hi = _split_keys(pos_ptr, b, POS_STRIDE, key_limit, N_SPLITS, BLOCK_N, split)
            if HAS_FIRST:  # read again after the wait, like the position
                pf_lo = tl.maximum(pf_lo, tl.load(first_ptr + b * FIRST_STRIDE).to(tl.int32))
            pf_n = tl.maximum(pf_hi - pf_lo, 0) * D
            _prefetch_l2(k_head + pf_lo * D, pf_n, PF_LANES)
            _prefetch_l2(v_head + pf_lo * D, pf_n, PF_LANES)
        if USE_GDC:
            _dependent_launch()
        lo, hi = _split_keys(pos_ptr, b, POS_STRIDE, key_limit, N_SPLITS, BLOCK_N, split)
        first = 0
        if HAS_FIRST:  # from the block holding ``first``: the blocks start at the same columns, summed in one order
            first = tl.load(first_ptr + b * FIRST_STRIDE).to(tl.int32)
            lo = tl.maximum(lo, first // BLOCK_N * BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        q = tl.load(q_ptr + bh * D + d, mask=dmask, other=0.0).to(tl.float32) * qk_scale  # scale * log2(e)
        m_i = float("-inf")
        l_i = 0.0
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            nmask = n < hi
            if HAS_FIRST:
                nmask = nmask & (n >= first)
            offs = n[:, None] * D + d[None, :]
            tile_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(k_head + offs, mask=tile_mask, other=0.0).to(tl.float32)
            # the values are loaded with the keys, not after the softmax: one memory round trip per block, not two
            # (at batch 1 each split holds one block, so the trip is most of a program's time)
            v = tl.load(v_head + offs, mask=tile_mask, other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1)
            if HAS_MASK:  # additive (natural-log scale, like the torch mask), in the log2 domain of the scores
                s += tl.load(mask_ptr + b * mask_stride + n, mask=nmask, other=0.0).to(tl.float32) * 1.4426950408889634
            s = tl.where(nmask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of masked keys only: 0 weights, no NaN
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new
        part = bh * N_SPLITS + split
        tl.store(m_ptr + part, m_i)
        tl.store(l_ptr + part, l_i)
        tl.store(acc_ptr + part * D + d, acc, mask=dmask)
        if FUSED_COMBINE:
            # the split that finishes last combines the row-head: the counter's acq_rel add publishes this split's
            # partials and, for the last one, makes every other split's visible; it then re-arms the counter.
            # The add is one thread's: the barrier before it orders every thread's stores ahead of its release,
            # the one after it every thread's combine loads behind its acquire
            tl.debug_barrier()
            done = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel", scope="gpu")
            tl.debug_barrier()
            if done == N_SPLITS - 1:
                _attn_combine_row(m_ptr, l_ptr, acc_ptr, out_ptr, bh, D, N_SPLITS, BLOCK_S, BLOCK_D)
                tl.atomic_xchg(count_ptr + bh, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _split_keys(pos_ptr, b, POS_STRIDE: tl.constexpr, key_limit, N_SPLITS, BLOCK_N: tl.constexpr, split):
        """Keys [lo, hi) of ``split``: keys 0..pos (one pos for every row, or row b's own), never past the mask's
        width, shared evenly among the splits in BLOCK_N-aligned chunks; late splits may get none."""
        n_keys = tl.minimum(tl.load(pos_ptr + b * POS_STRIDE).to(tl.int32) + 1, key_limit)  # 32-bit division below
        chunk = ((n_keys + N_SPLITS - 1) // N_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        lo = split * chunk
        return lo, tl.minimum(lo + chunk, n_keys)

    @triton.jit
    def _attn_combine_kernel(
        m_ptr,
        l_ptr,
        acc_ptr,
        out_ptr,
        D: tl.constexpr,
        N_SPLITS,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
        USE_GDC: tl.constexpr = False,
    ):
        if USE_GDC:
            _dependent_launch()
        _attn_combine_row(m_ptr, l_ptr, acc_ptr, out_ptr, tl.program_id(0), D, N_SPLITS, BLOCK_S, BLOCK_D)

    @triton.jit
    def _attn_combine_row(
        m_ptr, l_ptr, acc_ptr, out_ptr, bh, D: tl.constexpr, N_SPLITS, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        """Row-head ``bh``'s output from its splits' partials: rescale to the largest max, sum, divide, round once.
        The partials are read past L1 (``.cg``): in the fused path other programs wrote them moments ago.

        The splits are summed one after the other, split 0 first (up to ``COMBINE_CHUNK`` loaded at once), not
        by ``tl.sum``: a reduction's order follows the tensor's layout, which follows the kernel it is compiled
        into (the two-launch combine and the one-launch partial kernel differ), and the two forms must agree
        bit for bit.  A split past ``N_SPLITS`` or an empty one adds exact zeros."""
        sp = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        base = bh * N_SPLITS
        m = tl.load(m_ptr + base + sp, mask=sp < N_SPLITS, other=float("-inf"), cache_modifier=".cg")
        m_all = tl.max(m, axis=0)  # finite: the split holding key pos is never empty (a max is exact in any order)
        den = 0.0
        out = tl.zeros([BLOCK_D], dtype=tl.float32)
        STEP: tl.constexpr = BLOCK_S if BLOCK_S < COMBINE_CHUNK else COMBINE_CHUNK  # no more than there are
        for c0 in range(0, N_SPLITS, STEP):
            for j in tl.static_range(STEP):
                s = tl.full([], c0 + j, tl.int32)  # a tensor under the interpreter too, so its mask is one
                ok = s < N_SPLITS
                w = tl.exp2(tl.load(m_ptr + base + s, mask=ok, other=float("-inf"), cache_modifier=".cg") - m_all)
                den += tl.load(l_ptr + base + s, mask=ok, other=0.0, cache_modifier=".cg") * w  # w = 0: empty
                tile_ok = dmask & (s + d * 0 < N_SPLITS)  # (the interpreter cannot broadcast a 0-d mask)
                a = tl.load(acc_ptr + (base + s) * D + d, mask=tile_ok, other=0.0, cache_modifier=".cg")
                out += a * w
        out = out / den
        out_dt = out_ptr.dtype.element_ty
        tl.store(out_ptr + bh * D + d, _round(out, out_dt).to(out_dt), mask=dmask)

    @triton.jit
    def _moe_route_kernel(
        x_ptr,
        gate_ptr,
        idx_ptr,
        wout_ptr,
        counts_ptr,
        H,
        scaling,
        E: tl.constexpr,
        TOP_K: tl.constexpr,
        RENORM: tl.constexpr,
        HAS_COUNTS: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_KSLOT: tl.constexpr,
        BLOCK_K: tl.constexpr,
        LOGITS_IN: tl.constexpr,
        USE_GDC: tl.constexpr = False,
    ):
        if USE_GDC:
            _dependent_launch()
        t = tl.program_id(0)
        e = tl.arange(0, BLOCK_E)
        emask = e < E
        if LOGITS_IN:  # x_ptr holds float32 router logits [T, E] (computed by cuBLAS)
            logits = tl.load(x_ptr + t * E + e, mask=emask, other=0.0).to(tl.float32)
        else:
            logits = tl.zeros([BLOCK_E], dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                kmask = kk < H
                xv = tl.load(x_ptr + t * H + kk, mask=kmask, other=0.0).to(tl.float32)
                wmask = emask[:, None] & kmask[None, :]
                w = tl.load(gate_ptr + e[:, None] * H + kk[None, :], mask=wmask, other=0.0)
                logits += tl.sum(w * xv[None, :], axis=1)
        _route_topk(
            logits, t, idx_ptr, wout_ptr, counts_ptr, scaling, E, TOP_K, RENORM, HAS_COUNTS, BLOCK_E, BLOCK_KSLOT
        )

    @triton.jit
    def _route_topk(
        logits,
        t,
        idx_ptr,
        wout_ptr,
        counts_ptr,
        scaling,
        E: tl.constexpr,
        TOP_K: tl.constexpr,
        RENORM: tl.constexpr,
        HAS_COUNTS: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_KSLOT: tl.constexpr,
    ):
        """Row ``t``'s routing from its float32 logits [BLOCK_E] (entries past ``E`` ignored): softmax, greedy
        top-k (largest first, lowest index on ties), optional renormalisation, scaling; ids, weights and counts
        stored.  Shared by the router kernel and the fused norm + router kernel."""
        e = tl.arange(0, BLOCK_E)
        emask = e < E
        logits = tl.where(emask, logits, float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=0))
        probs = p / tl.sum(p, axis=0)
        # greedy top-k: repeatedly take the largest remaining score (lowest index on ties)
        remaining = tl.where(emask, probs, -1.0)
        slot = tl.arange(0, BLOCK_KSLOT)
        sel_idx = tl.zeros([BLOCK_KSLOT], dtype=tl.int32)
        sel_w = tl.zeros([BLOCK_KSLOT], dtype=tl.float32)
        for i in tl.static_range(TOP_K):
            best = tl.max(remaining, axis=0)
            # (NaN scores match nothing: clamp so a NaN row still yields valid ids, never an OOB counter)
            best_idx = tl.minimum(tl.min(tl.where(remaining == best, e, BLOCK_E), axis=0), E - 1)
            sel_idx = tl.where(slot == i, best_idx, sel_idx)
            sel_w = tl.where(slot == i, best, sel_w)
            remaining = tl.where(e == best_idx, -2.0, remaining)
        smask = slot < TOP_K
        if RENORM:
            sel_w = sel_w / (tl.sum(tl.where(smask, sel_w, 0.0), axis=0) + 1e-20)
        sel_w = sel_w * scaling
        tl.store(idx_ptr + t * TOP_K + slot, sel_idx.to(tl.int64), mask=smask)
        tl.store(wout_ptr + t * TOP_K + slot, sel_w, mask=smask)
        if HAS_COUNTS:
            tl.atomic_add(counts_ptr + sel_idx, tl.full([BLOCK_KSLOT], 1, tl.int64), mask=smask)

    @triton.jit
    def _norm_route_kernel(
        x_ptr,
        res_ptr,
        nw_ptr,
        normed_ptr,
        summed_ptr,
        gate_ptr,
        logits_ptr,
        flag_ptr,
        idx_ptr,
        wout_ptr,
        counts_ptr,
        T,
        H,
        eps,
        scaling,
        E: tl.constexpr,
        TOP_K: tl.constexpr,
        RENORM: tl.constexpr,
        HAS_COUNTS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        E_PER: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_KSLOT: tl.constexpr,
        ROWS: tl.constexpr = 1,
        USE_GDC: tl.constexpr = False,
    ):
        p = tl.program_id(1)
        n_progs = tl.num_programs(1)
        cols = tl.arange(0, BLOCK_H)
        cmask = cols < H
        ep = p * E_PER + tl.arange(0, E_PER)
        epmask = ep < E
        # the router rows and the norm weight do not depend on the kernel before: loaded ahead of the wait, once for
        # the program's ROWS rows (each row's programs would otherwise re-read the whole router from L2)
        gw = tl.load(gate_ptr + ep[:, None] * H + cols[None, :], mask=epmask[:, None] & cmask[None, :], other=0.0)
        nw = tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if USE_GDC:
            _dependent_launch()
        dt = x_ptr.dtype.element_ty
        out_dt = normed_ptr.dtype.element_ty
        width = tl.cdiv(H, n_progs)
        mine = cmask & (cols >= p * width) & (cols < p * width + width)
        for i in tl.static_range(ROWS):  # one row after the other, each with the one-row math (the same bits)
            t = tl.program_id(0) * ROWS + i
            if t < T:
                # every program normalises the whole row (the add_rms_norm kernel's math) and stores its slice
                s, rstd = _add_rms(x_ptr + t * H, res_ptr + t * H, cols, cmask, H, eps, HAS_RESIDUAL, dt, False)
                if HAS_RESIDUAL:
                    tl.store(summed_ptr + t * H + cols, s.to(dt), mask=mine)
                out = _round(nw * _round(s * rstd, dt), out_dt)
                tl.store(normed_ptr + t * H + cols, out.to(out_dt), mask=mine)
                # this program's experts' float32 logits, then the last program of the row routes it
                part = tl.sum(gw * out[None, :], axis=1)
                tl.store(logits_ptr + t * E + ep, part, mask=epmask)
                tl.debug_barrier()  # every thread's stores ahead of the release below (one thread's atomic)
                done = tl.atomic_add(flag_ptr + t, 1, sem="acq_rel", scope="gpu")
                tl.debug_barrier()  # ...and every thread's loads below behind its acquire
                if done == n_progs - 1:
                    e = tl.arange(0, BLOCK_E)
                    logits = tl.load(logits_ptr + t * E + e, mask=e < E, other=0.0, cache_modifier=".cg")
                    _route_topk(
                        logits,
                        t,
                        idx_ptr,
                        wout_ptr,
                        counts_ptr,
                        scaling,
                        E,
                        TOP_K,
                        RENORM,
                        HAS_COUNTS,
                        BLOCK_E,
                        BLOCK_KSLOT,
                    )
                    tl.atomic_xchg(flag_ptr + t, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _route_rows_kernel(
        x_ptr,
        gate_ptr,
        idx_ptr,
        wout_ptr,
        counts_ptr,
        T,
        H,
        scaling,
        E: tl.constexpr,
        TOP_K: tl.constexpr,
        RENORM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_KSLOT: tl.constexpr,
        HAS_COUNTS: tl.constexpr = False,
        UPCAST: tl.constexpr = False,
        USE_GDC: tl.constexpr = False,
    ):
        """``BLOCK_M`` rows' float32 router logits over all experts (``tl.dot`` with a float32 accumulator: bf16
        operands on the tensor cores, whose products are exact in float32; float32 operands in IEEE float32), then
        :func:`_route_topk`'s softmax / greedy top-k / renormalisation / scaling for every row at once
        ([BLOCK_M, BLOCK_E] reductions along the experts)."""
        if USE_GDC:
            _dependent_launch()
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < T
        e = tl.arange(0, BLOCK_E)
        emask = e < E
        logits = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < H
            xt = tl.load(x_ptr + rows[:, None] * H + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            # [E, K] rows, contiguous along K, transposed for the product
            # other=0.0: a hidden size that is no multiple of BLOCK_K would otherwise leave undefined gate values
            # in the K tail, and undefined × 0 can be NaN in a real expert's logit (the real models' 1,280 divides)
            gate = tl.load(gate_ptr + e[:, None] * H + kk[None, :], mask=emask[:, None] & kmask[None, :], other=0.0)
            gt = tl.trans(gate)
            if gt.dtype == tl.float32 or UPCAST:  # (Triton's interpreter computes bf16 tl.dot wrongly)
                logits = tl.dot(xt.to(tl.float32), gt.to(tl.float32), logits, input_precision="ieee")
            else:
                logits = tl.dot(xt, gt, logits)
        logits = tl.where(emask[None, :], logits, float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        probs = p / tl.sum(p, axis=1)[:, None]
        remaining = tl.where(emask[None, :], probs, -1.0)
        slot = tl.arange(0, BLOCK_KSLOT)
        sel_idx = tl.zeros([BLOCK_M, BLOCK_KSLOT], dtype=tl.int32)
        sel_w = tl.zeros([BLOCK_M, BLOCK_KSLOT], dtype=tl.float32)
        for i in tl.static_range(TOP_K):
            best = tl.max(remaining, axis=1)
            # lowest index on ties; NaN rows still get valid ids (clamped), as in _route_topk
            best_idx = tl.minimum(tl.min(tl.where(remaining == best[:, None], e[None, :], BLOCK_E), axis=1), E - 1)
            sel_idx = tl.where(slot[None, :] == i, best_idx[:, None], sel_idx)
            sel_w = tl.where(slot[None, :] == i, best[:, None], sel_w)
            remaining = tl.where(e[None, :] == best_idx[:, None], -2.0, remaining)
        smask = slot < TOP_K
        if RENORM:
            sel_w = sel_w / (tl.sum(tl.where(smask[None, :], sel_w, 0.0), axis=1)[:, None] + 1e-20)
        sel_w = sel_w * scaling
        out = rows[:, None] * TOP_K + slot[None, :]
        omask = rmask[:, None] & smask[None, :]
        tl.store(idx_ptr + out, sel_idx.to(tl.int64), mask=omask)
        tl.store(wout_ptr + out, sel_w, mask=omask)
        if HAS_COUNTS:  # the block's picks per expert (marked -2 above), then one add per expert it picked
            marks = ((remaining == -2.0) & rmask[:, None]).to(tl.int64)
            per_expert = tl.sum(marks, axis=0)
            # a pick is marked once however often it was stored: only a NaN row repeats one, the clamped last
            # expert, so its repeats are what its row lacks of k marks; counted as stored, as _route_topk counts
            repeats = tl.sum(tl.where(rmask, TOP_K - tl.sum(marks, axis=1), 0), axis=0)
            per_expert += tl.where(e == E - 1, repeats, 0)
            tl.atomic_add(counts_ptr + e, per_expert, mask=emask & (per_expert > 0))

    @triton.jit
    def _slot_expert(idx_ptr, ts, N_EXPERTS, TOP_K: tl.constexpr, N_ALWAYS: tl.constexpr):
        """(token, expert id as int64) of program row ``ts`` = token · (k + n_always) + slot: a routed slot's pick,
        else the always-on slot's place at the end of the stack."""
        t = ts // (TOP_K + N_ALWAYS)
        s = ts % (TOP_K + N_ALWAYS)
        routed = s < TOP_K
        e = tl.load(idx_ptr + t * TOP_K + s, mask=routed, other=0)
        return t, tl.where(routed, e, N_EXPERTS - N_ALWAYS + (s - TOP_K)).to(tl.int64)

    @triton.jit(do_not_specialize=["N_EXPERTS"])  # a stack of 1 would become a constexpr
    def _moe_up_kernel(
        x_ptr,
        idx_ptr,
        w13_ptr,
        h_ptr,
        H,
        INTER,
        N_EXPERTS,
        TOP_K: tl.constexpr,
        N_ALWAYS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        USE_GDC: tl.constexpr = False,
        STAGES: tl.constexpr = 0,
        reads_ptr=None,
        HAS_READS: tl.constexpr = False,
        BLOCK_PICKS: tl.constexpr = 1,
    ):
        """``HAS_READS``: the first column block of each routed slot adds 1 to ``reads_ptr[0]`` when no earlier pick
        (in token-major order) chose its expert, so the picks' distinct experts are counted once; program (0, 0)
        adds 1 to ``reads_ptr[1]`` (the calls).  ``BLOCK_PICKS``: a power of two >= T·k."""
        if USE_GDC:
            _dependent_launch()
        ts = tl.program_id(0)  # token * n_slots + slot
        nb = tl.program_id(1)
        t, e = _slot_expert(idx_ptr, ts, N_EXPERTS, TOP_K, N_ALWAYS)
        if HAS_READS:
            slot = ts % (TOP_K + N_ALWAYS)
            pick = t * TOP_K + slot  # this slot's place among the picks (a routed slot's)
            j = tl.arange(0, BLOCK_PICKS)
            before = tl.where(slot < TOP_K, pick, 0)  # the picks before this one (a shared slot: none, read nothing)
            earlier = tl.load(idx_ptr + j, mask=j < before, other=-1)
            new = (nb == 0) & (slot < TOP_K) & (tl.sum((earlier == e).to(tl.int32), axis=0) == 0)
            tl.atomic_add(reads_ptr, tl.full([], 1, tl.int64), mask=new, sem="relaxed")
            tl.atomic_add(reads_ptr + 1, tl.full([], 1, tl.int64), mask=(ts == 0) & (nb == 0), sem="relaxed")
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < INTER
        gate_rows = w13_ptr + e * (2 * INTER * H) + n[:, None] * H
        up_rows = gate_rows + INTER * H
        g = tl.zeros([BLOCK_N], dtype=tl.float32)
        u = tl.zeros([BLOCK_N], dtype=tl.float32)
        if STAGES > 0:
            # software-pipelined: the weight tiles of the next STAGES - 1 steps are copied into shared memory
            # asynchronously (cp.async) while this one is summed, bytes in flight without registers
            for k0 in tl.range(0, H, BLOCK_K, num_stages=STAGES):
                kk = k0 + tl.arange(0, BLOCK_K)
                xv, tile_mask = _row_block(x_ptr + t * H, kk, nmask, H, EVEN_K)
                wg = tl.load(gate_rows + kk[None, :], mask=tile_mask, other=0.0).to(tl.float32)
                wu = tl.load(up_rows + kk[None, :], mask=tile_mask, other=0.0).to(tl.float32)
                g += tl.sum(wg * xv[None, :], axis=1)
                u += tl.sum(wu * xv[None, :], axis=1)
        else:
            for k0 in range(0, H, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                xv, tile_mask = _row_block(x_ptr + t * H, kk, nmask, H, EVEN_K)
                wg = tl.load(gate_rows + kk[None, :], mask=tile_mask, other=0.0).to(tl.float32)
                wu = tl.load(up_rows + kk[None, :], mask=tile_mask, other=0.0).to(tl.float32)
                g += tl.sum(wg * xv[None, :], axis=1)
                u += tl.sum(wu * xv[None, :], axis=1)
        dt = h_ptr.dtype.element_ty
        g = _round(g, dt)  # the gate/up GEMM output is in the activation dtype
        u = _round(u, dt)
        act = _round(g / (1.0 + tl.exp(-g)), dt)  # F.silu rounds to the activation dtype
        tl.store(h_ptr + ts * INTER + n, _round(act * u, dt).to(dt), mask=nmask)

    @triton.jit
    def _down_store(
        routed_acc, always_acc, res_ptr, out_ptr, t, rows, rmask, H, N_ALWAYS: tl.constexpr, HAS_RESIDUAL: tl.constexpr
    ):
        """Token ``t``'s down output rows from the float32 sums over its slots, with the torch path's rounding points
        (both down forms end here, so they agree bit for bit for the same sums): the routed sum rounded, plus the
        always-on MLP's sum rounded once, rounded; plus the residual, rounded."""
        dt = out_ptr.dtype.element_ty
        out = _round(routed_acc, dt)
        if N_ALWAYS > 0:
            out = _round(out + _round(always_acc, dt), dt)
        if HAS_RESIDUAL:
            out = _round(out + tl.load(res_ptr + t * H + rows, mask=rmask, other=0.0).to(tl.float32), dt)
        tl.store(out_ptr + t * H + rows, out.to(dt), mask=rmask)

    @triton.jit(do_not_specialize=["N_EXPERTS"])  # a stack of 1 would become a constexpr
    def _moe_down_kernel(
        h_ptr,
        idx_ptr,
        wts_ptr,
        w2_ptr,
        res_ptr,
        out_ptr,
        H,
        INTER,
        N_EXPERTS,
        TOP_K: tl.constexpr,
        N_ALWAYS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        USE_GDC: tl.constexpr = False,
    ):
        if USE_GDC:
            _dependent_launch()
        t = tl.program_id(0)
        hb = tl.program_id(1)
        rows = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        rmask = rows < H
        dt = out_ptr.dtype.element_ty
        routed_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        always_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        # unrolled over the slots: every slot's expert id is known up front, so the weight loads of the
        # next slot need not wait for the previous slot's reduction
        for s in tl.static_range(TOP_K + N_ALWAYS):
            if s < TOP_K:
                e = tl.load(idx_ptr + t * TOP_K + s).to(tl.int64)
            else:
                e = (N_EXPERTS - N_ALWAYS + (s - TOP_K)).to(tl.int64)
            w_rows = w2_ptr + e * (H * INTER) + rows[:, None] * INTER
            h_row = h_ptr + (t * (TOP_K + N_ALWAYS) + s) * INTER
            y = tl.zeros([BLOCK_H], dtype=tl.float32)
            for k0 in range(0, INTER, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                hv, tile_mask = _row_block(h_row, kk, rmask, INTER, EVEN_K)
                w = tl.load(w_rows + kk[None, :], mask=tile_mask, other=0.0).to(tl.float32)
                y += tl.sum(w * hv[None, :], axis=1)
            if s < TOP_K:
                # a routed expert's output is rounded (its down GEMM), then weighted and summed in float32
                routed_acc += tl.load(wts_ptr + t * TOP_K + s) * _round(y, dt)
            else:
                # always-on slots are pieces of one MLP's down GEMM: summed in float32, rounded once below
                always_acc += y
        _down_store(routed_acc, always_acc, res_ptr, out_ptr, t, rows, rmask, H, N_ALWAYS, HAS_RESIDUAL)

    @triton.jit(do_not_specialize=["N_EXPERTS"])  # a stack of 1 would become a constexpr
    def _moe_down_split_kernel(
        h_ptr,
        idx_ptr,
        wts_ptr,
        w2_ptr,
        res_ptr,
        out_ptr,
        y_ptr,
        count_ptr,
        H,
        INTER,
        N_EXPERTS,
        TOP_K: tl.constexpr,
        N_ALWAYS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        USE_GDC: tl.constexpr = False,
        STAGES: tl.constexpr = 0,
        nres_ptr=None,
        nw_ptr=None,
        normed_ptr=None,
        nsum_ptr=None,
        row_count_ptr=None,
        eps=0.0,
        HAS_NORM: tl.constexpr = False,
        BLOCK_R: tl.constexpr = 1,
    ):
        """The down GEMV with the slots split across programs (``moe_experts(down="split")``), shaped like the
        up kernel: program (t·slots + s, hb) computes ``y = W2[e_s][rows] @ h[t, s]`` in float32 over a K loop
        (software-pipelined over ``STAGES`` like the up kernel's, a plain loop at 0), stores it to the [T, slots,
        H] scratch, and the program that finishes last for (t, hb) combines the slots in order with the rows
        kernel's rounding points (see :func:`_moe_down_combine`).  ``HAS_NORM``: of those, the one that finishes
        token t's row last (a second counter per token, ordered the same way) adds the residual stream to the row
        and normalises it (:func:`_norm_row`: the next norm's add_rms_norm, in this launch)."""
        if USE_GDC:
            _dependent_launch()
        ts = tl.program_id(0)  # token * n_slots + slot
        hb = tl.program_id(1)
        t, e = _slot_expert(idx_ptr, ts, N_EXPERTS, TOP_K, N_ALWAYS)
        rows = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        rmask = rows < H
        w_rows = w2_ptr + e * (H * INTER) + rows[:, None] * INTER
        h_row = h_ptr + ts * INTER
        y = tl.zeros([BLOCK_H], dtype=tl.float32)
        if STAGES > 0:
            # the next STAGES - 1 weight tiles are copied into shared memory (cp.async) while this one is summed
            for k0 in tl.range(0, INTER, BLOCK_K, num_stages=STAGES):
                kk = k0 + tl.arange(0, BLOCK_K)
                hv, tile_mask = _row_block(h_row, kk, rmask, INTER, EVEN_K)
                w = tl.load(w_rows + kk[None, :], mask=tile_mask, other=0.0).to(tl.float32)
                y += tl.sum(w * hv[None, :], axis=1)
        else:
            for k0 in range(0, INTER, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                hv, tile_mask = _row_block(h_row, kk, rmask, INTER, EVEN_K)
                w = tl.load(w_rows + kk[None, :], mask=tile_mask, other=0.0).to(tl.float32)
                y += tl.sum(w * hv[None, :], axis=1)
        tl.store(y_ptr + ts * H + rows, y, mask=rmask)
        # the slot that finishes last for (t, hb) combines: the counter's acq_rel add publishes this slot's y and,
        # for the last one, makes every other slot's visible; it then re-arms the counter (the next call and every
        # graph replay find it at zero).  The add is one thread's: the barrier before it orders every thread's
        # stores ahead of its release, the one after it every thread's combine loads behind its acquire
        tl.debug_barrier()
        count = count_ptr + t * tl.num_programs(1) + hb
        done = tl.atomic_add(count, 1, sem="acq_rel", scope="gpu")
        tl.debug_barrier()
        if done == TOP_K + N_ALWAYS - 1:
            _moe_down_combine(
                y_ptr, wts_ptr, res_ptr, out_ptr, t, rows, rmask, H, TOP_K, N_ALWAYS, HAS_RESIDUAL, BLOCK_H
            )
            tl.atomic_xchg(count, 0, sem="relaxed", scope="gpu")
            if HAS_NORM:  # the same publish / acquire pattern, over the row's blocks
                tl.debug_barrier()
                rdone = tl.atomic_add(row_count_ptr + t, 1, sem="acq_rel", scope="gpu")
                tl.debug_barrier()
                if rdone == tl.num_programs(1) - 1:
                    _norm_row(
                        out_ptr + t * H, nres_ptr + t * H, nw_ptr, normed_ptr + t * H, nsum_ptr + t * H,
                        normed_ptr + t * H, H, eps, True, BLOCK_R, False, True,
                    )  # fmt: skip
                    tl.atomic_xchg(row_count_ptr + t, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _moe_down_combine(
        y_ptr,
        wts_ptr,
        res_ptr,
        out_ptr,
        t,
        rows,
        rmask,
        H,
        TOP_K: tl.constexpr,
        N_ALWAYS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        """Token ``t``'s output rows from its slots' float32 ``y`` (scratch [T, slots, H]), with the rounding points
        of :func:`_moe_down_kernel`, slot 0 first: so for the same ``y`` the two forms agree bit for bit.  The
        ``y`` are read past L1 (``.cg``): other programs wrote them moments ago."""
        dt = out_ptr.dtype.element_ty
        routed_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        always_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for s in tl.static_range(TOP_K + N_ALWAYS):
            y = tl.load(y_ptr + (t * (TOP_K + N_ALWAYS) + s) * H + rows, mask=rmask, other=0.0, cache_modifier=".cg")
            if s < TOP_K:
                routed_acc += tl.load(wts_ptr + t * TOP_K + s) * _round(y, dt)  # a routed expert's bf16 output
            else:
                always_acc += y  # the always-on MLP's one down GEMM: rounded once below
        _down_store(routed_acc, always_acc, res_ptr, out_ptr, t, rows, rmask, H, N_ALWAYS, HAS_RESIDUAL)

    # ------------------------------------------------------------------ grouped experts (9..64 rows)
    @triton.jit
    def _moe_align_kernel(
        ids_ptr,
        order_ptr,
        offs_ptr,
        reads_ptr,
        P,
        E: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_ALL: tl.constexpr,
        BLOCK_E: tl.constexpr,
        HAS_READS: tl.constexpr,
        USE_GDC: tl.constexpr = False,
    ):
        """Counting sort of the P (token, pick) pairs by expert, stable: ``order[pos] = pair``, ``offs[e]`` = first
        sorted position of expert e (``offs[E] = P``).  A pair's position is the number of pairs with a smaller
        expert id plus the earlier pairs with the same id: every program loads all P ids at once (P <= BLOCK_ALL)
        and places its BLOCK_P pairs with one [BLOCK_P, BLOCK_ALL] comparison; the last program counts the pairs
        of each expert, writes ``offs`` as their running sum and, with ``HAS_READS``, adds the number of experts
        with a pair (the routed experts whose weights this call reads) to ``reads[0]`` and 1 to ``reads[1]``
        (int64 counters)."""
        if USE_GDC:
            _dependent_launch()
        pb = tl.program_id(0)
        q = tl.arange(0, BLOCK_ALL)
        idq = tl.load(ids_ptr + q, mask=q < P, other=E + 1).to(tl.int32)  # padding sorts after every pair
        if pb * BLOCK_P < P:
            p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
            pmask = p < P
            idp = tl.load(ids_ptr + p, mask=pmask, other=E).to(tl.int32)
            before = (idq[None, :] < idp[:, None]) | ((idq[None, :] == idp[:, None]) & (q[None, :] < p[:, None]))
            tl.store(order_ptr + tl.sum(before.to(tl.int32), axis=1), p, mask=pmask)
        else:
            used = tl.zeros([BLOCK_P], dtype=tl.int64)
            below = tl.zeros([], dtype=tl.int32)  # pairs with an expert id below this block's first
            for e0 in tl.static_range(0, BLOCK_E, BLOCK_P):
                e = e0 + tl.arange(0, BLOCK_P)
                picked = tl.sum((idq[None, :] == e[:, None]).to(tl.int32), axis=1)  # pairs per expert
                tl.store(offs_ptr + e, below + tl.cumsum(picked, axis=0) - picked, mask=e <= E)
                below += tl.sum(picked, axis=0)
                if HAS_READS:  # the per-expert counts are already here: the count costs no comparison
                    used += ((picked > 0) & (e < E)).to(tl.int64)
            if HAS_READS:
                tl.atomic_add(reads_ptr, tl.sum(used, axis=0))
                tl.atomic_add(reads_ptr + 1, tl.full([], 1, tl.int64))

    @triton.jit
    def _gmm_rows(order_ptr, offs_ptr, slot, P, T, TOP_K: tl.constexpr, N_ROUTED):
        """Rows of one slot: [start, end) and the scratch row base; routed rows are sorted positions (``order``
        maps them to pairs), an always-on slot's rows are the T tokens themselves, after the P routed rows."""
        routed = slot < N_ROUTED
        start = tl.where(routed, tl.load(offs_ptr + tl.minimum(slot, N_ROUTED)), 0)
        end = tl.where(routed, tl.load(offs_ptr + tl.minimum(slot + 1, N_ROUTED)), T)
        base = tl.where(routed, 0, P + (slot - N_ROUTED) * T)
        return start, end, base

    @triton.jit(do_not_specialize=["N_ROUTED"])
    def _moe_gmm_up_kernel(
        x_ptr,
        order_ptr,
        offs_ptr,
        w13_ptr,
        h_ptr,
        P,
        T,
        H,
        INTER,
        N_ROUTED,
        TOP_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        USE_GDC: tl.constexpr = False,
    ):
        """Grid (slots, I / BLOCK_N): one expert's rows x one tile of its gate and up columns, ``BLOCK_M`` rows at
        a time (an expert with no rows reads nothing), then ``bf16(silu(g)) * u`` into ``h`` at the rows' sorted
        positions, with the grouped GEMM's rounding points."""
        if USE_GDC:
            _dependent_launch()
        slot = tl.program_id(0)
        nb = tl.program_id(1)
        start, end, base = _gmm_rows(order_ptr, offs_ptr, slot, P, T, TOP_K, N_ROUTED)
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < INTER
        gate_cols = w13_ptr + slot.to(tl.int64) * (2 * INTER * H) + n[None, :] * H  # [1, BLOCK_N] row starts
        up_cols = gate_cols + INTER * H
        dt = h_ptr.dtype.element_ty
        for m0 in range(start, end, BLOCK_M):
            r = m0 + tl.arange(0, BLOCK_M)
            rmask = r < end
            routed_v = (r * 0 + slot) < N_ROUTED  # as a vector: the interpreter rejects scalar & vector masks
            pair = tl.load(order_ptr + r, mask=rmask & routed_v, other=0)
            tok = tl.where(routed_v, pair // TOP_K, r)
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                if EVEN_K:
                    a_mask = rmask[:, None]
                    w_mask = nmask[None, :]
                else:
                    a_mask = rmask[:, None] & (kk[None, :] < H)
                    w_mask = nmask[None, :] & (kk[:, None] < H)
                a = tl.load(x_ptr + tok[:, None] * H + kk[None, :], mask=a_mask, other=0.0)
                wg = tl.load(gate_cols + kk[:, None], mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
                wu = tl.load(up_cols + kk[:, None], mask=w_mask, other=0.0)
                if UPCAST:  # Triton's interpreter computes bf16 tl.dot wrongly; float32 operands are exact
                    a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
                acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)
                acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)
            g = _round(acc_g, dt)  # the gate/up GEMM output is in the activation dtype
            u = _round(acc_u, dt)
            act = _round(g / (1.0 + tl.exp(-g)), dt)  # F.silu rounds to the activation dtype
            out = h_ptr + (base + r)[:, None] * INTER + n[None, :]
            tl.store(out, _round(act * u, dt).to(dt), mask=rmask[:, None] & nmask[None, :])

    @triton.jit(do_not_specialize=["N_ROUTED"])
    def _moe_gmm_down_kernel(
        h_ptr,
        order_ptr,
        offs_ptr,
        w2_ptr,
        y_ptr,
        P,
        T,
        H,
        INTER,
        N_ROUTED,
        TOP_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        USE_GDC: tl.constexpr = False,
    ):
        """Grid (slots, H / BLOCK_N): ``y = h @ W2[e]ᵀ`` for one expert's rows x one tile of hidden columns, written
        in float32 at each row's pair index (token·k + pick), so the combine reads a token's picks in order."""
        if USE_GDC:
            _dependent_launch()
        slot = tl.program_id(0)
        nb = tl.program_id(1)
        start, end, base = _gmm_rows(order_ptr, offs_ptr, slot, P, T, TOP_K, N_ROUTED)
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < H
        w_cols = w2_ptr + slot.to(tl.int64) * (H * INTER) + n[None, :] * INTER
        for m0 in range(start, end, BLOCK_M):
            r = m0 + tl.arange(0, BLOCK_M)
            rmask = r < end
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, INTER, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                if EVEN_K:
                    a_mask = rmask[:, None]
                    w_mask = nmask[None, :]
                else:
                    a_mask = rmask[:, None] & (kk[None, :] < INTER)
                    w_mask = nmask[None, :] & (kk[:, None] < INTER)
                a = tl.load(h_ptr + (base + r)[:, None] * INTER + kk[None, :], mask=a_mask, other=0.0)
                w = tl.load(w_cols + kk[:, None], mask=w_mask, other=0.0)
                if UPCAST:
                    a, w = a.to(tl.float32), w.to(tl.float32)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
            routed_v = (r * 0 + slot) < N_ROUTED
            pair = tl.load(order_ptr + r, mask=rmask & routed_v, other=0)
            dest = tl.where(routed_v, pair, base + r)
            tl.store(y_ptr + dest[:, None] * H + n[None, :], acc, mask=rmask[:, None] & nmask[None, :])

    @triton.jit
    def _moe_combine_kernel(
        y_ptr,
        wts_ptr,
        res_ptr,
        out_ptr,
        P,
        T,
        H,
        TOP_K: tl.constexpr,
        N_ALWAYS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_H: tl.constexpr,
        USE_GDC: tl.constexpr = False,
    ):
        """Per token: ``Σ_k w·bf16(y_k)`` in float32 in pick order, the always-on slots summed in float32 and rounded
        once (one down GEMM in torch), then routed + shared (+ residual): the GEMV kernel's rounding points."""
        if USE_GDC:
            _dependent_launch()
        t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cmask = cols < H
        dt = out_ptr.dtype.element_ty
        routed_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            y = tl.load(y_ptr + (t * TOP_K + j) * H + cols, mask=cmask, other=0.0)
            routed_acc += tl.load(wts_ptr + t * TOP_K + j) * _round(y, dt)
        out = _round(routed_acc, dt)
        if N_ALWAYS > 0:
            always_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
            for j in tl.static_range(N_ALWAYS):
                always_acc += tl.load(y_ptr + (P + j * T + t) * H + cols, mask=cmask, other=0.0)
            out = _round(out + _round(always_acc, dt), dt)
        if HAS_RESIDUAL:
            out = _round(out + tl.load(res_ptr + t * H + cols, mask=cmask, other=0.0).to(tl.float32), dt)
        tl.store(out_ptr + t * H + cols, out.to(dt), mask=cmask)

    @triton.jit
    def _silu_mul_kernel(h_ptr, out_ptr, INTER, BLOCK: tl.constexpr, USE_GDC: tl.constexpr = False):
        """One row block of SwiGLU over ``h`` [rows, 2·INTER] (gate | up): ``bf16(silu(g)) · u`` rounded as torch's
        ``F.silu(g) * u`` is (silu rounded to the activation dtype, then the product)."""
        if USE_GDC:
            _dependent_launch()
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < INTER
        dt = out_ptr.dtype.element_ty
        g = tl.load(h_ptr + row * 2 * INTER + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + row * 2 * INTER + INTER + cols, mask=mask, other=0.0).to(tl.float32)
        act = _round(g / (1.0 + tl.exp(-g)), dt)
        tl.store(out_ptr + row * INTER + cols, _round(act * u, dt).to(dt), mask=mask)

    @triton.jit
    def _moe_gather_combine_kernel(
        y_ptr,
        inv_ptr,
        wts_ptr,
        shared_ptr,
        out_ptr,
        H,
        TOP_K: tl.constexpr,
        BLOCK_H: tl.constexpr,
        USE_GDC: tl.constexpr = False,
    ):
        """Per token: its k expert rows gathered from the grouped GEMM's output (row ``inv[t·k + j]``), ``Σ_j w·y``
        in float32 in pick order, rounded, plus the shared experts' row, rounded: the torch tail's rounding points."""
        if USE_GDC:
            _dependent_launch()
        t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cmask = cols < H
        dt = out_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            row = tl.load(inv_ptr + t * TOP_K + j)
            y = tl.load(y_ptr + row * H + cols, mask=cmask, other=0.0).to(tl.float32)
            acc += tl.load(wts_ptr + t * TOP_K + j) * y
        shared = tl.load(shared_ptr + t * H + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * H + cols, _round(_round(acc, dt) + shared, dt).to(dt), mask=cmask)

    @triton.jit
    def _linear_rows_kernel(
        x_ptr,
        w_ptr,
        y_ptr,
        N,
        K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        USE_GDC: tl.constexpr = False,
    ):
        """Grid (rows, N / BLOCK_N): one row of ``x`` times ``BLOCK_N`` rows of ``w`` (contiguous along K), float32
        products summed per K block, rounded once to the output dtype (a GEMV with a float32 accumulator).  The K
        loop is unrolled (``K`` is a compile-time constant: the model's hidden size), so a program's weight
        loads are independent of each other and all in flight at once, not one K block per memory round trip.

        The weight tiles are loaded first and held (a tuple of K blocks), the activation row after: as a dependent
        launch (``USE_GDC``) the weights, which no kernel of the step writes, may stream in while the previous
        kernel finishes, and only the row waits for it.  The sums are the same either way (same blocks, same
        order).  Measured on an H200 at batch 1: no change in the step (0.721 -> 0.722 ms/token, within noise)."""
        t = tl.program_id(0)
        nb = tl.program_id(1)
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        rows = w_ptr + n.to(tl.int64)[:, None] * K
        tiles = ()
        for k0 in tl.static_range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            tile_mask = nmask[:, None] if EVEN_K else nmask[:, None] & (kk < K)[None, :]
            tiles = tiles + (tl.load(rows + kk[None, :], mask=tile_mask, other=0.0),)  # type: ignore[assignment]  # noqa: RUF005
        if USE_GDC:
            _dependent_launch()
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(len(tiles)):
            kk = i * BLOCK_K + tl.arange(0, BLOCK_K)
            xv, _ = _row_block(x_ptr + t * K, kk, nmask, K, EVEN_K)
            acc += tl.sum(tiles[i].to(tl.float32) * xv[None, :], axis=1)
        out_dt = y_ptr.dtype.element_ty
        tl.store(y_ptr + t * N + n, acc.to(out_dt), mask=nmask)

    @triton.jit
    def _qkv_rope_kernel(
        x_ptr,
        w_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        max_len,
        K: tl.constexpr,
        HQ: tl.constexpr,
        HK: tl.constexpr,
        D: tl.constexpr,
        PAIRS: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        USE_GDC: tl.constexpr = False,
        res_ptr=None,
        nw_ptr=None,
        summed_ptr=None,
        eps=0.0,
        HAS_NORM: tl.constexpr = False,
        HAS_RESIDUAL: tl.constexpr = False,
        BLOCK_H: tl.constexpr = 1,
    ):
        """:func:`qkv_rope`'s kernel: ``_linear_rows_kernel`` over ``2·PAIRS`` rows of one head, chosen as
        ``PAIRS`` rotary pairs (channel j and j + D/2, interleaved), so the program holds both halves of what
        the rotary mixes and applies it (and the cache writes) to its own outputs.  ``HAS_NORM``: ``x`` is the
        layer's un-normalised input; every program adds the residual and takes the row's RMS as the add+RMSNorm
        kernel does (one [BLOCK_H] reduction), then normalises each K block as it multiplies it; the first
        program of a row stores the sum (the residual stream)."""
        t = tl.program_id(0)
        nb = tl.program_id(1)
        GROUPS: tl.constexpr = D // 2 // PAIRS  # pair groups per head
        h = nb // GROUPS
        j0 = (nb % GROUPS) * PAIRS
        i = tl.arange(0, 2 * PAIRS)
        chan = h * D + j0 + i // 2 + (i % 2) * (D // 2)  # [lo0, hi0, lo1, hi1, ...]
        rows = w_ptr + chan.to(tl.int64)[:, None] * K
        tiles = ()
        for k0 in tl.static_range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                tiles = tiles + (tl.load(rows + kk[None, :]),)  # type: ignore[assignment]  # noqa: RUF005
            else:
                tiles = tiles + (tl.load(rows + kk[None, :], mask=(kk < K)[None, :], other=0.0),)  # type: ignore[assignment]  # noqa: RUF005
        if USE_GDC:
            _dependent_launch()
        dt = q_ptr.dtype.element_ty
        rstd = 0.0
        if HAS_NORM:
            cols = tl.arange(0, BLOCK_H)
            cmask = cols < K
            srow, rstd = _add_rms(x_ptr + t * K, res_ptr + t * K, cols, cmask, K, eps, HAS_RESIDUAL, dt, False)
            if HAS_RESIDUAL:
                tl.store(summed_ptr + t * K + cols, srow.to(dt), mask=cmask & (cols * 0 + nb == 0))  # (a vector mask)
        acc = tl.zeros([2 * PAIRS], dtype=tl.float32)
        all_rows = i < 2 * PAIRS
        for s in tl.static_range(len(tiles)):
            kk = s * BLOCK_K + tl.arange(0, BLOCK_K)
            xv, _ = _row_block(x_ptr + t * K, kk, all_rows, K, EVEN_K)
            if HAS_NORM:  # this block of the normed row, with the add+RMSNorm kernel's rounding points
                if HAS_RESIDUAL:
                    rv, _ = _row_block(res_ptr + t * K, kk, all_rows, K, EVEN_K)
                    xv = _round(xv + rv, dt)
                wv, _ = _row_block(nw_ptr, kk, all_rows, K, EVEN_K)
                xv = _round(wv * _round(xv * rstd, dt), dt)
            acc += tl.sum(tiles[s].to(tl.float32) * xv[None, :], axis=1)
        y = acc.to(dt).to(tl.float32)  # the projection's output, as linear_rows stores it
        lo, hi = tl.split(tl.reshape(y, [PAIRS, 2]))
        j = j0 + tl.arange(0, PAIRS)
        pos = tl.load(pos_ptr)
        c_lo = tl.load(cos_ptr + pos * D + j).to(tl.float32)
        c_hi = tl.load(cos_ptr + pos * D + j + D // 2).to(tl.float32)
        s_lo = tl.load(sin_ptr + pos * D + j).to(tl.float32)
        s_hi = tl.load(sin_ptr + pos * D + j + D // 2).to(tl.float32)
        # rope_kv_write's arithmetic: roll(x, D/2) pairs channel j with j + D/2 (rotate_half's sign is in sin)
        rot_lo = _round(_round(lo * c_lo, dt) + _round(hi * s_lo, dt), dt).to(dt)
        rot_hi = _round(_round(hi * c_hi, dt) + _round(lo * s_hi, dt), dt).to(dt)
        hv = j * 0 + h  # the head as a vector: masks stay [PAIRS] (the interpreter rejects scalar & vector)
        is_q = hv < HQ
        is_k = (hv >= HQ) & (hv < HQ + HK)
        is_v = hv >= HQ + HK
        q_row = q_ptr + (t * HQ + h) * D
        tl.store(q_row + j, rot_lo, mask=is_q)
        tl.store(q_row + j + D // 2, rot_hi, mask=is_q)
        k_row = k_ptr + ((t.to(tl.int64) * HK + (h - HQ)) * max_len + pos) * D  # int64: see _prompt_rope_kv_kernel
        tl.store(k_row + j, rot_lo, mask=is_k)
        tl.store(k_row + j + D // 2, rot_hi, mask=is_k)
        v_row = v_ptr + ((t.to(tl.int64) * HK + (h - HQ - HK)) * max_len + pos) * D
        vt = v_ptr.dtype.element_ty
        tl.store(v_row + j, lo.to(vt), mask=is_v)
        tl.store(v_row + j + D // 2, hi.to(vt), mask=is_v)

    @triton.jit
    def _pick_partial_kernel(
        logits_ptr,
        ban_ptr,
        val_ptr,
        idx_ptr,
        bad_ptr,
        V,
        ban_stride,
        N_CHUNKS,
        BLOCK: tl.constexpr,
        HAS_BAN: tl.constexpr,
        USE_GDC: tl.constexpr = False,
    ):
        """One chunk of one row: whether it holds a non-finite logit (before the ban), then its largest logit
        after the ban and the first index holding it."""
        if USE_GDC:
            _dependent_launch()
        row = tl.program_id(0)
        c = tl.program_id(1)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        m = offs < V
        x = tl.load(logits_ptr + row * V + offs, mask=m, other=0.0).to(tl.float32)
        bad = tl.max(tl.where(m & ((x != x) | (tl.abs(x) == float("inf"))), 1, 0), axis=0)
        if HAS_BAN:
            banned = tl.load(ban_ptr + row * ban_stride + offs, mask=m, other=0)
            x = tl.where(banned != 0, float("-inf"), x)
        x = tl.where(m, x, float("-inf"))
        best = tl.max(x, axis=0)
        first = tl.min(tl.where(m & (x == best), offs, V), axis=0)
        tl.store(val_ptr + row * N_CHUNKS + c, best)
        tl.store(idx_ptr + row * N_CHUNKS + c, first)
        tl.store(bad_ptr + row * N_CHUNKS + c, bad)

    @triton.jit
    def _pick_final_kernel(
        val_ptr,
        idx_ptr,
        bad_ptr,
        out_ptr,
        flag_ptr,
        tokens_ptr,
        chosen_ptr,
        pos_ptr,
        V,
        N_CHUNKS,
        ROWS,
        SLOTS,
        BLOCK_C: tl.constexpr,
        FEED: tl.constexpr = False,
        USE_GDC: tl.constexpr = False,
    ):
        """Per row: the first chunk index holding the row's largest value (chunks are in index order, so the
        smallest index among the tied chunk maxima is the row's first argmax), clamped into the vocabulary (a
        NaN row matches nothing, and its token must still be a valid embedding row); the sticky flag set when
        any chunk saw a non-finite logit.

        ``FEED`` (one program for every row): each row's token is also fed back (``tokens[row]``) and kept at the
        step's position (``chosen[row, pos]``), then ``pos`` advances (clamped to ``SLOTS - 1``), so a graph
        replayed step after step needs no host op between steps; one program, so no row reads ``pos`` after it
        moved."""
        if USE_GDC:
            _dependent_launch()
        c = tl.arange(0, BLOCK_C)
        m = c < N_CHUNKS
        if FEED:
            pos = tl.load(pos_ptr)
            first_row = 0
            rows = ROWS
        else:
            first_row = tl.program_id(0)
            rows = 1
        for r in range(rows):
            row = first_row + r
            v = tl.load(val_ptr + row * N_CHUNKS + c, mask=m, other=float("-inf"))
            i = tl.load(idx_ptr + row * N_CHUNKS + c, mask=m, other=V)
            bad = tl.max(tl.load(bad_ptr + row * N_CHUNKS + c, mask=m, other=0), axis=0)
            best = tl.max(v, axis=0)
            tok = tl.minimum(tl.min(tl.where(m & (v == best), i, V), axis=0), V - 1).to(tl.int64)
            tl.store(out_ptr + row, tok)
            tl.store(flag_ptr, bad.to(flag_ptr.dtype.element_ty), mask=bad > 0)  # only ever set: rows may race
            if FEED:
                tl.store(tokens_ptr + row, tok)
                tl.store(chosen_ptr + row * SLOTS + pos, tok)
        if FEED:
            tl.store(pos_ptr, tl.minimum(pos + 1, SLOTS - 1))

    # one compile per rule (N, window or not), length layout, offset and launch mode (plain or PDL): the history's
    # width and row stride change with every cache and refill, and a specialisation per value (== 1, divisible by
    # 16) compiled again inside a continuous run's timed fills (round 31: a GPU test's prefill time held a
    # compile).  The vocabulary stays specialised: it is one value per model, and its divisibility by 16 keeps the
    # mask's row starts aligned for wide stores
    @triton.jit(do_not_specialize=["W", "hist_stride"])
    def _ngram_ban_kernel(
        hist_ptr,
        len_ptr,
        out_ptr,
        W,
        hist_stride,
        V,
        len_offset,
        window,
        LEN_STRIDE: tl.constexpr,
        N: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_S: tl.constexpr,
        USE_GDC: tl.constexpr = False,
    ):
        """One row of :func:`ngram_ban`: its mask cleared, then (after a barrier: another thread of the program
        may set what this one clears) every window of ``N - 1`` tokens inside the history compared with the
        row's last ``N - 1``, the token after each match banned (``N == 1``: every token in the history)."""
        if USE_GDC:
            _dependent_launch()
        row = tl.program_id(0)
        out_row = out_ptr + row * V
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            tl.store(out_row + offs, tl.zeros((BLOCK_V,), dtype=tl.uint8), mask=offs < V)
        tl.debug_barrier()
        hist_row = hist_ptr + row.to(tl.int64) * hist_stride
        length = tl.minimum(tl.load(len_ptr + row * LEN_STRIDE) + len_offset, W)  # never past the history
        one = tl.full((BLOCK_S,), 1, dtype=tl.uint8)
        if N == 1:
            n_pos = tl.minimum(length, W)
            for p0 in range(0, n_pos, BLOCK_S):
                p = p0 + tl.arange(0, BLOCK_S)
                seen = p < n_pos
                if HAS_WINDOW:
                    seen = seen & (p >= length - window)
                tok = tl.load(hist_row + p, mask=seen, other=-1)
                seen = seen & (tok >= 0) & (tok < V)
                tl.store(out_row + tok, one, mask=seen)
        else:
            # windows i = 0 .. length - N lie inside the history (their last token at i + N - 1 <= length - 1)
            n_win = tl.minimum(length - N + 1, W - N + 1)
            if length + 1 >= N:
                for s0 in range(0, n_win, BLOCK_S):
                    i = s0 + tl.arange(0, BLOCK_S)
                    inside = i < n_win
                    if HAS_WINDOW:
                        inside = inside & (i >= length - window)
                    match = inside
                    for j in tl.static_range(N - 1):  # loads masked by the windows alone: none waits on another
                        suffix = tl.load(hist_row + tl.maximum(length - (N - 1) + j, 0))
                        tok = tl.load(hist_row + i + j, mask=inside, other=0)
                        match = match & (tok == suffix)
                    last = tl.load(hist_row + i + (N - 1), mask=inside, other=-1)
                    match = match & (last >= 0) & (last < V)
                    tl.store(out_row + last, one, mask=match)


# ======================================================================================== add_rms_norm
def add_rms_norm_ref(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``summed = x + residual`` (or ``x``), ``normed = RMSNorm(summed)`` exactly as ``decoder.RMSNorm``."""
    summed = x if residual is None else x + residual
    normed = weight * F.rms_norm(summed.float(), (summed.shape[-1],), eps=eps).to(summed.dtype)
    return normed, summed


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Residual add + RMSNorm in one kernel, one program per row: ``(normed, summed)``.

    ``x``, ``residual`` [T, H]; ``summed`` is ``x + residual`` rounded to ``x.dtype`` (``x`` itself when
    ``residual`` is None); ``normed = weight * (rms_norm_fp32(summed) cast to x.dtype)`` rounded to the
    promoted dtype of weight and x, i.e. the same rounding points as ``decoder.RMSNorm``.
    """
    normed, summed, _ = _add_rms_norm(x, residual, weight, eps, f32=False)
    return normed, summed


def add_rms_norm_f32(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`add_rms_norm` plus ``normed.float()`` written by the same kernel: the router's float32 input
    without a cast launch (the same values: each float32 entry is the rounded normed entry, exactly)."""
    normed, summed, f32 = _add_rms_norm(x, residual, weight, eps, f32=True)
    assert f32 is not None
    return normed, summed, f32


def _check_norm_args(x: Tensor, residual: Tensor | None, weight: Tensor) -> Tensor | None:
    """The add + RMSNorm kernels' argument checks; returns ``residual`` made contiguous."""
    if residual is not None:
        residual = _contig(residual, "residual")
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)}")
    if weight.shape != (x.shape[1],):
        raise ValueError(f"weight must be [{x.shape[1]}], got {tuple(weight.shape)}")
    return residual


def _add_rms_norm(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, f32: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    _require("add_rms_norm", x.device)
    x = _contig(x, "x")
    rows, hidden = x.shape
    residual = _check_norm_args(x, residual, weight)
    normed = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    summed = x if residual is None else torch.empty_like(x)
    normed_f32 = torch.empty(x.shape, device=x.device, dtype=torch.float32) if f32 else None
    block = _pow2(hidden)
    _add_rms_norm_kernel[(rows,)](
        x,
        x if residual is None else residual,
        _contig(weight, "weight"),
        normed,
        summed,
        normed if normed_f32 is None else normed_f32,
        hidden,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK_H=block,
        HAS_F32=f32,
        num_warps=4 if block <= 2048 else 8,
        **_pdl(),
    )
    return normed, summed, normed_f32


# ======================================================================================== rope_kv_write
def _check_rope_args(
    qkv: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: Tensor,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    row_tables: Tensor | None = None,
) -> None:
    if row_tables is not None and tuple(row_tables.shape) != (qkv.shape[0], head_dim):
        raise ValueError(f"row_tables: cos/sin must be [B, {head_dim}] (one row per batch row), got {row_tables.shape}")
    width = (n_heads + 2 * n_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width:
        raise ValueError(f"qkv must be [B, {width}] for {n_heads}+2*{n_kv_heads} heads of {head_dim}, got {qkv.shape}")
    want = (qkv.shape[0], n_kv_heads, k_cache.shape[2], head_dim)
    if tuple(k_cache.shape) != want or tuple(v_cache.shape) != want:
        raise ValueError(f"k/v cache must be one layer's [B, kv_heads, max_len, D] = {want}, got {k_cache.shape}")
    _check_pos(pos, qkv.shape[0])


def _check_pos(pos: Tensor, batch: int, name: str = "pos", what: str = "column") -> None:
    """``pos`` must be int64 [1] (one ``what`` for all rows) or [``batch``] (one per row)."""
    if pos.dtype != torch.int64 or pos.shape not in ((1,), (batch,)):
        raise ValueError(
            f"{name} must be an int64 tensor of shape [1] (one {what} for all rows) or [{batch}] (one per row), got"
            f" {pos.dtype} {tuple(pos.shape)}"
        )


def rope_kv_write_ref(
    qkv: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
    pos: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    *,
    row_tables: bool = False,
) -> Tensor:
    """The torch path (``fast._Layer.qkv`` + ``index_copy_``): rotate q and k, write k and v at ``pos``."""
    _check_rope_args(qkv, k_cache, v_cache, pos, n_heads, n_kv_heads, head_dim, cos_table if row_tables else None)
    bsz = qkv.shape[0]
    heads = qkv.view(bsz, n_heads + 2 * n_kv_heads, head_dim)
    qk, v = heads[:, : n_heads + n_kv_heads], heads[:, n_heads + n_kv_heads :]
    if row_tables:  # [B, 1, D]: each row its own position (FusedAttention.project with per-row cos/sin)
        cos, sin = cos_table.unsqueeze(1), sin_table.unsqueeze(1)
    else:
        cos, sin = cos_table.index_select(0, pos), sin_table.index_select(0, pos)  # [1, D]: broadcast
    qk = qk * cos + qk.roll(head_dim // 2, dims=-1) * sin
    rows = torch.arange(bsz, device=qkv.device)
    cols = pos.expand(bsz)  # [B]: row b's column (the same one for every row when pos is [1])
    k_cache[rows, :, cols] = qk[:, n_heads:].to(k_cache.dtype)
    v_cache[rows, :, cols] = v.to(v_cache.dtype)
    return qk[:, :n_heads].contiguous()


def rope_kv_write(
    qkv: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
    pos: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    *,
    row_tables: bool = False,
) -> Tensor:
    """Rotary on q and k, k and v written into one layer's cache at ``pos``; returns rotated q [B, hq, D].

    ``row_tables``: ``cos_table``/``sin_table`` are [B, D], row b's own rotary row (the batched step: every row
    writes cache column ``pos`` but sits at its own position ``len_b + step``).

    ``qkv`` [B, (hq + 2·hk)·D] is the fused QKV GEMM output (one token per row), ``cos_table``/``sin_table``
    [max_positions, D] the rotary tables with rotate_half's sign folded into sin, ``pos`` an int64 device
    tensor [1] (one position for every row, read on the device) or [B] (row b writes column ``pos[b]``: the
    continuous-batching step, whose slots sit at their own columns), ``k_cache``/``v_cache`` [B, hk, max_len, D].
    Grid (B, hq + 2·hk): one program per head row; ``x*cos`` and ``roll(x)*sin`` are rounded to the
    activation dtype before their sum, as the torch expression does (bit-identical results).  ``pos`` must
    be < max_len: it lives on the device, so it is not checked here (``StaticKVCache.check_room`` does).
    """
    _require("rope_kv_write", qkv.device)
    _check_rope_args(qkv, k_cache, v_cache, pos, n_heads, n_kv_heads, head_dim, cos_table if row_tables else None)
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads {n_heads} must be a multiple of n_kv_heads {n_kv_heads}")
    bsz = qkv.shape[0]
    q = torch.empty((bsz, n_heads, head_dim), device=qkv.device, dtype=qkv.dtype)
    _rope_kv_write_kernel[(bsz, n_heads + 2 * n_kv_heads)](
        _contig(qkv, "qkv"),
        _contig(cos_table, "cos_table"),
        _contig(sin_table, "sin_table"),
        pos,
        q,
        _contig(k_cache, "k_cache"),
        _contig(v_cache, "v_cache"),
        k_cache.shape[2],
        HQ=n_heads,
        HK=n_kv_heads,
        D=head_dim,
        BLOCK_D=_pow2(head_dim),
        ROW_TABLES=row_tables,
        POS_STRIDE=0 if pos.shape[0] == 1 else 1,
        num_warps=1,
        **_pdl(),
    )
    return q


def qkv_rope(
    x: Tensor,
    wqkv: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
    pos: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    *,
    norm: tuple[Tensor | None, Tensor, float, Tensor] | None = None,
) -> Tensor:
    """:func:`linear_rows` of the fused QKV weight followed by :func:`rope_kv_write`, in one launch: returns the
    rotated q [T, hq, D] and writes the rotated k and the v of every row at cache column ``pos`` ([1], one
    position for every row: the single-page step).

    ``norm = (residual, weight, eps, summed)``: ``x`` is the layer's input before its add + RMSNorm, which the
    kernel applies first (:func:`add_rms_norm`'s math; ``summed`` [T, K] receives ``x + residual``, unless
    ``residual`` is None: then it must be ``x`` itself and is not written), so the norm's launch goes too.

    Each program computes ``2·PAIRS`` output channels of one head, chosen as rotary pairs (j, j + D/2), so it
    holds both values the rotary mixes: the projection's sums are linear_rows' (the same [4, 256] weight tiles at
    the default sizes, the same K-block order, one rounding) and the rotary is rope_kv_write's arithmetic, so the
    outputs equal the two launches' bit for bit at those sizes.  Saves one launch per layer."""
    _require("qkv_rope", x.device)
    if x.dim() != 2 or wqkv.dim() != 2 or x.shape[1] != wqkv.shape[1] or x.dtype != wqkv.dtype:
        raise ValueError(
            f"qkv_rope needs x [T, K] and wqkv [N, K] of one dtype, got {tuple(x.shape)} {tuple(wqkv.shape)}"
        )
    rows, k = x.shape
    n = wqkv.shape[0]
    if n != (n_heads + 2 * n_kv_heads) * head_dim or head_dim % 2 or n_heads % n_kv_heads:
        raise ValueError(f"wqkv [{n}, {k}] does not hold q/k/v of {n_heads}+2*{n_kv_heads} heads of {head_dim}")
    _check_rope_args(x.new_empty((rows, n)), k_cache, v_cache, pos, n_heads, n_kv_heads, head_dim)
    if pos.shape != (1,):
        raise ValueError(f"qkv_rope writes one cache column for every row: pos must be [1], got {tuple(pos.shape)}")
    norm_args: dict[str, Any] = {}
    if norm is not None:
        residual, weight, eps, summed = norm
        if weight.shape != (k,) or weight.dtype != x.dtype:
            raise ValueError(f"norm weight must be [{k}] {x.dtype}, got {weight.dtype} {tuple(weight.shape)}")
        if residual is None and summed is not x:
            raise ValueError("without a residual the sum is x itself: pass summed=x")
        if residual is not None and (residual.shape != x.shape or summed.shape != x.shape or summed is x):
            raise ValueError(f"residual and summed must be new [{rows}, {k}] tensors like x")
        norm_args = dict(
            res_ptr=x if residual is None else _contig(residual, "residual"),
            nw_ptr=_contig(weight, "norm weight"),
            summed_ptr=_contig(summed, "summed"),
            eps=float(eps),
            HAS_NORM=True,
            HAS_RESIDUAL=residual is not None,
            BLOCK_H=_pow2(k),
        )
    bn, bk = linear_block_sizes(n, k, _sm_count(x.device), INTERPRETED)
    pairs = max(1, min(bn // 2, head_dim // 2))
    while (head_dim // 2) % pairs:
        pairs //= 2
    q = torch.empty((rows, n_heads, head_dim), device=x.device, dtype=x.dtype)
    _qkv_rope_kernel[(rows, n // (2 * pairs))](
        _contig(x, "x"),
        _contig(wqkv, "wqkv"),
        _contig(cos_table, "cos_table"),
        _contig(sin_table, "sin_table"),
        pos,
        q,
        _contig(k_cache, "k_cache"),
        _contig(v_cache, "v_cache"),
        k_cache.shape[2],
        k,
        HQ=n_heads,
        HK=n_kv_heads,
        D=head_dim,
        PAIRS=pairs,
        BLOCK_K=bk,
        EVEN_K=k % bk == 0,
        num_warps=4,
        **norm_args,
        **_pdl(),
    )
    return q


# ======================================================================================== prompt_rope_kv_write
def _check_prompt_rope_args(
    qkv: Tensor, cos: Tensor, k_cache: Tensor, v_cache: Tensor, start: int, n_heads: int, n_kv_heads: int, head_dim: int
) -> None:
    bsz, length, width = qkv.shape
    if width != (n_heads + 2 * n_kv_heads) * head_dim:
        raise ValueError(f"qkv rows must be (q, k, v heads) x {head_dim}, got width {width}")
    if cos.shape not in ((1, length, head_dim), (bsz, length, head_dim)):
        raise ValueError(f"cos/sin must be [1|{bsz}, {length}, {head_dim}], got {tuple(cos.shape)}")
    want = (bsz, n_kv_heads, k_cache.shape[2], head_dim)
    if k_cache.shape != want or v_cache.shape != want:
        raise ValueError(f"k/v cache must be {want}, got {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if not 0 <= start <= k_cache.shape[2] - length:
        raise ValueError(f"positions {start}..{start + length - 1} do not fit the cache's {k_cache.shape[2]} columns")


def prompt_rope_kv_write_ref(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    start: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
) -> Tensor:
    """The torch path of a prompt's attention input (``FusedAttention.project`` + ``StaticKVCache.write``): rotate
    q and k of ``qkv`` [B, L, (HQ + 2·HK)·D] by ``cos`` / signed ``sin`` [B|1, L, D], write k and v into this
    layer's cache [B, HK, max_len, D] at columns ``start..start+L-1``; the rotated q [B, L, HQ, D]."""
    _check_prompt_rope_args(qkv, cos, k_cache, v_cache, start, n_heads, n_kv_heads, head_dim)
    bsz, length, _ = qkv.shape
    heads = qkv.view(bsz, length, n_heads + 2 * n_kv_heads, head_dim)
    qk, v = heads[:, :, : n_heads + n_kv_heads], heads[:, :, n_heads + n_kv_heads :]
    cos4, sin4 = cos.unsqueeze(2), sin.unsqueeze(2)
    qk = qk * cos4 + qk.roll(head_dim // 2, dims=-1) * sin4
    k_cache[:, :, start : start + length] = qk[:, :, n_heads:].transpose(1, 2)
    v_cache[:, :, start : start + length] = v.transpose(1, 2)
    return qk[:, :, :n_heads].contiguous()


def prompt_rope_kv_write(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    start: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
) -> Tensor:
    """:func:`prompt_rope_kv_write_ref` in one kernel, one program per prompt token (all its heads): the same
    rounding points as torch's rotation (bit-identical q and cache contents), one launch instead of a roll, two
    products, a sum and two cache copies."""
    _require("prompt_rope_kv_write", qkv.device)
    _check_prompt_rope_args(qkv, cos, k_cache, v_cache, start, n_heads, n_kv_heads, head_dim)
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    _contig(k_cache, "k_cache"), _contig(v_cache, "v_cache")  # the kernel addresses the cache densely
    bsz, length, _ = qkv.shape
    qkv = _contig(qkv, "qkv")
    cos, sin = _contig(cos, "cos"), _contig(sin, "sin")
    q = torch.empty((bsz, length, n_heads, head_dim), device=qkv.device, dtype=qkv.dtype)
    _prompt_rope_kv_kernel[(bsz * length,)](
        qkv,
        cos,
        sin,
        q,
        k_cache,
        v_cache,
        length,
        start,
        k_cache.shape[2],
        0 if cos.shape[0] == 1 else length * head_dim,
        HQ=n_heads,
        HK=n_kv_heads,
        D=head_dim,
        BLOCK_H=_pow2(n_heads + 2 * n_kv_heads),
        num_warps=4,
        **_pdl(),
    )
    return q


# ======================================================================================== decode_attention
def decode_attention_ref(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, scale: float, *, key_mask: Tensor | None = None
) -> Tensor:
    """``softmax(q·kᵀ·scale + key_mask) v`` over keys ``0..pos``, all in float32, rounded once at the end.

    More exact than the torch decode path (``decode_attention="matmul"`` rounds scores and probabilities to
    bf16); the kernel follows this one.  ``q`` [B, hq, D], caches [B, hk, max_len, D]; returns [B, hq·D].
    """
    bsz, hq, dim = q.shape
    rep = hq // k_cache.shape[1]
    k, v = k_cache.float(), v_cache.float()
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhd,bhnd->bhn", q.float(), k) * scale
    if key_mask is not None:  # [B|1, n <= max_len] additive
        n = key_mask.shape[-1]
        scores = scores[..., :n] + key_mask.float().reshape(-1, 1, n)
        k, v = k[:, :, :n], v[:, :, :n]
    keep = torch.arange(k.shape[2], device=q.device) <= pos.view(-1, 1, 1)  # [B|1, 1, n]: per row or shared
    probs = torch.where(keep, scores, float("-inf")).softmax(dim=-1)
    out = torch.einsum("bhn,bhnd->bhd", probs, v)
    return out.to(q.dtype).reshape(bsz, hq * dim)


# Keys one attention program streams at most (before a row's keys are cut into more splits): a program's blocks
# are a chain of dependent loads and reductions, so one (row, head) over thousands of keys in one program is
# latency-bound however many other programs run (the continuous step at 64 slots with 5,000-key rows).
KEYS_PER_SPLIT = 256

# Whether a decode attention launched as a dependent launch (:func:`dependent_launches`) asks L2 for its K and V rows
# before its wait (``_attn_partial_kernel``'s ``PF_KV``: a hint that changes no value), so they stream in while the
# kernel before (the QKV projection) runs.  ``decode_attention(prefetch=...)`` overrides.  GPU only.
# H200, round 18 (bench_fast, decode step, three runs, each on / off in one run): 0.605 -> 0.590, 0.604 -> 0.593,
# 0.601 -> 0.593 ms/token, the same greedy tokens.
ATTN_PREFETCH = True


def attention_splits(
    batch_heads: int, n_keys: int, block_n: int, sms: int, keys_per_split: int = KEYS_PER_SPLIT
) -> int:
    """Number of key splits per (row, head) over (at most) ``n_keys`` keys: enough for ~2 programs per SM, and
    enough that no program streams more than ``keys_per_split`` keys; never more splits than ``block_n`` blocks."""
    wanted = max(math.ceil(2 * sms / batch_heads), math.ceil(n_keys / keys_per_split))
    return max(1, min(math.ceil(n_keys / block_n), wanted))


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: Tensor,
    scale: float,
    *,
    block_n: int | None = None,
    n_splits: int | None = None,
    keys_per_split: int = KEYS_PER_SPLIT,
    key_mask: Tensor | None = None,
    counters: Tensor | None = None,
    prefetch: bool | None = None,
    key_first: Tensor | None = None,
) -> Tensor:
    """Decode attention of ``q`` [B, hq, D] over keys ``0..pos`` of one layer's cache; returns [B, hq·D].

    ``key_mask``: an additive mask [B or 1, n] over cache columns (0 / -inf, e.g. the batched step's left pads),
    ``n`` > ``pos`` (the caller's to ensure: ``pos`` lives on the device); added to the scores before the softmax,
    a key block that it masks entirely contributes nothing (no NaN); keys past its width are not read.  ``pos``
    [1] (one last key for every row) or [B] (row b's own: the continuous-batching step).

    Flash-decoding in two kernels.  (1) grid (B·hq, n_splits): the keys ``0..pos`` (``pos`` read on the
    device) are divided evenly among the splits in ``block_n``-key blocks; each program streams its blocks
    of K and V once ([block_n, D] tiles, contiguous along D), keeps an online-softmax max / sum / fp32
    accumulator and writes them to scratch; keys past ``pos`` are never loaded.  (2) grid (B·hq,): rescale
    and sum the partials, divide, round once.  ``n_splits`` (host int; by default :func:`attention_splits` of B·hq
    and the keys that can be read, ``max_len`` or the mask's width, with ``keys_per_split``; scratch is
    [B·hq, n_splits, D] fp32) fixes the launch shape, so one CUDA graph serves every ``pos``.  GQA: query
    head h reads kv head ``h // (hq // hk)`` (re-read per query head; the model is MHA).  ``pos`` < max_len
    is the caller's to ensure (not checked: it lives on the device).

    ``counters``: int32 [>= B·hq], all zero (:func:`attention_counters`), kept by the caller across calls: then
    one launch instead of two, the split that finishes last for a row-head combining its partials (and setting
    its counter back to zero, so the buffer serves the next call and every graph replay).

    ``prefetch`` (None: ``ATTN_PREFETCH``): as a dependent launch on a GPU, each program asks L2 for its K / V rows
    before the wait; no value changes, and elsewhere it does nothing.

    ``key_first``: int64 [1] or [B] (device), the first column each row may see, ``<= pos``; the keys before it
    are not read at all (the static batched step's left pads, and a finished row's whole context but its last
    key).  It must agree with ``key_mask``: with those keys masked there, the outputs are the same bits as
    without ``key_first``; without a mask, they are attention over keys ``first..pos``.
    """
    _require("decode_attention", q.device)
    bsz, hq, dim = q.shape
    hk, max_len = k_cache.shape[1], k_cache.shape[2]
    if tuple(k_cache.shape) != (bsz, hk, max_len, dim) or v_cache.shape != k_cache.shape or hq % hk:
        raise ValueError(f"caches {tuple(k_cache.shape)} do not fit q {tuple(q.shape)} (need [B, hk, max_len, D])")
    _check_pos(pos, bsz)
    launch_args: dict[str, object] = {}
    key_limit = max_len
    if key_mask is not None:
        if key_mask.dim() != 2 or key_mask.shape[0] not in (1, bsz) or key_mask.shape[1] > max_len:
            raise ValueError(f"key_mask must be [{bsz} or 1, n <= {max_len}], got {tuple(key_mask.shape)}")
        key_mask = _contig(key_mask, "key_mask")
        stride = key_mask.stride(0) if key_mask.shape[0] == bsz and bsz > 1 else 0
        launch_args = dict(mask_ptr=key_mask, mask_stride=stride, HAS_MASK=True)
        key_limit = key_mask.shape[1]
    if key_first is not None:
        _check_pos(key_first, bsz, "key_first", "first column")
        if key_first.device != q.device:
            raise ValueError(f"key_first must be on {q.device} like q, got {key_first.device}")
        stride_first = 0 if key_first.shape[0] == 1 else 1
        launch_args.update(first_ptr=_contig(key_first, "key_first"), FIRST_STRIDE=stride_first, HAS_FIRST=True)
    if block_n is None:  # [64, D] K and V tiles: 64 elements per thread at 4 warps (D = 128), no spills
        block_n = 64 if q.device.type == "cuda" else 256
    splits = n_splits or attention_splits(bsz * hq, key_limit, block_n, _sm_count(q.device), keys_per_split)
    rows = bsz * hq
    m = torch.empty((rows, splits), device=q.device, dtype=torch.float32)
    den = torch.empty((rows, splits), device=q.device, dtype=torch.float32)
    acc = torch.empty((rows, splits, dim), device=q.device, dtype=torch.float32)
    out = torch.empty((bsz, hq * dim), device=q.device, dtype=q.dtype)
    block_d = _pow2(dim)
    if counters is not None:
        if counters.dtype != torch.int32 or counters.dim() != 1 or counters.numel() < rows:
            raise ValueError(f"counters must be int32 [>= {rows}], got {counters.dtype} {tuple(counters.shape)}")
        launch_args.update(out_ptr=out, count_ptr=counters, BLOCK_S=_pow2(splits), FUSED_COMBINE=True)
    warps = 4
    pdl = _pdl()
    if pdl and (ATTN_PREFETCH if prefetch is None else prefetch):  # ahead of the wait only: with a dependent launch
        launch_args.update(PF_KV=True, PF_LANES=32 * warps)
    _attn_partial_kernel[(rows, splits)](
        _contig(q, "q"),
        _contig(k_cache, "k_cache"),
        _contig(v_cache, "v_cache"),
        pos,
        m,
        den,
        acc,
        float(scale) * math.log2(math.e),
        max_len,
        HQ=hq,
        HK=hk,
        D=dim,
        N_SPLITS=splits,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=warps,
        POS_STRIDE=0 if pos.shape[0] == 1 else 1,
        key_limit=key_limit,
        **launch_args,
        **pdl,
    )
    if counters is None:
        _attn_combine_kernel[(rows,)](
            m, den, acc, out, D=dim, N_SPLITS=splits, BLOCK_S=_pow2(splits), BLOCK_D=block_d, num_warps=2, **_pdl()
        )
    return out


def attention_counters(rows: int, device: torch.device | str) -> Tensor:
    """The zeroed per-row-head counters of :func:`decode_attention`'s one-launch form (``rows`` = B·hq)."""
    return torch.zeros(rows, dtype=torch.int32, device=device)


# ======================================================================================== moe_route
def moe_route_ref(
    x: Tensor,
    gate_w32: Tensor,
    top_k: int,
    counts: Tensor | None = None,
    scaling: float = 1.0,
    renormalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """``route_tokens(F.linear(x.float(), gate_w32), ...)`` plus ``counts.index_add_`` of the picks."""
    idx, weights = route_tokens(
        F.linear(x.float(), gate_w32), top_k, norm_topk_prob=renormalize, routed_scaling_factor=scaling
    )
    if counts is not None:
        flat = idx.reshape(-1)
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=counts.dtype))
    return idx, weights


def _check_router_args(
    hidden: int, gate_w32: Tensor, top_k: int, counts: Tensor | None, any_float: bool = False
) -> int:
    """The router kernels' argument checks (``any_float``: the router weight in any float dtype, as
    :func:`moe_route_rows` takes it, else float32); returns the number of experts."""
    n_experts = gate_w32.shape[0]
    name, wanted = ("gate", "a float") if any_float else ("gate_w32", "float32")
    fits = gate_w32.is_floating_point() if any_float else gate_w32.dtype == torch.float32
    if gate_w32.shape != (n_experts, hidden) or not fits:
        raise ValueError(f"{name} must be {wanted} [E, {hidden}], got {gate_w32.dtype} {tuple(gate_w32.shape)}")
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be in 1..{n_experts}, got {top_k}")
    if counts is not None and (counts.shape != (n_experts,) or counts.dtype != torch.int64):
        raise ValueError(f"counts must be int64 [{n_experts}], got {counts.dtype} {tuple(counts.shape)}")
    return n_experts


def moe_route(
    x: Tensor,
    gate_w32: Tensor,
    top_k: int,
    counts: Tensor | None = None,
    scaling: float = 1.0,
    renormalize: bool = False,
    *,
    logits: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Router in one kernel, one program per token: (expert ids int64 [T, k], weights float32 [T, k]).

    With ``logits`` (float32 [T, E], e.g. ``F.linear(x.float(), gate_w32)`` by cuBLAS, exactly the torch
    path's logits) the kernel only does the softmax / top-k / counts part: on an H200 the one-program GEMV
    below is latency-bound (~15 us per token), cuBLAS + this kernel take about half of that.

    float32 logits ``x.float() @ gate_w32.T`` ([E, BLOCK_K] tiles along H), softmax over all E experts,
    greedy top-k by repeated max (sorted by weight, lowest index first on ties), optional renormalisation
    over the k picks (+1e-20, only when k > 1, as ``route_tokens``), times ``scaling``; with ``counts``
    (int64 [E]) one ``atomic_add`` per pick.  The ids equal ``route_tokens``' except where two scores tie
    to float32 rounding (the GEMV sums in another order) or exactly (``torch.topk`` orders exact ties its
    own way).  One program reads the whole router (E·H·4 bytes, 328 KB at E=64, H=1280) from one SM: fine
    for T <= 8, but latency-bound; a split-H grid (partial logits + a top-k kernel) is the next step if the
    benchmark shows it.
    """
    _require("moe_route", x.device)
    x = _contig(x, "x")
    n_tokens, hidden = x.shape
    n_experts = _check_router_args(hidden, gate_w32, top_k, counts)
    if logits is not None and (logits.shape != (n_tokens, n_experts) or logits.dtype != torch.float32):
        raise ValueError(f"logits must be float32 [{n_tokens}, {n_experts}], got {logits.dtype} {tuple(logits.shape)}")
    idx = torch.empty((n_tokens, top_k), device=x.device, dtype=torch.int64)
    weights = torch.empty((n_tokens, top_k), device=x.device, dtype=torch.float32)
    block_e = _pow2(n_experts)
    _moe_route_kernel[(n_tokens,)](
        x if logits is None else _contig(logits, "logits"),
        _contig(gate_w32, "gate_w32"),
        idx,
        weights,
        idx if counts is None else counts,
        hidden,
        float(scaling),
        E=n_experts,
        TOP_K=top_k,
        RENORM=bool(renormalize) and top_k > 1,
        HAS_COUNTS=counts is not None,
        BLOCK_E=block_e,
        BLOCK_KSLOT=_pow2(top_k),
        BLOCK_K=max(16, min(_pow2(hidden), 8192 // block_e)),
        LOGITS_IN=logits is not None,
        num_warps=8 if logits is None else 2,
        **_pdl(),
    )
    return idx, weights


def route_rows_block_sizes(n_tokens: int, interpreter: bool = False, bf16: bool = True) -> tuple[int, int]:
    """(block_m, block_k) of :func:`moe_route_rows` (``bf16``: the tensor-core operands, else float32); the
    interpreter's few large blocks.  H200 (round 17, bench_kernels, bf16 operands, graph-timed): at 913 rows
    [64, 128] 7.46 us, [16, 128] at 2 warps 7.53, [16, 64] 7.81, [64, 64] 9.13, [32, 64] 9.73, [32, 128] 9.99 (the
    cast + cuBLAS + top-k it replaces: 24.2); at 32 and 64 rows [32, 64] 8.7 us (vs 14.1 / 14.5).  Each program
    reads the whole router from L2: few, large row blocks.  Float32 operands keep [32, 64], the form the GPU tests
    ran (98 us at 913 rows: a fallback for float32 models, not a fast path)."""
    if interpreter:
        return 64, 128
    return (64, 128) if bf16 and n_tokens >= 256 else (32, 64)


def exact_bf16(gate: Tensor) -> Tensor | None:
    """``gate`` as bf16 when that loses nothing (every value is a bf16 value: a bf16 checkpoint's router widened to
    float32), else None: :func:`moe_route_rows` then multiplies bf16 rows by it on the tensor cores, products
    exact in float32, instead of float32 operands in IEEE float32 on the CUDA cores."""
    low = gate.to(torch.bfloat16)
    return low if torch.equal(low.to(gate.dtype), gate) else None


def moe_route_rows(
    x: Tensor,
    gate: Tensor,
    top_k: int,
    scaling: float = 1.0,
    renormalize: bool = False,
    *,
    counts: Tensor | None = None,
    block_m: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
) -> tuple[Tensor, Tensor]:
    """The router of many rows in one launch: (expert ids int64 [T, k], weights float32 [T, k]).

    Replaces ``moe_route(x, gate_w32, logits=F.linear(x.float(), gate_w32))``: the float32 cast of ``x``, cuBLAS's
    float32 GEMM (on an H200 two sm80 kernels, ~14 us at the Gundam page's 913 rows) and the top-k kernel.  Grid
    cdiv(T, block_m): a program computes its rows' float32 logits ``x.float() @ gate.float().T`` with ``tl.dot``
    over [block_m, block_k] x [block_k, E] tiles into a float32 accumulator, then routes every row as
    :func:`moe_route` does (softmax over E, greedy top-k, lowest index first on ties, optional renormalisation over
    the k picks (+1e-20, only when k > 1), times ``scaling``).  ``x`` bf16 with ``gate`` bf16 (:func:`exact_bf16`
    of a bf16 checkpoint's router: the same values as its float32 copy) runs on the tensor cores, every product
    exact in float32; float32 operands (either of them) run in IEEE float32 (several times slower on a GPU).  The
    logits are float32 sums in another order than cuBLAS's, so the ids equal ``route_tokens``' except where two
    scores tie to float32 rounding.  ``counts`` (int64 [E]): each program adds its rows' picks per expert, one
    ``atomic_add`` per expert it picked (the batched decode step's routing counters; the prompt path counts its picks
    in its sort, :func:`prompt_moe.align`, and passes none).
    """
    _require("moe_route_rows", x.device)
    x = _contig(x, "x")
    n_tokens, hidden = x.shape
    n_experts = _check_router_args(hidden, gate, top_k, counts, any_float=True)
    if x.dtype != gate.dtype:  # one operand dtype for tl.dot: float32 unless both are bf16
        x, gate = (x, gate) if gate.dtype == torch.float32 else (x, gate.float())
    bf16 = x.dtype == gate.dtype == torch.bfloat16
    auto = route_rows_block_sizes(n_tokens, x.device.type != "cuda", bf16)
    block_m, block_k = block_m or auto[0], block_k or auto[1]
    if block_m < 16 or block_k < 16:
        raise ValueError(f"block_m and block_k must be >= 16 (tl.dot's smallest tile), got {block_m}, {block_k}")
    idx = torch.empty((n_tokens, top_k), device=x.device, dtype=torch.int64)
    weights = torch.empty((n_tokens, top_k), device=x.device, dtype=torch.float32)
    if n_tokens == 0:
        return idx, weights
    _route_rows_kernel[(triton.cdiv(n_tokens, block_m),)](
        x,
        _contig(gate, "gate"),
        idx,
        weights,
        idx if counts is None else counts,
        n_tokens,
        hidden,
        float(scaling),
        E=n_experts,
        TOP_K=top_k,
        RENORM=bool(renormalize) and top_k > 1,
        HAS_COUNTS=counts is not None,
        UPCAST=x.device.type != "cuda",
        BLOCK_M=block_m,
        BLOCK_E=max(16, _pow2(n_experts)),
        BLOCK_K=block_k,
        BLOCK_KSLOT=_pow2(top_k),
        num_warps=num_warps,
        **_pdl(),
    )
    return idx, weights


# ======================================================================================== add_rms_norm_route
def add_rms_norm_route_ref(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor,
    eps: float,
    gate_w32: Tensor,
    top_k: int,
    counts: Tensor | None = None,
    scaling: float = 1.0,
    renormalize: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Torch math of :func:`add_rms_norm_route`: ``(normed, summed)`` of :func:`add_rms_norm_ref`, then
    :func:`moe_route_ref` of ``normed`` -> (normed, summed, ids, weights)."""
    normed, summed = add_rms_norm_ref(x, residual, weight, eps)
    idx, weights = moe_route_ref(normed, gate_w32, top_k, counts, scaling, renormalize)
    return normed, summed, idx, weights


# add_rms_norm_route's rows per program above 8 rows (the batched steps' norms with batched_fused_router): 1 until
# timed (bench_kernels' norm_route rows at 2 / 4 / 8 rows a program, and the batched step's fused-router variants)
NORM_ROUTE_ROWS = 1


def route_flags(rows: int, device: torch.device | str) -> Tensor:
    """The zeroed per-row counters of :func:`add_rms_norm_route` (the kernel sets them back to zero)."""
    return torch.zeros(rows, dtype=torch.int32, device=device)


def add_rms_norm_route(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor,
    eps: float,
    gate_w32: Tensor,
    top_k: int,
    flags: Tensor,
    counts: Tensor | None = None,
    scaling: float = 1.0,
    renormalize: bool = False,
    *,
    experts_per_program: int = 4,
    rows_per_program: int | None = None,
    num_warps: int = 4,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A MoE layer's post-attention residual add + RMSNorm and its router in one launch:
    (normed, summed, expert ids int64 [T, k], weights float32 [T, k]).

    Replaces :func:`add_rms_norm` followed by the router (cuBLAS float32 logits + :func:`moe_route`): four
    launches, each a few microseconds of latency at one row.  Grid (T, ceil(E / experts_per_program)) at one row
    a program (below for several): every program adds and normalises the whole row (:func:`add_rms_norm`'s math
    and rounding points; it stores its slice of ``normed`` and ``summed``), computes the float32 logits of its
    experts (router rows loaded before the dependent-launch wait, since they do not depend on the kernel before)
    and stores them to a scratch row; the program that finishes last (a per-row counter in ``flags``, int32
    [>= T], zero between calls; :func:`route_flags`) reads the row's logits and routes it as :func:`moe_route`
    does, then re-arms its counter.  The logits are summed in another order than cuBLAS's, so ids match the torch
    path's except where two scores tie to float32 rounding.

    ``rows_per_program`` (None: 1 up to 8 rows, else ``NORM_ROUTE_ROWS``): each program loads its experts' router
    rows once and takes that many rows one after the other, each with the one-row math, so the outputs keep their
    bits; grid (ceil(T / rows_per_program), ceil(E / experts_per_program)).  With one row a program, 64 rows read
    the float32 router (327 KB a layer) 64 times from L2.
    """
    _require("add_rms_norm_route", x.device)
    x = _contig(x, "x")
    rows, hidden = x.shape
    residual = _check_norm_args(x, residual, weight)
    n_experts = _check_router_args(hidden, gate_w32, top_k, counts)
    if flags.dtype != torch.int32 or flags.dim() != 1 or flags.numel() < rows:
        raise ValueError(f"flags must be int32 [>= {rows}] (route_flags), got {flags.dtype} {tuple(flags.shape)}")
    if experts_per_program < 1 or experts_per_program & (experts_per_program - 1):
        raise ValueError(f"experts_per_program must be a power of two, got {experts_per_program}")
    per_row = (1 if rows <= 8 else NORM_ROUTE_ROWS) if rows_per_program is None else rows_per_program
    if per_row < 1:
        raise ValueError(f"rows_per_program must be >= 1, got {per_row}")
    normed = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    summed = x if residual is None else torch.empty_like(x)
    logits = torch.empty((rows, n_experts), device=x.device, dtype=torch.float32)
    idx = torch.empty((rows, top_k), device=x.device, dtype=torch.int64)
    weights = torch.empty((rows, top_k), device=x.device, dtype=torch.float32)
    per = min(experts_per_program, _pow2(n_experts))
    _norm_route_kernel[(triton.cdiv(rows, per_row), triton.cdiv(n_experts, per))](
        x,
        x if residual is None else residual,
        _contig(weight, "weight"),
        normed,
        summed,
        _contig(gate_w32, "gate_w32"),
        logits,
        flags,
        idx,
        weights,
        idx if counts is None else counts,
        rows,
        hidden,
        float(eps),
        float(scaling),
        E=n_experts,
        TOP_K=top_k,
        RENORM=bool(renormalize) and top_k > 1,
        HAS_COUNTS=counts is not None,
        HAS_RESIDUAL=residual is not None,
        E_PER=per,
        BLOCK_H=_pow2(hidden),
        BLOCK_E=_pow2(n_experts),
        BLOCK_KSLOT=_pow2(top_k),
        ROWS=per_row,
        num_warps=num_warps,
        **_pdl(),
    )
    return normed, summed, idx, weights


# ======================================================================================== moe_experts
def stack_always_on(
    w13: Tensor, w2: Tensor, gate: Tensor, up: Tensor, down: Tensor, n_slots: int
) -> tuple[Tensor, Tensor]:
    """Routed stacks with an always-on SiLU-gated MLP appended as ``n_slots`` expert slots (a copy).

    ``gate``/``up`` [n_slots·I, H], ``down`` [H, n_slots·I] (e.g. the shared experts, I·n_slots = 1792).
    Exact: ``down(silu(G x) * (U x)) = Σ_j down[:, j-th I cols] (silu(G_j x) * (U_j x))`` since the
    activation is elementwise over the intermediate dim; slot j gets rows ``j·I..(j+1)·I`` of gate and up
    and the matching columns of down.  Returns (w13 [S + n_slots, 2I, H], w2 [S + n_slots, H, I]), new
    tensors holding the routed experts too: build them once at load and re-point the modules' weights to
    views of them (as ``stacked_expert_weights`` does) to keep a single copy of the expert weights.
    """
    _, two_i, hidden = w13.shape
    inter = two_i // 2
    if gate.shape != (n_slots * inter, hidden) or up.shape != gate.shape or down.shape != (hidden, n_slots * inter):
        raise ValueError(f"always-on MLP must be {n_slots} x {inter} wide over hidden {hidden}, got {gate.shape}")
    extra13 = torch.cat((gate.view(n_slots, inter, hidden), up.view(n_slots, inter, hidden)), dim=1)
    extra2 = down.view(hidden, n_slots, inter).transpose(0, 1)
    return torch.cat((w13, extra13.to(w13.dtype))), torch.cat((w2, extra2.to(w2.dtype)))


# The up kernel's K loop software-pipelined over this many stages: the next step's gate/up tiles are copied into
# shared memory (cp.async) while this one is summed; 0: a plain loop.  ``moe_experts(stages_up=...)`` overrides.
# H200, round 9 (bench_kernels, both expert kernels per layer): T=1 23.0 -> 22.0 us (3 stages 22.7, 4 23.6), T=4
# 62.2 -> 48.5 us; in the batch-1 step 0.659 -> 0.658 ms/token, the same greedy tokens.  Also measured and dropped:
# the K loop unrolled with its tiles held in registers (T=1 24.4 us, T=4 53.5) and the down kernel's routing and
# weights loaded before its dependent-launch wait (T=1 26.5 -> 26.0 us as dependent launches, T=4 60.1 -> 70.9).
# Round 10 also measured the down kernel's (slot, K block) steps as one software-pipelined loop (cp.async copies
# after the wait, bit-identical): both kernels T=1 21.9 -> 23.1 / 22.1 / 22.9 us at 2 / 3 / 4 stages, T=4 48.4 ->
# 52.4 / 53.0 / 53.8; the batch-1 step 0.652 -> 0.750 / 0.678 / 0.690 ms/token; and the down kernel compiled for
# I = 896 (a constexpr, so its one-block K loop folds away): T=1 21.8 -> 22.9 us, T=4 48.4 -> 56.3, the step 0.652
# -> 0.641 ms/token.  Both dropped (code removed).  Round 18 measured L2 prefetches (``prefetch.global.L2``) issued
# by this kernel, each form in two bench_fast runs of the batch-1 step: every slot's down matrix (always-on slots
# before the dependent-launch wait, routed ones once their id was loaded) 0.605 -> 0.636 and 0.593 -> 0.624 ms/token;
# with the always-on slots' own gate / up rows too 0.634 / 0.622; those rows alone 0.593 -> 0.597; an "evict_first"
# hint on the gate / up loads changed nothing.  Dropped (code removed): the prefetch traffic slows the latency-bound
# kernel it overlaps more than the expert kernels gain.
UP_STAGES = 2


def moe_block_sizes(
    n_tokens: int,
    n_slots: int,
    hidden: int,
    inter: int,
    sms: int,
    interpreter: bool = False,
    block_n: int | None = None,
    block_h: int | None = None,
) -> tuple[int, int, int, int]:
    """(block_n, block_k_up, block_h, block_k_down) of :func:`moe_experts`; given rows are kept.

    GPU: 16 rows per program for up; for down 2 at T=1 and 4 from T=2 on (the sweeps' best: H200, 2026-12-01
    and 2026-12-02, ``bench_kernels.py --sweep``), then a reduction width giving ~``TILE_ELEMS`` weights per tile
    and operand.  At T=1, 8 slots, H=1280, I=896 on 132 SMs: up [16, 256] tiles on a 8x56 grid, down [2, 1024]
    tiles (896 masked) on 1x640.
    The interpreter runs programs one after another with numpy: few, large tiles.
    """
    if interpreter:
        block_n = block_n or min(256, _pow2(inter))
        block_h = block_h or min(256, _pow2(hidden))
        tile = INTERPRETER_TILE_ELEMS
    else:
        # Measured (bench_kernels --sweep, H200, T=1 and T=4): the smallest row blocks tried (16 up, 4 down)
        # were fastest at both T (T=4: 62 us vs 99 us with 64/16): more programs, more loads in flight.  Below
        # those (2026-12-02): up 4 / 8 rows lost; down 2 rows at 4 warps took T=1 from 28.0 to 23.6 us per layer
        # (1 row: 23.9), T=4 unchanged (61.4 either way)
        block_n = block_n or 16
        block_h = block_h or (2 if n_tokens == 1 else 4)
        tile = TILE_ELEMS
    block_k_up = max(32, min(_pow2(hidden), tile // block_n))
    block_k_down = max(32, min(_pow2(inter), tile // block_h))
    return block_n, block_k_up, block_h, block_k_down


# The down GEMV's two forms (``moe_experts(down=...)``).  "rows": :func:`_moe_down_kernel`, a program per (token,
# block of hidden rows) runs over every slot (at T=1 on an H200: 18.4 MB per layer in 9.7 us, 1.9 TB/s, where the
# up kernel moves 3.1 TB/s).  "split": :func:`_moe_down_split_kernel`, a program per (token, slot, row block), shaped
# like the up kernel; the slot finishing last combines.  ``DOWN_FORM`` is the default until the GPU has timed both
# (``bench_kernels.py``: the moe_experts rows, ``--sweep``).
# Round 21 built and measured a third form, both GEMVs in one kernel (commit 94145eb, then removed): a program per
# (token, slot, 32 intermediate columns) computed its SwiGLU columns, multiplied them by the same columns of the
# slot's down matrix for every hidden row and added the partial y into a float32 scratch with atomic adds, the
# last program of a token combining.  H200 (bench_kernels, both GEMVs of a layer at T=1, CUDA graphs): 28.8 us at
# the first guess, 23.1 at the best of 15 launch settings (16 columns, 256-row down tiles), against 20.9-21.3 for
# up + split down; at T=4 47.8 vs 47.5.  The down matrix's columns are 32-64-byte runs (W2 is contiguous along I)
# and a program's down reads wait on its own gate/up sums: the one stream of weights did not make up for that.
# Its T=4 / T=8 outputs on the GPU also differed from the reference past hidden row 1,024 (not seen under the
# interpreter, not diagnosed before the form was removed).
DOWN_FORMS = ("rows", "split")
DOWN_FORM = "rows"
# The split form's K loop software-pipelined over this many stages, as the up kernel's (``UP_STAGES``); 0: a plain
# loop.  ``moe_experts(stages_down=...)`` overrides.  H200 (round 17 sweep, both expert kernels at T=1): [16, 128]
# tiles 21.90 us at 2 stages vs 22.43 plain, 22.20 / 22.08 at 3 / 4; [8, 256] 20.84 vs 21.32 plain.
DOWN_SPLIT_STAGES = 2


# The split form's tiles at one token, (block_h, block_k): the H200 sweep's fastest (round 17, bench_kernels --sweep:
# both expert kernels of a layer 21.90 -> 20.84 us against [16, 128]; at T=4 [8, 256] was slower, 52.1 vs 49.6 us)
SPLIT_T1_BLOCKS = (8, 256)


def _split_block_h(hidden: int, interpreter: bool, n_tokens: int | None = None) -> int:
    """The split down form's default rows per program: 16 on a GPU (``SPLIT_T1_BLOCKS``' 8 at one token), few large
    blocks for the interpreter."""
    if interpreter:
        return min(256, _pow2(hidden))
    return SPLIT_T1_BLOCKS[0] if n_tokens == 1 else 16


def moe_down_split_block_sizes(
    hidden: int,
    inter: int,
    interpreter: bool = False,
    block_h: int | None = None,
    block_k: int | None = None,
    n_tokens: int | None = None,
) -> tuple[int, int]:
    """(block_h, block_k) of :func:`moe_experts`' split down form (``down="split"``) for ``n_tokens`` rows (None:
    more than one); given sizes are kept.

    GPU: at one token ``SPLIT_T1_BLOCKS`` ([8, 256] tiles, the K loop's last step masked to I = 896: 4 steps, on an
    8x160 grid); otherwise 16 hidden rows per program, as the up kernel's 16 gate/up rows, then the wider of
    ``TILE_ELEMS // block_h`` and half of it that divides I, so the K loop has no masked tail (else the wider one):
    at 8 slots, H=1280, I=896, [16, 128] tiles, 7 K steps, on an 8x80 grid.  The interpreter runs programs one after
    another: few, large tiles.
    """
    if n_tokens == 1 and not interpreter and block_h is None and block_k is None:
        return SPLIT_T1_BLOCKS
    block_h = block_h or _split_block_h(hidden, interpreter, n_tokens)
    if block_k is None:
        wide = max(32, min(_pow2(inter), (INTERPRETER_TILE_ELEMS if interpreter else TILE_ELEMS) // block_h))
        narrow = max(32, wide // 2)
        block_k = narrow if not interpreter and inter % wide and not inter % narrow else wide
    return block_h, block_k


def down_counter_count(rows: int, hidden: int, device: torch.device | str, block_h: int | None = None) -> int:
    """How many counters :func:`moe_experts`' split down form needs: ``rows`` (tokens) x ``cdiv(hidden, block_h)``
    (``block_h`` None: the form's default for ``rows`` on ``device``)."""
    block_h = block_h or _split_block_h(hidden, torch.device(device).type != "cuda", rows)
    return rows * -(-hidden // block_h)


def down_counters(rows: int, hidden: int, device: torch.device | str, block_h: int | None = None) -> Tensor:
    """The zeroed per-(token, row block) counters of :func:`moe_experts`' split down form, int32
    [:func:`down_counter_count`].  Keep one across calls (the kernel sets every counter back to zero) and in a CUDA
    graph (the graph holds its address)."""
    n = down_counter_count(rows, hidden, device, block_h)
    return torch.zeros(n, dtype=torch.int32, device=torch.device(device))


def moe_experts_ref(
    x: Tensor,
    idx: Tensor,
    weights: Tensor,
    w13: Tensor,
    w2: Tensor,
    n_always: int = 0,
    residual: Tensor | None = None,
) -> Tensor:
    """Torch math of the fast path's MoE block: routed experts + the always-on MLP (+ residual).

    Routed: ``grouped_experts_stacked`` (gather + bmm): per (token, pick) ``y = W2[e] (silu(G_e x) * (U_e x))``
    with every GEMM output in ``x.dtype``, then ``Σ w·y`` in float32 rounded once.  The last ``n_always`` slots are
    put back together into one MLP (``_Mlp``: one gate/up GEMM, one down GEMM), added in ``x.dtype``;
    then ``residual + out`` in ``x.dtype``.
    """
    k = idx.shape[1]
    n_experts, two_i, hidden = w13.shape
    inter = two_i // 2
    routed = n_experts - n_always  # the routed experts' math is the grouped path's (gather + bmm, fp32 sum)
    out = (
        grouped_experts_stacked(x, idx, weights, w13[:routed], w2[:routed], use_gmm=False) if k else torch.zeros_like(x)
    )
    if n_always:
        tail13, tail2 = w13[n_experts - n_always :], w2[n_experts - n_always :]
        gate = tail13[:, :inter].reshape(n_always * inter, hidden)
        up = tail13[:, inter:].reshape(n_always * inter, hidden)
        down = tail2.transpose(0, 1).reshape(hidden, n_always * inter)
        out = out + F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
    if residual is not None:
        out = residual + out
    return out


def _check_moe_args(
    x: Tensor, idx: Tensor, weights: Tensor, w13: Tensor, w2: Tensor, residual: Tensor | None
) -> tuple[int, int, int, int, int]:
    """The shape checks both expert kernels share; returns (tokens, hidden, stack slots, intermediate, k)."""
    n_tokens, hidden = x.shape
    n_stack, two_i, w_hidden = w13.shape
    inter = two_i // 2
    top_k = idx.shape[1]
    if w_hidden != hidden or w2.shape != (n_stack, hidden, inter) or two_i % 2:
        raise ValueError(f"w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not fit hidden {hidden}")
    if idx.shape != (n_tokens, top_k) or weights.shape != idx.shape or idx.dtype != torch.int64:
        raise ValueError(f"idx (int64) and weights must be [{n_tokens}, k], got {idx.shape} and {weights.shape}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x {tuple(x.shape)} {x.dtype}")
    return n_tokens, hidden, n_stack, inter, top_k


def moe_experts(
    x: Tensor,
    idx: Tensor,
    weights: Tensor,
    w13: Tensor,
    w2: Tensor,
    n_always: int = 0,
    residual: Tensor | None = None,
    *,
    block_n: int | None = None,
    block_k_up: int | None = None,
    block_h: int | None = None,
    block_k_down: int | None = None,
    num_warps: int | None = None,
    num_warps_down: int | None = None,
    stages_up: int | None = None,
    down: str | None = None,
    counters: Tensor | None = None,
    stages_down: int | None = None,
    norm: tuple[Tensor, Tensor, float, Tensor, Tensor, Tensor] | None = None,
    reads: Tensor | None = None,
) -> Tensor:
    """Routed + always-on experts for a few tokens, in two GEMV kernels: [T, H] in ``x.dtype``.

    ``w13`` [S, 2I, H] (rows 0..I-1 gate, I..2I-1 up, the layout of ``stacked_expert_weights``), ``w2``
    [S, H, I]; ``idx``/``weights`` [T, k] from :func:`moe_route`.  The last ``n_always`` slots of the stack
    run on every token with weight 1: pass the shared experts that way (:func:`stack_always_on`; exact,
    a SiLU-gated MLP decomposes over its intermediate dim).  Result: ``Σ_k w·expert_e(x) + shared(x)
    (+ residual)`` with the rounding points of :func:`moe_experts_ref`.

    (a) up, grid (T·(k + n_always), I / block_n): each program reads ``block_n`` gate rows and the matching
    up rows of its slot's expert in [block_n, block_k_up] tiles (contiguous along H) and writes
    ``h = bf16(bf16(silu(bf16(g))) · bf16(u))`` to a [T, slots, I] scratch (the torch path's roundings).
    (b) down, grid (T, H / block_h): each program runs over the slots (unrolled, so every slot's weight
    loads can be issued early) and I, computes ``y = W2[e] tile @ h`` in float32 and accumulates
    ``w · bf16(y)`` for routed slots (each expert's output is a bf16 tensor in torch) and plain ``y`` for the
    always-on slots (one down GEMM in torch); then ``bf16(bf16(routed) + bf16(shared))``, ``+ residual``.
    ``stages_up`` (default ``UP_STAGES``): the up kernel's K loop software-pipelined over that many stages (the
    same bits).

    ``down``: which form of (b), ``"rows"`` (the above) or ``"split"`` (None: ``DOWN_FORM``).  (b') split, grid
    (T·(k + n_always), H / block_h): shaped like (a), program (t·slots + s, hb) computes ``y = W2[e_s] rows @
    h[t, s]`` in float32 over I ([block_h, block_k_down] tiles, contiguous along I; the loop software-pipelined
    over ``stages_down`` stages, default ``DOWN_SPLIT_STAGES``) and stores it to a [T, slots, H] float32 scratch;
    the program finishing last for (t, hb) (an int32 counter per (t, hb): acq_rel add, re-armed to 0 by that
    program) combines the slots in order 0.. with (b)'s rounding points, so for the same ``y`` both forms agree bit
    for bit (``y`` itself may differ in its last bits: another float32 summation order on a GPU).  Why: at T=1 (b)
    is 640 programs of 8 unrolled [2, 1024] slot tiles (masked to I = 896) and streams weights at ~60 % of (a)'s
    rate; (b') is 640 programs of one slot each, [16, 128] tiles in a pipelined K loop as in (a), for a float32
    round trip of the slots' ``y`` (40 KB at T=1) and one counter add per program.  ``counters``: int32 zeros
    [>= T·cdiv(H, block_h)] (:func:`down_counters`), kept by the caller across calls and graph replays (None: a
    zeroed buffer per call); the rows form ignores them.  ``block_h`` / ``block_k_down`` / ``num_warps_down`` are
    the down kernel's in either form (split defaults: :func:`moe_down_split_block_sizes`).

    ``norm = (residual, weight, eps, normed, summed, row_counters)`` (split form only): the next norm too, in the
    down launch: :func:`add_rms_norm` of the result and ``residual`` [T, H] (the residual stream) with ``weight``
    and ``eps``, written to ``normed`` and ``summed`` ([T, H] buffers of the caller) by the program finishing each
    token's row last (``row_counters``: int32 zeros [>= T], kept like ``counters``; re-armed to 0).  One launch
    fewer: the next layer's input norm (or the final norm) is then done.

    Designed for T <= 8: every token re-reads its experts' weights (T=1: 8 slots x 6.9 MB = 55 MB per
    layer), so both kernels are memory-bound GEMVs.  Default blocks: :func:`moe_block_sizes` (>= ~2
    programs per SM, ~4096 weights per tile: ~32 per thread at 4 warps, several 16-byte loads in flight,
    no spills; I = 896 is not a power of two, so the down tile is masked); the keyword arguments override
    them (``bench_kernels.py --sweep``).  For larger T (prefill) the grouped-GEMM path
    (``grouped_experts_stacked``) reads each expert once and is the right one.

    ``reads`` (int64 [2] on x's device, or None): as :func:`moe_experts_grouped`'s, the up kernel adds the number of
    distinct routed experts the picks chose to ``reads[0]`` and 1 to ``reads[1]`` (the batched decode steps' count
    at 8 rows or fewer: the continuous drain's narrow steps, static batches of 8 pages or fewer).
    """
    _require("moe_experts", x.device)
    x = _contig(x, "x")
    n_tokens, hidden, n_experts, inter, top_k = _check_moe_args(x, idx, weights, w13, w2, residual)
    if not 0 <= n_always <= n_experts or top_k + n_always == 0:
        raise ValueError(f"n_always must be in 0..{n_experts} and k + n_always > 0, got k={top_k}, {n_always}")
    n_slots = top_k + n_always
    form = DOWN_FORM if down is None else down
    if form not in DOWN_FORMS:
        raise ValueError(f"down must be one of {DOWN_FORMS} (None: DOWN_FORM = {DOWN_FORM!r}), got {form!r}")
    if form == "rows" and stages_down is not None:
        raise ValueError("stages_down is the split down form's (down='split'); the rows form has no pipelined loop")
    interpreter = x.device.type != "cuda"
    # sweeps (H200): up 8 warps at T=1 (27 vs 33 us), 4 from T=2 on (62 vs 70 us at T=4); down 4 warps at
    # every T (T=1 with its 2-row blocks: 23.6 vs 25.8 us at 8).  ``num_warps`` is the up kernel's.
    num_warps = num_warps or (8 if n_tokens == 1 else 4)
    num_warps_down = num_warps_down or 4
    rows_h = block_h if form == "rows" else None
    auto = moe_block_sizes(n_tokens, n_slots, hidden, inter, _sm_count(x.device), interpreter, block_n, rows_h)
    block_n = auto[0]
    block_k_up = block_k_up or auto[1]
    if form == "rows":
        block_h = auto[2]
        block_k_down = block_k_down or auto[3]
    else:
        block_h, block_k_down = moe_down_split_block_sizes(hidden, inter, interpreter, block_h, block_k_down, n_tokens)
        need = down_counter_count(n_tokens, hidden, x.device, block_h)
        if counters is None:
            counters = torch.zeros(need, device=x.device, dtype=torch.int32)
        elif counters.dtype != torch.int32 or counters.dim() != 1 or counters.numel() < need:
            raise ValueError(
                f"counters must be int32 [>= {need}] (T x cdiv(H, block_h) = {n_tokens} x"
                f" {triton.cdiv(hidden, block_h)}; see down_counters), got {counters.dtype} {tuple(counters.shape)}"
            )
        elif counters.device != x.device:
            raise ValueError(f"counters must be on {x.device} like x, got {counters.device}")
        counters = _contig(counters, "counters")
    norm_args = _down_norm_args(norm, x, form)
    h = torch.empty((n_tokens, n_slots, inter), device=x.device, dtype=x.dtype)
    out = torch.empty_like(x)
    idx = _contig(idx, "idx")
    weights = _contig(weights.float(), "weights")
    if top_k == 0:  # no routed picks (e.g. a dense MLP passed as always-on slots): valid dummies, never read
        idx = torch.zeros(1, device=x.device, dtype=torch.int64)
        weights = torch.zeros(1, device=x.device, dtype=torch.float32)
    count: dict[str, Any] = {}
    if reads is not None:
        _check_reads(reads, x.device)
        count = dict(reads_ptr=reads, HAS_READS=True, BLOCK_PICKS=_pow2(max(n_tokens * top_k, 1)))
    _moe_up_kernel[(n_tokens * n_slots, triton.cdiv(inter, block_n))](
        x,
        idx,
        _contig(w13, "w13"),
        h,
        hidden,
        inter,
        n_experts,
        TOP_K=top_k,
        N_ALWAYS=n_always,
        BLOCK_N=block_n,
        BLOCK_K=block_k_up,
        EVEN_K=hidden % block_k_up == 0,
        num_warps=num_warps,
        STAGES=UP_STAGES if stages_up is None else stages_up,
        **count,
        **_pdl(),
    )
    operands = (h, idx, weights, _contig(w2, "w2"), x if residual is None else _contig(residual, "residual"), out)
    shapes = dict(H=hidden, INTER=inter, N_EXPERTS=n_experts, TOP_K=top_k, N_ALWAYS=n_always)
    blocks = dict(BLOCK_H=block_h, BLOCK_K=block_k_down, EVEN_K=inter % block_k_down == 0, num_warps=num_warps_down)
    if form == "split":
        scratch = torch.empty((n_tokens, n_slots, hidden), device=x.device, dtype=torch.float32)
        _moe_down_split_kernel[(n_tokens * n_slots, triton.cdiv(hidden, block_h))](
            *operands,
            scratch,
            counters,
            **shapes,
            HAS_RESIDUAL=residual is not None,
            **blocks,
            STAGES=DOWN_SPLIT_STAGES if stages_down is None else stages_down,
            **norm_args,
            **_pdl(),
        )
    else:
        _moe_down_kernel[(n_tokens, triton.cdiv(hidden, block_h))](
            *operands, **shapes, HAS_RESIDUAL=residual is not None, **blocks, **_pdl()
        )
    return out


def _check_reads(reads: Tensor, device: torch.device) -> None:
    """An expert-read counter (:func:`moe_experts_grouped`'s and :func:`moe_experts`' ``reads``): int64 [2] there."""
    if reads.shape != (2,) or reads.dtype != torch.int64 or reads.device != device:
        raise ValueError(
            f"reads must be an int64 [2] counter on {device}, got {reads.dtype} {tuple(reads.shape)} on {reads.device}"
        )


def _down_norm_args(
    norm: tuple[Tensor, Tensor, float, Tensor, Tensor, Tensor] | None, x: Tensor, form: str
) -> dict[str, Any]:
    """The split down kernel's next-norm arguments (:func:`moe_experts`' ``norm``), checked; {} without one."""
    if norm is None:
        return {}
    if form != "split":
        raise ValueError("the next norm runs in the split down kernel only: pass down='split' with norm")
    residual, weight, eps, normed, summed, row_counters = norm
    rows, hidden = x.shape
    for name, t in (("residual", residual), ("normed", normed), ("summed", summed)):
        if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"norm's {name} must be [{rows}, {hidden}] {x.dtype} on {x.device} like x")
    if weight.shape != (hidden,) or weight.dtype != x.dtype:
        raise ValueError(f"norm weight must be [{hidden}] {x.dtype}, got {weight.dtype} {tuple(weight.shape)}")
    if len({normed.data_ptr(), summed.data_ptr(), residual.data_ptr()}) < 3:
        raise ValueError("norm's normed, summed and residual must be three different tensors")
    if row_counters.dtype != torch.int32 or row_counters.dim() != 1 or row_counters.numel() < rows:
        raise ValueError(
            f"norm's row counters must be int32 zeros [>= {rows}], got {row_counters.dtype} {tuple(row_counters.shape)}"
        )
    return dict(
        nres_ptr=_contig(residual, "residual"),
        nw_ptr=_contig(weight, "norm weight"),
        normed_ptr=_contig(normed, "normed"),
        nsum_ptr=_contig(summed, "summed"),
        row_count_ptr=_contig(row_counters, "row counters"),
        eps=float(eps),
        HAS_NORM=True,
        BLOCK_R=_pow2(hidden),
    )


# ======================================================================================== moe_experts_grouped
# Row counts the grouped-GEMM expert kernels are for: above the GEMV kernels' (which re-read an expert's weights
# per token), i.e. batched decode steps; prefill-sized inputs keep cuBLAS / torch._grouped_mm.
GROUPED_MIN_ROWS = 9


def moe_grouped_block_sizes(n_tokens: int, interpreter: bool = False) -> tuple[int, int, int, int, int]:
    """(block_m, block_n_up, block_k_up, block_n_down, block_k_down) of :func:`moe_experts_grouped`.

    GPU: 16-row blocks (``tl.dot``'s minimum; at 32..64 tokens an expert gets ~3..6 of the 6·T picks, so one
    block holds them and each expert's tile of weights is read once), 32 from 64 tokens on, [128, 64] weight
    tiles.  The interpreter
    runs programs one at a time with numpy: few, large tiles.
    """
    if interpreter:
        return max(16, min(64, _pow2(n_tokens))), 128, 256, 128, 256
    # H200 sweep (bench_kernels --sweep): 16-row blocks best at 32 tokens (128 us/layer), 32-row blocks at 64
    # (148 vs 159 us: an expert's ~6 rows + the shared slots' 64 rows in fewer re-reads)
    return (16 if n_tokens < 64 else 32), 64, 128, 64, 128


def moe_experts_grouped(
    x: Tensor,
    idx: Tensor,
    weights: Tensor,
    w13: Tensor,
    w2: Tensor,
    n_always: int = 0,
    residual: Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n_up: int | None = None,
    block_k_up: int | None = None,
    block_n_down: int | None = None,
    block_k_down: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    reads: Tensor | None = None,
) -> Tensor:
    """:func:`moe_experts` for 9..64+ tokens: a grouped GEMM that reads each used expert's weights once.

    Same arguments, result and rounding points as :func:`moe_experts` / :func:`moe_experts_ref`.  Four launches,
    no host sync, shapes fixed by T (CUDA-graph capturable):

    (a) align, grid (P / 16 + 1,): the P = T·k (token, pick) pairs counting-sorted by expert on the device
    (``order`` [P] sorted position -> pair, ``offs`` [E + 1] per-expert start; P <= 8192);
    (b) up, grid (slots, I / block_n): program (expert e, n tile) runs e's rows ``block_m`` at a time through
    ``tl.dot`` against its gate and up tiles and writes ``bf16(silu(g))·u`` (the SwiGLU, fused) at the sorted
    positions; an expert no pair picked returns at once, so unused experts cost no bandwidth.  The
    ``n_always`` shared slots are more programs of the same launch whose rows are all T tokens;
    (c) down, grid (slots, H / block_n): ``y = act @ W2[e]ᵀ`` per expert, float32, written at each row's pair
    index (un-permuting for free);
    (d) combine, grid (T, H / 256): the weighted sum over the k picks in pick order, + shared (+ residual).

    Every launch reads only what it needs, so the bytes are: the used experts' weights once (while an expert
    has at most ``block_m`` rows), T rows of x and the small scratch ([P + n_always·T] rows of I bf16 and H fp32).

    ``reads`` (int64 [2] on x's device, or None): the align program adds the number of distinct routed experts
    the pairs picked to ``reads[0]`` and 1 to ``reads[1]``, so a caller that keeps it across calls (and in a CUDA
    graph: the graph holds its address) reads how many routed experts' weights its calls read, on average, with
    no host sync and no launch of its own (the batched decode steps' ``routed_experts_read``).
    """
    _require("moe_experts_grouped", x.device)
    x = _contig(x, "x")
    n_tokens, hidden, n_slots, inter, top_k = _check_moe_args(x, idx, weights, w13, w2, residual)
    if top_k < 1 or not 0 <= n_always < n_slots:
        raise ValueError(f"need k >= 1 routed picks and 0 <= n_always < {n_slots} slots, got k={top_k}, {n_always}")
    n_routed = n_slots - n_always
    if n_tokens * top_k > 8192:
        raise ValueError(
            f"{n_tokens} tokens x {top_k} picks: too many for the align kernel (<= 8192 picks); "
            "prefill-sized inputs belong to the grouped-GEMM torch path (grouped_experts_stacked)"
        )
    interpreter = x.device.type != "cuda"
    auto = moe_grouped_block_sizes(n_tokens, interpreter)
    block_m = block_m or auto[0]
    bn_up, bk_up = block_n_up or auto[1], block_k_up or auto[2]
    bn_down, bk_down = block_n_down or auto[3], block_k_down or auto[4]
    if block_m < 16 or min(bn_up, bn_down, bk_up, bk_down) < 16:
        raise ValueError("tl.dot needs blocks of at least 16 (block_m, block_n_*, block_k_*)")
    # float32 operands: no TF32 rounding; the interpreter gets float32 operands for bf16 too (see the kernels)
    precision = "ieee" if x.dtype == torch.float32 or interpreter else "tf32"
    stages = {} if num_stages is None else {"num_stages": num_stages}
    n_pairs = n_tokens * top_k
    rows = n_pairs + n_always * n_tokens
    order = torch.empty(n_pairs, device=x.device, dtype=torch.int32)
    offs = torch.empty(n_routed + 1, device=x.device, dtype=torch.int32)
    h = torch.empty((rows, inter), device=x.device, dtype=x.dtype)
    y = torch.empty((rows, hidden), device=x.device, dtype=torch.float32)
    out = torch.empty_like(x)
    idx = _contig(idx, "idx")
    if reads is not None:
        _check_reads(reads, x.device)
    block_p = 16  # [16, pow2(P)] comparisons per program: P = 384 (64 tokens) -> 24 programs + 1 for offs
    block_e = max(block_p, _pow2(n_routed + 1))
    _moe_align_kernel[(triton.cdiv(n_pairs, block_p) + 1,)](
        idx,
        order,
        offs,
        offs if reads is None else reads,
        n_pairs,
        E=n_routed,
        BLOCK_P=block_p,
        BLOCK_ALL=_pow2(n_pairs),
        BLOCK_E=block_e,
        HAS_READS=reads is not None,
        num_warps=4,
        **_pdl(),
    )
    common = dict(TOP_K=top_k, BLOCK_M=block_m, PRECISION=precision, UPCAST=interpreter, num_warps=num_warps)
    _moe_gmm_up_kernel[(n_slots, triton.cdiv(inter, bn_up))](
        x,
        order,
        offs,
        _contig(w13, "w13"),
        h,
        n_pairs,
        n_tokens,
        hidden,
        inter,
        n_routed,
        BLOCK_N=bn_up,
        BLOCK_K=bk_up,
        EVEN_K=hidden % bk_up == 0,
        **common,
        **stages,
        **_pdl(),
    )
    _moe_gmm_down_kernel[(n_slots, triton.cdiv(hidden, bn_down))](
        h,
        order,
        offs,
        _contig(w2, "w2"),
        y,
        n_pairs,
        n_tokens,
        hidden,
        inter,
        n_routed,
        BLOCK_N=bn_down,
        BLOCK_K=bk_down,
        EVEN_K=inter % bk_down == 0,
        **common,
        **stages,
        **_pdl(),
    )
    block_h = 256 if not interpreter else _pow2(hidden)
    _moe_combine_kernel[(n_tokens, triton.cdiv(hidden, block_h))](
        y,
        _contig(weights.float(), "weights"),
        x if residual is None else _contig(residual, "residual"),
        out,
        n_pairs,
        n_tokens,
        hidden,
        TOP_K=top_k,
        N_ALWAYS=n_always,
        HAS_RESIDUAL=residual is not None,
        BLOCK_H=block_h,
        num_warps=2,
        **_pdl(),
    )
    return out


# ======================================================================================== moe_gather_combine
def moe_gather_combine_ref(y: Tensor, inverse: Tensor, weights: Tensor, shared: Tensor) -> Tensor:
    """The torch tail of a prompt's MoE block (``experts.combine_picks`` in ``grouped_experts_stacked``, then
    ``+ shared`` in ``MoE.forward``): expert outputs ``y`` [T·k, H] in expert order, ``inverse`` [T·k] each (token,
    pick)'s row of ``y``, ``weights`` [T, k] float32, ``shared`` [T, H]; ``Σ_j w·y`` in float32, rounded to
    ``y.dtype``, plus ``shared``."""
    return combine_picks(y, inverse, weights, y.dtype) + shared


def moe_gather_combine(y: Tensor, inverse: Tensor, weights: Tensor, shared: Tensor) -> Tensor:
    """:func:`moe_gather_combine_ref` in one kernel (instead of a gather, a float32 copy of every (token, pick) row,
    the products, the sum, a cast and the shared add): the same rounding points, the k products summed in pick
    order (torch's sum may pair them otherwise: float32 rounding apart)."""
    _require("moe_gather_combine", y.device)
    n_tokens, top_k = weights.shape
    hidden = y.shape[1]
    if y.dim() != 2 or inverse.shape != (n_tokens * top_k,) or shared.shape != (n_tokens, hidden):
        raise ValueError(
            f"y [T·k, H], inverse [T·k], weights [T, k], shared [T, H] expected, got {tuple(y.shape)},"
            f" {tuple(inverse.shape)}, {tuple(weights.shape)}, {tuple(shared.shape)}"
        )
    y, shared = _contig(y, "y"), _contig(shared, "shared")
    out = torch.empty_like(shared)
    block_h = min(1024, _pow2(hidden))
    _moe_gather_combine_kernel[(n_tokens, triton.cdiv(hidden, block_h))](
        y,
        _contig(inverse, "inverse"),
        _contig(weights.float(), "weights"),
        shared,
        out,
        hidden,
        TOP_K=top_k,
        BLOCK_H=block_h,
        num_warps=4,
        **_pdl(),
    )
    return out


# ======================================================================================== silu_mul
def silu_mul_ref(h: Tensor) -> Tensor:
    """SwiGLU of ``h`` [..., 2·I] (gate | up, the fused gate/up GEMM's output): the torch path,
    ``experts.silu_gate_up``."""
    return silu_gate_up(h)


def silu_mul(h: Tensor) -> Tensor:
    """:func:`silu_mul_ref` in one kernel (torch: a SiLU pass over the strided gate half, then the product), the
    same rounding points (SiLU's exp may differ from torch's in its last bit: rare 1-ulp flips)."""
    _require("silu_mul", h.device)
    h = _contig(h, "h")
    if h.shape[-1] % 2:
        raise ValueError(f"h must hold gate and up halves of equal width, got {h.shape[-1]} columns")
    inter = h.shape[-1] // 2
    rows = h.numel() // h.shape[-1]
    out = torch.empty((*h.shape[:-1], inter), device=h.device, dtype=h.dtype)
    block = min(1024, _pow2(inter))
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](h, out, inter, BLOCK=block, num_warps=4, **_pdl())
    return out


# ======================================================================================== pick_token
# Logits per chunk program: 64 programs over DeepSeek-OCR's 129,280-entry vocabulary at batch 1.
PICK_BLOCK = 2048


def pick_token_ref(
    logits: Tensor,
    banned: Tensor | None = None,
    nonfinite: Tensor | None = None,
    feed: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Greedy token per row [B, 1] int64: ``argmax`` (first index on ties) after ``masked_fill(banned, -inf)``;
    ``nonfinite`` (a bool scalar) is or-ed with "some logit is NaN or ±inf" (checked before the ban); ``feed``:
    :func:`feed_back`."""
    if nonfinite is not None:
        nonfinite |= ~torch.isfinite(logits).all()
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    token = logits.argmax(dim=-1, keepdim=True)
    if feed is not None:
        feed_back(token, *feed)
    return token


def _check_feed(token_rows: int, tokens: Tensor, chosen: Tensor, pos: Tensor) -> None:
    if tokens.shape != (token_rows, 1) or tokens.dtype != torch.int64 or not tokens.is_contiguous():
        raise ValueError(
            f"feed's tokens must be int64 [{token_rows}, 1] contiguous, got {tokens.dtype} {tuple(tokens.shape)}"
        )
    if chosen.dim() != 2 or chosen.shape[0] != token_rows or chosen.dtype != torch.int64 or not chosen.is_contiguous():
        raise ValueError(
            f"feed's chosen must be int64 [{token_rows}, slots] contiguous, got {chosen.dtype} {tuple(chosen.shape)}"
        )
    if pos.shape != (1,) or pos.dtype != torch.int64:
        raise ValueError(f"feed's pos must be int64 [1], got {pos.dtype} {tuple(pos.shape)}")


def feed_back(token: Tensor, tokens: Tensor, chosen: Tensor, pos: Tensor) -> None:
    """A greedy step's end on the device, in torch: ``token`` [B, 1] fed back (``tokens``), kept at the step's
    position (``chosen[:, pos]``, ``chosen`` [B, slots]), then ``pos`` advanced, clamped to ``slots - 1`` (what
    :func:`pick_token`'s ``feed`` does inside its last launch)."""
    _check_feed(token.shape[0], tokens, chosen, pos)
    chosen.index_copy_(1, pos, token)
    tokens.copy_(token)
    pos.copy_((pos + 1).clamp_max(chosen.shape[1] - 1))


def pick_token(
    logits: Tensor,
    banned: Tensor | None = None,
    nonfinite: Tensor | None = None,
    block: int | None = None,
    feed: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """:func:`pick_token_ref` in two launches (per-chunk maxima, then per row), instead of the torch path's
    isfinite + all + or + chunked max + argmax + gather (three of them single-output reductions over the whole
    vocabulary, ~15 us each on an H200 at batch 1).  ``feed`` = (``tokens`` [B, 1], ``chosen`` [B, slots],
    ``pos`` [1], int64 on the device): :func:`feed_back` inside the second launch (one program for all rows then),
    so a decode graph replays step after step with no host op between.

    ``logits`` float32 [B, V] contiguous; ``banned`` bool [B, V] with unit column stride (a column slice of a
    wider mask is fine: ``banned_ngram_mask``'s is); ``nonfinite`` a bool scalar on the same device, set (never
    cleared) when a row holds a NaN or ±inf logit.  The token of a row with a NaN is unspecified but always a
    valid id (the flag says the step is void).  CUDA-graph capturable: scratch sized from host ints."""
    _require("pick_token", logits.device)
    logits = _contig(logits, "logits")
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be float32 [B, V], got {logits.dtype} {tuple(logits.shape)}")
    bsz, vocab = logits.shape
    if banned is not None and (banned.shape != (bsz, vocab) or banned.dtype != torch.bool or banned.stride(1) != 1):
        raise ValueError(
            f"banned must be bool [{bsz}, {vocab}] with unit column stride, got {banned.dtype} "
            f"{tuple(banned.shape)} strides {banned.stride()}"
        )
    if nonfinite is not None and (nonfinite.dim() != 0 or nonfinite.dtype != torch.bool):
        raise ValueError(f"nonfinite must be a bool scalar tensor, got {nonfinite.dtype} {tuple(nonfinite.shape)}")
    if feed is not None:
        _check_feed(bsz, *feed)
    blk = block or (INTERPRETER_TILE_ELEMS if INTERPRETED else PICK_BLOCK)
    blk = min(_pow2(blk), _pow2(vocab))
    n_chunks = triton.cdiv(vocab, blk)
    dev = logits.device
    vals = torch.empty((bsz, n_chunks), device=dev, dtype=torch.float32)
    idx = torch.empty((bsz, n_chunks), device=dev, dtype=torch.int32)
    bad = torch.empty((bsz, n_chunks), device=dev, dtype=torch.int32)
    out = torch.empty((bsz, 1), device=dev, dtype=torch.int64)
    flag = nonfinite if nonfinite is not None else torch.zeros((), device=dev, dtype=torch.bool)
    _pick_partial_kernel[(bsz, n_chunks)](
        logits,
        logits if banned is None else banned,
        vals,
        idx,
        bad,
        vocab,
        0 if banned is None else banned.stride(0),
        n_chunks,
        BLOCK=blk,
        HAS_BAN=banned is not None,
        num_warps=4,
        **_pdl(),
    )
    tokens, chosen, pos = feed if feed is not None else (out, out, out)  # not read without FEED
    _pick_final_kernel[(1 if feed is not None else bsz,)](
        vals,
        idx,
        bad,
        out,
        flag,
        tokens,
        chosen,
        pos,
        vocab,
        n_chunks,
        bsz,
        chosen.shape[1] if feed is not None else 1,
        BLOCK_C=_pow2(n_chunks),
        FEED=feed is not None,
        num_warps=1,
        **_pdl(),
    )
    return out


# ======================================================================================== ngram_ban
# window positions per ngram_ban loop step (each compares N - 1 tokens of BLOCK_S windows) and vocabulary entries per
# clearing step; one program per row
NGRAM_BLOCK_S = 256
NGRAM_BLOCK_V = 4096


def ngram_ban(
    history: Tensor,
    length: Tensor,
    n: int,
    vocab: int,
    window: int | None = None,
    exempt_ids: Iterable[int] = (),
    length_offset: int = 0,
    blocks: tuple[int, int] | None = None,
) -> Tensor:
    """:func:`~llm_perf_opt.models.deepseek_ocr.generation.banned_ngram_mask` in one launch (plus a fill per exempt
    id) instead of its ~20 small torch kernels: bool [B, vocab], True where appending the token would repeat an
    ``n``-gram already in the row.  ``history`` int64 [B, W] (unit column stride; negative ids never match as a
    banned token), ``length`` int64 [1] or [B] on the device (plus ``length_offset``: the decoder passes its
    position and 1, saving the add; a length past ``W`` counts as ``W``), ``window`` / ``exempt_ids`` as
    :class:`~llm_perf_opt.models.deepseek_ocr.generation.NoRepeatNGram`'s.  The same comparisons as the torch mask,
    so the same bits.  CUDA-graph capturable.  ``blocks`` (tests): the (window, vocabulary) block sizes, small to
    run the loops over several blocks under the interpreter (its default blocks cover a test's row at once)."""
    _require("ngram_ban", history.device)
    if history.dim() != 2 or history.dtype != torch.int64 or history.stride(1) != 1:
        raise ValueError(
            f"history must be int64 [B, W] with unit column stride, got {history.dtype} {tuple(history.shape)}"
        )
    bsz, width = history.shape
    if length.dtype != torch.int64 or length.numel() not in (1, bsz):
        raise ValueError(f"length must be int64 with 1 or {bsz} entries, got {length.dtype} {tuple(length.shape)}")
    mask = torch.empty((bsz, vocab), device=history.device, dtype=torch.bool)
    if n <= 0:
        return mask.zero_()
    block_s, block_v = blocks or (
        (INTERPRETER_TILE_ELEMS, INTERPRETER_TILE_ELEMS) if INTERPRETED else (NGRAM_BLOCK_S, NGRAM_BLOCK_V)
    )
    _ngram_ban_kernel[(bsz,)](
        history,
        length.reshape(-1).contiguous(),  # the kernel steps one entry a row
        mask.view(torch.uint8),
        width,
        history.stride(0),
        vocab,
        length_offset,
        0 if window is None else window,
        LEN_STRIDE=1 if length.numel() == bsz else 0,  # one row with one length: the per-row form (one compile)
        N=n,
        HAS_WINDOW=window is not None,
        BLOCK_V=block_v,
        BLOCK_S=block_s,
        num_warps=4,
        **_pdl(),
    )
    return unban_exempt(mask, exempt_ids)


# ======================================================================================== linear_rows
# weight rows per linear_rows program: the H200 sweep (benchmarks/results/2026-12-02-h200-r8/kernels-start.md) timed
# the QKV at 7.4 / 5.4 / 6.8 / 11.0 us with 2 / 4 / 8 / 16 rows, o_proj at 4.4 / 3.4 / 4.2 / 7.4 us
LINEAR_ROWS_PER_PROGRAM = 4


def linear_rows_ref(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T`` in float32, rounded once to ``x``'s dtype: what a GEMV with a float32 accumulator gives,
    up to the order of the sum."""
    return (x.float() @ weight.float().T).to(x.dtype)


def linear_block_sizes(n: int, k: int, sms: int, interpreter: bool = False) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of :func:`linear_rows`: 256-wide K blocks (the interpreter: whole rows), and at most
    ``LINEAR_ROWS_PER_PROGRAM`` weight rows per program, fewer where that would leave under ~2 programs per SM at
    one row (on 132 SMs: 4 rows per program for the QKV's 3,840 outputs and for o_proj's 1,280)."""
    if interpreter:
        return min(_pow2(n), 64), min(_pow2(k), INTERPRETER_TILE_ELEMS // 64)
    block_k = min(_pow2(k), 256)
    fill = _pow2_floor(max(1, n // (2 * sms)))
    block_n = max(1, min(TILE_ELEMS // block_k, LINEAR_ROWS_PER_PROGRAM, fill))
    return block_n, block_k


def linear_rows(
    x: Tensor, weight: Tensor, *, block_n: int | None = None, block_k: int | None = None, num_warps: int = 4
) -> Tensor:
    """``F.linear(x, weight)`` (no bias) for a few rows (the single-page decode step's 1 to 8) as one Triton
    GEMV launch: ``x`` [T, K] and ``weight`` [N, K] contiguous, same dtype; returns [T, N].

    Each program streams ``block_n`` rows of the weight once per row of ``x`` (rows past the first re-read them
    from L2), multiplies in float32 and rounds once: the same function as cuBLAS's bf16 GEMM with its float32
    accumulator, summed in another order (results within one rounding of each other).  Meant for the decode
    step's QKV and o_proj, where cuBLAS's small GEMMs move their weights at 0.7-1.9 TB/s on an H200."""
    _require("linear_rows", x.device)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or x.dtype != weight.dtype:
        raise ValueError(
            f"linear_rows needs x [T, K] and weight [N, K] of one dtype, got {x.dtype} {tuple(x.shape)} and "
            f"{weight.dtype} {tuple(weight.shape)}"
        )
    rows, k = x.shape
    n = weight.shape[0]
    bn, bk = linear_block_sizes(n, k, _sm_count(x.device), INTERPRETED)
    bn, bk = block_n or bn, block_k or bk
    out = torch.empty((rows, n), device=x.device, dtype=x.dtype)
    _linear_rows_kernel[(rows, triton.cdiv(n, bn))](
        _contig(x, "x"),
        _contig(weight, "weight"),
        out,
        n,
        k,
        BLOCK_N=bn,
        BLOCK_K=bk,
        EVEN_K=k % bk == 0,
        num_warps=num_warps,
        **_pdl(),
    )
    return out
