"""StaticKVCache: its views over existing tensors (``over``, ``first_rows``) share storage and validate input."""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.models.deepseek_ocr.kv_cache import StaticKVCache


def test_first_rows_is_a_view_that_writes_through() -> None:
    cache = StaticKVCache(num_layers=2, batch=4, num_kv_heads=3, max_len=5, head_dim=2)
    cache.length = 3
    view = cache.first_rows(2)
    assert (view.num_layers, view.batch, view.max_len, view.length) == (2, 2, 5, 3)
    assert all(view.k[layer].is_contiguous() for layer in range(2))  # what the decode kernels need per layer
    view.k[1, 1, 2, 4, 1] = 7.0  # layer 1, row 1, head 2, position 4, channel 1
    view.v[0, 0, 0, 0, 0] = -1.0
    assert cache.k[1, 1, 2, 4, 1] == 7.0 and cache.v[0, 0, 0, 0, 0] == -1.0
    assert cache.k[1, 2:].abs().sum() == 0  # rows past the view untouched
    view.advance(1)
    assert view.length == 4 and cache.length == 3  # each keeps its own length
    with pytest.raises(ValueError, match="1 <= n <= 4"):
        cache.first_rows(5)


def test_over_takes_tensors_as_they_are_and_refuses_mismatches() -> None:
    k = torch.arange(2 * 1 * 1 * 3 * 2, dtype=torch.float32).view(2, 1, 1, 3, 2)
    cache = StaticKVCache.over(k, torch.zeros_like(k), length=2)
    assert cache.k is k and cache.length == 2 and cache.remaining == 1
    with pytest.raises(ValueError, match="one 5-d shape"):
        StaticKVCache.over(k, torch.zeros(2, 1, 1, 4, 2))
    with pytest.raises(ValueError, match=r"length must be in 0\.\.3"):
        StaticKVCache.over(k, torch.zeros_like(k), length=4)
    with pytest.raises(ConfigError, match="must be >= 1"):
        StaticKVCache(num_layers=0, batch=1, num_kv_heads=1, max_len=1, head_dim=1)
