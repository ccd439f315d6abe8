"""The Triton decode step (``decode_kernels="triton"``) on the DeepSeek-OCR-2 model: v1's kernels over v2's
language model, against the eager v2 model and the fixture's greedy tokens (tests/fixtures/deepseek_ocr2_tiny).

Runs the real kernels on the CPU through Triton's interpreter, as tests/unit/models/deepseek_ocr/test_fast_triton.py
does (``TRITON_INTERPRET=1`` before the kernels module is first imported); skipped where Triton is not installed or
the kernels were already imported compiled-mode in this process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

_PREVIOUS = os.environ.get("TRITON_INTERPRET")
os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton and the kernels module are first imported
try:
    pytest.importorskip("triton")
    from llm_perf_opt.models.deepseek_ocr import kernels
finally:  # leave the environment as found: CLI subprocesses of other tests inherit it
    if _PREVIOUS is None:
        del os.environ["TRITON_INTERPRET"]

from safetensors.torch import load_file  # noqa: E402

from llm_perf_opt.models.deepseek_ocr.fast import FastConfig  # noqa: E402
from llm_perf_opt.models.deepseek_ocr2 import DeepseekOCR2Config, build_model_v2  # noqa: E402
from llm_perf_opt.models.deepseek_ocr2.fast import apply_fast_path_v2  # noqa: E402

TINY = Path(__file__).resolve().parents[3] / "fixtures" / "deepseek_ocr2_tiny"
TRITON = FastConfig(
    cuda_graphs=False, vision_graphs=False, sam_compile=False, clip_compile=False, decode_kernels="triton"
)

pytestmark = pytest.mark.skipif(
    not kernels.INTERPRETED, reason="the kernels were imported compiled-mode before TRITON_INTERPRET was set"
)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The interpreter's switch is read again at launch: set it only while these tests run."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def test_triton_step_on_v2_gives_the_fixture_tokens_and_eager_logits() -> None:
    """Prefill on the fixture page's features, then 11 steps teacher-forced with the fixture's greedy tokens:
    the Triton step's logits equal the eager v2 model's step by step, and its picks are the fixture's tokens."""
    case = load_file(str(TINY / "cases" / "crop_2x1.safetensors"))
    eager = build_model_v2(DeepseekOCR2Config.from_json(TINY / "config.json"), weights=TINY)
    fast = apply_fast_path_v2(eager, TRITON)
    assert fast.decode_kernels == "triton", fast.decode_kernels_note
    with torch.no_grad():
        feats = eager.encode_images(
            case["images_crop"].float(), case["images_ori"].float(), case["images_spatial_crop"]
        )
        embeds = eager.embed_prompt(case["input_ids"], case["images_seq_mask"], [feats])
    want = case["greedy_tokens"].tolist()
    rows = []
    for model in (eager, fast):
        cache = model.new_cache(1, embeds.shape[1] + 12)
        logits = [model.prefill(embeds, cache)]
        for tok in want[:11]:
            logits.append(model.decode_step(torch.tensor([[tok]]), cache).clone())
        rows.append(logits)
    for ref, got in zip(*rows, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert [int(r.argmax(-1)) for r in rows[1]] == want
    # on-device greedy over the Triton step (the profiler's decode loop)
    cache = fast.new_cache(1, embeds.shape[1] + 12)
    first = fast.prefill(embeds, cache).argmax(dim=-1, keepdim=True)
    assert [int(first[0, 0]), *fast.decoder_for(cache, 0).greedy(first, 11)[0]][:12] == want
