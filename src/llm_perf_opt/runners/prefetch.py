"""Pages prepared ahead of the batched phase by a pool of worker threads (bounded prefetch).

Decoding and preprocessing a page (PIL decode, resize, crop, normalise) is host work that, run serially before
each batch, leaves the GPU idle; PIL releases the GIL in decode and resize and torch in its tensor ops, so
threads overlap it with the previous batch's GPU work.  At most ``depth`` batches are prepared or in flight
ahead of the one being consumed (memory stays bounded: a Gundam page is tens of MB of float32 tiles).  Batches
come back in order, each with the seconds the consumer waited for it (the preprocessing left on the critical
path); a page that fails to prepare raises when its batch is taken, so the caller fails that batch alone.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import attrs

from llm_perf_opt.errors import ConfigError

P = TypeVar("P")
R = TypeVar("R")


@attrs.frozen
class Ready(Generic[P, R]):
    """One batch taken from the prefetcher: its pages, their prepared inputs (or the error) and the wait."""

    pages: list[P]
    wait_s: float  # host seconds the consumer blocked for this batch (0 when it was ready in time)
    futures: list[Future[R]]

    def prepared(self) -> list[R]:
        """The prepared inputs, in page order; re-raises the first page's preparation error."""
        return [f.result() for f in self.futures]


class Prefetcher(Generic[P, R]):
    """``prepare`` over ``batches`` on ``workers`` threads, at most ``depth`` batches ahead; ``workers=0`` prepares
    each batch in the caller's thread when it is taken (the serial reference, all of it waited for)."""

    def __init__(self, prepare: Callable[[P], R], batches: Sequence[list[P]], workers: int, depth: int = 2) -> None:
        if workers < 0 or depth < 1:
            raise ConfigError(f"prefetch needs workers >= 0 and depth >= 1, got {workers} and {depth}")
        self.prepare = prepare
        self.batches = list(batches)
        self.workers = workers
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefetch") if workers else None

    def __enter__(self) -> Prefetcher[P, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, pages: list[P]) -> list[Future[R]]:
        assert self._pool is not None
        return [self._pool.submit(self.prepare, p) for p in pages]

    def __iter__(self) -> Iterator[Ready[P, R]]:
        if self._pool is None:
            for pages in self.batches:
                t0 = time.perf_counter()
                futures: list[Future[R]] = []
                for p in pages:
                    fut: Future[R] = Future()
                    try:
                        fut.set_result(self.prepare(p))
                    except Exception as exc:  # handed to the consumer: Ready.prepared() raises it, as a worker would
                        fut.set_exception(exc)
                    futures.append(fut)
                yield Ready(pages, time.perf_counter() - t0, futures)
            return
        queue: deque[tuple[list[P], list[Future[R]]]] = deque()
        upcoming = iter(self.batches)
        for pages in upcoming:
            queue.append((pages, self._submit(pages)))
            if len(queue) >= self.depth:
                break
        while queue:
            pages, futures = queue.popleft()
            t0 = time.perf_counter()
            for f in futures:
                f.exception()  # wait without raising: the consumer decides what a failed page means
            wait_s = time.perf_counter() - t0
            nxt = next(upcoming, None)
            if nxt is not None:  # keep `depth` batches in flight while the consumer runs this one
                queue.append((nxt, self._submit(nxt)))
            yield Ready(pages, wait_s, futures)
