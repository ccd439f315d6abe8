"""report/plots.py: an unmeasured stage has no bar (never a "0.0 ms" one), and says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_perf_opt.report.plots import stage_parts, write_plots
from tests.unit.builders import make_summary


def test_every_stage_measured() -> None:
    s = make_summary({"sam_ms": [4.0], "clip_ms": [3.0], "projector_ms": [0.5], "vision_ms": [9.0],
                      "prefill_ms": [20.0], "decode_ms": [50.0]})  # fmt: skip
    parts, missing = stage_parts(s)
    assert missing == []
    assert parts == [("SAM", 4.0), ("CLIP", 3.0), ("projector", 0.5), ("vision other", pytest.approx(1.5)),
                     ("prefill LM", pytest.approx(11.0)), ("decode", 50.0)]  # fmt: skip


def test_unmeasured_stages_have_no_bar() -> None:
    """A backend without vision hooks (hf_remote) and a run with one token (no decode): those bars are absent,
    and so are the parts derived from them (vision other), not drawn as 0.0 ms."""
    s = make_summary({"vision_ms": [9.0], "prefill_ms": [20.0]})
    parts, missing = stage_parts(s)
    assert parts == [("prefill LM", pytest.approx(11.0))]
    assert missing == ["SAM", "CLIP", "projector", "vision other", "decode"]
    assert all(v > 0 for _, v in parts)


def test_plot_written_with_missing_stages(tmp_path: Path) -> None:
    s = make_summary({"prefill_ms": [20.0], "decode_ms": [5.0]})
    plots = write_plots(s, tmp_path)
    assert plots.get("stage_breakdown") == "stage_breakdown.png"
    assert (tmp_path / "stage_breakdown.png").stat().st_size > 0
