"""benchmarks/bench_v1_v2.py's reading of a run's metrics.json, on a hand-written two-page metrics object."""

from __future__ import annotations

import pytest
from benchmarks.bench_v1_v2 import figures, parse_size


def _page(prefill: float, vision: float, generated: int, peak: int | None) -> dict:
    return {"error": None, "sam_ms": 2.0, "clip_ms": 3.0, "projector_ms": 0.5, "vision_ms": vision,
            "prefill_ms": prefill, "tpot_ms": 1.5, "image_tokens": 1121, "prompt_tokens": 1131,
            "generated_tokens": generated, "peak_mem_allocated_bytes": peak}  # fmt: skip


METRICS = {
    "pages": [_page(100.0, 40.0, 9, 2 * 2**30), _page(110.0, 44.0, 9, 3 * 2**30), {"error": "oom"}],
    "efficiency": [
        {"stage": "sam", "flops": 5e11, "mfu": 0.25},
        {"stage": "encoder", "flops": 6e11, "mfu": None},
        {"stage": "projector", "flops": 1e9, "mfu": 0.01},
        {"stage": "vision", "flops": 1.101e12, "mfu": 0.2},
        {"stage": "prefill_lm", "flops": 2e12, "mfu": 0.3},
        {"stage": "decode", "flops": 8e9, "mfu": 0.001},
    ],
    "model": {"params_total": 3_389_119_360, "backend": "hf_native", "dtype": "bfloat16"},
    "hardware": {"peak_flops_per_s": 9.89e14, "peak_flops_source": "table"},
    "unavailable": [],
}


def test_figures_are_medians_of_the_ok_pages_and_the_runs_stage_rows() -> None:
    f = figures(METRICS)
    assert f["prefill_lm_ms"] == pytest.approx((60.0 + 66.0) / 2)  # prefill − vision per page, median of two
    assert f["prefill_ms"] == pytest.approx(105.0)
    assert f["peak_gib"] == pytest.approx(3.0)  # the larger peak
    assert f["image_tokens"] == "1121" and f["prompt_tokens"] == "1131"
    assert f["clip_gflop"] == pytest.approx(600.0)  # v2's encoder row fills the CLIP/encoder slot
    assert f["clip_mfu_pct"] is None and f["sam_mfu_pct"] == pytest.approx(25.0)
    assert f["decode_gflop_per_token"] == pytest.approx(8.0 / 8)  # 8 GFLOP over tokens 2..9
    assert f["params_b"] == pytest.approx(3.38911936)


def test_a_run_without_a_good_page_is_absent() -> None:
    assert "absent" in figures({**METRICS, "pages": [{"error": "oom"}]})


def test_page_sizes_parse_or_say_how() -> None:
    import argparse

    assert parse_size("1224x1584") == (1224, 1584)
    with pytest.raises(argparse.ArgumentTypeError, match="WIDTHxHEIGHT"):
        parse_size("1224")
