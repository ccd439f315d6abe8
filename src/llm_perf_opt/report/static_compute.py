"""static_compute.md / static_compute.json: the counted-vs-analytic FLOPs table of the representative page.

The counting happens in ``profiling/static_compute.py``; this module only formats its ``StageFlops`` rows.
"""

from __future__ import annotations

import json
from pathlib import Path

from llm_perf_opt.report.format import fmt_flops, fmt_pct, table
from llm_perf_opt.results.serialize import atomic_write_text, to_jsonable
from llm_perf_opt.results.types import StageFlops


def render_static_compute(rows: list[StageFlops], page_id: str) -> str:
    lines = [
        f"# Static compute — `{page_id}`\n",
        "2 FLOPs per multiply-add everywhere (fvcore's multiply-add counts are doubled). Δ = counted ÷ "
        "(analytic + explained gap) − 1; |Δ| > 2 % is flagged ⚠.\n",
        table(
            ["stage", "analytic", "fvcore ×2", "FlopCounterMode", "Δ fvcore", "Δ FlopCounter"],
            [
                [
                    r.stage,
                    fmt_flops(r.analytic_flops),
                    fmt_flops(r.fvcore_flops),
                    fmt_flops(r.flop_counter_flops),
                    fmt_pct(r.rel_diff_fvcore),
                    fmt_pct(r.rel_diff_flop_counter) + (" ⚠" if r.flagged else ""),
                ]
                for r in rows
            ],
        ),
        "",
    ]
    for r in rows:
        lines.append(f"## {r.stage}\n")
        if r.note:
            lines.append(f"{r.note}\n")
        lines.append(table(["component", "analytic"], [[k, fmt_flops(v)] for k, v in r.components.items()]) + "\n")
    return "\n".join(lines)


def write_static_compute(out: Path, rows: list[StageFlops], page_id: str) -> None:
    """Both files atomically; the JSON carries the same rows for scripts."""
    atomic_write_text(
        out / "static_compute.json", json.dumps({"page_id": page_id, "stages": to_jsonable(rows)}, indent=2) + "\n"
    )
    atomic_write_text(out / "static_compute.md", render_static_compute(rows, page_id))
