"""The batched phase's warm-up of the vision chunk shapes: a failure there is a note, not a lost phase.

On the H200 the first version of the warm-up ran outside ``inference_mode`` and was refused by the CUDA graphs'
input buffers; the phase then reported "warm-up batch failed" and measured nothing.  Oracle: a scripted session
whose warm-up raises; the phase must still run every page (the records the session returns) and say why the
shapes were not warmed.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig
from llm_perf_opt.results.types import BatchRecord
from llm_perf_opt.runners.phases import throughput_phase
from tests.conftest import TINY


class ScriptedSession:
    """Prepares pages as their ids, fails the vision warm-up, returns one record per continuous run."""

    device = SimpleNamespace(type="cpu")
    dtype = torch.float32

    def __init__(self) -> None:
        self.runs: list[list[str]] = []
        self.backend = SimpleNamespace(config=DeepseekOCRConfig.from_json(TINY / "config.json"))

    def prepare_for_batch(self, page: Any) -> str:
        return str(page.page_id)

    def warm_batched_vision(self, prepared: list[Any]) -> int:
        raise RuntimeError("Inplace update to inference tensor outside InferenceMode is not allowed")

    def run_continuous(self, items: Any, max_new_tokens: int, repeat: int, slots: int) -> BatchRecord:
        ids = [prepared for _, prepared in items]
        self.runs.append(ids)
        return BatchRecord(repeat=repeat, page_ids=ids, batch=slots, padded_prompt_tokens=10,
                           output_tokens=4 * len(ids), vision_ms=1.0, prefill_ms=2.0, decode_ms=3.0, pages_per_s=None,
                           output_tok_s=None, tpot_ms=[1.0] * len(ids), batching="continuous",
                           decode_steps=3)  # fmt: skip


class Progress:
    def add(self, name: str, total: int) -> int:
        return 0

    def advance(self, task: int) -> None:
        pass


def test_failed_vision_warmup_is_a_note_and_the_phase_still_runs(tmp_path: Path) -> None:
    session = ScriptedSession()
    infer = SimpleNamespace(batch_size=2, batching="continuous", preprocess_workers=1)
    settings = SimpleNamespace(token_cap=8, repeats=1, infer=infer)
    run: Any = SimpleNamespace(session=session, settings=settings, notes=[], unavailable=[], batches=[],
                               batched_phase=None, out=tmp_path, hardware=None)  # fmt: skip
    pages = [SimpleNamespace(page_id=f"p{i}") for i in range(3)]
    throughput_phase(run, pages, Progress(), lambda: False)
    assert run.unavailable == []
    assert session.runs[0] == ["p0", "p1"]  # the untimed warm run over the first batch_size pages
    assert session.runs[1] == ["p0", "p1", "p2"]  # the timed run: every page
    assert [b.page_ids for b in run.batches] == [["p0", "p1", "p2"]]
    (note,) = [n for n in run.notes if "vision chunk shapes were not warmed" in n]
    assert "RuntimeError: Inplace update to inference tensor" in note
    assert run.batched_phase is not None and run.batched_phase.pages == 3
    # the scripted record has no rows or keys per step: no traffic figure, and why
    assert "lack the decode steps' rows or keys" in (run.batched_phase.decode_traffic_unavailable or "")
