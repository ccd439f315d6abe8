"""What one decoder forward needs besides the hidden states: positions, visible keys, where K/V go.

Every way the decoder runs (eager prefill and decode, the fast prefill, the CUDA-graph decode step, the
left-padded batched prefill and steps, the Triton step) is the same layer loop
(:func:`~llm_perf_opt.models.deepseek_ocr.decoder.run_decoder`) fed a different :class:`ForwardContext`:

* **positions** come as rotary ``cos``/``sin`` rows already gathered per token ([B or 1, L, D]), so a
  left-padded row simply has other positions than its neighbour; the Triton step passes the whole tables
  (``rope_tables``) and gathers at ``slot`` inside its kernel;
* **cache writes** go either at a host column ``start`` (``StaticKVCache.write``; attention over
  ``[:start+L]``) or, for steps captured in a CUDA graph, at a device column ``slot`` with ``index_copy_``
  (attention over the first ``key_len`` columns, no host value read); a ``slot`` of one column per row ([B],
  continuous batching: every sequence slot at its own length) scatters each row's K/V to its own column;
* **visibility** is an additive ``mask`` broadcastable to [B, heads, L, keys], or, without one, causal
  attention offset by ``start`` (``is_causal`` on an empty cache, no mask for one query).

No method here reads a device value on the host, so a forward over a slot context can be captured.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from llm_perf_opt.models.deepseek_ocr.kv_cache import StaticKVCache

__all__ = ["ForwardContext", "decode_key_mask", "padded_prefill_mask"]


@attrs.frozen(eq=False)
class ForwardContext:
    """Inputs of one decoder forward other than the hidden states; see the module doc."""

    cos: Tensor | None  # [B|1, L, D] rotary cos per token (None: the kernel gathers from rope_tables)
    sin: Tensor | None  # [B|1, L, D] signed sin (rotate_half's sign folded in)
    cache: StaticKVCache | None = None
    start: int = 0  # host column of the first new position (write via StaticKVCache.write)
    # device [1] column written with index_copy_ by every row, or [B] one column per row (scatter; continuous
    # batching); captured steps; overrides start
    slot: Tensor | None = None
    key_len: int = 0  # with slot: attention covers cache columns 0..key_len-1
    mask: Tensor | None = None  # additive, broadcastable to [B, heads, L, keys]; None: causal from start
    matmul_attention: bool = False  # two matmuls + float32 softmax instead of SDPA (needs mask)
    rows: Tensor | None = None  # flattened (batch·position) rows that run the MLP/MoE; others get zeros
    expert_impl: str | None = None  # decoder.EXPERT_IMPLS key overriding eager MoE layers' own
    record_routing: bool = True  # feed the fast path's device routing counters
    rope_tables: tuple[Tensor, Tensor] | None = None  # whole cos/sin tables, for kernels that gather at slot
    # with slot and mask: device [B|1], the first cache column each row's mask lets it see; a kernel that can
    # (kernels.decode_attention) reads no key before it, the torch attention reads them masked
    key_first: Tensor | None = None

    @classmethod
    def causal(cls, cos_sin: tuple[Tensor, Tensor], cache: StaticKVCache | None, start: int) -> ForwardContext:
        """Plain causal attention of L new positions ``start..`` (``cos_sin`` [L, D] each) on top of the cache."""
        cos, sin = cos_sin
        return cls(cos=cos.unsqueeze(0), sin=sin.unsqueeze(0), cache=cache, start=start)

    # ------------------------------------------------------------------ used by the attention modules
    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this layer's new ``k``/``v`` [B, kv_heads, L, D]; the keys/values attention should read."""
        cache = self.cache
        if cache is None:
            if self.start != 0 or self.slot is not None:
                raise ValueError("attention without a KV cache must start at position 0")
            return k, v
        if self.slot is not None:
            k_all, v_all = cache.k[layer], cache.v[layer]
            if self.slot.numel() == 1:  # one column for every row (a batch of one is the same either way)
                k_all.index_copy_(2, self.slot, k)
                v_all.index_copy_(2, self.slot, v)
            else:  # row b writes its one new position at its own column slot[b]
                cols = self.slot.view(-1, 1, 1, 1).expand(k.shape[0], k.shape[1], 1, k.shape[3])
                k_all.scatter_(2, cols, k)
                v_all.scatter_(2, cols, v)
            n = self.key_len or cache.max_len
            return k_all[:, :, :n], v_all[:, :, :n]
        return cache.write(layer, k, v, self.start)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of ``q`` [B, heads, L, D] over ``k``/``v`` [B, kv_heads, S, D] -> [B, heads, L, D]."""
        heads, kv_heads = q.shape[1], k.shape[1]
        if kv_heads != heads:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
        if self.matmul_attention:
            if self.mask is None:
                raise ValueError("matmul_attention needs an additive mask")
            scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5) + self.mask
            return torch.matmul(scores.float().softmax(dim=-1).to(q.dtype), v)
        if self.mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        length = q.shape[2]
        if length == 1:  # one query attends to every visible key: no mask needed
            return F.scaled_dot_product_attention(q, k, v)
        if self.start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # chunked prefill on top of a non-empty cache: causal mask offset by ``start``
        q_pos = torch.arange(self.start, self.start + length, device=q.device)[:, None]
        k_pos = torch.arange(self.start + length, device=q.device)[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos)


def padded_prefill_mask(pads: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """Additive mask [B, 1, L, L] for left-padded prompts: causal, pad keys hidden, a pad query sees itself.

    ``pads`` [B] (device) counts each row's pad columns; the diagonal keeps pad query rows from being fully
    masked (no NaN), and their outputs are never read.
    """
    dev = pads.device
    idx = torch.arange(length, device=dev)
    key_ok = idx[None, :] >= pads[:, None]  # [B, L] real (non-pad) positions
    causal = idx[:, None] >= idx[None, :]  # [L, L]
    diagonal = torch.eye(length, device=dev, dtype=torch.bool)
    allowed = causal[None] & (key_ok[:, None, :] | diagonal[None])  # [B, L, L]
    zero = torch.zeros((), device=dev, dtype=dtype)
    ninf = torch.full((), float("-inf"), device=dev, dtype=dtype)
    return torch.where(allowed, zero, ninf).unsqueeze(1)


def decode_key_mask(key_pos: Tensor, first: Tensor, last: Tensor, zero: Tensor, ninf: Tensor) -> Tensor:
    """Additive mask [B|1, 1, 1, keys] letting each row see cache columns ``first[b] <= j <= last[b]``.

    ``key_pos`` [keys] column indices; ``first`` [B] or [1] (pads, or 0); ``last`` [1] or [B] (the column
    written this step, one for all rows or one per row; device values: no host sync, so the mask can be built
    inside a captured graph).
    """
    allowed = (key_pos[None, :] >= first[:, None]) & (key_pos[None, :] <= last[:, None])
    return torch.where(allowed, zero, ninf)[:, None, None, :]
