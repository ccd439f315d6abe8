"""The arithmetic behind the benchmark reports (bench_fast.py, bench_batched.py): goals, ratios and verdicts.

Pure functions over the benchmarks' result dicts, importable without a GPU (``from benchmarks.benchmath import
...`` from the repo root; the scripts import it as ``benchmath``), so every published ratio and verdict is
computed by code a unit test checks (tests/unit/test_benchmath.py).

Rules the functions enforce:
* a figure that was not measured is ``None`` (printed "n/a"), never 0;
* a verdict names the GPU the goal was set for and the GPU that was measured;
* a ratio of two decode runs with different token counts says so in its cell.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import attrs

from llm_perf_opt.profiling.torch_profiler import stream_busy_us, stream_walk


@attrs.frozen
class Goals:
    """Targets of one issue, and the GPU they were set for (a verdict on another GPU says so)."""

    issue: str
    gpu: str
    decode_ms_per_token: float
    prefill_ms: float
    vision_mfu_pct: float
    batched_output_tok_s: float
    batched_min_batch: int


# Issue 9: batch-1 decode ≤ 1 ms/token, prefill ≤ 25 ms, vision MFU ≥ 35 %, ≥ 10k output tok/s batched (32–64),
# all on an H100 80GB in bf16 with the Gundam page and dummy weights.
ISSUE9 = Goals(
    issue="issue 9",
    gpu="NVIDIA H100 80GB HBM3",
    decode_ms_per_token=1.0,
    prefill_ms=25.0,
    vision_mfu_pct=35.0,
    batched_output_tok_s=10_000.0,
    batched_min_batch=32,
)


@contextlib.contextmanager
def module_setting(module: ModuleType, name: str, value: Any) -> Iterator[Any]:
    """``module.name`` set to ``value`` inside the block and restored after it, also when the block raises; the
    block gets the value it replaced (``with module_setting(...) as before``).

    The kernel modules keep some launch forms as module settings (``sam_kernels.TABLES``, ``prompt_moe.W_TMA``,
    ...) that their functions read at call time; a benchmark times the other forms inside this block.
    """
    if not hasattr(module, name):
        raise AttributeError(f"{module.__name__} has no setting {name!r}")
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield before
    finally:
        setattr(module, name, before)


def cuda_ms(fn: Any, warmup: int = 1, reps: int = 5) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, CUDA events around each, after ``warmup`` runs; measured
    again where a JIT compile landed among the runs (:func:`without_compiles`, which warns where every try held
    one)."""
    import torch  # here, not at the top: the rest of this module is plain arithmetic, tested without torch

    from llm_perf_opt.models.deepseek_ocr.compiles import WATCH

    for _ in range(warmup):
        fn()

    def measure() -> float:
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    return without_compiles(measure, lambda: WATCH.install().count)


class CompileInTimingWarning(UserWarning):
    """Every measurement :func:`without_compiles` allowed held a JIT compile: the figure includes one."""


def without_compiles(measure: Callable[[], float], compiles: Callable[[], int], tries: int = 3) -> float:
    """``measure()``, taken again while the process's count of JIT compiles (``compiles``: e.g. ``compiles.WATCH``)
    rose during it: a Triton variant or a ``torch.compile`` frame the warm-up did not meet (a median over a few
    runs hides one slow run, but not a compile in each) is then compiled, and the next measurement is of the work
    alone.  When all ``tries`` measurements held one (the timed function compiles on every call), the last is
    returned with a :class:`CompileInTimingWarning`, so a long benchmark keeps what it measured and says so."""
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    value = 0.0
    for _ in range(tries):
        before = compiles()
        value = measure()
        if compiles() == before:
            return value
    warnings.warn(
        f"each of {tries} measurements held a JIT compile: the timed function compiles on every call (a guard that"
        " fails each time, or a kernel specialised on a value that changes per call), so this figure includes one",
        CompileInTimingWarning,
        stacklevel=3,
    )
    return value


@attrs.frozen
class PairedAB:
    """An A/B of two timed functions in alternating rounds (:func:`paired_ab`): each side's median, the median
    of the per-round differences ``b - a`` and their range, and the sign test's two-sided p over the rounds."""

    a_ms: float
    b_ms: float
    delta_ms: float
    delta_min_ms: float
    delta_max_ms: float
    rounds: int
    p_value: float

    @property
    def verdict(self) -> str:
        """ "b faster" / "b slower" when the rounds agree in sign at p <= ``AB_ALPHA``, else "within noise"; with
        fewer than ``AB_MIN_ROUNDS`` rounds, where even rounds that all agree cannot reach ``AB_ALPHA``, it says
        so instead of calling a difference noise it could never have shown."""
        if self.rounds < AB_MIN_ROUNDS:
            return (
                f"no verdict: {self.rounds} rounds cannot reach p <= {AB_ALPHA} (the sign test needs {AB_MIN_ROUNDS})"
            )
        if self.p_value > AB_ALPHA or self.delta_ms == 0:
            return "within noise"
        return "b faster" if self.delta_ms < 0 else "b slower"

    def cell(self) -> str:
        """``Δ median [min, max] ms over n rounds, p = ..: verdict`` for a report row."""
        return (
            f"Δ {self.delta_ms:+.3f} ms [{self.delta_min_ms:+.3f}, {self.delta_max_ms:+.3f}] over {self.rounds} rounds,"
            f" sign test p = {self.p_value:.3g}: {self.verdict}"
        )


# The sign test's level for a paired A/B verdict: six rounds that all agree in sign give p = 2 / 2**6 = 0.031
AB_ALPHA = 0.05
# the fewest rounds whose unanimous signs reach AB_ALPHA (2 / 2**n <= AB_ALPHA): 6; five that agree give p = 0.0625
AB_MIN_ROUNDS = math.ceil(math.log2(2 / AB_ALPHA))


def sign_test_p(deltas: Sequence[float]) -> float:
    """Two-sided p of the sign test: the chance that rounds with no true difference (each sign 1/2) split at
    least as unevenly as ``deltas`` do; ties (0) are dropped, as the test does.  1.0 with no non-zero delta."""
    signs = [d for d in deltas if d != 0]
    n = len(signs)
    if n == 0:
        return 1.0
    k = min(sum(d > 0 for d in signs), sum(d < 0 for d in signs))
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_ab(time_a: Callable[[], float], time_b: Callable[[], float], rounds: int = 6) -> PairedAB:
    """Time ``a`` and ``b`` (each call returns one measurement in ms, e.g. a median of a few runs) in ``rounds``
    alternating rounds, ordered a b, b a, a b, ... so a drift of the machine (clocks, temperature, another
    process) falls on both sides alike, and compare them round by round: a difference is reported as real only
    when the rounds agree in sign (:func:`sign_test_p`).  Two single timings taken minutes apart cannot tell a
    0.1 ms change from the run-to-run spread; this can, or says it cannot."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    a_ms: list[float] = []
    b_ms: list[float] = []
    for i in range(rounds):
        if i % 2 == 0:
            a_ms.append(time_a())
            b_ms.append(time_b())
        else:
            b_ms.append(time_b())
            a_ms.append(time_a())
    deltas = [b - a for a, b in zip(a_ms, b_ms, strict=True)]
    return PairedAB(
        a_ms=statistics.median(a_ms),
        b_ms=statistics.median(b_ms),
        delta_ms=statistics.median(deltas),
        delta_min_ms=min(deltas),
        delta_max_ms=max(deltas),
        rounds=rounds,
        p_value=sign_test_p(deltas),
    )


def mfu_pct(flops: float, ms: float | None, peak_flops_per_s: float) -> float | None:
    """Percent of the peak FLOP/s that ``flops`` in ``ms`` milliseconds achieve; None when not timed."""
    if ms is None or ms <= 0 or peak_flops_per_s <= 0:
        return None
    return 100.0 * flops / (ms * 1e-3) / peak_flops_per_s


def mbu_pct(bytes_per_token: float, ms_per_token: float | None, peak_bytes_per_s: float) -> float | None:
    """Percent of the peak memory bandwidth that reading ``bytes_per_token`` every ``ms_per_token`` achieves."""
    if ms_per_token is None or ms_per_token <= 0 or peak_bytes_per_s <= 0:
        return None
    return 100.0 * bytes_per_token / (ms_per_token * 1e-3) / peak_bytes_per_s


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def ratio(a: Any, b: Any, a_tokens: int | None = None, b_tokens: int | None = None) -> str:
    """``a / b`` as "N.N×"; empty when either side is missing; names both token counts when they differ
    (or when only one is known), since per-token decode times move with the context length."""
    if not _num(a) or not _num(b) or not b:
        return ""
    text = f"{a / b:.1f}×"
    if a_tokens != b_tokens:
        text += f" ({_tok(a_tokens)} vs {_tok(b_tokens)})"
    return text


def _tok(n: int | None) -> str:
    return "? tok" if n is None else f"{n} tok"


def gpu_key(name: str | None) -> str:
    """Comparable form of a GPU name ("NVIDIA H100 80GB HBM3" and "H100 80GB HBM3" are one GPU)."""
    return " ".join((name or "").lower().replace("nvidia", " ").split())


def verdict(ok: bool | None, goals: Goals, measured_gpu: str) -> str:
    """ "**met**" / "missed" / "not measured", naming the measured GPU and, if another, the one the goal was
    set for: a goal met on a faster GPU than its own is not the goal met."""
    word = "not measured" if ok is None else ("**met**" if ok else "missed")
    if gpu_key(goals.gpu) == gpu_key(measured_gpu):
        return f"{word} on {measured_gpu}"
    return f"{word} on {measured_gpu} (goal set for {goals.gpu})"


def fmt(v: Any, spec: str = "{:.2f}") -> str:
    if v is None:
        return "n/a"
    return spec.format(v) if _num(v) else str(v)


def goals_table(res: dict[str, Any], keep: int, goals: Goals = ISSUE9) -> list[str]:
    """Every goal of ``goals`` with vendor / eager / fast values of one bench_fast run, ratios and verdicts.

    ``res`` is bench_fast's result dict: ``eager`` / ``fast`` / optional ``vendor`` sub-dicts, the FLOPs and
    peaks, ``decode_tokens`` (fast) and ``eager_decode_tokens`` (absent in results from before it was
    recorded: the ratio then says the eager count is unknown).
    """
    e, f, v = res["eager"], res["fast"], res.get("vendor") or {}
    gpu = res["env"]["gpu"]
    vendor_ok = bool(v) and "error" not in v
    vv = (lambda key: v.get(key)) if vendor_ok else (lambda key: None)
    split = v.get("split", {}) if vendor_ok else {}
    tok_v = v.get("decode_tokens") if vendor_ok else None
    tok_e, tok_f = res.get("eager_decode_tokens"), res["decode_tokens"]
    budget = res["weight_gib"] + res["kv_gib"] + 2.0
    f_dec = f.get("decode_device_greedy_ms_per_token")
    f_pre = None if f.get("vision_ms") is None or f.get("prefill_ms") is None else f["vision_ms"] + f["prefill_ms"]
    e_pre = None if e.get("vision_ms") is None or e.get("prefill_ms") is None else e["vision_ms"] + e["prefill_ms"]
    peak = res["peak_bf16_flops"]
    v_vis_mfu = mfu_pct(res["vision_flops"], split.get("vision_ms"), peak) if split else None

    def le(x: float | None, goal: float) -> bool | None:
        return None if x is None else x <= goal

    def row(
        name: str,
        goal: str,
        cells: tuple[Any, Any, Any],
        verdict_text: str,
        spec: str = "{:.2f}",
        tokens: tuple[int | None, int | None, int | None] | None = None,
    ) -> str:
        vendor, eager, fast = cells
        out = [name, goal, fmt(vendor, spec), fmt(eager, spec), fmt(fast, spec)]
        if "%" in name:  # a rate (higher is better): the ratio columns are for times and sizes
            out += ["", "", verdict_text]
        else:
            tv, te, tf = tokens if tokens is not None else (None, None, None)
            out += [ratio(eager, fast, te, tf), ratio(vendor, fast, tv, tf), verdict_text]
        return "| " + " | ".join(out) + " |"

    lines = [
        f"Goals of {goals.issue} were set for the {goals.gpu}; this run measured the {gpu}."
        + ("" if gpu_key(goals.gpu) == gpu_key(gpu) else " A goal met here is not yet met on its own GPU."),
        "",
        "| metric | goal | vendor HF | eager | fast | eager/fast | vendor/fast | verdict |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        row(
            f"decode ms/token, batch 1 (vendor {_tok(tok_v)}, eager {_tok(tok_e)} host greedy; "
            f"fast {_tok(tok_f)} on-device greedy)",
            f"≤ {goals.decode_ms_per_token} ms",
            (vv("decode_ms_per_token"), e.get("decode_ms_per_token"), f_dec),
            verdict(le(f_dec, goals.decode_ms_per_token), goals, gpu)
            + ("" if f_dec is None else f" ({f_dec / goals.decode_ms_per_token:.2f}× the goal)"),
            tokens=(tok_v, tok_e, tok_f),
        ),
        row(
            "prefill ms (vision + LM; vendor: its whole prefill forward)",
            f"≤ {goals.prefill_ms:g} ms",
            (vv("prefill_ms"), e_pre, f_pre),
            verdict(le(f_pre, goals.prefill_ms), goals, gpu),
        ),
        row(
            "vision MFU %",
            f"≥ {goals.vision_mfu_pct:g} %",
            (v_vis_mfu, e.get("vision_mfu_pct"), f.get("vision_mfu_pct")),
            verdict(
                None if f.get("vision_mfu_pct") is None else f["vision_mfu_pct"] >= goals.vision_mfu_pct, goals, gpu
            ),
            "{:.1f}",
        ),
    ]
    for comp in ("sam", "clip", "projector"):
        label = comp.upper() if comp != "projector" else "projector"
        lines.append(
            row(
                f"{label} MFU % (alone; vendor: hook time)",
                "report",
                (
                    mfu_pct(res["component_flops"][comp], vv(f"{comp}_ms"), peak),
                    e.get(f"{comp}_mfu_pct"),
                    f.get(f"{comp}_mfu_pct"),
                ),
                "",
                "{:.1f}",
            )
        )
    lines += [
        row(
            "LM prefill MFU %", "report", (None, e.get("prefill_lm_mfu_pct"), f.get("prefill_lm_mfu_pct")), "", "{:.1f}"
        ),
        row(
            f"decode MBU % (roofline {res['decode_roofline_ms']:.3f} ms/token)",
            "report",
            (None, e.get("decode_mbu_pct"), f.get("decode_mbu_pct")),
            "",
            "{:.1f}",
        ),
        row(
            f"peak GiB, batch 1 (budget weights + KV + 2 = {budget:.2f})",
            f"≤ {budget:.2f}",
            (vv("peak_mem_allocated_gib"), e.get("peak_gib"), f.get("peak_gib")),
            verdict(le(f.get("peak_gib"), budget), goals, gpu),
            tokens=(tok_v, tok_e, tok_f),
        ),
        f"| greedy tokens vs eager, {keep} steps (secondary: dummy weights repeat ids; see the logits parity "
        f"tests) | identical | | — | "
        f"{'identical' if f['tokens_identical'] else 'differ at step ' + str(f['first_divergence'])} | | |"
        f" {verdict(bool(f['tokens_identical']), goals, gpu)} |",
        f"| batched output tok/s, Base mode, batch {goals.batched_min_batch}–64 | "
        f"≥ {goals.batched_output_tok_s:,.0f} tok/s | | | see `*-batched.md` | | | (benchmarks/bench_batched.py) |",
    ]
    if v and not vendor_ok:
        lines.append(f"\nVendor column empty: {v['error']}")
    elif not v:
        lines.append("\nVendor column empty: no `--vendor` snapshot given.")
    return lines


def decode_step_profile(kernels: Sequence[tuple[float, float, Any]], steps: int) -> dict[str, float | str | None]:
    """Kernels and GPU µs per decode step from the profiler's device events, each ``(start µs, duration µs,
    stream)``; absent with a reason when the profiler saw no device event (a 0.0 µs step would read as "free").

    ``gpu_us_per_step`` counts each kernel from the end of the one before it on its stream (the profiler's rule,
    ``torch_profiler.stream_busy_us``): a programmatic dependent launch starts, and waits, while the kernel
    before it runs, so raw durations overlap; ``raw_us_per_step`` is their plain sum (an upper bound)."""
    if steps <= 0:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not kernels:
        return {
            "kernels_per_step": None,
            "gpu_us_per_step": None,
            "raw_us_per_step": None,
            "reason": "the profiler recorded no device events for the decode steps (CUPTI unavailable?)",
        }
    events = [{"ts": start, "dur": dur, "pid": 0, "tid": stream} for start, dur, stream in kernels]
    busy = stream_busy_us(events)
    return {
        "kernels_per_step": len(kernels) / steps,
        "gpu_us_per_step": sum(busy.values()) / steps,
        "raw_us_per_step": sum(dur for _, dur, _ in kernels) / steps,
        "reason": None,
    }


def step_timeline(
    kernels: Sequence[tuple[str, float, float, Any]],
    steps: int,
    first: str | None = None,
    last: str | None = None,
) -> dict[str, Any]:
    """Where a (graphed) decode step's time goes, from the profiler's device events ``(name, start µs, duration µs,
    stream)`` of ``steps`` steps: per kernel name its calls, busy µs (its duration from the later of its start and
    the end of the work before it on its stream: the rule of :func:`decode_step_profile`) and idle µs before it (from
    that end to its start, when it starts later: the stream waited, e.g. on a launch) per step, and its raw µs per
    call; the totals per step (busy, idle, their sum: the stream's span); and where the idle time sits (``gaps``,
    largest first).  A stream's first kernel has no idle time before it.  Rows are sorted by busy + idle time,
    largest first.

    ``first`` / ``last``: the names of the kernels that open and close a step (e.g. of one graph replay).  What
    starts before the first ``first`` kernel (a loop's set-up: its state copies, the profiler's first launch) or
    after the last ``last`` kernel (at or past its end: a read-back), and each stream's wait before its first
    kernel inside that window, is left out of the per-step figures and totalled apart in ``outside`` (events, busy
    µs, idle µs): once per loop, not per step (round 31: 1.7 ms of a 20-step loop's set-up read as 86 µs of idle a
    step).  ``events_in_steps`` counts the events inside the window, for the caller to check against ``steps``
    times the kernels of one step (a set-up kernel named like a step's first would open the window early)."""
    if steps <= 0:
        raise ValueError(f"steps must be >= 1, got {steps}")
    events = [{"ts": start, "dur": dur, "pid": 0, "tid": stream, "name": name} for name, start, dur, stream in kernels]
    begin, last_start, end = -math.inf, math.inf, math.inf
    if first is not None:
        begin = min((float(e["ts"]) for e in events if e["name"] == first), default=math.inf)
        if begin == math.inf:
            raise ValueError(f"no kernel named {first!r} among the {len(events)} events")
    if last is not None:
        closing = max((e for e in events if e["name"] == last), key=lambda e: float(e["ts"]), default=None)
        if closing is None:
            raise ValueError(f"no kernel named {last!r} among the {len(events)} events")
        last_start, end = float(closing["ts"]), float(closing["ts"]) + float(closing["dur"])
        if last_start < begin:
            raise ValueError(f"the last {last!r} kernel starts before the first {first!r}: no step lies between them")
    outside = {"events": 0, "busy_us": 0.0, "idle_us": 0.0}
    opened: set[Any] = set()  # streams whose first kernel inside the window has been seen
    in_steps = 0
    rows: dict[str, dict[str, float]] = {}
    # the idle time by where it sits: per (kernel whose end the stream waited from, kernel that then started) the
    # gaps and their idle µs; tells a wait at a graph replay's start from one inside the step
    pairs: dict[tuple[str, str], list[float]] = {}
    busy_total = idle_total = 0.0
    for e, busy, idle, waited_from in stream_walk(events):
        start = float(e["ts"])
        if start < begin or (start > last_start and start >= end):
            outside["events"] += 1
            outside["busy_us"] += busy
            outside["idle_us"] += idle
            continue
        in_steps += 1
        if first is not None and e["tid"] not in opened:  # a stream's wait into the first step is the set-up's
            opened.add(e["tid"])
            outside["idle_us"] += idle
            idle = 0.0
        row = rows.setdefault(e["name"], {"calls": 0.0, "busy": 0.0, "idle": 0.0, "raw": 0.0})
        row["calls"] += 1
        row["busy"] += busy
        row["idle"] += idle
        row["raw"] += float(e["dur"])
        busy_total += busy
        idle_total += idle
        if idle > 0 and waited_from is not None:
            pair = pairs.setdefault((waited_from["name"], e["name"]), [0.0, 0.0])
            pair[0] += 1
            pair[1] += idle
    table = [
        {
            "kernel": name,
            "calls_per_step": r["calls"] / steps,
            "busy_us_per_step": r["busy"] / steps,
            "idle_us_before_per_step": r["idle"] / steps,
            "raw_us_per_call": r["raw"] / r["calls"],
        }
        for name, r in rows.items()
    ]
    table.sort(key=lambda r: -(r["busy_us_per_step"] + r["idle_us_before_per_step"]))
    return {
        "rows": table,
        "gaps": sorted(
            (
                {"after": a, "before": b, "gaps_per_step": n / steps, "idle_us_per_step": idle / steps}
                for (a, b), (n, idle) in pairs.items()
            ),
            key=lambda g: -g["idle_us_per_step"],
        ),
        "busy_us_per_step": busy_total / steps,
        "idle_us_per_step": idle_total / steps,
        "span_us_per_step": (busy_total + idle_total) / steps,
        "outside": outside,
        "events_in_steps": in_steps,
    }


def p90_ms(step_ms: Sequence[float]) -> float | None:
    """90th percentile of decode-step times (statistics.quantiles, exclusive method); one step: that step."""
    if not step_ms:
        return None
    if len(step_ms) == 1:
        return float(step_ms[0])
    return statistics.quantiles(step_ms, n=10)[-1]


def batched_speedups(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per batch size (and no-repeat-ngram size, when rows carry one): static-step loop (graph, or static off CUDA)
    over the host loop, in output and decode tok/s; then, per batch, the device rule's cost (static step with
    the rule over the same step without it); a pair that decoded different token counts per sequence says so."""
    by = {(r["batch"], r.get("ngram", 0), r["decode"]): r for r in rows}
    lines = []
    for bsz, n in sorted({(r["batch"], r.get("ngram", 0)) for r in rows}):
        s, h = by.get((bsz, n, "graph")) or by.get((bsz, n, "static")), by.get((bsz, n, "host"))
        if not s or not h:
            continue
        out = ratio(s["output_tok_per_s"], h["output_tok_per_s"], s["tokens_per_seq"], h["tokens_per_seq"])
        dec = ratio(s["decode_tok_per_s"], h["decode_tok_per_s"], s["tokens_per_seq"], h["tokens_per_seq"])
        rule = f", no_repeat_ngram {n} (device rule vs host rule)" if n else ""
        lines.append(f"- batch {bsz}{rule}: {s['decode']} / host = {out} output tok/s, {dec} decode tok/s")
    for bsz, n in sorted({(r["batch"], r.get("ngram", 0)) for r in rows if r.get("ngram", 0)}):
        with_rule = by.get((bsz, n, "graph")) or by.get((bsz, n, "static"))
        without = by.get((bsz, 0, with_rule["decode"])) if with_rule else None
        if not with_rule or not without:
            continue
        dec = ratio(with_rule["decode_tok_per_s"], without["decode_tok_per_s"], with_rule["tokens_per_seq"],
                    without["tokens_per_seq"])  # fmt: skip
        lines.append(
            f"- batch {bsz}: {with_rule['decode']} step with no_repeat_ngram {n} / without = {dec} decode tok/s "
            "(issue 18 goal: within 10 %, i.e. >= 0.9×)"
        )
    return lines


def batched_goal(rows: Sequence[dict[str, Any]], gpu: str, goals: Goals = ISSUE9) -> str:
    """The batched-throughput goal against the best output tok/s at batch >= ``goals.batched_min_batch``."""
    eligible = [r for r in rows if r["batch"] >= goals.batched_min_batch and r.get("output_tok_per_s") is not None]
    if not eligible:
        return (
            f"Batched goal ({goals.issue}: ≥ {goals.batched_output_tok_s:,.0f} output tok/s at batch "
            f"{goals.batched_min_batch}–64): {verdict(None, goals, gpu)}, "
            f"no batch of {goals.batched_min_batch} or more."
        )
    best = max(eligible, key=lambda r: r["output_tok_per_s"])
    ok = best["output_tok_per_s"] >= goals.batched_output_tok_s
    return (
        f"Batched goal ({goals.issue}: ≥ {goals.batched_output_tok_s:,.0f} output tok/s at batch "
        f"{goals.batched_min_batch}–64): best {best['output_tok_per_s']:,.1f} tok/s (batch {best['batch']}, "
        f"{best['decode']} decode, {best['tokens_per_seq']} tokens/sequence, preprocessing excluded) — "
        f"{verdict(ok, goals, gpu)}."
    )
