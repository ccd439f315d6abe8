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


# ------------------------------------------------------------ the real page run under the profiler (issue 15, 14)

STAGE_RANGES = ("prefill", "decode", "sam", "clip", "projector")


@pytest.fixture(scope="module", params=[False, True], ids=["eager", "fast"])
def profiled_page(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[object, object, bool, Path]:
    """One full-size page (dummy weights, bf16, Gundam) through the session under the profiler pass, after a
    warm-up run of the same page (the fast path captures its graphs there, as stage1's warm-up does)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import llm_perf_opt.runners.llm_profile_runner  # noqa: F401  (registers the run_suffix resolver)
    from llm_perf_opt.data.datasets import Page
    from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession
    from llm_perf_opt.runners.settings import load_settings
    from tests.conftest import CONF
    from tests.integration.conftest import ROOT

    out = tmp_path_factory.mktemp("profiled")
    overrides = ["device=cuda", "model/deepseek_ocr/arch=deepseek_ocr.dummy", f"infer.fast.enabled={request.param}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        composed = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    tree = OmegaConf.to_container(composed, resolve=False)
    assert isinstance(tree, dict)
    tree.pop("hydra")
    tree["output"]["dir"] = str(out)
    cfg = OmegaConf.create(tree)
    session = DeepSeekOCRSession.load(load_settings(cfg), ROOT)
    page = Page(page_id="synthetic-1224x1584-0", synthetic_size=(1224, 1584), seed=0)
    try:
        session.run(page, 32, repeat=0, ignore_eos=True)
        preset = {"activities": ["cpu", "cuda"], "record_shapes": False, "profile_memory": False, "with_stack": False}
        summary, result = run_profiler_pass(
            lambda: session.run(page, 32, repeat=-1, ignore_eos=True), session.device, preset, out, page.page_id, 32,
            30, export_trace=True,
        )  # fmt: skip
    finally:
        session.close()
    return summary, result, bool(request.param), out


def _range_edges(trace: Path, name: str, n: int = 4) -> str:
    """Where a range's GPU span comes from, for a failure message: its device-side mirrors (start, duration, stream,
    host occurrence) and the first and last ``n`` device events inside them (µs from the first mirror's start,
    duration, stream, name).
    Round 22: the fast prefill's span read ~1.55 ms over its CUDA events in two device calls and agreed in two
    others (one of them a fresh machine).  Round 23 (no GPU): Kineto writes one mirror per range *and stream*, and
    the span added the mirrors' lengths, so work on a second stream was counted twice; an occurrence's span is now
    the union of its mirrors (``torch_profiler._range_occurrences``).  The mirrors listed here show whether a
    failure still has another cause."""
    with gzip.open(trace, "rt") as fh:
        events = json.load(fh)["traceEvents"]
    mirrors = sorted(
        (
            (float(e["ts"]), float(e.get("dur", 0)), e.get("tid"), (e.get("args") or {}).get("External id"))
            for e in events
            if e.get("cat") == "gpu_user_annotation" and e.get("name") == name
        ),
        key=lambda m: m[0],  # by time only: stream ids need not compare
    )
    if not mirrors:
        return f"no device-side mirror of {name!r} in the trace"
    t0 = mirrors[0][0]
    inside = sorted(
        (
            (float(e["ts"]) - t0, float(e.get("dur", 0)), e.get("tid"), str(e.get("name"))[:60])
            for e in events
            if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
            and any(s <= float(e["ts"]) <= s + d for s, d, *_ in mirrors)
        ),
        key=lambda r: (r[0], r[1]),  # by time only: stream ids need not compare
    )
    rows = [*inside[:n], (float("nan"), 0.0, "...", "..."), *inside[-n:]] if len(inside) > 2 * n else inside
    listed = [f"{s - t0:.1f}+{d:.1f} us stream {tid} occurrence {occ}" for s, d, tid, occ in mirrors]
    return f"mirrors {listed}; edges " + "; ".join(
        f"{ts:.1f}+{dur:.1f} us stream {tid} {nm}" for ts, dur, tid, nm in rows
    )


def test_every_range_matches_the_cuda_event_stage_times(profiled_page: tuple[object, object, bool, Path]) -> None:
    """Host range times are real (the committed runs showed 0 ms: a device mirror overwrote the host entry), and
    each range's GPU span agrees with the CUDA-event time of the same stage within 5 % (+0.5 ms for ranges shorter
    than a launch: the events start when the host enqueues, the span at the range's first kernel)."""
    summary, result, _, out = profiled_page
    rec = result.record  # type: ignore[attr-defined]
    events = {"prefill": rec.prefill_ms, "decode": rec.decode_ms, "sam": rec.sam_ms, "clip": rec.clip_ms,
              "projector": rec.projector_ms}  # fmt: skip
    assert set(summary.range_ms) >= {"preprocess", *STAGE_RANGES}, summary.range_ms  # type: ignore[attr-defined]
    for name in ("preprocess", *STAGE_RANGES):
        assert summary.range_ms[name] > 0, (name, summary.range_ms)  # type: ignore[attr-defined]
    spans = summary.range_device_ms  # type: ignore[attr-defined]
    assert set(spans) >= set(STAGE_RANGES), spans
    for name in STAGE_RANGES:
        ev = events[name]
        assert ev is not None and ev > 0, (name, events)
        assert abs(spans[name] - ev) <= 0.05 * ev + 0.5, (
            name,
            spans[name],
            ev,
            _range_edges(out / "trace.json.gz", name),
        )
    # the host waits for the GPU at the end of prefill (first token) and of every decode step
    for name in ("prefill", "decode"):
        assert summary.range_ms[name] >= 0.95 * events[name], (name, summary.range_ms[name], events[name])  # type: ignore[attr-defined]


def test_kernels_attributed_to_a_stage_on_eager_and_fast(profiled_page: tuple[object, object, bool, Path]) -> None:
    """≥ 95 % of the pass's device time lands in a stage and a kernel name, CUDA-graph replays included."""
    summary, _, fast, _ = profiled_page
    att = summary.kernels  # type: ignore[attr-defined]
    assert att is not None, summary.kernels_reason  # type: ignore[attr-defined]
    assert att.attributed_pct >= 95.0, att.stages
    stages = {s.stage: s for s in att.stages}
    assert {"sam", "clip", "projector", "prefill_lm", "decode"} <= set(stages), stages
    assert sum(s.device_ms for s in att.stages) == pytest.approx(att.device_total_ms, rel=1e-9)
    if fast:  # the fast path's decode and vision kernels come from graph replays: attributed all the same
        assert att.graph_launches > 0 and stages["decode"].graph_replayed_ms > 0.9 * stages["decode"].device_ms
    # the decode stage's kernels fit inside the decode range's GPU span
    assert stages["decode"].device_ms <= summary.range_device_ms["decode"] * 1.01  # type: ignore[attr-defined]
