"""On CUDA the operator table counts every kernel exactly once and its total is the trace's kernel time."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from llm_perf_opt.profiling.torch_profiler import run_profiler_pass
from tests.conftest import requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]


def test_device_operator_rows_sum_to_kernel_total(tmp_path: Path) -> None:
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)

    def work() -> torch.Tensor:
        with torch.autograd.profiler.record_function("prefill"):
            out = a
            for _ in range(5):
                out = torch.relu(out @ a)
        torch.cuda.synchronize()
        return out

    work()  # cuBLAS handle and workspace set up outside the profiled pass
    preset = {"activities": ["cpu", "cuda"], "record_shapes": False, "profile_memory": False, "with_stack": False}
    summary, _ = run_profiler_pass(work, torch.device("cuda"), preset, tmp_path, "p", 1, 1000, export_trace=True)
    assert summary.sort_key == "self_device_ms"
    rows_total = sum(op.self_device_ms or 0.0 for op in summary.operators)
    assert rows_total == pytest.approx(summary.total_self_ms, rel=1e-6)
    assert sum(op.pct_of_total for op in summary.operators) == pytest.approx(100.0, rel=1e-6)
    with gzip.open(tmp_path / "trace.json.gz", "rt") as fh:
        kernels_us = sum(e.get("dur", 0) for e in json.load(fh)["traceEvents"] if e.get("cat") == "kernel")
    rows = [(op.name, op.self_device_ms) for op in summary.operators]
    assert summary.total_self_ms == pytest.approx(kernels_us / 1e3, rel=0.02), rows
    assert not any(op.name.startswith(("nvjet", "void ", "ampere", "sm90")) for op in summary.operators)
