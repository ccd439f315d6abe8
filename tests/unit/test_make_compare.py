"""``make compare`` keeps compare's exit status (GNU make otherwise turns every failure into 2).

The Makefile target runs against a stand-in venv whose ``python`` exits with a chosen status; its install
stamp matches, so the bootstrap step installs nothing."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make not installed")


@pytest.fixture
def fake_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text('#!/bin/sh\necho "compare called with: $*"\nexit "$FAKE_RC"\n')
    python.chmod(0o755)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (venv / ".llm-perf-opt-installed-main").write_text(f"{digest} torch==stand-in\n")
    return venv


@pytest.mark.parametrize("flags", [[], ["--no-print-directory"], ["-s"]])
@pytest.mark.parametrize("rc", [0, 1, 2])
def test_make_compare_preserves_exit_status(fake_venv: Path, rc: int, flags: list[str]) -> None:
    env = {**os.environ, "FAKE_RC": str(rc), "TORCH_SPEC": "torch==stand-in"}
    env.pop("MAKEFLAGS", None)
    proc = subprocess.run(
        ["make", *flags, "compare", f"VENV={fake_venv}", "ARGS=runA runB"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "compare called with: -m llm_perf_opt.cli compare runA runB" in proc.stdout, proc.stderr
    assert proc.returncode == rc, proc.stdout + proc.stderr
