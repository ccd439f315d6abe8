"""The DeepSeek-OCR-2 fast path on the CPU against the reference tensors of the model's own code
(fixtures/deepseek_ocr2_tiny) and against the eager native v2 model.

* the encoder's fused layer function equals the eager layer under the boolean prefix mask (random weights);
* the fast model (v1's fast language model, SAM, the encoder's fused layers) reproduces every stored tensor of
  the 2×1-tile page — SAM, encoder and projector per view, prefill logits at every position — and the 12 greedy
  tokens, through the host loop and the on-device greedy loop, in float64 and float32;
* teacher-forced decode logits of the fast model equal the eager model's (the comparison that does not depend
  on random weights picking distinct tokens);
* the fast path leaves the shared modules as it found them, and the eager model's outputs are unchanged.

The graph and compile switches are CUDA-only or slow on the CPU (off here); tests/gpu/test_ocr2_fast_gpu.py runs
them on the full-size model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from llm_perf_opt.errors import InputError
from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model, generate
from llm_perf_opt.models.deepseek_ocr.decoder import RotaryEmbedding
from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, FastModel, apply_fast_path
from llm_perf_opt.models.deepseek_ocr.fast_layers import fuse_linears_with_bias
from llm_perf_opt.models.deepseek_ocr2 import DeepseekOCR2Config, DeepseekOCR2ForCausalLM, build_model_v2
from llm_perf_opt.models.deepseek_ocr2.encoder import (
    EncoderLayer,
    encoder_layer_fast,
    prefix_causal_mask,
    query_rows_mask,
)
from llm_perf_opt.models.deepseek_ocr2.fast import EncoderVisionFast, apply_fast_path_v2
from tests.conftest import rel_err

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures"
TINY = FIXTURES / "deepseek_ocr2_tiny"
TOL = 1e-4
# CPU: no graphs (CUDA-only), no torch.compile (minutes of C++ compilation on a shared 2-core box)
CPU_FAST = FastConfig(cuda_graphs=False, vision_graphs=False, sam_compile=False, clip_compile=False)


@pytest.fixture(scope="module")
def case() -> dict[str, torch.Tensor]:
    return load_file(str(TINY / "cases" / "crop_2x1.safetensors"))


def _fixture_model(dtype: torch.dtype) -> DeepseekOCR2ForCausalLM:
    cfg = DeepseekOCR2Config.from_json(TINY / "config.json")
    return build_model_v2(cfg, device="cpu", dtype=torch.float32, weights=TINY).to(dtype)


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["float64", "float32"])
def fast(request: pytest.FixtureRequest) -> FastModel:
    return apply_fast_path_v2(_fixture_model(request.param), CPU_FAST)


def test_query_rows_mask_is_the_prefix_masks_query_block() -> None:
    """N = 2: query 0 sees both image tokens and itself, query 1 everything (written out by hand)."""
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(query_rows_mask(2), expected)
    assert query_rows_mask(2).is_contiguous() and query_rows_mask(2) is query_rows_mask(2)


def test_fused_qkv_with_bias_keeps_values_and_storage() -> None:
    torch.manual_seed(0)
    lins = [nn.Linear(8, rows, bias=True) for rows in (8, 4, 4)]
    x = torch.randn(3, 8)
    before = [lin(x) for lin in lins]
    w, b = fuse_linears_with_bias(lins)
    assert w.shape == (16, 8) and b.shape == (16,)
    assert lins[1].weight.data_ptr() == w[8:12].data_ptr() and lins[2].bias.data_ptr() == b[12:].data_ptr()
    assert fuse_linears_with_bias(lins)[0] is w  # fused once
    # the three layers' values to float32 rounding: one BLAS call over 16 rows may sum in another order than three
    # calls (bit-equal on some CPUs, not on others), so the oracle is the float64 product of each layer's weights
    fused = torch.nn.functional.linear(x, w, b)
    exact = torch.cat(
        [torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double()) for lin in lins], -1
    )
    assert float((fused.double() - exact).abs().max()) < 1e-6
    assert float((fused - torch.cat(before, dim=-1)).abs().max()) < 1e-6
    for lin, want in zip(lins, before, strict=True):
        assert torch.equal(lin(x), want)
    with pytest.raises(ValueError, match="needs a bias"):
        fuse_linears_with_bias([nn.Linear(8, 4, bias=False)])


@pytest.mark.parametrize("n_image", [3, 144])
def test_encoder_layer_fast_matches_the_masked_layer(n_image: int) -> None:
    """Random weights well away from the dummy init: the fused function == the module under the boolean mask."""
    cfg = DeepseekOCR2Config.from_json(TINY / "config.json").encoder
    torch.manual_seed(n_image)
    layer = EncoderLayer(cfg).double()
    for p in layer.parameters():
        p.data.normal_(0.0, 0.3)
    x = torch.randn(2, 2 * n_image, cfg.hidden_size, dtype=torch.float64)
    cos, sin = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, 2 * n_image)(0, 2 * n_image, x.device, x.dtype)
    with torch.no_grad():
        want = layer(x, cos, sin, prefix_causal_mask(n_image), n_image)
        got = encoder_layer_fast(
            x,
            layer.fast_weights(),
            cos,
            sin,
            query_rows_mask(n_image),
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.rms_norm_eps,
        )
        assert rel_err(got, want) < 1e-12
        assert torch.equal(layer(x, cos, sin, prefix_causal_mask(n_image), n_image), want)  # eager on fused views


def test_every_reference_tensor_on_the_fast_path(fast: FastModel, case: dict[str, torch.Tensor]) -> None:
    captured: dict[str, list[torch.Tensor]] = {"sam": [], "encoder": [], "projector": []}

    def keep(stage: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(_m: nn.Module, _args: object, out: torch.Tensor) -> None:
            captured[stage].append(out.detach().clone())

        return hook

    m = fast.base.model
    handles = [
        m.sam_model.register_forward_hook(keep("sam")),
        m.qwen2_model.register_forward_hook(keep("encoder")),
        m.projector.register_forward_hook(keep("projector")),
    ]
    dtype = fast.dtype
    try:
        feats = fast.encode_images(
            case["images_crop"].to(dtype), case["images_ori"].to(dtype), case["images_spatial_crop"]
        )
    finally:
        for h in handles:
            h.remove()
    for stage, outs in captured.items():  # the hooks fired on the fast forwards: the stages stay timed
        assert [o.shape for o in outs] == [case[f"{stage}_tiles"].shape, case[f"{stage}_global"].shape], stage
        assert rel_err(outs[0], case[f"{stage}_tiles"]) < TOL, f"{stage}_tiles"
        assert rel_err(outs[1], case[f"{stage}_global"]) < TOL, f"{stage}_global"
    assert feats.shape == (545, 64)

    embeds = fast.embed_prompt(case["input_ids"], case["images_seq_mask"], [feats])
    cache = fast.new_cache(1, embeds.shape[1] + 12)
    logits = fast.prefill(embeds, cache, logits_positions="all")
    assert rel_err(logits[0], case["prefill_logits"]) < TOL
    want = case["greedy_tokens"].tolist()
    assert generate(fast, embeds, case["input_ids"][0].tolist(), 12, eos_token_id=1).tokens == want
    # the profiler's on-device loop (greedy inside the decode step, n-gram rule off)
    cache = fast.new_cache(1, embeds.shape[1] + 12)
    first = fast.prefill(embeds, cache).argmax(dim=-1, keepdim=True)
    rows = fast.decoder_for(cache, 0).greedy(first, 11)
    assert [int(first[0, 0]), *rows[0]][:12] == want


def test_fast_vision_leaves_the_modules_as_found(fast: FastModel, case: dict[str, torch.Tensor]) -> None:
    base = fast.base
    dtype = fast.dtype
    crops, ori = case["images_crop"].to(dtype), case["images_ori"].to(dtype)
    fast.encode_images(crops, ori, case["images_spatial_crop"])
    sam, enc = base.model.sam_model, base.model.qwen2_model
    assert not sam.fast and sam.block_fn is None and sam.forward_fn is None
    assert enc.layer_fn is None and enc.forward_fn is None and not enc.fast
    eager = base.encode_images(crops, ori, case["images_spatial_crop"])  # on the re-pointed (fused) weights
    assert rel_err(eager[:288], case["projector_tiles"].reshape(288, -1)) < TOL


def test_teacher_forced_decode_logits_match_eager() -> None:
    """Fast vs eager v2 on the same inputs, both fed the eager model's tokens: logits step by step.  Weights
    scaled ×10 so the logits are far from flat (the dummy-scale fixture weights give near-ties)."""
    eager = _fixture_model(torch.float32)
    for p in eager.model.layers.parameters():
        p.data.mul_(10.0)
    torch.manual_seed(0)
    embeds = torch.randn(1, 40, eager.config.language.hidden_size)
    fast = apply_fast_path_v2(eager, CPU_FAST)
    runs = []
    tokens: list[int] = []
    for model in (eager, fast):
        cache = model.new_cache(1, 40 + 9)
        rows = [model.prefill(embeds, cache)]
        for i in range(8):
            if model is eager:
                tokens.append(int(rows[-1].argmax(-1)))
            rows.append(model.decode_step(torch.tensor([[tokens[i]]]), cache))
        runs.append(rows)
    for want, got in zip(*runs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(set(tokens)) > 1  # the comparison saw distinct tokens, not one repeated id


def test_vision_parts_refuse_the_other_model() -> None:
    v2 = _fixture_model(torch.float32)
    with pytest.raises(InputError, match="no CLIP tower") as err:
        apply_fast_path(v2, CPU_FAST)
    assert err.value.hint and "apply_fast_path_v2" in err.value.hint
    v1 = build_model(DeepseekOCRConfig.from_json(FIXTURES / "deepseek_ocr_tiny" / "config.json"), weights="dummy")
    with pytest.raises(InputError, match="needs a DeepSeek-OCR-2 model"):
        EncoderVisionFast(v1, CPU_FAST)
    again = apply_fast_path_v2(apply_fast_path_v2(v2, CPU_FAST))  # re-applied over a FastModel: same base
    assert again.base is v2 and isinstance(again.vision, EncoderVisionFast)
