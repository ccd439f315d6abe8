"""The one converter between result objects and JSON, and crash-safe writes.

Files that users read are written atomically (temp file in the same directory + ``os.replace``), so a
crash leaves either the old or the new file, never half of one.  Page records are also appended to a
JSONL journal as each page finishes; metrics.json is re-rendered from it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import cattrs

from llm_perf_opt.errors import OutputError
from llm_perf_opt.results.types import SCHEMA_VERSION, PageRecord, RunSummary

T = TypeVar("T")

converter = cattrs.Converter()
# NaN/Inf are written as null (JSON has neither); read them back as NaN where a float is required.
converter.register_structure_hook(float, lambda v, _: float("nan") if v is None else float(v))


def _clean(obj: Any) -> Any:
    """JSON has no NaN/Inf: turn them into None (the numeric guards already flagged them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def to_jsonable(obj: Any) -> Any:
    return _clean(converter.unstructure(obj))


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):  # best effort: the temp file may not exist any more
                os.unlink(tmp)
        raise OutputError(
            f"could not write {path}: {exc.strerror or exc}",
            hint="check free disk space and permissions of the run directory (output.dir / hydra.run.dir)",
        ) from exc


def write_summary(path: Path, summary: RunSummary) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(summary), indent=2) + "\n")


class SchemaError(ValueError):
    pass


def read_summary(path: Path) -> RunSummary:
    raw = json.loads(Path(path).read_text())
    version = str(raw.get("schema_version", "0"))
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise SchemaError(f"{path}: schema_version {version}, this tool reads {SCHEMA_VERSION.split('.')[0]}.x")
    return converter.structure(raw, RunSummary)


def append_jsonl(path: Path, record: Any) -> None:
    """Append one record and fsync: a finished page survives a crash right after."""
    line = json.dumps(to_jsonable(record)) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise OutputError(
            f"could not append to {path}: {exc.strerror or exc}",
            hint="check free disk space and permissions of the run directory",
        ) from exc


def read_page_journal(path: Path) -> list[PageRecord]:
    """Page records from the journal; a torn last line (crash mid-write) is skipped, not fatal."""
    if not Path(path).exists():
        return []
    records: list[PageRecord] = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(converter.structure(json.loads(line), PageRecord))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn final line from a crash mid-append: every complete line is kept
            raise
    return records
