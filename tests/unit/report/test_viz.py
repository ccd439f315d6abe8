"""Grounding visualisation: boxes parsed on the 0–999 grid, crops for image regions, result.mmd."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from llm_perf_opt.report.viz import parse_regions, write_viz

TEXT = (
    "<|ref|>title<|/ref|><|det|>[[100, 50, 900, 120]]<|/det|>\n# Annual report\n\n"
    "<|ref|>image<|/ref|><|det|>[[0, 500, 499, 999]]<|/det|>\n\n"
    "<|ref|>text<|/ref|><|det|>[[1, 2, oops]]<|/det|>\nbody text"
)


def test_parse_regions_scales_to_page_and_skips_malformed() -> None:
    regions = parse_regions(TEXT, (1000, 2000))
    assert [r.label for r in regions] == ["title", "image"]
    assert regions[0].box == (100, 100, 900, 240)
    assert regions[1].box == (0, 1001, 499, 2000)


def test_write_viz_outputs(tmp_path: Path) -> None:
    page = Image.new("RGB", (1000, 2000), (255, 255, 255))
    target = write_viz(tmp_path, "page_1", page, TEXT)
    assert target == tmp_path / "viz" / "page_1"
    assert (target / "result_with_boxes.jpg").is_file()
    crop = Image.open(target / "images" / "0.jpg")
    assert crop.size == (499, 999)
    mmd = (target / "result.mmd").read_text()
    assert "![](images/0.jpg)" in mmd
    assert "<|ref|>title" not in mmd and "# Annual report" in mmd and "body text" in mmd


def test_no_boxes_writes_nothing(tmp_path: Path) -> None:
    assert write_viz(tmp_path, "p", Image.new("RGB", (10, 10)), "plain text") is None
    assert not (tmp_path / "viz").exists()
