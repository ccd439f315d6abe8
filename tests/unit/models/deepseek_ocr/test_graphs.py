"""``capture_graph``'s order of work, with the CUDA stream and graph API scripted (no GPU on CI): dead reference
cycles are collected before the warm-up, and no automatic garbage collection can run until the capture ends
(a graph destroyed by a collection mid-capture invalidates the capture: seen on an H200 when the continuous
step recaptured after cache growth)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

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


@contextlib.contextmanager
def _graph(graph: object) -> Iterator[None]:
    EVENTS.append("capture begins")
    yield
    EVENTS.append("capture ends")


@pytest.fixture(autouse=True)
def scripted_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", _graph)
    EVENTS.clear()
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
