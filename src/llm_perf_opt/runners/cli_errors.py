"""What the console says when a run cannot start or stops in an unplanned way: one line and a hint.

Kept apart from the Hydra entry so the entry stays a few lines, and light (no torch) so it is usable
before the slow imports.
"""

from __future__ import annotations

import os
from pathlib import Path

from llm_perf_opt.errors import OutputError, RunInterrupted
from llm_perf_opt.paths import PROJECT_ROOT
from llm_perf_opt.runners.rundir import check_run_dir, unsafe_reason


def check_dir_argument(key: str, value: str, resume: str | None, cwd: Path, multirun: bool) -> OutputError | None:
    """Run-dir safety of ``hydra.run.dir`` / ``hydra.sweep.dir`` before Hydra creates or writes anything."""
    hint = f"choose a new or empty directory with {key}=PATH"
    if not value.strip():
        return OutputError(f"{key} is empty: the run would write into the current directory {cwd}", hint)
    literal = value.split("${", 1)[0]
    target = Path(literal) if Path(literal).is_absolute() else cwd / literal
    target = Path(os.path.abspath(target))
    if "${" in value:
        # Only the literal head is known: it must not lie inside the project's sources.
        problem = unsafe_reason(target, PROJECT_ROOT)
        under_sources = literal and not Path(os.path.abspath(PROJECT_ROOT)).is_relative_to(target)
        if problem is not None and under_sources:
            return OutputError(f"refusing to write a run under {literal}: {problem}", hint)
        return None
    if multirun:
        problem = unsafe_reason(target, PROJECT_ROOT)
        return OutputError(f"refusing to write a sweep into {target}: {problem}", hint) if problem else None
    try:
        check_run_dir(target, resume, PROJECT_ROOT)
    except OutputError as exc:
        return exc
    return None


def create_run_dir(key: str, value: str, cwd: Path) -> OutputError | None:
    """Create a fully literal run dir now: Hydra would next, and its failure (under /proc, ...) is a traceback."""
    if "${" in value or not value.strip():
        return None
    target = Path(value) if Path(value).is_absolute() else cwd / value
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return OutputError(
            f"cannot create the run directory {value}: {exc.strerror or exc}",
            hint=f"choose another with {key}=PATH",
        )
    return None


def interrupted_error(out: Path | None) -> RunInterrupted:
    """Ctrl-C outside the run's own handler (model load, dataset scan, Hydra): resume only if a page finished."""
    from llm_perf_opt.runners.outcome import next_step_hint

    if out is None or not (out / "pages.jsonl").is_file():
        return RunInterrupted("interrupted before any page ran", hint="nothing was measured; start the run again")
    return RunInterrupted(f"interrupted; the pages finished so far are in {out / 'pages.jsonl'}", next_step_hint(out))


def unexpected_error_line(exc: BaseException, run_log: Path | None) -> str:
    """One line for an error nothing anticipated; the traceback is in run.log only."""
    first = (str(exc).strip().splitlines() or [""])[0]
    where = f"details in {run_log}" if run_log is not None else "details in run.log"
    return f"UnexpectedError: {type(exc).__name__}: {first} ({where})\n  hint: please report it with that run.log"
