"""profiling/noise.py: the quality verdict from scripted page records and host loads, /proc/stat parsing,
the CPU thread choice, the repetition-loop detector and the runaway-page summary (hand-computed oracles)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import attrs
import pytest

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.profiling.noise import (
    PROBE_WORK,
    HostLoadSampler,
    assess_quality,
    host_probe_ms,
    pick_cpu_threads,
    proc_stat_busy_s,
    repetition_period,
    run_queue_windows,
    runaway_summary,
    stage_spread,
    usable_cores,
)
from llm_perf_opt.results.types import HostLoad
from tests.unit.builders import make_page

QUIET_HOST = HostLoad(usable_cores=2, samples=10, interval_s=0.5, load_1m_mean=0.5, load_1m_max=0.8,
                      other_cpu_share_mean=0.05, other_cpu_share_max=0.1)  # fmt: skip


def _steady(n_pages: int = 2, repeats: int = 3) -> list:
    return [make_page(f"p{i}", r, prefill_ms=25.0 + 0.1 * r) for i in range(n_pages) for r in range(repeats)]


def test_steady_run_on_a_quiet_host_is_good() -> None:
    q = assess_quality(_steady(), QUIET_HOST)
    assert q.verdict == "good" and q.reasons == [] and q.not_checked == []
    # CV of [25.0, 25.1, 25.2] = 0.1 / 25.1 (sample std 0.1), the same for both pages.
    assert q.stage_cv["prefill_ms"] == pytest.approx(0.1 / 25.1)
    assert q.outlier_share["prefill_ms"] == 0.0
    assert q.line() == "**Measurement quality: good**"


def test_ttft_outlier_and_busy_host_make_it_noisy() -> None:
    pages = _steady()
    pages[1] = make_page("p0", 1, prefill_ms=882.0)  # the 70x TTFT
    busy = HostLoad(usable_cores=2, samples=10, interval_s=0.5, load_1m_mean=7.2, load_1m_max=9.0,
                    other_cpu_share_mean=0.6, other_cpu_share_max=0.9)  # fmt: skip
    q = assess_quality(pages, busy, throttle_reasons=["gpu_idle", "sw_power_cap"])
    assert q.verdict == "noisy"
    text = " | ".join(q.reasons)
    # p0's prefill repeats are [25.0, 882.0, 25.2]: one of 6 samples (both pages) is > 3x its page's median.
    assert f"{100 / 6:.1f} % of prefill_ms samples are > 3× their page's median" in text
    assert "prefill_ms varies" in text
    assert "other processes used 60 % of this run's 2 usable cores" in text
    assert "load average 7.2 > 2 usable cores" in text
    assert "GPU clocks lowered during the run: sw_power_cap" in text and "gpu_idle" not in text


def _kernel_readings(before: float, queue: list[int], phase_s: float, seconds: float) -> list[tuple[float, float]]:
    """What the sampler reads (every 0.5 s from t = 0, two decimals) of a simulated kernel load average: ``before``
    at t = 0, then updated every 5.004 s (LOAD_FREQ = 5 HZ + 1 ticks at HZ = 250) from ``phase_s`` on with the run
    queue ``queue[j]`` at update j, as the kernel does: L = L * 1884/2048 + n * (1 - 1884/2048)."""
    exp = 1884 / 2048
    updates = [phase_s + 5.004 * j for j in range(len(queue))]
    out = []
    for i in range(int(seconds / 0.5) + 1):
        t = 0.5 * i
        load = before
        for j, when in enumerate(updates):
            if when <= t:
                load = load * exp + queue[j] * (1 - exp)
        out.append((t, round(load, 2)))
    return out


def _mean_queue(windows: list[tuple[int, float]]) -> float:
    return sum(k * n for k, n in windows) / sum(k for k, _ in windows)


def test_run_queue_backs_the_minute_before_out_of_the_load_average() -> None:
    # An idle run right after an install that left the average at 6.0: the average reads 6.0 -> 2.6 over the
    # run (6 d^10), but the run queue at every update was 0.
    idle = _kernel_readings(6.0, [0] * 10, phase_s=2.3, seconds=50.0)
    assert sum(load for _, load in idle) / len(idle) > 2  # what the old criterion judged: > 2 cores, noisy
    windows = run_queue_windows(idle)
    assert sum(k for k, _ in windows) == 9  # 10 updates seen change: 9 between the first and the last
    assert max(n for _, n in windows) <= 0.12  # two decimals: within 0.005 (1 + d) / (1 - d) of 0 per window
    # Two threads busy at every update, from the same 6.0: the old criterion and this agree only by chance.
    windows = run_queue_windows(_kernel_readings(6.0, [2] * 10, phase_s=0.7, seconds=50.0))
    assert _mean_queue(windows) == pytest.approx(2.0, abs=0.05)
    # One thread for 5 updates, then three: the mean over the updates the windows span.
    windows = run_queue_windows(_kernel_readings(0.5, [1] * 5 + [3] * 5, phase_s=4.9, seconds=55.0))
    assert [k for k, _ in windows] == [1] * 9  # every update changed the two decimals
    assert [round(n) for _, n in windows] == [1] * 4 + [3] * 5  # the first update seen is the first window's start


def test_run_queue_window_spans_updates_that_left_the_two_decimals_unchanged() -> None:
    # Hand-computed: d = 1884/2048 = 0.919921875. A change seen at t = 1.0 (4.00), none at t = 6.0 (an update that
    # kept 4.00 is impossible here, but a window may span two updates), the next at t = 11.0: k = 2,
    # d^2 = 0.846256, 4.00 -> 3.54 means n = (3.54 - 4 * 0.846256) / (1 - 0.846256) = 1.0080.
    readings = [(0.0, 4.01), (1.0, 4.0), (6.0, 4.0), (11.0, 3.54), (11.5, 3.54)]
    assert run_queue_windows(readings) == [(2, pytest.approx(1.0080, abs=1e-4))]
    assert run_queue_windows(readings[:3]) == []  # one change seen: no window
    assert run_queue_windows([]) == []


def _host(**kw: object) -> HostLoad:
    return attrs.evolve(QUIET_HOST, **kw)


def test_quality_judges_the_run_queue_not_the_minute_before() -> None:
    after_install = _host(load_1m_mean=5.6, load_1m_max=6.0, run_queue_mean=0.4, run_queue_max=0.6,
                          run_queue_updates=9, load_cpus=2)  # fmt: skip
    q = assess_quality(_steady(), after_install)
    assert q.verdict == "good" and q.reasons == [] and q.not_checked == []
    crowded = _host(load_1m_mean=1.7, load_1m_max=2.3, run_queue_mean=3.3, run_queue_max=4.2,
                    run_queue_updates=9, load_cpus=2)  # fmt: skip
    q = assess_quality(_steady(), crowded)
    assert q.verdict == "noisy"
    assert q.reasons == [
        "run queue 3.3 > 2 host CPUs (mean of the load average's 9 updates during the run, the minute before "
        "backed out)"
    ]
    # the load average counts the whole host: 3.3 threads on 4 CPUs do not crowd them
    assert assess_quality(_steady(), attrs.evolve(crowded, load_cpus=4)).verdict == "good"
    short = _host(load_1m_mean=5.6, load_1m_max=6.0, run_queue_updates=1, load_cpus=2)  # a 5 s run
    q = assess_quality(_steady(), short)
    assert q.verdict == "good"
    assert q.not_checked == [
        "run queue (the load average updated 1 time(s) between the readings that saw it change; 3 are needed to "
        "back the minute before the run out)"
    ]
    q = assess_quality(_steady(), _host(load_1m_mean=None, load_1m_max=None))
    assert q.not_checked == ["run queue (no load average on this host)"]


def test_sampler_summary_carries_the_run_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = HostLoadSampler(probe=None)
    sampler.load_start, *sampler.load_readings = _kernel_readings(6.0, [1] * 4 + [2] * 4, phase_s=2.3, seconds=40.0)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    host = sampler.summary()
    assert host is not None
    assert host.run_queue_updates == 7  # 8 updates seen change, 7 between the first and the last
    assert host.run_queue_mean == pytest.approx((3 * 1 + 4 * 2) / 7, abs=0.05)  # the first update opens the windows
    assert host.run_queue_max == pytest.approx(2.0, abs=0.12)
    assert host.load_cpus == 8
    sampler.load_readings = sampler.load_readings[:16]  # 8 s: two updates seen, one window
    host = sampler.summary()
    assert host is not None and host.run_queue_updates == 1 and host.run_queue_mean is None


def test_sampler_survives_a_load_average_that_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load() -> tuple[float, float, float]:
        raise OSError("load average unobtainable")

    monkeypatch.setattr(os, "getloadavg", no_load)
    sampler = HostLoadSampler(interval_s=0.01, probe=None).start()
    time.sleep(0.05)
    sampler.stop()
    assert sampler.load_readings == [] and sampler.load_start is None
    host = sampler.summary()
    assert host is not None and host.run_queue_updates is None and host.load_1m_mean is None


def test_decode_step_outliers_counted_per_page_run() -> None:
    steps = [1.5] * 98 + [45.0, 44.0]  # the issue's ~45 ms steps among ~1.5 ms ones
    pages = [make_page("p0", 0, decode_step_ms=steps), make_page("p1", 0, decode_step_ms=[1.5] * 100)]
    _, share = stage_spread(pages)
    assert share["decode_step"] == pytest.approx(2 / 200)
    q = assess_quality(pages, QUIET_HOST)
    assert q.verdict == "good"  # 1.0 % is not above the 1 % bar
    pages[1] = make_page("p1", 0, decode_step_ms=[1.5] * 99 + [30.0])
    assert assess_quality(pages, QUIET_HOST).verdict == "noisy"  # 3 of 200 = 1.5 %


def test_single_repeat_and_no_host_sampling_are_listed_as_not_checked() -> None:
    q = assess_quality([make_page("p0"), make_page("p1")], None)
    assert q.verdict == "good"
    assert any("repeats=1" in item for item in q.not_checked) and any("host load" in item for item in q.not_checked)
    assert "(not checked: " in q.line()


def test_proc_stat_parsing_counts_busy_time_of_our_cpus(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text(
        "cpu  300 0 100 1000 50 0 0 0 0 0\n"
        "cpu0 100 10 50 500 20 5 5 0 0 0\n"
        "cpu1 200 0 50 500 30 0 0 0 0 0\n"
        "cpu2 999 0 0 0 0 0 0 0 0 0\n"
        "intr 12345\n"
    )
    # cpu0 busy = 100 + 10 + 50 + 5 + 5 = 170 ticks; cpu1 = 250 ticks; cpu2 not ours.
    assert proc_stat_busy_s({0, 1}, 100.0, stat) == pytest.approx(4.2)
    assert proc_stat_busy_s({0}, 100.0, tmp_path / "missing") is None


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="Linux only")
def test_sampler_collects_bounded_samples() -> None:
    sampler = HostLoadSampler(interval_s=0.05).start()
    time.sleep(0.3)
    sampler.stop()
    h = sampler.summary()
    assert h is not None and h.samples >= 2 and h.usable_cores == usable_cores()
    assert h.other_cpu_share_mean is not None and 0.0 <= h.other_cpu_share_mean <= 1.0


def test_cpu_threads_from_affinity_env_or_setting() -> None:
    cores = len(os.sched_getaffinity(0))
    n, why = pick_cpu_threads("auto", env={})
    assert n == cores and f"auto: {cores} cores in this process's CPU affinity" in why
    assert pick_cpu_threads("auto", env={"OMP_NUM_THREADS": "1"})[0] == 1
    n, why = pick_cpu_threads(3, env={"OMP_NUM_THREADS": "1"})
    assert n == 3 and "cpu_threads=3" in why
    with pytest.raises(ConfigError, match="cpu_threads"):
        pick_cpu_threads(0, env={})


@pytest.mark.parametrize(
    ("tokens", "period"),
    [
        ([7] * 48, 1),  # greedy decoding on random weights: one id forever
        ([1, 2, 3] * 20, 3),
        (list(range(100, 120)) + [4, 5, 6, 7] * 12, 4),  # free text, then a loop
        (list(range(60)), None),  # no repetition
        ([7] * 47, None),  # shorter than the window: cannot tell
        (list(range(17)) * 4, None),  # period 17 > 16
    ],
)
def test_repetition_period(tokens: list[int], period: int | None) -> None:
    assert repetition_period(tokens) == period


def test_runaway_summary_shares_and_throughput_without_them() -> None:
    calm = make_page("p0", generated_tokens=11, decode_ms=100.0, hit_token_cap=False)  # 10 steps in 0.1 s
    capped = make_page("p1", generated_tokens=101, decode_ms=500.0, hit_token_cap=True)  # 100 steps in 0.5 s
    looped = make_page("p2", generated_tokens=51, decode_ms=400.0, hit_token_cap=False, repetition_period=2)
    rw = runaway_summary([calm, capped, looped])
    assert rw is not None
    assert (rw.page_runs, rw.hit_token_cap, rw.repetition_loop, rw.runaway) == (3, 1, 1, 2)
    assert rw.share_of_page_runs == pytest.approx(2 / 3)
    assert rw.share_of_decode_time == pytest.approx(900 / 1000)
    assert rw.decode_tok_s_all == pytest.approx(160 / 1.0)
    assert rw.decode_tok_s_without_runaway == pytest.approx(10 / 0.1)
    assert runaway_summary([]) is None


def test_zero_time_steps_give_no_cv_instead_of_failing() -> None:
    """A clock that saw 0 ms (the nonpositive_timing guard's case) has no CV; the verdict still renders."""
    pages = [make_page("p0", 0, decode_step_ms=[0.0, 0.0, 0.0])]
    cv, share = stage_spread(pages)
    assert "decode_step" not in cv and share["decode_step"] == 0.0
    assert assess_quality(pages, QUIET_HOST).verdict == "good"


# ------------------------------------------------------------------------------------------ host speed probe
def test_probe_is_the_fastest_trial_on_every_usable_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fastest trial on the scripted timer; every trial on as many threads as usable cores, whatever the
    run set (a run with cpu_threads=1 and one with 2 are on one host), and the run's setting restored."""
    import torch

    monkeypatch.setattr("llm_perf_opt.profiling.noise.usable_cores", lambda: 3)
    ticks = iter([0.0, 0.004, 1.0, 1.003, 2.0, 2.010, 3.0, 3.005, 4.0, 4.006])  # trials 4, 3, 10, 5, 6 ms
    seen: list[int] = []

    def timer() -> float:
        seen.append(torch.get_num_threads())
        return next(ticks)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert host_probe_ms(timer=timer, trials=5) == pytest.approx(3.0)
        assert seen == [3] * 10 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_sampler_times_the_probe_at_start_and_stop() -> None:
    script = iter([10.0, 13.0])
    sampler = HostLoadSampler(interval_s=60.0, probe=lambda: next(script)).start()
    sampler.stop()
    h = sampler.summary()  # no load sample in so short a run, but the probes make a host record
    assert h is not None and h.samples == 0
    assert (h.probe_ms_start, h.probe_ms_end, h.probe_ms) == (10.0, 13.0, 10.0)  # the run: its faster window
    assert h.probe_work == PROBE_WORK
    assert HostLoadSampler(interval_s=60.0, probe=None).start().summary() is None


def test_a_slow_probe_window_alone_does_not_make_a_run_noisy() -> None:
    """Two windows cannot tell a burst of other work from a host that changed speed: no verdict from them."""
    host = attrs.evolve(QUIET_HOST, probe_ms_start=10.0, probe_ms_end=17.0)
    assert assess_quality(_steady(), host).verdict == "good"
