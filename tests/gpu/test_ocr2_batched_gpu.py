"""DeepSeek-OCR-2 through the batched phase on CUDA: the tiny v2 model in float32 on the fast path (vision graphs
per view shape, the decode step in a CUDA graph), continuous batching vs every page alone.

The pages and workload of ``tests/unit/models/deepseek_ocr2/test_ocr2_batched.py`` (three tile grids, five
requests through two slots).  The oracle is each page alone through the same fast model (a batch of one, as in
``test_continuous_gpu.py``): float32 keeps near-ties out of the way, so greedy tokens are compared exactly; the CPU
test holds the batched paths to the eager single-page path, logits included.

Skipped without CUDA; on the device machine: ``pytest -m gpu tests/gpu/test_ocr2_batched_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.models.deepseek_ocr.batched import BatchedGenerator
from llm_perf_opt.models.deepseek_ocr.continuous import SlotRequest
from llm_perf_opt.models.deepseek_ocr.fast import FastConfig
from llm_perf_opt.models.deepseek_ocr2 import DeepseekOCR2Config, build_model_v2
from llm_perf_opt.models.deepseek_ocr2.fast import apply_fast_path_v2
from llm_perf_opt.profiling.timers import DeviceClock
from tests.conftest import requires_cuda
from tests.unit.models.deepseek_ocr2.test_ocr2_batched import SLOTS, TINY, WORKLOAD, _pages

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.mark.parametrize("per_page", [False, True], ids=["batched-refills", "per-page-refills"])
def test_v2_continuous_batching_under_graphs_is_every_page_alone(per_page: bool) -> None:
    cfg = DeepseekOCR2Config.from_json(TINY / "config.json")
    eager = build_model_v2(cfg, device="cuda", dtype=torch.float32, weights=TINY)
    pages = _pages(eager)
    fast = apply_fast_path_v2(eager, FastConfig(sam_compile=False, clip_compile=False, vision_graphs=True))
    gen = BatchedGenerator(fast, clock=DeviceClock(eager.device))
    assert gen.warm_vision(pages) > 0
    alone = [gen.run([pages[p]], cap, eos_token_id=None).tokens[0] for p, cap in WORKLOAD]
    res = gen.run_continuous(
        [SlotRequest(pages[p], cap) for p, cap in WORKLOAD], SLOTS, eos_token_id=None, prefill_per_page=per_page
    )
    assert res.decode_path == "graph"
    assert res.tokens == alone
    assert res.pages_prefilled_per_page == (3 if per_page else 0)
