"""The phases of a run after the model is loaded: warmup, the single profiler pass, batched throughput.

Each phase takes the run state and the stop flag, records what it measured (or why it could not) in the run,
and returns; the order and the timed repeats between them are ``stage1.run_stage1``'s.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import torch

from llm_perf_opt.data.datasets import Page
from llm_perf_opt.errors import LlmPerfOptError, RunInterrupted
from llm_perf_opt.profiling.efficiency import batched_decode_traffic
from llm_perf_opt.results.serialize import append_jsonl
from llm_perf_opt.results.types import (
    BatchedPhase,
    BatchRecord,
    DecodeTraffic,
    ProfileSummary,
    Unavailable,
    experts_read_of,
)
from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession, PageRun
from llm_perf_opt.runners.prefetch import Prefetcher
from llm_perf_opt.runners.run_state import Stage1Run
from llm_perf_opt.runners.rundir import remove_partial_trace, trace_fits
from llm_perf_opt.runners.signals import StopFlag

log = logging.getLogger(__name__)

# Tokens decoded by an untimed warm-up page or batch (enough to run every decode code path once).
WARMUP_TOKENS = 8


def throughput_phase(run: Stage1Run, pages: list[Page], progress: Any, stop: StopFlag) -> None:
    """The batched phase: ``repeats`` rounds over the pages, ``infer.batch_size`` sequences per forward, pages
    prepared by the prefetcher's workers while the GPU runs (a page that fails to prepare is left out with a
    note, it does not fail a batch); one untimed warm batch first.  ``infer.batching`` picks static batches or
    continuously refilled slots; either way one :class:`BatchedPhase` sums the phase up end to end."""
    assert run.session is not None
    session = run.session
    cap, repeats = run.settings.token_cap, run.settings.repeats
    size = run.settings.infer.batch_size
    mode = run.settings.infer.batching
    if size > len(pages):
        warning = batch_size_warning(size, len(pages))
        log.warning("%s", warning)
        run.notes.append(warning)
    warm = warm_pages(session, pages, size, run.notes)
    if not warm:
        run.unavailable.append(Unavailable("batched_throughput", "no page could be prepared for batching"))
        return
    try:
        session.warm_batched_vision([x for _, x in warm])
    except (LlmPerfOptError, RuntimeError, ValueError) as exc:  # the phase still runs; its compiles are then timed
        run.notes.append(
            f"batched phase: the vision chunk shapes were not warmed ({type(exc).__name__}: {exc}); a shape first"
            " met inside the timed run is compiled / captured there, so its first use is slower"
        )
    try:
        if mode == "continuous":
            session.run_continuous(warm, min(cap, WARMUP_TOKENS), repeat=-1, slots=size)
        else:
            session.run_batch([p for p, _ in warm], min(cap, WARMUP_TOKENS), -1, [x for _, x in warm], 0.0)
    except (LlmPerfOptError, RuntimeError, ValueError, OSError) as exc:
        run.unavailable.append(Unavailable("batched_throughput", f"warm-up batch failed: {exc}"))
        return
    per_repeat = 1 if mode == "continuous" else -(-len(pages) // size)
    task = progress.add("batched throughput", total=per_repeat * repeats)
    stream = [[p] for _ in range(repeats) for p in pages]
    phase_t0 = time.perf_counter()
    # pages are prepared by worker threads in page order, 2 batches ahead (bounded memory), while batches run
    with Prefetcher(session.prepare_for_batch, stream, workers=run.settings.infer.preprocess_workers,
                    depth=2 * size) as prefetcher:  # fmt: skip
        prepared = PreparedPages(iter(prefetcher), run.notes, stop)
        for repeat in range(repeats):
            if stop():
                break
            prepared.limit(len(pages))  # this repeat's pages only
            if mode == "continuous":
                _record(run, repeat, size, functools.partial(session.run_continuous, prepared, cap, repeat, size))
                progress.advance(task)
                continue
            while not prepared.ended and not stop():
                t0 = prepared.wait_s
                chunk = list(itertools.islice(prepared, size))
                if not chunk:
                    break
                wait_ms = (prepared.wait_s - t0) * 1e3
                batch = functools.partial(
                    session.run_batch, [p for p, _ in chunk], cap, repeat, [x for _, x in chunk], page_wait_ms=wait_ms
                )
                _record(run, repeat, size, batch)
                progress.advance(task)
    wall_s = time.perf_counter() - phase_t0
    if run.batches:
        dtype_bytes = session.dtype.itemsize
        traffic = batched_decode_traffic(session.backend.config, run.batches, dtype_bytes, run.hardware)
        run.batched_phase = batched_phase_summary(run.batches, wall_s, session.device.type, traffic)


def _record(run: Stage1Run, repeat: int, size: int, batch: Callable[[], BatchRecord]) -> None:
    """Run one batch (or one continuous run); keep its record, or note why it failed and go on."""
    try:
        record = batch()
    except torch.OutOfMemoryError as exc:
        run._release_memory()
        run.notes.append(f"batched phase (repeat {repeat}) ran out of memory: {exc}")
        return
    except (LlmPerfOptError, RuntimeError, ValueError, OSError) as exc:
        run.notes.append(f"batched phase (repeat {repeat}) failed: {exc}")
        return
    record = attrs.evolve(record, requested_batch=size)
    run.batches.append(record)
    append_jsonl(run.out / "batches.jsonl", record)


class PreparedPages:
    """(page, prepared page) pairs from the prefetcher, ``limit`` at a time; a page whose preparation failed is
    left out with one note per page; ``wait_s`` adds up the host time blocked on the prefetcher."""

    def __init__(self, ready: Iterator[Any], notes: list[str], stop: StopFlag) -> None:
        self.ready = ready
        self.notes = notes
        self.stop = stop
        self.wait_s = 0.0
        self.left = 0
        self.ended = True
        self.noted: set[str] = set()

    def limit(self, n: int) -> None:
        self.left = n
        self.ended = n <= 0

    def __iter__(self) -> PreparedPages:
        return self

    def __next__(self) -> tuple[Page, Any]:
        while self.left > 0 and not self.stop():
            self.left -= 1
            t0 = time.perf_counter()
            item = next(self.ready)
            try:
                (prepared,) = item.prepared()
            except (LlmPerfOptError, OSError, ValueError) as exc:
                page = item.pages[0]
                if page.page_id not in self.noted:
                    self.noted.add(page.page_id)
                    self.notes.append(f"batched throughput: page {page.page_id} left out ({exc})")
                continue
            finally:
                self.wait_s += time.perf_counter() - t0
            return item.pages[0], prepared
        self.ended = True
        raise StopIteration


def warm_pages(session: DeepSeekOCRSession, pages: list[Page], size: int, notes: list[str]) -> list[tuple[Page, Any]]:
    """Up to ``size`` pages prepared in this thread for the untimed warm batch (pages that fail are skipped here
    and noted when the timed phase meets them)."""
    out: list[tuple[Page, Any]] = []
    for page in pages:
        if len(out) >= size:
            break
        try:
            out.append((page, session.prepare_for_batch(page)))
        except (LlmPerfOptError, OSError, ValueError):
            continue
    return out


def batched_phase_summary(
    batches: list[BatchRecord],
    wall_s: float,
    device_type: str,
    traffic: DecodeTraffic | Unavailable | None = None,
) -> BatchedPhase:
    """The phase end to end from its records and its host wall time (one-time graph captures taken out), with the
    decode steps' traffic (``efficiency.batched_decode_traffic``) where it was computed."""
    wall_ms = max(wall_s * 1e3 - sum(b.graph_capture_ms for b in batches), 0.0)
    stage_ms = sum(b.prefill_ms + b.decode_ms for b in batches)  # prefill_ms includes vision
    wait_ms = sum(b.page_wait_ms or 0.0 for b in batches)
    pages = sum(len(b.page_ids) for b in batches)
    tokens = sum(b.output_tokens for b in batches)
    timed = [b for b in batches if b.decode_steps is not None]  # records written before steps were counted: out
    slot_steps = sum(b.decode_steps * b.batch for b in timed if b.decode_steps is not None)
    decode_tokens = sum(b.output_tokens - len(b.page_ids) for b in timed)  # each sequence's first token: prefill
    occupancy = decode_tokens / slot_steps if slot_steps > 0 else None
    row_steps = _total([b.row_steps for b in timed])
    gpu = device_type == "cuda"
    # the drain only when every record has one (continuous runs of this version): the steady window is then known
    drains = [(b.drain_ms, b.drain_tokens) for b in batches]
    known = [(ms, n) for ms, n in drains if ms is not None and n is not None]
    drain_ms = sum(ms for ms, _ in known) if len(known) == len(drains) else None
    steady_ms = wall_ms - drain_ms if drain_ms is not None else 0.0
    steady_tokens = tokens - sum(n for _, n in known)
    # imported here, as dsocr_session does: the module loads the model code, which this summary needs for one rule
    from llm_perf_opt.models.deepseek_ocr.continuous import drain_is_whole_run

    # no steady state where every decode step was in the drain (each run's pages all started decoding at its first
    # decode step, e.g. no more pages than slots): wall minus drain is then the fill's vision and prefill alone (its
    # tokens are the pages' first); a run with no decode step at all has no drain to leave out and keeps its rates
    steady_unavailable = None
    if drain_ms is not None and all(
        b.drain_steps is not None and b.decode_steps is not None and drain_is_whole_run(b.drain_steps, b.decode_steps)
        for b in batches
    ):
        steady_ms = 0.0
        runs = "each of the runs" if len(batches) > 1 else "the run"
        steady_unavailable = (
            f"every decode step was in the drain: in {runs}, every page started decoding at the first decode step"
            f" ({max(len(b.page_ids) for b in batches)} pages, {max(b.batch for b in batches)} slots), so there is"
            " no steady state to measure (run more pages than slots for one)"
        )
    read = experts_read_of(batches)
    return BatchedPhase(
        batching=batches[0].batching,
        slots=max(b.batch for b in batches),
        batches=len(batches),
        pages=pages,
        output_tokens=tokens,
        wall_ms=wall_ms,
        stage_ms=stage_ms,
        page_wait_ms=wait_ms,
        other_ms=wall_ms - stage_ms - wait_ms,
        pages_per_s=1e3 * pages / wall_ms if wall_ms > 0 else None,
        output_tok_s=1e3 * tokens / wall_ms if wall_ms > 0 else None,
        slot_occupancy=occupancy,
        drain_ms=drain_ms,
        steady_pages_per_s=1e3 * pages / steady_ms if steady_ms > 0 else None,
        steady_output_tok_s=1e3 * steady_tokens / steady_ms if steady_ms > 0 else None,
        steady_unavailable=steady_unavailable,
        drain_steps=_total([b.drain_steps for b in batches]),
        narrowed_steps=_total([b.narrowed_steps for b in batches]),
        row_occupancy=decode_tokens / row_steps if row_steps else None,
        routed_experts_read=None if read is None else read.mean,
        decode_traffic=traffic if isinstance(traffic, DecodeTraffic) else None,
        decode_traffic_unavailable=traffic.reason if isinstance(traffic, Unavailable) else None,
        gpu_busy_share=stage_ms / wall_ms if gpu and wall_ms > 0 else None,
        gpu_busy_unavailable=None
        if gpu
        else f"no GPU ({device_type}): the stages run on the host, so their time is wall time and a busy share "
        "would say nothing",
    )


def _total(counts: list[int | None]) -> int | None:
    """The sum when every record has the count; None when one lacks it (records written before it was kept)."""
    known = [n for n in counts if n is not None]
    return sum(known) if len(known) == len(counts) else None


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
    run.profile = _with_range_checks(summary, result)


def _with_range_checks(summary: ProfileSummary, result: PageRun) -> ProfileSummary:
    """On CUDA, compare the pass's own CUDA-event stage times with the ranges' spans on the trace's GPU timeline
    (computed by the pass from the events it had in memory: no trace file needed, none re-read)."""
    import attrs

    from llm_perf_opt.results.types import RangeCheck

    if summary.sort_key != "self_device_ms":
        return summary
    spans = summary.range_device_ms
    rec = result.record
    events = {
        "prefill": rec.prefill_ms,
        "decode": rec.decode_ms,
        "sam": rec.sam_ms,
        "clip": rec.clip_ms,
        "projector": rec.projector_ms,
    }
    checks = [
        RangeCheck(name, ev, spans[name], summary.range_busy_ms.get(name, 0.0), ev / spans[name] - 1.0)
        for name, ev in events.items()
        if ev is not None and spans.get(name, 0.0) > 0
    ]
    return attrs.evolve(summary, range_checks=checks)
