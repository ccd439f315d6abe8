"""report/plots.py: an unmeasured stage has no bar (never a "0.0 ms" one), and says so; readable plots (issue 14):
legend names are the report's row names, every decode line is labelled, histogram count ticks are whole numbers,
the roofline says its bytes are modelled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest

from llm_perf_opt.report import plots
from llm_perf_opt.report.plots import stage_parts, write_plots
from llm_perf_opt.results.types import Efficiency
from tests.unit.builders import make_page, make_summary


def test_every_stage_measured() -> None:
    s = make_summary({"sam_ms": [4.0], "clip_ms": [3.0], "projector_ms": [0.5], "vision_ms": [9.0],
                      "prefill_ms": [20.0], "decode_ms": [50.0]})  # fmt: skip
    parts, missing = stage_parts(s)
    assert missing == []
    assert parts == [
        ("SAM", 4.0), ("CLIP", 3.0), ("projector", 0.5), ("layout (rest of vision)", pytest.approx(1.5)),
        ("prefill LM (prefill − vision)", pytest.approx(11.0)), ("decode (tokens 2..N)", 50.0),
    ]  # fmt: skip


def test_overlapping_view_streams_draw_vision_as_one_bar() -> None:
    """With vision_streams the hooks' stage times overlap (here they sum to 10.5 ms of a 9 ms vision): stacking
    them would draw a prefill longer than it was, so vision is one bar of its own measured time."""
    s = make_summary({"sam_ms": [6.0], "clip_ms": [4.0], "projector_ms": [0.5], "vision_ms": [9.0],
                      "prefill_ms": [20.0], "decode_ms": [50.0]})  # fmt: skip
    s.model.optimisations["vision_streams"] = True
    parts, missing = stage_parts(s)
    assert missing == []
    assert parts == [
        ("vision (its views on two streams: stage times overlap)", 9.0),
        ("prefill LM (prefill − vision)", pytest.approx(11.0)), ("decode (tokens 2..N)", 50.0),
    ]  # fmt: skip
    assert sum(v for _, v in parts[:2]) == pytest.approx(20.0)  # the bars add up to the prefill


def test_unmeasured_stages_have_no_bar() -> None:
    """A backend without vision hooks (hf_remote) and a run with one token (no decode): those bars are absent,
    and so are the parts derived from them (layout), not drawn as 0.0 ms."""
    s = make_summary({"vision_ms": [9.0], "prefill_ms": [20.0]})
    parts, missing = stage_parts(s)
    assert parts == [("prefill LM (prefill − vision)", pytest.approx(11.0))]
    assert missing == ["SAM", "CLIP", "projector", "layout (rest of vision)", "decode (tokens 2..N)"]
    assert all(v > 0 for _, v in parts)


def test_plot_written_with_missing_stages(tmp_path: Path) -> None:
    s = make_summary({"prefill_ms": [20.0], "decode_ms": [5.0]})
    plots = write_plots(s, tmp_path)
    assert plots.get("stage_breakdown") == "stage_breakdown.png"
    assert (tmp_path / "stage_breakdown.png").stat().st_size > 0


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Figures by file stem, kept open (write_plots closes each after saving)."""
    kept: dict[str, Any] = {}
    real_savefig = plots.plt.Figure.savefig

    def savefig(fig: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        kept[Path(path).stem] = fig
        real_savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(plots.plt.Figure, "savefig", savefig)
    monkeypatch.setattr(plots.plt, "close", lambda fig=None: None)
    return kept


def test_plots_are_labelled_like_the_tables(tmp_path: Path, figures: dict[str, Any]) -> None:
    pages = [make_page(f"p{i}", r, prefill_ms=20.0 + i + 0.5 * r) for i in range(3) for r in range(3)]
    s = make_summary(
        {"sam_ms": [10.0], "clip_ms": [5.0], "projector_ms": [1.0], "vision_ms": [17.0], "prefill_ms": [25.0],
         "decode_ms": [160.0]},
        pages=pages,
        efficiency=[Efficiency("decode", 1e9, 0.1, 1e10, 0.01, bytes_moved=1e9, mbu=0.1, arithmetic_intensity=1.0)],
    )  # fmt: skip
    s = attrs.evolve(s, hardware=attrs.evolve(s.hardware, peak_flops_per_s=1e15, peak_bw_bytes_per_s=4.8e12))
    written = plots.write_plots(s, tmp_path)
    assert set(written) == {"stage_breakdown", "decode_steps", "latency_distribution", "roofline"}

    legend = [t.get_text() for t in figures["stage_breakdown"].axes[0].get_legend().get_texts()]
    # "<name> (<ms> ms)": the names are the report's ("layout" as in the vision row, not "vision other").
    assert [t.rsplit(" (", 1)[0] for t in legend] == [
        "SAM", "CLIP", "projector", "layout (rest of vision)", "prefill LM (prefill − vision)", "decode (tokens 2..N)",
    ]  # fmt: skip

    steps_legend = figures["decode_steps"].axes[0].get_legend()
    assert steps_legend is not None and len(steps_legend.get_texts()) == 9  # every page run's line is named

    for ax in figures["latency_distribution"].axes:
        ticks = [t for t in ax.get_yticks() if t >= 0]
        assert all(float(t).is_integer() for t in ticks), ticks
    assert [ax.get_xlabel() for ax in figures["latency_distribution"].axes] == ["TTFT (prefill) ms", "TPOT ms/token"]

    title = figures["roofline"].axes[0].get_title()
    assert "modelled" in title and "lower bound" in title
