"""The clock the batched generator marks its stages with, as a protocol: the caller passes a device-honest one.

The model package imports nothing of the profiler; ``profiling.timers.DeviceClock`` (CUDA events on the
current stream, the host clock on CPU) satisfies :class:`Clock` and is what the runner passes.  On CPU the
work is synchronous, so :class:`HostClock` (the default there) is the truth; on CUDA a host clock would
time the enqueue, not the GPU, so there is no default.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Protocol

__all__ = ["Clock", "HostClock"]


class Clock(Protocol):
    """Marks in the device's timeline and the milliseconds between them (read after ``synchronize``)."""

    def mark(self) -> object: ...

    def synchronize(self) -> None: ...

    def elapsed_ms(self, start: object, end: object) -> float: ...

    def intervals_ms(self, marks: Sequence[object]) -> list[float]: ...


class HostClock:
    """``time.perf_counter_ns`` marks: exact for synchronous (CPU) work only."""

    def mark(self) -> object:
        return time.perf_counter_ns()

    def synchronize(self) -> None:
        return None

    def elapsed_ms(self, start: object, end: object) -> float:
        assert isinstance(start, int) and isinstance(end, int)
        return (end - start) / 1e6

    def intervals_ms(self, marks: Sequence[object]) -> list[float]:
        """Consecutive intervals: their sum equals first→last exactly."""
        return [self.elapsed_ms(a, b) for a, b in itertools.pairwise(marks)]
