"""run_stage1(cfg) -> RunSummary: warmup, one profiler pass, N timed repeats, reports.

Reliability rules (issue 8): every finished page is appended to pages.jsonl as soon as it finishes;
metrics.json and report.md are re-rendered atomically from those records after every page, so a crash,
OOM or Ctrl-C never loses a finished measurement.  A failing page is recorded with its reason and the
run goes on (unless ``fail_fast``).  SIGINT/SIGTERM stop after the current decode step.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from llm_perf_opt.data.datasets import Page, build_pages
from llm_perf_opt.errors import ConfigError, LlmPerfOptError, OutputError, PageError, RunInterrupted
from llm_perf_opt.paths import PROJECT_ROOT
from llm_perf_opt.profiling.env import collect_env
from llm_perf_opt.profiling.stats import summarize
from llm_perf_opt.results.serialize import (
    append_jsonl,
    atomic_write_text,
    to_jsonable,
    write_summary,
)
from llm_perf_opt.results.types import (
    SCHEMA_VERSION,
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
from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession, PageRun, resolve_device
from llm_perf_opt.runners.resume import JOURNAL, check_resume, resume_dir, resume_records

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
# Test hook (documented in tests/README.md): raise a simulated CUDA OOM in prefill of this page id.
INJECT_OOM_ENV = "LLM_PERF_OPT_INJECT_OOM"


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


def validate(cfg: DictConfig) -> None:
    """Fail before loading anything when a value is out of range."""
    repeats = cfg.get("repeats")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ConfigError(f"repeats must be an integer >= 1, got {repeats!r}", hint="e.g. repeats=3")
    cap = effective_max_new_tokens(cfg)
    if cap < 1:
        raise ConfigError(
            f"infer.max_new_tokens must be >= 1, got {cap}", hint="e.g. infer.max_new_tokens=256 (at least 1 token)"
        )
    rep = int(cfg.profiling.get("rep_max_new_tokens") or cap)
    if rep < 1:
        raise ConfigError(f"profiling.rep_max_new_tokens must be >= 1, got {rep}")
    warm = cfg.profiling.get("warmup_rounds", 0)
    if not isinstance(warm, int) or warm < 0:
        raise ConfigError(f"profiling.warmup_rounds must be an integer >= 0, got {warm!r}")
    prompt = str(cfg.model.get("prompt") or "")
    if prompt.count("<image>") != 1:
        raise ConfigError(
            f"model.prompt must contain exactly one <image> placeholder, got {prompt!r}",
            hint="e.g. model.prompt='<image>\\n<|grounding|>Convert the document to markdown.'",
        )


def effective_max_new_tokens(cfg: DictConfig) -> int:
    cap = cfg.infer.get("max_new_tokens")
    if cap is None:
        cap = cfg.get("max_new_tokens")
    if not isinstance(cap, int) or isinstance(cap, bool):
        raise ConfigError(f"infer.max_new_tokens must be an integer, got {cap!r}")
    return cap


def prepare_run_dir(cfg: DictConfig) -> Path:
    out = Path(str(cfg.output.dir))
    if not out.is_absolute():
        out = PROJECT_ROOT / out
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"run directory {out} is not writable: {exc.strerror or exc}",
            hint="choose another with hydra.run.dir=PATH (or fix its permissions)",
        ) from exc
    return out


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Stage1Run:
    """State of one run: its directory, finished records, and how to render them at any moment."""

    def __init__(self, cfg: DictConfig, out: Path) -> None:
        self.cfg = cfg
        self.out = out
        self.started_at = _now()
        self.records: list[PageRecord] = []
        self.runs_for_flops: list[PageRun] = []
        self.batches: list[BatchRecord] = []
        self.static_flops: list[StageFlops] | None = None
        self.profile: ProfileSummary | None = None
        self.unavailable: list[Unavailable] = []
        self.notes: list[str] = []
        self.session: DeepSeekOCRSession | None = None
        self.hardware: HardwareInfo | None = None
        self.model_info: ModelInfo | None = None
        self.env: dict[str, Any] = {}

    # -------------------------------------------------------------- rendering
    def summary(self, status: RunStatus, reason: str | None = None) -> RunSummary:
        from llm_perf_opt.runners.measure import batch_aggregates, compute_efficiency

        ok = [r for r in self.records if r.status == "ok"]
        aggregates = {}
        for metric in AGGREGATE_METRICS:
            stats = summarize([getattr(r, metric) for r in ok if getattr(r, metric) is not None])
            if stats is not None:
                aggregates[metric] = stats
        hardware = self.hardware or HardwareInfo(
            device=str(self.cfg.device),
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
            name=str(self.cfg.model.get("name")),
            backend=str(self.cfg.model.get("backend")),
            weights=str(self.cfg.model.get("weights")),
            dtype=str(self.cfg.model.get("dtype")),
            params_total=0,
            params_activated_per_token=None,
            weights_bytes=0,
            tokenizer="not loaded",
        )
        unavailable = list(self.unavailable)
        flops, efficiency, energy, routing, more_unavail, more_notes = compute_efficiency(
            self, ok, final=status != "running"
        )
        unavailable.extend(more_unavail)
        run = RunInfo(
            # A multirun job dir is <sweep stamp>/<job number>: keep both so run ids stay unique.
            run_id=f"{self.out.parent.name}/{self.out.name}" if self.out.name.isdigit() else self.out.name,
            started_at=self.started_at,
            finished_at=None if status == "running" else _now(),
            status=status,
            argv=list(sys.argv),
            git_commit=self.env.get("git_commit"),
            config=OmegaConf.to_container(self.cfg, resolve=True),  # type: ignore[arg-type]
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
            batch_aggregates=batch_aggregates(self.batches),
            unavailable=unavailable,
            notes=self.notes + more_notes,
        )

    def write_reports(self, status: RunStatus, reason: str | None = None) -> RunSummary:
        from llm_perf_opt.report.markdown import render_operators, render_predictions, render_report
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
        if self.cfg.output.get("plots", True) and status != "running":
            try:
                plots = write_plots(summary, self.out)
            except (ImportError, RuntimeError, ValueError, OSError) as exc:
                log.warning("plots skipped: %s", exc)
                self.notes.append(f"plots not written: {exc}")
        attempt(lambda: atomic_write_text(self.out / "report.md", render_report(summary, plots)))
        if summary.profile is not None:
            attempt(lambda: atomic_write_text(self.out / "operators.md", render_operators(summary)))
        attempt(lambda: atomic_write_text(self.out / "predictions.md", render_predictions(self.out / PREDICTIONS)))
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
            if os.environ.get(INJECT_OOM_ENV) == page.page_id:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory (simulated by {INJECT_OOM_ENV} for page {page.page_id})"
                )
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
            append_jsonl(self.out / PREDICTIONS, {"repeat": repeat, **to_jsonable(result.prediction)})
            if repeat == 0 and "<|det|>" in result.prediction.text:
                from llm_perf_opt.report.viz import write_viz

                stem = re.sub(r"[^A-Za-z0-9._-]+", "_", page.page_id)
                write_viz(self.out, stem, page.load(), result.prediction.text)
        if record.status == "failed":
            log.error("page %s (repeat %d) failed: %s", page.page_id, repeat, record.error)
            if self.cfg.get("fail_fast", False):
                self._append(record)
                raise _PageFailed(record)
        self._append(record)
        return record

    def _append(self, record: PageRecord) -> None:
        self.records.append(record)
        append_jsonl(self.out / JOURNAL, record)

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


def _progress(cfg: DictConfig) -> Any:
    from llm_perf_opt.report.progress import Progress

    mode = str(cfg.get("progress", "auto"))
    return Progress(enabled=(sys.stderr.isatty() if mode == "auto" else mode in ("true", "on", "1", "True")))


def run_stage1(cfg: DictConfig) -> RunSummary:
    """The whole Stage-1 run; importable and tested without Hydra's CLI."""
    validate(cfg)
    out = prepare_run_dir(cfg)
    check_resume(cfg)
    run = Stage1Run(cfg, out)
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    device = resolve_device(str(cfg.device))
    run.env = collect_env(PROJECT_ROOT, device)
    atomic_write_text(out / "env.json", json.dumps(run.env, indent=2) + "\n")
    pages = build_pages(cfg.dataset, PROJECT_ROOT)
    atomic_write_text(out / "inputs.yaml", yaml.safe_dump({"pages": [p.describe() for p in pages]}, sort_keys=False))
    cap = effective_max_new_tokens(cfg)
    resumed = resume_records(cfg, pages)
    done = {(r.page_id, r.repeat) for r in resumed}
    # Resuming into the run dir itself (hydra.run.dir=<same dir>): its journal already holds these records.
    same_dir = bool(resumed) and resume_dir(str(cfg.resume)).resolve() == out.resolve()
    for r in resumed:
        if same_dir:
            run.records.append(r)
        else:
            run._append(r)
    if resumed:
        run.notes.append(f"resumed from {cfg.resume}: {len(resumed)} finished page runs carried over")

    torch.manual_seed(int(cfg.seed))
    run.session = session = DeepSeekOCRSession.load(cfg, PROJECT_ROOT)
    session.reserve_new_tokens = cap  # warm-up pages decode fewer tokens but must size the same cache
    from llm_perf_opt.runners.measure import describe_hardware, describe_model

    run.hardware = describe_hardware(cfg, session)
    run.model_info = describe_model(cfg, session)
    stop = StopFlag()
    progress = _progress(cfg)
    status: RunStatus = "complete"
    reason = None
    try:
        with stop.installed(), progress:
            run.write_reports("running")
            _warmup(cfg, run, pages, cap, progress, stop)
            if cfg.profiling.get("enabled", True) and not stop():
                _profile_pass(cfg, run, pages, cap, progress)
            todo = [(r, p) for r in range(int(cfg.repeats)) for p in pages if (p.page_id, r) not in done]
            task = progress.add("timed repeats", total=len(todo))
            for repeat, page in todo:
                if stop():
                    break
                run.run_page(page, repeat, cap, stop)
                progress.advance(task)
                run.write_reports("running")
            if int(cfg.infer.get("batch_size") or 1) > 1 and not stop():
                _throughput_phase(cfg, run, pages, cap, progress, stop)
            if stop():
                status, reason = "partial", f"stopped by {stop.signal_name}"
    except _PageFailed as exc:
        status, reason = "failed", f"fail_fast: page {exc.record.page_id} failed: {exc.record.error}"
    except OutputError as exc:
        status, reason = "partial", f"write error: {exc}"
        log.error("%s", exc)
        with contextlib.suppress(OutputError):  # the disk may still refuse; the journal has every finished page
            run.write_reports(status, reason)
        raise
    except KeyboardInterrupt:
        status, reason = "partial", "interrupted twice (hard stop)"
    finally:
        session.close()
    summary = run.write_reports(status, reason)
    log.info("report: %s", out / "report.md")
    if status == "partial" and stop():
        raise RunInterrupted(
            f"run stopped by {stop.signal_name}; partial report in {out}",
            hint=f"resume={out} runs only the pages still missing",  # every stop says how to go on
        )
    if status == "failed":
        # A page failure is not a config error: its own type, and the hint says where the finished pages are.
        raise PageError(
            reason or "run failed",
            hint=f"pages finished before it are in {out / JOURNAL}; without fail_fast=true a failed page is "
            "recorded and the run goes on",
        )
    return summary


def _throughput_phase(
    cfg: DictConfig, run: Stage1Run, pages: list[Page], cap: int, progress: Any, stop: StopFlag
) -> None:
    """``infer.batch_size`` pages per forward, ``repeats`` rounds; one untimed warm batch first."""
    assert run.session is not None
    size = int(cfg.infer.batch_size)
    chunks = [pages[i : i + size] for i in range(0, len(pages), size)]
    try:
        run.session.run_batch(chunks[0], min(cap, 8), repeat=-1)
    except (LlmPerfOptError, RuntimeError, ValueError, OSError) as exc:
        run.unavailable.append(Unavailable("batched_throughput", f"warm-up batch failed: {exc}"))
        return
    task = progress.add("batched throughput", total=len(chunks) * int(cfg.repeats))
    for repeat in range(int(cfg.repeats)):
        for chunk in chunks:
            if stop():
                return
            try:
                record = run.session.run_batch(chunk, cap, repeat)
            except torch.OutOfMemoryError as exc:
                run._release_memory()
                run.notes.append(f"batch of {len(chunk)} (repeat {repeat}) ran out of memory: {exc}")
                continue
            except (LlmPerfOptError, RuntimeError, ValueError, OSError) as exc:
                run.notes.append(f"batch {[p.page_id for p in chunk]} (repeat {repeat}) failed: {exc}")
                continue
            run.batches.append(record)
            append_jsonl(run.out / "batches.jsonl", record)
            progress.advance(task)


def _warmup(cfg: DictConfig, run: Stage1Run, pages: list[Page], cap: int, progress: Any, stop: StopFlag) -> None:
    assert run.session is not None
    rounds = int(cfg.profiling.get("warmup_rounds", 0))
    if rounds == 0:
        run.notes.append("no warmup rounds: the first timed page includes one-time costs")
        return
    first = _representative_page(pages)
    if cfg.profiling.get("warmup_synthetic", True):
        size = first.synthetic_size or (640, 640)
        page = Page(page_id="warmup", synthetic_size=size, seed=12345)
    else:
        page = first
    warm_pages = [page]
    if run.session.fast is not None:
        # The fast path compiles and captures its vision graphs once per view shape: warm every crop count
        # the dataset has, so no timed page pays that one-time cost.
        warm_pages = _one_page_per_view_shape(run.session, pages, first=page)
    task = progress.add("warmup", total=rounds * len(warm_pages))
    for _ in range(rounds):
        for p in warm_pages:
            if stop():
                return
            try:
                run.session.run(p, min(cap, 8), repeat=-1, should_stop=stop)
            except RunInterrupted:
                return
            progress.advance(task)


def _one_page_per_view_shape(session: DeepSeekOCRSession, pages: list[Page], first: Page) -> list[Page]:
    """``first`` plus one page for each other (crop grid, prompt length) among ``pages``: the fast path captures
    vision graphs per view shape and prefill graphs per prompt length (pages that fail to load are skipped)."""
    chosen: dict[tuple[int, tuple[int, int], int], Page] = {}
    for p in [first, *pages]:
        try:
            prepared = session.prepare(p)
        except (LlmPerfOptError, OSError, ValueError):
            continue  # a bad page fails in its own timed run, with its reason
        key = (int(prepared.n_crops), tuple(prepared.images_spatial_crop), int(prepared.prompt_len))
        chosen.setdefault(key, p)
    return list(chosen.values()) or [first]


def _representative_page(pages: list[Page]) -> Page:
    """The first page that decodes: a corrupt first file fails its own timed runs, not warmup or the profiler
    pass (warmup on it would abort the whole run; the profiler pass would leave operators.md out)."""
    for page in pages:
        try:
            page.load()
        except (LlmPerfOptError, OSError, ValueError) as exc:
            log.warning("page %s not used for warmup / profiler pass: %s", page.page_id, exc)
            continue
        return page
    return pages[0]


def _profile_pass(cfg: DictConfig, run: Stage1Run, pages: list[Page], cap: int, progress: Any) -> None:
    from llm_perf_opt.profiling.torch_profiler import run_profiler_pass

    assert run.session is not None
    session = run.session
    rep_tokens = min(int(cfg.profiling.get("rep_max_new_tokens") or cap), cap)
    task = progress.add("profiler pass", total=1)
    page = _representative_page(pages)
    try:
        summary, result = run_profiler_pass(
            lambda: session.run(page, rep_tokens, repeat=-1),
            session.device,
            cfg.profiling,
            run.out,
            page.page_id,
            rep_tokens,
            int(cfg.output.get("top_k_operators", 30)),
            bool(cfg.output.get("export_trace", True)),
        )
    except (LlmPerfOptError, RuntimeError, OSError) as exc:
        log.error("profiler pass failed on %s: %s", page.page_id, exc)
        log.debug("traceback", exc_info=True)
        run.unavailable.append(Unavailable("operators", f"profiler pass failed on {page.page_id}: {exc}"))
        return
    finally:
        progress.advance(task)
    run.profile = _with_range_checks(summary, result, run.out)


def _with_range_checks(summary: ProfileSummary, result: PageRun, out: Path) -> ProfileSummary:
    """On CUDA, compare the pass's own CUDA-event stage times with the trace's GPU-side ranges."""
    import attrs

    from llm_perf_opt.profiling.torch_profiler import gpu_ranges_ms
    from llm_perf_opt.results.types import RangeCheck

    if summary.sort_key != "self_device_ms" or summary.trace_file is None:
        return summary
    spans = gpu_ranges_ms(out / summary.trace_file)
    rec = result.record
    events = {
        "prefill": rec.prefill_ms,
        "decode": rec.decode_ms,
        "sam": rec.sam_ms,
        "clip": rec.clip_ms,
        "projector": rec.projector_ms,
    }
    checks = [
        RangeCheck(name, ev, spans[name][0], spans[name][1], ev / spans[name][0] - 1.0)
        for name, ev in events.items()
        if ev is not None and name in spans and spans[name][0] > 0
    ]
    return attrs.evolve(summary, range_checks=checks)
