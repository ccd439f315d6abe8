"""CLIP's attention over a page's views in one kernel (``clip_attention``) on CPU through Triton's interpreter.

Oracle: the attention written out in float64 per image (scores of the image's own tokens, softmax, the weighted sum
of its values), reading q, k and v from the QKV rows by hand.  Cases: two views whose lengths are not multiples of
the query or key blocks (the masked last key block), one view, an image shorter than a block, several whole key
blocks, float32 and bf16.  The block through the kernel is checked against CLIP's modules as written.
``tests/conftest.py`` imports the module with ``TRITON_INTERPRET=1`` on machines without CUDA; elsewhere these tests
skip.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from llm_perf_opt.models.deepseek_ocr import clip_attention as CA
from llm_perf_opt.models.deepseek_ocr.clip import ClipVisionTower, clip_block_fast, clip_block_views, clip_block_weights
from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig
from llm_perf_opt.models.deepseek_ocr.kernels import KernelUnavailableError
from tests.conftest import TINY

pytestmark = pytest.mark.skipif(
    not CA.INTERPRETED, reason="clip_attention was imported compiled-mode (a CUDA machine runs the GPU tests)"
)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _oracle(qkv: torch.Tensor, views: tuple[tuple[int, int], ...], heads: int) -> torch.Tensor:
    rows, width = qkv.shape
    dim = width // 3
    hd = dim // heads
    x = qkv.double()
    out = torch.zeros(rows, dim, dtype=torch.float64)
    start = 0
    for n, s in views:
        for _ in range(n):
            for h in range(heads):
                q = x[start : start + s, h * hd : (h + 1) * hd]
                k = x[start : start + s, dim + h * hd : dim + (h + 1) * hd]
                v = x[start : start + s, 2 * dim + h * hd : 2 * dim + (h + 1) * hd]
                out[start : start + s, h * hd : (h + 1) * hd] = torch.softmax(q @ k.T / hd**0.5, dim=1) @ v
            start += s
    return out


@pytest.mark.parametrize(
    ("views", "heads", "head_dim", "dtype", "blocks"),
    [
        (((3, 21), (1, 37)), 2, 16, torch.float32, None),  # crops then a global view, both past a block's end
        (((2, 16),), 4, 32, torch.float32, None),  # one view, whole blocks only
        (((1, 5), (2, 33)), 2, 16, torch.float32, None),  # an image shorter than one block
        (((2, 70),), 2, 16, torch.float32, (32, 16, 4, 1)),  # several whole key blocks, then the partial one
        (((3, 21), (1, 37)), 2, 16, torch.bfloat16, None),
    ],
)
def test_matches_the_float64_attention_per_image(
    views: tuple[tuple[int, int], ...],
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    blocks: tuple[int, int, int, int] | None,
) -> None:
    rows = sum(n * s for n, s in views)
    gen = torch.Generator().manual_seed(rows)
    qkv = torch.randn(rows, 3 * heads * head_dim, generator=gen).to(dtype)
    out = CA.views_attention(qkv, views, heads, blocks)
    assert out.shape == (rows, heads * head_dim) and out.is_contiguous() and out.dtype == dtype
    want = _oracle(qkv, views, heads)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: P is rounded for the P·V product, as in flash attention
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    # the per-view SDPA form (the "sdpa" choice) against the same oracle
    torch.testing.assert_close(CA.views_attention_ref(qkv.double(), views, heads), want, rtol=1e-9, atol=1e-9)


def test_bad_inputs_are_refused_with_what_to_fix() -> None:
    qkv = torch.randn(30, 3 * 2 * 16)
    with pytest.raises(ValueError, match="hold 29 tokens, but qkv has 30 rows"):
        CA.views_attention(qkv, ((1, 29),), 2)
    with pytest.raises(ValueError, match="at most two views"):
        CA.views_attention(qkv, ((1, 10), (1, 10), (1, 10)), 2)
    with pytest.raises(ValueError, match="positive counts"):
        CA.views_attention(qkv, ((0, 10), (1, 30)), 2)
    with pytest.raises(ValueError, match="power of two >= 16"):
        CA.views_attention(qkv, ((1, 30),), 3)
    with pytest.raises(ValueError, match="contiguous"):
        CA.views_attention(torch.randn(3 * 2 * 16, 30).T, ((1, 30),), 2)
    with pytest.raises(ValueError, match="at least 16"):
        CA.views_attention(qkv, ((1, 30),), 2, (8, 16, 4, 1))
    with pytest.raises(ValueError, match="positive counts"):
        CA.views_attention_ref(qkv, (), 2)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        CA.views_attention(torch.randn(8, 96), ((1, 8),), 2)
    assert "TRITON_INTERPRET=1" in CA.unavailable_reason("cpu")


def _tiny_block() -> tuple[DeepseekOCRConfig, torch.nn.Module]:
    """The tiny fixture's first CLIP block with seeded weights (4 heads of 16)."""
    cfg = DeepseekOCRConfig.from_json(TINY / "config.json")
    torch.manual_seed(5)
    tower = ClipVisionTower(cfg.clip).eval()
    with torch.no_grad():
        for p in tower.parameters():
            p.normal_(0.0, 0.3)
    return cfg, tower.transformer.layers[0]


def test_the_block_through_the_kernel_equals_the_modules_per_view() -> None:
    """A page-like pair of views through ``clip_block_views(attention="triton")`` (and ``clip_block_fast``, its
    one-view form) equals CLIP's block module run on each view alone; an unknown kind is refused."""
    cfg, blk = _tiny_block()
    weights = clip_block_weights(blk)
    heads, eps1, eps2 = blk.self_attn.num_heads, blk.layer_norm1.eps, blk.layer_norm2.eps
    dim = cfg.clip.hidden_size
    crops, whole = torch.randn(3, 11, dim), torch.randn(1, 19, dim)
    with torch.no_grad():
        want_crops, want_whole = blk(crops), blk(whole)
        for kind in ("triton", "sdpa"):
            joint = clip_block_views(
                torch.cat((crops.reshape(33, dim), whole.reshape(19, dim))),
                weights, heads, eps1, eps2, ((3, 11), (1, 19)), attention=kind,
            )  # fmt: skip
            torch.testing.assert_close(joint[:33].view(3, 11, dim), want_crops, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(joint[33:].view(1, 19, dim), want_whole, rtol=1e-5, atol=1e-5)
            one = clip_block_fast(crops, weights, heads, eps1, eps2, attention=kind)
            torch.testing.assert_close(one, want_crops, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"one of \('sdpa', 'triton'\), got 'flash'"):
            clip_block_fast(crops, weights, heads, eps1, eps2, attention="flash")
