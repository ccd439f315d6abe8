"""Every metric ``compare`` judges, in both directions, from one table written independently of compare.py.

The table says what kind of figure each metric is; the kind says which way is better (issue 14: workload
descriptors get no verdict).  A metric that compare adds without a row here, or a direction flipped in
compare.COMPARED, fails this test.  Samples are per page (compare's significance rule works on them).
"""

from __future__ import annotations

import pytest

from llm_perf_opt.report.compare import COMPARED, diff
from llm_perf_opt.results.types import RunSummary
from tests.unit.builders import make_page, make_summary

# metric → kind, from what the metric measures (not from compare.py)
KIND = {
    "prefill_ms": "latency",
    "vision_ms": "latency",
    "sam_ms": "latency",
    "clip_ms": "latency",
    "projector_ms": "latency",
    "decode_ms": "latency",
    "tpot_ms": "latency",
    "decode_step_p50_ms": "latency",
    "decode_step_p99_ms": "latency",
    "preprocess_ms": "latency",
    "e2e_ms": "latency",
    "decode_tok_s": "throughput",
    "peak_mem_allocated_bytes": "memory",
    "peak_mem_reserved_bytes": "memory",
    "peak_rss_bytes": "memory",
    "kv_cache_bytes": "memory",
    "energy_per_token_j": "energy",
    "generated_tokens": "workload",
    "prompt_tokens": "workload",
    "image_tokens": "workload",
}
# kind → verdict when B is clearly higher / clearly lower than A, and when B is within A's noise
EXPECTED_VERDICT = {
    "latency": {"higher": "WORSE", "lower": "better", "same": "within noise"},
    "memory": {"higher": "WORSE", "lower": "better", "same": "within ±5 %"},
    "energy": {"higher": "WORSE", "lower": "better", "same": "within noise"},
    "throughput": {"higher": "better", "lower": "WORSE", "same": "within noise"},
    "workload": {"higher": "workload (no verdict)", "lower": "workload (no verdict)", "same": "workload (no verdict)"},
}
A_SAMPLES = [100.0, 100.2, 99.8, 100.1, 99.9, 100.3, 99.7, 100.05]  # no ties, spread ±0.3 %


def _run(metric: str, values: list[float]) -> RunSummary:
    pages = [make_page(f"p{i}", 0, **{metric: v}) for i, v in enumerate(values)]
    return make_summary({metric: values}, pages=pages)


def test_the_table_covers_every_compared_metric() -> None:
    assert {m for m, _, _ in COMPARED} == set(KIND)


@pytest.mark.parametrize("direction", ["higher", "lower", "same"])
@pytest.mark.parametrize("metric", sorted(KIND))
def test_verdict_follows_the_metric_kind(metric: str, direction: str) -> None:
    shift = {"higher": 20.0, "lower": -20.0, "same": 0.1}[direction]
    a = _run(metric, A_SAMPLES)
    b = _run(metric, [v + shift for v in A_SAMPLES])
    (d,) = diff(a, b)
    assert d.metric == metric
    expected = EXPECTED_VERDICT[KIND[metric]][direction]
    assert d.verdict == expected, (metric, direction)
    assert d.significant == (expected in ("better", "WORSE"))
