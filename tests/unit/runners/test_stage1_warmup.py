"""Warm-up page choice for the fast path: one page per (crop grid, prompt length), bad pages skipped."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from llm_perf_opt.data.datasets import Page
from llm_perf_opt.errors import InputError
from llm_perf_opt.runners.phases import one_page_per_view_shape


class _Session:
    """prepare() -> (n_crops, grid, prompt_len) per page id; 'bad' pages fail like a corrupt file."""

    def __init__(self, shapes: dict[str, Any]) -> None:
        self.shapes = shapes

    def prepare(self, page: Page) -> SimpleNamespace:
        shape = self.shapes[page.page_id]
        if shape == "bad":
            raise InputError(f"cannot decode {page.page_id}")
        n, grid, length = shape
        return SimpleNamespace(n_crops=n, images_spatial_crop=grid, prompt_len=length)


def _page(pid: str) -> Page:
    return Page(page_id=pid, synthetic_size=(100, 100), seed=0)


def test_one_page_per_grid_and_prompt_length() -> None:
    session = _Session(
        {
            "warm": (6, (2, 3), 913),
            "a": (6, (2, 3), 913),  # same as the warm-up page: covered
            "b": (6, (3, 2), 903),  # same crop count, other grid and prompt length: needs its own warm-up
            "c": "bad",
            "d": (0, (1, 1), 283),
            "e": (0, (1, 1), 283),
        }
    )
    pages = [_page(p) for p in ("a", "b", "c", "d", "e")]
    chosen = one_page_per_view_shape(session, pages, first=_page("warm"))  # type: ignore[arg-type]
    assert [p.page_id for p in chosen] == ["warm", "b", "d"]


def test_all_pages_bad_falls_back_to_first() -> None:
    session = _Session({"warm": "bad", "a": "bad"})
    first = _page("warm")
    assert one_page_per_view_shape(session, [_page("a")], first=first) == [first]  # type: ignore[arg-type]
