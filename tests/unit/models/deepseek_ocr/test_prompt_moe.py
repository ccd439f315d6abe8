"""A prompt's routed experts as Triton kernels (``prompt_moe``), on CPU through Triton's interpreter.

Oracles: the stable counting sort written out in Python (sorted by (expert, pair), offsets and counts by counting);
the gate/up GEMM + SwiGLU and the down GEMM per pair in float64 from the pair's own token and expert (no sorted
tensors involved), rounded at the torch path's points for bf16.  Cases: several sort chunks with a partial last
one, experts with no rows, an expert whose rows span several row tiles, K and N that are not multiples of the
blocks, float32 and bf16.  ``tests/conftest.py`` imports the module with ``TRITON_INTERPRET=1`` on machines without
CUDA; elsewhere these tests skip (the GPU suite covers real sizes: tests/gpu/test_kernels_gpu.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from llm_perf_opt.models.deepseek_ocr import prompt_moe as PM
from llm_perf_opt.models.deepseek_ocr.kernels import KernelUnavailableError

pytestmark = pytest.mark.skipif(
    not PM.INTERPRETED, reason="prompt_moe was imported compiled-mode (a CUDA machine runs the GPU tests instead)"
)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _routing(n_tokens: int, n_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """Distinct experts per token; experts 1 and 4 never picked, expert 0 picked by every token."""
    gen = torch.Generator().manual_seed(seed)
    others = [e for e in range(1, n_experts) if e not in (1, 4)]
    rows = []
    for _ in range(n_tokens):
        pick = torch.randperm(len(others), generator=gen)[: top_k - 1].tolist()
        rows.append([0, *(others[i] for i in pick)])
    return torch.tensor(rows, dtype=torch.int64)


def _sort_oracle(idx: torch.Tensor, n_experts: int) -> tuple[list[int], list[int], list[int]]:
    ids = idx.reshape(-1).tolist()
    order = sorted(range(len(ids)), key=lambda p: (ids[p], p))
    inverse = [0] * len(ids)
    for pos, p in enumerate(order):
        inverse[p] = pos
    offs = [sum(1 for i in ids if i < e) for e in range(n_experts + 1)]
    return order, inverse, offs


@pytest.mark.parametrize(("n_tokens", "top_k"), [(1, 1), (21, 3), (50, 6)])  # 1, 63 and 300 pairs (3 chunks)
def test_align_is_the_stable_sort_by_expert(n_tokens: int, top_k: int) -> None:
    n_experts = 8
    idx = _routing(n_tokens, n_experts, top_k, seed=n_tokens)
    counts = torch.arange(n_experts, dtype=torch.int64) * 100  # counters already holding earlier picks
    al = PM.align(idx.to(torch.int32), n_experts, counts=counts)
    order, inverse, offs = _sort_oracle(idx, n_experts)
    assert al.order.dtype == torch.int32 and al.order.tolist() == order
    assert al.inverse.dtype == torch.int64 and al.inverse.tolist() == inverse
    assert al.offs.dtype == torch.int32 and al.offs.tolist() == offs
    picks = [sum(1 for i in idx.reshape(-1).tolist() if i == e) for e in range(n_experts)]
    assert counts.tolist() == [100 * e + picks[e] for e in range(n_experts)]
    assert picks[1] == picks[4] == 0 and picks[0] == n_tokens
    ref = PM.align_ref(idx, n_experts)  # the torch path's steps give the same alignment
    assert torch.equal(ref.order, al.order) and torch.equal(ref.inverse, al.inverse) and torch.equal(ref.offs, al.offs)


def test_align_chunks_grow_to_stay_within_the_place_kernels_budget() -> None:
    assert PM._align_chunk(1) == 128
    assert PM._align_chunk(128 * PM.ALIGN_MAX_CHUNKS) == 128
    assert PM._align_chunk(128 * PM.ALIGN_MAX_CHUNKS + 1) == 256
    assert PM._align_chunk(1000 * PM.ALIGN_MAX_CHUNKS) == 1024


def test_align_past_the_largest_chunk_sorts_with_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A routing too large for the place kernel's chunk (a batched prefill of many pages: round 24's first fill of
    64 Base pages asked an H200 for 262,144 bytes of shared memory) is sorted by :func:`align_ref`, the oracle the
    kernels match bit for bit, and no kernel is launched.  By hand: 256 chunks of 256 pairs is the most the kernel
    takes; one pair more needs 512-pair chunks."""
    launched: list[str] = []
    monkeypatch.setattr(PM, "_align_hist_kernel", _Spy("hist", launched))
    monkeypatch.setattr(PM, "_align_place_kernel", _Spy("place", launched))
    assert PM._align_chunk(PM.ALIGN_MAX_CHUNK * PM.ALIGN_MAX_CHUNKS) == PM.ALIGN_MAX_CHUNK == 256
    assert PM._align_chunk(PM.ALIGN_MAX_CHUNK * PM.ALIGN_MAX_CHUNKS + 1) == 512
    n_experts, top_k = 64, 6
    tokens = PM.ALIGN_MAX_CHUNK * PM.ALIGN_MAX_CHUNKS // top_k + 1  # 65,538 pairs
    idx = _routing(tokens, n_experts, top_k, seed=5)
    counts = torch.zeros(n_experts, dtype=torch.int64)
    got = PM.align(idx, n_experts, counts)
    want_counts = torch.zeros(n_experts, dtype=torch.int64)
    want = PM.align_ref(idx, n_experts, want_counts)
    assert launched == []
    assert torch.equal(got.order, want.order) and torch.equal(got.inverse, want.inverse)
    assert torch.equal(got.offs, want.offs) and torch.equal(counts, want_counts)
    assert int(counts.sum()) == tokens * top_k


class _Spy:
    """A kernel stand-in that records its launch (``kernel[grid](...)``)."""

    def __init__(self, name: str, launched: list[str]) -> None:
        self.name, self.launched = name, launched

    def __getitem__(self, grid: object) -> object:
        return lambda *args, **kwargs: self.launched.append(self.name)


def test_fit_stages_keeps_the_pipeline_within_shared_memory() -> None:
    """By hand, an H200's 232,448 bytes a block: the up GEMM's [128, 128, 64] tiles (one A tile, gate and up W
    tiles) are 48 KB a stage in bf16, so four stages (three in flight, 144 KB) fit; in float32 96 KB a stage,
    3 x 96 KB = 294,912 does not: three stages (192 KB).  The down GEMM's two tiles in float32 (64 KB) fit four."""
    h200 = 232_448
    up_bf16, up_f32 = (128 * 64 + 2 * 128 * 64) * 2, (128 * 64 + 2 * 128 * 64) * 4
    assert (up_bf16, up_f32) == (49_152, 98_304)
    assert PM.fit_stages(4, up_bf16, h200) == 4
    assert PM.fit_stages(4, up_f32, h200) == 3
    assert PM.fit_stages(4, (128 * 64 * 2) * 4, h200) == 4
    assert PM.fit_stages(3, 10**6, h200) == 1  # nothing fits: a plain loop
    assert PM.fit_stages(1, 10**6, 0) == 1
    # gemm_stages: the same stage bytes from a launch's blocks (gate and up W tiles with the SwiGLU)
    up = PM.GemmBlocks(128, 128, 64, 8, 4)
    assert PM.gemm_stages(up, True, 2, h200) == 4 and PM.gemm_stages(up, True, 4, h200) == 3
    assert PM.gemm_stages(up, False, 4, h200) == 4
    # a float32 model's up GEMM has its own blocks (the bf16 ones spill on sm_90): [64, 128, 32] tiles are
    # (64·32 + 2·128·32)·4 = 40,960 bytes a stage, so its three stages keep 81,920 in flight
    f32_up = PM.gemm_blocks("up", interpreter=False, float32=True)
    assert (f32_up.block_m, f32_up.block_n, f32_up.block_k) == (64, 128, 32)
    assert PM.gemm_stages(f32_up, True, 4, h200) == 3 and PM.gemm_stages(f32_up, True, 4, 81_920) == 3
    assert PM.gemm_stages(f32_up, True, 4, 81_919) == 2
    assert PM.gemm_blocks("up", interpreter=False) == PM.UP_BLOCKS  # bf16 keeps the timed blocks
    assert PM.gemm_blocks("down", interpreter=False, float32=True) == PM.DOWN_BLOCKS


def test_row_tiles_bounds_every_routing() -> None:
    # 300 pairs over 8 experts in 16-row tiles: ceil(300 / 16) = 19, plus one partial tile per expert at most
    assert PM.row_tiles(300, 8, 16) == 27
    for counts in ([300, 0, 0, 0, 0, 0, 0, 0], [38, 38, 38, 38, 37, 37, 37, 37], [1] * 7 + [293]):
        assert sum(-(-c // 16) for c in counts) <= PM.row_tiles(sum(counts), 8, 16)


def _pair_oracle(
    x: torch.Tensor, idx: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair (token t, pick j) in pair order: ``silu(g)·u`` of x[t] against expert idx[t, j]'s gate/up weights,
    and that times the expert's down weights, in float64; bf16 inputs are rounded where the torch path
    materialises a bf16 tensor (g and u, silu(g), the product, the down output)."""
    k = idx.shape[1]
    inter = w13.shape[1] // 2
    bf16 = x.dtype == torch.bfloat16

    def rnd(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).double() if bf16 else t

    acts, ys = [], []
    for p in range(idx.numel()):
        t, e = p // k, int(idx.reshape(-1)[p])
        h = rnd(x[t].double() @ w13[e].double().T)
        g, u = h[:inter], h[inter:]
        act = rnd(rnd(F.silu(g)) * u)
        acts.append(act)
        ys.append(rnd(act @ w2[e].double().T))
    return torch.stack(acts), torch.stack(ys)


@pytest.mark.parametrize(
    ("dtype", "hidden", "inter", "up", "down"),
    [
        (torch.float32, 64, 48, PM.GemmBlocks(16, 32, 32, 4, 1), PM.GemmBlocks(16, 32, 16, 4, 1)),  # ragged N, K
        (torch.bfloat16, 96, 32, PM.GemmBlocks(16, 16, 64, 4, 1), PM.GemmBlocks(32, 64, 32, 4, 1)),
        (torch.bfloat16, 64, 32, None, None),  # the interpreter's default blocks
        (torch.float32, 64, 128, PM.FLOAT32_UP_BLOCKS, PM.DOWN_BLOCKS),  # a float32 model's blocks on a GPU
    ],
)
def test_grouped_gemms_match_the_per_pair_oracle(
    dtype: torch.dtype, hidden: int, inter: int, up: PM.GemmBlocks | None, down: PM.GemmBlocks | None
) -> None:
    n_experts, top_k, n_tokens = 8, 3, 37  # expert 0 has 37 rows: three 16-row tiles, the last partial
    gen = torch.Generator().manual_seed(hidden + inter)
    x = torch.randn(n_tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(n_experts, 2 * inter, hidden, generator=gen) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(n_experts, hidden, inter, generator=gen) * inter**-0.5).to(dtype)
    idx = _routing(n_tokens, n_experts, top_k, seed=3)
    al = PM.align(idx, n_experts)
    act = PM.grouped_swiglu(x, al.order, al.offs, w13, top_k, up)
    y = PM.grouped_down(act, al.offs, w2, down)
    want_act, want_y = _pair_oracle(x, idx, w13, w2)
    # sorted rows back to pair order through the inverse permutation
    got_act, got_y = act.double()[al.inverse], y.double()[al.inverse]
    if dtype == torch.float32:
        torch.testing.assert_close(got_act, want_act, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-5)
    else:  # the K sum runs in another order than float64's: a bf16 rounding may flip by one unit, rarely
        tol = dict(rtol=2**-7, atol=2**-7)
        torch.testing.assert_close(got_act, want_act, **tol)
        torch.testing.assert_close(got_y, want_y, **tol)
        assert (got_act != want_act).double().mean() <= 0.05
    ref = PM.grouped_swiglu_ref(x, al.order, al.offs, w13, top_k)  # the torch path's steps, expert by expert
    torch.testing.assert_close(act.float(), ref.float(), rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(y.float(), PM.grouped_down_ref(act, al.offs, w2).float(), rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma_weight_tiles_match_the_per_pair_oracle(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """``W_TMA``: both GEMMs read their weight tiles through a tensor descriptor (counted: one per launch, each over
    the weights as [E·rows, K] with [BLOCK_N, BLOCK_K] blocks) and still equal the float64 per-pair oracle; a ragged
    N keeps the pointer loads (no descriptor)."""
    from triton.tools import tensor_descriptor

    made: list[tuple[tuple[int, ...], list[int]]] = []
    real = tensor_descriptor.TensorDescriptor.from_tensor

    def spy(t: torch.Tensor, block_shape: list[int]) -> object:
        made.append((tuple(t.shape), list(block_shape)))
        return real(t, block_shape)

    monkeypatch.setattr(tensor_descriptor.TensorDescriptor, "from_tensor", staticmethod(spy))
    monkeypatch.setattr(PM, "W_TMA", True)
    n_experts, top_k, n_tokens, hidden, inter = 8, 3, 37, 64, 32
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(n_tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(n_experts, 2 * inter, hidden, generator=gen) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(n_experts, hidden, inter, generator=gen) * inter**-0.5).to(dtype)
    idx = _routing(n_tokens, n_experts, top_k, seed=3)
    al = PM.align(idx, n_experts)
    act = PM.grouped_swiglu(x, al.order, al.offs, w13, top_k, PM.GemmBlocks(16, 16, 32, 4, 1))
    y = PM.grouped_down(act, al.offs, w2, PM.GemmBlocks(16, 32, 16, 4, 1))
    assert made == [((n_experts * 2 * inter, hidden), [16, 32]), ((n_experts * hidden, inter), [32, 16])]
    want_act, want_y = _pair_oracle(x, idx, w13, w2)
    got_act, got_y = act.double()[al.inverse], y.double()[al.inverse]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(got_act, want_act, **tol)
    torch.testing.assert_close(got_y, want_y, **tol)
    made.clear()
    w2_ragged = torch.randn(n_experts, 40, inter, generator=gen).to(dtype)  # N = 40: not whole 32-wide tiles
    PM.grouped_down(act, al.offs, w2_ragged, PM.GemmBlocks(16, 32, 16, 4, 1))
    assert made == []


def test_bad_inputs_are_refused_with_what_to_fix() -> None:
    idx = _routing(5, 8, 2, seed=0)
    al = PM.align(idx, 8)
    x = torch.randn(5, 32)
    w13 = torch.randn(8, 32, 32)
    w2 = torch.randn(8, 32, 16)
    with pytest.raises(ValueError, match="integer expert ids"):
        PM.align(idx.float(), 8)
    with pytest.raises(ValueError, match="counts must be int64"):
        PM.align(idx, 8, counts=torch.zeros(8, dtype=torch.int32))
    with pytest.raises(ValueError, match="order must be int32"):
        PM.grouped_swiglu(x, al.order.long(), al.offs, w13, 2)
    with pytest.raises(ValueError, match="offs must be int32"):
        PM.grouped_swiglu(x, al.order, al.offs[:-1], w13, 2)
    with pytest.raises(ValueError, match="order holds 10 pairs"):
        PM.grouped_swiglu(x, al.order, al.offs, w13, 3)
    with pytest.raises(ValueError, match=r"x \[T, 32\]"):
        PM.grouped_swiglu(torch.randn(5, 16), al.order, al.offs, w13, 2)
    with pytest.raises(ValueError, match="at least 16"):
        PM.grouped_swiglu(x, al.order, al.offs, w13, 2, PM.GemmBlocks(8, 16, 16, 4, 1))
    with pytest.raises(ValueError, match=r"act \[P, 16\]"):
        PM.grouped_down(torch.randn(10, 8), al.offs, w2)
    with pytest.raises(ValueError, match="'up' or 'down'"):
        PM.gemm_blocks("gate", True)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        PM.align(_routing(3, 8, 2, seed=0), 8)
