"""The decode loops of one page: tokens 2..N, one clock mark per step (Σ steps == decode time).

Two loops: on the host (``select_next_token`` per step: temperature, no-repeat-ngram, eos on the host) and on
the device (the fast path's ``FastDecoder.greedy``: greedy + the n-gram ban inside the decode graph, eos checked
every 16 steps, steps past eos dropped from tokens and time).  The device loop runs first when the session
allows it; the host loop finishes whatever is left (everything, when the device loop is off).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import torch

from llm_perf_opt.errors import RunInterrupted
from llm_perf_opt.models.deepseek_ocr.generation import NoRepeatNGram
from llm_perf_opt.profiling.ranges import RangeMarker
from llm_perf_opt.profiling.timers import DeviceClock

if TYPE_CHECKING:
    from llm_perf_opt.models.deepseek_ocr.fast import FastModel
    from llm_perf_opt.models.deepseek_ocr.protocol import OCRModel


@attrs.define
class DecodeState:
    """What decoding appends to: tokens so far (the prefill's first included), the host history the n-gram rule
    reads, one clock mark per token, and whether any logits were NaN/Inf (a device tensor: no sync per step)."""

    generated: list[int]
    history: list[int]
    marks: list[Any]
    nonfinite: torch.Tensor

    @property
    def last(self) -> int:
        return self.generated[-1]

    def push(self, tokens: list[int]) -> None:
        self.generated += tokens
        self.history += tokens


def _interrupted(page_id: str, n: int) -> RunInterrupted:
    return RunInterrupted(f"interrupted during decode of page {page_id} after {n} tokens")


def decode_on_device(
    model: FastModel,
    cache: Any,
    prompt_ids: torch.Tensor,
    state: DecodeState,
    steps: int,
    ngram: NoRepeatNGram,
    eos_id: int | None,
    clock: DeviceClock,
    page_id: str,
    should_stop: Callable[[], bool] | None,
) -> None:
    """Up to ``steps`` tokens after ``state.last`` chosen on the device: one clock mark per step, no host sync
    but an eos check every 16 steps."""
    dec = model.decoder_for(cache, ngram)
    dec.set_history(ngram.device_history(prompt_ids))
    dec.nonfinite.zero_()
    marks = state.marks
    n_before = len(marks)

    def on_step() -> None:
        marks.append(clock.mark())
        if should_stop is not None and should_stop():
            raise _interrupted(page_id, len(marks))

    first_t = torch.tensor([[state.last]], device=prompt_ids.device)
    new = dec.greedy(first_t, steps, eos_id, check_every=16, on_step=on_step)[0]
    del marks[n_before + len(new) :]
    state.nonfinite |= dec.nonfinite.clone()
    state.push(list(new))


def decode_on_host(
    model: OCRModel,
    cache: Any,
    state: DecodeState,
    max_new_tokens: int,
    done: Callable[[int], bool],
    choose: Callable[[torch.Tensor, list[int]], int],
    clock: DeviceClock,
    ranges: RangeMarker,
    nvtx_steps: bool,
    page_id: str,
    should_stop: Callable[[], bool] | None,
) -> None:
    """Single-token forwards on the KV cache until the cap or ``done(token)`` (eos); ``choose`` picks each token."""
    device = state.nonfinite.device
    while len(state.generated) < max_new_tokens and not done(state.last):
        if should_stop is not None and should_stop():
            raise _interrupted(page_id, len(state.generated))
        if nvtx_steps:
            ranges.push("decode_step")
        logits = model.decode_step(torch.tensor([[state.last]], device=device), cache)
        state.nonfinite |= ~torch.isfinite(logits).all()
        token = choose(logits[0], state.history)
        state.marks.append(clock.mark())
        if nvtx_steps:
            ranges.pop()
        state.push([token])
