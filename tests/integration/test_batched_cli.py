"""infer.batch_size > 1 adds a batched-throughput phase to a run, through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_perf_opt.results.serialize import read_summary
from llm_perf_opt.results.types import BatchRecord
from tests.integration.conftest import SMALL, read_jsonl, run_cli


def test_batched_throughput_phase(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*SMALL, "dataset.sizes=[[300,200],[200,300],[260,400]]", "infer.batch_size=2", "repeats=2",
            "infer.batching=static"]  # fmt: skip
    result = run_cli(args, run_dir=run_dir)
    assert result.returncode == 0, result.describe()
    s = read_summary(run_dir / "metrics.json")
    assert s.run.status == "complete"
    # 3 pages in batches of at most 2, two repeats: [2, 1] per repeat
    assert sorted(b.batch for b in s.batches) == [1, 1, 2, 2]
    assert len(read_jsonl(run_dir / "batches.jsonl")) == 4
    for b in s.batches:
        assert len(b.page_ids) == b.batch and len(b.tpot_ms) == b.batch
        assert 0 < b.vision_ms < b.prefill_ms
        assert b.output_tokens <= 8 * b.batch
        assert b.pages_per_s is not None and b.pages_per_s > 0
        # the default no_repeat_ngram_size runs on the device in the static step (CPU: un-graphed); it forced the
        # host loop before the rule moved into the step
        assert b.decode_path == "static"
        assert b.finished_rows_attend is False  # infer.static_skip_keys (on by default)
    report = (run_dir / "report.md").read_text()
    assert "## Batched throughput (batch size 2)" in report
    assert "Decode path: static (static step" in report
    assert "a finished sequence's attention sees its newest key only and no row sees its left pads" in report
    # pages prepared by the pool (default 4 workers): every batch records its wait; the end-to-end line adds them
    assert all(b.page_wait_ms is not None and b.page_wait_ms >= 0 for b in s.batches)
    assert "End to end, preprocessing included" in report
    # the per-page latency repeats still ran alongside
    assert len(s.ok_pages) == 6


def test_batched_phase_uses_the_static_step_without_ngram_rule(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*SMALL, "dataset.sizes=[[300,200],[200,300]]", "infer.batch_size=2", "infer.no_repeat_ngram_size=0",
            "infer.preprocess_workers=0", "infer.batching=static"]  # fmt: skip
    result = run_cli(args, run_dir=run_dir)
    assert result.returncode == 0, result.describe()
    s = read_summary(run_dir / "metrics.json")
    assert [b.decode_path for b in s.batches] == ["static"]
    (wait_ms,) = [b.page_wait_ms for b in s.batches]  # serial: the batch's whole preparation is waited for
    assert wait_ms is not None and wait_ms > 0  # CPU: the static step runs un-graphed
    assert s.batches[0].graph_capture_ms == 0.0
    assert "Decode path: static" in (run_dir / "report.md").read_text()


def test_batch_larger_than_dataset_warns_and_num_pages_fills_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*SMALL, "dataset.sizes=[[300,200],[200,300]]", "infer.batch_size=3", "infer.no_repeat_ngram_size=0",
            "infer.batching=static"]  # fmt: skip
    result = run_cli(args, run_dir=run_dir)
    assert result.returncode == 0, result.describe()
    s = read_summary(run_dir / "metrics.json")
    assert [b.batch for b in s.batches] == [2] and s.batches[0].requested_batch == 3
    warning = "infer.batch_size=3 exceeds the dataset's 2 page(s)"
    assert any(warning in n for n in s.notes)
    assert warning in result.stderr + result.stdout  # the log line
    report = (run_dir / "report.md").read_text()
    assert "**Warning:** infer.batch_size=3 but batches ran with at most 2 page(s)" in report

    # continuous batching: 3 slots, 2 pages -> the same warning (one slot stayed empty)
    result = run_cli([*args[:-1], "infer.batching=continuous"], run_dir=tmp_path / "run-c")
    assert result.returncode == 0, result.describe()
    assert "**Warning:** infer.batch_size=3 but batches ran with at most 2 page(s)" in (
        tmp_path / "run-c" / "report.md").read_text()  # fmt: skip
    # infer.continuous_skip_keys (on by default): a row ended by eos saw its newest key only, and the record says so
    assert [b.finished_rows_attend for b in read_summary(tmp_path / "run-c" / "metrics.json").batches] == [False]

    run_dir = tmp_path / "run2"
    result = run_cli([*args, "dataset.num_pages=3", "repeats=1"], run_dir=run_dir)
    assert result.returncode == 0, result.describe()
    s = read_summary(run_dir / "metrics.json")
    assert [b.batch for b in s.batches] == [3]
    assert s.batches[0].page_ids == ["synthetic-300x200-0", "synthetic-200x300-1", "synthetic-300x200-2"]
    assert not any("exceeds the dataset" in n for n in s.notes)
    assert "**Warning:**" not in (run_dir / "report.md").read_text()


def test_dummy_weights_end_at_the_page_target_length(tmp_path: Path) -> None:
    """Hand-written targets 3 and 20 with a cap of 6: page a ends at 3 ("simulated eos"), page b at the cap."""
    from PIL import Image

    root = tmp_path / "pages"
    root.mkdir()
    for name, size in (("a.png", (300, 200)), ("b.png", (200, 300))):
        Image.new("RGB", size, (255, 255, 255)).save(root / name)
    (root / "lengths.txt").write_text("a.png 3\nb.png 20\n")
    run_dir = tmp_path / "run"
    small = [a for a in SMALL if not a.startswith(("dataset.", "infer.max_new_tokens"))]
    args = [*small, "dataset=folder", f"dataset.root={root}", "dataset.lengths_file=lengths.txt",
            "infer.max_new_tokens=6", "infer.batch_size=2", "infer.no_repeat_ngram_size=0",
            "infer.batching=static"]  # fmt: skip
    result = run_cli(args, run_dir=run_dir)
    assert result.returncode == 0, result.describe()
    s = read_summary(run_dir / "metrics.json")
    by_id = {p.page_id: p for p in s.ok_pages}
    assert (by_id["a.png"].generated_tokens, by_id["a.png"].simulated_eos, by_id["a.png"].hit_token_cap) == (
        3, True, False)  # fmt: skip
    assert (by_id["b.png"].generated_tokens, by_id["b.png"].simulated_eos, by_id["b.png"].hit_token_cap) == (
        6, False, True)  # fmt: skip
    assert not any(p.stopped_by_eos for p in s.ok_pages)
    (batch,) = s.batches
    assert batch.page_ids == ["a.png", "b.png"] and batch.simulated_eos == [True, False]
    assert batch.output_tokens == 3 + 6
    assert any(n.startswith("simulated eos: 1 of 2 page run(s)") for n in s.notes)
    report = (run_dir / "report.md").read_text()
    assert "Simulated eos: 1 of 2 sequences ended at their page's target output length" in report


TARGETS = {"a.png": 2, "b.png": 7, "c.png": 3, "d.png": 5}


def _continuous_args(tmp_path: Path) -> list[str]:
    """4 pages with targets 2, 7, 3, 5 (cap 8) plus one unreadable page, through 2 slots."""
    from PIL import Image

    root = tmp_path / "pages"
    root.mkdir()
    for i, name in enumerate(TARGETS):
        Image.new("RGB", (300 - 20 * i, 200 + 30 * i), (255, 255, 255)).save(root / name)
    Image.new("RGB", (10, 10)).save(root / "e.png")
    (root / "e.png").write_bytes(b"not a png")  # left out of the batched phase with a note, not a failed run
    (root / "lengths.txt").write_text("".join(f"{k} {v}\n" for k, v in TARGETS.items()) + "e.png 4\n")
    small = [a for a in SMALL if not a.startswith(("dataset.", "infer.max_new_tokens"))]
    return [*small, "dataset=folder", f"dataset.root={root}", "dataset.lengths_file=lengths.txt",
            "infer.max_new_tokens=8", "infer.batch_size=2", "per_page_pages=1"]  # fmt: skip


def test_continuous_batching_phase(tmp_path: Path) -> None:
    """The default batching: 4 pages with targets 2, 7, 3, 5 (cap 8) through 2 slots, one record per repeat;
    pages prepared by the prefetcher, the phase summed up end to end."""
    targets = TARGETS
    run_dir = tmp_path / "run"
    result = run_cli([*_continuous_args(tmp_path), "repeats=2"], run_dir=run_dir)
    assert result.returncode == 0, result.describe()
    s = read_summary(run_dir / "metrics.json")
    assert [(p.page_id, p.repeat) for p in s.pages] == [("a.png", 0), ("a.png", 1)]  # per-page: the first page only
    assert [b.batching for b in s.batches] == ["continuous", "continuous"]
    for b in s.batches:
        assert b.batch == 2 and b.page_ids == list(targets)  # the bad page is left out, the rest in order
        assert b.output_tokens == sum(targets.values()) and all(b.simulated_eos)
        assert b.fills >= 2  # refilled as slots ended
        # decode steps by hand: slot 0 runs a (1 step), then c (2), then d (4) = 7; slot 1 runs b (6 steps)
        assert b.decode_steps == 7
        assert b.slot_occupancy == (1 + 6 + 2 + 4) / (7 * 2)
        # the last page (d) starts decoding at step 3: steps 3-6 drain, producing b's last 3 tokens and d's 4
        assert (b.drain_steps, b.drain_tokens) == (4, 7)
        # b ends after step 5 with no page left: d (one row of two) runs its last step 6 on a one-row step
        assert b.narrowed_steps == 1
        assert b.row_steps == 6 * 2 + 1 * 1  # the narrowed step computed one row
        # a (1 step), b (6), c (2), d (4) attend over L + 1, ..., L + n keys in their n steps, L their prompt
        # length (at most the longest, padded_prompt_tokens; test_continuous checks the sum by hand)
        assert b.key_steps is not None and 13 + 35 < b.key_steps <= 13 * b.padded_prompt_tokens + 35
        assert b.page_wait_ms is not None and b.page_wait_ms >= 0
        # infer.refill_prefill=auto on the CPU (no graph replays): batched, recorded as resolved
        assert b.pages_prefilled_per_page is None and b.refill_prefill == "batched"
    assert "Refills' LM prefill: batched (one left-padded forward" in (run_dir / "report.md").read_text()
    assert any("page e.png left out" in n for n in s.notes)
    p = s.batched_phase
    assert p is not None and p.batching == "continuous" and p.slots == 2 and p.pages == 8
    assert p.output_tokens == 2 * sum(targets.values())
    assert p.slot_occupancy == (1 + 6 + 2 + 4) / (7 * 2)
    assert p.row_occupancy == 1.0  # 13 decode tokens from 13 computed rows: no row computed in vain
    assert p.gpu_busy_share is None and p.gpu_busy_unavailable is not None  # CPU: said why, never a number
    assert p.wall_ms >= p.stage_ms > 0
    # the CPU step counts no routed experts (only the Triton grouped kernels do): a lower bound, and no peak
    t = p.decode_traffic
    assert t is not None and t.lower_bound and "counted on the device in 0 of 14 steps" in t.note
    assert t.seconds == pytest.approx(sum(b.decode_ms for b in s.batches) / 1e3) and t.mbu is None
    report = (run_dir / "report.md").read_text()
    assert "decode bandwidth achieved (traffic ÷ decode time) / MBU | ≥ " in report
    assert "Continuous batching: 2 run(s) (one per repeat) through 2 sequence slots" in report
    assert "### The batched phase end to end" in report
    assert "GPU busy share" in report and "no GPU (cpu)" in report
    # pages, not slots: 8 sequences (4 pages x 2 repeats) through 2 slots, all ended at their targets
    assert "Simulated eos: 8 of 8 sequences" in report
    e2e = s.batch_aggregates["e2e_per_page_ms"]
    want = [(b.page_wait_ms + b.prefill_ms + b.decode_ms) / 4 for b in s.batches if b.page_wait_ms is not None]
    assert sorted([e2e.min, e2e.max]) == pytest.approx(sorted([min(want), max(want)]))


def test_continuous_batching_without_narrowing(tmp_path: Path) -> None:
    """``infer.narrow_drain=false``: the same steps and tokens at full width to the end (nothing narrowed)."""
    run_dir = tmp_path / "run"
    result = run_cli([*_continuous_args(tmp_path), "repeats=1", "infer.narrow_drain=false"], run_dir=run_dir)
    assert result.returncode == 0, result.describe()
    (b,) = read_summary(run_dir / "metrics.json").batches
    assert (b.decode_steps, b.drain_steps, b.narrowed_steps) == (7, 4, 0)
    assert b.row_steps == 7 * 2  # the last step still computes b's finished row
    assert b.output_tokens == sum(TARGETS.values())
    report = (run_dir / "report.md").read_text()
    assert "4 decode steps, 0 of them on a narrower batch" in report


def _plain_schedule_run(tmp_path: Path, *overrides: str) -> tuple[BatchRecord, Path]:
    """One repeat of the continuous workload with ``overrides`` through the CLI: its one record, checked to follow
    the plain run's schedule by hand (7 decode steps, 4 of them the drain with 7 tokens, one narrowed; every target
    reached; 3 fills), and the run dir."""
    run_dir = tmp_path / "run"
    result = run_cli([*_continuous_args(tmp_path), "repeats=1", *overrides], run_dir=run_dir)
    assert result.returncode == 0, result.describe()
    (b,) = read_summary(run_dir / "metrics.json").batches
    assert (b.decode_steps, b.drain_steps, b.drain_tokens, b.narrowed_steps) == (7, 4, 7, 1)
    assert b.output_tokens == sum(TARGETS.values()) and b.fills == 3
    return b, run_dir


def test_continuous_batching_with_vision_ahead(tmp_path: Path) -> None:
    """``infer.refill_vision_ahead=1``: the run's schedule is the plain one (the same 7 steps, drain and narrowed
    step), and the pages whose vision ran ahead are counted and timed apart.  By hand: the first fill takes a and b,
    c's vision runs ahead; a ends after step 1 and c fills its slot from ahead (d runs ahead), c ends after step 3
    and d fills from ahead: 2 pages ahead."""
    b, run_dir = _plain_schedule_run(tmp_path, "infer.refill_vision_ahead=1")
    assert b.pages_ahead == 2 and b.vision_ahead_ms is not None and b.vision_ahead_ms > 0
    report = (run_dir / "report.md").read_text()
    assert "pages whose vision ran ahead of their refill (infer.refill_vision_ahead)" in report
    assert "vision that held the slots up (fills, and enqueueing the vision run ahead" in report
    config = (run_dir / "config.yaml").read_text()
    assert "refill_vision_ahead: 1" in config


def test_continuous_batching_with_prefill_ahead(tmp_path: Path) -> None:
    """``infer.refill_prefill_ahead=true`` beside ``refill_vision_ahead=1``: the same schedule and tokens as the
    plain run (test_continuous_batching_with_vision_ahead's, by hand), and the two pages run ahead have their LM
    prefill counted and timed apart in the record and in the report."""
    b, run_dir = _plain_schedule_run(tmp_path, "infer.refill_vision_ahead=1", "infer.refill_prefill_ahead=true")
    assert b.pages_ahead == 2 and b.pages_prefilled_ahead == 2
    assert b.prefill_ahead_ms is not None and b.prefill_ahead_ms > 0
    report = (run_dir / "report.md").read_text()
    assert "pages whose LM prefill ran ahead of their refill (infer.refill_prefill_ahead)" in report
    assert "refill_prefill_ahead: true" in (run_dir / "config.yaml").read_text()


def test_continuous_batching_with_refills_prefilled_page_by_page(tmp_path: Path) -> None:
    """``infer.refill_prefill=per_page``: the plain run's schedule and tokens (test_continuous_batching_phase's, by
    hand: a and b fill the slots, then c and d come one refill each), with the two refill pages counted as prefilled
    page by page, in the record and in the report; the setting is recorded in config.yaml."""
    b, run_dir = _plain_schedule_run(tmp_path, "infer.refill_prefill=per_page")
    assert b.pages_prefilled_per_page == 2 and b.pages_ahead is None and b.refill_prefill == "per_page"
    report = (run_dir / "report.md").read_text()
    assert "refill pages prefilled page by page (infer.refill_prefill=per_page, or auto" in report
    assert "Refills' LM prefill: page by page (the model's per-page prefill" in report
    assert "refill_prefill: per_page" in (run_dir / "config.yaml").read_text()
