"""Peak resident memory of *this run*, not of the interpreter's lifetime.

``getrusage``'s ``ru_maxrss`` never goes down, so in an in-process Hydra sweep every job after the first would
report the largest job before it.  Linux lets a process reset its own high-water mark (``clear_refs`` value 5,
Linux >= 4.0) and read it back as ``VmHWM``; a run resets it before loading the model, so its peak covers its
own load and pages.  Where the reset is refused, the lifetime figure is kept and the caller records why.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

__all__ = ["peak_rss_bytes", "reset_peak_rss"]

_PROC = Path("/proc/self")


def reset_peak_rss(proc: Path = _PROC) -> str | None:
    """Start this process's peak-RSS count afresh; ``None`` on success, else why the lifetime peak stays."""
    try:
        (proc / "clear_refs").write_text("5")
    except OSError as exc:
        return f"could not reset the process's peak RSS ({exc.strerror or exc}): it is the lifetime high-water mark"
    return None


def peak_rss_bytes(proc: Path = _PROC) -> int:
    """Peak resident set since the last reset (``VmHWM``), or the lifetime peak where /proc has none."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+)\s+kB", (proc / "status").read_text(), re.MULTILINE)
    except OSError:
        match = None
    if match is not None:
        return int(match.group(1)) * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux
