"""Token selection for DeepSeek-OCR decoding: greedy or temperature sampling, no-repeat-ngram, eos.

Kept separate from the model so the rules are pure functions of (logits, history) and can be tested
against HF's semantics without a model:

* no-repeat-ngram (:class:`NoRepeatNGram`) by default follows ``transformers.NoRepeatNGramLogitsProcessor``
  (the reference ``infer()``): n-grams are collected over the *whole* sequence the model has seen (prompt
  ids, image-token ids included, plus generated tokens); a token is banned when appending it would repeat an
  n-gram already present.  Nothing is banned while ``len(history) + 1 < n``.  Generalised to vLLM's
  DeepSeek-OCR rule (``NGramPerReqLogitsProcessor``): only n-grams that start within the last ``window``
  tokens count, ``exempt_ids`` are never banned (``<td>``/``</td>``: table cells repeat legitimately), and
  ``scope="output"`` looks at the generated tokens only (vLLM's processor sees the output ids, not the prompt).
* the ban is applied before temperature, like HF's processor-then-warper order.
* ``temperature == 0`` is greedy (``argmax``, first index on ties); otherwise softmax(logits / T) is
  sampled on the host with the caller's CPU ``torch.Generator``, so a seed gives the same tokens on any
  device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import attrs
import torch
from torch import Tensor

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.models.deepseek_ocr.kv_cache import StaticKVCache

__all__ = [
    "GenerationResult",
    "NoRepeatNGram",
    "SupportsDecode",
    "banned_ngram_mask",
    "banned_ngram_tokens",
    "generate",
    "select_next_token",
]


def banned_ngram_tokens(
    history: Sequence[int], n: int, *, window: int | None = None, exempt_ids: Iterable[int] = ()
) -> list[int]:
    """Tokens that would complete an n-gram already present in ``history`` (HF semantics), sorted.

    ``window``: only n-grams starting at one of the last ``window`` positions count (vLLM's rule; None = all).
    ``exempt_ids`` are never banned.  Scans for occurrences of the last ``n-1`` tokens with ``list.index``
    (C speed), so a step costs microseconds even with thousands of tokens of history.
    """
    if n <= 0:
        return []
    seq = list(history)
    cur_len = len(seq)
    if cur_len + 1 < n:
        return []
    first_start = 0 if window is None else max(0, cur_len - int(window))
    banned: set[int] = set()
    if n == 1:
        banned = set(seq[first_start:])
    else:
        prefix = seq[cur_len - n + 1 :]
        first = prefix[0]
        last_start = cur_len - n  # last index an n-gram (of n tokens, all in history) can start at
        i = first_start
        while i <= last_start:
            try:
                i = seq.index(first, i, last_start + 1)
            except ValueError:
                break
            if seq[i : i + n - 1] == prefix:
                banned.add(seq[i + n - 1])
            i += 1
    return sorted(banned.difference(int(t) for t in exempt_ids))


def banned_ngram_mask(history: Tensor, length: Tensor, n: int | NoRepeatNGram, vocab: int) -> Tensor:
    """:func:`banned_ngram_tokens` on the device, for every row, with static shapes (CUDA-graph capturable).

    ``history`` [B, N] int64 holds each row's tokens at positions ``0..length-1`` (what is past ``length`` is
    ignored; negative ids are positions outside the rule's scope, see :meth:`NoRepeatNGram.device_history`);
    ``length`` is an int64 device tensor [1] (the same for every row) or [B] (one per row: continuous batching,
    where every slot is at its own length); ``n`` is the n-gram size or a whole
    :class:`NoRepeatNGram` (window and exempt ids included).  Returns bool [B, vocab], True where appending the
    token would repeat an n-gram already in the row, as the host rule.  Compares every window of ``n - 1``
    tokens with the row's last ``n - 1``: O(N·n) work, a few kernels.
    """
    rule = NoRepeatNGram.of(n)
    n = rule.n
    if n <= 0:
        return torch.zeros((history.shape[0], vocab), dtype=torch.bool, device=history.device)
    bsz, width = history.shape
    dev = history.device
    mask = torch.zeros((bsz, vocab + 1), dtype=torch.bool, device=dev)  # column `vocab` catches non-matches
    if width < n:
        return mask[:, :vocab]
    lengths = length.reshape(-1, 1)  # [1, 1] or [B, 1]: broadcasts over the rows either way
    if n == 1:  # every token already in the history (in the window)
        pos = torch.arange(width, device=dev)[None, :]
        seen = (pos < lengths) & (history >= 0)
        if rule.window is not None:
            seen &= pos >= lengths - rule.window
        mask.scatter_(1, torch.where(seen, history, vocab), True)
    else:
        windows = history.unfold(1, n, 1)  # [B, S, n], S = N - n + 1: window i = tokens i .. i+n-1
        starts = torch.arange(windows.shape[1], device=dev)[None, :]
        # each row's last n-1 positions [B|1, n-1]
        suffix_pos = (lengths - (n - 1) + torch.arange(n - 1, device=dev)[None, :]).clamp_min(0)
        suffix = history.gather(1, suffix_pos.expand(bsz, n - 1))  # [B, n-1]
        match = (windows[:, :, : n - 1] == suffix[:, None, :]).all(dim=-1)  # [B, S]
        # window i must lie inside the history (i + n - 1 <= length - 1), and the rule needs length + 1 >= n
        match &= (starts <= lengths - n) & (lengths + 1 >= n)
        if rule.window is not None:
            match &= starts >= lengths - rule.window
        last = windows[:, :, n - 1]
        mask.scatter_(1, torch.where(match & (last >= 0), last, vocab), True)
    return unban_exempt(mask[:, :vocab], rule.exempt_ids)


def unban_exempt(mask: Tensor, exempt_ids: Iterable[int]) -> Tensor:
    """``mask`` [B, vocab] with the columns of ``exempt_ids`` cleared (ids outside the vocabulary ignored), in
    place: python ints, a view + fill per id, nothing copied from the host (CUDA-graph capturable)."""
    for token in exempt_ids:
        if 0 <= token < mask.shape[1]:
            mask[:, token] = False
    return mask


_SCOPES = ("sequence", "output")


def _exempt(value: Iterable[int] | None) -> frozenset[int]:
    return frozenset(int(t) for t in (value or ()))


@attrs.frozen
class NoRepeatNGram:
    """The no-repeat-ngram rule: size ``n`` (0 disables it), optional ``window``, ``exempt_ids`` and ``scope``.

    ``NoRepeatNGram(20)`` is the reference ``infer()`` (HF semantics over prompt + output);
    ``NoRepeatNGram(30, window=90, exempt_ids={128821, 128822}, scope="output")`` is vLLM's DeepSeek-OCR recipe.
    """

    n: int = attrs.field(default=0, converter=int)
    window: int | None = attrs.field(default=None, converter=attrs.converters.optional(int))
    exempt_ids: frozenset[int] = attrs.field(default=frozenset(), converter=_exempt)
    scope: str = attrs.field(default="sequence")

    def __attrs_post_init__(self) -> None:
        if self.n < 0:
            raise ConfigError(f"no_repeat_ngram_size must be >= 0, got {self.n}", hint="use 0 to disable the rule")
        if self.window is not None and self.window <= 0:
            raise ConfigError(
                f"no_repeat_ngram_window must be > 0 or null, got {self.window}", hint="null = the whole history"
            )
        if self.scope not in _SCOPES:
            raise ConfigError(
                f"no_repeat_ngram_scope must be one of {_SCOPES}, got {self.scope!r}",
                hint="sequence = prompt + output (HF, the reference infer()); output = generated tokens only (vLLM)",
            )

    def __bool__(self) -> bool:
        return self.n > 0

    @classmethod
    def of(cls, value: int | NoRepeatNGram | None) -> NoRepeatNGram:
        """A rule from an n-gram size (HF semantics) or a rule; None disables it."""
        if isinstance(value, NoRepeatNGram):
            return value
        return cls(int(value or 0))

    @property
    def is_hf(self) -> bool:
        """True when the rule is plain HF semantics (no window, no exempt ids, whole sequence)."""
        return self.window is None and not self.exempt_ids and self.scope == "sequence"

    def describe(self) -> str:
        if not self:
            return "off"
        parts = [f"size {self.n}"]
        if self.window is not None:
            parts.append(f"within the last {self.window} tokens")
        if self.exempt_ids:
            parts.append(f"exempt ids {sorted(self.exempt_ids)}")
        parts.append("over prompt + output" if self.scope == "sequence" else "over the output only")
        return ", ".join(parts)

    def host_history(self, prompt_ids: Sequence[int]) -> list[int]:
        """The history the host rule starts from: the prompt ids (scope sequence) or nothing (scope output)."""
        return [int(t) for t in prompt_ids] if self.scope == "sequence" else []

    def device_history(self, prompt_ids: Tensor) -> Tensor:
        """The prompt positions of the device history: the ids, or -1 (outside the scope, never matched)."""
        return prompt_ids if self.scope == "sequence" else torch.full_like(prompt_ids, -1)

    def banned_tokens(self, history: Sequence[int]) -> list[int]:
        return banned_ngram_tokens(history, self.n, window=self.window, exempt_ids=self.exempt_ids)

    def apply(self, logits: Tensor, history: Sequence[int]) -> Tensor:
        """Return ``logits`` [V] with banned tokens set to -inf (a copy only when something is banned)."""
        banned = self.banned_tokens(history)
        if not banned:
            return logits
        index = torch.tensor(banned, dtype=torch.long, device=logits.device)
        return logits.index_fill(-1, index, float("-inf"))


def select_next_token(
    logits: Tensor,
    history: Sequence[int],
    temperature: float = 0.0,
    no_repeat_ngram_size: int | NoRepeatNGram = 0,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next token id from one row of logits ([V] or [1, V]) given the full history.

    ``history`` is every token id of the sequence so far (prompt included, unless the rule's scope is the
    output: see :meth:`NoRepeatNGram.host_history`); it only matters when the rule is on.  ``generator`` must
    be a CPU generator (sampling runs on the host).
    """
    if logits.dim() == 2 and logits.shape[0] == 1:
        logits = logits[0]
    if logits.dim() != 1:
        raise ValueError(f"select_next_token expects logits [V] or [1, V], got {tuple(logits.shape)}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}", hint="0 = greedy")
    rule = NoRepeatNGram.of(no_repeat_ngram_size)

    if temperature == 0:
        token = int(torch.argmax(logits).item())
        if rule.n == 0:
            return token
        banned = rule.banned_tokens(history)
        if token not in banned:
            # Masking only lowers banned entries, so an unbanned argmax stays the (first) argmax.
            return token
        return int(torch.argmax(rule.apply(logits, history)).item())

    scores = rule.apply(logits, history).float() / float(temperature)
    probs = torch.softmax(scores.cpu(), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


class SupportsDecode(Protocol):
    """What :func:`generate` needs from a model (``DeepseekOCRForCausalLM`` provides it)."""

    def prefill(self, inputs_embeds: Tensor, cache: StaticKVCache, logits_positions: str = "last") -> Tensor: ...

    def decode_step(self, token_ids: Tensor, cache: StaticKVCache) -> Tensor: ...

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache: ...


@attrs.frozen
class GenerationResult:
    """Generated ids (eos included when it stopped generation) and, on request, the logits that chose them."""

    tokens: list[int]
    stopped_by_eos: bool
    logits: list[Tensor] | None = None  # row i chose tokens[i]; float32 on the host


def generate(
    model: SupportsDecode,
    inputs_embeds: Tensor,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    no_repeat_ngram_size: int | NoRepeatNGram = 0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    cache: StaticKVCache | None = None,
    keep_logits: bool = False,
) -> GenerationResult:
    """Prefill one prompt (batch 1), then one decode step per new token until eos or ``max_new_tokens``.

    Token i is chosen from the prefill's last position (i = 0) or from decode step i; its position in the
    sequence is ``len(prompt) + i``.  Pass ``cache`` to reuse an allocation (it must be empty).
    """
    if inputs_embeds.shape[0] != 1:
        raise ValueError(f"generate() runs batch 1, got inputs_embeds batch {inputs_embeds.shape[0]}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt_len = int(inputs_embeds.shape[1])
    if cache is None:
        cache = model.new_cache(batch=1, max_len=prompt_len + max_new_tokens)
    history = NoRepeatNGram.of(no_repeat_ngram_size).host_history(prompt_ids)
    tokens: list[int] = []
    kept: list[Tensor] | None = [] if keep_logits else None

    logits = model.prefill(inputs_embeds, cache)
    while True:
        row = logits[0]
        if kept is not None:
            kept.append(row.detach().float().cpu())
        token = select_next_token(row, history, temperature, no_repeat_ngram_size, generator)
        tokens.append(token)
        history.append(token)
        if eos_token_id is not None and token == eos_token_id:
            return GenerationResult(tokens=tokens, stopped_by_eos=True, logits=kept)
        if len(tokens) >= max_new_tokens:
            return GenerationResult(tokens=tokens, stopped_by_eos=False, logits=kept)
        step_in = torch.tensor([[token]], dtype=torch.long, device=inputs_embeds.device)
        logits = model.decode_step(step_in, cache)
