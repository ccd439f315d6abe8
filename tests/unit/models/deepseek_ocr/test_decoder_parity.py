"""Language half of the native DeepSeek-OCR vs the reference tensors of the tiny fixture.

Starts from the fixture's ``inputs_embeds`` (so vision is out of the loop here; test_model_parity covers
pixels → tokens) and checks prefill logits at every position, 16 greedy decode steps on the static KV
cache (identical tokens, logits within 1e-4 relative), plus the building blocks on their own: routing
math, float32 RMSNorm, the eager expert loop, and cache/chunking invariants.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, DeepseekOCRForCausalLM, generate
from llm_perf_opt.models.deepseek_ocr.decoder import MLP, MoE, RMSNorm, apply_experts_eager, route_tokens
from tests.conftest import rel_err

FIXTURE = Path(__file__).resolve().parents[3] / "fixtures" / "deepseek_ocr_tiny"
CASES = ["global_only", "crop_2x1", "crop_2x3"]
TOL = 1e-4


@pytest.fixture(scope="module")
def model(tiny_reference_model: DeepseekOCRForCausalLM) -> DeepseekOCRForCausalLM:
    return tiny_reference_model


@pytest.fixture(scope="module", params=CASES)
def case(request: pytest.FixtureRequest) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "cases" / f"{request.param}.safetensors"))


def test_prefill_logits_all_positions(model: DeepseekOCRForCausalLM, case: dict[str, torch.Tensor]) -> None:
    embeds = case["inputs_embeds"]
    cache = model.new_cache(batch=1, max_len=embeds.shape[1])
    logits = model.prefill(embeds, cache, logits_positions="all")
    assert logits.shape == case["prefill_logits"].shape
    assert logits.dtype == torch.float32
    assert rel_err(logits, case["prefill_logits"]) < TOL
    assert cache.length == embeds.shape[1]


def test_prefill_last_equals_all(model: DeepseekOCRForCausalLM, case: dict[str, torch.Tensor]) -> None:
    embeds = case["inputs_embeds"]
    last = model.prefill(embeds, model.new_cache(1, embeds.shape[1]))
    full = model.prefill(embeds, model.new_cache(1, embeds.shape[1]), logits_positions="all")
    assert last.shape == (1, model.config.language.vocab_size)
    torch.testing.assert_close(last, full[:, -1], rtol=0, atol=1e-6)


def test_greedy_decode_16_steps(model: DeepseekOCRForCausalLM, case: dict[str, torch.Tensor]) -> None:
    result = generate(model, case["inputs_embeds"], case["input_ids"][0].tolist(), max_new_tokens=16, keep_logits=True)
    assert result.tokens == case["decode_tokens"].tolist()
    assert result.logits is not None
    assert rel_err(torch.stack(result.logits), case["decode_logits"]) < TOL


def test_decode_on_cache_matches_full_recompute(model: DeepseekOCRForCausalLM) -> None:
    """Logits of step-by-step decode == logits of one prefill over prompt + the same tokens."""
    case = load_file(str(FIXTURE / "cases" / "crop_2x1.safetensors"))
    embeds = case["inputs_embeds"]
    tokens = case["decode_tokens"][:6]
    cache = model.new_cache(1, embeds.shape[1] + len(tokens))
    stepwise = [model.prefill(embeds, cache)]
    for tok in tokens[:-1]:
        stepwise.append(model.decode_step(tok.view(1, 1), cache))
    full_embeds = torch.cat([embeds, model.model.embed_tokens(tokens[:-1]).unsqueeze(0)], dim=1)
    full = model.prefill(full_embeds, model.new_cache(1, full_embeds.shape[1]), logits_positions="all")
    expected = full[0, embeds.shape[1] - 1 :]
    assert rel_err(torch.cat(stepwise), expected) < 1e-5


def test_chunked_prefill_matches_single_prefill(model: DeepseekOCRForCausalLM) -> None:
    embeds = load_file(str(FIXTURE / "cases" / "crop_2x3.safetensors"))["inputs_embeds"]
    single = model.prefill(embeds, model.new_cache(1, embeds.shape[1]), logits_positions="all")
    cache = model.new_cache(1, embeds.shape[1])
    first = model.prefill(embeds[:, :20], cache, logits_positions="all")
    second = model.prefill(embeds[:, 20:], cache, logits_positions="all")
    assert rel_err(torch.cat([first, second], dim=1), single) < 1e-5


def test_last_routing_and_stats(model: DeepseekOCRForCausalLM) -> None:
    lang = model.config.language
    embeds = load_file(str(FIXTURE / "cases" / "global_only.safetensors"))["inputs_embeds"]
    cache = model.new_cache(1, embeds.shape[1] + 1)
    logits = model.prefill(embeds, cache)
    moe_layers = [i for i in range(lang.num_hidden_layers) if lang.is_moe_layer(i)]
    routing = model.last_routing
    assert sorted(routing) == moe_layers
    for idx in routing.values():
        assert idx.shape == (embeds.shape[1], lang.num_experts_per_tok)
        assert not idx.requires_grad
    counts = model.tokens_per_expert()
    assert all(sum(c) == embeds.shape[1] * lang.num_experts_per_tok for c in counts.values())
    model.decode_step(logits.argmax(-1).view(1, 1), cache)
    assert all(idx.shape == (1, lang.num_experts_per_tok) for idx in model.last_routing.values())
    counts = model.tokens_per_expert()
    assert all(sum(c) == (embeds.shape[1] + 1) * lang.num_experts_per_tok for c in counts.values())
    hit = model.experts_hit_per_layer()
    assert len(hit) == len(moe_layers) and all(1 <= h <= lang.n_routed_experts for h in hit)


# ---------------------------------------------------------------------------------------------- blocks
def test_route_tokens_softmax_greedy() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 0.5, 0.0, 2.0]])
    idx, w = route_tokens(logits, 2, routed_scaling_factor=2.0)
    probs = logits.softmax(-1)
    assert idx.tolist() == [[3, 2], [0, 3]]
    torch.testing.assert_close(w, torch.stack([probs[0, [3, 2]], probs[1, [0, 3]]]) * 2.0)
    _, w_norm = route_tokens(logits, 2, norm_topk_prob=True)
    torch.testing.assert_close(w_norm.sum(-1), torch.ones(2))
    assert w.dtype == torch.float32


def test_rmsnorm_computes_in_float32() -> None:
    norm = RMSNorm(8, eps=1e-6)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    norm.weight.data = norm.weight.data.to(torch.bfloat16)
    x32 = x.float()
    expected = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=0)


def test_eager_experts_match_dense_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    experts = torch.nn.ModuleList(MLP(16, 8) for _ in range(5))
    for p in experts.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.2
    x = torch.randn(7, 16, generator=gen)
    idx, w = route_tokens(torch.randn(7, 5, generator=gen), 3)
    out, counts = apply_experts_eager(x, idx, w, experts)
    expected = torch.stack([sum(w[t, j] * experts[int(idx[t, j])](x[t]) for j in range(3)) for t in range(7)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert counts == torch.bincount(idx.flatten(), minlength=5).tolist()


def test_moe_layer_has_checkpoint_names() -> None:
    cfg = DeepseekOCRConfig.from_json(FIXTURE / "config.json").language
    keys = set(MoE(cfg).state_dict())
    assert "gate.weight" in keys
    assert {"shared_experts.gate_proj.weight", "experts.0.up_proj.weight", "experts.7.down_proj.weight"} <= keys
    assert MoE(cfg).shared_experts is not None
    assert MoE(cfg).shared_experts.gate_proj.weight.shape == (cfg.moe_intermediate_size * cfg.n_shared_experts, 64)  # type: ignore[union-attr]
