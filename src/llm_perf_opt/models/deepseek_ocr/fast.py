"""Fast path for the native DeepSeek-OCR model: fused weights, grouped MoE, a CUDA-graph decode step.

``apply_fast_path(model, FastConfig(...))`` returns a :class:`FastModel` that the session can use in
place of :class:`~llm_perf_opt.models.deepseek_ocr.model.DeepseekOCRForCausalLM`: same stage methods
(``encode_images``, ``embed_prompt``, ``prefill``, ``decode_step``, ``new_cache``), every other attribute
delegated to the wrapped model (``fast.model.sam_model`` is the same module, so hooks keep firing).

What changes, all at load (``apply_fast_path``), with no second copy of any weight but the shared experts':

* ``fused_qkv``: q/k/v projections become one [3·hidden, hidden] matrix; gate/up of the dense MLP and the
  shared experts become one [2·I, hidden] matrix.  The original ``nn.Linear`` weights are re-pointed to
  views of the fused tensors (same values), so the eager model still works on the same storage.
* ``grouped_moe``: routed experts are stacked ([E, 2·I, hidden] and [E, hidden, I]; plus the shared experts
  copied into extra slots, ~14 MB per layer, for the Triton expert kernel) and applied with
  :func:`~llm_perf_opt.models.deepseek_ocr.decoder.apply_experts_grouped` (device-side sort by expert,
  ``searchsorted`` offsets, ``torch._grouped_mm``): no Python loop over experts, no host sync.
* ``cuda_graphs``: a decode step reads its token from a static buffer and its position from a static
  device tensor; the KV write is an ``index_copy_`` at that position and attention runs over the cache's
  whole ``max_len`` with an additive mask by position, so one captured graph serves every step of a page.
  Greedy argmax is computed on the device inside the graph (:meth:`FastDecoder.greedy`).
* vision (``sam_fast``, ``sam_compile``, ``clip_compile``, ``vision_graphs``; :meth:`FastModel.vision_mode`):
  SAM attention with the decomposed rel-pos folded into the q/k operands (no N×N bias: flash applies) and a
  channels-last neck; SAM and CLIP blocks as ``torch.compile``'d functions of their weights; both towers'
  forwards replayed from CUDA graphs per view shape.  Set on the shared modules only inside
  ``encode_images`` (the modules are still called, so hooks fire); the eager model's path is untouched.
* ``decode_compile``: ``torch.compile`` of the decode step before capture (measured no faster; off).
* ``decode_kernels="triton"`` (default where Triton runs): the decode step as fused Triton kernels
  (:mod:`~llm_perf_opt.models.deepseek_ocr.kernels`: add+RMSNorm, rotary+KV write, split-K attention over
  keys ``0..pos`` only, router top-k, routed + shared experts in two GEMV kernels) plus cuBLAS for the QKV,
  o_proj and lm_head GEMMs: ~170 launches per step instead of ~700 (H200: 0.88 vs 2.29 ms/token).
* ``prefill_graphs``: the LM prefill replayed from a CUDA graph per (prompt length, cache) (LRU of 8).
* ``device_decode`` (used by the profiler's session): :meth:`FastDecoder.greedy` with the no-repeat-ngram ban
  computed inside the graph (:func:`~llm_perf_opt.models.deepseek_ocr.generation.banned_ngram_mask`).
* ``pinned_upload`` (used by the session): page pixels in page-locked memory before the timed upload.

Exactness: the fast path computes the same function as the eager model, with different kernels (fused
GEMMs, grouped GEMM, masked attention over ``max_len``), so logits agree to bf16 rounding, not bit for bit.
``no_repeat_ngram`` needs the host-side history: use :meth:`FastModel.decode_step` (logits to the host,
exact rule in :func:`~llm_perf_opt.models.deepseek_ocr.generation.select_next_token`).
:meth:`FastDecoder.greedy` is exact greedy (first index on ties, as ``torch.argmax``) and checks eos
every ``check_every`` steps, so up to ``check_every - 1`` tokens past eos are computed (and dropped).

Routing statistics: the grouped path counts tokens per expert on the device; ``tokens_per_expert()``
reads them (one sync, only when called).  ``last_routing`` holds the most recent forward's expert ids.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from llm_perf_opt.errors import InputError
from llm_perf_opt.models.deepseek_ocr.clip import clip_block_fast
from llm_perf_opt.models.deepseek_ocr.decoder import (
    EXPERT_IMPLS,
    MLP,
    Attention,
    DecoderLayer,
    MoE,
    RMSNorm,
    _use_grouped_mm,
    apply_experts_eager,
    apply_experts_grouped,
    grouped_experts_stacked,
    stacked_expert_weights,
)
from llm_perf_opt.models.deepseek_ocr.generation import banned_ngram_mask
from llm_perf_opt.models.deepseek_ocr.kv_cache import StaticKVCache
from llm_perf_opt.models.deepseek_ocr.model import DEFAULT_SDPA_BACKENDS, DeepseekOCRForCausalLM
from llm_perf_opt.models.deepseek_ocr.sam import sam_block_fast

__all__ = ["VISION_SDPA", "FastConfig", "FastDecoder", "FastModel", "apply_fast_path", "first_argmax", "fuse_linears"]

# SDPA backend lists for the vision towers (SAM's rel-pos bias rules flash out; CLIP has no mask).
VISION_SDPA: dict[str, tuple[SDPBackend, ...] | None] = {
    "model": None,  # whatever the wrapped model uses (DEFAULT_SDPA_BACKENDS: no cuDNN)
    "cudnn": (SDPBackend.CUDNN_ATTENTION, *DEFAULT_SDPA_BACKENDS),
    "flash": DEFAULT_SDPA_BACKENDS,
}
DECODE_ATTN = ("matmul", "sdpa")
# decode-step kernels: "torch" (cuBLAS + PyTorch elementwise ops) or "triton" (models/deepseek_ocr/kernels.py)
DECODE_KERNELS = ("torch", "triton")
TRITON_MAX_ROWS = 8  # the Triton expert kernels re-read weights per token: decode batches up to 8 rows
# torch.compile of the decode step body (then captured in the CUDA graph as before): "none" or an inductor mode.
DECODE_COMPILE = ("none", "default", "max-autotune-no-cudagraphs")


@attrs.frozen
class FastConfig:
    """Switches of the fast path (``infer.fast.*`` in the session config)."""

    grouped_moe: bool = True
    cuda_graphs: bool = True
    fused_qkv: bool = True
    vision_sdpa: str = attrs.field(default="model", validator=attrs.validators.in_(tuple(VISION_SDPA)))
    decode_attention: str = attrs.field(default="matmul", validator=attrs.validators.in_(DECODE_ATTN))
    # decoder.EXPERT_IMPLS key used when grouped_moe (measure "gather_bmm")
    expert_impl: str = attrs.field(default="grouped", validator=attrs.validators.in_(tuple(EXPERT_IMPLS)))
    # SAM with rel-pos folded into the attention operands (no N×N bias, flash-eligible) and a channels-last
    # neck (sam.SamEncoder.fast); set on the shared module only for the duration of encode_images.
    sam_fast: bool = True
    # torch.compile of one SAM block (sam.sam_block_fast) when sam_fast: fuses the layout copies, norms and
    # the augmented-attention concatenations; compiled once per view shape (tiles, global view) and block kind.
    sam_compile: bool = True
    # the same for CLIP's layers (clip.clip_block_fast via ClipTransformer.layer_fn): one compile per view shape
    clip_compile: bool = True
    # replay SAM's and CLIP's fast forwards from CUDA graphs captured per input shape (vision is host-bound:
    # ~500 launches + compiled-guard checks per page); the module calls, and so the timing hooks, stay.
    vision_graphs: bool = True
    decode_compile: str = attrs.field(default="none", validator=attrs.validators.in_(DECODE_COMPILE))
    # replay the language-model prefill from a CUDA graph per prompt length (needs cuda_graphs; batch 1)
    prefill_graphs: bool = True
    # fused Triton decode step (kernels.py) where Triton runs (CUDA); elsewhere the torch step, said once
    decode_kernels: str = attrs.field(default="triton", validator=attrs.validators.in_(DECODE_KERNELS))
    # the session's decode loop picks tokens on the device (greedy + the no-repeat-ngram ban inside the decode
    # graph, eos checked every 16 steps) instead of reading every step's logits on the host; temperature > 0
    # keeps the host loop
    device_decode: bool = True
    # the session copies each page's pixels into page-locked memory during preprocessing, so the upload
    # inside the timed prefill is an asynchronous DMA (CUDA only)
    pinned_upload: bool = True


def fuse_linears(linears: Sequence[nn.Linear]) -> Tensor:
    """Concatenate bias-free linears' weights along the output dim; re-point each weight to a view of it."""
    weights = [lin.weight for lin in linears]
    if any(lin.bias is not None for lin in linears):
        raise ValueError("fuse_linears only fuses bias-free projections")
    fused_ptr = getattr(linears[0], "_fused_weight", None)
    if fused_ptr is not None and weights[0].data_ptr() == fused_ptr.data_ptr():
        return fused_ptr
    rows = sum(w.shape[0] for w in weights)
    with torch.no_grad():
        fused = torch.empty((rows, weights[0].shape[1]), device=weights[0].device, dtype=weights[0].dtype)
        begin = 0
        for lin, w in zip(linears, weights, strict=True):
            end = begin + w.shape[0]
            fused[begin:end].copy_(w)
            lin.weight = nn.Parameter(fused[begin:end], requires_grad=False)
            begin = end
    object.__setattr__(linears[0], "_fused_weight", fused)
    return fused


class _Mlp:
    """Weights of one SiLU-gated MLP, gate/up fused when asked."""

    def __init__(self, mlp: MLP, fused: bool) -> None:
        self.mlp = mlp
        self.inter = mlp.gate_proj.weight.shape[0]
        self.w13 = fuse_linears([mlp.gate_proj, mlp.up_proj]) if fused else None

    def __call__(self, x: Tensor) -> Tensor:
        if self.w13 is None:
            return self.mlp(x)
        h = F.linear(x, self.w13)
        return self.mlp.down_proj(F.silu(h[..., : self.inter]) * h[..., self.inter :])


class _Layer:
    """One decoder layer's weights arranged for the fast forward."""

    def __init__(self, layer: DecoderLayer, cfg: FastConfig) -> None:
        attn: Attention = layer.self_attn
        self.idx: int = layer.layer_idx
        self.attn = attn
        self.in_norm: RMSNorm = layer.input_layernorm
        self.post_norm: RMSNorm = layer.post_attention_layernorm
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.wqkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj]) if cfg.fused_qkv else None
        self.moe: MoE | None = layer.mlp if isinstance(layer.mlp, MoE) else None
        self.dense = _Mlp(layer.mlp, cfg.fused_qkv) if isinstance(layer.mlp, MLP) else None
        self.shared = None
        self.gate_w32: Tensor | None = None
        self.stacked: tuple[Tensor, Tensor] | None = None
        self.use_gmm = False
        if self.moe is not None:
            if self.moe.shared_experts is not None:
                self.shared = _Mlp(self.moe.shared_experts, cfg.fused_qkv)
            self.gate_w32 = self.moe.gate.weight.detach().float()
            if cfg.grouped_moe:
                self.stacked = self._stacks(self.moe)
                w13 = self.stacked[0]
                self.use_gmm = _use_grouped_mm(w13) and (w13.device.type == "cuda" or w13.dtype == torch.bfloat16)
        self.expert_fn = EXPERT_IMPLS[cfg.expert_impl] if cfg.grouped_moe else apply_experts_grouped
        self.grouped = cfg.grouped_moe

    def _stacks(self, moe: MoE) -> tuple[Tensor, Tensor]:
        """Routed experts' stacks [E, ...]; with shared experts whose width is a multiple of the routed one,
        the stacks get that many extra slots holding the shared MLP split along its intermediate dim (a
        copy: ~14 MB per layer), kept in ``all_stacks`` / ``n_always`` for the Triton expert kernel."""
        self.all_stacks: tuple[Tensor, Tensor] | None = None
        self.n_always = 0
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

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated q [B, h, L, D], k [B, kvh, L, D] and v [B, kvh, L, D]."""
        bsz, length, _ = x.shape
        hq, hk, d = self.heads, self.kv_heads, self.head_dim
        if self.wqkv is None:
            a = self.attn
            q = a.q_proj(x).view(bsz, length, hq, d)
            k = a.k_proj(x).view(bsz, length, hk, d)
            v = a.v_proj(x).view(bsz, length, hk, d)
            qk = torch.cat((q, k), dim=2)
        else:
            qkv = F.linear(x, self.wqkv).view(bsz, length, hq + 2 * hk, d)
            qk, v = qkv[:, :, : hq + hk], qkv[:, :, hq + hk :]
        # cos/sin [L, D] broadcast over heads: rotate q and k in one pass (same values as apply_rotary).
        cos4, sin4 = cos[:, None, :], sin[:, None, :]
        qk = qk * cos4 + qk.roll(d // 2, dims=-1) * sin4
        q = qk[:, :, :hq].transpose(1, 2)
        k = qk[:, :, hq:].transpose(1, 2)
        return q, k, v.transpose(1, 2)

    def mlp(self, x: Tensor, counts: Tensor | None) -> Tensor:
        if self.dense is not None:
            return self.dense(x)
        moe = self.moe
        assert moe is not None and self.gate_w32 is not None
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        topk_idx, topk_weight = moe.route(F.linear(flat.float(), self.gate_w32))
        if self.grouped and self.stacked is not None and self.expert_fn is apply_experts_grouped:
            routed = grouped_experts_stacked(flat, topk_idx, topk_weight, *self.stacked, self.use_gmm)
            if counts is not None:
                counts.index_add_(0, topk_idx.reshape(-1), _ones_like_ids(topk_idx))
        elif self.grouped:
            routed, _ = self.expert_fn(flat, topk_idx, topk_weight, moe.experts)
            if counts is not None:
                counts.index_add_(0, topk_idx.reshape(-1), _ones_like_ids(topk_idx))
        else:
            routed, host_counts = apply_experts_eager(flat, topk_idx, topk_weight, moe.experts)
            for expert_id, count in enumerate(host_counts):
                if count:
                    moe.tokens_per_expert[expert_id] += count
        moe.last_topk_idx = topk_idx.detach()
        if self.shared is not None:
            routed = routed + self.shared(flat)
        return routed.view(shape)


_COMPILED: dict[Any, Any] = {}


def _compiled(fn: Any) -> Any:
    """``torch.compile(fn)`` for a vision block function, shared by all models (weights are arguments, so
    one compile per input shape and block kind)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def capture_graph(
    fn: Callable[[], Any], device: torch.device, context: Callable[[], Any] = contextlib.nullcontext
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``fn`` twice on a side stream (cuBLAS handles, workspaces, compilation, lazy inits: work that must
    not happen inside a capture), then capture one call; returns the graph and that call's output (static
    buffers the graph rewrites on every replay).  ``context`` is entered around the warm-up and the capture
    (e.g. an SDPA backend policy, which the graph is then tied to)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), context():
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), context():
        out = fn()
    return graph, out


class ShapeGraphs:
    """``fn(x)`` replayed from a CUDA graph captured per (shape, dtype, device) of ``x``; output is a fresh copy.

    Capture (on first sight of a shape) runs ``fn`` twice on a side stream first (cuBLAS / compile warm-up).
    The graph reads the weights in place, so it stays valid while parameters are updated in place; it is
    tied to the SDPA backend policy active at capture.  CPU tensors, grad mode, or a failed capture run
    ``fn`` directly (the failure is kept in ``capture_error`` and warned about once).
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.graphs: dict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self.capture_error: str | None = None

    def __call__(self, x: Tensor) -> Tensor:
        if x.device.type != "cuda" or torch.is_grad_enabled() or self.capture_error is not None:
            out: Tensor = self.fn(x)
            return out
        key = (tuple(x.shape), x.dtype, x.device)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self.graphs[key] = self._capture(x)
            except RuntimeError as exc:
                self.capture_error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"vision CUDA graph capture failed, running un-graphed ({exc})", stacklevel=2)
                out = self.fn(x)
                return out
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, x: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        static_in = x.clone()
        graph, static_out = capture_graph(lambda: self.fn(static_in), x.device)
        return graph, static_in, static_out


_ONES: dict[tuple[int, torch.device], Tensor] = {}


def _ones_like_ids(ids: Tensor) -> Tensor:
    key = (ids.numel(), ids.device)
    ones = _ONES.get(key)
    if ones is None:
        ones = _ONES[key] = torch.ones(ids.numel(), device=ids.device, dtype=torch.int64)
    return ones


def first_argmax(logits: Tensor, chunks: int = 256) -> Tensor:
    """``logits.argmax(-1, keepdim=True)`` for [B, V] (first index on ties) in two stages.

    A single-row argmax over 129k entries runs as one slow reduction (~28 us on an H100); per-chunk maxima
    then the first chunk holding the overall max give the same index in a few microseconds.
    """
    bsz, vocab = logits.shape
    if vocab % chunks:
        return logits.argmax(dim=-1, keepdim=True)
    values, within = logits.view(bsz, chunks, vocab // chunks).max(dim=-1)  # first max in each chunk
    chunk = values.argmax(dim=-1, keepdim=True)  # first chunk with the overall max
    return chunk * (vocab // chunks) + within.gather(1, chunk)


class FastModel:
    """The fast path over a (shared, not copied) :class:`DeepseekOCRForCausalLM`; see the module doc."""

    MAX_PREFILL_GRAPHS = 8  # prompt lengths kept captured (each graph holds its activations' memory pool)

    def __init__(self, model: DeepseekOCRForCausalLM, cfg: FastConfig) -> None:
        self.base = model
        self.fast_config = cfg
        self.layers = [_Layer(layer, cfg) for layer in model.model.layers if isinstance(layer, DecoderLayer)]
        self.decode_kernels, self.decode_kernels_note = self._resolve_kernels(model, cfg)
        self._decoder: FastDecoder | None = None
        self._compiled_step: Any = None
        self._vision_graphs: tuple[ShapeGraphs, ShapeGraphs] | None = None
        # prefill graphs per (embeds shape, cache storage), least recently used first; see prefill()
        self._prefill_graphs: dict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self._prefill_graph_error: str | None = None
        self._prefill_setups = 0
        n_experts = model.config.language.n_routed_experts
        self._counts: dict[int, Tensor] = {
            layer.idx: torch.zeros(n_experts, dtype=torch.int64, device=model.device)
            for layer in self.layers
            if layer.moe is not None and cfg.grouped_moe
        }

    def _resolve_kernels(self, model: DeepseekOCRForCausalLM, cfg: FastConfig) -> tuple[str, str | None]:
        """The decode kernels that will run: "triton" only where its kernels can (else "torch", and why)."""
        if cfg.decode_kernels != "triton":
            return "torch", None
        from llm_perf_opt.models.deepseek_ocr import kernels

        why = None
        if not cfg.grouped_moe:
            why = "decode_kernels=triton needs grouped_moe (stacked expert weights)"
        elif not kernels.triton_available(model.device):
            try:
                kernels._require("decode step", model.device)
            except kernels.KernelUnavailableError as exc:
                why = str(exc)
        elif any(layer.moe is not None and layer.moe.scoring_func != "softmax" for layer in self.layers):
            why = "the Triton router implements softmax scoring only"
        if why is None:
            return "triton", None
        if model.device.type == "cuda":  # on the CPU the torch step is the expected one: no warning
            warnings.warn(f"{why}: decoding with the torch kernels", stacklevel=3)
        return "torch", why

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found on FastModel: model, config, device, dtype, lm_head, ...
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def parameters(self) -> Any:
        return self.base.parameters()

    # ------------------------------------------------------------------ routing statistics
    def reset_routing_stats(self) -> None:
        self.base.reset_routing_stats()
        for counts in self._counts.values():
            counts.zero_()

    def tokens_per_expert(self) -> dict[int, list[int]]:
        """Per MoE layer: tokens routed to each expert since the last reset (reads device counters: one sync)."""
        if not self._counts:
            return self.base.tokens_per_expert()
        return {i: [int(c) for c in counts.tolist()] for i, counts in self._counts.items()}

    def experts_hit_per_layer(self) -> list[int]:
        return [sum(1 for c in counts if c) for counts in self.tokens_per_expert().values()]

    # ------------------------------------------------------------------ stages 1/2: delegated
    def _vision_policy(self) -> contextlib.AbstractContextManager[None]:
        backends = VISION_SDPA[self.fast_config.vision_sdpa]
        if backends is None:
            return contextlib.nullcontext()
        return sdpa_kernel(list(backends))

    @property
    def vision_graph_count(self) -> int:
        """How many vision CUDA graphs exist (one per view shape seen): a rise means a one-time capture ran."""
        if self._vision_graphs is None:
            return 0
        return sum(len(g.graphs) for g in self._vision_graphs)

    @contextlib.contextmanager
    def vision_mode(self) -> Any:
        """Within: the shared SAM / CLIP modules run this config's fast vision forward (restored on exit)."""
        base = self.base
        cfg = self.fast_config
        sam = base.model.sam_model
        clip_tf = base.model.vision_model.transformer
        saved = (sam.fast, sam.block_fn, sam.forward_fn, clip_tf.layer_fn, clip_tf.forward_fn)
        sam.fast = cfg.sam_fast
        if cfg.sam_compile and cfg.sam_fast:
            sam.block_fn = _compiled(sam_block_fast)
        clip_tf.layer_fn = _compiled(clip_block_fast) if cfg.clip_compile else clip_block_fast
        if cfg.vision_graphs:
            if self._vision_graphs is None:
                self._vision_graphs = (ShapeGraphs(sam._forward_fast), ShapeGraphs(clip_tf.forward_fast))
            if cfg.sam_fast:
                sam.forward_fn = self._vision_graphs[0]
            clip_tf.forward_fn = self._vision_graphs[1]
        try:
            yield
        finally:
            sam.fast, sam.block_fn, sam.forward_fn, clip_tf.layer_fn, clip_tf.forward_fn = saved

    @torch.no_grad()
    def encode_images(self, images_crop: Tensor, images_ori: Tensor, images_spatial_crop: Any) -> Tensor:
        """The wrapped model's ``encode_images`` (SAM/CLIP/projector called as modules), SDPA per ``vision_sdpa``,
        SAM / CLIP per ``sam_fast`` / ``sam_compile`` / ``clip_compile`` (see :meth:`vision_mode`)."""
        base = self.base
        saved = base.sdpa_backends
        if VISION_SDPA[self.fast_config.vision_sdpa] is not None:
            base.sdpa_backends = None  # the policy below decides
        try:
            with self._vision_policy(), self.vision_mode():
                return base.encode_images(images_crop, images_ori, images_spatial_crop)
        finally:
            base.sdpa_backends = saved

    def embed_prompt(self, input_ids: Tensor, images_seq_mask: Tensor, image_features: Sequence[Tensor]) -> Tensor:
        return self.base.embed_prompt(input_ids, images_seq_mask, image_features)

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        return self.base.new_cache(batch, max_len)

    # ------------------------------------------------------------------ stage 3: prefill
    def _counts_for(self, layer: _Layer) -> Tensor | None:
        return self._counts.get(layer.idx)

    @torch.no_grad()
    def prefill(self, inputs_embeds: Tensor, cache: StaticKVCache, logits_positions: str = "last") -> Tensor:
        """Decoder over the prompt with fused/grouped weights, filling ``cache``; float32 logits like the model's.

        With ``prefill_graphs`` (and ``cuda_graphs``), a batch-1 prompt written at position 0 with last-position
        logits replays a CUDA graph captured per (prompt length, cache): the un-graphed prefill is host-bound
        (~700 launches for ~1.3 ms of tensor-core work on an H100).  The first prompt of a new length pays the
        capture (``setup_count`` rises, so the session flags that page as one-time setup).
        """
        if logits_positions not in ("last", "all"):
            raise ValueError(f"logits_positions must be 'last' or 'all', got {logits_positions!r}")
        if inputs_embeds.dim() != 3:
            raise InputError(f"inputs_embeds must be [B, L, hidden], got {tuple(inputs_embeds.shape)}")
        base = self.base
        if cache.length == 0:
            self.reset_routing_stats()
        bsz, length, _ = inputs_embeds.shape
        if cache.batch != bsz:
            raise InputError(f"KV cache was sized for batch {cache.batch}, inputs have batch {bsz}")
        cache.check_room(length)
        start = cache.length
        hidden = inputs_embeds.to(device=base.device, dtype=base.dtype)
        cfg = self.fast_config
        graphable = (  # grouped_moe: the loop-over-experts MoE reads expert counts on the host (a sync)
            cfg.cuda_graphs
            and cfg.prefill_graphs
            and cfg.grouped_moe
            and hidden.device.type == "cuda"
            and bsz == 1
            and start == 0
            and logits_positions == "last"
            and not torch.is_grad_enabled()
        )
        if graphable and self._prefill_graph_error is None:
            logits = self._prefill_graphed(hidden, cache)
        else:
            logits = self._prefill_body(hidden, cache, start, logits_positions)
        cache.advance(length)
        return logits

    def _prefill_body(self, hidden: Tensor, cache: StaticKVCache, start: int, logits_positions: str) -> Tensor:
        """The prefill computation (writes K/V at ``start``..; does not advance the cache's length)."""
        base = self.base
        m = base.model
        bsz, length, _ = hidden.shape
        cos, sin = m.rotary(start, length, hidden.device, hidden.dtype)
        with base._sdpa_policy():
            for layer in self.layers:
                x = layer.in_norm(hidden)
                q, k, v = layer.qkv(x, cos, sin)
                k, v = cache.write(layer.idx, k, v, start)
                if layer.kv_heads != layer.heads:
                    rep = layer.heads // layer.kv_heads
                    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
                if start == 0:
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                else:
                    q_pos = torch.arange(start, start + length, device=x.device)[:, None]
                    k_pos = torch.arange(start + length, device=x.device)[None, :]
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos)
                out = out.transpose(1, 2).reshape(bsz, length, -1)
                hidden = hidden + layer.attn.o_proj(out)
                hidden = hidden + layer.mlp(layer.post_norm(hidden), self._counts_for(layer))
        hidden = m.norm(hidden)
        if logits_positions == "last":
            hidden = hidden[:, -1]
        logits: Tensor = base.lm_head(hidden).float()
        return logits

    def _prefill_graphed(self, hidden: Tensor, cache: StaticKVCache) -> Tensor:
        key = (tuple(hidden.shape), cache.k.data_ptr())
        entry = self._prefill_graphs.pop(key, None)
        if entry is None:
            try:
                entry = self._capture_prefill(hidden, cache)
            except RuntimeError as exc:  # an op that cannot be captured: prefill un-graphed from now on
                self._prefill_graph_error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"prefill CUDA graph capture failed, running un-graphed ({exc})", stacklevel=3)
                return self._prefill_body(hidden, cache, 0, "last")
            while len(self._prefill_graphs) >= self.MAX_PREFILL_GRAPHS:  # least recently used first
                self._prefill_graphs.pop(next(iter(self._prefill_graphs)))
            self._prefill_setups += 1
        self._prefill_graphs[key] = entry  # (re)inserted last: most recently used
        graph, static_in, static_out = entry
        static_in.copy_(hidden)
        graph.replay()
        return static_out.clone()

    def _capture_prefill(self, hidden: Tensor, cache: StaticKVCache) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        static_in = hidden.clone()
        with self.routing_counts_kept():
            graph, static_out = capture_graph(lambda: self._prefill_body(static_in, cache, 0, "last"), hidden.device)
        return graph, static_in, static_out

    @contextlib.contextmanager
    def routing_counts_kept(self) -> Iterator[None]:
        """Within: forwards that are not measured (graph warm-up and capture) leave the routing counts as found."""
        before = {i: c.clone() for i, c in self._counts.items()}
        try:
            yield
        finally:
            for i, c in before.items():
                self._counts[i].copy_(c)

    @property
    def setup_count(self) -> int:
        """One-time setups done so far (vision graphs per view shape, prefill graphs per prompt length): a rise
        during a page means that page's timings include a compile or capture."""
        return self.vision_graph_count + self._prefill_setups

    # ------------------------------------------------------------------ stage 4: decode
    def compiled_step(self) -> Any:
        """``torch.compile(FastDecoder._forward)`` per ``decode_compile`` (None when "none"), one per FastModel.

        Inductor fuses the step's ~600 small kernels (norm casts, rotary, routing, combine).  Shared by all
        decoders of this model, so a new cache of the same ``max_len`` reuses the compiled code (another
        ``max_len`` compiles once more); the decoder compiles in its capture warm-up, outside the graph.
        """
        mode = self.fast_config.decode_compile
        if mode == "none":
            return None
        if self._compiled_step is None:
            self._compiled_step = torch.compile(
                FastDecoder._forward, mode=None if mode == "default" else mode, dynamic=False
            )
        return self._compiled_step

    def decoder_for(self, cache: StaticKVCache, no_repeat_ngram_size: int | None = None) -> FastDecoder:
        """The decoder bound to ``cache`` (built, and captured, on first use; one cache at a time).

        ``no_repeat_ngram_size``: the rule its on-device token choice applies (part of the graph; another value
        rebuilds it); None takes the current decoder of ``cache`` whatever its rule (the logits are the same).
        """
        dec = self._decoder
        ngram = no_repeat_ngram_size
        if dec is None or dec.cache is not cache or (ngram is not None and dec.ngram != ngram):
            self._decoder = None  # free the old graph's pool first
            dec = FastDecoder(self, cache, use_graph=self.fast_config.cuda_graphs, ngram=ngram or 0)
            self._decoder = dec
        return dec

    @torch.no_grad()
    def decode_step(self, token_ids: Tensor, cache: StaticKVCache) -> Tensor:
        """One token per row at ``cache.length``; float32 logits [B, V] (a copy, safe to keep)."""
        if token_ids.dim() != 2 or token_ids.shape[1] != 1:
            raise InputError(f"decode_step takes token_ids [B, 1], got {tuple(token_ids.shape)}")
        return self.decoder_for(cache).step(token_ids).clone()

    def forward(self, inputs_embeds: Tensor, cache: StaticKVCache | None = None) -> Tensor:
        return self.base(inputs_embeds, cache)

    __call__ = forward


class FastDecoder:
    """A sync-free decode step over one preallocated cache, replayed from a CUDA graph when ``use_graph``.

    ``step(tokens[B, 1]) -> logits[B, V]`` (a static buffer, overwritten by the next step) writes position
    ``cache.length`` and advances the cache, exactly like ``model.decode_step``.  Attention covers the
    cache's whole ``max_len`` with an additive mask (positions past the current one get -inf).
    """

    def __init__(
        self,
        fast: FastModel,
        cache: StaticKVCache,
        max_len: int | None = None,
        use_graph: bool = True,
        ngram: int = 0,
    ):
        base = fast.base
        self.fast = fast
        self.cache = cache
        self.max_len = cache.max_len if max_len is None else int(max_len)
        if self.max_len > cache.max_len:
            raise InputError(f"FastDecoder max_len {self.max_len} > cache max_len {cache.max_len}")
        dev, dtype = cache.device, cache.dtype
        self.batch = cache.batch
        self.tokens = torch.zeros((self.batch, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.key_pos = torch.arange(self.max_len, device=dev)
        self.mask_zero = torch.zeros((), dtype=dtype, device=dev)
        self.mask_neg = torch.full((), float("-inf"), dtype=dtype, device=dev)
        rot = base.model.rotary
        rot(0, self.max_len, dev, dtype)  # build the table once, outside any capture
        self.cos_table, self.sin_table = rot._tables[(dev, dtype)]
        self.use_graph = bool(use_graph) and dev.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_error: str | None = None
        self.logits: Tensor | None = None
        self.next_token: Tensor | None = None
        self._compiled = fast.compiled_step()
        self.kernels = fast.decode_kernels if self.batch <= TRITON_MAX_ROWS else "torch"
        if ngram < 0:
            raise InputError(f"no_repeat_ngram_size must be >= 0, got {ngram}")
        # On-device token choice: every row's tokens by position (prompt via set_history, then each fed token
        # written at its position by the step), the no-repeat-ngram ban applied before the argmax, and a
        # sticky flag for non-finite logits (read once, after the loop).
        self.ngram = int(ngram)
        self.history = torch.zeros((self.batch, self.max_len), dtype=torch.long, device=dev) if ngram else None
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=dev)

    def set_history(self, ids: Tensor) -> None:
        """The prompt's token ids [B, P] (image-token ids included) as positions 0..P-1 of the history."""
        if self.history is not None:
            self.history[:, : ids.shape[-1]].copy_(ids.view(self.batch, -1), non_blocking=True)

    def _pick(self, logits: Tensor) -> Tensor:
        """Next token per row on the device: argmax (first index on ties) after the no-repeat-ngram ban."""
        self.nonfinite |= ~torch.isfinite(logits).all()
        if self.history is None:
            return first_argmax(logits)
        self.history.index_copy_(1, self.pos, self.tokens)  # the fed token joins the history
        banned = banned_ngram_mask(self.history, self.pos + 1, self.ngram, logits.shape[-1])
        return first_argmax(logits.masked_fill(banned, float("-inf")))

    def _forward_triton(self) -> tuple[Tensor, Tensor]:
        """The decode step in fused Triton kernels (models/deepseek_ocr/kernels.py) plus cuBLAS GEMMs.

        Per layer: add+RMSNorm, QKV GEMM, rotary + KV write, split-K attention (2), o_proj GEMM,
        add+RMSNorm, router (GEMV + softmax + top-k + counts), experts up and down (routed and shared
        experts in the same two kernels); the residual add of each block is folded into the next norm.
        Attention reads only keys 0..pos (the position is read on the device).
        """
        from llm_perf_opt.models.deepseek_ocr import kernels as K

        fast, base = self.fast, self.fast.base
        m = base.model
        cache = self.cache
        bsz = self.batch
        delta = m.embed_tokens(self.tokens).view(bsz, -1)  # [B, hidden]
        hidden: Tensor | None = None
        for layer in fast.layers:
            x, hidden = K.add_rms_norm(delta, hidden, layer.in_norm.weight, layer.in_norm.eps)
            qkv = (
                F.linear(x, layer.wqkv)
                if layer.wqkv is not None
                else torch.cat(
                    [F.linear(x, p.weight) for p in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj)], dim=-1
                )
            )
            k_all, v_all = cache.k[layer.idx], cache.v[layer.idx]
            q = K.rope_kv_write(
                qkv, self.cos_table, self.sin_table, self.pos, k_all, v_all, layer.heads, layer.kv_heads, layer.head_dim
            )
            out = K.decode_attention(q, k_all, v_all, self.pos, layer.head_dim**-0.5)
            x, hidden = K.add_rms_norm(layer.attn.o_proj(out), hidden, layer.post_norm.weight, layer.post_norm.eps)
            moe = layer.moe
            if moe is None or layer.gate_w32 is None:
                assert layer.dense is not None
                delta = layer.dense(x)
                continue
            idx, weights = K.moe_route(
                x,
                layer.gate_w32,
                moe.top_k,
                counts=fast._counts_for(layer),
                scaling=moe.routed_scaling_factor,
                renormalize=moe.norm_topk_prob,
                logits=F.linear(x.float(), layer.gate_w32),  # cuBLAS: the torch path's exact logits
            )
            moe.last_topk_idx = idx
            if layer.all_stacks is not None:
                delta = K.moe_experts(x, idx, weights, *layer.all_stacks, n_always=layer.n_always)
            else:  # shared experts not expressible as slots (or none): routed in the kernel, shared in torch
                assert layer.stacked is not None
                delta = K.moe_experts(x, idx, weights, *layer.stacked)
                if layer.shared is not None:
                    delta = delta + layer.shared(x)
        normed, _ = K.add_rms_norm(delta, hidden, m.norm.weight, m.norm.eps)
        logits = base.lm_head(normed).float()
        return logits, self._pick(logits)

    def _body(self) -> tuple[Tensor, Tensor]:
        if self.kernels == "triton":
            return self._forward_triton()
        if self._compiled is None:
            return self._forward()
        out: tuple[Tensor, Tensor] = self._compiled(self)
        return out

    # ------------------------------------------------------------------ the step body
    def _forward(self) -> tuple[Tensor, Tensor]:
        fast, base = self.fast, self.fast.base
        m = base.model
        cache = self.cache
        n = self.max_len
        hidden = m.embed_tokens(self.tokens)  # [B, 1, hidden]
        cos = self.cos_table.index_select(0, self.pos)
        sin = self.sin_table.index_select(0, self.pos)
        bias = torch.where(self.key_pos <= self.pos, self.mask_zero, self.mask_neg)  # [max_len]
        attn_sdpa = fast.fast_config.decode_attention == "sdpa"
        bsz = self.batch
        for layer in fast.layers:
            x = layer.in_norm(hidden)
            q, k, v = layer.qkv(x, cos, sin)
            k_all, v_all = cache.k[layer.idx], cache.v[layer.idx]
            k_all.index_copy_(2, self.pos, k)
            v_all.index_copy_(2, self.pos, v)
            k_all, v_all = k_all[:, :, :n], v_all[:, :, :n]
            if layer.kv_heads != layer.heads:
                rep = layer.heads // layer.kv_heads
                k_all, v_all = k_all.repeat_interleave(rep, dim=1), v_all.repeat_interleave(rep, dim=1)
            if attn_sdpa:
                out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=bias.view(1, 1, 1, n))
            else:
                scores = torch.matmul(q, k_all.transpose(-1, -2)) * (layer.head_dim**-0.5) + bias
                out = torch.matmul(scores.float().softmax(dim=-1).to(q.dtype), v_all)
            out = out.transpose(1, 2).reshape(bsz, 1, -1)
            hidden = hidden + layer.attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_norm(hidden), fast._counts_for(layer))
        logits = base.lm_head(m.norm(hidden)[:, -1]).float()
        return logits, self._pick(logits)

    def _capture(self) -> None:
        with self.fast.routing_counts_kept():
            self.graph, (self.logits, self.next_token) = capture_graph(
                self._body, self.cache.device, self.fast.base._sdpa_policy
            )

    def _run(self) -> Tensor:
        if not self.use_graph:
            with self.fast.base._sdpa_policy():
                self.logits, self.next_token = self._body()
            return self.logits
        if self.graph is None:
            try:
                self._capture()
            except RuntimeError as exc:  # an op that cannot be captured: run the same step un-graphed
                self.capture_error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"CUDA graph capture failed, decoding without graphs ({exc})", stacklevel=2)
                self.use_graph = False
                return self._run()
        assert self.graph is not None and self.logits is not None
        self.graph.replay()
        return self.logits

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def prepare(self) -> None:
        """Capture the graph now, so a timed decode loop never includes the one-time capture.

        The capture's warm-up writes one garbage K/V row at the current position, which the next prefill
        or step overwrites; routing counters are restored by ``_capture``.
        """
        if not self.use_graph or self.graph is not None:
            return
        try:
            self._capture()
        except RuntimeError as exc:  # same fallback as _run: decode un-graphed, and say why
            self.capture_error = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"CUDA graph capture failed, decoding without graphs ({exc})", stacklevel=2)
            self.use_graph = False

    @torch.no_grad()
    def step(self, token_ids: Tensor) -> Tensor:
        """Feed ``token_ids`` [B, 1] at position ``cache.length``; float32 logits [B, V] (static buffer)."""
        self.cache.check_room(1)
        self.tokens.copy_(token_ids, non_blocking=True)
        self.pos.fill_(self.cache.length)
        logits = self._run()
        self.cache.advance(1)
        return logits

    @torch.no_grad()
    def greedy(
        self,
        first_token: Tensor,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        check_every: int = 16,
        on_step: Callable[[], None] | None = None,
    ) -> list[list[int]]:
        """Greedy decode on the device: feed ``first_token`` [B, 1], then each step's pick (argmax after the
        decoder's no-repeat-ngram ban), no host sync except an eos check every ``check_every`` steps.  Returns
        per row the tokens chosen by the ``max_new_tokens`` steps, cut after the first eos (rows stop together
        when all have hit eos, so up to ``check_every - 1`` steps past it run and are dropped).  ``on_step``
        runs on the host after each step is queued (e.g. a CUDA-event mark, an interrupt check)."""
        bsz = self.batch
        out = torch.empty((bsz, max_new_tokens), dtype=torch.long, device=self.tokens.device)
        self.tokens.copy_(first_token, non_blocking=True)
        done = 0
        for i in range(max_new_tokens):
            self.cache.check_room(1)
            self.pos.fill_(self.cache.length)
            self._run()
            self.cache.advance(1)
            if on_step is not None:
                on_step()
            assert self.next_token is not None
            out[:, i : i + 1].copy_(self.next_token)
            self.tokens.copy_(self.next_token)
            done = i + 1
            if (
                eos_token_id is not None
                and done % check_every == 0
                and bool((out[:, :done] == eos_token_id).any(dim=1).all())
            ):
                break
        rows: list[list[int]] = []
        for row in out[:, :done].tolist():
            if eos_token_id is not None and eos_token_id in row:
                row = row[: row.index(eos_token_id) + 1]
            rows.append(row)
        return rows


def apply_fast_path(model: DeepseekOCRForCausalLM | FastModel, cfg: FastConfig | None = None) -> FastModel:
    """Prepare ``model``'s weights (fused QKV/gate-up, stacked experts; views, no copies) and wrap it."""
    base = model.base if isinstance(model, FastModel) else model
    return FastModel(base, cfg or FastConfig())
