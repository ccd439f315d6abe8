"""The batched phase's end-to-end summary (``batched_phase_summary``) and its page stream (``PreparedPages``),
checked against hand-computed figures."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from llm_perf_opt.data.datasets import Page
from llm_perf_opt.errors import InputError
from llm_perf_opt.report.markdown import render_report
from llm_perf_opt.results.types import BatchRecord, DecodeTraffic, Unavailable
from llm_perf_opt.runners.phases import PreparedPages, batched_phase_summary
from llm_perf_opt.runners.prefetch import Prefetcher
from tests.unit.builders import make_page, make_summary


def record(pages: int, tokens: int, steps: int, slots: int, stage_ms: tuple[float, float], **kw: Any) -> BatchRecord:
    prefill_ms, decode_ms = stage_ms
    return BatchRecord(
        repeat=0,
        page_ids=[f"p{i}" for i in range(pages)],
        batch=slots,
        padded_prompt_tokens=10,
        output_tokens=tokens,
        vision_ms=prefill_ms / 2,
        prefill_ms=prefill_ms,
        decode_ms=decode_ms,
        pages_per_s=None,
        output_tok_s=None,
        tpot_ms=[],
        decode_steps=steps,
        **kw,
    )


def test_summary_by_hand() -> None:
    # two static batches of 4 slots: 4 pages / 40 tokens / 10 steps and 2 pages / 12 tokens / 5 steps
    batches = [
        record(4, 40, 10, 4, (100.0, 300.0), page_wait_ms=50.0, graph_capture_ms=200.0),
        record(2, 12, 5, 4, (60.0, 140.0), page_wait_ms=10.0),
    ]
    p = batched_phase_summary(batches, wall_s=1.0, device_type="cuda")
    assert p.wall_ms == pytest.approx(800.0)  # 1000 ms less the 200 ms capture
    assert p.stage_ms == pytest.approx(600.0) and p.page_wait_ms == pytest.approx(60.0)
    assert p.other_ms == pytest.approx(140.0)
    assert p.pages == 6 and p.output_tokens == 52
    assert p.pages_per_s == pytest.approx(7.5) and p.output_tok_s == pytest.approx(65.0)
    # decode tokens (tokens - one prefill token per page) over slot-steps: (36 + 10) / (40 + 20)
    assert p.slot_occupancy == pytest.approx(46 / 60)
    assert p.gpu_busy_share == pytest.approx(0.75) and p.gpu_busy_unavailable is None


def test_continuous_drain_and_steady_state_by_hand() -> None:
    """Two continuous runs (two repeats): 8 pages / 80 tokens and 8 / 60; drains 100 ms / 20 tokens and 50 ms / 10
    tokens; wall 1,000 ms.  Steady state: (1000 - 150) ms for 16 pages and 140 - 30 = 110 tokens."""
    batches = [
        record(8, 80, 30, 4, (100.0, 300.0), batching="continuous", drain_steps=5, drain_ms=100.0, drain_tokens=20),
        record(8, 60, 20, 4, (100.0, 200.0), batching="continuous", drain_steps=3, drain_ms=50.0, drain_tokens=10),
    ]
    p = batched_phase_summary(batches, wall_s=1.0, device_type="cpu")
    assert p.drain_ms == pytest.approx(150.0)
    assert p.steady_pages_per_s == pytest.approx(16 / 0.85)
    assert p.steady_output_tok_s == pytest.approx(110 / 0.85)
    assert p.output_tok_s == pytest.approx(140.0)  # the end-to-end rate keeps the drain
    assert p.drain_steps == 8 and p.narrowed_steps is None  # these records never counted narrowed steps
    narrowed = [attrs.evolve(b, narrowed_steps=n) for b, n in zip(batches, (4, 2), strict=True)]
    assert batched_phase_summary(narrowed, wall_s=1.0, device_type="cpu").narrowed_steps == 6
    # rows computed: 30 steps × 4 less 4 narrowed to 2 rows = 112; 20 × 4 less 2 narrowed to 1 row = 74
    rows = [attrs.evolve(b, row_steps=n) for b, n in zip(narrowed, (30 * 4 - 4 * 2, 20 * 4 - 2 * 3), strict=True)]
    p_rows = batched_phase_summary(rows, wall_s=1.0, device_type="cpu")
    assert p_rows.slot_occupancy == pytest.approx((72 + 52) / (30 * 4 + 20 * 4))
    assert p_rows.row_occupancy == pytest.approx((72 + 52) / (112 + 74))
    assert p.row_occupancy is None  # a record without row counts: not guessed
    static = batched_phase_summary([record(4, 40, 10, 4, (100.0, 300.0))], wall_s=1.0, device_type="cpu")
    assert static.drain_ms is None and static.steady_output_tok_s is None and static.steady_pages_per_s is None


def test_one_fill_has_no_steady_state() -> None:
    """A continuous run whose pages all started in the first fill (4 pages in 4 slots): the drain is every one of
    its 10 decode steps, wall minus drain is the fill's vision and prefill alone, so the steady-state rates are
    absent with that reason (round 37's 64 pages in 64 slots read "27.9 tok/s steady" beside 7,230 end to end).
    One refill's worth of steps before the drain (9 of 10 in it) brings the rates back."""
    one_fill = record(4, 40, 10, 4, (100.0, 300.0), batching="continuous", drain_steps=10, drain_ms=300.0,
                      drain_tokens=36)  # fmt: skip
    p = batched_phase_summary([one_fill], wall_s=0.5, device_type="cpu")
    assert p.drain_ms == pytest.approx(300.0) and p.output_tok_s == pytest.approx(80.0)
    assert p.steady_pages_per_s is None and p.steady_output_tok_s is None
    assert p.steady_unavailable == (
        "every decode step was in the drain: in the run, every page started decoding at the first decode step"
        " (4 pages, 4 slots), so there is no steady state to measure (run more pages than slots for one)"
    )
    # two repeats of that run: the pages of one run, not of both, and both runs named
    two = batched_phase_summary([one_fill, attrs.evolve(one_fill, repeat=1)], wall_s=1.0, device_type="cpu")
    assert two.steady_output_tok_s is None and two.steady_unavailable is not None
    assert "in each of the runs, every page started decoding at the first decode step (4 pages, 4 slots)" in (
        two.steady_unavailable
    )
    # no decode step at all (every cap one token): no drain to leave out, so the rates stay (here the end-to-end ones)
    capped = record(4, 4, 0, 4, (100.0, 0.0), batching="continuous", drain_steps=0, drain_ms=0.0, drain_tokens=0)
    c = batched_phase_summary([capped], wall_s=0.5, device_type="cpu")
    assert c.steady_unavailable is None and c.steady_output_tok_s == pytest.approx(8.0)  # 4 tokens / 0.5 s
    summary = attrs.evolve(make_summary(pages=[make_page("p0")]), batches=[one_fill], batched_phase=p)
    md = render_report(summary)
    assert f"|   steady state, drain left out: output tok/s | n/a ({p.steady_unavailable}) |" in md
    assert "the steady-state token rate is below" not in md
    refilled = attrs.evolve(one_fill, drain_steps=9)
    q = batched_phase_summary([refilled], wall_s=0.5, device_type="cpu")
    assert q.steady_unavailable is None
    assert q.steady_output_tok_s == pytest.approx((40 - 36) / 0.2)  # 4 tokens outside the drain in 200 ms


def test_summary_on_cpu_has_no_busy_share() -> None:
    p = batched_phase_summary([record(1, 5, 4, 1, (1.0, 2.0))], wall_s=0.01, device_type="cpu")
    assert p.gpu_busy_share is None and p.gpu_busy_unavailable and "no GPU" in p.gpu_busy_unavailable
    assert p.slot_occupancy == pytest.approx(1.0)


def test_summary_without_step_counts_has_no_occupancy() -> None:
    old = BatchRecord(0, ["a"], 1, 3, 2, 1.0, 2.0, 3.0, None, None, [])
    assert batched_phase_summary([old], 0.01, "cpu").slot_occupancy is None


def test_report_section_renders_the_summary() -> None:
    batches = [record(4, 40, 10, 4, (100.0, 300.0), page_wait_ms=50.0, batching="continuous", fills=3)]
    phase = batched_phase_summary(batches, wall_s=0.5, device_type="cpu")
    summary = attrs.evolve(make_summary(pages=[make_page("p0")]), batches=batches, batched_phase=phase)
    md = render_report(summary)
    assert "### The batched phase end to end" in md
    assert "Continuous batching: 1 run(s) (one per repeat) through 4 sequence slots" in md
    assert "| **pages per second, end to end** | 8.00 |" in md  # 4 pages / 0.5 s
    assert "| slot occupancy (share of slots producing a token per decode step) | 90.00 % |" in md  # 36 / 40
    assert "drain" not in md.split("### The batched phase end to end")[1]  # no drain recorded: no drain rows
    # a continuous run's fills are summed: labelled as such, never as a time to first token
    assert "| vision + prefill of all fills of a run (the first fill and every refill) | ms |" in md
    assert "TTFT of the batch" not in md
    static = [attrs.evolve(batches[0], batching="static")]
    static_md = render_report(attrs.evolve(summary, batches=static, batched_phase=None))
    assert "| TTFT of the batch (vision + prefill) | ms |" in static_md
    assert "all fills of a run" not in static_md
    row = "|   row occupancy (share of the rows the decode steps computed that produced a token; a narrowed step "
    assert f"{row}counts its own width) | n/a (rows per step not recorded) |" in md
    drained = [attrs.evolve(batches[0], drain_steps=2, drain_ms=100.0, drain_tokens=8, narrowed_steps=1,
                            row_steps=10 * 4 - 1 * 2)]  # fmt: skip
    phase = batched_phase_summary(drained, wall_s=0.5, device_type="cpu")
    md = render_report(attrs.evolve(summary, batches=drained, batched_phase=phase))
    drain_row = "|   drain (slots emptying after the last page started decoding) | 100.0 ms (20.00 %);"
    assert f"{drain_row} 2 decode steps, 1 of them on a narrower batch |" in md
    assert "|   steady state, drain left out: pages/s | 10.00 |" in md  # 4 pages / 0.4 s
    assert "|   steady state, drain left out: output tok/s | 80.0 |" in md  # (40 - 8) tokens / 0.4 s
    assert "n/a (no GPU (cpu)" in md
    assert f"{row}counts its own width) | 94.74 % |" in md  # 36 decode tokens / 38 rows
    assert "the steady-state token rate is below the end-to-end one" not in md
    # steady (40 - 8) / 0.4 s = 80.0 tok/s equals 40 / 0.5 s = 80.0 end to end: not below, no sentence.
    fast_drain = [attrs.evolve(drained[0], drain_tokens=20)]  # half the tokens in a fifth of the time
    phase = batched_phase_summary(fast_drain, wall_s=0.5, device_type="cpu")
    assert phase.steady_output_tok_s == pytest.approx(50.0) and phase.output_tok_s == pytest.approx(80.0)
    md = render_report(attrs.evolve(summary, batches=fast_drain, batched_phase=phase))
    assert "Here the steady-state token rate is below the end-to-end one" in md


def test_report_gives_the_decode_traffic_and_its_bandwidth() -> None:
    """2.5 GB (2.0 GB of weights, 0.5 GB of K/V) in 300 ms of decode steps: 8.33 GB/s, 41.67 % of a 20 GB/s peak;
    a lower bound reads "≥"; no peak: the rate stays, the MBU says why; no figure: the reason."""
    batches = [record(4, 40, 10, 4, (100.0, 300.0))]
    traffic = DecodeTraffic(2_500_000_000, 0.3, 2.5e9 / 0.3, 2.5e9 / 0.3 / 20e9, False, "counted in every step",
                            2_000_000_000, 500_000_000)  # fmt: skip
    phase = batched_phase_summary(batches, wall_s=0.5, device_type="cuda", traffic=traffic)
    summary = attrs.evolve(make_summary(pages=[make_page("p0")]), batches=batches, batched_phase=phase)
    md = render_report(summary)
    label = "| decode traffic (the minimum: weights once per step with the routed experts the steps read, each "
    value = "2.50 GB (weights 2.00 GB, K/V 500.00 MB) in 300.0 ms"
    assert f"{label}computed row's K/V); counted in every step | {value}" in md
    assert "|   decode bandwidth achieved (traffic ÷ decode time) / MBU | 8.33 GB/s / 41.67 % |" in md
    low = attrs.evolve(traffic, lower_bound=True, mbu=None, mbu_unavailable="no bw for CPUs")
    md = render_report(attrs.evolve(summary, batched_phase=attrs.evolve(phase, decode_traffic=low)))
    assert "| ≥ 2.50 GB (weights" in md and "| ≥ 8.33 GB/s / n/a (no bw for CPUs) |" in md
    why = batched_phase_summary(batches, 0.5, "cuda", Unavailable("batched.decode_traffic", "records too old"))
    assert why.decode_traffic is None and why.decode_gb_per_s is None
    md = render_report(attrs.evolve(summary, batched_phase=why))
    assert "| decode traffic (weights once per step, each computed row's K/V) | n/a (records too old) |" in md
    assert phase.decode_gb_per_s == pytest.approx(2.5 / 0.3)
    old = attrs.evolve(phase, decode_traffic=None, decode_traffic_unavailable=None)  # a metrics.json of schema 1.7
    md = render_report(attrs.evolve(summary, batched_phase=old))
    assert "K/V) | n/a (not computed: written before schema 1.8) |" in md


def test_report_says_why_the_decode_step_ran_ungraphed() -> None:
    """A failed CUDA-graph capture is named in the decode-path line (its decode times carry the launch overhead a
    graph removes); a run whose capture worked says nothing of the kind."""
    ok = record(4, 40, 10, 4, (100.0, 300.0), decode_path="graph", graph_capture_ms=12.0)
    summary = attrs.evolve(make_summary(pages=[make_page("p0")]), batches=[ok])
    assert "capture failed" not in render_report(summary)
    error = "AcceleratorError: CUDA error: operation failed due to a previous error during capture"
    failed = attrs.evolve(ok, decode_path="static", graph_capture_error=error)
    md = render_report(attrs.evolve(summary, batches=[ok, failed]))
    assert f"The decode step's CUDA-graph capture failed ({error}), so the step ran un-graphed" in md
    assert "Decode path: graph (CUDA-graph step" in md and "; static (static step, un-graphed)." in md


def test_report_counts_the_graphs_its_captures_made() -> None:
    """Two continuous repeats, the first capturing 37 graphs in 14,000 ms, the second none: the line names the
    graphs, the runs and their ms (not the number of records, which read "1" for 37 graphs before round 29); a
    record written before graphs were counted drops the count, not the ms."""
    first = record(8, 80, 30, 4, (100.0, 300.0), decode_path="graph", graph_capture_ms=14_000.0, graph_captures=37)
    second = attrs.evolve(first, repeat=1, graph_capture_ms=0.0, graph_captures=0)
    summary = attrs.evolve(make_summary(pages=[make_page("p0")]), batches=[first, second])
    md = render_report(summary)
    assert "Graph captures: 37 graph(s) in 1 of 2 run(s), 14,000.0 ms in all, outside the stage times" in md
    old = attrs.evolve(first, graph_captures=None)
    md = render_report(attrs.evolve(summary, batches=[old, second]))
    assert "Graph captures: in 1 of 2 run(s), 14,000.0 ms in all" in md
    failed = attrs.evolve(first, graph_captures=0, decode_path="static", graph_capture_error="RuntimeError: x")
    md = render_report(attrs.evolve(summary, batches=[failed]))  # a capture that failed: its ms, no count of 0
    assert "Graph captures: in 1 of 1 run(s), 14,000.0 ms in all" in md


def _prepare(page: Page) -> str:
    if page.page_id == "bad":
        raise InputError("cannot decode")
    return f"prepared-{page.page_id}"


def test_prepared_pages_skip_failures_and_stop_at_each_limit() -> None:
    ids = ["a", "bad", "b", "c"]
    stream = [[Page(page_id=i, synthetic_size=(16, 16))] for _ in range(2) for i in ids]
    notes: list[str] = []
    with Prefetcher(_prepare, stream, workers=2, depth=3) as pf:
        pages = PreparedPages(iter(pf), notes, lambda: False)
        for _ in range(2):  # two repeats, 4 pages each (one bad)
            pages.limit(len(ids))
            got = [(p.page_id, x) for p, x in pages]
            assert got == [("a", "prepared-a"), ("b", "prepared-b"), ("c", "prepared-c")]
            assert pages.ended
    assert notes == ["batched throughput: page bad left out (cannot decode)"]  # once, not per repeat
    assert pages.wait_s >= 0


def test_batched_section_says_dummy_routing_flatters_the_rates() -> None:
    """Dummy weights repeat one token per sequence, so a batched step's rows share a few experts: the section says
    its rates flatter real pages; with a checkpoint's weights it does not."""
    import attrs

    from llm_perf_opt.report.batched import render_batches
    from tests.unit.builders import make_summary

    dummy = make_summary()
    assert dummy.model.weights == "dummy"
    dummy = attrs.evolve(dummy, batches=[record(4, 40, 10, 4, (20.0, 50.0))])
    real = attrs.evolve(dummy, model=attrs.evolve(dummy.model, weights="models/deepseek-ocr"))
    sentence = "these batched rates flatter real pages (`benchmarks/bench_batched.py --spread-routing`"
    assert sentence in render_batches(dummy)
    assert "Dummy weights" not in render_batches(real)


def test_report_names_setups_inside_timed_batched_runs() -> None:
    """A compile or capture the warm-up did not cover, inside a timed batched run, is not one-time in the figures: the
    decode-path line counts them per repeat (2 + 1 by hand) and says their time is in the stages; none, no line."""
    clean = record(4, 40, 10, 4, (100.0, 300.0), decode_path="graph", timed_setups=0)
    summary = attrs.evolve(make_summary(pages=[make_page("p0")]), batches=[clean])
    assert "Timed setups" not in render_report(summary)
    setups = [attrs.evolve(clean, repeat=0, timed_setups=2), attrs.evolve(clean, repeat=1, timed_setups=1)]
    md = render_report(attrs.evolve(summary, batches=[*setups, attrs.evolve(clean, repeat=2)]))
    assert "**Timed setups:** 3 one-time setup(s) of the fast path" in md
    assert "(repeat 0: 2, repeat 1: 1): their time is in those runs' stage times" in md


def test_report_gives_the_routed_experts_the_steps_read() -> None:
    """The experts read per MoE layer, weighted by each record's counted steps (by hand: layer 0 (10·30 + 5·20)/15
    = 26.67, layer 1 (10·40 + 5·50)/15 = 43.33, mean 35.0 of 64 = 54.7 %), over the counted of all decode steps
    (15 of 18: a third record ran no grouped step); without any count, the section says why there is none."""
    counted = [
        record(4, 40, 10, 16, (20.0, 50.0), routed_experts_read=[30.0, 40.0], grouped_steps=10, routed_experts=64),
        record(4, 40, 5, 16, (20.0, 50.0), routed_experts_read=[20.0, 50.0], grouped_steps=5, routed_experts=64),
        record(2, 6, 3, 4, (20.0, 50.0)),
    ]
    summary = attrs.evolve(make_summary(pages=[make_page("p0")]), batches=counted)
    md = render_report(summary)
    assert (
        "Routed experts read per decode step (counted on the device by the expert kernels over 15 of 18 decode steps):"
        " a mean of 35.0 of 64 (54.7 % of the routed expert weights a step could read) per MoE layer,"
        " 26.7–43.3 across layers." in md
    )
    # the phase's one figure (compare's row): the same weighted mean over layers, (26.67 + 43.33) / 2 = 35.0
    phase = batched_phase_summary(counted, 1.0, "cuda")
    assert phase.routed_experts_read == pytest.approx(35.0)
    assert batched_phase_summary(counted[2:], 1.0, "cuda").routed_experts_read is None
    none = render_report(attrs.evolve(summary, batches=[counted[2]]))
    assert "Routed experts read per decode step: not counted (only the Triton decode step's expert kernels" in none


def test_report_says_what_a_static_batchs_finished_rows_read() -> None:
    """``finished_rows_attend``: the static "how" sentence says a finished sequence reads its newest key only (the
    default), or that every / some batch read whole contexts to its end; older records (None) add nothing."""
    summary = make_summary(pages=[make_page("p0")])
    skipped = record(4, 40, 10, 4, (100.0, 300.0), batching="static", finished_rows_attend=False)
    whole = attrs.evolve(skipped, finished_rows_attend=True)
    old = attrs.evolve(skipped, finished_rows_attend=None)
    newest = "until its longest sequence ends; a finished sequence's attention sees its newest key only and no row sees"
    read = "batch a finished sequence's attention saw its whole context until the batch ended (the host loop, or "
    cases = [([skipped], newest), ([whole, whole], f"in every {read}"), ([skipped, whole], f"in some {read}")]
    for batches, want in cases:
        md = render_report(attrs.evolve(summary, batches=batches))
        assert want in md, want
    md = render_report(attrs.evolve(summary, batches=[old]))
    assert "until its longest sequence ends. Statistics are over batches" in md


def test_report_says_what_a_continuous_runs_ended_rows_saw() -> None:
    """A continuous run's "how" sentence: a sequence ended by eos keeps its slot until the next read of the done
    flags, seeing its newest key only (``finished_rows_attend`` False, the default) or its whole context (every /
    some run); records without the field add nothing."""
    summary = make_summary(pages=[make_page("p0")])
    skipped = record(4, 40, 10, 4, (100.0, 300.0), batching="continuous", finished_rows_attend=False)
    whole = attrs.evolve(skipped, finished_rows_attend=True)
    old = attrs.evolve(skipped, finished_rows_attend=None)
    wait = "mixed lengths; a sequence ended by eos keeps its slot until the host next reads the done flags, "
    cases = [
        ([skipped], f"{wait}its attention seeing its newest key only (the Triton row attention reads no other key"),
        ([whole, whole], f"{wait}in every run its attention seeing its whole context (infer.continuous_skip_keys"),
        ([skipped, whole], f"{wait}in some run its attention seeing its whole context"),
    ]
    for batches, want in cases:
        md = render_report(attrs.evolve(summary, batches=batches))
        assert want in md, want
    md = render_report(attrs.evolve(summary, batches=[old]))
    assert "so the batch stays full with mixed lengths. Statistics are over runs" in md
