"""The fast SAM path (rel-pos folded into attention, channels-last neck) equals the reference (CPU, float32)."""

from __future__ import annotations

import copy
import gc
import itertools
import math
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model
from llm_perf_opt.models.deepseek_ocr.clip import ClipVisionTower, clip_block_fast, clip_block_views, clip_block_weights
from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, apply_fast_path
from llm_perf_opt.models.deepseek_ocr.graphs import ResizedTables
from llm_perf_opt.models.deepseek_ocr.model import DeepseekOCRForCausalLM
from llm_perf_opt.models.deepseek_ocr.sam import (
    SamEncoder,
    decomposed_rel_pos_bias,
    interpolate_sam_pos_embed,
    rel_pos_attention,
    rel_pos_flex_attention,
)

TINY = Path(__file__).resolve().parents[3] / "fixtures" / "deepseek_ocr_tiny"


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


@pytest.mark.parametrize(("hw", "dim"), [((4, 4), 16), ((5, 7), 12), ((14, 14), 64), ((3, 2), 8)])
def test_rel_pos_attention_matches_dense_bias(hw: tuple[int, int], dim: int) -> None:
    torch.manual_seed(hw[0] * 100 + hw[1] + dim)
    h, w = hw
    b, heads, n = 2, 3, h * w
    q, k, v = (torch.randn(b, heads, n, dim) for _ in range(3))
    # tables sized for a larger trained grid, so get_rel_pos resamples them as for a 640² tile
    rel_h, rel_w = torch.randn(2 * h + 3, dim), torch.randn(2 * w - 1, dim)
    bias = decomposed_rel_pos_bias(q, rel_h, rel_w, hw, hw)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    actual = rel_pos_attention(q, k, v, rel_h, rel_w, hw)
    assert actual.shape == expected.shape
    assert _rel_err(actual, expected) < 1e-5


@pytest.mark.parametrize(("hw", "dim"), [((4, 4), 16), ((5, 7), 12), ((3, 2), 8)])
def test_rel_pos_flex_attention_matches_dense_bias(hw: tuple[int, int], dim: int) -> None:
    """FlexAttention with the relative positions as a score_mod (key row ``kv // w``, column ``kv % w``) gives
    the dense-bias SDPA logits; float64, so any index mix-up (row/column, h/w swapped on a 5×7 grid) shows."""
    torch.manual_seed(hw[0] * 10 + hw[1] + dim)
    h, w = hw
    q, k, v = (torch.randn(2, 3, h * w, dim, dtype=torch.float64) for _ in range(3))
    rel_h = torch.randn(2 * h + 3, dim, dtype=torch.float64)  # resampled by get_rel_pos, as for a tile
    rel_w = torch.randn(2 * w - 1, dim, dtype=torch.float64)
    bias = decomposed_rel_pos_bias(q, rel_h, rel_w, hw, hw)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    actual = rel_pos_flex_attention(q, k, v, rel_h, rel_w, hw)
    assert actual.shape == expected.shape
    assert _rel_err(actual, expected) < 1e-12


@pytest.fixture(scope="module")
def tiny_sam() -> SamEncoder:
    cfg = DeepseekOCRConfig.from_json(TINY / "config.json")
    weights = load_file(TINY / "weights.safetensors")
    sam = SamEncoder(cfg.sam)
    prefix = "model.sam_model."
    sam.load_state_dict({k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}, strict=True)
    return sam.eval()


def _triton_kernel_or_skip(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``kind`` "triton" runs sam_kernels through Triton's interpreter: set its switch, or skip where the module was
    imported compiled-mode (a CUDA machine: tests/gpu covers it there)."""
    if kind != "triton":
        return
    from llm_perf_opt.models.deepseek_ocr import sam_kernels

    if not sam_kernels.INTERPRETED:
        pytest.skip("sam_kernels was imported compiled-mode; the GPU suite runs the Triton kernel")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize(
    ("global_attention", "window_attention", "gelu_epilogue"),
    [
        ("augmented", "augmented", False),
        ("flex", "augmented", False),
        ("triton", "augmented", False),
        ("triton", "triton", False),
        ("augmented", "augmented", True),
    ],
)
@pytest.mark.parametrize("size_factor", [1.0, 0.625])  # the trained size and a smaller tile (resampled tables)
def test_fast_sam_matches_reference(
    tiny_sam: SamEncoder,
    size_factor: float,
    global_attention: str,
    window_attention: str,
    gelu_epilogue: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast SAM == the reference in float32; with ``gelu_epilogue`` (the tanh GELU, at most ~3e-4 from the
    exact one per activation) to 2e-3 of the output's range instead of 1e-5."""
    _triton_kernel_or_skip(global_attention, monkeypatch)
    cfg = tiny_sam.cfg
    side = int(cfg.img_size * size_factor) // 64 * 64
    torch.manual_seed(side)
    images = torch.randn(2, 3, side, side)
    fast = copy.deepcopy(tiny_sam)
    fast.fast = True
    fast.global_attention, fast.window_attention = global_attention, window_attention
    fast.gelu_epilogue = gelu_epilogue
    assert any(block.window_size == 0 for block in fast.blocks)  # the tiny SAM has global blocks to switch
    assert any(block.window_size > 0 for block in fast.blocks)  # and windowed ones
    assert all(getattr(block.attn, "fast", False) for block in fast.blocks)
    with torch.no_grad():
        expected = tiny_sam(images)
        actual = fast(images)
    assert not tiny_sam.fast
    assert actual.shape == expected.shape
    assert _rel_err(actual, expected) < (2e-3 if gelu_epilogue else 1e-5)
    fast.fast = False
    with torch.no_grad():
        assert torch.equal(fast(images), expected)  # switching back restores the reference path exactly


def test_fast_sam_resizes_its_position_table_once_per_grid(tiny_sam: SamEncoder) -> None:
    """The fast SAM keeps the resized table per grid: two calls on a smaller tile resize once and give the
    reference's output both times; a new table (another tensor, as a reload assigns) is resized again."""
    fast = copy.deepcopy(tiny_sam)
    fast.fast = True
    calls = _count_resizes(fast.resized_pos)
    side = int(tiny_sam.cfg.img_size * 0.625) // 64 * 64
    grid = side // tiny_sam.cfg.patch_size
    assert grid != tiny_sam.pos_embed.shape[1]  # the table needs resizing at this size
    torch.manual_seed(7)
    images = torch.randn(1, 3, side, side)
    with torch.no_grad():
        expected = tiny_sam(images)
        for _ in range(2):
            assert _rel_err(fast(images), expected) < 1e-5
        assert calls == [(grid, grid)]
        fast.pos_embed = torch.nn.Parameter(fast.pos_embed * 2.0)  # another table: resized anew
        ref = copy.deepcopy(tiny_sam)
        ref.pos_embed.data.mul_(2.0)
        assert _rel_err(fast(images), ref(images)) < 1e-5
    assert calls == [(grid, grid), (grid, grid)]


def _tiny_clip() -> tuple[DeepseekOCRConfig, ClipVisionTower]:
    """The tiny fixture's config and its CLIP tower with the fixture's weights, in eval mode."""
    cfg = DeepseekOCRConfig.from_json(TINY / "config.json")
    weights = load_file(TINY / "weights.safetensors")
    clip = ClipVisionTower(cfg.clip)
    prefix = "model.vision_model."
    clip.load_state_dict({k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}, strict=True)
    return cfg, clip.eval()


def _count_resizes(tables: ResizedTables) -> list[tuple[int, int]]:
    """The grids ``tables`` resizes its position table for from now on, in order (its resize wrapped in place)."""
    calls: list[tuple[int, int]] = []
    resize = tables._resize

    def counted(table: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        calls.append(hw)
        return resize(table, hw)

    tables._resize = counted  # type: ignore[method-assign]
    return calls


def test_resized_tables_take_an_inference_tensor() -> None:
    """A table made under ``torch.inference_mode`` (no version counter) is resized once per grid, to the values of
    the resize itself; another tensor is resized anew."""
    tables = ResizedTables(lambda t, hw: t[: hw[0] * hw[1]] * 2.0)
    calls = _count_resizes(tables)
    with torch.inference_mode():
        table = torch.arange(6.0)
    assert table.is_inference()
    assert torch.equal(tables(table, (2, 2)), torch.tensor([0.0, 2.0, 4.0, 6.0]))
    assert torch.equal(tables(table, (2, 2)), torch.tensor([0.0, 2.0, 4.0, 6.0]))
    assert calls == [(2, 2)]
    other = torch.ones(6)
    assert torch.equal(tables(other, (2, 2)), torch.full((4,), 2.0))
    assert calls == [(2, 2), (2, 2)]


def test_a_table_made_again_keeps_the_memory_a_graph_reads() -> None:
    """A vision graph reads a kept table by address.  Written in place (or replaced by another tensor of the same
    layout), the source is resized again into the kept table's own memory, so what an earlier graph reads is the new
    table, never freed memory; one of another layout gets new memory, and the old table stays alive."""
    tables = ResizedTables(lambda t, hw: t[: hw[0] * hw[1]] * 2.0)
    table = torch.arange(6.0)
    first = tables(table, (2, 2))
    address = first.data_ptr()
    table.add_(1.0)  # written in place: made again, into the same memory
    assert tables(table, (2, 2)).data_ptr() == address
    assert torch.equal(first, torch.tensor([2.0, 4.0, 6.0, 8.0]))  # what a graph captured on it now reads
    assert tables(torch.ones(6), (2, 2)).data_ptr() == address  # another tensor of the same layout
    assert torch.equal(first, torch.full((4,), 2.0))
    alive = weakref.ref(first)
    del first
    wider = tables(torch.ones(6, dtype=torch.float64), (2, 2))  # another dtype: new memory
    gc.collect()
    assert wider.data_ptr() != address and wider.dtype == torch.float64
    kept = alive()
    assert kept is not None and torch.equal(kept, torch.full((4,), 2.0))  # the old table, alive and unchanged
    with torch.inference_mode():  # a kept inference tensor is written in place too, outside inference mode
        frozen = tables(torch.arange(6.0), (3, 1))
    assert frozen.is_inference()
    assert tables(torch.ones(6), (3, 1)).data_ptr() == frozen.data_ptr()
    with torch.inference_mode():
        assert torch.equal(frozen, torch.full((3,), 2.0))


def test_a_table_at_its_own_grid_is_the_weights_never_written() -> None:
    """At the table's own grid SAM's resize returns the table itself: that is kept, and never written.  Written in
    place, it is resized (returned) once, not on every later call; replaced by another parameter, the old one keeps
    its values (the caller's weights; a graph captured on it reads it, alive); moved to another dtype (``.to`` keeps
    the object and its version), the table is made again in that dtype."""
    calls: list[tuple[int, int]] = []

    def spy(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        calls.append(hw)
        return interpolate_sam_pos_embed(t, hw)

    module = torch.nn.Module()
    module.pos = torch.nn.Parameter(torch.zeros(1, 4, 4, 3))
    tables = ResizedTables(spy)
    assert tables(module.pos, (4, 4)) is module.pos
    with torch.no_grad():
        module.pos.add_(1.0)
    for _ in range(3):
        assert tables(module.pos, (4, 4)) is module.pos
    assert calls == [(4, 4), (4, 4)]  # made again once after the write, not on every call
    old = module.pos
    module.pos = torch.nn.Parameter(torch.full((1, 4, 4, 3), 5.0))
    assert tables(module.pos, (4, 4)) is module.pos
    assert torch.equal(old, torch.ones(1, 4, 4, 3))  # the replaced weights are not overwritten
    smaller = tables(module.pos, (2, 2))  # a resized grid of the same weights
    module.to(torch.float64)
    moved = tables(module.pos, (2, 2))
    assert moved.dtype == torch.float64 and smaller.dtype == torch.float32
    assert calls == [(4, 4), (4, 4), (4, 4), (2, 2), (2, 2)]


def test_clip_layer_fn_matches_modules() -> None:
    cfg, clip = _tiny_clip()
    torch.manual_seed(1)
    feats = torch.randn(2, cfg.clip.hidden_size, 3, 3)
    with torch.no_grad():
        x = clip.pre_layrnorm(clip.embeddings(None, feats))
        expected = clip.transformer(x)
        actual = clip.transformer.run_layers(x, clip_block_fast)
    assert _rel_err(actual, expected) < 1e-5


def test_clip_tower_fast_forward_matches_modules_and_resizes_positions_once() -> None:
    """The whole tower's fast forward (embeddings with the kept position table, pre-LayerNorm, layers through
    ``layer_fn``) against the modules as written, on two grids that both need the table resized; the resize runs
    once per grid however often the tower runs, and again after the table is written in place."""
    from llm_perf_opt.models.deepseek_ocr import clip as clip_mod

    cfg, clip = _tiny_clip()
    resize = clip.embeddings.resized_pos._resize
    calls = _count_resizes(clip.embeddings.resized_pos)
    src = math.isqrt(cfg.clip.num_positions - 1)
    torch.manual_seed(1)
    with torch.no_grad():
        for grid in (3, 2, 3):
            assert grid != src  # the table is resized for both grids
            feats = torch.randn(2, cfg.clip.hidden_size, grid, grid)
            clip.layer_fn = None
            expected = clip(None, feats)
            clip.layer_fn = clip_block_fast
            assert _rel_err(clip(None, feats), expected) < 1e-5
        assert calls == [(3, 3), (2, 2)]
        clip.embeddings.position_embedding.weight.mul_(2.0)  # written in place: the kept tables are stale
        clip.layer_fn = None
        expected = clip(None, feats)
        clip.layer_fn = clip_block_fast
        assert _rel_err(clip(None, feats), expected) < 1e-5
    assert calls == [(3, 3), (2, 2), (3, 3)]
    assert clip_mod.interpolate_clip_pos_embed is resize  # the kept tables come from the reference's own resize


def test_clip_block_views_is_the_block_per_view() -> None:
    """Two views' tokens (3 images of 5 tokens, 1 of 10) as one sequence through ``clip_block_views``: each view's
    rows equal CLIP's block module on that view alone (attention stays within each image), and so does
    ``clip_block_fast``, the one-view form."""
    cfg, clip = _tiny_clip()
    blk = clip.transformer.layers[0]
    weights = clip_block_weights(blk)
    heads, eps1, eps2 = blk.self_attn.num_heads, blk.layer_norm1.eps, blk.layer_norm2.eps
    torch.manual_seed(2)
    a, b = torch.randn(3, 5, cfg.clip.hidden_size), torch.randn(1, 10, cfg.clip.hidden_size)
    with torch.no_grad():
        joint = clip_block_views(
            torch.cat((a.reshape(15, -1), b.reshape(10, -1))), weights, heads, eps1, eps2, ((3, 5), (1, 10))
        )
        alone_a, alone_b = blk(a), blk(b)
        # the images mixed into one attention would differ: the split per view is what makes these equal
        mixed = blk(torch.cat((a.reshape(1, 15, -1), b.reshape(1, 10, -1)), dim=1))
        one_view = clip_block_fast(a, weights, heads, eps1, eps2)
    assert joint.shape == (25, cfg.clip.hidden_size)
    assert _rel_err(joint[:15].view(3, 5, -1), alone_a) < 1e-6
    assert _rel_err(joint[15:].view(1, 10, -1), alone_b) < 1e-6
    assert _rel_err(one_view, alone_a) < 1e-6
    assert _rel_err(joint, mixed.view(25, -1)) > 1e-3


def test_clip_tower_takes_several_views() -> None:
    """A tuple of views' features gives a tuple of outputs: view by view as the modules are written, and as one
    sequence with ``views_layer_fn`` (the fast forward), each equal to the tower on that view alone."""
    cfg, clip = _tiny_clip()
    torch.manual_seed(4)
    tiles, whole = torch.randn(2, cfg.clip.hidden_size, 3, 3), torch.randn(1, cfg.clip.hidden_size, 4, 4)
    with torch.no_grad():
        expected = (clip(None, tiles), clip(None, whole))
        plain = clip(None, (tiles, whole))
        clip.layer_fn, clip.views_layer_fn = clip_block_fast, clip_block_views
        joint = clip(None, (tiles, whole))
    assert isinstance(plain, tuple) and len(plain) == 2 and all(map(torch.equal, plain, expected))
    assert [o.shape for o in joint] == [(2, 10, cfg.clip.hidden_size), (1, 17, cfg.clip.hidden_size)]
    assert all(_rel_err(j, e) < 1e-5 for j, e in zip(joint, expected, strict=True))
    with pytest.raises(ValueError, match="needs pixel values or patch embeddings"):
        clip(None, None)


def _tiny_page() -> tuple[DeepseekOCRForCausalLM, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tiny model (float32, weights at a scale that moves the features) and a 2x1-tile page: (model, crops,
    global view, the eager model's features of the page)."""
    cfg = DeepseekOCRConfig.from_json(TINY / "config.json")
    model = build_model(cfg, device="cpu", dtype=torch.float32, weights="dummy", seed=0)
    for p in model.parameters():
        p.data.normal_(0.0, 0.05)
    torch.manual_seed(3)
    crops = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    ori = torch.randn(1, 3, cfg.base_size, cfg.base_size)
    return model, crops, ori, model.encode_images(crops, ori, [2, 1])


@pytest.mark.parametrize("merged", [True, False])
def test_fast_encode_images_runs_clip_once_per_page_with_merged_views(merged: bool) -> None:
    """``clip_merged_views``: a page with crops runs SAM per view, CLIP once over both views, the projector per view
    (forward calls counted by hooks, as the stage timers see them); without it CLIP runs per view.  A page without
    crops (1x1 grid) runs CLIP once either way.  The features equal the eager model's."""
    model, crops, ori, expected = _tiny_page()
    inner = model.model
    calls = {"sam": 0, "clip": 0, "projector": 0}
    handles = [
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, module in (("sam", inner.sam_model), ("clip", inner.vision_model), ("projector", inner.projector))
    ]
    try:
        fast = apply_fast_path(
            model, FastConfig(sam_compile=False, clip_compile=False, sam_gelu_epilogue=False, clip_merged_views=merged)
        )
        actual = fast.encode_images(crops, ori, [2, 1])
        assert calls == {"sam": 2, "clip": 1 if merged else 2, "projector": 2}
        single = fast.encode_images(crops[:1], ori, [1, 1])
        assert calls == {"sam": 3, "clip": 2 if merged else 3, "projector": 3}
    finally:
        for handle in handles:
            handle.remove()
    assert _rel_err(actual, expected) < 1e-5
    assert _rel_err(single, model.encode_images(crops[:1], ori, [1, 1])) < 1e-5
    assert inner.vision_model.views_layer_fn is None and inner.vision_model.views_fn is None  # restored


@pytest.mark.parametrize("merged", [True, False])
def test_clip_attention_kernel_runs_once_per_layer_in_the_fast_vision(
    merged: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``clip_attention=triton`` through the interpreter: a page's CLIP layers each run the views kernel once (over
    both views with ``clip_merged_views``, else once per view) and the features equal the eager model's; without the
    interpreter the same config runs SDPA and says why."""
    from llm_perf_opt.models.deepseek_ocr import clip_attention

    if not clip_attention.INTERPRETED:
        pytest.skip("clip_attention was imported compiled-mode; the GPU suite runs the Triton kernel")
    model, crops, ori, expected = _tiny_page()
    cfg = FastConfig(sam_compile=False, clip_compile=False, sam_gelu_epilogue=False, clip_merged_views=merged)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plain = apply_fast_path(model, cfg)
    assert plain.vision.clip_attention == "sdpa" and "TRITON_INTERPRET=1" in (plain.vision.clip_attention_note or "")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    views: list[tuple[tuple[int, int], ...]] = []
    real = clip_attention.views_attention

    def spy(qkv: torch.Tensor, seen: tuple[tuple[int, int], ...], *args: object) -> torch.Tensor:
        views.append(seen)
        return real(qkv, seen, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(clip_attention, "views_attention", spy)
    fast = apply_fast_path(model, cfg)
    assert fast.vision.clip_attention == "triton" and fast.vision.clip_attention_note is None
    actual = fast.encode_images(crops, ori, [2, 1])
    layers = model.config.clip.num_layers
    crop_tokens, whole_tokens = views[0][0][1], views[-1][-1][1]
    if merged:
        assert views == [((2, crop_tokens), (1, whole_tokens))] * layers
    else:
        assert sorted(views) == sorted([((2, crop_tokens),)] * layers + [((1, whole_tokens),)] * layers)
    assert _rel_err(actual, expected) < 1e-5


@pytest.mark.parametrize(
    ("sam_attention", "window"), [("augmented", "augmented"), ("flex", "augmented"), ("triton", "triton")]
)
def test_fast_model_encode_images_matches_and_restores(
    sam_attention: str, window: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _triton_kernel_or_skip(sam_attention, monkeypatch)
    model, crops, ori, expected = _tiny_page()
    cfg_fast = FastConfig(
        sam_compile=False,
        clip_compile=False,
        sam_attention=sam_attention,
        sam_window_attention=window,
        sam_gelu_epilogue=False,  # the exact GELU: equal to 1e-5 (test_fast_sam_matches_reference covers the epilogue)
    )
    fast = apply_fast_path(model, cfg_fast)
    assert (fast.vision.sam_attention, fast.vision.sam_window_attention) == (sam_attention, window)  # no fallback
    actual = fast.encode_images(crops, ori, [2, 1])
    assert _rel_err(actual, expected) < 1e-5
    sam, clip = model.model.sam_model, model.model.vision_model
    assert not sam.fast and sam.block_fn is None and sam.forward_fn is None
    assert sam.global_attention == sam.window_attention == "augmented"  # restored after encode_images
    assert not sam.gelu_epilogue
    assert clip.layer_fn is None and clip.forward_fn is None
    assert clip.views_layer_fn is None and clip.views_fn is None
    assert torch.equal(model.encode_images(crops, ori, [2, 1]), expected)


def test_vision_compile_keeps_every_shape_a_dataset_meets() -> None:
    """A SAM block function meets, per block kind (windowed, global), one input shape per view batch: Gundam
    crops 2-9 plus the global view = 9, times 2 kinds = 18 on DeepSeek-OCR alone.  Dynamo's default limit of 8
    would run the rest uncompiled (a slower path measured as the fast one)."""
    import torch

    from llm_perf_opt.models.deepseek_ocr.fast import _compiled

    seen: list[str] = []

    def block(x: torch.Tensor, sdpa_policy: str) -> torch.Tensor:
        seen.append(sdpa_policy)  # runs while Dynamo traces (a side effect: a graph break, fine here)
        return x + 1

    assert torch.equal(_compiled(block, "flash")(torch.zeros(2)), torch.ones(2))  # called with the policy given
    assert seen and set(seen) == {"flash"}
    assert torch._dynamo.config.recompile_limit >= 2 * (len(range(2, 10)) + 1)


def test_vision_compile_mode_reaches_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """``vision_compile_mode``: "default" compiles with torch's default mode (None), the autotuning mode is passed
    as given; one compiled function per (block function, mode), reused; an unknown mode is refused before any
    compile.  Oracle: the arguments a recording stand-in for ``torch.compile`` received."""
    import torch

    from llm_perf_opt.models.deepseek_ocr import fast

    calls: list[dict[str, object]] = []

    def recording_compile(fn: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setattr(fast, "_COMPILED", {})

    def block(x: torch.Tensor, sdpa_policy: str) -> torch.Tensor:
        return x

    for mode in ("default", "max-autotune-no-cudagraphs", "default"):
        fast._compiled(block, "model", mode)(torch.zeros(1))
    assert [c["mode"] for c in calls] == [None, "max-autotune-no-cudagraphs"]
    assert all(c["dynamic"] is False for c in calls)
    with pytest.raises(ValueError, match="vision compile mode must be one of"):
        fast._compiled(block, "model", "max-autotune")
    assert len(calls) == 2


def test_compiled_vision_blocks_get_one_graph_per_sdpa_policy(tiny_sam: SamEncoder) -> None:
    """Dynamo picks SDPA's backend while tracing and does not guard on the backend flags, so a block compiled
    under one ``vision_sdpa`` policy would keep that backend under the next (a multirun over the switch would time
    one backend for every job).  The blocks take the policy as an argument and check it: one graph per policy, none
    for a policy seen before.  Oracle: Dynamo's own graph counter (backend "eager": no inductor compile)."""
    from torch._dynamo.utils import counters

    from llm_perf_opt.models.deepseek_ocr.clip import clip_block_fast
    from llm_perf_opt.models.deepseek_ocr.sam import sam_block_fast

    block = next(b for b in tiny_sam.blocks if b.window_size == 0)
    x = torch.randn(1, 4, 4, tiny_sam.cfg.embed_dim)
    args = (x, block.fast_weights(), 0, block.attn.num_heads, block.norm1.eps)
    with torch.no_grad():
        expected = sam_block_fast(*args)  # fills sam's key one-hot cache first (its first fill is itself a guard)
    sam_fn = torch.compile(sam_block_fast, backend="eager", dynamic=False)
    dim, heads = 32, 2
    clip_weights = [torch.ones(dim), torch.zeros(dim), torch.randn(3 * dim, dim), torch.zeros(3 * dim)]
    clip_weights += [torch.randn(dim, dim), torch.zeros(dim), torch.ones(dim), torch.zeros(dim)]
    clip_weights += [torch.randn(4 * dim, dim), torch.zeros(4 * dim), torch.randn(dim, 4 * dim), torch.zeros(dim)]
    clip_args = (torch.randn(2, 5, dim), clip_weights, heads, 1e-5, 1e-5)
    clip_fn = torch.compile(clip_block_fast, backend="eager", dynamic=False)
    graphs = []
    with torch.no_grad():
        for policy in ("model", "flash", "model", "cudnn", "flash"):
            out = sam_fn(*args, sdpa_policy=policy)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            clip_fn(*clip_args, sdpa_policy=policy)
            graphs.append(counters["stats"]["unique_graphs"])
    new = [b - a for a, b in itertools.pairwise(graphs)]
    assert new == [2, 0, 2, 0], graphs  # a new policy: one graph per block function; a policy seen: none
    with pytest.raises(ValueError, match="unknown vision SDPA policy 'fast'"):
        sam_block_fast(*args, sdpa_policy="fast")


def test_vision_sdpa_names_are_the_policies_the_blocks_accept() -> None:
    from llm_perf_opt.models.deepseek_ocr.fast import VISION_SDPA
    from llm_perf_opt.models.deepseek_ocr.graphs import SDPA_POLICIES

    assert tuple(VISION_SDPA) == SDPA_POLICIES


def test_sam_attention_triton_falls_back_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the Triton kernel cannot run (a CPU without Triton's interpreter switched on) SAM's global blocks run
    the augmented attention, and the reason is kept (``FastModel.fallbacks`` reports it on a GPU)."""
    from llm_perf_opt.models.deepseek_ocr.fast import _resolve_sam_attention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for blocks in ("global", "windowed"):
        kind, why = _resolve_sam_attention("triton", torch.device("cpu"), blocks)
        assert kind == "augmented"
        assert why is not None and ("TRITON_INTERPRET=1" in why or "not importable" in why)
    assert _resolve_sam_attention("flex", torch.device("cpu")) == ("flex", None)


def _gelu_tanh_float64(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU, written out: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    x = x.double()
    return 0.5 * x * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))


def test_linear_gelu_tanh_is_the_tanh_gelu_of_the_linear() -> None:
    """Oracle: the GEMM in float64 and the tanh GELU's formula; and the tanh GELU stays within 5e-4 of the exact
    (erf) GELU over the activations' range (the approximation's known bound is ~3e-4)."""
    from llm_perf_opt.models.deepseek_ocr.sam import linear_gelu_tanh

    gen = torch.Generator().manual_seed(4)
    x, w, b = (
        torch.randn(37, 24, generator=gen),
        torch.randn(96, 24, generator=gen) * 0.3,
        torch.randn(96, generator=gen),
    )
    pre = x.double() @ w.double().T + b.double()
    out = linear_gelu_tanh(x, w, b)
    assert out.shape == (37, 96) and out.dtype == torch.float32
    assert _rel_err(out, _gelu_tanh_float64(pre)) < 1e-6
    grid = torch.linspace(-8.0, 8.0, 4001, dtype=torch.float64)
    exact = 0.5 * grid * (1.0 + torch.erf(grid / 2.0**0.5))
    assert float((_gelu_tanh_float64(grid) - exact).abs().max()) < 5e-4


def test_sam_block_with_the_epilogue_compiles_as_one_op(tiny_sam: SamEncoder) -> None:
    """Under torch.compile (aot_eager: the op's fake implementation gives the shapes) a block with the GELU epilogue
    gives the eager block's result."""
    from llm_perf_opt.models.deepseek_ocr.sam import sam_block_fast

    block = next(b for b in tiny_sam.blocks if b.window_size > 0)
    x = torch.randn(2, 6, 6, tiny_sam.cfg.embed_dim, generator=torch.Generator().manual_seed(5))
    args = (x, block.fast_weights(), block.window_size, block.attn.num_heads, block.norm1.eps)
    with torch.no_grad():
        expected = sam_block_fast(*args, gelu_epilogue=True)
        compiled = torch.compile(sam_block_fast, backend="aot_eager", dynamic=False)
        actual = compiled(*args, gelu_epilogue=True)
        exact = sam_block_fast(*args, gelu_epilogue=False)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert 0 < _rel_err(expected, exact) < 2e-3  # the tanh GELU ran, and it is close to the exact one


def test_gelu_epilogue_is_for_cuda_only() -> None:
    """``sam_gelu_epilogue`` is cuBLASLt's fused epilogue: on the CPU it stays off (it would only replace the exact
    GELU by the tanh one), so the CPU fast vision keeps the reference GELU."""
    cfg = DeepseekOCRConfig.from_json(TINY / "config.json")
    model = build_model(cfg, device="cpu", dtype=torch.float32, weights="dummy", seed=0)
    fast = apply_fast_path(model, FastConfig(sam_compile=False, clip_compile=False))
    assert FastConfig().sam_gelu_epilogue and not fast.vision.sam_gelu_epilogue
