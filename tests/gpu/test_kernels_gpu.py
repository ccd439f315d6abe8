"""Triton decode kernels == their torch references at the real DeepSeek-OCR sizes, compiled, on a GPU.

bf16, H=1280, 10 heads x 128, 64 experts of I=896 + 2 shared slots, top-6, KV cache of 1200 positions.
Plus one CUDA graph holding all five ops, replayed after the position changed on the device.  The
module is skipped before it imports Triton when there is no GPU (so the CPU interpreter tests in
tests/unit/models/deepseek_ocr/test_kernels.py keep a Triton they can switch to interpreter mode).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA (run on the device machine)", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip(
        "TRITON_INTERPRET=1: the GPU tests need compiled kernels (run them in their own process)",
        allow_module_level=True,
    )
pytest.importorskip("triton")

import torch.nn.functional as F
from torch import nn

from llm_perf_opt.models.deepseek_ocr import kernels as K
from llm_perf_opt.models.deepseek_ocr.decoder import (
    MLP,
    RotaryEmbedding,
    apply_experts_eager,
    grouped_experts_stacked,
    route_tokens,
    stacked_expert_weights,
    use_grouped_mm,
)
from tests.conftest import rel_err

pytestmark = [pytest.mark.gpu]

if not K.triton_available("cuda"):
    pytest.skip("the kernels module was imported for Triton's interpreter in this process", allow_module_level=True)


@pytest.fixture(autouse=True)
def _compiled_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton reads TRITON_INTERPRET while compiling too (constexpr functions): keep a module collected
    later in the session that sets it (for its CPU interpreter tests) from reaching these compiles."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


DEV, BF16 = torch.device("cuda"), torch.bfloat16
HIDDEN, HEADS, HEAD_DIM, MAX_LEN = 1280, 10, 128, 1200
EXPERTS, INTER, TOP_K, SHARED_SLOTS = 64, 896, 6, 2


def _randn(*shape: int, std: float = 1.0, dtype: torch.dtype = BF16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(shape, generator=gen, device=DEV) * std).to(dtype)


def _assert_bf16_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert rel_err(actual, expected) <= 1e-2, rel_err(actual, expected)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------ single ops
@pytest.mark.parametrize("tokens", [1, 8])
def test_add_rms_norm(tokens: int) -> None:
    x, res = _randn(tokens, HIDDEN, seed=1), _randn(tokens, HIDDEN, std=4.0, seed=2)
    weight = (1 + 0.3 * _randn(HIDDEN, seed=3, dtype=torch.float32)).to(BF16)
    normed, summed = K.add_rms_norm(x, res, weight, 1e-6)
    ref_normed, ref_summed = K.add_rms_norm_ref(x, res, weight, 1e-6)
    assert torch.equal(summed, ref_summed)
    _assert_bf16_close(normed, ref_normed)
    assert (normed != ref_normed).float().mean() < 0.02  # rsqrt may differ in its last bit: rare 1-ulp flips


@pytest.mark.parametrize(("batch", "kv_heads", "pos"), [(1, HEADS, 0), (4, HEADS, MAX_LEN - 1), (2, 2, 517)])
def test_rope_kv_write(batch: int, kv_heads: int, pos: int) -> None:
    cos, sin = RotaryEmbedding(HEAD_DIM, 10000.0, MAX_LEN)(0, MAX_LEN, DEV, BF16)
    qkv = _randn(batch, (HEADS + 2 * kv_heads) * HEAD_DIM, seed=pos)
    k_cache, v_cache = (
        _randn(batch, kv_heads, MAX_LEN, HEAD_DIM, seed=5),
        _randn(batch, kv_heads, MAX_LEN, HEAD_DIM, seed=6),
    )
    k_ref, v_ref, k_before = k_cache.clone(), v_cache.clone(), k_cache.clone()
    position = torch.tensor([pos], device=DEV)
    q = K.rope_kv_write(qkv, cos, sin, position, k_cache, v_cache, HEADS, kv_heads, HEAD_DIM)
    q_ref = K.rope_kv_write_ref(qkv, cos, sin, position, k_ref, v_ref, HEADS, kv_heads, HEAD_DIM)
    assert torch.equal(q, q_ref)  # same products, same sum, same rounding: bit-identical
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    others = torch.arange(MAX_LEN, device=DEV) != pos
    assert torch.equal(k_cache[:, :, others], k_before[:, :, others])


@pytest.mark.parametrize(("batch", "length", "start"), [(1, 913, 0), (2, 257, 100)])
def test_prompt_rope_kv_write(batch: int, length: int, start: int) -> None:
    """The prefill's rotary + cache write at the Gundam prompt (913 tokens) and a continued batch-2 prompt:
    bit-identical to the torch path (q and the whole cache)."""
    cos, sin = RotaryEmbedding(HEAD_DIM, 10000.0, MAX_LEN)(start, length, DEV, BF16)
    qkv = _randn(batch, length, 3 * HEADS * HEAD_DIM, seed=start)
    k_cache, v_cache = _randn(batch, HEADS, MAX_LEN, HEAD_DIM, seed=5), _randn(batch, HEADS, MAX_LEN, HEAD_DIM, seed=6)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q = K.prompt_rope_kv_write(qkv, cos[None], sin[None], k_cache, v_cache, start, HEADS, HEADS, HEAD_DIM)
    q_ref = K.prompt_rope_kv_write_ref(qkv, cos[None], sin[None], k_ref, v_ref, start, HEADS, HEADS, HEAD_DIM)
    assert torch.equal(q, q_ref)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_silu_mul_at_the_prompts_routed_rows() -> None:
    """SwiGLU over the routed experts' gate/up output at 913 tokens x 6 picks: the torch pair's rounding points
    (rare 1-ulp flips from exp)."""
    h = _randn(913 * TOP_K, 2 * INTER, std=2.0, seed=11)
    out, ref = K.silu_mul(h), K.silu_mul_ref(h)
    _assert_bf16_close(out, ref)
    assert (out != ref).float().mean() < 0.02


def test_moe_gather_combine_at_the_prompt() -> None:
    """The prefill's MoE tail at 913 tokens x 6 picks: within float32 summation order of the torch tail (rare
    1-ulp bf16 flips)."""
    n_tokens = 913
    y = _randn(n_tokens * TOP_K, HIDDEN, seed=7)
    inverse = torch.randperm(n_tokens * TOP_K, device=DEV, generator=torch.Generator(device=DEV).manual_seed(8))
    weights = _randn(n_tokens, TOP_K, seed=9, dtype=torch.float32).abs() * 0.1
    shared = _randn(n_tokens, HIDDEN, seed=10)
    out = K.moe_gather_combine(y, inverse, weights, shared)
    ref = K.moe_gather_combine_ref(y, inverse, weights, shared)
    _assert_bf16_close(out, ref)
    assert (out != ref).float().mean() < 0.02


@pytest.mark.parametrize(("batch", "kv_heads", "pos"), [(1, HEADS, 0), (4, HEADS, MAX_LEN - 1), (2, 2, 517)])
def test_qkv_rope_equals_linear_rows_then_rope_kv_write(batch: int, kv_heads: int, pos: int) -> None:
    """The fused QKV GEMV + rotary at the real sizes, compiled: q and both caches equal the two launches' bit for
    bit (the same [4, 256] tiles and K order, the same rotary arithmetic), as a plain and a dependent launch."""
    cos, sin = RotaryEmbedding(HEAD_DIM, 10000.0, MAX_LEN)(0, MAX_LEN, DEV, BF16)
    x = _randn(batch, HIDDEN, seed=pos + 1)
    w = _randn((HEADS + 2 * kv_heads) * HEAD_DIM, HIDDEN, std=HIDDEN**-0.5, seed=pos + 2)
    caches = (_randn(batch, kv_heads, MAX_LEN, HEAD_DIM, seed=5), _randn(batch, kv_heads, MAX_LEN, HEAD_DIM, seed=6))
    position = torch.tensor([pos], device=DEV)
    k_ref, v_ref = (c.clone() for c in caches)
    q_ref = K.rope_kv_write(K.linear_rows(x, w), cos, sin, position, k_ref, v_ref, HEADS, kv_heads, HEAD_DIM)
    for pdl in (False, True):
        k_cache, v_cache = (c.clone() for c in caches)
        with K.dependent_launches(pdl):
            q = K.qkv_rope(x, w, cos, sin, position, k_cache, v_cache, HEADS, kv_heads, HEAD_DIM)
        assert torch.equal(q, q_ref) and torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref), pdl


def _matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int) -> torch.Tensor:
    """The torch decode path (fast.FastDecoder._forward, decode_attention="matmul") over keys 0..pos."""
    rep = q.shape[1] // k.shape[1]
    k, v = k[:, :, : pos + 1].repeat_interleave(rep, dim=1), v[:, :, : pos + 1].repeat_interleave(rep, dim=1)
    scores = torch.matmul(q.unsqueeze(2), k.transpose(-1, -2)) * HEAD_DIM**-0.5
    out = torch.matmul(scores.float().softmax(dim=-1).to(q.dtype), v)
    return out.squeeze(2).reshape(q.shape[0], -1)


@pytest.mark.parametrize(
    ("batch", "kv_heads", "pos"), [(1, HEADS, 0), (1, HEADS, 1000), (8, HEADS, MAX_LEN - 1), (4, 2, 333)]
)
def test_decode_attention(batch: int, kv_heads: int, pos: int) -> None:
    q = _randn(batch, HEADS, HEAD_DIM, seed=pos)
    k_cache = _randn(batch, kv_heads, MAX_LEN, HEAD_DIM, std=2.0, seed=8)
    v_cache = _randn(batch, kv_heads, MAX_LEN, HEAD_DIM, seed=9)
    k_cache[:, :, pos + 1 :] = float("nan")  # a single load past pos would poison the output
    v_cache[:, :, pos + 1 :] = float("nan")
    position = torch.tensor([pos], device=DEV)
    out = K.decode_attention(q, k_cache, v_cache, position, HEAD_DIM**-0.5)
    assert torch.isfinite(out.float()).all()
    clean_k, clean_v = k_cache.nan_to_num(), v_cache.nan_to_num()
    _assert_bf16_close(out, K.decode_attention_ref(q, clean_k, clean_v, position, HEAD_DIM**-0.5))
    # the torch path rounds scores (|s| up to ~10 here) and probabilities to bf16 before the softmax / PV product
    assert rel_err(out, _matmul_attention(q, clean_k, clean_v, pos)) <= 5e-2


def test_decode_attention_key_mask_and_row_rotary_at_batch_32() -> None:
    """The batched step's attention at real sizes: 32 rows with left pads 0..310 over a 411-column cache, every
    row rotated at its own position and written at one column; against the references and plain softmax."""
    batch, max_len, slot = 32, 411, 300
    pads = torch.arange(batch, device=DEV) * 9  # row 31: 279 pad columns
    cos_t, sin_t = RotaryEmbedding(HEAD_DIM, 10000.0, MAX_LEN)(0, MAX_LEN, DEV, BF16)
    positions = slot - pads
    cos, sin = cos_t[positions].contiguous(), sin_t[positions].contiguous()
    qkv = _randn(batch, 3 * HEADS * HEAD_DIM, seed=70)
    k_cache, v_cache = (
        _randn(batch, HEADS, max_len, HEAD_DIM, seed=71),
        _randn(batch, HEADS, max_len, HEAD_DIM, seed=72),
    )
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    pos = torch.tensor([slot], device=DEV)
    q = K.rope_kv_write(qkv, cos, sin, pos, k_cache, v_cache, HEADS, HEADS, HEAD_DIM, row_tables=True)
    q_ref = K.rope_kv_write_ref(qkv, cos, sin, pos, k_ref, v_ref, HEADS, HEADS, HEAD_DIM, row_tables=True)
    assert torch.equal(q, q_ref) and torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    cols = torch.arange(max_len, device=DEV)
    visible = (cols[None, :] >= pads[:, None]) & (cols[None, :] <= slot)
    mask = torch.where(visible, 0.0, float("-inf")).to(BF16)
    out = K.decode_attention(q, k_cache, v_cache, pos, HEAD_DIM**-0.5, key_mask=mask)
    assert torch.isfinite(out.float()).all()
    _assert_bf16_close(out, K.decode_attention_ref(q, k_cache, v_cache, pos, HEAD_DIM**-0.5, key_mask=mask))
    scores = torch.einsum("bhd,bhnd->bhn", q.float(), k_cache.float()) * HEAD_DIM**-0.5 + mask.float()[:, None]
    plain = torch.einsum("bhn,bhnd->bhd", scores.softmax(-1), v_cache.float()).reshape(batch, -1)
    assert rel_err(out, plain) <= 1e-2
    # the static step's key_first (its pads; row 31 finished: its newest key only), with the keys before it NaN:
    # the same bits as the mask alone (the blocks skipped were masked), and row 31 sees one key: its value
    first = pads.clone()
    first[-1] = slot
    mask_first = torch.where((cols[None, :] >= first[:, None]) & (cols[None, :] <= slot), 0.0, float("-inf")).to(BF16)
    want = K.decode_attention(q, k_cache, v_cache, pos, HEAD_DIM**-0.5, key_mask=mask_first)
    hidden = (cols[None, :] < first[:, None])[:, None, :, None]
    k_nan, v_nan = k_cache.masked_fill(hidden, float("nan")), v_cache.masked_fill(hidden, float("nan"))
    skipped = K.decode_attention(q, k_nan, v_nan, pos, HEAD_DIM**-0.5, key_mask=mask_first, key_first=first)
    assert torch.equal(skipped, want)
    assert torch.equal(skipped[-1], v_cache[-1, :, slot].reshape(-1))


@pytest.mark.parametrize("logits_in", [False, True])
@pytest.mark.parametrize("tokens", [1, 4, 8])
def test_moe_route(tokens: int, logits_in: bool) -> None:
    x = _randn(tokens, HIDDEN, seed=tokens)
    gate = _randn(EXPERTS, HIDDEN, std=HIDDEN**-0.5, dtype=torch.float32, seed=11)
    counts = torch.zeros(EXPERTS, device=DEV, dtype=torch.int64)
    logits = F.linear(x.float(), gate) if logits_in else None
    idx, weights = K.moe_route(x, gate, TOP_K, counts, logits=logits)
    ref_idx, ref_weights = route_tokens(F.linear(x.float(), gate), TOP_K)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-7)
    assert torch.equal(counts, torch.bincount(ref_idx.reshape(-1), minlength=EXPERTS))


@pytest.mark.parametrize("rows_per_program", [2, 4, 8])
@pytest.mark.parametrize("rows", [32, 61])
def test_add_rms_norm_route_several_rows_a_program_at_the_real_sizes(rows: int, rows_per_program: int) -> None:
    """The fused norm + router compiled with several rows a program (the batched steps' form above 8 rows): bit for
    bit the one-row-a-program launch (each row runs the same math), and the oracle's ids (the norm's rows routed by
    ``route_tokens`` on float32 logits) wherever its top-7 logits are apart by more than summation noise; the row
    counters back at zero after two calls."""
    x, residual = _randn(rows, HIDDEN, seed=21), _randn(rows, HIDDEN, seed=22)
    weight = (1 + 0.1 * _randn(HIDDEN, dtype=torch.float32, seed=23)).to(BF16)
    gate = _randn(EXPERTS, HIDDEN, std=HIDDEN**-0.5, dtype=torch.float32, seed=24)
    one = K.add_rms_norm_route(x, residual, weight, 1e-6, gate, TOP_K, K.route_flags(rows, DEV), rows_per_program=1)
    flags = K.route_flags(rows, DEV)
    for _ in range(2):
        got = K.add_rms_norm_route(x, residual, weight, 1e-6, gate, TOP_K, flags, rows_per_program=rows_per_program)
        torch.cuda.synchronize()
        for a, b in zip(got, one, strict=True):
            assert torch.equal(a, b)
        assert int(flags.abs().sum()) == 0
    normed, summed, idx, weights = got
    ref_normed, ref_summed = K.add_rms_norm_ref(x, residual, weight, 1e-6)
    assert torch.equal(summed, ref_summed)
    _assert_bf16_close(normed, ref_normed)
    logits = F.linear(normed.float(), gate)
    ref_idx, ref_weights = route_tokens(logits, TOP_K)
    top = logits.topk(TOP_K + 1, dim=1).values
    clear = ((top[:, :-1] - top[:, 1:]) > 1e-4).all(dim=1)
    assert int(clear.sum()) >= rows * 0.9
    assert torch.equal(idx[clear], ref_idx[clear])
    torch.testing.assert_close(weights[clear], ref_weights[clear], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gate_dtype", [torch.float32, BF16])
@pytest.mark.parametrize(
    "blocks", [{}, {"block_m": 16}, {"block_m": 32, "block_k": 64}, {"block_m": 64, "block_k": 32}]
)
def test_moe_route_rows_at_the_prompts_rows(gate_dtype: torch.dtype, blocks: dict[str, Any]) -> None:
    """The many-row router compiled, at the Gundam page's 913 rows, against torch's float32 logits + ``route_tokens``
    (the oracle): the same ids wherever the oracle's top-7 logits are apart by more than float32 summation noise
    (its sums run in another order than cuBLAS's), the weights to float32 rounding, in several launch forms; a bf16
    gate on the tensor cores (products exact in float32), a float32 one in IEEE float32."""
    rows = 913
    x = _randn(rows, HIDDEN, seed=13)
    gate = _randn(EXPERTS, HIDDEN, std=HIDDEN**-0.5, dtype=gate_dtype, seed=14)
    idx, weights = K.moe_route_rows(x, gate, TOP_K, scaling=1.5, renormalize=True, **blocks)
    logits = F.linear(x.float(), gate.float())
    ref_idx, ref_weights = route_tokens(logits, TOP_K, norm_topk_prob=True, routed_scaling_factor=1.5)
    top = logits.topk(TOP_K + 1, dim=1).values
    clear = ((top[:, :-1] - top[:, 1:]) > 1e-4).all(dim=1)  # rows without a near-tie in the picks' order
    assert int(clear.sum()) >= rows * 0.95
    assert torch.equal(idx[clear], ref_idx[clear])
    torch.testing.assert_close(weights[clear], ref_weights[clear], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def moe() -> dict[str, Any]:
    """64 real-size routed experts and a shared MLP of 2 x 896, as MLP modules and as kernel stacks."""
    torch.manual_seed(0)
    experts = nn.ModuleList(MLP(HIDDEN, INTER) for _ in range(EXPERTS))
    shared = MLP(HIDDEN, SHARED_SLOTS * INTER)
    with torch.no_grad():
        for p in [*experts.parameters(), *shared.parameters()]:
            p.normal_(0.0, p.shape[1] ** -0.5)
    experts, shared = experts.to(DEV, BF16), shared.to(DEV, BF16)
    w13, w2 = stacked_expert_weights(experts)
    with torch.no_grad():
        all13, all2 = K.stack_always_on(
            w13, w2, shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight, SHARED_SLOTS
        )
    gate = _randn(EXPERTS, HIDDEN, std=HIDDEN**-0.5, dtype=torch.float32, seed=12)
    return dict(experts=experts, shared=shared, w13=w13, w2=w2, all13=all13, all2=all2, gate=gate)


@pytest.mark.parametrize("tokens", [1, 4, 8])
def test_moe_experts(moe: dict[str, Any], tokens: int) -> None:
    x, res = _randn(tokens, HIDDEN, seed=20 + tokens), _randn(tokens, HIDDEN, seed=30)
    idx, weights = route_tokens(F.linear(x.float(), moe["gate"]), TOP_K)
    out = K.moe_experts(x, idx, weights, moe["all13"], moe["all2"], n_always=SHARED_SLOTS, residual=res)
    with torch.no_grad():
        routed, _ = apply_experts_eager(x, idx, weights, moe["experts"])
        expected = res + (routed + moe["shared"](x))
        grouped = grouped_experts_stacked(x, idx, weights, moe["w13"], moe["w2"], use_grouped_mm(x))
        torch_path = res + (grouped + moe["shared"](x))
    _assert_bf16_close(out, expected)
    _assert_bf16_close(out, torch_path)
    ref = K.moe_experts_ref(x, idx, weights, moe["all13"], moe["all2"], SHARED_SLOTS, res)
    _assert_bf16_close(out, ref)
    routed_only = K.moe_experts(x, idx, weights, moe["w13"], moe["w2"])
    _assert_bf16_close(routed_only, routed)


@pytest.mark.parametrize("tokens", [1, 4])
def test_moe_experts_split_down(moe: dict[str, Any], tokens: int) -> None:
    """The split down form (``down="split"``: a program per token, slot and 16-row block, the slot finishing last
    combines) at the real sizes, against the reference as the rows form is held to it; then captured in a CUDA
    graph with kept counters and replayed twice: identical outputs (the counters re-armed), all zero afterwards."""
    x, res = _randn(tokens, HIDDEN, seed=70 + tokens), _randn(tokens, HIDDEN, seed=32)
    idx, weights = route_tokens(F.linear(x.float(), moe["gate"]), TOP_K)
    args = (x, idx, weights, moe["all13"], moe["all2"], SHARED_SLOTS, res)
    out = K.moe_experts(*args, down="split")
    ref = K.moe_experts_ref(*args)
    _assert_bf16_close(out, ref)
    assert (out != ref).float().mean() < 0.05  # same rounding points: only the GEMMs' summation order differs
    rows_form = K.moe_experts(*args, down="rows")
    assert (out != rows_form).float().mean() < 0.05  # the same combine; y summed in another order
    counters = K.down_counters(tokens, HIDDEN, DEV)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compiled outside the capture
        K.moe_experts(*args, down="split", counters=counters)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = K.moe_experts(*args, down="split", counters=counters)
    replays = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        replays.append(static.clone())
    assert torch.equal(replays[0], replays[1])
    assert torch.equal(replays[0], out)  # the same programs and sums as the eager call
    assert int(counters.abs().sum()) == 0


@pytest.mark.parametrize("tokens", [9, 16, 32, 64])
def test_moe_experts_grouped(moe: dict[str, Any], tokens: int) -> None:
    """The grouped-GEMM kernels at the batched-decode row counts against the eager loop, the torch path
    (torch._grouped_mm + shared MLP) and the reference; some experts get no rows, some several blocks' worth."""
    x, res = _randn(tokens, HIDDEN, seed=50 + tokens), _randn(tokens, HIDDEN, seed=31)
    logits = F.linear(x.float(), moe["gate"])
    logits[:, 3] = -30.0  # expert 3 never picked (zero rows)
    logits[::2, 5] = 30.0  # expert 5 picked by every other token: 32 rows at 64 tokens (two 16-row blocks)
    idx, weights = route_tokens(logits, TOP_K)
    out = K.moe_experts_grouped(x, idx, weights, moe["all13"], moe["all2"], n_always=SHARED_SLOTS, residual=res)
    with torch.no_grad():
        routed, counts = apply_experts_eager(x, idx, weights, moe["experts"])
        expected = res + (routed + moe["shared"](x))
        grouped = grouped_experts_stacked(x, idx, weights, moe["w13"], moe["w2"], use_grouped_mm(x))
        torch_path = res + (grouped + moe["shared"](x))
    assert counts[3] == 0 and counts[5] >= (tokens + 1) // 2  # odd tokens may pick it too
    _assert_bf16_close(out, expected)
    _assert_bf16_close(out, torch_path)
    ref = K.moe_experts_ref(x, idx, weights, moe["all13"], moe["all2"], SHARED_SLOTS, res)
    _assert_bf16_close(out, ref)
    assert (out != ref).float().mean() < 0.05  # same rounding points: only the GEMMs' summation order differs
    routed_only = K.moe_experts_grouped(x, idx, weights, moe["w13"], moe["w2"])
    _assert_bf16_close(routed_only, routed)


def test_moe_experts_grouped_in_a_cuda_graph_follows_new_routing(moe: dict[str, Any]) -> None:
    """Router + grouped experts captured once at 32 rows; new inputs written on the device re-route the tokens
    (other experts, other row counts per expert) and the replay equals eager calls on them."""
    tokens = 32
    x = _randn(tokens, HIDDEN, seed=60)
    counts = torch.zeros(EXPERTS, device=DEV, dtype=torch.int64)

    def step() -> tuple[torch.Tensor, ...]:
        idx, weights = K.moe_route(x, moe["gate"], TOP_K, counts, logits=F.linear(x.float(), moe["gate"]))
        return idx, K.moe_experts_grouped(x, idx, weights, moe["all13"], moe["all2"], n_always=SHARED_SLOTS)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    seen = []
    for seed in (61, 62):
        x.copy_(_randn(tokens, HIDDEN, std=3.0, seed=seed))
        graph.replay()
        eager = step()
        assert torch.equal(static[0], eager[0])
        assert torch.equal(static[1], eager[1])
        seen.append(static[0].clone())
    assert not torch.equal(seen[0], seen[1])  # the routing did change between the replays


# ------------------------------------------------------------------------------------------ CUDA graph
def test_all_ops_in_one_cuda_graph_follow_the_device_position(moe: dict[str, Any]) -> None:
    """Capture the five ops once, change ``pos`` on the device, replay: results as eager calls at the new pos."""
    batch = 2
    cos, sin = RotaryEmbedding(HEAD_DIM, 10000.0, MAX_LEN)(0, MAX_LEN, DEV, BF16)
    delta, hidden = _randn(batch, HIDDEN, seed=40), _randn(batch, HIDDEN, seed=41)
    norm_w = (1 + 0.1 * _randn(HIDDEN, seed=42, dtype=torch.float32)).to(BF16)
    qkv = _randn(batch, 3 * HEADS * HEAD_DIM, seed=43)  # a static input: only Triton kernels in the graph
    k_cache, v_cache = (
        _randn(batch, HEADS, MAX_LEN, HEAD_DIM, seed=44),
        _randn(batch, HEADS, MAX_LEN, HEAD_DIM, seed=45),
    )
    pos = torch.tensor([10], device=DEV)
    counts = torch.zeros(EXPERTS, device=DEV, dtype=torch.int64)

    def step() -> tuple[torch.Tensor, ...]:
        x, summed = K.add_rms_norm(delta, hidden, norm_w, 1e-6)
        q = K.rope_kv_write(qkv + x[:, :1], cos, sin, pos, k_cache, v_cache, HEADS, HEADS, HEAD_DIM)
        attn = K.decode_attention(q, k_cache, v_cache, pos, HEAD_DIM**-0.5)
        x2, summed2 = K.add_rms_norm(attn, summed, norm_w, 1e-6)
        idx, weights = K.moe_route(x2, moe["gate"], TOP_K, counts)
        out = K.moe_experts(x2, idx, weights, moe["all13"], moe["all2"], SHARED_SLOTS, summed2)
        return q, attn, idx, weights, out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile + warm up outside the capture
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for new_pos in (700, MAX_LEN - 1):
        pos.fill_(new_pos)
        counts.zero_()
        graph.replay()
        k_before = k_cache.clone()
        counts_graph = counts.clone()
        counts.zero_()
        eager = step()  # the same ops, launched directly, at the same device position
        for got, want in zip(static, eager, strict=True):
            assert torch.equal(got, want)
        assert torch.equal(k_cache, k_before)  # the replay wrote row new_pos exactly as the eager call did
        assert torch.equal(counts_graph, counts)
        assert int(counts.sum()) == batch * TOP_K
        ref = K.decode_attention_ref(static[0], k_cache, v_cache, pos, HEAD_DIM**-0.5)
        _assert_bf16_close(static[1], ref)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("n_out", [3840, 1280])  # the fused QKV and o_proj of DeepSeek-OCR's decoder
def test_linear_rows_compiled_within_one_bf16_rounding(rows: int, n_out: int) -> None:
    """Compiled ``linear_rows`` at the real sizes against the float64 product: within one bf16 rounding of the
    value (float32 accumulator, one rounding); the same through a CUDA graph replay."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(rows, 1280, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(n_out, 1280, device="cuda", generator=gen) / 1280**0.5).to(torch.bfloat16)
    exact = x.double() @ w.double().T
    ulp = exact.abs().clamp_min(1e-3) * 2.0**-7
    out = K.linear_rows(x, w)
    assert bool(((out.double() - exact).abs() <= ulp).all())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = K.linear_rows(x, w)
    x.copy_(-x)  # new input in place: the replay must read it
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, K.linear_rows(x, w))
    assert bool(((static.double() + exact).abs() <= ulp).all())


def test_one_launch_attention_under_replays_equals_two_launches() -> None:
    """The one-launch decode attention compiled at the real sizes (10 heads, 1,000 keys, ~19 splits per head
    racing for each counter), replayed 200 times from one graph with the position moving on the device: every
    replay equals the two-launch form bit for bit, and the counters are zero afterwards."""
    gen = torch.Generator(device="cuda").manual_seed(9)
    q = torch.randn(1, 10, 128, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(1, 10, 1200, 128, device="cuda", generator=gen).to(torch.bfloat16)
    v = torch.randn(1, 10, 1200, 128, device="cuda", generator=gen).to(torch.bfloat16)
    pos = torch.tensor([999], device="cuda")
    counters = K.attention_counters(10, "cuda")
    K.decode_attention(q, k, v, pos, 128**-0.5, counters=counters)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.decode_attention(q, k, v, pos, 128**-0.5, counters=counters)
        pos.add_(-1)
    for i in range(200):
        graph.replay()
        torch.cuda.synchronize()
        want = K.decode_attention(q, k, v, torch.tensor([999 - i], device="cuda"), 128**-0.5)
        assert torch.equal(out, want), i
    assert int(counters.abs().sum()) == 0


def test_attention_kv_prefetch_after_the_cache_write_changes_no_value() -> None:
    """The decode attention asking L2 for its K / V rows before its dependent-launch wait (``prefetch=True``), right
    after the kernel that writes row ``pos`` (the rotary + KV write, also a dependent launch), in one graph replayed
    with the position and the fed row moving on the device: every replay's output and cache equal the same two
    kernels launched plainly without the prefetch, bit for bit, and the counters end at zero."""
    cos, sin = RotaryEmbedding(HEAD_DIM, 10000.0, MAX_LEN)(0, MAX_LEN, DEV, BF16)
    qkv = _randn(1, 3 * HEADS * HEAD_DIM, seed=91)
    k, v = _randn(1, HEADS, MAX_LEN, HEAD_DIM, seed=92), _randn(1, HEADS, MAX_LEN, HEAD_DIM, seed=93)
    k_ref, v_ref = k.clone(), v.clone()
    pos = torch.tensor([900], device=DEV)
    counters = K.attention_counters(HEADS, DEV)

    def layer(kc: torch.Tensor, vc: torch.Tensor, at: torch.Tensor, prefetch: bool) -> torch.Tensor:
        q = K.rope_kv_write(qkv, cos, sin, at, kc, vc, HEADS, HEADS, HEAD_DIM)
        return K.decode_attention(q, kc, vc, at, HEAD_DIM**-0.5, counters=counters, prefetch=prefetch)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), K.dependent_launches():  # compiled outside the capture
        layer(k.clone(), v.clone(), pos, True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), K.dependent_launches():
        out = layer(k, v, pos, True)
        pos.add_(1)
        qkv.mul_(-1)  # the next replay feeds another row
    for i in range(40):
        at = torch.tensor([900 + i], device=DEV)
        graph.replay()
        torch.cuda.synchronize()
        qkv.mul_(-1)  # back to the row the replay fed (the graph flipped it after using it)...
        want = layer(k_ref, v_ref, at, False)
        qkv.mul_(-1)  # ...and on to the next replay's
        assert torch.equal(out, want), i
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref), i
    assert int(counters.abs().sum()) == 0


def test_dense_mlp_on_the_expert_kernels_at_the_real_width() -> None:
    """The first layer's dense MLP (6,848 wide) as one always-on slot of the expert kernels (``TritonDenseMLP``) at
    one token: within bf16 rounding of the cuBLAS MLP; as dependent launches in a CUDA graph, the same bits as the
    plain launch."""
    from llm_perf_opt.models.deepseek_ocr.fast_layers import FusedMLP
    from llm_perf_opt.models.deepseek_ocr.triton_layers import TritonDenseMLP

    torch.manual_seed(17)
    mlp = MLP(HIDDEN, 6848)
    for p in mlp.parameters():
        p.data.normal_(0.0, p.shape[1] ** -0.5)
    fused = FusedMLP(mlp.to(DEV, BF16))
    dense = TritonDenseMLP(fused)
    x = _randn(1, HIDDEN, seed=18)
    with torch.no_grad():
        want = fused(x)
        out = dense(x)
        _assert_bf16_close(out, want)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), K.dependent_launches():  # compiled outside the capture
            dense(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), K.dependent_launches():
            static = dense(x)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(static, out)


@pytest.mark.parametrize(("rows", "n", "window"), [(1, 20, None), (64, 20, None), (64, 30, 90), (8, 1, None)])
def test_ngram_ban_is_the_torch_mask_at_the_real_vocabulary(rows: int, n: int, window: int | None) -> None:
    """``ngram_ban`` compiled (one program per row: the mask cleared, a barrier, the bans set) == the torch device
    mask bit for bit at V = 129,280 over 4,096-long histories with per-row lengths, repeats planted, and again
    under a CUDA graph replayed after the lengths and histories changed on the device.  Row 0 holds a planted
    repeat: its last ids 3,050 .. 3,099 copy 3,000 .. 3,049, so the window starting at 3,050 - (n - 1) (inside the
    last 90 positions) matches and bans id 3,050's."""
    from llm_perf_opt.models.deepseek_ocr.generation import NoRepeatNGram, banned_ngram_mask

    gen = torch.Generator(device="cpu").manual_seed(5 + rows + n)
    vocab, width = 129280, 4096
    hist = (torch.randint(0, 40, (rows, width), generator=gen) * 3001).cuda()  # a small alphabet: repeats by chance
    hist[:, 3050:3100] = hist[:, 3000:3050].clone()  # and a long planted one, inside vLLM's 90-position window
    lengths = torch.randint(n, width, (rows,), generator=gen).cuda()
    lengths[0] = 3100
    rule = NoRepeatNGram(n=n, window=window)
    got = K.ngram_ban(hist, lengths, n, vocab, window=window)
    assert torch.equal(got, banned_ngram_mask(hist, lengths, rule, vocab))
    assert got[0].any()
    graph = torch.cuda.CUDAGraph()
    static = K.ngram_ban(hist, lengths, n, vocab, window=window)  # warm-up: compiled before the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static = K.ngram_ban(hist, lengths, n, vocab, window=window)
    hist.copy_(torch.roll(hist, 7, dims=1))
    lengths.sub_(3).clamp_(min=1)
    graph.replay()
    assert torch.equal(static, banned_ngram_mask(hist, lengths, rule, vocab))
    assert static[0].any()  # row 0 (3,097 ids now) still repeats the planted n-gram, shifted by 7


def test_ngram_ban_compiles_once_per_length_layout_whatever_the_history() -> None:
    """A continuous run's histories change width with every cache and its refills change row counts: after one call
    per length layout (one length for every row, one per row; what each batched step's construction runs), calls
    with other widths (odd, divisible by 16, 1), row strides, row counts and lengths compile nothing more, so no
    compile lands inside a timed fill (round 31: a GPU test's prefill time held one).  Oracle: the kernel's own
    cache of compiled variants (Triton's ``device_caches``), counted before and after, and the torch mask."""
    from llm_perf_opt.models.deepseek_ocr.generation import banned_ngram_mask

    caches = getattr(K._ngram_ban_kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton keeps its compiled variants elsewhere (no JITFunction.device_caches)")

    def compiled() -> int:
        return sum(len(entry[0]) for entry in caches.values())

    vocab, n = 129280, 20
    gen = torch.Generator(device="cpu").manual_seed(3)

    def hist(rows: int, width: int) -> torch.Tensor:
        return (torch.randint(0, 5, (rows, width), generator=gen) * 7).cuda()

    base = hist(8, 513)
    K.ngram_ban(base, torch.full((1,), 300, dtype=torch.long, device="cuda"), n, vocab)
    K.ngram_ban(base, torch.full((8,), 300, dtype=torch.long, device="cuda"), n, vocab)
    before = compiled()
    wide = hist(8, 2000)[:, :1025]  # a row stride of 2,000 with 1,025 columns
    for h in (hist(8, 1024), hist(3, 257), hist(1, 4096), wide, hist(64, 1), hist(1, 20)):
        for lengths in (torch.tensor([h.shape[1]]), torch.randint(1, h.shape[1] + 1, (h.shape[0],), generator=gen)):
            lengths = lengths.cuda()
            got = K.ngram_ban(h, lengths, n, vocab)
            assert torch.equal(got, banned_ngram_mask(h, lengths, n, vocab))
    assert compiled() == before
