"""Model conversions of the fast path: the eager decoder layers rebuilt over the same weights with fused modules.

:func:`convert_layer` returns a new :class:`~llm_perf_opt.models.deepseek_ocr.decoder.DecoderLayer` (same class,
same forward) whose attention, MLP and MoE are swapped for fused or grouped ones, the way torchtitan's model
converters swap layers.  Nothing is copied but the shared experts' extra expert slots: fused matrices are
built once and the original ``nn.Linear`` weights re-pointed to views of them, so the eager model keeps
working on the same storage and stays what the fast one is compared against.

* :class:`FusedAttention`: q/k/v as one [3·hidden, hidden] GEMM, q and k rotated in one pass;
* :class:`FusedMLP`: gate/up as one [2·I, hidden] GEMM (dense layer and shared experts);
* :class:`GroupedMoE`: router in float32 from a cached float copy of its weight, routed experts over stacked
  weights with no host sync (``grouped_experts_stacked``), tokens per expert counted on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_perf_opt.models.deepseek_ocr.context import ForwardContext
from llm_perf_opt.models.deepseek_ocr.decoder import MLP, Attention, DecoderLayer, MoE, RMSNorm
from llm_perf_opt.models.deepseek_ocr.experts import (
    EXPERT_IMPLS,
    apply_experts_eager,
    apply_experts_grouped,
    grouped_experts_stacked,
    silu_gate_up,
    stacked_expert_weights,
    use_grouped_mm,
)

__all__ = ["FusedAttention", "FusedMLP", "GroupedMoE", "convert_layer", "fuse_linears", "fuse_linears_with_bias"]


def _fuse_params(linears: Sequence[nn.Linear], attr: str) -> Tensor:
    """Concatenate the linears' ``attr`` tensors (weight or bias) along the output dim, once; re-point each to a
    view of the result (same values, one storage), so the eager modules keep working on it."""
    tensors: list[Tensor] = [getattr(lin, attr) for lin in linears]
    cached = getattr(linears[0], f"_fused_{attr}", None)
    if cached is not None and tensors[0].data_ptr() == cached.data_ptr():
        return cached
    rows = sum(t.shape[0] for t in tensors)
    with torch.no_grad():
        fused = torch.empty((rows, *tensors[0].shape[1:]), device=tensors[0].device, dtype=tensors[0].dtype)
        begin = 0
        for lin, t in zip(linears, tensors, strict=True):
            end = begin + t.shape[0]
            fused[begin:end].copy_(t)
            setattr(lin, attr, nn.Parameter(fused[begin:end], requires_grad=False))
            begin = end
    object.__setattr__(linears[0], f"_fused_{attr}", fused)
    return fused


def fuse_linears(linears: Sequence[nn.Linear]) -> Tensor:
    """Concatenate bias-free linears' weights along the output dim; re-point each weight to a view of it."""
    if any(lin.bias is not None for lin in linears):
        raise ValueError("fuse_linears only fuses bias-free projections")
    return _fuse_params(linears, "weight")


def fuse_linears_with_bias(linears: Sequence[nn.Linear]) -> tuple[Tensor, Tensor]:
    """:func:`fuse_linears` for projections that all have a bias (Qwen2's q/k/v): fused weight and fused bias."""
    if any(lin.bias is None for lin in linears):
        raise ValueError("fuse_linears_with_bias needs a bias on every projection")
    return _fuse_params(linears, "weight"), _fuse_params(linears, "bias")


class FusedMLP(nn.Module):
    """A SiLU-gated MLP with gate/up as one GEMM over a fused weight (views of the original ones)."""

    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        self.w13 = fuse_linears([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj

    def forward(self, x: Tensor, ctx: object = None) -> Tensor:
        out: Tensor = self.down_proj(silu_gate_up(F.linear(x, self.w13)))
        return out


class FusedAttention(Attention):
    """:class:`Attention` with q/k/v as one GEMM over a fused weight; q and k rotated together."""

    def __init__(self, attn: Attention) -> None:
        nn.Module.__init__(self)
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.wqkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        bsz, length, _ = x.shape
        hq, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(x, self.wqkv).view(bsz, length, hq + 2 * hk, d)
        qk, v = qkv[:, :, : hq + hk], qkv[:, :, hq + hk :]
        # cos/sin [B|1, L, D] broadcast over heads: rotate q and k in one pass (same values as apply_rotary)
        cos4, sin4 = cos.unsqueeze(2), sin.unsqueeze(2)
        qk = qk * cos4 + qk.roll(d // 2, dims=-1) * sin4
        return qk[:, :, :hq].transpose(1, 2), qk[:, :, hq:].transpose(1, 2), v.transpose(1, 2)


_ONES: dict[tuple[int, torch.device], Tensor] = {}


def _ones_like_ids(ids: Tensor) -> Tensor:
    """int64 ones, one per routed id (cached per size when eager; made in the graph under ``torch.compile``, where
    a lookup of the cache is guarded on and the first call's miss made the second call compile again, as SAM's
    key one-hot table did: round 32)."""
    if torch.compiler.is_compiling():
        return torch.ones(ids.numel(), device=ids.device, dtype=torch.int64)
    key = (ids.numel(), ids.device)
    ones = _ONES.get(key)
    if ones is None:
        ones = _ONES[key] = torch.ones(ids.numel(), device=ids.device, dtype=torch.int64)
    return ones


class GroupedMoE(MoE):
    """The same MoE block with the router weight cached in float32, routed experts over stacked weights and
    per-expert token counts kept on the device (``counts``; fed when ``ctx.record_routing``).

    ``grouped=False`` keeps the eager expert loop (host counts) but still fuses the shared experts.  The
    stacks get extra slots holding the shared MLP split along its intermediate dim (``all_stacks``,
    ``n_always``) when its width is a multiple of an expert's: the Triton expert kernel then runs routed and
    shared experts together (a copy: ~14 MB per layer at full size).
    """

    def __init__(self, moe: MoE, *, grouped: bool, expert_impl: str, fused: bool) -> None:
        nn.Module.__init__(self)
        self._copy_routing_rule(moe)
        shared = moe.shared_experts
        self.shared_experts = FusedMLP(shared) if fused and isinstance(shared, MLP) else shared
        self.gate_w32 = moe.gate.weight.detach().float()
        self.grouped = grouped
        self.expert_fn = EXPERT_IMPLS[expert_impl] if grouped else apply_experts_grouped
        self.stacked: tuple[Tensor, Tensor] | None = None
        self.all_stacks: tuple[Tensor, Tensor] | None = None
        self.n_always = 0
        self.use_gmm = False
        self.counts: Tensor | None = None
        if grouped:
            self.stacked = self._stacks(moe)
            w13 = self.stacked[0]
            self.use_gmm = use_grouped_mm(w13) and (w13.device.type == "cuda" or w13.dtype == torch.bfloat16)
            self.counts = torch.zeros(len(moe.experts), dtype=torch.int64, device=w13.device)

    def _stacks(self, moe: MoE) -> tuple[Tensor, Tensor]:
        """Routed experts' stacks [E, ...]; shared-expert slots after them when the widths allow (see class doc)."""
        shared = moe.shared_experts
        first = moe.experts[0]
        assert isinstance(first, MLP)
        inter = int(first.gate_proj.weight.shape[0])
        n_slots = 0
        if isinstance(shared, MLP) and int(shared.gate_proj.weight.shape[0]) % inter == 0:
            n_slots = int(shared.gate_proj.weight.shape[0]) // inter
        w13, down = stacked_expert_weights(moe.experts, extra_slots=n_slots)
        n_experts = len(moe.experts)
        if n_slots and isinstance(shared, MLP):
            hidden = int(w13.shape[-1])
            # stacks first built under inference_mode are inference tensors: update them in that mode
            with torch.inference_mode():
                w13[n_experts:, :inter].copy_(shared.gate_proj.weight.view(n_slots, inter, hidden))
                w13[n_experts:, inter:].copy_(shared.up_proj.weight.view(n_slots, inter, hidden))
                down[n_experts:].copy_(shared.down_proj.weight.view(hidden, n_slots, inter).transpose(0, 1))
            self.all_stacks, self.n_always = (w13, down), n_slots
        return w13[:n_experts], down[:n_experts]

    @property
    def syncs_host(self) -> bool:
        return not self.grouped or self.expert_fn is apply_experts_eager

    def select_experts(self, flat: Tensor, ctx: ForwardContext | None) -> tuple[Tensor, Tensor]:
        return self.route(F.linear(flat.float(), self.gate_w32))

    def apply_experts(self, flat: Tensor, topk_idx: Tensor, topk_weight: Tensor, ctx: ForwardContext | None) -> Tensor:
        if not self.grouped:
            routed, host_counts = apply_experts_eager(flat, topk_idx, topk_weight, self.experts)
            self.routing.add_host_counts(host_counts)
            return routed
        if self.stacked is not None and self.expert_fn is apply_experts_grouped:
            routed = grouped_experts_stacked(flat, topk_idx, topk_weight, *self.stacked, self.use_gmm)
        else:
            routed, _ = self.expert_fn(flat, topk_idx, topk_weight, self.experts)
        self.count(topk_idx, ctx)
        return routed

    def count(self, topk_idx: Tensor, ctx: ForwardContext | None) -> None:
        """Add this forward's picks to the device counters (``ctx.record_routing``; always without a context)."""
        if self.counts is not None and (ctx is None or ctx.record_routing):
            self.counts.index_add_(0, topk_idx.reshape(-1), _ones_like_ids(topk_idx))


def convert_layer(layer: DecoderLayer, *, fused: bool, grouped: bool, expert_impl: str) -> DecoderLayer:
    """A fast :class:`DecoderLayer` over ``layer``'s weights: fused q/k/v and gate/up (``fused``), the MoE as a
    :class:`GroupedMoE` (stacked experts when ``grouped``); norms are the same modules."""
    attn = layer.self_attn
    assert isinstance(attn, Attention)
    mlp: nn.Module = layer.mlp
    if isinstance(mlp, MoE):
        mlp = GroupedMoE(mlp, grouped=grouped, expert_impl=expert_impl, fused=fused)
    elif isinstance(mlp, MLP) and fused:
        mlp = FusedMLP(mlp)
    in_norm, post_norm = layer.input_layernorm, layer.post_attention_layernorm
    assert isinstance(in_norm, RMSNorm) and isinstance(post_norm, RMSNorm)
    return DecoderLayer(layer.layer_idx, FusedAttention(attn) if fused else attn, mlp, in_norm, post_norm)
