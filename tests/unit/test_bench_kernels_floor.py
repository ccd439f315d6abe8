"""``bench_kernels.step_floor_lines``: the batched step's bandwidth floor beside its fastest measured step, and
``write_results`` (partial, then whole).  Oracles: ``flops.decode_bytes_per_step`` (the byte model, tested on its
own) for the bytes, hand arithmetic for the floor and the ratio, the reasons a floor is not computed, and the files
as written."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.bench_kernels import CONFIG, step_floor_lines, write_results

from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig
from llm_perf_opt.profiling.flops import decode_bytes_per_step


def _rows(batch: int, hits: list[float] | None) -> list[dict[str, object]]:
    torch_row: dict[str, object] = {"batch": batch, "step_ms": 4.0, "routed_hit_per_layer": []}
    triton_row: dict[str, object] = {"batch": batch, "step_ms": 2.5, "context_len": 285}
    if hits is not None:
        triton_row["routed_hit_per_layer"] = hits
    return [torch_row, triton_row, {"batch": batch, "decode_kernels": "triton", "error": "OOM"}]


def test_the_floor_is_the_steps_bytes_at_the_bandwidth() -> None:
    hits = [60.6, 61.4] + [61.0] * 9  # per MoE layer, means over the profiled steps (rounded: 61 each)
    lines = step_floor_lines(_rows(32, hits), bandwidth=4.0e12)
    need = decode_bytes_per_step(DeepseekOCRConfig.from_json(CONFIG), 285, 2, [61] * 11, batch=32).total_bytes
    floor_ms = need / 4.0e12 * 1e3
    assert need > 11 * 61 * 3 * 1280 * 896 * 2 + 32 * 12 * 2 * 285 * 1280 * 2  # at least the experts and the K/V
    row = lines[-1].split(" | ")
    assert row[0] == "| 32" and row[1] == "61.0" and row[2] == f"{need / 1e9:.2f}"
    assert row[3] == f"{floor_ms:.3f}" and row[4] == "2.500"  # the fastest of the measured steps
    assert row[5] == f"{floor_ms / 2.5:.0%} |"


def test_no_floor_without_expert_reads_or_a_bandwidth() -> None:
    assert "no step ran the Triton expert kernels" in step_floor_lines(_rows(32, None), 4.0e12)[-1]
    assert "no datasheet bandwidth for this GPU" in step_floor_lines(_rows(64, [61.0] * 11), None)[-1]
    failed = step_floor_lines([{"batch": 8, "error": "OOM"}], 4.0e12)[-1]
    assert failed.startswith("| 8 | not computed: no step measured")


def test_results_written_partial_then_whole(tmp_path: Path) -> None:
    """``write_results``: the op rows are written marked partial (a call cut short keeps them), the final write
    replaces them unmarked; nothing is written without an output directory."""
    env = {"gpu": "NVIDIA H200"}
    write_results(None, env, [], [], [], [], "ignored")
    assert not list(tmp_path.iterdir())
    write_results(str(tmp_path), env, [], ["split"], [], [], "| op rows |")
    (md,) = tmp_path.glob("*-kernels.md")
    assert md.read_text().startswith("**Partial: the op rows only") and "| op rows |" in md.read_text()
    assert json.loads(md.with_suffix(".json").read_text())["partial"] is True
    write_results(str(tmp_path), env, [], ["split"], [{"batch": 32}], [], "| all |", partial=False)
    assert md.read_text() == "| all |"
    payload = json.loads(md.with_suffix(".json").read_text())
    assert payload["partial"] is False and payload["batched_step"] == [{"batch": 32}]
