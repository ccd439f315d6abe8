"""Analytic FLOPs of DeepSeek-OCR-2's vision stage (profiling/flops_ocr2.py) against FLOPs counted by
torch's FlopCounterMode on the tiny model, and against hand-worked pair counts of the encoder's prefix mask."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm_perf_opt.models.deepseek_ocr2 import (
    DeepseekOCR2Config,
    DeepseekOCR2ForCausalLM,
    build_model_v2,
    count_parameters,
    empty_model_v2,
)
from llm_perf_opt.profiling.flop_count import count_flop_counter
from llm_perf_opt.profiling.flops_ocr2 import (
    encoder_attention_pairs,
    encoder_flops,
    param_counts_v2,
    v2_views,
    vision_flops_v2,
)

TINY = Path(__file__).resolve().parents[2] / "fixtures" / "deepseek_ocr2_tiny"


@pytest.fixture(scope="module")
def model() -> DeepseekOCR2ForCausalLM:
    return build_model_v2(DeepseekOCR2Config.from_json(TINY / "config.json"), weights=TINY)


def test_prefix_mask_pairs_by_hand() -> None:
    # N = 3: three image rows see 3 keys each (9), query rows see 3 + 1, 3 + 2, 3 + 3 keys (15): 24 of 36.
    assert encoder_attention_pairs(3) == 24
    assert encoder_attention_pairs(3, useful=False) == 36
    assert encoder_attention_pairs(0) == 0


@pytest.mark.parametrize(("view_px", "batch"), [(768, 2), (1024, 1)])
def test_encoder_analytic_equals_counted(model: DeepseekOCR2ForCausalLM, view_px: int, batch: int) -> None:
    cfg = model.config
    side = view_px // 64
    n = side * side
    sam_out = torch.randn(batch, cfg.encoder.hidden_size, side, side)
    counted = count_flop_counter(model.model.qwen2_model, sam_out)
    full = encoder_flops(cfg.encoder, n, batch=batch, useful=False)
    useful = encoder_flops(cfg.encoder, n, batch=batch)
    assert counted.total_flops == full.total_flops
    # The counter computes the whole (2N)² grid; the mask drops N·N image→query pairs and N(N−1)/2 future queries,
    # each 2·(d + d) FLOPs per head and layer (tiny: 2 layers, 4 heads of 16).
    masked = n * n + n * (n - 1) // 2
    assert full.total_flops - useful.total_flops == 2 * batch * 2 * 4 * (16 + 16) * masked
    q_proj = sum(v for k, v in counted.by_module.items() if k.endswith("self_attn.q_proj"))
    kv_proj = sum(v for k, v in counted.by_module.items() if k.endswith(("self_attn.k_proj", "self_attn.v_proj")))
    down = sum(v for k, v in counted.by_module.items() if k.endswith("mlp.down_proj"))
    assert q_proj == full.components_flops["attn.q_proj"] == 2 * 2 * batch * 2 * n * 64 * 64  # 2 layers
    assert kv_proj == full.components_flops["attn.kv_proj"] == 2 * 2 * 2 * batch * 2 * n * 64 * 32  # GQA: 2 kv heads
    assert down == full.components_flops["mlp.down"]


def test_vision_analytic_equals_counted(model: DeepseekOCR2ForCausalLM) -> None:
    """SAM + encoder + projector of one 2-tile page, counted through the model's own per-view call."""
    cfg = model.config
    views = v2_views(cfg, 2)
    assert views == ((2, 768, 768), (1, 1024, 1024))
    counted = sum(count_flop_counter(model._encode_views, torch.randn(c, 3, h, w)).total_flops for c, h, w in views)
    sam, enc, proj = vision_flops_v2(cfg, views, useful=False)
    assert counted == sam.total_flops + enc.total_flops + proj.total_flops
    assert proj.total_flops == 2 * (2 * 144 + 256) * 64 * 64


def test_full_size_encoder_matches_the_issue_figures() -> None:
    """Issue 20's rough count: ≈ 213 GFLOP per 768-px tile and ≈ 389 per global view (full attention grid)."""
    enc = DeepseekOCR2Config().encoder
    assert round(encoder_flops(enc, 144, useful=False).total_flops / 1e9) == 213
    assert round(encoder_flops(enc, 256, useful=False).total_flops / 1e9) == 389


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_param_counts_match_the_module_tree(which: str) -> None:
    path = TINY / "config.json" if which == "tiny" else TINY.parent / "deepseek_ocr2_real" / "config.json"
    cfg = DeepseekOCR2Config.from_json(path)
    pc = param_counts_v2(cfg)
    meta = empty_model_v2(cfg)
    m = meta.model
    assert pc.sam_model == count_parameters(m.sam_model)
    assert pc.encoder == count_parameters(m.qwen2_model)
    assert pc.projector == count_parameters(m.projector)
    assert pc.lm_head == count_parameters(meta.lm_head)
    assert pc.total == count_parameters(meta)
    if which == "real":
        assert pc.total == 3_389_119_360
        # The language model is v1's: the same 574,127,360 weights per decoded token (tests/unit/test_flops.py).
        assert pc.activated_per_token == 574_127_360


def test_fast_encoder_skips_the_image_to_query_block(model: DeepseekOCR2ForCausalLM) -> None:
    """The fast path's split attention computes N·N (images) + N·2N (queries) pairs: the full grid minus the
    N·N image→query block, which is what the counter sees (2 layers, 4 heads of 16, batch 1, N = 256)."""
    enc = model.model.qwen2_model
    sam_out = torch.randn(1, 64, 16, 16)
    enc.fast = True
    try:
        counted = count_flop_counter(enc, sam_out).total_flops
    finally:
        enc.fast = False
    full = encoder_flops(model.config.encoder, 256, useful=False).total_flops
    assert counted == full - 2 * 2 * 4 * (16 + 16) * 256 * 256
