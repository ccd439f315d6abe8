"""``llm-perf-opt compare RUN_A RUN_B``: a markdown diff of two run directories.

A difference is flagged as real only when the two runs' 95 % confidence intervals of the mean do not
overlap; otherwise it is within the runs' own noise.  Runs with different schema majors are refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import attrs
import cattrs

from llm_perf_opt.results.serialize import SchemaError, read_summary
from llm_perf_opt.results.types import RunSummary, Stats

# (metric, unit, lower_is_better)
COMPARED = [
    ("prefill_ms", "ms", True),
    ("vision_ms", "ms", True),
    ("sam_ms", "ms", True),
    ("clip_ms", "ms", True),
    ("projector_ms", "ms", True),
    ("decode_ms", "ms", True),
    ("tpot_ms", "ms/token", True),
    ("decode_tok_s", "tok/s", False),
    ("decode_step_p99_ms", "ms", True),
    ("e2e_ms", "ms", True),
    ("generated_tokens", "tokens", False),
    ("peak_mem_allocated_bytes", "bytes", True),
    ("peak_rss_bytes", "bytes", True),
    ("energy_per_token_j", "J/token", True),
]


class CompareError(ValueError):
    pass


@attrs.frozen
class Delta:
    metric: str
    unit: str
    a: float
    b: float
    delta: float
    pct: float | None
    significant: bool
    verdict: str


def load_run(path: Path) -> RunSummary:
    metrics = path / "metrics.json"
    if not path.is_dir() or not metrics.is_file():
        raise CompareError(f"{path} is not a run directory (no metrics.json)")
    try:
        return read_summary(metrics)
    except SchemaError as exc:
        raise CompareError(f"{exc}; re-run the profile with this version to compare") from exc
    except (ValueError, AttributeError, cattrs.errors.BaseValidationError) as exc:
        raise CompareError(f"{metrics} is not a readable metrics.json ({type(exc).__name__}: {exc})") from exc


def _overlap(a: Stats, b: Stats) -> bool:
    if a.ci95_low is None or b.ci95_low is None or a.ci95_high is None or b.ci95_high is None:
        return True  # n < 2: no noise estimate, so never claim significance
    return not (a.ci95_high < b.ci95_low or b.ci95_high < a.ci95_low)


def diff(a: RunSummary, b: RunSummary) -> list[Delta]:
    out = []
    for metric, unit, lower_better in COMPARED:
        sa, sb = a.aggregates.get(metric), b.aggregates.get(metric)
        if sa is None or sb is None:
            continue
        delta = sb.mean - sa.mean
        pct = 100.0 * delta / sa.mean if sa.mean else None
        significant = not _overlap(sa, sb)
        if not significant:
            verdict = "within noise"
        elif (delta < 0) == lower_better:
            verdict = "better"
        else:
            verdict = "WORSE"
        out.append(Delta(metric, unit, sa.mean, sb.mean, delta, pct, significant, verdict))
    return out


def render(a_path: Path, a: RunSummary, b_path: Path, b: RunSummary) -> str:
    rows = diff(a, b)
    lines = [
        f"# Compare `{a_path.name}` (A) → `{b_path.name}` (B)\n",
        f"A: {a.model.name} on {a.hardware.gpu_name or a.hardware.device}, status {a.run.status}  ",
        f"B: {b.model.name} on {b.hardware.gpu_name or b.hardware.device}, status {b.run.status}\n",
        "A difference is significant when the 95 % confidence intervals of the two means do not overlap.\n",
        "| metric | unit | A mean | B mean | Δ | Δ % | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in rows:
        pct = "n/a" if d.pct is None else f"{d.pct:+.1f} %"
        mark = f"**{d.verdict}**" if d.significant else d.verdict
        lines.append(f"| {d.metric} | {d.unit} | {d.a:,.3f} | {d.b:,.3f} | {d.delta:+,.3f} | {pct} | {mark} |")
    if a.hardware.gpu_name != b.hardware.gpu_name or a.hardware.device != b.hardware.device:
        lines.append("\n⚠ The runs are on different devices: differences include the hardware.")
    if a.run.config.get("model") != b.run.config.get("model"):
        lines.append("\n⚠ The model configs differ.")
    return "\n".join(lines) + "\n"


def compare_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llm-perf-opt compare", description=__doc__)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("-o", "--output", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    try:
        a, b = load_run(args.run_a), load_run(args.run_b)
    except CompareError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    text = render(args.run_a, a, args.run_b, b)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 1 if any(d.verdict == "WORSE" for d in diff(a, b)) else 0
