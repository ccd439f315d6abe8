"""Header facts and file-name tags for the result files of ``benchmarks/``."""

from __future__ import annotations

import re

from llm_perf_opt.profiling.device import detect_device


def benchmark_header(device: object) -> dict[str, str]:
    """GPU, driver, torch, CUDA and the UTC time, for the header of a benchmark result file."""
    import datetime as dt

    facts = detect_device(device)
    return {
        "gpu": facts.gpu_name or "cpu",
        "driver": facts.driver or ("unknown" if facts.gpu_name else "-"),
        "torch": facts.torch,
        "cuda": str(facts.cuda) if facts.gpu_name else "-",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def gpu_tag(gpu_name: str) -> str:
    """Short lower-case tag for result file names: 'h100', 'h200', 'a100', 'l40s', else the name's last word."""
    for tag in ("H100", "H200", "A100", "L40S", "L4"):
        if re.search(rf"\b{tag}\b", gpu_name.upper()):
            return tag.lower()
    words = gpu_name.split()
    return words[-1].lower() if words else "cpu"
