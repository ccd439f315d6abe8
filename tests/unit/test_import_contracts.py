"""The import contracts of pyproject.toml (`lint-imports`) hold on src/ and catch a wrong import.

Each check runs import-linter on a copy of the package, so a deliberate bad import can be added without
touching the real tree; the contracts are the ones in the repository's pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "src" / "llm_perf_opt"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (dev extra)")


def _contracts() -> dict[str, str]:
    """Contract id -> name, read from pyproject.toml."""
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c["name"] for c in table["contracts"]}


def _copy_tree(tmp_path: Path) -> Path:
    """The package and the repository's pyproject.toml, copied under ``tmp_path``."""
    shutil.copytree(PACKAGE, tmp_path / "src" / "llm_perf_opt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _lint(root: Path, *contract_ids: str) -> subprocess.CompletedProcess[str]:
    args = [str(LINT_IMPORTS), "--no-cache", "--no-logo", *(f"--contract={c}" for c in contract_ids)]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_every_layer_rule_has_a_contract() -> None:
    assert set(_contracts()) == {"bottom", "data", "models", "profiling", "report", "runners-on-top"}


def test_report_contract_kept_then_broken_by_one_wrong_import(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    name = _contracts()["report"]
    clean = _lint(root, "report")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert f"{name} KEPT" in " ".join(clean.stdout.split())

    # The leak this issue removed: a renderer reaching into the runner.
    markdown = root / "src" / "llm_perf_opt" / "report" / "markdown.py"
    markdown.write_text(
        markdown.read_text() + "\n\ndef _leak() -> None:\n    from llm_perf_opt.runners import stage1\n"
    )
    broken = _lint(root, "report")
    out = " ".join(broken.stdout.split())
    assert broken.returncode != 0
    assert f"{name} BROKEN" in out
    assert "llm_perf_opt.report.markdown -> llm_perf_opt.runners.stage1" in out


def test_data_contract_broken_by_a_model_import(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    assert _lint(root, "data").returncode == 0
    datasets = root / "src" / "llm_perf_opt" / "data" / "datasets.py"
    datasets.write_text(datasets.read_text() + "\nfrom llm_perf_opt.models.deepseek_ocr import preprocess  # noqa\n")
    broken = _lint(root, "data")
    assert broken.returncode != 0
    assert "llm_perf_opt.data is not allowed to import llm_perf_opt.models" in " ".join(broken.stdout.split())
