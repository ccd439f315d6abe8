"""report/compare.py: verdicts from CI overlap, and the exit codes of ``llm-perf-opt compare``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_perf_opt.profiling.stats import Stats
from llm_perf_opt.report.compare import COMPARED, _overlap, compare_main, diff, render
from tests.unit.builders import make_summary, write_run_dir

# Tight samples around a centre: CI half-width ≈ 0.3 for n=4.
BASE = [100.0, 100.2, 99.8, 100.0]


def _shift(values: list[float], by: float) -> list[float]:
    return [v + by for v in values]


def _by_metric(a, b) -> dict[str, object]:
    return {d.metric: d for d in diff(a, b)}


def test_diff_verdicts_better_worse_noise() -> None:
    a = make_summary({"prefill_ms": BASE, "tpot_ms": BASE, "e2e_ms": BASE, "decode_tok_s": BASE})
    b = make_summary(
        {
            "prefill_ms": _shift(BASE, -10.0),  # lower is better, much lower → better
            "tpot_ms": _shift(BASE, +10.0),  # lower is better, much higher → WORSE
            "e2e_ms": _shift(BASE, +0.1),  # CIs overlap → within noise
            "decode_tok_s": _shift(BASE, -10.0),  # higher is better, much lower → WORSE
        }
    )
    d = _by_metric(a, b)
    assert d["prefill_ms"].verdict == "better" and d["prefill_ms"].significant
    assert d["tpot_ms"].verdict == "WORSE" and d["tpot_ms"].significant
    assert d["e2e_ms"].verdict == "within noise" and not d["e2e_ms"].significant
    assert d["decode_tok_s"].verdict == "WORSE"
    assert d["prefill_ms"].delta == pytest.approx(-10.0)
    assert d["prefill_ms"].pct == pytest.approx(-10.0)
    assert d["tpot_ms"].a == pytest.approx(100.0) and d["tpot_ms"].b == pytest.approx(110.0)


def test_higher_is_better_metric_improving_is_better() -> None:
    a = make_summary({"decode_tok_s": BASE})
    b = make_summary({"decode_tok_s": _shift(BASE, 20.0)})
    (d,) = diff(a, b)
    assert d.metric == "decode_tok_s" and d.unit == "tok/s" and d.verdict == "better"


def test_metrics_missing_on_either_side_are_skipped_and_order_follows_compared() -> None:
    a = make_summary({"e2e_ms": BASE, "prefill_ms": BASE, "sam_ms": BASE})
    b = make_summary({"prefill_ms": BASE, "e2e_ms": BASE, "clip_ms": BASE})
    metrics = [d.metric for d in diff(a, b)]
    assert metrics == ["prefill_ms", "e2e_ms"]
    order = [m for m, _, _ in COMPARED]
    assert order.index("prefill_ms") < order.index("e2e_ms")


def test_single_sample_never_significant() -> None:
    a = make_summary({"prefill_ms": [100.0]})
    b = make_summary({"prefill_ms": [1000.0]})
    (d,) = diff(a, b)
    assert d.verdict == "within noise" and not d.significant


def test_zero_mean_gives_no_percentage() -> None:
    a = make_summary({"prefill_ms": [0.0, 0.0, 0.0]})
    b = make_summary({"prefill_ms": [5.0, 5.0, 5.0]})
    (d,) = diff(a, b)
    assert d.pct is None
    assert d.verdict == "WORSE"  # zero-width CIs that do not touch


def _stats(lo: float | None, hi: float | None) -> Stats:
    return Stats(n=3, mean=0.0, std=0.0, min=0.0, max=0.0, p50=0.0, p90=0.0, p99=0.0, ci95_low=lo, ci95_high=hi)


@pytest.mark.parametrize(
    ("a", "b", "overlaps"),
    [((0, 1), (2, 3), False), ((2, 3), (0, 1), False), ((0, 2), (1, 3), True), ((0, 1), (1, 2), True),
     ((0, 10), (4, 5), True), ((None, None), (5, 6), True)],
)  # fmt: skip
def test_overlap(a: tuple, b: tuple, overlaps: bool) -> None:
    assert _overlap(_stats(*a), _stats(*b)) is overlaps


def test_render_contains_table_and_warnings(tmp_path: Path) -> None:
    a = make_summary({"prefill_ms": BASE}, gpu_name="H100")
    b = make_summary({"prefill_ms": _shift(BASE, 10.0)}, gpu_name="H200", model_cfg={"name": "other"})
    text = render(tmp_path / "runA", a, tmp_path / "runB", b)
    assert "`runA` (A) → `runB` (B)" in text
    assert "| prefill_ms | ms | 100.000 | 110.000 | +10.000 | +10.0 % | **WORSE** |" in text
    assert "different devices" in text
    assert "model configs differ" in text


def test_render_no_warnings_for_same_setup(tmp_path: Path) -> None:
    a = make_summary({"prefill_ms": BASE})
    text = render(tmp_path / "a", a, tmp_path / "b", a)
    assert "| within noise |" in text
    assert "⚠" not in text


def test_compare_main_exit_0_when_nothing_worse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ra = write_run_dir(tmp_path / "a", make_summary({"prefill_ms": BASE, "tpot_ms": BASE}))
    rb = write_run_dir(tmp_path / "b", make_summary({"prefill_ms": _shift(BASE, -5), "tpot_ms": _shift(BASE, 0.1)}))
    out_md = tmp_path / "cmp.md"
    assert compare_main([str(ra), str(rb), "-o", str(out_md)]) == 0
    stdout = capsys.readouterr().out
    assert "**better**" in stdout and "within noise" in stdout
    assert out_md.read_text() + "\n" == stdout  # -o writes exactly the printed markdown
    assert "| prefill_ms |" in out_md.read_text()


def test_compare_main_exit_1_when_significantly_worse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ra = write_run_dir(tmp_path / "a", make_summary({"prefill_ms": BASE, "e2e_ms": BASE}))
    rb = write_run_dir(tmp_path / "b", make_summary({"prefill_ms": _shift(BASE, -5), "e2e_ms": _shift(BASE, 5)}))
    assert compare_main([str(ra), str(rb)]) == 1
    out = capsys.readouterr().out
    assert "**WORSE**" in out and "**better**" in out


def test_compare_main_exit_2_for_non_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ra = write_run_dir(tmp_path / "a", make_summary())
    empty = tmp_path / "empty"
    empty.mkdir()
    assert compare_main([str(ra), str(empty)]) == 2
    err = capsys.readouterr().err
    assert "compare:" in err and str(empty) in err and "not a run directory" in err
    assert compare_main([str(tmp_path / "missing"), str(ra)]) == 2
    assert "missing" in capsys.readouterr().err
    # a file, not a directory
    assert compare_main([str(ra / "metrics.json"), str(ra)]) == 2


def test_compare_main_exit_2_for_schema_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ra = write_run_dir(tmp_path / "a", make_summary())
    rb = write_run_dir(tmp_path / "b", make_summary(schema_version="9.0"))
    assert compare_main([str(ra), str(rb)]) == 2
    captured = capsys.readouterr()
    assert "schema_version 9.0" in captured.err
    assert "re-run the profile" in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("content", ["{not json", json.dumps({"schema_version": "1.0"})])
def test_compare_main_exit_2_for_unreadable_metrics(tmp_path: Path, content: str) -> None:
    ra = write_run_dir(tmp_path / "a", make_summary())
    rb = tmp_path / "b"
    rb.mkdir()
    (rb / "metrics.json").write_text(content)
    assert compare_main([str(ra), str(rb)]) == 2
