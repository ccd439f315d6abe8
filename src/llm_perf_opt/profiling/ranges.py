"""Named ranges that show up in Nsight (NVTX) and in the PyTorch profiler trace (record_function).

NVTX is a cheap no-op without a collector (~0.2 µs).  record_function is not: entering and leaving one costs
~6 µs of host time even with no profiler listening, so a scope is opened only while a profiler is active in
this thread (the profiler pass); the timed repeats pay one C call to ask.  When the ``nvtx`` package is missing
or the run is on CPU, only record_function remains; the timings never depend on either.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import ModuleType

import torch


def _load_nvtx() -> ModuleType | None:
    try:
        return importlib.import_module("nvtx")
    except ImportError:
        return None


_NVTX = _load_nvtx()


class RangeMarker:
    """Pushes/pops NVTX ranges (when enabled) and opens record_function scopes."""

    def __init__(self, use_nvtx: bool) -> None:
        self.use_nvtx = use_nvtx and _NVTX is not None
        # one entry per open range: its record_function scope, or None when no profiler was listening at push
        self._open: list[torch.autograd.profiler.record_function | None] = []

    def push(self, name: str) -> None:
        if self.use_nvtx:
            assert _NVTX is not None
            _NVTX.push_range(name)
        rf = None
        if torch.autograd._profiler_enabled():
            rf = torch.autograd.profiler.record_function(name)
            rf.__enter__()
        self._open.append(rf)

    def pop(self) -> None:
        rf = self._open.pop()
        if rf is not None:
            rf.__exit__(None, None, None)
        if self.use_nvtx:
            assert _NVTX is not None
            _NVTX.pop_range()

    @contextlib.contextmanager
    def range(self, name: str) -> Iterator[None]:
        self.push(name)
        try:
            yield
        finally:
            self.pop()
