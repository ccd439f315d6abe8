"""DeepEncoder V2: the Qwen2-style decoder DeepSeek-OCR-2 runs as its vision encoder (CLIP's replacement).

One view's N SAM tokens (flattened row-major) are followed by N learned queries; the sequence (positions
0..2N−1, RoPE) goes through pre-norm blocks with GQA attention (q/k/v with bias, o without) and a SwiGLU MLP,
then a final RMSNorm; only the last N outputs (the queries) are kept.  The attention mask is what makes it an
encoder: image tokens see every image token (bidirectional) and no query; query i sees every image token and
queries 0..i (causal).  It is a boolean ``[2N, 2N]`` mask for ``scaled_dot_product_attention``
(:func:`prefix_causal_mask`); it depends on N only, so it is built once per view shape.  A dense mask rules
out flash kernels, so ``Qwen2Encoder.fast`` computes the same attention as two mask-free calls instead
(:func:`prefix_causal_attention`).  The model's fast path (``deepseek_ocr2.fast``) goes one step further: with
``Qwen2Encoder.layer_fn`` set, every layer runs as :func:`encoder_layer_fast`, a function of the layer's fused
weights (q/k/v with their biases as one GEMM, gate/up as one) that ``torch.compile`` can fuse and a CUDA graph
can replay; its attention is the same split into image rows (no mask) and query rows (an ``[N, 2N]`` boolean
mask tensor, :func:`query_rows_mask`, which compiles and captures like any input).

The norm, rotary table and MLP are v1's decoder parts (same math, same float32 norm statistics).  Module names
mirror the checkpoint (``qwen2_model.model.model.layers.N.*``, ``qwen2_model.query_768`` / ``query_1024``):
the remote code wraps a Hugging Face ``Qwen2ForCausalLM``'s inner model twice, hence ``model.model``.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right

from llm_perf_opt.errors import InputError
from llm_perf_opt.models.deepseek_ocr.decoder import MLP, RMSNorm, RotaryEmbedding, apply_rotary
from llm_perf_opt.models.deepseek_ocr.fast_layers import fuse_linears, fuse_linears_with_bias
from llm_perf_opt.models.deepseek_ocr.graphs import check_sdpa_policy
from llm_perf_opt.models.deepseek_ocr2.config import EncoderConfig

__all__ = [
    "EncoderAttention",
    "EncoderLayer",
    "EncoderStack",
    "Qwen2Encoder",
    "encoder_layer_fast",
    "lower_right_bias",
    "prefix_causal_attention",
    "prefix_causal_mask",
    "query_rows_mask",
]

_MASKS: dict[tuple[int, torch.device], Tensor] = {}
_LOWER_RIGHT: dict[tuple[int, int], Tensor] = {}


def lower_right_bias(q_len: int, kv_len: int) -> Tensor:
    """The cached lower-right causal bias (query i sees keys ≤ kv_len − q_len + i) for ``q_len × kv_len``.

    Cached because a ``CausalBias`` cannot be created while a dispatch mode is active (FlopCounterMode, the
    profiler's counting pass raises "Creating a new Tensor subclass"); :attr:`Qwen2Encoder.fast` creates the
    two the encoder needs when it is switched on, so counting a fast forward finds them.
    """
    key = (q_len, kv_len)
    bias = _LOWER_RIGHT.get(key)
    if bias is None:
        bias = causal_lower_right(q_len, kv_len)
        _LOWER_RIGHT[key] = bias
    return bias


def prefix_causal_mask(n_image: int, device: torch.device | str = "cpu") -> Tensor:
    """Boolean ``[2N, 2N]`` (True = may attend): rows < N see columns < N; row i ≥ N sees columns ≤ i.

    Cached per (N, device): the encoder sees two view shapes (144 and 256 tokens), so the mask is built twice.
    """
    dev = torch.device(device)
    key = (n_image, dev)
    mask = _MASKS.get(key)
    if mask is None:
        total = 2 * n_image
        rows = torch.arange(total, device=dev)[:, None]
        cols = torch.arange(total, device=dev)[None, :]
        mask = torch.where(rows < n_image, cols < n_image, cols <= rows)
        _MASKS[key] = mask
    return mask


def prefix_causal_attention(q: Tensor, k: Tensor, v: Tensor, n_image: int) -> Tensor:
    """The prefix-mask attention over [B, heads, 2N, d] as two calls without a dense mask (the fast path).

    Image rows: plain bidirectional attention over the N image keys.  Query rows: the N queries against all 2N
    keys with a *lower-right* causal bias (query i sees keys ≤ N + i): exactly the image block plus queries ≤ i.
    Both calls are flash / memory-efficient eligible, and the N·N image→query pairs are never computed.
    """
    n = n_image
    img = F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n])
    qry = F.scaled_dot_product_attention(q[:, :, n:], k, v, attn_mask=lower_right_bias(q.shape[2] - n, k.shape[2]))
    return torch.cat((img, qry), dim=2)


_QUERY_MASKS: dict[tuple[int, torch.device], Tensor] = {}


def query_rows_mask(n_image: int, device: torch.device | str = "cpu") -> Tensor:
    """The query rows of :func:`prefix_causal_mask` as their own contiguous boolean ``[N, 2N]`` tensor (query i sees
    every image token and queries ≤ i); cached per (N, device), so a compiled layer or a captured graph reads
    the same tensor on every call."""
    dev = torch.device(device)
    key = (n_image, dev)
    mask = _QUERY_MASKS.get(key)
    if mask is None:
        mask = _QUERY_MASKS[key] = prefix_causal_mask(n_image, dev)[n_image:].contiguous()
    return mask


def encoder_layer_fast(
    x: Tensor,
    weights: list[Tensor],
    cos: Tensor,
    sin: Tensor,
    query_mask: Tensor,
    num_heads: int,
    num_kv_heads: int,
    eps: float,
    sdpa_policy: str = "model",
) -> Tensor:
    """One :class:`EncoderLayer` as a function of its fused weights (the fast path's ``torch.compile`` unit).

    ``weights`` is :meth:`EncoderLayer.fast_weights`: input norm, q/k/v weight and bias fused, o_proj, post
    norm, gate/up fused, down_proj.  ``query_mask`` is :func:`query_rows_mask` of the view's N.  Same math as
    the module with the prefix mask: norms in float32, RoPE on q and k, image rows attend to the image block
    only (mask-free SDPA, flash-eligible), query rows to the image block and earlier queries.  ``sdpa_policy``:
    the SDPA backend policy in force (a compiled layer is specialised on it,
    :func:`~llm_perf_opt.models.deepseek_ocr.graphs.check_sdpa_policy`).
    """
    check_sdpa_policy(sdpa_policy)
    n1, wqkv, bqkv, wo, n2, w13, w2 = weights
    bsz, length, hidden = x.shape
    n = query_mask.shape[0]
    head_dim = wo.shape[1] // num_heads
    h = n1 * F.rms_norm(x.float(), (hidden,), eps=eps).to(x.dtype)
    q, k, v = F.linear(h, wqkv, bqkv).split(
        (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim), dim=-1
    )
    q = apply_rotary(q.view(bsz, length, num_heads, head_dim).transpose(1, 2), cos, sin)
    k = apply_rotary(k.view(bsz, length, num_kv_heads, head_dim).transpose(1, 2), cos, sin)
    v = v.view(bsz, length, num_kv_heads, head_dim).transpose(1, 2)
    if num_kv_heads != num_heads:  # query head h reads KV head h // rep, as EncoderAttention
        rep = num_heads // num_kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    img = F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n])
    qry = F.scaled_dot_product_attention(q[:, :, n:], k, v, attn_mask=query_mask)
    out = torch.cat((img, qry), dim=2).transpose(1, 2).reshape(bsz, length, num_heads * head_dim)
    x = x + F.linear(out, wo)
    h = n2 * F.rms_norm(x.float(), (hidden,), eps=eps).to(x.dtype)
    gate_up = F.linear(h, w13)
    inter = w2.shape[1]
    return x + F.linear(F.silu(gate_up[..., :inter]) * gate_up[..., inter:], w2)


class EncoderAttention(nn.Module):
    """Grouped-query self-attention (Qwen2: q/k/v with bias, o without) under a given boolean mask."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        hidden = cfg.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, n_image: int) -> Tensor:
        """``mask``: the boolean prefix mask, or None for :func:`prefix_causal_attention` (same result)."""
        bsz, length, _ = x.shape
        q = self.q_proj(x).view(bsz, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if self.num_kv_heads != self.num_heads:
            # Query head h reads KV head h // rep (the Hugging Face ``repeat_kv`` grouping).
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            out = prefix_causal_attention(q, k, v, n_image)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, length, self.num_heads * self.head_dim))


class EncoderLayer(nn.Module):
    """Pre-norm block ``x + attn(norm(x))``, ``x + mlp(norm(x))`` with v1's SwiGLU MLP and RMSNorm."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.self_attn = EncoderAttention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, n_image: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, n_image)
        return x + self.mlp(self.post_attention_layernorm(x))

    def fast_weights(self) -> list[Tensor]:
        """The tensors :func:`encoder_layer_fast` takes, in its order.  The first call fuses q/k/v (with their
        biases) and gate/up into single tensors and re-points the modules' parameters to views of them (same
        values, no second copy), so the eager forward keeps working on the same storage."""
        a, m = self.self_attn, self.mlp
        wqkv, bqkv = fuse_linears_with_bias([a.q_proj, a.k_proj, a.v_proj])
        w13 = fuse_linears([m.gate_proj, m.up_proj])
        return [
            self.input_layernorm.weight,
            wqkv,
            bqkv,
            a.o_proj.weight,
            self.post_attention_layernorm.weight,
            w13,
            m.down_proj.weight,
        ]


class EncoderStack(nn.Module):
    """The layers and the final norm (the checkpoint's ``qwen2_model.model.model``)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class _CausalLMShell(nn.Module):
    """Only a name: the remote code's ``Qwen2ForCausalLM`` wrapper, so the keys read ``model.model.layers``."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.model = EncoderStack(cfg)


class Qwen2Encoder(nn.Module):
    """SAM feature map [B, C, h, w] → query outputs [B, h·w, hidden] (the checkpoint's ``qwen2_model``)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = _CausalLMShell(cfg)
        self.query_768 = nn.Embedding(cfg.query_768_tokens, cfg.hidden_size)
        self.query_1024 = nn.Embedding(cfg.query_1024_tokens, cfg.hidden_size)
        # 2N positions: 512 for the global view; the table grows on demand.
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, 2 * cfg.query_1024_tokens)
        self._fast = False
        # Fast path (set by deepseek_ocr2.fast only around encode_images; default None = the modules as written):
        # a callable with the signature of encoder_layer_fast (e.g. its torch.compile) run for every layer ...
        self.layer_fn: Any = None
        # ... and, with layer_fn, a callable run instead of forward_fast (the per-shape CUDA-graph replay).
        self.forward_fn: Any = None

    @property
    def fast(self) -> bool:
        """Fast-path switch, off by default (the boolean mask is the reference formulation): attention as two
        mask-free SDPA calls (:func:`prefix_causal_attention`), flash-eligible, the image→query block skipped."""
        return self._fast

    @fast.setter
    def fast(self, on: bool) -> None:
        self._fast = bool(on)
        if self._fast:
            for n in (self.cfg.query_768_tokens, self.cfg.query_1024_tokens):
                lower_right_bias(n, 2 * n)

    @property
    def stack(self) -> EncoderStack:
        return self.model.model

    def queries_for(self, n_image: int) -> Tensor:
        """The learned-query table whose size is ``n_image`` (144 → ``query_768``, 256 → ``query_1024``)."""
        for table in (self.query_768, self.query_1024):
            if table.weight.shape[0] == n_image:
                return table.weight
        raise InputError(
            f"the encoder has learned queries for {self.query_768.weight.shape[0]} (768-px tile) and "
            f"{self.query_1024.weight.shape[0]} (1024-px global view) SAM tokens, got a view with {n_image}",
            hint="DeepSeek-OCR-2 views are 768 px (tiles, the 768 mode) or 1024 px (global view, the 1024 mode)",
        )

    def _embed(self, sam_features: Tensor) -> tuple[Tensor, int, Tensor, Tensor]:
        """SAM tokens then the view's learned queries [B, 2N, hidden], N, and RoPE's cos / sin for 2N positions."""
        tokens = sam_features.flatten(2).transpose(1, 2)
        bsz, n_image, _ = tokens.shape
        queries = self.queries_for(n_image).to(tokens.dtype)
        hidden = torch.cat((tokens, queries.unsqueeze(0).expand(bsz, -1, -1)), dim=1)
        cos, sin = self.rotary(0, 2 * n_image, hidden.device, hidden.dtype)
        return hidden, n_image, cos, sin

    def forward(self, sam_features: Tensor) -> Tensor:
        if self.layer_fn is not None:
            out: Tensor = self.forward_fast(sam_features) if self.forward_fn is None else self.forward_fn(sam_features)
            return out
        hidden, n_image, cos, sin = self._embed(sam_features)
        mask = None if self._fast else prefix_causal_mask(n_image, hidden.device)
        stack = self.stack
        for layer in stack.layers:
            hidden = layer(hidden, cos, sin, mask, n_image)
        out = stack.norm(hidden[:, n_image:])
        return out

    def forward_fast(self, sam_features: Tensor) -> Tensor:
        """The layers through ``layer_fn`` (set by the fast path) over their fused weights."""
        if self.layer_fn is None:
            raise InputError("Qwen2Encoder.forward_fast needs layer_fn (set by the fast path)")
        hidden, n_image, cos, sin = self._embed(sam_features)
        query_mask = query_rows_mask(n_image, hidden.device)
        cfg = self.cfg
        stack = self.stack
        for layer in stack.layers:
            weights = cast(EncoderLayer, layer).fast_weights()
            hidden = self.layer_fn(
                hidden,
                weights,
                cos,
                sin,
                query_mask,
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.rms_norm_eps,
            )
        out: Tensor = stack.norm(hidden[:, n_image:])
        return out
