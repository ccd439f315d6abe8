"""The prompt's causal attention kernel (``prompt_attention``) on CPU through Triton's interpreter.

Oracle: the attention written out in float64 (scores, the causal mask by absolute position, softmax, the weighted
sum of values), with kv heads repeated for GQA.  Cases: a prompt at column 0 and one continuing the cache
(``start > 0``, so the unmasked key blocks and the diagonal ones both run), prompt lengths that are not multiples of
the query or key blocks, GQA, a strided q (the rotary kernel's view), float32 and bf16.  ``tests/conftest.py``
imports the module with ``TRITON_INTERPRET=1`` on machines without CUDA; elsewhere these tests skip.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from llm_perf_opt.models.deepseek_ocr import prompt_attention as PA
from llm_perf_opt.models.deepseek_ocr.kernels import KernelUnavailableError

pytestmark = pytest.mark.skipif(
    not PA.INTERPRETED, reason="prompt_attention was imported compiled-mode (a CUDA machine runs the GPU tests)"
)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    bsz, length, heads, dim = q.shape
    group = heads // k.shape[1]
    out = torch.empty(bsz, length, heads, dim, dtype=torch.float64)
    for b in range(bsz):
        for h in range(heads):
            kk, vv = k[b, h // group].double(), v[b, h // group].double()
            for i in range(length):
                pos = start + i
                scores = kk[: pos + 1] @ q[b, i, h].double() / dim**0.5
                out[b, i, h] = torch.softmax(scores, 0) @ vv[: pos + 1]
    return out


@pytest.mark.parametrize(
    ("bsz", "length", "heads", "kv_heads", "dim", "start", "dtype", "blocks"),
    [
        (2, 37, 4, 2, 32, 0, torch.float32, None),
        (1, 20, 2, 2, 16, 13, torch.float32, None),
        (1, 45, 2, 1, 32, 21, torch.float32, (32, 16, 4, 1)),  # several unmasked key blocks per query block
        (2, 33, 4, 4, 32, 5, torch.bfloat16, None),
    ],
)
@pytest.mark.parametrize("split", [0, 2])  # one program per query block; the split form (chunks of two steps)
def test_matches_the_float64_causal_attention(
    split: int,
    bsz: int,
    length: int,
    heads: int,
    kv_heads: int,
    dim: int,
    start: int,
    dtype: torch.dtype,
    blocks: tuple[int, int, int, int] | None,
) -> None:
    if split and blocks is not None and blocks[0] > blocks[1]:
        pytest.skip("the split form needs block_m <= block_n (its refusal: test_split_form_refusals)")
    gen = torch.Generator().manual_seed(length + start)
    slots = start + length + 7  # the cache holds more positions than the prompt reaches
    qkv = torch.randn(bsz, length, heads + 2 * kv_heads, dim, generator=gen).to(dtype)
    q = qkv[:, :, :heads]  # a strided view, as the rotary kernel hands it over
    k = torch.randn(bsz, kv_heads, slots, dim, generator=gen).to(dtype)
    v = torch.randn(bsz, kv_heads, slots, dim, generator=gen).to(dtype)
    out = PA.prompt_attention(q, k, v, start, blocks, split_steps=split)
    assert out.shape == (bsz, length, heads, dim) and out.is_contiguous() and out.dtype == dtype
    want = _oracle(q, k, v, start)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: P is rounded for the P·V product, as in flash attention
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    ref = PA.prompt_attention_ref(q.double(), k.double(), v.double(), start)  # SDPA with the position mask
    torch.testing.assert_close(ref, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("length", "start", "split"),
    [
        (100, 0, 2),  # seven 16-key steps in the last block: four chunks
        (100, 0, 3),
        (90, 7, 2),  # a start off the key blocks: two masked steps per block
        (33, 31, 2),  # start + first row + 1 on a key block's edge: the diagonal step unseen by the first row
        (100, 16, 5),
        (20, 0, 8),  # no block long enough to split: one chunk each, written directly
    ],
)
def test_split_form_matches_the_float64_causal_attention(length: int, start: int, split: int) -> None:
    """The split form (a query block's keys in chunks of ``split`` steps, merged by the chunk that ends last) at
    16-wide blocks, against the float64 oracle; the kept counters are back at zero after every call, and a
    second call with them gives the same output."""
    gen = torch.Generator().manual_seed(length * 3 + start)
    heads, dim = 2, 16
    q = torch.randn(1, length, heads, dim, generator=gen)
    k = torch.randn(1, 1, start + length + 3, dim, generator=gen)
    v = torch.randn(1, 1, start + length + 3, dim, generator=gen)
    counters = PA.split_counters(1, heads, length, "cpu", block_m=16)
    out = PA.prompt_attention(q, k, v, start, (16, 16, 4, 1), split_steps=split, counters=counters)
    torch.testing.assert_close(out.double(), _oracle(q, k, v, start), rtol=1e-5, atol=1e-5)
    assert int(counters.abs().sum()) == 0
    again = PA.prompt_attention(q, k, v, start, (16, 16, 4, 1), split_steps=split, counters=counters)
    assert torch.equal(again, out)


def test_a_batch_stride_past_2_31_elements_is_addressed_in_int64() -> None:
    """k / v views of one storage with a batch stride of 2**30 + 2**20 elements (below 2**31, so Triton passes it
    as int32), 3 rows: row 2's base, 2.15e9 elements in, wrapped in int32 before round 29 (the cache of 64 rows at
    ~26k columns).  Only the viewed elements are touched (``torch.empty``: the rest is never committed)."""
    stride, heads, cols, dim = 2**30 + 2**20, 2, 8, 16
    assert stride < 2**31 < 2 * stride
    gen = torch.Generator().manual_seed(29)
    views = []
    for _ in range(2):
        storage = torch.empty(2 * stride + heads * cols * dim, dtype=torch.bfloat16)  # 4.3 GB, a few pages touched
        view = storage.as_strided((3, heads, cols, dim), (stride, cols * dim, dim, 1))
        view.copy_(torch.randn(3, heads, cols, dim, generator=gen))
        views.append(view)
    k, v = views
    q = torch.randn(3, 5, heads, dim, generator=gen).bfloat16()
    out = PA.prompt_attention(q, k, v, 2)
    torch.testing.assert_close(out.double(), _oracle(q, k, v, 2), rtol=2e-2, atol=2e-2)  # bf16 P, as above


def test_split_form_refusals() -> None:
    q = torch.randn(1, 40, 2, 16)
    k = v = torch.randn(1, 2, 48, 16)
    with pytest.raises(ValueError, match="0 \\(off\\) or >= 2"):
        PA.prompt_attention(q, k, v, 0, (16, 16, 4, 1), split_steps=1)
    with pytest.raises(ValueError, match="block_m <= block_n"):
        PA.prompt_attention(q, k, v, 0, (32, 16, 4, 1), split_steps=2)
    with pytest.raises(ValueError, match="see split_counters"):
        PA.prompt_attention(q, k, v, 0, (16, 16, 4, 1), split_steps=2, counters=torch.zeros(2, dtype=torch.int32))


def test_bad_inputs_are_refused_with_what_to_fix() -> None:
    q = torch.randn(1, 8, 4, 16)
    k = v = torch.randn(1, 2, 12, 16)
    with pytest.raises(ValueError, match="do not fit the 12 cached positions"):
        PA.prompt_attention(q, k, v, 5)
    with pytest.raises(ValueError, match="heads a multiple of kv_heads"):
        PA.prompt_attention(torch.randn(1, 8, 3, 16), k, v, 0)
    with pytest.raises(ValueError, match="unit stride"):
        PA.prompt_attention(torch.randn(1, 8, 16, 4).transpose(2, 3), k, v, 0)
    with pytest.raises(ValueError, match="at least 16"):
        PA.prompt_attention(q, k, v, 0, (8, 16, 4, 1))
    with pytest.raises(ValueError, match=r"q \[B, L, heads, D\]"):
        PA.prompt_attention(q[0], k, v, 0)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        PA.prompt_attention(torch.randn(1, 4, 2, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), 0)
