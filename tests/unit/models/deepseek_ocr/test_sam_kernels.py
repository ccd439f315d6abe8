"""SAM's rel-pos attention kernel (``sam_kernels``) == the dense-bias reference, on CPU through Triton's interpreter.

The oracle is the reference's own math in float64: the [N, N] bias of ``decomposed_rel_pos_bias`` handed to SDPA.
Grids cover a power-of-two width (no padding columns), widths that pad (3 -> 16, 5 -> 16, 20 -> 32), several key
rows per step (whole and partial last steps), a query count
that is not a multiple of the 16-query block, h != w (a row/column mix-up shows), strided q/k/v views (the block's
``qkv.unbind``) and tables sized for a larger trained grid (resampled, as for a tile).  ``tests/conftest.py`` imports
the module with ``TRITON_INTERPRET=1`` on machines without CUDA; elsewhere these tests skip (the GPU suite covers
real sizes: tests/gpu/test_fast_path.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from llm_perf_opt.models.deepseek_ocr import sam_kernels as SK
from llm_perf_opt.models.deepseek_ocr.kernels import KernelUnavailableError
from llm_perf_opt.models.deepseek_ocr.sam import decomposed_rel_pos_bias
from tests.conftest import rel_err

pytestmark = pytest.mark.skipif(
    not SK.INTERPRETED, reason="sam_kernels was imported compiled-mode (a CUDA machine runs the GPU tests instead)"
)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture(
    params=[(True, False), (False, False), (True, True)], ids=["bias-in-mma", "bias-after", "row-term-in-max"]
)
def bias_form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Each form of the kernel's position terms: in one-hot steps the score product's accumulator
    (:data:`sam_kernels.BIAS_IN_MMA`, the default where √(head size) is a power of two: the 16-wide cases here) or
    added after the product; in one-row steps each score's or, with :data:`sam_kernels.ROW_TERM_IN_MAX`, the row's
    max (the row's ``rel_h`` term as a shift)."""
    in_mma, row_in_max = request.param
    monkeypatch.setattr(SK, "BIAS_IN_MMA", in_mma)
    monkeypatch.setattr(SK, "ROW_TERM_IN_MAX", row_in_max)
    return bool(in_mma)


def _case(hw: tuple[int, int], dim: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v as the strided views a SAM block makes (``qkv.reshape(...).permute(2, 0, 3, 1, 4).unbind(0)``) and
    rel-pos tables sized for a grid 1.5x larger (so ``get_rel_pos`` resamples them)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = hw
    b, heads = 2, 3
    qkv = torch.randn(b, h * w, 3, heads, dim, generator=gen).to(dtype).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    rel_h = torch.randn(2 * (3 * h // 2) - 1, dim, generator=gen).to(dtype)
    rel_w = torch.randn(2 * (3 * w // 2) - 1, dim, generator=gen).to(dtype)
    return q, k, v, rel_h, rel_w


def _oracle(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    q64, k64, v64 = q.double(), k.double(), v.double()
    bias = decomposed_rel_pos_bias(q64, rel_h.double(), rel_w.double(), hw, hw)
    return F.scaled_dot_product_attention(q64, k64, v64, attn_mask=bias)


@pytest.mark.parametrize(("hw", "dim"), [((4, 4), 16), ((3, 5), 16), ((5, 3), 32), ((2, 20), 16), ((6, 16), 16)])
def test_matches_dense_bias_float32(hw: tuple[int, int], dim: int, bias_form: bool) -> None:
    q, k, v, rel_h, rel_w = _case(hw, dim, torch.float32, seed=hw[0] * 31 + hw[1])
    actual = SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, hw)
    expected = _oracle(q, k, v, rel_h, rel_w, hw)
    assert actual.shape == expected.shape == q.shape
    assert actual.dtype == torch.float32
    assert rel_err(actual, expected) < 2e-6
    # rel_h's column loaded in its own step instead of one step ahead: the same numbers in the same order
    assert torch.equal(actual, SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, hw, prefetch_rh=False))


@pytest.mark.parametrize("hw", [(4, 4), (5, 3)])
def test_matches_dense_bias_bf16(hw: tuple[int, int], bias_form: bool) -> None:
    """bf16 operands: the tables are bf16 products (as in the reference), P is rounded to bf16 for P·V as in
    flash kernels; to bf16 rounding of the float64 oracle (the reference's own bf16 path is no closer)."""
    q, k, v, rel_h, rel_w = _case(hw, 16, torch.bfloat16, seed=7 + hw[0])
    actual = SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, hw)
    expected = _oracle(q, k, v, rel_h, rel_w, hw)
    assert actual.dtype == torch.bfloat16
    reference_bf16 = F.scaled_dot_product_attention(
        q, k, v, attn_mask=decomposed_rel_pos_bias(q, rel_h, rel_w, hw, hw)
    )  # the reference path's own error in bf16: the bound is a small multiple of it
    bound = max(2e-2, 3 * rel_err(reference_bf16, expected))
    assert rel_err(actual, expected) < bound


@pytest.mark.parametrize(
    ("hw", "block_n", "rows"),
    [((7, 5), 16, 3), ((5, 7), 32, 4), ((3, 20), 64, 3), ((4, 16), 32, 2), ((6, 5), 32, 6), ((14, 14), 128, 9)],
)
def test_several_key_rows_per_step(hw: tuple[int, int], block_n: int, rows: int, bias_form: bool) -> None:
    """``block_n`` wider than a key row: ``rows`` whole key rows per step, each with its own ``rel_h`` column (both
    tables added through one-hot products); a last step with fewer rows (7 = 3+3+1, 5 = 4+1, 3 of 3, 4 = 2+2, 6 in
    one, a 14x14 window's 14 = 9+5) must mask the rows past the grid, and the padding columns of every step."""
    assert SK.attention_blocks(hw[0] * hw[1], hw[1], interpreter=True, block_n=block_n).rows == rows
    q, k, v, rel_h, rel_w = _case(hw, 16, torch.float32, seed=hw[0] * 7 + hw[1] + block_n)
    actual = SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, hw, block_n=block_n)
    expected = _oracle(q, k, v, rel_h, rel_w, hw)
    assert rel_err(actual, expected) < 2e-6
    assert torch.equal(
        actual, SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, hw, block_n=block_n, prefetch_rh=False)
    )


@pytest.mark.parametrize(("hw", "block_n"), [((14, 14), 256), ((3, 20), 128)])
def test_several_key_rows_per_step_bf16(hw: tuple[int, int], block_n: int) -> None:
    """The one-hot products in bf16 (as on a GPU): each logit's table terms are single products, so the result
    matches the float64 oracle about as closely as the one-row form does (a whole 14x14 window in one step; a
    3x20 grid's three key rows in one 128-wide step)."""
    q, k, v, rel_h, rel_w = _case(hw, 16, torch.bfloat16, seed=11 + hw[1])
    expected = _oracle(q, k, v, rel_h, rel_w, hw)
    several = SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, hw, block_n=block_n)
    one_row = SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, hw)
    assert SK.attention_blocks(hw[0] * hw[1], hw[1], interpreter=True, block_n=block_n).rows > 1
    assert rel_err(several, expected) < max(2e-2, 1.5 * rel_err(one_row, expected))


@pytest.mark.parametrize(
    ("hw", "patch_w", "block_n", "rows"),
    [((8, 8), 4, 16, 4), ((6, 12), 4, 16, 4), ((4, 10), 5, 16, 3), ((10, 10), 5, 32, 6), ((5, 24), 8, 64, 5)],
)
def test_key_patches_per_step(hw: tuple[int, int], patch_w: int, block_n: int, rows: int, bias_form: bool) -> None:
    """``patch_w``: each step a patch of ``rows`` key rows × ``patch_w`` key columns (both tables through one-hot
    products over the patch's own columns), patches row-major; a last patch row with fewer key rows (6 = 4+2,
    4 = 3+1, 10 = 6+4) and padding columns past ``rows·patch_w`` (15 of 16, 30 of 32) must be masked."""
    assert SK.attention_blocks(hw[0] * hw[1], hw[1], interpreter=True, block_n=block_n, patch_w=patch_w) == (
        16,
        block_n,
        rows,
        1,
        1,
        patch_w,
    )
    q, k, v, rel_h, rel_w = _case(hw, 16, torch.float32, seed=hw[0] * 5 + hw[1] + patch_w)
    actual = SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, hw, block_n=block_n, patch_w=patch_w)
    expected = _oracle(q, k, v, rel_h, rel_w, hw)
    assert rel_err(actual, expected) < 2e-6


def test_key_patches_bf16(bias_form: bool) -> None:
    """8x8 patches of 64 keys in bf16 (the 640-px tiles' setting, on an 8x40 grid): as close to the float64 oracle
    as the one-row form."""
    hw = (8, 40)
    q, k, v, rel_h, rel_w = _case(hw, 16, torch.bfloat16, seed=40)
    expected = _oracle(q, k, v, rel_h, rel_w, hw)
    patches = SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, hw, block_n=64, patch_w=8)
    one_row = SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, hw)
    assert rel_err(patches, expected) < max(2e-2, 1.5 * rel_err(one_row, expected))


def test_bias_in_mma_arguments_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accumulator form's launch arguments: one-hot steps only; the terms' scale is √(head size) where that is a
    power of two (64 -> 8, 16 -> 4), round 21's form otherwise (32: √32 is not exact), on BIAS_AFTER_GRIDS (v2's
    48-wide tiles) or when switched off; a step is full only where its rows fill ``block_n`` and divide the grid's
    height (the 40-wide tiles' 8x8 patches: 8 x 8 = 64, 40 = 5 x 8).  ROW_TERM_IN_MAX's shift: one-row steps only."""
    off = dict(BIAS_ACC=False, FULL=False, BIAS_SCALE=1.0, ROW_SHIFT=False)
    tiles = SK.Blocks(64, 64, 8, 4, 2, 8)
    assert SK._term_forms(64, 40, 40, tiles) == dict(BIAS_ACC=True, FULL=True, BIAS_SCALE=8.0, ROW_SHIFT=False)
    assert SK._term_forms(16, 40, 40, tiles) == dict(BIAS_ACC=True, FULL=True, BIAS_SCALE=4.0, ROW_SHIFT=False)
    assert SK._term_forms(32, 40, 40, tiles) == off
    assert SK._term_forms(64, 48, 48, SK.Blocks(128, 64, 8, 8, 3, 8)) == off  # v2's tiles keep round 21's form
    assert SK._term_forms(64, 41, 40, tiles)["FULL"] is False  # 41 key rows: the last patch row holds one
    assert SK._term_forms(64, 10, 10, SK.Blocks(64, 32, 6, 4, 2, 5))["FULL"] is False  # 6 x 5 = 30 of 32 columns
    assert SK._term_forms(64, 4, 16, SK.Blocks(64, 32, 2, 4, 2))["FULL"] is True  # two whole 16-wide rows
    # one key row a step: the round-21 form, its rel_h term in the row's max (ROW_TERM_IN_MAX, on since round 24)
    assert SK._term_forms(64, 14, 14, SK.Blocks(64, 16, 1, 4, 2)) == {**off, "ROW_SHIFT": True}
    monkeypatch.setattr(SK, "ROW_TERM_IN_MAX", False)
    assert SK._term_forms(64, 14, 14, SK.Blocks(64, 16, 1, 4, 2)) == off
    monkeypatch.setattr(SK, "BIAS_IN_MMA", False)
    assert SK._term_forms(64, 40, 40, tiles) == off
    monkeypatch.setattr(SK, "ROW_TERM_IN_MAX", True)  # one-row steps only
    assert SK._term_forms(64, 14, 14, SK.Blocks(64, 16, 1, 4, 2)) == {**off, "ROW_SHIFT": True}
    assert SK._term_forms(64, 40, 40, tiles) == off


def test_row_term_in_max_reaches_one_row_launches_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ROW_TERM_IN_MAX`` launches the shift form on one-row steps (it has no meaning where a step holds several
    key rows), on by default since round 24; the float64 comparisons above run every form."""
    real = SK._rel_pos_attention_kernel
    seen: list[tuple[int, int, bool]] = []

    class Spy:
        def __getitem__(self, grid: object) -> object:
            def launch(*args: object, **kw: object) -> object:
                seen.append((int(kw["ROWS"]), int(kw["PATCH_W"]), bool(kw["ROW_SHIFT"])))  # type: ignore[call-overload]
                return real[grid](*args, **kw)

            return launch

    monkeypatch.setattr(SK, "_rel_pos_attention_kernel", Spy())
    q, k, v, rel_h, rel_w = _case((4, 16), 16, torch.float32, seed=3)
    monkeypatch.setattr(SK, "ROW_TERM_IN_MAX", False)
    SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, (4, 16))
    monkeypatch.setattr(SK, "ROW_TERM_IN_MAX", True)
    SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, (4, 16))
    SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, (4, 16), block_n=16, patch_w=4)
    assert seen == [(1, 0, False), (1, 0, True), (4, 4, False)], seen


def test_shipped_settings_by_grid_are_valid_patch_launches() -> None:
    """Each shipped :data:`BY_GRID` entry is a launch :func:`attention_blocks` accepts at its grid, and a patch width
    fills its key steps (rows x patch_w = block_n: no padding columns, the point of the patches) on the GPU only."""
    for grid, entry in SK.BY_GRID.items():
        blocks = SK.attention_blocks(grid * grid, grid, interpreter=False)
        assert (blocks.block_m, blocks.block_n, blocks.warps, blocks.stages) == tuple(entry[:4])
        if len(entry) > 4 and entry[4]:
            assert grid % blocks.patch_w == 0 and blocks.rows * blocks.patch_w == blocks.block_n
        assert SK.attention_blocks(grid * grid, grid, interpreter=True).patch_w == 0


def test_bad_patch_widths_are_refused() -> None:
    q, k, v, rel_h, rel_w = _case((4, 8), 16, torch.float32, seed=2)
    with pytest.raises(ValueError, match="patch_w=3 must divide the 8-wide key grid"):
        SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, (4, 8), patch_w=3)
    with pytest.raises(ValueError, match="block_n=16 cannot hold one 20-wide patch row"):
        SK.attention_blocks(1600, 40, interpreter=False, block_n=16, patch_w=20)
    # a patch as wide as the grid is whole key rows
    assert SK.attention_blocks(32, 8, interpreter=True, patch_w=8) == SK.attention_blocks(32, 8, interpreter=True)


def test_output_is_a_view_of_token_major_storage() -> None:
    """The [B, heads, N, C] result permutes back to [B, N, heads·C] tokens without a copy (what the block's
    output projection reads)."""
    hw = (3, 5)
    q, k, v, rel_h, rel_w = _case(hw, 16, torch.float32, seed=3)
    out = SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, hw)
    tokens = out.permute(0, 2, 1, 3)
    assert tokens.is_contiguous()
    assert tokens.reshape(2, 15, 48).data_ptr() == out.data_ptr()


# every form of sam_kernels.TABLES; "triton" also with GATHER_MAX_GRID=0 (its line kernel on these small grids too)
TABLE_CASES = [(form, SK.GATHER_MAX_GRID) for form in SK.TABLE_FORMS] + [("triton", 0)]


@pytest.mark.parametrize(("form", "max_grid"), TABLE_CASES)
@pytest.mark.parametrize("hw", [(3, 5), (4, 4), (14, 14), (17, 18)])
def test_tables_hold_the_reference_products(
    form: str, max_grid: int, hw: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every table form lays out the products of the reference's ``rel_pos_terms`` (oracle: that function in float64,
    the reference model's path) key-row major, to float32 rounding; their tables are resampled (a 1.5x grid)."""
    from llm_perf_opt.models.deepseek_ocr.sam import rel_pos_terms

    monkeypatch.setattr(SK, "TABLES", form)
    monkeypatch.setattr(SK, "GATHER_MAX_GRID", max_grid)
    h, w = hw
    q, _, _, rel_h, rel_w = _case(hw, 16, torch.float32, seed=5)
    th, tw = SK.rel_pos_tables(q, rel_h, rel_w, hw)
    eh, ew = rel_pos_terms(q.double(), rel_h.double(), rel_w.double(), hw, hw)  # [B, heads, h, w, kh|kw]
    assert th.dtype == tw.dtype == torch.float32 and th.is_contiguous() and tw.is_contiguous()
    torch.testing.assert_close(th.double(), eh.reshape(6, h * w, h).transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tw.double(), ew.reshape(6, h * w, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("form", "max_grid"), [c for c in TABLE_CASES if c[0] != "einsum"])
def test_tables_by_hand_without_resampling(form: str, max_grid: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables stored at the grid's size (no resampling): entry (query (qh, qw), key row kh) is ``q · rel_pos_h[qh −
    kh + h − 1]`` and (query, key column kw) is ``q · rel_pos_w[qw − kw + w − 1]``, written out element by element."""
    monkeypatch.setattr(SK, "TABLES", form)
    monkeypatch.setattr(SK, "GATHER_MAX_GRID", max_grid)
    h, w, dim = 3, 4, 16
    gen = torch.Generator().manual_seed(9)
    dt = torch.float64 if form == "gemm" else torch.float32  # the kernels: float32, exact products under "ieee"
    tol = 1e-12 if form == "gemm" else 1e-5
    q = torch.randn(1, 2, h * w, dim, generator=gen, dtype=torch.float64).to(dt)
    rph = torch.randn(2 * h - 1, dim, generator=gen, dtype=torch.float64).to(dt)
    rpw = torch.randn(2 * w - 1, dim, generator=gen, dtype=torch.float64).to(dt)
    th, tw = SK.rel_pos_tables(q, rph, rpw, (h, w))
    q64, rph64, rpw64 = q.double(), rph.double(), rpw.double()
    for head in range(2):
        for qh in range(h):
            for qw in range(w):
                n = qh * w + qw
                for kh in range(h):
                    want = float(q64[0, head, n] @ rph64[qh - kh + h - 1])
                    assert float(th[head, kh, n]) == pytest.approx(want, abs=tol)
                for kw in range(w):
                    want = float(q64[0, head, n] @ rpw64[qw - kw + w - 1])
                    assert float(tw[head, n, kw]) == pytest.approx(want, abs=tol)


def test_tables_kernel_refuses_bad_position_tables() -> None:
    q, _, _, _, _ = _case((4, 4), 16, torch.float32, seed=1)
    good = torch.randn(7, 16)
    with pytest.raises(
        ValueError, match=r"position table \[7, 16\] contiguous in torch.float32 expected, got \(9, 16\)"
    ):
        SK.tables_kernel(q, torch.randn(9, 16), good, 4, 4)
    with pytest.raises(ValueError, match="must be \\[B, heads, 4·5, C\\]"):
        SK.tables_kernel(q, good, torch.randn(9, 16), 4, 5)


@pytest.mark.parametrize(("hw", "block"), [((3, 5), 16), ((3, 5), 32), ((14, 14), 16), ((14, 14), 64), ((6, 20), 32)])
def test_gather_tables_at_any_block_hold_the_products(hw: tuple[int, int], block: int) -> None:
    """The gather form's programs at any block size: a block shorter than a query row, spanning several rows, or
    running past the grid's last query (masked) hold the same products (oracle: ``sam.rel_pos_terms`` in float64 on
    tables stored at the grid's size)."""
    from llm_perf_opt.models.deepseek_ocr.sam import rel_pos_terms

    h, w = hw
    gen = torch.Generator().manual_seed(h * 100 + w + block)
    q = torch.randn(2, 2, h * w, 16, generator=gen)
    pos_h, pos_w = torch.randn(2 * h - 1, 16, generator=gen), torch.randn(2 * w - 1, 16, generator=gen)
    th, tw = SK.tables_gather_kernel(q, pos_h, pos_w, h, w, block=block)
    eh, ew = rel_pos_terms(q.double(), pos_h.double(), pos_w.double(), hw, hw)
    torch.testing.assert_close(th.double(), eh.reshape(4, h * w, h).transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tw.double(), ew.reshape(4, h * w, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("max_grid", "hw", "want"), [(16, (14, 14), "gather"), (16, (17, 5), "lines"), (0, (14, 14), "lines")]
)
def test_triton_tables_pick_their_kernel_by_grid(
    max_grid: int, hw: tuple[int, int], want: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``TABLES="triton"``: the gather kernel on grids at most ``GATHER_MAX_GRID`` wide (the windows), the line
    kernel on wider ones (either side of the grid counts) or everywhere with 0."""
    calls: list[str] = []
    for name, label in (("tables_gather_kernel", "gather"), ("tables_kernel", "lines")):
        real = getattr(SK, name)
        monkeypatch.setattr(SK, name, lambda *a, _real=real, _label=label: calls.append(_label) or _real(*a))
    monkeypatch.setattr(SK, "TABLES", "triton")
    monkeypatch.setattr(SK, "GATHER_MAX_GRID", max_grid)
    h, w = hw
    q = torch.randn(1, 2, h * w, 16)
    SK.rel_pos_tables(q, torch.randn(2 * h - 1, 16), torch.randn(2 * w - 1, 16), hw)
    assert calls == [want]


def test_gather_tables_refuse_a_bad_block() -> None:
    q = torch.randn(1, 1, 16, 16)
    pos = torch.randn(7, 16)
    with pytest.raises(ValueError, match=r"block must be a power of two >= 16 \(tl.dot\), got 24"):
        SK.tables_gather_kernel(q, pos, pos, 4, 4, block=24)
    with pytest.raises(
        ValueError, match=r"position table \[7, 16\] contiguous in torch.float32 expected, got \(9, 16\)"
    ):
        SK.tables_gather_kernel(q, torch.randn(9, 16), pos, 4, 4)


@pytest.mark.parametrize("form", ["triton", "gather"])
@pytest.mark.parametrize("hw", [(4, 4), (14, 14)])
def test_attention_on_the_triton_tables_matches_dense_bias(
    hw: tuple[int, int], form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attention kernel on the table kernels' tables (:data:`TABLES` ``"triton"``, ``"gather"``): the float64
    dense-bias oracle, as on the einsums' (float32, resampled tables)."""
    monkeypatch.setattr(SK, "TABLES", form)
    q, k, v, rel_h, rel_w = _case(hw, 16, torch.float32, seed=13)
    out = SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, hw)
    torch.testing.assert_close(out.double(), _oracle(q, k, v, rel_h, rel_w, hw), rtol=2e-5, atol=2e-5)


def test_unknown_table_form_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SK, "TABLES", "bmm")
    q, _, _, rel_h, rel_w = _case((4, 4), 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"TABLES must be one of \('einsum', 'gemm', 'triton', 'gather'\), got 'bmm'"):
        SK.rel_pos_tables(q, rel_h, rel_w, (4, 4))


def test_bad_input_is_refused_with_the_reason() -> None:
    q, k, v, rel_h, rel_w = _case((4, 4), 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match="do not fill the 4x5 grid"):
        SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, (4, 5))
    with pytest.raises(ValueError, match="one shape"):
        SK.rel_pos_triton_attention(q, k[:, :, :8], v, rel_h, rel_w, (4, 4))
    q12 = torch.randn(2, 3, 16, 12)
    with pytest.raises(ValueError, match="power of two >= 16"):
        SK.rel_pos_triton_attention(q12, q12, q12, torch.randn(7, 12), torch.randn(7, 12), (4, 4))
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, (4, 4), block_m=24)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, (4, 4), block_n=8)


def test_settings_by_grid_replace_the_gpu_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """``BY_GRID`` (the setting bench_fast's candidates set): its fields replace the GPU defaults for the grid widths
    it names (0 keeps one), rows follow from its ``block_n``, explicit arguments still win, the interpreter and other
    grids are untouched, and a bad entry is refused like a bad argument."""
    monkeypatch.setattr(SK, "BY_GRID", {})
    monkeypatch.setitem(SK.BY_GRID, 14, (32, 128, 0, 1))
    assert SK.attention_blocks(196, 14, interpreter=False) == (32, 128, 9, 4, 1, 0)
    # a block_n of the caller's own: the entry's stages belong to its block_n (the default's two stages)
    assert SK.attention_blocks(196, 14, interpreter=False, block_n=64, warps=8) == (32, 64, 4, 8, 2, 0)
    assert SK.attention_blocks(196, 14, interpreter=False, block_n=64, stages=1) == (32, 64, 4, 4, 1, 0)
    assert SK.attention_blocks(196, 14, interpreter=True) == (16, 16, 1, 1, 1, 0)
    assert SK.attention_blocks(1600, 40, interpreter=False) == (64, 64, 1, 4, 2, 0)
    monkeypatch.setitem(SK.BY_GRID, 40, (128, 64, 8, 0, 8))  # with a patch width: 8x8 patches
    assert SK.attention_blocks(1600, 40, interpreter=False) == (128, 64, 8, 8, 2, 8)
    assert SK.attention_blocks(1600, 40, interpreter=False, patch_w=5) == (128, 64, 12, 8, 2, 5)
    # a block_n of the caller's own: whole key rows (the entry's patch width belongs to its block_n)
    assert SK.attention_blocks(1600, 40, interpreter=False, block_n=128) == (128, 128, 3, 8, 2, 0)
    monkeypatch.setitem(SK.BY_GRID, 40, (64, 64, 4, 3, 8))  # the shipped entry: 3 stages with its own block_n only
    assert SK.attention_blocks(1600, 40, interpreter=False) == (64, 64, 8, 4, 3, 8)
    assert SK.attention_blocks(1600, 40, interpreter=False, block_n=256) == (64, 256, 6, 4, 2, 0)
    monkeypatch.setitem(SK.BY_GRID, 40, (0, 96, 0, 0))
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        SK.attention_blocks(1600, 40, interpreter=False)


def test_unavailable_without_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    assert SK.unavailable_reason("cpu") == ""
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in SK.unavailable_reason("cpu")
    q, k, v, rel_h, rel_w = _case((4, 4), 16, torch.float32, seed=1)
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        SK.rel_pos_triton_attention(q, k, v, rel_h, rel_w, (4, 4))


def test_block_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """(block_m, block_n, rows, warps, stages, patch_w) without :data:`BY_GRID`: key tiles a power of two of at least
    16 (``tl.dot``) holding as many whole key rows as fit, 64-query programs at 4 warps on a GPU (the H200 sweep's
    best); overrides replace their field."""
    monkeypatch.setattr(SK, "BY_GRID", {})
    assert SK.attention_blocks(1600, 40, interpreter=False) == (64, 64, 1, 4, 2, 0)
    assert SK.attention_blocks(4096, 64, interpreter=False) == (64, 64, 1, 4, 2, 0)
    assert SK.attention_blocks(2304, 48, interpreter=False) == (64, 64, 1, 4, 2, 0)
    assert SK.attention_blocks(196, 14, interpreter=False) == (64, 16, 1, 4, 2, 0)
    assert SK.attention_blocks(49, 7, interpreter=False) == (64, 16, 2, 4, 2, 0)
    assert SK.attention_blocks(15, 5, interpreter=True) == (16, 16, 3, 1, 1, 0)
    assert SK.attention_blocks(1600, 40, interpreter=False, block_n=128, block_m=128, warps=8) == (128, 128, 3, 8, 2, 0)
    assert SK.attention_blocks(16, 4, interpreter=True, block_n=64).rows == 4  # no more rows than the grid's 4
    assert SK.attention_blocks(196, 14, interpreter=False, block_m=64, block_n=64, warps=4, stages=3) == (
        64,
        64,
        4,
        4,
        3,
        0,
    )
    with pytest.raises(ValueError, match="block_n=32 cannot hold one 40-wide key row; use at least 64"):
        SK.attention_blocks(1600, 40, interpreter=False, block_n=32)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        SK.attention_blocks(1600, 40, interpreter=False, block_n=96)
