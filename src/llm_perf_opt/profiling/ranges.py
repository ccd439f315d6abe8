"""Named ranges that show up in Nsight (NVTX) and in the PyTorch profiler trace (record_function).

Both are cheap no-ops when nobody listens: NVTX without a collector, record_function without an active
profiler.  When the ``nvtx`` package is missing or the run is on CPU, only record_function remains; the
timings never depend on either.
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
        self._open: list[torch.autograd.profiler.record_function] = []

    def push(self, name: str) -> None:
        if self.use_nvtx:
            assert _NVTX is not None
            _NVTX.push_range(name)
        rf = torch.autograd.profiler.record_function(name)
        rf.__enter__()
        self._open.append(rf)

    def pop(self) -> None:
        rf = self._open.pop()
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
