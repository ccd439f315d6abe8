"""report/briefs.py (stakeholder_summary.md, assumptions.md) and infer.context_len_mode for decode FLOPs."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig
from llm_perf_opt.profiling import flops as F
from llm_perf_opt.profiling.efficiency import page_flops_of
from llm_perf_opt.report.briefs import render_assumptions, render_stakeholder_summary, stage_shares
from llm_perf_opt.results.types import MeasurementQuality, RunawaySummary
from llm_perf_opt.runners.settings import InferSettings
from tests.unit.builders import make_page, make_summary

TINY_JSON = Path(__file__).resolve().parents[3] / "src/llm_perf_opt/models/deepseek_ocr/configs/tiny.json"


def _summary(**aggs: list[float]):
    base = {"preprocess_ms": [4.0] * 3, "vision_ms": [17.0] * 3, "prefill_ms": [25.0] * 3, "decode_ms": [160.0] * 3,
            "tpot_ms": [10.0] * 3, "e2e_ms": [189.0] * 3}  # fmt: skip
    base.update(aggs)
    return make_summary(base)


def test_stage_shares_are_disjoint_and_sorted() -> None:
    # prefill LM = prefill − vision = 8 ms; total 4 + 17 + 8 + 160 = 189 ms.
    assert stage_shares(_summary()) == [
        ("decode (tokens 2..N)", 160.0),
        ("vision (SAM + CLIP + projector)", 17.0),
        ("prefill LM (first token)", 8.0),
        ("host preprocessing", 4.0),
    ]


def test_summary_names_dominant_stage_figure_to_watch_and_quality() -> None:
    s = attrs.evolve(_summary(), quality=MeasurementQuality("noisy", reasons=["load 7 > 2 usable cores"]))
    md = render_stakeholder_summary(s)
    assert "**Measurement quality: noisy** — load 7 > 2 usable cores" in md
    assert "decode (tokens 2..N) dominates — 85 % of a page's time (160.0 of 189.0 ms per page" in md
    assert "**The one figure to watch:** TPOT (ms per output token, median) = 10.00 ms/token" in md
    assert len(md.splitlines()) < 40  # one screen
    vision_heavy = _summary(prefill_ms=[300.0] * 3, vision_ms=[280.0] * 3, decode_ms=[20.0] * 3)
    assert "TTFT (time to first token, median)" in render_stakeholder_summary(vision_heavy)


def test_summary_counts_runaway_pages() -> None:
    rw = RunawaySummary(page_runs=10, hit_token_cap=1, repetition_loop=1, runaway=1, share_of_page_runs=0.1,
                        share_of_decode_time=0.55, decode_tok_s_all=100.0, decode_tok_s_without_runaway=120.0,
                        window_tokens=48, max_period=16)  # fmt: skip
    md = render_stakeholder_summary(attrs.evolve(_summary(), runaway=rw))
    assert "1 of 10 page runs (10 %) hit the token cap or looped, taking 55 % of decode time" in md


def test_assumptions_state_the_context_mode_and_units() -> None:
    s = _summary()
    cfg = dict(s.run.config)
    cfg["infer"] = {**cfg["infer"], "context_len_mode": "fixed", "context_len_fixed": 1024}
    md = render_assumptions(attrs.evolve(s, run=attrs.evolve(s.run, config=cfg)))
    assert "infer.context_len_mode=fixed: every decode step at infer.context_len_fixed = 1024 keys" in md
    assert "One multiply-add = 2 FLOPs" in md and "Decimal prefixes" in md and "lower bound" in md
    assert "## Runaway pages" in md and "## Measurement quality" in md


@pytest.fixture
def tiny() -> DeepseekOCRConfig:
    return DeepseekOCRConfig.from_json(TINY_JSON)


def test_context_len_modes_change_decode_flops_only(tiny: DeepseekOCRConfig) -> None:
    rec = make_page(vision_views=[(1, 64, 64)], prompt_tokens=50, generated_tokens=11)
    auto = page_flops_of(tiny, rec)
    assert auto is not None
    assert auto.decode.total_flops == F.decode_flops(tiny.language, 50, 11).total_flops  # per-step real context
    mx = page_flops_of(tiny, rec, "max", cap=64)
    fixed = page_flops_of(tiny, rec, "fixed", fixed=1024)
    assert mx is not None and fixed is not None
    # 10 decode steps, each at prompt + cap = 114 keys, or at 1024 keys.
    assert mx.decode.total_flops == 10 * F.decode_step_flops(tiny.language, 114).total_flops
    assert fixed.decode.total_flops == 10 * F.decode_step_flops(tiny.language, 1024).total_flops
    assert mx.prefill_flops == auto.prefill_flops == fixed.prefill_flops
    assert auto.decode.total_flops < mx.decode.total_flops < fixed.decode.total_flops


def test_context_len_mode_validation() -> None:
    assert (InferSettings().context_len_mode, InferSettings().context_len_fixed) == ("auto", None)
    assert InferSettings(context_len_mode="fixed", context_len_fixed=8).context_len_fixed == 8
    with pytest.raises(ConfigError, match=r"infer\.context_len_mode must be one of auto, max, fixed"):
        InferSettings(context_len_mode="longest")
    with pytest.raises(ConfigError, match=r"needs infer\.context_len_fixed"):
        InferSettings(context_len_mode="fixed")


def test_v2_briefs_name_the_encoder_not_clip() -> None:
    """DeepSeek-OCR-2's ``clip_ms`` slot holds its encoder's time (``model.stage_names``): the summary's stage and the
    assumptions' TTFT line name the encoder, as report.md does, and never CLIP."""
    v1 = _summary()
    v2 = attrs.evolve(v1, model=attrs.evolve(v1.model, stage_names={"clip": "encoder"}))
    assert ("vision (SAM + encoder + projector)", 17.0) in stage_shares(v2)
    assert "vision (SAM + CLIP + projector)" in render_stakeholder_summary(v1)
    summary, assumptions = render_stakeholder_summary(v2), render_assumptions(v2)
    assert "vision (SAM + encoder + projector): 17.0 ms" in summary
    assert "Prefill (TTFT) = vision (SAM, encoder, projector) + the first language-model forward" in assumptions
    assert "CLIP" not in summary and "CLIP" not in assumptions


def test_dummy_weights_line_names_this_models_size() -> None:
    """Random weights give the shapes of the model that ran, which for the tiny model are not DeepSeek-OCR's: the
    summary and the assumptions give its parameter count instead of calling its shapes the real ones."""
    s = _summary()
    dummy = attrs.evolve(s, model=attrs.evolve(s.model, weights="dummy", params_total=463_328))
    summary, assumptions = render_stakeholder_summary(dummy), render_assumptions(dummy)
    assert "timings and FLOPs are those of this model's shapes (463,328 parameters)" in summary
    assert "Dummy (random) weights give this model's shapes and FLOPs (463,328 parameters)" in assumptions
    assert "those of the real shapes" not in summary and "give the real shapes" not in assumptions  # as they said
    trained = attrs.evolve(s, model=attrs.evolve(s.model, weights="models/deepseek-ocr", params_total=463_328))
    assert "Weights are random" not in render_stakeholder_summary(trained)
