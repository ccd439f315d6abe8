"""DeepSeek-OCR-2 preprocessing: tile grids and image-token counts for real page shapes, against values worked
out by hand from the processor's rules (768-px tiles, 2–6 per page, the 768 threshold, 1024 global view)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.models.deepseek_ocr2 import DeepseekOCR2Config, build_model_v2
from llm_perf_opt.models.deepseek_ocr2.preprocess import preprocess_config_v2, preprocess_page_v2

TINY = Path(__file__).resolve().parents[3] / "fixtures" / "deepseek_ocr2_tiny"
REAL = DeepseekOCR2Config()
TEXT_IDS = list(range(10, 19))  # 9 stand-in ids, as long as the default markdown prompt

# (width, height) -> (grid_w, grid_h), each chosen by hand from the 13 candidate grids with 2..6 tiles:
#   A4 @150 dpi portrait, aspect 0.707: nearest 2/3 (0.667) ; landscape 1.414: nearest 3/2 (1.5)
#   US letter @200 dpi, 0.773: 2/3 ; square-ish 800×790, 1.013: 2/2 ; wide 2000×600, 3.33: 3/1 (4/1 is 0.67 away)
#   1920×768, 2.5: tie between 2/1 and 3/1, page area 1,474,560 > 0.5·768²·3 = 884,736 → the larger 3/1
#   1000×400, 2.5: the same tie, area 400,000 < 884,736 → 2/1 stays
#   pages with both sides <= 768 are not tiled (768×768, 700×500); 769×500 (1.538) is: 3/2
PAGES = {
    (1240, 1754): (2, 3),
    (1754, 1240): (3, 2),
    (1700, 2200): (2, 3),
    (800, 790): (2, 2),
    (2000, 600): (3, 1),
    (1920, 768): (3, 1),
    (1000, 400): (2, 1),
    (768, 768): (1, 1),
    (700, 500): (1, 1),
    (769, 500): (3, 2),
}
# 256 global + 144 per tile + 1 separator
TOKENS = {(2, 3): 1121, (3, 2): 1121, (2, 2): 833, (3, 1): 689, (2, 1): 545, (1, 1): 257}


def _page(size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size, (255, 255, 255))


@pytest.mark.parametrize("size", list(PAGES), ids=[f"{w}x{h}" for w, h in PAGES])
def test_default_mode_grid_and_tokens(size: tuple[int, int]) -> None:
    page = preprocess_page_v2(_page(size), preprocess_config_v2(), REAL, TEXT_IDS)
    grid = PAGES[size]
    assert page.images_spatial_crop == grid
    assert page.image_token_count == TOKENS[grid]
    assert page.prompt_len == 1 + TOKENS[grid] + len(TEXT_IDS)
    assert int(page.images_seq_mask.sum()) == TOKENS[grid]
    assert page.images_ori.shape == (1, 3, 1024, 1024)
    k = grid[0] * grid[1]
    if k > 1:
        assert page.n_crops == k and page.images_crop.shape == (k, 3, 768, 768)
    else:
        assert page.n_crops == 0


def test_non_crop_modes() -> None:
    wide = _page((1000, 500))
    base = preprocess_page_v2(wide, preprocess_config_v2("1024"), REAL, TEXT_IDS)
    assert (base.images_spatial_crop, base.image_token_count, base.images_ori.shape) == (
        (1, 1),
        257,
        (1, 3, 1024, 1024),
    )
    # Letterboxed: the top rows are the (127,127,127) fill, normalised to (127/255 - 0.5) / 0.5.
    assert base.images_ori[0, :, 0, 0].tolist() == pytest.approx([127 / 255 * 2 - 1] * 3)
    small = preprocess_page_v2(wide, preprocess_config_v2("768"), REAL, TEXT_IDS)
    assert (small.images_spatial_crop, small.image_token_count, small.images_ori.shape) == (
        (1, 1),
        145,
        (1, 3, 768, 768),
    )
    # Stretched, not letterboxed: the white page fills the view.
    assert torch.all(small.images_ori == 1.0)


def test_bad_mode_and_view_size() -> None:
    with pytest.raises(ConfigError, match="unknown DeepSeek-OCR-2 mode"):
        preprocess_config_v2("gundam")
    v1_geometry = preprocess_config_v2().__class__(base_size=1024, image_size=640)
    with pytest.raises(ConfigError, match="a tile of 640 px"):
        preprocess_page_v2(_page((1500, 1000)), v1_geometry, REAL, TEXT_IDS)


def test_tiny_model_consumes_a_preprocessed_page() -> None:
    cfg = DeepseekOCR2Config.from_json(TINY / "config.json")
    model = build_model_v2(cfg, weights=TINY)
    page = preprocess_page_v2(_page((1000, 400)), preprocess_config_v2(), cfg, TEXT_IDS)
    feats = model.encode_images(page.images_crop, page.images_ori, page.images_spatial_crop)
    assert feats.shape == (page.image_token_count, 64) == (545, 64)
    embeds = model.embed_prompt(page.input_ids, page.images_seq_mask, [feats])
    assert embeds.shape == (1, page.prompt_len, 64)
