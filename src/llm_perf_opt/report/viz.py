"""Grounding visualisation, as the vendor's ``infer(save_results=True)`` writes it.

DeepSeek-OCR's grounding prompt makes the model emit ``<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], …]<|/det|>``
with coordinates on a 0–999 grid over the page.  For a page whose prediction has such boxes this writes
``viz/<stem>/result_with_boxes.jpg`` (boxes drawn on the page), ``viz/<stem>/images/<n>.jpg`` (crops of
the regions labelled ``image``) and ``viz/<stem>/result.mmd`` (the markdown with image regions replaced
by links to those crops and the other grounding tags removed).  Pages without boxes get nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import attrs
from PIL import Image, ImageDraw

GRID = 999  # the model's coordinate grid: 0..999 on each axis
_REF_DET = re.compile(r"<\|ref\|>(?P<label>.*?)<\|/ref\|><\|det\|>(?P<boxes>.*?)<\|/det\|>", re.DOTALL)
_PALETTE = [(220, 50, 47), (38, 139, 210), (133, 153, 0), (211, 54, 130), (181, 137, 0), (42, 161, 152)]


@attrs.frozen
class Region:
    label: str
    box: tuple[int, int, int, int]  # pixels on the page: x1, y1, x2, y2
    span: tuple[int, int]  # where the tag sits in the text


def parse_regions(text: str, page_size: tuple[int, int]) -> list[Region]:
    """Every well-formed box in ``text``, scaled to the page; malformed box lists are skipped."""
    w, h = page_size
    regions = []
    for m in _REF_DET.finditer(text):
        try:
            boxes = ast.literal_eval(m.group("boxes").strip())
        except (ValueError, SyntaxError):
            continue  # the model wrote something that is not a box list: nothing to draw
        if not isinstance(boxes, list):
            continue
        for b in boxes:
            if not (isinstance(b, list | tuple) and len(b) == 4 and all(isinstance(v, int | float) for v in b)):
                continue
            x1, y1, x2, y2 = (float(v) for v in b)
            px = (int(x1 / GRID * w), int(y1 / GRID * h), int(x2 / GRID * w), int(y2 / GRID * h))
            if px[2] > px[0] and px[3] > px[1]:
                regions.append(Region(m.group("label").strip(), px, m.span()))
    return regions


def write_viz(out_dir: Path, stem: str, page: Image.Image, text: str) -> Path | None:
    """Write the grounding visualisation of one page; None when the text has no boxes."""
    regions = parse_regions(text, page.size)
    if not regions:
        return None
    target = out_dir / "viz" / stem
    (target / "images").mkdir(parents=True, exist_ok=True)
    canvas = page.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    image_links: dict[tuple[int, int], str] = {}
    n_images = 0
    for i, r in enumerate(regions):
        colour = _PALETTE[i % len(_PALETTE)]
        draw.rectangle(r.box, outline=colour, width=max(2, page.size[0] // 400))
        draw.text((r.box[0] + 2, max(0, r.box[1] - 12)), r.label, fill=colour)
        if r.label == "image":
            name = f"{n_images}.jpg"
            page.convert("RGB").crop(r.box).save(target / "images" / name)
            image_links.setdefault(r.span, f"![](images/{name})")
            n_images += 1
    canvas.save(target / "result_with_boxes.jpg")

    def replace(m: re.Match[str]) -> str:
        # Labels are layout categories (title, text, table…), not content: the tag goes, the text after it stays.
        return image_links.get(m.span(), "")

    (target / "result.mmd").write_text(_REF_DET.sub(replace, text), encoding="utf-8")
    return target
