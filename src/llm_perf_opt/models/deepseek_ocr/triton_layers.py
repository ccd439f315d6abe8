"""The Triton decode step as module swaps: fast decoder layers with their norm, attention and MoE run by kernels.

:func:`triton_layers` rebuilds the fast path's layers (:mod:`~llm_perf_opt.models.deepseek_ocr.fast_layers`) with
the modules below, over the same weights, so the Triton step is the same :class:`DecoderLayer` forward and
:func:`~llm_perf_opt.models.deepseek_ocr.decoder.run_decoder` loop as every other path.  Per layer: add+RMSNorm
(the residual add folded into the norm), QKV GEMM, rotary + KV write, split-K attention over keys ``0..pos``
only, o_proj GEMM, add+RMSNorm, router (GEMV + softmax + top-k + counts), routed and shared experts in two
kernels (up to 8 rows; from 9 rows on the grouped-GEMM kernels, four launches).  :func:`triton_row_layers` does
the same for the batched decode step, whose rows sit at their own positions over a left-padded cache.  Rows are
[B, hidden] (one token each); the position is ``ctx.slot`` on the device, the rotary tables ``ctx.rope_tables``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_perf_opt.models.deepseek_ocr import kernels as K
from llm_perf_opt.models.deepseek_ocr import prompt_attention as PA
from llm_perf_opt.models.deepseek_ocr import prompt_moe as PM
from llm_perf_opt.models.deepseek_ocr.context import ForwardContext
from llm_perf_opt.models.deepseek_ocr.decoder import Attention, DecoderLayer, MoE, RMSNorm
from llm_perf_opt.models.deepseek_ocr.experts import apply_experts_grouped, grouped_experts_stacked
from llm_perf_opt.models.deepseek_ocr.fast_decoder import TRITON_MAX_ROWS
from llm_perf_opt.models.deepseek_ocr.fast_layers import FusedAttention, FusedMLP, GroupedMoE
from llm_perf_opt.models.deepseek_ocr.graphs import in_capture_warm_up

__all__ = [
    "TritonAttention",
    "TritonDenseMLP",
    "TritonMoE",
    "TritonPromptAttention",
    "TritonPromptMLP",
    "TritonPromptMoE",
    "TritonRMSNorm",
    "TritonRowAttention",
    "swiglu_mlp",
    "triton_layers",
    "triton_prompt_layers",
    "triton_row_layers",
]


_T = TypeVar("_T")


def _kept_counters(
    kept: list[Tensor], rows: int, at_least: int, device: torch.device, make: Callable[[int, torch.device], Tensor]
) -> Tensor:
    """A zeroed counter buffer of >= ``rows`` entries from ``kept`` (``make`` builds one of at least ``at_least``
    and it is kept when none fits): the last-program-finishes kernels set their counters back to zero, and a
    captured graph keeps the address of the buffer it was captured with, so a module never lets go of one."""
    for buf in kept:
        if buf.numel() >= rows and buf.device == device:
            return buf
    kept.append(make(max(rows, at_least), device))
    return kept[-1]


def _int32_zeros(n: int, device: torch.device) -> Tensor:
    """A zeroed int32 counter buffer of ``n`` entries (the split down kernel's counters, per row block or per row)."""
    return torch.zeros(n, dtype=torch.int32, device=device)


@dataclasses.dataclass(frozen=True)
class Router:
    """What a MoE layer's router needs (from its :class:`GroupedMoE`): the fused norm + router kernel's inputs."""

    gate_w32: Tensor
    top_k: int
    counts: Tensor | None
    scaling: float
    renormalize: bool

    @classmethod
    def of(cls, moe: GroupedMoE, counted: bool = True) -> Router:
        """``moe``'s router; ``counted``: the kernel adds its picks to ``moe.counts`` (the single-page step, which
        records routing), else it counts nothing (the batched steps, which do not)."""
        counts = moe.counts if counted else None
        return cls(moe.gate_w32, moe.top_k, counts, float(moe.routed_scaling_factor), bool(moe.norm_topk_prob))


class TritonRMSNorm(RMSNorm):
    """The same norm (shared weight) with residual add + norm in one kernel.  With ``keep_f32`` the kernel also
    writes ``normed.float()`` and the norm keeps it (:meth:`f32_of`): a MoE's router input, without a cast.
    With ``router`` (a MoE layer's post-attention norm) the kernel also routes the rows
    (:func:`kernels.add_rms_norm_route`: norm, router logits, top-k and the routing counts in one launch) and the
    norm keeps the ids and weights for the MoE block (:meth:`routing_of`)."""

    def __init__(
        self, norm: RMSNorm, keep_f32: bool = False, router: Router | None = None, deferred: bool = False
    ) -> None:
        nn.Module.__init__(self)
        self.weight = norm.weight
        self.eps = norm.eps
        self.keep_f32 = keep_f32
        # an input norm folded into its attention's QKV kernel (kernels.qkv_rope with the norm): add_norm launches
        # nothing, keeps its inputs for the attention (pending_for) and returns them as they are
        self.deferred = deferred
        self._pending: tuple[Tensor, Tensor | None, Tensor] | None = None
        self._f32: tuple[Tensor, Tensor] | None = None  # (the normed rows it was made with, their float32 copy)
        self.router = router
        self._routed: tuple[Tensor, Tensor, Tensor] | None = None  # (normed rows, their expert ids, weights)
        # per-row counters of the fused kernel: zero between calls; kept while the module lives, since a captured
        # graph keeps the address of the buffer it was captured with
        self._flags: list[Tensor] = []
        # a norm run ahead, in the previous MoE layer's down kernel (TritonMoE.norm_ahead): add_norm launches nothing
        # and returns what that kernel wrote, (the MoE's output it was given, residual, normed, summed) kept here
        self.ahead = False
        self._ahead: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        # a MoE layer's post-attention norm whose sum (the residual stream) that MoE's down kernel reads (summed_for)
        self.keep_summed = False
        self._summed: tuple[Tensor, Tensor] | None = None  # (the normed rows it was made with, their sum)

    def add_norm(self, delta: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        normed, summed = self._add_norm(delta, residual)
        if self.keep_summed:
            self._summed = (normed.reshape(-1, delta.shape[-1]), summed.reshape(-1, delta.shape[-1]))
        return normed, summed

    def _add_norm(self, delta: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        shape = delta.shape  # [T, H] in the Triton step, [B, 1, H] in the batched step: rows either way
        flat_res = None if residual is None else residual.reshape(-1, shape[-1])
        flat = delta.reshape(-1, shape[-1])
        if self.ahead:
            kept, self._ahead = self._ahead, None
            same_res = kept is not None and flat_res is not None and flat_res.data_ptr() == kept[1].data_ptr()
            if kept is None or not same_res or not self._is_output(flat, kept[0]):
                raise RuntimeError(
                    "this norm runs in the previous MoE layer's down kernel (down_norm) but was given other rows:"
                    " that layer's output and residual stream must come here unchanged"
                )
            return kept[2].view(shape), kept[3].view(shape)
        if self.deferred:
            # ``summed`` is written by the attention's kernel (or is ``delta`` itself, before the first layer); the
            # "normed" rows returned are ``delta``: only the attention, which asks for them here, may read them
            summed = flat if flat_res is None else torch.empty_like(flat)
            self._pending = (flat, flat_res, summed)
            return delta, summed.view(shape)
        if self.router is not None:
            r = self.router
            flags = _kept_counters(self._flags, flat.shape[0], TRITON_MAX_ROWS, flat.device, K.route_flags)
            normed, summed, idx, weights = K.add_rms_norm_route(
                flat, flat_res, self.weight, self.eps, r.gate_w32, r.top_k, flags, r.counts, r.scaling, r.renormalize
            )
            self._routed = (normed, idx, weights)
        elif self.keep_f32:
            normed, summed, f32 = K.add_rms_norm_f32(flat, flat_res, self.weight, self.eps)
            self._f32 = (normed, f32)
        else:
            normed, summed = K.add_rms_norm(flat, flat_res, self.weight, self.eps)
        return normed.view(shape), summed.view(shape)

    @staticmethod
    def _is_output(rows: Tensor, normed: Tensor) -> bool:
        same = rows.data_ptr() == normed.data_ptr() and rows.shape == normed.shape and rows.dtype == normed.dtype
        return same and rows.is_contiguous()

    def f32_of(self, rows: Tensor) -> Tensor:
        """``rows.float()``: the copy the last :meth:`add_norm` wrote when ``rows`` are its output (same storage,
        shape and dtype), else a cast.  The norm lets go of the copy here, so no copy outlives its step (under
        a CUDA graph it is a block of the graph's private memory pool, which should go with the graph)."""
        kept, self._f32 = self._f32, None
        if kept is not None and self._is_output(rows, kept[0]):
            return kept[1]
        return rows.float()

    def drop_f32(self) -> None:
        """Let go of the float32 copy the last :meth:`add_norm` wrote, unread (its reader widens the rows itself)."""
        self._f32 = None

    def summed_for(self, rows: Tensor) -> Tensor:
        """The residual stream (``residual + delta``) of the last :meth:`add_norm`, whose normed output ``rows``
        must be (``keep_summed``: the MoE block after this norm adds it in its down kernel)."""
        kept, self._summed = self._summed, None
        if kept is None or not self._is_output(rows, kept[0]):
            raise RuntimeError(
                "the MoE block's down kernel runs the next norm but its input is not this norm's output: the block"
                " must get its post-attention norm's output unchanged"
            )
        return kept[1]

    def expect(self, delta: Tensor, residual: Tensor, normed: Tensor, summed: Tensor) -> None:
        """An ``ahead`` norm's result for ``delta`` and ``residual``, written by the MoE down kernel before it."""
        self._ahead = (delta, residual, normed, summed)

    def pending_for(self, rows: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """A deferred norm's (delta, residual, summed buffer) of the last :meth:`add_norm`, whose returned rows
        ``rows`` must be: the attention normalises them itself (never any other rows, which would be read
        un-normalised)."""
        kept, self._pending = self._pending, None
        if kept is None or not self._is_output(rows.reshape(-1, rows.shape[-1]), kept[0]):
            raise RuntimeError(
                "the input norm is folded into the attention's QKV kernel but was given other rows: its output must"
                " go to the attention unchanged"
            )
        return kept

    def routing_of(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(expert ids, weights) the last :meth:`add_norm` computed for ``rows``, which must be its output: its
        kernel has already counted those picks (the single-page step's router), so routing other rows here would
        count twice; every step built with the fused router gives its MoE blocks the norm's output as it is."""
        kept, self._routed = self._routed, None
        if kept is None or not self._is_output(rows, kept[0]):
            raise RuntimeError(
                "the fused norm + router has no routing for these rows: the MoE block must get its post-attention"
                " norm's output unchanged (no row subset)"
            )
        return kept[1], kept[2]


class TritonAttention(nn.Module):
    """One decode token per row: QKV GEMM, rotary + KV write at ``ctx.slot``, attention over keys ``0..slot``.
    With ``linear`` the fused QKV and the o_proj products run as :func:`kernels.linear_rows` (Triton GEMVs)
    instead of cuBLAS; with ``one_launch`` the attention is one launch (the last split of a row-head combines:
    :func:`kernels.decode_attention` with counters this module keeps)."""

    def __init__(self, attn: Attention, linear: bool = False, one_launch: bool = False, rope: bool = False) -> None:
        super().__init__()
        self.attn = attn
        self.wqkv: Tensor | None = attn.wqkv if isinstance(attn, FusedAttention) else None
        self.linear = linear
        self.one_launch = one_launch
        # the rotary and the cache writes in the QKV GEMV's epilogue (kernels.qkv_rope): with ``linear`` only
        self.rope = rope and linear
        # zero between calls (the kernel's last split sets them back); never freed while this module lives: a
        # captured graph keeps the address of the buffer it was captured with
        self._counters: list[Tensor] = []

    def _counters_for(self, rows: int, device: torch.device) -> Tensor | None:
        if not self.one_launch:
            return None
        # one buffer for every single-page step (up to TRITON_MAX_ROWS rows)
        return _kept_counters(self._counters, rows, TRITON_MAX_ROWS * self.attn.num_heads, device, K.attention_counters)

    def _project(self, x: Tensor, weight: Tensor) -> Tensor:
        """``F.linear(x, weight)``: a Triton GEMV with ``linear`` (this module runs the single-page step: at most
        TRITON_MAX_ROWS rows), cuBLAS otherwise."""
        return K.linear_rows(x, weight) if self.linear else F.linear(x, weight)

    def forward(self, x: Tensor, ctx: ForwardContext, layer_idx: int) -> Tensor:
        a = self.attn
        if ctx.cache is None or ctx.slot is None or ctx.rope_tables is None:
            raise ValueError("the Triton decode attention needs a cache, a device slot and the rotary tables")
        k_all, v_all = ctx.cache.k[layer_idx], ctx.cache.v[layer_idx]
        cos_table, sin_table = ctx.rope_tables
        heads = (a.num_heads, a.num_kv_heads, a.head_dim)
        fused = self.rope and self.wqkv is not None and ctx.slot.shape == (1,)
        norm = self.__dict__.get("input_norm")
        if norm is not None:  # x is the un-normalised delta: the kernel adds the residual and normalises
            delta, residual, summed = norm.pending_for(x)
            if not fused or self.wqkv is None:
                raise RuntimeError("the input norm folded into the QKV kernel needs the fused rope step ([1] slot)")
            q = K.qkv_rope(
                delta, self.wqkv, cos_table, sin_table, ctx.slot, k_all, v_all, *heads,
                norm=(residual, norm.weight, norm.eps, summed),
            )  # fmt: skip
        elif fused and self.wqkv is not None:
            q = K.qkv_rope(x, self.wqkv, cos_table, sin_table, ctx.slot, k_all, v_all, *heads)
        else:
            if self.wqkv is not None:
                qkv = self._project(x, self.wqkv)
            else:
                qkv = torch.cat([F.linear(x, p.weight) for p in (a.q_proj, a.k_proj, a.v_proj)], dim=-1)
            q = K.rope_kv_write(qkv, cos_table, sin_table, ctx.slot, k_all, v_all, *heads)
        counters = self._counters_for(q.shape[0] * q.shape[1], q.device)
        out = K.decode_attention(q, k_all, v_all, ctx.slot, a.head_dim**-0.5, counters=counters)
        if a.o_proj.bias is None:
            return self._project(out, a.o_proj.weight)
        o: Tensor = a.o_proj(out)
        return o


class TritonRowAttention(nn.Module):
    """A decode step over a slot context whose rows sit at their own positions (per-row ``ctx.cos``/``ctx.sin``
    [B|1, 1, D]) and see their own keys (additive ``ctx.mask`` [B|1, 1, 1, n]): the batched step (one cache
    column ``ctx.slot`` [1] for every row) and the continuous-batching step (``ctx.slot`` [B], each row's own).
    QKV GEMM, rotary at each row's position + K/V written at ``ctx.slot``, split-K attention over keys
    ``0..slot`` with the mask added, o_proj.  Any other context (several positions per row, no slot) runs the
    wrapped attention."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.attn = attn
        self.wqkv: Tensor | None = attn.wqkv if isinstance(attn, FusedAttention) else None

    def _fits(self, x: Tensor, ctx: ForwardContext) -> bool:
        if ctx.cache is None or ctx.slot is None or ctx.cos is None or ctx.sin is None or x.shape[1] != 1:
            return False
        rows_ok = ctx.cos.shape[0] in (1, x.shape[0]) and ctx.cos.shape[1] == 1
        rows_ok = rows_ok and tuple(ctx.slot.shape) in ((1,), (x.shape[0],))
        mask = ctx.mask
        return rows_ok and (mask is None or (mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1))

    def forward(self, x: Tensor, ctx: ForwardContext, layer_idx: int) -> Tensor:
        if not self._fits(x, ctx):
            out: Tensor = self.attn(x, ctx, layer_idx)
            return out
        assert ctx.cache is not None and ctx.slot is not None and ctx.cos is not None and ctx.sin is not None
        a = self.attn
        bsz = x.shape[0]
        flat = x.reshape(bsz, -1)
        if self.wqkv is not None:
            qkv = F.linear(flat, self.wqkv)
        else:
            qkv = torch.cat([F.linear(flat, p.weight) for p in (a.q_proj, a.k_proj, a.v_proj)], dim=-1)
        cos = ctx.cos.reshape(ctx.cos.shape[0], -1).expand(bsz, -1).contiguous()  # [B, D]: one row per batch row
        sin = ctx.sin.reshape(ctx.sin.shape[0], -1).expand(bsz, -1).contiguous()
        k_all, v_all = ctx.cache.k[layer_idx], ctx.cache.v[layer_idx]
        q = K.rope_kv_write(
            qkv, cos, sin, ctx.slot, k_all, v_all, a.num_heads, a.num_kv_heads, a.head_dim, row_tables=True
        )
        mask = None if ctx.mask is None else ctx.mask.reshape(ctx.mask.shape[0], -1)
        out = K.decode_attention(q, k_all, v_all, ctx.slot, a.head_dim**-0.5, key_mask=mask, key_first=ctx.key_first)
        o: Tensor = a.o_proj(out)
        return o.view(bsz, 1, -1)


class TritonMoE(MoE):
    """A :class:`GroupedMoE`'s block with the router and the experts as kernels (shared experts in the expert
    kernel's extra slots when the stacks have them, else added by the block as usual)."""

    def __init__(
        self, moe: GroupedMoE, router_input: TritonRMSNorm | None = None, down: str = "rows", count_all: bool = False
    ) -> None:
        nn.Module.__init__(self)
        # whether the GEMV kernels (8 rows or fewer) count the experts they read too, as the grouped ones always do:
        # the batched steps' layers (the continuous drain's narrow steps, static batches of 8 pages or fewer); a single
        # page's step counts nothing
        self.count_all = count_all
        # the GEMV path's down kernel form (kernels.DOWN_FORMS); the split form's counters are kept here
        self.down = down
        self._down_counters: list[Tensor] = []
        self._row_counters: list[Tensor] = []  # the down kernel's per-token counters for the next norm
        # (this layer's post-attention norm, the next norm) when the split down kernel runs the next norm
        self._norms: tuple[TritonRMSNorm, TritonRMSNorm] | None = None
        self._copy_routing_rule(moe)
        # the layer's post-attention norm when it writes the router's float32 input (``keep_f32``); set past
        # nn.Module's registration: the layer owns that norm, this only reads it
        object.__setattr__(self, "router_input", router_input)
        if moe.stacked is None:
            raise ValueError("the Triton MoE needs stacked expert weights (grouped_moe)")
        # the expert kernels' counters (kernels.moe_experts_grouped's and, with count_all, moe_experts' ``reads``):
        # distinct routed experts read, summed over calls, and the calls, on the device; a CUDA graph captured over
        # this block holds their address, so its replays count too.  A capture's warm-up calls (no decode step) count
        # into the scratch pair
        device = moe.stacked[0].device
        self.expert_reads = torch.zeros(2, dtype=torch.int64, device=device)
        self._warmup_reads = torch.zeros(2, dtype=torch.int64, device=device)
        self.gate_w32 = moe.gate_w32
        self.gate_bf16 = K.exact_bf16(moe.gate_w32)  # the many-row router's operand (route_rows), when exact
        self.counts = moe.counts
        self.stacked: tuple[Tensor, Tensor] = moe.stacked
        self.all_stacks = moe.all_stacks
        self.n_always = moe.n_always
        self.shared_experts = None if moe.all_stacks is not None else moe.shared_experts

    def select_experts(self, flat: Tensor, ctx: ForwardContext | None) -> tuple[Tensor, Tensor]:
        record = ctx is None or ctx.record_routing
        norm = self.__dict__["router_input"]
        if norm is not None and norm.router is not None:  # routed (the single-page step's: and counted) by the norm
            counted = norm.router.counts is not None
            if counted and not record:
                raise RuntimeError("this fused norm + router counts its picks: it needs record_routing")
            idx, weights = norm.routing_of(flat)
            if record and not counted and self.counts is not None:
                # the row layers' norm counts nothing (the batched steps record no routing), but the single-page
                # step of more than 8 rows runs these layers and records: its picks are counted here
                picks = idx.reshape(-1)
                self.counts.index_add_(0, picks, torch.ones_like(picks, dtype=self.counts.dtype))
            return idx, weights
        counts = self.counts if record else None
        if flat.shape[0] >= K.GROUPED_MIN_ROWS and BATCHED_ROUTER == "kernel":  # the batched step's rows
            if norm is not None:
                norm.drop_f32()  # the norm's float32 copy is not read: the kernel widens the rows itself
            return route_rows(flat, self, self.gate_bf16, counts, form="kernel")
        return K.moe_route(
            flat,
            self.gate_w32,
            self.top_k,
            counts=counts,
            scaling=self.routed_scaling_factor,
            renormalize=self.norm_topk_prob,
            logits=F.linear(self._f32(flat), self.gate_w32),  # cuBLAS: the torch path's exact logits
        )

    def norm_ahead(self, post: TritonRMSNorm, nxt: TritonRMSNorm) -> None:
        """Run ``nxt`` (the next layer's input norm, or the final norm) in this block's split down kernel: the sum
        of the block's output and the residual stream ``post`` (this layer's post-attention norm) made, and its
        norm (:func:`kernels.moe_experts`' ``norm``).  ``nxt`` then launches nothing (``ahead``)."""
        if self.down != "split":
            raise ValueError("the next norm runs in the split down kernel only (moe_down_split)")
        post.keep_summed, nxt.ahead = True, True
        object.__setattr__(self, "_norms", (post, nxt))  # the layers own the norms; this block only reads them

    def _reads_for(self, flat: Tensor) -> Tensor:
        """The counters this grouped call adds its expert reads to: ``expert_reads``, except in a graph capture's
        warm-up calls (``graphs.capture_graph`` runs the step twice before it captures; those are no decode step),
        which add to a scratch pair.  The capture itself adds to ``expert_reads``, so every replay does."""
        return self._warmup_reads if in_capture_warm_up(flat) else self.expert_reads

    def _f32(self, flat: Tensor) -> Tensor:
        norm = self.__dict__["router_input"]
        return flat.float() if norm is None else norm.f32_of(flat)

    def apply_experts(self, flat: Tensor, topk_idx: Tensor, topk_weight: Tensor, ctx: ForwardContext | None) -> Tensor:
        """GEMV kernels up to 8 rows (each row re-reads its experts), grouped-GEMM kernels from 9 rows on (each
        used expert read once); shared experts in the same launches when the stacks carry them."""
        stacks, n_always = (self.all_stacks, self.n_always) if self.all_stacks is not None else (self.stacked, 0)
        if flat.shape[0] >= K.GROUPED_MIN_ROWS:
            reads = self._reads_for(flat)
            return K.moe_experts_grouped(flat, topk_idx, topk_weight, *stacks, n_always=n_always, reads=reads)
        if self.down == "split":
            hidden, dev = flat.shape[1], flat.device
            counters = _kept_counters(
                self._down_counters,
                K.down_counter_count(flat.shape[0], hidden, dev),
                K.down_counter_count(TRITON_MAX_ROWS, hidden, dev),  # one buffer for every single-page step
                dev,
                _int32_zeros,
            )
            norm = None
            if self._norms is not None:
                post, nxt = self._norms
                rows = _kept_counters(self._row_counters, flat.shape[0], TRITON_MAX_ROWS, dev, _int32_zeros)
                residual = post.summed_for(flat)
                normed, summed = torch.empty_like(flat), torch.empty_like(flat)
                norm = (residual, nxt.weight, nxt.eps, normed, summed, rows)
            out = K.moe_experts(
                flat, topk_idx, topk_weight, *stacks, n_always=n_always, down="split", counters=counters, norm=norm
            )
            if norm is not None:
                nxt.expect(out, norm[0], norm[3], norm[4])
            return out
        counter = self._reads_for(flat) if self.count_all else None
        return K.moe_experts(flat, topk_idx, topk_weight, *stacks, n_always=n_always, reads=counter)


class TritonDenseMLP(nn.Module):
    """A decode step's dense SiLU-gated MLP (DeepSeek-OCR's first layer, 6,848 wide) on the expert GEMV kernels as
    one always-on slot (:func:`kernels.moe_experts` with no routed picks): gate / up GEMV with the SwiGLU in one
    kernel, then the down GEMV (its rows form: at 6,848 columns the split form would have only H / 8 programs),
    instead of cuBLAS's gate / up GEMM, an elementwise SwiGLU and cuBLAS's split-K down GEMM with its reduce.  The
    slot's stacks are views of the :class:`FusedMLP`'s own weights (``w13``: gate rows then up rows, as a stack
    slot lays them out; ``down_proj.weight``: [H, I], a slot's down matrix): no copy.  The torch path's rounding
    points (the GEMM outputs, the SiLU and the product in the activation dtype; the down sum rounded once).
    More than ``TRITON_MAX_ROWS`` rows run the wrapped MLP."""

    def __init__(self, mlp: FusedMLP) -> None:
        super().__init__()
        self.mlp = mlp
        inter = mlp.down_proj.weight.shape[1]
        if tuple(mlp.w13.shape) != (2 * inter, mlp.down_proj.weight.shape[0]):
            raise ValueError(f"a fused MLP's w13 {tuple(mlp.w13.shape)} does not fit its down_proj {inter} wide")

    def forward(self, x: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] > TRITON_MAX_ROWS:
            out: Tensor = self.mlp(x)
            return out
        w13, w2 = self.mlp.w13, self.mlp.down_proj.weight
        none = torch.empty((flat.shape[0], 0), dtype=torch.int64, device=flat.device)  # no routed picks
        y = K.moe_experts(flat, none, none.float(), w13.unsqueeze(0), w2.unsqueeze(0), n_always=1, down="rows")
        return y.view(x.shape)


def _triton_layer(
    layer: DecoderLayer,
    attention: Callable[[Attention], nn.Module],
    router_f32: bool,
    fused_router: bool = False,
    fused_input_norm: bool = False,
    down: str = "rows",
    dense: bool = False,
    count_all: bool = False,
) -> DecoderLayer:
    """``layer`` with Triton norms, ``attention`` around its attention and Triton experts for a grouped MoE
    (``router_f32``: its post-attention norm also writes the router's float32 input; ``fused_router``: that norm's
    kernel routes the rows itself, counting its picks unless ``count_all``; ``fused_input_norm``: the input norm runs
    inside a fused-rope attention's QKV kernel; ``dense``: a dense :class:`FusedMLP` on the expert kernels,
    :class:`TritonDenseMLP`; ``count_all``: the batched steps' layers, which record no routing and count the routed
    experts every expert kernel reads)."""
    attn, mlp = layer.self_attn, layer.mlp
    assert isinstance(attn, Attention)
    in_norm, post_norm = layer.input_layernorm, layer.post_attention_layernorm
    assert isinstance(in_norm, RMSNorm) and isinstance(post_norm, RMSNorm)
    if isinstance(mlp, GroupedMoE) and fused_router:
        post = TritonRMSNorm(post_norm, router=Router.of(mlp, counted=not count_all))
    else:
        post = TritonRMSNorm(post_norm, keep_f32=router_f32 and isinstance(mlp, GroupedMoE))
    reads_norm = post.keep_f32 or post.router is not None
    new_mlp: nn.Module = mlp
    if isinstance(mlp, GroupedMoE):
        new_mlp = TritonMoE(mlp, post if reads_norm else None, down, count_all)
    elif dense and isinstance(mlp, FusedMLP):
        new_mlp = TritonDenseMLP(mlp)
    new_attn = attention(attn)
    fold = fused_input_norm and isinstance(new_attn, TritonAttention) and new_attn.rope and new_attn.wqkv is not None
    new_in = TritonRMSNorm(in_norm, deferred=fold)
    if fold:  # set past nn.Module's registration: the layer owns the norm, the attention only reads it
        object.__setattr__(new_attn, "input_norm", new_in)
    return DecoderLayer(layer.layer_idx, new_attn, new_mlp, new_in, post)


def triton_layers(
    layers: list[DecoderLayer],
    norm: RMSNorm,
    router_f32: bool = False,
    linear: bool = False,
    one_launch_attention: bool = False,
    fused_router: bool = False,
    fused_rope: bool = False,
    fused_input_norm: bool = False,
    down_split: bool = False,
    dense: bool = False,
    down_norm: bool = False,
) -> tuple[list[DecoderLayer], RMSNorm]:
    """The fast layers (and the final norm) with Triton modules swapped in (``linear``: the attention's QKV and
    o_proj as Triton GEMVs; ``one_launch_attention``: attention without its combine launch; ``fused_router``: each
    MoE layer's post-attention norm and router in one launch; ``fused_rope``: with ``linear``, the rotary and the
    cache writes in the QKV GEMV; ``fused_input_norm``: with ``fused_rope``, each layer's input add + RMSNorm in
    that kernel too; ``down_split``: the experts' down GEMV in its split form, ``kernels.moe_experts(down="split")``;
    ``dense``: dense MLPs on the expert kernels, :class:`TritonDenseMLP`, else as they are; ``down_norm``: with
    ``down_split``, the norm after each MoE layer (the next layer's input norm, or the final norm) in that layer's
    down kernel, :meth:`TritonMoE.norm_ahead`, where that norm is not folded into a QKV kernel)."""

    def attention(attn: Attention) -> nn.Module:
        return TritonAttention(attn, linear, one_launch_attention, fused_rope)

    down = "split" if down_split else "rows"
    fast = [
        _triton_layer(layer, attention, router_f32, fused_router, fused_input_norm, down, dense) for layer in layers
    ]
    final = TritonRMSNorm(norm)
    if down_norm and down_split:
        nexts = [cast(TritonRMSNorm, layer.input_layernorm) for layer in fast[1:]] + [final]
        for layer, nxt in zip(fast, nexts, strict=True):
            if isinstance(layer.mlp, TritonMoE) and not nxt.deferred:
                layer.mlp.norm_ahead(cast(TritonRMSNorm, layer.post_attention_layernorm), nxt)
    return fast, final


def triton_row_layers(
    layers: list[DecoderLayer], norm: RMSNorm, router_f32: bool = False, fused_router: bool = False
) -> tuple[list[DecoderLayer], RMSNorm]:
    """The fast layers with Triton norms, router, experts and a row attention (:class:`TritonRowAttention`: per-row
    rotary positions and key masks over a padded cache) for decode steps over slot contexts: the batched step
    (and the torch step of more than 8 rows).  ``fused_router``: each MoE layer's post-attention norm routes its
    rows in the same launch (:func:`kernels.add_rms_norm_route`, counting no picks), at any row count, instead of
    the norm, cuBLAS's float32 logits and the top-k (``BATCHED_ROUTER``'s forms)."""
    rows = [_triton_layer(layer, TritonRowAttention, router_f32, fused_router, count_all=True) for layer in layers]
    return rows, TritonRMSNorm(norm)


class TritonPromptAttention(nn.Module):
    """A prompt's attention (the prefill: many positions per row, written at ``ctx.start``) with the rotary of q
    and k and the cache write of k and v in one kernel (:func:`kernels.prompt_rope_kv_write`: torch's rounding
    points, bit-identical) between cuBLAS's QKV GEMM and SDPA.  Contexts it does not cover (slot writes, no cache,
    no cos/sin, an unfused attention) run the wrapped module.  ``kernel``: "sdpa" attends with the context's SDPA;
    "triton" with :func:`prompt_attention.prompt_attention` where the context has no additive mask
    (``infer.fast.prefill_attention``)."""

    def __init__(self, attn: nn.Module, kernel: str = "sdpa") -> None:
        super().__init__()
        if kernel not in ("sdpa", "triton"):
            raise ValueError(f"kernel must be 'sdpa' or 'triton', got {kernel!r}")
        self.attn = attn
        self.kernel = kernel
        self._split_counters: list[Tensor] = []  # the split form's per-block counters (prompt_attention.SPLIT_STEPS)

    def forward(self, x: Tensor, ctx: ForwardContext, layer_idx: int) -> Tensor:
        a, cache, cos = self.attn, ctx.cache, ctx.cos
        bsz, length, _ = x.shape
        tables = cos is not None and cos.dim() == 3 and cos.shape[0] in (1, bsz) and cos.shape[1] == length
        if not isinstance(a, FusedAttention) or cache is None or ctx.slot is not None or not tables:
            out: Tensor = a(x, ctx, layer_idx)
            return out
        assert cos is not None and ctx.sin is not None
        end = ctx.start + length
        if end > cache.max_len:
            cache.check_room(end - cache.length)  # raises: the prompt does not fit
        k_layer, v_layer = cache.k[layer_idx], cache.v[layer_idx]
        q = K.prompt_rope_kv_write(
            F.linear(x, a.wqkv),
            cos.contiguous(),
            ctx.sin.contiguous(),
            k_layer,
            v_layer,
            ctx.start,
            a.num_heads,
            a.num_kv_heads,
            a.head_dim,
        )
        if self.kernel == "triton" and ctx.mask is None and not ctx.matmul_attention and length > 1:
            counters = None
            if PA.SPLIT_STEPS and x.device.type == "cuda":  # kept: a captured prefill graph holds their address
                need = PA.split_counter_count(bsz, a.num_heads, length)
                counters = _kept_counters(self._split_counters, need, need, x.device, _int32_zeros)
            out = PA.prompt_attention(q, k_layer, v_layer, ctx.start, counters=counters)  # [B, L, heads, D]
            return a.o_proj(out.reshape(bsz, length, a.num_heads * a.head_dim))
        out = ctx.attend(q.transpose(1, 2), k_layer[:, :, :end], v_layer[:, :, :end])
        return a.o_proj(out.transpose(1, 2).reshape(bsz, length, a.num_heads * a.head_dim))


def swiglu_mlp(mlp: nn.Module, x: Tensor) -> Tensor:
    """``mlp(x)`` with a :class:`FusedMLP`'s ``silu(gate) * up`` as one kernel (:func:`kernels.silu_mul`) between
    its two GEMMs; any other module is called as it is."""
    if not isinstance(mlp, FusedMLP):
        out: Tensor = mlp(x)
        return out
    return mlp.down_proj(K.silu_mul(F.linear(x, mlp.w13)))


class TritonPromptMLP(nn.Module):
    """A prompt's dense SiLU-gated MLP (the first layer's) with its SwiGLU in one kernel (:func:`swiglu_mlp`)."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        return swiglu_mlp(self.mlp, x)


# How a prompt's MoE rows are routed on the "triton" experts path (``ROWS_ROUTER``) and the batched decode step's
# rows from ``kernels.GROUPED_MIN_ROWS`` on (``BATCHED_ROUTER``).  "kernel": :func:`kernels.moe_route_rows`, the
# float32 logits and the top-k in one launch (the logits summed in another order than cuBLAS's); "cublas": the
# float32 rows (a cast, or the norm's float32 copy), cuBLAS's float32 GEMM, then :func:`kernels.moe_route`'s top-k.
# H200, round 17: the prompt (bench_fast, one run) LM prefill 3.59 -> 3.35 ms with "kernel" (the router alone,
# graph-timed: 24.2 -> 9.7 us at 913 rows); the batched step (bench_kernels, graph replays) 2.253 -> 2.260 ms at 32
# rows and 2.648 -> 2.700 at 64 with "kernel", though the kernel alone is 8.7 us there against 14.1: "cublas" stays
# the batched default.
ROWS_ROUTERS = ("kernel", "cublas")
ROWS_ROUTER = "kernel"
BATCHED_ROUTER = "cublas"


def route_rows(
    flat: Tensor,
    moe: GroupedMoE | TritonMoE,
    gate_bf16: Tensor | None,
    counts: Tensor | None = None,
    form: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(expert ids, weights) of ``flat``'s rows in ``form`` (None: ``ROWS_ROUTER``) with ``moe``'s router
    (``gate_bf16``: its :func:`kernels.exact_bf16`, the kernel's tensor-core operand, or None; ``counts``: the picks
    added on the device).  The ids equal the torch path's except where two scores tie to float32 rounding (either
    form: the kernel's summation order, or the softmax's near-ties)."""
    form = ROWS_ROUTER if form is None else form
    if form not in ROWS_ROUTERS:
        raise ValueError(f"the router form must be one of {ROWS_ROUTERS}, got {form!r}")
    gate, top_k = moe.gate_w32, moe.top_k
    scaling, renormalize = moe.routed_scaling_factor, moe.norm_topk_prob
    if form == "kernel":
        operand = gate_bf16 if gate_bf16 is not None and flat.dtype == gate_bf16.dtype else gate
        return K.moe_route_rows(flat, operand, top_k, scaling=scaling, renormalize=renormalize, counts=counts)
    logits = F.linear(flat.float(), gate)  # cuBLAS: the torch path's exact logits
    return K.moe_route(flat, gate, top_k, counts, scaling=scaling, renormalize=renormalize, logits=logits)


class TritonPromptMoE(nn.Module):
    """A prompt's MoE block (:class:`GroupedMoE` over stacked experts) whose un-permute, weighted sum over the
    picks and shared-expert add are one kernel (:func:`kernels.moe_gather_combine`) after the grouped GEMMs;
    counters and ``last_topk_idx`` as the wrapped block's.  ``experts``: "torch" routes with torch and runs the
    routed experts through ``torch._grouped_mm`` (``experts.grouped_experts_stacked``); "triton" routes by
    ``ROWS_ROUTER`` (:func:`kernels.moe_route_rows` by default; ids equal the torch path's except at float32
    near-ties) and runs :mod:`prompt_moe`'s sort and grouped GEMMs (``infer.fast.prefill_experts``).
    Blocks it does not cover (no stacks or shared experts, another expert implementation, a router other than
    softmax) run the wrapped module."""

    def __init__(self, moe: nn.Module, experts: str = "torch", shared_stream: torch.cuda.Stream | None = None) -> None:
        super().__init__()
        if experts not in ("torch", "triton"):
            raise ValueError(f"experts must be 'torch' or 'triton', got {experts!r}")
        self.moe = moe
        self.experts = experts
        # the shared experts' stream (FastConfig.prefill_shared_stream): they run there while the router, the sort
        # and the routed experts run on the current stream (:meth:`_shared_beside`); None: in line
        self.shared_stream = shared_stream
        # the router's bf16 operand (route_rows), when exact: made here, not under a graph capture
        self.gate_bf16 = K.exact_bf16(moe.gate_w32) if isinstance(moe, GroupedMoE) else None

    def forward(self, x: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        m = self.moe
        covered = isinstance(m, GroupedMoE) and m.stacked is not None and m.expert_fn is apply_experts_grouped
        if not covered or m.shared_experts is None:
            out: Tensor = m(x, ctx)
            return out
        assert isinstance(m, GroupedMoE) and m.stacked is not None
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.experts == "triton" and m.scoring_func == "softmax":
            record = m.counts is not None and (ctx is None or ctx.record_routing)
            w13, w2 = m.stacked

            def routed() -> tuple[Tensor, Tensor, Tensor, Tensor]:
                topk_idx, topk_weight = route_rows(flat, m, self.gate_bf16)
                al = PM.align(topk_idx, w2.shape[0], counts=m.counts if record else None)
                act = PM.grouped_swiglu(flat, al.order, al.offs, w13, m.top_k)
                if PM.DOWN_GEMM == "torch" and m.use_gmm:
                    y = torch._grouped_mm(act, w2.transpose(1, 2), offs=al.offs[1:])  # offs[1:]: each expert's end
                else:
                    y = PM.grouped_down(act, al.offs, w2)
                return topk_idx, topk_weight, y, al.inverse

            shared, (topk_idx, topk_weight, y, inverse) = self._shared_beside(m.shared_experts, flat, routed)
            out = K.moe_gather_combine(y, inverse, topk_weight, shared)
        else:
            topk_idx, topk_weight = m.select_experts(flat, ctx)
            shared = swiglu_mlp(m.shared_experts, flat)

            def combine(y: Tensor, inverse: Tensor) -> Tensor:
                return K.moe_gather_combine(y, inverse, topk_weight, shared)

            out = grouped_experts_stacked(
                flat, topk_idx, topk_weight, *m.stacked, m.use_gmm, combine=combine, swiglu=K.silu_mul
            )
            m.count(topk_idx, ctx)
        m.routing.last_topk_idx = topk_idx.detach()
        return out.view(shape)

    def _shared_beside(self, shared_mlp: nn.Module, flat: Tensor, routed: Callable[[], _T]) -> tuple[Tensor, _T]:
        """(the shared experts of ``flat``, ``routed()``).  With ``shared_stream`` (CUDA tensors) the shared experts
        run on it, forked from the current stream after ``flat`` is made and joined before this returns, so their
        GEMMs fill the SMs the router's and the sort's few programs leave idle; the same kernels either way, so the
        same bits.  cuBLAS keeps a workspace per stream: the two streams' GEMMs cannot share one."""
        side = self.shared_stream
        if side is None or flat.device.type != "cuda":
            return swiglu_mlp(shared_mlp, flat), routed()
        current = torch.cuda.current_stream(flat.device)
        side.wait_stream(current)  # flat is in place
        with torch.cuda.stream(side):
            shared = swiglu_mlp(shared_mlp, flat)
        result = routed()
        current.wait_stream(side)
        # allocated on the side stream, read (and freed) on the current one: not reused before that use is done
        shared.record_stream(current)
        return shared, result


def triton_prompt_layers(
    layers: list[DecoderLayer],
    norm: RMSNorm,
    experts: str = "torch",
    attention: str = "sdpa",
    shared_stream: torch.cuda.Stream | None = None,
) -> tuple[list[DecoderLayer], RMSNorm]:
    """The fast layers for prompts (the prefill): norms as :class:`TritonRMSNorm` (residual add + norm in one
    kernel, one program per row, ``decoder.RMSNorm``'s rounding points; the torch norm is five kernels over the
    prompt's rows), the attention as :class:`TritonPromptAttention` (rotary + cache write in one kernel instead
    of a roll, two products, a sum and two copies; ``attention="triton"``: the attention too), MoE blocks as
    :class:`TritonPromptMoE` (their weighted sum and shared add in one kernel; ``experts="triton"``: routing and
    routed experts on :mod:`prompt_moe`'s kernels; ``shared_stream``: their shared experts on that stream beside the
    routed ones, :meth:`TritonPromptMoE._shared_beside`) and every SwiGLU (routed, shared and dense MLPs) as one
    kernel."""
    return [
        DecoderLayer(
            layer.layer_idx,
            TritonPromptAttention(layer.self_attn, attention),
            TritonPromptMoE(layer.mlp, experts, shared_stream)
            if isinstance(layer.mlp, GroupedMoE)
            else TritonPromptMLP(layer.mlp),
            TritonRMSNorm(layer.input_layernorm),
            TritonRMSNorm(layer.post_attention_layernorm),
        )
        for layer in layers
    ], TritonRMSNorm(norm)
