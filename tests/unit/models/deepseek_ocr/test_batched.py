"""Batched DeepSeek-OCR (vision over pages, left-padded prefill, masked decode) vs the single-page eager path.

The tiny fixture's three pages (prompt lengths 29, 39, 59; grids 1×1, 2×1, 2×3) run as one batch; every
sequence must reproduce the eager ``encode_images`` / ``embed_prompt`` / ``prefill`` / ``decode_step`` loop
(``generation.generate``): identical greedy tokens, logits within 1e-4 relative, eos / caps /
no-repeat-ngram per sequence.  Runs without ``keep_logits`` or no-repeat-ngram take the static decode step
(un-graphed on CPU); ``test_batched_static.py`` compares it with the host loop directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, DeepseekOCRForCausalLM, build_model
from llm_perf_opt.models.deepseek_ocr.batched import BatchedGenerator, BatchResult
from llm_perf_opt.models.deepseek_ocr.batched_vision import view_chunks
from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, apply_fast_path
from llm_perf_opt.models.deepseek_ocr.generation import GenerationResult
from llm_perf_opt.models.deepseek_ocr.preprocess import PreparedPage
from tests.conftest import TINY, generate_alone, rel_err, tiny_case_pages
from tests.conftest import TINY_CASES as CASES

TOL = 1e-4
STEPS = 16


@pytest.fixture(scope="module")
def model(tiny_reference_model: DeepseekOCRForCausalLM) -> DeepseekOCRForCausalLM:
    return tiny_reference_model


@pytest.fixture(scope="module")
def pages(model: DeepseekOCRForCausalLM) -> list[PreparedPage]:
    return tiny_case_pages(model.config)


@pytest.fixture(scope="module")
def reference(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> list[GenerationResult]:
    return [generate_alone(model, p, STEPS) for p in pages]


@pytest.fixture(scope="module")
def batched(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> BatchResult:
    return BatchedGenerator(model).run(pages, STEPS, eos_token_id=None, keep_logits=True)


def test_pages_have_different_prompt_lengths(pages: list[PreparedPage]) -> None:
    assert [p.prompt_len for p in pages] == [29, 39, 59]
    assert [p.images_spatial_crop for p in pages] == [(1, 1), (2, 1), (2, 3)]


def test_vision_batched_over_pages_matches_encode_images(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage]
) -> None:
    calls: dict[str, list[int]] = {"sam": [], "clip": [], "projector": []}

    def count(stage: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            calls[stage].append(int(args[0].shape[0]))

        return hook

    m = model.model
    handles = [
        m.sam_model.register_forward_hook(count("sam")),
        m.vision_model.register_forward_hook(count("clip")),
        m.projector.register_forward_hook(count("projector")),
    ]
    try:
        feats = BatchedGenerator(model).encode_pages(pages)
    finally:
        for h in handles:
            h.remove()
    # one call for the 2 + 6 tiles of both cropped pages, one for the 3 global views
    assert calls == {"sam": [8, 3], "clip": [8, 3], "projector": [8, 3]}
    for page, got in zip(pages, feats, strict=True):
        ref = model.encode_images(page.images_crop, page.images_ori, page.images_spatial_crop)
        assert got.shape == ref.shape == (page.image_token_count, model.config.language.hidden_size)
        assert rel_err(got, ref) < 1e-5


def test_vision_chunked_calls(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    whole = BatchedGenerator(model).encode_pages(pages)
    chunked = BatchedGenerator(model, vision_batch=3).encode_pages(pages)
    for a, b in zip(whole, chunked, strict=True):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize(
    ("n", "cap", "pow2", "want"),
    [
        (8, None, False, [8]),
        (8, 3, False, [3, 3, 2]),
        (23, None, True, [16, 4, 2, 1]),  # binary digits of 23
        (70, None, True, [32, 32, 4, 2]),  # at most VIEW_CHUNK_MAX = 32 per call
        (7, 3, True, [2, 2, 2, 1]),  # a cap that is no power of two: its largest power of two below
        (1, None, True, [1]),
        (0, None, True, []),
    ],
)
def test_view_chunks(n: int, cap: int | None, pow2: bool, want: list[int]) -> None:
    assert view_chunks(n, cap, pow2) == want


def test_fast_vision_runs_power_of_two_chunks_and_warms_them(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage]
) -> None:
    """With the fast path the 8 tiles and 3 global views go through SAM in chunks of 8 and 2 + 1 (each chunk size
    one compiled / graphed shape); the features equal the eager model's per page.  ``warm_vision`` runs every
    chunk size up to 32 for each view size of the pages (tile side and global side: 2 × 6 calls)."""
    fast = apply_fast_path(model, FastConfig(cuda_graphs=False, sam_compile=False, clip_compile=False,
                                             vision_graphs=False))  # fmt: skip
    calls: list[tuple[int, int]] = []
    modes: set[bool] = set()

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        calls.append((int(args[0].shape[0]), int(args[0].shape[-1])))
        modes.add(torch.is_inference_mode_enabled())

    handle = model.model.sam_model.register_forward_hook(hook)
    try:
        gen = BatchedGenerator(fast)
        feats = gen.encode_pages(pages)
        encoded = list(calls)
        calls.clear()
        modes.clear()
        assert gen.warm_vision(pages) == 12
        # the session times the phase under inference_mode; the warm-up must match it, or the CUDA graphs' input
        # buffers made by earlier pages (inference tensors) refuse its in-place copy (seen on the H200)
        assert modes == {True}
    finally:
        handle.remove()
    tile, glob = int(pages[1].images_crop.shape[-1]), int(pages[0].images_ori.shape[-1])
    assert encoded == [(8, tile), (2, glob), (1, glob)]
    assert sorted(calls) == sorted((n, side) for side in (tile, glob) for n in (1, 2, 4, 8, 16, 32))
    for page, got in zip(pages, feats, strict=True):
        ref = model.encode_images(page.images_crop, page.images_ori, page.images_spatial_crop)
        assert rel_err(got, ref) < 1e-5
    assert BatchedGenerator(model).warm_vision(pages) == 0  # eager: nothing compiled, nothing to warm


def test_batch_matches_single_path(
    batched: BatchResult, reference: list[GenerationResult], pages: list[PreparedPage]
) -> None:
    assert batched.padded_len == 59 and batched.prompt_lens == [29, 39, 59]
    assert batched.logits is not None
    for b, ref in enumerate(reference):
        assert batched.tokens[b] == ref.tokens, f"sequence {b}"
        assert not batched.stopped_by_eos[b]
        assert ref.logits is not None
        assert rel_err(torch.stack(batched.logits[b]), torch.stack(ref.logits)) < TOL, f"sequence {b}"


def test_batch_matches_fixture_reference(batched: BatchResult) -> None:
    """Same inputs as the reference run of the vendor code: its greedy tokens and logits."""
    assert batched.logits is not None
    for b, (name, _) in enumerate(CASES):
        case = load_file(str(TINY / "cases" / f"{name}.safetensors"))
        assert batched.tokens[b] == case["decode_tokens"].tolist()
        assert rel_err(torch.stack(batched.logits[b]), case["decode_logits"]) < TOL


def test_batch_of_one_equals_single(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], reference: list[GenerationResult]
) -> None:
    for b in (0, 2):
        res = BatchedGenerator(model).run([pages[b]], STEPS, eos_token_id=None, keep_logits=True)
        assert res.tokens == [reference[b].tokens]
        ref_logits = reference[b].logits
        assert res.logits is not None and ref_logits is not None
        assert rel_err(torch.stack(res.logits[0]), torch.stack(ref_logits)) < TOL


def test_same_page_twice_with_padding(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    """A short page padded next to a long one gives the same tokens as next to itself."""
    alone = BatchedGenerator(model).run([pages[0], pages[0]], 8, eos_token_id=None)
    padded = BatchedGenerator(model).run([pages[2], pages[0]], 8, eos_token_id=None)
    assert alone.tokens[0] == alone.tokens[1] == padded.tokens[1]


def test_eos_per_sequence(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], reference: list[GenerationResult]
) -> None:
    eos = reference[1].tokens[4]  # sequence 1 stops at its 5th token; others wherever eos first shows up
    res = BatchedGenerator(model).run(pages, STEPS, eos_token_id=eos)
    for b, page in enumerate(pages):
        expected = generate_alone(model, page, STEPS, eos=eos)
        assert res.tokens[b] == expected.tokens, f"sequence {b}"
        assert res.stopped_by_eos[b] == expected.stopped_by_eos
    assert res.stopped_by_eos[1] and len(res.tokens[1]) <= 5
    assert len(res.step_ms) == max(len(t) for t in res.tokens) - 1

    ignored = BatchedGenerator(model).run(pages, STEPS, eos_token_id=eos, ignore_eos=True)
    assert ignored.tokens == [r.tokens for r in reference]
    assert ignored.stopped_by_eos == [False, False, False]


def test_caps_per_sequence(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], reference: list[GenerationResult]
) -> None:
    caps = [3, 16, 7]
    res = BatchedGenerator(model).run(pages, caps, eos_token_id=None)
    assert res.tokens == [r.tokens[:c] for r, c in zip(reference, caps, strict=True)]
    assert len(res.step_ms) == 15
    tpot = res.tpot_ms
    assert tpot[0] == pytest.approx(sum(res.step_ms[:2]) / 2)
    assert tpot[1] == pytest.approx(sum(res.step_ms) / 15)
    one = BatchedGenerator(model).run(pages, 1, eos_token_id=None)
    assert one.tokens == [r.tokens[:1] for r in reference] and one.step_ms == []
    assert all(math.isnan(t) for t in one.tpot_ms)


def test_no_repeat_ngram_per_sequence(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    sizes = [2, 0, 3]
    res = BatchedGenerator(model).run(pages, 24, eos_token_id=None, no_repeat_ngram_size=sizes)
    for b, (page, n) in enumerate(zip(pages, sizes, strict=True)):
        assert res.tokens[b] == generate_alone(model, page, 24, ngram=n).tokens, f"sequence {b}"
    # the fixture's no-repeat case is page 1 (crop_2x1) with n = 2
    case = load_file(str(TINY / "cases" / "crop_2x1_no_repeat_2.safetensors"))
    res2 = BatchedGenerator(model).run(pages, 24, eos_token_id=None, no_repeat_ngram_size=[0, 2, 0])
    assert res2.tokens[1] == case["decode_tokens"].tolist()
    assert res.tokens[1] == case["decode_tokens_without_rule"].tolist()


def test_expert_impl_and_routing_stats(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], reference: list[GenerationResult]
) -> None:
    res = BatchedGenerator(model, expert_impl="dense").run(pages, 6, eos_token_id=None)
    assert res.tokens == [r.tokens[:6] for r in reference]
    res = BatchedGenerator(model).run(pages, 4, eos_token_id=None)
    # eager experts count host-side: prefill real tokens (29 + 39 + 59) + 3 decode steps × 3 sequences, top-3
    top_k = model.config.language.num_experts_per_tok
    for counts in model.tokens_per_expert().values():
        assert sum(counts) == (29 + 39 + 59 + 3 * 3) * top_k


def test_result_metrics(batched: BatchResult) -> None:
    assert batched.output_tokens == 3 * STEPS
    assert len(batched.step_ms) == STEPS - 1
    assert batched.decode_s == pytest.approx(sum(batched.step_ms) / 1e3, rel=1e-6)
    assert batched.total_s == pytest.approx(batched.vision_s + batched.prefill_s + batched.decode_s)
    assert batched.pages_per_s == pytest.approx(3 / batched.total_s)
    assert batched.output_tok_per_s == pytest.approx(48 / batched.total_s)
    assert len(batched.tpot_ms) == 3 and all(t > 0 for t in batched.tpot_ms)


def test_bad_arguments(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    gen = BatchedGenerator(model)
    with pytest.raises(ConfigError, match="2 values for a batch of 3"):
        gen.run(pages, [4, 4], eos_token_id=None)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        gen.run(pages, 0, eos_token_id=None)
    with pytest.raises(ConfigError, match="expert_impl"):
        BatchedGenerator(model, expert_impl="nope")


def test_fast_model_wrapper(pages: list[PreparedPage], reference: list[GenerationResult]) -> None:
    """A FastModel (fused weights, grouped experts, fast SAM) works as the model; same tokens."""
    from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, apply_fast_path

    cfg = DeepseekOCRConfig.from_json(TINY / "config.json")
    own = build_model(cfg, "cpu", torch.float32, weights=TINY / "weights.safetensors")
    fast = apply_fast_path(
        own, FastConfig(cuda_graphs=False, sam_compile=False, clip_compile=False, vision_graphs=False)
    )
    gen = BatchedGenerator(fast)
    assert gen.expert_impl == "grouped"
    res = gen.run(pages, 8, eos_token_id=None, keep_logits=True)
    assert res.tokens == [r.tokens[:8] for r in reference]
    assert res.logits is not None
    for b, ref in enumerate(reference):
        assert ref.logits is not None
        assert rel_err(torch.stack(res.logits[b]), torch.stack(ref.logits[:8])) < TOL
