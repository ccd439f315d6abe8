"""The prefill's Triton kernels at the real sizes, on a GPU: the routed experts on ``prompt_moe``'s kernels == the
torch prefill path, and ``prompt_attention`` == SDPA with the position mask.

bf16, 913 prompt tokens (the Gundam page's), 64 experts of I=896, H=1280, top-6: the sort bit-identical to torch's
stable sort, the grouped GEMMs within bf16 rounding of ``torch._grouped_mm`` + SwiGLU, and the whole routed-experts
chain captured in one CUDA graph following new routing on replay (the grid depends only on the sizes).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA (run on the device machine)", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1: the GPU tests need compiled kernels", allow_module_level=True)
pytest.importorskip("triton")

from llm_perf_opt.models.deepseek_ocr import kernels as K
from llm_perf_opt.models.deepseek_ocr import prompt_attention as PA
from llm_perf_opt.models.deepseek_ocr import prompt_moe as PM
from llm_perf_opt.models.deepseek_ocr.experts import grouped_experts_stacked
from tests.conftest import ROOT, rel_err

pytestmark = [pytest.mark.gpu]

if PM.unavailable_reason("cuda"):
    pytest.skip("prompt_moe was imported for Triton's interpreter in this process", allow_module_level=True)

DEV, BF16 = torch.device("cuda"), torch.bfloat16
TOKENS, HIDDEN, EXPERTS, INTER, TOP_K = 913, 1280, 64, 896, 6


@pytest.fixture(autouse=True)
def _compiled_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _randn(*shape: int, std: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(shape, generator=gen, device=DEV) * std).to(BF16)


def _routing(seed: int, skew: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-6 of 64 (a real page's spread), or skewed: expert 0 in every token (913 rows: 15 row tiles of 64)
    and the other five picks among experts 1-9."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    if skew:
        zero = torch.zeros(1, dtype=torch.int64, device=DEV)
        rows = [torch.cat([zero, 1 + torch.randperm(9, device=DEV, generator=gen)[: TOP_K - 1]]) for _ in range(TOKENS)]
    else:
        rows = [torch.randperm(EXPERTS, device=DEV, generator=gen)[:TOP_K] for _ in range(TOKENS)]
    wts = torch.softmax(torch.randn(TOKENS, TOP_K, device=DEV, generator=gen), -1)
    return torch.stack(rows), wts


@pytest.fixture(scope="module")
def weights() -> tuple[torch.Tensor, torch.Tensor]:
    return (
        _randn(EXPERTS, 2 * INTER, HIDDEN, std=HIDDEN**-0.5, seed=1),
        _randn(EXPERTS, HIDDEN, INTER, std=INTER**-0.5, seed=2),
    )


@pytest.mark.parametrize("tma", [False, True])  # prompt_moe.W_TMA: weight tiles through a TMA descriptor
@pytest.mark.parametrize("skew", [False, True])
def test_prompt_experts_match_the_torch_prefill_path(
    weights: tuple[torch.Tensor, torch.Tensor], skew: bool, tma: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PM, "W_TMA", tma)
    w13, w2 = weights
    x, shared = _randn(TOKENS, HIDDEN, seed=3), _randn(TOKENS, HIDDEN, seed=4)
    idx, wts = _routing(5, skew)
    counts = torch.zeros(EXPERTS, dtype=torch.int64, device=DEV)
    al = PM.align(idx, EXPERTS, counts=counts)
    ref = PM.align_ref(idx, EXPERTS)
    assert torch.equal(al.order, ref.order) and torch.equal(al.inverse, ref.inverse) and torch.equal(al.offs, ref.offs)
    assert torch.equal(counts, torch.bincount(idx.reshape(-1), minlength=EXPERTS))
    act = PM.grouped_swiglu(x, al.order, al.offs, w13, TOP_K)
    act_ref = K.silu_mul(
        torch._grouped_mm(
            x.index_select(0, al.order.long() // TOP_K), w13.transpose(1, 2), offs=al.offs[1:].contiguous()
        )
    )
    assert rel_err(act, act_ref) <= 1e-2, rel_err(act, act_ref)
    out = K.moe_gather_combine(PM.grouped_down(act, al.offs, w2), al.inverse, wts, shared)
    torch_path = grouped_experts_stacked(
        x,
        idx,
        wts,
        w13,
        w2,
        use_gmm=True,
        swiglu=K.silu_mul,
        combine=lambda y, inv: K.moe_gather_combine(y, inv, wts, shared),
    )
    assert rel_err(out, torch_path) <= 1e-2, rel_err(out, torch_path)
    torch.testing.assert_close(out.float(), torch_path.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tma", [False, True])
def test_prompt_experts_in_a_cuda_graph_follow_new_routing(
    weights: tuple[torch.Tensor, torch.Tensor], tma: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chain captured once; new routing written on the device (other experts, other rows per expert, skewed
    into multi-tile experts) gives on replay what eager calls give (with ``W_TMA`` the graph holds the descriptors
    by value)."""
    monkeypatch.setattr(PM, "W_TMA", tma)
    w13, w2 = weights
    x, shared = _randn(TOKENS, HIDDEN, seed=6), _randn(TOKENS, HIDDEN, seed=7)
    idx, wts = _routing(8, skew=False)

    def chain() -> torch.Tensor:
        al = PM.align(idx, EXPERTS)
        act = PM.grouped_swiglu(x, al.order, al.offs, w13, TOP_K)
        return K.moe_gather_combine(PM.grouped_down(act, al.offs, w2), al.inverse, wts, shared)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = chain()
    for seed, skew in ((9, False), (10, True)):
        new_idx, new_wts = _routing(seed, skew)
        idx.copy_(new_idx)
        wts.copy_(new_wts)
        graph.replay()
        assert torch.equal(static, chain())


@pytest.mark.parametrize(("length", "start"), [(TOKENS, 0), (300, 613)])
def test_prompt_attention_matches_sdpa(length: int, start: int) -> None:
    """913 positions x 10 heads of 128 from column 0, and a 300-position chunk continuing a 613-position cache;
    q a strided view of the QKV rows, k/v the cache's layers (8192 slots)."""
    heads, dim = 10, 128
    qkv = _randn(1, length, 3 * heads, dim, seed=20)
    q = qkv[:, :, :heads]
    cache = _randn(2, 1, heads, 8192, dim, seed=21)
    out = PA.prompt_attention(q, cache[0], cache[1], start)
    ref = PA.prompt_attention_ref(q, cache[0], cache[1], start)
    assert rel_err(out, ref) <= 1e-2, rel_err(out, ref)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("length", "start", "steps"), [(913, 0, 4), (913, 0, 2), (300, 613, 3), (913, 0, 8)])
def test_prompt_attention_split_matches_sdpa_and_replays(length: int, start: int, steps: int) -> None:
    """The split form at the real sizes (a query block's keys in chunks of ``steps`` 64-key steps, up to 15 steps
    at 913 positions: up to eight chunks racing for a block's counter) == SDPA with the position mask to bf16
    rounding, as the one-program kernel is; then captured in a CUDA graph with kept counters and replayed: every
    replay equals the eager call bit for bit (the merge runs in chunk order, whichever chunk ends last), and the
    counters are back at zero."""
    heads, dim = 10, 128
    qkv = _randn(1, length, 3 * heads, dim, seed=23)
    q = qkv[:, :, :heads]
    cache = _randn(2, 1, heads, 8192, dim, seed=24)
    counters = PA.split_counters(1, heads, length, DEV)
    out = PA.prompt_attention(q, cache[0], cache[1], start, split_steps=steps, counters=counters)
    ref = PA.prompt_attention_ref(q, cache[0], cache[1], start)
    assert rel_err(out, ref) <= 1e-2, rel_err(out, ref)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    whole = PA.prompt_attention(q, cache[0], cache[1], start, split_steps=0)
    assert rel_err(out, whole) <= 1e-2
    assert int(counters.abs().sum()) == 0
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        PA.prompt_attention(q, cache[0], cache[1], start, split_steps=steps, counters=counters)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = PA.prompt_attention(q, cache[0], cache[1], start, split_steps=steps, counters=counters)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, out)
    assert int(counters.abs().sum()) == 0


@pytest.mark.parametrize("views", [((6, 101), (1, 257)), ((1, 257),), ((2, 101), (1, 257))])
def test_clip_views_attention_matches_sdpa_per_view(views: tuple[tuple[int, int], ...]) -> None:
    """CLIP's attention over a page's views in one kernel (16 heads of 64: a Gundam page's six 101-token crops and
    its 257-token global view; a global view alone) == SDPA per view from float32 operands, to bf16 rounding; and
    under ``torch.compile`` (the custom op, as the compiled CLIP block calls it) the same output as the plain call."""
    from llm_perf_opt.models.deepseek_ocr import clip_attention as CA

    rows = sum(n * s for n, s in views)
    qkv = _randn(rows, 3 * 1024, seed=22)
    out = CA.views_attention(qkv, views, 16)
    ref = CA.views_attention_ref(qkv.float(), views, 16)
    assert out.shape == (rows, 1024) and out.dtype == BF16
    assert rel_err(out, ref) <= 1e-2, rel_err(out, ref)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    compiled = torch.compile(CA.views_attention, dynamic=False)
    assert torch.equal(compiled(qkv, views, 16), out)


@pytest.mark.parametrize(("down", "router"), [(down, "kernel") for down in PM.DOWN_GEMMS] + [(PM.DOWN_GEMM, "cublas")])
def test_prompt_moe_block_matches_the_torch_block(down: str, router: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One real-size MoE block at 913 prompt rows through ``TritonPromptMoE`` with ``experts="triton"`` (either down
    GEMM, either prompt router) == the same block on the torch experts path, and the same routing counters."""
    from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig
    from llm_perf_opt.models.deepseek_ocr import triton_layers as TL
    from llm_perf_opt.models.deepseek_ocr.decoder import MoE
    from llm_perf_opt.models.deepseek_ocr.fast_layers import GroupedMoE
    from llm_perf_opt.models.deepseek_ocr.triton_layers import TritonPromptMoE

    monkeypatch.setattr(PM, "DOWN_GEMM", down)
    monkeypatch.setattr(TL, "ROWS_ROUTER", router)
    cfg = DeepseekOCRConfig.from_json(ROOT / "src/llm_perf_opt/models/deepseek_ocr/configs/deepseek-ocr.json")
    torch.manual_seed(0)
    moe = MoE(cfg.language).to(DEV, BF16).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)
        moe.gate.weight.normal_(0.0, 1.0)  # logits far apart: no float32 near-ties between the two routers
    x = _randn(1, TOKENS, HIDDEN, seed=30)
    outs, counts = [], []
    for experts in ("torch", "triton"):
        block = TritonPromptMoE(GroupedMoE(moe, grouped=True, expert_impl="grouped", fused=True), experts)
        with torch.inference_mode():
            outs.append(block(x))
        counts.append(block.moe.counts.clone())
    assert torch.equal(counts[0], counts[1]) and int(counts[1].sum()) == TOKENS * TOP_K
    assert rel_err(outs[1], outs[0]) <= 1e-2, rel_err(outs[1], outs[0])
