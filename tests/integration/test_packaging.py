"""The wheel is self-contained: it carries the Hydra configs, and the installed layout composes them.

Builds the wheel (no isolation: the venv's setuptools), unpacks it as an installed package would be, and runs
the entry from another directory with only the unpacked copy on the path (dependencies from the venv).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: an in-tree build leaves build/lib behind, whose stale modules would leak into wheels.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(CONF, src / "conf")
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=out,
    )
    if build.returncode != 0 and "No module named pip" in build.stderr:
        pytest.skip("pip is not available in this interpreter")
    assert build.returncode == 0, build.stderr
    (whl,) = out.glob("llm_perf_opt-*.whl")
    return whl


def test_wheel_carries_every_config_and_no_tests(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"llm_perf_opt/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert expected and expected <= names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: MIT" in text
    dev_only = [line for line in text.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not any(tool in line for line in dev_only for tool in ("pytest", "ruff", "mypy", "triton"))


def test_installed_layout_composes_its_own_configs(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run(
        [sys.executable, "-c", "from llm_perf_opt import paths; print(paths.CONF_DIR); print(paths.PROJECT_ROOT)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    conf_dir, root = probe.stdout.split()
    assert Path(conf_dir) == site / "llm_perf_opt" / "conf"
    assert Path(root) == work  # relative run dirs land where the user runs the tool
    job = subprocess.run(
        [sys.executable, "-m", "llm_perf_opt.runners.llm_profile_runner", "--cfg", "job", "repeats=5"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert job.returncode == 0, job.stderr
    assert "repeats: 5" in job.stdout.splitlines()  # the override reached the composed config
    assert "dataset:" in job.stdout.splitlines()  # groups resolved from the packaged conf/
