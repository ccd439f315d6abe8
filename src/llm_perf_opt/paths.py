"""Where the configs and the project live.

Two layouts: a source checkout (editable install or ``PYTHONPATH=src``) reads the repository's ``conf/`` and
resolves relative paths in configs (run dirs, datasets, models) against the repository root; an installed
wheel carries its own copy of the configs as ``llm_perf_opt/conf`` (copied at build time by setup.py) and
resolves relative paths against the working directory, as any command-line tool does.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_ROOT = PACKAGE_DIR.parents[1]  # src/llm_perf_opt -> the repository root, in a checkout
_PACKAGED_CONF = PACKAGE_DIR / "conf"


def _in_checkout() -> bool:
    return (_SOURCE_ROOT / "conf" / "config.yaml").is_file() and (_SOURCE_ROOT / "pyproject.toml").is_file()


if _in_checkout():
    PROJECT_ROOT = _SOURCE_ROOT
    CONF_DIR = _SOURCE_ROOT / "conf"
else:
    PROJECT_ROOT = Path.cwd()
    CONF_DIR = _PACKAGED_CONF
