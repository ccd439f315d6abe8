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
    made inside it go to ``in_captures``.  :meth:`install` puts the hooks in place, chained to any hook installed
    before them, and puts them back where something has taken them out since (``torch._dynamo.reset`` clears
    Dynamo's callbacks; a later assignment to Triton's knob replaces ours)."""

    def __init__(self) -> None:
        self.triton = 0
        self.dynamo = 0
        self.in_captures = 0
        # compiler -> why its compiles are not counted (a release without the hook)
        self.unwatched: dict[str, str] = {}
        self._in_capture_by: dict[str, int] = {}  # in_captures by compiler (to hand back a failed capture's)
        self._lock = threading.Lock()
        self._capturing = threading.local()
        self._triton_hook: Callable[..., Any] | None = None
        self._dynamo_callback: Callable[..., None] | None = None

    @property
    def count(self) -> int:
        """Compiles outside captures so far (0 until :meth:`install`)."""
        return self.triton + self.dynamo

    @property
    def in_capture(self) -> bool:
        """Whether the calling thread is inside :meth:`capturing` (``graphs.capture_graph``: its warm-up calls or
        its capture)."""
        return getattr(self._capturing, "depth", 0) > 0

    def install(self) -> CompileWatch:
        """Put the compilers' hooks in place where they are not (cheap when they are: two identity checks)."""
        with self._lock:
            self._install_triton()
            self._install_dynamo()
        return self

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Within: compiles are a graph capture's (counted in ``in_captures``, not ``count``).  A capture that
        raises is not counted as one (its caller runs un-graphed), so what it compiled goes back to ``count``."""
        depth = getattr(self._capturing, "depth", 0)
        self._capturing.depth = depth + 1
        triton, dynamo = self._in_capture_by.get("triton", 0), self._in_capture_by.get("dynamo", 0)
        try:
            yield
        except BaseException:
            with self._lock:
                for name, before in (("triton", triton), ("dynamo", dynamo)):
                    moved = self._in_capture_by.get(name, 0) - before
                    self._in_capture_by[name] = before
                    self.in_captures -= moved
                    setattr(self, name, getattr(self, name) + moved)
            raise
        finally:
            self._capturing.depth = depth

    def on_compile(self, compiler: str) -> None:
        """One compile by ``compiler`` ("triton" or "dynamo") has ended (the hooks call this)."""
        with self._lock:
            if getattr(self._capturing, "depth", 0):
                self.in_captures += 1
                self._in_capture_by[compiler] = self._in_capture_by.get(compiler, 0) + 1
            elif compiler == "triton":
                self.triton += 1
            else:
                self.dynamo += 1

    def _install_triton(self) -> None:
        if self._triton_hook is not None and self._triton_hook_in_place():
            return
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

        runtime.jit_post_compile_hook = self._triton_hook = hook

    def _triton_hook_in_place(self) -> bool:
        from triton import knobs

        return knobs.runtime.jit_post_compile_hook is self._triton_hook

    def _install_dynamo(self) -> None:
        try:
            from torch._dynamo.callback import callback_handler
        except ImportError as exc:
            self.unwatched["dynamo"] = f"torch._dynamo.callback is not importable ({exc})"
            return
        registered = getattr(callback_handler, "end_callbacks", [])
        if self._dynamo_callback is not None and self._dynamo_callback in registered:
            return

        def callback(*_args: Any) -> None:  # torch < 2.7 calls it with no argument, later ones with CallbackArgs
            self.on_compile("dynamo")

        self._dynamo_callback = callback
        callback_handler.register_end_callback(callback)


# the process's watch: its counts are shared by every model (compiled kernels are process-wide)
WATCH = CompileWatch()
