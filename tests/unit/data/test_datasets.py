"""data/datasets.py: synthetic pages, folder datasets, subset file lists and config errors."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from llm_perf_opt.data.datasets import (
    Page,
    build_pages,
    lognormal_target_tokens,
    read_lengths_file,
    synthetic_page,
    synthetic_target_tokens,
)
from llm_perf_opt.errors import ConfigError, InputError
from tests.conftest import CONF


def _ds(**kw: Any):
    base = {"kind": "synthetic", "sizes": [[595, 842]], "seed": 0, "root": None, "subset_filelist": None,
            "fallback_patterns": [], "max_pages": None}  # fmt: skip
    base.update(kw)
    return OmegaConf.create(base)


def _files_ds(root: Any, **kw: Any):
    return _ds(kind="files", root=None if root is None else str(root), fallback_patterns=["*.png", "*.jpg"], **kw)


def _png(path: Path, size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# ---------------------------------------------------------------- synthetic pages


def test_synthetic_page_size_mode_and_determinism() -> None:
    a = synthetic_page((300, 400), seed=3)
    b = synthetic_page((300, 400), seed=3)
    assert a.size == (300, 400) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    c = synthetic_page((300, 400), seed=4)
    assert a.tobytes() != c.tobytes()


def test_synthetic_page_is_not_blank() -> None:
    arr = np.asarray(synthetic_page((595, 842), seed=0))
    assert arr.shape == (842, 595, 3)
    assert (arr < 128).any() and (arr == 255).all(axis=-1).mean() > 0.3  # ink on a mostly white page


@pytest.mark.parametrize("size", [(16, 16), (40, 1000), (1000, 60)])
def test_synthetic_page_smallest_accepted_sizes(size: tuple[int, int]) -> None:
    (page,) = build_pages(_ds(sizes=[list(size)]), Path("."))
    assert page.load().size == size


def test_build_pages_synthetic_from_shipped_config() -> None:
    ds = OmegaConf.load(CONF / "dataset" / "synthetic.yaml")
    pages = build_pages(ds, Path("."))
    assert [p.page_id for p in pages] == ["synthetic-595x842-0", "synthetic-800x600-1", "synthetic-600x2000-2"]
    assert [p.seed for p in pages] == [0, 1, 2]
    assert pages[2].synthetic_size == (600, 2000) and pages[2].path is None
    assert pages[1].load().size == (800, 600)


def test_build_pages_num_pages_cycles_sizes_with_own_seeds() -> None:
    pages = build_pages(_ds(sizes=[[100, 200], [300, 400]], seed=5, num_pages=5), Path("."))
    # hand-written: page i has sizes[i % 2] and seed 5 + i
    assert [(p.page_id, p.synthetic_size, p.seed) for p in pages] == [
        ("synthetic-100x200-0", (100, 200), 5),
        ("synthetic-300x400-1", (300, 400), 6),
        ("synthetic-100x200-2", (100, 200), 7),
        ("synthetic-300x400-3", (300, 400), 8),
        ("synthetic-100x200-4", (100, 200), 9),
    ]
    # same size, different seed: different drawn strokes
    assert not np.array_equal(np.asarray(pages[0].load()), np.asarray(pages[2].load()))


def test_synthetic_target_tokens_hand_counted() -> None:
    # 16x16: margin 8, line height 6, the text starts at y = 8 + 4*6 = 32 >= 0.35*16: no word strokes, so
    # 20 table cells + title + eos = 22
    assert synthetic_target_tokens((16, 16), seed=0) == 22
    # 300x60: margin 21, line 6, one text line at y=45 (< 0.35*60=21? no): none either -> 22
    assert synthetic_target_tokens((300, 60), seed=0) == 22
    # a larger page has text: more than the fixed part, and the pages of build_pages carry it
    page = build_pages(_ds(sizes=[[595, 842]]), Path("."))[0]
    assert page.target_tokens is not None and page.target_tokens > 22


def test_lengths_file_parsed_and_attached(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "sub" / "b page.png")
    (tmp_path / "lengths.txt").write_text("# page tokens\na.png 17\n\nsub/b page.png 1024  # spaces in the id\n")
    assert read_lengths_file(tmp_path / "lengths.txt") == {"a.png": 17, "sub/b page.png": 1024}
    ds = _ds(kind="files", root=str(tmp_path), fallback_patterns=["**/*.png"], lengths_file="lengths.txt")
    pages = build_pages(ds, Path("."))
    assert {p.page_id: p.target_tokens for p in pages} == {"a.png": 17, "sub/b page.png": 1024}


@pytest.mark.parametrize("line", ["a.png", "a.png zero", "a.png 0", "17"])
def test_lengths_file_bad_line_is_one_input_error(tmp_path: Path, line: str) -> None:
    (tmp_path / "lengths.txt").write_text(f"{line}\n")
    with pytest.raises(InputError, match=r"lengths\.txt:1: expected '<page id> <tokens>'"):
        read_lengths_file(tmp_path / "lengths.txt")
    with pytest.raises(ConfigError, match=r"dataset\.lengths_file not found"):
        read_lengths_file(tmp_path / "missing.txt")


def test_build_pages_num_pages_then_max_pages() -> None:
    pages = build_pages(_ds(sizes=[[100, 200]], num_pages=10, max_pages=3), Path("."))
    assert [p.seed for p in pages] == [0, 1, 2]


def test_build_pages_synthetic_seed_offset_and_max_pages() -> None:
    pages = build_pages(_ds(sizes=[[100, 200], [300, 400], [500, 600]], seed=10, max_pages=2), Path("."))
    assert [(p.synthetic_size, p.seed) for p in pages] == [((100, 200), 10), ((300, 400), 11)]


@pytest.mark.parametrize(
    ("sizes", "match"),
    [([], "dataset.sizes is empty"), (None, "dataset.sizes is empty"), ([[15, 100]], r"\[15, 100\]"),
     ([[100, 8]], "at least 16 px"), ([[100, 200, 300]], r"\[100, 200, 300\]"), ([[100]], r"\[100\]")],
)  # fmt: skip
def test_bad_sizes_are_config_errors(sizes: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_pages(_ds(sizes=sizes), Path("."))


@pytest.mark.parametrize("sizes", [[595, 842], [["wide", "tall"]]])
def test_malformed_sizes_are_config_errors(sizes: Any) -> None:
    with pytest.raises(ConfigError, match=r"dataset\.sizes"):
        build_pages(_ds(sizes=sizes), Path("."))


@pytest.mark.parametrize("max_pages", [0, -1])
def test_max_pages_below_one_is_config_error(max_pages: int) -> None:
    with pytest.raises(ConfigError, match="max_pages"):
        build_pages(_ds(max_pages=max_pages), Path("."))


def test_unknown_kind_is_config_error() -> None:
    with pytest.raises(ConfigError, match="'hub'"):
        build_pages(_ds(kind="hub"), Path("."))


# ---------------------------------------------------------------- folders of files


def test_files_sorted_relative_ids_and_patterns(tmp_path: Path) -> None:
    root = tmp_path / "pages"
    _png(root / "b.png")
    _png(root / "a.png")
    Image.new("RGB", (8, 8)).save(root / "c.jpg")
    (root / "notes.txt").write_text("not an image")
    _png(root / "sub" / "deep.png")  # not matched by "*.png" (no recursion)
    pages = build_pages(_files_ds(root), tmp_path)
    assert [p.page_id for p in pages] == ["a.png", "b.png", "c.jpg"]
    assert all(p.path is not None and p.path.parent == root for p in pages)
    assert all(p.synthetic_size is None for p in pages)


def test_files_root_relative_to_project_root(tmp_path: Path) -> None:
    _png(tmp_path / "data" / "x.png")
    (page,) = build_pages(_files_ds("data"), tmp_path)
    assert page.path == tmp_path / "data" / "x.png"
    assert page.page_id == "x.png"


def test_files_max_pages(tmp_path: Path) -> None:
    for i in range(5):
        _png(tmp_path / f"p{i}.png")
    pages = build_pages(_files_ds(tmp_path, max_pages=2), tmp_path)
    assert [p.page_id for p in pages] == ["p0.png", "p1.png"]


def test_empty_root_is_input_error_naming_root(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    (root / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="no images found") as info:
        build_pages(_files_ds(root), tmp_path)
    assert str(root) in str(info.value)
    assert "*.png, *.jpg" in str(info.value)
    assert info.value.hint


def test_missing_root_is_input_error(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(InputError, match="dataset root does not exist") as info:
        build_pages(_files_ds(missing), tmp_path)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("root", [None, "???"])
def test_unset_root_is_config_error(root: Any) -> None:
    with pytest.raises(ConfigError, match=r"dataset\.root is not set"):
        build_pages(_files_ds(root), Path("."))


def test_shipped_folder_config_without_root_is_config_error() -> None:
    with pytest.raises(ConfigError, match=r"dataset\.root"):
        build_pages(OmegaConf.load(CONF / "dataset" / "folder.yaml"), Path("."))


def test_subset_filelist_order_comments_and_absolute(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _png(root / "images" / "a.png")
    _png(root / "images" / "b.png")
    outside = _png(tmp_path / "elsewhere" / "z.png")
    (root / "subset.txt").write_text(f"# chosen pages\nimages/b.png\n\n  images/a.png  \n{outside}\n")
    pages = build_pages(_files_ds(root, subset_filelist="subset.txt"), tmp_path)
    assert [p.page_id for p in pages] == ["images/b.png", "images/a.png", "z.png"]
    assert pages[2].path == outside


def test_subset_filelist_missing_page_names_file_and_line(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _png(root / "a.png")
    listing = root / "subset.txt"
    listing.write_text("a.png\n# comment\nmissing.png\n")
    with pytest.raises(InputError) as info:
        build_pages(_files_ds(root, subset_filelist="subset.txt"), tmp_path)
    msg = str(info.value)
    assert f"{listing}:3:" in msg
    assert "missing.png" in msg and str(root) in msg


def test_subset_filelist_not_found_is_config_error(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="subset_filelist not found"):
        build_pages(_files_ds(tmp_path, subset_filelist=str(tmp_path / "nope.txt")), tmp_path)


def test_empty_subset_filelist_is_input_error(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "subset.txt").write_text("# nothing chosen\n")
    with pytest.raises(InputError, match="no images found"):
        build_pages(_files_ds(tmp_path, subset_filelist="subset.txt"), tmp_path)


# ---------------------------------------------------------------- Page


def test_describe_file_page_has_sha256_and_size(tmp_path: Path) -> None:
    path = _png(tmp_path / "p.png")
    data = path.read_bytes()
    info = Page(page_id="p.png", path=path).describe()
    assert info == {
        "page_id": "p.png",
        "path": str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }


def test_describe_unreadable_page_records_error(tmp_path: Path) -> None:
    info = Page(page_id="gone.png", path=tmp_path / "gone.png").describe()
    assert "sha256" not in info
    assert info["error"].startswith("unreadable:")


def test_describe_synthetic_page() -> None:
    info = Page(page_id="s", synthetic_size=(100, 200), seed=7).describe()
    assert info == {"page_id": "s", "synthetic": True, "size_px": [100, 200], "seed": 7}


def test_synthetic_page_load_matches_recipe() -> None:
    page = Page(page_id="s", synthetic_size=(120, 160), seed=2)
    assert page.load().tobytes() == synthetic_page((120, 160), 2).tobytes()


def test_lognormal_target_lengths_seeded_with_the_median_asked_for() -> None:
    """dataset.target_lengths=lognormal: per-page seeded draws whose median is near target_median_tokens."""
    import math
    import random
    import statistics

    ds = _ds(sizes=[[595, 842], [800, 600]], num_pages=400, target_lengths="lognormal", target_median_tokens=1000,
             target_sigma=0.5)  # fmt: skip
    pages = build_pages(ds, Path("."))
    targets = [p.target_tokens for p in pages]
    assert targets == [p.target_tokens for p in build_pages(ds, Path("."))]  # seeded: the same every run
    assert all(isinstance(t, int) and t >= 2 for t in targets)
    # 400 draws: the sample median of a log-normal lies within ~±7 % of exp(mu) at 95 % (sd of ln-median ≈
    # 1.2533 * 0.5 / sqrt(400) = 0.031); 15 % is a safe bound that still rules out the strokes recipe (< 400)
    assert 850 <= statistics.median(targets) <= 1150  # type: ignore[type-var]
    assert len(set(targets)) > 300  # a mix, not one length
    # the draw itself, by hand: random.Random(seed * 7919 + 104729).lognormvariate(ln 1000, 0.5), rounded
    want = round(random.Random(3 * 7_919 + 104_729).lognormvariate(math.log(1000), 0.5))
    assert lognormal_target_tokens(3, 1000, 0.5) == max(2, want) == pages[3].target_tokens
    assert lognormal_target_tokens(3, 1000, 0.0) == 1000  # sigma 0: every page at the median
