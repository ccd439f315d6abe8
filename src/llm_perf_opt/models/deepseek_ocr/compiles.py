"""Counts of the JIT compiles that run outside graph captures: Triton kernel variants and torch.compile's frames.

A Triton kernel compiles once per specialisation it meets (its constexprs, its integer arguments' divisibility by
16 and equality to 1, its pointers' dtypes and alignment), and a ``torch.compile``'d function once per guard set,
so a page, a fill or a decode step that meets a new one pays milliseconds to seconds inside its timed marks.  The
fast path's graphs compile what they run while they are captured (:func:`graphs.capture_graph` warms the function
up first), and those captures are counted where they happen (``FastModel.capture_count``).  What is left is a
compile outside every capture: an un-graphed launch of a kernel variant not met before (round 31: the n-gram ban's
kernel at a new history width, inside a timed refill).  :data:`WATCH` counts those, process-wide, so a run whose
setup count (``FastModel.setup_count``) rises inside its marks is flagged as holding one-time setup, not silently
averaged in.

The counts come from the compilers' own hooks: Triton's ``knobs.runtime.jit_post_compile_hook`` (called once per
variant it compiles or loads from its disk cache into this process; the interpreter compiles nothing) and
Dynamo's compile-end callbacks.  A hook a release lacks leaves that count unwatched, with the reason in
:attr:`CompileWatch.unwatched`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["WATCH", "CompileWatch"]


class CompileWatch:
    """Process-wide counts of JIT compiles (``triton``, ``dynamo``) made outside :meth:`capturing`; the compiles
    made inside it go to ``in_captures``.  Hooks are installed on the first :meth:`install` (idempotent) and chain
    to any hook installed before them."""

    def __init__(self) -> None:
        self.triton = 0
        self.dynamo = 0
        self.in_captures = 0
        # compiler -> why its compiles are not counted (a release without the hook)
        self.unwatched: dict[str, str] = {}
        self._installed = False
        self._lock = threading.Lock()
        self._capturing = threading.local()

    @property
    def count(self) -> int:
        """Compiles outside captures so far (0 until :meth:`install`)."""
        return self.triton + self.dynamo

    def install(self) -> CompileWatch:
        """Install the compilers' hooks once (both Triton and Dynamo are imported by then)."""
        with self._lock:
            if not self._installed:
                self._installed = True
                self._install_triton()
                self._install_dynamo()
        return self

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Within: compiles are a graph capture's (counted in ``in_captures``, not ``count``)."""
        depth = getattr(self._capturing, "depth", 0)
        self._capturing.depth = depth + 1
        try:
            yield
        finally:
            self._capturing.depth = depth

    def on_compile(self, compiler: str) -> None:
        """One compile by ``compiler`` ("triton" or "dynamo") has ended (the hooks call this)."""
        with self._lock:
            if getattr(self._capturing, "depth", 0):
                self.in_captures += 1
            elif compiler == "triton":
                self.triton += 1
            else:
                self.dynamo += 1

    def _install_triton(self) -> None:
        try:
            from triton import knobs
        except ImportError as exc:  # no Triton (or one older than 3.4, which has no knobs): nothing of it compiles
            self.unwatched["triton"] = f"triton.knobs is not importable ({exc})"
            return
        runtime = knobs.runtime
        if not hasattr(runtime, "jit_post_compile_hook"):
            self.unwatched["triton"] = "this Triton has no knobs.runtime.jit_post_compile_hook"
            return
        before: Callable[..., Any] | None = runtime.jit_post_compile_hook

        def hook(*args: Any, **kwargs: Any) -> Any:
            self.on_compile("triton")
            return before(*args, **kwargs) if before is not None else None

        runtime.jit_post_compile_hook = hook

    def _install_dynamo(self) -> None:
        try:
            from torch._dynamo.callback import callback_handler
        except ImportError as exc:
            self.unwatched["dynamo"] = f"torch._dynamo.callback is not importable ({exc})"
            return
        callback_handler.register_end_callback(lambda _args: self.on_compile("dynamo"))


# the process's watch: its counts are shared by every model (compiled kernels are process-wide)
WATCH = CompileWatch()
