"""benchmarks/bench_batched.py's mixed-workload table: the steady-state column (drain left out) on hand-written
rows; a static row has no drain and says so.  The run-ahead modes' paired rounds on a scripted generator; a run cut
short keeps its batch rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from benchmarks.bench_batched import mixed_table


def test_mixed_table_has_the_steady_state_column() -> None:
    rows = [
        {"batching": "static", "slots": 2, "pages": 4, "output_tokens": 17, "stage_s": 2.0, "pages_per_s": 2.0,
         "output_tok_per_s": 8.5, "slot_occupancy": 0.5, "steady_output_tok_per_s": None, "ngram": 20},
        {"batching": "continuous", "slots": 2, "pages": 4, "output_tokens": 17, "stage_s": 1.0, "pages_per_s": 4.0,
         "output_tok_per_s": 17.0, "slot_occupancy": 0.75, "steady_output_tok_per_s": 12.5, "ngram": 20},
    ]  # fmt: skip
    text = mixed_table(rows, [3, 7, 2, 5])
    assert "| batching | pages/s | output tok/s | steady-state output tok/s | slot occupancy | stage s |" in text
    assert "| static | 2.000 | 8.5 | n/a (no drain) | 50.0 % | 2.000 |" in text
    assert "| continuous | 4.000 | 17.0 | 12.5 | 75.0 % | 1.000 |" in text
    captured = mixed_table([rows[0], {**rows[1], "timed_capture_s": 0.25}], [3, 7, 2, 5])
    assert "| 75.0 % | 1.000 (+0.250 s of captures in the timed run, left out) |" in captured
    assert "continuous / static = 2.00× output tok/s" in text
    assert "median 4, min 2, max 7 tokens" in text
    ahead = {**rows[1], "batching": "continuous, vision 2 ahead", "output_tok_per_s": 21.25, "vision_ahead_s": 0.25,
             "pages_ahead": 2}  # fmt: skip
    text = mixed_table([*rows, ahead], [3, 7, 2, 5])
    assert "| continuous, vision 2 ahead | 4.000 | 21.2 |" in text
    # 21.25 / 17.0 = 1.25 by hand
    assert (
        "- continuous, vision 2 ahead / continuous = 1.25× output tok/s (vision run ahead: 0.250 s over 2 pages, "
        "on a second stream on CUDA; what held the slots up is in the stage time, on CPU all of it)" in text
    )
    both = {**ahead, "batching": "continuous, vision + prefill 2 ahead", "output_tok_per_s": 25.5,
            "prefill_ahead_s": 0.125}  # fmt: skip
    text = mixed_table([*rows, ahead, both], [3, 7, 2, 5])
    # 25.5 / 17.0 = 1.5 by hand
    assert (
        "- continuous, vision + prefill 2 ahead / continuous = 1.50× output tok/s (vision run ahead: 0.250 s over 2 "
        "pages, on a second stream on CUDA; what held the slots up is in the stage time, on CPU all of it; their LM "
        "prefill run ahead: 0.125 s)" in text
    )


def test_table_shows_the_expert_slots_read_or_why_not() -> None:
    """The step table's last columns: expert slots read per MoE layer-step, the step's floor and its share of the
    measured TPOT, n/a (with the reason) where none were recorded."""
    from benchmarks.bench_batched import table

    base = {"decode": "graph", "ngram": 0, "pages_per_s": 1.0, "output_tok_per_s": 2.0, "decode_tok_per_s": 3.0,
            "ttft_s": 0.5, "tpot_p50_ms": 1.25, "tpot_p90_ms": None, "warmup_capture_s": 0.1,
            "timed_capture_s": 0.0, "peak_gib": None}  # fmt: skip
    text = table(
        [{**base, "batch": 32, "experts_read": 41.25, "floor_ms": 0.75},
         {**base, "batch": 1, "experts_read": None, "floor_ms": None, "floor_unavailable": "no datasheet bandwidth"}]
    )  # fmt: skip
    assert "| expert slots read per MoE layer-step | step floor ms | floor / TPOT p50 |" in text
    # 0.75 / 1.25 = 60 % by hand
    assert "| 32 | graph | - | 1.000 | 2.0 | 3.0 | 0.500 | 1.25 | n/a | 0.100 | n/a | 41.2 | 0.750 | 60% |" in text
    assert "| 1 | graph | - | 1.000 | 2.0 | 3.0 | 0.500 | 1.25 | n/a | 0.100 | n/a | n/a | n/a (no datasheet" in text


def test_step_floor_is_the_steps_bytes_at_the_bandwidth() -> None:
    """``step_floor``: the full-size model at batch 64, prompt 283, 64 tokens (mean context 315), 64 routed experts
    read in each of the 11 MoE layers, at 4.8 TB/s.  Oracles: the byte model (``decode_bytes_per_step``, tested on its
    own) for the bytes, and a hand lower bound: the routed experts' weights (11 layers × 64 experts × 3 matrices of
    1280 × 896 bf16) and the K/V read (64 rows × 12 layers × K and V × 315 positions × 1280 channels × 2 bytes)."""
    from benchmarks.bench_batched import CONFIGS, step_floor

    from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig
    from llm_perf_opt.profiling.flops import decode_bytes_per_step

    cfg = DeepseekOCRConfig.from_json(CONFIGS["full"])
    row = {"batch": 64, "prompt_len": 283, "routed_read": 63.8}
    floor, why = step_floor(cfg, row, 64, 4.8e12)
    need = decode_bytes_per_step(cfg, 315, 2, [64] * 11, batch=64).total_bytes
    assert why is None and floor == need / 4.8e12 * 1e3
    assert need > 11 * 64 * 3 * 1280 * 896 * 2 + 64 * 12 * 2 * 315 * 1280 * 2
    assert step_floor(cfg, row, 64, None) == (None, "no datasheet bandwidth for this device")
    assert step_floor(cfg, {**row, "routed_read": None}, 64, 4.8e12)[1].startswith("no step ran the Triton expert")


def test_routing_note_says_what_the_steps_read() -> None:
    """The report's routing line: the dummy model's own routing (and why it flatters a step), spread at every batch
    size, or spread except where no Triton router ran at that row count."""
    from benchmarks.bench_batched import routing_note

    assert routing_note(False, []).startswith("Routing: the dummy model's own. Its rows greedily repeat one token")
    spread = routing_note(True, [])
    assert spread.startswith("Routing: each decode step's picks spread at random after the router") and spread.endswith(
        "at a batch's full width."
    )
    assert routing_note(True, [1, 8]).endswith(
        "; not applied at batch 1, 8: no Triton router ran at that row count, so the dummy model's own routing ran "
        "there."
    )


class _Result:
    """The fields static_vs_continuous reads of a static batch or a continuous run."""

    def __init__(self, total_s: float, batch: int = 2) -> None:
        self.total_s, self.output_tokens, self.batch = total_s, 10, batch
        self.step_ms, self.slot_occupancy, self.drain, self.graph_capture_s = [1.0] * 4, 0.5, (0, 0.0, 0), 0.0
        self.vision_ahead_s, self.pages_ahead, self.prefill_ahead_s = 0.0, 0, 0.0


class _ScriptedGenerator:
    """A generator whose runs take scripted stage times: static batches 1 s, the plain continuous run 1.0 s, a run
    with vision ahead 0.9 s and one with its refills prefilled page by page 0.8 s, every time (CPU: no sync)."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []
        self.per_page: list[bool] = []

    def run(self, pages: list[object], caps: list[int], **kw: object) -> _Result:
        return _Result(1.0)

    def run_continuous(self, reqs: list[object], slots: int, **kw: object) -> _Result:
        ahead, prefill, per_page = kw["vision_ahead"], kw["prefill_ahead"], kw["prefill_per_page"]
        assert isinstance(ahead, int) and isinstance(prefill, bool) and isinstance(per_page, bool)
        self.calls.append((ahead, prefill))
        self.per_page.append(per_page)
        return _Result(0.8 if per_page else 0.9 if ahead else 1.0)

    def release_decode_state(self) -> None:
        return None


def test_a_continuous_run_all_in_its_drain_has_no_steady_rate() -> None:
    """Every decode step in the drain (each page started at the first step: one fill) leaves only the fill outside
    it, so the steady-state column says so instead of a fill-only rate; a drain of 1 of 4 steps keeps the rate, by
    hand: (10 - 2) tokens over 1.0 s - 0.25 s."""
    from benchmarks.bench_batched import mixed_table, static_vs_continuous

    class _Drained(_ScriptedGenerator):
        def __init__(self, drain: tuple[int, float, int]) -> None:
            super().__init__()
            self.drain = drain

        def run_continuous(self, reqs: list[object], slots: int, **kw: object) -> _Result:
            res = super().run_continuous(reqs, slots, **kw)
            res.drain = self.drain
            return res

    one_fill = static_vs_continuous(_Drained((4, 3.0, 6)), [object()] * 2, [3, 3], 2, 0)  # type: ignore[arg-type]
    cont = next(r for r in one_fill if r["batching"] == "continuous")
    assert cont["steady_output_tok_per_s"] is None
    assert "| continuous | 2.000 | 10.0 | n/a (every step in the drain: one fill) |" in mixed_table(one_fill, [3, 3])
    refilled = static_vs_continuous(_Drained((1, 250.0, 2)), [object()] * 2, [3, 3], 2, 0)  # type: ignore[arg-type]
    cont = next(r for r in refilled if r["batching"] == "continuous")
    assert cont["steady_output_tok_per_s"] == pytest.approx(8 / 0.75)


def test_mixed_rounds_pair_each_run_ahead_mode_with_the_plain_run() -> None:
    """``rounds`` > 0: each run-ahead mode is paired with the plain continuous run round by round, on the stage
    time.  By hand: every round reads 1,000 ms plain and 900 ms ahead, so the median Δ is -100 ms; six rounds
    that agree give the sign test's p = 2 / 2**6 = 0.03125 ("b faster"), two give p = 0.5 ("within noise")."""
    from benchmarks.bench_batched import static_vs_continuous

    gen = _ScriptedGenerator()
    rows = static_vs_continuous(gen, [object()] * 4, [3, 3, 3, 3], 2, 0, vision_ahead=2, rounds=6)  # type: ignore[arg-type]
    by = {r["batching"]: r for r in rows}
    assert set(by) == {"static", "continuous", "continuous, vision 2 ahead"}
    assert "paired_vs_continuous" not in by["continuous"]
    assert by["continuous, vision 2 ahead"]["paired_vs_continuous"] == (
        "Δ -100.000 ms [-100.000, -100.000] over 6 rounds, sign test p = 0.0312: b faster"
    )
    # two runs per mode (warm-up, timed), then the six rounds' pairs: plain first in even rounds, ahead first in odd
    assert gen.calls[:4] == [(0, False), (0, False), (2, False), (2, False)]
    assert gen.calls[4:] == [(0, False), (2, False), (2, False), (0, False)] * 3
    text = mixed_table(rows, [3, 3, 3, 3])
    assert "; stage time paired with it: Δ -100.000 ms [-100.000, -100.000] over 6 rounds" in text
    two = static_vs_continuous(_ScriptedGenerator(), [object()] * 4, [3] * 4, 2, 0, vision_ahead=2, rounds=2)  # type: ignore[arg-type]
    # two rounds that agree: p = 2 / 2**2 = 0.5, and no two rounds could do better, so no verdict (not "noise")
    assert two[-1]["paired_vs_continuous"].endswith(
        "sign test p = 0.5: no verdict: 2 rounds cannot reach p <= 0.05 (the sign test needs 6)"
    )
    single = static_vs_continuous(_ScriptedGenerator(), [object()] * 4, [3] * 4, 2, 0, vision_ahead=2)  # type: ignore[arg-type]
    assert all("paired_vs_continuous" not in r for r in single)


def test_per_page_prefill_mode_paired_with_the_plain_run() -> None:
    """``per_page_prefill``: one more continuous mode, run with ``prefill_per_page=True`` and nothing ahead, paired
    round by round with the plain run.  By hand: 800 ms against 1,000 ms every round, so Δ -200 ms and p = 0.03125
    over six rounds; its table line gives 17.0 / 13.6 = 1.25× (hand-written rates)."""
    from benchmarks.bench_batched import PER_PAGE, static_vs_continuous

    gen = _ScriptedGenerator()
    rows = static_vs_continuous(gen, [object()] * 4, [3] * 4, 2, 0, rounds=6, per_page_prefill=True)  # type: ignore[arg-type]
    by = {r["batching"]: r for r in rows}
    assert set(by) == {"static", "continuous", PER_PAGE}
    assert by[PER_PAGE]["paired_vs_continuous"] == (
        "Δ -200.000 ms [-200.000, -200.000] over 6 rounds, sign test p = 0.0312: b faster"
    )
    assert all(call == (0, False) for call in gen.calls)  # nothing runs ahead in either mode
    assert gen.per_page[:4] == [False, False, True, True]
    assert gen.per_page[4:] == [False, True, True, False] * 3
    base = {"slots": 2, "pages": 4, "output_tokens": 17, "stage_s": 1.0, "pages_per_s": 4.0,
            "slot_occupancy": 0.75, "steady_output_tok_per_s": None, "ngram": 20}  # fmt: skip
    text = mixed_table(
        [{**base, "batching": "continuous", "output_tok_per_s": 13.6},
         {**base, "batching": PER_PAGE, "output_tok_per_s": 17.0}], [3, 7, 2, 5]
    )  # fmt: skip
    assert f"- {PER_PAGE} / continuous = 1.25× output tok/s (each refill page's LM prefill alone" in text


def test_a_run_cut_short_in_the_mixed_workload_keeps_its_batch_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Round 27: two device runs were killed by their time limit inside the mixed workload and left no figure.  The
    report is now written before it (the batch row, saying it was cut short) and each mixed run is printed as it
    ends.  Here the mixed workload is interrupted on the tiny model on the CPU."""
    import benchmarks.bench_batched as bb

    def interrupted(*_: object, **__: object) -> list[dict[str, object]]:
        print("mixed static: 1.0 output tok/s", flush=True)  # what the real one prints before being killed
        raise KeyboardInterrupt

    monkeypatch.setattr(bb, "static_vs_continuous", interrupted)
    argv = ["bench_batched.py", "--device", "cpu", "--config", "tiny", "--batches", "1", "--tokens", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--mixed-pages", "2", "--out", str(tmp_path)])
    with pytest.raises(KeyboardInterrupt):
        bb.main()
    (md,) = tmp_path.glob("*-batched.md")
    text = md.read_text()
    assert "| 1 | static |" in text and "**Cut short**: the mixed-length workload did not finish." in text
    saved = json.loads(md.with_suffix(".json").read_text())
    assert {r["batch"] for r in saved["rows"]} == {1} and saved["mixed"] == []
    assert "mixed static: 1.0 output tok/s" in capsys.readouterr().out
