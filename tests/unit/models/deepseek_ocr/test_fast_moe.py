"""Grouped MoE and the fast path agree with the eager model on the tiny config (CPU, float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, DeepseekOCRForCausalLM, build_model
from llm_perf_opt.models.deepseek_ocr.decoder import (
    EXPERT_IMPLS,
    MLP,
    MoE,
    apply_experts_eager,
    route_tokens,
    set_expert_impl,
    stacked_expert_weights,
)
from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, apply_fast_path, first_argmax

FIXTURE = Path(__file__).resolve().parents[3] / "fixtures" / "deepseek_ocr_tiny"


def _random_model(seed: int = 0) -> DeepseekOCRForCausalLM:
    cfg = DeepseekOCRConfig.from_json(FIXTURE / "config.json")
    return build_model(cfg, device="cpu", dtype=torch.float32, weights="dummy", seed=seed)


def _moe(model: DeepseekOCRForCausalLM) -> MoE:
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    for p in moe.parameters():  # larger than the dummy 0.02 so routing and outputs are far from zero
        p.data.normal_(0.0, 0.3)
    return moe


@pytest.mark.parametrize("impl", ["grouped", "gather_bmm", "dense"])
@pytest.mark.parametrize("n_tokens", [1, 2, 37])  # decode (batch 1 and 2) and prefill shapes
def test_grouped_experts_match_eager(impl: str, n_tokens: int) -> None:
    torch.manual_seed(n_tokens)
    moe = _moe(_random_model())
    hidden = moe.gate.weight.shape[1]
    x = torch.randn(n_tokens, hidden)
    idx, w = route_tokens(moe.gate(x), moe.top_k)
    expected, counts = apply_experts_eager(x, idx, w, moe.experts)
    actual, no_counts = EXPERT_IMPLS[impl](x, idx, w, moe.experts)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert no_counts == []
    assert sum(counts) == n_tokens * moe.top_k


def test_stacking_keeps_one_copy_and_eager_values() -> None:
    moe = _moe(_random_model())
    x = torch.randn(5, moe.gate.weight.shape[1])
    before = moe(x)
    w13, down = stacked_expert_weights(moe.experts)
    inter = down.shape[2]
    expert = moe.experts[3]
    assert isinstance(expert, MLP)
    assert expert.gate_proj.weight.data_ptr() == w13[3, :inter].data_ptr()
    assert expert.down_proj.weight.data_ptr() == down[3].data_ptr()
    assert stacked_expert_weights(moe.experts)[0] is w13  # cached
    torch.testing.assert_close(moe(x), before, rtol=0, atol=0)  # eager path bit-identical on the views
    set_expert_impl(moe, "grouped")
    torch.testing.assert_close(moe(x), before, rtol=1e-4, atol=1e-5)
    set_expert_impl(moe, "eager")


def _prefill_and_decode(model: object, embeds: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    cache = model.new_cache(batch=embeds.shape[0], max_len=embeds.shape[1] + steps + 1)  # type: ignore[attr-defined]
    logits = model.prefill(embeds, cache)  # type: ignore[attr-defined]
    tokens, rows = [], [logits]
    for _ in range(steps):
        tok = logits.argmax(dim=-1, keepdim=True)
        tokens.append(int(tok[0, 0]))
        logits = model.decode_step(tok, cache)  # type: ignore[attr-defined]
        rows.append(logits)
    return tokens, rows


@pytest.mark.parametrize("fused_qkv", [True, False])
@pytest.mark.parametrize("grouped", [True, False])
def test_fast_model_matches_eager(fused_qkv: bool, grouped: bool) -> None:
    model = _random_model(seed=1)
    for p in model.model.layers.parameters():
        p.data.mul_(10.0)  # dummy 0.02 weights give near-flat logits; scale up so argmax is meaningful
    torch.manual_seed(0)
    embeds = torch.randn(2, 23, model.config.language.hidden_size)
    ref_tokens, ref_rows = _prefill_and_decode(model, embeds, 8)
    fast = apply_fast_path(model, FastConfig(grouped_moe=grouped, cuda_graphs=False, fused_qkv=fused_qkv))
    tokens, rows = _prefill_and_decode(fast, embeds, 8)
    assert tokens == ref_tokens
    for got, want in zip(rows, ref_rows, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the eager model still runs on the shared (re-pointed) weights, unchanged
    again, _ = _prefill_and_decode(model, embeds, 8)
    assert again == ref_tokens
    if grouped:
        counts = fast.tokens_per_expert()
        assert all(sum(c) == 2 * (23 + 8) * model.config.language.num_experts_per_tok for c in counts.values())


@pytest.mark.parametrize("host_end", [False, True])
def test_fast_greedy_on_device_matches_step_loop(host_end: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """On-device greedy gives the eager step loop's tokens, the step's end on the device alone or with round 19's
    host-issued ops between steps as well (``fast_decoder.HOST_STEP_END``)."""
    from llm_perf_opt.models.deepseek_ocr import fast_decoder

    monkeypatch.setattr(fast_decoder, "HOST_STEP_END", host_end)
    model = _random_model(seed=2)
    for p in model.model.layers.parameters():
        p.data.mul_(10.0)
    embeds = torch.randn(1, 11, model.config.language.hidden_size)
    ref_tokens, _ = _prefill_and_decode(model, embeds, 6)
    fast = apply_fast_path(model, FastConfig(cuda_graphs=False))
    cache = fast.new_cache(batch=1, max_len=11 + 8)
    first = fast.prefill(embeds, cache).argmax(dim=-1, keepdim=True)
    rows = fast.decoder_for(cache).greedy(first, 6)
    assert [int(first[0, 0]), *rows[0][:5]] == ref_tokens
    assert cache.length == 11 + 6


def test_fast_greedy_to_the_last_cache_slot_then_steps_again() -> None:
    """Greedy decoding ends each step on the device (the token fed back, the position advanced, held at the last
    slot): filling the cache to its last slot gives the eager step loop's tokens; a host ``decode_step`` after a
    greedy run sets its own token and position (oracle: the eager model's logits for that token there)."""
    model = _random_model(seed=3)
    for p in model.model.layers.parameters():
        p.data.mul_(10.0)  # meaningful argmax (see test_fast_model_matches_eager)
    embeds = torch.randn(1, 9, model.config.language.hidden_size)
    ref_tokens, _ = _prefill_and_decode(model, embeds, 5)
    fast = apply_fast_path(model, FastConfig(cuda_graphs=False))
    cache = fast.new_cache(batch=1, max_len=9 + 4)
    first = fast.prefill(embeds, cache).argmax(dim=-1, keepdim=True)
    dec = fast.decoder_for(cache)
    rows = dec.greedy(first, 4)
    assert [int(first[0, 0]), *rows[0]] == ref_tokens and cache.length == 13 and int(dec.pos) == 12
    # two greedy steps, then a host step with a token of our own at the next position
    cache = fast.new_cache(batch=1, max_len=9 + 4)
    first = fast.prefill(embeds, cache).argmax(dim=-1, keepdim=True)
    (two,) = fast.decoder_for(cache).greedy(first, 2)
    got = fast.decode_step(torch.tensor([[5]]), cache)
    eager = model.new_cache(batch=1, max_len=9 + 4)
    model.prefill(embeds, eager)
    for tok in (int(first[0, 0]), two[0], 5):
        want = model.decode_step(torch.tensor([[tok]]), eager)
    assert two == ref_tokens[1:3]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fast_model_delegates_and_keeps_modules() -> None:
    model = _random_model()
    fast = apply_fast_path(model, FastConfig(cuda_graphs=False))
    assert fast.model.sam_model is model.model.sam_model
    assert fast.config is model.config
    assert fast.device == model.device
    assert apply_fast_path(fast).base is model


def test_first_argmax_matches_argmax_with_ties() -> None:
    logits = torch.randn(3, 129280)
    logits[1, 7] = logits[1, 129000] = 100.0  # tie: first index wins
    logits[2] = 0.0
    assert torch.equal(first_argmax(logits), logits.argmax(dim=-1, keepdim=True))
    assert int(first_argmax(logits)[1]) == 7 and int(first_argmax(logits)[2]) == 0
    odd = torch.randn(2, 1001)
    assert torch.equal(first_argmax(odd), odd.argmax(dim=-1, keepdim=True))
