"""The settings a run used, as the real CLI records them (metrics.json, config.yaml, report.md), and bad
settings refused by the CLI before the model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import SMALL, assert_clean_failure, read_metrics, run_cli


def test_resolution_mode_records_the_geometry_that_ran(tmp_path: Path) -> None:
    """infer=deepseek_ocr.base on the tiny arch (whose own geometry is 256 / 128 with crops): the vendor's Base
    mode is a 1024 global view, 1024 tiles, no crops, and that is what every record says."""
    run_dir = tmp_path / "run"
    result = run_cli([*SMALL, "model/deepseek_ocr/infer=deepseek_ocr.base"], run_dir)
    assert result.returncode == 0, result.describe()
    metrics = read_metrics(run_dir)
    pre = metrics["run"]["config"]["model"]["preprocess"]
    assert (pre["base_size"], pre["image_size"], pre["crop_mode"]) == (1024, 1024, False)
    assert metrics["run"]["config"]["infer"]["mode"] == "base"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["preprocess"] == pre
    # what the model really saw: one global view of 1024 px, no tiles; 16 x 17 + 1 image tokens for a 1024 view
    # (16-px SAM patches, two stride-2 convs -> 1024 / 64 = 16 per side, a newline per row, one separator)
    (page,) = [p for p in metrics["pages"] if p["status"] == "ok"]
    assert page["vision_views"] == [[1, 1024, 1024]] and page["n_tiles"] == 0
    assert page["image_tokens"] == 16 * 17 + 1
    report = (run_dir / "report.md").read_text()
    assert "base 1024 px, tile 1024 px, crop off" in report


def test_vllm_preset_and_prompt_preset_are_recorded(tmp_path: Path) -> None:
    """infer=deepseek_ocr.vllm_gundam with model.prompt=free_ocr on the tiny arch: the records name the preset, its
    tile cap (vLLM's 6) and n-gram rule (30 within 90, <td>/</td> exempt, output only), and the prompt that ran."""
    run_dir = tmp_path / "run"
    vllm = "model/deepseek_ocr/infer=deepseek_ocr.vllm_gundam"
    result = run_cli([*SMALL, vllm, "infer.max_new_tokens=8", "model.prompt=free_ocr"], run_dir)
    assert result.returncode == 0, result.describe()
    config = read_metrics(run_dir)["run"]["config"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == config
    infer = config["infer"]
    assert (infer["preset"], infer["mode"], infer["max_new_tokens"]) == ("vllm_gundam", "gundam", 8)
    rule = {k: infer[f"no_repeat_ngram_{k}"] for k in ("size", "window", "exempt_ids", "scope")}
    assert rule == {"size": 30, "window": 90, "exempt_ids": [128821, 128822], "scope": "output"}
    pre = config["model"]["preprocess"]
    assert (pre["base_size"], pre["image_size"], pre["min_crops"], pre["max_crops"]) == (1024, 640, 2, 6)
    assert (config["model"]["prompt"], config["model"]["prompt_preset"]) == ("<image>\nFree OCR.", "free_ocr")
    report = (run_dir / "report.md").read_text()
    assert "| preset | vllm_gundam (mode gundam): at most 6 tiles |" in report
    assert "no_repeat_ngram_size 30 (window 90, exempt ids [128821, 128822], over the output)" in report


def test_null_token_cap_records_the_fallback(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [a for a in SMALL if not a.startswith("infer.max_new_tokens")]
    result = run_cli([*args, "infer.max_new_tokens=null", "max_new_tokens=5", "infer.ignore_eos=true"], run_dir)
    assert result.returncode == 0, result.describe()
    metrics = read_metrics(run_dir)
    assert metrics["run"]["config"]["infer"]["max_new_tokens"] == 5
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["infer"]["max_new_tokens"] == 5
    assert [p["generated_tokens"] for p in metrics["pages"]] == [5]  # ignore_eos: the cap is what ran
    assert "1 × 5" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("seed=abc", "seed"),
        ("fail_fast=no", "fail_fast"),
        ("profiling.activities=[bogus]", "profiling.activities"),
        ("model.prompt=free_ocrr", "free_ocr"),  # the message lists the presets
        ("infer.no_repeat_ngram_scope=prompt", "infer.no_repeat_ngram_scope"),
    ],
)
def test_bad_setting_fails_before_the_model_loads(tmp_path: Path, override: str, key: str) -> None:
    run_dir = tmp_path / "run"
    result = run_cli([*SMALL, override], run_dir)
    line = assert_clean_failure(result, "ConfigError", key)
    print(f"\n{override}: {line}")
    # nothing of the run was written: no config.yaml, no journal, no report
    assert not any((run_dir / name).exists() for name in ("config.yaml", "pages.jsonl", "metrics.json"))
