"""Dataset edge cases the CLI tests found (in-process: build_pages is what the CLI calls first)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llm_perf_opt.data.datasets import build_pages
from llm_perf_opt.errors import InputError
from tests.integration.conftest import TINY

PNG = TINY / "cases" / "global_only.png"


def _ds(root: Path, subset: Path | None = None) -> object:
    return OmegaConf.create(
        {
            "kind": "files",
            "root": str(root),
            "subset_filelist": str(subset) if subset else None,
            "fallback_patterns": ["*.png"],
            "max_pages": None,
        }
    )


def test_same_file_listed_twice_is_one_page(tmp_path: Path) -> None:
    shutil.copy(PNG, tmp_path / "a.png")
    listing = tmp_path / "subset.txt"
    listing.write_text(f"a.png\n{tmp_path / 'a.png'}\na.png\n")
    pages = build_pages(_ds(tmp_path, listing), tmp_path)
    assert [p.page_id for p in pages] == ["a.png"]


def test_two_files_with_one_page_id_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        shutil.copy(PNG, tmp_path / d / "p.png")
    listing = tmp_path / "subset.txt"
    listing.write_text(f"{tmp_path / 'x' / 'p.png'}\n{tmp_path / 'y' / 'p.png'}\n")
    with pytest.raises(InputError, match=r"share the id 'p\.png'") as info:
        build_pages(_ds(root, listing), tmp_path)
    assert str(tmp_path / "x" / "p.png") in info.value.message and str(tmp_path / "y" / "p.png") in info.value.message


def test_root_that_is_a_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "pages.png").write_bytes(b"")
    with pytest.raises(InputError, match="not a directory"):
        build_pages(_ds(tmp_path / "pages.png"), tmp_path)


def test_empty_subset_file_is_named(tmp_path: Path) -> None:
    shutil.copy(PNG, tmp_path / "a.png")
    listing = tmp_path / "subset.txt"
    listing.write_text("# nothing chosen yet\n")
    with pytest.raises(InputError, match="no images found") as info:
        build_pages(_ds(tmp_path, listing), tmp_path)
    assert f"subset file {listing} lists none" in info.value.message
