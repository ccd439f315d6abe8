"""profiling/torch_profiler.py on CPU: the operator table's total is the profiler's own total."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from omegaconf import OmegaConf

from llm_perf_opt.profiling import torch_profiler
from llm_perf_opt.profiling.torch_profiler import (
    RANGE_NAMES,
    operator_table,
    run_profiler_pass,
    stream_busy_us,
    stream_shares_us,
)
from tests.unit.builders import make_profile

PRESET = OmegaConf.create({"activities": ["cpu"], "record_shapes": False, "profile_memory": False, "with_stack": False})


def _work() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 64, generator=g)
    b = torch.randn(64, 64, generator=g)
    with torch.profiler.record_function("prefill"):
        c = a @ b
        c = c @ b
        c = torch.relu(c + a)
    with torch.profiler.record_function("decode"):
        for _ in range(3):
            c = c @ a
    return c.sum()


@pytest.fixture
def profiled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run the pass once, capturing the profiler object the module created."""
    captured: list[Any] = []
    real_profile = torch_profiler.profile

    def spy(*args: Any, **kwargs: Any) -> Any:
        prof = real_profile(*args, **kwargs)
        captured.append(prof)
        return prof

    monkeypatch.setattr(torch_profiler, "profile", spy)
    summary, result = run_profiler_pass(
        _work, torch.device("cpu"), PRESET, tmp_path, page_id="synthetic-1", max_new_tokens=4, top_k=3,
        export_trace=True,
    )  # fmt: skip
    assert len(captured) == 1
    return {"summary": summary, "result": result, "prof": captured[0], "dir": tmp_path}


def test_returns_fn_result(profiled: dict[str, Any]) -> None:
    expected = _work()
    assert torch.equal(profiled["result"], expected)


def test_total_equals_profiler_total(profiled: dict[str, Any]) -> None:
    s, prof = profiled["summary"], profiled["prof"]
    events = [e for e in prof.key_averages() if e.key not in RANGE_NAMES and not e.key.startswith("ProfilerStep")]
    own_total_ms = sum(float(e.self_cpu_time_total) for e in events) / 1e3
    assert own_total_ms > 0
    assert s.total_self_ms == pytest.approx(own_total_ms, rel=1e-6)


def test_table_top_k_sorted_and_percentages(profiled: dict[str, Any]) -> None:
    s = profiled["summary"]
    assert s.sort_key == "self_cpu_ms"
    assert s.page_id == "synthetic-1" and s.max_new_tokens == 4
    assert 1 <= len(s.operators) <= 3
    names = [op.name for op in s.operators]
    assert "aten::mm" in names or "aten::matmul" in names
    assert not set(names) & set(RANGE_NAMES)
    selfs = [op.self_cpu_ms for op in s.operators]
    assert selfs == sorted(selfs, reverse=True)
    for op in s.operators:
        assert op.self_device_ms is None and op.total_device_ms is None
        assert op.pct_of_total == pytest.approx(100.0 * op.self_cpu_ms / s.total_self_ms, rel=1e-6)
        assert op.total_cpu_ms >= op.self_cpu_ms
    assert 0 < sum(op.pct_of_total for op in s.operators) <= 100.0 + 1e-9


def test_percentages_of_all_operators_sum_to_at_most_100(profiled: dict[str, Any]) -> None:
    rows, total_ms, _, note = operator_table(profiled["prof"], on_device=False, top_k=10_000)
    assert note is None
    assert total_ms == pytest.approx(profiled["summary"].total_self_ms, rel=1e-9)
    total_pct = sum(r.pct_of_total for r in rows)
    assert total_pct <= 100.0 + 1e-6
    assert total_pct == pytest.approx(100.0, abs=1e-6)  # every operator listed: the whole total is covered
    assert sum(r.self_cpu_ms for r in rows) == pytest.approx(total_ms, rel=1e-6)


def test_range_times(profiled: dict[str, Any]) -> None:
    s = profiled["summary"]
    assert set(s.range_ms) == {"prefill", "decode"}
    assert all(v > 0 for v in s.range_ms.values())
    assert s.range_device_ms == {}  # no device timeline on CPU
    assert s.kernels is None and s.kernels_reason is not None and "CPU" in s.kernels_reason


def test_trace_written_as_valid_gzip_json(profiled: dict[str, Any]) -> None:
    s, out = profiled["summary"], profiled["dir"]
    assert s.trace_file == "trace.json.gz"
    assert not (out / "trace.json").exists()  # the raw trace is removed after compressing
    with gzip.open(out / "trace.json.gz", "rt") as fh:
        trace = json.load(fh)
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"prefill", "decode"} <= names
    assert any(str(n).startswith("aten::") for n in names)


def test_no_trace_when_export_disabled(tmp_path: Path) -> None:
    s, _ = run_profiler_pass(lambda: torch.ones(2) @ torch.ones(2), torch.device("cpu"), PRESET, tmp_path, "p", 1, 5,
                             export_trace=False)  # fmt: skip
    assert s.trace_file is None
    assert list(tmp_path.iterdir()) == []
    assert s.total_self_ms > 0


def test_gpu_ranges_span_and_busy_from_synthetic_trace() -> None:
    trace = {
        "traceEvents": [
            {"cat": "gpu_user_annotation", "name": "prefill", "ts": 100, "dur": 1000},
            {"cat": "gpu_user_annotation", "name": "decode", "ts": 2000, "dur": 500},
            {"cat": "gpu_user_annotation", "name": "other", "ts": 0, "dur": 99999},
            {"cat": "kernel", "name": "k1", "ts": 150, "dur": 200},
            {"cat": "kernel", "name": "k2", "ts": 900, "dur": 150},  # ends at 1050 ≤ 1100: inside
            {"cat": "kernel", "name": "k3", "ts": 1050, "dur": 100},  # ends at 1150: straddles the end, excluded
            {"cat": "kernel", "name": "k4", "ts": 2100, "dur": 300},
        ]
    }
    out = torch_profiler.trace_range_spans_ms(trace["traceEvents"])
    assert set(out) == {"prefill", "decode"}
    assert out["prefill"] == (pytest.approx(1.0), pytest.approx(0.35))
    assert out["decode"] == (pytest.approx(0.5), pytest.approx(0.3))


def test_device_table_leaves_out_profiler_internal_events() -> None:
    """On CUDA the rows are host operators; CUPTI's 'Activity Buffer Request' may carry the device time of
    kernels that ran while it was open (torch 2.11): it must not be a row nor count those kernels twice."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def evt(key: str, dev: DeviceType, self_dev: float, count: int = 1) -> SimpleNamespace:
        return SimpleNamespace(key=key, device_type=dev, count=count, self_device_time_total=self_dev,
                               device_time_total=self_dev, self_cpu_time_total=5.0, cpu_time_total=5.0)  # fmt: skip

    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    events = [
        evt("prefill", cpu, 0.0),
        evt("aten::mm", cpu, 119.7, 5),
        evt("aten::clamp_min", cpu, 21.8, 5),
        evt("Activity Buffer Request", cpu, 24.5),
        evt("prefill", cuda, 509.9),  # our range mirrored on the GPU timeline
        evt("nvjet_sm90_tst_256x128", cuda, 119.7, 5),
        evt("vectorized_elementwise_kernel", cuda, 21.8, 5),
    ]
    prof = SimpleNamespace(key_averages=lambda: events)
    rows, total_ms, sort_key, note = operator_table(prof, on_device=True, top_k=10)
    assert sort_key == "self_device_ms" and note is None
    assert [r.name for r in rows] == ["aten::mm", "aten::clamp_min"]
    assert total_ms == pytest.approx((119.7 + 21.8) / 1e3)
    assert sum(r.pct_of_total for r in rows) == pytest.approx(100.0)


# ------------------------------------------------------------------ synthetic CUDA events (no GPU needed)


def _evt(key: str, dev: Any, self_dev: float, cpu_total: float = 5.0, count: int = 1) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(key=key, device_type=dev, count=count, self_device_time_total=self_dev,
                           device_time_total=self_dev, self_cpu_time_total=cpu_total,
                           cpu_time_total=cpu_total)  # fmt: skip


@pytest.mark.parametrize("device_mirror_last", [True, False])
def test_range_times_keep_the_host_entry_over_its_device_mirror(device_mirror_last: bool) -> None:
    """On CUDA key_averages() lists each range twice: the host entry (its wall time) and its mirror on the GPU
    timeline with zero host time.  The committed H100/H200 runs kept the last one and reported 0 ms."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    host = [
        _evt("prefill", cpu, 0.0, cpu_total=380_013.0),
        _evt("decode", cpu, 0.0, cpu_total=1_132_423.0),
        _evt("sam", cpu, 0.0, cpu_total=74_184.0),
        _evt("aten::mm", cpu, 53_447.0, cpu_total=276_489.0),
    ]
    # the mirrors carry no host time of their own (0 in the committed runs; 7 us here, so that counting a
    # mirror at all, not only letting it overwrite the host entry, shows)
    mirrors = [
        _evt("prefill", cuda, 378_843.0, cpu_total=7.0),
        _evt("decode", cuda, 1_132_093.0, cpu_total=7.0),
        _evt("sam", cuda, 73_172.0, cpu_total=7.0),
    ]
    events = host + mirrors if device_mirror_last else mirrors + host
    out = torch_profiler.range_times_ms(SimpleNamespace(key_averages=lambda: events))
    assert out == {"prefill": pytest.approx(380.013), "decode": pytest.approx(1132.423), "sam": pytest.approx(74.184)}


def test_operators_claiming_more_than_the_kernels_leave_the_total_as_measured() -> None:
    """The total is the kernels' sum; operators claiming more is stated, never folded into a raised total."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    events = [_evt("aten::copy_", cpu, 60.0), _evt("aten::mm", cpu, 50.0),
              _evt("Memcpy HtoD", cuda, 40.0), _evt("nvjet_gemm", cuda, 50.0)]  # fmt: skip
    rows, total_ms, _, note = operator_table(SimpleNamespace(key_averages=lambda: events), on_device=True, top_k=10)
    assert total_ms == pytest.approx(0.090)  # 40 + 50 us of kernels, not the operators' 110 us
    assert note is not None and "0.020 ms more" in note and "more than 100 %" in note
    assert [r.name for r in rows] == ["aten::copy_", "aten::mm"]  # no negative "unattributed" row
    assert rows[0].pct_of_total == pytest.approx(100 * 60 / 90)


def _trace_with_graph_launch() -> list[dict[str, Any]]:
    """A hand-made CUDA trace: eager kernels in sam and prefill, one CUDA-graph replay (3 kernels sharing the
    correlation id of their cudaGraphLaunch) inside decode, a kernel launched outside every range, and a kernel
    with no launch event (falls back to the GPU-timeline range it ran in)."""
    host, gpu = 100, 7

    def ann(name: str, ts: float, dur: float, cat: str = "user_annotation") -> dict[str, Any]:
        tid = host if cat == "user_annotation" else gpu
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid}

    def launch(name: str, ts: float, corr: int) -> dict[str, Any]:
        return {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": ts, "dur": 2, "tid": host,
                "args": {"correlation": corr}}  # fmt: skip

    def kernel(name: str, ts: float, dur: float, corr: int, cat: str = "kernel") -> dict[str, Any]:
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": gpu, "args": {"correlation": corr}}

    return [
        ann("prefill", 1000, 500),
        ann("sam", 1010, 100),  # nested in prefill
        ann("decode", 2000, 400),
        ann("decode", 5000, 1000, cat="gpu_user_annotation"),
        launch("cudaLaunchKernel", 1020, 1),  # in sam
        launch("cudaLaunchKernel", 1200, 2),  # in prefill, outside sam: the LM part
        launch("cudaGraphLaunch", 2100, 3),  # in decode: every kernel of the replay carries correlation 3
        launch("cudaMemcpyAsync", 3000, 4),  # after every range
        kernel("sam_gemm", 1030, 40, 1),
        kernel("lm_gemm", 1300, 60, 2),
        # the GPU runs the replay after the host has left the decode range (it lags the host): only the launch
        # says where these kernels belong
        kernel("moe_up", 2600, 10, 3),
        kernel("moe_down", 2610, 10, 3),
        kernel("moe_up", 2620, 10, 3),
        kernel("Memcpy DtoH", 3010, 20, 4, cat="gpu_memcpy"),
        kernel("orphan", 5100, 50, 99),  # no launch event: inside the GPU-side decode range
        {"ph": "f", "cat": "ac2g", "name": "ac2g", "id": 3, "ts": 2200},  # flow events are not kernels
    ]


def test_kernel_attribution_maps_graph_replays_to_the_launching_range() -> None:
    att = torch_profiler.kernel_attribution(_trace_with_graph_launch(), top_k=10)
    assert att is not None
    total_us = 40 + 60 + 30 + 20 + 50
    assert att.device_total_ms == pytest.approx(total_us / 1e3)
    assert att.graph_launches == 1 and att.n_kernel_names == 6
    stages = {s.stage: s for s in att.stages}
    assert set(stages) == {"sam", "prefill_lm", "decode", torch_profiler.OUTSIDE_STAGES}
    assert stages["sam"].device_ms == pytest.approx(0.040) and stages["sam"].calls == 1
    assert stages["prefill_lm"].device_ms == pytest.approx(0.060)
    assert stages["decode"].device_ms == pytest.approx(0.080) and stages["decode"].calls == 4
    assert stages["decode"].graph_replayed_ms == pytest.approx(0.030)
    assert stages[torch_profiler.OUTSIDE_STAGES].device_ms == pytest.approx(0.020)
    assert att.attributed_pct == pytest.approx(100 * 180 / 200)
    assert [s.stage for s in att.stages] == ["sam", "prefill_lm", "decode", torch_profiler.OUTSIDE_STAGES]
    kernels = {k.name: k for k in att.kernels}
    assert kernels["moe_up"].calls == 2 and kernels["moe_up"].device_ms == pytest.approx(0.020)
    assert kernels["moe_up"].mean_device_us == pytest.approx(10.0)
    assert kernels["lm_gemm"].pct_of_device == pytest.approx(30.0)
    assert [k.name for k in att.kernels][:2] == ["lm_gemm", "orphan"]  # sorted by device time
    top = stages["decode"].top_kernels  # the stage's own kernels, shares of the stage's time
    assert [(k.name, k.calls) for k in top] == [("orphan", 1), ("moe_up", 2), ("moe_down", 1)]
    assert [k.pct_of_device for k in top] == [pytest.approx(62.5), pytest.approx(25.0), pytest.approx(12.5)]
    assert len(torch_profiler.kernel_attribution(_trace_with_graph_launch(), top_k=2).kernels) == 2  # type: ignore[union-attr]


def test_kernel_attribution_absent_without_kernels() -> None:
    assert torch_profiler.kernel_attribution([{"ph": "X", "cat": "cpu_op", "name": "aten::mm"}], 5) is None


def test_range_device_spans_from_the_trace() -> None:
    events = [
        {"cat": "gpu_user_annotation", "name": "sam", "ts": 0, "dur": 1500},
        {"cat": "gpu_user_annotation", "name": "sam", "ts": 5000, "dur": 500},
        {"cat": "user_annotation", "name": "sam", "ts": 0, "dur": 99999},  # host side: not a GPU span
        {"cat": "gpu_user_annotation", "name": "decode", "ts": 9000, "dur": 250},
    ]
    spans = torch_profiler.trace_range_spans_ms(events)
    assert spans == {"sam": (pytest.approx(2.0), 0.0), "decode": (pytest.approx(0.25), 0.0)}  # no kernel: not busy


def test_a_range_on_two_streams_spans_the_union_of_its_mirrors() -> None:
    """Kineto writes one device-side mirror per host occurrence (its ``External id``) and *stream*: the fast
    prefill's side-stream work gave a second, overlapping "prefill" mirror, and adding the two read 17.7 ms against
    16.2 ms of CUDA events (round 22).  One occurrence spans the union of its mirrors; occurrences add up, as a
    CUDA-event pair around each of them does, even where two run at once (SAM on two view chains, each timed by its
    own hook).  Every figure below by hand."""

    def mirror(name: str, ts: int, dur: int, tid: int, occurrence: int | None) -> dict[str, object]:
        args = {} if occurrence is None else {"args": {"External id": occurrence}}
        return {"cat": "gpu_user_annotation", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid, **args}

    events = [
        # prefill (one occurrence) on the main stream (tid 7) and, inside it, 1.55 ms on a side stream (tid 9)
        mirror("prefill", 0, 16_000, 7, 1),
        mirror("prefill", 2_000, 1_550, 9, 1),
        # SAM on the tiles' chain (stream 7, 0-1000) and on the global view's (stream 9, 800-1500): two occurrences
        mirror("sam", 0, 1_000, 7, 10),
        mirror("sam", 800, 700, 9, 11),
        # mirrors without an External id: each an occurrence of its own
        mirror("decode", 9_000, 250, 7, None),
        mirror("decode", 9_100, 100, 9, None),
        # two kernels at once on the two streams: busy 100-400 = 300 µs, not 200 + 200
        {"cat": "kernel", "name": "a", "ts": 100, "dur": 200, "pid": 0, "tid": 7},
        {"cat": "kernel", "name": "b", "ts": 200, "dur": 200, "pid": 0, "tid": 9},
        {"cat": "kernel", "name": "c", "ts": 3_100, "dur": 100, "pid": 0, "tid": 7},
    ]
    out = torch_profiler.trace_range_spans_ms(events)
    assert out["decode"] == (pytest.approx(0.35), 0.0)  # two mirrors without an id: two occurrences, no kernel
    assert out["prefill"] == (pytest.approx(16.0), pytest.approx(0.4))  # a-b's union 0.3 + c 0.1
    assert out["sam"] == (pytest.approx(1.7), pytest.approx(0.3))  # a-b inside the tiles' chain, nothing in 800-1500


def test_overlapping_kernels_on_a_stream_count_from_the_end_of_the_one_before() -> None:
    """Programmatic dependent launches: a kernel's programs start (and wait) while the one before it on the
    stream finishes.  Hand-made trace on stream 7: a [1000, 1050), b [1040, 1070) (10 µs inside a), c [1065, 1070)
    (wholly inside b); on stream 8 a concurrent d [1000, 1030).  Busy shares: a 50, b 20, c 0, d 30 (another
    stream is counted in full), so the decode stage has 100 µs and the overlap is 10 + 5 = 15 µs."""
    host = 100

    def kernel(name: str, ts: float, dur: float, stream: int) -> dict[str, Any]:
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": stream,
                "args": {"correlation": 1}}  # fmt: skip

    launched = {"correlation": 1}
    trace = [
        {"ph": "X", "cat": "user_annotation", "name": "decode", "ts": 900, "dur": 50, "tid": host},
        {
            "ph": "X",
            "cat": "cuda_runtime",
            "name": "cudaGraphLaunch",
            "ts": 910,
            "dur": 2,
            "tid": host,
            "args": launched,
        },
        kernel("a", 1000, 50, 7),
        kernel("b", 1040, 30, 7),
        kernel("c", 1065, 5, 7),
        kernel("d", 1000, 30, 8),
    ]
    att = torch_profiler.kernel_attribution(trace, top_k=10)
    assert att is not None
    rows = {r.name: r.device_ms * 1e3 for r in att.kernels}
    assert rows == pytest.approx({"a": 50.0, "b": 20.0, "c": 0.0, "d": 30.0})
    (decode,) = att.stages
    assert decode.stage == "decode" and decode.device_ms == pytest.approx(0.100)
    assert att.device_total_ms == pytest.approx(0.100) and att.stream_overlap_ms == pytest.approx(0.015)
    # without overlap nothing is cut: the graph-launch trace's kernels keep their durations
    plain = torch_profiler.kernel_attribution(_trace_with_graph_launch(), top_k=10)
    assert plain is not None and plain.stream_overlap_ms == 0.0


def test_stream_shares_split_each_stream_into_busy_and_idle_time() -> None:
    """By hand, stream (0, 7): a 0..10; b 8..15 starts inside a (a dependent launch): busy 15 - 10 = 5, idle 0;
    c 20..25 after the frontier 15: busy 5, idle 5.  Stream (0, 9): its first event has no idle time.  Busy is
    stream_busy_us's share."""
    a = {"ts": 0.0, "dur": 10.0, "pid": 0, "tid": 7}
    b = {"ts": 8.0, "dur": 7.0, "pid": 0, "tid": 7}
    c = {"ts": 20.0, "dur": 5.0, "pid": 0, "tid": 7}
    x = {"ts": 30.0, "dur": 4.0, "pid": 0, "tid": 9}
    shares = stream_shares_us([c, a, x, b])  # any order: each stream is walked by start time
    assert shares == {id(a): (10.0, 0.0), id(b): (5.0, 0.0), id(c): (5.0, 5.0), id(x): (4.0, 0.0)}
    assert stream_busy_us([c, a, x, b]) == {id(a): 10.0, id(b): 5.0, id(c): 5.0, id(x): 4.0}


def test_range_checks_come_from_the_pass_without_a_trace_file() -> None:
    """The cross-check reads the spans the pass computed from its events in memory: a CUDA pass run with
    ``export_trace=false`` (no trace file) still gets it, and nothing re-reads a file.  Hand figures: prefill events
    10.5 ms over a 10 ms span → +5 %; decode 4 ms over 5 ms → -20 %, busy 4.5 of it; SAM (no event) is left out;
    CLIP has an event but no span, so it is left out rather than divided by zero."""
    from types import SimpleNamespace

    from llm_perf_opt.runners.phases import _with_range_checks

    record = SimpleNamespace(prefill_ms=10.5, decode_ms=4.0, sam_ms=None, clip_ms=2.0, projector_ms=None)
    summary = attrs.evolve(
        make_profile(),
        sort_key="self_device_ms",
        trace_file=None,
        range_device_ms={"prefill": 10.0, "decode": 5.0, "sam": 3.0},
        range_busy_ms={"prefill": 9.0, "decode": 4.5, "sam": 2.0},
    )
    checks = {c.name: c for c in _with_range_checks(summary, SimpleNamespace(record=record)).range_checks}  # type: ignore[arg-type]
    assert set(checks) == {"prefill", "decode"}
    assert (checks["prefill"].gpu_span_ms, checks["prefill"].kernel_busy_ms) == (10.0, 9.0)
    assert checks["prefill"].rel_diff == pytest.approx(0.05)
    assert (checks["decode"].kernel_busy_ms, checks["decode"].rel_diff) == (4.5, pytest.approx(-0.2))
    cpu = attrs.evolve(summary, sort_key="self_cpu_ms")  # no device timeline: no check
    assert _with_range_checks(cpu, SimpleNamespace(record=record)).range_checks == []  # type: ignore[arg-type]
