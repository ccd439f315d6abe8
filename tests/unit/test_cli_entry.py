"""cli.py: `llm-perf-opt --help` lists the subcommands; `profile` hands Hydra the overrides alone."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from llm_perf_opt import cli


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llm_perf_opt.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_help_lists_every_subcommand() -> None:
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    section = result.stdout.split("subcommands:")[1]
    listed = [line.split()[0] for line in section.splitlines() if re.match(r"^  \w", line)]  # one line per command
    assert listed == ["profile", "compare"]


def test_profile_help_is_hydras_and_points_at_compare() -> None:
    result = _run("profile", "--help")
    assert result.returncode == 0, result.stderr
    assert "== Config ==" in result.stdout  # Hydra's help: the composed config follows
    assert "llm-perf-opt compare RUN_A RUN_B" in result.stdout


@pytest.mark.parametrize(
    ("argv", "hydra_argv"),
    [
        (["profile", "repeats=2", "device=cpu"], ["repeats=2", "device=cpu"]),
        (["repeats=2"], ["repeats=2"]),  # no subcommand: bare overrides are a profiling run
        ([], []),
    ],
)
def test_profile_strips_the_subcommand(monkeypatch: pytest.MonkeyPatch, argv: list[str], hydra_argv: list[str]) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr("llm_perf_opt.runners.llm_profile_runner.main", lambda: seen.append(sys.argv[1:]))
    monkeypatch.setattr(sys, "argv", ["llm-perf-opt", *argv])
    cli.main()
    assert seen == [hydra_argv]


def test_compare_exit_code_for_a_non_run_dir(tmp_path: Path) -> None:
    result = _run("compare", str(tmp_path), str(tmp_path))
    assert result.returncode == 2
    assert "compare:" in result.stderr
