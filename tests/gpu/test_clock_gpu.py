"""DeviceClock on CUDA: events handed back are reused, and a reused event times its new span, not its old one."""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.profiling.timers import DeviceClock

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _spin() -> None:
    torch.cuda._sleep(7_000_000)  # 7 M cycles: ~3.5 ms at ~2 GHz; only the relative sizes matter


def test_released_events_are_reused_and_time_their_new_span() -> None:
    clock = DeviceClock(torch.device("cuda:0"))
    a, b = clock.mark(), clock.mark()
    _spin()  # not between a and b
    clock.synchronize()
    short = clock.elapsed_ms(a, b)
    clock.release([a, b])
    c = clock.mark()
    _spin()
    d = clock.mark()
    clock.synchronize()
    assert {id(c), id(d)} == {id(a), id(b)}  # the pool gave the same two events back
    long = clock.elapsed_ms(c, d)
    assert long > 1.0 and short < 0.5 * long  # the reused pair measures the spin, not the empty old span
