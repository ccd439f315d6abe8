"""Numeric guards of a page run (dsocr_session.py flags), in-process on the tiny model.

``nonfinite_logits``: NaN/Inf in the logits is flagged; ``single_token``: no decode step, so no TPOT;
``nonpositive_timing``: a stage that measured <= 0 ms leaves rates out.  In every case no rate is a
division by zero or an Inf/NaN, and the run's reports (metrics.json, report.md) still render.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from llm_perf_opt.data.datasets import Page
from llm_perf_opt.errors import ConfigError
from llm_perf_opt.results.serialize import read_summary, to_jsonable
from llm_perf_opt.results.types import PageRecord
from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession, PageRun
from llm_perf_opt.runners.settings import load_settings
from llm_perf_opt.runners.stage1 import Stage1Run
from tests.integration.conftest import ROOT, assert_clean_failure, read_metrics, run_cli

PAGE = Page(page_id="synthetic-300x200-0", synthetic_size=(300, 200), seed=0)
OVERRIDES = ["dataset.sizes=[[300,200]]", "repeats=1", "profiling.static_compute=false", "output.plots=false"]


@pytest.fixture
def cfg(compose_cfg: Callable[..., DictConfig], tmp_path: Path) -> DictConfig:
    """The job config as the CLI composes it, without the hydra node (a job never sees it)."""
    composed = compose_cfg(OVERRIDES)
    tree = OmegaConf.to_container(composed, resolve=False)
    assert isinstance(tree, dict)
    tree.pop("hydra")
    tree["output"]["dir"] = str(tmp_path / "run")
    job = OmegaConf.create(tree)
    assert isinstance(job, DictConfig)
    return job


@pytest.fixture
def session(cfg: DictConfig) -> Any:
    s = DeepSeekOCRSession.load(load_settings(cfg), ROOT)
    yield s
    s.close()


def _poison(method: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        logits = method(*args, **kwargs)
        return torch.full_like(logits, float("nan"))

    return wrapped


def _flag_names(record: PageRecord) -> list[str]:
    return [f.split(":", 1)[0] for f in record.flags]


def _assert_rates_finite_or_absent(record: PageRecord) -> None:
    for name in ("tpot_ms", "decode_tok_s", "decode_ms", "prefill_ms", "e2e_ms", "decode_step_p50_ms"):
        value = getattr(record, name)
        assert value is None or math.isfinite(value), (name, value)
    if record.tpot_ms is not None:
        assert record.tpot_ms > 0 and record.decode_tok_s is not None and record.decode_tok_s > 0
    # metrics.json must be strict JSON (no NaN / Infinity tokens)
    json.dumps(to_jsonable(record), allow_nan=False)


def _render(cfg: DictConfig, session: Any, runs: list[PageRun], out: Path) -> None:
    """The run's own rendering path (aggregates, efficiency, report.md) over these page runs."""
    out.mkdir(parents=True, exist_ok=True)
    run = Stage1Run(load_settings(cfg).resolved("cpu"), out)
    run.session = session
    for result in runs:
        run.records.append(result.record)
        run.runs_for_flops.append(result)
    run.write_reports("complete")
    summary = read_summary(out / "metrics.json")
    assert [p.page_id for p in summary.pages] == [r.record.page_id for r in runs]
    json.loads((out / "metrics.json").read_text(), parse_constant=_reject_constant)
    assert (out / "report.md").read_text().startswith("# Stage-1 profile")


def _reject_constant(name: str) -> Any:
    raise AssertionError(f"metrics.json holds {name}")


@pytest.mark.parametrize("where", ["prefill", "decode_step"])
def test_nan_logits_are_flagged(
    where: str, session: Any, cfg: DictConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session.model, where, _poison(getattr(session.model, where)))
    result = session.run(PAGE, 6, ignore_eos=True)
    record = result.record
    assert "nonfinite_logits" in _flag_names(record), record.flags
    assert record.generated_tokens == 6
    assert len(record.decode_step_ms) == 5
    _assert_rates_finite_or_absent(record)
    assert record.tpot_ms is not None  # the timing itself is real; only the tokens are meaningless
    _render(cfg, session, [result], tmp_path / "report")


def test_clean_logits_are_not_flagged(session: Any) -> None:
    record = session.run(PAGE, 4, ignore_eos=True).record
    assert "nonfinite_logits" not in _flag_names(record)
    _assert_rates_finite_or_absent(record)


def test_single_token_has_no_tpot(session: Any, cfg: DictConfig, tmp_path: Path) -> None:
    result = session.run(PAGE, 1)
    record = result.record
    assert record.generated_tokens == 1
    assert "single_token" in _flag_names(record), record.flags
    assert record.tpot_ms is None and record.decode_tok_s is None
    assert record.decode_step_ms == [] and record.decode_ms is None
    _assert_rates_finite_or_absent(record)
    _render(cfg, session, [result], tmp_path / "report")


def test_zero_timings_leave_rates_out(
    session: Any, cfg: DictConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A clock too coarse to see anything: every interval is 0 ms.
    monkeypatch.setattr(session.clock, "elapsed_ms", lambda start, end: 0.0)
    result = session.run(PAGE, 5, ignore_eos=True)
    record = result.record
    assert "nonpositive_timing" in _flag_names(record), record.flags
    assert record.decode_ms == 0.0
    assert record.tpot_ms is None and record.decode_tok_s is None
    _assert_rates_finite_or_absent(record)
    _render(cfg, session, [result], tmp_path / "report")


# ------------------------------------------------------------------------------------------- fast-path switches


def test_fast_path_runs_through_the_cli_and_reports_its_switches(tmp_path: Path) -> None:
    """infer.fast.* reaches FastConfig; on CPU the graph switches are reported off (CUDA-only)."""
    run_dir = tmp_path / "run"
    result = run_cli(
        [
            "repeats=1",
            "dataset.max_pages=1",
            "infer.fast.enabled=true",
            "infer.fast.sam_compile=false",
            "infer.fast.clip_compile=false",
            "infer.max_new_tokens=8",
        ],
        run_dir,
    )
    assert result.returncode == 0, result.describe()
    opts = read_metrics(run_dir)["model"]["optimisations"]
    assert opts["grouped_moe"] is True and opts["fused_qkv"] is True
    assert opts["cuda_graphs"] is False and opts["vision_graphs"] is False  # CPU: forced off, and said so
    assert opts["vision_streams"] is False and opts["prefill_shared_stream"] is False  # streams: CUDA only
    assert opts["sam_compile"] is False and opts["decode_kernels_triton"] is False
    assert opts["clip_merged_views"] is True  # v1's CLIP over a page's views at once (device-independent)
    assert opts["clip_attention_triton"] is False  # its Triton attention needs CUDA (or the interpreter): SDPA ran
    report = (run_dir / "report.md").read_text()
    assert "grouped_moe=on" in report and "cuda_graphs=off" in report
    # counted FLOPs come from the eager forward of the same weights (graph replays hide ops from counters)
    assert "static compute (counted FLOPs) failed" not in report
    assert "counted FLOPs are taken on the eager module forward" in report
    assert (run_dir / "static_compute.md").exists()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("+infer.fast.cuda_graph=true", "cuda_graph"),  # a typo of cuda_graphs
        ("infer.fast.decode_kernels=cutlass", "decode_kernels"),
    ],
)
def test_bad_fast_switch_is_one_clear_error(tmp_path: Path, override: str, needle: str) -> None:
    result = run_cli(["infer.fast.enabled=true", override], tmp_path / "run")
    line = assert_clean_failure(result, "ConfigError", needle)
    print(f"\n{override}: {line}")


@pytest.mark.parametrize(("ngram", "ignore_eos"), [(3, True), (2, True), (0, False)])
def test_device_decode_loop_gives_the_host_loop_tokens(cfg: DictConfig, ngram: int, ignore_eos: bool) -> None:
    """infer.fast.device_decode (token choice on the device, no-repeat-ngram ban included, eos every 16 steps)
    picks exactly the tokens of the host loop (select_next_token per step), and times only the kept steps."""
    runs = []
    for device_decode in (False, True):
        job = cfg.copy()
        job.infer.fast = {"enabled": True, "device_decode": device_decode, "sam_compile": False, "clip_compile": False}
        job.infer.no_repeat_ngram_size = ngram
        job.infer.ignore_eos = ignore_eos
        s = DeepSeekOCRSession.load(load_settings(job), ROOT)
        try:
            runs.append(s.run(PAGE, 40))
        finally:
            s.close()
    host, device = runs
    assert device.prediction.token_ids == host.prediction.token_ids
    if ngram:  # the rule did ban something: without it the tiny model repeats itself
        ids = host.prediction.token_ids
        grams = [tuple(ids[i : i + ngram]) for i in range(len(ids) - ngram + 1)]
        assert len(grams) == len(set(grams))
    rec = device.record
    assert rec.generated_tokens == len(device.prediction.token_ids)
    assert len(rec.decode_step_ms) == rec.generated_tokens - 1  # one mark per kept step, none past eos
    assert rec.tpot_ms is not None and rec.tpot_ms > 0


def test_device_decode_with_the_windowed_rule_gives_the_host_loop_tokens(cfg: DictConfig) -> None:
    """vLLM's rule (window, exempt ids, output scope) on the device picks the host loop's tokens, and no n-gram
    of the output repeats within the window unless it ends in an exempt id."""
    n, window = 3, 12
    runs = []
    for device_decode in (False, True):
        job = cfg.copy()
        job.infer.fast = {"enabled": True, "device_decode": device_decode, "sam_compile": False, "clip_compile": False}
        job.infer.no_repeat_ngram_size = n
        job.infer.no_repeat_ngram_window = window
        job.infer.no_repeat_ngram_exempt_ids = [7]
        job.infer.no_repeat_ngram_scope = "output"
        job.infer.ignore_eos = True
        s = DeepSeekOCRSession.load(load_settings(job), ROOT)
        try:
            runs.append(s.run(PAGE, 40))
        finally:
            s.close()
    host, device = runs
    assert device.prediction.token_ids == host.prediction.token_ids
    ids = host.prediction.token_ids
    for end in range(n, len(ids) + 1):  # the gram ids[end-n:end] vs every earlier gram starting in the window
        gram = tuple(ids[end - n : end])
        earlier = {tuple(ids[i : i + n]) for i in range(max(0, end - 1 - window), end - n)}
        assert gram[-1] == 7 or gram not in earlier, (end, gram)


def test_batched_phase_refuses_the_windowed_rule(cfg: DictConfig) -> None:
    """The batched generator applies HF's rule only: a vLLM-style rule with batch_size > 1 is one clear error
    when the settings load (before the model), not a silently different decoding in the throughput phase."""
    job = cfg.copy()
    job.infer.batch_size = 2
    job.infer.no_repeat_ngram_size = 30
    job.infer.no_repeat_ngram_window = 90
    with pytest.raises(ConfigError, match="batched phase") as info:
        load_settings(job)
    assert info.value.hint
