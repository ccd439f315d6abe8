"""PNG plots for report.md (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from llm_perf_opt.results.types import RunSummary


def stage_parts(s: RunSummary) -> tuple[list[tuple[str, float]], list[str]]:
    """Bars of the stage breakdown (label, mean ms) and the stages left out because they were not measured.

    A stage without an aggregate has no bar (drawing "0.0 ms" would claim it took no time); the derived parts
    (layout = vision − SAM − CLIP − projector, prefill LM = prefill − vision) exist only when every input
    they are derived from was measured.  With ``vision_streams`` on, a page's two view chains ran at once and the
    SAM / CLIP / projector times overlap, so they are not parts of a sum: vision is one bar.
    """

    def mean(key: str) -> float | None:
        st = s.aggregates.get(key)
        return st.mean if st else None

    sam, clip, proj, vision = mean("sam_ms"), mean("clip_ms"), mean("projector_ms"), mean("vision_ms")
    prefill, decode = mean("prefill_ms"), mean("decode_ms")
    other = None
    if vision is not None and sam is not None and clip is not None and proj is not None:
        other = max(vision - sam - clip - proj, 0.0)
    lm = None if prefill is None or vision is None else max(prefill - vision, 0.0)
    # the report's row names ("layout" = the part of vision outside SAM, CLIP and the projector)
    second = s.model.stage_names.get("clip", "CLIP")  # DeepSeek-OCR-2: its encoder
    candidates = [("SAM", sam), (second, clip), ("projector", proj), ("layout (rest of vision)", other),
                  ("prefill LM (prefill − vision)", lm), ("decode (tokens 2..N)", decode)]  # fmt: skip
    if s.model.optimisations.get("vision_streams"):
        candidates[:4] = [("vision (its views on two streams: stage times overlap)", vision)]
    parts = [(label, value) for label, value in candidates if value is not None]
    missing = [label for label, value in candidates if value is None]
    return parts, missing


def write_plots(s: RunSummary, out: Path) -> dict[str, str]:
    """Write what the data supports; returns {plot key: relative file name}."""
    plots: dict[str, str] = {}
    ok = s.ok_pages
    if not ok:
        return plots

    parts, missing = stage_parts(s)
    if parts:  # nothing measured: no chart rather than an empty one
        fig, ax = plt.subplots(figsize=(8, 2.6))
        left = 0.0
        for label, value in parts:
            ax.barh([0], [value], left=left, label=f"{label} ({value:,.1f} ms)")
            left += value
        ax.set_yticks([])
        ax.set_xlabel("ms per page (mean)" + (f"; not measured (no bar): {', '.join(missing)}" if missing else ""))
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3, fontsize=8, frameon=False)
        fig.tight_layout()
        fig.savefig(out / "stage_breakdown.png", dpi=110)
        plt.close(fig)
        plots["stage_breakdown"] = "stage_breakdown.png"

    steps = [p for p in ok if p.decode_step_ms]
    if steps:
        fig, ax = plt.subplots(figsize=(8, 3))
        for p in steps[:12]:
            ax.plot(
                range(2, len(p.decode_step_ms) + 2),
                p.decode_step_ms,
                lw=0.8,
                alpha=0.7,
                label=f"{p.page_id} r{p.repeat}",
            )
        ax.set_xlabel("token index (2 = first decode step)")
        ax.set_ylabel("ms")
        ax.set_title("per-token decode latency, one line per page run (KV cache grows left to right)", fontsize=9)
        ax.legend(
            title="page, repeat", fontsize=6, title_fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0)
        )
        fig.tight_layout()
        fig.savefig(out / "decode_steps.png", dpi=110)
        plt.close(fig)
        plots["decode_steps"] = "decode_steps.png"

    labels = {"prefill_ms": "TTFT (prefill) ms", "tpot_ms": "TPOT ms/token"}  # the latency table's names
    series = [(k, [getattr(p, k) for p in ok if getattr(p, k) is not None]) for k in ("prefill_ms", "tpot_ms")]
    series = [(k, v) for k, v in series if v]
    if series:
        fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3))
        axes_list = list(axes) if len(series) > 1 else [axes]
        for ax, (key, values) in zip(axes_list, series, strict=True):
            ax.hist(values, bins=min(20, max(3, len(values))))
            ax.set_xlabel(labels[key])
            ax.set_ylabel("page runs")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: whole page runs only
        fig.tight_layout()
        fig.savefig(out / "latency_distribution.png", dpi=110)
        plt.close(fig)
        plots["latency_distribution"] = "latency_distribution.png"

    peak = s.hardware.peak_flops_per_s
    bw = s.hardware.peak_bw_bytes_per_s
    points = [e for e in s.efficiency if e.arithmetic_intensity and e.achieved_flops_per_s]
    if peak and bw and points:
        import numpy as np

        fig, ax = plt.subplots(figsize=(6, 4))
        x = np.logspace(-1, 4, 200)
        ax.loglog(x, np.minimum(peak, x * bw), "k-", lw=1, label="roofline")
        for e in points:
            ax.loglog([e.arithmetic_intensity], [e.achieved_flops_per_s], "o", label=e.stage)
        ax.set_xlabel("arithmetic intensity (FLOP/byte)")
        ax.set_title(
            "modelled bytes: decode = weights + KV read (a lower bound);\nother stages: bytes ≥ weights + I/O, "
            "so intensity is an upper bound",
            fontsize=8,
        )
        ax.set_ylabel("FLOP/s (decimal)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "roofline.png", dpi=110)
        plt.close(fig)
        plots["roofline"] = "roofline.png"
    return plots
