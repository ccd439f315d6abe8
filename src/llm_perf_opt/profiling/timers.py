"""Device-honest stage clocks.

On CUDA a mark is an event recorded on the *current stream*, so a stage's time is the GPU time between
two points of the stream, not the host's enqueue time.  Nothing here synchronises: the page loop calls
``resolve`` once at the end of a page, which synchronises on the last event.  On CPU a mark is
``time.perf_counter_ns`` (the work is synchronous, so the host clock is the truth).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Protocol

import torch


class Mark(Protocol):
    """A point in the device's timeline."""


class _HostMark:
    __slots__ = ("ns",)

    def __init__(self) -> None:
        self.ns = time.perf_counter_ns()


class DeviceClock:
    """Marks and elapsed times for one device (CUDA events or the host clock).

    CUDA events that a caller hands back with ``release`` are reused: creating and destroying an event per
    mark is host time on the hot path of every hooked call (the stage hooks release theirs once per page).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self._free: list[torch.cuda.Event] = []
        self._raw_stream: int | None = None  # the current stream's handle when ``_stream`` was built
        self._stream: torch.cuda.Stream | None = None

    def mark(self) -> object:
        if self.is_cuda:
            ev = self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)
            ev.record(self._current_stream())
            return ev
        return _HostMark()

    def _current_stream(self) -> torch.cuda.Stream:
        """The device's current stream; the Python object is rebuilt only when the stream changed.

        ``torch.cuda.current_stream`` builds a new Stream object per call (µs of host time); the raw handle
        is one C call, so a stream switch (a side stream, a graph capture) is still followed exactly.
        """
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        raw = torch._C._cuda_getCurrentRawStream(index)
        if raw != self._raw_stream or self._stream is None:
            self._raw_stream, self._stream = raw, torch.cuda.current_stream(index)
        return self._stream

    def release(self, marks: Sequence[object]) -> None:
        """Hand back marks whose times have been read; an event recorded again overwrites its old point."""
        if self.is_cuda:
            self._free.extend(m for m in marks if isinstance(m, torch.cuda.Event))

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def elapsed_ms(self, start: object, end: object) -> float:
        """Milliseconds from ``start`` to ``end``; call after ``synchronize`` on CUDA."""
        if self.is_cuda:
            assert isinstance(start, torch.cuda.Event) and isinstance(end, torch.cuda.Event)
            return float(start.elapsed_time(end))
        assert isinstance(start, _HostMark) and isinstance(end, _HostMark)
        return (end.ns - start.ns) / 1e6

    def intervals_ms(self, marks: Sequence[object]) -> list[float]:
        """Consecutive intervals between marks: their sum equals first→last exactly."""
        return [self.elapsed_ms(a, b) for a, b in itertools.pairwise(marks)]
