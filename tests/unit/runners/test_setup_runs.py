"""Runs flagged one_time_setup (graphs captured or compiled inside a timed prefill) stay out of the aggregates."""

from __future__ import annotations

from llm_perf_opt.results.types import PageRecord
from llm_perf_opt.runners.page_record import setup_runs_note, split_setup_runs


def _record(page_id: str, repeat: int, flags: list[str]) -> PageRecord:
    return PageRecord(page_id=page_id, repeat=repeat, status="ok", flags=flags)


def test_setup_flagged_runs_are_split_out_and_named() -> None:
    a0 = _record("a", 0, ["one_time_setup: a new view shape ..."])
    a1 = _record("a", 1, [])
    b0 = _record("b", 0, ["single_token: eos right after prefill"])
    steady, setup = split_setup_runs([a0, a1, b0])
    assert steady == [a1, b0]  # other flags do not exclude a run
    assert setup == [a0]
    (note,) = setup_runs_note(setup)
    assert note.startswith("1 page run(s) flagged one_time_setup left out of the aggregates")
    assert note.endswith("a (repeat 0)")


def test_no_setup_runs_no_note() -> None:
    steady, setup = split_setup_runs([_record("a", 0, [])])
    assert len(steady) == 1 and setup == []
    assert setup_runs_note(setup) == []
