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
