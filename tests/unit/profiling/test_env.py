"""profiling/env.py: the source revision a run names (git's HEAD, or the revision a copied tree was sent from)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from llm_perf_opt.profiling.env import SOURCE_REV_ENV, git_commit


def _repo(path: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (path / "f.txt").write_text("one\n")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    return git("rev-parse", "HEAD")


def test_head_and_dirty_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SOURCE_REV_ENV, raising=False)
    head = _repo(tmp_path)
    assert git_commit(tmp_path) == head
    (tmp_path / "f.txt").write_text("two\n")
    assert git_commit(tmp_path) == f"{head}-dirty"


def test_a_copied_tree_names_the_revision_it_was_sent_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _repo(tmp_path)  # the copy's own (stale) .git
    monkeypatch.setenv(SOURCE_REV_ENV, "1a2b3c4-dirty")
    assert git_commit(tmp_path) == f"1a2b3c4-dirty (from ${SOURCE_REV_ENV})"


def test_no_repository_gives_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SOURCE_REV_ENV, raising=False)
    assert git_commit(tmp_path) is None
