"""scripts/bootstrap.sh: `main` installs the package alone, `dev` adds the dev extra, each once per stamp.

A fake venv python records every pip call instead of installing, so the check is fast and offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def fake_repo(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the script and pyproject.toml, and a venv whose python logs its arguments."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "bootstrap.sh", tmp_path / "scripts" / "bootstrap.sh")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "pip.log"
    python = venv / "bin" / "python"
    python.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    python.chmod(0o755)
    return tmp_path, log


def _bootstrap(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VENV": ".venv", "TORCH_SPEC": "torch==0.0.test"}
    return subprocess.run(
        ["bash", str(root / "scripts" / "bootstrap.sh"), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _calls(log: Path) -> list[str]:
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return lines


def test_main_then_dev_then_main(fake_repo: tuple[Path, Path]) -> None:
    root, log = fake_repo
    assert _bootstrap(root, "main").returncode == 0
    calls = _calls(log)
    assert calls[-1] == "-m pip install -q -e ."  # no extra: no pytest/ruff/mypy/triton for `make profile`
    assert "-m pip install -q torch==0.0.test" in calls
    assert _bootstrap(root, "main").returncode == 0
    assert _calls(log) == []  # stamp fresh: nothing installed again

    assert _bootstrap(root, "dev").returncode == 0
    assert _calls(log)[-1] == "-m pip install -q -e .[dev]"
    assert _bootstrap(root, "main").returncode == 0
    assert _calls(log) == []  # dev is a superset of main


def test_changed_pyproject_reinstalls(fake_repo: tuple[Path, Path]) -> None:
    root, log = fake_repo
    assert _bootstrap(root, "dev").returncode == 0
    _calls(log)
    (root / "pyproject.toml").write_text((root / "pyproject.toml").read_text() + "\n# changed\n")
    assert _bootstrap(root, "dev").returncode == 0
    assert _calls(log)[-1] == "-m pip install -q -e .[dev]"


def test_unknown_profile_is_one_clear_error(fake_repo: tuple[Path, Path]) -> None:
    root, log = fake_repo
    result = _bootstrap(root, "everything")
    assert result.returncode == 2
    assert "usage:" in result.stderr and "everything" in result.stderr
    assert _calls(log) == []
