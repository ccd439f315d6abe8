"""``model.backend=hf_native`` through the real CLI: transformers' own DeepSeek-OCR-2 class on the tiny v2 preset,
one 1600×800 synthetic page.  Skipped where transformers has no native DeepSeek-OCR-2 class (< 5.10.1).

Oracles are hand-computed from the geometry and the tiny sizes: a 1600×800 page is a 2×1 grid of 768-px tiles,
256 + 144·2 + 1 = 545 image tokens; the KV cache holds k and v of 3 layers × 4 heads × 16 dims in float32 for
every position fed; the encoder's analytic FLOPs are the hand count of tests/integration/test_ocr2_cli.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.runners.backends.hf_native import hf_native_class
from tests.integration.conftest import SMALL, assert_clean_failure, read_metrics, run_cli
from tests.integration.test_ocr2_cli import IMAGE_TOKENS, PAGE, V2_TINY, _text_ids, _tiny_encoder_flops

HF_NATIVE = [*V2_TINY, "model.backend=hf_native"]


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    try:
        hf_native_class()
    except ConfigError as exc:
        pytest.skip(f"transformers' native DeepSeek-OCR-2 class is not available: {exc.message}")
    run_dir = tmp_path_factory.mktemp("hf_native") / "run"
    result = run_cli([*HF_NATIVE, *SMALL, PAGE], run_dir, timeout=300)
    assert result.returncode == 0, result.describe()
    return run_dir, read_metrics(run_dir)


def test_hf_native_page_layout_stage_times_and_cache(hf_run: tuple[Path, dict]) -> None:
    _, m = hf_run
    assert m["run"]["status"] == "complete"
    assert (m["model"]["backend"], m["model"]["family"]) == ("hf_native", "deepseek_ocr2")
    assert m["model"]["stage_names"] == {"clip": "encoder"}
    assert m["model"]["optimisations"]["static_kv_cache"] is False  # transformers' DynamicCache grows per step
    page = m["pages"][0]
    assert page["error"] is None
    assert page["crop_grid"] == [2, 1] and page["image_tokens"] == IMAGE_TOKENS
    assert page["prompt_tokens"] == IMAGE_TOKENS + 1 + _text_ids()
    assert 1 <= page["generated_tokens"] <= 8
    # the hooks on transformers' sam_encoder / vision_encoder / multi_modal_projector fired inside vision
    assert page["sam_ms"] > 0 and page["clip_ms"] > 0 and page["projector_ms"] > 0
    assert page["sam_ms"] + page["clip_ms"] + page["projector_ms"] <= page["vision_ms"] < page["prefill_ms"]
    fed = page["prompt_tokens"] + page["generated_tokens"] - 1  # the last token is picked, never fed
    assert page["kv_cache_bytes"] == 2 * 3 * 4 * 16 * 4 * fed


def test_hf_native_analytic_flops_and_efficiency_per_stage(hf_run: tuple[Path, dict]) -> None:
    _, m = hf_run
    rows = {r["stage"]: r for r in m["flops"]}
    assert rows["encoder"]["analytic_flops"] == _tiny_encoder_flops(full_grid=False)
    assert rows["projector"]["analytic_flops"] == 2 * (2 * 144 + 256) * 64 * 64
    assert {"sam", "encoder", "projector", "vision", "prefill", "decode"} <= {e["stage"] for e in m["efficiency"]}
    # routing counted from transformers' router ids: every fed token goes to top-3 experts in each MoE layer (1, 2)
    routing = m["moe_routing"]
    assert set(routing["layers"]) == {"1", "2"} and routing["top_k"] == 3
    for layer in routing["layers"].values():
        assert sum(layer["tokens_per_expert"]) == 3 * routing["tokens"]
        assert len(layer["tokens_per_expert"]) == 8
    assert not any(u["metric"] == "moe_routing" for u in m["unavailable"])


def test_hf_native_report_names_the_backend_and_the_encoder(hf_run: tuple[Path, dict]) -> None:
    run_dir, _ = hf_run
    report = (run_dir / "report.md").read_text()
    assert "hf_native" in report
    assert "|     encoder | ms |" in report and "CLIP" not in report


def test_hf_native_on_a_v1_model_is_refused_before_loading(tmp_path: Path) -> None:
    result = run_cli(["model.backend=hf_native", *SMALL], tmp_path / "run")
    assert_clean_failure(result, "ConfigError", "model.backend=hf_native is transformers' DeepSeek-OCR-2 class")
    assert not (tmp_path / "run" / "metrics.json").exists()
