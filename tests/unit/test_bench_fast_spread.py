"""``bench_fast.spread_routing``: the benchmark double that spreads the Triton prefill's routing (CPU, through
Triton's interpreter).  Oracles: the picks' own properties (distinct per token, every expert hit at a page's size),
the router's weights from an unpatched call, and both prompt routers restored after the block."""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.models.deepseek_ocr import kernels

pytestmark = pytest.mark.skipif(
    not kernels.INTERPRETED, reason="kernels was imported compiled-mode (a CUDA machine runs the GPU tests instead)"
)


def test_spread_routing_replaces_the_prompt_picks_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from benchmarks.bench_fast import spread_routing

    tokens, experts, top_k, hidden = 200, 64, 6, 32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen)
    gate = torch.randn(experts, hidden, generator=gen)
    real = kernels.moe_route
    idx_real, w_real = real(x, gate, top_k, logits=x @ gate.T)
    with spread_routing(tokens, experts, top_k, device="cpu"):
        idx, w = kernels.moe_route(x, gate, top_k, logits=x @ gate.T)
        one_idx, _ = kernels.moe_route(x[:1], gate, top_k, logits=x[:1] @ gate.T)  # another row count: untouched
    assert kernels.moe_route is real
    assert idx.shape == (tokens, top_k) and idx.dtype == idx_real.dtype
    assert all(len(set(row)) == top_k for row in idx.tolist())  # distinct experts per token
    assert set(idx.flatten().tolist()) == set(range(experts))  # every expert read, unlike correlated dummy routing
    assert not torch.equal(idx, idx_real)
    assert torch.equal(w, w_real)  # the router still ran: its weights are the real call's
    assert torch.equal(one_idx, idx_real[:1])


def test_spread_routing_covers_the_one_kernel_prompt_router(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default prompt router (``kernels.moe_route_rows``) is spread the same way, and restored."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from benchmarks.bench_fast import spread_routing

    tokens, experts, top_k, hidden = 100, 16, 4, 32
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, hidden, generator=gen)
    gate = torch.randn(experts, hidden, generator=gen)
    real = kernels.moe_route_rows
    idx_real, w_real = real(x, gate, top_k)
    with spread_routing(tokens, experts, top_k, device="cpu"):
        idx, w = kernels.moe_route_rows(x, gate, top_k)
    assert kernels.moe_route_rows is real
    assert all(len(set(row)) == top_k for row in idx.tolist())
    assert set(idx.flatten().tolist()) == set(range(experts)) and not torch.equal(idx, idx_real)
    assert torch.equal(w, w_real)
