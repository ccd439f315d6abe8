"""Progress bars on stderr (rich) for warmup, the profiler pass and the repeats; silent off a TTY.

Off a TTY (CI, log files) every finished task is logged once instead, so logs stay readable.
"""

from __future__ import annotations

import logging
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._rich: RichProgress | None = None
        self._totals: dict[int, tuple[str, int, int]] = {}
        self._next = 0

    def __enter__(self) -> Progress:
        if self.enabled:
            self._rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._rich.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._rich is not None:
            self._rich.__exit__(et, ev, tb)
            self._rich = None

    def add(self, description: str, total: int) -> int:
        if self._rich is not None:
            return int(self._rich.add_task(description, total=total))
        self._next += 1
        self._totals[self._next] = (description, total, 0)
        return self._next

    def advance(self, task: int) -> None:
        if self._rich is not None:
            self._rich.advance(task)  # type: ignore[arg-type]
            return
        desc, total, done = self._totals[task]
        done += 1
        self._totals[task] = (desc, total, done)
        if done == total:
            log.info("%s: %d/%d done", desc, done, total)
