"""Oracles for the figures a run publishes: a scripted clock makes every stage take a known time.

The session's clock (``DeviceClock``: stage edges, decode marks and the SAM/CLIP/projector hooks all read it)
is replaced by a virtual clock that only moves when the test's wrappers around the model's work advance it:
SAM, CLIP and the projector take fixed times per call, the rest of ``encode_images`` a fixed time, the LM
prefill a fixed time, and decode step *i* the *i*-th value of a script.  The test then knows, by hand, the
TTFT, vision, decode, TPOT (decode ÷ (n_tok − 1)), tok/s, step percentiles and — with a configured peak —
MFU / MBU / achieved FLOP/s the pipeline must report, in the page record, in metrics.json and in report.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from llm_perf_opt.data.datasets import Page
from llm_perf_opt.profiling import flops as F
from llm_perf_opt.results.serialize import read_summary
from llm_perf_opt.results.types import RunSummary
from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession, PageRun
from llm_perf_opt.runners.measure import describe_hardware
from llm_perf_opt.runners.settings import load_settings
from llm_perf_opt.runners.stage1 import Stage1Run
from tests.integration.conftest import ROOT

PAGE = Page(page_id="synthetic-300x200-0", synthetic_size=(300, 200), seed=0)
VIEW_CALLS = 2  # the tiny model runs SAM, CLIP and the projector twice on this page: its crops, then the global view
OVERRIDES = ["dataset.sizes=[[300,200]]", "repeats=1", "profiling.static_compute=false", "output.plots=false"]

# The script (ms).  Per call of each hooked vision module, then the rest of encode_images, then the LM prefill.
SAM_MS, CLIP_MS, PROJECTOR_MS = 2.0, 3.0, 0.5
VISION_OTHER_MS = 1.25
LM_PREFILL_MS = 11.0
DECODE_STEPS_MS = [4.0, 1.0, 3.0, 2.0, 5.0]  # 6 tokens: the first from prefill, then 5 decode steps
N_TOK = len(DECODE_STEPS_MS) + 1

# Hand-computed from the script.
VISION_MS = VIEW_CALLS * (SAM_MS + CLIP_MS + PROJECTOR_MS) + VISION_OTHER_MS  # 12.25
TTFT_MS = VISION_MS + LM_PREFILL_MS  # 23.25
DECODE_MS = 15.0
TPOT_MS = DECODE_MS / (N_TOK - 1)  # 3.0 ms/token
TOK_S = 1000.0 / TPOT_MS  # 333.33
# order statistics of the sorted steps 1, 2, 3, 4, 5 (rank h = q/100 · 4, linear between ranks)
STEP_P50_MS, STEP_P90_MS, STEP_P99_MS = 3.0, 4.6, 4.96

PEAK_FLOPS_PER_S = 2.0e12
PEAK_BW_BYTES_PER_S = 5.0e11


class ScriptedClock:
    """Virtual time in ms: a mark is the current time; only ``advance`` moves it."""

    def __init__(self) -> None:
        self.now_ms = 0.0
        self.calls: dict[str, int] = {}

    def advance(self, what: str, ms: float) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1
        self.now_ms += ms

    def install(self, session: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        """The session's clock reads virtual time; the model's work advances it by the script."""
        clock = session.clock
        monkeypatch.setattr(clock, "mark", lambda: self.now_ms)
        monkeypatch.setattr(clock, "elapsed_ms", lambda start, end: end - start)
        monkeypatch.setattr(clock, "synchronize", lambda: None)
        model = session.model
        steps = iter(DECODE_STEPS_MS)

        def after(name: str, fn: Callable[..., Any], ms: Callable[[], float]) -> Callable[..., Any]:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                out = fn(*args, **kwargs)
                self.advance(name, ms())
                return out

            return wrapped

        from llm_perf_opt.profiling.hooks import module_named

        per_call = {"sam": SAM_MS, "clip": CLIP_MS, "projector": PROJECTOR_MS}
        for name, dotted in session.backend.hook_targets.items():
            module = module_named(model, dotted)
            ms = per_call[name]
            monkeypatch.setattr(module, "forward", after(name, module.forward, lambda ms=ms: ms))
        monkeypatch.setattr(model, "encode_images", after("vision_other", model.encode_images, lambda: VISION_OTHER_MS))
        monkeypatch.setattr(model, "prefill", after("lm_prefill", model.prefill, lambda: LM_PREFILL_MS))
        monkeypatch.setattr(model, "decode_step", after("decode_step", model.decode_step, lambda: next(steps)))


def _job_cfg(compose_cfg: Callable[..., DictConfig], out: Path, extra: list[str]) -> DictConfig:
    composed = compose_cfg([*OVERRIDES, *extra])
    tree = OmegaConf.to_container(composed, resolve=False)
    assert isinstance(tree, dict)
    tree.pop("hydra")
    tree["output"]["dir"] = str(out)
    job = OmegaConf.create(tree)
    assert isinstance(job, DictConfig)
    return job


def _scripted_run(
    compose_cfg: Callable[..., DictConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    model_info: list[Any] | None = None,
) -> tuple[ScriptedClock, PageRun, RunSummary, str]:
    """One page through the session on the scripted clock, then the run's own reporting path.

    ``model_info`` receives (model config, bytes per weight element) of the loaded model."""
    cfg = _job_cfg(compose_cfg, tmp_path / "run", extra)
    settings = load_settings(cfg)
    session = DeepSeekOCRSession.load(settings, ROOT)
    if model_info is not None:
        model_info += [session.backend.config, session.dtype.itemsize]
    try:
        clock = ScriptedClock()
        clock.install(session, monkeypatch)
        result = session.run(PAGE, N_TOK, ignore_eos=True)
        out = tmp_path / "run"
        out.mkdir(parents=True, exist_ok=True)
        run = Stage1Run(settings.resolved("cpu"), out)
        run.session = session
        run.hardware = describe_hardware(settings, session)
        run.records.append(result.record)
        run.runs_for_flops.append(result)
        run.write_reports("complete")
    finally:
        session.close()
    return clock, result, read_summary(out / "metrics.json"), (out / "report.md").read_text()


@pytest.fixture
def peaks() -> list[str]:
    return [f"peak.flops_per_s={PEAK_FLOPS_PER_S}", f"peak.bw_bytes_per_s={PEAK_BW_BYTES_PER_S}"]


def test_scripted_times_are_the_published_figures(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, peaks: list[str]
) -> None:
    clock, result, summary, report = _scripted_run(compose_cfg, tmp_path, monkeypatch, peaks)
    # the script ran as written: each vision module once per view batch, 5 decode steps
    n = VIEW_CALLS
    assert clock.calls == {"sam": n, "clip": n, "projector": n, "vision_other": 1, "lm_prefill": 1, "decode_step": 5}
    rec = result.record
    assert rec.generated_tokens == N_TOK
    assert rec.sam_ms == pytest.approx(n * SAM_MS) and rec.clip_ms == pytest.approx(n * CLIP_MS)
    assert rec.projector_ms == pytest.approx(n * PROJECTOR_MS)
    assert rec.vision_ms == pytest.approx(VISION_MS)
    assert rec.prefill_ms == pytest.approx(TTFT_MS)
    assert rec.decode_step_ms == pytest.approx(DECODE_STEPS_MS)
    assert rec.decode_ms == pytest.approx(DECODE_MS)
    assert rec.tpot_ms == pytest.approx(TPOT_MS)
    assert rec.decode_tok_s == pytest.approx(TOK_S)
    assert rec.decode_step_p50_ms == pytest.approx(STEP_P50_MS)
    assert rec.decode_step_p90_ms == pytest.approx(STEP_P90_MS)
    assert rec.decode_step_p99_ms == pytest.approx(STEP_P99_MS)
    assert rec.preprocess_ms is not None  # host clock, not scripted
    assert rec.e2e_ms == pytest.approx(rec.preprocess_ms + TTFT_MS + DECODE_MS)
    assert not rec.flags, rec.flags

    # metrics.json: one page, so every aggregate's mean is the page's figure
    agg = summary.aggregates
    for metric, want in {
        "prefill_ms": TTFT_MS,
        "vision_ms": VISION_MS,
        "decode_ms": DECODE_MS,
        "tpot_ms": TPOT_MS,
        "decode_tok_s": TOK_S,
        "decode_step_p50_ms": STEP_P50_MS,
        "decode_step_p99_ms": STEP_P99_MS,
    }.items():
        assert agg[metric].mean == pytest.approx(want), metric
    # report.md shows the same numbers
    assert f"{TTFT_MS:,.2f}" in report and f"{TPOT_MS:,.2f}" in report


def test_efficiency_from_scripted_times_and_configured_peak(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, peaks: list[str]
) -> None:
    """MFU / MBU / FLOP/s per stage with a configured peak on the CPU: each stage's FLOPs (flops.py, tested
    against counted FLOPs in test_flops.py) over the scripted seconds; LM prefill = TTFT − vision."""
    result_model_cfg: list[Any] = []
    _, result, summary, report = _scripted_run(compose_cfg, tmp_path, monkeypatch, peaks, result_model_cfg)
    assert summary.hardware.peak_flops_per_s == PEAK_FLOPS_PER_S
    assert summary.hardware.peak_bw_bytes_per_s == PEAK_BW_BYTES_PER_S
    rec = result.record
    views = [(int(v[0]), int(v[1]), int(v[2])) for v in rec.vision_views or []]
    mcfg = result_model_cfg[0]
    assert rec.prompt_tokens is not None
    stages = F.page_flops(mcfg, views, rec.prompt_tokens, N_TOK).stages()  # type: ignore[arg-type]
    seconds = {
        "sam": VIEW_CALLS * SAM_MS / 1e3,
        "clip": VIEW_CALLS * CLIP_MS / 1e3,
        "projector": VIEW_CALLS * PROJECTOR_MS / 1e3,
        "vision": VISION_MS / 1e3,
        "prefill_lm": LM_PREFILL_MS / 1e3,  # TTFT − vision, not TTFT
        "prefill": TTFT_MS / 1e3,
        "decode": DECODE_MS / 1e3,
        "total": (TTFT_MS + DECODE_MS) / 1e3,
    }
    eff = {e.stage: e for e in summary.efficiency}
    assert set(eff) == set(seconds)
    for stage, secs in seconds.items():
        e = eff[stage]
        assert e.seconds == pytest.approx(secs), stage
        assert e.flops == pytest.approx(stages[stage]), stage
        assert e.achieved_flops_per_s == pytest.approx(stages[stage] / secs), stage
        assert e.mfu == pytest.approx(stages[stage] / secs / PEAK_FLOPS_PER_S), stage
    # decode MBU: the modelled bytes of the 5 decode steps (weights + KV) over the scripted decode time
    db = F.decode_bytes(mcfg, rec.prompt_tokens, N_TOK, result_model_cfg[1]).total_bytes
    assert eff["decode"].bytes_moved == pytest.approx(db)
    assert eff["decode"].mbu == pytest.approx(db / (DECODE_MS / 1e3) / PEAK_BW_BYTES_PER_S)
    assert eff["decode"].arithmetic_intensity == pytest.approx(stages["decode"] / db)
    assert not [u for u in summary.unavailable if u.metric.startswith(("mfu", "mbu"))], summary.unavailable
    assert "MFU" in report


def test_mfu_above_one_keeps_its_reason(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peak below what the scripted times imply makes every MFU > 1: mfu.py refuses it with a reason, and the
    report keeps that reason (not a bare blank)."""
    _, _, summary, report = _scripted_run(
        compose_cfg, tmp_path, monkeypatch, ["peak.flops_per_s=1000.0", f"peak.bw_bytes_per_s={PEAK_BW_BYTES_PER_S}"]
    )
    for e in summary.efficiency:
        assert e.mfu is None, e
        assert e.achieved_flops_per_s is not None and e.achieved_flops_per_s > 1000.0
    reasons = {u.metric: u.reason for u in summary.unavailable}
    for e in summary.efficiency:
        assert "> 1" in reasons[f"mfu.{e.stage}"], (e.stage, reasons)
    assert "FLOPs, timing or peak are wrong" in report
    assert not math.isnan(summary.efficiency[0].flops)


def test_scripted_clock_drives_the_session_not_the_host_clock(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sanity of the oracle itself: the real work is done (tokens are produced), but no real time leaks in."""
    cfg = _job_cfg(compose_cfg, tmp_path / "run", [])
    session = DeepSeekOCRSession.load(load_settings(cfg), ROOT)
    try:
        ScriptedClock().install(session, monkeypatch)
        torch.manual_seed(0)
        result = session.run(PAGE, N_TOK, ignore_eos=True)
    finally:
        session.close()
    assert len(result.prediction.token_ids) == N_TOK
    assert result.record.decode_step_ms == DECODE_STEPS_MS  # exactly, not approximately
