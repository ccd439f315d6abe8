"""results/serialize.py: cattrs round trip, atomic writes, the JSONL journal, schema checks, NaN → null."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from llm_perf_opt.errors import OutputError
from llm_perf_opt.results.serialize import (
    SchemaError,
    append_journal,
    append_jsonl,
    atomic_write_text,
    converter,
    journal_line,
    read_journal,
    read_page_journal,
    read_summary,
    to_jsonable,
    write_summary,
)
from llm_perf_opt.results.types import SCHEMA_VERSION, Efficiency, PageRecord, RunSummary, StageFlops, Unavailable
from tests.unit.builders import make_failed_page, make_page, make_profile, make_summary


def _rich_summary() -> RunSummary:
    return make_summary(
        pages=[make_page("p0", experts_hit_per_layer=[3, 4]), make_page("p0", 1), make_failed_page("bad")],
        profile=make_profile(),
        flops=[StageFlops("prefill", 1.5e12, fvcore_flops=1.4e12, rel_diff_fvcore=-0.0667, components={"sam": 1e11})],
        efficiency=[Efficiency("decode", 2e9, 0.01, 2e11, 0.2, bytes_moved=1e9, mbu=0.5, arithmetic_intensity=2.0)],
        unavailable=[Unavailable("energy_j", "no NVML on CPU")],
        notes=["a note"],
        energy={"total_j": 12.5},
        status_reason=None,
    )


def test_run_summary_round_trip(tmp_path: Path) -> None:
    s = _rich_summary()
    path = tmp_path / "metrics.json"
    write_summary(path, s)
    back = read_summary(path)
    assert back == s
    # tuples come back as tuples (JSON has only lists)
    assert back.pages[0].size_px == (640, 480)
    assert isinstance(back.pages[0].size_px, tuple)
    assert back.aggregates["prefill_ms"] == s.aggregates["prefill_ms"]
    assert back.failed_pages[0].error == "boom"


def test_written_json_is_plain_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_summary(path, make_summary())
    text = path.read_text()
    assert text.endswith("\n")
    raw = json.loads(text)
    assert raw["schema_version"] == SCHEMA_VERSION
    assert raw["pages"][0]["size_px"] == [640, 480]
    assert set(raw["aggregates"]["prefill_ms"]) >= {"n", "mean", "ci95_low", "ci95_high"}


def test_page_record_round_trip_via_converter() -> None:
    rec = make_page("x", 2, flags=["nonfinite_logits: ..."], error=None)
    assert converter.structure(json.loads(json.dumps(to_jsonable(rec))), PageRecord) == rec


def test_nan_and_inf_become_null_in_json(tmp_path: Path) -> None:
    rec = make_page("p0", prefill_ms=float("nan"), tpot_ms=float("inf"), decode_tok_s=float("-inf"))
    out = to_jsonable(rec)
    assert out["prefill_ms"] is None and out["tpot_ms"] is None and out["decode_tok_s"] is None
    assert out["decode_ms"] == 160.0
    # nested containers too
    assert to_jsonable({"a": [1.0, float("nan"), (float("inf"), 2)]}) == {"a": [1.0, None, [None, 2]]}
    # the file is strict JSON (no NaN / Infinity tokens) and reads back as "not measured"
    path = tmp_path / "pages.jsonl"
    append_jsonl(path, rec)
    line = path.read_text()
    assert "NaN" not in line and "Infinity" not in line
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    (back,) = read_page_journal(path)
    assert back.prefill_ms is None and back.tpot_ms is None and back.decode_tok_s is None
    assert back.decode_ms == 160.0


def test_summary_with_nan_in_required_float_reads_back(tmp_path: Path) -> None:
    """Documents the write/read asymmetry: NaN in a non-Optional float is written as null."""
    s = make_summary(energy={"total_j": float("nan")})
    path = tmp_path / "metrics.json"
    write_summary(path, s)
    assert json.loads(path.read_text())["energy"] == {"total_j": None}


def test_nan_in_required_float_round_trips(tmp_path: Path) -> None:
    s = make_summary(energy={"total_j": float("nan")}, pages=[make_page("p0", decode_step_ms=[1.0, float("nan")])])
    path = tmp_path / "metrics.json"
    write_summary(path, s)
    back = read_summary(path)
    assert math.isnan(back.energy["total_j"])


def test_read_summary_rejects_other_schema_major(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_summary(path, make_summary(schema_version="2.0"))
    with pytest.raises(SchemaError, match=r"schema_version 2\.0.*reads 1\.x"):
        read_summary(path)


def test_read_summary_rejects_missing_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    raw = to_jsonable(make_summary())
    del raw["schema_version"]
    path.write_text(json.dumps(raw))
    with pytest.raises(SchemaError, match="schema_version 0"):
        read_summary(path)


def test_read_summary_accepts_same_major_other_minor(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    major = SCHEMA_VERSION.split(".")[0]
    write_summary(path, make_summary(schema_version=f"{major}.9"))
    assert read_summary(path).schema_version == f"{major}.9"


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "report.md"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "new ü\n")
    assert path.read_text(encoding="utf-8") == "new ü\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_atomic_write_into_missing_dir_raises_output_error(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "dir" / "metrics.json"
    with pytest.raises(OutputError, match="could not write") as info:
        atomic_write_text(target, "x")
    assert info.value.hint and "disk space" in info.value.hint
    assert not target.exists()


def _fail_replace(*_a: object, **_k: object) -> None:
    raise OSError(28, "No space left on device")


def test_atomic_write_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")
    monkeypatch.setattr(os, "replace", _fail_replace)
    with pytest.raises(OutputError, match="No space left on device"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"


def test_atomic_write_failure_removes_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")
    monkeypatch.setattr(os, "replace", _fail_replace)
    with pytest.raises(OutputError):
        atomic_write_text(path, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_append_jsonl_appends_one_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "pages.jsonl"
    recs = [make_page("a"), make_failed_page("b", error="out of memory"), make_page("c", 1)]
    for r in recs:
        append_jsonl(path, r)
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert [json.loads(x)["page_id"] for x in lines] == ["a", "b", "c"]
    assert read_page_journal(path) == recs


def test_append_jsonl_to_missing_dir_raises_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="could not append"):
        append_jsonl(tmp_path / "missing" / "pages.jsonl", make_page())


def test_journal_skips_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "pages.jsonl"
    append_jsonl(path, make_page("a"))
    append_jsonl(path, make_page("b"))
    full = json.dumps(to_jsonable(make_page("c")))
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(full[: len(full) // 2])  # crash mid-append: no newline, half a record
    recs = read_page_journal(path)
    assert [r.page_id for r in recs] == ["a", "b"]


def test_journal_corrupt_middle_line_is_skipped_and_named(tmp_path: Path) -> None:
    # Behaviour change (issue 16): a bad line anywhere used to end resume with a JSONDecodeError traceback;
    # now it is skipped and reported with its line number, and every valid record is kept.
    path = tmp_path / "pages.jsonl"
    append_journal(path, make_page("a"))
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"page_id": "tor\n')
    append_journal(path, make_page("b"))
    read = read_journal(path)
    assert [r.page_id for r in read.records] == ["a", "b"]
    assert len(read.problems) == 1 and read.problems[0].startswith("pages.jsonl line 2: not JSON")


def test_journal_ignores_blank_lines_and_missing_file(tmp_path: Path) -> None:
    assert read_page_journal(tmp_path / "nope.jsonl") == []
    path = tmp_path / "pages.jsonl"
    path.write_text("\n" + json.dumps(to_jsonable(make_page("a"))) + "\n\n   \n")
    assert [r.page_id for r in read_page_journal(path)] == ["a"]


# ----------------------------------------------------------------------- journal that survives anything


def test_journal_line_carries_a_crc_of_its_own_text(tmp_path: Path) -> None:
    import zlib

    line = journal_line(make_page("a")).decode()
    assert line.endswith("}\n") and line.count("\n") == 1
    body, crc = line[: line.rindex(', "_crc32"')] + "}", json.loads(line)["_crc32"]
    assert crc == f"{zlib.crc32(body.encode()):08x}"  # independent recomputation of the stored checksum
    assert json.loads(body) == to_jsonable(make_page("a"))


def test_append_after_a_torn_tail_starts_a_new_line(tmp_path: Path) -> None:
    path = tmp_path / "pages.jsonl"
    append_journal(path, make_page("a"))
    full = journal_line(make_page("b")).decode()
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(full[:40])  # SIGKILL mid-write: no newline
    append_journal(path, make_page("c"))
    lines = path.read_text().split("\n")
    assert lines[1] == full[:40]  # the torn text stays on its own line, not glued to c
    read = read_journal(path)
    assert [r.page_id for r in read.records] == ["a", "c"]
    assert len(read.problems) == 1 and read.problems[0].startswith("pages.jsonl line 2: not JSON"), read.problems


BAD_LINES = [
    (b'{"foo": 1}', "not a page record (needs page_id, repeat, status)"),
    (b"\xff\xfe\x00garbage", "not UTF-8 text"),
    (b"garbage", "not JSON"),
    (b"[1, 2, 3]", "not a page record"),
    (b'{"page_id": "x", "repeat": "abc", "status": "ok"}', "not a page record"),
    (b'{"page_id": "x", "repeat": 0, "status": "weird"}', "not a page record"),
    (b'{"page_id": "x", "repeat": -1, "status": "ok"}', "not a page record"),
]


@pytest.mark.parametrize(("bad", "why"), BAD_LINES)
def test_invalid_journal_lines_are_skipped_with_the_line_named(tmp_path: Path, bad: bytes, why: str) -> None:
    path = tmp_path / "pages.jsonl"
    append_journal(path, make_page("a"))
    with open(path, "ab") as fh:
        fh.write(bad + b"\n")
    append_journal(path, make_page("b"))
    read = read_journal(path)
    assert [r.page_id for r in read.records] == ["a", "b"]
    assert len(read.problems) == 1 and read.problems[0].startswith(f"pages.jsonl line 2: {why}"), read.problems


def test_edited_record_fails_its_checksum(tmp_path: Path) -> None:
    path = tmp_path / "pages.jsonl"
    append_journal(path, make_page("a"))
    path.write_text(path.read_text().replace('"repeat": 0', '"repeat": 1'))
    read = read_journal(path)
    assert read.records == []
    assert read.problems == ["pages.jsonl line 1: checksum mismatch (torn or edited), skipped"]


def test_duplicate_records_collapse_to_the_last(tmp_path: Path) -> None:
    path = tmp_path / "pages.jsonl"
    append_journal(path, make_failed_page("a", error="oom"))
    append_journal(path, make_page("b"))
    append_journal(path, make_page("a"))
    read = read_journal(path)
    assert [(r.page_id, r.status) for r in read.records] == [("b", "ok"), ("a", "ok")]
    assert read.problems == ["pages.jsonl line 3: second record of page a repeat 0, kept this one"]


def test_journal_without_checksums_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "pages.jsonl"  # journals written before the checksum existed
    path.write_text("".join(json.dumps(to_jsonable(make_page(p))) + "\n" for p in ("a", "b")))
    assert [r.page_id for r in read_page_journal(path)] == ["a", "b"]


def test_failed_append_leaves_no_partial_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    path = tmp_path / "pages.jsonl"
    append_journal(path, make_page("a"))
    before = path.read_bytes()
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:  # the device took half, then ran out of space
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(OutputError, match=os.strerror(errno.ENOSPC)):
        append_journal(path, make_page("b"))
    monkeypatch.undo()
    assert path.read_bytes() == before
    append_journal(path, make_page("c"))
    assert [r.page_id for r in read_journal(path).records] == ["a", "c"]


def test_a_batched_phase_with_its_traffic_round_trips_and_a_schema_1_7_file_still_reads(tmp_path: Path) -> None:
    """A 1.8 summary carries the decode traffic (a nested record) and each batch's keys; a 1.7 file has neither
    and reads back with both absent, and its report says why instead of a figure."""
    import attrs

    from llm_perf_opt.report.markdown import render_report
    from llm_perf_opt.results.types import BatchedPhase, BatchRecord, DecodeTraffic

    batch = BatchRecord(0, ["p0"], 1, 9, 9, 1.0, 2.0, 3.0, None, None, [], decode_steps=8, row_steps=8, key_steps=100)
    traffic = DecodeTraffic(10**9, 0.003, 1e9 / 0.003, 0.1, True, "some counted", 8 * 10**8, 2 * 10**8, None)
    phase = BatchedPhase("static", 1, 1, 1, 9, 10.0, 6.0, 1.0, 3.0, 100.0, 900.0, 1.0, 0.6, decode_traffic=traffic)
    s = attrs.evolve(make_summary(pages=[make_page("p0")]), batches=[batch], batched_phase=phase)
    path = tmp_path / "metrics.json"
    write_summary(path, s)
    assert read_summary(path) == s
    raw = json.loads(path.read_text())
    raw["schema_version"] = "1.7"
    del raw["batched_phase"]["decode_traffic"], raw["batched_phase"]["decode_traffic_unavailable"]
    del raw["batches"][0]["key_steps"]
    path.write_text(json.dumps(raw))
    old = read_summary(path)
    assert old.batches[0].key_steps is None and old.batched_phase is not None
    assert old.batched_phase.decode_traffic is None and old.batched_phase.decode_gb_per_s is None
    assert "n/a (not computed: written before schema 1.8)" in render_report(old)
