"""DeepSeek-OCR-2's fast path == its eager model on the full-size model (bf16, dummy weights) on a GPU, with the
CUDA graphs captured (vision per view shape, LM prefill per prompt length, the Triton decode step).

The oracle is the eager native v2 model (itself checked against the model's own code on the tiny fixture):
image features within bf16 rounding on a 6-tile page and a 2-tile page (two shapes of the tiles' graphs),
replayed a second time; then, on that page's prompt, the LM logits teacher-forced with the eager tokens for 32
steps within bf16 rounding and the greedy tokens equal wherever the eager choice is a clear winner (dummy
weights give near-flat logits: a near-tie may go either way after bf16 rounding, as in tests/gpu/test_fast_path.py).
"""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.data.datasets import synthetic_page
from llm_perf_opt.models.deepseek_ocr.fast import FastConfig
from llm_perf_opt.models.deepseek_ocr.tokenizer import load_tokenizer
from llm_perf_opt.models.deepseek_ocr2 import DeepseekOCR2Config, build_model_v2
from llm_perf_opt.models.deepseek_ocr2.fast import apply_fast_path_v2
from llm_perf_opt.models.deepseek_ocr2.preprocess import preprocess_config_v2, preprocess_page_v2

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CONFIG = "src/llm_perf_opt/models/deepseek_ocr2/configs/deepseek-ocr2.json"
PROMPT = "<image>\n<|grounding|>Convert the document to markdown."
STEPS = 32


@pytest.fixture(scope="module")
def model() -> object:
    return build_model_v2(DeepseekOCR2Config.from_json(CONFIG), "cuda", torch.bfloat16, "dummy")


def _page(model: object, size: tuple[int, int]) -> object:
    cfg = model.config  # type: ignore[attr-defined]
    from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig

    ids = load_tokenizer(None, DeepseekOCRConfig(language=cfg.language, image_token_id=cfg.image_token_id))
    return preprocess_page_v2(synthetic_page(size, 0), preprocess_config_v2("default"), cfg, ids.encode_prompt(PROMPT))


def _views(page: object) -> tuple[torch.Tensor, torch.Tensor, object]:
    return (
        page.images_crop.cuda().bfloat16(),  # type: ignore[attr-defined]
        page.images_ori.cuda().bfloat16(),  # type: ignore[attr-defined]
        page.images_spatial_crop,  # type: ignore[attr-defined]
    )


@pytest.fixture(scope="module")
def fast(model: object) -> object:
    return apply_fast_path_v2(model, FastConfig())  # type: ignore[arg-type]


@pytest.mark.parametrize(("size", "n_tiles"), [((1224, 1584), 6), ((1600, 800), 2)])
def test_fast_vision_matches_eager_under_graphs(
    model: object, fast: object, size: tuple[int, int], n_tiles: int
) -> None:
    page = _page(model, size)
    assert page.n_crops == n_tiles  # type: ignore[attr-defined]
    views = _views(page)
    with torch.inference_mode():
        ref = model.encode_images(*views).float()  # type: ignore[attr-defined]
        for i in range(2):  # the first call compiles and captures, the second replays
            out = fast.encode_images(*views).float()  # type: ignore[attr-defined]
            rel = float((out - ref).norm() / ref.norm())
            assert rel < 2e-2, (i, rel)
            if i == 0:
                captured = fast.capture_count  # type: ignore[attr-defined]
        assert fast.capture_count == captured  # type: ignore[attr-defined]  # the second call replayed
    graphs = fast.vision.graphs  # type: ignore[attr-defined]
    assert set(graphs) == {"sam", "encoder"}
    assert all(g.capture_error is None for g in graphs.values())
    # one graph per view shape: the tiles' batch and the global view, in both towers
    for tower in graphs.values():
        assert {key[0][0] for key in tower.graphs} >= {n_tiles, 1}


def test_fast_lm_on_a_v2_page_matches_eager(model: object, fast: object) -> None:
    """Prefill from its CUDA graph, then the Triton decode step from its graph: teacher-forced logits within bf16
    rounding for 32 steps, clear-winner tokens equal, and the on-device greedy loop gives the host loop's tokens."""
    assert fast.decode_kernels == "triton", fast.decode_kernels_note  # type: ignore[attr-defined]
    page = _page(model, (1224, 1584))
    with torch.inference_mode():
        feats = model.encode_images(*_views(page))  # type: ignore[attr-defined]
        embeds = model.embed_prompt(page.input_ids, page.images_seq_mask, [feats])  # type: ignore[attr-defined]
        runs = []
        tokens: list[int] = []
        for m in (model, fast):
            cache = m.new_cache(1, embeds.shape[1] + STEPS + 1)  # type: ignore[attr-defined]
            rows = [m.prefill(embeds, cache)[0].float().cpu()]  # type: ignore[attr-defined]
            own = [int(rows[0].argmax())]
            for i in range(STEPS):
                if m is model:
                    tokens.append(int(rows[-1].argmax()))
                step = m.decode_step(torch.tensor([[tokens[i]]], device="cuda"), cache)  # type: ignore[attr-defined]
                rows.append(step[0].float().cpu())
                own.append(int(rows[-1].argmax()))
            runs.append((rows, own))
        assert fast._prefill_graph_error is None and fast._prefill_graphs  # type: ignore[attr-defined]
        assert fast._decoder.capture_error is None  # type: ignore[attr-defined]
        (ref_rows, ref_own), (rows, own) = runs
        scale = max(float(r.abs().max()) for r in ref_rows)
        diffs = [float((a - b).abs().max()) for a, b in zip(rows, ref_rows, strict=True)]
        assert max(diffs) <= 2e-2 * scale + 1e-2, (max(diffs), scale)
        for step, (got, want, row, diff) in enumerate(zip(own, ref_own, ref_rows, diffs, strict=True)):
            top2 = row.topk(2).values
            if float(top2[0] - top2[1]) > 2 * diff:  # a clear winner must be picked by both
                assert got == want, (step, got, want)
        assert sum(g != w for g, w in zip(own, ref_own, strict=True)) <= len(own) // 10
        # the profiler's loop: greedy inside the graphed step, fed its own picks; the host loop on the same path
        cache = fast.new_cache(1, embeds.shape[1] + STEPS + 1)  # type: ignore[attr-defined]
        first = fast.prefill(embeds, cache).argmax(dim=-1, keepdim=True)  # type: ignore[attr-defined]
        device_tokens = [int(first[0, 0]), *fast.decoder_for(cache, 0).greedy(first, STEPS)[0]]  # type: ignore[attr-defined]
        cache = fast.new_cache(1, embeds.shape[1] + STEPS + 1)  # type: ignore[attr-defined]
        host = [int(fast.prefill(embeds, cache).argmax())]  # type: ignore[attr-defined]
        for _ in range(STEPS):
            host.append(int(fast.decode_step(torch.tensor([[host[-1]]], device="cuda"), cache).argmax()))  # type: ignore[attr-defined]
        assert device_tokens[: STEPS + 1] == host


def test_prefill_graph_of_a_freed_cache_is_not_replayed(fast: object) -> None:
    """A prefill graph is bound to its cache object, not to an address: a new cache that reuses a freed cache's
    storage gets its own capture (replaying by address wrote K/V through the freed cache's other pointers: an
    illegal memory access once the allocator had returned them), and its logits are the un-graphed ones."""
    hidden = fast.config.language.hidden_size  # type: ignore[attr-defined]
    embeds = torch.randn(1, 300, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    with torch.inference_mode():
        first = fast.new_cache(1, 320)  # type: ignore[attr-defined]
        fast.prefill(embeds, first)  # type: ignore[attr-defined]
        before, k_ptr = fast.capture_count, first.k.data_ptr()  # type: ignore[attr-defined]
        del first
        second = fast.new_cache(1, 320)  # type: ignore[attr-defined]  # same size: the allocator reuses the blocks
        if second.k.data_ptr() != k_ptr:
            pytest.skip("the allocator did not reuse the freed cache's storage (the case under test)")
        out = fast.prefill(embeds, second)  # type: ignore[attr-defined]
        assert fast.capture_count == before + 1  # type: ignore[attr-defined]  # captured again, for this cache
        plain = apply_fast_path_v2(fast.base, FastConfig(prefill_graphs=False))  # type: ignore[attr-defined]
        ref_cache = plain.new_cache(1, 320)
        ref = plain.prefill(embeds, ref_cache)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(second.k[:, :, :, :300], ref_cache.k[:, :, :, :300], rtol=1e-2, atol=1e-2)
