"""DeepSeek-OCR-2 through the real CLI: the tiny v2 model (tests/fixtures/deepseek_ocr2_tiny's configuration) on
one 1600×800 synthetic page, counted FLOPs on.

Oracles are hand-computed from the model's published geometry, not read back from the code under test:
a 1600×800 page (aspect 2, a side > 768 px) is cut into a 2×1 grid of 768-px tiles, so it has
256 + 144·2 + 1 = 545 image tokens; the tiny encoder's FLOPs are written out below from its sizes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, SMALL, assert_clean_failure, read_jsonl, read_metrics, run_cli

V2_TINY = ["model/deepseek_ocr/arch=deepseek_ocr2.tiny"]
PAGE = "dataset.sizes=[[1600,800]]"
PROMPT = "<image>\n<|grounding|>Convert the document to markdown."

# 2×1 grid of 768-px tiles (12×12 SAM tokens each) + the 1024-px global view (16×16) + view_seperator
IMAGE_TOKENS = 256 + 144 * 2 + 1


def _text_ids() -> int:
    """Text ids of the prompt (the <image> marker excluded) from the tiny v2 model's tokenizer."""
    from llm_perf_opt.models.deepseek_ocr.tokenizer import load_tokenizer
    from llm_perf_opt.models.deepseek_ocr2 import DeepseekOCR2Config

    cfg = DeepseekOCR2Config.from_json(ROOT / "tests/fixtures/deepseek_ocr2_tiny/config.json")
    ids = load_tokenizer(None, cfg).encode_prompt(PROMPT)  # type: ignore[arg-type]
    return sum(1 for i in ids if i != cfg.image_token_id)


def _tiny_encoder_flops(full_grid: bool) -> int:
    """The tiny encoder (hidden 64, 2 layers, 4 heads / 2 KV heads of 16, SwiGLU 128) on the page's views.

    Per position and layer: q 64→64, k and v 64→32, o 64→64, gate and up 64→128, down 128→64 (2 FLOPs per MAC).
    Per head and kept query/key pair: q·k and p·v over 16 dims each = 2·(16 + 16) FLOPs.  A view of N SAM
    tokens runs 2N positions; the prefix mask keeps N² + N² + N(N+1)/2 pairs, the full grid is (2N)².
    """
    per_position = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 64 * 128 + 128 * 64)
    views = [144, 144, 256]
    positions = sum(2 * n for n in views)
    pairs = sum((2 * n) ** 2 if full_grid else 2 * n * n + n * (n + 1) // 2 for n in views)
    return 2 * (positions * per_position + 4 * pairs * 2 * (16 + 16))


@pytest.fixture(scope="module")
def v2_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("ocr2") / "run"
    result = run_cli([*V2_TINY, *SMALL, PAGE, "profiling.static_compute=true"], run_dir, timeout=300)
    assert result.returncode == 0, result.describe()
    return run_dir, read_metrics(run_dir)


def test_v2_page_layout_and_stage_times(v2_run: tuple[Path, dict]) -> None:
    _, m = v2_run
    assert m["run"]["status"] == "complete"
    assert m["model"]["family"] == "deepseek_ocr2"
    assert m["model"]["stage_names"] == {"clip": "encoder"}
    assert len(m["pages"]) == 1
    page = m["pages"][0]
    assert page["error"] is None
    assert page["crop_grid"] == [2, 1] and page["n_tiles"] == 2
    assert page["image_tokens"] == IMAGE_TOKENS
    assert page["prompt_tokens"] == IMAGE_TOKENS + 1 + _text_ids()  # bos + image run + text
    assert page["generated_tokens"] <= 8
    # the encoder's time fills the clip_ms slot (metrics.json keys stay v1's)
    assert 0 < page["clip_ms"] <= page["vision_ms"]
    assert 0 < page["sam_ms"] <= page["vision_ms"] and 0 < page["projector_ms"] <= page["vision_ms"]
    assert page["sam_ms"] + page["clip_ms"] + page["projector_ms"] <= page["vision_ms"] < page["prefill_ms"]


def test_v2_parameters_in_the_model_section(v2_run: tuple[Path, dict]) -> None:
    from llm_perf_opt.models.deepseek_ocr2 import DeepseekOCR2Config
    from llm_perf_opt.profiling.flops_ocr2 import param_counts_v2

    _, m = v2_run
    counts = param_counts_v2(DeepseekOCR2Config.from_json(ROOT / "tests/fixtures/deepseek_ocr2_tiny/config.json"))
    # the formula (tested against the real checkpoint's index elsewhere) equals the module tree that ran
    assert m["model"]["params_total"] == counts.total
    assert m["model"]["params_activated_per_token"] == counts.activated_per_token


def test_v2_flops_analytic_equal_counted_per_stage(v2_run: tuple[Path, dict]) -> None:
    _, m = v2_run
    rows = {r["stage"]: r for r in m["flops"]}
    assert "clip" not in rows and {"sam", "encoder", "projector", "prefill_lm"} <= set(rows)
    enc = rows["encoder"]
    assert enc["analytic_flops"] == _tiny_encoder_flops(full_grid=False)
    # counters see SDPA's masked (2N)² grid: the explained gap is exactly the pairs the mask drops
    assert enc["flop_counter_flops"] == _tiny_encoder_flops(full_grid=True)
    assert enc["fvcore_flops"] == _tiny_encoder_flops(full_grid=True)
    # projector 64 → 64 on 2·144 + 256 query outputs
    assert rows["projector"]["analytic_flops"] == 2 * (2 * 144 + 256) * 64 * 64
    for stage in ("sam", "encoder", "projector", "prefill_lm"):
        r = rows[stage]
        assert not r["flagged"], r
        assert abs(r["rel_diff_flop_counter"]) < 1e-9 and abs(r["rel_diff_fvcore"]) < 1e-9, r
    assert {"sam", "encoder", "projector", "vision"} <= {e["stage"] for e in m["efficiency"]}


def test_v2_report_names_the_encoder(v2_run: tuple[Path, dict]) -> None:
    run_dir, _ = v2_run
    report = (run_dir / "report.md").read_text()
    assert "|     encoder | ms |" in report
    assert "vision (SAM + encoder + projector + layout)" in report
    assert "CLIP" not in report
    assert "| encoder |" in (run_dir / "static_compute.md").read_text()
    for brief in ("stakeholder_summary.md", "assumptions.md"):  # they said CLIP for v2 before round 26
        assert "CLIP" not in (run_dir / brief).read_text(), brief


def test_v2_checkpoint_missing_is_one_clear_error(tmp_path: Path) -> None:
    result = run_cli(
        ["model/deepseek_ocr/arch=deepseek_ocr2.checkpoint", f"model.path={tmp_path}/nope", *SMALL], tmp_path / "run"
    )
    assert_clean_failure(result, "ModelLoadError", f"model directory not found: {tmp_path}/nope")
    assert "model/deepseek_ocr/arch=deepseek_ocr2.dummy" in result.stderr


def _token_ids(run_dir: Path) -> list[list[int]]:
    return [r["token_ids"] for r in read_jsonl(run_dir / "predictions.jsonl")]


def test_v2_fast_path_runs_through_the_cli(v2_run: tuple[Path, dict], tmp_path: Path) -> None:
    """infer.fast.enabled=true on the v2 model (it used to be refused): v1's fast language model and SAM with the
    encoder's fused layers; on the CPU the graph switches are off and reported so.  The oracle is the eager run of
    the same page and settings (v2_run): the same greedy tokens, the same stages timed."""
    eager_dir, eager = v2_run
    run_dir = tmp_path / "run"
    fast_args = ["infer.fast.enabled=true", "infer.fast.sam_compile=false", "infer.fast.clip_compile=false"]
    result = run_cli([*V2_TINY, *SMALL, PAGE, *fast_args], run_dir, timeout=300)
    assert result.returncode == 0, result.describe()
    m = read_metrics(run_dir)
    assert m["run"]["status"] == "complete" and m["model"]["family"] == "deepseek_ocr2"
    opts = m["model"]["optimisations"]
    assert opts["grouped_moe"] is True and opts["fused_qkv"] is True and opts["sam_fast"] is True
    assert opts["cuda_graphs"] is False and opts["vision_graphs"] is False  # CPU: forced off, and said so
    assert opts["clip_merged_views"] is False  # v2 has no CLIP: the switch (on by default) does not apply
    assert opts["clip_attention_triton"] is False  # nor CLIP's attention kernel
    page = m["pages"][0]
    assert page["error"] is None and page["image_tokens"] == IMAGE_TOKENS
    assert 0 < page["clip_ms"] <= page["vision_ms"] and 0 < page["sam_ms"] <= page["vision_ms"]
    assert _token_ids(run_dir) == _token_ids(eager_dir)
    assert len(_token_ids(run_dir)[0]) == eager["pages"][0]["generated_tokens"]


def test_v2_batched_phase_through_the_cli(tmp_path: Path) -> None:
    """``infer.batch_size=2`` on the v2 model (it used to be refused): three pages of three tile grids through two
    continuously refilled slots.  The oracle is the same run's per-page phase, the single-page path: the batched
    phase ends every page where that path ended it (the same token count per page, at its cap or its simulated
    eos), and its record names the three pages in order."""
    run_dir = tmp_path / "run"
    sizes = "dataset.sizes=[[1600,800],[900,1400],[1600,1200]]"
    args = [*V2_TINY, *SMALL, sizes, "dataset.num_pages=3", "infer.batch_size=2", "infer.max_new_tokens=6"]
    result = run_cli(args, run_dir, timeout=400)
    assert result.returncode == 0, result.describe()
    m = read_metrics(run_dir)
    assert m["run"]["status"] == "complete" and m["model"]["family"] == "deepseek_ocr2"
    pages = m["pages"]
    assert len(pages) == 3 and len({tuple(p["crop_grid"]) for p in pages}) == 3
    (batch,) = m["batches"]
    assert batch["batching"] == "continuous" and batch["batch"] == 2
    assert batch["page_ids"] == [p["page_id"] for p in pages]
    assert batch["output_tokens"] == sum(p["generated_tokens"] for p in pages)
    assert batch["fills"] == 2  # the first fill's two pages, then one refill
    assert "## Batched throughput (batch size 2)" in (run_dir / "report.md").read_text()
