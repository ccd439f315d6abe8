"""Sweep summary for Hydra multirun: sweep.md + sweep.json + plots in the multirun root.

Called by the runners' Hydra callback after all jobs (``runners/sweep_callback.py``), and callable on any
multirun directory (``summarize_sweep(dir)``).  A job whose metrics.json is missing or marked failed becomes a
row with its error; the other rows are unaffected.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

import cattrs
import yaml

from llm_perf_opt.report.compare import HOST_SHIFT_LIMIT
from llm_perf_opt.results.serialize import SchemaError, atomic_write_text, read_summary

log = logging.getLogger(__name__)

KEY_METRICS = [
    ("prefill_ms", "p50", "TTFT p50 ms"),
    ("tpot_ms", "p50", "TPOT p50 ms"),
    ("tpot_ms", "p99", "TPOT p99 ms"),
    ("decode_tok_s", "mean", "tok/s"),
    ("e2e_ms", "mean", "e2e ms"),
    ("peak_mem_allocated_bytes", "max", "peak alloc GiB"),
]
# the batched phase end to end (``RunSummary.batched_phase``), as columns only where some job ran one (a sweep over
# infer.batch_size or the refill settings): pages/s and output tok/s with page preparation included, and the decode
# steps' bandwidth (minimum traffic over decode time; "≥" where some steps' experts were not counted)
BATCHED_METRICS = [
    ("pages_per_s", "batched pages/s e2e"),
    ("output_tok_s", "batched tok/s e2e"),
    ("decode_gb_per_s", "batched decode GB/s"),
]
LOWER_BOUND = "batched decode GB/s is a lower bound"


def _swept(job_dir: Path) -> dict[str, str]:
    overrides = job_dir / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return {}
    items = yaml.safe_load(overrides.read_text()) or []
    return dict(item.split("=", 1) for item in items if "=" in item)


def _row(job_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"job": job_dir.name, "swept": _swept(job_dir)}
    metrics = job_dir / "metrics.json"
    if not metrics.is_file():
        log_file = job_dir / "run.log"
        last = log_file.read_text().strip().splitlines()[-1:] if log_file.is_file() else []
        row.update(status="failed", error=(last[0] if last else "no metrics.json written"))
        return row
    try:
        s = read_summary(metrics)
    except (SchemaError, ValueError, KeyError, AttributeError, cattrs.errors.BaseValidationError) as exc:
        row.update(status="failed", error=f"unreadable metrics.json: {exc}")
        return row
    row["status"] = s.run.status
    if s.run.status_reason:
        row["error"] = s.run.status_reason
    if s.run.status == "running":  # the sweep is over: a job still "running" died before its final report
        row.update(status="failed", error="job ended before its final report (metrics.json still says running)")
    for key, stat, label in KEY_METRICS:
        st = s.aggregates.get(key)
        value = getattr(st, stat) if st else None
        if value is not None and key.endswith("_bytes"):
            value = value / 2**30
        row[label] = value
    for e in s.efficiency:
        row[f"MFU {e.stage}"] = e.mfu
    for key, label in BATCHED_METRICS:
        row[label] = None if s.batched_phase is None else getattr(s.batched_phase, key)
    traffic = s.batched_phase.decode_traffic if s.batched_phase is not None else None
    if traffic is not None and traffic.lower_bound:
        row[LOWER_BOUND] = True
    if s.quality is not None:
        row["quality"] = s.quality.verdict
        row["quality_reasons"] = list(s.quality.reasons)
        if s.quality.host is not None and s.quality.host.probe_ms is not None:
            row["host_probe_ms"] = s.quality.host.probe_ms
    mfu_missing = next((u.reason for u in s.unavailable if u.metric == "mfu"), None)
    if mfu_missing:
        row["mfu_unavailable"] = mfu_missing
    return row


def summarize_sweep(root: Path) -> list[dict[str, Any]]:
    jobs = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    rows = [_row(j) for j in jobs]
    atomic_write_text(root / "sweep.json", json.dumps(rows, indent=2) + "\n")
    # Only overrides that differ between jobs are swept axes; constants shared by all jobs are not columns.
    all_keys = sorted({k for r in rows for k in r["swept"]})
    keys = [k for k in all_keys if len({r["swept"].get(k) for r in rows}) > 1] or all_keys
    # MFU columns only where some job has a figure (a CPU sweep has none: one line says why instead).
    mfu_cols = sorted({k for r in rows for k in r if k.startswith("MFU ") and r[k] is not None})
    batched_cols = [label for _, label in BATCHED_METRICS if any(r.get(label) is not None for r in rows)]
    metric_cols = [label for _, _, label in KEY_METRICS] + mfu_cols + batched_cols
    header = ["job", *keys, "status", "quality", *metric_cols]
    lines = [
        f"# Sweep summary — {root.name}\n",
        f"{len(rows)} jobs; one run directory per job below this one.\n",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for r in rows:
        cells = [
            f"[{r['job']}]({r['job']}/report.md)",
            *(str(r["swept"].get(k, "")) for k in keys),
            r["status"],
            r.get("quality", "n/a (not recorded)" if r["status"] != "failed" else "n/a (failed)"),
        ]
        for col in metric_cols:
            v = r.get(col)
            if v is None and col in batched_cols and r["status"] != "failed":
                cells.append("n/a (no batched phase in this job: see its report)")
            elif v is None:
                cells.append("n/a (failed)" if r["status"] == "failed" else "n/a (not measured: see the job's report)")
            elif col.startswith("MFU"):
                cells.append(f"{100 * v:.2f} %")
            elif col == "batched decode GB/s":
                cells.append(f"{'≥ ' if r.get(LOWER_BOUND) else ''}{v:,.1f}")
            else:
                cells.append(f"{v:,.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    reasons = sorted({r["mfu_unavailable"] for r in rows if r.get("mfu_unavailable")})
    if not mfu_cols and reasons:
        lines.append(f"\nMFU not available: {reasons[0]}")
    noisy = [r for r in rows if r.get("quality") == "noisy"]
    if noisy:
        lines.append(f"\n**Measurement quality:** {len(noisy)} of {len(rows)} jobs noisy — compare them with care:")
        lines += [f"- job {r['job']}: {'; '.join(r.get('quality_reasons', []))}" for r in noisy]
    lines += _host_speed(rows)
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines.append("\n## Failed jobs\n")
        lines += [f"- job {r['job']} ({r['swept']}): {r.get('error', 'unknown')}" for r in failed]
    plots = _plots(root, rows, keys)
    for p in plots:
        lines.append(f"\n![{p}]({p})")
    atomic_write_text(root / "sweep.md", "\n".join(lines) + "\n")
    return rows


def _host_speed(rows: list[dict[str, Any]]) -> list[str]:
    """Each job timed the same fixed CPU workload at its start and end: jobs further from the median than
    ``compare`` tolerates between two runs (``HOST_SHIFT_LIMIT``) ran on a host faster or slower than the
    others', so their differences are not only the swept setting's."""
    probes = {r["job"]: r["host_probe_ms"] for r in rows if r.get("host_probe_ms") is not None}
    if len(probes) < 2:
        return []
    med = statistics.median(probes.values())
    off = {job: ms / med - 1 for job, ms in probes.items() if abs(ms / med - 1) > HOST_SHIFT_LIMIT}
    head = (
        f"\n**Host speed:** the fixed CPU probe took {min(probes.values()):.2f}–{max(probes.values()):.2f} ms over "
        f"{len(probes)} jobs (median {med:.2f} ms)"
    )
    if not off:
        return [f"{head}: every job within ±{100 * HOST_SHIFT_LIMIT:.0f} % of it."]
    return [
        f"{head}; {len(off)} job(s) ran on a host more than {100 * HOST_SHIFT_LIMIT:.0f} % off it — their "
        "differences from the others are not only the swept setting's:",
        *(f"- job {job}: {probes[job]:.2f} ms ({100 * shift:+.0f} %)" for job, shift in off.items()),
    ]


def _sort_key(value: str) -> tuple[int, float, str]:
    """Numbers in numeric order, then everything else in text order."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _plots(root: Path, rows: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """One figure per swept key: TTFT and TPOT (p50) against the key's values as categories (evenly spaced,
    labelled with the values), one labelled series per combination of the other swept keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ok = [r for r in rows if r["status"] != "failed"]
    for key in keys:
        values = sorted({str(r["swept"][key]) for r in ok if key in r["swept"]}, key=_sort_key)
        if len(values) < 2:
            continue
        others = [k for k in keys if k != key]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, label in zip(axes, ("TTFT p50 ms", "TPOT p50 ms"), strict=True):
            series: dict[str, list[tuple[int, float]]] = {}
            for r in ok:
                if r.get(label) is None or key not in r["swept"]:
                    continue
                name = ", ".join(f"{k}={r['swept'].get(k, '')}" for k in others) or "all jobs"
                series.setdefault(name, []).append((values.index(str(r["swept"][key])), r[label]))
            for name, pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
            ax.set_xticks(range(len(values)), values)
            ax.set_xlabel(f"{key} (swept values)")
            ax.set_ylabel(label)
            if len(series) > 1:
                ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"sweep_{key.replace('.', '_').replace('/', '_')}.png"
        fig.savefig(root / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written
