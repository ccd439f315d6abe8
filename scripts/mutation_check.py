# ruff: noqa: E501  (each mutation is one exact source line and its replacement: kept whole to grep for)
"""Mutation check of the reporting path (issue 15): apply each deliberate one-line bug, run the test that must
catch it, revert it with git checkout.  Prints one line per mutation: CAUGHT (the test failed) or SURVIVED.

    PYTHONPATH=src .venv/bin/python scripts/mutation_check.py [index ...]

Run it on a clean work tree: each mutated file is restored with ``git checkout -- <file>``.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
S = "src/llm_perf_opt/"
M = [
    (
        "TPOT divided by n_tok instead of n_tok-1",
        S + "runners/page_record.py",
        "tpot = decode_ms / (n_tok - 1) if",
        "tpot = decode_ms / n_tok if",
        "tests/integration/test_scripted_clock.py::test_scripted_times_are_the_published_figures",
    ),
    (
        "every decode step time halved",
        S + "runners/dsocr_session.py",
        "decode_step_ms=clock.intervals_ms(state.marks),",
        "decode_step_ms=[s / 2 for s in clock.intervals_ms(state.marks)],",
        "tests/integration/test_scripted_clock.py::test_scripted_times_are_the_published_figures",
    ),
    (
        "p99 taken from the p90 slot",
        S + "runners/page_record.py",
        "decode_step_p99_ms=pct[2] if pct else None",
        "decode_step_p99_ms=pct[1] if pct else None",
        "tests/integration/test_scripted_clock.py::test_scripted_times_are_the_published_figures",
    ),
    (
        "LM prefill time not subtracting vision",
        S + "profiling/efficiency.py",
        "else rec.prefill_ms - rec.vision_ms",
        "else rec.prefill_ms",
        "tests/integration/test_scripted_clock.py::test_efficiency_from_scripted_times_and_configured_peak",
    ),
    (
        "compare: peak memory direction flipped",
        S + "report/compare.py",
        'verdict = _direction(delta, lower_better=True) if significant else f"within ±{100 * th.mem_threshold:g} %"',
        'verdict = _direction(delta, lower_better=False) if significant else f"within ±{100 * th.mem_threshold:g} %"',
        "tests/unit/test_compare_directions.py",
    ),
    (
        "compare: tok/s direction flipped (throughput judged as a latency)",
        S + "report/compare.py",
        '("decode_tok_s", "tok/s", "throughput"),',
        '("decode_tok_s", "tok/s", "latency"),',
        "tests/unit/test_compare_directions.py",
    ),
    (
        "tok/s from decode_ms instead of TPOT",
        S + "runners/page_record.py",
        "decode_tok_s=(1000.0 / tpot) if tpot else None",
        "decode_tok_s=(1000.0 / decode_ms) if tpot else None",
        "tests/integration/test_scripted_clock.py::test_scripted_times_are_the_published_figures",
    ),
    (
        "range time: device mirror overwrites host entry (the committed bug)",
        S + "profiling/torch_profiler.py",
        'if e.key in RANGE_NAMES and getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU:',
        "if e.key in RANGE_NAMES:",
        "tests/unit/test_torch_profiler.py::test_range_times_keep_the_host_entry_over_its_device_mirror",
    ),
    (
        "range time: the committed code restored (no host filter, last entry per name wins)",
        S + "profiling/torch_profiler.py",
        'if e.key in RANGE_NAMES and getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU:\n            out[e.key] = out.get(e.key, 0.0) + float(e.cpu_time_total) / 1e3',
        "if e.key in RANGE_NAMES:\n            out[e.key] = float(e.cpu_time_total) / 1e3",
        "tests/unit/test_torch_profiler.py::test_range_times_keep_the_host_entry_over_its_device_mirror",
    ),
    (
        "operator total silently raised to the operators' sum",
        S + "profiling/torch_profiler.py",
        "        if unattributed_us < 0:\n",
        "        total_us = max(total_us, attributed_us)\n        if unattributed_us < 0:\n",
        "tests/unit/test_torch_profiler.py::test_operators_claiming_more_than_the_kernels_leave_the_total_as_measured",
    ),
    (
        "MFU > 1 reason dropped",
        S + "profiling/efficiency.py",
        "            if isinstance(value, M.Unavailable):\n                unavailable.append",
        "            if False:\n                unavailable.append",
        "tests/integration/test_scripted_clock.py::test_mfu_above_one_keeps_its_reason",
    ),
    (
        "MFU uses the bandwidth peak",
        S + "profiling/efficiency.py",
        "mfu_v = M.mfu(fl, sec, peak_flops) if peak_flops else None",
        "mfu_v = M.mfu(fl, sec, peak_bw) if peak_flops else None",
        "tests/integration/test_scripted_clock.py::test_efficiency_from_scripted_times_and_configured_peak",
    ),
    (
        "plots: unmeasured stage drawn as 0.0 ms",
        S + "report/plots.py",
        "return st.mean if st else None",
        "return st.mean if st else 0.0",
        "tests/unit/test_plots.py",
    ),
    (
        "graph-replayed kernels attributed by kernel start (GPU time) instead of launch",
        S + "profiling/torch_profiler.py",
        'where = _innermost(host_ranges.get(launch.get("tid"), []), float(launch["ts"]))',
        'where = _innermost(host_ranges.get(launch.get("tid"), []), float(k["ts"]))',
        "tests/unit/test_torch_profiler.py::test_kernel_attribution_maps_graph_replays_to_the_launching_range",
    ),
    (
        "percentiles by nearest rank",
        S + "profiling/stats.py",
        "return [float(x) for x in np.percentile(arr, list(qs))]",
        'return [float(x) for x in np.percentile(arr, list(qs), method="nearest")]',
        "tests/unit/test_stats.py::test_percentiles_default_and_custom",
    ),
    (
        "bench: ratio hides differing token counts",
        "benchmarks/benchmath.py",
        "    if a_tokens != b_tokens:\n",
        "    if False:\n",
        "tests/unit/test_benchmath.py",
    ),
    (
        "bench: 0.0 us per decode step without events",
        "benchmarks/benchmath.py",
        '"gpu_us_per_step": None,',
        '"gpu_us_per_step": 0.0,',
        "tests/unit/test_benchmath.py::test_decode_step_profile_absent_without_events",
    ),
    (
        "bench: verdict does not name the goals' GPU",
        "benchmarks/benchmath.py",
        '    return f"{word} on {measured_gpu} (goal set for {goals.gpu})"',
        '    return f"{word} on {measured_gpu}"',
        "tests/unit/test_benchmath.py",
    ),
    (
        "bench: MFU % off by the ms->s factor",
        "benchmarks/benchmath.py",
        "return 100.0 * flops / (ms * 1e-3) / peak_flops_per_s",
        "return 100.0 * flops / ms / peak_flops_per_s",
        "tests/unit/test_benchmath.py::test_mfu_and_mbu_percent",
    ),
]
only = sys.argv[1:]  # indexes
env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
rows = []
for i, (name, f, old, new, test) in enumerate(M):
    if only and str(i) not in only:
        continue
    path = ROOT / f
    text = path.read_text()
    assert text.count(old) == 1, (name, text.count(old))
    path.write_text(text.replace(old, new))
    try:
        r = subprocess.run(
            [str(ROOT / ".venv/bin/pytest"), "-q", "-x", "-p", "no:cacheprovider", test],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        tail = [ln for ln in r.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))][:1]
        status = "CAUGHT" if r.returncode != 0 else "SURVIVED"
    finally:
        subprocess.run(["git", "checkout", "--", f], cwd=ROOT, check=True)
    rows.append((i, name, status, tail[0] if tail else r.stdout.strip().splitlines()[-1]))
    print(f"{i:2d} | {name} | {status} | {rows[-1][3]}", flush=True)
subprocess.run(["git", "status", "--short"], cwd=ROOT)
