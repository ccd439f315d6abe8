"""Page image → model inputs, laid out exactly as DeepSeek-OCR's reference ``infer()`` lays them out.

What the reference does with one page (and what this module reproduces):

* **Global view** — the whole page, aspect kept, letter-boxed onto a ``base_size`` square filled with the
  mean colour (127,127,127).  It yields ``q_b × q_b`` feature tokens (``q = ceil(size / patch / 4)``: SAM's
  16-px patches, then two stride-2 convolutions), each row closed by an ``image_newline`` token, plus one
  ``view_seperator`` token: ``(q_b + 1)·q_b + 1`` image tokens.
* **Tiles** (crop mode, page larger than one tile) — the page is resized to ``grid_w × grid_h`` tiles of
  ``image_size`` px (the grid whose aspect ratio is closest to the page's, 2..9 tiles) and cut row-major.
  The tiles form one big ``(grid_h·q) × (grid_w·q)`` feature grid, each row again closed by a newline:
  ``(q·grid_w + 1)·(q·grid_h)`` more image tokens.
* **Prompt** — ``[bos] + text-before-<image> + image tokens + text-after-<image>``, with ``images_seq_mask``
  true exactly on the image tokens.
* **Normalisation** — ``(pixel/255 − mean) / std`` per channel, float32.

Vendor quirks (``PreprocessConfig.vendor_quirks``, on by default so token counts match the real model):

1. The reference compares the page with a literal 640 to decide whether to crop, and uses the same 640
   for the grid's tie-break, whatever ``image_size`` says.  640 is the tile size of the checkpoint's only
   crop mode (Gundam), so with quirks on the threshold is ``min(image_size, 640)``: identical to the
   reference for every tile size ≤ 640 (all real modes), and the rule the tiny fixture
   (tiles of 128, 300×140 page cropped 2×1) shows was used for small tiles, where a 640 threshold would
   never crop.  ``crop_threshold_px`` pins it to any value; without quirks it is ``image_size``.
   Tiles are always cut at ``image_size`` (the reference cuts 640-px tiles even when ``image_size`` is not
   640, which would disagree with its own token count; no shipped mode does that).
2. Without crops, the reference *stretches* the page to a square (no letter-box) when the view is no
   larger than that same threshold — modes tiny (512) and small (640); base (1024) and large (1280) pad.
   Without quirks the page is always letter-boxed.

Deliberate difference: without crops the single view has ``base_size`` px.  The reference sizes it with
``image_size``, but all of its non-crop modes have ``base_size == image_size``, so the named modes are
unaffected; the tiny fixture's ``global_only`` case (base 256, tiles 128, no crops → a 256 view) needs
``base_size``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar, overload

import attrs
import torch
from PIL import Image, ImageOps

from llm_perf_opt.errors import ConfigError, InputError
from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig

__all__ = [
    "VENDOR_TILE_PX",
    "PreparedPage",
    "PreprocessConfig",
    "build_prompt_ids",
    "candidate_grids",
    "choose_crop_grid",
    "crop_tiles",
    "global_view",
    "image_token_count",
    "normalize",
    "preprocess_page",
    "tokens_per_side",
]

log = logging.getLogger(__name__)

VENDOR_TILE_PX = 640
"""The literal the reference compares pages with (crop decision, grid tie-break, stretch rule)."""

_DEFAULT_PATCH = 16
_DEFAULT_DOWNSAMPLE = 4
_RESAMPLE = Image.Resampling.BICUBIC  # the reference's default for RGB resize and ImageOps.pad


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and int(value) <= 0:
        raise ConfigError(f"preprocess.{attribute.name} must be > 0, got {value}", hint="e.g. base_size=1024")


def _triple_float(value: Sequence[float]) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in value)
    if len(vals) != 3:
        raise ConfigError(f"expected 3 per-channel values (R, G, B), got {list(value)}")
    return vals[0], vals[1], vals[2]


def _triple_int(value: Sequence[int]) -> tuple[int, int, int]:
    vals = tuple(int(v) for v in value)
    if len(vals) != 3 or any(not 0 <= v <= 255 for v in vals):
        raise ConfigError(f"pad_color must be 3 values in 0..255, got {list(value)}")
    return vals[0], vals[1], vals[2]


@attrs.frozen
class PreprocessConfig:
    """How to turn a page into views and tokens; the named vendor modes come from ``for_mode``.

    ``crop_threshold_px``: pages no larger than this on both sides are not cropped (and, without crops,
    views no larger than it are stretched when ``vendor_quirks``).  ``None`` = ``min(image_size, 640)``
    with quirks (the reference's literal 640, see the module docstring), ``image_size`` without.
    """

    base_size: int = attrs.field(converter=int, validator=_positive)
    image_size: int = attrs.field(converter=int, validator=_positive)
    crop_mode: bool = attrs.field(default=True, converter=bool)
    min_crops: int = attrs.field(default=2, converter=int, validator=_positive)
    max_crops: int = attrs.field(default=9, converter=int, validator=_positive)
    crop_threshold_px: int | None = attrs.field(default=None, validator=_positive)
    vendor_quirks: bool = attrs.field(default=True, converter=bool)
    mean: tuple[float, float, float] = attrs.field(default=(0.5, 0.5, 0.5), converter=_triple_float)
    std: tuple[float, float, float] = attrs.field(default=(0.5, 0.5, 0.5), converter=_triple_float)
    pad_color: tuple[int, int, int] = attrs.field(default=(127, 127, 127), converter=_triple_int)

    MODES: ClassVar[dict[str, tuple[int, int, bool]]] = {
        "tiny": (512, 512, False),
        "small": (640, 640, False),
        "base": (1024, 1024, False),
        "large": (1280, 1280, False),
        "gundam": (1024, 640, True),
    }

    def __attrs_post_init__(self) -> None:
        if self.min_crops > self.max_crops:
            raise ConfigError(
                f"preprocess.min_crops ({self.min_crops}) > max_crops ({self.max_crops})",
                hint="the reference uses min_crops=2, max_crops=9",
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"preprocess.std must be > 0, got {list(self.std)}")

    @classmethod
    def for_mode(cls, name: str, *, vendor_quirks: bool = True) -> PreprocessConfig:
        """The reference's resolution modes: tiny, small, base, large (one view) and gundam (global + tiles)."""
        key = name.strip().lower()
        if key not in cls.MODES:
            raise ConfigError(f"unknown DeepSeek-OCR resolution mode {name!r}", hint=f"one of: {', '.join(cls.MODES)}")
        base, tile, crop = cls.MODES[key]
        return cls(
            base_size=base,
            image_size=tile,
            crop_mode=crop,
            crop_threshold_px=VENDOR_TILE_PX,
            vendor_quirks=vendor_quirks,
        )

    @classmethod
    def from_model(
        cls, model: DeepseekOCRConfig, *, crop_mode: bool = True, vendor_quirks: bool = True
    ) -> PreprocessConfig:
        """The model's own geometry (real: 1024 + 640 tiles; tiny fixture: 256 + 128 tiles)."""
        return cls(
            base_size=model.base_size, image_size=model.image_size, crop_mode=crop_mode, vendor_quirks=vendor_quirks
        )

    @property
    def threshold_px(self) -> int:
        """Effective crop / stretch threshold (see the class docstring)."""
        if self.crop_threshold_px is not None:
            return int(self.crop_threshold_px)
        return min(self.image_size, VENDOR_TILE_PX) if self.vendor_quirks else self.image_size

    @property
    def stretches_view(self) -> bool:
        """Quirk 2: a single (non-crop) view no larger than the threshold is stretched, not letter-boxed."""
        return self.vendor_quirks and not self.crop_mode and self.base_size <= self.threshold_px


@attrs.frozen
class PreparedPage:
    """Everything the model needs for one page, in the reference's tensor layout (batch of one).

    ``images_crop`` is ``[n_crops, 3, image_size, image_size]``, or zeros ``[1, 3, base, base]`` when the
    page has no tiles (the reference passes that placeholder and detects it by its zero sum).
    ``images_spatial_crop`` is ``(grid_w, grid_h)``; ``(1, 1)`` without tiles.
    """

    images_crop: torch.Tensor
    images_ori: torch.Tensor
    images_spatial_crop: tuple[int, int]
    n_crops: int
    image_token_count: int
    input_ids: torch.Tensor
    images_seq_mask: torch.Tensor
    prompt_len: int
    page_size: tuple[int, int]
    # None: the image tensors are normalised float32.  (mean, std): they are uint8 pixels still to be normalised
    # with these, on the device after the upload (:meth:`model_pixels`); the no-tile placeholder stays zeros.
    pixel_norm: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None

    def model_pixels(self, pixels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``pixels`` (this page's ``images_crop`` / ``images_ori`` or a concatenation of such) as the vision
        encoder takes them: on ``device`` in ``dtype``, normalised there when they were uploaded as uint8."""
        if self.pixel_norm is None:
            return pixels.to(device=device, dtype=dtype, non_blocking=True)
        uploaded = pixels.to(device=device, non_blocking=True)
        return normalize_pixels(uploaded, *self.pixel_norm).to(dtype)

    def pinned(self) -> PreparedPage:
        """The same page with its image tensors (and ids/mask) in page-locked host memory, so a
        ``.to(cuda, non_blocking=True)`` is a true asynchronous DMA instead of a staged, blocking copy.
        PyTorch's caching host allocator recycles the pinned blocks across pages."""
        return attrs.evolve(
            self,
            images_crop=self.images_crop.pin_memory(),
            images_ori=self.images_ori.pin_memory(),
            input_ids=self.input_ids.pin_memory(),
            images_seq_mask=self.images_seq_mask.pin_memory(),
        )

    @property
    def images_spatial_crop_tensor(self) -> torch.Tensor:
        """``[1, 2]`` int64, as the reference's forward() takes it."""
        return torch.tensor([list(self.images_spatial_crop)], dtype=torch.long)


# ------------------------------------------------------------------------------------------- geometry


def tokens_per_side(view_px: int, patch_size: int = _DEFAULT_PATCH, downsample: int = _DEFAULT_DOWNSAMPLE) -> int:
    """Feature tokens along one side of a square view: ``ceil((view // patch) / downsample)``."""
    return math.ceil((view_px // patch_size) / downsample)


def image_token_count(grid: tuple[int, int], tokens_per_side_global: int, tokens_per_side_tile: int) -> int:
    """Image tokens for one page: global rows + newlines + separator, then the tile grid (if any)."""
    qb, q = tokens_per_side_global, tokens_per_side_tile
    count = (qb + 1) * qb + 1
    grid_w, grid_h = grid
    if grid_w > 1 or grid_h > 1:
        count += (q * grid_w + 1) * (q * grid_h)
    return count


def candidate_grids(min_crops: int, max_crops: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with ``min_crops <= cols·rows <= max_crops``, by tile count.

    Within one tile count the order is CPython's set order of the tuples, which is what the reference
    iterates (it matters only for exact aspect-ratio ties; pinned by a unit test for 2..9).
    """
    grids = {
        (cols, rows)
        for cols in range(1, max_crops + 1)
        for rows in range(1, max_crops + 1)
        if min_crops <= cols * rows <= max_crops
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def _closest_grid(width: int, height: int, grids: Sequence[tuple[int, int]], tie_px: int) -> tuple[int, int]:
    """Grid whose aspect is nearest the page's; on an exact tie the larger grid wins if the page has
    more than half its pixel area (measured in ``tie_px`` tiles)."""
    aspect = width / height
    best = (1, 1)
    best_diff = math.inf
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tie_px * tie_px * cols * rows:
            best = (cols, rows)
    return best


def choose_crop_grid(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """``(grid_w, grid_h)`` for a page; ``(1, 1)`` means no tiles (no crop mode, or the page fits one tile)."""
    threshold = cfg.threshold_px
    if not cfg.crop_mode or (width <= threshold and height <= threshold):
        return (1, 1)
    return _closest_grid(width, height, candidate_grids(cfg.min_crops, cfg.max_crops), threshold)


def crop_tiles(image: Image.Image, grid: tuple[int, int], tile_px: int) -> list[Image.Image]:
    """Resize the page to the grid (stretching it) and cut ``tile_px`` squares, row by row."""
    cols, rows = grid
    resized = image.resize((tile_px * cols, tile_px * rows), _RESAMPLE)
    return [
        resized.crop((c * tile_px, r * tile_px, (c + 1) * tile_px, (r + 1) * tile_px))
        for r in range(rows)
        for c in range(cols)
    ]


def global_view(image: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """The ``base_size`` square view: letter-boxed with ``pad_color``, or stretched under quirk 2."""
    size = (cfg.base_size, cfg.base_size)
    if cfg.stretches_view:
        image = image.resize(size, _RESAMPLE)
    return ImageOps.pad(image, size, method=_RESAMPLE, color=cfg.pad_color)


def rgb_page(image: Image.Image) -> tuple[Image.Image, tuple[int, int]]:
    """The page in RGB and its (width, height); a page without pixels is one InputError."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InputError(f"page has no pixels ({width}×{height})")
    return image, (width, height)


def to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB image → ``[3, H, W]`` uint8 (the bytes as they are: a quarter of float32's upload)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    raw = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return raw.permute(2, 0, 1).contiguous()


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` (on any device) → float32 ``(x/255 − mean) / std``.

    The one normalisation of both paths: the host's :func:`normalize` and the device's (uint8 tiles uploaded,
    normalised where they are).  Each step is one IEEE-754 float32 operation (convert, divide, subtract,
    divide), correctly rounded on the CPU and on CUDA alike, so both give the same bits.
    """
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return pixels.to(torch.float32).div(255.0).sub(m).div(s).contiguous()


def normalize(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB image → ``[3, H, W]`` float32, ``(x/255 − mean) / std`` (the reference's ToTensor + Normalize)."""
    return normalize_pixels(to_uint8(image), mean, std)


# --------------------------------------------------------------------------------------------- prompt


def build_prompt_ids(
    prompt_ids: Sequence[int], n_image_tokens: int, image_token_id: int, bos_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``images_seq_mask`` (both ``[1, L]``) with the image run expanded in place.

    ``prompt_ids`` are the prompt's text ids; one ``image_token_id`` in them marks where ``<image>`` was
    (what ``tokenizer.encode_prompt`` returns).  Without a marker the image comes first, as in the default
    prompt ``"<image>\\n…"`` — so the tiny fixture's stand-in ids 10..16 can be passed as they are.
    """
    ids = [int(t) for t in prompt_ids]
    markers = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(markers) > 1:
        raise InputError(
            f"the prompt holds {len(markers)} image tokens (id {image_token_id}); one page takes exactly one",
            hint="use a single <image> in the prompt",
        )
    if markers:
        before, after = ids[: markers[0]], ids[markers[0] + 1 :]
    else:
        before, after = [], ids
    seq = [bos_id, *before, *([image_token_id] * n_image_tokens), *after]
    mask = [False] * (1 + len(before)) + [True] * n_image_tokens + [False] * len(after)
    input_ids = torch.tensor([seq], dtype=torch.int64)
    images_seq_mask = torch.tensor([mask], dtype=torch.bool)
    return input_ids, images_seq_mask


# ----------------------------------------------------------------------------------------------- page


def page_views(
    image: Image.Image, cfg: PreprocessConfig, grid: tuple[int, int], uint8: bool = False
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A page's pixels for the vision towers -> (global view [1, 3, base, base], tiles [k, 3, s, s], k): normalised
    float32, or with ``uint8`` the bytes as they are (normalised on the device after the upload).  A 1×1 grid
    (``min_crops=1``) adds no tiles, as in the reference: the tiles are then one zero placeholder view and k is 0."""

    def pixels(view: Image.Image) -> torch.Tensor:
        return to_uint8(view) if uint8 else normalize(view, cfg.mean, cfg.std)

    ori = pixels(global_view(image, cfg)).unsqueeze(0)
    if grid[0] > 1 or grid[1] > 1:
        return ori, torch.stack([pixels(t) for t in crop_tiles(image, grid, cfg.image_size)]), grid[0] * grid[1]
    return ori, torch.zeros((1, 3, cfg.base_size, cfg.base_size), dtype=ori.dtype), 0


def _prepare(
    image: Image.Image,
    cfg: PreprocessConfig,
    q_global: int,
    q_tile: int,
    prompt_ids: Sequence[int],
    image_token_id: int,
    bos_id: int,
    uint8: bool = False,
) -> PreparedPage:
    if q_global <= 0 or q_tile <= 0:
        raise ConfigError(f"tokens per side must be > 0, got global {q_global}, tile {q_tile}")
    image, (width, height) = rgb_page(image)

    grid = choose_crop_grid(width, height, cfg)
    ori, crops, n_crops = page_views(image, cfg, grid, uint8)

    count = image_token_count(grid, q_global, q_tile)
    input_ids, mask = build_prompt_ids(prompt_ids, count, image_token_id, bos_id)
    return PreparedPage(
        images_crop=crops,
        images_ori=ori,
        images_spatial_crop=grid,
        n_crops=n_crops,
        image_token_count=count,
        input_ids=input_ids,
        images_seq_mask=mask,
        prompt_len=int(input_ids.shape[1]),
        page_size=(width, height),
        pixel_norm=(cfg.mean, cfg.std) if uint8 else None,
    )


@overload
def preprocess_page(
    image: Image.Image,
    cfg: PreprocessConfig,
    model: DeepseekOCRConfig,
    prompt_ids: Sequence[int],
    /,
    *,
    uint8: bool = ...,
) -> PreparedPage: ...


@overload
def preprocess_page(
    image: Image.Image,
    cfg: PreprocessConfig,
    tokens_per_side_global: int,
    tokens_per_side_tile: int,
    prompt_ids: Sequence[int],
    /,
    *,
    image_token_id: int = ...,
    bos_id: int = ...,
    uint8: bool = ...,
) -> PreparedPage: ...


def preprocess_page(image: Image.Image, cfg: PreprocessConfig, *args: Any, **kwargs: Any) -> PreparedPage:
    """Views, tile grid, normalised tensors and the token layout for one page.

    Two call forms:

    * ``preprocess_page(image, cfg, model_config, prompt_ids)`` — tokens per side follow from the view
      sizes and the model's patch size; image and bos ids come from the model config.
    * ``preprocess_page(image, cfg, tokens_per_side_global, tokens_per_side_tile, prompt_ids,
      image_token_id=128815, bos_id=0)`` — explicit geometry (e.g. 16 and 10 for Gundam).

    ``prompt_ids``: see ``build_prompt_ids``.  ``uint8=True`` (keyword, both forms) keeps the views as uint8
    pixels (``pixel_norm`` set) for normalisation on the device after a 4× smaller upload.
    """
    uint8 = bool(kwargs.pop("uint8", False))
    if args and isinstance(args[0], DeepseekOCRConfig):
        if len(args) != 2 or kwargs:
            raise TypeError("preprocess_page(image, cfg, model_config, prompt_ids, *, uint8=False) takes no other "
                            "arguments")  # fmt: skip
        model: DeepseekOCRConfig = args[0]
        patch = model.sam.patch_size
        down = 2 ** len(model.sam.downsample_channels)
        return _prepare(
            image,
            cfg,
            tokens_per_side(cfg.base_size, patch, down),
            tokens_per_side(cfg.image_size, patch, down),
            args[1],
            model.image_token_id,
            model.language.bos_token_id,
            uint8,
        )
    if len(args) != 3:
        raise TypeError(
            "preprocess_page(image, cfg, tokens_per_side_global, tokens_per_side_tile, prompt_ids, "
            "*, image_token_id=..., bos_id=...)"
        )
    unknown = set(kwargs) - {"image_token_id", "bos_id"}
    if unknown:
        raise TypeError(f"preprocess_page: unexpected keyword(s) {sorted(unknown)}")
    return _prepare(
        image,
        cfg,
        int(args[0]),
        int(args[1]),
        args[2],
        int(kwargs.get("image_token_id", DeepseekOCRConfig().image_token_id)),
        int(kwargs.get("bos_id", 0)),
        uint8,
    )
