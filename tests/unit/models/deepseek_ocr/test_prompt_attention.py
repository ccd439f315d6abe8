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
def test_matches_the_float64_causal_attention(
    bsz: int,
    length: int,
    heads: int,
    kv_heads: int,
    dim: int,
    start: int,
    dtype: torch.dtype,
    blocks: tuple[int, int, int, int] | None,
) -> None:
    gen = torch.Generator().manual_seed(length + start)
    slots = start + length + 7  # the cache holds more positions than the prompt reaches
    qkv = torch.randn(bsz, length, heads + 2 * kv_heads, dim, generator=gen).to(dtype)
    q = qkv[:, :, :heads]  # a strided view, as the rotary kernel hands it over
    k = torch.randn(bsz, kv_heads, slots, dim, generator=gen).to(dtype)
    v = torch.randn(bsz, kv_heads, slots, dim, generator=gen).to(dtype)
    out = PA.prompt_attention(q, k, v, start, blocks)
    assert out.shape == (bsz, length, heads, dim) and out.is_contiguous() and out.dtype == dtype
    want = _oracle(q, k, v, start)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: P is rounded for the P·V product, as in flash attention
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    ref = PA.prompt_attention_ref(q.double(), k.double(), v.double(), start)  # SDPA with the position mask
    torch.testing.assert_close(ref, want, rtol=1e-9, atol=1e-9)


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
