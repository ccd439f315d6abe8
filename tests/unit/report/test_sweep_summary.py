"""report/sweep.py: sweep.md / sweep.json / plots over a fake Hydra multirun directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
from omegaconf import OmegaConf

from llm_perf_opt.errors import LlmPerfOptError
from llm_perf_opt.report.sweep import summarize_sweep
from llm_perf_opt.results.types import Efficiency, HostLoad, MeasurementQuality
from llm_perf_opt.runners.sweep_callback import SweepSummaryCallback
from tests.unit.builders import make_summary, write_job_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _job_summary(prefill: float, tpot: float, **kw):
    return make_summary(
        {
            "prefill_ms": [prefill, prefill + 1, prefill - 1],
            "tpot_ms": [tpot, tpot + 0.1, tpot - 0.1],
            "decode_tok_s": [1000 / tpot] * 3,
            "e2e_ms": [prefill + 100] * 3,
            "peak_mem_allocated_bytes": [2 * 2**30, 3 * 2**30],
        },
        **kw,
    )


@pytest.fixture
def multirun(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    root.mkdir(parents=True)
    eff = [Efficiency("decode", 1e9, 0.01, 1e11, 0.125)]
    write_job_dir(root, "0", ["infer.max_new_tokens=64", "repeats=3"], _job_summary(20.0, 10.0, efficiency=eff))
    write_job_dir(root, "1", ["infer.max_new_tokens=256", "repeats=3"], _job_summary(21.0, 12.0, efficiency=eff))
    job2 = write_job_dir(root, "2", ["infer.max_new_tokens=1024", "repeats=3"], None)
    (job2 / "run.log").write_text("starting\nloading model\nModelLoadError: weights not found: /models/x\n\n")
    (root / "multirun.yaml").write_text("not a job\n")  # non-job entries are ignored
    (root / "notes").mkdir()
    return root


def test_rows_and_failed_job(multirun: Path) -> None:
    rows = summarize_sweep(multirun)
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["swept"] == {"infer.max_new_tokens": "64", "repeats": "3"}
    assert rows[0]["status"] == "complete"
    assert rows[0]["TTFT p50 ms"] == pytest.approx(20.0)
    assert rows[1]["TPOT p50 ms"] == pytest.approx(12.0)
    assert rows[0]["peak alloc GiB"] == pytest.approx(3.0)  # max, in GiB
    assert rows[0]["MFU decode"] == pytest.approx(0.125)
    failed = rows[2]
    assert failed["status"] == "failed"
    assert failed["error"] == "ModelLoadError: weights not found: /models/x"  # last non-blank line of run.log
    assert "TTFT p50 ms" not in failed


def test_sweep_json_matches_rows(multirun: Path) -> None:
    rows = summarize_sweep(multirun)
    assert json.loads((multirun / "sweep.json").read_text()) == rows


def test_sweep_md_table_and_failed_section(multirun: Path) -> None:
    summarize_sweep(multirun)
    md = (multirun / "sweep.md").read_text()
    assert md.startswith("# Sweep summary — 12-00-00")
    assert "3 jobs" in md
    header = next(line for line in md.splitlines() if line.startswith("| job"))
    # repeats=3 is the same in every job: a constant, not a swept axis, so it is not a column
    assert header.startswith("| job | infer.max_new_tokens | status | quality | TTFT p50 ms")
    assert "repeats" not in header
    assert header.rstrip(" |").endswith("MFU decode")
    assert "| [0](0/report.md) | 64 | complete | n/a (not recorded) | 20.000 |" in md
    assert "12.50 %" in md  # MFU rendered as a percentage
    row2 = next(line for line in md.splitlines() if line.startswith("| [2](2/report.md)"))
    assert "| failed | n/a (failed) |" in row2 and row2.count("n/a (failed)") == 8  # quality, 6 key metrics, MFU
    assert "## Failed jobs" in md
    assert "- job 2 ({'infer.max_new_tokens': '1024', 'repeats': '3'}): ModelLoadError: weights not found" in md


def test_plot_for_numeric_swept_key(multirun: Path) -> None:
    summarize_sweep(multirun)
    png = multirun / "sweep_infer_max_new_tokens.png"
    assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC
    # repeats has one value only → no plot
    assert not (multirun / "sweep_repeats.png").exists()
    assert "![sweep_infer_max_new_tokens.png](sweep_infer_max_new_tokens.png)" in (multirun / "sweep.md").read_text()


def test_categorical_key_is_plotted_on_a_categorical_axis(tmp_path: Path) -> None:
    """A config-group key gets a plot too: its values are evenly spaced, labelled categories (issue 14)."""
    write_job_dir(tmp_path, "0", ["model/deepseek_ocr/arch=deepseek_ocr.tiny"], _job_summary(10.0, 5.0))
    write_job_dir(tmp_path, "1", ["model/deepseek_ocr/arch=deepseek_ocr.dummy"], _job_summary(11.0, 6.0))
    rows = summarize_sweep(tmp_path)
    assert [r["status"] for r in rows] == ["complete", "complete"]
    png = tmp_path / "sweep_model_deepseek_ocr_arch.png"
    assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC
    md = (tmp_path / "sweep.md").read_text()
    assert "## Failed jobs" not in md


def test_noisy_jobs_are_flagged_in_sweep_md(tmp_path: Path) -> None:
    import attrs

    from llm_perf_opt.results.types import MeasurementQuality

    noisy = attrs.evolve(_job_summary(10.0, 5.0), quality=MeasurementQuality("noisy", reasons=["load 7 > 2 cores"]))
    write_job_dir(tmp_path, "0", ["repeats=2"], noisy)
    write_job_dir(tmp_path, "1", ["repeats=4"], attrs.evolve(noisy, quality=MeasurementQuality("good")))
    rows = summarize_sweep(tmp_path)
    assert [r["quality"] for r in rows] == ["noisy", "good"]
    md = (tmp_path / "sweep.md").read_text()
    assert "| [0](0/report.md) | 2 | complete | noisy |" in md
    assert "**Measurement quality:** 1 of 2 jobs noisy" in md and "- job 0: load 7 > 2 cores" in md


def test_failed_job_without_log_and_unreadable_metrics(tmp_path: Path) -> None:
    write_job_dir(tmp_path, "0", ["seed=1"], None)
    job1 = write_job_dir(tmp_path, "1", ["seed=2"], _job_summary(10.0, 5.0, schema_version="7.0"))
    write_job_dir(tmp_path, "10", ["seed=3"], _job_summary(10.0, 5.0, status="partial", status_reason="SIGINT"))
    (job1 / "run.log").write_text("")
    rows = summarize_sweep(tmp_path)
    assert [r["job"] for r in rows] == ["0", "1", "10"]
    assert rows[0]["error"] == "no metrics.json written"
    assert rows[1]["status"] == "failed" and "unreadable metrics.json" in rows[1]["error"]
    assert "schema_version 7.0" in rows[1]["error"]
    assert rows[2]["status"] == "partial" and rows[2]["error"] == "SIGINT"
    # seed is numeric, but only one job (10) did not fail → one x value, no plot
    assert not list(tmp_path.glob("*.png"))


def test_job_order_is_numeric(tmp_path: Path) -> None:
    for j in ("10", "2", "1"):
        write_job_dir(tmp_path, j, [f"seed={j}"], _job_summary(10.0, 5.0))
    assert [r["job"] for r in summarize_sweep(tmp_path)] == ["1", "2", "10"]


def test_job_without_overrides_file(tmp_path: Path) -> None:
    job = write_job_dir(tmp_path, "0", [], _job_summary(10.0, 5.0))
    (job / ".hydra" / "overrides.yaml").unlink()
    (row,) = summarize_sweep(tmp_path)
    assert row["swept"] == {} and row["status"] == "complete"


def test_structurally_invalid_metrics_is_a_failed_row(tmp_path: Path) -> None:
    write_job_dir(tmp_path, "0", ["seed=1"], _job_summary(10.0, 5.0))
    job1 = write_job_dir(tmp_path, "1", ["seed=2"], None)
    (job1 / "metrics.json").write_text(json.dumps({"schema_version": "1.0", "pages": []}))
    rows = summarize_sweep(tmp_path)
    assert rows[1]["status"] == "failed"
    assert "unreadable metrics.json" in rows[1]["error"]


def test_callback_writes_summary_then_exits_nonzero_on_a_failed_job(
    multirun: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The callback decides the sweep's exit status (behaviour moved here from a module-level list that the CLI
    # read): job 2 of the fixture failed, so it exits non-zero after writing the summary.
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(multirun)}}})
    with pytest.raises(SystemExit) as stop:
        SweepSummaryCallback().on_multirun_end(cfg)
    assert stop.value.code == LlmPerfOptError.exit_code  # the same status the CLI used before the move
    assert "1 sweep job(s) failed: ['2'] (see sweep.md)" in capsys.readouterr().err
    assert (multirun / "sweep.md").is_file() and (multirun / "sweep.json").is_file()


def test_callback_returns_when_every_job_succeeded(tmp_path: Path) -> None:
    write_job_dir(tmp_path, "0", ["seed=1"], _job_summary(10.0, 5.0))
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    SweepSummaryCallback().on_multirun_end(cfg)
    assert (tmp_path / "sweep.md").is_file()


def test_job_left_running_is_a_failed_row(tmp_path: Path) -> None:
    write_job_dir(tmp_path, "0", ["seed=1"], _job_summary(10.0, 5.0, status="running"))
    (row,) = summarize_sweep(tmp_path)
    assert row["status"] == "failed" and "still says running" in row["error"]


def test_callback_ignores_missing_dir(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "nope")}}})
    SweepSummaryCallback().on_multirun_end(cfg)
    assert not (tmp_path / "nope").exists()


def _probed(summary: Any, probe_ms: float) -> Any:
    host = HostLoad(usable_cores=2, samples=1, interval_s=0.5, load_1m_mean=0.1, load_1m_max=0.1,
                    other_cpu_share_mean=0.0, other_cpu_share_max=0.0, probe_ms_start=probe_ms + 1.0,
                    probe_ms_end=probe_ms, probe_work="w")  # fmt: skip
    return attrs.evolve(summary, quality=MeasurementQuality("good", host=host))


def test_jobs_on_a_host_of_another_speed_are_flagged(tmp_path: Path) -> None:
    # probes 10, 10.5, 14 ms: median 10.5; 14 is +33 % off it, 10 is -5 % (within 15 %)
    for job, probe in (("0", 10.0), ("1", 10.5), ("2", 14.0)):
        write_job_dir(tmp_path, job, [f"repeats={job}"], _probed(_job_summary(10.0, 5.0), probe))
    rows = summarize_sweep(tmp_path)
    assert [r["host_probe_ms"] for r in rows] == [10.0, 10.5, 14.0]  # each run's faster window
    md = (tmp_path / "sweep.md").read_text()
    assert "the fixed CPU probe took 10.00–14.00 ms over 3 jobs (median 10.50 ms); 1 job(s)" in md
    assert "- job 2: 14.00 ms (+33 %)" in md and "- job 0" not in md


def test_jobs_on_one_host_speed_get_one_line(tmp_path: Path) -> None:
    for job, probe in (("0", 10.0), ("1", 11.0)):
        write_job_dir(tmp_path, job, [f"repeats={job}"], _probed(_job_summary(10.0, 5.0), probe))
    summarize_sweep(tmp_path)
    assert "every job within ±15 % of it." in (tmp_path / "sweep.md").read_text()


def test_batched_phase_columns_where_a_job_ran_one(tmp_path: Path) -> None:
    """A sweep over the batched settings: the jobs' batched phases end to end (pages/s, output tok/s, preparation
    included) as two columns; a job without one says so.  A sweep where no job ran one has no such columns."""
    from llm_perf_opt.results.types import BatchedPhase

    phase = BatchedPhase(batching="continuous", slots=8, batches=1, pages=64, output_tokens=12_800, wall_ms=8_000.0,
                         stage_ms=7_000.0, page_wait_ms=500.0, other_ms=500.0, pages_per_s=8.0, output_tok_s=1_600.0,
                         slot_occupancy=0.75, gpu_busy_share=None)  # fmt: skip
    root = tmp_path / "multirun"
    root.mkdir()
    with_phase = attrs.evolve(_job_summary(20.0, 10.0), batched_phase=phase)
    write_job_dir(root, "0", ["infer.batch_size=8"], with_phase)
    write_job_dir(root, "1", ["infer.batch_size=1"], _job_summary(20.0, 10.0))
    rows = summarize_sweep(root)
    assert rows[0]["batched pages/s e2e"] == 8.0 and rows[0]["batched tok/s e2e"] == 1_600.0
    assert rows[1]["batched pages/s e2e"] is None
    md = (root / "sweep.md").read_text()
    assert "| batched pages/s e2e | batched tok/s e2e |" in md
    assert "| 8.000 | 1,600.000 |" in md
    assert "n/a (no batched phase in this job: see its report) |" in md
    assert "batched decode GB/s" not in md  # no job gave the decode traffic: no column
    # with the decode traffic: 3 TB in 2 s = 1,500 GB/s, a lower bound in job 0, exact in job 1
    from llm_perf_opt.results.types import DecodeTraffic

    low = DecodeTraffic(3 * 10**12, 2.0, 1.5e12, None, True, "some counted", 10**12, 2 * 10**12)
    traffic = tmp_path / "traffic"
    traffic.mkdir()
    for job, t in (("0", low), ("1", attrs.evolve(low, lower_bound=False))):
        summary = attrs.evolve(_job_summary(20.0, 10.0), batched_phase=attrs.evolve(phase, decode_traffic=t))
        write_job_dir(traffic, job, [f"infer.batch_size={8 * (int(job) + 1)}"], summary)
    rows = summarize_sweep(traffic)
    assert [r["batched decode GB/s"] for r in rows] == [1_500.0, 1_500.0]
    md = (traffic / "sweep.md").read_text()
    assert "| batched pages/s e2e | batched tok/s e2e | batched decode GB/s |" in md
    assert "| 8.000 | 1,600.000 | ≥ 1,500.0 |" in md and "| 8.000 | 1,600.000 | 1,500.0 |" in md
    plain = tmp_path / "plain"
    plain.mkdir()
    write_job_dir(plain, "0", ["repeats=2"], _job_summary(20.0, 10.0))
    write_job_dir(plain, "1", ["repeats=3"], _job_summary(21.0, 10.0))
    summarize_sweep(plain)
    assert "batched" not in (plain / "sweep.md").read_text()
