"""One page's measurements -> its :class:`PageRecord`, with the numeric guards that keep rates honest.

Kept apart from the session so the rules (what a flag means, when TPOT is absent) read in one place:
``nonfinite_logits`` (NaN/Inf in the logits), ``single_token`` (no decode step to time), ``nonpositive_timing``
(a clock that saw nothing: rates left out), ``one_time_setup`` (the fast path compiled or captured inside the
page run).
"""

from __future__ import annotations

from typing import Any

import attrs

from llm_perf_opt.data.datasets import Page
from llm_perf_opt.profiling.noise import repetition_period
from llm_perf_opt.profiling.stats import percentiles
from llm_perf_opt.results.types import PageRecord, Prediction


@attrs.frozen
class PageRun:
    """What one page produced: the timed record, the decoded text, and the inputs FLOPs need."""

    record: PageRecord
    prediction: Prediction
    prepared: Any  # the PreparedPage (inputs of the static-compute pass)
    host_window_s: tuple[float, float]  # perf_counter at page start / after the final sync (energy window)
    tokens_per_expert: dict[int, list[int]] | None = None


@attrs.frozen
class PageMeasurements:
    """Raw figures of one page, as the session measured them (times in ms, memory in bytes)."""

    preprocess_ms: float
    prefill_ms: float
    vision_ms: float
    stage_ms: dict[str, float]  # sam / clip / projector from the hooks
    decode_step_ms: list[float]
    generated: list[int]
    max_new_tokens: int
    stopped_by_eos: bool
    nonfinite: bool
    one_time_setup: bool
    peak_mem_allocated_bytes: int | None
    peak_mem_reserved_bytes: int | None
    peak_rss_bytes: int
    kv_cache_bytes: int
    energy_j: float | None
    experts_hit_per_layer: list[int] | None
    vision_views: list[tuple[int, int, int]]
    simulated_eos: bool = False  # ended at the page's target length (dummy weights), see DeepSeekOCRSession


def build_page_record(page: Page, repeat: int, prepared: Any, m: PageMeasurements) -> PageRecord:
    """The record of one finished page; a rate is absent (None), never a division by zero, when it cannot be had."""
    steps = m.decode_step_ms
    decode_ms = sum(steps)
    n_tok = len(m.generated)
    flags: list[str] = []
    if m.nonfinite:
        flags.append("nonfinite_logits: NaN/Inf in the logits; tokens after that point are not meaningful")
    tpot = decode_ms / (n_tok - 1) if n_tok >= 2 and decode_ms > 0 else None
    if n_tok < 2:
        flags.append("single_token: eos right after prefill, no decode step to time (TPOT not available)")
    if m.prefill_ms <= 0 or any(s <= 0 for s in steps):
        flags.append("nonpositive_timing: a stage measured <= 0 ms (clock resolution?); rates left out")
        tpot = None if decode_ms <= 0 else tpot
    if m.one_time_setup:
        flags.append(
            "one_time_setup: the fast path captured graphs (a new view shape or prompt length) or compiled a "
            "kernel variant met for the first time inside this page's run; its times are not steady-state"
        )
    pct = percentiles(steps) if steps else None
    grid = tuple(int(v) for v in prepared.images_spatial_crop)
    return PageRecord(
        page_id=page.page_id,
        repeat=repeat,
        status="ok",
        path=str(page.path) if page.path else None,
        size_px=(int(prepared.page_size[0]), int(prepared.page_size[1])),
        crop_grid=(grid[0], grid[1]),
        n_tiles=int(prepared.n_crops),
        prompt_tokens=int(prepared.prompt_len),
        image_tokens=int(prepared.image_token_count),
        generated_tokens=n_tok,
        hit_token_cap=n_tok >= m.max_new_tokens,
        stopped_by_eos=m.stopped_by_eos,
        repetition_period=repetition_period(m.generated),
        simulated_eos=m.simulated_eos,
        preprocess_ms=m.preprocess_ms,
        sam_ms=m.stage_ms.get("sam"),
        clip_ms=m.stage_ms.get("clip"),
        projector_ms=m.stage_ms.get("projector"),
        vision_ms=m.vision_ms,
        prefill_ms=m.prefill_ms,
        decode_ms=decode_ms if steps else None,
        e2e_ms=m.preprocess_ms + m.prefill_ms + decode_ms,
        tpot_ms=tpot,
        decode_tok_s=(1000.0 / tpot) if tpot else None,
        decode_step_p50_ms=pct[0] if pct else None,
        decode_step_p90_ms=pct[1] if pct else None,
        decode_step_p99_ms=pct[2] if pct else None,
        decode_step_ms=steps,
        peak_mem_allocated_bytes=m.peak_mem_allocated_bytes,
        peak_mem_reserved_bytes=m.peak_mem_reserved_bytes,
        peak_rss_bytes=m.peak_rss_bytes,
        kv_cache_bytes=m.kv_cache_bytes,
        energy_j=m.energy_j,
        energy_per_token_j=m.energy_j / n_tok if m.energy_j is not None and n_tok else None,
        experts_hit_per_layer=m.experts_hit_per_layer,
        vision_views=m.vision_views,
        flags=flags,
    )


SETUP_FLAG = "one_time_setup"


def split_setup_runs(records: list[PageRecord]) -> tuple[list[PageRecord], list[PageRecord]]:
    """(steady-state runs, runs flagged ``one_time_setup``): a page during which the fast path captured graphs or
    compiled a kernel variant measured the setup, not the model, so its times stay in the per-page table but never in
    the aggregates."""
    setup = [r for r in records if any(f.startswith(SETUP_FLAG) for f in r.flags)]
    steady = [r for r in records if not any(f.startswith(SETUP_FLAG) for f in r.flags)]
    return steady, setup


def setup_runs_note(setup: list[PageRecord]) -> list[str]:
    """The note that says which page runs the aggregates leave out, and why (empty when none)."""
    if not setup:
        return []
    which = ", ".join(f"{r.page_id} (repeat {r.repeat})" for r in setup)
    return [
        f"{len(setup)} page run(s) flagged {SETUP_FLAG} left out of the aggregates (their prefill includes "
        f"graph capture/compilation; see the per-page table): {which}"
    ]
