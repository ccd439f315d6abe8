"""Helpers for the end-to-end tests: run the REAL CLI as a subprocess and read what it wrote.

Every run keeps its outputs under pytest's tmp_path (``hydra.run.dir`` / ``hydra.sweep.dir``), runs on CPU
with the tiny model, and is kept small (one repeat, a few tokens, one small synthetic page) unless the
test is about something else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
TINY = FIXTURES / "deepseek_ocr_tiny"
MODULE = "llm_perf_opt.runners.llm_profile_runner"

# The smallest run that still goes through every stage: warmup, profiler pass, one timed page.
SMALL = [
    "repeats=1",
    "infer.max_new_tokens=8",
    "dataset.sizes=[[300,200]]",
    "profiling/torch=torch-profiler.min",
    "output.plots=false",
    # The counted-FLOPs pass (fvcore + FlopCounterMode) at the end of a run: covered by the default run.
    "profiling.static_compute=false",
]


@attrs.frozen
class CliResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path | None

    def describe(self) -> str:
        return f"args={self.args}\nrc={self.returncode}\n--- stderr ---\n{self.stderr}\n--- stdout ---\n{self.stdout}"


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without switches that change how errors print, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "LLM_PERF_OPT_INJECT_OOM")}
    env["PYTHONUNBUFFERED"] = "1"
    # The tiny model gains nothing from intra-op threads, and on a busy 2-core box (several runs at once)
    # spinning OpenMP threads slow every run down many times over.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def cli_command(args: Sequence[str], module: str = MODULE) -> list[str]:
    return [sys.executable, "-m", module, *args]


def run_cli(
    args: Sequence[str],
    run_dir: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    module: str = MODULE,
) -> CliResult:
    """Run the CLI from the repo root; ``run_dir`` becomes ``hydra.run.dir`` (None: the args set it).

    ``module``: another ``python -m`` entry that wraps the CLI (a test-only fault injector, tests/integration).
    """
    full = list(args)
    if run_dir is not None:
        full.append(f"hydra.run.dir={run_dir}")
    proc = subprocess.run(
        cli_command(full, module),
        cwd=ROOT,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return CliResult(full, proc.returncode, proc.stdout, proc.stderr, run_dir)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(run_dir: Path) -> dict[str, Any]:
    data = json.loads((run_dir / "metrics.json").read_text())
    assert isinstance(data, dict)
    return data


def error_lines(stderr: str, kind: str) -> list[str]:
    """Lines of stderr that start with ``<kind>:`` (how the CLI prints a user error)."""
    return [line for line in stderr.splitlines() if line.startswith(f"{kind}:")]


def assert_clean_failure(result: CliResult, kind: str, *needles: str) -> str:
    """Exit != 0, exactly one ``kind: message`` line naming every needle, a hint, no traceback.

    Returns that line (the tests README quotes them).
    """
    assert result.returncode != 0, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    lines = error_lines(result.stderr, kind)
    assert len(lines) == 1, result.describe()
    line = lines[0]
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}\n{result.describe()}"
    assert "  hint: " in result.stderr, result.describe()
    return line
