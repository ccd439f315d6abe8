"""Routed-expert math of the DeepSeek-V2 MoE, as pure functions over an ``nn.ModuleList`` of expert MLPs.

Routing (:func:`route_tokens`) and expert application are separate so the kernels that apply experts
(eager loop, grouped GEMM, gather+bmm, dense, the Triton kernels) can be swapped without touching the
routing or the bookkeeping the profiler reads.  :data:`EXPERT_IMPLS` names the interchangeable ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_perf_opt.errors import ModelLoadError

__all__ = [
    "EXPERT_IMPLS",
    "MLP",
    "ExpertApply",
    "apply_experts_dense",
    "apply_experts_eager",
    "apply_experts_gather_bmm",
    "apply_experts_grouped",
    "grouped_experts_stacked",
    "route_tokens",
    "stacked_expert_weights",
    "use_grouped_mm",
]


class MLP(nn.Module):
    """SiLU-gated MLP: ``down(silu(gate(x)) * up(x))``; the dense layer, each routed expert and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor, ctx: object = None) -> Tensor:
        """``ctx`` (a decoder ForwardContext, unused): the signature every layer's MLP / MoE module shares."""
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


def use_grouped_mm(x: Tensor) -> bool:
    """``torch._grouped_mm`` runs bf16 on sm90+ GPUs; PyTorch's CPU build has a reference fallback."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return x.device.type == "cpu"


def silu_gate_up(h: Tensor) -> Tensor:
    """SwiGLU over a fused gate/up GEMM's output ``h`` [..., 2·I] (gate | up): ``silu(gate) * up`` [..., I]."""
    inter = h.shape[-1] // 2
    return F.silu(h[..., :inter]) * h[..., inter:]


def combine_picks(y: Tensor, inverse: Tensor, topk_weight: Tensor, dtype: torch.dtype) -> Tensor:
    """Each token's weighted sum over its k picks: expert outputs ``y`` [T·k, H] in expert-sorted order, ``inverse``
    [T·k] each (token, pick)'s row of ``y``, ``topk_weight`` [T, k]; summed in float32, rounded to ``dtype``."""
    n_tokens, k = topk_weight.shape
    per_slot = y.index_select(0, inverse).view(n_tokens, k, -1)
    return (per_slot.float() * topk_weight.float().unsqueeze(-1)).sum(dim=1).to(dtype)


def grouped_experts_stacked(
    x: Tensor,
    topk_idx: Tensor,
    topk_weight: Tensor,
    w13: Tensor,
    down: Tensor,
    use_gmm: bool,
    combine: Callable[[Tensor, Tensor], Tensor] | None = None,
    swiglu: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Routed experts over stacked weights (fused gate/up ``w13`` [E, 2I, H], ``down`` [E, H, I]).

    Sort the (token, slot) pairs by expert on the device; with ``use_gmm`` per-expert row offsets by
    ``searchsorted`` and two ``torch._grouped_mm`` calls (one kernel each, reading only the experts that have
    rows), else each row gathers its expert's matrices and uses ``bmm`` (fine for decode's few rows).  Then
    un-permute and the same float32 weighted sum over the k picks as the eager loop.  No host sync, and
    nothing here that ``torch.compile`` cannot trace (the fast path compiles it with stacks built at load).
    ``combine(y, inverse)``, when given, replaces the un-permute and weighted sum (expert outputs ``y`` in sorted
    order, ``inverse`` each (token, pick)'s row of ``y``): a fused kernel's (``kernels.moe_gather_combine``);
    ``swiglu(h)`` the ``silu(gate) * up`` over the gate/up GEMM's output (``kernels.silu_mul``).
    """
    k = topk_idx.shape[1]
    n_experts = down.shape[0]
    # (token, slot) pairs grouped by expert: a stable sort of the ids as the narrowest integer that holds them (a
    # GPU radix sort makes one pass per key byte: 1 instead of 8 for int64 ids; the order is the same)
    key_dtype = torch.uint8 if n_experts <= 256 else torch.int32
    sorted_ids, order = torch.sort(topk_idx.reshape(-1).to(key_dtype), stable=True)
    rows = x.index_select(0, order // k)
    if use_gmm:
        arange_e = torch.arange(n_experts, device=x.device, dtype=key_dtype)
        offs = torch.searchsorted(sorted_ids, arange_e, right=True, out_int32=True)
        h = torch._grouped_mm(rows, w13.transpose(1, 2), offs=offs)
    else:
        expert_of_row = sorted_ids.long()  # index_select takes int32/int64 indices
        h = torch.bmm(rows.unsqueeze(1), w13.index_select(0, expert_of_row).transpose(1, 2)).squeeze(1)
    act = (silu_gate_up if swiglu is None else swiglu)(h)
    if use_gmm:
        y = torch._grouped_mm(act, down.transpose(1, 2), offs=offs)
    else:
        y = torch.bmm(act.unsqueeze(1), down.index_select(0, expert_of_row).transpose(1, 2)).squeeze(1)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
    if combine is not None:
        return combine(y, inverse)
    return combine_picks(y, inverse, topk_weight, x.dtype)


def _grouped_experts(
    x: Tensor, topk_idx: Tensor, topk_weight: Tensor, experts: nn.ModuleList, force_bmm: bool
) -> tuple[Tensor, list[int]]:
    w13, down = stacked_expert_weights(experts)
    use_gmm = not force_bmm and use_grouped_mm(x)
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
    h = torch.matmul(x.unsqueeze(0), w13.transpose(1, 2))  # [E, N, 2I]
    y = torch.matmul(silu_gate_up(h), down.transpose(1, 2))  # [E, N, hidden]
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
