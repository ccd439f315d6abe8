"""Batched decode on CUDA: the CUDA-graph static step vs the host loop, and graph reuse across runs.

The tiny fixture model (seeded random weights) in bf16, batch 4 with mixed prompt lengths (29, 39, 59, 29).
Graph and host loop compute the same function with different kernels (attention over the whole masked
cache vs the sliced one, the MoE on every row vs live rows, a FastModel's fused GEMMs), so their logits
agree to bf16 rounding: tokens must be identical except where the host's top-2 logits are within that
rounding (a near-tie), after which the two sequences may legitimately differ and are not compared further.
The graph and the same step un-graphed run the same kernels: identical tokens.

Skipped without CUDA; on the device machine: ``pytest -m gpu tests/gpu/test_batched_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, DeepseekOCRForCausalLM, build_model
from llm_perf_opt.models.deepseek_ocr.batched import BatchedGenerator, BatchResult
from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, FastModel, apply_fast_path
from llm_perf_opt.models.deepseek_ocr.preprocess import PreparedPage
from llm_perf_opt.profiling.timers import DeviceClock
from tests.conftest import TINY, requires_cuda, tiny_case_pages

pytestmark = [pytest.mark.gpu, requires_cuda]

STEPS = 32
# a near-tie: host top-2 logits closer than this (relative to the largest |logit|) plus an absolute floor
TIE_REL, TIE_ABS = 2e-2, 1e-2


@pytest.fixture(scope="module")
def model() -> DeepseekOCRForCausalLM:
    cfg = DeepseekOCRConfig.from_json(TINY / "config.json")
    return build_model(cfg, "cuda", torch.bfloat16, weights=TINY / "weights.safetensors")


@pytest.fixture(scope="module")
def fast(model: DeepseekOCRForCausalLM) -> FastModel:
    """Fused / grouped layers over the same weights (views, same values); vision left eager (not under test)."""
    return apply_fast_path(model, FastConfig(sam_compile=False, clip_compile=False, vision_graphs=False))


@pytest.fixture(scope="module")
def pages(model: DeepseekOCRForCausalLM) -> list[PreparedPage]:
    out = tiny_case_pages(model.config)
    return [*out, out[0]]  # batch 4, prompt lengths 29, 39, 59, 29


# a row must match token for token at least this long (or to its end) before a near-tie may end the comparison:
# otherwise an early near-tie would leave a row compared over a step or two (the logits themselves are compared
# under teacher forcing in test_parity_logits.py)
MIN_MATCH = 8


def assert_tokens_match(graph: BatchResult, host: BatchResult) -> None:
    """Token for token, except from a step where the host's choice was a near-tie (after MIN_MATCH steps)."""
    assert host.logits is not None
    for b, (got, want) in enumerate(zip(graph.tokens, host.tokens, strict=True)):
        for i, (g, w) in enumerate(zip(got, want, strict=False)):
            if g != w:
                assert i >= min(MIN_MATCH, len(want)), (b, i, "diverged before the minimum matched length")
                row = host.logits[b][i]
                top2 = row.topk(2).values
                gap = float(top2[0] - top2[1])
                assert gap <= TIE_REL * float(row.abs().max()) + TIE_ABS, (b, i, g, w, gap)
                break
        else:
            assert len(got) == len(want), b
            assert graph.stopped_by_eos[b] == host.stopped_by_eos[b], b


def _generator(model: DeepseekOCRForCausalLM, fast: FastModel, kind: str, **kw: object) -> BatchedGenerator:
    clock = DeviceClock(model.device)
    if kind == "fast":
        return BatchedGenerator(fast, clock=clock, **kw)  # type: ignore[arg-type]
    return BatchedGenerator(model, expert_impl="grouped", clock=clock, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["base", "fast"])
def test_graph_matches_host_loop(
    model: DeepseekOCRForCausalLM, fast: FastModel, pages: list[PreparedPage], kind: str
) -> None:
    host_gen = _generator(model, fast, kind, static_decode=False)
    graph_gen = _generator(model, fast, kind)
    ref = host_gen.run(pages, STEPS, eos_token_id=None, keep_logits=True)
    res = graph_gen.run(pages, STEPS, eos_token_id=None)
    assert ref.decode_path == "host" and res.decode_path == "graph", graph_gen.capture_error
    assert res.graph_capture_s > 0 and res.idle_steps == 0 and len(res.step_ms) == STEPS - 1
    assert_tokens_match(res, ref)

    # eos hit by different rows at different steps (row 1's 6th host token), per-row caps
    eos = ref.tokens[1][5]
    caps = [STEPS, STEPS, 12, 7]
    ref = host_gen.run(pages, caps, eos_token_id=eos, keep_logits=True)
    res = graph_gen.run(pages, caps, eos_token_id=eos)
    assert res.decode_path == "graph" and res.graph_capture_s == 0.0  # same shape: replayed, not captured
    assert_tokens_match(res, ref)
    assert ref.stopped_by_eos[1]


@pytest.mark.parametrize("kind", ["base", "fast"])
def test_graph_equals_ungraphed_step_and_is_reused(
    model: DeepseekOCRForCausalLM, fast: FastModel, pages: list[PreparedPage], kind: str
) -> None:
    gen = _generator(model, fast, kind)
    eager = _generator(model, fast, kind, cuda_graphs=False)
    first = gen.run(pages, STEPS, eos_token_id=None)
    static = gen._static
    assert static is not None and static.graph is not None
    graph = static.graph
    assert first.decode_path == "graph" and first.graph_capture_s > 0
    same = eager.run(pages, STEPS, eos_token_id=None)
    assert same.decode_path == "static" and same.tokens == first.tokens

    again = gen.run(pages, STEPS, eos_token_id=None)
    assert gen._static is static and static.graph is graph
    assert again.graph_capture_s == 0.0 and again.tokens == first.tokens
    assert again.decode_s > 0 and len(again.step_ms) == STEPS - 1 and all(t > 0 for t in again.step_ms)

    # same shape, other pads per row and an eos: the kept graph, reloaded state, stale K/V masked
    swapped = [pages[2], pages[0], pages[1], pages[3]]
    eos = first.tokens[0][3]
    got = gen.run(swapped, STEPS, eos_token_id=eos)
    assert static.graph is graph and got.graph_capture_s == 0.0
    want = eager.run(swapped, STEPS, eos_token_id=eos)
    assert got.tokens == want.tokens and got.stopped_by_eos == want.stopped_by_eos
    assert got.idle_steps < gen.check_every


@pytest.mark.parametrize("kind", ["base", "fast"])
def test_one_decode_step_is_captured_inside_its_cache(
    model: DeepseekOCRForCausalLM, fast: FastModel, pages: list[PreparedPage], kind: str
) -> None:
    """Caps of 2: one decode step, a cache with one column past the prompt.  The capture's two warm-up steps must
    stay inside it (round 27: they read and wrote column L + 1, a device-side assert that poisoned the process);
    the graphed run gives the un-graphed step's tokens, and the CUDA context is healthy for the next run."""
    gen = _generator(model, fast, kind)
    eager = _generator(model, fast, kind, cuda_graphs=False)
    res = gen.run(pages, 2, eos_token_id=None)
    torch.cuda.synchronize()  # an out-of-bounds index would surface here
    assert res.decode_path == "graph" and res.graph_capture_s > 0, gen.capture_error
    assert res.tokens == eager.run(pages, 2, eos_token_id=None).tokens
    assert all(len(t) == 2 for t in res.tokens)
    longer = gen.run(pages, 6, eos_token_id=None)
    assert longer.tokens == eager.run(pages, 6, eos_token_id=None).tokens


@pytest.mark.parametrize("ngram", [3, 20])
def test_graph_with_device_ngram_rule_matches_ungraphed_step(
    model: DeepseekOCRForCausalLM, fast: FastModel, pages: list[PreparedPage], ngram: int
) -> None:
    """The no-repeat-ngram rule inside the captured step: same kernels as the un-graphed static step, so identical
    tokens (the rule itself equals the host loop's on the CPU: tests/unit/models/deepseek_ocr/test_batched_static)."""
    graph_gen = _generator(model, fast, "fast")
    plain_gen = _generator(model, fast, "fast", cuda_graphs=False)
    caps = [STEPS, STEPS, 12, 7]
    res = graph_gen.run(pages, caps, eos_token_id=None, no_repeat_ngram_size=ngram)
    ref = plain_gen.run(pages, caps, eos_token_id=None, no_repeat_ngram_size=ngram)
    assert res.decode_path == "graph" and ref.decode_path == "static", graph_gen.capture_error
    assert res.graph_capture_s > 0 and res.tokens == ref.tokens


@pytest.mark.parametrize("ngram", [3, 20])
def test_ngram_kernel_in_the_graphed_batched_and_continuous_steps(
    model: DeepseekOCRForCausalLM, fast: FastModel, pages: list[PreparedPage], ngram: int
) -> None:
    """``ngram_kernel`` (the default) inside the captured static and continuous steps: the same tokens as the same
    steps with the torch mask (``ngram_kernel=False``); the kernel equals the torch mask bit for bit at the real
    vocabulary (test_kernels_gpu), so the tokens must be equal, not merely close."""
    import attrs

    from llm_perf_opt.models.deepseek_ocr.continuous import SlotRequest

    masked = apply_fast_path(model, attrs.evolve(fast.fast_config, ngram_kernel=False))
    kernel_gen, mask_gen = _generator(model, fast, "fast"), _generator(model, masked, "fast")
    assert kernel_gen.ngram_kernel and not mask_gen.ngram_kernel
    caps = [STEPS, STEPS, 12, 7]
    res = kernel_gen.run(pages, caps, eos_token_id=None, no_repeat_ngram_size=ngram)
    ref = mask_gen.run(pages, caps, eos_token_id=None, no_repeat_ngram_size=ngram)
    assert res.decode_path == ref.decode_path == "graph", kernel_gen.capture_error
    assert res.tokens == ref.tokens
    # the rule decided tokens at n = 3 (otherwise a kernel that bans nothing would pass): the tiny model's greedy
    # rows repeat short cycles; the 20-gram case may not fire within 32 steps, so only its equality is held
    if ngram == 3:
        assert res.tokens != kernel_gen.run(pages, caps, eos_token_id=None).tokens
    reqs = [SlotRequest(p, cap) for p, cap in zip([*pages, *pages], [STEPS, 9, 12, 7, 5, STEPS, 3, 11], strict=True)]
    got = kernel_gen.run_continuous(reqs, 3, eos_token_id=None, no_repeat_ngram_size=ngram)
    want = mask_gen.run_continuous(reqs, 3, eos_token_id=None, no_repeat_ngram_size=ngram)
    assert got.tokens == want.tokens
    if ngram == 3:
        assert got.tokens != kernel_gen.run_continuous(reqs, 3, eos_token_id=None).tokens


def test_vision_chunks_warmed_in_inference_mode_after_graphed_pages(model: DeepseekOCRForCausalLM) -> None:
    """The batched phase's order on the device: pages encoded under inference_mode (the vision graphs' static
    input buffers become inference tensors), then ``warm_vision`` for every chunk shape, then pages again.  The
    first version of the warm-up ran outside inference_mode and the graphs refused its copy (H200, goals-18 run).
    Oracle: the eager model's features per page."""
    fast = apply_fast_path(model, FastConfig(sam_compile=False, clip_compile=False, vision_graphs=True))
    pages = tiny_case_pages(model.config)
    gen = BatchedGenerator(fast, clock=DeviceClock(model.device))
    with torch.inference_mode():
        before = gen.encode_pages(pages)
    assert gen.warm_vision(pages) == 12  # tile and global side × chunk sizes 1..32
    with torch.inference_mode():
        after = gen.encode_pages(pages)
        for page, a, b in zip(pages, before, after, strict=True):
            ref = model.encode_images(page.images_crop.to("cuda", torch.bfloat16),
                                      page.images_ori.to("cuda", torch.bfloat16), page.images_spatial_crop)  # fmt: skip
            assert torch.equal(a, b)  # the same graphs replayed
            rel = float((a.float() - ref.float()).norm() / ref.float().norm())
            assert rel < 3e-2, rel  # bf16 rounding of the fast vision (as test_fast_path.py)


def test_dependent_launches_give_the_same_graphed_tokens(
    model: DeepseekOCRForCausalLM, fast: FastModel, pages: list[PreparedPage]
) -> None:
    """``pdl``: the batched step's Triton kernels (row attention, and at 12 rows the grouped expert kernels) as
    programmatic dependent launches in the captured graph give the plain launches' tokens (the same arithmetic:
    each kernel waits on the device before its first load)."""
    twelve = pages * 3
    pdl = apply_fast_path(model, FastConfig(sam_compile=False, clip_compile=False, vision_graphs=False, pdl=True))
    for rows in (pages, twelve):
        ref = _generator(model, fast, "fast").run(rows, STEPS, eos_token_id=None, no_repeat_ngram_size=20)
        gen = _generator(model, pdl, "fast")
        res = gen.run(rows, STEPS, eos_token_id=None, no_repeat_ngram_size=20)
        assert ref.decode_path == "graph" and res.decode_path == "graph", gen.capture_error
        assert res.tokens == ref.tokens, len(rows)
