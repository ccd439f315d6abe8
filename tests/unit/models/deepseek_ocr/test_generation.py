"""Token-selection rules (no-repeat-ngram with HF semantics, greedy, sampling, eos) and the static KV cache."""

from __future__ import annotations

import random

import pytest
import torch
from torch import Tensor

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.models.deepseek_ocr import (
    KVCacheFullError,
    NoRepeatNGram,
    StaticKVCache,
    banned_ngram_tokens,
    generate,
    select_next_token,
)


def hf_style_banned(history: list[int], n: int) -> list[int]:
    """Straightforward restatement of NoRepeatNGramLogitsProcessor: index all n-grams, look up the last n-1."""
    cur_len = len(history)
    if n <= 0 or cur_len + 1 < n:
        return []
    table: dict[tuple[int, ...], list[int]] = {}
    for i in range(cur_len - n + 1):
        gram = tuple(history[i : i + n])
        table.setdefault(gram[:-1], []).append(gram[-1])
    return sorted(set(table.get(tuple(history[cur_len + 1 - n : cur_len]), [])))


def test_banned_tokens_examples() -> None:
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 2) == [3]
    assert banned_ngram_tokens([5, 5], 2) == [5]
    assert banned_ngram_tokens([4, 7, 4], 1) == [4, 7]
    assert banned_ngram_tokens([1, 2], 4) == []  # cur_len + 1 < n: nothing can repeat yet
    assert banned_ngram_tokens([1, 2, 3], 0) == []


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_banned_tokens_match_hf_semantics(n: int) -> None:
    rng = random.Random(n)
    for _ in range(300):
        history = [rng.randrange(5) for _ in range(rng.randrange(0, 40))]
        assert banned_ngram_tokens(history, n) == hf_style_banned(history, n), history


def test_no_repeat_apply_masks_only_banned() -> None:
    logits = torch.zeros(6)
    out = NoRepeatNGram(2).apply(logits, [1, 2, 1])
    assert out[2] == float("-inf")
    assert torch.isfinite(out[[0, 1, 3, 4, 5]]).all()
    assert NoRepeatNGram(2).apply(logits, [1, 2, 3]) is logits
    with pytest.raises(ConfigError):
        NoRepeatNGram(-1)


def test_greedy_selection_and_ban_fallback() -> None:
    logits = torch.tensor([0.1, 3.0, 2.0, 3.0])
    assert select_next_token(logits, [], 0.0) == 1  # first index on ties, like argmax
    assert select_next_token(logits[None], [], 0.0) == 1
    # history [7, 1, 7]: the 2-gram (7, 1) exists, so after 7 token 1 is banned; next best is 3.
    assert select_next_token(logits, [7, 1, 7], 0.0, no_repeat_ngram_size=2) == 3
    # unbanned argmax is returned unchanged
    assert select_next_token(logits, [7, 2, 7], 0.0, no_repeat_ngram_size=2) == 1
    with pytest.raises(ValueError):
        select_next_token(torch.zeros(2, 4), [], 0.0)
    with pytest.raises(ConfigError):
        select_next_token(logits, [], -1.0)


def test_sampling_is_seeded_and_respects_bans() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))

    def draw(seed: int, history: list[int], ngram: int = 0) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return [select_next_token(logits, history, 1.5, ngram, gen) for _ in range(40)]

    assert draw(3, []) == draw(3, [])
    assert draw(3, []) != draw(4, [])
    banned_history = [9, 0, 9, 1, 9, 2, 9]  # after 9: tokens 0, 1, 2 are banned for n=2
    assert not {0, 1, 2} & set(draw(5, banned_history, ngram=2))
    # very low temperature collapses to greedy
    gen = torch.Generator().manual_seed(0)
    assert select_next_token(logits, [], 1e-4, 0, gen) == int(logits.argmax())


class ScriptedModel:
    """Stands in for the model in generate(): emits fixed token choices, records the cache use."""

    vocab = 8

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.calls = 0

    def _logits(self) -> Tensor:
        out = torch.zeros(1, self.vocab)
        out[0, self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        return out

    def prefill(self, inputs_embeds: Tensor, cache: StaticKVCache, logits_positions: str = "last") -> Tensor:
        cache.advance(inputs_embeds.shape[1])
        return self._logits()

    def decode_step(self, token_ids: Tensor, cache: StaticKVCache) -> Tensor:
        assert token_ids.shape == (1, 1)
        cache.advance(1)
        return self._logits()

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        return StaticKVCache(1, batch, 1, max_len, 2)


def test_generate_stops_on_eos_and_cap() -> None:
    embeds = torch.zeros(1, 4, 2)
    stopped = generate(ScriptedModel([3, 4, 1, 5]), embeds, [0, 0, 0, 0], 10, eos_token_id=1)
    assert stopped.tokens == [3, 4, 1] and stopped.stopped_by_eos
    capped = generate(ScriptedModel([3, 4, 1, 5]), embeds, [0, 0, 0, 0], 2, eos_token_id=1)
    assert capped.tokens == [3, 4] and not capped.stopped_by_eos
    ignored = generate(ScriptedModel([3, 1, 1]), embeds, [0, 0, 0, 0], 3, eos_token_id=None)
    assert ignored.tokens == [3, 1, 1]


def test_static_cache_geometry_and_overflow() -> None:
    cache = StaticKVCache(3, 2, 4, 10, 8, dtype=torch.bfloat16)
    assert cache.k.shape == (3, 2, 4, 10, 8)
    assert cache.nbytes == 2 * 3 * 2 * 4 * 10 * 8 * 2
    k = torch.ones(2, 4, 6, 8, dtype=torch.bfloat16)
    keys, values = cache.write(0, k, k * 2, start=0)
    assert keys.shape == (2, 4, 6, 8) and float(values.sum()) == 2 * k.numel()
    cache.advance(6)
    assert cache.remaining == 4
    with pytest.raises(KVCacheFullError, match="max_len 10"):
        cache.advance(5)
    with pytest.raises(KVCacheFullError):
        cache.write(1, torch.ones(2, 4, 5, 8, dtype=torch.bfloat16), torch.ones(2, 4, 5, 8, dtype=torch.bfloat16), 6)
    cache.reset()
    assert cache.length == 0
    with pytest.raises(ConfigError):
        StaticKVCache(1, 1, 1, 0, 8)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_banned_ngram_mask_matches_the_host_rule(n: int) -> None:
    """The device rule == banned_ngram_tokens for every prefix length of repetitive random histories."""
    from llm_perf_opt.models.deepseek_ocr.generation import banned_ngram_mask

    gen = torch.Generator().manual_seed(n)
    vocab, width = 7, 40
    rows = torch.randint(0, 3, (3, width), generator=gen)  # 3 symbols: n-grams repeat often
    rows[:, width // 2 :] = 6  # and a run of one token
    for length in range(0, width + 1):
        mask = banned_ngram_mask(rows, torch.tensor([length]), n, vocab)
        for b in range(rows.shape[0]):
            want = banned_ngram_tokens(rows[b, :length].tolist(), n)
            assert mask[b].nonzero().flatten().tolist() == want, (n, length, b)


def test_banned_ngram_mask_ignores_what_lies_past_length() -> None:
    from llm_perf_opt.models.deepseek_ocr.generation import banned_ngram_mask

    row = torch.tensor([[1, 2, 3, 1, 2, 9, 9, 9]])
    assert banned_ngram_mask(row, torch.tensor([5]), 3, 10)[0].nonzero().flatten().tolist() == [3]
    assert not banned_ngram_mask(row, torch.tensor([5]), 0, 10).any()


# ------------------------------------------------------------------ vLLM's rule: window, exempt ids, output scope


def vllm_style_banned(output_ids: list[int], n: int, window: int, exempt: set[int]) -> list[int]:
    """Restatement of vLLM's DeepSeek-OCR NoRepeatNGramLogitsProcessor (it sees the output ids only)."""
    if len(output_ids) < n:
        return []
    prefix = tuple(output_ids[len(output_ids) - (n - 1) :])
    banned = set()
    for i in range(max(0, len(output_ids) - window), len(output_ids) - n + 1):
        gram = tuple(output_ids[i : i + n])
        if gram[:-1] == prefix:
            banned.add(gram[-1])
    return sorted(banned - exempt)


def test_windowed_rule_examples() -> None:
    # [1, 2, 3, 9, 9, 1, 2]: the 3-gram (1, 2, 3) starts at 0; a window of 7 sees it, a window of 6 does not
    hist = [1, 2, 3, 9, 9, 1, 2]
    assert banned_ngram_tokens(hist, 3, window=7) == [3]
    assert banned_ngram_tokens(hist, 3, window=6) == []
    assert banned_ngram_tokens(hist, 3, exempt_ids={3}) == []
    assert banned_ngram_tokens([5, 6, 5, 7, 5], 2, exempt_ids=[7]) == [6]
    assert banned_ngram_tokens([4, 7, 4, 8], 1, window=2) == [4, 8]


@pytest.mark.parametrize(("n", "window"), [(2, 5), (3, 8), (4, 30), (3, 3), (2, 1)])
def test_windowed_rule_matches_vllm(n: int, window: int) -> None:
    rng = random.Random(n * 100 + window)
    rule = NoRepeatNGram(n, window=window, exempt_ids={1, 3}, scope="output")
    for _ in range(300):
        prompt = [rng.randrange(5) for _ in range(rng.randrange(0, 10))]
        output = [rng.randrange(5) for _ in range(rng.randrange(0, 40))]
        history = rule.host_history(prompt) + output  # output scope: the prompt is not part of it
        assert rule.banned_tokens(history) == vllm_style_banned(output, n, window, {1, 3}), (prompt, output)


@pytest.mark.parametrize(
    "rule",
    [
        NoRepeatNGram(3, window=9),
        NoRepeatNGram(2, exempt_ids={1}),
        NoRepeatNGram(3, window=12, exempt_ids={0, 6}),
        NoRepeatNGram(1, window=5, exempt_ids={2}),
        NoRepeatNGram(4, window=10, exempt_ids={6}, scope="output"),
        NoRepeatNGram(2, window=6, scope="output"),
    ],
    ids=lambda r: r.describe(),
)
def test_windowed_device_mask_matches_the_host_rule(rule: NoRepeatNGram) -> None:
    """The device mask (the prompt as -1 for the output scope) == the host rule on its own history."""
    from llm_perf_opt.models.deepseek_ocr.generation import banned_ngram_mask

    gen = torch.Generator().manual_seed(rule.n)
    vocab, width, prompt_len = 7, 40, 6
    rows = torch.randint(0, 3, (3, width), generator=gen)
    rows[:, width // 2 : width // 2 + 8] = 6
    device_rows = rows.clone()
    device_rows[:, :prompt_len] = rule.device_history(rows[:, :prompt_len])
    for length in range(prompt_len, width + 1):
        mask = banned_ngram_mask(device_rows, torch.tensor([length]), rule, vocab)
        for b in range(rows.shape[0]):
            host = rule.host_history(rows[b, :prompt_len].tolist()) + rows[b, prompt_len:length].tolist()
            assert mask[b].nonzero().flatten().tolist() == rule.banned_tokens(host), (length, b)


def test_select_next_token_with_exempt_ids() -> None:
    logits = torch.tensor([0.0, 5.0, 1.0, 0.0])
    history = [2, 1, 2]  # the 2-gram (2, 1) repeats if 1 follows 2
    assert select_next_token(logits, history, 0.0, NoRepeatNGram(2)) == 2
    assert select_next_token(logits, history, 0.0, NoRepeatNGram(2, exempt_ids={1})) == 1


def test_rule_validation_and_settings() -> None:
    with pytest.raises(ConfigError, match="window"):
        NoRepeatNGram(3, window=0)
    with pytest.raises(ConfigError, match="scope") as info:
        NoRepeatNGram(3, scope="prompt")
    assert info.value.hint
    from llm_perf_opt.runners.settings import InferSettings, structure

    rule = structure(
        InferSettings,
        {
            "no_repeat_ngram_size": 30,
            "no_repeat_ngram_window": 90,
            "no_repeat_ngram_exempt_ids": [128821, 128822],
            "no_repeat_ngram_scope": "output",
        },
    ).ngram_rule
    assert rule == NoRepeatNGram(30, window=90, exempt_ids={128821, 128822}, scope="output") and not rule.is_hf
    assert structure(InferSettings, {"no_repeat_ngram_size": 20}).ngram_rule == NoRepeatNGram(20)
    assert NoRepeatNGram(20) == NoRepeatNGram.of(20)
    assert NoRepeatNGram(20).is_hf and not NoRepeatNGram.of(None)
