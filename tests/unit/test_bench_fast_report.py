"""``bench_fast.write_report``: a report written while the variants still run says so at its top, and the final one
does not (a device call cut short by its time limit keeps every row measured before it).  Oracle: a hand-made
result dict; the expected lines are written out by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from benchmarks.bench_fast import write_report

from tests.unit.test_benchmath import _res as benchmath_res


def _res() -> dict[str, Any]:
    side = {
        "decode_ms_per_token": 20.0,
        "decode_device_greedy_ms_per_token": 0.5,
        "decode_wall_ms_per_token": 21.0,
        "prefill_ms": 10.0,
        "vision_ms": 40.0,
        "sam_ms": 30.0,
        "vision_mfu_pct": 10.0,
        "sam_mfu_pct": 11.0,
        "peak_gib": 6.5,
        "tokens_identical": True,
        "first_divergence": None,
        "logits_max_abs_diff": 0.01,
        "logits_max_abs": 3.0,
        "graph_capture_s": 0.5,
    }
    res = benchmath_res()  # the goals table's inputs, plus what the rest of the report reads
    res["env"].update(date="2026-12-03", driver="580", torch="2.11", cuda="13.0")
    res.update(peak_bytes_per_s=4e12, peak_source="datasheet", grid=[2, 3], prompt_len=913, sam_flops=3e12)
    res.update(apply_fast_path_s=0.1, first_fast_vision_s=7.0, fast_config={}, vision_graphs={}, n_routed_experts=64)
    res.update(eager=dict(side), fast=dict(side))
    res["variants"] = {"vision x ms": 12.5, "vision y": "failed: OutOfResources"}
    return res


def test_partial_report_says_so_and_the_final_one_does_not(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = _res()
    res["partial"] = "written before the vision variants ran"
    write_report(res, tmp_path, keep=64, echo=False)
    (md,) = tmp_path.glob("*-h200-fast.md")
    lines = md.read_text().splitlines()
    assert "**Partial report:** written before the vision variants ran." in lines
    assert "| vision x ms | 12.500 |" in lines and "| vision y | failed: OutOfResources |" in lines
    (js,) = tmp_path.glob("*-h200-fast.json")
    assert json.loads(js.read_text())["partial"] == "written before the vision variants ran"
    assert capsys.readouterr().out == ""  # a checkpoint writes files only

    del res["partial"]
    res["variants"]["vision z ms"] = 11.0
    write_report(res, tmp_path, keep=64)
    text = md.read_text()
    assert "Partial report" not in text and "| vision z ms | 11.000 |" in text.splitlines()
    assert "partial" not in json.loads(js.read_text())
    assert "| vision z ms | 11.000 |" in capsys.readouterr().out


def test_parts_names_an_unknown_group_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--parts`` with a misspelt group stops at once (before the CUDA check) and names the valid groups."""
    import sys

    from benchmarks import bench_fast

    monkeypatch.setattr(sys, "argv", ["bench_fast.py", "--parts", "vision,tabels"])
    with pytest.raises(SystemExit, match=r"unknown group\(s\) \['tabels'\]; choose from vision, by-grid, tables"):
        bench_fast.main()
