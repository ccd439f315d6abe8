"""Static compute on the tiny native model: analytic FLOPs per stage agree with both counters.

Vision and decode agree exactly; prefill differs only by the causal gap (the counters count the whole
attention square, the analytic count the kept lower triangle), which static_compute subtracts and states.
"""

from __future__ import annotations

import torch

from llm_perf_opt.data.datasets import synthetic_page
from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model
from llm_perf_opt.models.deepseek_ocr.preprocess import PreprocessConfig, preprocess_page
from llm_perf_opt.models.deepseek_ocr.tokenizer import load_tokenizer
from llm_perf_opt.profiling.static_compute import FLAG_REL_DIFF, static_compute
from llm_perf_opt.report.static_compute import write_static_compute
from tests.conftest import TINY


def test_tiny_model_analytic_matches_counters_per_stage(tmp_path) -> None:
    cfg = DeepseekOCRConfig.from_json(TINY / "config.json")
    model = build_model(cfg, device="cpu", dtype=torch.float32, weights="dummy", seed=0)
    ids = load_tokenizer(None, cfg).encode_prompt("<image>\nConvert the document to markdown.")
    pp = PreprocessConfig(base_size=256, image_size=128, crop_mode=True, vendor_quirks=False)
    page = preprocess_page(synthetic_page((300, 420), 0), pp, cfg, ids)
    assert page.n_crops > 0  # crops and the global view are both counted

    rows = static_compute(model, page, torch.device("cpu"), torch.float32)
    stages = {r.stage.split("@")[0]: r for r in rows}
    assert set(stages) == {"sam", "clip", "projector", "prefill_lm", "decode_step"}
    for r in rows:
        assert r.fvcore_flops is not None and r.flop_counter_flops is not None, r.note
        assert r.rel_diff_fvcore is not None and abs(r.rel_diff_fvcore) <= FLAG_REL_DIFF, r
        assert r.rel_diff_flop_counter is not None and abs(r.rel_diff_flop_counter) <= FLAG_REL_DIFF, r
        assert not r.flagged
    for name in ("sam", "clip", "projector", "decode_step"):
        assert stages[name].flop_counter_flops == stages[name].analytic_flops
    # prefill: the counters include the masked upper triangle of causal attention, stated in the note
    prefill = stages["prefill_lm"]
    assert prefill.flop_counter_flops is not None and prefill.flop_counter_flops > prefill.analytic_flops
    assert "causal gap" in (prefill.note or "")

    write_static_compute(tmp_path, rows, "tiny-page")
    md = (tmp_path / "static_compute.md").read_text()
    assert "| sam |" in md and "2 FLOPs per multiply-add" in md
    assert (tmp_path / "static_compute.json").is_file()
