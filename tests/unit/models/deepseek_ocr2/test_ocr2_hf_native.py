"""A second, independent implementation: transformers' native ``DeepseekOcr2ForConditionalGeneration``
(transformers >= 5.10.1, no remote code) loads the tiny fixture's weights under their original key names with
``hf_native_config.json`` and must agree with the native model here on the same page, in float64.

Skipped where that transformers version is not installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from llm_perf_opt.models.deepseek_ocr2 import DeepseekOCR2Config, build_model_v2
from llm_perf_opt.models.deepseek_ocr2.hf_native import hf_native_config
from tests.conftest import rel_err

TINY = Path(__file__).resolve().parents[3] / "fixtures" / "deepseek_ocr2_tiny"
REAL = TINY.parent / "deepseek_ocr2_real"
# Two float64 implementations: only float32-rounded RMSNorm statistics (in both) separate them.
TOL = 1e-6


def _hf_class() -> Any:
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "DeepseekOcr2ForConditionalGeneration", None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no native DeepseekOcr2 (needs >= 5.10.1)")
    return cls


def test_hf_native_config_of_the_tiny_model_is_the_fixtures() -> None:
    """No transformers needed: the config written from our tiny config is the fixture's hf_native_config.json."""
    expected = json.loads((TINY / "hf_native_config.json").read_text())
    assert hf_native_config(DeepseekOCR2Config.from_json(TINY)) == expected


def test_transformers_native_full_size_parameter_total() -> None:
    """transformers' class built (on the meta device) from the full-size config written here: 3,389,119,360."""
    cls = _hf_class()
    import transformers

    config = transformers.DeepseekOcr2Config(**hf_native_config(DeepseekOCR2Config.from_json(REAL)))
    with torch.device("meta"):
        hf = cls(config)
    assert sum(p.numel() for p in hf.parameters()) == 3_389_119_360


def test_transformers_native_agrees_with_native(tmp_path: Path) -> None:
    cls = _hf_class()
    (tmp_path / "model.safetensors").symlink_to(TINY / "weights.safetensors")
    shutil.copy(TINY / "hf_native_config.json", tmp_path / "config.json")
    hf, info = cls.from_pretrained(
        str(tmp_path),
        dtype=torch.float64,
        attn_implementation="eager",
        experts_implementation="eager",
        output_loading_info=True,
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()

    case = load_file(str(TINY / "cases" / "crop_2x1.safetensors"))
    crop, ori = case["images_crop"].double(), case["images_ori"].double()
    native = build_model_v2(DeepseekOCR2Config.from_json(TINY / "config.json"), weights=TINY).double()

    projected: list[torch.Tensor] = []
    handle = hf.model.multi_modal_projector.register_forward_hook(lambda _m, _a, out: projected.append(out))
    try:
        with torch.no_grad():
            hf_logits = hf(
                input_ids=case["input_ids"], pixel_values=ori, pixel_values_local=crop, num_local_patches=[2]
            ).logits[0]
    finally:
        handle.remove()

    feats = native.encode_images(crop, ori, case["images_spatial_crop"])
    # transformers runs the global view first, then the tiles; the native layout puts tiles first.
    hf_global, hf_tiles = projected
    assert rel_err(feats[: 2 * 144], hf_tiles.reshape(-1, 64)) < TOL
    assert rel_err(feats[2 * 144 : 2 * 144 + 256], hf_global.reshape(-1, 64)) < TOL
    embeds = native.embed_prompt(case["input_ids"], case["images_seq_mask"], [feats])
    logits = native.prefill(embeds, native.new_cache(1, embeds.shape[1]), logits_positions="all")[0]
    assert rel_err(logits, hf_logits) < TOL
    assert torch.equal(logits.argmax(-1), hf_logits.argmax(-1))
    # And both against the reference of the model's own code (stored as float32).
    assert rel_err(hf_logits, case["prefill_logits"]) < 1e-4
