"""Page preprocessing and token layout against the reference's numbers.

* ``image_tokens.json``: crop grid and image-token count for 7 page sizes × 5 modes (blank pages: the
  count depends on the size only).
* ``preprocess_reference.json``: statistics and sampled values of the reference's normalised global view
  and every tile for three real pages.
* The tiny fixture's cases: the exact tensors and ids the reference fed its tiny model.
* Bad inputs: each failure is an InputError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llm_perf_opt.data.images import load_image
from llm_perf_opt.errors import ConfigError, InputError
from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig
from llm_perf_opt.models.deepseek_ocr.preprocess import (
    PreparedPage,
    PreprocessConfig,
    build_prompt_ids,
    candidate_grids,
    choose_crop_grid,
    image_token_count,
    preprocess_page,
    tokens_per_side,
)
from llm_perf_opt.models.deepseek_ocr.tokenizer import DEFAULT_PROMPT_IDS_AFTER_IMAGE

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures"
REAL = FIXTURES / "deepseek_ocr_real"
TINY = FIXTURES / "deepseek_ocr_tiny"

REAL_CFG = DeepseekOCRConfig()
TINY_CFG = DeepseekOCRConfig.from_json(TINY / "config.json")
REAL_PROMPT_IDS = [128815, *DEFAULT_PROMPT_IDS_AFTER_IMAGE]  # "<image>\n<|grounding|>Convert the document to markdown."

_TOKENS = json.loads((REAL / "image_tokens.json").read_text())
_TOKEN_CASES = [
    pytest.param(mode_key.split("(")[0], size, entry, id=f"{mode_key.split('(')[0]}-{size}")
    for mode_key, by_size in _TOKENS.items()
    if not mode_key.startswith("_")
    for size, entry in by_size.items()
]
_REF = json.loads((REAL / "preprocess_reference.json").read_text())


def _size(text: str) -> tuple[int, int]:
    w, h = text.split("x")
    return int(w), int(h)


# ------------------------------------------------------------------------------------------ token counts


@pytest.mark.parametrize(("mode", "size", "entry"), _TOKEN_CASES)
def test_image_tokens_match_reference(mode: str, size: str, entry: dict[str, int]) -> None:
    width, height = _size(size)
    cfg = PreprocessConfig.for_mode(mode)
    grid = choose_crop_grid(width, height, cfg)
    assert grid == (entry["grid_w"], entry["grid_h"])
    q_b, q = tokens_per_side(cfg.base_size), tokens_per_side(cfg.image_size)
    assert image_token_count(grid, q_b, q) == entry["image_tokens"]

    page = preprocess_page(Image.new("RGB", (width, height), (255, 255, 255)), cfg, REAL_CFG, REAL_PROMPT_IDS)
    assert page.images_spatial_crop == (entry["grid_w"], entry["grid_h"])
    assert page.n_crops == entry["n_crops"]
    assert page.image_token_count == entry["image_tokens"]
    assert page.prompt_len == 1 + entry["image_tokens"] + 9  # bos + image tokens + the 9 default-prompt ids
    assert int(page.images_seq_mask.sum()) == entry["image_tokens"]
    assert page.page_size == (width, height)


@pytest.mark.parametrize("mode", list(PreprocessConfig.MODES))
def test_session_style_config_matches_named_mode(mode: str) -> None:
    """The run config builds PreprocessConfig(base, image, crop) without a threshold: same decisions."""
    named = PreprocessConfig.for_mode(mode)
    plain = PreprocessConfig(base_size=named.base_size, image_size=named.image_size, crop_mode=named.crop_mode)
    assert plain.stretches_view == named.stretches_view
    for size in _TOKENS["tiny(512)"]:
        w, h = _size(size)
        assert choose_crop_grid(w, h, plain) == choose_crop_grid(w, h, named), size


def test_stretch_quirk_per_mode() -> None:
    """Reference: no-crop views of <= 640 px are stretched to a square, larger ones are letter-boxed."""
    stretched = {m: PreprocessConfig.for_mode(m).stretches_view for m in PreprocessConfig.MODES}
    assert stretched == {"tiny": True, "small": True, "base": False, "large": False, "gundam": False}
    assert not PreprocessConfig.for_mode("small", vendor_quirks=False).stretches_view

    page = Image.new("RGB", (800, 400), (255, 255, 255))
    pad = (127 / 255 - 0.5) / 0.5
    small = preprocess_page(page, PreprocessConfig.for_mode("small"), REAL_CFG, REAL_PROMPT_IDS)
    assert small.images_ori.shape == (1, 3, 640, 640)
    assert torch.all(small.images_ori == 1.0)  # stretched: all page, no padding
    boxed = preprocess_page(page, PreprocessConfig.for_mode("small", vendor_quirks=False), REAL_CFG, REAL_PROMPT_IDS)
    assert torch.isclose(boxed.images_ori[0, :, 0, :], torch.tensor(pad)).all()  # letter-boxed top row
    base = preprocess_page(page, PreprocessConfig.for_mode("base"), REAL_CFG, REAL_PROMPT_IDS)
    assert base.images_ori.shape == (1, 3, 1024, 1024)
    assert torch.isclose(base.images_ori[0, :, 0, :], torch.tensor(pad)).all()
    assert base.images_crop.shape == (1, 3, 1024, 1024) and not base.images_crop.any()


def test_explicit_token_geometry_form() -> None:
    page = Image.new("RGB", (1224, 1584), (255, 255, 255))
    cfg = PreprocessConfig.for_mode("gundam")
    by_model = preprocess_page(page, cfg, REAL_CFG, REAL_PROMPT_IDS)
    by_ints = preprocess_page(page, cfg, 16, 10, REAL_PROMPT_IDS, image_token_id=128815, bos_id=0)
    assert torch.equal(by_model.input_ids, by_ints.input_ids)
    assert torch.equal(by_model.images_seq_mask, by_ints.images_seq_mask)
    assert by_model.images_spatial_crop_tensor.tolist() == [[2, 3]]


def test_candidate_grid_order_pins_reference_iteration() -> None:
    """Ties in aspect ratio are broken by iteration order; this is the reference's order for 2..9 tiles."""
    assert candidate_grids(2, 9) == [
        (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1),
        (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1),
    ]  # fmt: skip


def test_one_by_one_grid_adds_no_tiles() -> None:
    cfg = PreprocessConfig(base_size=1024, image_size=640, min_crops=1, crop_threshold_px=640)
    page = preprocess_page(Image.new("RGB", (700, 700)), cfg, REAL_CFG, REAL_PROMPT_IDS)
    assert page.images_spatial_crop == (1, 1) and page.n_crops == 0 and page.image_token_count == 273


# ------------------------------------------------------------------------------- reference tensor stats


def _check_view(tensor: torch.Tensor, ref: dict[str, Any], what: str) -> None:
    assert list(tensor.shape) == ref["shape"], what
    assert tensor.dtype == torch.float32
    t = tensor.double()
    assert abs(t.mean().item() - ref["mean"]) < 1e-3, what
    assert abs(t.std().item() - ref["std"]) < 1e-3, what
    for c, y, x, value in ref["samples"]:
        assert abs(tensor[c, y, x].item() - value) < 1e-2, f"{what} [{c},{y},{x}]"


@pytest.mark.parametrize("name", list(_REF))
def test_preprocess_matches_reference_tensors(name: str) -> None:
    ref = _REF[name]
    image = load_image(REAL / "preprocess_pages" / f"{name}.png")
    assert image.size == _size(name)
    page = preprocess_page(image, PreprocessConfig.for_mode("gundam"), REAL_CFG, REAL_PROMPT_IDS)
    assert list(page.images_spatial_crop) == ref["grid"]
    assert page.n_crops == len(ref["crops"])
    _check_view(page.images_ori[0], ref["global_view"], f"{name} global")
    for i, crop_ref in enumerate(ref["crops"]):
        _check_view(page.images_crop[i], crop_ref, f"{name} tile {i}")


# ------------------------------------------------------------------------------------------ tiny fixture


@pytest.mark.parametrize("quirks", [True, False], ids=["quirks", "no-quirks"])
@pytest.mark.parametrize(("case", "crop_mode"), [("global_only", False), ("crop_2x1", True), ("crop_2x3", True)])
def test_tiny_fixture_inputs(case: str, crop_mode: bool, quirks: bool) -> None:
    ref = load_file(str(TINY / "cases" / f"{case}.safetensors"))
    cfg = PreprocessConfig.from_model(TINY_CFG, crop_mode=crop_mode, vendor_quirks=quirks)
    assert (cfg.base_size, cfg.image_size) == (256, 128)
    page = preprocess_page(load_image(TINY / "cases" / f"{case}.png"), cfg, TINY_CFG, list(range(10, 17)))
    assert torch.equal(page.input_ids, ref["input_ids"])
    assert torch.equal(page.images_seq_mask, ref["images_seq_mask"].bool())
    assert page.images_spatial_crop_tensor.tolist() == ref["images_spatial_crop"].tolist()
    assert page.images_crop.shape == ref["images_crop"].shape
    assert page.images_ori.shape == ref["images_ori"].shape
    # Measured: 0.0 max-abs on every case (same Pillow resampling); 1e-2 leaves room for other Pillow builds.
    assert (page.images_crop - ref["images_crop"]).abs().max().item() <= 1e-2
    assert (page.images_ori - ref["images_ori"]).abs().max().item() <= 1e-2


# ------------------------------------------------------------------------------------------------ prompt


def test_prompt_ids_layout() -> None:
    ids, mask = build_prompt_ids([7, 500, 8, 9], n_image_tokens=3, image_token_id=500, bos_id=0)
    assert ids.tolist() == [[0, 7, 500, 500, 500, 8, 9]]
    assert mask.tolist() == [[False, False, True, True, True, False, False]]
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool
    ids, mask = build_prompt_ids([8, 9], n_image_tokens=2, image_token_id=500)
    assert ids.tolist() == [[0, 500, 500, 8, 9]]
    with pytest.raises(InputError, match="image tokens"):
        build_prompt_ids([500, 1, 500], n_image_tokens=2, image_token_id=500)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        PreprocessConfig.for_mode("huge")
    with pytest.raises(ConfigError, match="min_crops"):
        PreprocessConfig(base_size=1024, image_size=640, min_crops=5, max_crops=3)
    with pytest.raises(ConfigError, match="base_size"):
        PreprocessConfig(base_size=0, image_size=640)
    cfg = PreprocessConfig(base_size=1024, image_size=640, mean=[0.5, 0.5, 0.5], pad_color=[127, 127, 127])
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.pad_color == (127, 127, 127)
    assert PreprocessConfig.for_mode("Gundam").threshold_px == 640
    assert PreprocessConfig(256, 128).threshold_px == 128
    assert PreprocessConfig(1280, 1024, vendor_quirks=True).threshold_px == 640
    assert PreprocessConfig(1280, 1024, vendor_quirks=False).threshold_px == 1024


# ------------------------------------------------------------------------------------------- bad inputs


def test_load_image_rgb_and_exif(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.new("RGB", (40, 20), (200, 10, 10)).save(path, exif=exif)
    assert load_image(path).size == (20, 40)
    gray = tmp_path / "gray.png"
    Image.new("L", (5, 7), 9).save(gray)
    img = load_image(str(gray))
    assert img.mode == "RGB" and img.size == (5, 7)


def test_load_image_missing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"not found: .*nope\.png"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="not a file"):
        load_image(tmp_path)


def test_load_image_zero_bytes(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=r"0-byte.*empty\.png"):
        load_image(path)


def test_load_image_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(InputError, match=r"not an image.*notes\.png") as info:
        load_image(path)
    assert info.value.hint


def test_load_image_corrupt(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.png"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"truncated\.png"):
        load_image(bad)


def test_load_image_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    with pytest.raises(InputError, match=r"too large.*big\.png") as info:
        load_image(path, max_pixels=5000)
    assert info.value.hint is not None and "max_pixels=N" in info.value.hint

    # Default limit = Pillow's; 10,000 px is over 2× a 1,000-px limit, which Pillow itself refuses in open().
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match="too large"):
        load_image(path)
    assert load_image(path, max_pixels=20_000).size == (100, 100)  # raising the limit lets it through
    assert Image.MAX_IMAGE_PIXELS == 1000  # and Pillow's process-wide limit is left as it was


def test_prepared_page_is_frozen() -> None:
    page = preprocess_page(Image.new("RGB", (300, 140)), PreprocessConfig(256, 128), TINY_CFG, [10])
    assert isinstance(page, PreparedPage)
    with pytest.raises(AttributeError):
        page.n_crops = 3  # type: ignore[misc]


# ------------------------------------------------------------------------------------ deployment presets
# (page w, h) -> (reference infer() grid, tokens), (vLLM grid, tokens).  Hand-computed from the rules: the grid
# whose aspect is nearest the page's among 2..9 (reference) or 2..6 tiles (vLLM's MAX_CROPS = 6), ties to the
# larger grid when the page covers more than half of it; tokens = 16·17 + 1 + (10·cols + 1)·(10·rows).
# 1920×1080 (issue 17): aspect 1.78, 2×1 and 4×2 tie at 2.0, the page's 2.07 Mpx > half of 8 tiles → 4×2 / 2×1.
# 64×6000: aspect 0.011, nearest 1×9 (0.111) / 1×6 (0.167).  2000×2000: 2×2 and 3×3 tie exactly, the page's 4 Mpx
# > half of 9 tiles → 3×3 (reference; vLLM has no 3×3).  A4 at 150 dpi (1240×1754, 0.707): 2×3 in both.
_DEPLOYMENT_CASES = {
    (1920, 1080): (((4, 2), 1093), ((2, 1), 483)),
    (64, 6000): (((1, 9), 1263), ((1, 6), 933)),
    (1240, 1754): (((2, 3), 903), ((2, 3), 903)),
    (2480, 3508): (((2, 3), 903), ((2, 3), 903)),
    (3000, 1000): (((3, 1), 583), ((3, 1), 583)),
    (2000, 2000): (((3, 3), 1203), ((2, 2), 693)),
    (5000, 1000): (((5, 1), 783), ((5, 1), 783)),
    (7000, 1000): (((7, 1), 983), ((6, 1), 883)),
    (600, 600): (((1, 1), 273), ((1, 1), 273)),
}


@pytest.mark.parametrize(("width", "height"), list(_DEPLOYMENT_CASES))
@pytest.mark.parametrize("preset", ["deepseek_ocr.gundam", "deepseek_ocr.vllm_gundam"])
def test_deployment_presets_tile_grids_and_tokens(compose_cfg, preset: str, width: int, height: int) -> None:
    """The shipped infer presets, loaded through the settings as the CLI does, give each page the reference's or
    vLLM's grid."""
    from llm_perf_opt.runners.backends.native import preprocess_config
    from llm_perf_opt.runners.settings import load_settings

    cfg = compose_cfg(
        ["model/deepseek_ocr/arch=deepseek_ocr.dummy", f"model/deepseek_ocr/infer={preset}", "output.dir=tmp/t"]
    )
    pcfg = preprocess_config(load_settings(cfg).resolved("cpu").model)
    assert pcfg.max_crops == (6 if "vllm" in preset else 9)
    grid, tokens = _DEPLOYMENT_CASES[(width, height)]["vllm" in preset]
    page = preprocess_page(Image.new("RGB", (width, height), (255, 255, 255)), pcfg, REAL_CFG, REAL_PROMPT_IDS)
    assert page.images_spatial_crop == grid
    assert page.image_token_count == tokens
    assert page.n_crops == (grid[0] * grid[1] if grid != (1, 1) else 0)
    assert page.prompt_len == 1 + tokens + 9


# ---------------------------------------------------------------- uint8 views, normalised on the device
@pytest.mark.parametrize(("width", "height"), [(3, 2), (1, 1), (1, 5), (4, 1)])
def test_to_uint8_channels_first_by_hand(width: int, height: int) -> None:
    """Pixel (x, y) set to (r, g, b) = (x, y, 7x + 11y + 5 mod 256) with putpixel: channel c of the tensor at
    [y, x] holds exactly that value, in a fresh writable contiguous [3, H, W] uint8 tensor (1-pixel sides too)."""
    from llm_perf_opt.models.deepseek_ocr.preprocess import to_uint8

    image = Image.new("RGB", (width, height))
    for y in range(height):
        for x in range(width):
            image.putpixel((x, y), (x, y, (7 * x + 11 * y + 5) % 256))
    got = to_uint8(image)
    assert got.dtype == torch.uint8 and tuple(got.shape) == (3, height, width) and got.is_contiguous()
    for y in range(height):
        for x in range(width):
            assert got[:, y, x].tolist() == [x, y, (7 * x + 11 * y + 5) % 256]
    got[0, 0, 0] = 200  # writable, and not PIL's buffer
    assert image.getpixel((0, 0))[0] == 0
    gray = to_uint8(Image.new("L", (2, 2), 9))  # other modes go through RGB
    assert gray.shape == (3, 2, 2) and bool((gray == 9).all())


def test_normalize_pixels_equals_independent_float32_formula() -> None:
    """Every uint8 value, each channel its own mean/std: bit-identical to numpy's float32 (x/255 - m)/s (IEEE
    correctly rounded steps, the same on the device)."""
    import numpy as np

    from llm_perf_opt.models.deepseek_ocr.preprocess import normalize_pixels

    values = np.arange(256, dtype=np.uint8)
    pixels = np.stack([values, values[::-1], values]).reshape(3, 16, 16)
    mean, std = (0.5, 0.25, 0.485), (0.5, 0.75, 0.229)
    want = (pixels.astype(np.float32) / np.float32(255.0) - np.array(mean, np.float32).reshape(3, 1, 1)) / np.array(
        std, np.float32
    ).reshape(3, 1, 1)
    got = normalize_pixels(torch.from_numpy(pixels), mean, std)
    assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(want.astype(np.float32)))


@pytest.mark.parametrize("size", [(300, 200), (900, 640), (640, 1400)])
def test_uint8_page_normalised_after_upload_equals_host_path(size: tuple[int, int]) -> None:
    from llm_perf_opt.data.datasets import synthetic_page
    from llm_perf_opt.models.deepseek_ocr.preprocess import PreprocessConfig, preprocess_page

    cfg = PreprocessConfig.for_mode("gundam")
    image = synthetic_page(size, seed=3)
    host = preprocess_page(image, cfg, 16, 10, [1, 2])
    raw = preprocess_page(image, cfg, 16, 10, [1, 2], uint8=True)
    assert host.pixel_norm is None and raw.pixel_norm == (cfg.mean, cfg.std)
    assert raw.images_ori.dtype == torch.uint8 and raw.images_crop.dtype == torch.uint8
    ori = raw.model_pixels(raw.images_ori, torch.device("cpu"), torch.float32)
    assert torch.equal(ori, host.images_ori)
    if host.n_crops:
        assert torch.equal(raw.model_pixels(raw.images_crop, torch.device("cpu"), torch.float32), host.images_crop)
    assert torch.equal(raw.input_ids, host.input_ids) and raw.images_spatial_crop == host.images_spatial_crop
