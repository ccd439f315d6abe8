"""Ctrl-C during start-up: one line, not a traceback from the middle of an import.

Installed before the first import that takes time (Hydra, then torch).  Nothing has been written yet
when it fires (Hydra has at most created the run dir), so it just says so and exits 130.  The run takes
SIGINT back (``take_back_sigint``) as soon as it can turn an interrupt into a report.  Standard library only:
importing this module must itself be instant.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

_MESSAGE = (
    "RunInterrupted: interrupted while starting, before any page ran\n"
    "  hint: nothing was measured or written; start the run again\n"
)


def _on_startup_signal(_signum: int, _frame: Any) -> None:
    os.write(sys.stderr.fileno(), _MESSAGE.encode())
    os._exit(130)


def install_startup_handler() -> dict[int, Any]:
    """Install the start-up handler; returns the handlers it replaced (for ``restore_handlers``)."""
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, _on_startup_signal)
        except ValueError:  # not the main thread: the caller keeps its own handling
            break
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def take_back_sigint() -> None:
    """From here on SIGINT raises KeyboardInterrupt (which the runner turns into one line); SIGTERM default."""
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:
        return
