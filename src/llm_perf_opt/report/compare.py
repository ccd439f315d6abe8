"""``llm-perf-opt compare RUN_A RUN_B``: a markdown diff of two run directories, built to gate releases.

Order of the output: the settings that differ (and a "workloads differ" verdict when the pages, token cap or
decoding rules differ: then no metric gets a verdict), both runs' measurement quality, then one row per metric
by class:

- latency (lower is better) and throughput (higher is better): compared on the per-page samples.  A change is
  significant only when all three hold: a two-sided Mann-Whitney U test gives p < ``--alpha`` (rank-based: no
  normality assumed, an outlier counts once), the runs' 95 % intervals of the median do not overlap (when both
  exist), and the medians differ by at least the effect floor (as a fold change: the larger median over the
  smaller, minus one, so a rate halving and a time doubling count alike): ``--min-effect`` (tripled when either
  run is noisy), and never less than twice the stage's repeat-to-repeat CV in either run, nor (for what the
  host's speed sets: every stage of a CPU run, host-side time of a GPU run) ``HOST_FLOOR_FACTOR`` × the change
  of the host's own speed between the runs, by the fixed CPU probe each run times at its start and end.  Two
  runs of one config differ by load drift, not by a shifted distribution: the floor keeps the gate quiet on them.
- memory (one value per run: the max over pages): a relative ``--mem-threshold``.
- workload descriptors (tokens generated, prompt length): shown, never judged.

Exit status: 0 no significant regression, 1 at least one (usable as a gate), 2 unusable input (not a run
directory, another schema major, no measured page, a null figure, or workloads that differ) and also 2 when the
runs cannot be judged: no regression, but the host's own speed differed between them by more than
``HOST_SHIFT_LIMIT``, so what it sets was judged only against a floor widened by that change (a gate can re-run
both on a quiet host).  ``make compare`` can pass on 0, 1 and 2 only, which is why "cannot judge" shares 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs
from scipy import stats as sps

from llm_perf_opt.results.serialize import SchemaError, read_summary
from llm_perf_opt.results.types import BatchedPhase, RunSummary

MetricClass = Literal["latency", "throughput", "memory", "workload"]

# (metric, unit, class); order = order of the table.
COMPARED: list[tuple[str, str, MetricClass]] = [
    ("prefill_ms", "ms", "latency"),
    ("vision_ms", "ms", "latency"),
    ("sam_ms", "ms", "latency"),
    ("clip_ms", "ms", "latency"),
    ("projector_ms", "ms", "latency"),
    ("decode_ms", "ms", "latency"),
    ("tpot_ms", "ms/token", "latency"),
    ("decode_step_p50_ms", "ms", "latency"),
    ("decode_step_p99_ms", "ms", "latency"),
    ("preprocess_ms", "ms", "latency"),
    ("e2e_ms", "ms", "latency"),
    ("energy_per_token_j", "J/token", "latency"),
    ("decode_tok_s", "tok/s", "throughput"),
    ("peak_mem_allocated_bytes", "bytes", "memory"),
    ("peak_mem_reserved_bytes", "bytes", "memory"),
    ("peak_rss_bytes", "bytes", "memory"),
    ("kv_cache_bytes", "bytes", "memory"),
    ("generated_tokens", "tokens", "workload"),
    ("prompt_tokens", "tokens", "workload"),
    ("image_tokens", "tokens", "workload"),
]
# Settings that define the work itself: when they differ the runs measured different things.
WORKLOAD_KEYS = (
    "infer.max_new_tokens",
    "max_new_tokens",
    "infer.temperature",
    "infer.no_repeat_ngram_size",
    "infer.ignore_eos",
    "model.prompt",
    "infer.preprocess_override",
)
# Settings that name where or when a run happened, not what it measured.
IGNORED_PREFIXES = ("run_id", "output.", "hydra.", "resume", "progress", "experiment")


@attrs.frozen
class Thresholds:
    alpha: float = 0.01  # Mann-Whitney two-sided p below which a shift counts
    min_effect: float = 0.05  # relative change of the median below which no latency/throughput verdict is given
    mem_threshold: float = 0.05  # relative change of a memory peak that counts
    noisy_factor: float = 3.0  # min_effect multiplier when either run's quality is noisy


class CompareError(ValueError):
    pass


@attrs.frozen
class Delta:
    metric: str
    unit: str
    cls: MetricClass
    a: float
    b: float
    delta: float
    pct: float | None
    significant: bool
    verdict: str
    p_value: float | None = None
    a_ci: tuple[float, float] | None = None
    b_ci: tuple[float, float] | None = None
    integer: bool = False


def load_run(path: Path) -> RunSummary:
    metrics = path / "metrics.json"
    if not path.is_dir() or not metrics.is_file():
        raise CompareError(f"{path} is not a run directory (no metrics.json)")
    try:
        s = read_summary(metrics)
    except SchemaError as exc:
        raise CompareError(f"{exc}; re-run the profile with this version to compare") from exc
    except (ValueError, AttributeError, KeyError, TypeError, cattrs.errors.BaseValidationError) as exc:
        raise CompareError(f"{metrics} is not a readable metrics.json ({type(exc).__name__}: {exc})") from exc
    if not s.ok_pages:
        raise CompareError(f"{path}: no measured page (status {s.run.status}); nothing to compare")
    return s


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def settings_diff(a: RunSummary, b: RunSummary) -> list[tuple[str, Any, Any]]:
    """Config keys whose resolved values differ (where/when keys left out)."""
    fa, fb = _flatten(a.run.config), _flatten(b.run.config)
    keys = sorted(set(fa) | set(fb))
    return [
        (k, fa.get(k, "(unset)"), fb.get(k, "(unset)"))
        for k in keys
        if fa.get(k, "(unset)") != fb.get(k, "(unset)") and not k.startswith(IGNORED_PREFIXES)
    ]


def _pages(s: RunSummary) -> set[tuple[str, tuple[int, int] | None]]:
    return {(p.page_id, tuple(p.size_px) if p.size_px else None) for p in s.ok_pages}  # type: ignore[misc]


def workload_differences(a: RunSummary, b: RunSummary) -> list[str]:
    """Why the two runs measured different work (empty: the same pages, token cap and decoding rules)."""
    out = [
        f"{k}: {va!r} → {vb!r}" for k, va, vb in settings_diff(a, b) if k in WORKLOAD_KEYS or k.startswith("dataset.")
    ]
    pa, pb = _pages(a), _pages(b)
    if pa != pb:
        out.append(f"pages: {len(pa - pb)} only in A, {len(pb - pa)} only in B")
    return out


def _samples(s: RunSummary, metric: str) -> list[float]:
    values = (getattr(p, metric) for p in s.ok_pages)
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _check_usable(s: RunSummary, label: str) -> None:
    for metric, _, _ in COMPARED:
        st = s.aggregates.get(metric)
        if st is not None and not all(math.isfinite(x) for x in (st.mean, st.p50, st.max)):
            raise CompareError(f"run {label}: {metric} has a null mean/median in metrics.json; the run is unusable")


def _is_noisy(s: RunSummary) -> bool:
    return s.quality is not None and s.quality.verdict == "noisy"


def _ci(s: RunSummary, metric: str) -> tuple[float, float] | None:
    st = s.aggregates.get(metric)
    if st is None or st.median_ci95_low is None or st.median_ci95_high is None:
        return None
    return st.median_ci95_low, st.median_ci95_high


# Metrics without a CV of their own take the one of the stage that makes them.
CV_OF = {"decode_tok_s": "tpot_ms", "decode_step_p50_ms": "tpot_ms", "decode_step_p99_ms": "tpot_ms",
         "sam_ms": "vision_ms", "clip_ms": "vision_ms", "projector_ms": "vision_ms", "e2e_ms": "decode_ms"}  # fmt: skip


def _cv(s: RunSummary, metric: str) -> float:
    """The run's repeat-to-repeat CV of ``metric`` (median over pages); 0 when not recorded."""
    if s.quality is None:
        return 0.0
    cv = s.quality.stage_cv
    return float(cv.get(metric, cv.get(CV_OF.get(metric, ""), 0.0)))


# Host-only work (PIL decoding and tiling), and the end-to-end time that includes it: on a host the noise sampler
# found contended it moves with the other processes' load (preprocess 35 % between two same-config runs on a
# loaded 2-core box; with one busy process beside it, 10× at the median and e2e 4.7×), so no verdict there.
HOST_SIDE = ("preprocess_ms", "e2e_ms")


def _probe_ms(s: RunSummary) -> float | None:
    """The run's host speed probe (ms); None for runs recorded before it (schema < 1.2)."""
    host = s.quality.host if s.quality is not None else None
    return host.probe_ms if host is not None else None


def _longer(a_ms: float, b_ms: float) -> float:
    """How much longer B's time is than A's (+0.5: 1.5×; negative when shorter)."""
    return b_ms / a_ms - 1.0


def host_shift(a: RunSummary, b: RunSummary) -> float | None:
    """How much slower (+) or faster (−) B's host ran than A's, by each run's fixed CPU probe; None when a run
    has no probe."""
    pa, pb = _probe_ms(a), _probe_ms(b)
    return _longer(pa, pb) if pa is not None and pb is not None else None


# The host's own speed, by the fixed CPU probe each run times at its start and end.  Below HOST_SHIFT_SHOWN the
# two hosts ran alike (fresh processes on one quiet 2-core box: within ~9 %, the model's stages moving with them).
# Above it, a change of what the host sets must exceed HOST_FLOOR_FACTOR × the shift to be called one: on that box,
# one busy process beside a run moved the probe +76 % and TTFT, vision and decode +53 % to +78 % (0.7-1.0× the
# shift); two busy processes moved the probe as much and the stages +149 % to +225 % (up to 3×).  The decode-step
# tail (p99) moved 4-5× on its own, so under a changed host it is not compared at all.  Above HOST_SHIFT_LIMIT a
# comparison with nothing beyond that floor is inconclusive (exit 2), not "no regression": smaller changes
# cannot be seen.
HOST_SHIFT_SHOWN = 0.10
HOST_FLOOR_FACTOR = 3.0
HOST_SHIFT_LIMIT = 0.15
HOST_DIFFERS = "no verdict (host speed"
TAILS = ("decode_step_p99_ms",)


def host_differs(a: RunSummary, b: RunSummary) -> bool:
    shift = host_shift(a, b)
    return shift is not None and abs(shift) > HOST_SHIFT_LIMIT


def _both_cpu(a: RunSummary, b: RunSummary) -> bool:
    return a.hardware.device == "cpu" and b.hardware.device == "cpu"


def host_bound(a: RunSummary, b: RunSummary, metric: str) -> bool:
    """Does the host's own speed set ``metric``?  Host-side work always; on CPU runs every timed stage (a GPU
    run's stages are timed on the device, whose clocks the throttle reasons cover)."""
    return metric in HOST_SIDE or _both_cpu(a, b)


# The GPU's mean SM clock over each run (NVML): at a lower clock a compute-bound stage takes up to that much longer
# (a memory-bound one less).  From GPU_CLOCK_SHOWN apart, a change of a device-timed metric must exceed twice the
# clock's change to be called one.
GPU_CLOCK_SHOWN = 0.05


def gpu_clock_shift(a: RunSummary, b: RunSummary) -> float | None:
    """How much lower (+) or higher (−) B's mean SM clock ran than A's, as the time a compute-bound stage gains
    (A's clock ÷ B's − 1); None unless both runs sampled the clock (CUDA with NVML)."""
    ca, cb = a.energy.get("mean_sm_clock_mhz"), b.energy.get("mean_sm_clock_mhz")
    if not ca or not cb:
        return None
    return _longer(float(cb), float(ca))  # a cycle's time is 1 / clock


def effect_floor(a: RunSummary, b: RunSummary, metric: str, th: Thresholds) -> float:
    """Smallest relative change of the median that can be called a change for ``metric``: the configured
    effect (tripled when a run is noisy), twice the stage's repeat-to-repeat CV in either run, where the host
    sets the metric ``HOST_FLOOR_FACTOR`` × the host's own speed change between the runs, and elsewhere on a
    GPU twice the change of its mean SM clock."""
    base = th.min_effect * (th.noisy_factor if _is_noisy(a) or _is_noisy(b) else 1.0)
    if host_bound(a, b, metric):
        shift = host_shift(a, b)
        moved = HOST_FLOOR_FACTOR * abs(shift) if shift is not None and abs(shift) >= HOST_SHIFT_SHOWN else 0.0
    else:
        clock = gpu_clock_shift(a, b)
        moved = 2 * abs(clock) if clock is not None and abs(clock) >= GPU_CLOCK_SHOWN else 0.0
    return max(base, 2 * _cv(a, metric), 2 * _cv(b, metric), moved)


# The modules DeepSeek-OCR's hooks time, by record slot; a model with other modules says so in its stage_names.
V1_STAGES = {"sam": "SAM", "clip": "CLIP", "projector": "projector"}


def stage_of(s: RunSummary, metric: str) -> str | None:
    """The module a per-stage metric times in this run's model (``clip_ms`` is DeepSeek-OCR-2's encoder)."""
    slot = metric.removesuffix("_ms")
    if slot not in V1_STAGES:
        return None
    return s.model.stage_names.get(slot, V1_STAGES[slot])


def metric_label(a: RunSummary, b: RunSummary, metric: str) -> str:
    """The row's name: the metric key, with the modules it times when they are not v1's (or differ A → B)."""
    sa, sb = stage_of(a, metric), stage_of(b, metric)
    if sa is None or sb is None:
        return metric
    if sa != sb:
        return f"{metric} (A: {sa}, B: {sb})"
    return metric if sa == V1_STAGES[metric.removesuffix("_ms")] else f"{metric} ({sa})"


def diff(a: RunSummary, b: RunSummary, th: Thresholds | None = None, judge: bool = True) -> list[Delta]:
    """One Delta per metric both runs have; ``judge=False`` (workloads differ) gives no verdicts.

    A per-stage metric that times different modules in the two runs (CLIP in DeepSeek-OCR, the encoder in
    DeepSeek-OCR-2) is shown under both names and never judged: it is not one stage getting faster or slower.
    """
    th = th or Thresholds()
    out = []
    for metric, unit, cls in COMPARED:
        sa, sb = a.aggregates.get(metric), b.aggregates.get(metric)
        if sa is None or sb is None:
            continue
        other_module = stage_of(a, metric) != stage_of(b, metric)
        integer = unit in ("bytes", "tokens")
        a_ci, b_ci = _ci(a, metric), _ci(b, metric)
        if cls == "memory":
            va, vb = sa.max, sb.max
            a_ci = b_ci = None  # one value per run: no interval
        else:
            va, vb = sa.p50, sb.p50
        delta = vb - va
        pct = 100.0 * delta / va if va else None
        p_value: float | None = None
        significant = False
        if not judge:
            verdict = "no verdict (workloads differ)"
        elif other_module:
            verdict = f"no verdict (different modules: {stage_of(a, metric)} vs {stage_of(b, metric)})"
        elif cls == "workload":
            verdict = "workload (no verdict)"
        elif cls == "memory":
            rel = delta / va if va else (math.inf if delta else 0.0)
            significant = abs(rel) > th.mem_threshold
            verdict = _direction(delta, lower_better=True) if significant else f"within ±{100 * th.mem_threshold:g} %"
        elif metric in HOST_SIDE and (_is_noisy(a) or _is_noisy(b)):
            verdict = "no verdict (includes host-side time, a run is noisy)"
        elif metric in TAILS and host_differs(a, b) and host_bound(a, b, metric):
            verdict = f"{HOST_DIFFERS} {100 * (host_shift(a, b) or 0.0):+.0f} % in B: tails not compared)"
        else:
            xa, xb = _samples(a, metric), _samples(b, metric)
            if len(xa) < 3 or len(xb) < 3:
                verdict = "too few samples (< 3 per run)"
            else:
                p_value = float(sps.mannwhitneyu(xa, xb, alternative="two-sided").pvalue)
                apart = a_ci is None or b_ci is None or a_ci[1] < b_ci[0] or b_ci[1] < a_ci[0]
                big = fold_change(va, vb) >= effect_floor(a, b, metric, th)
                significant = p_value < th.alpha and apart and big
                if significant:
                    verdict = _direction(delta, lower_better=cls == "latency")
                elif host_differs(a, b) and host_bound(a, b, metric):
                    floor = effect_floor(a, b, metric, th)
                    verdict = (
                        f"{HOST_DIFFERS} {100 * (host_shift(a, b) or 0.0):+.0f} % in B: ±{100 * floor:.0f} % unseen)"
                    )
                else:
                    verdict = "within noise"
        out.append(Delta(metric, unit, cls, va, vb, delta, pct, significant, verdict, p_value, a_ci, b_ci, integer))
    return out


def fold_change(va: float, vb: float) -> float:
    """How far apart two medians are, as the larger over the smaller, minus one: a rate that halves and a time
    that doubles are both 1.0 (a relative change of a rate cannot pass -100 %, so a floor above that would make
    every slowdown of a throughput invisible).  Near zero it is the relative change; with a zero or negative
    value, the change relative to A's magnitude (infinite when A is zero and B is not)."""
    if va > 0 and vb > 0:
        return max(va, vb) / min(va, vb) - 1.0
    if va == vb:
        return 0.0
    return abs(vb - va) / abs(va) if va else math.inf


def _direction(delta: float, lower_better: bool) -> str:
    return "better" if (delta < 0) == lower_better else "WORSE"


def _num(v: float, integer: bool, signed: bool = False) -> str:
    if integer and float(v).is_integer():
        return f"{int(v):+,}" if signed else f"{int(v):,}"
    return f"{v:+,.3f}" if signed else f"{v:,.3f}"


def _with_ci(v: float, ci: tuple[float, float] | None, integer: bool) -> str:
    text = _num(v, integer)
    return f"{text} [{_num(ci[0], integer)} – {_num(ci[1], integer)}]" if ci else text


def _quality(s: RunSummary) -> str:
    return s.quality.line() if s.quality is not None else "measurement quality not recorded (older run)"


def render(a_path: Path, a: RunSummary, b_path: Path, b: RunSummary, th: Thresholds | None = None) -> str:
    th = th or Thresholds()
    differs = workload_differences(a, b)
    rows = diff(a, b, th, judge=not differs)
    lines = [
        f"# Compare `{a_path.name}` (A) → `{b_path.name}` (B)\n",
        f"A: {a.model.name} on {a.hardware.gpu_name or a.hardware.device}, status {a.run.status}, "
        f"{len(a.ok_pages)} page runs  ",
        f"B: {b.model.name} on {b.hardware.gpu_name or b.hardware.device}, status {b.run.status}, "
        f"{len(b.ok_pages)} page runs\n",
        "## Settings that differ\n",
    ]
    changed = settings_diff(a, b)
    if changed:
        lines += ["| setting | A | B |", "|---|---|---|"]
        lines += [f"| `{k}` | {_cell(va)} | {_cell(vb)} |" for k, va, vb in changed]
    else:
        lines.append("None: the resolved configs are the same (run ids and output paths aside).")
    if a.hardware.gpu_name != b.hardware.gpu_name or a.hardware.device != b.hardware.device:
        lines.append("\n⚠ The runs are on different devices: differences include the hardware.")
    lines.append("")
    if differs:
        lines.append(
            "**Verdict: workloads differ** — " + "; ".join(differs) + ". The runs measured different work, so no "
            "metric is judged (exit 2); compare runs of the same pages, token cap and decoding rules.\n"
        )
    lines += ["## Measurement quality\n", f"- A: {_quality(a)}", f"- B: {_quality(b)}"]
    lines += [_host_speed_line(a, b), *_gpu_clock_line(a, b), ""]
    noisy = _is_noisy(a) or _is_noisy(b)
    effect = th.min_effect * (th.noisy_factor if noisy else 1.0)
    lines += [
        "## Metrics\n",
        f"Latency (lower is better) and throughput (higher is better) compare medians of the per-page samples "
        f"[95 % interval of the median]: significant when Mann-Whitney p < {th.alpha:g}, the intervals do not "
        f"overlap and the medians differ by ≥ {100 * effect:g} %"
        + (f" (×{th.noisy_factor:g} because a run is noisy)" if noisy else "")
        + " or twice the stage's repeat-to-repeat CV in either run"
        + (
            f" or {HOST_FLOOR_FACTOR:g}× the host's speed change (above)"
            if abs(host_shift(a, b) or 0.0) >= HOST_SHIFT_SHOWN
            else ""
        )
        + ", whichever is larger"
        + f". Memory compares the peak (max over pages) against ±{100 * th.mem_threshold:g} %. Workload "
        "descriptors are shown, not judged.\n",
        "| metric | class | unit | A | B | Δ | Δ % | p | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in rows:
        pct = "n/a (A is 0)" if d.pct is None else f"{d.pct:+.1f} %"
        p = "" if d.p_value is None else f"{d.p_value:.3g}"
        mark = f"**{d.verdict}**" if d.significant else d.verdict
        lines.append(
            f"| {metric_label(a, b, d.metric)} | {d.cls} | {d.unit} | {_with_ci(d.a, d.a_ci, d.integer)} | "
            f"{_with_ci(d.b, d.b_ci, d.integer)} | {_num(d.delta, d.integer, signed=True)} | {pct} | {p} | {mark} |"
        )
    lines += _batched_phase_rows(a, b)
    worse = [d.metric for d in rows if d.verdict == "WORSE"]
    withheld = [d.metric for d in rows if d.verdict.startswith(HOST_DIFFERS)]
    if differs:
        lines.append("\nResult: workloads differ (exit 2).")
    elif worse:
        lines.append(f"\nResult: significant regression in {', '.join(worse)} (exit 1).")
    elif withheld:
        lines.append(
            f"\nResult: inconclusive — the hosts ran at different speeds, so {', '.join(withheld)} could not be "
            "judged as finely as on one host speed, and nothing changed beyond what the host's change allows "
            "(exit 2)."
        )
    else:
        lines.append("\nResult: no significant regression (exit 0).")
    return "\n".join(lines) + "\n"


def _host_speed_line(a: RunSummary, b: RunSummary) -> str:
    """The hosts' own speed, A → B, by the fixed CPU probe each run timed at its start and end."""
    shift, pa, pb = host_shift(a, b), _probe_ms(a), _probe_ms(b)
    if shift is None or pa is None or pb is None or a.quality is None or a.quality.host is None:
        return "- Host speed: not compared (a run has no host probe: recorded from schema 1.2 on)."
    text = (
        f"- Host speed: the fixed CPU probe ({a.quality.host.probe_work or 'host probe'}) took {pa:.2f} ms in A "
        f"and {pb:.2f} ms in B ({100 * shift:+.0f} %)"
    )
    if abs(shift) < HOST_SHIFT_SHOWN:
        return text + ": the same host speed."
    where = "every timed metric" if _both_cpu(a, b) else "host-side time"
    slower = "slower" if shift > 0 else "faster"
    floor = f"a change of {where} smaller than {100 * HOST_FLOOR_FACTOR * abs(shift):.0f} % is not called one"
    if abs(shift) > HOST_SHIFT_LIMIT:
        return (
            f"{text}. ⚠ **The host itself ran {slower} in B**, by more than {100 * HOST_SHIFT_LIMIT:.0f} %: {floor}, "
            "and without a larger one the result is inconclusive (exit 2). Run both on the same quiet host; the "
            "quality lines above say what else ran."
        )
    return f"{text}. The host itself ran {slower} in B: {floor}."


def _gpu_clock_line(a: RunSummary, b: RunSummary) -> list[str]:
    """The GPUs' mean SM clocks over the runs (NVML), when both runs sampled them."""
    shift = gpu_clock_shift(a, b)
    if shift is None:
        return []
    ca, cb = float(a.energy["mean_sm_clock_mhz"]), float(b.energy["mean_sm_clock_mhz"])
    text = f"- GPU SM clock, mean over the run (NVML): {ca:,.0f} MHz in A, {cb:,.0f} MHz in B"
    if abs(shift) < GPU_CLOCK_SHOWN:
        return [text + ": the same clocks."]
    return [
        f"{text}: a compute-bound stage takes up to {100 * shift:+.0f} % in B for that alone, so a change of a "
        f"device-timed metric smaller than {100 * 2 * abs(shift):.0f} % is not called one (the quality lines say "
        "why the clocks moved)."
    ]


# (BatchedPhase field, label, digits); one value per run, so shown side by side with their ratio, never judged
PHASE_ROWS = [
    ("pages_per_s", "pages/s, end to end", 2),
    ("output_tok_s", "output tok/s, end to end", 1),
    ("steady_output_tok_s", "output tok/s, steady state (drain left out)", 1),
    ("slot_occupancy", "slot occupancy", 3),
    ("row_occupancy", "row occupancy (rows computed that produced a token)", 3),
    ("gpu_busy_share", "GPU busy share", 3),
    ("routed_experts_read", "routed experts read per MoE layer and decode step", 1),
    ("decode_gb_per_s", "decode bandwidth achieved, GB/s (minimum traffic ÷ decode time)", 1),
    ("page_wait_ms", "waiting for pages (ms)", 1),
    ("wall_ms", "wall time (ms)", 1),
]


def _refills(s: RunSummary) -> str:
    """How a continuous run's refills were prefilled, as ``infer.refill_prefill`` resolved (``auto`` differs by
    device), e.g. " (refills prefilled per_page)"; empty for static batches and records from before it was kept."""
    return f" (refills prefilled {' / '.join(s.refill_modes)})" if s.refill_modes else ""


def _batched_phase_rows(a: RunSummary, b: RunSummary) -> list[str]:
    """The batched phases end to end (e.g. static vs continuous batching) when both runs have one."""
    pa, pb = a.batched_phase, b.batched_phase
    if pa is None or pb is None:
        return []
    lines = [
        f"\n## Batched phase end to end\n\nA: {pa.batching} batching{_refills(a)}, {pa.slots} slots, {pa.pages} "
        f"pages; B: {pb.batching} batching{_refills(b)}, {pb.slots} slots, {pb.pages} pages. One value per run (no "
        "samples): shown with the ratio B / A, not judged.\n",
        "| quantity | A | B | B / A |",
        "|---|---|---|---|",
    ]
    for name, label, digits in PHASE_ROWS:
        va, vb = getattr(pa, name), getattr(pb, name)
        if va is None or vb is None:
            ratio = f"n/a (absent in {'A' if va is None else 'B'})"
        else:
            ratio = f"{vb / va:.2f}×" if va else "n/a (A is 0)"
        lines.append(f"| {label} | {_phase_cell(pa, name, digits)} | {_phase_cell(pb, name, digits)} | {ratio} |")
    return lines


def _phase_cell(p: BatchedPhase, name: str, digits: int) -> str:
    """One run's value of a ``PHASE_ROWS`` row; the decode bandwidth marked "≥" where it is a lower bound."""
    v = getattr(p, name)
    if v is None:
        return "n/a"
    low = name == "decode_gb_per_s" and p.decode_traffic is not None and p.decode_traffic.lower_bound
    return f"{'≥ ' if low else ''}{v:,.{digits}f}"


def _cell(v: Any) -> str:
    return str(v).replace("|", "/").replace("\n", " ")


def exit_code(a: RunSummary, b: RunSummary, th: Thresholds | None = None) -> int:
    if workload_differences(a, b):
        return 2
    rows = diff(a, b, th)
    if any(d.verdict == "WORSE" for d in rows):
        return 1
    return 2 if any(d.verdict.startswith(HOST_DIFFERS) for d in rows) else 0


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 10:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.05, got {text}")
    return value


def compare_main(argv: Iterable[str]) -> int:
    parser = argparse.ArgumentParser(prog="llm-perf-opt compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("-o", "--output", type=Path, help="also write the markdown here")
    d = Thresholds()
    parser.add_argument("--alpha", type=_fraction, default=d.alpha, help=f"Mann-Whitney p threshold ({d.alpha})")
    parser.add_argument(
        "--min-effect", type=_fraction, default=d.min_effect, help=f"relative median change to judge ({d.min_effect})"
    )
    parser.add_argument(
        "--mem-threshold", type=_fraction, default=d.mem_threshold, help=f"relative memory change ({d.mem_threshold})"
    )
    args = parser.parse_args(list(argv))
    th = Thresholds(alpha=args.alpha, min_effect=args.min_effect, mem_threshold=args.mem_threshold)
    try:
        a, b = load_run(args.run_a), load_run(args.run_b)
        _check_usable(a, "A")
        _check_usable(b, "B")
    except CompareError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    text = render(args.run_a, a, args.run_b, b, th)
    print(text)
    if args.output:
        args.output.write_text(text)
    return exit_code(a, b, th)
