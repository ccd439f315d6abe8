"""``resume=<run dir>``: carry an earlier run's finished pages over instead of measuring them again.

Only comparable pages are carried: the earlier run must have used the same model, decoding and device
settings (repeats and dataset may differ), and only records of this run's pages and repeats count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from llm_perf_opt.data.datasets import Page
from llm_perf_opt.errors import ConfigError
from llm_perf_opt.paths import PROJECT_ROOT
from llm_perf_opt.results.serialize import read_page_journal
from llm_perf_opt.results.types import PageRecord
from llm_perf_opt.runners.settings import RunSettings

JOURNAL = "pages.jsonl"
RESUME_MUST_MATCH = ("model", "infer", "device")


def resume_dir(resume: str) -> Path:
    path = Path(str(resume))
    return path if path.is_absolute() else PROJECT_ROOT / path


def check_resume(settings: RunSettings) -> None:
    """Before anything is written to the run dir (it may be the resumed dir itself): journal and settings."""
    resume = settings.resume
    if not resume:
        return
    path = resume_dir(str(resume))
    journal = path / JOURNAL
    if not journal.is_file():
        raise ConfigError(
            f"resume={resume}: {journal} not found",
            hint="point resume at an earlier run directory (tmp/stage1/<run_id>)",
        )
    _check_same_settings(resume, path, settings)


def resume_records(settings: RunSettings, pages: list[Page]) -> list[PageRecord]:
    """Finished pages of the earlier run that belong to this run's pages and repeats (after check_resume)."""
    resume = settings.resume
    if not resume:
        return []
    records = [r for r in read_page_journal(resume_dir(str(resume)) / JOURNAL) if r.status == "ok"]
    # Only pages of this run's dataset and repeats: a carried-over record outside them would enter the stats.
    ids = {p.page_id for p in pages}
    return [r for r in records if r.page_id in ids and 0 <= r.repeat < settings.repeats]


def _check_same_settings(resume: str, path: Path, settings: RunSettings) -> None:
    """Carried-over pages are only comparable when model, decoding and device are the same."""
    try:
        earlier = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return  # an older run dir without config.yaml: nothing to compare against
    now = settings.as_config()  # resolved settings, as config.yaml records them
    differ = [key for top in RESUME_MUST_MATCH for key in _differing_keys(earlier.get(top), now.get(top), top)]
    if differ:
        shown = ", ".join(differ[:4]) + (f" (+{len(differ) - 4} more)" if len(differ) > 4 else "")
        raise ConfigError(
            f"resume={resume}: that run used different settings ({shown}); its pages are not comparable",
            hint=f"resume only with the same {'/'.join(RESUME_MUST_MATCH)} settings (repeats and dataset may differ)",
        )


def _differing_keys(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            k for key in sorted(set(a) | set(b)) for k in _differing_keys(a.get(key), b.get(key), f"{prefix}.{key}")
        ]
    return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]
