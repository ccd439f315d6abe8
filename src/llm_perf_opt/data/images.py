"""Page images from disk: decoded as RGB, EXIF-rotated, with one clear error per bad file.

Loading belongs to the data layer: the model's preprocessing takes a PIL image and never opens files.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from llm_perf_opt.errors import InputError

__all__ = ["load_image"]

log = logging.getLogger(__name__)
_PIL_LIMIT_LOCK = threading.Lock()


def load_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Decode a page as RGB, rotated per its EXIF orientation (phone photos), or raise InputError.

    ``max_pixels`` (default: Pillow's decompression-bomb limit, ``PIL.Image.MAX_IMAGE_PIXELS``) guards
    against pages that would exhaust memory; it is checked from the header, before decoding.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}", hint="check the dataset path / file list")
    if not path.is_file():
        raise InputError(f"not a file: {path}", hint="dataset entries must be image files")
    if path.stat().st_size == 0:
        raise InputError(f"empty (0-byte) image file: {path}", hint="the file was probably not fully written")

    with _PIL_LIMIT_LOCK:  # never read the limit while another load_image has lifted it
        pil_limit = Image.MAX_IMAGE_PIXELS
    limit = pil_limit if max_pixels is None else int(max_pixels)
    raise_hint = (
        "if the page is genuine, raise the limit: load_image(path, max_pixels=N), or process-wide "
        f"PIL.Image.MAX_IMAGE_PIXELS = N (the default limit is Pillow's, now {pil_limit})"
    )
    try:
        with warnings.catch_warnings():
            # We enforce our own limit right after the header is read; Pillow's warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if limit is not None and pil_limit is not None and limit > pil_limit:
                # Pillow refuses > 2× its process-wide limit inside open(); lift it for this header read only.
                with _PIL_LIMIT_LOCK:
                    Image.MAX_IMAGE_PIXELS = None
                    try:
                        image = Image.open(path)
                    finally:
                        Image.MAX_IMAGE_PIXELS = pil_limit
            else:
                image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise InputError(f"image too large: {path} ({exc})", hint=raise_hint) from exc
    except UnidentifiedImageError as exc:
        raise InputError(
            f"not an image (or an unsupported format): {path}", hint="use PNG/JPEG/TIFF/WebP page images"
        ) from exc
    except PermissionError as exc:
        raise InputError(f"cannot read image (permission denied): {path}") from exc
    except OSError as exc:
        raise InputError(f"cannot open image: {path} ({exc})") from exc

    with image:
        width, height = image.size
        if limit is not None and width * height > limit:
            raise InputError(
                f"image too large: {path} is {width}×{height} = {width * height} pixels, limit {limit}",
                hint=raise_hint,
            )
        try:
            image.load()
        except OSError as exc:  # truncated / corrupt pixel data
            raise InputError(f"corrupt image data: {path} ({exc})", hint="re-export or re-download the page") from exc
        try:
            oriented = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError) as exc:
            # The reference also falls back to the unrotated page on a malformed EXIF block.
            log.warning("ignoring unreadable EXIF orientation of %s (%s)", path, exc)
            oriented = image
        rgb = oriented.convert("RGB")
    return rgb
