"""The phases of a run after the model is loaded: warmup, the single profiler pass, batched throughput.

Each phase takes the run state and the stop flag, records what it measured (or why it could not) in the run,
and returns; the order and the timed repeats between them are ``stage1.run_stage1``'s.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import attrs
import torch

from llm_perf_opt.data.datasets import Page
from llm_perf_opt.errors import LlmPerfOptError, RunInterrupted
from llm_perf_opt.results.serialize import append_jsonl
from llm_perf_opt.results.types import ProfileSummary, Unavailable
from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession, PageRun
from llm_perf_opt.runners.outcome import batchable_pages
from llm_perf_opt.runners.prefetch import Prefetcher
from llm_perf_opt.runners.run_state import Stage1Run
from llm_perf_opt.runners.rundir import remove_partial_trace, trace_fits
from llm_perf_opt.runners.signals import StopFlag

log = logging.getLogger(__name__)

# Tokens decoded by an untimed warm-up page or batch (enough to run every decode code path once).
WARMUP_TOKENS = 8


def throughput_phase(run: Stage1Run, pages: list[Page], progress: Any, stop: StopFlag) -> None:
    """``infer.batch_size`` pages per forward, ``repeats`` rounds; one untimed warm batch first."""
    assert run.session is not None
    cap, repeats = run.settings.token_cap, run.settings.repeats
    size = run.settings.infer.batch_size
    pages = batchable_pages(run.session, pages, run.notes)  # one bad page must not cost the whole phase
    if not pages:
        run.unavailable.append(Unavailable("batched_throughput", "no page could be prepared for batching"))
        return
    if size > len(pages):
        warning = batch_size_warning(size, len(pages))
        log.warning("%s", warning)
        run.notes.append(warning)
    chunks = [pages[i : i + size] for i in range(0, len(pages), size)]
    try:
        run.session.run_batch(chunks[0], min(cap, WARMUP_TOKENS), repeat=-1)
    except (LlmPerfOptError, RuntimeError, ValueError, OSError) as exc:
        run.unavailable.append(Unavailable("batched_throughput", f"warm-up batch failed: {exc}"))
        return
    task = progress.add("batched throughput", total=len(chunks) * repeats)
    workers = run.settings.infer.preprocess_workers
    batches = [chunk for _ in range(repeats) for chunk in chunks]
    # the next batches' pages are prepared by worker threads while this one runs (bounded: 2 batches ahead)
    with Prefetcher(run.session.prepare_for_batch, batches, workers=workers, depth=2) as prefetcher:
        for i, ready in enumerate(prefetcher):
            repeat, chunk = i // len(chunks), ready.pages
            if stop():
                return
            try:
                prepared = ready.prepared()
                record = run.session.run_batch(chunk, cap, repeat, prepared, page_wait_ms=ready.wait_s * 1e3)
            except torch.OutOfMemoryError as exc:
                run._release_memory()
                run.notes.append(f"batch of {len(chunk)} (repeat {repeat}) ran out of memory: {exc}")
                continue
            except (LlmPerfOptError, RuntimeError, ValueError, OSError) as exc:
                run.notes.append(f"batch {[p.page_id for p in chunk]} (repeat {repeat}) failed: {exc}")
                continue
            record = attrs.evolve(record, requested_batch=size)
            run.batches.append(record)
            append_jsonl(run.out / "batches.jsonl", record)
            progress.advance(task)


def batch_size_warning(batch_size: int, n_pages: int) -> str:
    """One line for the log, the notes and the batched section: the batch the user asked for did not run."""
    return (
        f"infer.batch_size={batch_size} exceeds the dataset's {n_pages} page(s): batches ran with at most "
        f"{n_pages}; set dataset.num_pages>={batch_size} (synthetic) or add pages"
    )


# Bound on the distinct (crop grid, prompt length) shapes the fast path's warm-up captures graphs for: each costs
# a capture (~0.1-1 s) and graph memory; beyond it the timed pages of the other shapes are flagged and set apart.
MAX_WARM_SHAPES = 32


def warmup(run: Stage1Run, pages: list[Page], progress: Any, stop: StopFlag) -> None:
    """Untimed rounds before the profiler pass and the repeats, so no measured page pays one-time costs."""
    assert run.session is not None
    rounds = run.settings.profiling.warmup_rounds
    if rounds == 0:
        run.notes.append("no warmup rounds: the first timed page includes one-time costs")
        return
    first = representative_page(pages)
    if run.settings.profiling.warmup_synthetic:
        size = first.synthetic_size or (640, 640)
        page = Page(page_id="warmup", synthetic_size=size, seed=12345)
    else:
        page = first
    warm_pages = [page]
    if run.session.fast is not None:
        # The fast path compiles and captures its vision graphs once per view shape: warm every crop count
        # the dataset has, so no timed page pays that one-time cost.
        warm_pages = one_page_per_view_shape(run.session, pages, first=page)
        if len(warm_pages) > MAX_WARM_SHAPES:
            run.notes.append(
                f"warm-up covered {MAX_WARM_SHAPES} of the dataset's {len(warm_pages)} (crop grid, prompt length) "
                "shapes: pages of the others capture their graphs inside a timed prefill (flagged one_time_setup "
                "and left out of the aggregates)"
            )
            warm_pages = warm_pages[:MAX_WARM_SHAPES]
    task = progress.add("warmup", total=rounds * len(warm_pages))
    for _ in range(rounds):
        for p in warm_pages:
            if stop():
                return
            try:
                run.session.run(p, min(run.settings.token_cap, WARMUP_TOKENS), repeat=-1, should_stop=stop)
            except RunInterrupted:
                return
            progress.advance(task)


def one_page_per_view_shape(session: DeepSeekOCRSession, pages: list[Page], first: Page) -> list[Page]:
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


def representative_page(pages: list[Page]) -> Page:
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


def profile_pass(run: Stage1Run, pages: list[Page], progress: Any) -> None:
    """One page under the torch profiler (operators.md, trace), separate from the timed repeats."""
    from llm_perf_opt.profiling.torch_profiler import run_profiler_pass

    assert run.session is not None
    session = run.session
    settings = run.settings
    rep_tokens = settings.profiler_tokens
    task = progress.add("profiler pass", total=1)
    page = representative_page(pages)
    export_trace = trace_fits(settings.output.export_trace, run.out, run.unavailable)
    try:
        summary, result = run_profiler_pass(
            lambda: session.run(page, rep_tokens, repeat=-1),
            session.device,
            attrs.asdict(settings.profiling),  # profiling/ may not import runners: it reads a mapping
            run.out,
            page.page_id,
            rep_tokens,
            settings.output.top_k_operators,
            export_trace,
        )
    except (LlmPerfOptError, RuntimeError, OSError) as exc:
        remove_partial_trace(run.out)
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
