"""operators.md / report.md: the kernel table, the per-stage device time and the attributed share (issue 14)."""

from __future__ import annotations

import attrs

from llm_perf_opt.profiling.torch_profiler import kernel_attribution
from llm_perf_opt.report.markdown import render_report
from llm_perf_opt.report.operators import render_operators
from tests.unit.builders import make_profile, make_summary
from tests.unit.profiling.test_torch_profiler import _trace_with_graph_launch


def test_operators_md_keeps_the_operator_table_and_gains_kernels() -> None:
    att = kernel_attribution(_trace_with_graph_launch(), top_k=10)
    prof = attrs.evolve(make_profile(), sort_key="self_device_ms", kernels=att, range_device_ms={"prefill": 0.5})
    text = render_operators(make_summary(profile=prof))
    assert "`aten::mm`" in text  # the host-operator table stays
    assert "## Device time by stage" in text and "**90.00 %** of the device time is attributed" in text
    assert "1 graph launches" in text
    assert "| decode | 0.080 | 4 | 0.030 | 40.00 |" in text  # 80 of 200 us, 30 us graph-replayed
    assert "| 1 | `lm_gemm` | 1 | 0.060 | 60.00 | 30.00 |" in text
    assert "| decode | `moe_up` | 2 | 0.020 | 10.00 | 25.00 |" in text  # largest kernels of each stage
    assert "| prefill | 70.000 | 0.500 |" in text  # host ms next to the GPU span
    report = render_report(make_summary(profile=prof))
    assert "Kernel attribution: **90.00 %**" in report and "decode 40.0 %" in report
    assert "overlapped the work before it" not in text  # no overlap in this trace: no sentence about it


def test_operators_md_says_how_much_overlap_was_not_counted() -> None:
    """Kernels overlapping their predecessor on a stream (dependent launches): the uncounted time is stated."""
    att = attrs.evolve(kernel_attribution(_trace_with_graph_launch(), top_k=10), stream_overlap_ms=1.25)
    prof = attrs.evolve(make_profile(), sort_key="self_device_ms", kernels=att)
    text = render_operators(make_summary(profile=prof))
    assert "1.250 ms of kernel time overlapped the work before it on its stream" in text


def test_cpu_profile_says_why_there_is_no_kernel_table() -> None:
    prof = attrs.evolve(make_profile(), kernels_reason="no device kernels: CPU run")
    text = render_operators(make_summary(profile=prof))
    assert "Not available: no device kernels: CPU run." in text
    assert "| decode | 25.000 | n/a |" in text  # no GPU span on the CPU: n/a, never 0


def test_total_note_is_shown() -> None:
    prof = attrs.evolve(make_profile(), total_note="host operators claim 0.020 ms more device time")
    assert "Note: host operators claim 0.020 ms more device time." in render_operators(make_summary(profile=prof))
