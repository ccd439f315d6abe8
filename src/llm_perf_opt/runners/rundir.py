"""Which directory a run may write into, and one writer at a time.

A run writes only into a directory that is empty (or new) or that a run created: the marker file
``.llm-perf-opt-run`` says so.  Anything else (a config folder, the repository root, a folder of the
user's own files, the current directory through an empty ``hydra.run.dir=``) is refused before a file is
written, because a run overwrites ``config.yaml``, ``report.md``, ... without asking.  A run dir that already
holds finished pages is only written again with ``resume=<that dir>`` (which appends to its journal);
otherwise a second run would mix its records with the first one's.

``.lock`` (pid and host) makes a second concurrent writer fail at once.  A lock whose process is gone (a
killed run) is taken over with a warning.  Hydra's own files (``.hydra/``, ``run.log``) are written before
any of our code runs, so they never make a directory "not empty".
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from llm_perf_opt.errors import OutputError
from llm_perf_opt.results.types import Unavailable

log = logging.getLogger(__name__)

MARKER = ".llm-perf-opt-run"
LOCK = ".lock"
JOURNAL = "pages.jsonl"
# Written by Hydra into the run dir before the job starts (and by a previous start that failed early).
HYDRA_FILES = frozenset({".hydra", "run.log"})
# Inside the project, only these trees hold run dirs; writing into the others would overwrite sources.
_PROTECTED = ("conf", "src", "tests", ".git", "models", "datasets", "benchmarks", "scripts")
_HINT = "choose a new or empty directory with hydra.run.dir=PATH"


def unsafe_reason(out: Path, project_root: Path) -> str | None:
    """Why ``out`` must never be a run dir whatever it holds (the repo root, its parents, its sources)."""
    out = Path(os.path.abspath(out))
    root = Path(os.path.abspath(project_root))
    if root.is_relative_to(out):
        what = "the project root" if out == root else f"a parent of the project root {root}"
        return f"{out} is {what}"
    for name in _PROTECTED:
        if out.is_relative_to(root / name):
            return f"{out} is inside the project's {name}/ folder"
    return None


def check_run_dir(out: Path, resume: str | None, project_root: Path) -> None:
    """Raise OutputError unless a run may write into ``out`` (see the module doc)."""
    problem = unsafe_reason(out, project_root)
    if problem is not None:
        raise OutputError(f"refusing to write a run into {out}: {problem}", hint=_HINT)
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"run directory {out} is a file, not a directory", hint=_HINT)
    entries = _entries(out)
    if not entries:
        return
    owned = MARKER in entries or {"metrics.json", JOURNAL} <= set(entries)  # older runs had no marker
    if not owned:
        shown = ", ".join(sorted(entries)[:3]) + (" ..." if len(entries) > 3 else "")
        raise OutputError(
            f"refusing to write a run into {out}: it is not empty ({shown}) and no run created it",
            hint=_HINT + " (a run never overwrites files it did not create)",
        )
    journaled = _journal_lines(out / JOURNAL)
    if journaled and not _same_dir(resume, out, project_root):
        raise OutputError(
            f"{out} already holds a run with {journaled} journaled page run(s); a second run would mix with it",
            hint=f"add resume={out} to continue that run there, or {_HINT}",
        )


def _entries(out: Path) -> list[str]:
    try:
        return [n for n in os.listdir(out) if n not in HYDRA_FILES and n != LOCK and not n.startswith(LOCK + ".")]
    except OSError as exc:
        raise OutputError(f"cannot list the run directory {out}: {exc.strerror or exc}", hint=_HINT) from exc


def _journal_lines(journal: Path) -> int:
    try:
        return journal.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise OutputError(f"cannot read {journal}: {exc.strerror or exc}", hint=_HINT) from exc


def _same_dir(resume: str | None, out: Path, project_root: Path) -> bool:
    if not resume:
        return False
    path = Path(str(resume))
    path = path if path.is_absolute() else project_root / path
    return os.path.realpath(path) == os.path.realpath(out)


@contextlib.contextmanager
def claim_run_dir(out: Path, resume: str | None, project_root: Path) -> Iterator[list[str]]:
    """Lock ``out``, check it under the lock, mark it as a run dir; yields notes for the report."""
    notes = _acquire_lock(out)
    try:
        check_run_dir(out, resume, project_root)
        marker = out / MARKER
        if not marker.exists():
            info = {"tool": "llm-perf-opt", "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
            try:
                marker.write_text(json.dumps(info) + "\n")
            except OSError as exc:
                raise OutputError(f"cannot write {marker}: {exc.strerror or exc}", hint=_HINT) from exc
        yield notes
    finally:
        _release_lock(out)


def _lock_text() -> str:
    return f"{os.getpid()} {socket.gethostname()}\n"


def _acquire_lock(out: Path) -> list[str]:
    lock = out / LOCK
    notes: list[str] = []
    for _attempt in range(2):
        # The lock appears whole or not at all: written under a private name, then hard-linked into place (link
        # fails if the lock exists). An O_EXCL create would leave a moment where a second run reads an empty lock,
        # takes it for a stale one and takes it over (seen with two runs started together).
        tmp = out / f"{LOCK}.{os.getpid()}"
        try:
            tmp.write_text(_lock_text())
            try:
                os.link(tmp, lock)
            finally:
                tmp.unlink()
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None:
                pid, host = holder
                if host != socket.gethostname():
                    raise OutputError(
                        f"{out} is locked by pid {pid} on host {host} (another run may be writing into it)",
                        hint=f"choose another hydra.run.dir, or delete {lock} if no run on {host} uses it",
                    ) from None
                if _alive(pid):
                    raise OutputError(
                        f"another run (pid {pid}) is writing into {out}",
                        hint=f"wait for it to finish, or {_HINT}",
                    ) from None
            note = f"took over the stale lock {lock} " + (
                f"of pid {holder[0]} (no longer running)" if holder else "(unreadable)"
            )
            log.warning("%s", note)
            notes.append(note)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        except OSError as exc:
            raise OutputError(f"cannot create the lock file {lock}: {exc.strerror or exc}", hint=_HINT) from exc
        return notes
    raise OutputError(f"another run keeps taking the lock {lock}", hint=_HINT)


def _lock_holder(lock: Path) -> tuple[int, str] | None:
    try:
        pid_text, host = lock.read_text().split()
        return int(pid_text), host
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _release_lock(out: Path) -> None:
    """Remove the lock only if it is still ours (a takeover by another run must not be undone)."""
    lock = out / LOCK
    try:
        if lock.read_text() == _lock_text():
            lock.unlink()
    except OSError as exc:
        log.warning("could not remove the lock %s: %s", lock, exc)


# ------------------------------------------------------------------------------------------ disk space
RESERVE = ".space-reserve"
# Room kept back for the final reports: the last metrics.json + report.md, twice (temp file + rename), and a
# floor for the first ones.  Without it a full disk would leave metrics.json / report.md saying RUNNING.
RESERVE_FLOOR_BYTES = 1 << 20
# Free space wanted before the profiler pass writes its chrome trace (raw JSON, then gzip): the full-size
# model's trace is ~8 MB gzipped and ~10x that raw; below this the trace is skipped with the reason.
TRACE_FREE_BYTES = 256 << 20


class SpaceReserve:
    """A ballast file in the run dir, released when the disk fills so the final reports still fit."""

    def __init__(self, out: Path) -> None:
        self.path = out / RESERVE
        self.size_bytes = 0

    def ensure(self, wanted_bytes: int = RESERVE_FLOOR_BYTES) -> None:
        """Grow the ballast to ``wanted_bytes``; OutputError when the disk has not even that much room."""
        wanted_bytes = max(wanted_bytes, RESERVE_FLOOR_BYTES)
        if wanted_bytes <= self.size_bytes:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.posix_fallocate(fd, 0, wanted_bytes)
            finally:
                os.close(fd)
        except OSError as exc:
            raise OutputError(
                f"not enough free space in {self.path.parent}: {wanted_bytes // 1024} KiB are kept back for the "
                f"final reports and the disk refused them ({exc.strerror or exc})",
                hint="free disk space or choose a run dir on another disk (hydra.run.dir=PATH)",
            ) from exc
        self.size_bytes = wanted_bytes

    def ensure_for_reports(self, out: Path) -> None:
        """Keep room for twice the current report files (each is rewritten through a temp file)."""
        total = 0
        for name in ("metrics.json", "report.md", "operators.md", "predictions.md"):
            with contextlib.suppress(OSError):
                total += (out / name).stat().st_size
        self.ensure(2 * total + RESERVE_FLOOR_BYTES)

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.size_bytes = 0


def free_bytes(path: Path) -> int | None:
    try:
        usage = os.statvfs(path)
    except OSError:
        return None
    return usage.f_bavail * usage.f_frsize


def remove_partial_trace(out: Path) -> None:
    """A profiler pass that failed mid-export leaves raw / temp trace files: none may stay behind."""
    for name in ("trace.json", "trace.json.tmp", "trace.json.gz"):
        path = out / name
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("could not remove the partial trace %s: %s", path, exc)


def trace_fits(export_trace: bool, out: Path, unavailable: list[Unavailable]) -> bool:
    """Whether the profiler pass may write its trace: asked for, and room for it on the run dir's disk."""
    if not export_trace:
        return False
    free = free_bytes(out)
    if free is not None and free < TRACE_FREE_BYTES:
        reason = (
            f"only {free // (1 << 20)} MiB free in {out}; the chrome trace may need up to "
            f"{TRACE_FREE_BYTES >> 20} MiB while it is written, so it was skipped"
        )
        log.warning("trace.json.gz not written: %s", reason)
        unavailable.append(Unavailable("trace", reason))
        return False
    return True
