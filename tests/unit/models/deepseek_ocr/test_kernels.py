"""Triton decode kernels == their torch references, run on CPU through Triton's interpreter.

Triton picks the interpreter when ``@triton.jit`` is applied, i.e. when ``kernels.py`` is imported, not
when ``triton`` is.  ``TRITON_INTERPRET=1`` is set (``setdefault``) before anything here imports Triton,
and the tests use a private copy of ``kernels.py`` executed under it: if another test module imported
``kernels.py`` before (compiled-mode kernels, unusable on CPU tensors) nothing is skipped, and the shared
module is never turned into an interpreted one.  The variable is then restored and set again only while
this module's tests run (``triton_available("cpu")`` reads it), so no other test nor a CLI subprocess of
the integration tests sees it.

bf16 results are compared bit for bit where the kernel does the same float32 arithmetic as torch
(rotary, cache writes, residual adds) and to bf16 rounding elsewhere (reductions in another order).
Sizes are reduced (H=256, I=128, E=8, D=32) plus a few cases at the real H/I/D; the interpreter runs
programs one at a time, so the whole module stays within ~30 s on 2 cores.  ``test_compiles_for_sm90``
compiles every kernel for an H100 (sm_90) without a GPU, with the alignment specialisation the runtime
applies (``benchmarks/bench_kernels.py --sm90-check``), and checks for 16-byte loads and no register spills.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton and the kernels are first imported here
try:
    triton = pytest.importorskip("triton")
finally:  # leave the environment as found: CLI subprocesses of other tests inherit it
    if _PREVIOUS_INTERPRET is None:
        del os.environ["TRITON_INTERPRET"]
if isinstance(triton.language.standard.sum, triton.runtime.jit.JITFunction):
    pytest.skip(
        "Triton was imported without TRITON_INTERPRET=1 (before this module, or the variable is set to something"
        " else), so its library is compiled-mode and the CPU interpreter cannot run it; run"
        " `TRITON_INTERPRET=1 pytest tests/unit/models/deepseek_ocr/test_kernels.py`",
        allow_module_level=True,
    )

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from llm_perf_opt.models.deepseek_ocr.decoder import (  # noqa: E402
    MLP,
    apply_experts_eager,
    route_tokens,
    stacked_expert_weights,
)
from tests.conftest import ROOT, rel_err  # noqa: E402

KERNELS = "llm_perf_opt.models.deepseek_ocr.kernels"


def _private_kernels(interpret: bool) -> ModuleType:
    """A private copy of kernels.py whose ``@triton.jit`` ran with ``TRITON_INTERPRET`` = ``interpret``.

    Never the shared ``sys.modules`` entry: another test module may have imported it compiled-mode already
    (then its kernels cannot take CPU tensors), and an interpreted shared module would break GPU tests
    collected into the same session.
    """
    spec = importlib.util.find_spec(KERNELS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return module


K: Any = _private_kernels(interpret=True)
if not K.INTERPRETED:
    pytest.skip("Triton did not build the kernels for its interpreter", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32: to float32 rounding; bf16: to bf16 rounding (rel err <= 1e-2 of the largest value)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        assert rel_err(actual, expected) <= 1e-2, rel_err(actual, expected)
        torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------ availability
def test_availability_and_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    assert K.HAVE_TRITON and K.INTERPRETED
    assert K.triton_available("cpu")
    assert not K.triton_available("meta")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not K.triton_available("cpu")
    x = torch.randn(2, 64)
    with pytest.raises(K.KernelUnavailableError, match="TRITON_INTERPRET=1"):
        K.add_rms_norm(x, None, torch.ones(64), 1e-6)


# ------------------------------------------------------------------------------------------ add_rms_norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [256, 1280])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_matches_rmsnorm(dtype: torch.dtype, hidden: int, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(3, hidden, generator=gen).to(dtype)
    residual = (torch.randn(3, hidden, generator=gen) * 4).to(dtype) if with_residual else None
    weight = (1 + 0.3 * torch.randn(hidden, generator=gen)).to(dtype)
    normed, summed = K.add_rms_norm(x, residual, weight, 1e-6)
    ref_normed, ref_summed = K.add_rms_norm_ref(x, residual, weight, 1e-6)
    assert torch.equal(summed, ref_summed)  # same float32 add, same rounding
    if residual is None:
        assert summed is x
    _close(normed, ref_normed)
    if dtype == torch.bfloat16:  # the float32 rsqrt may differ in the last bit: at most a few 1-ulp flips
        assert (normed != ref_normed).float().mean() < 0.02


@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_f32_copy_is_the_normed_values(with_residual: bool) -> None:
    """The float32 copy is ``normed.float()`` bit for bit, and normed / summed are add_rms_norm's own."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1280, generator=gen).bfloat16()
    residual = (torch.randn(3, 1280, generator=gen) * 4).bfloat16() if with_residual else None
    weight = (1 + 0.3 * torch.randn(1280, generator=gen)).bfloat16()
    normed, summed, f32 = K.add_rms_norm_f32(x, residual, weight, 1e-6)
    plain_normed, plain_summed = K.add_rms_norm(x, residual, weight, 1e-6)
    assert f32.dtype == torch.float32 and torch.equal(f32, normed.float())
    assert torch.equal(normed, plain_normed) and torch.equal(summed, plain_summed)


def test_add_rms_norm_promotes_like_torch() -> None:
    x, weight = torch.randn(2, 256).bfloat16(), torch.randn(256)
    normed, _ = K.add_rms_norm(x, None, weight, 1e-6)
    ref, _ = K.add_rms_norm_ref(x, None, weight, 1e-6)
    assert normed.dtype == torch.float32
    torch.testing.assert_close(normed, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ rope_kv_write
def _rotary_tables(n: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from llm_perf_opt.models.deepseek_ocr.decoder import RotaryEmbedding

    return RotaryEmbedding(dim, 10000.0, n)(0, n, torch.device("cpu"), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "hq", "hk", "dim", "max_len", "pos"),
    [(2, 4, 2, 32, 64, 0), (2, 4, 4, 32, 64, 63), (1, 10, 10, 128, 96, 37)],
)
def test_rope_kv_write_matches_torch_path(
    dtype: torch.dtype, batch: int, hq: int, hk: int, dim: int, max_len: int, pos: int
) -> None:
    gen = torch.Generator().manual_seed(pos)
    cos, sin = _rotary_tables(max_len + 8, dim, dtype)
    qkv = torch.randn(batch, (hq + 2 * hk) * dim, generator=gen).to(dtype)
    k_cache = torch.randn(batch, hk, max_len, dim, generator=gen).to(dtype)
    v_cache = torch.randn(batch, hk, max_len, dim, generator=gen).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_before, v_before = k_cache.clone(), v_cache.clone()
    position = torch.tensor([pos])
    q = K.rope_kv_write(qkv, cos, sin, position, k_cache, v_cache, hq, hk, dim)
    q_ref = K.rope_kv_write_ref(qkv, cos, sin, position, k_ref, v_ref, hq, hk, dim)
    assert q.shape == (batch, hq, dim) and q.dtype == dtype
    assert torch.equal(q, q_ref)  # same products and sum, same rounding points: bit-identical
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    others = torch.arange(max_len) != pos
    assert torch.equal(k_cache[:, :, others], k_before[:, :, others])  # only row `pos` is written
    assert torch.equal(v_cache[:, :, others], v_before[:, :, others])
    v_new = qkv.view(batch, hq + 2 * hk, dim)[:, hq + hk :]
    assert torch.equal(v_cache[:, :, pos], v_new)
    assert not torch.equal(k_cache[:, :, pos], k_before[:, :, pos])


def test_rope_matches_apply_rotary() -> None:
    from llm_perf_opt.models.deepseek_ocr.decoder import apply_rotary

    cos, sin = _rotary_tables(32, 32, torch.float32)
    qkv = torch.randn(2, 3 * 2 * 32)
    k_cache, v_cache = torch.zeros(2, 2, 32, 32), torch.zeros(2, 2, 32, 32)
    q = K.rope_kv_write(qkv, cos, sin, torch.tensor([9]), k_cache, v_cache, 2, 2, 32)
    heads = qkv.view(2, 6, 1, 32)
    torch.testing.assert_close(q, apply_rotary(heads[:, :2], cos[9:10], sin[9:10])[:, :, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_cache[:, :, 9], apply_rotary(heads[:, 2:4], cos[9:10], sin[9:10])[:, :, 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "length", "start", "hq", "hk", "shared_tables"),
    [(1, 9, 0, 3, 3, True), (2, 5, 4, 4, 2, True), (2, 6, 3, 2, 2, False)],  # MHA, GQA, per-row cos/sin
)
def test_prompt_rope_kv_write_matches_the_torch_path(
    dtype: torch.dtype, batch: int, length: int, start: int, hq: int, hk: int, shared_tables: bool
) -> None:
    """A prompt's rotation of q and k and its cache write in one kernel == the torch path (the rotation of
    ``FusedAttention.project`` and the slice write of ``StaticKVCache.write``) bit for bit, and q/k equal
    ``apply_rotary`` per position (independent oracle); cache columns outside ``start..start+L-1`` untouched."""
    from llm_perf_opt.models.deepseek_ocr.decoder import apply_rotary

    dim, max_len = 32, 16
    gen = torch.Generator().manual_seed(start * 10 + length)
    cos_t, sin_t = _rotary_tables(max_len, dim, dtype)
    cos, sin = cos_t[start : start + length][None], sin_t[start : start + length][None]
    if not shared_tables:  # each batch row its own table rows (padded batched prefill): row b shifted by b
        cos = torch.stack([cos_t[start + b : start + b + length] for b in range(batch)])
        sin = torch.stack([sin_t[start + b : start + b + length] for b in range(batch)])
    qkv = torch.randn(batch, length, (hq + 2 * hk) * dim, generator=gen).to(dtype)
    k_cache = torch.randn(batch, hk, max_len, dim, generator=gen).to(dtype)
    v_cache = torch.randn(batch, hk, max_len, dim, generator=gen).to(dtype)
    k_ref, v_ref, k_before = k_cache.clone(), v_cache.clone(), k_cache.clone()
    q = K.prompt_rope_kv_write(qkv, cos, sin, k_cache, v_cache, start, hq, hk, dim)
    q_ref = K.prompt_rope_kv_write_ref(qkv, cos, sin, k_ref, v_ref, start, hq, hk, dim)
    assert q.shape == (batch, length, hq, dim) and q.dtype == dtype
    assert torch.equal(q, q_ref) and torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    heads = qkv.view(batch, length, hq + 2 * hk, dim).transpose(1, 2)  # [B, heads, L, D]
    b_cos, b_sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B|1, 1, L, D]
    _close(q.transpose(1, 2), apply_rotary(heads[:, :hq], b_cos, b_sin))
    _close(k_cache[:, :, start : start + length], apply_rotary(heads[:, hq : hq + hk], b_cos, b_sin))
    assert torch.equal(v_cache[:, :, start : start + length], heads[:, hq + hk :])
    outside = torch.ones(max_len, dtype=torch.bool)
    outside[start : start + length] = False
    assert torch.equal(k_cache[:, :, outside], k_before[:, :, outside])


def test_prompt_rope_kv_write_refuses_what_does_not_fit() -> None:
    cos, sin = _rotary_tables(8, 32, torch.float32)
    qkv = torch.randn(1, 4, 6 * 32)
    cache = torch.zeros(1, 2, 8, 32)
    with pytest.raises(ValueError, match=r"positions 6\.\.9 do not fit the cache's 8 columns"):
        K.prompt_rope_kv_write(qkv, cos[None, :4], sin[None, :4], cache, cache.clone(), 6, 2, 2, 32)
    with pytest.raises(ValueError, match="qkv rows must be"):
        K.prompt_rope_kv_write(qkv[..., :-1], cos[None, :4], sin[None, :4], cache, cache.clone(), 0, 2, 2, 32)
    with pytest.raises(ValueError, match="cos/sin must be"):
        K.prompt_rope_kv_write(qkv, cos[None, :3], sin[None, :3], cache, cache.clone(), 0, 2, 2, 32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_swiglu_of_the_gate_and_up_halves(dtype: torch.dtype) -> None:
    """``silu(gate) * up`` over [rows, 2·I]: against the float64 formula (independent oracle) and torch's SiLU-then-
    product it replaces (its rounding points; exp may differ in the last bit)."""
    h = (torch.randn(7, 2 * 48, generator=torch.Generator().manual_seed(9)) * 3).to(dtype)
    out = K.silu_mul(h)
    g, u = h[:, :48].double(), h[:, 48:].double()
    assert out.shape == (7, 48) and out.dtype == dtype
    assert rel_err(out, g * torch.sigmoid(g) * u) < (1e-6 if dtype == torch.float32 else 8e-3)
    ref = K.silu_mul_ref(h)
    assert rel_err(out, ref) < 1e-6 if dtype == torch.float32 else (out != ref).float().mean() < 0.02
    with pytest.raises(ValueError, match="gate and up halves"):
        K.silu_mul(h[:, :-1].contiguous())


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_gather_combine_matches_the_torch_tail(dtype: torch.dtype) -> None:
    """Each token's k expert rows (found through ``inverse`` in the expert-sorted output), weighted, summed, plus the
    shared row: against a float64 loop over tokens and picks (independent oracle) and the torch tail it replaces."""
    gen = torch.Generator().manual_seed(6)
    n_tokens, top_k, hidden = 5, 3, 80  # hidden not a power of two: a masked column block
    y = torch.randn(n_tokens * top_k, hidden, generator=gen).to(dtype)
    inverse = torch.randperm(n_tokens * top_k, generator=gen)
    weights = torch.rand(n_tokens, top_k, generator=gen)
    shared = torch.randn(n_tokens, hidden, generator=gen).to(dtype)
    out = K.moe_gather_combine(y, inverse, weights, shared)
    oracle = torch.zeros(n_tokens, hidden, dtype=torch.float64)
    for t in range(n_tokens):
        for j in range(top_k):
            oracle[t] += float(weights[t, j]) * y[int(inverse[t * top_k + j])].double()
    oracle += shared.double()
    assert out.shape == shared.shape and out.dtype == dtype
    assert rel_err(out, oracle) < (1e-6 if dtype == torch.float32 else 8e-3)
    ref = K.moe_gather_combine_ref(y, inverse, weights, shared)
    assert rel_err(out, ref) < 1e-6 if dtype == torch.float32 else (out != ref).float().mean() < 0.02
    with pytest.raises(ValueError, match="inverse"):
        K.moe_gather_combine(y, inverse[:-1], weights, shared)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_kv_write_row_tables_rotate_each_row_at_its_own_position(dtype: torch.dtype) -> None:
    """The batched step: every row writes cache column ``pos`` but is rotated at its own position (rows 3, 17, 40
    of the tables); independent oracle: ``apply_rotary`` per row."""
    from llm_perf_opt.models.deepseek_ocr.decoder import apply_rotary

    cos, sin = _rotary_tables(64, 32, dtype)
    positions = torch.tensor([3, 17, 40])
    qkv = torch.randn(3, 3 * 2 * 32, generator=torch.Generator().manual_seed(4)).to(dtype)
    k_cache, v_cache = torch.zeros(3, 2, 48, 32, dtype=dtype), torch.zeros(3, 2, 48, 32, dtype=dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slot = torch.tensor([45])
    rows = (cos[positions], sin[positions])
    q = K.rope_kv_write(qkv, *rows, slot, k_cache, v_cache, 2, 2, 32, row_tables=True)
    q_ref = K.rope_kv_write_ref(qkv, *rows, slot, k_ref, v_ref, 2, 2, 32, row_tables=True)
    assert torch.equal(q, q_ref) and torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    heads = qkv.view(3, 6, 32)
    for b, p in enumerate(positions.tolist()):
        want_q = apply_rotary(heads[b, :2, None], cos[p : p + 1], sin[p : p + 1])[:, 0]
        want_k = apply_rotary(heads[b, 2:4, None], cos[p : p + 1], sin[p : p + 1])[:, 0]
        _close(q[b], want_q)
        _close(k_cache[b, :, 45], want_k)
    assert torch.equal(v_cache[:, :, 45], heads[:, 4:])
    assert not k_cache[:, :, :45].any()  # only column `slot` is written
    with pytest.raises(ValueError, match="row_tables"):
        K.rope_kv_write(qkv, cos, sin, slot, k_cache, v_cache, 2, 2, 32, row_tables=True)


def test_rope_kv_write_per_row_columns() -> None:
    """The continuous-batching step: row b is rotated at its own position and writes its K/V at its own column
    (``pos`` [B]); oracle: ``apply_rotary`` per row and the untouched columns."""
    from llm_perf_opt.models.deepseek_ocr.decoder import apply_rotary

    cos, sin = _rotary_tables(64, 32, torch.float32)
    positions = torch.tensor([3, 17, 40])
    qkv = torch.randn(3, 3 * 2 * 32, generator=torch.Generator().manual_seed(5))
    k_cache, v_cache = torch.zeros(3, 2, 48, 32), torch.zeros(3, 2, 48, 32)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    rows = (cos[positions], sin[positions])
    q = K.rope_kv_write(qkv, *rows, positions, k_cache, v_cache, 2, 2, 32, row_tables=True)
    K.rope_kv_write_ref(qkv, *rows, positions, k_ref, v_ref, 2, 2, 32, row_tables=True)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    heads = qkv.view(3, 6, 32)
    written = torch.zeros(3, 48, dtype=torch.bool)
    for b, p in enumerate(positions.tolist()):
        _close(q[b], apply_rotary(heads[b, :2, None], cos[p : p + 1], sin[p : p + 1])[:, 0])
        _close(k_cache[b, :, p], apply_rotary(heads[b, 2:4, None], cos[p : p + 1], sin[p : p + 1])[:, 0])
        assert torch.equal(v_cache[b, :, p], heads[b, 4:])
        written[b, p] = True
    assert not k_cache.permute(0, 2, 1, 3)[~written].any() and not v_cache.permute(0, 2, 1, 3)[~written].any()
    with pytest.raises(ValueError, match=r"pos must be an int64 tensor of shape \[1\].*or \[3\]"):
        K.rope_kv_write(qkv, *rows, positions[:2], k_cache, v_cache, 2, 2, 32, row_tables=True)


# ------------------------------------------------------------------------------------------ decode_attention
def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, scale: float) -> torch.Tensor:
    """Plain float32 attention over the keys 0..pos (host-side slicing; test only)."""
    rep = q.shape[1] // k.shape[1]
    k = k[:, :, : pos + 1].float().repeat_interleave(rep, dim=1)
    v = v[:, :, : pos + 1].float().repeat_interleave(rep, dim=1)
    probs = (q.float().unsqueeze(2) @ k.transpose(-1, -2) * scale).softmax(dim=-1)
    return (probs @ v).squeeze(2).reshape(q.shape[0], -1)


@pytest.mark.parametrize(
    ("dtype", "hq", "hk", "pos"),
    [
        (torch.float32, 4, 4, 0),
        (torch.bfloat16, 4, 2, 0),  # GQA
        (torch.float32, 4, 2, 37),
        (torch.bfloat16, 4, 4, 37),
        (torch.bfloat16, 4, 2, 63),  # pos = max_len - 1
        (torch.float32, 4, 4, 63),
    ],
)
def test_decode_attention_over_keys_up_to_pos(dtype: torch.dtype, hq: int, hk: int, pos: int) -> None:
    gen = torch.Generator().manual_seed(pos + hk)
    batch, dim, max_len = 2, 32, 64
    q = torch.randn(batch, hq, dim, generator=gen).to(dtype)
    k_cache = (torch.randn(batch, hk, max_len, dim, generator=gen) * 2).to(dtype)
    v_cache = torch.randn(batch, hk, max_len, dim, generator=gen).to(dtype)
    k_cache[:, :, pos + 1 :] = float("nan")  # never read: a single load past pos would poison the output
    v_cache[:, :, pos + 1 :] = float("nan")
    position, scale = torch.tensor([pos]), dim**-0.5
    expected = _softmax_attention(q, k_cache, v_cache, pos, scale)
    ref = K.decode_attention_ref(q, k_cache.nan_to_num(), v_cache.nan_to_num(), position, scale)
    for block_n, splits in [(16, None), (16, 5)]:  # one split of several blocks; splits of one block, some empty
        out = K.decode_attention(q, k_cache, v_cache, position, scale, block_n=block_n, n_splits=splits)
        assert out.shape == (batch, hq * dim) and out.dtype == dtype
        assert torch.isfinite(out.float()).all()
        _close(out, ref)
        torch.testing.assert_close(out.float(), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_one_launch_form_equals_two_launches(dtype: torch.dtype) -> None:
    """``counters``: the split finishing last combines in the same launch; the output equals the two-launch form
    bit for bit (the same combine arithmetic), empty splits included, with a key mask and per-row positions too,
    and the counters are zero again afterwards (the next call, or a graph replay, reuses them)."""
    gen = torch.Generator().manual_seed(17)
    batch, hq, hk, dim, max_len = 3, 4, 2, 32, 96
    q = torch.randn(batch, hq, dim, generator=gen).to(dtype)
    k_cache = torch.randn(batch, hk, max_len, dim, generator=gen).to(dtype)
    v_cache = torch.randn(batch, hk, max_len, dim, generator=gen).to(dtype)
    counters = K.attention_counters(batch * hq + 5, "cpu")  # longer than needed is fine
    cases = [
        dict(pos=torch.tensor([70]), n_splits=3),
        dict(pos=torch.tensor([20]), n_splits=6),  # later splits get no keys
        dict(pos=torch.tensor([5, 60, 95]), n_splits=4),  # each row its own last key
    ]
    mask = torch.zeros(batch, max_len, dtype=dtype)
    mask[0, :3] = float("-inf")  # row 0's left pads
    for case in cases:
        for key_mask in (None, mask):
            args = (q, k_cache, v_cache, case["pos"], dim**-0.5)
            two = K.decode_attention(*args, block_n=16, n_splits=case["n_splits"], key_mask=key_mask)
            one = K.decode_attention(*args, block_n=16, n_splits=case["n_splits"], key_mask=key_mask, counters=counters)
            assert torch.equal(one, two)
            assert int(counters.abs().sum()) == 0
    with pytest.raises(ValueError, match="counters must be int32"):
        K.decode_attention(q, k_cache, v_cache, torch.tensor([3]), 1.0, counters=torch.zeros(batch * hq))
    with pytest.raises(ValueError, match="counters must be int32"):
        K.decode_attention(q, k_cache, v_cache, torch.tensor([3]), 1.0, counters=K.attention_counters(2, "cpu"))


def test_attention_combine_sums_the_splits_in_order() -> None:
    """The combine adds the splits one after the other, split 0 first, whatever the launch it is compiled into:
    16 splits, the first holding 2**24 in its sum and its accumulator, the other 15 each 1 and 0.  In float32,
    in order, every later 1 is lost (2**24 + 1 rounds back to 2**24): the output is exactly 1.0.  A tree or
    8-way reduction keeps some of them (2**24 + 2 is representable) and would give less."""
    splits, dim = 16, 4
    m = torch.zeros(1, splits)  # every split has the same max: all weights are exactly 1
    den = torch.ones(1, splits)
    den[0, 0] = 2.0**24
    acc = torch.zeros(1, splits, dim)
    acc[0, 0] = 2.0**24
    out = torch.full((1, dim), -1.0)
    K._attn_combine_kernel[(1,)](m, den, acc, out, D=dim, N_SPLITS=splits, BLOCK_S=splits, BLOCK_D=dim)
    assert out.tolist() == [[1.0] * dim]


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_key_mask_left_pads(dtype: torch.dtype) -> None:
    """Per-row additive mask (left pads of 0, 20 and 50 keys over a 64-column cache, the batched step's
    ``decode_key_mask``): whole key blocks and whole splits masked give no NaN; oracle: plain softmax over each
    row's visible keys.  A broadcast [1, n] mask (n < max_len) hides the same keys for every row."""
    gen = torch.Generator().manual_seed(8)
    batch, heads, dim, max_len, pos = 3, 2, 32, 64, 55
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    k_cache = torch.randn(batch, heads, max_len, dim, generator=gen).to(dtype)
    v_cache = torch.randn(batch, heads, max_len, dim, generator=gen).to(dtype)
    pads = torch.tensor([0, 20, 50])
    cols = torch.arange(max_len)
    visible = (cols[None, :] >= pads[:, None]) & (cols[None, :] <= pos)
    mask = torch.where(visible, 0.0, float("-inf")).to(dtype)
    scale = dim**-0.5
    want = torch.stack(
        [
            _softmax_attention(
                q[b : b + 1, :, :], k_cache[b : b + 1, :, p:], v_cache[b : b + 1, :, p:], pos - p, scale
            )[0]
            for b, p in enumerate(pads.tolist())
        ]
    )
    ref = K.decode_attention_ref(q, k_cache, v_cache, torch.tensor([pos]), scale, key_mask=mask)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the ref rounds its float32 result once to dtype
    torch.testing.assert_close(ref.float(), want, rtol=tol, atol=tol)
    for block_n, splits in [(16, None), (16, 4)]:  # split 0 of row 2 holds only masked keys
        out = K.decode_attention(
            q, k_cache, v_cache, torch.tensor([pos]), scale, block_n=block_n, n_splits=splits, key_mask=mask
        )
        assert torch.isfinite(out.float()).all()
        _close(out, ref)
    shared = mask[2:3, :60]  # one row's mask for all rows, narrower than the cache
    out = K.decode_attention(q, k_cache, v_cache, torch.tensor([pos]), scale, block_n=16, key_mask=shared)
    _close(out, K.decode_attention_ref(q, k_cache, v_cache, torch.tensor([pos]), scale, key_mask=shared))
    with pytest.raises(ValueError, match="key_mask"):
        K.decode_attention(q, k_cache, v_cache, torch.tensor([pos]), scale, key_mask=mask[:2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_reads_no_key_before_each_rows_first(dtype: torch.dtype) -> None:
    """``key_first``: the static batched step's pads and finished rows.  Every key before a row's first column is
    NaN, so one load of it would poison the row; the outputs are finite and equal, bit for bit, the kernel's
    without ``key_first`` on the same cache with those keys finite and masked (the skipped blocks change no sum),
    and are within rounding of a softmax over each row's keys ``first..pos`` by hand.  A row whose first is
    ``pos`` (a finished row) sees one key: its output is that key's value exactly.  Without a mask, ``key_first``
    alone narrows the keys the same way; one first for every row ([1]) too."""
    gen = torch.Generator().manual_seed(21)
    batch, heads, dim, max_len, pos = 4, 2, 32, 96, 80
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    k_finite = torch.randn(batch, heads, max_len, dim, generator=gen).to(dtype)
    v_finite = torch.randn(batch, heads, max_len, dim, generator=gen).to(dtype)
    first = torch.tensor([0, 20, 53, pos])  # no pads; inside a 16-key block; a whole block and more; finished
    cols = torch.arange(max_len)
    before = cols[None, :] < first[:, None]  # [B, max_len]
    k_nan = k_finite.masked_fill(before[:, None, :, None], float("nan"))
    v_nan = v_finite.masked_fill(before[:, None, :, None], float("nan"))
    mask = torch.where(before, float("-inf"), 0.0).to(dtype)
    scale, position = dim**-0.5, torch.tensor([pos])
    want = torch.cat(
        [
            _softmax_attention(q[b : b + 1], k_finite[b : b + 1, :, f:], v_finite[b : b + 1, :, f:], pos - f, scale)
            for b, f in enumerate(first.tolist())
        ]
    )
    for block_n, splits in [(16, None), (16, 4), (32, 2)]:
        args = dict(block_n=block_n, n_splits=splits)
        skipped = K.decode_attention(q, k_nan, v_nan, position, scale, key_mask=mask, key_first=first, **args)
        masked = K.decode_attention(q, k_finite, v_finite, position, scale, key_mask=mask, **args)
        assert torch.isfinite(skipped.float()).all()
        assert torch.equal(skipped, masked), (block_n, splits)
        _close(skipped, want.to(dtype))
        assert torch.equal(skipped[3], v_finite[3, :, pos].reshape(-1))  # one key: weight 1, its value as stored
        unmasked = K.decode_attention(q, k_nan, v_nan, position, scale, key_first=first, **args)
        assert torch.equal(unmasked, skipped)
    # one first column for every row: row 1's query and cache in each row, its first (20) shared
    rows = [t[1:2].expand(batch, *t.shape[1:]).contiguous() for t in (q, k_nan, v_nan)]
    shared = K.decode_attention(*rows, position, scale, block_n=16, key_first=first[1:2])
    row1 = K.decode_attention(*rows, position, scale, block_n=16, key_first=first[1:2].expand(batch).contiguous())
    assert torch.isfinite(shared.float()).all() and torch.equal(shared, row1)
    _close(shared, want[1:2].expand(batch, -1).to(dtype))


def test_decode_attention_refuses_a_bad_key_first() -> None:
    q, cache = torch.zeros(2, 2, 8), torch.zeros(2, 2, 16, 8)
    for bad in (torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1, 2, 3]), torch.tensor(1)):
        want = r"key_first must be an int64 tensor of shape \[1\] \(one first column for all rows\) or \[2\]"
        with pytest.raises(ValueError, match=want):
            K.decode_attention(q, cache, cache, torch.tensor([5]), 1.0, key_first=bad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_per_row_last_key(dtype: torch.dtype) -> None:
    """``pos`` [B]: row b attends over its own keys 0..pos[b] (the continuous-batching step) under a mask of
    key_len = 48 columns; keys past each row's pos (and past the mask) are NaN, so a single stray load would
    show.  Oracle: plain softmax per row."""
    gen = torch.Generator().manual_seed(9)
    batch, heads, dim, max_len, key_len = 3, 2, 32, 64, 48
    positions = torch.tensor([0, 20, 47])
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    k_cache = torch.randn(batch, heads, max_len, dim, generator=gen).to(dtype)
    v_cache = torch.randn(batch, heads, max_len, dim, generator=gen).to(dtype)
    clean_k, clean_v = k_cache.clone(), v_cache.clone()
    for b, p in enumerate(positions.tolist()):
        k_cache[b, :, p + 1 :] = float("nan")
        v_cache[b, :, p + 1 :] = float("nan")
    mask = torch.zeros(batch, key_len, dtype=dtype)
    scale = dim**-0.5
    want = torch.cat(
        [
            _softmax_attention(q[b : b + 1], clean_k[b : b + 1], clean_v[b : b + 1], p, scale)
            for b, p in enumerate(positions.tolist())
        ]
    )
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    ref = K.decode_attention_ref(q, clean_k, clean_v, positions, scale, key_mask=mask)
    torch.testing.assert_close(ref.float(), want, rtol=tol, atol=tol)
    # one split; four; three from keys_per_split (48 mask columns / 16: row 0's one key leaves two splits empty)
    for block_n, splits, per_split in [(16, None, K.KEYS_PER_SPLIT), (16, 4, K.KEYS_PER_SPLIT), (16, None, 16)]:
        out = K.decode_attention(
            q,
            k_cache,
            v_cache,
            positions,
            scale,
            block_n=block_n,
            n_splits=splits,
            keys_per_split=per_split,
            key_mask=mask,
        )
        assert torch.isfinite(out.float()).all()
        _close(out, ref)
    with pytest.raises(ValueError, match="pos must be"):
        K.decode_attention(q, k_cache, v_cache, positions[:2], scale)


def test_decode_attention_real_head_dim() -> None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 10, 128, generator=gen).bfloat16()
    k_cache = torch.randn(1, 10, 300, 128, generator=gen).bfloat16()
    v_cache = torch.randn(1, 10, 300, 128, generator=gen).bfloat16()
    pos = torch.tensor([250])
    out = K.decode_attention(q, k_cache, v_cache, pos, 128**-0.5)
    _close(out, K.decode_attention_ref(q, k_cache, v_cache, pos, 128**-0.5))


def test_attention_splits_fill_the_gpu() -> None:
    assert K.attention_splits(10, 4096, 64, 132) == 27  # B=1, 10 heads: ceil(2·132 / 10) for ~2 programs per SM
    assert K.attention_splits(10, 1200, 64, 132) == 19  # one split per 64-key block at most: ceil(1200 / 64)
    assert K.attention_splits(10, 100, 64, 132) == 2  # never more splits than key blocks
    # many rows: the SMs are full with one split each, but no program may stream more than 256 keys
    assert K.attention_splits(80, 1200, 64, 132) == 5  # max(ceil(264 / 80) = 4, ceil(1200 / 256) = 5)
    assert K.attention_splits(400, 4096, 64, 132) == 16  # 4096 / 256
    assert K.attention_splits(640, 5120, 64, 132) == 20  # 64 slots x 10 heads over a 5,120-column bucket
    assert K.attention_splits(640, 200, 64, 132) == 1
    assert K.attention_splits(400, 4096, 64, 132, keys_per_split=4096) == 1  # the SM rule alone


# ------------------------------------------------------------------------------------------ qkv_rope
@pytest.mark.parametrize(("rows", "hq", "hk", "dim", "hidden", "pos"), [(1, 4, 2, 32, 96, 5), (3, 10, 10, 128, 256, 0)])
def test_qkv_rope_is_linear_rows_then_rope_kv_write(
    rows: int, hq: int, hk: int, dim: int, hidden: int, pos: int
) -> None:
    """One launch equals the two it replaces bit for bit (q, and every cache entry: the row at ``pos`` written,
    the rest untouched), and the torch path (F.linear, then the rotary of FusedAttention) to bf16 rounding."""
    gen = torch.Generator().manual_seed(rows * dim + pos)
    max_len = 8
    x = torch.randn(rows, hidden, generator=gen).bfloat16()
    w = (torch.randn((hq + 2 * hk) * dim, hidden, generator=gen) * hidden**-0.5).bfloat16()
    cos, sin = _rotary_tables(max_len, dim, torch.bfloat16)
    p = torch.tensor([pos])
    caches = [torch.randn(rows, hk, max_len, dim, generator=gen).bfloat16() for _ in range(2)]
    k1, v1 = (c.clone() for c in caches)
    q1 = K.qkv_rope(x, w, cos, sin, p, k1, v1, hq, hk, dim)
    k2, v2 = (c.clone() for c in caches)
    q2 = K.rope_kv_write(K.linear_rows(x, w), cos, sin, p, k2, v2, hq, hk, dim)
    assert torch.equal(q1, q2) and torch.equal(k1, k2) and torch.equal(v1, v2)
    k3, v3 = (c.clone() for c in caches)
    q3 = K.rope_kv_write_ref(F.linear(x.float(), w.float()).bfloat16(), cos, sin, p, k3, v3, hq, hk, dim)
    _close(q1, q3)
    _close(k1, k3)
    _close(v1, v3)
    others = torch.arange(max_len) != pos
    assert torch.equal(k1[:, :, others], caches[0][:, :, others]) and torch.equal(
        v1[:, :, others], caches[1][:, :, others]
    )


@pytest.mark.parametrize("with_residual", [True, False])
def test_qkv_rope_with_the_norm_is_add_rms_norm_then_qkv_rope(with_residual: bool) -> None:
    """The input norm folded in: the same q, cache entries and residual sum as add_rms_norm followed by qkv_rope,
    bit for bit (the same reduction for the row's RMS, the same rounding points), at the real hidden size."""
    gen = torch.Generator().manual_seed(31)
    rows, hq, hk, dim, hidden, pos, max_len = 2, 4, 4, 32, 1280, 3, 6
    x = torch.randn(rows, hidden, generator=gen).bfloat16()
    residual = (torch.randn(rows, hidden, generator=gen) * 4).bfloat16() if with_residual else None
    weight = (1 + 0.3 * torch.randn(hidden, generator=gen)).bfloat16()
    w = (torch.randn((hq + 2 * hk) * dim, hidden, generator=gen) * hidden**-0.5).bfloat16()
    cos, sin = _rotary_tables(max_len, dim, torch.bfloat16)
    p = torch.tensor([pos])
    caches = [torch.randn(rows, hk, max_len, dim, generator=gen).bfloat16() for _ in range(2)]
    k1, v1 = (c.clone() for c in caches)
    summed = torch.empty_like(x) if with_residual else x
    q1 = K.qkv_rope(x, w, cos, sin, p, k1, v1, hq, hk, dim, norm=(residual, weight, 1e-6, summed))
    normed, ref_summed = K.add_rms_norm(x, residual, weight, 1e-6)
    k2, v2 = (c.clone() for c in caches)
    q2 = K.qkv_rope(normed, w, cos, sin, p, k2, v2, hq, hk, dim)
    assert torch.equal(summed, ref_summed)
    assert torch.equal(q1, q2) and torch.equal(k1, k2) and torch.equal(v1, v2)
    with pytest.raises(ValueError, match="summed=x" if not with_residual else "new"):
        K.qkv_rope(
            x,
            w,
            cos,
            sin,
            p,
            k1,
            v1,
            hq,
            hk,
            dim,
            norm=(residual, weight, 1e-6, torch.empty_like(x) if not with_residual else x),
        )


def test_qkv_rope_rejects_per_row_positions_and_bad_shapes() -> None:
    x, w = torch.randn(2, 64), torch.randn(3 * 2 * 16, 64)
    cos, sin = _rotary_tables(8, 16, torch.float32)
    k, v = torch.zeros(2, 2, 8, 16), torch.zeros(2, 2, 8, 16)
    with pytest.raises(ValueError, match="pos must be \\[1\\]"):
        K.qkv_rope(x, w, cos, sin, torch.tensor([1, 2]), k, v, 2, 2, 16)
    with pytest.raises(ValueError, match="does not hold q/k/v"):
        K.qkv_rope(x, w[:-1], cos, sin, torch.tensor([1]), k, v, 2, 2, 16)


# ------------------------------------------------------------------------------------------ caches past int32
def test_caches_past_2_31_elements_are_addressed_in_int64() -> None:
    """Caches of 2 rows x 8 heads x 5,242,880 columns x 32 (2.7e9 elements each; the real model passes 2**31 at
    64 rows and ~26k columns): the heads whose rows start past 2**31 elements (row 1, heads 5..7) must be written
    and read where a small cache holding the same columns has them.  A prompt of 3 tokens (prompt_rope_kv_write),
    a decode token at column 3 (rope_kv_write) and one at column 4 (qkv_rope), then decode_attention over columns
    0..4.  Before round 29 prompt_rope_kv_write's and decode_attention's offsets were int32 and wrapped there (a
    segfault under the interpreter); rope_kv_write's and qkv_rope's were already promoted by the int64 position
    they add (now int64 from the row index on).  The big caches come from ``torch.empty``: the columns never
    touched are never committed, so they cost a few pages (this relies on the host's default memory overcommit)."""
    b, h, d, n = 2, 8, 32, 5 * 2**20
    assert (b * h - 1) * n * d > 2**31 > (b * h // 2) * n * d  # row 1's last heads start past int32, row 0's not
    bf16 = torch.bfloat16
    gen = torch.Generator().manual_seed(29)
    k_big, v_big = torch.empty(b, h, n, d, dtype=bf16), torch.empty(b, h, n, d, dtype=bf16)
    k_small, v_small = torch.zeros(b, h, 8, d, dtype=bf16), torch.zeros(b, h, 8, d, dtype=bf16)
    cos, sin = _rotary_tables(8, d, bf16)
    qkv = torch.randn(b, 3, 3 * h * d, generator=gen).to(bf16)
    q_big = K.prompt_rope_kv_write(qkv, cos[:3][None], sin[:3][None], k_big, v_big, 0, h, h, d)
    q_small = K.prompt_rope_kv_write_ref(qkv, cos[:3][None], sin[:3][None], k_small, v_small, 0, h, h, d)
    assert torch.equal(q_big, q_small)
    qkv = torch.randn(b, 3 * h * d, generator=gen).to(bf16)
    q_big = K.rope_kv_write(qkv, cos, sin, torch.tensor([3]), k_big, v_big, h, h, d)
    q_small = K.rope_kv_write_ref(qkv, cos, sin, torch.tensor([3]), k_small, v_small, h, h, d)
    assert torch.equal(q_big, q_small)
    x = torch.randn(b, 64, generator=gen).to(bf16)
    w = (torch.randn(3 * h * d, 64, generator=gen) / 8).to(bf16)
    q_big = K.qkv_rope(x, w, cos, sin, torch.tensor([4]), k_big, v_big, h, h, d)
    q_small = K.rope_kv_write_ref(F.linear(x, w).view(b, -1), cos, sin, torch.tensor([4]), k_small, v_small, h, h, d)
    _close(q_big, q_small)
    assert torch.equal(k_big[:, :, :4], k_small[:, :, :4]) and torch.equal(v_big[:, :, :4], v_small[:, :, :4])
    _close(k_big[:, :, 4], k_small[:, :, 4])
    _close(v_big[:, :, 4], v_small[:, :, 4])
    k_small[:, :, 4], v_small[:, :, 4] = k_big[:, :, 4], v_big[:, :, 4]  # the attention's oracle reads the same keys
    out = K.decode_attention(q_big, k_big, v_big, torch.tensor([4]), d**-0.5, n_splits=1)
    _close(out, K.decode_attention_ref(q_big, k_small, v_small, torch.tensor([4]), d**-0.5))


# ------------------------------------------------------------------------------------------ moe_route
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("n_tokens", "n_experts", "hidden", "top_k"), [(1, 8, 256, 3), (5, 8, 256, 2), (2, 64, 1280, 6)]
)
@pytest.mark.parametrize(("renormalize", "scaling"), [(False, 1.0), (True, 2.5)])
@pytest.mark.parametrize("logits_in", [False, True])
def test_moe_route_matches_route_tokens(
    dtype: torch.dtype,
    n_tokens: int,
    n_experts: int,
    hidden: int,
    top_k: int,
    renormalize: bool,
    scaling: float,
    logits_in: bool,
) -> None:
    gen = torch.Generator().manual_seed(n_tokens * n_experts)
    x = torch.randn(n_tokens, hidden, generator=gen).to(dtype)
    gate_w32 = torch.randn(n_experts, hidden, generator=gen) * hidden**-0.5
    counts = torch.full((n_experts,), 7, dtype=torch.int64)
    logits = F.linear(x.float(), gate_w32) if logits_in else None
    idx, weights = K.moe_route(x, gate_w32, top_k, counts, scaling=scaling, renormalize=renormalize, logits=logits)
    ref_idx, ref_weights = route_tokens(
        F.linear(x.float(), gate_w32), top_k, norm_topk_prob=renormalize, routed_scaling_factor=scaling
    )
    assert idx.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-7)
    assert torch.equal(counts, 7 + torch.bincount(ref_idx.reshape(-1), minlength=n_experts))
    assert (weights[:, :-1] >= weights[:, 1:]).all()  # sorted, highest first


def test_moe_route_ties_lowest_index_first_and_no_counts() -> None:
    x = torch.ones(1, 64)
    gate_w32 = torch.zeros(8, 64)
    gate_w32[5] = gate_w32[2] = 0.1  # experts 2 and 5 tie for first, the rest tie for third
    idx, weights = K.moe_route(x, gate_w32, 4)
    assert idx.tolist() == [[2, 5, 0, 1]]
    assert weights[0, 0] == weights[0, 1] and weights[0, 2] == weights[0, 3]
    _, ref_weights = K.moe_route_ref(x, gate_w32, 4)  # torch.topk orders exact ties its own way ([2, 5, 4, 6])
    torch.testing.assert_close(weights, ref_weights)


# ------------------------------------------------------------------------------------------ moe_route_rows
@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("n_tokens", "n_experts", "hidden", "top_k", "blocks"),
    [
        (37, 8, 256, 3, {}),  # the interpreter's blocks: one program of 64 rows, 27 of them masked
        (37, 20, 96, 6, {"block_m": 16, "block_k": 32}),  # 3 programs, the last partial; K off the block
        (9, 64, 1280, 6, {"block_m": 32, "block_k": 64}),  # the real router's E and H, the GPU's blocks
    ],
)
@pytest.mark.parametrize(("renormalize", "scaling"), [(False, 1.0), (True, 2.5)])
def test_moe_route_rows_matches_route_tokens(
    gate_dtype: torch.dtype,
    n_tokens: int,
    n_experts: int,
    hidden: int,
    top_k: int,
    blocks: dict[str, Any],
    renormalize: bool,
    scaling: float,
) -> None:
    """The many-row router (logits and top-k in one launch, every row block's rows routed at once) against torch's
    float32 logits and ``route_tokens`` (the oracle): the same ids, the weights to float32 rounding; a bf16 gate
    (the tensor-core form) routes as its float32 copy, a float32 one in IEEE float32."""
    gen = torch.Generator().manual_seed(n_tokens * n_experts + hidden)
    x = torch.randn(n_tokens, hidden, generator=gen).to(torch.bfloat16)
    gate = (torch.randn(n_experts, hidden, generator=gen) * hidden**-0.5).to(gate_dtype)
    idx, weights = K.moe_route_rows(x, gate, top_k, scaling=scaling, renormalize=renormalize, **blocks)
    ref_idx, ref_weights = route_tokens(
        F.linear(x.float(), gate.float()), top_k, norm_topk_prob=renormalize, routed_scaling_factor=scaling
    )
    assert idx.dtype == torch.int64 and weights.dtype == torch.float32
    assert idx.shape == weights.shape == (n_tokens, top_k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-7)


def test_moe_route_rows_counts_every_pick() -> None:
    """``counts``: one added per pick (a batched decode step's routing counters), on top of what they held."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(21, 64, generator=gen).to(torch.bfloat16)
    gate = torch.randn(8, 64, generator=gen).to(torch.bfloat16)
    counts = torch.full((8,), 5, dtype=torch.int64)
    idx, _ = K.moe_route_rows(x, gate, 3, counts=counts, block_m=16, block_k=32)
    assert torch.equal(counts, 5 + torch.bincount(idx.reshape(-1), minlength=8))
    assert int(counts.sum()) == 5 * 8 + 21 * 3


def test_moe_route_rows_counts_a_nan_rows_picks_as_stored() -> None:
    """A row whose logits are NaN (a broken page) still gets valid ids: its k picks clamp to the last expert.  The
    counts add what the ids hold, k for that expert (the one-row router's rule, :func:`moe_route`), so the routing
    counters never disagree with the stored picks; the other rows route as usual."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 64, generator=gen)
    x[2] = float("nan")
    gate = torch.randn(8, 64, generator=gen)
    counts = torch.zeros(8, dtype=torch.int64)
    idx, _ = K.moe_route_rows(x, gate, 3, counts=counts, block_m=16, block_k=32)
    assert idx[2].tolist() == [7, 7, 7]
    assert torch.equal(counts, torch.bincount(idx.reshape(-1), minlength=8))
    one_row = torch.zeros(8, dtype=torch.int64)
    ids, _ = K.moe_route(x[2:3], gate, 3, counts=one_row)
    assert ids.tolist() == [[7, 7, 7]] and one_row.tolist() == [0] * 7 + [3]
    finite = [0, 1, 3, 4]
    ref_idx, _ = route_tokens(F.linear(x[finite], gate), 3)
    assert torch.equal(idx[finite], ref_idx)


def test_route_rows_block_sizes() -> None:
    """GPU: [64, 128] row blocks for a prompt's rows on bf16 operands, [32, 64] for fewer rows and for float32
    operands (the H200 sweep's figures are in the docstring); the interpreter's one large block."""
    assert K.route_rows_block_sizes(913) == (64, 128)
    assert K.route_rows_block_sizes(32) == (32, 64) and K.route_rows_block_sizes(255) == (32, 64)
    assert K.route_rows_block_sizes(913, bf16=False) == (32, 64)
    assert K.route_rows_block_sizes(913, interpreter=True) == (64, 128)


def test_exact_bf16_only_where_nothing_is_lost() -> None:
    """A bf16 checkpoint's router widened to float32 comes back as bf16 (the same values); a float32 one with
    values between bf16's does not."""
    widened = torch.randn(8, 32).to(torch.bfloat16).float()
    low = K.exact_bf16(widened)
    assert low is not None and low.dtype == torch.bfloat16 and torch.equal(low.float(), widened)
    assert K.exact_bf16(widened + 2.0**-12) is None


def test_moe_route_rows_ties_lowest_index_first_per_row() -> None:
    """Exact ties: the lowest expert id first in every row of a block (as the one-row router), rows independent."""
    x = torch.zeros(3, 64)
    x[0], x[1, :32], x[2] = 1.0, 1.0, -1.0
    gate = torch.zeros(8, 64)
    gate[5] = gate[2] = 0.1  # row 0: experts 2 and 5 tie first; row 2: they tie last
    idx, weights = K.moe_route_rows(x, gate, 4, block_m=16, block_k=16)
    assert idx.tolist() == [[2, 5, 0, 1], [2, 5, 0, 1], [0, 1, 3, 4]]
    assert weights[0, 0] == weights[0, 1] and weights[0, 2] == weights[0, 3]
    one_row = torch.cat([K.moe_route(x[i : i + 1], gate, 4)[0] for i in range(3)])
    assert torch.equal(idx, one_row)


def test_moe_route_rows_rejects_bad_arguments() -> None:
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="gate must be a float \\[E, 32\\]"):
        K.moe_route_rows(x, torch.randn(8, 16), 2)
    with pytest.raises(ValueError, match="gate must be a float"):
        K.moe_route_rows(x, torch.ones(8, 32, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"top_k must be in 1\.\.8"):
        K.moe_route_rows(x, torch.randn(8, 32), 9)
    with pytest.raises(ValueError, match="block_m and block_k must be >= 16"):
        K.moe_route_rows(x, torch.randn(8, 32), 2, block_m=8)
    with pytest.raises(ValueError, match="counts must be int64 \\[8\\]"):
        K.moe_route_rows(x, torch.randn(8, 32), 2, counts=torch.zeros(8, dtype=torch.int32))
    idx, weights = K.moe_route_rows(x[:0], torch.randn(8, 32), 2)  # no rows: nothing launched
    assert idx.shape == weights.shape == (0, 2)


# ------------------------------------------------------------------------------------------ add_rms_norm_route
@pytest.mark.parametrize(
    ("n_tokens", "n_experts", "hidden", "top_k", "per"),
    [(1, 8, 256, 3, 4), (5, 8, 256, 2, 1), (3, 8, 256, 2, 16), (2, 64, 1280, 6, 4)],
)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_route_is_the_norm_then_the_router(
    n_tokens: int, n_experts: int, hidden: int, top_k: int, per: int, with_residual: bool
) -> None:
    """Oracle: decoder.RMSNorm's math (add_rms_norm_ref) then route_tokens on float32 logits of the normed rows.
    Each case runs twice on the same counters: the last program of a row must have set them back to zero."""
    gen = torch.Generator().manual_seed(n_tokens * hidden + per)
    x = torch.randn(n_tokens, hidden, generator=gen).bfloat16()
    residual = (torch.randn(n_tokens, hidden, generator=gen) * 4).bfloat16() if with_residual else None
    weight = (1 + 0.3 * torch.randn(hidden, generator=gen)).bfloat16()
    gate_w32 = torch.randn(n_experts, hidden, generator=gen) * hidden**-0.5
    flags = K.route_flags(8, "cpu")
    counts = torch.full((n_experts,), 3, dtype=torch.int64)
    ref_normed, ref_summed = K.add_rms_norm_ref(x, residual, weight, 1e-6)
    for call in (1, 2):
        normed, summed, idx, weights = K.add_rms_norm_route(
            x, residual, weight, 1e-6, gate_w32, top_k, flags, counts, 2.5, True, experts_per_program=per
        )
        assert torch.equal(summed, ref_summed)
        _close(normed, ref_normed)
        assert (normed != ref_normed).float().mean() < 0.02  # the float32 rsqrt may differ in the last bit
        # the routing of the normed rows the kernel wrote: logits are summed in another order than torch's
        ref_idx, ref_weights = route_tokens(
            F.linear(normed.float(), gate_w32), top_k, norm_topk_prob=True, routed_scaling_factor=2.5
        )
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
        assert torch.equal(counts, 3 + call * torch.bincount(ref_idx.reshape(-1), minlength=n_experts))
        assert torch.equal(flags, torch.zeros_like(flags))


def test_add_rms_norm_route_matches_the_separate_kernels() -> None:
    """Bit for bit what add_rms_norm writes (same math, same rounding points), at the real H and E."""
    gen = torch.Generator().manual_seed(11)
    x, residual = (torch.randn(2, 1280, generator=gen).bfloat16() for _ in range(2))
    weight = (1 + 0.3 * torch.randn(1280, generator=gen)).bfloat16()
    gate_w32 = torch.randn(64, 1280, generator=gen) * 1280**-0.5
    normed, summed, idx, _ = K.add_rms_norm_route(x, residual, weight, 1e-6, gate_w32, 6, K.route_flags(2, "cpu"))
    plain_normed, plain_summed = K.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(normed, plain_normed) and torch.equal(summed, plain_summed)
    assert torch.equal(idx, K.moe_route(plain_normed, gate_w32, 6)[0])


@pytest.mark.parametrize("rows_per_program", [2, 3, 4, 16])
def test_add_rms_norm_route_several_rows_a_program_keep_each_rows_bits(rows_per_program: int) -> None:
    """``rows_per_program``: a program takes that many rows one after the other (the last program's rows may run
    past T: 13 rows at 2, 3, 4 and 16 a program).  Oracle: the norm by decoder.RMSNorm's math and the routing of
    the written rows by route_tokens; and the one-row-a-program launch's outputs, bit for bit, since each row runs
    the same math.  Counters are back at zero and the routing counts grow by the picks, twice over."""
    gen = torch.Generator().manual_seed(37 + rows_per_program)
    rows, hidden, n_experts, top_k = 13, 256, 16, 3
    x, residual = (torch.randn(rows, hidden, generator=gen).bfloat16() for _ in range(2))
    weight = (1 + 0.3 * torch.randn(hidden, generator=gen)).bfloat16()
    gate_w32 = torch.randn(n_experts, hidden, generator=gen) * hidden**-0.5
    one = K.add_rms_norm_route(
        x, residual, weight, 1e-6, gate_w32, top_k, K.route_flags(rows, "cpu"), None, 1.5, True, rows_per_program=1
    )
    ref_normed, ref_summed = K.add_rms_norm_ref(x, residual, weight, 1e-6)
    flags = K.route_flags(rows, "cpu")
    counts = torch.zeros(n_experts, dtype=torch.int64)
    for call in (1, 2):
        got = K.add_rms_norm_route(
            x, residual, weight, 1e-6, gate_w32, top_k, flags, counts, 1.5, True, rows_per_program=rows_per_program
        )
        for a, b in zip(got, one, strict=True):
            assert torch.equal(a, b)
        normed, summed, idx, weights = got
        assert torch.equal(summed, ref_summed)
        _close(normed, ref_normed)
        ref_idx, ref_weights = route_tokens(
            F.linear(normed.float(), gate_w32), top_k, norm_topk_prob=True, routed_scaling_factor=1.5
        )
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
        assert torch.equal(counts, call * torch.bincount(ref_idx.reshape(-1), minlength=n_experts))
        assert torch.equal(flags, torch.zeros_like(flags))


@pytest.mark.parametrize(("rows", "setting", "programs"), [(8, 4, 8), (9, 4, 3), (64, 4, 16), (64, 1, 64)])
def test_add_rms_norm_route_rows_a_program_by_default(
    rows: int, setting: int, programs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``rows_per_program``: one row a program up to 8 rows (the single-page step's launch stays as it
    was), ``NORM_ROUTE_ROWS`` above; read off the grid's first dimension the kernel is launched with."""
    grids: list[tuple[int, ...]] = []
    real = K._norm_route_kernel

    class Spy:
        def __getitem__(self, grid: tuple[int, ...]) -> object:
            grids.append(tuple(grid))
            return real[grid]

    monkeypatch.setattr(K, "_norm_route_kernel", Spy())
    monkeypatch.setattr(K, "NORM_ROUTE_ROWS", setting)
    x, weight, gate = torch.randn(rows, 64).bfloat16(), torch.ones(64).bfloat16(), torch.randn(8, 64)
    K.add_rms_norm_route(x, None, weight, 1e-6, gate, 2, K.route_flags(rows, "cpu"))
    assert grids == [(programs, 2)]  # 8 experts at 4 a program


def test_add_rms_norm_route_rejects_bad_counters() -> None:
    x, weight, gate = torch.randn(3, 64), torch.ones(64), torch.randn(8, 64)
    with pytest.raises(ValueError, match="flags must be int32"):
        K.add_rms_norm_route(x, None, weight, 1e-6, gate, 2, K.route_flags(2, "cpu"))
    with pytest.raises(ValueError, match="flags must be int32"):
        K.add_rms_norm_route(x, None, weight, 1e-6, gate, 2, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="power of two"):
        K.add_rms_norm_route(x, None, weight, 1e-6, gate, 2, K.route_flags(3, "cpu"), experts_per_program=3)
    with pytest.raises(ValueError, match="rows_per_program must be >= 1, got 0"):
        K.add_rms_norm_route(x, None, weight, 1e-6, gate, 2, K.route_flags(3, "cpu"), rows_per_program=0)


# ------------------------------------------------------------------------------------------ moe_experts
def _experts(n: int, hidden: int, inter: int, dtype: torch.dtype, seed: int) -> tuple[nn.ModuleList, MLP]:
    torch.manual_seed(seed)
    experts = nn.ModuleList(MLP(hidden, inter) for _ in range(n))
    shared = MLP(hidden, 2 * inter)  # DeepSeek-OCR: 2 shared experts = one MLP twice as wide
    for p in [*experts.parameters(), *shared.parameters()]:
        p.data.normal_(0.0, p.shape[1] ** -0.5)  # unit-scale activations
    return experts.to(dtype), shared.to(dtype)


def _moe_case(
    n_tokens: int, hidden: int, inter: int, n_experts: int, top_k: int, dtype: torch.dtype, seed: int = 0
) -> dict[str, Any]:
    experts, shared = _experts(n_experts, hidden, inter, dtype, seed)
    w13, w2 = stacked_expert_weights(experts)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n_tokens, hidden, generator=gen).to(dtype)
    gate_w32 = torch.randn(n_experts, hidden, generator=gen) * hidden**-0.5
    idx, weights = route_tokens(F.linear(x.float(), gate_w32), top_k)
    with torch.no_grad():
        w13_all, w2_all = K.stack_always_on(
            w13, w2, shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight, 2
        )
    residual = torch.randn(n_tokens, hidden, generator=gen).to(dtype)
    return dict(x=x, idx=idx, weights=weights, experts=experts, shared=shared, w13=w13_all, w2=w2_all, res=residual)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_tokens", [1, 3])
def test_moe_experts_match_eager_loop_plus_shared(dtype: torch.dtype, n_tokens: int) -> None:
    c = _moe_case(n_tokens, 256, 128, 8, 3, dtype, seed=n_tokens)
    with torch.no_grad():
        routed, _ = apply_experts_eager(c["x"], c["idx"], c["weights"], c["experts"])
        expected = c["res"] + (routed + c["shared"](c["x"]))
    out = K.moe_experts(c["x"], c["idx"], c["weights"], c["w13"], c["w2"], n_always=2, residual=c["res"])
    _close(out, expected)
    ref = K.moe_experts_ref(c["x"], c["idx"], c["weights"], c["w13"], c["w2"], n_always=2, residual=c["res"])
    _close(ref, expected)
    _close(out, ref)
    if dtype == torch.bfloat16:  # same rounding points: only reduction order differs, so rare 1-ulp flips
        assert (out != ref).float().mean() <= 0.05, (out != ref).float().mean()


def test_moe_experts_block_shapes_and_no_shared() -> None:
    """GPU-like small tiles (several row blocks, masked I tail) and the routed-only / shared-only cases."""
    c = _moe_case(2, 128, 96, 8, 2, torch.bfloat16, seed=5)  # I = 96: not a multiple of the 64-wide K tile
    x, idx, w, w13, w2 = c["x"], c["idx"], c["weights"], c["w13"], c["w2"]
    for kwargs in [{}, dict(block_n=16, block_k_up=64, block_h=32, block_k_down=64)]:
        _close(
            K.moe_experts(x, idx, w, w13, w2, 2, c["res"], **kwargs), K.moe_experts_ref(x, idx, w, w13, w2, 2, c["res"])
        )
    routed_stack = (w13[:-2].contiguous(), w2[:-2].contiguous())
    with torch.no_grad():
        routed, _ = apply_experts_eager(x, idx, w, c["experts"])
        shared = c["shared"](x)
    _close(K.moe_experts(x, idx, w, *routed_stack), routed)
    no_picks = torch.empty(2, 0, dtype=torch.int64)
    _close(K.moe_experts(x, no_picks, no_picks.float(), w13, w2, n_always=2), shared)


@pytest.mark.parametrize("stages", [2, 3])
def test_moe_experts_pipelined_up_loop_sums_in_the_same_order(stages: int) -> None:
    """``stages_up``: the pipelined up loop gives the plain loop's output bit for bit (the same blocks in the same
    order; only when the tiles are fetched changes)."""
    c = _moe_case(1, 320, 96, 8, 2, torch.bfloat16, seed=40 + stages)
    args = (c["x"], c["idx"], c["weights"], c["w13"], c["w2"], 2, c["res"])
    blocks = dict(block_n=16, block_k_up=128, block_h=32, block_k_down=64)
    assert torch.equal(K.moe_experts(*args, stages_up=stages, **blocks), K.moe_experts(*args, stages_up=0, **blocks))


def test_moe_experts_real_sizes_bf16() -> None:
    """The real expert shape (H=1280, I=896, 2 shared slots); top-2 of 4 experts to keep the interpreter fast."""
    c = _moe_case(1, 1280, 896, 4, 2, torch.bfloat16, seed=3)
    out = K.moe_experts(c["x"], c["idx"], c["weights"], c["w13"], c["w2"], n_always=2, residual=c["res"])
    with torch.no_grad():
        routed, _ = apply_experts_eager(c["x"], c["idx"], c["weights"], c["experts"])
        expected = c["res"] + (routed + c["shared"](c["x"]))
    _close(out, expected)


# ------------------------------------------------------------------------------------------ moe_experts(down="split")
def _eager_expected(c: dict[str, Any], shared: bool, residual: bool) -> torch.Tensor:
    """The independent oracle: the eager loop over the routed experts (+ the shared MLP) (+ the residual)."""
    with torch.no_grad():
        out, _ = apply_experts_eager(c["x"], c["idx"], c["weights"], c["experts"])
        if shared:
            out = out + c["shared"](c["x"])
    return c["res"] + out if residual else out


def _stacks(c: dict[str, Any], shared: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(w13, w2, n_always): the stacks with the 2 shared slots appended, or the routed experts alone."""
    if shared:
        return c["w13"], c["w2"], 2
    return c["w13"][:-2].contiguous(), c["w2"][:-2].contiguous(), 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_tokens", [1, 3])
def test_moe_experts_split_down_matches_eager_loop(dtype: torch.dtype, n_tokens: int) -> None:
    """The split down form (a program per token, slot and row block; the last slot to finish combines) against the
    eager loop over experts, with and without the shared slots and the residual; the interpreter's default blocks
    (one row block) and GPU-like ones (4 row blocks racing for their counters, 2 K steps)."""
    c = _moe_case(n_tokens, 128, 64, 8, 3, dtype, seed=60 + n_tokens)
    for shared in (True, False):
        w13, w2, n_always = _stacks(c, shared)
        for residual in (True, False):
            res = c["res"] if residual else None
            expected = _eager_expected(c, shared, residual)
            ref = K.moe_experts_ref(c["x"], c["idx"], c["weights"], w13, w2, n_always, res)
            for blocks in ({}, dict(block_h=32, block_k_down=32)):
                out = K.moe_experts(c["x"], c["idx"], c["weights"], w13, w2, n_always, res, down="split", **blocks)
                _close(out, expected)
                _close(out, ref)
                if dtype == torch.bfloat16:  # same rounding points: only reduction order differs
                    assert (out != ref).float().mean() <= 0.05, (out != ref).float().mean()


@pytest.mark.parametrize("stages", [0, 2])
def test_moe_experts_split_down_ragged_blocks(stages: int) -> None:
    """H = 200 over 32-row blocks (the last holds 8 rows), I = 96 over 64-wide K tiles (a masked tail), the K loop
    plain and pipelined; the experts of both tokens picked from all 8, and the shared-only case (no picks)."""
    c = _moe_case(2, 200, 96, 8, 2, torch.bfloat16, seed=70 + stages)
    blocks = dict(block_h=32, block_k_down=64, stages_down=stages)
    x, idx, w, w13, w2 = c["x"], c["idx"], c["weights"], c["w13"], c["w2"]
    _close(K.moe_experts(x, idx, w, w13, w2, 2, c["res"], down="split", **blocks), _eager_expected(c, True, True))
    no_picks = torch.empty(2, 0, dtype=torch.int64)
    with torch.no_grad():
        shared = c["shared"](x)
    _close(K.moe_experts(x, no_picks, no_picks.float(), w13, w2, n_always=2, down="split", **blocks), shared)


def test_moe_experts_split_down_counters_are_rearmed() -> None:
    """A kept counter buffer (longer than needed) is all zeros after each call: a second call with it gives the
    same output, and a call on new inputs gives what a fresh buffer gives (a counter left above zero would keep
    every (token, row block) from being combined: its output would be whatever ``torch.empty`` held)."""
    c = _moe_case(3, 128, 64, 8, 3, torch.bfloat16, seed=80)
    blocks = dict(block_h=32, block_k_down=32)
    counters = K.down_counters(3, 128, "cpu", block_h=32)
    assert counters.shape == (3 * 4,) and counters.dtype == torch.int32
    counters = torch.cat((counters, torch.zeros(5, dtype=torch.int32)))
    args = (c["idx"], c["weights"], c["w13"], c["w2"], 2, c["res"])
    first = K.moe_experts(c["x"], *args, down="split", counters=counters, **blocks)
    assert int(counters.abs().sum()) == 0
    second = K.moe_experts(c["x"], *args, down="split", counters=counters, **blocks)
    assert int(counters.abs().sum()) == 0
    assert torch.equal(first, second)
    _close(first, _eager_expected(c, True, True))
    x_new = torch.randn(c["x"].shape, generator=torch.Generator().manual_seed(1234)).to(torch.bfloat16)
    third = K.moe_experts(x_new, *args, down="split", counters=counters, **blocks)
    assert int(counters.abs().sum()) == 0
    assert torch.equal(third, K.moe_experts(x_new, *args, down="split", **blocks))
    assert not torch.equal(third, first)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_k", [128, 32])
def test_moe_experts_split_down_equals_rows_form_bit_for_bit(dtype: torch.dtype, block_k: int) -> None:
    """Both down forms with the same [block_h, block_k] tiles: each slot's ``y`` is the same sequence of tile sums
    (one tile covering I = 96, or three), and the split form's combine has the rows kernel's rounding points in
    the rows kernel's slot order, so the outputs agree bit for bit.  (On a GPU a tile's ``tl.sum`` order follows
    the kernel's layout, so there the forms may differ in the last bits of ``y``.)"""
    c = _moe_case(3, 128, 96, 8, 3, dtype, seed=90)
    for shared, residual in ((True, True), (False, False)):
        w13, w2, n_always = _stacks(c, shared)
        args = (c["x"], c["idx"], c["weights"], w13, w2, n_always, c["res"] if residual else None)
        blocks = dict(block_h=64, block_k_down=block_k)
        rows = K.moe_experts(*args, down="rows", **blocks)
        assert torch.equal(K.moe_experts(*args, down="split", **blocks), rows)
        assert torch.equal(K.moe_experts(*args, **blocks), rows)  # DOWN_FORM: the rows form by default


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_experts_split_down_runs_the_next_norm(dtype: torch.dtype) -> None:
    """``norm``: the split down kernel also writes the next add + RMSNorm of its output and the residual stream,
    by the program finishing each token's row last (4 row blocks racing for the row counter): against the eager
    loop's output through the torch norm (independent of the kernel), and bit for bit the norm kernel's result of
    the kernel's own output; the row counters are re-armed, so a second call with them finds zeros."""
    c = _moe_case(3, 128, 64, 8, 3, dtype, seed=95)
    gen = torch.Generator().manual_seed(96)
    stream = torch.randn(3, 128, generator=gen).to(dtype)
    weight = (1.0 + 0.1 * torch.randn(128, generator=gen)).to(dtype)
    rows = torch.zeros(5, dtype=torch.int32)
    for _ in range(2):
        normed, summed = torch.empty_like(c["x"]), torch.empty_like(c["x"])
        out = K.moe_experts(
            c["x"], c["idx"], c["weights"], c["w13"], c["w2"], 2, down="split", block_h=32, block_k_down=32,
            norm=(stream, weight, 1e-6, normed, summed, rows),
        )  # fmt: skip
        assert int(rows.abs().sum()) == 0
        expected = _eager_expected(c, True, False)
        _close(out, expected)
        want_summed = (stream.float() + expected.float()).to(dtype)
        want = weight * F.rms_norm(want_summed.float(), (128,), eps=1e-6).to(dtype)
        _close(summed, want_summed)
        _close(normed, want)
        plain_normed, plain_summed = K.add_rms_norm(out, stream, weight, 1e-6)
        assert torch.equal(normed, plain_normed) and torch.equal(summed, plain_summed)


def test_moe_experts_next_norm_rejects_bad_input() -> None:
    c = _moe_case(2, 64, 32, 4, 2, torch.float32)
    args = (c["x"], c["idx"], c["weights"], c["w13"], c["w2"], 2)
    x = c["x"]
    w, rows = torch.ones(64), torch.zeros(2, dtype=torch.int32)

    def norm(**kw: Any) -> tuple[Any, ...]:
        parts = dict(residual=torch.randn(2, 64), weight=w, eps=1e-6, normed=torch.empty_like(x))
        parts.update(summed=torch.empty_like(x), rows=rows)
        parts.update(kw)
        return tuple(parts.values())

    with pytest.raises(ValueError, match="split down kernel only"):
        K.moe_experts(*args, down="rows", norm=norm())
    with pytest.raises(ValueError, match=r"norm's residual must be \[2, 64\]"):
        K.moe_experts(*args, down="split", norm=norm(residual=torch.randn(3, 64)))
    with pytest.raises(ValueError, match="norm weight must be"):
        K.moe_experts(*args, down="split", norm=norm(weight=torch.ones(32)))
    same = torch.empty_like(x)
    with pytest.raises(ValueError, match="three different tensors"):
        K.moe_experts(*args, down="split", norm=norm(normed=same, summed=same))
    with pytest.raises(ValueError, match="row counters must be int32 zeros"):
        K.moe_experts(*args, down="split", norm=norm(rows=torch.zeros(1, dtype=torch.int32)))


def test_moe_experts_split_down_rejects_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    c = _moe_case(2, 64, 32, 4, 2, torch.float32)
    args = (c["x"], c["idx"], c["weights"], c["w13"], c["w2"], 2)
    with pytest.raises(ValueError, match="down must be one of"):
        K.moe_experts(*args, down="columns")
    with pytest.raises(ValueError, match="stages_down is the split down form's"):
        K.moe_experts(*args, down="rows", stages_down=2)
    with pytest.raises(ValueError, match=r"counters must be int32 \[>= 4\]"):  # 2 tokens x 2 row blocks of 32
        K.moe_experts(*args, down="split", block_h=32, counters=torch.zeros(4))
    with pytest.raises(ValueError, match=r"counters must be int32 \[>= 4\]"):
        K.moe_experts(*args, down="split", block_h=32, counters=K.down_counters(1, 64, "cpu", block_h=32))
    with pytest.raises(ValueError, match="counters must be int32"):
        K.moe_experts(*args, down="split", block_h=32, counters=torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="counters must be contiguous"):
        K.moe_experts(*args, down="split", block_h=32, counters=torch.zeros(8, dtype=torch.int32)[::2])
    monkeypatch.setattr(K, "DOWN_FORM", "columns")
    with pytest.raises(ValueError, match="DOWN_FORM = 'columns'"):
        K.moe_experts(*args)


def test_moe_down_split_block_sizes() -> None:
    """GPU: 16 rows, then K tiles as wide as ~4096 weights allow that divide I (no masked tail) when half that
    width does; overrides kept.  The counters follow the row blocks."""
    assert K.moe_down_split_block_sizes(1280, 896) == (16, 128)  # 256 leaves a tail of 128; 128 divides 896
    assert K.moe_down_split_block_sizes(1280, 1024) == (16, 256)
    assert K.moe_down_split_block_sizes(1280, 896, block_h=32) == (32, 128)
    assert K.moe_down_split_block_sizes(1280, 896, block_h=8) == (8, 512)  # neither 512 nor 256 divides 896
    assert K.moe_down_split_block_sizes(1280, 896, block_h=8, block_k=256) == (8, 256)
    assert K.moe_down_split_block_sizes(1280, 896, interpreter=True) == (256, 256)
    # one token: the H200 sweep's [8, 256] (the K loop's last step masked), unless a size is given
    assert K.moe_down_split_block_sizes(1280, 896, n_tokens=1) == (8, 256)
    assert K.moe_down_split_block_sizes(1280, 896, n_tokens=4) == (16, 128)
    assert K.moe_down_split_block_sizes(1280, 896, block_h=16, n_tokens=1) == (16, 128)
    assert K.moe_down_split_block_sizes(1280, 896, interpreter=True, n_tokens=1) == (256, 256)
    assert K.down_counter_count(1, 1280, "cuda") == 160 and K.down_counter_count(4, 1280, "cuda") == 320
    assert K.down_counters(4, 1280, "cpu", block_h=16).shape == (4 * 80,)
    assert K.down_counters(4, 1280, "cpu").shape == (4 * 5,)  # the interpreter's 256-row blocks
    assert K.DOWN_FORM == "rows"  # until the GPU has timed both forms


# ------------------------------------------------------------------------------------------ moe_experts_grouped
def _ragged_routing(x: torch.Tensor, n_experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing with experts 2 and 5 never picked (zero rows) and expert 0 picked by every even token (its rows
    outnumber a 16-row block from 33 tokens on), the rest from random logits."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(x.shape[0], n_experts, generator=gen)
    logits[:, [2, 5]] = -30.0  # still distinct after the softmax (no ties among underflowed zeros)
    logits[::2, 0] = 8.0
    return route_tokens(logits, top_k)


def _grouped_expected(c: dict[str, Any], idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The independent oracle: the eager loop over experts plus the shared MLP plus the residual."""
    with torch.no_grad():
        routed, counts = apply_experts_eager(c["x"], idx, weights, c["experts"])
        assert counts[2] == counts[5] == 0 and counts[0] >= (c["x"].shape[0] + 1) // 2
        return c["res"] + (routed + c["shared"](c["x"]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_tokens", [9, 16, 33, 64])
def test_moe_experts_grouped_match_eager_loop_plus_shared(dtype: torch.dtype, n_tokens: int) -> None:
    c = _moe_case(n_tokens, 256, 128, 8, 3, dtype, seed=n_tokens)
    idx, weights = _ragged_routing(c["x"], 8, 3, seed=n_tokens)
    expected = _grouped_expected(c, idx, weights)
    out = K.moe_experts_grouped(c["x"], idx, weights, c["w13"], c["w2"], n_always=2, residual=c["res"])
    _close(out, expected)
    ref = K.moe_experts_ref(c["x"], idx, weights, c["w13"], c["w2"], n_always=2, residual=c["res"])
    _close(out, ref)
    if dtype == torch.bfloat16:  # same rounding points: only reduction order differs, so rare 1-ulp flips
        assert (out != ref).float().mean() <= 0.05, (out != ref).float().mean()


def test_moe_experts_grouped_blocks_ragged_k_and_no_shared() -> None:
    """GPU-sized 16-row blocks (expert 0's 20 rows span two), a K tail (H = 192 over 128-wide K tiles, I = 96
    over 64), narrow N tiles; routed-only stacks without a residual."""
    c = _moe_case(40, 192, 96, 8, 2, torch.bfloat16, seed=7)
    idx, weights = _ragged_routing(c["x"], 8, 2, seed=7)
    expected = _grouped_expected(c, idx, weights)
    x, w13, w2 = c["x"], c["w13"], c["w2"]
    blocks = dict(block_m=16, block_n_up=32, block_k_up=128, block_n_down=16, block_k_down=64)
    _close(K.moe_experts_grouped(x, idx, weights, w13, w2, 2, c["res"], **blocks), expected)
    with torch.no_grad():
        routed, _ = apply_experts_eager(x, idx, weights, c["experts"])
    routed_stack = (w13[:-2].contiguous(), w2[:-2].contiguous())
    _close(K.moe_experts_grouped(x, idx, weights, *routed_stack, **blocks), routed)


def test_moe_experts_grouped_real_sizes_bf16() -> None:
    """The real expert shape (H=1280, I=896, 2 shared slots) at 9 tokens; top-2 of 4 experts to keep the
    interpreter fast (the GPU test runs top-6 of 64)."""
    c = _moe_case(9, 1280, 896, 4, 2, torch.bfloat16, seed=11)
    out = K.moe_experts_grouped(c["x"], c["idx"], c["weights"], c["w13"], c["w2"], n_always=2, residual=c["res"])
    with torch.no_grad():
        routed, _ = apply_experts_eager(c["x"], c["idx"], c["weights"], c["experts"])
        expected = c["res"] + (routed + c["shared"](c["x"]))
    _close(out, expected)


def test_moe_experts_grouped_counts_the_routed_experts_it_reads() -> None:
    """``reads``: each call adds the number of distinct routed experts its pairs picked and 1, on the device.
    Oracle: the picks counted by hand (experts 2 and 5 never picked, then a routing that picks only experts 1
    and 6); the shared slots are not routed experts and are not counted; the output is unchanged."""
    c = _moe_case(12, 64, 32, 8, 3, torch.float32, seed=5)
    idx, weights = _ragged_routing(c["x"], 8, 3, seed=5)
    picked = len(set(idx.flatten().tolist()))
    assert picked <= 6  # experts 2 and 5 never picked
    reads = torch.zeros(2, dtype=torch.int64)
    args = (c["x"], idx, weights, c["w13"], c["w2"])
    out = K.moe_experts_grouped(*args, n_always=2, residual=c["res"], reads=reads)
    assert reads.tolist() == [picked, 1]
    _close(out, K.moe_experts_grouped(*args, n_always=2, residual=c["res"]))
    two = torch.tensor([[1, 6, 1]] * 6 + [[6, 1, 6]] * 6)  # a routing of two experts only (repeats included)
    K.moe_experts_grouped(c["x"], two, weights, c["w13"], c["w2"], n_always=2, reads=reads)
    assert reads.tolist() == [picked + 2, 2]
    with pytest.raises(ValueError, match="int64 \\[2\\] counter"):
        K.moe_experts_grouped(*args, n_always=2, reads=torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_moe_experts_counts_the_routed_experts_it_reads(tokens: int) -> None:
    """``moe_experts(reads=)`` (the GEMV kernels, 8 rows or fewer: the continuous drain's narrow steps): each call
    adds the distinct routed experts its picks chose and 1.  Oracle: the picks counted by hand, for a random
    routing (repeats across tokens), every token on the same three experts, and each pick its own expert; the
    shared slots are not counted; the outputs are the same bits as without the count, in both down forms."""
    c = _moe_case(tokens, 64, 32, 24, 3, torch.float32, seed=tokens)
    args = (c["x"], c["idx"], c["weights"], c["w13"], c["w2"])
    reads = torch.zeros(2, dtype=torch.int64)
    for down in ("rows", "split"):
        plain = K.moe_experts(*args, n_always=2, residual=c["res"], down=down)
        counted = K.moe_experts(*args, n_always=2, residual=c["res"], down=down, reads=reads)
        assert torch.equal(counted, plain)
    once = len(set(c["idx"].flatten().tolist()))
    assert reads.tolist() == [2 * once, 2]
    same = torch.tensor([[4, 9, 4]] * tokens)  # one token's picks may repeat an expert too
    K.moe_experts(c["x"], same, c["weights"], c["w13"], c["w2"], n_always=2, reads=reads)
    assert reads.tolist() == [2 * once + 2, 3]
    own = torch.arange(3 * tokens).reshape(tokens, 3)  # every pick its own expert (24 routed experts here)
    K.moe_experts(c["x"], own, c["weights"], c["w13"], c["w2"], n_always=2, reads=reads)
    assert reads.tolist() == [2 * once + 2 + 3 * tokens, 4]
    with pytest.raises(ValueError, match="int64 \\[2\\] counter"):
        K.moe_experts(*args, n_always=2, reads=torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("n_experts", [1, 6, 15, 16, 17, 64])
def test_moe_align_sorts_the_pairs_by_expert_and_counts_the_experts(n_experts: int) -> None:
    """The align kernel alone: ``order`` = the pairs stably sorted by expert (``argsort(stable=True)``), ``offs`` =
    the running count of pairs below each expert (``bincount``'s cumulative sum, ``offs[E]`` = every pair) and
    the distinct experts added to ``reads``; expert counts at, below and above the 16-expert blocks, padding
    past the pairs (P = 54 of 64), and routings of one expert, the first and last only, and at random."""
    gen = torch.Generator().manual_seed(n_experts)
    routings = [
        torch.randint(0, n_experts, (54,), generator=gen),
        torch.zeros(54, dtype=torch.long),
        torch.tensor([0, n_experts - 1] * 27),
    ]
    for ids in routings:
        order = torch.empty(54, dtype=torch.int32)
        offs = torch.empty(n_experts + 1, dtype=torch.int32)
        reads = torch.zeros(2, dtype=torch.int64)
        block_e = max(16, 1 << n_experts.bit_length())  # the launch's: the power of two above E, at least 16
        K._moe_align_kernel[(-(-54 // 16) + 1,)](ids, order, offs, reads, 54, E=n_experts, BLOCK_P=16,
                                                 BLOCK_ALL=64, BLOCK_E=block_e, HAS_READS=True)  # fmt: skip
        assert order.tolist() == torch.argsort(ids, stable=True).tolist()
        want = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(ids, minlength=n_experts).cumsum(0)])
        assert offs.tolist() == want.tolist()
        assert reads.tolist() == [len(set(ids.tolist())), 1]


def test_moe_experts_grouped_rejects_bad_input() -> None:
    c = _moe_case(9, 64, 32, 4, 2, torch.float32)
    x, w13, w2 = c["x"], c["w13"], c["w2"]
    no_picks = torch.empty(9, 0, dtype=torch.int64)
    with pytest.raises(ValueError, match="k >= 1"):
        K.moe_experts_grouped(x, no_picks, no_picks.float(), w13, w2, n_always=2)
    with pytest.raises(ValueError, match="int64"):
        K.moe_experts_grouped(x, c["idx"].int(), c["weights"], w13, w2, n_always=2)
    with pytest.raises(ValueError, match="at least 16"):
        K.moe_experts_grouped(x, c["idx"], c["weights"], w13, w2, n_always=2, block_m=8)


def test_stack_always_on_is_the_same_mlp() -> None:
    """A SiLU-gated MLP split over its intermediate dim into slots sums back to itself (float32 exact-ish)."""
    _, shared = _experts(1, 64, 32, torch.float32, seed=9)
    w13, w2 = K.stack_always_on(
        torch.empty(0, 64, 64),
        torch.empty(0, 64, 32),
        shared.gate_proj.weight,
        shared.up_proj.weight,
        shared.down_proj.weight,
        2,
    )
    x = torch.randn(4, 64)
    slots = [F.linear(F.silu(F.linear(x, w13[j, :32])) * F.linear(x, w13[j, 32:]), w2[j]) for j in range(2)]
    with torch.no_grad():
        torch.testing.assert_close(slots[0] + slots[1], shared(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ pick_token
@pytest.mark.parametrize("block", [64, 256])
def test_pick_token_first_argmax_ties_and_chunk_edges(block: int) -> None:
    """Hand-placed maxima: ties inside a chunk and across chunks, at a chunk edge, in the ragged last chunk."""
    vocab = 1000  # 16 chunks of 64 (the last holds 40), or 4 of 256 (the last holds 232)
    logits = torch.zeros(5, vocab)
    logits[0, [63, 64, 500]] = 3.0  # first of three ties: 63, the last entry of chunk 0 at block 64
    logits[1, [999, 998]] = 2.0  # ties in the ragged last chunk: 998
    logits[2, 0] = -1.0  # all the rest 0: the first 0 is index 1
    logits[3] = -5.0  # all equal: index 0
    logits[4, 777] = 1e-30  # one entry barely above zero
    out = K.pick_token(logits, block=block)
    assert out.dtype == torch.int64 and out.shape == (5, 1)
    assert out.view(-1).tolist() == [63, 998, 1, 0, 777]


def test_pick_token_ban_and_nonfinite_flag() -> None:
    vocab = 300
    logits = torch.zeros(2, vocab)
    logits[0, 10], logits[0, 20] = 5.0, 4.0
    logits[1, 7] = 9.0
    wide = torch.zeros(2, vocab + 1, dtype=torch.bool)  # a column slice, as banned_ngram_mask returns it
    wide[0, 10] = True
    flag = torch.zeros((), dtype=torch.bool)
    out = K.pick_token(logits, wide[:, :vocab], flag, block=64)
    assert out.view(-1).tolist() == [20, 7] and not bool(flag)  # row 0's best is banned: the next best
    everything = torch.ones(2, vocab, dtype=torch.bool)  # every token banned: index 0, as argmax over -inf
    assert K.pick_token(logits, everything, flag, block=64).view(-1).tolist() == [0, 0]
    logits[1, 250] = float("inf")  # flagged before the ban; the flag is sticky
    banned_inf = torch.zeros(2, vocab, dtype=torch.bool)
    banned_inf[1, 250] = True
    assert K.pick_token(logits, banned_inf, flag, block=64).view(-1).tolist() == [10, 7] and bool(flag)
    assert bool(flag) and K.pick_token(torch.zeros(2, vocab), None, flag, block=64).view(-1).tolist() == [0, 0]
    assert bool(flag)  # never cleared by a clean step
    nan = torch.zeros(1, vocab)
    nan[0, 3] = float("nan")
    fresh = torch.zeros((), dtype=torch.bool)
    tok = int(K.pick_token(nan, None, fresh, block=64))
    assert bool(fresh) and 0 <= tok < vocab  # a NaN row: flagged, and its token still a valid id


@pytest.mark.parametrize("ban", [False, True])
def test_pick_token_matches_the_reference_on_random_logits(ban: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(4, 5000, generator=gen) * 3).round()  # many exact ties
    banned = torch.rand(4, 5000, generator=gen) < 0.3 if ban else None
    flag, ref_flag = torch.zeros((), dtype=torch.bool), torch.zeros((), dtype=torch.bool)
    assert torch.equal(K.pick_token(logits, banned, flag, block=512), K.pick_token_ref(logits, banned, ref_flag))
    assert bool(flag) == bool(ref_flag) is False
    with pytest.raises(ValueError, match="float32"):
        K.pick_token(logits.to(torch.bfloat16))
    with pytest.raises(ValueError, match="banned must be bool"):
        K.pick_token(logits, torch.zeros(4, 5000, dtype=torch.bool).t().contiguous().t())


@pytest.mark.parametrize("pick", ["kernel", "torch"])
def test_pick_token_feed_ends_the_step_on_the_device(pick: str) -> None:
    """``feed``: each row's token fed back and kept at the step's position, nothing else in ``chosen`` touched,
    the position advanced by one, and held at the last slot once there (hand-placed maxima; the torch form,
    ``pick_token_ref``'s ``feed_back``, must do the same)."""
    logits = torch.zeros(3, 200)
    logits[0, 17], logits[1, 199], logits[2, 64] = 1.0, 2.0, 3.0
    tokens = torch.full((3, 1), -7, dtype=torch.int64)
    chosen = torch.full((3, 6), -1, dtype=torch.int64)
    pos = torch.tensor([4])

    def run() -> torch.Tensor:
        if pick == "kernel":
            return K.pick_token(logits, block=64, feed=(tokens, chosen, pos))
        return K.pick_token_ref(logits, feed=(tokens, chosen, pos))

    out = run()
    assert out.view(-1).tolist() == [17, 199, 64] and tokens.view(-1).tolist() == [17, 199, 64]
    assert chosen[:, 4].tolist() == [17, 199, 64] and int(pos) == 5
    assert (chosen[:, :4] == -1).all() and (chosen[:, 5] == -1).all()
    logits[1, 3] = 5.0
    run()  # at the last slot: written there, the position stays (the host checks the room first)
    assert chosen[:, 5].tolist() == [17, 3, 64] and int(pos) == 5
    run()
    assert chosen[:, 5].tolist() == [17, 3, 64] and int(pos) == 5 and chosen[:, 4].tolist() == [17, 199, 64]


def test_pick_token_feed_refuses_bad_buffers() -> None:
    logits = torch.zeros(2, 100)
    good = (
        torch.zeros(2, 1, dtype=torch.int64),
        torch.zeros(2, 9, dtype=torch.int64),
        torch.zeros(1, dtype=torch.int64),
    )
    with pytest.raises(ValueError, match=r"feed's tokens must be int64 \[2, 1\]"):
        K.pick_token(logits, feed=(torch.zeros(2, 1, dtype=torch.int32), *good[1:]))
    with pytest.raises(ValueError, match=r"feed's chosen must be int64 \[2, slots\]"):
        K.pick_token(logits, feed=(good[0], torch.zeros(3, 9, dtype=torch.int64), good[2]))
    with pytest.raises(ValueError, match=r"feed's pos must be int64 \[1\]"):
        K.feed_back(torch.zeros(2, 1, dtype=torch.int64), *good[:2], torch.zeros((), dtype=torch.int64))


# ------------------------------------------------------------------------------------------ sm_90 compile
STREAMING = {
    "_attn_partial_kernel",
    "_moe_route_kernel",
    "_moe_up_kernel",
    "_moe_down_kernel",
    "_moe_down_split_kernel",
    "_pick_partial_kernel",
    "_linear_rows_kernel",
}


# ------------------------------------------------------------------------------------------ linear_rows
def test_linear_rows_by_hand() -> None:
    """Hand-computed products: row t of ``x`` is t+1 times the all-ones vector, row n of the weight holds n in
    each of its K entries, so ``y[t, n] = (t + 1) * n * K``; N and K off the block sizes (ragged tiles)."""
    rows, n, k = 3, 21, 37
    x = torch.arange(1, rows + 1, dtype=torch.float32)[:, None].expand(rows, k).contiguous()
    w = torch.arange(n, dtype=torch.float32)[:, None].expand(n, k).contiguous()
    out = K.linear_rows(x, w, block_n=8, block_k=16)
    want = torch.tensor([[(t + 1) * j * k for j in range(n)] for t in range(rows)], dtype=torch.float32)
    assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k", "blocks"), [(96, 64, (16, 32)), (40, 100, (8, 64)), (3840, 1280, (None, None))])
def test_linear_rows_match_a_float64_product(
    dtype: torch.dtype, n: int, k: int, blocks: tuple[int | None, int | None]
) -> None:
    """Against the float64 product rounded once to the dtype: float32 to float32 rounding, bf16 within one bf16
    rounding of the output (a float32 accumulator summed in another order than cuBLAS's); the real QKV size."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    out = K.linear_rows(x, w, block_n=blocks[0], block_k=blocks[1])
    exact = x.double() @ w.double().T
    assert out.dtype == dtype and out.shape == (2, n)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
    else:
        ulp = exact.abs().clamp_min(1e-3) * 2.0**-7  # one bf16 ulp at the value (8 significant bits)
        assert bool(((out.double() - exact).abs() <= ulp).all())


def test_linear_block_sizes_fill_an_h200() -> None:
    """The decode step's QKV (3,840 x 1,280) and o_proj (1,280 x 1,280) on 132 SMs: 4 weight rows of 256-wide K
    blocks per program (the H200 sweep's fastest), i.e. 960 and 320 programs at one row."""
    assert K.linear_block_sizes(3840, 1280, 132) == (4, 256)
    assert K.linear_block_sizes(1280, 1280, 132) == (4, 256)
    # a narrow projection keeps ~2 programs per SM instead: 512 outputs -> 1 row per program, 512 programs
    assert K.linear_block_sizes(512, 1280, 132) == (1, 256)


def test_linear_rows_rejects_bad_input() -> None:
    x, w = torch.zeros(1, 8), torch.zeros(4, 8)
    with pytest.raises(ValueError, match=r"x \[T, K\] and weight \[N, K\]"):
        K.linear_rows(x, torch.zeros(4, 9))
    with pytest.raises(ValueError, match="one dtype"):
        K.linear_rows(x, w.to(torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        K.linear_rows(x, torch.zeros(8, 4).T)


@pytest.fixture(scope="module")
def sm90() -> list[dict[str, Any]]:
    """``bench_kernels.py --sm90-check``: every kernel compiled for an H100 (sm_90) at the real sizes, no GPU.

    In a fresh process: compiling where Triton runs in interpreter mode fails (its library is built for the
    interpreter when ``triton`` is imported with ``TRITON_INTERPRET=1``).
    """
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 3):
        pytest.skip(f"ASTSource's signature format differs before Triton 3.3 (have {triton.__version__})")
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--sm90-check", "--json"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    results: list[dict[str, Any]] = json.loads(run.stdout.strip().splitlines()[-1])
    return results


def test_compiles_for_sm90(sm90: list[dict[str, Any]]) -> None:
    """Each kernel compiles for sm_90 without register spills (moe kernels at T=1 and T=8 block sizes; a float32
    model's grouped GEMMs too: at the bf16 blocks its up GEMM spilled 34,360 bytes a thread); the
    kernels streaming weights or K/V use 16-byte loads (scalar loads would cost several x in bandwidth)."""
    kernels = {r["kernel"] for r in sm90}
    assert kernels >= {"_add_rms_norm_kernel", "_rope_kv_write_kernel", "_attn_combine_kernel", *STREAMING}
    assert kernels >= {"_pick_partial_kernel", "_pick_final_kernel", "_ngram_ban_kernel"}
    for r in sm90:
        assert not r["error"], (r["kernel"], r["error"])
        if r["role"] not in ("launch", "float32"):  # a GPU test's or the probe's setting: held to shared memory
            continue
        assert r["spill_bytes"] in (0, None), r  # None: this Triton's ptxas was not found (cubin still built)
        if r["kernel"] in STREAMING:  # 16-byte loads, or 16-byte async copies where the loop is pipelined
            assert r["v4_loads"] > 0 or (r["constexprs"].get("STAGES") and r["cp_async_16"] > 0), r


def test_every_launch_fits_a_blocks_shared_memory_on_sm90(sm90: list[dict[str, Any]]) -> None:
    """Every kernel as launched (bf16 and a float32 model's grouped GEMMs, SAM's settings and the GPU tests' wide
    steps) needs at most the 232,448 bytes of shared memory a block may have on an H100 / H200, so a launch setting
    that cannot fit fails here, not first on a GPU (round 21: the float32 up GEMM at four stages asked for 294,912
    bytes; round 22: 256-wide SAM steps at three stages, 260,096).  The probe, round 22's launch rebuilt, must read
    over the limit: the oracle is the GPU's own refusal, so a check blind to it proves nothing."""
    from benchmarks.bench_kernels import SM90_MAX_SHARED

    assert SM90_MAX_SHARED == 227 * 1024  # compute capability 9.0's opt-in maximum per block (CUDA guide)
    probes = [r for r in sm90 if r["role"] == "probe"]
    assert len(probes) == 1 and probes[0]["shared_bytes"] > SM90_MAX_SHARED, probes
    float32 = [r for r in sm90 if r["role"] == "float32"]
    assert {r["constexprs"]["GATHER"] for r in float32} == {True, False}, float32  # the up and the down GEMM
    assert {(r["constexprs"]["BLOCK_N"], r["constexprs"]["ROWS"]) for r in sm90 if r["role"] == "test"} == {
        (256, 6),
        (256, 14),
    }
    over = [(r["kernel"], r["constexprs"], r["shared_bytes"]) for r in sm90 if r["role"] != "probe"]
    over = [o for o in over if o[2] is None or o[2] > SM90_MAX_SHARED]
    assert not over, over


def test_sam_attention_compiles_without_spills_for_sm90(sm90: list[dict[str, Any]]) -> None:
    """SAM's rel-pos kernel on v1's three grids (640-px tiles 40x40, the 1024-px view 64x64, 14x14 windows) and v2's
    768-px tiles: the defaults (one key row per step; the tiles' 8x8 patches), the several-rows settings and the
    patch settings the sweep weighs (both tables through one-hot products) compile for sm_90 without spills, its
    k/v loop pipelined (the per-row selects they replaced spilled 296-400 bytes at the 128-wide settings)."""
    rows = [r for r in sm90 if r["kernel"] == "sam_kernels._rel_pos_attention_kernel"]
    seen = {(r["constexprs"]["BLOCK_N"], r["constexprs"]["ROWS"], r["constexprs"]["PATCH_W"]) for r in rows}
    assert seen >= {(64, 1, 0), (16, 1, 0), (128, 3, 0), (64, 4, 0), (128, 9, 0), (64, 8, 8), (128, 16, 8)}, seen
    # the one-hot steps compile as launched, their position terms the score product's accumulator (BIAS_IN_MMA);
    # the 8x8 patches of the 40- and 64-wide grids hold no padding column (FULL: no select)
    one_hot = [r for r in rows if r["constexprs"]["ROWS"] > 1 or r["constexprs"]["PATCH_W"]]
    grid_48 = {r["constexprs"]["BLOCK_M"] for r in one_hot if not r["constexprs"]["BIAS_ACC"]}  # v2's tiles: 128
    assert one_hot and grid_48 <= {128}, one_hot
    full = {r["constexprs"]["BLOCK_N"] for r in one_hot if r["constexprs"].get("FULL")}
    assert 64 in full, full
    # the one-row steps also compile with the row's rel_h term in the max (ROW_TERM_IN_MAX, staged in round 22)
    shifted = {r["constexprs"]["BLOCK_N"] for r in rows if r["constexprs"].get("ROW_SHIFT")}
    assert shifted >= {16, 64}, shifted
    for r in rows:
        assert not r["error"], r
        assert r["role"] != "launch" or r["spill_bytes"] in (0, None), r  # the GPU tests' 256-wide steps spill
        assert r["cp_async_16"] > 0, r


def test_sam_tables_kernel_compiles_without_spills_for_sm90(sm90: list[dict[str, Any]]) -> None:
    """``sam_kernels.TABLES="triton"`` (the default): the tables' kernel, both tables, on v1's three grids and v2's
    768-px tiles (lines padded to 64, 64, 16 and 64 queries), compiles for sm_90 without spills."""
    rows = [r for r in sm90 if r["kernel"] == "sam_kernels._rel_pos_tables_kernel"]
    assert {(r["constexprs"]["SIDE"], r["constexprs"]["ROW_TABLE"]) for r in rows} == {
        (side, row) for side in (64, 16) for row in (True, False)
    }
    assert len(rows) == 8
    for r in rows:
        assert not r["error"] and r["spill_bytes"] in (0, None), r


def test_sam_gather_tables_kernel_compiles_without_spills_for_sm90(sm90: list[dict[str, Any]]) -> None:
    """``sam_kernels.TABLES="gather"``: both tables in one launch, at ``GATHER_BLOCK`` and at 128 queries, on every
    SAM grid (position tables padded to 128 rows at the 40-, 48- and 64-wide grids, 32 at the windows), compiles
    for sm_90 without spills."""
    from llm_perf_opt.models.deepseek_ocr import sam_kernels

    rows = [r for r in sm90 if r["kernel"] == "sam_kernels._rel_pos_tables_gather_kernel"]
    seen = {(r["constexprs"]["BLOCK"], r["constexprs"]["PH_PAD"]) for r in rows}
    assert seen == {(block, pad) for block in (sam_kernels.GATHER_BLOCK[0], 128) for pad in (128, 32)}, seen
    for r in rows:
        assert not r["error"] and r["spill_bytes"] in (0, None), r


def test_one_launch_attention_orders_its_partials(sm90: list[dict[str, Any]]) -> None:
    """The one-launch attention (``decode_attention(counters=...)``): its counter add is acq_rel at GPU scope (the
    last split must see every other split's partials), it re-arms the counter, and it reads the partials past L1;
    the two-launch variant has no atomics at all."""
    fused = [r for r in sm90 if r["kernel"] == "_attn_partial_kernel" and r["constexprs"].get("FUSED_COMBINE")]
    plain = [r for r in sm90 if r["kernel"] == "_attn_partial_kernel" and not r["constexprs"].get("FUSED_COMBINE")]
    assert fused and plain
    for r in fused:
        assert "gpu.acq_rel.add.u32" in r["atomics"] and "gpu.relaxed.exch.b32" in r["atomics"], r
        assert r["cg_loads"] >= 3, r  # the splits' maxima, sums and accumulators
    assert all(r["atomics"] == [] for r in plain)


def test_split_down_orders_its_partials(sm90: list[dict[str, Any]]) -> None:
    """The split down form (``moe_experts(down="split")``), pipelined and plain: its counter add is acq_rel at GPU
    scope (the last slot must see every other slot's ``y``), it re-arms the counter, and it reads the 8 slots' ``y``
    past L1; the rows form has no atomics."""
    split = [r for r in sm90 if r["kernel"] == "_moe_down_split_kernel"]
    assert {r["constexprs"]["STAGES"] for r in split} == {0, 2}
    for r in split:
        assert "gpu.acq_rel.add.u32" in r["atomics"] and "gpu.relaxed.exch.b32" in r["atomics"], r
        assert r["cg_loads"] >= 8, r  # one per slot: 6 routed + 2 shared
    assert all(r["atomics"] == [] for r in sm90 if r["kernel"] == "_moe_down_kernel")


def test_norm_route_orders_its_logits_and_reads_only_weights_early(sm90: list[dict[str, Any]]) -> None:
    """The fused norm + router: its counter add is acq_rel at GPU scope (the last program must see every other
    program's logits), it re-arms the counter and reads the logits past L1; as a dependent launch it loads the
    router rows and norm weight before the wait (no kernel of the step writes them) and the rows after it.  Four
    forms: the single-page step's (counted), plain and dependent, and the batched steps' (no counts, dependent) at
    one and four rows a program, each of those rows routed by the same atomics."""
    rows = [r for r in sm90 if r["kernel"] == "_norm_route_kernel"]
    forms = {(r["constexprs"]["HAS_COUNTS"], r["constexprs"]["ROWS"], r["constexprs"]["USE_GDC"]) for r in rows}
    assert len(rows) == 4 and forms == {(True, 1, False), (True, 1, True), (False, 1, True), (False, 4, True)}
    for r in rows:
        assert "gpu.acq_rel.add.u32" in r["atomics"] and "gpu.relaxed.exch.b32" in r["atomics"], r
        assert r["cg_loads"] >= 1, r
    for pdl in [r for r in rows if r["constexprs"]["USE_GDC"]]:
        # 4 router rows x 2,048 (1,280 live) float32 + 2,048 bf16 at 4 warps: 16-byte loads, several per thread
        assert pdl["loads_before_wait"] >= 4, pdl


def test_dependent_launch_variants_wait_before_they_read(sm90: list[dict[str, Any]]) -> None:
    """``infer.fast.pdl``: every kernel also compiles as a programmatic dependent launch, with both grid-dependency
    instructions in its PTX (the wait, without which a dependent launch could read the previous kernel's outputs
    early); the plain variants hold neither (a stray wait would be harmless, a missing one a race)."""
    pdl = {r["kernel"]: r for r in sm90 if r["constexprs"].get("USE_GDC", False)}
    # every kernel has its dependent-launch variant, but SAM's and CLIP's (they run inside the compiled vision blocks,
    # never under kernels.dependent_launches, and have no USE_GDC)
    vision = {
        "sam_kernels._rel_pos_attention_kernel",
        "sam_kernels._rel_pos_tables_kernel",
        "sam_kernels._rel_pos_tables_gather_kernel",
        "clip_attention._views_attention_kernel",
    }
    assert set(pdl) == {r["kernel"] for r in sm90} - vision
    for r in pdl.values():
        assert not r["error"] and r["spill_bytes"] in (0, None), r
        assert r["griddepcontrol"] == ["launch_dependents", "wait"], r
        early = ("_linear_rows_kernel", "_qkv_rope_kernel", "_norm_route_kernel")  # weights only (tests below)
        if r["kernel"] not in early:  # nothing read before the wait
            assert r["loads_before_wait"] == 0, r


def test_linear_rows_loads_its_weights_before_the_wait(sm90: list[dict[str, Any]]) -> None:
    """As a dependent launch, ``linear_rows`` issues its weight loads (a QKV program: 4 rows x 1,280 bf16 in
    16-byte loads = 5 per thread at 4 warps) before ``griddepcontrol.wait``, and the activation row after it."""
    (r,) = [r for r in sm90 if r["kernel"] == "_linear_rows_kernel" and r["constexprs"].get("USE_GDC", False)
            and r["constexprs"]["BLOCK_N"] == 4 and r["num_warps"] == 4][:1]  # fmt: skip
    assert r["loads_before_wait"] >= 5 and r["v4_loads"] > r["loads_before_wait"] - 1, r
    (fused,) = [r for r in sm90 if r["kernel"] == "_qkv_rope_kernel" and r["constexprs"].get("USE_GDC", False)]
    assert fused["loads_before_wait"] >= 5, fused  # qkv_rope: the same weight tiles, ahead of the wait too
    for r in sm90:
        if not r["constexprs"].get("USE_GDC", False):
            assert r["griddepcontrol"] == [], r


def test_prompt_kernels_compile_pipelined_for_sm90(sm90: list[dict[str, Any]]) -> None:
    """The prefill's kernels (``prompt_moe``, ``prompt_attention``) at their GPU defaults, with the launcher's
    divisibility hints: every one compiles without spills, and the grouped GEMMs' and the attention's loops are
    software-pipelined through 16-byte async copies (without the hints they were neither vectorised nor
    pipelined: the check must pass them)."""
    rows = [r for r in sm90 if r["kernel"].startswith(("prompt_moe.", "prompt_attention."))]
    assert {r["kernel"] for r in rows} == {
        "prompt_moe._align_hist_kernel",
        "prompt_moe._align_place_kernel",
        "prompt_moe._grouped_gemm_kernel",
        "prompt_attention._prompt_attention_kernel",
    }
    for r in rows:
        assert not r["error"], r
        # a float32 model's grouped GEMM (at the bf16 blocks, fewer stages) spills: a correctness path
        assert r["role"] == "float32" or r["spill_bytes"] in (0, None), r
        if r["kernel"].endswith(("_grouped_gemm_kernel", "_prompt_attention_kernel")):
            assert r["cp_async_16"] > 0, r
    # prompt_moe.W_TMA: the weight tiles come through TMA copies (the gathered A rows keep their async copies);
    # without it, none
    gemms = [r for r in rows if r["kernel"].endswith("_grouped_gemm_kernel")]
    assert {r["constexprs"]["W_TMA"] for r in gemms} == {False, True}
    for r in gemms:
        assert (r["tma_copies"] > 0) == r["constexprs"]["W_TMA"], r


# ------------------------------------------------------------------------------------------ ngram_ban
def _planted_history(gen: torch.Generator, rows: int, width: int, vocab: int, n: int) -> torch.Tensor:
    """Random ids from a small alphabet (so short n-grams repeat by chance) with the first ``n + 1`` ids copied to
    the row's end (so the full row repeats an ``n``-gram whatever ``n``)."""
    hist = torch.randint(0, 6, (rows, width), generator=gen) * (vocab // 6)
    hist[:, width - n - 1 :] = hist[:, : n + 1].clone()
    return hist


@pytest.mark.parametrize(("n", "window"), [(1, None), (2, None), (3, None), (3, 9), (20, None), (1, 7)])
def test_ngram_ban_is_the_host_rule_and_the_torch_mask(n: int, window: int | None) -> None:
    """Per row, the banned ids are the host rule's (``banned_ngram_tokens`` over the row's first ``length`` ids:
    the HF semantics) and the mask is the torch device mask's bit for bit; lengths per row and shared, the
    decoder's ``length_offset``, a length too short for the rule, and the exempt ids."""
    from llm_perf_opt.models.deepseek_ocr.generation import NoRepeatNGram, banned_ngram_mask, banned_ngram_tokens

    gen = torch.Generator().manual_seed(11 + n)
    vocab, width = 600, 48
    hist = _planted_history(gen, 4, width, vocab, n)
    hist[3, 20:] = vocab  # batched_decode's history fill past a row's ids: never a token to ban
    lengths = torch.tensor([48, 30, n - 1 if n > 1 else 0, 41])  # row 2: one short of the rule (nothing banned)
    got = K.ngram_ban(hist, lengths, n, vocab, window=window)
    # the loops over several blocks (the interpreter's default blocks take a test's row at once), and a strided length
    assert torch.equal(K.ngram_ban(hist, lengths, n, vocab, window=window, blocks=(4, 64)), got)
    strided = torch.stack([lengths, torch.zeros_like(lengths)], dim=1)[:, 0]
    assert torch.equal(K.ngram_ban(hist, strided, n, vocab, window=window, blocks=(4, 64)), got)
    for r in range(4):
        length = int(lengths[r])
        # ids past the vocabulary (row 3's fill) are no token: the mask has no column for them
        expected = [t for t in banned_ngram_tokens(hist[r, :length].tolist(), n, window=window) if t < vocab]
        assert got[r].nonzero().view(-1).tolist() == expected, r
    rule = NoRepeatNGram(n=n, window=window)
    assert torch.equal(got, banned_ngram_mask(hist, lengths, rule, vocab))
    assert not got[2].any()  # the short row: nothing
    # the planted copy: the row's last n - 1 ids are ids 2 .. n, which ids 2 .. n + 1 continued with id n + 1
    assert window is not None or bool(got[0, int(hist[0, n + 1])])
    shared = K.ngram_ban(hist, torch.tensor([39]), n, vocab, window=window, length_offset=1)  # the decoder's pos + 1
    assert torch.equal(shared, banned_ngram_mask(hist, torch.tensor([40]), rule, vocab))
    ids = [int(i) for i in got[0].nonzero().view(-1)[:2]]
    some = (*ids, vocab + 5)  # an id past the vocabulary is ignored
    exempt = K.ngram_ban(hist, lengths, n, vocab, window=window, exempt_ids=some)
    assert torch.equal(
        exempt, banned_ngram_mask(hist, lengths, NoRepeatNGram(n=n, window=window, exempt_ids=some), vocab)
    )
    assert not exempt[:, ids].any()


@pytest.mark.parametrize(
    ("ids", "n", "window", "banned"),
    [
        ([1, 2, 3, 3], 2, None, [3]),  # the last window (3, 3) counts: greedy's commonest loop, "x x" bans x
        ([5, 6, 1, 2, 5], 2, 5, [6]),  # the window starting exactly `window` positions back counts
        ([5, 6, 1, 2, 5], 2, 4, []),  # one position short: it does not
        ([7, 8, 9, 7, 8], 3, None, [9]),
        ([7, 8, 9, 7, 8], 3, 2, []),
    ],
)
def test_ngram_ban_at_the_edges_by_hand(ids: list[int], n: int, window: int | None, banned: list[int]) -> None:
    """Hand-worked edges of the windows (the last one, the first inside ``window``), checked against the host
    rule too."""
    from llm_perf_opt.models.deepseek_ocr.generation import banned_ngram_tokens

    assert banned_ngram_tokens(ids, n, window=window) == banned
    got = K.ngram_ban(torch.tensor([ids]), torch.tensor([len(ids)]), n, 12, window=window, blocks=(2, 4))
    assert got[0].nonzero().view(-1).tolist() == banned


def test_ngram_ban_leaves_ids_outside_the_scope_unbanned() -> None:
    """Negative ids (positions outside the rule's scope: the prompt under scope ``output``) are never banned, and a
    window holding them matches only where the torch mask's comparison does; n = 0 bans nothing."""
    from llm_perf_opt.models.deepseek_ocr.generation import banned_ngram_mask

    hist = torch.tensor([[-1, -1, -1, 4, 5, 4, 5, 4, -1, 4]])
    for n in (1, 2, 3):
        got = K.ngram_ban(hist, torch.tensor([10]), n, 8)
        assert torch.equal(got, banned_ngram_mask(hist, torch.tensor([10]), n, 8)), n
    # by hand, n = 2 over [.., 4, 5, 4, 5, 4, -1, 4]: the last token 4 was followed by 5 (twice) and by -1 (not an id)
    assert K.ngram_ban(hist, torch.tensor([10]), 2, 8)[0].nonzero().view(-1).tolist() == [5]
    assert not K.ngram_ban(hist, torch.tensor([10]), 0, 8).any()
    # a length past the history's width reads as the width (no read past the row)
    assert torch.equal(K.ngram_ban(hist, torch.tensor([50]), 2, 8), K.ngram_ban(hist, torch.tensor([10]), 2, 8))
    with pytest.raises(ValueError, match="history must be int64"):
        K.ngram_ban(hist.int(), torch.tensor([10]), 2, 8)
    with pytest.raises(ValueError, match="length must be int64"):
        K.ngram_ban(hist, torch.tensor([10, 10]), 2, 8)
