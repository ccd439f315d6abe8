"""The one converter between result objects and JSON, and crash-safe writes.

Files that users read are written atomically (temp file in the same directory + ``os.replace``), so a
crash leaves either the old or the new file, never half of one.  Page records are also appended to a
JSONL journal as each page finishes; metrics.json is re-rendered from it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import tempfile
import zlib
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cattrs

from llm_perf_opt.errors import OutputError
from llm_perf_opt.results.types import SCHEMA_VERSION, PageRecord, RunSummary

T = TypeVar("T")
log = logging.getLogger(__name__)

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
    """Append one record as one line and fsync (predictions, batches): see ``append_line``."""
    append_line(path, (json.dumps(to_jsonable(record)) + "\n").encode("utf-8"))


def append_line(path: Path, line: bytes) -> None:
    """Append ``line`` with a single ``write`` and fsync: a finished record survives a crash right after.

    Two things keep the file line-aligned whatever happens: a file that does not end in a newline (a line
    torn by an earlier crash) gets one first, so the new record never glues onto the torn one; and a write
    that fails part-way (ENOSPC) is cut back to the old length, so a full disk leaves no half line.
    """
    fd: int | None = None
    size = 0
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(fd).st_size
        data = line if size == 0 or os.pread(fd, 1, size - 1) == b"\n" else b"\n" + line
        written = os.write(fd, data)
        if written != len(data):  # a short write only happens when the device is out of space
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        os.fsync(fd)
    except OSError as exc:
        if fd is not None:
            with contextlib.suppress(OSError):  # best effort: leave no partial line behind
                os.ftruncate(fd, size)
        raise OutputError(
            f"could not append to {path}: {exc.strerror or exc}",
            hint="check free disk space and permissions of the run directory",
        ) from exc
    finally:
        if fd is not None:
            os.close(fd)


# --------------------------------------------------------------------------------------------- page journal
# One JSON object per line, the page record's fields plus ``_crc32`` (last key): the CRC-32 of the line's
# text without that key.  A line that is torn, edited or not ours fails the check and is skipped on read,
# naming the line; plain JSONL readers still see a JSON object per line.

CRC_KEY = "_crc32"
_CRC_SUFFIX = re.compile(r', "_crc32": "([0-9a-f]{8})"}$')


def journal_line(record: PageRecord) -> bytes:
    body = json.dumps(to_jsonable(record))
    return f'{body[:-1]}, "{CRC_KEY}": "{zlib.crc32(body.encode("utf-8")):08x}"}}\n'.encode()


def append_journal(path: Path, record: PageRecord) -> None:
    append_line(path, journal_line(record))


@attrs.frozen
class JournalRead:
    """The valid records of a journal (one per (page, repeat): the last written wins) and what was skipped."""

    records: list[PageRecord]
    problems: list[str]


def read_journal(path: Path) -> JournalRead:
    """Every valid record; torn, corrupt, foreign or duplicate lines are reported in ``problems``, never fatal.

    Lines without a checksum are accepted when they structure as a page record (journals written before
    the checksum existed).  A repeated (page, repeat) keeps the last record: a resumed run appends the
    re-run of a page whose earlier record was failed or stale.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return JournalRead([], [])
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror or exc}", hint="check the file's permissions") from exc
    problems: list[str] = []
    by_key: dict[tuple[str, int], PageRecord] = {}
    lines = raw.split(b"\n")
    torn_tail = lines[-1] != b""  # every complete record ends with a newline
    for number, data in enumerate(lines, start=1):
        if not data.strip():
            continue
        where = f"{path.name} line {number}"
        if number == len(lines) and torn_tail:
            problems.append(f"{where}: torn (no newline at the end: a crash mid-write), skipped")
            continue
        record, why = _parse_journal_line(data)
        if record is None:
            problems.append(f"{where}: {why}, skipped")
            continue
        key = (record.page_id, record.repeat)
        if key in by_key:
            problems.append(f"{where}: second record of page {record.page_id} repeat {record.repeat}, kept this one")
            del by_key[key]  # re-inserted below: order follows the last write
        by_key[key] = record
    return JournalRead(list(by_key.values()), problems)


def _parse_journal_line(data: bytes) -> tuple[PageRecord | None, str]:
    try:
        text = data.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    match = _CRC_SUFFIX.search(text)
    if match is not None:
        body = text[: match.start()] + "}"
        if f"{zlib.crc32(body.encode('utf-8')):08x}" != match.group(1):
            return None, "checksum mismatch (torn or edited)"
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg})"
    if not isinstance(raw, dict) or not {"page_id", "repeat", "status"} <= raw.keys():
        return None, "not a page record (needs page_id, repeat, status)"
    raw.pop(CRC_KEY, None)
    try:
        record = converter.structure(raw, PageRecord)
    except (cattrs.BaseValidationError, KeyError, TypeError, ValueError) as exc:
        return None, f"not a page record ({_first_reason(exc)})"
    if record.status not in ("ok", "failed") or record.repeat < 0 or not record.page_id:
        return None, f"not a page record (status {record.status!r}, repeat {record.repeat})"
    return record, ""


def _first_reason(exc: Exception) -> str:
    if isinstance(exc, cattrs.BaseValidationError) and exc.exceptions:
        inner = exc.exceptions[0]
        return _first_reason(inner) if isinstance(inner, Exception) else str(inner)
    return f"{type(exc).__name__}: {exc}"


def read_page_journal(path: Path) -> list[PageRecord]:
    """The valid records of a journal; every skipped line is logged as a warning that names it."""
    result = read_journal(path)
    for problem in result.problems:
        log.warning("%s", problem)
    return result.records
