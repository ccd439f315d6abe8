"""Native DeepSeek-OCR-2 vs the reference tensors of the model's own code (fixtures/deepseek_ocr2_tiny), plus
full-size structure checks against the real checkpoint's config.json and weight index (fixtures/deepseek_ocr2_real).

* every stored tensor of the 2×1-tile page: SAM, encoder and projector outputs per view (captured by forward
  hooks, tiles first), prefill logits at every position, the 12 greedy tokens, in float64 and float32;
* the encoder mask against a hand-written matrix;
* the full-size model built on the meta device has exactly the index's 2,707 keys, and its parameter total is
  the one computed by hand from the architecture's sizes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from llm_perf_opt.errors import InputError, ModelLoadError
from llm_perf_opt.models.deepseek_ocr import generate
from llm_perf_opt.models.deepseek_ocr2 import (
    DeepseekOCR2Config,
    DeepseekOCR2ForCausalLM,
    build_model_v2,
    count_parameters,
    empty_model_v2,
    num_image_tokens_v2,
    prefix_causal_mask,
)
from tests.conftest import rel_err

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures"
TINY = FIXTURES / "deepseek_ocr2_tiny"
REAL = FIXTURES / "deepseek_ocr2_real"
TOL = 1e-4


@pytest.fixture(scope="module")
def case() -> dict[str, torch.Tensor]:
    return load_file(str(TINY / "cases" / "crop_2x1.safetensors"))


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["float64", "float32"])
def model(request: pytest.FixtureRequest) -> DeepseekOCR2ForCausalLM:
    cfg = DeepseekOCR2Config.from_json(TINY / "config.json")
    built = build_model_v2(cfg, device="cpu", dtype=torch.float32, weights=TINY)
    return built.to(request.param)


def test_every_reference_tensor(model: DeepseekOCR2ForCausalLM, case: dict[str, torch.Tensor]) -> None:
    captured: dict[str, list[torch.Tensor]] = {"sam": [], "encoder": [], "projector": []}

    def keep(stage: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(_m: nn.Module, _args: object, out: torch.Tensor) -> None:
            captured[stage].append(out.detach().clone())

        return hook

    m = model.model
    handles = [
        m.sam_model.register_forward_hook(keep("sam")),
        m.qwen2_model.register_forward_hook(keep("encoder")),
        m.projector.register_forward_hook(keep("projector")),
    ]
    try:
        feats = model.encode_images(
            case["images_crop"].float(), case["images_ori"].float(), case["images_spatial_crop"]
        )
    finally:
        for h in handles:
            h.remove()
    for stage, outs in captured.items():
        assert [o.shape for o in outs] == [case[f"{stage}_tiles"].shape, case[f"{stage}_global"].shape], stage
        assert rel_err(outs[0], case[f"{stage}_tiles"]) < TOL, f"{stage}_tiles"
        assert rel_err(outs[1], case[f"{stage}_global"]) < TOL, f"{stage}_global"

    # Layout: tile 0, tile 1, global view, view_seperator (545 = 256 + 2·144 + 1 rows).
    assert feats.shape == (545, 64) == (int(case["images_seq_mask"].sum()), 64)
    assert torch.equal(feats[:144], captured["projector"][0][0])
    assert torch.equal(feats[288:544], captured["projector"][1][0])
    assert torch.equal(feats[544], model.model.view_seperator)

    embeds = model.embed_prompt(case["input_ids"], case["images_seq_mask"], [feats])
    cache = model.new_cache(1, embeds.shape[1] + 12)
    logits = model.prefill(embeds, cache, logits_positions="all")
    assert logits.shape == (1, 553, 512)
    assert rel_err(logits[0], case["prefill_logits"]) < TOL
    result = generate(model, embeds, case["input_ids"][0].tolist(), 12, eos_token_id=1)
    assert result.tokens == case["greedy_tokens"].tolist()


def test_encoder_mask_by_hand() -> None:
    """N = 3 image tokens then 3 queries: image rows see the image block only; query i sees images + queries <= i."""
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(prefix_causal_mask(3), expected)


def test_view_without_queries_is_a_clear_error(model: DeepseekOCR2ForCausalLM) -> None:
    pixels = torch.zeros(1, 3, 640, 640, dtype=model.dtype)  # 10×10 = 100 SAM tokens: no query table
    with pytest.raises(InputError, match="got a view with 100"):
        model.encode_images(pixels, pixels, [1, 1])


def test_encode_images_checks_tile_count(model: DeepseekOCR2ForCausalLM, case: dict[str, torch.Tensor]) -> None:
    with pytest.raises(InputError, match="needs 6 tiles"):
        model.encode_images(case["images_crop"], case["images_ori"], [3, 2])


def test_dummy_weights_are_seeded_and_run() -> None:
    cfg = DeepseekOCR2Config.from_json(TINY / "config.json")
    a = build_model_v2(cfg, weights="dummy", seed=3)
    b = build_model_v2(cfg, weights="dummy", seed=3)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert torch.equal(a.model.qwen2_model.stack.norm.weight, torch.ones(64))
    assert a.model.qwen2_model.query_768.weight.std().item() == pytest.approx(0.02, rel=0.1)
    pixels = torch.zeros(1, 3, 1024, 1024)
    feats = a.encode_images(pixels, pixels, [1, 1])
    assert feats.shape == (num_image_tokens_v2(cfg), 64) == (257, 64)
    assert torch.isfinite(feats).all()


# ---------------------------------------------------------------------------------------------- config
def test_real_config() -> None:
    cfg = DeepseekOCR2Config.from_json(REAL)
    # config.json says [512, 1024]; the remote code (and the weights) have a 896-channel last conv.
    assert cfg.sam.downsample_channels == (512, 896)
    assert (cfg.sam.embed_dim, cfg.sam.depth, cfg.sam.num_heads, cfg.sam.global_attn_indexes) == (
        768,
        12,
        12,
        (2, 5, 8, 11),
    )
    enc = cfg.encoder
    assert (enc.hidden_size, enc.num_layers, enc.num_attention_heads, enc.num_key_value_heads, enc.head_dim) == (
        896,
        24,
        14,
        2,
        64,
    )
    assert (cfg.projector.input_dim, cfg.projector.n_embed) == (896, 1280)
    assert (cfg.language.hidden_size, cfg.language.n_routed_experts, cfg.image_token_id) == (1280, 64, 128815)


def test_v1_config_is_refused() -> None:
    v1 = FIXTURES / "deepseek_ocr_real" / "config.json"
    with pytest.raises(ModelLoadError, match="not a DeepSeek-OCR-2 config"):
        DeepseekOCR2Config.from_json(v1)


# ---------------------------------------------------------------------------------------------- full size
@pytest.fixture(scope="module")
def full_meta() -> DeepseekOCR2ForCausalLM:
    return empty_model_v2(DeepseekOCR2Config.from_json(REAL / "config.json"))


def test_full_size_keys_match_index(full_meta: DeepseekOCR2ForCausalLM) -> None:
    index = json.loads((REAL / "model.safetensors.index.json").read_text())["weight_map"]
    state = full_meta.state_dict()
    assert len(index) == 2707
    assert sorted(state) == sorted(index)
    assert all(t.is_meta for t in full_meta.parameters())
    assert not list(full_meta.buffers())


def _hand_count() -> dict[str, int]:
    """Parameters from the architecture's published sizes (README of fixtures/deepseek_ocr2_real), not the modules."""
    # SAM ViT-B: patch conv, 64×64 absolute positions, 12 blocks (rel-pos 2·14−1 rows windowed, 2·64−1 global),
    # neck 768→256 (1×1) + 256→256 (3×3) with two LayerNorms, convs 256→512→896 (3×3, no bias).
    d, mlp = 768, 3072
    block_common = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
    rel = {False: 2 * (2 * 14 - 1) * 64, True: 2 * (2 * 64 - 1) * 64}
    sam = (3 * 16 * 16 * d + d) + 64 * 64 * d
    sam += sum(block_common + rel[i in (2, 5, 8, 11)] for i in range(12))
    sam += d * 256 + 2 * 256 + 256 * 256 * 9 + 2 * 256 + 256 * 512 * 9 + 512 * 896 * 9
    # Encoder: 24 × (q 896→896 + bias, k/v 896→128 + bias, o 896→896, SwiGLU 3·896·4864, two norms), final norm,
    # queries 144 + 256.
    h, kv, ffn = 896, 2 * 64, 4864
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * ffn + 2 * h
    encoder = 24 * layer + h + (144 + 256) * h
    projector = 896 * 1280 + 1280
    # Language model (v1's): embeddings + lm_head, 12 × attention 4·1280², layer 0 dense MLP 3·1280·6848,
    # layers 1..11: gate 64·1280 + 64 routed experts and 2 shared (3·1280·896 each), norms.
    e = 1280
    lm = 2 * 129280 * e + e
    lm += 12 * (4 * e * e + 2 * e)
    lm += 3 * e * 6848 + 11 * (64 * e + 66 * 3 * e * 896)
    return {"sam": sam, "encoder": encoder, "projector": projector, "lm": lm, "view_seperator": e}


def test_full_size_parameter_total(full_meta: DeepseekOCR2ForCausalLM) -> None:
    hand = _hand_count()
    m = full_meta.model
    assert count_parameters(m.sam_model) == hand["sam"]
    assert count_parameters(m.qwen2_model) == hand["encoder"]
    assert count_parameters(m.projector) == hand["projector"]
    assert count_parameters(full_meta) == sum(hand.values()) == 3_389_119_360
    # The README's rounded split: LM 2,934.7 M, SAM 95.0 M, encoder 358.3 M, projector 1.15 M.
    assert round(hand["lm"] / 1e5) == 29347 and round(hand["sam"] / 1e5) == 950 and round(hand["encoder"] / 1e5) == 3583


def test_image_token_formula() -> None:
    cfg = DeepseekOCR2Config()
    assert [num_image_tokens_v2(cfg, k) for k in range(7)] == [257, 401, 545, 689, 833, 977, 1121]
    assert num_image_tokens_v2(cfg, 0, base_size=768) == 145  # the 768 non-crop mode: 12² + 1
    with pytest.raises(InputError):
        num_image_tokens_v2(cfg, -1)


def test_fast_encoder_attention_is_the_same_function(model: DeepseekOCR2ForCausalLM) -> None:
    """The fast path's two mask-free SDPA calls (lower-right causal for the queries) equal the boolean mask."""
    enc = model.model.qwen2_model
    torch.manual_seed(0)
    for side, batch in ((12, 2), (16, 1)):
        sam_out = torch.randn(batch, 64, side, side, dtype=model.dtype)
        reference = enc(sam_out)
        enc.fast = True
        try:
            fast = enc(sam_out)
        finally:
            enc.fast = False
        tol = 1e-12 if model.dtype == torch.float64 else 1e-5
        assert rel_err(fast, reference) < tol
