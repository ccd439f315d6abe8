"""profiling/timers.py + hooks.py on CPU: host-clock marks and per-module forward-hook timing."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from llm_perf_opt.profiling.hooks import StageHooks, module_named
from llm_perf_opt.profiling.ranges import RangeMarker
from llm_perf_opt.profiling.timers import DeviceClock

CPU = torch.device("cpu")


class Sleepy(nn.Module):
    """Sleeps a fixed time per call so hook totals have a known lower bound."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.seconds)
        return x


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kernel failed")


def _model() -> nn.Sequential:
    return nn.Sequential(Sleepy(0.004), nn.Linear(4, 4), Sleepy(0.002))


# ---------------------------------------------------------------- DeviceClock


def test_clock_on_cpu_uses_host_clock() -> None:
    clock = DeviceClock(CPU)
    assert not clock.is_cuda
    a = clock.mark()
    time.sleep(0.005)
    b = clock.mark()
    clock.synchronize()  # a no-op on CPU
    ms = clock.elapsed_ms(a, b)
    assert 5.0 <= ms < 1000.0


def test_intervals_sum_to_first_last() -> None:
    clock = DeviceClock(CPU)
    marks = [clock.mark()]
    for i in range(6):
        time.sleep(0.0005 * i)
        marks.append(clock.mark())
    steps = clock.intervals_ms(marks)
    assert len(steps) == 6
    assert all(s >= 0 for s in steps)
    assert sum(steps) == pytest.approx(clock.elapsed_ms(marks[0], marks[-1]), rel=1e-12, abs=1e-9)


def test_intervals_of_one_or_no_mark_are_empty() -> None:
    clock = DeviceClock(CPU)
    assert clock.intervals_ms([clock.mark()]) == []
    assert clock.intervals_ms([]) == []


# ---------------------------------------------------------------- StageHooks


def test_hooks_accumulate_over_calls_and_collect_resets() -> None:
    model = _model()
    clock = DeviceClock(CPU)
    hooks = StageHooks({"first": model[0], "last": model[2]}, clock, RangeMarker(use_nvtx=False))
    x = torch.randn(2, 4)
    t0 = clock.mark()
    for _ in range(3):
        model(x)
    t1 = clock.mark()
    ms = hooks.collect_ms()
    assert set(ms) == {"first", "last"}
    assert hooks.last_calls == {"first": 3, "last": 3}
    assert ms["first"] >= 3 * 4.0  # three calls of ≥ 4 ms each, summed
    assert ms["last"] >= 3 * 2.0
    assert ms["first"] + ms["last"] <= clock.elapsed_ms(t0, t1)  # disjoint spans inside the outer window
    # collect_ms drained the spans
    again = hooks.collect_ms()
    assert again == {"first": 0.0, "last": 0.0}
    assert hooks.last_calls == {"first": 0, "last": 0}
    hooks.remove()


def test_reset_drops_spans_of_previous_page() -> None:
    model = _model()
    hooks = StageHooks({"first": model[0]}, DeviceClock(CPU), RangeMarker(use_nvtx=False))
    model(torch.randn(1, 4))
    hooks.reset()
    model(torch.randn(1, 4))
    hooks.collect_ms()
    assert hooks.last_calls == {"first": 1}
    hooks.remove()


def test_disabled_hooks_record_nothing() -> None:
    model = _model()
    hooks = StageHooks({"first": model[0]}, DeviceClock(CPU), RangeMarker(use_nvtx=False))
    hooks.enabled = False
    model(torch.randn(1, 4))
    assert hooks.collect_ms() == {"first": 0.0}
    hooks.enabled = True
    model(torch.randn(1, 4))
    assert hooks.collect_ms()["first"] > 0.0
    hooks.remove()


def test_remove_detaches_hooks() -> None:
    model = _model()
    hooks = StageHooks({"first": model[0], "last": model[2]}, DeviceClock(CPU), RangeMarker(use_nvtx=False))
    assert len(model[0]._forward_pre_hooks) == 1 and len(model[0]._forward_hooks) == 1
    hooks.remove()
    assert len(model[0]._forward_pre_hooks) == 0 and len(model[0]._forward_hooks) == 0
    assert len(model[2]._forward_pre_hooks) == 0 and len(model[2]._forward_hooks) == 0
    model(torch.randn(1, 4))
    assert hooks.collect_ms() == {"first": 0.0, "last": 0.0}
    assert model[0].calls == 1  # the module still ran
    hooks.remove()  # idempotent


def test_hook_ranges_are_balanced_and_visible_to_profiler() -> None:
    model = _model()
    ranges = RangeMarker(use_nvtx=False)
    hooks = StageHooks({"sam": model[0]}, DeviceClock(CPU), ranges)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(torch.randn(1, 4))
    assert ranges._open == []
    assert "sam" in {e.key for e in prof.key_averages()}
    hooks.remove()


def test_hook_state_is_clean_after_module_raises() -> None:
    boom = Boom()
    ranges = RangeMarker(use_nvtx=False)
    hooks = StageHooks({"sam": boom}, DeviceClock(CPU), ranges)
    with pytest.raises(RuntimeError, match="kernel failed"):
        boom(torch.randn(1, 4))
    assert ranges._open == []
    assert hooks._pending == {"sam": []}
    hooks.remove()


# ---------------------------------------------------------------- module_named


def test_module_named_resolves_dotted_paths() -> None:
    root = nn.Module()
    root.model = nn.Module()
    root.model.sam_model = nn.Linear(2, 2)
    root.model.vision = nn.Sequential(nn.Identity(), nn.ReLU())
    assert module_named(root, "model.sam_model") is root.model.sam_model
    assert module_named(root, "model.vision.1") is root.model.vision[1]


def test_module_named_missing_part_lists_children() -> None:
    root = nn.Module()
    root.model = nn.Module()
    root.model.sam_model = nn.Linear(2, 2)
    root.model.projector = nn.Linear(2, 2)
    with pytest.raises(AttributeError, match=r"no 'clip_model' \(in 'model\.clip_model'\)") as info:
        module_named(root, "model.clip_model")
    assert "children: sam_model, projector" in str(info.value)


def test_module_named_non_module_attribute() -> None:
    root = nn.Module()
    root.model = nn.Linear(2, 2)
    with pytest.raises(AttributeError, match=r"'model\.weight' is not a module"):
        module_named(root, "model.weight")


# ---------------------------------------------------------------- RangeMarker


def test_ranges_open_record_function_only_under_a_profiler() -> None:
    """The timed repeats pay no record_function (~6 µs a scope); the profiler pass still sees every range."""
    from torch.profiler import ProfilerActivity, profile

    marker = RangeMarker(use_nvtx=False)
    model = _model()
    hooks = StageHooks({"first": model[0]}, DeviceClock(CPU), marker)
    x = torch.randn(2, 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    names = [e.name for e in prof.events()]
    assert names.count("first") == 1
    model(x)  # outside the profiler: push/pop stay balanced without a scope
    assert marker._open == []
    assert len(hooks.collect_ms()) == 1 and hooks.last_calls == {"first": 2}
