"""Page image → DeepSeek-OCR-2 inputs: v1's preprocessing steps with v2's geometry and token layout.

The steps are v1's (:mod:`llm_perf_opt.models.deepseek_ocr.preprocess`: the aspect-ratio
grid search with its area tie-break, stretch-and-cut tiles, letterboxing with (127,127,127), normalisation,
the prompt with the image run expanded); what changes is the geometry, as DeepSeek-OCR-2's processor sets it:

* tiles are 768 px, 2–6 per page (v1: 640 px, 2–9); a page is tiled only when a side exceeds 768 px, and the
  grid tie-break measures area in 768-px tiles (the processor's literal 768, equal to its tile size);
* the global view is 1024 px, letterboxed;
* two non-crop modes: ``1024`` (one letterboxed 1024 view) and ``768`` (the page stretched to 768², as the
  processor resizes views ≤ 768 px when not cropping);
* image tokens = ``q_b² + k·q² + 1`` (256 + 144·k + 1 by default; 145 in the 768 mode): no ``image_newline``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from PIL import Image

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.models.deepseek_ocr.preprocess import (
    PreparedPage,
    PreprocessConfig,
    build_prompt_ids,
    choose_crop_grid,
    page_views,
    rgb_page,
)
from llm_perf_opt.models.deepseek_ocr2.config import DeepseekOCR2Config
from llm_perf_opt.models.deepseek_ocr2.model import num_image_tokens_v2

__all__ = ["MODES_V2", "V2_MAX_CROPS", "V2_MIN_CROPS", "V2_TILE_PX", "preprocess_config_v2", "preprocess_page_v2"]

V2_TILE_PX: Final = 768  # tile size and crop threshold of DeepSeek-OCR-2's processor
V2_MIN_CROPS: Final = 2
V2_MAX_CROPS: Final = 6

# name -> (global view px, tile px, crop mode)
MODES_V2: Final[dict[str, tuple[int, int, bool]]] = {
    "default": (1024, V2_TILE_PX, True),
    "1024": (1024, 1024, False),
    "768": (V2_TILE_PX, V2_TILE_PX, False),
}


def preprocess_config_v2(mode: str = "default") -> PreprocessConfig:
    """The processor's settings for a v2 mode: ``default`` (1024 global + 768 tiles), ``1024`` or ``768``."""
    key = str(mode).strip().lower()
    if key not in MODES_V2:
        raise ConfigError(f"unknown DeepSeek-OCR-2 mode {mode!r}", hint=f"one of: {', '.join(MODES_V2)}")
    base, tile, crop = MODES_V2[key]
    return PreprocessConfig(
        base_size=base,
        image_size=tile,
        crop_mode=crop,
        min_crops=V2_MIN_CROPS,
        max_crops=V2_MAX_CROPS,
        crop_threshold_px=V2_TILE_PX,
        vendor_quirks=True,
    )


def _check_view(model: DeepseekOCR2Config, view_px: int, what: str) -> None:
    side = model.tokens_per_side(view_px)
    allowed = (model.encoder.query_768_tokens, model.encoder.query_1024_tokens)
    if side * side not in allowed or view_px % (model.sam.patch_size * 4):
        raise ConfigError(
            f"{what} of {view_px} px gives {side}×{side} SAM tokens; the encoder has learned queries for {allowed}",
            hint="DeepSeek-OCR-2 views are 768 or 1024 px (preprocess_config_v2('default' | '1024' | '768'))",
        )


def preprocess_page_v2(
    image: Image.Image,
    cfg: PreprocessConfig,
    model: DeepseekOCR2Config,
    prompt_ids: Sequence[int],
    *,
    uint8: bool = False,
) -> PreparedPage:
    """Views, tile grid, normalised tensors and the v2 token layout for one page (``prompt_ids``: as in v1's
    ``build_prompt_ids``: one image-token id marks ``<image>``, none puts the image first).  ``uint8=True`` keeps
    the views as uint8 pixels (``pixel_norm`` set) for normalisation on the device after the upload (the batched
    phase; the same float32 values, as in v1's ``preprocess_page``)."""
    _check_view(model, cfg.base_size, "the global view")
    if cfg.crop_mode:
        _check_view(model, cfg.image_size, "a tile")
    image, (width, height) = rgb_page(image)

    grid = choose_crop_grid(width, height, cfg)
    ori, crops, n_tiles = page_views(image, cfg, grid, uint8)
    count = num_image_tokens_v2(model, n_tiles, base_size=cfg.base_size, image_size=cfg.image_size)
    input_ids, mask = build_prompt_ids(prompt_ids, count, model.image_token_id, model.language.bos_token_id)
    return PreparedPage(
        images_crop=crops,
        images_ori=ori,
        images_spatial_crop=grid,
        n_crops=n_tiles,
        image_token_count=count,
        input_ids=input_ids,
        images_seq_mask=mask,
        prompt_len=int(input_ids.shape[1]),
        page_size=(width, height),
        pixel_norm=(cfg.mean, cfg.std) if uint8 else None,
    )
