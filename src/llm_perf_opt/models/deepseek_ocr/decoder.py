"""DeepSeek-V2 decoder layers exactly as DeepSeek-OCR configures them, and the one layer loop.

DeepSeek-OCR's language model is DeepSeek-V2 with MLA switched off: plain multi-head attention (q/k/v/o
projections without bias, default rotary embedding), a dense SiLU-gated MLP in the first
``first_k_dense_replace`` layers and a mixture of experts (softmax gate, greedy top-k, shared experts)
everywhere else.  Module and parameter names mirror the checkpoint so ``state_dict`` keys match it 1:1.

Numerics follow the reference where it matters for parity: RMSNorm and the MoE gate run in float32,
rotary tables are computed in float32 and cast to the activation dtype, routed-expert outputs are
weighted and summed in float32.  Attention goes through ``scaled_dot_product_attention`` so the GPU
picks a fused kernel.

One forward for every path: :class:`DecoderLayer` is built from the modules it is given (attention, MLP or
MoE, two norms), and :func:`run_decoder` is the only loop over layers.  The eager model builds the layers
from the config; the fast path (``fast_layers``, ``triton_layers``) builds more :class:`DecoderLayer` s over
the same weights with fused / grouped / Triton modules swapped in, the way torchtune passes other modules
into the same layer classes.  Where the tokens sit and which keys they see comes in a
:class:`~llm_perf_opt.models.deepseek_ocr.context.ForwardContext`.

The MoE block is :meth:`MoE.forward` only: route, apply experts, record, add shared experts.  Variants
override how experts are selected and applied (:meth:`MoE.select_experts`, :meth:`MoE.apply_experts`); the
statistics the profiler reads live in one :class:`RoutingStats` shared by a layer and its conversions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_perf_opt.errors import ModelLoadError
from llm_perf_opt.models.deepseek_ocr.config import LanguageConfig
from llm_perf_opt.models.deepseek_ocr.context import ForwardContext
from llm_perf_opt.models.deepseek_ocr.experts import (
    EXPERT_IMPLS,
    MLP,
    apply_experts_dense,
    apply_experts_eager,
    apply_experts_gather_bmm,
    apply_experts_grouped,
    grouped_experts_stacked,
    route_tokens,
    stacked_expert_weights,
    use_grouped_mm,
)

__all__ = [
    "EXPERT_IMPLS",
    "MLP",
    "Attention",
    "DecoderLayer",
    "MoE",
    "MoEGate",
    "RMSNorm",
    "RotaryEmbedding",
    "RoutingStats",
    "apply_experts_dense",
    "apply_experts_eager",
    "apply_experts_gather_bmm",
    "apply_experts_grouped",
    "apply_rotary",
    "grouped_experts_stacked",
    "route_tokens",
    "run_decoder",
    "set_expert_impl",
    "stacked_expert_weights",
    "use_grouped_mm",
]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (as the reference does), scaled in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def add_norm(self, delta: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """Residual add then norm: ``(norm(residual + delta), residual + delta)`` (``delta`` alone when None).

        The layer loop carries the residual stream this way so a kernel that fuses the add into the norm
        (the Triton step's ``add_rms_norm``) is a module swap; the sums are the same as ``x = x + f(norm(x))``.
        """
        summed = delta if residual is None else residual + delta
        return self(summed), summed


class RotaryEmbedding(nn.Module):
    """Default (unscaled) RoPE with ``rotate_half`` layout, theta from the config.

    Holds no parameters or buffers, so building the model on the meta device needs no special care: the
    cos/sin table is computed lazily per (device, dtype) in float32 and cast once, then sliced per call
    (a view, no kernel launch in decode).  The sin table comes with the sign of ``rotate_half`` folded in
    (first half negated), see :func:`apply_rotary`.
    """

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        super().__init__()
        if head_dim % 2:
            raise ModelLoadError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = float(theta)
        self.max_positions = int(max_positions)
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
        # tables outgrown by a longer one, kept: a CUDA graph captured earlier (the fast path's prefill graphs hold
        # no reference to the table) still reads their rows by address, and a freed table's memory is reused
        self._outgrown: list[tuple[Tensor, Tensor]] = []

    def _build(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponent)
        positions = torch.arange(n, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin()
        signed_sin = torch.cat((-sin[:, : self.head_dim // 2], sin[:, self.head_dim // 2 :]), dim=-1)
        return emb.cos().to(dtype), signed_sin.to(dtype)

    def forward(self, start: int, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and signed sin, each [length, head_dim], for positions ``start .. start+length-1``."""
        key = (device, dtype)
        table = self._tables.get(key)
        end = start + length
        if table is None or table[0].shape[0] < end:
            size = max(self.max_positions, end)
            if table is not None:
                size = max(size, 2 * table[0].shape[0])
                self._outgrown.append(table)
            table = self._build(size, device, dtype)
            self._tables[key] = table
        return table[0][start:end], table[1][start:end]


def apply_rotary(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate ``x`` [B, heads, L, D] by per-position cos / signed sin [L, D] (broadcast over batch and heads).

    Same values as the reference ``x*cos + rotate_half(x)*sin`` with ``rotate_half(x) = cat(-x2, x1)``:
    ``roll`` gives ``cat(x2, x1)`` in one kernel and the minus sign lives in ``signed_sin`` (exact).
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    """Multi-head attention (MHA; GQA if the config ever asks for it); cache writes and masks per the context."""

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        if self.head_dim * self.num_heads != cfg.hidden_size:
            raise ModelLoadError(
                f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )
        hidden = cfg.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated q [B, h, L, D], k [B, kvh, L, D] and v [B, kvh, L, D]; ``cos``/``sin`` [B|1, L, D]."""
        bsz, length, _ = x.shape
        q = self.q_proj(x).view(bsz, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos4, sin4 = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
        return apply_rotary(q, cos4, sin4), apply_rotary(k, cos4, sin4), v

    def forward(self, x: Tensor, ctx: ForwardContext, layer_idx: int) -> Tensor:
        """Attend the new positions of ``x`` [B, L, hidden] to the keys ``ctx`` makes visible; [B, L, hidden].

        This layer's keys/values are written into ``ctx.cache`` (at ``ctx.start`` or ``ctx.slot``); the caller
        advances the cache's length once after all layers.
        """
        if ctx.cos is None or ctx.sin is None:
            raise ValueError("attention needs per-token rotary cos/sin in the context")
        bsz, length, _ = x.shape
        q, k, v = self.project(x, ctx.cos, ctx.sin)
        k, v = ctx.write(layer_idx, k, v)
        out = ctx.attend(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, length, self.num_heads * self.head_dim))


class RoutingStats:
    """Routing the profiler reads, shared by an MoE layer and every converted copy of it.

    ``last_topk_idx``: expert ids [tokens, k] of the most recent forward (on device); ``tokens_per_expert``:
    host counts accumulated by the expert implementations that count on the host (the eager loop).
    """

    def __init__(self, n_experts: int) -> None:
        self.n_experts = n_experts
        self.last_topk_idx: Tensor | None = None
        self.tokens_per_expert: list[int] = [0] * n_experts

    def reset(self) -> None:
        self.last_topk_idx = None
        self.tokens_per_expert = [0] * self.n_experts

    def add_host_counts(self, counts: list[int]) -> None:
        for expert_id, count in enumerate(counts):
            if count:
                self.tokens_per_expert[expert_id] += count


class MoEGate(nn.Module):
    """Router weight [n_routed_experts, hidden]; logits are computed in float32 like the reference."""

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.float(), self.weight.float())


class MoE(nn.Module):
    """Routed experts + always-on shared experts (one MLP of width moe_intermediate_size * n_shared_experts).

    After each forward, ``last_topk_idx`` holds the chosen expert ids [tokens, k] (detached, on device)
    and ``tokens_per_expert`` accumulates host-side counts until :meth:`reset_routing_stats` (both in
    ``routing``, shared with the fast path's conversions of this layer).
    """

    def __init__(self, cfg: LanguageConfig, expert_impl: str = "eager") -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.scoring_func = cfg.scoring_func
        self.topk_method = cfg.topk_method
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        self.gate = MoEGate(cfg)
        self.shared_experts: nn.Module | None = None
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        if expert_impl not in EXPERT_IMPLS:
            raise ModelLoadError(f"unknown expert_impl {expert_impl!r}", hint=f"use one of {sorted(EXPERT_IMPLS)}")
        self.expert_impl = expert_impl
        self.routing = RoutingStats(cfg.n_routed_experts)

    def _copy_routing_rule(self, other: MoE) -> None:
        """Share ``other``'s routing settings, experts and statistics (for conversions of ``other``)."""
        self.top_k = other.top_k
        self.scoring_func = other.scoring_func
        self.topk_method = other.topk_method
        self.norm_topk_prob = other.norm_topk_prob
        self.routed_scaling_factor = other.routed_scaling_factor
        self.experts = other.experts
        self.gate = other.gate
        self.expert_impl = other.expert_impl
        self.routing = other.routing

    @property
    def last_topk_idx(self) -> Tensor | None:
        return self.routing.last_topk_idx

    @last_topk_idx.setter
    def last_topk_idx(self, value: Tensor | None) -> None:
        self.routing.last_topk_idx = value

    @property
    def tokens_per_expert(self) -> list[int]:
        return self.routing.tokens_per_expert

    def reset_routing_stats(self) -> None:
        self.routing.reset()

    @property
    def syncs_host(self) -> bool:
        """Whether the expert implementation reads the routing on the host (cannot be captured in a graph)."""
        return EXPERT_IMPLS[self.expert_impl] is apply_experts_eager

    def route(self, gate_logits: Tensor) -> tuple[Tensor, Tensor]:
        """This layer's routing rule applied to router logits -> (expert ids, weights) [tokens, k]."""
        return route_tokens(
            gate_logits,
            self.top_k,
            scoring_func=self.scoring_func,
            topk_method=self.topk_method,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
        )

    def select_experts(self, flat: Tensor, ctx: ForwardContext | None) -> tuple[Tensor, Tensor]:
        """Expert ids and weights [tokens, k] for the rows of ``flat`` [tokens, hidden]."""
        return self.route(self.gate(flat))

    def apply_experts(self, flat: Tensor, topk_idx: Tensor, topk_weight: Tensor, ctx: ForwardContext | None) -> Tensor:
        """The routed experts' weighted sum [tokens, hidden]; host counts recorded when the impl gives them."""
        impl = (ctx.expert_impl if ctx is not None else None) or self.expert_impl
        routed, counts = EXPERT_IMPLS[impl](flat, topk_idx, topk_weight, self.experts)
        self.routing.add_host_counts(counts)
        return routed

    def forward(self, x: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        topk_idx, topk_weight = self.select_experts(flat, ctx)
        routed = self.apply_experts(flat, topk_idx, topk_weight, ctx)
        self.routing.last_topk_idx = topk_idx.detach()
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(flat)
        return routed.view(shape)


def set_expert_impl(module: nn.Module, name: str) -> None:
    """Select the expert implementation (a key of :data:`EXPERT_IMPLS`) for every MoE layer under ``module``."""
    if name not in EXPERT_IMPLS:
        raise ModelLoadError(f"unknown expert_impl {name!r}", hint=f"use one of {sorted(EXPERT_IMPLS)}")
    for sub in module.modules():
        if isinstance(sub, MoE):
            sub.expert_impl = name


class DecoderLayer(nn.Module):
    """Pre-norm block over the residual stream: ``h += attn(norm(h))`` then ``h += mlp(norm(h))``.

    Built from the modules it is given (:meth:`build` makes the eager ones from the config); the fast path
    builds more layers over the same weights with other modules.  ``forward`` takes the previous layer's
    output and the residual stream separately (see :meth:`RMSNorm.add_norm`) and returns both.
    """

    def __init__(
        self,
        layer_idx: int,
        self_attn: nn.Module,
        mlp: nn.Module,
        input_layernorm: RMSNorm,
        post_attention_layernorm: RMSNorm,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm

    @classmethod
    def build(cls, cfg: LanguageConfig, layer_idx: int) -> DecoderLayer:
        """The checkpoint's layer: dense MLP in the first ``first_k_dense_replace`` layers, MoE after."""
        mlp: nn.Module = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        return cls(
            layer_idx,
            Attention(cfg),
            mlp,
            RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
            RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        )

    def forward(self, hidden: Tensor, residual: Tensor | None, ctx: ForwardContext) -> tuple[Tensor, Tensor]:
        x, residual = self.input_layernorm.add_norm(hidden, residual)
        x, residual = self.post_attention_layernorm.add_norm(self.self_attn(x, ctx, self.layer_idx), residual)
        return self._feed_forward(x, ctx), residual

    def _feed_forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        """MLP / MoE on the rows ``ctx.rows`` of the flattened ``x`` (all when None); other rows get zeros
        (pad positions, finished sequences: their outputs are never read)."""
        if ctx.rows is None:
            out: Tensor = self.mlp(x, ctx)
            return out
        flat = x.reshape(-1, x.shape[-1])
        y = self.mlp(flat.index_select(0, ctx.rows), ctx)
        return torch.zeros_like(flat).index_copy_(0, ctx.rows, y).view(x.shape)


def run_decoder(layers: Iterable[nn.Module], norm: RMSNorm, hidden: Tensor, ctx: ForwardContext) -> Tensor:
    """The decoder over ``hidden`` (embeddings): every layer, then the final norm -> normed hidden states.

    The only loop over decoder layers in the package.  Does not advance ``ctx.cache``'s length (a captured
    step must not touch host state); the caller does once all layers wrote.
    """
    residual: Tensor | None = None
    for layer in layers:
        hidden, residual = layer(hidden, residual, ctx)
    return norm.add_norm(hidden, residual)[0]
