"""``resume=<run dir>``: carry an earlier run's finished pages over instead of measuring them again.

Only comparable pages are carried.  The earlier run must have used the same model (weights source,
dtype, preprocessing), decoding rules, attention settings, device and, for seeded dummy weights, the same
seed; repeats and dataset may differ.  Its settings come from its ``config.yaml`` or, failing that, from
its ``metrics.json``: a run dir with neither is refused rather than trusted.  Each carried record must
also be a valid page record (``read_journal`` skips torn or foreign lines, naming them) of a page whose
content is unchanged (the sha256 / synthetic recipe in the earlier ``inputs.yaml``); a page that changed
or cannot be verified is measured again and the run's notes say which.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import attrs
import yaml

from llm_perf_opt.data.datasets import Page
from llm_perf_opt.errors import ConfigError
from llm_perf_opt.paths import PROJECT_ROOT
from llm_perf_opt.results.serialize import read_journal
from llm_perf_opt.results.types import PageRecord
from llm_perf_opt.runners.settings import InferSettings, ModelSettings, RunSettings, unstructured_defaults

log = logging.getLogger(__name__)

JOURNAL = "pages.jsonl"
RESUME_MUST_MATCH = ("model", "infer", "device", "use_flash_attn")
_HINT = "resume only with the same model/infer/device/attention settings (repeats and dataset may differ)"


@attrs.frozen
class EarlierRun:
    """What ``check_resume`` read from the earlier run before this run overwrites anything in it."""

    path: Path
    # page_id -> identity from the earlier inputs.yaml (sha256 or synthetic recipe); None: no inputs.yaml
    inputs: dict[str, dict[str, Any]] | None
    # settings this version has and the earlier run's config lacks, where this run uses their default
    new_keys: list[str] = attrs.field(factory=list)


@attrs.frozen
class Resumed:
    records: list[PageRecord]
    notes: list[str]


def resume_dir(resume: str) -> Path:
    path = Path(str(resume))
    return path if path.is_absolute() else PROJECT_ROOT / path


def check_resume(settings: RunSettings) -> EarlierRun | None:
    """Before anything is written to the run dir (it may be the resumed dir itself): journal and settings."""
    resume = settings.resume
    if not resume:
        return None
    path = resume_dir(str(resume))
    journal = path / JOURNAL
    if not journal.is_file():
        raise ConfigError(
            f"resume={resume}: {journal} not found",
            hint="point resume at an earlier run directory (tmp/stage1/<run_id>) in which a page finished",
        )
    new_keys = _check_same_settings(str(resume), path, settings)
    return EarlierRun(path, _earlier_inputs(path), new_keys)


def resume_records(settings: RunSettings, pages: list[Page], earlier: EarlierRun | None) -> Resumed:
    """Finished, unchanged pages of the earlier run that belong to this run's pages and repeats."""
    if earlier is None:
        return Resumed([], [])
    read = read_journal(earlier.path / JOURNAL)
    notes = [f"resume: {problem}" for problem in read.problems]
    if earlier.new_keys:
        notes.append(
            f"resume: the earlier run predates {', '.join(earlier.new_keys)}; "
            "taken as their defaults there, which this run uses too"
        )
    for note in notes:
        log.warning("%s", note)
    by_id = {p.page_id: p for p in pages}
    repeats = settings.repeats
    # Only pages of this run's dataset and repeats: a carried-over record outside them would enter the stats.
    wanted = [r for r in read.records if r.status == "ok" and r.page_id in by_id and 0 <= r.repeat < repeats]
    changed: dict[str, str] = {}
    for page_id in sorted({r.page_id for r in wanted}):
        why = _page_changed(by_id[page_id], earlier.inputs)
        if why is not None:
            changed[page_id] = why
    for page_id, why in changed.items():
        note = f"resume: page {page_id} is measured again: {why}"
        log.warning("%s", note)
        notes.append(note)
    return Resumed([r for r in wanted if r.page_id not in changed], notes)


def _earlier_inputs(path: Path) -> dict[str, dict[str, Any]] | None:
    try:
        tree = yaml.safe_load((path / "inputs.yaml").read_text(encoding="utf-8"))
        entries = tree["pages"]
        return {str(e["page_id"]): dict(e) for e in entries if isinstance(e, dict) and "page_id" in e}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        return None


def _page_changed(page: Page, earlier: dict[str, dict[str, Any]] | None) -> str | None:
    """Why the earlier record of ``page`` may not describe the page as it is now, or None."""
    if earlier is None:
        return "the earlier run has no readable inputs.yaml, so its pages cannot be verified"
    before = earlier.get(page.page_id)
    if before is None:
        return "not listed in the earlier inputs.yaml"
    now = page.describe()
    if "sha256" in now or "sha256" in before:
        if before.get("sha256") != now.get("sha256"):
            return f"its content changed (sha256 {str(before.get('sha256'))[:12]} -> {str(now.get('sha256'))[:12]})"
        return None
    differ = [
        f"{k}: {before.get(k)!r} -> {now.get(k)!r}"
        for k in ("synthetic", "size_px", "seed")
        if before.get(k) != now.get(k)
    ]
    return f"its synthetic recipe changed ({', '.join(differ)})" if differ else None


def _earlier_settings(resume: str, path: Path) -> dict[str, Any]:
    """The earlier run's resolved config: config.yaml, else metrics.json's run.config; never silently none."""
    problems = []
    try:
        tree = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        if isinstance(tree, dict):
            return tree
        problems.append("config.yaml is empty")
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        problems.append(f"config.yaml unreadable ({type(exc).__name__})")
    try:
        metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
        config = metrics["run"]["config"]
        if isinstance(config, dict):
            return config
        problems.append("metrics.json has no run.config")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        problems.append(f"metrics.json unreadable ({type(exc).__name__})")
    raise ConfigError(
        f"resume={resume}: cannot tell which settings that run used ({'; '.join(problems)}), so its pages "
        "cannot be checked for comparability",
        hint="restore its config.yaml, or start a new run without resume=",
    )


def _check_same_settings(resume: str, path: Path, settings: RunSettings) -> list[str]:
    """Carried-over pages are only comparable when model, decoding, attention and device are the same.

    A key the earlier run's config lacks (it was written by an older version) counts as that key's default:
    new settings are added with the old behaviour as default, so a run at the default still measures the same
    thing.  Returns those keys, for the run's notes.
    """
    earlier = _earlier_settings(resume, path)
    now = settings.as_config()  # resolved settings, as config.yaml records them
    keys = list(RESUME_MUST_MATCH)
    if (now.get("model") or {}).get("weights") == "dummy":
        keys.append("seed")  # seeded random weights: another seed is another model
    if (now.get("infer") or {}).get("max_new_tokens") is None:
        keys.append("max_new_tokens")  # the fallback cap is the cap
    new_keys: list[str] = []
    differ = [
        key
        for top in keys
        for key in _differing_keys(earlier.get(top), now.get(top), top, _DEFAULTS.get(top, _ABSENT), new_keys)
    ]
    if differ:
        shown = ", ".join(differ[:4]) + (f" (+{len(differ) - 4} more)" if len(differ) > 4 else "")
        raise ConfigError(
            f"resume={resume}: that run used different settings ({shown}); its pages are not comparable",
            hint=_HINT + ("; seed too, for dummy weights" if "seed" in keys else ""),
        )
    return new_keys


_ABSENT = object()
# The defaults of the settings groups that must match, as config.yaml writes them.
_DEFAULTS: dict[str, Any] = {
    "model": unstructured_defaults(ModelSettings),
    "infer": unstructured_defaults(InferSettings),
}


def _differing_keys(a: Any, b: Any, prefix: str, default: Any, new_keys: list[str]) -> list[str]:
    """Keys whose values differ; a key absent from ``a`` (older run) is compared as ``default``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            sub_default = default.get(key, _ABSENT) if isinstance(default, dict) else _ABSENT
            if key not in a and sub_default is not _ABSENT:
                a_value = sub_default
                if a_value == b.get(key):
                    new_keys.append(f"{prefix}.{key}")
                    continue
            else:
                a_value = a.get(key)
            out += _differing_keys(a_value, b.get(key), f"{prefix}.{key}", sub_default, new_keys)
        return out
    return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]
