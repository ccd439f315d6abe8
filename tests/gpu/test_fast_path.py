"""Fast path == eager on the full-size model (bf16, dummy weights) on a GPU: tokens for 64 steps, logits close."""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model
from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, apply_fast_path

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CONFIG = "src/llm_perf_opt/models/deepseek_ocr/configs/deepseek-ocr.json"
STEPS = 64


def _greedy(model: object, embeds: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    cache = model.new_cache(batch=1, max_len=embeds.shape[1] + STEPS + 1)  # type: ignore[attr-defined]
    logits = model.prefill(embeds, cache)  # type: ignore[attr-defined]
    tokens, rows = [int(logits.argmax(-1))], [logits[0].float().cpu()]
    for _ in range(STEPS):
        logits = model.decode_step(torch.tensor([[tokens[-1]]], device=embeds.device), cache)  # type: ignore[attr-defined]
        tokens.append(int(logits.argmax(-1)))
        rows.append(logits[0].float().cpu())
    return tokens, rows


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_fast_tokens_match_eager(cuda_graphs: bool) -> None:
    cfg = DeepseekOCRConfig.from_json(CONFIG)
    model = build_model(cfg, "cuda", torch.bfloat16, "dummy")
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode():
        ids = torch.randint(0, cfg.language.vocab_size, (1, 300), generator=gen).cuda()
        embeds = model.model.embed_tokens(ids)
        ref_tokens, ref_rows = _greedy(model, embeds)
        fast = apply_fast_path(model, FastConfig(cuda_graphs=cuda_graphs))
        tokens, rows = _greedy(fast, embeds)
    assert tokens == ref_tokens
    scale = max(float(r.abs().max()) for r in ref_rows)
    worst = max(float((a - b).abs().max()) for a, b in zip(rows, ref_rows, strict=True))
    assert worst <= 2e-2 * scale + 1e-2, (worst, scale)
