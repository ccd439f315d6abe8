"""Builders of result objects for the infrastructure unit tests (no model, no device)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from llm_perf_opt.profiling.stats import Stats, summarize
from llm_perf_opt.results.serialize import write_summary
from llm_perf_opt.results.types import (
    SCHEMA_VERSION,
    Efficiency,
    HardwareInfo,
    ModelInfo,
    OperatorRow,
    PageRecord,
    ProfileSummary,
    RunInfo,
    RunSummary,
    StageFlops,
    Unavailable,
)


def make_stats(values: Sequence[float]) -> Stats:
    st = summarize(values)
    assert st is not None
    return st


def make_page(page_id: str = "p0", repeat: int = 0, **overrides: Any) -> PageRecord:
    fields: dict[str, Any] = dict(
        path=f"/data/{page_id}.png",
        size_px=(640, 480),
        crop_grid=(2, 1),
        n_tiles=3,
        prompt_tokens=300,
        image_tokens=273,
        generated_tokens=17,
        hit_token_cap=False,
        stopped_by_eos=True,
        preprocess_ms=4.5,
        sam_ms=10.0,
        clip_ms=5.0,
        projector_ms=1.0,
        vision_ms=17.0,
        prefill_ms=25.0,
        decode_ms=160.0,
        e2e_ms=189.5,
        tpot_ms=10.0,
        decode_tok_s=100.0,
        decode_step_p50_ms=10.0,
        decode_step_p90_ms=11.0,
        decode_step_p99_ms=12.0,
        decode_step_ms=[10.0, 9.5, 10.5, 12.0],
        peak_rss_bytes=3 * 2**30,
        kv_cache_bytes=64 * 2**20,
    )
    fields.update(overrides)
    return PageRecord(page_id=page_id, repeat=repeat, status="ok", **fields)


def make_failed_page(page_id: str = "bad", repeat: int = 0, error: str = "boom", error_type: str = "RuntimeError"):
    return PageRecord(page_id=page_id, repeat=repeat, status="failed", error=error, error_type=error_type)


def make_profile(total_self_ms: float = 100.0) -> ProfileSummary:
    ops = [
        OperatorRow("aten::mm", 12, None, None, 60.0, 61.0, 60.0),
        OperatorRow("aten::add", 4, None, None, 30.0, 30.5, 30.0),
    ]
    return ProfileSummary(
        page_id="p0",
        max_new_tokens=8,
        sort_key="self_cpu_ms",
        total_self_ms=total_self_ms,
        operators=ops,
        range_ms={"prefill": 70.0, "decode": 25.0},
        trace_file="trace.json.gz",
    )


DEFAULT_METRICS: dict[str, Sequence[float]] = {
    "prefill_ms": [25.0, 26.0, 24.0, 25.5],
    "decode_ms": [160.0, 162.0, 158.0, 161.0],
    "tpot_ms": [10.0, 10.1, 9.9, 10.05],
    "e2e_ms": [189.0, 190.0, 188.0, 189.5],
}


def make_summary(
    aggregates: dict[str, Sequence[float] | Stats] | None = None,
    pages: Iterable[PageRecord] | None = None,
    *,
    status: str = "complete",
    status_reason: str | None = None,
    schema_version: str = SCHEMA_VERSION,
    gpu_name: str | None = None,
    device: str = "cpu",
    model_cfg: dict[str, Any] | None = None,
    profile: ProfileSummary | None = None,
    efficiency: list[Efficiency] | None = None,
    flops: list[StageFlops] | None = None,
    unavailable: list[Unavailable] | None = None,
    notes: list[str] | None = None,
    energy: dict[str, float] | None = None,
    finished_at: str | None = "2025-01-01T00:10:00",
    git_commit: str | None = "abc1234",
) -> RunSummary:
    """A complete RunSummary; ``aggregates`` maps metric → raw samples (summarized here) or a ready Stats."""
    raw = DEFAULT_METRICS if aggregates is None else aggregates
    aggs = {k: (v if isinstance(v, Stats) else make_stats(v)) for k, v in raw.items()}
    return RunSummary(
        schema_version=schema_version,
        run=RunInfo(
            run_id="run-test",
            started_at="2025-01-01T00:00:00",
            finished_at=finished_at,
            status=status,  # type: ignore[arg-type]
            argv=["llm-perf-opt", "repeats=3"],
            git_commit=git_commit,
            config={
                "model": model_cfg if model_cfg is not None else {"name": "deepseek_ocr", "dtype": "bfloat16"},
                "dataset": {"name": "synthetic"},
                "repeats": 3,
                "infer": {"max_new_tokens": 64, "temperature": 0.0, "no_repeat_ngram_size": 0, "ignore_eos": False},
            },
            status_reason=status_reason,
        ),
        hardware=HardwareInfo(
            device=device,
            gpu_name=gpu_name,
            driver=None,
            cuda=None,
            torch="2.13.0+cpu",
            cpu="Test CPU",
            peak_flops_per_s=None,
            peak_flops_source=None,
            peak_bw_bytes_per_s=None,
            peak_bw_source=None,
        ),
        model=ModelInfo(
            name="deepseek-ocr-test",
            backend="native",
            weights="dummy",
            dtype="float32",
            params_total=1_234_567,
            params_activated_per_token=None,
            weights_bytes=4 * 1_234_567,
            tokenizer="stand-in",
            optimisations={"sdpa": True, "cuda_graphs": False},
        ),
        pages=list(pages) if pages is not None else [make_page("p0"), make_page("p1")],
        aggregates=aggs,
        flops=flops or [],
        efficiency=efficiency or [],
        profile=profile,
        energy=energy or {},
        unavailable=unavailable or [],
        notes=notes or [],
    )


def write_run_dir(path: Path, summary: RunSummary) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    write_summary(path / "metrics.json", summary)
    return path


def write_job_dir(root: Path, job: str, overrides: list[str], summary: RunSummary | None = None) -> Path:
    """One Hydra multirun job directory: .hydra/overrides.yaml and (optionally) metrics.json."""
    job_dir = root / job
    (job_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary is not None:
        write_summary(job_dir / "metrics.json", summary)
    return job_dir
