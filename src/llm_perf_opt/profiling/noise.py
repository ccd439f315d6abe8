"""Is this run fit for comparison?  Host load sampled during the run, spread and outliers per stage, GPU
clock throttling, and runaway pages (token cap / repetition loops) that distort decode throughput.

A shared machine can stretch one TTFT 70× (issue 14); nothing in the numbers themselves says so unless
the run measures its own conditions.  ``assess_quality`` turns them into one verdict (good / noisy) with
reasons, which report.md, metrics.json, sweep.md and ``compare`` all show.
"""

from __future__ import annotations

import itertools
import os
import resource
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from llm_perf_opt.results.types import HostLoad, MeasurementQuality, PageRecord, RunawaySummary

# Thresholds of the verdict.  A page's repeats of one stage should agree within a few percent on an idle
# machine (CUDA events: < 2 %; host clock on a quiet CPU: < 5 %); 15 % is well past both.
CV_NOISY = 0.15
# Share of decode steps above 3× their page's median step: an idle run has none; a few per thousand happen
# on any shared host (a timer tick, a page fault), 1 % means something else competed for the cores.
STEP_OUTLIER_SHARE_NOISY = 0.01
# Other processes' share of the cores this process may use: above a quarter they compete for them.
OTHER_CPU_SHARE_NOISY = 0.25
# NVML clock-event reasons that mean the clocks were lowered while measuring (not idle / app-clock settings).
THROTTLE_NOISY = {
    "sw_power_cap",
    "hw_slowdown",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
}
# The kernel's 1-minute load average: every LOAD_UPDATE_S it becomes ``L * LOAD_EXP + n * (1 - LOAD_EXP)``, ``n``
# the run queue at that tick (runnable + uninterruptible threads on every CPU of the host, ours included) and
# LOAD_EXP = 1884 / 2048 (exp(-5 / 60) in the kernel's fixed point).  Read during a run it mostly repeats the
# minute before (a ~5 s default run: all of it; round 30, a fresh clone's first run was called noisy for the
# install step before it), so the verdict judges the run queue backed out of it (:func:`run_queue_windows`), once
# the average has been seen to update at least LOAD_MIN_UPDATES times.
LOAD_UPDATE_S = 5.0
LOAD_EXP = 1884 / 2048
LOAD_MIN_UPDATES = 3
# The host speed probe: a fixed CPU workload timed in two windows, when the run starts and when it ends.  On the
# shared 2-core box a window's trials agree within ~2 % and fresh processes within ~9 % of each other, but about
# one window in ten falls in a burst of other work (everything 1.7× slower for ~50-100 ms): a window reports its
# fastest trial, and the run the faster window, so one burst does not make a slow host.  Two windows cannot say
# whether the host changed speed *during* the run, so the quality verdict does not use them; ``compare`` sets one
# run's probe against another's.
PROBE_N, PROBE_MATMULS, PROBE_TRIALS = 384, 8, 9
PROBE_WORK = f"{PROBE_MATMULS} fp32 {PROBE_N}×{PROBE_N} matmuls on every usable core, fastest of {PROBE_TRIALS}"
# Repetition loop: the last REPEAT_WINDOW tokens are one block of at most REPEAT_MAX_PERIOD tokens, repeated.
REPEAT_WINDOW = 48
REPEAT_MAX_PERIOD = 16
STAGES = ("prefill_ms", "vision_ms", "decode_ms", "tpot_ms", "preprocess_ms")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no affinity API
        return os.cpu_count() or 1


def pick_cpu_threads(setting: object, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Torch intra-op threads for a CPU run, and the sentence that says why.

    ``auto``: OMP_NUM_THREADS when the user set it, else every core in the affinity mask (a busy shared
    host is then flagged by the quality line, not silently under-used)."""
    env = dict(os.environ) if env is None else env
    cores = usable_cores()
    if setting not in (None, "auto"):
        if not isinstance(setting, int) or isinstance(setting, bool) or setting < 1:
            from llm_perf_opt.errors import ConfigError

            raise ConfigError(f"cpu_threads must be 'auto' or an integer >= 1, got {setting!r}", hint="cpu_threads=2")
        return setting, f"{setting} torch threads (cpu_threads={setting}; {cores} usable cores)"
    omp = env.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) >= 1:
        return int(omp), f"{omp} torch threads (OMP_NUM_THREADS={omp}; {cores} usable cores)"
    return cores, f"{cores} torch threads (auto: {cores} cores in this process's CPU affinity)"


# --------------------------------------------------------------------------------------- host load
def proc_stat_busy_s(cpus: set[int], clk_tck: float, path: Path = Path("/proc/stat")) -> float | None:
    """CPU seconds spent busy (everything but idle and iowait) on ``cpus`` since boot; None off Linux."""
    if not path.is_file():
        return None
    busy = 0
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        fields = [int(x) for x in rest.split()]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        guest = sum(fields[8:10]) if len(fields) > 9 else 0  # already counted in user/nice
        busy += sum(fields) - idle - guest
    return busy / clk_tck


def _own_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def host_probe_ms(timer: Callable[[], float] = time.perf_counter, trials: int = PROBE_TRIALS) -> float:
    """Fastest of ``trials`` timings (ms) of a fixed CPU workload (``PROBE_WORK``): the host's speed, independent
    of the model.

    A chain of matmuls by a matrix whose every entry is 1/N keeps every value at 1/N (no growth, no denormals),
    so each trial does the same arithmetic on the same data.  It runs on as many torch threads as the process has
    usable cores, whatever the run's own ``cpu_threads``: two runs that differ in their thread count must not
    read as two hosts of different speed (the run's setting is restored afterwards)."""
    import torch

    n = PROBE_N
    a = torch.full((n, n), 1.0 / n, dtype=torch.float32)
    times = []
    threads = torch.get_num_threads()
    torch.set_num_threads(usable_cores())
    try:
        for _ in range(trials):
            t0 = timer()
            x = a
            for _ in range(PROBE_MATMULS):
                x = x @ a
            float(x[0, 0])  # the result is used: nothing is left pending when the clock stops
            times.append(1e3 * (timer() - t0))
    finally:
        torch.set_num_threads(threads)
    return min(times)


def run_queue_windows(
    readings: Sequence[tuple[float, float]], update_s: float = LOAD_UPDATE_S
) -> list[tuple[int, float]]:
    """``(k, n)`` per window of the 1-minute load average readings ``(time s, load)``: ``k`` kernel updates of the
    average and ``n`` the run queue they saw (their mean, weighted towards the window's end).

    A window runs between two readings at which the average had just changed (each taken within a sampling
    interval of an update), so it spans whole updates: ``k = round(dt / update_s)``, and after ``k`` updates
    ``L1 = L0 * d + n * (1 - d)`` with ``d = LOAD_EXP ** k``, so ``n = (L1 - L0 * d) / (1 - d)``: what was before
    the window is backed out.  A reading's two decimals put each window's ``n`` within 0.12 of the truth (0.005
    (1 + d) / (1 - d) at ``k = 1``).  An update that leaves the two decimals unchanged just lengthens a window."""
    marks = [cur for prev, cur in itertools.pairwise(readings) if cur[1] != prev[1]]
    out: list[tuple[int, float]] = []
    for (t0, l0), (t1, l1) in itertools.pairwise(marks):
        k = round((t1 - t0) / update_s)
        if k >= 1:
            d = LOAD_EXP**k
            out.append((k, max((l1 - l0 * d) / (1 - d), 0.0)))
    return out


def _load_1m() -> float | None:
    """The 1-minute load average, or None where the host gives none (no ``getloadavg``, or it fails)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


class HostLoadSampler:
    """Samples load average and other processes' CPU share on our cores every ``interval_s`` (a thread), and
    times the host speed probe when it starts and when it stops (``probe=None``: no probe)."""

    def __init__(self, interval_s: float = 0.5, probe: Callable[[], float] | None = host_probe_ms) -> None:
        self.interval_s = interval_s
        try:
            self.cpus = set(os.sched_getaffinity(0))
        except AttributeError:
            self.cpus = set(range(os.cpu_count() or 1))
        self.clk_tck = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        self.load_start: tuple[float, float] | None = None  # (perf_counter s, load) when the run started
        self.load_readings: list[tuple[float, float]] = []  # (perf_counter s, load) at each sample
        self.other_share: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reason: str | None = None
        self.probe = probe
        self.probe_ms_start: float | None = None
        self.probe_ms_end: float | None = None

    def _sample_loop(self) -> None:
        prev = (time.perf_counter(), proc_stat_busy_s(self.cpus, self.clk_tck), _own_cpu_s())
        if prev[1] is None:
            self.reason = "no /proc/stat (not Linux): other processes' CPU share not sampled"
        while not self._stop.wait(self.interval_s):
            load = _load_1m()
            if load is not None:
                self.load_readings.append((time.perf_counter(), load))
            now = (time.perf_counter(), proc_stat_busy_s(self.cpus, self.clk_tck), _own_cpu_s())
            if now[1] is not None and prev[1] is not None:
                wall = now[0] - prev[0]
                others = (now[1] - prev[1]) - (now[2] - prev[2])
                if wall > 0:
                    self.other_share.append(min(max(others / (wall * len(self.cpus)), 0.0), 1.0))
            prev = now

    def start(self) -> HostLoadSampler:
        load = _load_1m()  # before the probe's own load: an update during the probe is a change seen
        if load is not None:
            self.load_start = (time.perf_counter(), load)
        if self.probe is not None:
            self.probe_ms_start = self.probe()
        self._thread = threading.Thread(target=self._sample_loop, name="host-load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s + 1)
        if self.probe is not None and self.probe_ms_end is None and self.probe_ms_start is not None:
            self.probe_ms_end = self.probe()

    def summary(self) -> HostLoad | None:
        readings = list(self.load_readings)  # one copy: the sampler may still be appending
        loads = [load for _, load in readings]
        if not loads and not self.other_share and self.probe_ms_start is None:
            return None
        windows = run_queue_windows([self.load_start, *readings] if self.load_start else readings)
        updates = sum(k for k, _ in windows)
        queue = (
            (sum(k * n for k, n in windows) / updates, max(n for _, n in windows))
            if updates >= LOAD_MIN_UPDATES
            else (None, None)
        )
        return HostLoad(
            usable_cores=len(self.cpus),
            samples=max(len(loads), len(self.other_share)),
            interval_s=self.interval_s,
            load_1m_mean=statistics.fmean(loads) if loads else None,
            load_1m_max=max(loads) if loads else None,
            other_cpu_share_mean=statistics.fmean(self.other_share) if self.other_share else None,
            other_cpu_share_max=max(self.other_share) if self.other_share else None,
            note=self.reason,
            probe_ms_start=self.probe_ms_start,
            probe_ms_end=self.probe_ms_end,
            probe_work=PROBE_WORK if self.probe_ms_start is not None else None,
            run_queue_mean=queue[0],
            run_queue_max=queue[1],
            run_queue_updates=updates if readings or self.load_start else None,
            load_cpus=os.cpu_count(),
        )


# --------------------------------------------------------------------------------------- spread
def _cv(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    return statistics.stdev(values) / mean if mean > 0 else None


def _outliers(values: Sequence[float]) -> int:
    med = statistics.median(values)
    return sum(1 for v in values if v > 3 * med) if med > 0 else 0


def stage_spread(ok: Sequence[PageRecord]) -> tuple[dict[str, float], dict[str, float]]:
    """Per stage: the median over pages of the CV across that page's repeats, and the share of samples above
    3× their page's median.  Grouping by page keeps page-to-page differences (geometry, length) out of the
    noise.  ``decode_step`` covers the steps of each page run (a step > 3× its run's median is an outlier)."""
    cv: dict[str, float] = {}
    share: dict[str, float] = {}
    for key in STAGES:
        groups: dict[str, list[float]] = defaultdict(list)
        for r in ok:
            v = getattr(r, key)
            if v is not None:
                groups[r.page_id].append(float(v))
        cvs = [c for c in (_cv(g) for g in groups.values()) if c is not None]
        if cvs:
            cv[key] = statistics.median(cvs)
        multi = [g for g in groups.values() if len(g) >= 3]
        if multi:
            share[key] = sum(_outliers(g) for g in multi) / sum(len(g) for g in multi)
    steps = [r.decode_step_ms for r in ok if len(r.decode_step_ms) >= 3]
    if steps:
        step_cvs = [c for c in (_cv(s) for s in steps) if c is not None]  # None: a run of 0 ms steps
        if step_cvs:
            cv["decode_step"] = statistics.median(step_cvs)
        share["decode_step"] = sum(_outliers(s) for s in steps) / sum(len(s) for s in steps)
    return cv, share


def assess_quality(
    ok: Sequence[PageRecord], host: HostLoad | None, throttle_reasons: Sequence[str] = ()
) -> MeasurementQuality:
    """good / noisy, with every reason that made it noisy (and what was not checked)."""
    cv, share = stage_spread(ok)
    reasons: list[str] = []
    unchecked: list[str] = []
    for key, value in cv.items():
        if value > CV_NOISY and key != "decode_step":  # decode steps legitimately grow with the context
            reasons.append(f"{key} varies {100 * value:.0f} % between repeats of a page (CV > {100 * CV_NOISY:.0f} %)")
    for key, value in share.items():
        limit = STEP_OUTLIER_SHARE_NOISY if key == "decode_step" else 0.0
        if value > limit:
            reasons.append(f"{100 * value:.1f} % of {key} samples are > 3× their page's median")
    if not any(k != "decode_step" for k in cv):
        unchecked.append("repeat-to-repeat spread (repeats=1: no page was measured twice)")
    if host is None:
        unchecked.append("host load (not sampled)")
    else:
        if host.other_cpu_share_mean is not None and host.other_cpu_share_mean > OTHER_CPU_SHARE_NOISY:
            reasons.append(
                f"other processes used {100 * host.other_cpu_share_mean:.0f} % of this run's "
                f"{host.usable_cores} usable cores (mean; max {100 * (host.other_cpu_share_max or 0):.0f} %)"
            )
        if host.run_queue_updates is not None:  # a record from round 30 on: judge the run queue
            cpus = host.load_cpus or host.usable_cores
            if host.run_queue_mean is None:
                unchecked.append(
                    f"run queue (the load average updated {host.run_queue_updates} time(s) between the readings "
                    f"that saw it change; {LOAD_MIN_UPDATES} are needed to back the minute before the run out)"
                )
            elif host.run_queue_mean > cpus:
                reasons.append(
                    f"run queue {host.run_queue_mean:.1f} > {cpus} host CPUs (mean of the load average's "
                    f"{host.run_queue_updates} updates during the run, the minute before backed out)"
                )
        elif host.load_1m_mean is not None and host.load_1m_mean > host.usable_cores:
            # a record written before round 30: its own criterion, the average as read during the run
            reasons.append(f"load average {host.load_1m_mean:.1f} > {host.usable_cores} usable cores")
        elif host.load_1m_mean is None:
            unchecked.append("run queue (no load average on this host)")
    bad = sorted(set(throttle_reasons) & THROTTLE_NOISY)
    if bad:
        reasons.append("GPU clocks lowered during the run: " + ", ".join(bad))
    return MeasurementQuality(
        verdict="noisy" if reasons else "good",
        reasons=reasons,
        not_checked=unchecked,
        stage_cv=cv,
        outlier_share=share,
        host=host,
        gpu_throttle_reasons=list(throttle_reasons),
    )


# --------------------------------------------------------------------------------------- runaway pages
def repetition_period(
    tokens: Sequence[int], window: int = REPEAT_WINDOW, max_period: int = REPEAT_MAX_PERIOD
) -> int | None:
    """The smallest period p <= max_period such that the last ``window`` tokens repeat with period p; None
    when the tail is not a loop (or shorter than the window).  A loop of period p repeats ≥ window/p times."""
    if len(tokens) < window:
        return None
    tail = list(tokens[-window:])
    for p in range(1, max_period + 1):
        if all(tail[i] == tail[i - p] for i in range(p, window)):
            return p
    return None


def runaway_summary(ok: Sequence[PageRecord]) -> RunawaySummary | None:
    """Pages that ran to the token cap or ended in a repetition loop: how many, their share of decode time,
    and decode throughput with and without them (Σ decode tokens ÷ Σ decode seconds)."""
    runs = [r for r in ok if r.generated_tokens is not None]
    if not runs:
        return None

    def rate(rs: Sequence[PageRecord]) -> float | None:
        secs = sum(r.decode_ms or 0.0 for r in rs) / 1e3
        toks = sum(max((r.generated_tokens or 0) - 1, 0) for r in rs if r.decode_ms)
        return toks / secs if secs > 0 else None

    runaway = [r for r in runs if r.hit_token_cap or r.repetition_period is not None]
    decode_total = sum(r.decode_ms or 0.0 for r in runs)
    calm = [r for r in runs if r not in runaway]
    return RunawaySummary(
        page_runs=len(runs),
        hit_token_cap=sum(1 for r in runs if r.hit_token_cap),
        repetition_loop=sum(1 for r in runs if r.repetition_period is not None),
        runaway=len(runaway),
        share_of_page_runs=len(runaway) / len(runs),
        share_of_decode_time=(sum(r.decode_ms or 0.0 for r in runaway) / decode_total) if decode_total > 0 else None,
        decode_tok_s_all=rate(runs),
        decode_tok_s_without_runaway=rate(calm) if calm else None,
        window_tokens=REPEAT_WINDOW,
        max_period=REPEAT_MAX_PERIOD,
    )


def gpu_throttle_reasons(nvml: object) -> tuple[str, ...]:
    """Clock-event reasons NVML saw during the run (empty without NVML: the quality line says so)."""
    from llm_perf_opt.profiling.nvml import NvmlSampler, PowerSummary

    if not isinstance(nvml, NvmlSampler) or not nvml.available:
        return ()
    summary = nvml.summary()
    return tuple(summary.throttle_reasons_seen) if isinstance(summary, PowerSummary) else ()
