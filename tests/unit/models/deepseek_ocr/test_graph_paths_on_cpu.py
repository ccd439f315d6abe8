"""The decode steps' CUDA-graph paths on the CPU (``cpu_graphs`` in tests/conftest.py): capture with its two warm-up
steps, the state reloaded, every later step a replay.  Each path against its CPU oracle: the static batched step
against the host loop (tokens), continuous batching against every page alone (tokens), the batch-1 fast decoder
against the eager model (tokens and every step's logits).  The caps include 1 and 2, where a capture's warm-up
has no room or one column: round 27's GPU fault (the static step's second warm-up wrote past a one-step cache)
fails ``test_static_graph_path_matches_the_host_loop`` here with ``IndexError`` when the clamp is taken out."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
from torch import Tensor

from llm_perf_opt.models.deepseek_ocr import DeepseekOCRForCausalLM, generate
from llm_perf_opt.models.deepseek_ocr.batched import BatchedGenerator
from llm_perf_opt.models.deepseek_ocr.continuous import SlotRequest
from llm_perf_opt.models.deepseek_ocr.fast import FastModel
from llm_perf_opt.models.deepseek_ocr.preprocess import PreparedPage
from tests.conftest import CpuGraph, generate_alone, rel_err, tiny_case_pages, tiny_fast_model


@pytest.fixture(scope="module")
def model(tiny_reference_model: DeepseekOCRForCausalLM) -> DeepseekOCRForCausalLM:
    return tiny_reference_model


def graphed(model: DeepseekOCRForCausalLM) -> BatchedGenerator:
    """A generator whose decode step can be captured (grouped experts: no host read of the routing), as on CUDA."""
    return BatchedGenerator(model, cuda_graphs=True, expert_impl="grouped")


@pytest.fixture(scope="module")
def pages(model: DeepseekOCRForCausalLM) -> list[PreparedPage]:
    return tiny_case_pages(model.config)  # prompt lengths 29, 39, 59


@pytest.mark.parametrize("caps", [1, 2, 3, [2, 5, 3]], ids=["caps1", "caps2", "caps3", "mixed"])
def test_static_graph_path_matches_the_host_loop(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], cpu_graphs: list[CpuGraph], caps: int | list[int]
) -> None:
    gen = graphed(model)
    got = gen.run(pages, caps, eos_token_id=None)
    want = BatchedGenerator(model, static_decode=False).run(pages, caps, eos_token_id=None)
    assert got.tokens == want.tokens
    steps = max(caps) - 1 if isinstance(caps, list) else caps - 1
    if steps == 0:  # no decode step: nothing to capture
        assert got.decode_path == "graph" and cpu_graphs == []
        return
    assert got.decode_path == "graph" and len(cpu_graphs) == 1 and cpu_graphs[0].replays == steps
    again = gen.run(pages, caps, eos_token_id=None)  # same shape: the kept graph, reloaded state
    assert again.tokens == want.tokens and len(cpu_graphs) == 1 and cpu_graphs[0].replays == 2 * steps


def test_static_graph_path_with_eos_and_the_no_repeat_rule(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], cpu_graphs: list[CpuGraph]
) -> None:
    """eos hit by one row (row 0's 3rd host token, 384: ``test_batched_static.EXPECTED_FIRST_HIT``) and the
    device no-repeat rule inside the step; the host loop applies both on the host."""
    host = BatchedGenerator(model, static_decode=False)
    for eos, ngram in [(384, 0), (None, 3)]:
        got = graphed(model).run(pages, 12, eos_token_id=eos, no_repeat_ngram_size=ngram)
        want = host.run(pages, 12, eos_token_id=eos, no_repeat_ngram_size=ngram)
        assert got.decode_path == "graph" and got.tokens == want.tokens and got.stopped_by_eos == want.stopped_by_eos
    assert len(cpu_graphs) == 2


@pytest.mark.parametrize("per_page", [False, True], ids=["batched-refills", "per-page-refills"])
def test_continuous_graph_path_is_every_page_alone(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], cpu_graphs: list[CpuGraph], per_page: bool
) -> None:
    """Seven requests through two slots, caps 1 to 6 (slots end and refill at different steps, one page ends at
    its prefill); the oracle is each page alone through the eager single-page path."""
    caps = [5, 2, 4, 1, 3, 2, 6]
    reqs = [SlotRequest(pages[i % 3], c) for i, c in enumerate(caps)]
    res = graphed(model).run_continuous(reqs, 2, eos_token_id=None, prefill_per_page=per_page)
    assert res.decode_path == "graph" and cpu_graphs
    assert res.tokens == [generate_alone(model, r.prepared, r.max_new_tokens).tokens for r in reqs]


@pytest.fixture(scope="module")
def fast_model() -> FastModel:
    """Its own copy of the tiny model (the fast path re-points the module weights), graphs asked for."""
    return tiny_fast_model(cuda_graphs=True, vision_graphs=False)  # type: ignore[no-any-return]


@pytest.mark.parametrize("cap", [1, 2, 6])
def test_fast_decoder_graph_path_matches_the_eager_model(
    model: DeepseekOCRForCausalLM,
    fast_model: FastModel,
    pages: list[PreparedPage],
    cpu_graphs: list[CpuGraph],
    cap: int,
) -> None:
    """The fast path's prefill graph and its batch-1 decoder captured (the decoder's warm-up at the prompt's end) and
    replayed: the eager model's tokens and every step's logits within 1e-4 relative (float32; the fast path's fused
    weights reorder sums)."""
    fast_model._decoder = None  # a decoder per test: each captures under this test's stand-in
    page = pages[2]
    want = generate_alone(model, page, cap)
    feats = fast_model.base.encode_images(page.images_crop, page.images_ori, page.images_spatial_crop)
    embeds = fast_model.base.embed_prompt(page.input_ids, page.images_seq_mask, [feats])
    got = generate(fast_model, embeds, page.input_ids[0].tolist(), cap, keep_logits=True)
    assert got.tokens == want.tokens
    assert got.logits is not None and want.logits is not None
    for a, b in zip(got.logits, want.logits, strict=True):
        assert rel_err(a, b) < 1e-4
    # the prefill's graph (this test's cache: captured, replayed once), then the decoder's with a decode step
    assert len(cpu_graphs) == (1 if cap == 1 else 2) and cpu_graphs[0].replays == 1
    assert cap == 1 or cpu_graphs[1].replays == cap - 1


def test_per_page_refills_replay_a_prefill_graph_per_length(
    model: DeepseekOCRForCausalLM, fast_model: FastModel, pages: list[PreparedPage], cpu_graphs: list[CpuGraph]
) -> None:
    """The twin of the GPU test ``test_refills_prefilled_page_by_page_replay_graphs``: seven requests through two
    slots on the fast path, the refills prefilled page by page.  By hand: the first fill is requests 0 and 1, the
    five refills are pages 2, 0, 1, 2, 0 (prompt lengths 59, 29, 39, 59, 29), so three prefill graphs are
    captured, one per length, and a second run on the same generator captures none.  Every page's tokens are its
    tokens alone on the eager model."""
    caps = [5, 2, 4, 1, 3, 2, 6]
    reqs = [SlotRequest(pages[i % 3], c) for i, c in enumerate(caps)]
    gen = BatchedGenerator(fast_model, cuda_graphs=True)
    assert gen.page_prefill_graphed
    setups = fast_model.capture_count
    run = gen.run_continuous(reqs, 2, eos_token_id=None, prefill_per_page=True)
    want = [generate_alone(model, r.prepared, r.max_new_tokens).tokens for r in reqs]
    assert run.decode_path == "graph" and run.tokens == want
    assert run.pages_prefilled_per_page == 5 and fast_model.capture_count - setups == 3
    # graphs counted by the run: the 3 prefill lengths, the 2-row step and the 1-row step of the drain (all in one
    # 256-column key bucket; the first fill's prefill is one batched eager forward), as many as the stand-in saw
    assert run.graph_captures == 5 == len(cpu_graphs)
    again = gen.run_continuous(reqs, 2, eos_token_id=None, prefill_per_page=True)
    assert again.tokens == want and fast_model.capture_count - setups == 3 and again.graph_capture_s == 0.0
    assert again.graph_captures == 0


def test_a_prefill_graphs_rotary_table_outlives_a_longer_one(
    cpu_graphs: list[CpuGraph], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefill graph reads its rotary rows by address from the model's shared table, and its kept entry holds no
    reference to it.  A later step longer than the table (the tiny model's 512 rows; 8,192 on the real one, e.g. a
    continuous step grown past it) rebuilds the table; the old one must stay alive, or the next replay of the kept
    graph (same prompt length, same cache: no recapture) reads freed memory on the GPU.  Found by reading (round
    27).  The oracle: the table the capture read is still alive after the rebuild and a collection."""
    from llm_perf_opt.models.deepseek_ocr import fast

    model = tiny_fast_model(cuda_graphs=True, vision_graphs=False)
    base, cfg = model.base, model.base.config
    rotary, key = base.model.rotary, (base.device, base.dtype)
    read: list[weakref.ref[Tensor]] = []
    capture = fast.capture_graph  # cpu_graphs' stand-in

    def capture_and_note_the_table(fn: Any, device: Any, *args: Any, **kw: Any) -> Any:
        out = capture(fn, device, *args, **kw)
        read.append(weakref.ref(rotary._tables[key][0]))
        return out

    monkeypatch.setattr(fast, "capture_graph", capture_and_note_the_table)
    cache = model.new_cache(1, 40)
    embeds = torch.randn(1, 40, cfg.language.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.prefill(embeds, cache)
    rows = rotary._tables[key][0].shape[0]
    assert len(read) == 1 and rows == cfg.language.max_position_embeddings == 512
    rotary(0, rows + 100, base.device, base.dtype)  # a longer step's table
    assert rotary._tables[key][0].shape[0] > rows
    gc.collect()
    assert read[0]() is not None, "the table the prefill graph reads was freed"
    cache.reset()
    with torch.inference_mode():
        model.prefill(embeds, cache)  # the kept graph: replayed, not recaptured
    assert len(read) == 1 and cpu_graphs[0].replays == 2


def test_per_page_refills_recapture_a_dropped_graph_before_the_fill(
    model: DeepseekOCRForCausalLM,
    pages: list[PreparedPage],
    cpu_graphs: list[CpuGraph],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast path keeps ``MAX_PREFILL_GRAPHS`` (8) prefill graphs, least recently used dropped first, shared with
    every other batch-1 prefill (the session's per-page phase).  After the kept caches' three graphs are pushed out
    by eight prefills into other caches, the next run must capture them again before its fills (in ``prepare``,
    outside the marks), never inside a fill's prefill (found by reading, round 27: ``prepare`` only looked for
    lengths it had no cache for).  The oracle: no setup happens inside any ``prefill_page`` call."""
    fast = tiny_fast_model(cuda_graphs=True, vision_graphs=False)
    cfg = fast.base.config
    gen = BatchedGenerator(fast, cuda_graphs=True)
    inside: list[int] = []
    prefill_page = BatchedGenerator.prefill_page

    def watched(self: BatchedGenerator, *args: Any) -> Tensor:
        before = fast.setup_count
        out = prefill_page(self, *args)
        inside.append(fast.setup_count - before)
        return out

    monkeypatch.setattr(BatchedGenerator, "prefill_page", watched)
    caps = [5, 2, 4, 1, 3, 2, 6]
    reqs = [SlotRequest(pages[i % 3], c) for i, c in enumerate(caps)]
    want = [generate_alone(model, r.prepared, r.max_new_tokens).tokens for r in reqs]
    assert gen.run_continuous(reqs, 2, eos_token_id=None, prefill_per_page=True).tokens == want
    assert fast.capture_count == 3 and inside == [0] * 5
    hidden = cfg.language.hidden_size
    with torch.inference_mode():
        for n in range(20, 28):  # eight other (length, cache) graphs: the three kept ones are dropped
            fast.prefill(torch.zeros(1, n, hidden), fast.new_cache(1, n))
    assert fast.capture_count == 11
    again = gen.run_continuous(reqs, 2, eos_token_id=None, prefill_per_page=True)
    assert again.tokens == want and fast.capture_count == 14  # the three captured again ...
    assert inside == [0] * 10 and again.graph_capture_s > 0  # ... before the fills, and accounted as captures


def test_a_failed_static_capture_is_not_tried_again(
    model: DeepseekOCRForCausalLM,
    pages: list[PreparedPage],
    cpu_graphs: list[CpuGraph],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A step that cannot be captured runs un-graphed with the reason recorded, and a run of another shape does not
    try again (each try costs the warm-up steps and a warning), as continuous batching already did."""
    from llm_perf_opt.models.deepseek_ocr import batched_decode

    tries: list[int] = []

    def refuse(*_: Any, **__: Any) -> Any:
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(batched_decode, "capture_graph", refuse)
    gen = graphed(model)
    host = BatchedGenerator(model, static_decode=False)
    with pytest.warns(UserWarning, match="capture failed"):
        first = gen.run(pages, 6, eos_token_id=None)
    assert (
        first.decode_path == "static"
        and first.graph_capture_error is not None
        and "stream is capturing" in (gen.capture_error or "")
    )
    other = gen.run(pages, 9, eos_token_id=None)  # another cache length: a new step, not captured
    assert other.decode_path == "static" and tries == [1]
    assert first.tokens == host.run(pages, 6, eos_token_id=None).tokens
    assert other.tokens == host.run(pages, 9, eos_token_id=None).tokens


@pytest.mark.parametrize(("cap", "ngram"), [(2, 0), (6, 0), (6, 3)])
def test_fast_decoders_on_device_loop_matches_the_eager_model(
    model: DeepseekOCRForCausalLM,
    fast_model: FastModel,
    pages: list[PreparedPage],
    cpu_graphs: list[CpuGraph],
    cap: int,
    ngram: int,
) -> None:
    """The session's decode loop on the fast path (``FastDecoder.greedy``: each step ends on the device, the token fed
    back, no host read) captured and replayed, in a cache with exactly the run's columns (prompt + cap - 1, so a
    capture's warm-up meets the last column at cap 2): the eager model's tokens, with and without the no-repeat
    rule on the device."""
    from llm_perf_opt.models.deepseek_ocr.generation import NoRepeatNGram

    fast_model._decoder = None
    page = pages[1]
    want = generate_alone(model, page, cap, ngram=ngram).tokens
    prompt = page.input_ids[0]
    feats = fast_model.base.encode_images(page.images_crop, page.images_ori, page.images_spatial_crop)
    embeds = fast_model.base.embed_prompt(page.input_ids, page.images_seq_mask, [feats])
    cache = fast_model.new_cache(1, prompt.numel() + cap - 1)
    with torch.inference_mode():
        fast_model.prefill(embeds, cache)
        dec = fast_model.decoder_for(cache, ngram)
        dec.set_history(NoRepeatNGram.of(ngram).device_history(prompt.reshape(1, -1)))
        got = dec.greedy(torch.tensor([[want[0]]]), cap - 1)[0]
    assert [want[0], *got] == want
    assert dec.graph is not None and dec.graph.replays == cap - 1  # type: ignore[attr-defined]  # every step a replay


def test_vision_graphs_per_shape_warmed_between_graphed_pages(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], cpu_graphs: list[CpuGraph]
) -> None:
    """The twin of the GPU test ``test_vision_chunks_warmed_in_inference_mode_after_graphed_pages``: pages encoded
    under inference mode (the graphs' static inputs become inference tensors), then every chunk shape warmed, then
    the pages again; the vision replays one graph per (tower, input shape).  Oracle: the eager model's features per
    page within 1e-4 (float32), and the same features before and after the warm-up."""
    gen = BatchedGenerator(tiny_fast_model(vision_graphs=True))
    with torch.inference_mode():
        before = gen.encode_pages(pages)
    assert cpu_graphs and gen.warm_vision(pages) == 12  # tile and global side × chunk sizes 1..32
    shapes = len(cpu_graphs)
    with torch.inference_mode():
        after = gen.encode_pages(pages)
    assert len(cpu_graphs) == shapes  # every shape the pages meet was captured by then: replays only
    for page, a, b in zip(pages, before, after, strict=True):
        ref = model.encode_images(page.images_crop, page.images_ori, page.images_spatial_crop)
        assert torch.equal(a, b) and rel_err(a, ref) < 1e-4


def test_static_batches_of_other_lengths_reuse_the_kept_graph(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], cpu_graphs: list[CpuGraph]
) -> None:
    """Batches of two pages, caps 4, longest prompts 39 (A) and 59 (B), in the order A, B, A, B (a repeat over mixed
    pages).  By hand: A captures (42 columns), B is longer and captures (62), then A and B both fit B's: 2 captures,
    not 4 (round 27, found by reading: each was a capture left out of the wall time as one-time).  Every batch gets
    the host loop's tokens."""
    gen = graphed(model)
    host = BatchedGenerator(model, static_decode=False)
    a, b = [pages[0], pages[1]], [pages[0], pages[2]]
    results = [gen.run(batch, 4, eos_token_id=None) for batch in (a, b, a, b)]
    assert [r.graph_capture_s > 0 for r in results] == [True, True, False, False] and len(cpu_graphs) == 2
    for batch, r in zip((a, b, a, b), results, strict=True):
        assert r.decode_path == "graph" and r.tokens == host.run(batch, 4, eos_token_id=None).tokens


def test_a_continuous_repeat_after_its_cache_grew_captures_nothing(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], cpu_graphs: list[CpuGraph]
) -> None:
    """One slot, a short page then one whose cap grows the cache past the first fill's size.  The run keeps the grown
    step; the same workload again (a repeat) must reuse it and its graphs, not build a smaller step and capture
    every graph again (round 27, found by reading)."""
    gen = graphed(model)
    reqs = [SlotRequest(pages[0], 2), SlotRequest(pages[2], 300)]
    first = gen.run_continuous(reqs, 1, eos_token_id=None)
    captured = len(cpu_graphs)
    second = gen.run_continuous(reqs, 1, eos_token_id=None)
    assert captured > 0 and len(cpu_graphs) == captured and second.graph_capture_s == 0.0
    assert first.decode_path == second.decode_path == "graph"
    assert second.tokens == first.tokens == [generate_alone(model, r.prepared, r.max_new_tokens).tokens for r in reqs]


def test_setups_inside_timed_runs_are_counted_and_those_before_a_fill_are_not(
    pages: list[PreparedPage], cpu_graphs: list[CpuGraph]
) -> None:
    """``timed_setups``: the fast path's compiles / captures inside a run's stage marks.  Unwarmed, the first run's
    vision captures its shapes inside the fills (> 0); after ``warm_vision`` the same workload has none (0).  The
    per-page refills' prefill graphs are captured in ``prepare``, before a fill's marks: three lengths, so the
    model's setup count rises by 3 during that run, and none of them is counted."""
    fast = tiny_fast_model(vision_graphs=True)
    caps = [5, 2, 4, 1, 3, 2, 6]
    reqs = [SlotRequest(pages[i % 3], c) for i, c in enumerate(caps)]
    gen = BatchedGenerator(fast, cuda_graphs=True)
    assert gen.run_continuous(reqs, 2, eos_token_id=None).timed_setups > 0
    assert gen.run([pages[0], pages[1]], 3, eos_token_id=None).timed_setups == 0  # every shape met by now
    fresh = BatchedGenerator(tiny_fast_model(), cuda_graphs=True)
    assert fresh.warm_vision(pages) > 0
    before = fresh.fast.capture_count
    run = fresh.run_continuous(reqs, 2, eos_token_id=None, prefill_per_page=True)
    assert fresh.fast.capture_count - before == 3 and run.timed_setups == 0
    assert fresh.run(pages, 3, eos_token_id=None).timed_setups == 0
