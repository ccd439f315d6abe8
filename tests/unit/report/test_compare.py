"""report/compare.py: metric classes, the significance rule on per-page samples, settings diff and the
"workloads differ" verdict, and the exit codes of ``llm-perf-opt compare``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import attrs
import pytest

from llm_perf_opt.report.compare import (
    Thresholds,
    compare_main,
    diff,
    effect_floor,
    fold_change,
    render,
    settings_diff,
    workload_differences,
)
from llm_perf_opt.results.types import HostLoad, MeasurementQuality, RunSummary
from tests.unit.builders import make_page, make_summary, write_run_dir

# Eight tight samples around 100 (spread ±0.3 %), no ties (the exact Mann-Whitney distribution applies).
BASE = [100.0, 100.2, 99.8, 100.1, 99.9, 100.3, 99.7, 100.05]


def _shift(values: list[float], by: float) -> list[float]:
    return [v + by for v in values]


def _run(**metrics: list[float]) -> RunSummary:
    """A run whose pages carry ``metrics`` (one value per page run) and whose aggregates summarise them."""
    n = len(next(iter(metrics.values())))
    pages = [make_page(f"p{i % 4}", i // 4, **{k: v[i] for k, v in metrics.items()}) for i in range(n)]
    keys = {"prefill_ms", "tpot_ms", "e2e_ms", "decode_tok_s", "peak_rss_bytes", "generated_tokens", *metrics}
    return make_summary({k: [getattr(p, k) for p in pages] for k in keys}, pages=pages)


def _by_metric(a: RunSummary, b: RunSummary, **kw: Any) -> dict[str, Any]:
    return {d.metric: d for d in diff(a, b, **kw)}


def test_latency_and_throughput_verdicts() -> None:
    a = _run(prefill_ms=BASE, tpot_ms=BASE, e2e_ms=BASE, decode_tok_s=BASE)
    b = _run(
        prefill_ms=_shift(BASE, -10.0),  # lower is better, 10 % lower → better
        tpot_ms=_shift(BASE, +10.0),  # 10 % higher → WORSE
        e2e_ms=_shift(BASE, +0.1),  # inside the spread → within noise
        decode_tok_s=_shift(BASE, -10.0),  # higher is better, lower → WORSE
    )
    d = _by_metric(a, b)
    assert d["prefill_ms"].verdict == "better" and d["prefill_ms"].significant
    assert d["tpot_ms"].verdict == "WORSE" and d["decode_tok_s"].verdict == "WORSE"
    assert d["e2e_ms"].verdict == "within noise" and not d["e2e_ms"].significant
    assert d["prefill_ms"].a == pytest.approx(100.025) and d["prefill_ms"].b == pytest.approx(90.025)  # medians
    assert d["prefill_ms"].pct == pytest.approx(-10.0 / 100.025 * 100)
    # Completely separated 8 vs 8 samples: exact two-sided Mann-Whitney p = 2 / C(16, 8).
    assert d["tpot_ms"].p_value == pytest.approx(2 / math.comb(16, 8))


def test_effect_floor_keeps_small_but_clean_shifts_quiet() -> None:
    """A 2 % shift with perfectly separated samples is 'significant' to a rank test, but below the 5 % floor:
    two runs of one config drift like this with the host's load."""
    a = _run(prefill_ms=BASE)
    b = _run(prefill_ms=_shift(BASE, 2.0))
    d = _by_metric(a, b)["prefill_ms"]
    assert d.p_value is not None and d.p_value < 0.01
    assert d.verdict == "within noise"
    assert _by_metric(a, b, th=Thresholds(min_effect=0.01))["prefill_ms"].verdict == "WORSE"


def test_noisy_run_triples_the_effect_floor() -> None:
    a = _run(prefill_ms=BASE)
    b = _run(prefill_ms=_shift(BASE, 10.0))
    assert _by_metric(a, b)["prefill_ms"].verdict == "WORSE"
    noisy = attrs.evolve(b, quality=MeasurementQuality(verdict="noisy", reasons=["load"]))
    assert _by_metric(a, noisy)["prefill_ms"].verdict == "within noise"  # 10 % < 15 %
    assert _by_metric(a, attrs.evolve(noisy, pages=_run(prefill_ms=_shift(BASE, 20.0)).pages,
                                      aggregates=_run(prefill_ms=_shift(BASE, 20.0)).aggregates))[
        "prefill_ms"
    ].verdict == "WORSE"  # fmt: skip


def test_overlapping_median_intervals_are_never_significant() -> None:
    wide = [80.0, 90.0, 100.0, 110.0, 120.0, 95.0, 105.0, 100.0]
    a = _run(prefill_ms=wide)
    b = _run(prefill_ms=_shift(wide, 8.0))
    d = _by_metric(a, b, th=Thresholds(alpha=0.9, min_effect=0.0))["prefill_ms"]
    assert d.a_ci is not None and d.b_ci is not None and d.a_ci[1] >= d.b_ci[0]
    assert d.verdict == "within noise"


def test_memory_uses_a_relative_threshold_and_prints_integers() -> None:
    gib = 3 * 2**30
    a = _run(peak_rss_bytes=[gib] * 8)
    same = _run(peak_rss_bytes=[gib] * 8)
    grown = _run(peak_rss_bytes=[int(gib * 1.2)] * 8)
    assert _by_metric(a, same)["peak_rss_bytes"].verdict == "within ±5 %"  # zero-width: never 'better'/'WORSE'
    d = _by_metric(a, grown)["peak_rss_bytes"]
    assert d.verdict == "WORSE" and d.cls == "memory"
    assert _by_metric(a, grown, th=Thresholds(mem_threshold=0.25))["peak_rss_bytes"].verdict == "within ±25 %"
    text = render(Path("a"), a, Path("b"), grown)
    row = next(line for line in text.splitlines() if line.startswith("| peak_rss_bytes |"))
    assert f"| {gib:,} | {int(gib * 1.2):,} | +{int(gib * 1.2) - gib:,} |" in row
    assert ".000" not in row


def test_workload_descriptors_get_no_verdict() -> None:
    a = _run(generated_tokens=[51] * 8)
    b = _run(generated_tokens=[16] * 8)
    d = _by_metric(a, b)["generated_tokens"]
    assert d.verdict == "workload (no verdict)" and not d.significant


def test_too_few_samples_gives_no_verdict() -> None:
    a = _run(prefill_ms=[100.0, 101.0])
    b = _run(prefill_ms=[1000.0, 1001.0])
    assert _by_metric(a, b)["prefill_ms"].verdict == "too few samples (< 3 per run)"


def _with_config(s: RunSummary, **changes: Any) -> RunSummary:
    cfg = json.loads(json.dumps(s.run.config))
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return attrs.evolve(s, run=attrs.evolve(s.run, config=cfg))


def test_settings_diff_first_and_workloads_differ(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _run(prefill_ms=BASE)
    fast = _with_config(a, **{"infer.fast.enabled": True, "output.dir": "elsewhere"})
    assert settings_diff(a, fast) == [("infer.fast.enabled", "(unset)", True)]  # output.* is not a setting
    assert workload_differences(a, fast) == []
    capped = _with_config(a, **{"infer.max_new_tokens": 16})
    assert workload_differences(a, capped) == ["infer.max_new_tokens: 64 → 16"]
    text = render(Path("a"), a, Path("b"), capped)
    assert text.index("## Settings that differ") < text.index("## Metrics")
    assert "| `infer.max_new_tokens` | 64 | 16 |" in text
    assert "**Verdict: workloads differ**" in text
    assert "**WORSE**" not in text and "**better**" not in text
    other_pages = attrs.evolve(a, pages=[attrs.evolve(p, page_id="q" + p.page_id) for p in a.pages])
    assert workload_differences(a, other_pages) == ["pages: 4 only in A, 4 only in B"]
    ra, rb = write_run_dir(tmp_path / "a", a), write_run_dir(tmp_path / "b", capped)
    assert compare_main([str(ra), str(rb)]) == 2
    assert "workloads differ (exit 2)" in capsys.readouterr().out


def test_quality_lines_are_carried(tmp_path: Path) -> None:
    a = attrs.evolve(_run(prefill_ms=BASE), quality=MeasurementQuality(verdict="noisy", reasons=["load 7 > 2"]))
    text = render(Path("a"), a, Path("b"), _run(prefill_ms=BASE))
    assert "- A: **Measurement quality: noisy** — load 7 > 2" in text
    assert "- B: measurement quality not recorded" in text
    assert "×3 because a run is noisy" in text


def test_compare_main_exit_0_when_nothing_worse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ra = write_run_dir(tmp_path / "a", _run(prefill_ms=BASE, tpot_ms=BASE))
    rb = write_run_dir(tmp_path / "b", _run(prefill_ms=_shift(BASE, -10), tpot_ms=_shift(BASE, 0.1)))
    out_md = tmp_path / "cmp.md"
    assert compare_main([str(ra), str(rb), "-o", str(out_md)]) == 0
    stdout = capsys.readouterr().out
    assert "**better**" in stdout and "within noise" in stdout
    assert out_md.read_text() + "\n" == stdout  # -o writes exactly the printed markdown
    assert "no significant regression (exit 0)" in stdout


def test_compare_main_exit_1_when_significantly_worse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ra = write_run_dir(tmp_path / "a", _run(prefill_ms=BASE, e2e_ms=BASE))
    rb = write_run_dir(tmp_path / "b", _run(prefill_ms=_shift(BASE, -10), e2e_ms=_shift(BASE, 10)))
    assert compare_main([str(ra), str(rb)]) == 1
    out = capsys.readouterr().out
    assert "**WORSE**" in out and "**better**" in out and "regression in e2e_ms (exit 1)" in out


def test_compare_main_exit_2_for_non_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ra = write_run_dir(tmp_path / "a", make_summary())
    empty = tmp_path / "empty"
    empty.mkdir()
    assert compare_main([str(ra), str(empty)]) == 2
    err = capsys.readouterr().err
    assert "compare:" in err and str(empty) in err and "not a run directory" in err
    assert compare_main([str(tmp_path / "missing"), str(ra)]) == 2
    assert "missing" in capsys.readouterr().err
    assert compare_main([str(ra / "metrics.json"), str(ra)]) == 2  # a file, not a directory


def test_compare_main_exit_2_for_schema_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ra = write_run_dir(tmp_path / "a", make_summary())
    rb = write_run_dir(tmp_path / "b", make_summary(schema_version="9.0"))
    assert compare_main([str(ra), str(rb)]) == 2
    captured = capsys.readouterr()
    assert "schema_version 9.0" in captured.err and "re-run the profile" in captured.err
    assert captured.out == ""


def test_compare_main_exit_2_for_no_measured_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ra = write_run_dir(tmp_path / "a", make_summary())
    rb = write_run_dir(tmp_path / "b", make_summary(aggregates={}, pages=[], status="failed"))
    assert compare_main([str(ra), str(rb)]) == 2
    assert "no measured page" in capsys.readouterr().err


def test_compare_main_exit_2_for_null_means(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ra = write_run_dir(tmp_path / "a", make_summary())
    rb = write_run_dir(tmp_path / "b", make_summary())
    raw = json.loads((rb / "metrics.json").read_text())
    raw["aggregates"]["prefill_ms"]["mean"] = None  # what NaN becomes in JSON
    (rb / "metrics.json").write_text(json.dumps(raw))
    assert compare_main([str(ra), str(rb)]) == 2
    assert "prefill_ms has a null mean" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["{not json", json.dumps({"schema_version": "1.0"})])
def test_compare_main_exit_2_for_unreadable_metrics(tmp_path: Path, content: str) -> None:
    ra = write_run_dir(tmp_path / "a", make_summary())
    rb = tmp_path / "b"
    rb.mkdir()
    (rb / "metrics.json").write_text(content)
    assert compare_main([str(ra), str(rb)]) == 2


def test_effect_floor_grows_with_the_runs_own_spread() -> None:
    """A run whose prefill varies 12 % between repeats of a page cannot call a 20 % shift (< 2 × 12 %)."""
    a = _run(prefill_ms=BASE)
    b = _run(prefill_ms=_shift(BASE, 20.0))
    assert _by_metric(a, b)["prefill_ms"].verdict == "WORSE"
    spread = MeasurementQuality("good", stage_cv={"prefill_ms": 0.12, "tpot_ms": 0.01})
    d = _by_metric(attrs.evolve(a, quality=spread), b)
    assert d["prefill_ms"].verdict == "within noise"
    # decode_tok_s borrows TPOT's CV (1 %): the 5 % floor applies.
    assert effect_floor(attrs.evolve(a, quality=spread), b, "decode_tok_s", Thresholds()) == pytest.approx(0.05)
    assert effect_floor(attrs.evolve(a, quality=spread), b, "prefill_ms", Thresholds()) == pytest.approx(0.24)


def test_host_side_preprocess_gets_no_verdict_when_a_run_is_noisy() -> None:
    """A 35 % preprocess shift between two same-config runs on a loaded host is load, not the code."""
    a = _run(preprocess_ms=BASE)
    b = _run(preprocess_ms=_shift(BASE, -35.0))
    assert _by_metric(a, b)["preprocess_ms"].verdict == "better"  # no quality record: a real change is judged
    noisy = attrs.evolve(a, quality=MeasurementQuality(verdict="noisy", reasons=["load 2.1 > 2"]))
    d = _by_metric(noisy, b)["preprocess_ms"]
    assert d.verdict == "no verdict (includes host-side time, a run is noisy)" and not d.significant


def test_a_stage_that_times_other_modules_is_named_and_never_judged() -> None:
    """DeepSeek-OCR's clip_ms is CLIP; DeepSeek-OCR-2's is its Qwen2 encoder: a 3x 'regression' there is v2's
    bigger encoder, not a slower CLIP."""
    v1 = _run(clip_ms=BASE, sam_ms=BASE)
    v2 = _run(clip_ms=[3 * x for x in BASE], sam_ms=_shift(BASE, 20.0))
    v2 = attrs.evolve(v2, model=attrs.evolve(v2.model, stage_names={"clip": "encoder"}))
    d = _by_metric(v1, v2)
    assert d["clip_ms"].verdict == "no verdict (different modules: CLIP vs encoder)"
    assert not d["clip_ms"].significant
    assert d["sam_ms"].verdict == "WORSE"  # SAM is SAM in both: still judged
    text = render(Path("v1"), v1, Path("v2"), v2)
    assert "| clip_ms (A: CLIP, B: encoder) |" in text
    both_v2 = _by_metric(v2, v2)
    assert both_v2["clip_ms"].verdict == "within noise"  # the same module in both runs: judged as usual
    assert "| clip_ms (encoder) |" in render(Path("a"), v2, Path("b"), v2)


def test_batched_phases_shown_side_by_side_with_ratios() -> None:
    from llm_perf_opt.results.types import BatchedPhase, BatchRecord

    def phase(batching: str, pages_per_s: float, busy: float | None) -> BatchedPhase:
        return BatchedPhase(batching, 64, 4, 256, 280_000, 20_000.0, 18_000.0, 500.0, 1_500.0, pages_per_s,
                            pages_per_s * 1_000, 0.5, busy, None if busy else "no GPU")  # fmt: skip

    a = attrs.evolve(_run(prefill_ms=BASE), batched_phase=phase("static", 4.0, 0.8))
    b = attrs.evolve(_run(prefill_ms=BASE), batched_phase=phase("continuous", 10.0, None))
    text = render(Path("a"), a, Path("b"), b)
    assert "## Batched phase end to end" in text and "A: static batching" in text
    assert "| pages/s, end to end | 4.00 | 10.00 | 2.50× |" in text  # 10 / 4 by hand
    assert "| GPU busy share | 0.800 | n/a | n/a (absent in B) |" in text  # B on CPU: no ratio claimed
    assert "## Batched phase" not in render(Path("a"), a, Path("b"), _run(prefill_ms=BASE))  # one side only
    # how each side's refills ran, as infer.refill_prefill resolved (auto reads the same in both configs)
    refill = BatchRecord(repeat=0, page_ids=["p"], batch=64, padded_prompt_tokens=9, output_tokens=9, vision_ms=1.0,
                         prefill_ms=2.0, decode_ms=3.0, pages_per_s=None, output_tok_s=None, tpot_ms=[],
                         batching="continuous", refill_prefill="per_page")  # fmt: skip
    b = attrs.evolve(b, batches=[refill])
    a = attrs.evolve(
        a, batched_phase=phase("continuous", 4.0, 0.8), batches=[attrs.evolve(refill, refill_prefill="batched")]
    )
    text = render(Path("a"), a, Path("b"), b)
    assert "A: continuous batching (refills prefilled batched), 64 slots" in text
    assert "B: continuous batching (refills prefilled per_page), 64 slots" in text
    # the routed experts a decode step read (dummy weights' few vs spread routing's ~all): 62.5 / 4.0 by hand
    a = attrs.evolve(a, batched_phase=attrs.evolve(phase("static", 4.0, 0.8), routed_experts_read=4.0))
    b = attrs.evolve(b, batched_phase=attrs.evolve(phase("static", 4.0, 0.8), routed_experts_read=62.5))
    text = render(Path("a"), a, Path("b"), b)
    assert "| routed experts read per MoE layer and decode step | 4.0 | 62.5 | 15.62× |" in text
    # the decode bandwidth: 2 TB in 1 s vs 3 TB in 2 s (1,500 / 2,000 GB/s by hand), B's a lower bound
    from llm_perf_opt.results.types import DecodeTraffic

    ta = DecodeTraffic(2 * 10**12, 1.0, 2e12, None, False, "all counted", 10**12, 10**12)
    tb = DecodeTraffic(3 * 10**12, 2.0, 1.5e12, None, True, "some counted", 10**12, 2 * 10**12)
    a = attrs.evolve(a, batched_phase=attrs.evolve(a.batched_phase, decode_traffic=ta))
    b = attrs.evolve(b, batched_phase=attrs.evolve(b.batched_phase, decode_traffic=tb))
    text = render(Path("a"), a, Path("b"), b)
    assert "| decode bandwidth achieved, GB/s (minimum traffic ÷ decode time) | 2,000.0 | ≥ 1,500.0 | 0.75× |" in text


# ------------------------------------------------------------------------------------------ host speed probe
def _probed(s: RunSummary, probe_ms: float, device: str = "cpu", end_ms: float | None = None) -> RunSummary:
    """``s`` with a quiet, good quality line whose host probe took ``probe_ms`` at the start of the run and
    ``end_ms`` (default: the same) at its end."""
    host = HostLoad(usable_cores=2, samples=4, interval_s=0.5, load_1m_mean=0.2, load_1m_max=0.3,
                    other_cpu_share_mean=0.0, other_cpu_share_max=0.0, probe_ms_start=probe_ms,
                    probe_ms_end=probe_ms if end_ms is None else end_ms, probe_work="a fixed workload")  # fmt: skip
    quality = MeasurementQuality(verdict="good", host=host)
    return attrs.evolve(s, quality=quality, hardware=attrs.evolve(s.hardware, device=device))


def test_a_host_ten_percent_slower_widens_the_floor_to_thirty() -> None:
    a = _probed(_run(prefill_ms=BASE), 10.0)
    same = _probed(_run(prefill_ms=_shift(BASE, 25.0)), 10.8)  # +8 %: the same host speed, floor stays 5 %
    slower = _probed(_run(prefill_ms=_shift(BASE, 25.0)), 11.0)  # +10 %: floor 3 × 10 % = 30 % > the 25 % shift
    assert effect_floor(a, same, "prefill_ms", Thresholds()) == pytest.approx(0.05)
    assert effect_floor(a, slower, "prefill_ms", Thresholds()) == pytest.approx(0.3)
    assert _by_metric(a, same)["prefill_ms"].verdict == "WORSE"
    assert _by_metric(a, slower)["prefill_ms"].verdict == "within noise"  # +10 % is within the limit: no exit 2
    beyond = _probed(_run(prefill_ms=_shift(BASE, 35.0)), 11.0)  # 35 % > 30 %: still a regression
    assert _by_metric(a, beyond)["prefill_ms"].verdict == "WORSE"
    text = render(Path("a"), a, Path("b"), slower)
    assert "took 10.00 ms in A and 11.00 ms in B (+10 %)" in text and "smaller than 30 % is not called one" in text
    burst = _probed(_run(prefill_ms=_shift(BASE, 25.0)), 11.0, end_ms=16.0)  # a burst filled B's end window
    assert effect_floor(a, burst, "prefill_ms", Thresholds()) == pytest.approx(0.3)  # B's faster window: +10 %
    assert "the same host speed" in render(Path("a"), a, Path("b"), same)


def test_a_host_that_changed_speed_a_lot_is_inconclusive_unless_the_change_is_larger(tmp_path: Path) -> None:
    """What CI saw: the second run's host 50 % slower, every stage 40-70 % up, both runs 'good'."""
    a = _probed(_run(prefill_ms=BASE, tpot_ms=BASE), 10.0)
    b = _probed(_run(prefill_ms=[1.5 * v for v in BASE], tpot_ms=[1.7 * v for v in BASE]), 15.0)
    d = _by_metric(a, b)
    assert d["prefill_ms"].verdict == "no verdict (host speed +50 % in B: ±150 % unseen)"
    assert not d["prefill_ms"].significant and d["tpot_ms"].verdict == d["prefill_ms"].verdict
    text = render(Path("a"), a, Path("b"), b)
    assert "**The host itself ran slower in B**" in text and "Result: inconclusive" in text
    ra, rb = write_run_dir(tmp_path / "a", a), write_run_dir(tmp_path / "b", b)
    assert compare_main([str(ra), str(rb)]) == 2
    # A change no host drift explains (decode 3× slower: +200 % > 150 %) is still a regression: exit 1.
    c = _probed(_run(prefill_ms=[1.5 * v for v in BASE], tpot_ms=[3.0 * v for v in BASE]), 15.0)
    assert _by_metric(a, c)["tpot_ms"].verdict == "WORSE"
    assert compare_main([str(ra), str(write_run_dir(tmp_path / "c", c))]) == 1


def test_under_a_changed_host_the_step_tail_is_not_compared() -> None:
    a = _probed(_run(prefill_ms=BASE, decode_step_p99_ms=BASE), 10.0)
    b = _probed(_run(prefill_ms=BASE, decode_step_p99_ms=[5 * v for v in BASE]), 15.0)  # p99 5×: contention
    d = _by_metric(a, b)
    assert d["decode_step_p99_ms"].verdict == "no verdict (host speed +50 % in B: tails not compared)"
    assert _by_metric(a, _probed(b, 10.0))["decode_step_p99_ms"].verdict == "WORSE"  # on one host speed: judged


def test_on_a_gpu_run_the_host_probe_only_governs_host_side_time() -> None:
    a = _probed(_run(prefill_ms=BASE, preprocess_ms=BASE), 10.0, device="cuda:0")
    b = _probed(_run(prefill_ms=_shift(BASE, 10.0), preprocess_ms=_shift(BASE, 10.0)), 15.0, device="cuda:0")
    d = _by_metric(a, b)
    assert d["prefill_ms"].verdict == "WORSE"  # timed on the device: the host's speed does not excuse it
    assert d["preprocess_ms"].verdict == "no verdict (host speed +50 % in B: ±150 % unseen)"


def test_runs_without_a_probe_are_compared_as_before() -> None:
    a = _run(prefill_ms=BASE)
    b = _probed(_run(prefill_ms=_shift(BASE, 10.0)), 20.0)
    assert _by_metric(a, b)["prefill_ms"].verdict == "WORSE"
    assert "Host speed: not compared" in render(Path("a"), a, Path("b"), b)


def test_gpu_clock_difference_widens_the_device_floor() -> None:
    """B's GPU at 1,800 MHz against A's 1,980: a compute-bound stage up to 10 % slower for the clock alone, so a
    device-timed change must exceed 20 %; on the same clocks a 15 % change is a regression."""
    a = _probed(_run(prefill_ms=BASE), 10.0, device="cuda:0")
    a = attrs.evolve(a, energy={"mean_sm_clock_mhz": 1980.0})
    b15 = _probed(_run(prefill_ms=_shift(BASE, 15.0)), 10.0, device="cuda:0")
    same = attrs.evolve(b15, energy={"mean_sm_clock_mhz": 1975.0})
    lower = attrs.evolve(b15, energy={"mean_sm_clock_mhz": 1800.0})
    assert _by_metric(a, same)["prefill_ms"].verdict == "WORSE"
    assert effect_floor(a, lower, "prefill_ms", Thresholds()) == pytest.approx(0.2)
    assert _by_metric(a, lower)["prefill_ms"].verdict == "within noise"
    text = render(Path("a"), a, Path("b"), lower)
    assert "- GPU SM clock, mean over the run (NVML): 1,980 MHz in A, 1,800 MHz in B: a compute-bound stage" in text
    assert "smaller than 20 % is not called one" in text
    assert "1,975 MHz in B: the same clocks." in render(Path("a"), a, Path("b"), same)
    assert "GPU SM clock" not in render(Path("a"), _run(prefill_ms=BASE), Path("b"), _run(prefill_ms=BASE))


def test_fold_change_treats_a_halved_rate_like_a_doubled_time() -> None:
    assert fold_change(100.0, 200.0) == pytest.approx(1.0) and fold_change(200.0, 100.0) == pytest.approx(1.0)
    assert fold_change(100.0, 105.0) == pytest.approx(0.05)
    assert fold_change(0.0, 0.0) == 0.0 and fold_change(0.0, 1.0) == math.inf
    assert fold_change(-2.0, -1.0) == pytest.approx(0.5)


def test_a_throughput_collapse_is_seen_even_under_a_changed_host() -> None:
    """Host +50 %: the floor is 150 %.  Decode rate down to a quarter (fold 3.0) is far beyond it; measured as a
    relative change (-75 %) it could never reach a floor above 100 %."""
    a = _probed(_run(decode_tok_s=BASE), 10.0)
    b = _probed(_run(decode_tok_s=[v / 4 for v in BASE]), 15.0)
    assert _by_metric(a, b)["decode_tok_s"].verdict == "WORSE"
