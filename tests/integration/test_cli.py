"""End-to-end: the real CLI (``python -m llm_perf_opt.runners.llm_profile_runner``) as a subprocess.

Every run is the tiny CPU model with its outputs under tmp_path.  What is checked: the artifacts and the
plausibility of their numbers, sweeps, one-line errors for every bad input, per-page isolation, injected
OOM, Ctrl-C, a full disk, resume, and run-dir uniqueness.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

from llm_perf_opt.results.serialize import read_summary
from llm_perf_opt.results.types import RunSummary
from llm_perf_opt.runners.llm_profile_runner import preflight_output_dir
from tests.integration.conftest import (
    ROOT,
    SMALL,
    TINY,
    CliResult,
    assert_clean_failure,
    cli_command,
    cli_env,
    read_jsonl,
    read_metrics,
    run_cli,
)
from tests.integration.inject_oom import INJECT_OOM_ENV

RUN_FILES = (
    "report.md",
    "operators.md",
    "metrics.json",
    "pages.jsonl",
    "predictions.jsonl",
    "predictions.md",
    "env.json",
    "inputs.yaml",
    "config.yaml",
    "run.log",
    "trace.json.gz",
    "stakeholder_summary.md",
    "assumptions.md",
    "static_compute.json",
    "static_compute.md",
)


def _text_ids_of_default_prompt() -> int:
    """Text ids of the tiny model's prompt (the <image> marker excluded), from its own tokenizer."""
    from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig
    from llm_perf_opt.models.deepseek_ocr.tokenizer import load_tokenizer

    cfg = DeepseekOCRConfig.from_json(ROOT / "src/llm_perf_opt/models/deepseek_ocr/configs/tiny.json")
    ids = load_tokenizer(None, cfg).encode_prompt("<image>\n<|grounding|>Convert the document to markdown.")
    return sum(1 for i in ids if i != cfg.image_token_id)


# ------------------------------------------------------------------------------------------- 1. default


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> CliResult:
    """The embedded default (tiny model, 3 synthetic pages, 3 repeats) with only the run dir overridden."""
    return run_cli([], tmp_path_factory.mktemp("default") / "run")


def test_default_run_writes_every_artifact(default_run: CliResult) -> None:
    assert default_run.returncode == 0, default_run.describe()
    assert "Traceback" not in default_run.stderr
    assert default_run.run_dir is not None
    missing = [name for name in RUN_FILES if not (default_run.run_dir / name).is_file()]
    assert not missing, missing


def test_default_run_links_every_artifact_and_states_its_quality(default_run: CliResult) -> None:
    """report.md links files that exist (run.log included) and opens with the measurement-quality line, the
    same verdict as metrics.json; the CPU run says how many torch threads it used and why."""
    assert default_run.run_dir is not None
    report = (default_run.run_dir / "report.md").read_text()
    links = re.findall(r"\[([^\]]+)\]\(([^)]+)\)", report.split("Artifacts: ", 1)[1])
    assert {"run.log", "static_compute.md", "stakeholder_summary.md", "assumptions.md"} <= {t for t, _ in links}
    assert all((default_run.run_dir / target).is_file() for _, target in links), links
    quality = read_metrics(default_run.run_dir)["quality"]
    head = report.split("## Setup", 1)[0]
    assert f"**Measurement quality: {quality['verdict']}**" in head
    assert quality["host"]["samples"] >= 1 and quality["host"]["usable_cores"] >= 1
    # cli_env sets OMP_NUM_THREADS=1 for the test subprocesses: the run follows it and says so.
    assert quality["cpu_threads"].startswith("1 torch threads (OMP_NUM_THREADS=1")
    assert "CPU run: 1 torch threads" in head
    summary = (default_run.run_dir / "stakeholder_summary.md").read_text()
    assert "dominates" in summary and "The one figure to watch" in summary


def test_default_run_metrics_are_plausible(default_run: CliResult) -> None:
    assert default_run.run_dir is not None
    summary = read_summary(default_run.run_dir / "metrics.json")
    assert isinstance(summary, RunSummary)
    assert summary.run.status == "complete"
    cap = summary.run.config["infer"]["max_new_tokens"]
    repeats = summary.run.config["repeats"]
    n_sizes = len(summary.run.config["dataset"]["sizes"])
    assert len(summary.pages) == repeats * n_sizes
    assert {(p.page_id, p.repeat) for p in summary.pages} == {
        (p.page_id, r) for p in summary.pages for r in range(repeats)
    }
    n_text = _text_ids_of_default_prompt()
    for page in summary.pages:
        where = f"{page.page_id} repeat {page.repeat}"
        assert page.status == "ok", where
        assert page.prefill_ms is not None and page.vision_ms is not None and page.sam_ms is not None, where
        assert page.prefill_ms > page.vision_ms > 0, where
        assert page.vision_ms >= page.sam_ms, where
        assert page.generated_tokens is not None and 1 <= page.generated_tokens <= cap, where
        assert len(page.decode_step_ms) == page.generated_tokens - 1, where
        if page.generated_tokens >= 2:
            # decode_ms is computed as Σ decode_step_ms, so comparing the two proves nothing; the exact TPOT /
            # tok/s / percentile arithmetic is checked on a scripted clock (test_scripted_clock.py).  Here: every
            # step measured something, and the step percentiles lie inside the steps' own range.
            assert page.decode_ms is not None and page.decode_ms > 0, where
            assert all(s > 0 for s in page.decode_step_ms), where
            lo, hi = min(page.decode_step_ms), max(page.decode_step_ms)
            for p in (page.decode_step_p50_ms, page.decode_step_p99_ms):
                assert p is not None and lo <= p <= hi, where
        assert page.image_tokens is not None, where
        assert page.prompt_tokens == page.image_tokens + 1 + n_text, where  # bos + image run + text
    assert summary.run.finished_at is not None
    for metric in ("prefill_ms", "decode_ms", "tpot_ms"):
        assert metric in summary.aggregates, metric
    # An independent clock: the pages' own end-to-end times fit inside the run's wall time (started_at /
    # finished_at, whole seconds, hence the 2 s slack); a stage time inflated or double counted breaks this.
    import datetime as dt

    wall_s = dt.datetime.fromisoformat(summary.run.finished_at) - dt.datetime.fromisoformat(summary.run.started_at)
    e2e_s = sum(p.e2e_ms or 0.0 for p in summary.pages) / 1e3
    assert 0 < e2e_s <= wall_s.total_seconds() + 2.0, (e2e_s, wall_s)


def test_default_run_operators_total_matches_metrics(default_run: CliResult) -> None:
    assert default_run.run_dir is not None
    summary = read_summary(default_run.run_dir / "metrics.json")
    assert summary.profile is not None
    text = (default_run.run_dir / "operators.md").read_text()
    match = re.search(r"Total self time over \*\*all\*\* operators: \*\*([\d,.]+) ms\*\*", text)
    assert match, text[:500]
    stated = float(match.group(1).replace(",", ""))
    assert stated == pytest.approx(summary.profile.total_self_ms, abs=0.0005)
    assert summary.profile.total_self_ms > 0


def test_default_run_journal_and_predictions_agree(default_run: CliResult) -> None:
    assert default_run.run_dir is not None
    journal = read_jsonl(default_run.run_dir / "pages.jsonl")
    metrics = read_metrics(default_run.run_dir)
    assert [(r["page_id"], r["repeat"]) for r in journal] == [(p["page_id"], p["repeat"]) for p in metrics["pages"]]
    predictions = read_jsonl(default_run.run_dir / "predictions.jsonl")
    assert len(predictions) == len(journal)
    assert "**Status: COMPLETE**" in (default_run.run_dir / "report.md").read_text()


# ------------------------------------------------------------------------------------------ 2. multirun


def _check_sweep(sweep: Path, result: CliResult) -> None:
    assert result.returncode == 0, result.describe()
    for job in ("0", "1"):
        metrics = read_metrics(sweep / job)
        assert metrics["run"]["status"] == "complete", job
    assert (sweep / "sweep.md").is_file()
    rows = json.loads((sweep / "sweep.json").read_text())
    assert isinstance(rows, list) and len(rows) == 2, rows
    table_rows = [line for line in (sweep / "sweep.md").read_text().splitlines() if line.startswith("| [")]
    assert len(table_rows) == 2, table_rows


def test_multirun_sweep_writes_jobs_and_summary(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    small = [a for a in SMALL if not a.startswith("repeats=")]
    result = run_cli(["-m", "repeats=1,2", *small, f"hydra.sweep.dir={sweep}"])
    _check_sweep(sweep, result)
    assert {p["repeat"] for p in read_metrics(sweep / "1")["pages"]} == {0, 1}


def test_multirun_local_parallel_launcher(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="hydra-joblib-launcher not installed")
    sweep = tmp_path / "sweep"
    small = [a for a in SMALL if not a.startswith("repeats=")]
    result = run_cli(["-m", "hydra/launcher=local_parallel", "repeats=1,2", *small, f"hydra.sweep.dir={sweep}"])
    _check_sweep(sweep, result)


def test_multirun_failed_job_is_a_row_and_the_sweep_goes_on(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    small = [a for a in SMALL if not a.startswith("repeats=")]
    result = run_cli(["-m", "repeats=0,1", *small, f"hydra.sweep.dir={sweep}"])
    assert result.returncode != 0, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert [ln for ln in result.stderr.splitlines() if ln.startswith("job 0: ConfigError:")], result.describe()
    assert read_metrics(sweep / "1")["run"]["status"] == "complete"  # job 1 still ran
    rows = {r["job"]: r for r in json.loads((sweep / "sweep.json").read_text())}
    assert rows["0"]["status"] == "failed" and "repeats" in rows["0"]["error"]
    assert rows["1"]["status"] == "complete"
    assert "## Failed jobs" in (sweep / "sweep.md").read_text()


# ---------------------------------------------------------------------------------------- 3. bad inputs

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@attrs.frozen
class BadCase:
    """One bad input: ``build(case_dir)`` prepares files and returns the CLI args (run dir included)."""

    id: str
    kind: str  # the error class printed as "<kind>: ...", or "hydra" for Hydra's own config errors
    needles: Callable[[Path], tuple[str, ...]]
    build: Callable[[Path], list[str]]
    skip: str | None = None


def _run_dir(d: Path) -> str:
    return f"hydra.run.dir={d / 'run'}"


def _checkpoint_config_only(d: Path) -> list[str]:
    (d / "ckpt").mkdir()
    shutil.copy(TINY / "config.json", d / "ckpt" / "config.json")
    return [*SMALL, "model/deepseek_ocr/arch=deepseek_ocr.default", f"model.path={d / 'ckpt'}", _run_dir(d)]


def _checkpoint_wrong_shape(d: Path) -> list[str]:
    from safetensors.torch import load_file, save_file

    (d / "ckpt").mkdir()
    shutil.copy(TINY / "config.json", d / "ckpt" / "config.json")
    tensors = load_file(str(TINY / "weights.safetensors"))
    key = "model.projector.layers.weight"
    rows, cols = tensors[key].shape
    tensors[key] = tensors[key].reshape(cols, rows).contiguous()
    save_file(tensors, str(d / "ckpt" / "model.safetensors"))
    return [*SMALL, "model/deepseek_ocr/arch=deepseek_ocr.default", f"model.path={d / 'ckpt'}", _run_dir(d)]


def _read_only_parent(d: Path) -> list[str]:
    (d / "ro").mkdir()
    (d / "ro").chmod(0o500)
    return [*SMALL, f"hydra.run.dir={d / 'ro' / 'run'}"]


def _under_regular_file(d: Path) -> list[str]:
    (d / "afile").write_text("not a directory\n")
    return [*SMALL, f"hydra.run.dir={d / 'afile' / 'run'}"]


def _folder(d: Path, root: Path, *extra: str) -> list[str]:
    small = [a for a in SMALL if not a.startswith("dataset.")]
    return [*small, "dataset=folder", f"dataset.root={root}", *extra, _run_dir(d)]


def _empty_root(d: Path) -> list[str]:
    (d / "pages").mkdir()
    (d / "pages" / "notes.txt").write_text("no images here\n")
    return _folder(d, d / "pages")


def _root_is_file(d: Path) -> list[str]:
    (d / "pages.png").write_bytes(b"")
    return _folder(d, d / "pages.png")


def _subset_missing_page(d: Path) -> list[str]:
    (d / "pages").mkdir()
    shutil.copy(TINY / "cases" / "global_only.png", d / "pages" / "a.png")
    (d / "subset.txt").write_text("a.png\nmissing.png\n")
    return _folder(d, d / "pages", f"dataset.subset_filelist={d / 'subset.txt'}")


def _resume_without_journal(d: Path) -> list[str]:
    (d / "earlier").mkdir()
    return [*SMALL, f"resume={d / 'earlier'}", _run_dir(d)]


BAD_CASES = [
    BadCase(
        "missing_model_dir",
        "ModelLoadError",
        lambda d: ("model directory not found", str(d / "nope")),
        lambda d: [*SMALL, "model/deepseek_ocr/arch=deepseek_ocr.default", f"model.path={d / 'nope'}", _run_dir(d)],
    ),
    BadCase(
        "config_json_without_weights",
        "ModelLoadError",
        lambda d: ("no weight files", str(d / "ckpt")),
        _checkpoint_config_only,
    ),
    BadCase(
        "weight_with_wrong_shape",
        "ModelLoadError",
        lambda d: ("model.projector.layers.weight", "expected (64, 128)", "found (128, 64)"),
        _checkpoint_wrong_shape,
    ),
    BadCase("unknown_device", "DeviceError", lambda d: ("tpu:0",), lambda d: [*SMALL, "device=tpu:0", _run_dir(d)]),
    BadCase(
        "cuda_without_cuda",
        "DeviceError",
        lambda d: ("cuda:0", "CUDA is not available"),
        lambda d: [*SMALL, "device=cuda:0", _run_dir(d)],
        skip="CUDA is available here" if torch.cuda.is_available() else None,
    ),
    BadCase(
        "repeats_zero", "ConfigError", lambda d: ("repeats", "got 0"), lambda d: [*SMALL, "repeats=0", _run_dir(d)]
    ),
    BadCase(
        "max_new_tokens_zero",
        "ConfigError",
        lambda d: ("infer.max_new_tokens", "got 0"),
        lambda d: [*SMALL, "infer.max_new_tokens=0", _run_dir(d)],
    ),
    BadCase(
        "max_new_tokens_negative",
        "ConfigError",
        lambda d: ("infer.max_new_tokens", "got -3"),
        lambda d: [*SMALL, "infer.max_new_tokens=-3", _run_dir(d)],
    ),
    BadCase(
        "run_dir_not_writable",
        "OutputError",
        lambda d: (str(d / "ro"), "not writable"),
        _read_only_parent,
        skip="root ignores permissions (run_dir_under_regular_file covers this path)" if IS_ROOT else None,
    ),
    BadCase(
        "run_dir_under_regular_file",
        "OutputError",
        lambda d: (str(d / "afile"), "is a file, not a directory"),
        _under_regular_file,
    ),
    BadCase("dataset_root_empty", "InputError", lambda d: ("no images found", str(d / "pages")), _empty_root),
    BadCase(
        "dataset_root_missing",
        "InputError",
        lambda d: ("dataset root does not exist", str(d / "missing")),
        lambda d: _folder(d, d / "missing"),
    ),
    BadCase("dataset_root_is_a_file", "InputError", lambda d: ("not a directory", str(d / "pages.png")), _root_is_file),
    BadCase(
        "subset_lists_missing_page",
        "InputError",
        lambda d: (f"{d / 'subset.txt'}:2", "missing.png"),
        _subset_missing_page,
    ),
    BadCase(
        "resume_without_journal",
        "ConfigError",
        lambda d: ("resume=", "pages.jsonl not found"),
        _resume_without_journal,
    ),
    BadCase(
        "unknown_config_group_option",
        "hydra",
        lambda d: ("Could not find 'dataset/nope'",),
        lambda d: [*SMALL, "dataset=nope", _run_dir(d)],
    ),
    BadCase(
        "misspelled_key",
        "hydra",
        lambda d: ("Could not override 'repeatz'",),
        lambda d: [*SMALL, "repeatz=3", _run_dir(d)],
    ),
]


@pytest.fixture(scope="module")
def bad_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, CliResult]]:
    """All bad-input runs at once, a few in parallel (each is mostly interpreter + torch start-up)."""
    base = tmp_path_factory.mktemp("bad")
    todo = []
    for case in BAD_CASES:
        if case.skip:
            continue
        d = base / case.id
        d.mkdir()
        todo.append((case.id, d, case.build(d)))
    workers = min(4, max(2, os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {cid: (d, pool.submit(run_cli, args)) for cid, d, args in todo}
        results = {cid: (d, fut.result()) for cid, (d, fut) in futures.items()}
    for _, d, _ in todo:  # let tmp_path cleanup remove the read-only dir
        if (d / "ro").exists():
            (d / "ro").chmod(0o700)
    return results


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.id for c in BAD_CASES])
def test_bad_input_fails_with_one_line(case: BadCase, bad_results: dict[str, tuple[Path, CliResult]]) -> None:
    if case.skip:
        pytest.skip(case.skip)
    d, result = bad_results[case.id]
    if case.kind == "hydra":
        assert result.returncode != 0, result.describe()
        assert "Traceback" not in result.stderr, result.describe()
        for needle in case.needles(d):
            assert needle in result.stderr, result.describe()
        return
    line = assert_clean_failure(result, case.kind, *case.needles(d))
    print(f"\n{case.id}: {line}")
    run_dir = d / "run"
    # Nothing was measured yet, so nothing may claim to be: no metrics.json, and the traceback is in run.log.
    assert not (run_dir / "metrics.json").exists()
    if (run_dir / "run.log").is_file() and case.kind != "OutputError":
        log = (run_dir / "run.log").read_text()
        assert "Traceback" in log and case.kind in log, log[-2000:]


# Preflight of the run dir (Hydra creates it before our code runs): in-process, no subprocess.
@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["hydra.run.dir={file}/run"], "is a file"),
        (["hydra.run.dir='{file}/run'"], "is a file"),
        (["hydra.run.dir={file}/${{run_id}}"], "is a file"),
        (["++hydra.run.dir={file}/x/y"], "is a file"),
        (["-m", "hydra.sweep.dir={file}/sw"], "is a file"),
        (["-m", "hydra.run.dir={file}/run"], None),  # multirun never creates the run dir
        (["hydra.run.dir={dir}/new/${{run_id}}"], None),
        (["hydra.run.dir={dir}/run-${{run_id}}"], None),
        (["--cfg", "job", "hydra.run.dir={file}/run"], None),
        ([], None),  # default tmp/stage1/${run_id} under the (writable) cwd
    ],
)
def test_preflight_output_dir(tmp_path: Path, argv: list[str], problem: str | None) -> None:
    (tmp_path / "afile").write_text("x")
    args = [a.format(file=tmp_path / "afile", dir=tmp_path) for a in argv]
    err = preflight_output_dir(args, cwd=tmp_path)
    if problem is None:
        assert err is None
    else:
        assert err is not None and problem in err.message and str(tmp_path / "afile") in err.message


def test_preflight_unwritable_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a non-root user sees for a read-only parent (root ignores modes, so os.access is faked)."""
    import llm_perf_opt.runners.llm_profile_runner as runner

    monkeypatch.setattr(runner.os, "access", lambda path, mode: Path(path) != tmp_path / "ro")
    (tmp_path / "ro").mkdir()
    err = preflight_output_dir([f"hydra.run.dir={tmp_path / 'ro' / 'run'}"], cwd=tmp_path)
    assert err is not None
    assert err.one_line().startswith(f"OutputError: cannot create the run directory {tmp_path / 'ro' / 'run'}: ")
    assert f"{tmp_path / 'ro'} is not writable" in err.message


# ---------------------------------------------------------------------------------- 4. per-page isolation


@pytest.fixture
def mixed_pages(tmp_path: Path) -> Path:
    """A corrupt page first (so warmup/profiler must pick another), one good page, two more bad ones."""
    root = tmp_path / "pages"
    root.mkdir()
    (root / "a_corrupt.png").write_bytes(bytes(range(256)) * 12)
    shutil.copy(TINY / "cases" / "global_only.png", root / "b_good.png")
    (root / "c_empty.png").write_bytes(b"")
    (root / "d_text.jpg").write_text("this is a text file, not a JPEG\n")
    return root


def _folder_args(root: Path, *extra: str) -> list[str]:
    return [*(a for a in SMALL if not a.startswith("dataset.")), "dataset=folder", f"dataset.root={root}", *extra]


def test_bad_pages_fail_alone(tmp_path: Path, mixed_pages: Path) -> None:
    # Warmup on the first *dataset* page: the corrupt first file must not abort warmup either.
    result = run_cli(_folder_args(mixed_pages, "profiling.warmup_synthetic=false"), tmp_path / "run")
    assert result.returncode == 0, result.describe()
    metrics = read_metrics(tmp_path / "run")
    assert metrics["run"]["status"] == "complete"
    pages = {p["page_id"]: p for p in metrics["pages"]}
    assert set(pages) == {"a_corrupt.png", "b_good.png", "c_empty.png", "d_text.jpg"}
    assert pages["b_good.png"]["status"] == "ok"
    assert pages["b_good.png"]["generated_tokens"] >= 1
    for name in ("a_corrupt.png", "c_empty.png", "d_text.jpg"):
        assert pages[name]["status"] == "failed", name
        assert name in pages[name]["error"], pages[name]
        assert pages[name]["error_type"] == "InputError"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Failed pages" in report
    failed_section = report.split("## Failed pages", 1)[1]
    for name in ("a_corrupt.png", "c_empty.png", "d_text.jpg"):
        assert name in failed_section, name
    # The corrupt first file did not cost the profiler pass: it ran on the first page that decodes.
    assert metrics["profile"] is not None and metrics["profile"]["page_id"] == "b_good.png"
    assert (tmp_path / "run" / "operators.md").is_file()


def test_fail_fast_stops_and_keeps_finished_pages(tmp_path: Path, mixed_pages: Path) -> None:
    listing = tmp_path / "subset.txt"
    listing.write_text("b_good.png\nc_empty.png\nd_text.jpg\n")
    # ignore_eos: the finished page decodes exactly the cap (8), so its per-step times are known in number
    args = _folder_args(mixed_pages, f"dataset.subset_filelist={listing}", "fail_fast=true", "infer.ignore_eos=true")
    result = run_cli(args, tmp_path / "run")
    line = assert_clean_failure(result, "PageError", "fail_fast", "c_empty.png")
    print(f"\nfail_fast: {line}")
    metrics = read_metrics(tmp_path / "run")
    assert metrics["run"]["status"] == "failed"
    assert [(p["page_id"], p["status"]) for p in metrics["pages"]] == [("b_good.png", "ok"), ("c_empty.png", "failed")]
    first = metrics["pages"][0]
    # the finished page keeps its per-step times: one per decode step, none empty
    assert first["generated_tokens"] == 8, first
    assert len(first["decode_step_ms"]) == first["generated_tokens"] - 1 and all(s > 0 for s in first["decode_step_ms"])
    journal = read_jsonl(tmp_path / "run" / "pages.jsonl")
    assert [r["page_id"] for r in journal] == ["b_good.png", "c_empty.png"]
    assert "FAILED" in (tmp_path / "run" / "report.md").read_text()


# ------------------------------------------------------------------------------------------ 5. OOM


def test_injected_oom_fails_only_that_page(tmp_path: Path) -> None:
    victim = "synthetic-400x300-1"
    result = run_cli(
        [*SMALL, "dataset.sizes=[[300,200],[400,300]]"],
        tmp_path / "run",
        env={INJECT_OOM_ENV: victim},
        module="tests.integration.inject_oom",
    )
    assert result.returncode == 0, result.describe()
    metrics = read_metrics(tmp_path / "run")
    assert metrics["run"]["status"] == "complete"
    pages = {p["page_id"]: p for p in metrics["pages"]}
    assert pages[victim]["status"] == "failed"
    assert "out of memory" in pages[victim]["error"]
    assert pages[victim]["error_type"] == "OutOfMemoryError"
    assert pages["synthetic-300x200-0"]["status"] == "ok"


# ---------------------------------------------------------------------------------------- 6. SIGINT


def test_sigint_during_decode_leaves_a_partial_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        "profiling/torch=torch-profiler.min",
        "output.plots=false",
        "repeats=3",
        "infer.max_new_tokens=5000",
        "infer.ignore_eos=true",
        "dataset.sizes=[[300,200],[400,300],[500,400]]",
        f"hydra.run.dir={run_dir}",
    ]
    journal = run_dir / "pages.jsonl"
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(cli_command(args), cwd=ROOT, env=cli_env(), stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 180  # generous: a loaded CI box can be many times slower
            while time.monotonic() < deadline and proc.poll() is None:
                if journal.is_file() and journal.read_text().count("\n") >= 1:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "the run ended before it could be interrupted"
            assert journal.is_file(), "no page finished within 180 s"
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=30)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert rc != 0, stderr
    assert took < 30
    assert "Traceback" not in stderr, stderr
    assert len([ln for ln in stderr.splitlines() if ln.startswith("RunInterrupted:")]) == 1, stderr
    assert "  hint: resume=" in stderr, stderr
    metrics = read_metrics(run_dir)
    assert metrics["run"]["status"] == "partial"
    assert "SIGINT" in (metrics["run"]["status_reason"] or "")
    finished = {(r["page_id"], r["repeat"]) for r in read_jsonl(journal) if r["status"] == "ok"}
    assert finished, "at least one page finished before the signal"
    in_metrics = {(p["page_id"], p["repeat"]) for p in metrics["pages"] if p["status"] == "ok"}
    assert finished <= in_metrics
    assert len(finished) < 9  # it really stopped early
    assert "PARTIAL" in (run_dir / "report.md").read_text()


# ------------------------------------------------------------------------------------- 7. disk full

SITECUSTOMIZE = '''
"""Test double: metrics.json writes fail with ENOSPC after FAIL_METRICS_AFTER successful ones."""
import errno
import os
from pathlib import Path

import llm_perf_opt.results.serialize as _serialize

_real = _serialize.atomic_write_text
_calls = [0]


def _atomic_write_text(path, text):
    if Path(path).name == "metrics.json":
        _calls[0] += 1
        if _calls[0] > int(os.environ["FAIL_METRICS_AFTER"]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return _real(path, text)


_serialize.atomic_write_text = _atomic_write_text
'''


def test_disk_full_keeps_finished_pages(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    pythonpath = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    # metrics.json is written once before the first page, then after every page: 2 = the first page's write.
    env = {"PYTHONPATH": pythonpath, "FAIL_METRICS_AFTER": "2"}
    sizes = "dataset.sizes=[[300,200],[400,300],[500,400]]"
    result = run_cli([*SMALL, sizes], tmp_path / "run", env=env)
    line = assert_clean_failure(result, "OutputError", "metrics.json", os.strerror(errno.ENOSPC))
    print(f"\ndisk full: {line}")
    journal = read_jsonl(tmp_path / "run" / "pages.jsonl")
    # Page 2's record was journaled before its metrics.json write failed; nothing finished was lost.
    assert [(r["page_id"], r["status"]) for r in journal] == [
        ("synthetic-300x200-0", "ok"),
        ("synthetic-400x300-1", "ok"),
    ]
    assert len(read_jsonl(tmp_path / "run" / "predictions.jsonl")) == 2
    metrics = read_metrics(tmp_path / "run")  # the last complete version (atomic writes): still valid JSON
    assert [p["page_id"] for p in metrics["pages"]] == ["synthetic-300x200-0"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "PARTIAL" in report and "write error" in report


# ------------------------------------------------------------------------------------------ 8. resume


def _assert_exactly_cap_tokens(summary: RunSummary, cap: int) -> None:
    """With infer.ignore_eos=true every page decodes exactly the cap: first token + cap - 1 decode steps."""
    for page in summary.pages:
        assert page.generated_tokens == cap, page.page_id
        assert page.hit_token_cap is True and page.stopped_by_eos is False
        assert len(page.decode_step_ms) == cap - 1


RESUME_ARGS = [*SMALL, "dataset.sizes=[[300,200],[400,300]]", "infer.ignore_eos=true"]


@pytest.fixture(scope="module")
def resume_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run 1 of the resume tests (repeats=1, two pages); tests copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("resume") / "run1"
    first = run_cli(RESUME_ARGS, run_dir)
    assert first.returncode == 0, first.describe()
    return run_dir


def test_resume_carries_finished_pages_over(tmp_path: Path, resume_base: Path) -> None:
    second = run_cli([*RESUME_ARGS, "repeats=2", f"resume={resume_base}"], tmp_path / "run2")
    assert second.returncode == 0, second.describe()
    # ignore_eos=true (cap 8 in SMALL): carried-over and new pages alike decoded exactly the cap.
    _assert_exactly_cap_tokens(read_summary(tmp_path / "run2" / "metrics.json"), cap=8)

    earlier = {(r["page_id"], r["repeat"]): r for r in read_jsonl(resume_base / "pages.jsonl")}
    journal = read_jsonl(tmp_path / "run2" / "pages.jsonl")
    carried = [r for r in journal if r["repeat"] == 0]
    assert len(carried) == 2
    for record in carried:  # the very records of run 1, not re-measured
        assert record == earlier[(record["page_id"], 0)]
    predictions = read_jsonl(tmp_path / "run2" / "predictions.jsonl")
    assert sorted(p["repeat"] for p in predictions) == [1, 1]  # run 2 decoded only repeat 1
    metrics = read_metrics(tmp_path / "run2")
    assert metrics["run"]["status"] == "complete"
    assert sorted((p["page_id"], p["repeat"]) for p in metrics["pages"]) == sorted(
        (f"synthetic-{s}-{i}", r) for r in (0, 1) for i, s in enumerate(("300x200", "400x300"))
    )
    assert any("resumed from" in note for note in metrics["notes"])


def test_resume_with_other_decoding_settings_is_refused(tmp_path: Path, resume_base: Path) -> None:
    # Carrying pages over into a run with other decoding settings would mix incomparable numbers.
    third = run_cli([*RESUME_ARGS, "repeats=2", "infer.max_new_tokens=16", f"resume={resume_base}"], tmp_path / "r")
    line = assert_clean_failure(third, "ConfigError", "resume=", "infer.max_new_tokens: 8 -> 16")
    print(f"\nresume mismatch: {line}")
    assert not (tmp_path / "r" / "pages.jsonl").exists()


def test_resume_into_the_same_run_dir(tmp_path: Path, resume_base: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(resume_base, run_dir)
    again = run_cli([*RESUME_ARGS, "repeats=2", f"resume={run_dir}"], run_dir)
    assert again.returncode == 0, again.describe()
    # Its journal already held repeat 0: carried over in memory, not appended a second time.
    assert sorted((r["page_id"], r["repeat"]) for r in read_jsonl(run_dir / "pages.jsonl")) == sorted(
        (f"synthetic-{s}-{i}", r) for r in (0, 1) for i, s in enumerate(("300x200", "400x300"))
    )
    assert len(read_metrics(run_dir)["pages"]) == 4


# ------------------------------------------------------------------------------------------ 9. run ids

RUN_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{4}$")


def test_default_run_dir_has_random_suffix(compose_cfg: Callable[..., Any]) -> None:
    cfg = compose_cfg([])
    run_dir = str(cfg.hydra.run.dir)
    assert run_dir.startswith("tmp/stage1/")
    assert RUN_ID.match(run_dir.rsplit("/", 1)[1]), run_dir
    assert "${run_suffix:}" in str(cfg._get_node("run_id")._value())


def test_two_runs_started_together_do_not_collide(tmp_path: Path) -> None:
    # The same timestamp for both (as two jobs started in the same second get): only the suffix tells them apart.
    args = [*SMALL, "run_id=20260101-000000-${run_suffix:}", f"hydra.run.dir={tmp_path}/${{run_id}}"]
    procs = [
        subprocess.Popen(
            cli_command(args),
            cwd=ROOT,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
    dirs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(dirs) == 2, dirs
    for d in dirs:
        assert RUN_ID.match(d.name) and d.name.startswith("20260101-000000-"), d.name
        assert read_metrics(d)["run"]["status"] == "complete"
        assert len(read_jsonl(d / "pages.jsonl")) == 1
