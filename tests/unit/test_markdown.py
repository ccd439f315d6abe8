"""report/markdown.py: report.md and operators.md rendered from a synthetic RunSummary."""

from __future__ import annotations

import json
from pathlib import Path

from llm_perf_opt.report.markdown import (
    NA,
    fmt,
    fmt_bytes,
    fmt_flops,
    fmt_pct,
    render_operators,
    render_predictions,
    render_report,
    table,
)
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


def test_none_fields_render_na() -> None:
    md = render_report(_summary(finished_at=None, git_commit=None))
    assert f"finished {NA}" in md and f"commit `{NA}`" in md
    assert _line(md, "| torch / CUDA / driver |") == f"| torch / CUDA / driver | 2.13.0+cpu / {NA} / {NA} |"
    assert _line(md, "| peak FLOP/s used for MFU |") == f"| peak FLOP/s used for MFU | {NA} |"
    assert f"{NA} activated per decode token" in md
    # not aggregated → a full row of n/a, never 0
    sam = _line(md, "|     SAM |")
    assert sam == "|     SAM | ms | " + " | ".join([NA] * 7) + " |"
    assert _line(md, "| peak allocated (CUDA, max over pages) |").endswith(f"| {NA} |")


def test_aggregated_row_values() -> None:
    md = render_report(_summary(aggregates={"prefill_ms": [10.0, 12.0, 14.0]}))
    row = _line(md, "| TTFT (prefill")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:] == ["ms", "3", "12.00", "± 4.97", "2.00", "12.00", "13.96", "10.00 – 14.00"]


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
    assert "| 640×480 | 2×1 | 3 | 273 | 300 | 2 |" in row
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
