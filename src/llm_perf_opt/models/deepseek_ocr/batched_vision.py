"""Vision for several pages at once: views of the same pixel size batched across pages, features laid out per page.

All tiles of all pages go through one pass of the model's view encoder (``_encode_views``: SAM → CLIP → projector
for DeepSeek-OCR, SAM → encoder → projector for DeepSeek-OCR-2; the modules are called as modules, so forward
hooks fire once per pass), all global views through another (``vision_batch`` caps views per pass).  Each page's
features are then laid out exactly as the model's ``encode_images`` lays them out (``layout_features``: v1's tile
grid with ``image_newline`` per row, global view with newlines, ``view_seperator``; v2's tiles, global view,
``view_seperator``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from llm_perf_opt.errors import InputError
from llm_perf_opt.models.deepseek_ocr.fast import VISION_SDPA, FastModel
from llm_perf_opt.models.deepseek_ocr.model import DeepseekOCRForCausalLM, parse_spatial_crop
from llm_perf_opt.models.deepseek_ocr.preprocess import PreparedPage

__all__ = ["VIEW_CHUNK_MAX", "encode_pages", "view_chunks", "warm_view_chunks"]

# With the fast path a view batch is cut into power-of-two chunks of at most this many views: every chunk size is
# one compiled and graphed shape per view size, so refills of any number of pages (continuous batching refills 1-3
# at a time, each with 2-9 tiles) reuse at most log2(VIEW_CHUNK_MAX) + 1 shapes, warmed before the timed run,
# instead of compiling one per view count inside it.
VIEW_CHUNK_MAX = 32


def _largest_chunk(cap: int | None) -> int:
    """The largest power-of-two chunk: at most ``min(cap, VIEW_CHUNK_MAX)`` views."""
    limit = VIEW_CHUNK_MAX if cap is None else min(cap, VIEW_CHUNK_MAX)
    return 1 << (limit.bit_length() - 1)


def view_chunks(n: int, cap: int | None, pow2: bool) -> list[int]:
    """Sizes of the consecutive chunks ``n`` views are encoded in: ``cap`` at a time (all at once without a cap),
    or with ``pow2`` the largest power of two that fits, at most ``min(cap, VIEW_CHUNK_MAX)`` (e.g. 23 -> 16, 4,
    2, 1)."""
    if n <= 0:
        return []
    if not pow2:
        step = n if cap is None else cap
        return [min(step, n - begin) for begin in range(0, n, step)]
    largest = _largest_chunk(cap)
    sizes: list[int] = []
    while n > 0:
        size = min(largest, 1 << (n.bit_length() - 1))
        sizes.append(size)
        n -= size
    return sizes


@contextlib.contextmanager
def _vision_context(base: DeepseekOCRForCausalLM, fast: FastModel | None) -> Iterator[None]:
    """The SDPA policy and (with a FastModel) the fast vision mode that ``encode_images`` would use."""
    if fast is None:
        with base._sdpa_policy():
            yield
        return
    saved = base.sdpa_backends
    if VISION_SDPA[fast.fast_config.vision_sdpa] is not None:
        base.sdpa_backends = None  # the fast path's vision policy decides, as in FastModel.encode_images
    try:
        with fast._vision_policy(), fast.vision_mode(), base._sdpa_policy():
            yield
    finally:
        base.sdpa_backends = saved


def _encode_views(base: DeepseekOCRForCausalLM, pixels: Tensor, vision_batch: int | None, pow2: bool) -> Tensor:
    """The model's own view encoder (``_encode_views``) over same-size views -> [n, tokens, hidden], in the chunks
    of :func:`view_chunks`."""
    outs: list[Tensor] = []
    begin = 0
    for size in view_chunks(int(pixels.shape[0]), vision_batch, pow2):
        outs.append(base._encode_views(pixels[begin : begin + size]))
        begin += size
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@torch.no_grad()
def encode_pages(
    base: DeepseekOCRForCausalLM, fast: FastModel | None, pages: Sequence[PreparedPage], vision_batch: int | None
) -> list[Tensor]:
    """Every page's image features ([n_image_tokens, hidden] each, as ``encode_images`` returns them), with the
    views of all pages grouped by pixel size into batched vision calls (tiles before globals)."""
    dev, dtype = base.device, base.dtype
    grids: list[tuple[int, int]] = []
    # group key (kind, H, W) -> list of (page index, tensor); dict order = first-seen order
    groups: dict[tuple[str, int, int, Any], list[tuple[int, Tensor]]] = {}
    for i, page in enumerate(pages):
        grid = parse_spatial_crop(page.images_spatial_crop)
        grids.append(grid)
        ori = page.images_ori
        if ori.dim() != 4 or ori.shape[0] != 1:
            raise InputError(f"page {i}: images_ori must be [1, 3, H, W], got {tuple(ori.shape)}")
        if grid != (1, 1):
            crops = page.images_crop
            n_tiles = grid[0] * grid[1]
            if crops.dim() != 4 or crops.shape[0] != n_tiles:
                raise InputError(
                    f"page {i}: crop grid {grid[0]}x{grid[1]} needs {n_tiles} tiles, "
                    f"images_crop has shape {tuple(crops.shape)}"
                )
            key = ("tile", int(crops.shape[2]), int(crops.shape[3]), page.pixel_norm)
            groups.setdefault(key, []).append((i, crops))
        groups.setdefault(("global", int(ori.shape[2]), int(ori.shape[3]), page.pixel_norm), []).append((i, ori))
    groups = dict(sorted(groups.items(), key=lambda kv: kv[0][0] != "tile"))  # tiles first, then globals

    local: list[Tensor | None] = [None] * len(pages)
    glob: list[Tensor | None] = [None] * len(pages)
    with _vision_context(base, fast):
        for (kind, _, _, _), members in groups.items():
            # uint8 views (pixel_norm set, the same for the whole group) are normalised here, after the upload
            pixels = pages[members[0][0]].model_pixels(torch.cat([t for _, t in members]), dev, dtype)
            feats = _encode_views(base, pixels, vision_batch, pow2=fast is not None)
            begin = 0
            for i, t in members:
                n = int(t.shape[0])
                (local if kind == "tile" else glob)[i] = feats[begin : begin + n]
                begin += n

    out: list[Tensor] = []
    for i, grid in enumerate(grids):
        g = glob[i]
        assert g is not None
        out.append(base.layout_features(local[i], g, grid))
    return out


@torch.inference_mode()  # as the timed run: the graphs' static buffers from earlier pages are inference tensors
def warm_view_chunks(
    base: DeepseekOCRForCausalLM, fast: FastModel, pages: Sequence[PreparedPage], vision_batch: int | None
) -> int:
    """Encode zero views of every chunk size :func:`view_chunks` can produce, for every view size of ``pages``
    (tiles and global views), so each compiled / graphed vision shape exists before a timed run; returns the
    number of chunk shapes run."""
    dev, dtype = base.device, base.dtype
    sizes = {(int(p.images_ori.shape[2]), int(p.images_ori.shape[3])) for p in pages}
    sizes |= {
        (int(p.images_crop.shape[2]), int(p.images_crop.shape[3]))
        for p in pages
        if parse_spatial_crop(p.images_spatial_crop) != (1, 1)
    }
    chunk_sizes = [1 << i for i in range(_largest_chunk(vision_batch).bit_length())]  # 1, 2, 4, ... largest
    with _vision_context(base, fast):
        for h, w in sorted(sizes):
            for n in chunk_sizes:
                _encode_views(base, torch.zeros(n, 3, h, w, device=dev, dtype=dtype), None, pow2=True)
    return len(sizes) * len(chunk_sizes)
