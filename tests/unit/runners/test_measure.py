"""runners/measure.py: the batched-throughput statistics the report formats (computed here, not in report/)."""

from __future__ import annotations

import pytest

from llm_perf_opt.results.types import BatchRecord
from llm_perf_opt.runners.measure import batch_aggregates


def _batch(pages_per_s: float | None, tok_s: float | None, tpot_ms: list[float], prefill_ms: float) -> BatchRecord:
    return BatchRecord(
        repeat=0,
        page_ids=["a", "b"],
        batch=2,
        padded_prompt_tokens=40,
        output_tokens=16,
        vision_ms=prefill_ms / 2,
        prefill_ms=prefill_ms,
        decode_ms=50.0,
        pages_per_s=pages_per_s,
        output_tok_s=tok_s,
        tpot_ms=tpot_ms,
    )


def test_statistics_over_batches_and_tpot_over_sequences() -> None:
    out = batch_aggregates([_batch(2.0, 100.0, [1.0, 2.0], 10.0), _batch(4.0, None, [3.0, 4.0], 30.0)])
    assert out["pages_per_s"].n == 2 and out["pages_per_s"].mean == pytest.approx(3.0)
    assert out["output_tok_s"].n == 1 and out["output_tok_s"].mean == pytest.approx(100.0)  # None is not a sample
    assert out["prefill_ms"].mean == pytest.approx(20.0) and out["vision_ms"].max == pytest.approx(15.0)
    assert out["tpot_ms"].n == 4 and out["tpot_ms"].mean == pytest.approx(2.5)  # every sequence of every batch


def test_no_batches_no_statistics() -> None:
    assert batch_aggregates([]) == {}


def test_failed_graph_captures_become_report_notes() -> None:
    """Each part of the fast path whose capture failed gets one note naming it and the error; none without the
    fast path or without failures (the fast model's record is scripted here)."""
    from types import SimpleNamespace

    from llm_perf_opt.runners.measure import graph_capture_notes

    errors = {"decode step": "RuntimeError: operation not permitted when stream is capturing"}
    fast = SimpleNamespace(fast=object(), fast_model=SimpleNamespace(graph_capture_errors=lambda: errors))
    (note,) = graph_capture_notes(fast)  # type: ignore[arg-type]
    assert note.startswith("CUDA-graph capture failed for the decode step (RuntimeError: operation not permitted")
    assert "ran un-graphed" in note
    clean = SimpleNamespace(fast=object(), fast_model=SimpleNamespace(graph_capture_errors=dict))
    eager = SimpleNamespace(fast=None, fast_model=None)
    assert graph_capture_notes(clean) == [] and graph_capture_notes(eager) == []  # type: ignore[arg-type]


def test_fast_model_lists_what_ran_ungraphed() -> None:
    """``FastModel.graph_capture_errors``: the prefill's and the decoder's recorded failures by part (set here as
    the capture paths record them), nothing on a fresh model."""
    import torch

    from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model
    from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, apply_fast_path
    from tests.conftest import TINY

    model = build_model(DeepseekOCRConfig.from_json(TINY / "config.json"), "cpu", torch.float32, "dummy", seed=1)
    fast = apply_fast_path(model, FastConfig(cuda_graphs=False))
    assert fast.graph_capture_errors() == {}
    fast._prefill_graph_error = "RuntimeError: prefill"
    dec = fast.decoder_for(fast.new_cache(batch=1, max_len=8))
    dec.capture_error = "RuntimeError: decode"
    assert fast.graph_capture_errors() == {"LM prefill": "RuntimeError: prefill", "decode step": "RuntimeError: decode"}


def test_switches_that_did_not_apply_become_report_notes() -> None:
    """``fallback_notes``: one note per configured switch the fast model could not apply, naming it and why;
    none without the fast path or on a GPU where everything applied (the fast model's record is scripted)."""
    from types import SimpleNamespace

    from llm_perf_opt.runners.measure import fallback_notes

    why = {"pdl": "infer.fast.pdl needs an sm_90+ GPU (Hopper: programmatic dependent launches); this one is sm_80"}
    fast = SimpleNamespace(fast=object(), fast_model=SimpleNamespace(fallbacks=lambda: why))
    (note,) = fallback_notes(fast)  # type: ignore[arg-type]
    assert note == f"infer.fast.pdl was configured but did not apply: {why['pdl']}"
    clean = SimpleNamespace(fast=object(), fast_model=SimpleNamespace(fallbacks=dict))
    eager = SimpleNamespace(fast=None, fast_model=None)
    assert fallback_notes(clean) == [] and fallback_notes(eager) == []  # type: ignore[arg-type]


def test_pdl_applies_from_sm90_only() -> None:
    """Programmatic dependent launches exist from compute capability 9.0 (Hopper) on: an A100 (8.0) and an L4
    (8.9) get a reason naming their architecture, an H100/H200 (9.0) and a B200 (10.0) none."""
    from llm_perf_opt.models.deepseek_ocr.fast import pdl_unsupported

    assert pdl_unsupported((9, 0)) is None and pdl_unsupported((10, 0)) is None
    for cap, name in (((8, 0), "sm_80"), ((8, 9), "sm_89")):
        why = pdl_unsupported(cap)
        assert why is not None and f"this one is {name}" in why and "launched plainly" in why


def test_fast_model_on_the_cpu_reports_no_fallbacks() -> None:
    """On the CPU the torch decode step is the expected one: ``FastModel.fallbacks`` is empty (no report note)
    whatever ``decode_kernels=triton`` resolved to, and ``pdl`` has no GPU to check against."""
    import torch

    from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model
    from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, apply_fast_path
    from tests.conftest import TINY

    model = build_model(DeepseekOCRConfig.from_json(TINY / "config.json"), "cpu", torch.float32, "dummy", seed=1)
    fast = apply_fast_path(model, FastConfig(cuda_graphs=False, decode_kernels="triton", pdl=True))
    assert fast.fallbacks() == {} and fast.pdl_note is None
