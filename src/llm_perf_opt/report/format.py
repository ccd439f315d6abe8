"""Markdown building blocks shared by every report: number formats (decimal and binary units named), tables,
and the statistics row (median first, then the mean where it means something).

"n/a" cells always come with a reason: :func:`na` writes the reason into the cell.
"""

from __future__ import annotations

from llm_perf_opt.results.types import RunSummary, Stats

NA = "n/a"


STAT_HEADER = ["metric", "unit", "n", "median", "median 95 % CI", "mean", "mean 95 % CI", "p99", "min – max",
               "outliers (> 3× median)"]  # fmt: skip


def _mean_ci_cell(s: Stats, digits: int) -> str:
    if s.ci95_half_width is not None:
        return f"± {s.ci95_half_width:,.{digits}f}"
    why = s.mean_ci_reason or ""
    if "outlier" in why:
        return na("outliers pull the mean: read the median")
    if "one sample" in why or s.n < 2:
        return na("one sample")
    return na("n too small or skewed: wider than the data")


def stat_row(label: str, s: Stats | None, unit: str, digits: int = 2, reason: str = "not measured") -> list[str]:
    if s is None:
        return [label, unit, na(reason)] + [""] * (len(STAT_HEADER) - 3)
    med_ci = (
        f"{fmt(s.median_ci95_low, digits)} – {fmt(s.median_ci95_high, digits)}"
        if s.median_ci95_low is not None and s.median_ci95_high is not None
        else na("n < 6: no 95 % order-statistic interval")
    )
    return [
        label,
        unit,
        str(s.n),
        fmt(s.p50, digits),
        med_ci,
        fmt(s.mean, digits),
        _mean_ci_cell(s, digits),
        fmt(s.p99, digits),
        f"{fmt(s.min, digits)} – {fmt(s.max, digits)}",
        str(s.n_outliers),
    ]


def fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return NA
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def fmt_bytes(value: float | int | None) -> str:
    if value is None:
        return NA
    v = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:,.1f} {unit}" if unit != "B" else f"{int(v)} B"
        v /= 1024
    return f"{v:.1f} TiB"


def fmt_flops(value: float | None) -> str:
    if value is None:
        return NA
    for scale, unit in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if abs(value) >= scale:
            return f"{value / scale:,.2f} {unit}"
    return f"{value:,.0f} FLOP"


def fmt_pct(value: float | None) -> str:
    if value is None:
        return NA
    pct = 100 * value
    # Small efficiencies (decode MFU is ~0.005 %) keep 2 significant digits instead of printing 0.00 %.
    return f"{pct:.2f} %" if abs(pct) >= 0.1 or pct == 0 else f"{pct:.2g} %"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(md_escape(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def md_escape(text: str) -> str:
    """A cell or list item stays one cell / item whatever a file name holds: ``|`` escaped, line breaks shown."""
    return text.replace("|", "\\|").replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\r")


def na(reason: str) -> str:
    """An absent figure with its reason, in the cell itself (never a bare n/a)."""
    return f"{NA} ({reason})"


def fmt_rate_bytes(value: float | None) -> str:
    """Bandwidth in decimal units (GB/s = 10⁹ B/s), like FLOP/s."""
    if value is None:
        return NA
    for scale, unit in ((1e12, "TB/s"), (1e9, "GB/s"), (1e6, "MB/s")):
        if abs(value) >= scale:
            return f"{value / scale:,.2f} {unit}"
    return f"{value:,.0f} B/s"


def fmt_bytes_dec(value: float | None) -> str:
    """Bytes moved, in decimal units (GB = 10⁹ B) so that bytes ÷ seconds reads against the bandwidth peak."""
    if value is None:
        return NA
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(value) >= scale:
            return f"{value / scale:,.2f} {unit}"
    return f"{value:,.0f} B"


def stage_label(s: RunSummary, label: str) -> str:
    """``label`` with the model's stage names: DeepSeek-OCR-2's ``clip_ms`` slot holds its encoder's time, so its
    "CLIP" reads "encoder" there."""
    name = s.model.stage_names.get("clip")
    return label.replace("CLIP", name) if name else label
