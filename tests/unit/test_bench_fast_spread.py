"""``bench_fast.spread_routing``: the benchmark double that spreads the Triton prefill's routing (CPU, through
Triton's interpreter).  Oracles: the picks' own properties (distinct per token, every expert hit at a page's size),
the router's weights from an unpatched call, and both prompt routers restored after the block."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llm_perf_opt.models.deepseek_ocr import kernels

pytestmark = pytest.mark.skipif(
    not kernels.INTERPRETED, reason="kernels was imported compiled-mode (a CUDA machine runs the GPU tests instead)"
)


def _cublas_router(x: torch.Tensor, gate: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.moe_route(x, gate, top_k, logits=x @ gate.T)


def _one_kernel_router(x: torch.Tensor, gate: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.moe_route_rows(x, gate, top_k)


def _norm_router(x: torch.Tensor, gate: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batched steps' router with ``batched_fused_router``: the norm's kernel routes the rows; its normed and
    summed rows must come back as the unpatched call's."""
    weight = torch.ones(x.shape[1])
    normed, summed, idx, weights = kernels.add_rms_norm_route(
        x, x, weight, 1e-6, gate, top_k, kernels.route_flags(x.shape[0], "cpu")
    )
    ref_normed, ref_summed = kernels.add_rms_norm_ref(x, x, weight, 1e-6)
    assert torch.equal(summed, ref_summed)
    torch.testing.assert_close(normed, ref_normed)
    return idx, weights


@pytest.mark.parametrize(
    ("name", "route"),
    [("moe_route", _cublas_router), ("moe_route_rows", _one_kernel_router), ("add_rms_norm_route", _norm_router)],
)
def test_spread_routing_replaces_the_prompt_picks_only(name: str, route: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each Triton router (the cuBLAS logits' top-k kernel, the one-launch router, the norm that routes the batched
    steps' rows) is spread at the page's row count only, and restored."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from benchmarks.bench_fast import spread_routing

    tokens, experts, top_k, hidden = 200, 64, 6, 32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen)
    gate = torch.randn(experts, hidden, generator=gen)
    real = getattr(kernels, name)
    idx_real, w_real = route(x, gate, top_k)
    with spread_routing(tokens, experts, top_k, device="cpu") as applied:
        idx, w = route(x, gate, top_k)
        one_idx, _ = route(x[:1], gate, top_k)  # another row count: untouched
    assert getattr(kernels, name) is real
    assert applied == [tokens]  # the one call at the page's rows, not the one-row call
    assert idx.shape == (tokens, top_k) and idx.dtype == idx_real.dtype
    assert all(len(set(row)) == top_k for row in idx.tolist())  # distinct experts per token
    assert set(idx.flatten().tolist()) == set(range(experts))  # every expert read, unlike correlated dummy routing
    assert not torch.equal(idx, idx_real)
    assert torch.equal(w, w_real)  # the router still ran: its weights are the real call's
    assert torch.equal(one_idx, idx_real[:1])
