"""Backend ``hf_native`` (transformers' own DeepSeek-OCR-2 class) on CUDA.

The tiny fixture's reference (logits at every position and 12 greedy tokens from the model's own code, float64)
is the oracle: transformers' class, loaded through the backend with the fixture's weights, must reproduce it on
the GPU in float32 with TF32 off, as it does on the CPU.  Skipped without CUDA or without transformers >= 5.10.1.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from llm_perf_opt.errors import ConfigError
from tests.conftest import ROOT, rel_err, requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]
TINY = ROOT / "tests" / "fixtures" / "deepseek_ocr2_tiny"


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """Plain float32 matmuls and convolutions, so the float64 reference's tolerance applies."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _backend() -> Any:
    from llm_perf_opt.runners.backends import build_backend
    from llm_perf_opt.runners.backends.hf_native import hf_native_class
    from llm_perf_opt.runners.settings import ModelSettings, PreprocessSettings

    try:
        hf_native_class()
    except ConfigError as exc:
        pytest.skip(f"transformers' native DeepSeek-OCR-2 class is not available: {exc.message}")
    pre = PreprocessSettings(base_size=1024, image_size=768, crop_mode=True, min_crops=2, max_crops=6)
    settings = ModelSettings(family="deepseek_ocr2", backend="hf_native", weights="checkpoint", path=str(TINY),
                             dtype="float32", preprocess=pre)  # fmt: skip
    return build_backend(settings, torch.device("cuda"), torch.float32, 0, ROOT)


def test_hf_native_on_cuda_reproduces_the_fixture(no_tf32: None) -> None:
    backend = _backend()
    m = backend.model
    assert next(m.parameters()).is_cuda
    case = {k: v.cuda() for k, v in load_file(str(TINY / "cases" / "crop_2x1.safetensors")).items()}
    with torch.no_grad():
        feats = m.encode_images(case["images_crop"].float(), case["images_ori"].float(), case["images_spatial_crop"])
        embeds = m.embed_prompt(case["input_ids"], case["images_seq_mask"].bool(), [feats])
        logits = m.prefill(embeds, backend.new_cache(embeds.shape[1] + 12), logits_positions="all")[0]
        assert rel_err(logits, case["prefill_logits"]) < 1e-4
        cache = backend.new_cache(embeds.shape[1] + 12)
        tokens = [int(m.prefill(embeds, cache)[0].argmax())]
        while len(tokens) < 12 and tokens[-1] != 1:
            tokens.append(int(m.decode_step(torch.tensor([[tokens[-1]]], device="cuda"), cache)[0].argmax()))
    assert tokens == case["greedy_tokens"].tolist()
