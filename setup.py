"""Build hook: the Hydra configs ship inside the wheel.

``conf/`` stays at the repository top, where users read and edit it; a wheel (non-editable install) gets a
copy as ``llm_perf_opt/conf`` so the installed package finds its configs without the source tree
(``llm_perf_opt/paths.py`` prefers that copy when it exists).  Everything else is in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"


class BuildPyWithConf(build_py):
    """``build_py`` plus a copy of conf/*.yaml into the built package (not for editable installs: they read
    the repository's conf/ directly)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "llm_perf_opt" / "conf"
        if target.exists():
            shutil.rmtree(target)  # a stale copy must not keep configs deleted from conf/
        for src in sorted(CONF.rglob("*.yaml")):
            dst = target / src.relative_to(CONF)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


setup(cmdclass={"build_py": BuildPyWithConf})
