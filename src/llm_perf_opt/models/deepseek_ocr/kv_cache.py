"""Static, preallocated KV cache for the DeepSeek-OCR decoder.

One allocation per page, sized up front (prompt length + max new tokens), so decode never reallocates
or concatenates: every step writes one position in place and attends over ``[:length]``.  That keeps
decode-step timings free of allocator noise and gives the profiler an exact KV byte count (``nbytes``).

Layout: ``k`` and ``v`` are each ``[layers, batch, kv_heads, max_len, head_dim]`` in the model's dtype
on the model's device.  ``length`` counts positions already written by *all* layers; layers write at
``length`` during a forward and the model calls :meth:`advance` once after the last layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llm_perf_opt.errors import ConfigError

__all__ = ["KVCacheFullError", "StaticKVCache"]


class KVCacheFullError(ConfigError):
    """A forward would write past the cache's ``max_len``."""


class StaticKVCache:
    """Preallocated keys/values for every decoder layer plus a length counter."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if min(num_layers, batch, num_kv_heads, max_len, head_dim) < 1:
            raise ConfigError(
                f"KV cache dimensions must be >= 1, got layers={num_layers} batch={batch} heads={num_kv_heads} "
                f"max_len={max_len} head_dim={head_dim}"
            )
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        # Zero-filled so no stale memory is ever visible, even to a buggy mask.
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @classmethod
    def for_model(cls, model: Any, batch: int, max_len: int) -> StaticKVCache:
        """Size a cache for ``model`` (anything with ``.config.language`` and parameters) on its device/dtype."""
        lang = model.config.language
        param = next(model.parameters())
        return cls(
            num_layers=lang.num_hidden_layers,
            batch=batch,
            num_kv_heads=lang.num_key_value_heads,
            max_len=max_len,
            head_dim=lang.head_dim,
            device=param.device,
            dtype=param.dtype,
        )

    def first_rows(self, n: int) -> StaticKVCache:
        """A cache over batch rows ``0..n-1`` of this one: views, no copy (what it writes, this one holds).
        Each layer's [n, heads, max_len, dim] stays contiguous, as the decode kernels need."""
        if not 1 <= n <= self.batch:
            raise ValueError(f"first_rows needs 1 <= n <= {self.batch}, got {n}")
        return StaticKVCache.over(self.k[:, :n], self.v[:, :n], self.length)

    @classmethod
    def over(cls, k: Tensor, v: Tensor, length: int = 0) -> StaticKVCache:
        """A cache over existing ``k`` / ``v`` tensors ([layers, batch, kv_heads, max_len, head_dim], views
        allowed), nothing allocated; ``length`` positions already written."""
        if k.dim() != 5 or k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
            raise ValueError(f"k and v must be one 5-d shape, dtype and device, got {k.shape} and {v.shape}")
        if not 0 <= length <= k.shape[3]:
            raise ValueError(f"length must be in 0..{k.shape[3]}, got {length}")
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.length = k, v, length
        return cache

    # ------------------------------------------------------------------ geometry
    @property
    def num_layers(self) -> int:
        return int(self.k.shape[0])

    @property
    def batch(self) -> int:
        return int(self.k.shape[1])

    @property
    def max_len(self) -> int:
        return int(self.k.shape[3])

    @property
    def remaining(self) -> int:
        return self.max_len - self.length

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by keys and values together (the whole preallocation, not just ``length``)."""
        return int(self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size())

    # ------------------------------------------------------------------ use
    def check_room(self, n: int) -> None:
        """Raise :class:`KVCacheFullError` if ``n`` more positions do not fit."""
        if self.length + n > self.max_len:
            raise KVCacheFullError(
                f"KV cache full: {self.length} positions used + {n} new > max_len {self.max_len}",
                hint="size the cache as prompt length + max_new_tokens: StaticKVCache.for_model(model, batch, max_len)",
            )

    def write(self, layer: int, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Store ``k``/``v`` [batch, kv_heads, L, head_dim] at ``start`` for ``layer``.

        Returns this layer's keys and values over ``[:start+L]`` (views, no copy).
        """
        end = start + k.shape[2]
        if end > self.max_len:
            self.check_room(end - self.length)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as written by every layer."""
        self.check_room(n)
        self.length += n

    def reset(self) -> None:
        """Forget the contents (keeps the allocation) so the cache can serve the next page."""
        self.length = 0

    def __repr__(self) -> str:
        return (
            f"StaticKVCache(layers={self.num_layers}, batch={self.batch}, heads={self.k.shape[2]}, "
            f"max_len={self.max_len}, head_dim={self.k.shape[4]}, length={self.length}, "
            f"dtype={self.dtype}, device={self.device}, nbytes={self.nbytes})"
        )
