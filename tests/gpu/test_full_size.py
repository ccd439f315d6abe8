"""Full-size DeepSeek-OCR on CUDA (dummy weights, bf16): runs, stays finite, token counts are the real ones.

Skipped without CUDA; run on a GPU machine with ``pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import REAL, requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.fixture(scope="module")
def full_model():
    from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model

    cfg = DeepseekOCRConfig.from_json(REAL / "config.json")
    return build_model(cfg, device="cuda", dtype=torch.bfloat16, weights="dummy", seed=0)


@pytest.mark.parametrize("size", [(1224, 1584), (800, 600), (600, 2000)])
def test_gundam_page_prefill_and_64_decode_steps(full_model, size: tuple[int, int]) -> None:
    from llm_perf_opt.data.datasets import synthetic_page
    from llm_perf_opt.models.deepseek_ocr.kv_cache import StaticKVCache
    from llm_perf_opt.models.deepseek_ocr.preprocess import PreprocessConfig, preprocess_page
    from llm_perf_opt.models.deepseek_ocr.tokenizer import load_tokenizer

    model = full_model
    cfg = model.config
    ref = json.loads((REAL / "image_tokens.json").read_text())["gundam(default: base 1024, tiles 640, crop)"]
    ids = load_tokenizer(None, cfg).encode_prompt("<image>\n<|grounding|>Convert the document to markdown.")
    page = preprocess_page(synthetic_page(size, 0), PreprocessConfig.for_mode("gundam"), cfg, ids)
    expected = ref[f"{size[0]}x{size[1]}"]
    assert page.image_token_count == expected["image_tokens"]
    assert page.prompt_len == 1 + expected["image_tokens"] + 9
    assert page.images_spatial_crop == (expected["grid_w"], expected["grid_h"])

    with torch.inference_mode():
        feats = model.encode_images(page.images_crop, page.images_ori, page.images_spatial_crop)
        embeds = model.embed_prompt(page.input_ids.cuda(), page.images_seq_mask.cuda(), [feats])
        cache = StaticKVCache.for_model(model, batch=1, max_len=page.prompt_len + 65)
        logits = model.prefill(embeds, cache)
        assert torch.isfinite(logits).all()
        token = logits.argmax(-1, keepdim=True)
        for _ in range(64):
            logits = model.decode_step(token, cache)
            assert torch.isfinite(logits).all()
            token = logits.argmax(-1, keepdim=True)
    assert cache.length == page.prompt_len + 64
