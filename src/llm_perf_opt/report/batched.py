"""The batched-throughput sections of report.md: per-batch records, the phase end to end (pages/s and tok/s with
preprocessing, slot occupancy, GPU busy share, page waits) and which decode path ran."""

from __future__ import annotations

from llm_perf_opt.report.format import (
    NA,
    STAT_HEADER,
    fmt,
    fmt_bytes_dec,
    fmt_pct,
    fmt_rate_bytes,
    na,
    stat_row,
    table,
)
from llm_perf_opt.results.types import BatchedPhase, RunSummary


def render_batches(s: RunSummary) -> str:
    size = max(b.batch for b in s.batches)
    agg = s.batch_aggregates
    old = na("record written before preprocessing was timed")
    rows = [
        stat_row("pages per second, model only (excl. host preprocessing)", agg.get("pages_per_s"), "pages/s"),
        stat_row("pages per second, end to end (incl. host preprocessing)",
                  agg.get("pages_per_s_with_preprocess"), "pages/s", reason=old),
        stat_row("output tokens per second, model only (excl. host preprocessing)", agg.get("output_tok_s"), "tok/s"),
        stat_row("output tokens per second, end to end (incl. host preprocessing)",
                  agg.get("output_tok_s_with_preprocess"), "tok/s", reason=old),
        stat_row("per page end to end (batch preprocess + prefill + decode ÷ pages)",
                  agg.get("e2e_per_page_ms"), "ms", reason=old),
        stat_row("host preprocessing the batch waited for (all of it when serial)", agg.get("preprocess_ms"), "ms",
                  reason=old),
    ]  # fmt: skip
    continuous = any(b.batching == "continuous" for b in s.batches)
    # a continuous run's fills add up to no one's time to first token: labelled as the sum they are
    prefill_label, unit = (
        ("vision + prefill of all fills of a run (the first fill and every refill)", "run")
        if continuous
        else ("TTFT of the batch (vision + prefill)", "batch")
    )
    rows += [
        stat_row(prefill_label, agg.get("prefill_ms"), "ms"),
        stat_row(
            "  vision that held the slots up (fills, and enqueueing the vision run ahead: all of it on CPU)"
            if "pages_ahead" in agg
            else f"  vision (all pages of the {unit})",
            agg.get("vision_ms"),
            "ms",
        ),
        stat_row("TPOT per sequence", agg.get("tpot_ms"), "ms/token",
                 reason="no decode step: every sequence ended at its first token"),
    ]  # fmt: skip
    header = STAT_HEADER
    rows.append(stat_row("slot occupancy (share of slots producing a token per decode step)",
                          agg.get("slot_occupancy"), "fraction", reason="no decode step"))  # fmt: skip
    if continuous:
        rows.append(stat_row("refills per run (prefill rounds after the first fill)", agg.get("refills"), "fills",
                              digits=1, reason="no continuous run"))  # fmt: skip
        if "pages_ahead" in agg:  # infer.refill_vision_ahead: what held the slots up is in the vision row
            rows.append(stat_row("  pages whose vision ran ahead of their refill (infer.refill_vision_ahead)",
                                  agg.get("pages_ahead"), "pages", digits=1))  # fmt: skip
            rows.append(stat_row("  their vision's own time (on CUDA a second stream, beside the decode steps)",
                                  agg.get("vision_ahead_ms"), "ms"))  # fmt: skip
        if "pages_prefilled_ahead" in agg:  # infer.refill_prefill_ahead: what held the slots up is in the fills' row
            rows.append(stat_row("  pages whose LM prefill ran ahead of their refill (infer.refill_prefill_ahead)",
                                  agg.get("pages_prefilled_ahead"), "pages", digits=1))  # fmt: skip
            rows.append(stat_row("  their LM prefill's own time (on CUDA the second stream, beside the decode steps)",
                                  agg.get("prefill_ahead_ms"), "ms"))  # fmt: skip
        if "pages_prefilled_per_page" in agg:  # infer.refill_prefill=per_page: their time is in the fills' row
            rows.append(stat_row("  refill pages prefilled page by page (infer.refill_prefill=per_page, or auto on "
                                  "the fast path on CUDA; graph replays there, captures left out)",
                                  agg.get("pages_prefilled_per_page"), "pages", digits=1))  # fmt: skip
    requested = max((b.requested_batch or 0) for b in s.batches)
    filled = max(min(b.batch, len(b.page_ids)) for b in s.batches)  # continuous: slots beyond the pages stay empty
    warning = (
        [f"**Warning:** infer.batch_size={requested} but batches ran with at most {filled} page(s): the dataset is "
         f"smaller than the batch; set dataset.num_pages>={requested} (synthetic) or add pages.\n"]
        if requested > filled else []
    )  # fmt: skip
    how = (
        f"Continuous batching: {len(s.batches)} run(s) (one per repeat) through {size} sequence slots; a slot "
        "whose sequence ends (eos, simulated eos, the cap) is refilled with the next page (its vision + prefill "
        f"run, its K/V inserted into the slot's rows), so the batch stays full with mixed lengths"
        f"{_finished_rows(s, continuous=True)}. Statistics are over runs; TPOT over sequences."
        if continuous
        else f"Static batching: {len(s.batches)} batches of up to {size} pages, one forward per step for the whole "
        "batch (vision batched across pages, left-padded prefill, finished sequences masked) until its longest "
        f"sequence ends{_finished_rows(s)}. Statistics are over batches; TPOT over sequences."
    )
    return "\n".join(
        [
            f"## Batched throughput (batch size {size})\n",
            *warning,
            how + " Model-only rates leave the host preprocessing out (it can run ahead on other cores); "
            "end-to-end rates add the time the batches waited for their pages. Raw records: "
            "[batches.jsonl](batches.jsonl).\n",
            table(header, rows),
            "",
            _batch_paths(s),
            *([_render_phase(s.batched_phase)] if s.batched_phase is not None else []),
        ]
    )


def _render_phase(p: BatchedPhase) -> str:
    """The phase end to end: one wall clock over preparation, stages and host work, and where it went."""
    share = lambda part: fmt_pct(part / p.wall_ms) if p.wall_ms > 0 else NA  # noqa: E731
    busy = fmt_pct(p.gpu_busy_share) if p.gpu_busy_share is not None else na(p.gpu_busy_unavailable or "not measured")
    other = (
        f"{fmt(p.other_ms, 1)} ms ({share(p.other_ms)})"
        if p.other_ms >= 0
        else f"{fmt(p.other_ms, 1)} ms (negative: device stages ran while the host waited for pages)"
    )
    rows = [
        ["batching", p.batching],
        ["sequence slots (batch size)", fmt(p.slots)],
        ["pages / output tokens", f"{fmt(p.pages)} / {fmt(p.output_tokens)}"],
        ["wall time (host; page waits included, graph captures left out)", f"{fmt(p.wall_ms, 1)} ms"],
        ["**pages per second, end to end**", fmt(p.pages_per_s, 2)],
        ["**output tokens per second, end to end**", fmt(p.output_tok_s, 1)],
        *(
            [
                ["  drain (slots emptying after the last page started decoding)",
                 f"{fmt(p.drain_ms, 1)} ms ({share(p.drain_ms)}){_drain_steps(p)}"],
                ["  steady state, drain left out: pages/s", _steady(p.steady_pages_per_s, 2, p)],
                ["  steady state, drain left out: output tok/s", _steady(p.steady_output_tok_s, 1, p)],
            ]
            if p.drain_ms is not None
            else []
        ),
        ["slot occupancy (share of slots producing a token per decode step)",
         fmt_pct(p.slot_occupancy) if p.slot_occupancy is not None else na("no decode step")],
        ["  row occupancy (share of the rows the decode steps computed that produced a token; a narrowed "
         "step counts its own width)",
         fmt_pct(p.row_occupancy) if p.row_occupancy is not None else na("rows per step not recorded")],
        *_traffic_rows(p),
        ["GPU busy share (device-timed stages ÷ wall; gaps inside a stage count as busy)", busy],
        ["  stages: vision + prefill + decode", f"{fmt(p.stage_ms, 1)} ms ({share(p.stage_ms)})"],
        ["  waiting for pages (host blocked on the prefetcher)",
         f"{fmt(p.page_wait_ms, 1)} ms ({share(p.page_wait_ms)})"],
        ["  other work outside the stages (token reads, refill bookkeeping, scheduling; on CUDA also device work "
         "between them: narrowing the slots' K/V, copying a grown cache)", other],
    ]  # fmt: skip
    return "\n".join(
        [
            "### The batched phase end to end\n",
            "One host clock from the first page requested to the last batch synchronised, with page preparation "
            "(by the prefetcher's workers) included: what a user running the pages through gets. Recorded as "
            "`batched_phase` in metrics.json.\n",
            table(["quantity", "value"], rows),
            *(
                [
                    "\nThe drain is the end of each continuous run, from the step at which its last page started "
                    "decoding: no page is left to refill a slot, so the slots empty one by one. Once at most half "
                    "the slots hold a sequence, the step narrows to the power of two of rows covering them (the "
                    "same tokens; fewer rows through every kernel). A run over far more pages spends a smaller "
                    "share of its time there; the steady-state rates (wall time minus the drain, the tokens it "
                    "produced left out) are what such a run approaches." + _steady_below(p),
                ]
                if p.drain_ms is not None
                else []
            ),
            "",
        ]
    )


def _finished_rows(s: RunSummary, continuous: bool = False) -> str:
    """What finished rows saw: "; a finished sequence's attention sees ..." (nothing for records without it).
    Static: until its batch ended; continuous: a sequence ended by eos until the host read the done flags and
    refilled its slot."""
    attend = {b.finished_rows_attend for b in s.batches} - {None}
    if not attend:
        return ""
    triton = "the Triton row attention reads no other key, the torch attention reads them masked"
    if continuous:
        wait = "; a sequence ended by eos keeps its slot until the host next reads the done flags"
        if attend == {False}:
            return f"{wait}, its attention seeing its newest key only ({triton})"
        which = "every" if attend == {True} else "some"
        return f"{wait}, in {which} run its attention seeing its whole context (infer.continuous_skip_keys=false)"
    if attend == {False}:
        return f"; a finished sequence's attention sees its newest key only and no row sees its left pads ({triton})"
    which = "every" if attend == {True} else "some"
    return (
        f"; in {which} batch a finished sequence's attention saw its whole context until the batch ended "
        "(the host loop, or infer.static_skip_keys=false)"
    )


def _traffic_rows(p: BatchedPhase) -> list[list[str]]:
    """The decode steps' minimum traffic and the bandwidth it was moved at, or why there is none."""
    t = p.decode_traffic
    if t is None:
        why = p.decode_traffic_unavailable or "not computed: written before schema 1.8"
        return [["decode traffic (weights once per step, each computed row's K/V)", na(why)]]
    at_least = "≥ " if t.lower_bound else ""
    mbu = fmt_pct(t.mbu) if t.mbu is not None else na(t.mbu_unavailable or "no peak bandwidth known")
    return [
        [
            "decode traffic (the minimum: weights once per step with the routed experts the steps read, each computed "
            f"row's K/V); {t.note}",
            f"{at_least}{fmt_bytes_dec(t.bytes_moved)} (weights {fmt_bytes_dec(t.weights_bytes)}, K/V "
            f"{fmt_bytes_dec(t.kv_bytes)}) in {fmt(1e3 * t.seconds, 1)} ms of decode steps",
        ],
        [
            "  decode bandwidth achieved (traffic ÷ decode time) / MBU",
            f"{at_least}{fmt_rate_bytes(t.bytes_per_s)} / {mbu}",
        ],
    ]


def _steady(value: float | None, digits: int, p: BatchedPhase) -> str:
    """A steady-state rate, or n/a with the reason the run has none."""
    if value is None and p.steady_unavailable:
        return na(p.steady_unavailable)
    return fmt(value, digits)


def _steady_below(p: BatchedPhase) -> str:
    """The sentence for a run whose steady-state token rate came out below its end-to-end one (else nothing)."""
    if p.steady_output_tok_s is None or p.output_tok_s is None or p.steady_output_tok_s >= p.output_tok_s:
        return ""
    return (
        " Here the steady-state token rate is below the end-to-end one: the drain produced tokens faster than "
        "the rest of the run (no refill's vision and prefill in it, and narrower steps), as in short runs where "
        "the fills weigh most; a longer run's end-to-end rate comes down towards the steady one."
    )


def _drain_steps(p: BatchedPhase) -> str:
    """ "; 3,471 decode steps, 3,402 of them on a narrower batch" (nothing for records without the counts)."""
    if p.drain_steps is None:
        return ""
    narrowed = "" if p.narrowed_steps is None else f", {fmt(p.narrowed_steps)} of them on a narrower batch"
    return f"; {fmt(p.drain_steps)} decode steps{narrowed}"


def _batch_paths(s: RunSummary) -> str:
    """Which decode loop the batches ran, the one-time graph captures and idle steps (not in the stage times)."""
    paths = sorted({b.decode_path for b in s.batches})
    captures = [b.graph_capture_ms for b in s.batches if b.graph_capture_ms > 0]
    note = {
        "graph": "CUDA-graph step, tokens chosen on the device (no_repeat_ngram rule there too)",
        "static": "static step, un-graphed",
        "host": "host loop: logits read every step (per-sequence no_repeat_ngram sizes or kept logits)",
    }
    text = "Decode path: " + "; ".join(f"{p} ({note.get(p, '?')})" for p in paths) + "."
    failed = sorted({b.graph_capture_error for b in s.batches if b.graph_capture_error})
    if failed:  # the un-graphed step is slower than the graphed one would be: say so, and why
        text += (
            f" The decode step's CUDA-graph capture failed ({'; '.join(e[:300] for e in failed)}), so the step ran"
            " un-graphed from there on: its decode times include the launch overhead a graph removes."
        )
    refills = s.refill_modes
    if refills:  # continuous: how the refills' LM prefill ran (infer.refill_prefill as resolved, auto included)
        how = {"per_page": "page by page (the model's per-page prefill; graph replays on the fast path on CUDA)",
               "batched": "batched (one left-padded forward over each refill's pages)"}  # fmt: skip
        text += " Refills' LM prefill: " + "; ".join(how.get(r, r) for r in refills) + "."
    if captures:
        counts = [b.graph_captures for b in s.batches if b.graph_capture_ms > 0]
        total = sum(c or 0 for c in counts)
        graphs = "" if any(c is None for c in counts) or not total else f"{total:,} graph(s) "
        text += (
            f" Graph captures: {graphs}in {len(captures)} of {len(s.batches)} run(s), {fmt(sum(captures), 1)} ms in"
            " all, outside the stage times and the wall time below (a first run waits that long on top)."
        )
    inside = [(b.repeat, b.timed_setups) for b in s.batches if b.timed_setups]
    if inside:  # not one-time in the figures: a compile or capture the warm-up did not cover, inside timed stages
        where = ", ".join(f"repeat {r}: {n}" for r, n in inside[:8]) + (", ..." if len(inside) > 8 else "")
        text += (
            f" **Timed setups:** {sum(n for _, n in inside)} one-time setup(s) of the fast path (a vision shape"
            " compiled / captured, a prefill length captured, a kernel variant compiled outside a capture) happened"
            f" inside timed batched runs ({where}): their time is in those runs' stage times, so their rates read low."
            " The warm-up met no page of that view size or prompt length, or no run of that shape; a first batch"
            " that covers them removes this."
        )
    waits = [b.page_wait_ms for b in s.batches if b.page_wait_ms is not None]
    if len(waits) == len(s.batches):
        model_ms = sum(b.prefill_ms + b.decode_ms for b in s.batches)  # prefill_ms includes vision
        wall_ms = model_ms + sum(waits)
        pages = sum(len(b.page_ids) for b in s.batches)  # a continuous run's pages outnumber its slots
        tokens = sum(b.output_tokens for b in s.batches)
        text += (
            f" End to end, preprocessing included (model stages + {fmt(sum(waits), 1)} ms waiting for pages, "
            f"{fmt(100 * sum(waits) / wall_ms, 1)} % of {fmt(wall_ms, 1)} ms): {fmt(1e3 * pages / wall_ms, 2)} "
            f"pages/s, {fmt(1e3 * tokens / wall_ms, 1)} output tok/s."
            if wall_ms > 0
            else " End-to-end rates not available: no time measured."
        )
    simulated = sum(sum(b.simulated_eos) for b in s.batches)
    if simulated:
        text += (
            f" Simulated eos: {simulated} of {sum(len(b.page_ids) for b in s.batches)} sequences ended at their page's "
            "target output length (dummy weights)."
        )
    idle = sum(b.idle_steps for b in s.batches)
    if idle:
        text += (
            f" {idle} idle step(s): decode steps in which every sequence then in the batch had already finished"
            " (eos is read every k steps)."
        )
    text += _experts_read(s)
    if s.model.weights == "dummy":
        text += (
            " Dummy weights: every sequence greedily repeats one token, so the rows of a decode step route to the "
            "same few experts and read far fewer expert weights than real pages would; these batched rates flatter "
            "real pages (`benchmarks/bench_batched.py --spread-routing` times steps that read every expert)."
        )
    return text + "\n"


def _experts_read(s: RunSummary) -> str:
    """The routed experts the decode steps read per MoE layer, counted on the device, or why there is no count."""
    read = s.experts_read
    if read is None:
        return (
            " Routed experts read per decode step: not counted (only the Triton decode step's expert kernels count"
            " them; these steps ran the torch decode step, the host loop or no Triton on this device, or the records"
            " predate the count: schema < 1.7, and before 1.9 no step of 8 rows or fewer was counted)."
        )
    of = read.routed_experts
    share = f" of {of} ({fmt(100 * read.mean / of, 1)} % of the routed expert weights a step could read)" if of else ""
    return (
        f" Routed experts read per decode step (counted on the device by the expert kernels over"
        f" {read.counted_steps:,} of {read.decode_steps:,} decode steps): a mean of {fmt(read.mean, 1)}{share} per"
        f" MoE layer, {fmt(min(read.per_layer), 1)}–{fmt(max(read.per_layer), 1)} across layers."
    )
