"""SAM's rel-pos attention kernel (``sam_kernels``) at the real view shapes on a GPU, against the float32 reference.

The oracle is the reference's math in float32: ``decomposed_rel_pos_bias`` + SDPA with the dense [N, N] bias.  The
kernel's bf16 result must be as close to it as bf16 allows: within twice the error of the augmented flash path (an
independent bf16 implementation of the same logits) plus a quarter bf16 step of the largest output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_perf_opt.models.deepseek_ocr.sam import decomposed_rel_pos_bias, rel_pos_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

HEADS, DIM = 12, 64  # SAM-B


@pytest.mark.parametrize(
    ("batch", "grid", "block_n", "patch_w"),
    # v1 640-px tiles, the 1024-px global view, v2 768-px tiles, 14x14 windows; one key row per step (block_n 0:
    # the default) and several (3, 2, 2 rows of 128; 4 and 9 rows of a window, the last step partial; a whole window
    # in one 256-wide step; 6 rows of 40 in 256), their position terms through one-hot products; patches of 8 key
    # columns (8x8 in 64 keys; 16x8 in 128, 40 rows = 16+16+8)
    [
        (6, 40, 0, 0),
        (6, 40, 128, 0),
        (6, 40, 256, 0),
        (6, 40, 64, 8),
        (6, 40, 128, 8),
        (1, 64, 0, 0),
        (1, 64, 128, 0),
        (6, 48, 0, 0),
        (6, 48, 128, 0),
        (6, 48, 64, 8),
        (2, 14, 0, 0),
        (54, 14, 64, 0),
        (25, 14, 128, 0),
        (54, 14, 256, 0),
    ],
)
def test_matches_float32_dense_bias_at_real_sizes(batch: int, grid: int, block_n: int, patch_w: int) -> None:
    from llm_perf_opt.models.deepseek_ocr import sam_kernels

    gen = torch.Generator(device="cuda").manual_seed(grid)
    n = grid * grid
    qkv = torch.randn(batch, n, 3, HEADS, DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # the block's strided views
    rel_h = (torch.randn(127, DIM, device="cuda", generator=gen) * 0.5).bfloat16()  # a 64-grid table, resampled
    rel_w = (torch.randn(127, DIM, device="cuda", generator=gen) * 0.5).bfloat16()
    with torch.inference_mode():
        bias = decomposed_rel_pos_bias(q.float(), rel_h.float(), rel_w.float(), (grid, grid), (grid, grid))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)
        del bias
        out = sam_kernels.rel_pos_triton_attention(
            q, k, v, rel_h, rel_w, (grid, grid), block_n=block_n, patch_w=patch_w
        )
        aug = rel_pos_attention(q, k, v, rel_h, rel_w, (grid, grid))
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert bool(torch.isfinite(out).all())
    err = float((out.float() - ref).abs().max())
    err_aug = float((aug.float() - ref).abs().max())
    step = float(ref.abs().max()) * 2.0**-8  # one bf16 step at the largest output
    assert err <= 2 * err_aug + step / 4, (err, err_aug, step)


def test_in_a_cuda_graph_under_torch_compile() -> None:
    """Compiled (the custom op is opaque to inductor) and captured in a CUDA graph, the kernel gives the eager
    launch's result bit for bit on new inputs copied into the graph's buffers."""
    from llm_perf_opt.models.deepseek_ocr import sam_kernels

    grid, batch = 40, 2
    gen = torch.Generator(device="cuda").manual_seed(0)

    def inputs() -> tuple[torch.Tensor, ...]:
        shape = (batch, HEADS, grid * grid, DIM)
        return tuple(torch.randn(shape, device="cuda", generator=gen).bfloat16() for _ in range(3))

    rel_h = torch.randn(79, DIM, device="cuda", generator=gen).bfloat16()
    rel_w = torch.randn(79, DIM, device="cuda", generator=gen).bfloat16()

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sam_kernels.rel_pos_triton_attention(q, k, v, rel_h, rel_w, (grid, grid)) * 1.0

    compiled = torch.compile(fn, dynamic=False)
    static = inputs()
    with torch.inference_mode():
        for _ in range(2):
            compiled(*static)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = compiled(*static)
        for _ in range(2):
            fresh = inputs()
            for dst, src in zip(static, fresh, strict=True):
                dst.copy_(src)
            graph.replay()
            assert torch.equal(out, fn(*fresh))


def _gelu_tanh_float64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 0.5 * x * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))


def test_linear_gelu_epilogue_is_the_tanh_gelu() -> None:
    """cuBLASLt's GELU epilogue (``sam.linear_gelu_tanh``) at SAM's MLP shape: float32 operands (no TF32) give the
    float64 tanh-GELU of the GEMM to float32 rounding, measurably closer than to the exact (erf) GELU (what the
    docstring claims it computes); bf16 operands are within one bf16 step of the largest output of the float64 tanh
    GELU of their own GEMM."""
    from llm_perf_opt.models.deepseek_ocr.sam import linear_gelu_tanh

    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(4096, 768, device="cuda", generator=gen)
    w = torch.randn(3072, 768, device="cuda", generator=gen) * 768**-0.5
    b = torch.randn(3072, device="cuda", generator=gen) * 0.5
    pre = x.double() @ w.double().T + b.double()
    tanh_ref, exact_ref = _gelu_tanh_float64(pre), F.gelu(pre)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = linear_gelu_tanh(x, w, b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    err_tanh = float((out.double() - tanh_ref).abs().max())
    err_exact = float((out.double() - exact_ref).abs().max())
    assert err_tanh < 1e-4 and err_tanh < err_exact / 4, (err_tanh, err_exact)
    x16, w16, b16 = x.bfloat16(), w.bfloat16(), b.bfloat16()
    out16 = linear_gelu_tanh(x16, w16, b16)
    assert out16.dtype == torch.bfloat16
    ref16 = _gelu_tanh_float64(x16.double() @ w16.double().T + b16.double())  # of the bf16 operands
    step = float(ref16.abs().max()) * 2.0**-8
    assert float((out16.double() - ref16).abs().max()) <= step


@pytest.mark.parametrize(("batch", "grid"), [(6, 40), (1, 64), (54, 14)])
@pytest.mark.parametrize("form", ["einsum", "gemm", "triton", "gather"])
def test_tables_compiled_match_float64_products(
    batch: int, grid: int, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both forms of ``sam_kernels.rel_pos_tables``, compiled as inside the fast path's SAM blocks, hold the
    reference's products (oracle: ``sam.rel_pos_terms`` in float64) to bf16 rounding: each entry is one 64-term dot
    product rounded to bf16 once, so within half a bf16 step (2**-9 relative) of the largest entry plus fp32 slack."""
    from llm_perf_opt.models.deepseek_ocr import sam_kernels
    from llm_perf_opt.models.deepseek_ocr.sam import rel_pos_terms

    monkeypatch.setattr(sam_kernels, "TABLES", form)
    gen = torch.Generator(device="cuda").manual_seed(grid + 1)
    qkv = torch.randn(batch, grid * grid, 3, HEADS, DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    q = qkv.permute(2, 0, 3, 1, 4)[0]  # the block's strided view
    rel_h = (torch.randn(127, DIM, device="cuda", generator=gen) * 0.5).bfloat16()
    rel_w = (torch.randn(127, DIM, device="cuda", generator=gen) * 0.5).bfloat16()
    hw = (grid, grid)
    with torch.inference_mode():
        th, tw = torch.compile(sam_kernels.rel_pos_tables, dynamic=False)(q, rel_h, rel_w, hw)
        eh, ew = rel_pos_terms(q.double(), rel_h.double(), rel_w.double(), hw, hw)
    n = grid * grid
    ref_h = eh.reshape(batch * HEADS, n, grid).transpose(1, 2)
    ref_w = ew.reshape(batch * HEADS, n, grid)
    for got, ref in ((th, ref_h), (tw, ref_w)):
        assert got.shape == ref.shape and got.dtype == torch.bfloat16 and got.is_contiguous()
        assert float((got.double() - ref).abs().max()) <= float(ref.abs().max()) * 2**-8
