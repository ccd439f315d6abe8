"""Where the project lives: relative paths in configs (run dirs, datasets, models) resolve against it."""

from __future__ import annotations

from pathlib import Path

# src/llm_perf_opt/paths.py -> the repository root (an editable install keeps the source tree).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"
