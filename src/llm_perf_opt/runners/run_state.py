"""The state of one run (its directory, settings, finished records) and how to render it at any moment.

Reliability rules (issue 8): every finished page is appended to pages.jsonl as soon as it finishes; metrics.json
and report.md are re-rendered atomically from those records after every page, so a crash, OOM or Ctrl-C never
loses a finished measurement.  A failing page is recorded with its reason and the run goes on (unless
``fail_fast``).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from llm_perf_opt.data.datasets import Page
from llm_perf_opt.errors import LlmPerfOptError, OutputError, RunInterrupted
from llm_perf_opt.profiling.noise import HostLoadSampler, assess_quality, gpu_throttle_reasons, runaway_summary
from llm_perf_opt.profiling.stats import summarize
from llm_perf_opt.results.serialize import append_journal, append_jsonl, atomic_write_text, to_jsonable, write_summary
from llm_perf_opt.results.types import (
    SCHEMA_VERSION,
    BatchedPhase,
    BatchRecord,
    HardwareInfo,
    ModelInfo,
    PageRecord,
    ProfileSummary,
    RunInfo,
    RunStatus,
    RunSummary,
    StageFlops,
    Unavailable,
)
from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession, PageRun
from llm_perf_opt.runners.page_record import setup_runs_note, split_setup_runs
from llm_perf_opt.runners.resume import JOURNAL
from llm_perf_opt.runners.settings import RunSettings
from llm_perf_opt.runners.signals import StopFlag

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
AGGREGATE_METRICS = (
    "preprocess_ms",
    "sam_ms",
    "clip_ms",
    "projector_ms",
    "vision_ms",
    "prefill_ms",
    "decode_ms",
    "e2e_ms",
    "tpot_ms",
    "decode_tok_s",
    "decode_step_p50_ms",
    "decode_step_p90_ms",
    "decode_step_p99_ms",
    "generated_tokens",
    "prompt_tokens",
    "image_tokens",
    "peak_mem_allocated_bytes",
    "peak_mem_reserved_bytes",
    "peak_rss_bytes",
    "kv_cache_bytes",
    "energy_j",
    "energy_per_token_j",
)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Stage1Run:
    """State of one run: its directory, finished records, and how to render them at any moment."""

    def __init__(self, settings: RunSettings, out: Path) -> None:
        # the resolved settings (RunSettings.resolved): what ran, and so what config.yaml and metrics.json record
        self.settings = settings
        self.out = out
        self.started_at = _now()
        self.records: list[PageRecord] = []
        self.runs_for_flops: list[PageRun] = []
        self.batches: list[BatchRecord] = []
        self.batched_phase: BatchedPhase | None = None  # the batched phase end to end, once it ran
        self.static_flops: list[StageFlops] | None = None
        self.profile: ProfileSummary | None = None
        self.unavailable: list[Unavailable] = []
        self.notes: list[str] = []
        self.session: DeepSeekOCRSession | None = None
        self.hardware: HardwareInfo | None = None
        self.model_info: ModelInfo | None = None
        self.env: dict[str, Any] = {}
        self.host_load: HostLoadSampler | None = None
        self.cpu_threads: str | None = None

    # -------------------------------------------------------------- rendering
    def _efficiency(self, ok: list[PageRecord], final: bool) -> Any:
        """FLOPs, MFU/MBU, energy and routing of the finished pages (the one call into the efficiency code)."""
        from llm_perf_opt.runners.measure import compute_efficiency

        return compute_efficiency(self, ok, final=final)

    def _batch_aggregates(self) -> Any:
        from llm_perf_opt.runners.measure import batch_aggregates

        return batch_aggregates(self.batches)

    def summary(self, status: RunStatus, reason: str | None = None) -> RunSummary:
        ok = [r for r in self.records if r.status == "ok"]
        steady, setup = split_setup_runs(ok)
        aggregates = {}
        for metric in AGGREGATE_METRICS:
            stats = summarize([getattr(r, metric) for r in steady if getattr(r, metric) is not None])
            if stats is not None:
                aggregates[metric] = stats
        hardware = self.hardware or HardwareInfo(
            device=self.settings.device,
            gpu_name=None,
            driver=None,
            cuda=None,
            torch=torch.__version__,
            cpu="",
            peak_flops_per_s=None,
            peak_flops_source=None,
            peak_bw_bytes_per_s=None,
            peak_bw_source=None,
        )
        model = self.model_info or ModelInfo(
            name=self.settings.model.name,
            backend=self.settings.model.backend,
            weights=self.settings.model.weights,
            dtype=self.settings.model.dtype,
            params_total=0,
            params_activated_per_token=None,
            weights_bytes=0,
            tokenizer="not loaded",
        )
        unavailable = list(self.unavailable)
        flops, efficiency, energy, routing, more_unavail, more_notes = self._efficiency(ok, final=status != "running")
        unavailable.extend(more_unavail)
        quality = attrs.evolve(
            assess_quality(
                ok,
                self.host_load.summary() if self.host_load is not None else None,
                gpu_throttle_reasons(self.session.nvml if self.session is not None else None),
            ),
            cpu_threads=self.cpu_threads,
        )
        run = RunInfo(
            # A multirun job dir is <sweep stamp>/<job number>: keep both so run ids stay unique.
            run_id=f"{self.out.parent.name}/{self.out.name}" if self.out.name.isdigit() else self.out.name,
            started_at=self.started_at,
            finished_at=None if status == "running" else _now(),
            status=status,
            argv=list(sys.argv),
            git_commit=self.env.get("git_commit"),
            config=self.settings.as_config(),
            status_reason=reason,
        )
        return RunSummary(
            schema_version=SCHEMA_VERSION,
            run=run,
            hardware=hardware,
            model=model,
            pages=list(self.records),
            aggregates=aggregates,
            flops=flops,
            efficiency=efficiency,
            profile=self.profile,
            energy=energy,
            moe_routing=routing,
            batches=list(self.batches),
            batch_aggregates=self._batch_aggregates(),
            batched_phase=self.batched_phase,
            unavailable=unavailable,
            notes=self.notes + more_notes + simulated_eos_notes(ok) + setup_runs_note(setup),
            quality=quality,
            runaway=runaway_summary(ok),
        )

    def write_reports(self, status: RunStatus, reason: str | None = None) -> RunSummary:
        from llm_perf_opt.report.markdown import render_predictions, render_report
        from llm_perf_opt.report.operators import render_operators
        from llm_perf_opt.report.plots import write_plots

        summary = self.summary(status, reason)
        # Every file is attempted on its own and the first failure is raised at the end: a disk that refuses
        # metrics.json must not also leave report.md saying RUNNING, and a bare OSError (a write path that
        # does not wrap it) must still reach the user as one OutputError line, not a traceback.
        errors: list[Exception] = []

        def attempt(write: Callable[[], object]) -> None:
            try:
                write()
            except (OutputError, OSError) as exc:
                errors.append(exc)

        attempt(lambda: write_summary(self.out / "metrics.json", summary))
        plots: dict[str, str] = {}
        if self.settings.output.plots and status != "running":
            try:
                plots = write_plots(summary, self.out)
            except (ImportError, RuntimeError, ValueError, OSError) as exc:
                log.warning("plots skipped: %s", exc)
                self.notes.append(f"plots not written: {exc}")
        attempt(lambda: atomic_write_text(self.out / "report.md", render_report(summary, plots)))
        if summary.profile is not None:
            attempt(lambda: atomic_write_text(self.out / "operators.md", render_operators(summary)))
        attempt(lambda: atomic_write_text(self.out / "predictions.md", render_predictions(self.out / PREDICTIONS)))
        if status != "running":
            from llm_perf_opt.report.briefs import render_assumptions, render_stakeholder_summary

            attempt(lambda: atomic_write_text(self.out / "stakeholder_summary.md", render_stakeholder_summary(summary)))
            attempt(lambda: atomic_write_text(self.out / "assumptions.md", render_assumptions(summary)))
        if errors:
            first = errors[0]
            if isinstance(first, OutputError):
                raise first
            where = getattr(first, "filename", None) or self.out
            raise OutputError(
                f"could not write {where}: {getattr(first, 'strerror', None) or first}",
                hint="check free disk space and permissions of the run directory; pages.jsonl keeps finished pages",
            ) from first
        return summary

    # -------------------------------------------------------------- one page
    def run_page(self, page: Page, repeat: int, cap: int, stop: StopFlag) -> PageRecord:
        assert self.session is not None
        try:
            result = self.session.run(page, cap, repeat=repeat, should_stop=stop)
        except torch.OutOfMemoryError as exc:
            self._release_memory()
            record = _failed(page, repeat, f"out of memory: {str(exc).splitlines()[0]}", "OutOfMemoryError")
        except RunInterrupted as exc:
            record = _failed(page, repeat, str(exc), "RunInterrupted")
            self._append(record)
            return record
        except (LlmPerfOptError, RuntimeError, ValueError, OSError) as exc:
            log.debug("page %s failed", page.page_id, exc_info=True)
            self._release_memory()
            record = _failed(page, repeat, str(exc), type(exc).__name__)
        else:
            record = result.record
            self.runs_for_flops.append(result)
            self._append(record)  # the journal first: a full disk may refuse what follows, not the measurement
            append_jsonl(self.out / PREDICTIONS, {"repeat": repeat, **to_jsonable(result.prediction)})
            if repeat == 0 and "<|det|>" in result.prediction.text:
                from llm_perf_opt.report.viz import write_viz

                stem = re.sub(r"[^A-Za-z0-9._-]+", "_", page.page_id)
                write_viz(self.out, stem, page.load(), result.prediction.text)
            return record
        log.error("page %s (repeat %d) failed: %s", page.page_id, repeat, record.error)
        self._append(record)
        if self.settings.fail_fast:
            raise _PageFailed(record)
        return record

    def _append(self, record: PageRecord) -> None:
        self.records.append(record)
        append_journal(self.out / JOURNAL, record)

    def _release_memory(self) -> None:
        if self.session is not None and self.session.device.type == "cuda":
            torch.cuda.empty_cache()


class _PageFailed(Exception):
    def __init__(self, record: PageRecord) -> None:
        super().__init__(record.error)
        self.record = record


def _failed(page: Page, repeat: int, error: str, error_type: str) -> PageRecord:
    return PageRecord(
        page_id=page.page_id, repeat=repeat, status="failed", path=_path(page), error=error, error_type=error_type
    )


def _path(page: Page) -> str | None:
    return str(page.path) if page.path else None


def simulated_eos_notes(ok: list[PageRecord]) -> list[str]:
    """Say when output lengths were simulated: dummy weights never end at eos, so such pages end at their target."""
    simulated = sum(p.simulated_eos for p in ok)
    if not simulated:
        return []
    return [
        f"simulated eos: {simulated} of {len(ok)} page run(s) ended at the page's target output length (dummy "
        "weights never end at eos; targets from the synthetic drawing or dataset.lengths_file)"
    ]
