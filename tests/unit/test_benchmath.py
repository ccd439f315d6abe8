"""benchmarks/benchmath.py: the goals table, ratios and verdicts behind the README's headline numbers.

Hand-made result dicts with round numbers (every expected cell computed by hand below), plus the committed
H200 result file: its verdicts must name both GPUs and its ratios the token counts they compare.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest
from benchmarks.benchmath import (
    ISSUE9,
    batched_goal,
    batched_speedups,
    decode_step_profile,
    goals_table,
    mbu_pct,
    mfu_pct,
    module_setting,
    p90_ms,
    paired_ab,
    ratio,
    sign_test_p,
    step_timeline,
    verdict,
)

ROOT = Path(__file__).resolve().parents[2]


def test_mfu_and_mbu_percent() -> None:
    # 2 TFLOP in 4 ms = 500 TFLOP/s of a 1000 TFLOP/s peak
    assert mfu_pct(2e12, 4.0, 1e15) == pytest.approx(50.0)
    # 1 GB per token every 0.5 ms = 2 TB/s of a 4 TB/s peak
    assert mbu_pct(1e9, 0.5, 4e12) == pytest.approx(50.0)
    for ms in (None, 0.0, -1.0):
        assert mfu_pct(1e12, ms, 1e15) is None  # not timed: absent, never 0
        assert mbu_pct(1e9, ms, 4e12) is None


def test_ratio_states_differing_token_counts() -> None:
    assert ratio(30.0, 1.2) == "25.0×"
    assert ratio(30.0, 1.2, 256, 256) == "25.0×"
    assert ratio(39.0, 0.75, 64, 256) == "52.0× (64 tok vs 256 tok)"
    assert ratio(39.0, 0.75, None, 256) == "52.0× (? tok vs 256 tok)"
    assert ratio(None, 1.0) == "" and ratio(1.0, None) == "" and ratio(1.0, 0.0) == ""


def test_verdict_names_the_measured_gpu_and_the_goals_gpu() -> None:
    assert verdict(True, ISSUE9, "NVIDIA H200") == "**met** on NVIDIA H200 (goal set for NVIDIA H100 80GB HBM3)"
    assert verdict(False, ISSUE9, "NVIDIA H100 80GB HBM3") == "missed on NVIDIA H100 80GB HBM3"
    assert verdict(None, ISSUE9, "H100 80GB HBM3") == "not measured on H100 80GB HBM3"  # "NVIDIA" prefix optional


def _res(gpu: str = "NVIDIA H200") -> dict[str, Any]:
    return {
        "env": {"gpu": gpu},
        "peak_bf16_flops": 1e15,
        "vision_flops": 4e12,
        "component_flops": {"sam": 3e12, "clip": 0.9e12, "projector": 0.1e12},
        "decode_roofline_ms": 0.25,
        "weight_gib": 6.0,
        "kv_gib": 0.5,
        "decode_tokens": 256,
        "eager_decode_tokens": 128,
        "vendor": {
            "decode_tokens": 64,
            "decode_ms_per_token": 40.0,
            "prefill_ms": 200.0,
            "split": {"vision_ms": 50.0},
            "sam_ms": 30.0,
            "clip_ms": 18.0,
            "projector_ms": 1.0,
            "peak_mem_allocated_gib": 8.0,
        },
        "eager": {
            "decode_ms_per_token": 25.0,
            "vision_ms": 50.0,
            "prefill_ms": 75.0,
            "vision_mfu_pct": 8.0,
            "sam_mfu_pct": 9.0,
            "clip_mfu_pct": 3.0,
            "projector_mfu_pct": 5.0,
            "prefill_lm_mfu_pct": 1.0,
            "decode_mbu_pct": 1.0,
            "peak_gib": 6.4,
        },
        "fast": {
            "decode_device_greedy_ms_per_token": 0.8,
            "vision_ms": 16.0,
            "prefill_ms": 8.0,
            "vision_mfu_pct": 25.0,
            "sam_mfu_pct": 22.0,
            "clip_mfu_pct": 16.0,
            "projector_mfu_pct": 4.0,
            "prefill_lm_mfu_pct": 11.0,
            "decode_mbu_pct": 30.0,
            "peak_gib": 6.8,
            "tokens_identical": False,
            "first_divergence": 40,
        },
    }


def _cells(lines: list[str], prefix: str) -> list[str]:
    (line,) = [ln for ln in lines if ln.startswith(f"| {prefix}")]
    return [c.strip() for c in line.strip("|").split("|")]


def test_goals_table_cells_by_hand() -> None:
    lines = goals_table(_res(), keep=64)
    assert "set for the NVIDIA H100 80GB HBM3; this run measured the NVIDIA H200" in lines[0]
    dec = _cells(lines, "decode ms/token")
    assert "vendor 64 tok, eager 128 tok" in dec[0] and "fast 256 tok" in dec[0]
    assert dec[2:5] == ["40.00", "25.00", "0.80"]
    assert dec[5] == "31.2× (128 tok vs 256 tok)"  # 25 / 0.8 = 31.25
    assert dec[6] == "50.0× (64 tok vs 256 tok)"  # 40 / 0.8
    assert dec[7] == "**met** on NVIDIA H200 (goal set for NVIDIA H100 80GB HBM3) (0.80× the goal)"
    pre = _cells(lines, "prefill ms")
    assert pre[3:5] == ["125.00", "24.00"]  # vision + LM prefill: 50 + 75, 16 + 8
    assert pre[5] == "5.2×" and pre[6] == "8.3×"  # 125 / 24, 200 / 24: no decode, so no token count
    assert pre[7].startswith("**met** on NVIDIA H200")
    vis = _cells(lines, "vision MFU %")
    assert vis[2] == "8.0"  # vendor: 4 TFLOP in its 50 ms of vision = 80 TFLOP/s of 1000 TFLOP/s
    assert vis[7].startswith("missed on NVIDIA H200")  # 25 % < 35 %
    sam = _cells(lines, "SAM MFU %")
    assert sam[2] == "10.0"  # 3 TFLOP in 30 ms = 100 TFLOP/s of 1000
    peak = _cells(lines, "peak GiB")
    assert "8.50" in peak[0] and peak[7].startswith("**met**")  # 6 + 0.5 + 2 = 8.5 ≥ 6.8
    assert peak[5] == "0.9× (128 tok vs 256 tok)"
    greedy = next(ln for ln in lines if ln.startswith("| greedy tokens"))
    assert "differ at step 40" in greedy and "missed on NVIDIA H200" in greedy


def test_goals_table_missing_figures_are_not_measured() -> None:
    res = _res("NVIDIA H100 80GB HBM3")
    res["fast"]["decode_device_greedy_ms_per_token"] = None
    res["fast"]["vision_mfu_pct"] = None
    del res["vendor"]
    lines = goals_table(res, keep=64)
    dec = _cells(lines, "decode ms/token")
    assert dec[2] == "n/a" and dec[4] == "n/a" and dec[5] == "" and dec[7] == "not measured on NVIDIA H100 80GB HBM3"
    assert _cells(lines, "vision MFU %")[7] == "not measured on NVIDIA H100 80GB HBM3"
    assert lines[-1].endswith("no `--vendor` snapshot given.")


def test_committed_h200_goals_name_gpus_and_token_counts() -> None:
    res = json.loads((ROOT / "benchmarks/results/2026-12-01-h200-fast.json").read_text())
    lines = goals_table(res, keep=64)
    dec = _cells(lines, "decode ms/token")
    # the vendor decoded 64 tokens, the fast path 256; the eager count was not recorded in that file
    assert dec[6].endswith("(64 tok vs 256 tok)") and dec[5].endswith("(? tok vs 256 tok)")
    assert "(goal set for NVIDIA H100 80GB HBM3)" in dec[7] and "on NVIDIA H200" in dec[7]


def test_decode_step_profile_absent_without_events() -> None:
    # back to back on one stream: busy = raw = (10 + 20 + 30 + 40) / 2 steps
    serial = [(0.0, 10.0, 7), (10.0, 20.0, 7), (30.0, 30.0, 7), (60.0, 40.0, 7)]
    assert decode_step_profile(serial, steps=2) == {
        "kernels_per_step": 2.0, "gpu_us_per_step": 50.0, "raw_us_per_step": 50.0, "reason": None,
    }  # fmt: skip
    # a dependent launch starting at 5 inside a kernel running 0..10 and ending at 25: it counts from 10 (15 µs);
    # a kernel on another stream overlapping both counts in full (8 µs)
    overlapped = [(0.0, 10.0, 7), (5.0, 20.0, 7), (2.0, 8.0, 9)]
    prof = decode_step_profile(overlapped, steps=1)
    assert prof["gpu_us_per_step"] == 10.0 + 15.0 + 8.0 and prof["raw_us_per_step"] == 38.0
    none = decode_step_profile([], steps=5)
    assert none["kernels_per_step"] is None and none["gpu_us_per_step"] is None and none["reason"]
    with pytest.raises(ValueError, match="steps"):
        decode_step_profile([(0.0, 1.0, 0)], steps=0)


def test_step_timeline_splits_each_stream_into_busy_and_idle_time_per_kernel() -> None:
    """Two steps on stream 7 (a, b overlapping as a dependent launch, then c after an idle gap) and one kernel on
    stream 9; by hand: a busy 10 (first on its stream: no idle), b starts at 8 inside a (ends 10) and ends at 15:
    busy 5, idle 0; c starts at 20 after the frontier 15: busy 5, idle 5; the next step's a at 30: idle 5, busy
    10 (30..40); b 38..45: busy 5; c 50..55: busy 5, idle 5.  Stream 9's lone kernel: busy 4, no idle."""
    kernels = [
        ("a", 0.0, 10.0, 7), ("b", 8.0, 7.0, 7), ("c", 20.0, 5.0, 7),
        ("a", 30.0, 10.0, 7), ("b", 38.0, 7.0, 7), ("c", 50.0, 5.0, 7),
        ("x", 3.0, 4.0, 9),
    ]  # fmt: skip
    tl = step_timeline(kernels, steps=2)
    rows = {r["kernel"]: r for r in tl["rows"]}
    assert rows["a"] == {
        "kernel": "a", "calls_per_step": 1.0, "busy_us_per_step": 10.0, "idle_us_before_per_step": 2.5,
        "raw_us_per_call": 10.0,
    }  # fmt: skip
    assert (rows["b"]["busy_us_per_step"], rows["b"]["idle_us_before_per_step"], rows["b"]["raw_us_per_call"]) == (
        5.0, 0.0, 7.0,
    )  # fmt: skip
    assert (rows["c"]["busy_us_per_step"], rows["c"]["idle_us_before_per_step"]) == (5.0, 5.0)
    assert (rows["x"]["busy_us_per_step"], rows["x"]["idle_us_before_per_step"]) == (2.0, 0.0)
    assert [r["kernel"] for r in tl["rows"]] == ["a", "c", "b", "x"]  # by busy + idle: 12.5, 10, 5, 2
    assert tl["busy_us_per_step"] == (10 + 5 + 5 + 10 + 5 + 5 + 4) / 2
    assert tl["idle_us_per_step"] == (5 + 5 + 5) / 2
    assert tl["span_us_per_step"] == tl["busy_us_per_step"] + tl["idle_us_per_step"]
    # where the idle sits: twice after b (whose end at 15, then 45, is the frontier) before c, 5 µs each; once
    # after c (ends 25) before the next step's a (30)
    assert tl["gaps"] == [
        {"after": "b", "before": "c", "gaps_per_step": 1.0, "idle_us_per_step": 5.0},
        {"after": "c", "before": "a", "gaps_per_step": 0.5, "idle_us_per_step": 2.5},
    ]
    with pytest.raises(ValueError, match="steps"):
        step_timeline(kernels, steps=0)


def test_step_timeline_leaves_a_loops_set_up_and_read_back_out_of_the_steps() -> None:
    """A loop of two steps (a opens a step, c closes it) with its set-up before (s0 at 0..1, s1 at 1..2, then the
    first a only at 100: 98 µs idle, the profiler's first launch) and a read-back r after (142..143, 2 µs after
    the last c's end at 140).  By hand, in the steps: a 100..110, c 115..120 (5 idle), a 125..135 (5 idle), c
    135..140: busy 30, idle 10 over 2 steps; outside: s0, s1, r (3 events, busy 1 each, idle 2 before r) and the
    98 µs before the first a."""
    kernels = [
        ("s0", 0.0, 1.0, 7), ("s1", 1.0, 1.0, 7),
        ("a", 100.0, 10.0, 7), ("c", 115.0, 5.0, 7),
        ("a", 125.0, 10.0, 7), ("c", 135.0, 5.0, 7),
        ("r", 142.0, 1.0, 7),
    ]  # fmt: skip
    tl = step_timeline(kernels, steps=2, first="a", last="c")
    assert tl["outside"] == {"events": 3, "busy_us": 3.0, "idle_us": 98.0 + 2.0}
    assert tl["busy_us_per_step"] == (10 + 5 + 10 + 5) / 2
    assert tl["idle_us_per_step"] == (5 + 5 + 0) / 2  # a→c 5 µs twice; c→a 5 µs once (120 → 125)
    rows = {r["kernel"]: r for r in tl["rows"]}
    assert set(rows) == {"a", "c"} and rows["a"]["idle_us_before_per_step"] == 2.5
    assert step_timeline(kernels, steps=2)["idle_us_per_step"] == (98 + 5 + 5 + 2) / 2  # without: all of it
    assert tl["events_in_steps"] == 4
    with pytest.raises(ValueError, match="no kernel named 'z'"):
        step_timeline(kernels, steps=2, first="z")
    with pytest.raises(ValueError, match="starts before the first"):
        step_timeline(kernels, steps=1, first="c", last="s1")
    # a zero-length closing kernel (c at 140, no duration) is the step's, not the read-back's; a second stream's
    # wait into its first kernel inside the window (its set-up kernel t ends at 10, u starts at 112) is set-up too
    edge = [*kernels[:5], ("c", 140.0, 0.0, 7), ("t", 5.0, 5.0, 9), ("u", 112.0, 2.0, 9), ("u", 127.0, 2.0, 9)]
    tl = step_timeline(edge, steps=2, first="a", last="c")
    assert tl["events_in_steps"] == 6 and tl["outside"] == {"events": 3, "busy_us": 7.0, "idle_us": 98.0 + 102.0}
    assert tl["busy_us_per_step"] == (10 + 5 + 10 + 0 + 2 + 2) / 2
    assert tl["idle_us_per_step"] == (5 + 5 + 5 + 13) / 2  # stream 7: c, a, then c 5 after 135; stream 9: u 114→127


def test_p90_of_decode_steps() -> None:
    # statistics.quantiles(n=10), exclusive method: position 0.9·(n+1) = 9.9 of 1..10 → 9 + 0.9·(10 − 9)
    assert p90_ms([float(v) for v in range(10, 0, -1)]) == pytest.approx(9.9)
    assert p90_ms([3.5]) == 3.5 and p90_ms([]) is None


def _row(batch: int, decode: str, out: float, dec: float, tokens: int = 256) -> dict[str, Any]:
    return {
        "batch": batch,
        "decode": decode,
        "output_tok_per_s": out,
        "decode_tok_per_s": dec,
        "tokens_per_seq": tokens,
    }


def test_batched_speedups_and_goal() -> None:
    rows = [_row(32, "graph", 9000.0, 12000.0), _row(32, "host", 3000.0, 4000.0),
            _row(64, "graph", 10600.0, 14000.0), _row(64, "host", 5300.0, 7000.0, tokens=128)]  # fmt: skip
    assert batched_speedups(rows) == [
        "- batch 32: graph / host = 3.0× output tok/s, 3.0× decode tok/s",
        "- batch 64: graph / host = 2.0× (256 tok vs 128 tok) output tok/s, 2.0× (256 tok vs 128 tok) decode tok/s",
    ]
    ruled = [_row(64, "graph", 9000.0, 12600.0), _row(64, "host", 2800.0, 3500.0)]
    for r in ruled:
        r["ngram"] = 20
    # hand-computed: 9000 / 2800 = 3.2, 12600 / 3500 = 3.6; the rule's cost 12600 / 14000 = 0.9
    assert batched_speedups(rows[2:3] + ruled) == [
        "- batch 64, no_repeat_ngram 20 (device rule vs host rule): graph / host = 3.2× output tok/s, "
        "3.6× decode tok/s",
        "- batch 64: graph step with no_repeat_ngram 20 / without = 0.9× decode tok/s (issue 18 goal: within 10 %, "
        "i.e. >= 0.9×)",
    ]
    goal = batched_goal(rows, "NVIDIA H200")
    assert "best 10,600.0 tok/s (batch 64, graph decode, 256 tokens/sequence" in goal
    assert "**met** on NVIDIA H200 (goal set for NVIDIA H100 80GB HBM3)" in goal
    small = batched_goal([_row(8, "graph", 20000.0, 1.0)], "NVIDIA H100 80GB HBM3")
    assert "not measured on NVIDIA H100 80GB HBM3" in small  # batch 8 does not count for a batch 32–64 goal


def test_module_setting_sets_inside_and_restores_after_a_raise() -> None:
    mod = types.ModuleType("kernels_double")
    mod.FORM = "einsum"  # type: ignore[attr-defined]
    with module_setting(mod, "FORM", "triton") as before:
        assert mod.FORM == "triton"  # type: ignore[attr-defined]
        assert before == "einsum"  # the value it replaced, for a caller that times the default beside it
    assert mod.FORM == "einsum"  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="compile failed"), module_setting(mod, "FORM", "gemm"):
        assert mod.FORM == "gemm"  # type: ignore[attr-defined]
        raise RuntimeError("compile failed")
    assert mod.FORM == "einsum"  # type: ignore[attr-defined]


def test_module_setting_refuses_a_misspelt_name() -> None:
    mod = types.ModuleType("kernels_double")
    with pytest.raises(AttributeError, match="has no setting 'TABELS'"), module_setting(mod, "TABELS", "x"):
        pass
    assert not hasattr(mod, "TABELS")


def test_sign_test_p_by_hand() -> None:
    assert sign_test_p([-1.0] * 6) == pytest.approx(2 / 64)  # all six agree: 2 x (1/2)^6
    assert sign_test_p([1.0] * 5 + [-1.0]) == pytest.approx(2 * (1 + 6) / 64)  # one of six against
    assert sign_test_p([0.5, -0.5, 0.0, 0.0]) == 1.0  # ties dropped; 1 vs 1 is no evidence (2 x 3/4, capped)
    assert sign_test_p([0.0, 0.0]) == 1.0  # nothing to test
    assert sign_test_p([2.0, 3.0, 1.0]) == pytest.approx(2 / 8)  # three rounds can never reach 0.05


def _scripted(values: list[float], log: list[str], name: str) -> Any:
    """A timer returning ``values`` in turn and noting each call's side in ``log``."""
    it = iter(values)

    def timer() -> float:
        log.append(name)
        return next(it)

    return timer


def test_paired_ab_alternates_and_compares_round_by_round() -> None:
    log: list[str] = []
    a = _scripted([10.0, 10.2, 10.1, 10.0, 10.3, 10.1], log, "a")
    b = _scripted([9.8, 9.9, 9.9, 9.7, 10.0, 9.9], log, "b")
    r = paired_ab(a, b, rounds=6)
    assert log == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b", "b", "a"]  # a b, b a, ...
    # per round b - a: -0.2, -0.3, -0.2, -0.3, -0.3, -0.2 -> median -0.25, all negative
    assert r.delta_ms == pytest.approx(-0.25)
    assert (r.delta_min_ms, r.delta_max_ms) == (pytest.approx(-0.3), pytest.approx(-0.2))
    assert r.a_ms == pytest.approx(10.1) and r.b_ms == pytest.approx(9.9)
    assert r.p_value == pytest.approx(2 / 64) and r.verdict == "b faster"
    assert r.cell() == "Δ -0.250 ms [-0.300, -0.200] over 6 rounds, sign test p = 0.0312: b faster"


def test_paired_ab_drift_is_not_a_difference() -> None:
    """A machine slowing by 0.1 ms a call, a and b equally fast: timed a a a then b b b, b reads 0.3 ms slower;
    alternated a b, b a, ... the rounds split evenly and the verdict is noise."""
    clock = iter(10.0 + 0.1 * i for i in range(100))
    r = paired_ab(lambda: next(clock), lambda: next(clock), rounds=6)
    # rounds: a=10.0 b=10.1 (+0.1), b=10.2 a=10.3 (-0.1), ... three of each sign
    assert r.delta_ms == pytest.approx(0.0) and r.verdict == "within noise"
    assert r.p_value == 1.0
    clock = iter(10.0 + 0.1 * i for i in range(100))
    a_block = [next(clock) for _ in range(3)]
    b_block = [next(clock) for _ in range(3)]
    assert sum(b_block) / 3 - sum(a_block) / 3 == pytest.approx(0.3)  # what back-to-back blocks would claim


def test_paired_ab_with_too_few_rounds_gives_no_verdict() -> None:
    """Four rounds that all put b 0.5 ms behind: the sign test's p is 2 / 2**4 = 0.125, the least four rounds can
    give, so no difference could ever pass at 0.05; the verdict says that, not "within noise".  Five agreeing rounds
    give 0.0625, six 0.031: six is the fewest that can pass."""
    r = paired_ab(lambda: 1.0, lambda: 1.5, rounds=4)
    assert r.p_value == pytest.approx(0.125) and r.delta_ms == pytest.approx(0.5)
    assert r.verdict == "no verdict: 4 rounds cannot reach p <= 0.05 (the sign test needs 6)"
    assert paired_ab(lambda: 1.0, lambda: 1.5, rounds=5).verdict.startswith("no verdict: 5 rounds")
    assert paired_ab(lambda: 1.0, lambda: 1.5, rounds=6).verdict == "b slower"


def test_paired_ab_slower_and_refusals() -> None:
    r = paired_ab(lambda: 1.0, iter([1.5, 1.4, 1.6, 1.5, 1.5, 1.5]).__next__, rounds=6)
    assert r.verdict == "b slower" and r.delta_ms == pytest.approx(0.5)
    same = paired_ab(lambda: 1.0, lambda: 1.0, rounds=6)
    assert same.delta_ms == 0.0 and same.verdict == "within noise" and same.p_value == 1.0
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        paired_ab(lambda: 1.0, lambda: 1.0, rounds=0)


def test_a_measurement_that_held_a_compile_is_taken_again() -> None:
    """Scripted: the compile count rises during the first measurement only; the second is returned."""
    from benchmarks.benchmath import without_compiles

    count = [0]
    values = iter([9.0, 2.0, 3.0])

    def measure() -> float:
        value = next(values)
        if value == 9.0:
            count[0] += 1  # a compile inside this measurement
        return value

    assert without_compiles(measure, lambda: count[0]) == 2.0
    assert next(values) == 3.0  # measured twice, not three times


def test_a_function_that_compiles_on_every_call_keeps_its_last_figure_with_a_warning() -> None:
    """Nothing measured is lost: after three measurements that each held a compile, the last one is returned
    and a warning says the figure includes a compile."""
    from benchmarks.benchmath import CompileInTimingWarning, without_compiles

    count = [0]
    values = iter([5.0, 4.0, 3.0, 2.0])

    def measure() -> float:
        count[0] += 1
        return next(values)

    with pytest.warns(CompileInTimingWarning, match="each of 3 measurements held a JIT compile"):
        assert without_compiles(measure, lambda: count[0]) == 3.0
    assert next(values) == 2.0  # three measurements, not four
    with pytest.raises(ValueError, match="tries must be >= 1"):
        without_compiles(measure, lambda: count[0], tries=0)
