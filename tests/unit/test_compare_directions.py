"""Every metric ``compare`` judges, in both directions, from one table written independently of compare.py.

The table says what kind of figure each metric is; the kind says which way is better.  A metric that compare
adds without a row here, or a direction flipped in compare.COMPARED, fails this test.  (When compare's classes
change — e.g. workload descriptors no longer judged — the change belongs in ``EXPECTED_VERDICT`` below.)
"""

from __future__ import annotations

import pytest

from llm_perf_opt.report.compare import COMPARED, diff
from tests.unit.builders import make_summary

# metric → kind, from what the metric measures (not from compare.py)
KIND = {
    "prefill_ms": "latency",
    "vision_ms": "latency",
    "sam_ms": "latency",
    "clip_ms": "latency",
    "projector_ms": "latency",
    "decode_ms": "latency",
    "tpot_ms": "latency",
    "decode_step_p99_ms": "latency",
    "e2e_ms": "latency",
    "decode_tok_s": "throughput",
    "peak_mem_allocated_bytes": "memory",
    "peak_rss_bytes": "memory",
    "energy_per_token_j": "energy",
    "generated_tokens": "workload",
}
# kind → verdict when B is clearly higher / clearly lower than A
EXPECTED_VERDICT = {
    "latency": {"higher": "WORSE", "lower": "better"},
    "memory": {"higher": "WORSE", "lower": "better"},
    "energy": {"higher": "WORSE", "lower": "better"},
    "throughput": {"higher": "better", "lower": "WORSE"},
    # today's compare judges more tokens as better; issue 14 makes workload descriptors verdict-free
    "workload": {"higher": "better", "lower": "WORSE"},
}
A_SAMPLES = [100.0, 100.2, 99.8, 100.0]  # CI half-width ≈ 0.3


def test_the_table_covers_every_compared_metric() -> None:
    assert {m for m, _, _ in COMPARED} == set(KIND)


@pytest.mark.parametrize("direction", ["higher", "lower"])
@pytest.mark.parametrize("metric", sorted(KIND))
def test_verdict_follows_the_metric_kind(metric: str, direction: str) -> None:
    shift = 20.0 if direction == "higher" else -20.0
    a = make_summary({metric: A_SAMPLES})
    b = make_summary({metric: [v + shift for v in A_SAMPLES]})
    (d,) = diff(a, b)
    assert d.metric == metric and d.significant
    assert d.delta == pytest.approx(shift) and d.pct == pytest.approx(shift)  # A's mean is 100
    assert d.verdict == EXPECTED_VERDICT[KIND[metric]][direction], (metric, direction)


@pytest.mark.parametrize("metric", sorted(KIND))
def test_overlapping_intervals_are_noise_for_every_metric(metric: str) -> None:
    a = make_summary({metric: A_SAMPLES})
    b = make_summary({metric: [v + 0.1 for v in A_SAMPLES]})
    (d,) = diff(a, b)
    assert d.verdict == "within noise" and not d.significant
