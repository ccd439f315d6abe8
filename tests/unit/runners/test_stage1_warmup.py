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


class _FastSession(_Session):
    """A session with a fast path: records which pages the warm-up ran."""

    fast = object()

    def __init__(self, shapes: dict[str, Any]) -> None:
        super().__init__(shapes)
        self.ran: list[str] = []

    def run(self, page: Page, tokens: int, repeat: int, should_stop: Any = None) -> None:
        self.ran.append(page.page_id)


class _Progress:
    def add(self, _name: str, total: int) -> int:
        return total

    def advance(self, _task: int) -> None:
        pass


def _warm_run(session: _FastSession, rounds: int = 1) -> SimpleNamespace:
    profiling = SimpleNamespace(warmup_rounds=rounds, warmup_synthetic=False)
    return SimpleNamespace(session=session, settings=SimpleNamespace(profiling=profiling, token_cap=64), notes=[])


def test_warmup_covers_at_most_the_bound_and_names_what_it_left() -> None:
    from llm_perf_opt.runners.phases import MAX_WARM_SHAPES, warmup

    n_shapes = MAX_WARM_SHAPES + 5  # 37 distinct prompt lengths: 5 more than the bound
    shapes = {f"p{i}": (6, (2, 3), 900 + i) for i in range(n_shapes)}
    session = _FastSession(shapes)
    run = _warm_run(session, rounds=2)
    warmup(run, [_page(p) for p in shapes], _Progress(), stop=lambda: False)  # type: ignore[arg-type]
    assert session.ran == [f"p{i}" for i in range(32)] * 2  # the first 32 shapes in dataset order, each round
    assert len(run.notes) == 1 and "covered 32 of the dataset's 37" in run.notes[0]
    assert "one_time_setup" in run.notes[0]


def test_warmup_within_the_bound_covers_every_shape_without_a_note() -> None:
    from llm_perf_opt.runners.phases import warmup

    shapes = {"a": (6, (2, 3), 913), "b": (0, (1, 1), 283), "c": (6, (2, 3), 913)}
    session = _FastSession(shapes)
    run = _warm_run(session)
    warmup(run, [_page(p) for p in shapes], _Progress(), stop=lambda: False)  # type: ignore[arg-type]
    assert session.ran == ["a", "b"]
    assert run.notes == []


def test_v2_fast_session_warms_one_page_per_tile_count(compose_cfg: Any, tmp_path: Any) -> None:
    """DeepSeek-OCR-2 on the fast path: its graphs are per view shape (tile count) and prompt length, and its pages
    carry the fields the warm-up keys on.  By v2's geometry (768-px tiles, a page tiled when a side exceeds 768):
    1600×800 is a 2×1 grid, 1224×1584 a 2×3 grid, 600×500 the global view alone; a second 1600×800 page adds
    nothing to warm."""
    from omegaconf import OmegaConf

    from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession
    from llm_perf_opt.runners.settings import load_settings
    from tests.conftest import ROOT

    fast = ["infer.fast.enabled=true", "infer.fast.sam_compile=false", "infer.fast.clip_compile=false"]
    tree = OmegaConf.to_container(compose_cfg(["model/deepseek_ocr/arch=deepseek_ocr2.tiny", *fast]), resolve=False)
    assert isinstance(tree, dict)
    tree.pop("hydra")
    tree["output"]["dir"] = str(tmp_path / "run")
    session = DeepSeekOCRSession.load(load_settings(OmegaConf.create(tree)), ROOT)
    try:
        pages = [
            Page(page_id=pid, synthetic_size=size, seed=seed)
            for pid, size, seed in [
                ("wide", (1600, 800), 0),
                ("tall", (1224, 1584), 0),
                ("small", (600, 500), 0),
                ("wide-again", (1600, 800), 1),
            ]
        ]
        chosen = one_page_per_view_shape(session, pages, first=pages[0])
        assert [p.page_id for p in chosen] == ["wide", "tall", "small"]
        grids = [tuple(session.prepare(p).images_spatial_crop) for p in chosen]
        assert grids == [(2, 1), (2, 3), (1, 1)]
    finally:
        session.close()
