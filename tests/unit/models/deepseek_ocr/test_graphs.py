"""``capture_graph``'s order of work, with the CUDA stream and graph API scripted (no GPU on CI): no garbage
collection runs from the warm-up until the capture ends (a graph destroyed by a collection mid-capture invalidates
the capture: seen on an H200 when the continuous step recaptured after cache growth), and none is forced before
it either (a full collection costs ~0.2-0.5 s in a profiling process, once per graph); dead cycles go at the
first collection after the capture."""

from __future__ import annotations

import contextlib
import gc
import itertools
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

from llm_perf_opt.models.deepseek_ocr.graphs import capture_graph

EVENTS: list[object] = []


class _Stream:
    def __init__(self, device: object = None) -> None:
        pass

    def wait_stream(self, other: object) -> None:
        EVENTS.append(("wait", self is CURRENT, other is SHARED))


class _Doomed:
    """An unreachable reference cycle (like a dropped decode step and its narrower steps) whose finaliser says
    when the collector freed it."""

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        EVENTS.append("cycle freed")


# the streams work was put on: ("warm-up", stream) per torch.cuda.stream context, ("capture", stream) per capture
streams_used: list[tuple[str, object]] = []


@contextlib.contextmanager
def _graph(graph: object, stream: object = None) -> Iterator[None]:
    streams_used.append(("capture", stream))
    EVENTS.append("capture begins")
    yield
    EVENTS.append("capture ends")


SHARED = _Stream()  # torch's shared capture stream (``torch.cuda.graph.default_capture_stream``)
CURRENT = _Stream()  # the caller's stream
_graph.default_capture_stream = SHARED  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def scripted_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: CURRENT)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: streams_used.append(("warm-up", s)) or contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", _graph)
    EVENTS.clear()
    streams_used.clear()
    was = gc.isenabled()
    yield
    if was:
        gc.enable()


def _step() -> int:
    EVENTS.append(("step", gc.isenabled()))
    for _ in range(3 * gc.get_threshold()[0]):  # enough new cycles to trigger a collection were it enabled
        cycle: list[object] = []
        cycle.append(cycle)
    return 7


def test_no_collection_inside_the_capture_and_none_forced_before_it() -> None:
    gc.enable()
    _Doomed()  # unreachable now; a collection before the capture would free it first
    _, out = capture_graph(_step, torch.device("cpu"))
    assert out == 7
    assert gc.isenabled()  # switched back on
    gc.collect()  # if the steps' garbage has not already set off an automatic one since
    assert EVENTS == [  # the dead cycle freed after the capture, by a collection outside it
        ("wait", False, False),  # the warm-up stream after the caller's
        ("step", False),
        ("step", False),
        ("wait", True, True),  # the caller's after the warm-up
        "capture begins",
        ("step", False),
        "capture ends",
        "cycle freed",
    ]


def test_collector_state_restored_when_the_step_fails() -> None:
    def failing() -> int:
        raise RuntimeError("an op that cannot be captured")

    gc.enable()
    with pytest.raises(RuntimeError, match="cannot be captured"):
        capture_graph(failing, torch.device("cpu"))
    assert gc.isenabled()
    # the caller's stream waited for the failed warm-up: its un-graphed fallback never runs beside those kernels
    assert EVENTS[-1] == ("wait", True, True)
    gc.disable()  # a caller that had it off keeps it off
    capture_graph(_step, torch.device("cpu"))
    assert not gc.isenabled()


def test_a_given_stream_takes_the_warm_up_and_the_capture() -> None:
    """Graphs that will replay at the same time must not share cuBLAS's per-(handle, stream) workspace, so a caller
    can name the stream: the warm-up and the capture both run on it.  Without one both run on torch's shared
    capture stream (the capture by default, None), not on a fresh pool stream, which could be one whose work runs
    beside the warm-up (round 32)."""
    own = _Stream()
    capture_graph(_step, torch.device("cpu"), stream=own)  # type: ignore[arg-type]
    assert streams_used == [("warm-up", own), ("capture", own)]
    streams_used.clear()
    capture_graph(_step, torch.device("cpu"))
    assert streams_used == [("warm-up", SHARED), ("capture", None)]


def test_stream_apart_skips_streams_in_use() -> None:
    """torch's stream pool hands streams out round-robin, so a new stream can be one in use: ``stream_apart`` draws
    until the handle differs from every avoided one (None entries ignored), and says so when it cannot.  Fake
    streams stand in for a pool of four handles, 1 2 3 4 1 2 ..."""
    from types import SimpleNamespace

    from llm_perf_opt.models.deepseek_ocr.graphs import stream_apart

    def pool() -> Callable[[], SimpleNamespace]:
        handles = itertools.cycle([1, 2, 3, 4])
        return lambda: SimpleNamespace(cuda_stream=next(handles))

    used = [SimpleNamespace(cuda_stream=h) for h in (1, 2)]
    assert stream_apart(pool(), [*used, None]).cuda_stream == 3  # 1 and 2 in use: the third draw
    assert stream_apart(pool(), []).cuda_stream == 1
    with pytest.raises(RuntimeError, match="no stream apart from 4 in use after 8 draws"):
        stream_apart(pool(), [SimpleNamespace(cuda_stream=h) for h in (1, 2, 3, 4)], tries=8)


class _Dev:
    type = "cuda"


class _FakeStream:
    def __init__(self, name: str, handle: int) -> None:
        self.name, self.cuda_stream, self.device = name, handle, _Dev()


class _FakeCudaInput:
    """What ShapeGraphs reads of an input: shape, dtype, device, clone, copy_ (no CUDA here)."""

    dtype = torch.bfloat16
    device = _Dev()

    def __init__(self, *shape: int) -> None:
        self.shape = torch.Size(shape)

    def clone(self) -> _FakeCudaInput:
        return _FakeCudaInput(*self.shape)

    def copy_(self, other: object) -> _FakeCudaInput:
        return self


def test_a_shape_met_by_both_view_chains_gets_a_graph_on_each_chains_capture_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``vision_streams``: the global view runs on ``view_stream`` and the crops on the current stream, each chain's
    graphs captured on its own stream.  A 1x1 page meets the global view's shape on the current stream first (so on
    the crops' capture stream); a later page with crops runs it on ``view_stream`` beside the crops' graphs.  That
    page must get a graph captured on the global chain's stream, not replay the crops' chain one (round 27, found by
    reading: the two would share one cuBLAS workspace while replaying concurrently).  The real
    ``VisionFast._capture_stream`` and ``ShapeGraphs`` on fake CUDA inputs and streams; the capture only records."""
    from llm_perf_opt.models.deepseek_ocr import graphs
    from llm_perf_opt.models.deepseek_ocr.fast import VisionFast

    main, view = _FakeStream("main", 1), _FakeStream("view", 2)
    own, crops = _FakeStream("global chain", 3), _FakeStream("crops chain", 4)
    current = [main]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    captured_on: list[tuple[tuple[int, ...], str]] = []

    class _Graph:
        def replay(self) -> None:
            pass

    def record(self: graphs.ShapeGraphs, xs: tuple[_FakeCudaInput, ...]) -> tuple[_Graph, tuple[object, ...], Tensor]:
        stream = self.capture_stream() if self.capture_stream is not None else None
        assert stream is not None
        captured_on.append((tuple(xs[0].shape), stream.name))
        return _Graph(), tuple(x.clone() for x in xs), torch.zeros(1)

    monkeypatch.setattr(graphs.ShapeGraphs, "_capture", record)
    vision = object.__new__(VisionFast)  # only what graphed() and _capture_stream read
    vision.graphs, vision.view_stream, vision._capture_streams = {}, view, (own, crops)  # type: ignore[assignment]
    sam = vision.graphed("sam", lambda x: torch.zeros(1))
    glob, tiles = _FakeCudaInput(1, 3, 1024, 1024), _FakeCudaInput(6, 3, 640, 640)
    with torch.no_grad():
        sam(glob)  # page 1, grid 1x1: the global view on the current stream
        current[0] = view
        sam(glob)  # page 2: its global view on view_stream ...
        current[0] = main
        sam(tiles)  # ... beside its crops on the current stream
        current[0] = view
        sam(glob)  # page 3: both graphs exist, nothing more is captured
    assert captured_on == [
        ((1, 3, 1024, 1024), "crops chain"),
        ((1, 3, 1024, 1024), "global chain"),
        ((6, 3, 640, 640), "crops chain"),
    ]
