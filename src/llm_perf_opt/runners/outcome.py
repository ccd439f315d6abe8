"""What a run's end is called, and what the user is told to do next: never success that was not achieved.

Rules: a run in which no page was measured is ``failed`` (and exits non-zero) whatever stopped it; a stop
(Ctrl-C, SIGTERM) before the last timed page is ``partial`` and says how many page runs finished; a stop
after the last timed page leaves a complete measurement, so the run is ``complete`` (the cut-short
batched phase is noted).  The ``resume=`` hint is only given when there is something to resume.
"""

from __future__ import annotations

from pathlib import Path

from llm_perf_opt.results.serialize import read_journal
from llm_perf_opt.results.types import PageRecord, RunStatus

JOURNAL = "pages.jsonl"


def final_status(
    status: RunStatus, reason: str | None, records: list[PageRecord], stopped_by: str | None, todo_left: int, todo: int
) -> tuple[RunStatus, str | None]:
    """The status and reason to report, from what the run loop saw."""
    ok = sum(1 for r in records if r.status == "ok")
    finished = f"{todo - todo_left} of {todo} page run(s) finished"
    if stopped_by is not None and status == "complete":
        if todo_left > 0:
            status, reason = "partial", f"stopped by {stopped_by}; {finished}"
        else:
            reason = f"{stopped_by} arrived after the last timed page; the per-page measurement is complete"
    elif status == "partial":  # a write error or a hard stop: say how far the run got too
        reason = f"{reason or 'stopped'}; {finished}"
    if ok == 0 and status != "failed":
        failed = [r for r in records if r.status == "failed"]
        why = f"; first error: {failed[0].page_id}: {failed[0].error}" if failed else ""
        base = reason or f"all {len(records)} page run(s) failed"
        status, reason = "failed", f"no page was measured ({base}){why}"
    return status, reason


def next_step_hint(out: Path) -> str:
    """How to go on after a stop: resume only when the journal holds a finished page."""
    finished = [r for r in read_journal(out / JOURNAL).records if r.status == "ok"]
    if finished:
        return (
            f"resume={out} runs only the pages still missing ({len(finished)} finished page run(s) are kept; "
            f"add hydra.run.dir={out} to continue in that directory)"
        )
    return f"no page finished, so there is nothing to resume: start the run again (hydra.run.dir={out} may be reused)"
