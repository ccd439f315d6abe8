"""run_stage1(settings) -> RunSummary: the order of a run — warmup, one profiler pass, N timed repeats, batched
throughput — with the run dir, resume and the final status around it.

The pieces live beside it, one job each: ``settings`` (typed, validated config), ``run_state`` (records and
rendering), ``phases`` (warmup, profiler pass, throughput), ``signals`` (SIGINT/SIGTERM), ``dsocr_session``
(one page), ``backends`` (the model).  SIGINT/SIGTERM stop after the current decode step; finished pages are
kept and the report says PARTIAL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs
import torch
import yaml

from llm_perf_opt.data.datasets import Page, build_pages
from llm_perf_opt.errors import OutputError, PageError, RunInterrupted
from llm_perf_opt.paths import PROJECT_ROOT
from llm_perf_opt.results.serialize import atomic_write_text
from llm_perf_opt.results.types import RunStatus, RunSummary
from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession, resolve_device
from llm_perf_opt.runners.outcome import final_status, next_step_hint
from llm_perf_opt.runners.phases import profile_pass, throughput_phase, warmup
from llm_perf_opt.runners.resume import JOURNAL, EarlierRun, check_resume, resume_dir, resume_records
from llm_perf_opt.runners.run_state import Stage1Run, _PageFailed
from llm_perf_opt.runners.rundir import SpaceReserve, claim_run_dir
from llm_perf_opt.runners.settings import RunSettings
from llm_perf_opt.runners.signals import StopFlag

__all__ = ["Stage1Run", "prepare_run_dir", "run_stage1"]

log = logging.getLogger(__name__)


def prepare_run_dir(settings: RunSettings) -> Path:
    out = Path(settings.output.dir)
    if not out.is_absolute():
        out = PROJECT_ROOT / out
    try:
        out.mkdir(parents=True, exist_ok=True)
        # a probe of this process's own (two runs started into one dir probe at once: with one shared name, one
        # run's unlink removed the other's probe, and the other failed as "not writable"; claim_run_dir then
        # refuses the second writer with its own message)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            f"run directory {out} is not writable: {exc.strerror or exc}",
            hint="choose another with hydra.run.dir=PATH (or fix its permissions)",
        ) from exc
    return out


def _progress(settings: RunSettings) -> Any:
    from llm_perf_opt.report.progress import Progress

    mode = settings.progress
    return Progress(enabled=sys.stderr.isatty() if mode == "auto" else bool(mode))


def _capture_env(run: Stage1Run, device: torch.device) -> None:
    """The environment of the run (env.json): the one call into env capture."""
    from llm_perf_opt.profiling.env import collect_env

    run.env = collect_env(PROJECT_ROOT, device)
    atomic_write_text(run.out / "env.json", json.dumps(run.env, indent=2) + "\n")


def _describe(run: Stage1Run, session: DeepSeekOCRSession) -> None:
    """Hardware (with its peak figures) and model facts for the report: the one call into their description."""
    from llm_perf_opt.runners.measure import describe_hardware, describe_model

    run.hardware = describe_hardware(run.settings, session)
    run.model_info = describe_model(run.settings, session)


def _carry_over(run: Stage1Run, pages: list[Page], earlier: EarlierRun | None) -> set[tuple[str, int]]:
    """Records of the resumed run that this run keeps; the (page, repeat) pairs they cover."""
    settings = run.settings
    carried = resume_records(settings, pages, earlier)
    resumed = carried.records
    run.notes.extend(carried.notes)
    # Resuming into the run dir itself (hydra.run.dir=<same dir>): its journal already holds these records.
    same_dir = bool(resumed) and resume_dir(str(settings.resume)).resolve() == run.out.resolve()
    for r in resumed:
        if same_dir:
            run.records.append(r)
        else:
            run._append(r)
    if resumed:
        run.notes.append(f"resumed from {settings.resume}: {len(resumed)} finished page runs carried over")
    return {(r.page_id, r.repeat) for r in resumed}


def run_stage1(requested: RunSettings) -> RunSummary:
    """The whole Stage-1 run; importable and tested without Hydra's CLI."""
    device = resolve_device(requested.device)
    settings = requested.resolved(device.type)  # what runs: recorded in config.yaml, metrics.json, report.md
    out = prepare_run_dir(settings)
    with claim_run_dir(out, settings.resume, PROJECT_ROOT) as notes:  # one writer, and only into a run dir
        return _run_stage1(settings, out, device, notes)


def _run_stage1(settings: RunSettings, out: Path, device: torch.device, dir_notes: list[str]) -> RunSummary:
    earlier = check_resume(settings)
    run = Stage1Run(settings, out)
    run.notes.extend(dir_notes)
    if device.type == "cpu":
        from llm_perf_opt.profiling.noise import pick_cpu_threads

        threads, run.cpu_threads = pick_cpu_threads(settings.cpu_threads)
        torch.set_num_threads(threads)
        log.info("CPU run: %s", run.cpu_threads)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(settings.as_config(), sort_keys=False))
    _capture_env(run, device)
    pages = build_pages(attrs.asdict(settings.dataset), PROJECT_ROOT)  # data/ may not import runners: a mapping
    atomic_write_text(out / "inputs.yaml", yaml.safe_dump({"pages": [p.describe() for p in pages]}, sort_keys=False))
    done = _carry_over(run, pages, earlier)

    from llm_perf_opt.profiling.rss import reset_peak_rss

    rss_note = reset_peak_rss()  # this run's peak RSS, not an earlier sweep job's
    if rss_note is not None:
        run.notes.append(f"peak_rss_bytes: {rss_note}; in an in-process sweep it includes earlier jobs")
    torch.manual_seed(settings.seed)
    run.session = session = DeepSeekOCRSession.load(settings, PROJECT_ROOT)
    _describe(run, session)
    stop = StopFlag()
    progress = _progress(settings)
    from llm_perf_opt.profiling.noise import HostLoadSampler

    run.host_load = HostLoadSampler().start()  # host conditions for the quality line, until the run ends
    status: RunStatus = "complete"
    reason = None
    reserve = SpaceReserve(out)  # room kept back so a full disk still gets PARTIAL/FAILED reports, never RUNNING
    timed_pages = pages[: settings.per_page_pages]  # None: all
    todo = [(r, p) for r in range(settings.repeats) for p in timed_pages if (p.page_id, r) not in done]
    carried_n = len(run.records)

    def todo_left() -> int:  # page runs of this run not measured yet (an interrupted page is not measured)
        return len(todo) - sum(1 for r in run.records[carried_n:] if r.error_type != "RunInterrupted")

    try:
        with stop.installed(), progress:
            reserve.ensure()
            run.write_reports("running")
            warmup(run, pages, progress, stop)
            if settings.profiling.enabled and not stop():
                profile_pass(run, pages, progress)
            task = progress.add("timed repeats", total=len(todo))
            for repeat, page in todo:
                if stop():
                    break
                run.run_page(page, repeat, settings.token_cap, stop)
                progress.advance(task)
                run.write_reports("running")
                reserve.ensure_for_reports(out)
            if settings.infer.batch_size > 1 and not stop():
                throughput_phase(run, pages, progress, stop)
    except _PageFailed as exc:
        status, reason = "failed", f"fail_fast: page {exc.record.page_id} failed: {exc.record.error}"
    except OutputError as exc:
        reserve.release()
        status, reason = final_status("partial", f"write error: {exc}", run.records, None, todo_left(), len(todo))
        log.error("%s", exc)
        with contextlib.suppress(OutputError):  # the disk may still refuse; the journal has every finished page
            run.write_reports(status, reason)
        raise
    except KeyboardInterrupt:
        status, reason = "partial", "interrupted twice (hard stop)"
    except Exception as exc:  # a bad value met mid-run, or a bug: the reports must not stay RUNNING
        reserve.release()
        with contextlib.suppress(OutputError):
            run.write_reports("failed", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        session.close()
        run.host_load.stop()
    reserve.release()
    status, reason = final_status(status, reason, run.records, stop.signal_name, todo_left(), len(todo))
    summary = run.write_reports(status, reason)
    log.info("report: %s", out / "report.md")
    if stop() and status != "complete":
        raise RunInterrupted(f"{reason}; report in {out}", hint=next_step_hint(out))
    if status == "failed":
        # A page failure is not a config error: its own type, and the hint says where the finished pages are.
        raise PageError(
            reason or "run failed",
            hint=f"pages finished before it are in {out / JOURNAL}; without fail_fast=true a failed page is "
            "recorded and the run goes on"
            if reason and reason.startswith("fail_fast")
            else f"each page's error is in {out / 'report.md'} (Failed pages) and {out / 'run.log'}",
        )
    return summary
