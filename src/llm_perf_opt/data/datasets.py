"""Pages to profile: synthetic documents drawn with Pillow, or image files from a folder / OmniDocBench.

A ``Page`` is cheap (a path or a recipe); images are decoded only when the session runs the page, so a
corrupt file fails that page alone.
"""

from __future__ import annotations

import hashlib
import math
import random
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
from PIL import Image, ImageDraw

from llm_perf_opt.data.images import load_image
from llm_perf_opt.errors import ConfigError, InputError


@attrs.frozen
class Page:
    page_id: str
    path: Path | None = None
    synthetic_size: tuple[int, int] | None = None
    seed: int = 0
    # Output length this page stands for (tokens, eos included): dummy-weight runs end its sequence there
    # ("simulated eos"); real weights ignore it.  Synthetic pages: :func:`synthetic_target_tokens`; file
    # datasets: ``dataset.lengths_file``; None = no target (the run ends at eos or the cap as usual).
    target_tokens: int | None = None

    def load(self) -> Image.Image:
        if self.synthetic_size is not None:
            return synthetic_page(self.synthetic_size, self.seed)
        assert self.path is not None
        require_regular_file(self.path)
        if _peek_mode(self.path) in HIGH_BIT_MODES:
            return load_high_bit_image(self.path)
        return load_image(self.path)

    def describe(self) -> dict[str, Any]:
        """Identity for inputs.yaml: path + size + sha256 (or the synthetic recipe)."""
        target = {} if self.target_tokens is None else {"target_tokens": self.target_tokens}
        if self.synthetic_size is not None:
            return {"page_id": self.page_id, "synthetic": True, "size_px": list(self.synthetic_size), "seed": self.seed,
                    **target}  # fmt: skip
        assert self.path is not None
        info: dict[str, Any] = {"page_id": self.page_id, "path": str(self.path), **target}
        try:
            data = self.path.read_bytes()
            info["sha256"] = hashlib.sha256(data).hexdigest()
            info["bytes"] = len(data)
        except OSError as exc:
            info["error"] = f"unreadable: {exc}"
        return info


def synthetic_page(size: tuple[int, int], seed: int) -> Image.Image:
    """A document-like page: title, paragraphs of text-like strokes, a ruled table and a figure box.

    Deterministic for (size, seed).  The content only matters for realism of preprocessing (padding,
    crops); token counts depend on the size alone.
    """
    w, h = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    margin = max(8, w // 14)
    line_h = max(6, h // 70)
    draw.rectangle([margin, margin, margin + (w - 2 * margin) * 2 // 3, margin + 2 * line_h], fill=(20, 20, 20))
    for box in _word_boxes(size, seed):
        draw.rectangle(box, fill=(40, 40, 40))
    rows, cols = 5, 4
    tx0, ty0 = margin, int(h * 0.4)
    tx1, ty1 = w - margin, int(h * 0.62)
    for r in range(rows + 1):
        yy = ty0 + (ty1 - ty0) * r // rows
        draw.line([tx0, yy, tx1, yy], fill=(0, 0, 0), width=max(1, w // 400))
    for c in range(cols + 1):
        xx = tx0 + (tx1 - tx0) * c // cols
        draw.line([xx, ty0, xx, ty1], fill=(0, 0, 0), width=max(1, w // 400))
    fx0, fy0, fx1, fy1 = margin, int(h * 0.68), w // 2, int(h * 0.92)
    draw.rectangle([fx0, fy0, fx1, fy1], outline=(0, 0, 180), width=max(1, w // 300))
    if fx1 - fx0 > 20 and fy1 - fy0 > 20:  # small pages get the box only
        draw.ellipse([fx0 + 10, fy0 + 10, fx1 - 10, fy1 - 10], fill=(200, 120, 60))
    return img


def _word_boxes(size: tuple[int, int], seed: int) -> list[list[int]]:
    """The text-like word strokes of :func:`synthetic_page` (one rectangle per word), deterministic for (size, seed)."""
    w, h = size
    rng = random.Random(seed * 1_000_003 + w * 31 + h)
    margin = max(8, w // 14)
    line_h = max(6, h // 70)
    boxes = []
    y = margin + 4 * line_h
    while y < h * 0.35:
        x = margin
        while x < w - margin - 10:
            word = rng.randint(max(3, w // 60), max(6, w // 12))
            boxes.append([x, y, min(x + word, w - margin), y + line_h // 2])
            x += word + max(3, w // 90)
        y += line_h + line_h // 2
    return boxes


# The synthetic page's table (see synthetic_page): 5 rows x 4 columns of cells.
SYNTHETIC_TABLE_CELLS = 20


def synthetic_target_tokens(size: tuple[int, int], seed: int) -> int:
    """The output length a synthetic page stands for: one token per drawn word stroke and per table cell, the
    title line, and eos.

    A documented recipe, not a tokenizer count (the page draws strokes, not text): it grows with the page's
    text area and varies with the seed, so a batch of synthetic pages ends at a realistic mix of lengths.
    """
    return len(_word_boxes(size, seed)) + SYNTHETIC_TABLE_CELLS + 2  # + title + eos


def read_lengths_file(listing: Path) -> dict[str, int]:
    """``dataset.lengths_file``: one ``<page id> <tokens>`` per line (page id = path under dataset.root; blank
    lines and ``#`` comments skipped).  The target output length of each listed page."""
    if not listing.is_file():
        raise ConfigError(
            f"dataset.lengths_file not found: {listing}",
            hint="give a text file with '<page path under dataset.root> <tokens>' per line, or set it to null",
        )
    lengths: dict[str, int] = {}
    for n, line in enumerate(listing.read_text().splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        page_id, _, value = entry.rpartition(" ")
        page_id = page_id.strip()
        if not page_id or not value.isdigit() or int(value) < 1:
            raise InputError(
                f"{listing}:{n}: expected '<page id> <tokens>' with tokens >= 1, got {line.strip()!r}",
                hint="e.g. 'images/page_001.png 1024'",
            )
        lengths[page_id] = int(value)
    return lengths


def _collect_files(root: Path, subset_filelist: str | None, patterns: Sequence[str]) -> list[Path]:
    if subset_filelist:
        listing = Path(subset_filelist)
        if not listing.is_absolute():
            listing = root / listing if (root / listing).exists() else listing
        if not listing.is_file():
            raise ConfigError(
                f"dataset.subset_filelist not found: {listing}",
                hint="give a text file with one image path per line (relative to dataset.root), or set it to null",
            )
        files = []
        for n, line in enumerate(listing.read_text().splitlines(), start=1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            path = Path(entry) if Path(entry).is_absolute() else root / entry
            if path.exists() and not path.is_file():
                raise InputError(
                    f"{listing}:{n}: page '{entry}' is {_file_kind(path)}, not an image file",
                    hint="list image files only, one per line",
                )
            if not path.is_file():
                raise InputError(
                    f"{listing}:{n}: page '{entry}' does not exist under {root}",
                    hint="fix or remove that line of the subset file list",
                )
            files.append(path)
        return files
    found: set[Path] = set()
    for pattern in patterns:
        # Case-insensitive (.PNG from a camera or a Windows share is a page too); is_file(): regular files only,
        # so a FIFO or device named *.png is never opened.
        found.update(p for p in root.glob(case_insensitive_glob(pattern)) if p.is_file())
    return sorted(found)


def case_insensitive_glob(pattern: str) -> str:
    """``*.png`` -> ``*.[pP][nN][gG]``; bracket expressions already in the pattern are kept as they are."""
    out: list[str] = []
    depth = 0
    for ch in pattern:
        if ch == "[":
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
        elif depth == 0 and ch.isalpha() and ch.lower() != ch.upper():
            out.append(f"[{ch.lower()}{ch.upper()}]")
            continue
        out.append(ch)
    return "".join(out)


def _file_kind(path: Path) -> str:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def require_regular_file(path: Path) -> None:
    """A page must be a regular file: open() on a FIFO blocks forever, a device may never end."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return  # load_image names a missing file itself
    except OSError as exc:
        raise InputError(f"cannot read page {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        raise InputError(f"page {path} is {_file_kind(path)}, not an image file", hint="pages must be regular files")


# 16-bit and 32-bit integer and float pixel modes: Pillow's convert("RGB") clips them (most pixels turn white).
HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_MAX_16_BIT = 65535


def _peek_mode(path: Path) -> str | None:
    """The pixel mode from the header (no decode); None when Pillow cannot read it (load_image says why)."""
    try:
        with Image.open(path) as image:
            return str(image.mode)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def load_high_bit_image(path: Path) -> Image.Image:
    """Decode a 16-bit / 32-bit / float page and scale it to 8 bits, or refuse it with the reason."""
    from PIL import ImageOps

    try:
        with Image.open(path) as image:
            image.load()
            oriented = ImageOps.exif_transpose(image) or image
            mode = str(oriented.mode)
            values = np.asarray(oriented)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"corrupt or unreadable image: {path} ({exc})", hint="re-export the page") from exc
    return Image.fromarray(scale_to_8_bit(values, mode, path)).convert("RGB")


def scale_to_8_bit(values: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """Pixel values of a high-bit-depth page as uint8, scaled by the range its mode implies."""
    data = values.astype(np.float64)
    if not np.isfinite(data).all():
        raise InputError(f"image {path} ({mode}) holds NaN or infinite pixel values", hint="re-export the page")
    low, high = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= _MAX_16_BIT):
        scale = 255.0 / _MAX_16_BIT  # 16-bit samples (Pillow opens 16-bit PNG/TIFF as I;16 or I)
    elif mode == "F" and low >= 0 and high <= 1.0:
        scale = 255.0
    elif mode == "F" and low >= 0 and high <= 255.0:
        scale = 1.0
    else:
        raise InputError(
            f"image {path} is {mode} with values {low:g}..{high:g}: no known range to scale to 8 bits",
            hint="export the page as 8- or 16-bit PNG/TIFF (or float in [0, 1])",
        )
    return np.clip(np.rint(data * scale), 0, 255).astype(np.uint8)


def _unique_pages(root: Path, files: list[Path]) -> list[Page]:
    """One page per file; page ids must be unique (results, resume and reports are keyed by them)."""
    pages: dict[str, Page] = {}
    for path in files:
        page_id = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
        if page_id in pages:
            if pages[page_id].path == path:
                continue  # the same file listed twice in a subset file: profile it once
            raise InputError(
                f"two pages would share the id {page_id!r}: {pages[page_id].path} and {path}",
                hint="list pages outside dataset.root under distinct file names, or move them under dataset.root",
            )
        pages[page_id] = Page(page_id=page_id, path=path)
    return list(pages.values())


# Where a synthetic page's target output length comes from (dataset.target_lengths).
TARGET_LENGTHS = ("strokes", "lognormal")


def lognormal_target_tokens(seed: int, median_tokens: int, sigma: float) -> int:
    """A target output length drawn from a log-normal distribution with this median (``exp(mu)``) and ``sigma``
    (of the log), seeded per page: a documented stand-in for real pages' output lengths, whose spread is wide
    and right-skewed (a sparse page ends in a few hundred tokens, a dense one runs to thousands).  With
    ``sigma=0.5`` the 10th-90th percentiles are 0.53x-1.9x the median.  At least 2 (one decode step)."""
    rng = random.Random(seed * 7_919 + 104_729)
    return max(2, round(rng.lognormvariate(math.log(median_tokens), sigma)))


def build_pages(ds: Any, project_root: Path) -> list[Page]:
    """Pages of the configured dataset, in a stable order; one clear error when there are none."""
    kind = ds.get("kind", "synthetic")
    max_pages = ds.get("max_pages")
    if kind == "synthetic":
        try:
            sizes = [tuple(int(v) for v in s) for s in ds.get("sizes") or []]
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"dataset.sizes must be a list of [width, height] pairs, got {ds.get('sizes')!r}",
                hint="e.g. dataset.sizes='[[595,842],[800,600]]'",
            ) from exc
        if not sizes:
            raise ConfigError("dataset.sizes is empty", hint="e.g. dataset.sizes='[[595,842],[800,600]]'")
        for s in sizes:
            if len(s) != 2 or min(s) < 16:
                raise ConfigError(f"dataset.sizes entry {list(s)} is not a [width, height] of at least 16 px")
        # num_pages cycles through the sizes; each page has its own seed, so its own drawn strokes.
        count = int(ds.get("num_pages") or len(sizes))
        seed = int(ds.get("seed", 0))
        lengths = ds.get("target_lengths") or "strokes"
        median = ds.get("target_median_tokens")
        if lengths not in TARGET_LENGTHS:
            raise ConfigError(f"dataset.target_lengths must be one of {', '.join(TARGET_LENGTHS)}, got {lengths!r}")
        if lengths == "lognormal" and (median is None or int(median) < 2):
            raise ConfigError("dataset.target_lengths=lognormal needs dataset.target_median_tokens >= 2",
                              hint="e.g. dataset.target_median_tokens=1000")  # fmt: skip
        pages = []
        for i in range(count):
            w, h = sizes[i % len(sizes)]
            target = (
                lognormal_target_tokens(seed + i, int(median), float(ds.get("target_sigma", 0.5)))
                if lengths == "lognormal"
                else synthetic_target_tokens((w, h), seed + i)
            )
            pages.append(
                Page(page_id=f"synthetic-{w}x{h}-{i}", synthetic_size=(w, h), seed=seed + i, target_tokens=target)
            )
    elif kind == "files":
        root_raw = ds.get("root")
        if root_raw in (None, "???"):
            raise ConfigError("dataset.root is not set", hint="e.g. dataset=folder dataset.root=/path/to/pages")
        root = Path(str(root_raw))
        if not root.is_absolute():
            root = project_root / root
        if root.exists() and not root.is_dir():  # "does not exist" would send the user looking in vain
            raise InputError(
                f"dataset root is not a directory: {root}",
                hint="dataset.root must be the folder holding the page images",
            )
        if not root.is_dir():
            raise InputError(
                f"dataset root does not exist: {root}",
                hint="see datasets/README.md for where to place OmniDocBench, or use dataset=folder dataset.root=DIR",
            )
        subset = ds.get("subset_filelist")
        files = _collect_files(root, subset, list(ds.get("fallback_patterns") or []))
        if not files:
            # With a subset file the patterns were never used: name the file that listed nothing.
            where = (
                f"subset file {subset} lists none"
                if subset
                else f"patterns: {', '.join(ds.get('fallback_patterns') or [])}"
            )
            raise InputError(
                f"no images found in {root} ({where})",
                hint="put .png/.jpg pages there, or point dataset.root / dataset.subset_filelist elsewhere",
            )
        pages = _unique_pages(root, files)
        if ds.get("lengths_file"):
            listing = Path(str(ds.get("lengths_file")))
            lengths = read_lengths_file(listing if listing.is_absolute() else root / listing)
            pages = [attrs.evolve(p, target_tokens=lengths.get(p.page_id)) for p in pages]
    else:
        raise ConfigError(f"dataset.kind must be 'synthetic' or 'files', got {kind!r}")
    if max_pages is not None:
        if int(max_pages) < 1:
            raise ConfigError(f"dataset.max_pages must be >= 1 or null, got {max_pages}")
        pages = pages[: int(max_pages)]
    return pages
