"""DeepSeek-V2 decoder layers exactly as DeepSeek-OCR configures them.

DeepSeek-OCR's language model is DeepSeek-V2 with MLA switched off: plain multi-head attention (q/k/v/o
projections without bias, default rotary embedding), a dense SiLU-gated MLP in the first
``first_k_dense_replace`` layers and a mixture of experts (softmax gate, greedy top-k, shared experts)
everywhere else.  Module and parameter names mirror the checkpoint so ``state_dict`` keys match it 1:1.

Numerics follow the reference where it matters for parity: RMSNorm and the MoE gate run in float32,
rotary tables are computed in float32 and cast to the activation dtype, routed-expert outputs are
weighted and summed in float32.  Attention goes through ``scaled_dot_product_attention`` so the GPU
picks a fused kernel.

The MoE routing math is one pure function (:func:`route_tokens`) and the expert application is a
separate function selected by ``MoE.expert_impl``, so a grouped/batched kernel can be added later without
touching the routing or the bookkeeping the profiler reads (``MoE.last_topk_idx``, ``MoE.tokens_per_expert``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_perf_opt.errors import ModelLoadError
from llm_perf_opt.models.deepseek_ocr.config import LanguageConfig
from llm_perf_opt.models.deepseek_ocr.kv_cache import StaticKVCache

__all__ = [
    "MLP",
    "Attention",
    "DecoderLayer",
    "MoE",
    "MoEGate",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_experts_dense",
    "apply_experts_eager",
    "apply_experts_gather_bmm",
    "apply_experts_grouped",
    "apply_rotary",
    "grouped_experts_stacked",
    "route_tokens",
    "set_expert_impl",
    "stacked_expert_weights",
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
    """Multi-head attention (MHA; GQA if the config ever asks for it) writing into a static KV cache."""

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

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        start: int,
        cache: StaticKVCache | None = None,
        layer_idx: int = 0,
    ) -> Tensor:
        """Attend positions ``start .. start+L-1`` of ``x`` [B, L, hidden] to themselves and the cached past.

        With a cache, this layer's new keys/values are written at ``start`` (the cache's current length;
        the caller advances the length once after all layers) and attention covers ``cache[:start+L]``.
        Without a cache ``start`` must be 0 and attention is plain causal self-attention.
        """
        bsz, length, _ = x.shape
        q = self.q_proj(x).view(bsz, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)

        if cache is not None:
            k, v = cache.write(layer_idx, k, v, start)
        elif start != 0:
            raise ValueError("attention without a KV cache must start at position 0")

        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)

        if length == 1:
            # One query attends to every cached position: no mask needed.
            out = F.scaled_dot_product_attention(q, k, v)
        elif start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Chunked prefill on top of a non-empty cache: causal mask offset by ``start``.
            q_pos = torch.arange(start, start + length, device=x.device)[:, None]
            k_pos = torch.arange(start + length, device=x.device)[None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos)
        out = out.transpose(1, 2).reshape(bsz, length, self.num_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    """SiLU-gated MLP: ``down(silu(gate(x)) * up(x))``; the dense layer, each routed expert and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route_tokens(
    gate_logits: Tensor,
    top_k: int,
    *,
    scoring_func: str = "softmax",
    topk_method: str = "greedy",
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Pure routing math: gate logits [N, E] -> (expert ids [N, k] int64, weights [N, k] float32).

    Scores are softmax (or sigmoid) over *all* routed experts in float32; the top-k are picked greedily
    (sorted by score, highest first); the weights are the raw scores times ``routed_scaling_factor``,
    renormalised over the k picks only when ``norm_topk_prob`` (DeepSeek-OCR: off).
    """
    logits32 = gate_logits.float()
    if scoring_func == "softmax":
        scores = logits32.softmax(dim=-1)
    elif scoring_func == "sigmoid":
        scores = logits32.sigmoid()
    else:
        raise ModelLoadError(f"unsupported MoE scoring_func {scoring_func!r}", hint="DeepSeek-OCR uses 'softmax'")
    if topk_method != "greedy":
        raise ModelLoadError(f"unsupported MoE topk_method {topk_method!r}", hint="DeepSeek-OCR uses 'greedy'")
    weights, idx = torch.topk(scores, k=top_k, dim=-1, sorted=True)
    if top_k > 1 and norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return idx, weights


ExpertApply = Callable[[Tensor, Tensor, Tensor, nn.ModuleList], tuple[Tensor, list[int]]]


def apply_experts_eager(
    x: Tensor, topk_idx: Tensor, topk_weight: Tensor, experts: nn.ModuleList
) -> tuple[Tensor, list[int]]:
    """Run each expert that received tokens on exactly those tokens; weighted sum over the k picks in float32.

    ``x`` [N, hidden], ``topk_idx``/``topk_weight`` [N, k].  Returns the routed output [N, hidden] in
    ``x.dtype`` and the tokens-per-expert counts.  The expert ids are read on the host once (the one sync
    the eager loop needs to know which experts to run; the reference's ``moe_infer`` does the same) and the
    grouping permutation is computed there, so the device sees one small upload, one gather, the expert
    MLPs, one un-permute gather and the weighted sum, in the reference's order of summation.
    """
    n_tokens, k = topk_idx.shape
    if n_tokens == 0:
        return torch.zeros_like(x), [0] * len(experts)
    ids = topk_idx.reshape(-1).to("cpu")
    counts = torch.bincount(ids, minlength=len(experts))
    order = torch.argsort(ids, stable=True)  # (token, slot) pairs grouped by expert
    perm = torch.stack((order // k, torch.argsort(order))).to(x.device)  # gather rows, inverse permutation
    grouped = x.index_select(0, perm[0])
    outs: list[Tensor] = []
    begin = 0
    count_list: list[int] = counts.tolist()
    for expert_id, count in enumerate(count_list):
        if count:
            outs.append(experts[expert_id](grouped[begin : begin + count]))
            begin += count
    per_slot = torch.cat(outs).index_select(0, perm[1]).view(n_tokens, k, -1)
    routed = (per_slot.float() * topk_weight.float().unsqueeze(-1)).sum(dim=1)
    return routed.to(x.dtype), count_list


def stacked_expert_weights(experts: nn.ModuleList, extra_slots: int = 0) -> tuple[Tensor, Tensor]:
    """Stacked expert weights, built once: fused gate/up ``w13`` [E, 2·I, hidden] and ``down`` [E, hidden, I].

    After stacking, each expert's own ``gate_proj``/``up_proj``/``down_proj`` weights are re-pointed to views
    of the stacks (same values, contiguous rows), so there is one copy of the expert weights, the eager loop
    still runs on the same values and ``state_dict`` keys are unchanged.  The stacks are cached on the
    ``ModuleList`` and rebuilt if the parameters were replaced since (``.to()``, ``load_state_dict`` with
    ``assign``).  Peak extra memory while building: one layer's experts.

    ``extra_slots`` > 0 allocates that many more (uninitialised) expert slots after the E experts and
    returns the whole [E + extra_slots, ...] stacks; the fast path copies the shared experts there so one
    kernel serves routed and shared experts.  A later call with fewer extra slots gets views of the first
    E + n slots of the same storage (no rebuild, no copy).
    """
    cached: tuple[Tensor, Tensor] | None = getattr(experts, "_stacked_weights", None)
    mlps: list[MLP] = [m for m in experts if isinstance(m, MLP)]
    if len(mlps) != len(experts) or not mlps:
        raise ModelLoadError("stacked_expert_weights needs a non-empty ModuleList of MLP experts")
    if extra_slots < 0:
        raise ValueError(f"extra_slots must be >= 0, got {extra_slots}")
    ref = mlps[0].gate_proj.weight
    n_experts = len(mlps)
    if cached is not None and ref.data_ptr() == cached[0].data_ptr():
        have = cached[0].shape[0] - n_experts
        if have == extra_slots:
            return cached
        if have > extra_slots:
            end = n_experts + extra_slots
            return cached[0][:end], cached[1][:end]
    inter, hidden = ref.shape
    with torch.no_grad():
        w13 = torch.empty((n_experts + extra_slots, 2 * inter, hidden), device=ref.device, dtype=ref.dtype)
        down = torch.empty((n_experts + extra_slots, hidden, inter), device=ref.device, dtype=ref.dtype)
        for e, expert in enumerate(mlps):
            w13[e, :inter].copy_(expert.gate_proj.weight)
            w13[e, inter:].copy_(expert.up_proj.weight)
            down[e].copy_(expert.down_proj.weight)
            expert.gate_proj.weight = nn.Parameter(w13[e, :inter], requires_grad=False)
            expert.up_proj.weight = nn.Parameter(w13[e, inter:], requires_grad=False)
            expert.down_proj.weight = nn.Parameter(down[e], requires_grad=False)
    stacked = (w13, down)
    object.__setattr__(experts, "_stacked_weights", stacked)
    return stacked


def _use_grouped_mm(x: Tensor) -> bool:
    """``torch._grouped_mm`` runs bf16 on sm90+ GPUs; PyTorch's CPU build has a reference fallback."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return x.device.type == "cpu"


def grouped_experts_stacked(
    x: Tensor, topk_idx: Tensor, topk_weight: Tensor, w13: Tensor, down: Tensor, use_gmm: bool
) -> Tensor:
    """Routed experts over stacked weights (fused gate/up ``w13`` [E, 2I, H], ``down`` [E, H, I]).

    Sort the (token, slot) pairs by expert on the device; with ``use_gmm`` per-expert row offsets by
    ``searchsorted`` and two ``torch._grouped_mm`` calls (one kernel each, reading only the experts that have
    rows), else each row gathers its expert's matrices and uses ``bmm`` (fine for decode's few rows).  Then
    un-permute and the same float32 weighted sum over the k picks as the eager loop.  No host sync, and
    nothing here that ``torch.compile`` cannot trace (the fast path compiles it with stacks built at load).
    """
    n_tokens, k = topk_idx.shape
    n_experts, _, inter = down.shape
    sorted_ids, order = torch.sort(topk_idx.reshape(-1), stable=True)  # (token, slot) pairs grouped by expert
    rows = x.index_select(0, order // k)
    if use_gmm:
        arange_e = torch.arange(n_experts, device=x.device, dtype=sorted_ids.dtype)
        offs = torch.searchsorted(sorted_ids, arange_e, right=True, out_int32=True)
        h = torch._grouped_mm(rows, w13.transpose(1, 2), offs=offs)
    else:
        h = torch.bmm(rows.unsqueeze(1), w13.index_select(0, sorted_ids).transpose(1, 2)).squeeze(1)
    act = F.silu(h[:, :inter]) * h[:, inter:]
    if use_gmm:
        y = torch._grouped_mm(act, down.transpose(1, 2), offs=offs)
    else:
        y = torch.bmm(act.unsqueeze(1), down.index_select(0, sorted_ids).transpose(1, 2)).squeeze(1)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
    per_slot = y.index_select(0, inverse).view(n_tokens, k, -1)
    routed = (per_slot.float() * topk_weight.float().unsqueeze(-1)).sum(dim=1)
    return routed.to(x.dtype)


def _grouped_experts(
    x: Tensor, topk_idx: Tensor, topk_weight: Tensor, experts: nn.ModuleList, force_bmm: bool
) -> tuple[Tensor, list[int]]:
    w13, down = stacked_expert_weights(experts)
    use_gmm = not force_bmm and _use_grouped_mm(x)
    return grouped_experts_stacked(x, topk_idx, topk_weight, w13, down, use_gmm), []


def apply_experts_grouped(
    x: Tensor, topk_idx: Tensor, topk_weight: Tensor, experts: nn.ModuleList
) -> tuple[Tensor, list[int]]:
    """Same result as :func:`apply_experts_eager` with no Python loop over experts and no host sync.

    Sort the (token, slot) pairs by expert on the device, per-expert row offsets by ``searchsorted``, then
    two grouped matmuls over the stacked weights (fused gate/up, then down), un-permute and the same
    float32 weighted sum over the k picks.  Returns no host-side counts (an empty list: reading them
    would be a sync); ``MoE.last_topk_idx`` still holds the routing on the device.
    """
    if topk_idx.shape[0] == 0:
        return torch.zeros_like(x), []
    return _grouped_experts(x, topk_idx, topk_weight, experts, force_bmm=False)


def apply_experts_gather_bmm(
    x: Tensor, topk_idx: Tensor, topk_weight: Tensor, experts: nn.ModuleList
) -> tuple[Tensor, list[int]]:
    """Like :func:`apply_experts_grouped` but each row gathers its expert's matrices and uses ``bmm``.

    Moves ``rows · expert_bytes`` through memory, so it only suits decode (a few rows); no host sync.
    """
    if topk_idx.shape[0] == 0:
        return torch.zeros_like(x), []
    return _grouped_experts(x, topk_idx, topk_weight, experts, force_bmm=True)


def apply_experts_dense(
    x: Tensor, topk_idx: Tensor, topk_weight: Tensor, experts: nn.ModuleList
) -> tuple[Tensor, list[int]]:
    """Every expert on every token, then the k picks' outputs gathered: E/k times the FLOPs, no sort, no sync."""
    w13, down = stacked_expert_weights(experts)
    n_tokens, k = topk_idx.shape
    inter = down.shape[2]
    h = torch.matmul(x.unsqueeze(0), w13.transpose(1, 2))  # [E, N, 2I]
    act = F.silu(h[..., :inter]) * h[..., inter:]
    y = torch.matmul(act, down.transpose(1, 2))  # [E, N, hidden]
    tok = torch.arange(n_tokens, device=x.device).unsqueeze(1).expand(n_tokens, k)
    per_slot = y[topk_idx, tok]  # [N, k, hidden]
    routed = (per_slot.float() * topk_weight.float().unsqueeze(-1)).sum(dim=1)
    return routed.to(x.dtype), []


EXPERT_IMPLS: dict[str, ExpertApply] = {
    "eager": apply_experts_eager,
    "grouped": apply_experts_grouped,
    "gather_bmm": apply_experts_gather_bmm,
    "dense": apply_experts_dense,
}


def set_expert_impl(module: nn.Module, name: str) -> None:
    """Select the expert implementation (a key of :data:`EXPERT_IMPLS`) for every MoE layer under ``module``."""
    if name not in EXPERT_IMPLS:
        raise ModelLoadError(f"unknown expert_impl {name!r}", hint=f"use one of {sorted(EXPERT_IMPLS)}")
    for sub in module.modules():
        if isinstance(sub, MoE):
            sub.expert_impl = name


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
    and ``tokens_per_expert`` accumulates host-side counts until :meth:`reset_routing_stats`.
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
        self.shared_experts: MLP | None = None
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        if expert_impl not in EXPERT_IMPLS:
            raise ModelLoadError(f"unknown expert_impl {expert_impl!r}", hint=f"use one of {sorted(EXPERT_IMPLS)}")
        self.expert_impl = expert_impl
        self.last_topk_idx: Tensor | None = None
        self.tokens_per_expert: list[int] = [0] * cfg.n_routed_experts

    def reset_routing_stats(self) -> None:
        self.last_topk_idx = None
        self.tokens_per_expert = [0] * len(self.experts)

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

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        topk_idx, topk_weight = self.route(self.gate(flat))
        routed, counts = EXPERT_IMPLS[self.expert_impl](flat, topk_idx, topk_weight, self.experts)
        self.last_topk_idx = topk_idx.detach()
        for expert_id, count in enumerate(counts):
            if count:
                self.tokens_per_expert[expert_id] += count
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(flat)
        return routed.view(shape)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; mlp is dense or MoE by layer index."""

    def __init__(self, cfg: LanguageConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Attention(cfg)
        self.mlp: MLP | MoE = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, start: int, cache: StaticKVCache | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start, cache, self.layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))
