"""CUDA-graph helpers shared by the fast path and the batched generator, and the on-device token choice.

A captured step must not allocate on first use, read a device value on the host or build cuBLAS handles:
:func:`capture_graph` runs the step twice on a side stream before capturing it; :class:`ShapeGraphs` keeps
one graph per input shape for functions of one tensor (the vision towers); :func:`first_argmax` is the
greedy pick computed inside a graph.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from llm_perf_opt.models.deepseek_ocr.compiles import WATCH

__all__ = [
    "SDPA_POLICIES",
    "ResizedTables",
    "ShapeGraphs",
    "capture_graph",
    "check_sdpa_policy",
    "default_capture_stream",
    "first_argmax",
    "in_capture_warm_up",
    "stream_apart",
]

# The vision towers' SDPA backend policies (``FastConfig.vision_sdpa``).  The SDPA backend of a compiled block is
# chosen while Dynamo traces it, from the backend flags the policy's context sets, and Dynamo does not guard on
# those flags: a block compiled under one policy would keep its backend under every later one.  So each compiled
# vision block takes the policy in force as an argument and checks it with :func:`check_sdpa_policy`; comparing
# the argument is what makes Dynamo specialise on it, one graph per policy.
SDPA_POLICIES = ("model", "cudnn", "flash")


def check_sdpa_policy(policy: str) -> None:
    """Refuse an unknown SDPA policy name (and, inside a compiled block, key the compiled graph on it)."""
    if policy not in SDPA_POLICIES:
        raise ValueError(f"unknown vision SDPA policy {policy!r}; expected one of {', '.join(SDPA_POLICIES)}")


def default_capture_stream() -> torch.cuda.Stream:
    """torch's shared capture stream: where :func:`capture_graph` captures without a ``stream`` (the decode and prefill
    graphs).  ``torch.cuda.graph``'s constructor makes it once (a pool stream); constructing one here makes sure it
    exists, so a stream drawn to differ from it (:func:`stream_apart`) cannot be handed out as it later."""
    torch.cuda.graph(torch.cuda.CUDAGraph())  # constructed, not entered: nothing is captured
    stream = torch.cuda.graph.default_capture_stream
    assert stream is not None
    return stream


def stream_apart(make: Callable[[], Any], avoid: Iterable[Any], tries: int = 64) -> Any:
    """A stream from ``make`` (e.g. ``lambda: torch.cuda.Stream(device)``) whose handle (``cuda_stream``) is none of
    ``avoid``'s.  torch hands out pool streams round-robin, so a new stream can be one already in use.  Work that
    runs *concurrently* must not use one cuBLAS workspace, and cuBLAS keeps one per (handle, stream), which a graph
    captured on a stream bakes in (:func:`capture_graph`): the streams of work that overlaps, and the capture streams
    of graphs that replay beside it, must differ."""
    taken = {s.cuda_stream for s in avoid if s is not None}
    for _ in range(tries):
        stream = make()
        if stream.cuda_stream not in taken:
            return stream
    raise RuntimeError(f"no stream apart from {len(taken)} in use after {tries} draws")


def capture_graph(
    fn: Callable[[], Any],
    device: torch.device,
    context: Callable[[], Any] = contextlib.nullcontext,
    stream: torch.cuda.Stream | None = None,
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``fn`` twice on a side stream (cuBLAS handles, workspaces, compilation, lazy inits: work that must
    not happen inside a capture), then capture one call; returns the graph and that call's output (static
    buffers the graph rewrites on every replay).  ``context`` is entered around the warm-up and the capture
    (e.g. an SDPA backend policy, which the graph is then tied to).

    Python's garbage collector is kept off from the warm-up until the capture ends: an unreachable graph held in
    a reference cycle, destroyed by an automatic collection in the middle of a capture, resets itself there,
    which invalidates the capture ("operation not permitted when stream is capturing").  Seen on an H200 when
    continuous decode steps were such cycles (they no longer are); this keeps any other cycle from doing the
    same.  Dead cycles are not collected first (until round 30 they were): a full collection walks the
    profiling process's hundreds of thousands of objects (~0.2-0.5 s), once per graph, and a continuous run
    captures dozens (issue 18's goals run on an H100: 34 graphs in 16.1 s with it, 7.2 s without).  A dead
    cycle now goes at a later collection of its generation, outside any capture (a long-lived one at the next
    full collection), and until then keeps whatever device memory it holds.  torch's own ``torch.cuda.graph``
    collects only under ``torch.compiler.config.force_cudagraph_gc`` in the releases in use (2.11 on the device,
    2.13 here); a release that still collects unconditionally would keep part of this cost.

    ``stream``: warm up and capture on it (default: torch's shared capture stream for both).  cuBLAS keeps one
    workspace per (handle, stream) and a graph bakes in the workspace of the stream it was captured on, so graphs
    that will replay *concurrently* must be captured on different streams (the vision's two view chains,
    ``vision_streams``), or they scribble over one workspace."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with WATCH.capturing():  # what the warm-up compiles is this capture's setup (compiles.py)
            return _capture(fn, device, context, stream)
    finally:
        if was_enabled:
            gc.enable()


def in_capture_warm_up(t: Tensor) -> bool:
    """Whether the calling code runs in one of :func:`capture_graph`'s two warm-up calls (inside it, while no stream
    is capturing), for work on ``t``'s device: work there is no step of the caller's, where the same code run by
    the capture is, in each replay of the graph."""
    return WATCH.in_capture and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _capture(
    fn: Callable[[], Any], device: torch.device, context: Callable[[], Any], stream: torch.cuda.Stream | None
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """:func:`capture_graph`'s warm-up and capture (the collector already off)."""
    # without a stream, the warm-up runs where the capture will (torch's shared capture stream), not on a new pool
    # stream: pool streams come round-robin, so a new one can be a stream whose work runs beside this warm-up (the
    # run-ahead's vision graphs, captured on the vision's streams with their cuBLAS workspaces baked in), and every
    # draw shifts which streams later draws get (round 32); the shared capture stream is one every other stream the
    # fast path makes is drawn apart from
    warm = stream if stream is not None else default_capture_stream()
    warm.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(warm), context():
            for _ in range(2):
                fn()
    finally:  # also when the warm-up raises: the caller's un-graphed fallback must not run beside its kernels
        torch.cuda.current_stream(device).wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream), context():
        out = fn()
    return graph, out


class ResizedTables:
    """A fast forward's resized position tables, one per token grid, made once instead of on every call.

    The towers fit their absolute position tables to each view's grid with a bicubic antialiased resize (55 us a
    call for the 640-px tiles on an H200, inside the forward's graph), though the result depends only on the
    weights and the grid.  ``resize(table, hw)`` is the reference's own function, so a kept table holds the same
    bits; it is made again when ``table`` is another tensor object, was written in place since (its version
    counter; an inference tensor, made under ``torch.inference_mode``, has none) or moved (its address, dtype or
    device: ``module.to`` keeps the object and its version).  Where the grid is the table's own, ``resize`` returns
    the table itself, and that is what is kept: the live weights, never copied or written.

    A vision graph reads a kept table by address, and its replays do not call this object.  So a table made again
    (by a call outside a graph: a new shape's capture, an un-graphed call) is written into the kept one's memory
    where that memory is its own (made by ``resize``) and the layout fits: graphs captured earlier for that grid then
    read the new values, not freed memory (until round 28 the old table was dropped, and such a graph read freed
    memory).  Otherwise the old one stays alive with this object, and graphs captured on it read its old values.
    Replays alone never see weights written in place after their capture: a model is built, then its fast path.
    """

    def __init__(self, resize: Callable[[Tensor, tuple[int, int]], Tensor]) -> None:
        self._resize = resize
        # per grid: the source table (held, so no later tensor can take its address), its stamp (version, address,
        # dtype, device), the resized table
        self._kept: dict[tuple[int, int], tuple[Tensor, tuple[Any, ...], Tensor]] = {}
        self._retired: list[Tensor] = []  # tables a graph captured earlier may still read (see the class doc)

    def __call__(self, table: Tensor, hw: tuple[int, int]) -> Tensor:
        stamp = (-1 if table.is_inference() else table._version, table.data_ptr(), table.dtype, table.device)
        kept = self._kept.get(hw)
        if kept is not None and kept[0] is table and kept[1] == stamp:
            return kept[2]
        with torch.no_grad():
            fresh = self._resize(table, hw)
        out = fresh
        if kept is not None:
            source, _, old = kept
            own = not _same_memory(old, source)  # made by the resize, not the weights themselves
            fits = (old.shape, old.dtype, old.device) == (fresh.shape, fresh.dtype, fresh.device)
            if own and fits and not _same_memory(fresh, table):
                # an inference tensor is written in place only inside inference mode
                with torch.inference_mode() if old.is_inference() else torch.no_grad():
                    old.copy_(fresh)
                out = old
            elif not _same_memory(old, out):
                self._retired.append(old)
        self._kept[hw] = (table, stamp, out)
        return out


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are views of one storage (the same device memory)."""
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class ShapeGraphs:
    """``fn(*xs)`` replayed from a CUDA graph captured per (shape, dtype, device) of the inputs ``xs`` (one tensor,
    or several: e.g. a page's views); the output (a tensor or a tuple of them) is a fresh copy.

    Capture (on first sight of a shape) runs ``fn`` twice on a side stream first (cuBLAS / compile warm-up).
    The graph reads the weights in place, so it stays valid while parameters are updated in place (not the towers'
    resized position tables, made once per grid outside the replays: :class:`ResizedTables`); it is
    tied to the SDPA backend policy active at capture.  CPU tensors, grad mode, or a failed capture run
    ``fn`` directly (the failure is kept in ``capture_error`` and warned about once).  A graph's key is
    (shape, dtype, device) for one input, a tuple of those for several, and with ``capture_stream`` the stream it
    picks now: a shape met by two view chains gets a graph per chain, so no graph replays beside others captured on
    its stream (round 27: a global view first met on the crops' chain, a 1x1 page's, was replayed on the view
    stream beside the crops' graphs, all with the crops' capture stream's cuBLAS workspace).
    """

    # device types whose inputs are captured (tests/conftest.py's ``cpu_graphs`` adds the CPU's, with a stand-in
    # capture, to run this class's bookkeeping there)
    graph_devices: tuple[str, ...] = ("cuda",)

    def __init__(self, fn: Any, capture_stream: Callable[[], torch.cuda.Stream | None] | None = None) -> None:
        self.fn = fn
        # which stream to capture a new shape on, asked at capture time (None: capture_graph's default); see
        # capture_graph on graphs that replay concurrently
        self.capture_stream = capture_stream
        self.graphs: dict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, tuple[Tensor, ...], Any]] = {}
        self.capture_error: str | None = None

    def __call__(self, *xs: Tensor) -> Any:
        if xs[0].device.type not in self.graph_devices or torch.is_grad_enabled() or self.capture_error is not None:
            return self.fn(*xs)
        keys = tuple((tuple(x.shape), x.dtype, x.device) for x in xs)
        key: tuple[Any, ...] = keys[0] if len(keys) == 1 else keys
        if self.capture_stream is not None:  # one graph per capture stream too (see the class doc)
            stream = self.capture_stream()
            key = (*key, None if stream is None else stream.cuda_stream)  # key[0] stays the first input's
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self.graphs[key] = self._capture(xs)
            except RuntimeError as exc:
                self.capture_error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"vision CUDA graph capture failed, running un-graphed ({exc})", stacklevel=2)
                return self.fn(*xs)
        graph, static_in, static_out = entry
        for buf, x in zip(static_in, xs, strict=True):
            buf.copy_(x)
        graph.replay()
        if isinstance(static_out, Tensor):
            return static_out.clone()
        return tuple(out.clone() for out in static_out)

    def _capture(self, xs: tuple[Tensor, ...]) -> tuple[torch.cuda.CUDAGraph, tuple[Tensor, ...], Any]:
        static_in = tuple(x.clone() for x in xs)
        stream = None if self.capture_stream is None else self.capture_stream()
        graph, static_out = capture_graph(lambda: self.fn(*static_in), xs[0].device, stream=stream)
        return graph, static_in, static_out


def first_argmax(logits: Tensor, chunks: int = 256) -> Tensor:
    """``logits.argmax(-1, keepdim=True)`` for [B, V] (first index on ties) in two stages.

    A single-row argmax over 129k entries runs as one slow reduction (~28 us on an H100); per-chunk maxima
    then the first chunk holding the overall max give the same index in a few microseconds.
    """
    bsz, vocab = logits.shape
    if vocab % chunks:
        return logits.argmax(dim=-1, keepdim=True)
    values, within = logits.view(bsz, chunks, vocab // chunks).max(dim=-1)  # first max in each chunk
    chunk = values.argmax(dim=-1, keepdim=True)  # first chunk with the overall max
    return chunk * (vocab // chunks) + within.gather(1, chunk)
