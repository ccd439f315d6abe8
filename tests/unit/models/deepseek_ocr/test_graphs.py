"""``capture_graph``'s order of work, with the CUDA stream and graph API scripted (no GPU on CI): dead reference
cycles are collected before the warm-up, and no automatic garbage collection can run until the capture ends
(a graph destroyed by a collection mid-capture invalidates the capture: seen on an H200 when the continuous
step recaptured after cache growth)."""

from __future__ import annotations

import contextlib
import gc
import itertools
from collections.abc import Callable, Iterator

import pytest
import torch

from llm_perf_opt.models.deepseek_ocr.graphs import capture_graph

EVENTS: list[object] = []


class _Stream:
    def __init__(self, device: object = None) -> None:
        pass

    def wait_stream(self, other: object) -> None:
        pass


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


@pytest.fixture(autouse=True)
def scripted_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
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


def test_dead_cycles_go_first_and_nothing_is_collected_until_the_capture_ends() -> None:
    gc.enable()
    _Doomed()
    _, out = capture_graph(_step, torch.device("cpu"))
    assert out == 7
    assert EVENTS == [
        "cycle freed",
        ("step", False),
        ("step", False),
        "capture begins",
        ("step", False),
        "capture ends",
    ]
    assert gc.isenabled()  # switched back on


def test_collector_state_restored_when_the_step_fails() -> None:
    def failing() -> int:
        raise RuntimeError("an op that cannot be captured")

    gc.enable()
    with pytest.raises(RuntimeError, match="cannot be captured"):
        capture_graph(failing, torch.device("cpu"))
    assert gc.isenabled()
    gc.disable()  # a caller that had it off keeps it off
    capture_graph(_step, torch.device("cpu"))
    assert not gc.isenabled()


def test_a_given_stream_takes_the_warm_up_and_the_capture() -> None:
    """Graphs that will replay at the same time must not share cuBLAS's per-(handle, stream) workspace, so a caller
    can name the stream: the warm-up and the capture both run on it; without one the warm-up gets a fresh stream
    and the capture torch's default (None)."""
    own = _Stream()
    capture_graph(_step, torch.device("cpu"), stream=own)  # type: ignore[arg-type]
    assert streams_used == [("warm-up", own), ("capture", own)]
    streams_used.clear()
    capture_graph(_step, torch.device("cpu"))
    (warm, fresh), (capture, default) = streams_used
    assert (warm, capture, default) == ("warm-up", "capture", None)
    assert isinstance(fresh, _Stream) and fresh is not own


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
