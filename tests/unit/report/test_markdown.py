"""report/markdown.py, format.py and operators.py: report.md and operators.md rendered from a synthetic RunSummary."""

from __future__ import annotations

import json
from pathlib import Path

from llm_perf_opt.report.format import NA, fmt, fmt_bytes, fmt_flops, fmt_pct, table
from llm_perf_opt.report.markdown import render_predictions, render_report
from llm_perf_opt.report.operators import render_operators
from llm_perf_opt.results.types import Efficiency, OperatorRow, StageFlops, Unavailable
from tests.unit.builders import make_failed_page, make_page, make_profile, make_summary

SECTIONS = ["## Setup", "## Latency and throughput", "## Memory", "## Pages"]


def _summary(**kw):
    failed = make_failed_page("p2", error="out of memory: CUDA | tried 2 GiB", error_type="OutOfMemoryError")
    pages = [
        make_page("p0"),
        make_page("p0", 1),
        make_page("p1", flags=["single_token: eos right after prefill"]),
        failed,
    ]
    return make_summary(pages=pages, **kw)


def _line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_report_sections_and_header() -> None:
    md = render_report(_summary(status="partial", status_reason="interrupted by SIGINT"))
    for title in SECTIONS:
        assert title in md
    assert md.startswith("# Stage-1 profile — deepseek-ocr-test on cpu")
    assert "**Status: PARTIAL — interrupted by SIGINT**" in md
    assert "3 page runs measured, 1 failed." in md
    assert "commit `abc1234`" in md
    assert "(3 pages)" in md  # distinct page ids, failed included
    assert "| optimisations | sdpa=on, cuda_graphs=off |" in md
    assert "| repeats × token cap | 3 × 64 |" in md


def test_overlapping_view_streams_are_said_under_the_latency_table() -> None:
    plain = render_report(_summary())
    assert "vision_streams" not in plain
    summary = _summary()
    summary.model.optimisations["vision_streams"] = True
    md = render_report(summary)
    latency = md.split("## Latency and throughput")[1].split("## Memory")[0]
    assert "SAM, CLIP and projector overlap" in latency
    assert "`infer.fast.vision_streams=false`" in latency
    # CLIP over both views at once: only SAM's views overlap, and the note says CLIP runs once
    summary.model.optimisations["clip_merged_views"] = True
    latency = render_report(summary).split("## Latency and throughput")[1].split("## Memory")[0]
    assert "SAM's time overlaps" in latency and "SAM, CLIP and projector overlap" not in latency
    assert "CLIP then runs once over both views' tokens (`infer.fast.clip_merged_views`)" in latency


def test_none_fields_render_na() -> None:
    md = render_report(_summary(finished_at=None, git_commit=None))
    assert "finished n/a (still running)" in md and "commit `n/a (not a git checkout)`" in md
    assert (
        _line(md, "| torch / CUDA / driver |")
        == "| torch / CUDA / driver | 2.13.0+cpu / n/a (CPU build) / n/a (no GPU driver) |"
    )
    assert _line(md, "| peak FLOP/s used for MFU |") == f"| peak FLOP/s used for MFU | {NA} (no peak known) |"
    assert "n/a (not derivable for this backend) activated per decode token" in md
    # not aggregated → one n/a with the reason, never 0
    sam = _line(md, "|     SAM |")
    assert sam.startswith("|     SAM | ms | n/a (the backend (native) has no hooked sam module) |")
    assert _line(md, "| peak allocated (CUDA, max over pages) |").endswith(
        "| n/a (not a CUDA run: the allocator's peaks exist on CUDA only) |"
    )


def test_aggregated_row_values() -> None:
    # n=3: the t interval (12 ± 4.97) is wider than the data and no order-statistic pair reaches 95 %.
    md = render_report(_summary(aggregates={"prefill_ms": [10.0, 12.0, 14.0]}))
    row = _line(md, "| TTFT (prefill")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:] == [
        "ms", "3", "12.00", "n/a (n < 6: no 95 % order-statistic interval)", "12.00",
        "n/a (n too small or skewed: wider than the data)", "13.96", "10.00 – 14.00", "0",
    ]  # fmt: skip
    # n=9 with one 3×-median outlier: median CI = 2nd and 8th order statistics; mean CI withdrawn.
    values = [10.0, 11.0, 12.0, 10.5, 11.5, 12.5, 10.2, 11.2, 60.0]
    md = render_report(_summary(aggregates={"prefill_ms": values}))
    cells = [c.strip() for c in _line(md, "| TTFT (prefill").strip("|").split("|")]
    assert cells[2:5] == ["9", "11.20", "10.20 – 12.50"]
    assert cells[6] == "n/a (outliers pull the mean: read the median)" and cells[-1] == "1"


def test_failed_pages_section_lists_error() -> None:
    md = render_report(_summary())
    assert "## Failed pages" in md
    row = _line(md, "| p2 |")
    assert row == "| p2 | 0 | OutOfMemoryError | out of memory: CUDA / tried 2 GiB |"  # '|' escaped to '/'
    assert "## Flags" in md and "`p1` repeat 0: single_token" in md


def test_no_failed_section_without_failures() -> None:
    md = render_report(make_summary())
    assert "## Failed pages" not in md and "## Flags" not in md
    assert "0 failed" in md


def test_multiline_error_stays_in_one_table_row() -> None:
    md = render_report(make_summary(pages=[make_page("p0"), make_failed_page("p2", error="line one\nline two")]))
    section = md.split("## Failed pages\n", 1)[1].split("\n\n", 1)[0]
    assert all(line.startswith("|") for line in section.strip().splitlines())


def test_pages_table_means_over_repeats() -> None:
    pages = [make_page("p0", prefill_ms=20.0), make_page("p0", 1, prefill_ms=30.0)]
    md = render_report(make_summary(pages=pages))
    row = _line(md, "| `p0` |")
    assert "| 640×480 | 2×1 | 3 | 273 | 300 | 2 | 17.0 | 0 of 2 | no |" in row
    assert "| 25.00 |" in row  # mean prefill over the two repeats


def test_failed_pages_are_not_in_pages_table() -> None:
    md = render_report(_summary())
    pages_section = md.split("## Pages", 1)[1].split("## Failed", 1)[0]
    assert "`p0`" in pages_section and "`p1`" in pages_section
    assert "`p2`" not in pages_section


def test_unavailable_notes_efficiency_and_profile() -> None:
    s = _summary(
        unavailable=[Unavailable("mfu", "peak FLOP/s of this CPU is unknown")],
        notes=["warmup used a synthetic page"],
        flops=[StageFlops("prefill", 2.5e12, fvcore_flops=2.4e12, rel_diff_fvcore=-0.04, flagged=True)],
        efficiency=[Efficiency("prefill", 2.5e12, 0.5, 5e12, None, reason="no peak")],
        profile=make_profile(),
    )
    md = render_report(s, plots={"stage_breakdown": "stage_breakdown.png"})
    assert "## Not measured" in md and "- **mfu**: peak FLOP/s of this CPU is unknown" in md
    assert "## Notes" in md and "- warmup used a synthetic page" in md
    assert "## FLOPs, MFU and MBU" in md and "2.50 TFLOP" in md and "⚠" in md
    assert "## Plots" in md and "![Where the time goes](stage_breakdown.png)" in md
    assert "## Profiler pass (top operators)" in md
    assert "total self time 100.00 ms" in md and "[trace.json.gz](trace.json.gz)" in md
    assert "| 1 | `aten::mm` | 12 | 60.000 | 61.000 | 60.00 |" in md


def test_render_operators_states_total() -> None:
    s = make_summary(profile=make_profile(total_self_ms=1234.5678))
    md = render_operators(s)
    assert md.startswith("# Operators — profiler pass on `p0` (8 new tokens)")
    assert "Total self time over **all** operators: **1,234.568 ms**" in md
    assert "The 2 rows below cover 90.00 % of it." in md
    assert "| # | operator | calls | self CPU ms | total CPU ms | % of total self |" in md
    assert "self device ms" not in md
    assert "## Named ranges in the pass" in md and "| decode | 25.000 |" in md and "| prefill | 70.000 |" in md


def test_formatters() -> None:
    assert fmt(None) == NA and fmt(1234) == "1,234" and fmt(3.14159, 3) == "3.142"
    assert fmt_bytes(None) == NA and fmt_bytes(512) == "512 B" and fmt_bytes(3 * 2**30) == "3.0 GiB"
    assert fmt_bytes(2**50) == "1,024.0 TiB"
    assert fmt_flops(None) == NA and fmt_flops(2.5e12) == "2.50 TFLOP" and fmt_flops(999) == "999 FLOP"
    assert fmt_pct(None) == NA and fmt_pct(0.1234) == "12.34 %"
    assert table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_render_predictions(tmp_path: Path) -> None:
    assert "_No page finished yet._" in render_predictions(tmp_path / "missing.jsonl")
    path = tmp_path / "predictions.jsonl"
    recs = [
        {"page_id": "p0", "text": "hello", "token_ids": [1, 2], "text_is_meaningful": True},
        {"page_id": "p0", "text": "again", "token_ids": [1], "text_is_meaningful": True},  # repeat: shown once
        {"page_id": "p1", "text": "zz", "token_ids": [3], "text_is_meaningful": False},
    ]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    md = render_predictions(path)
    assert md.count("## `p0`") == 1 and "again" not in md
    assert "2 tokens." in md and "```text\nhello\n```" in md
    assert "## `p1` _(dummy weights" in md


def test_profiler_section_explains_graph_replayed_device_time() -> None:
    """When most device time sits under no host operator (CUDA-graph replays), the report says why and how to
    attribute it; a profile without that row gets no such note."""
    import attrs

    from llm_perf_opt.profiling.torch_profiler import UNATTRIBUTED

    prof = make_profile()
    graphed = attrs.evolve(
        prof,
        sort_key="self_device_ms",
        operators=[
            OperatorRow(UNATTRIBUTED, 8016, 48.3, 48.3, 0.0, 0.0, 97.5),
            OperatorRow("aten::copy_", 140, 1.0, 1.9, 32.4, 60.3, 2.1),
        ],
    )
    text = render_report(make_summary(profile=graphed))
    assert "98 % of the device time is under no host operator" in text
    assert "infer.fast.cuda_graphs=false" in text
    assert "under no host operator" not in render_report(make_summary(profile=prof))


def test_setup_names_the_preset_and_its_tile_cap() -> None:
    """The vLLM preset's rows say 2–6 tiles and the decoding row its window, exempt ids and scope (the config as
    the run records it: the preset's geometry folded into model.preprocess)."""
    import attrs

    s = make_summary(pages=[make_page()])
    vllm_pp = {"base_size": 1024, "image_size": 640, "crop_mode": True, "min_crops": 2, "max_crops": 6}
    config = {
        **s.run.config,
        "model": {"name": "deepseek_ocr", "preprocess": vllm_pp},
        "infer": {
            **s.run.config["infer"],
            "preset": "vllm_gundam",
            "mode": "gundam",
            "no_repeat_ngram_size": 30,
            "no_repeat_ngram_window": 90,
            "no_repeat_ngram_exempt_ids": [128821, 128822],
            "no_repeat_ngram_scope": "output",
        },
    }
    text = render_report(attrs.evolve(s, run=attrs.evolve(s.run, config=config)))
    assert "| preset | vllm_gundam (mode gundam): at most 6 tiles |" in text
    assert "| image geometry | base 1024 px, tile 640 px, crops 2–6 tiles |" in text
    assert "no_repeat_ngram_size 30 (window 90, exempt ids [128821, 128822], over the output)" in text
    base = dict(
        config,
        model={"preprocess": {**vllm_pp, "crop_mode": False}},
        infer={"preset": "reference_infer", "mode": "base"},
    )
    text = render_report(attrs.evolve(s, run=attrs.evolve(s.run, config=base)))
    assert "| preset | reference_infer (mode base): one view, no tiles |" in text


def _na_cells(md: str) -> list[str]:
    """Every 'n/a' occurrence in the report, with what follows it on its line."""
    import re

    return [m.group(0) for m in re.finditer(r"n/a[^|\n]*", md)]


def test_every_na_in_the_report_carries_its_reason() -> None:
    """Render the n/a paths the issue found (static_compute=false, max_new_tokens=1, CPU without peaks,
    no NVML, a backend without hooks, no roofline) and check that every n/a says why."""
    import re

    pages = [
        make_page("p0", generated_tokens=1, decode_ms=None, tpot_ms=None, decode_tok_s=None, decode_step_ms=[],
                  decode_step_p50_ms=None, decode_step_p90_ms=None, decode_step_p99_ms=None, sam_ms=None,
                  clip_ms=None, projector_ms=None, energy_j=None, energy_per_token_j=None, kv_cache_bytes=None),
    ]  # fmt: skip
    s = make_summary(
        pages=pages,
        unavailable=[
            Unavailable("mfu", "no sourced peak for CPUs"),
            Unavailable("mbu", "no sourced peak for CPUs"),
            Unavailable("energy", "no NVML on a CPU run"),
            Unavailable("flops.counted", "profiling.static_compute=false: switched off"),
            Unavailable("mfu.decode", "no page decoded a second token"),
        ],
        flops=[StageFlops("decode", 0.0), StageFlops("prefill_lm", 1e9)],
        efficiency=[Efficiency("prefill", 1e9, 0.01, 1e11, None)],
    )
    md = render_report(s, plots={"stage_breakdown": "stage_breakdown.png"})
    cells = _na_cells(md)
    assert len(cells) > 10  # the paths above really render n/a
    bare = [c for c in cells if not re.match(r"n/a \(.+\)", c.strip()) and not c.strip().startswith("n/a:")]
    assert bare == [], bare
    assert "n/a (profiling.static_compute=false)" in md
    assert "no decode step: every page produced at most 1 token" in md
    assert "- **roofline plot**: needs both peak FLOP/s and peak bandwidth" in md
    # Artifacts are links, run.log included.
    assert "[run.log](run.log)" in md and "[assumptions.md](assumptions.md)" in md


def test_peaks_are_decimal_and_the_source_is_not_double_wrapped() -> None:
    import attrs

    s = make_summary()
    hw = attrs.evolve(
        s.hardware,
        peak_flops_per_s=989e12,
        peak_flops_source="user override (peak.flops_per_s)",
        peak_bw_bytes_per_s=4.8e12,
        peak_bw_source="user override (peak.bw_bytes_per_s)",
    )
    md = render_report(attrs.evolve(s, hardware=hw))
    assert "| peak FLOP/s used for MFU | 989.00 TFLOP/s — source: user override (peak.flops_per_s) |" in md
    assert "| peak bandwidth used for MBU | 4.80 TB/s — source: user override (peak.bw_bytes_per_s) |" in md
    assert "(user override (peak" not in md


def test_peak_rss_label_says_what_the_peak_covers() -> None:
    """A run resets the process's high-water mark before loading the model; where the kernel refused, the peak
    is the lifetime one and the row must say so (the refusal is in the notes)."""
    own = render_report(_summary())
    assert "| peak RSS of the process (host; this run's high-water mark, reset before the model loaded) |" in own
    refused = _summary(notes=["peak_rss_bytes: could not reset the process's peak RSS (Permission denied): ..."])
    text = render_report(refused)
    assert "| peak RSS of the process (host; its lifetime high-water mark: the reset was refused, see Notes) |" in text
