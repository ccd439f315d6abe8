"""SIGINT/SIGTERM become a flag the decode loops poll, so a stop ends after the current step with every finished
page kept; a second signal stops at once."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGINT/SIGTERM; the decode loop polls it between steps."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __call__(self) -> bool:
        return self.signal_name is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        previous = {}

        def handler(signum: int, _frame: Any) -> None:
            if self.signal_name is not None:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.signal_name = signal.Signals(signum).name
            log.warning("%s received: stopping after the current step; finished pages are kept", self.signal_name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. some launchers): signals stay with the caller
                break
        try:
            yield self
        finally:
            for sig, prev in previous.items():
                signal.signal(sig, prev)
