"""Whole native DeepSeek-OCR (pixels → tokens) vs the tiny fixture, plus full-size structure checks.

* end to end per case: SAM / CLIP / projector outputs captured by forward hooks in call order (crops
  first, then the global view), the assembled ``inputs_embeds``, prefill logits and 16 greedy tokens;
* the no-repeat-ngram case (24 steps with and without the rule);
* the full-size model built on the meta device has exactly the checkpoint's keys and shapes and the
  documented parameter total.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from llm_perf_opt.errors import InputError
from llm_perf_opt.models.deepseek_ocr import (
    DeepseekOCRConfig,
    DeepseekOCRForCausalLM,
    empty_model,
    generate,
    num_image_tokens,
)
from tests.conftest import rel_err

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures"
TINY = FIXTURES / "deepseek_ocr_tiny"
REAL = FIXTURES / "deepseek_ocr_real"
CASES = ["global_only", "crop_2x1", "crop_2x3"]
TOL = 1e-4


@pytest.fixture(scope="module")
def model(tiny_reference_model: DeepseekOCRForCausalLM) -> DeepseekOCRForCausalLM:
    return tiny_reference_model


def _load(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(TINY / "cases" / f"{name}.safetensors"))


@pytest.mark.parametrize("name", CASES)
def test_pixels_to_tokens(model: DeepseekOCRForCausalLM, name: str) -> None:
    case = _load(name)
    captured: dict[str, list[torch.Tensor]] = {"sam": [], "clip": [], "projector": []}

    def keep(stage: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(_m: nn.Module, _args: object, out: torch.Tensor) -> None:
            captured[stage].append(out.detach().clone())

        return hook

    handles = [
        model.model.sam_model.register_forward_hook(keep("sam")),
        model.model.vision_model.register_forward_hook(keep("clip")),
        model.model.projector.register_forward_hook(keep("projector")),
    ]
    try:
        feats = model.encode_images(case["images_crop"], case["images_ori"], case["images_spatial_crop"])
    finally:
        for h in handles:
            h.remove()

    grid_w, grid_h = case["images_spatial_crop"][0].tolist()
    n_views = 2 if (grid_w > 1 or grid_h > 1) else 1
    for stage, outs in captured.items():
        assert len(outs) == n_views, f"{stage} called {len(outs)} times"
        for i, out in enumerate(outs):
            ref = case[f"{stage}_{i}"]
            assert out.shape == ref.shape, stage
            assert rel_err(out, ref) < TOL, f"{stage}_{i}"

    assert feats.shape[0] == int(case["images_seq_mask"].sum()) == num_image_tokens(model.config, grid_w, grid_h)
    embeds = model.embed_prompt(case["input_ids"], case["images_seq_mask"], [feats])
    assert rel_err(embeds, case["inputs_embeds"]) < TOL

    cache = model.new_cache(1, embeds.shape[1] + 16)
    logits = model.prefill(embeds, cache, logits_positions="all")
    assert rel_err(logits, case["prefill_logits"]) < TOL
    result = generate(model, embeds, case["input_ids"][0].tolist(), 16, keep_logits=True)
    assert result.tokens == case["decode_tokens"].tolist()
    assert result.logits is not None
    assert rel_err(torch.stack(result.logits), case["decode_logits"]) < TOL


def test_no_repeat_ngram_case(model: DeepseekOCRForCausalLM) -> None:
    case = _load("crop_2x1_no_repeat_2")
    feats = model.encode_images(case["images_crop"], case["images_ori"], case["images_spatial_crop"])
    embeds = model.embed_prompt(case["input_ids"], case["images_seq_mask"], [feats])
    prompt = case["input_ids"][0].tolist()
    with_rule = generate(model, embeds, prompt, 24, no_repeat_ngram_size=2)
    without = generate(model, embeds, prompt, 24)
    assert with_rule.tokens == case["decode_tokens"].tolist()
    assert without.tokens == case["decode_tokens_without_rule"].tolist()


def test_embed_prompt_counts_must_match(model: DeepseekOCRForCausalLM) -> None:
    case = _load("global_only")
    feats = model.encode_images(case["images_crop"], case["images_ori"], case["images_spatial_crop"])
    with pytest.raises(InputError) as err:
        model.embed_prompt(case["input_ids"], case["images_seq_mask"], [feats[:-1]])
    assert "21 image-token positions" in str(err.value) and "20 image feature rows" in str(err.value)


def test_encode_images_checks_tile_count(model: DeepseekOCRForCausalLM) -> None:
    case = _load("crop_2x1")
    with pytest.raises(InputError, match="needs 6 tiles"):
        model.encode_images(case["images_crop"], case["images_ori"], [2, 3])


def test_cache_overflow_is_a_clear_error(model: DeepseekOCRForCausalLM) -> None:
    from llm_perf_opt.models.deepseek_ocr import KVCacheFullError

    embeds = _load("global_only")["inputs_embeds"]
    cache = model.new_cache(1, embeds.shape[1])
    model.prefill(embeds, cache)
    with pytest.raises(KVCacheFullError, match="max_len 29"):
        model.decode_step(torch.tensor([[3]]), cache)
    assert cache.length == embeds.shape[1]


# ---------------------------------------------------------------------------------------------- full size
@pytest.fixture(scope="module")
def full_meta() -> DeepseekOCRForCausalLM:
    return empty_model(DeepseekOCRConfig.from_json(REAL / "config.json"))


def test_full_size_keys_and_shapes_match_checkpoint(full_meta: DeepseekOCRForCausalLM) -> None:
    expected = json.loads((REAL / "full_state_dict.json").read_text())
    state = full_meta.state_dict()
    assert len(expected) == 2710
    assert set(state) == set(expected)
    wrong = {
        k: (tuple(state[k].shape), tuple(v["shape"]))
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v["shape"])
    }
    assert not wrong
    assert all(t.is_meta for t in full_meta.parameters())


def test_full_size_parameter_total(full_meta: DeepseekOCRForCausalLM) -> None:
    counts = json.loads((REAL / "param_counts.json").read_text())
    assert sum(p.numel() for p in full_meta.parameters()) == counts["total"] == 3_336_106_240
    assert sum(p.numel() for p in full_meta.lm_head.parameters()) == counts["lm_head"]
    buffers = {name for name, _ in full_meta.named_buffers()}
    assert buffers == set(counts["keys_in_model_not_in_checkpoint"])


def test_full_size_image_token_counts() -> None:
    """Counts for every mode and page size the vendor preprocessing produced (image_tokens.json)."""
    cfg = DeepseekOCRConfig.from_json(REAL / "config.json")
    table = json.loads((REAL / "image_tokens.json").read_text())
    modes = {
        "gundam": (1024, 640),
        "tiny": (512, 512),
        "small": (640, 640),
        "base": (1024, 1024),
        "large": (1280, 1280),
    }
    checked = 0
    for mode, pages in table.items():
        if mode.startswith("_"):
            continue
        base, tile = modes[mode.split("(")[0]]
        for page in pages.values():
            got = num_image_tokens(cfg, page["grid_w"], page["grid_h"], base_size=base, image_size=tile)
            assert got == page["image_tokens"], (mode, page)
            checked += 1
    assert checked >= 30
    assert num_image_tokens(cfg) == 16 * 17 + 1
