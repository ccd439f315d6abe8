"""Continuous batching on CUDA under graph capture: the captured slot step vs the same step un-graphed vs each page
alone.

The tiny fixture model in float32 (so near-ties are out of the way and tokens can be compared exactly) through the
fast path's fused / grouped layers (graph-safe experts); the mixed-length workload of
``tests/unit/models/deepseek_ocr/test_continuous.py`` (8 pages, caps 1..13, 3 slots, refills while others
decode) with the vendor-style no-repeat-ngram rule on the device.  The graph replays the same kernels as the
un-graphed step: identical tokens; every page must give the tokens it gives alone (a batch of one).

Skipped without CUDA; on the device machine: ``pytest -m gpu tests/gpu/test_continuous_gpu.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model, continuous
from llm_perf_opt.models.deepseek_ocr.batched import BatchedGenerator
from llm_perf_opt.models.deepseek_ocr.continuous import LEN_QUANTUM, ContinuousResult, SlotRequest
from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, FastModel, apply_fast_path
from llm_perf_opt.models.deepseek_ocr.graphs import default_capture_stream
from llm_perf_opt.models.deepseek_ocr.preprocess import PreparedPage
from llm_perf_opt.profiling.timers import DeviceClock
from tests.conftest import TINY, rel_err, requires_cuda, tiny_case_pages

pytestmark = [pytest.mark.gpu, requires_cuda]

WORKLOAD = [(0, 9), (1, 4), (2, 13), (0, 6), (1, 1), (2, 5), (1, 11), (0, 3)]
SLOTS = 3
NGRAM = 3


@pytest.fixture(scope="module")
def fast() -> FastModel:
    cfg = DeepseekOCRConfig.from_json(TINY / "config.json")
    model = build_model(cfg, "cuda", torch.float32, weights=TINY / "weights.safetensors")
    return apply_fast_path(model, FastConfig(sam_compile=False, clip_compile=False, vision_graphs=False))


@pytest.fixture(scope="module")
def pages(fast: FastModel) -> list[PreparedPage]:
    return tiny_case_pages(fast.base.config)


def _gen(fast: FastModel, graphs: bool = True) -> BatchedGenerator:
    return BatchedGenerator(fast, clock=DeviceClock(fast.base.device), cuda_graphs=graphs)


def _requests(pages: list[PreparedPage]) -> list[SlotRequest]:
    return [SlotRequest(pages[i], cap) for i, cap in WORKLOAD]


@pytest.mark.parametrize("eos", [None, 384])
def test_graph_equals_ungraphed_and_each_page_alone(
    fast: FastModel, pages: list[PreparedPage], eos: int | None
) -> None:
    graph = _gen(fast).run_continuous(_requests(pages), SLOTS, eos_token_id=eos, no_repeat_ngram_size=NGRAM)
    assert graph.decode_path == "graph" and graph.graph_capture_s > 0
    plain = _gen(fast, graphs=False).run_continuous(
        _requests(pages), SLOTS, eos_token_id=eos, no_repeat_ngram_size=NGRAM
    )
    assert plain.decode_path == "static"
    assert graph.tokens == plain.tokens and graph.stopped_by_eos == plain.stopped_by_eos
    alone_gen = _gen(fast)
    for i, (p, cap) in enumerate(WORKLOAD):
        alone = alone_gen.run([pages[p]], cap, eos_token_id=eos, no_repeat_ngram_size=NGRAM)
        assert graph.tokens[i] == alone.tokens[0], i
    assert graph.fills >= 2 and graph.slot_occupancy is not None and 0 < graph.slot_occupancy <= 1


def test_graph_reused_and_recaptured_after_growth(fast: FastModel, pages: list[PreparedPage]) -> None:
    gen = _gen(fast)
    first = gen.run_continuous(_requests(pages), SLOTS, eos_token_id=None, no_repeat_ngram_size=NGRAM)
    again = gen.run_continuous(_requests(pages), SLOTS, eos_token_id=None, no_repeat_ngram_size=NGRAM)
    assert again.graph_capture_s == 0.0 and again.tokens == first.tokens  # the kept graph replayed
    long_cap = LEN_QUANTUM + 5  # a page that needs a longer cache mid-run: state copied, graph captured again
    reqs = [SlotRequest(pages[0], 4), SlotRequest(pages[1], 3), SlotRequest(pages[2], long_cap)]
    grown = gen.run_continuous(reqs, 2, eos_token_id=None)
    alone = _gen(fast).run([pages[2]], long_cap, eos_token_id=None)
    assert grown.decode_path == "graph", gen.capture_error
    assert grown.tokens[2] == alone.tokens[0]


def test_drain_narrowing_under_graphs(fast: FastModel, pages: list[PreparedPage]) -> None:
    """12 slots for 8 pages: the drain narrows 12 -> 8 -> 4 -> 2 -> 1 rows, each width captured as its own graph
    over the first rows of the one cache; the same tokens as the full-width run, graphed and not."""
    gen = _gen(fast)
    narrow = gen.run_continuous(_requests(pages), 12, eos_token_id=None, no_repeat_ngram_size=NGRAM)
    assert narrow.decode_path == "graph" and sorted(set(narrow.step_rows)) == [1, 2, 4, 8, 12]
    wide = _gen(fast).run_continuous(
        _requests(pages), 12, eos_token_id=None, no_repeat_ngram_size=NGRAM, narrow_drain=False
    )
    plain = _gen(fast, graphs=False).run_continuous(_requests(pages), 12, eos_token_id=None, no_repeat_ngram_size=NGRAM)
    assert narrow.tokens == wide.tokens == plain.tokens
    again = gen.run_continuous(_requests(pages), 12, eos_token_id=None, no_repeat_ngram_size=NGRAM)
    assert again.graph_capture_s == 0.0 and again.tokens == narrow.tokens  # the narrower graphs kept and replayed


@pytest.fixture(scope="module")
def graphed_vision() -> FastModel:
    """The tiny model with the vision towers replayed from CUDA graphs (static buffers shared by every call): what
    the second stream's vision must not race with."""
    cfg = DeepseekOCRConfig.from_json(TINY / "config.json")
    model = build_model(cfg, "cuda", torch.float32, weights=TINY / "weights.safetensors")
    return apply_fast_path(model, FastConfig(sam_compile=False, clip_compile=False, vision_graphs=True))


@pytest.mark.parametrize("ahead", [1, 2])
def test_vision_ahead_on_a_second_stream_changes_nothing(
    graphed_vision: FastModel, pages: list[PreparedPage], ahead: int
) -> None:
    """Vision run ahead on a second stream, beside graph-replayed decode steps, gives every page the tokens of the
    plain run (graphs, vision in the refills); with kept logits (un-graphed steps, the same second stream) each
    chosen token's logits are those of the plain run's bit for bit: the same kernels on the same inputs."""
    plain = _gen(graphed_vision).run_continuous(_requests(pages), SLOTS, eos_token_id=None, no_repeat_ngram_size=NGRAM)
    run = _gen(graphed_vision).run_continuous(
        _requests(pages), SLOTS, eos_token_id=None, no_repeat_ngram_size=NGRAM, vision_ahead=ahead
    )
    assert run.decode_path == "graph" and run.tokens == plain.tokens
    assert run.pages_ahead == (5 if ahead == 2 else 4) and run.vision_ahead_s > 0
    # the vision graphs are captured apart from the steps' graphs (torch's shared capture stream): one cuBLAS
    # workspace per capture stream, and the two replay side by side here
    handles = [s.cuda_stream for s in graphed_vision.vision.capture_streams]
    assert len(handles) == 2 and default_capture_stream().cuda_stream not in handles
    reqs = _requests(pages)
    kept = [
        _gen(graphed_vision).run_continuous(reqs, SLOTS, eos_token_id=None, keep_logits=True, vision_ahead=n)
        for n in (0, ahead)
    ]
    assert kept[0].tokens == kept[1].tokens
    assert kept[0].logits is not None and kept[1].logits is not None
    for a, b in zip(kept[0].logits, kept[1].logits, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("ahead", [1, 2])
def test_prefill_ahead_on_a_second_stream_keeps_every_token(
    graphed_vision: FastModel, pages: list[PreparedPage], ahead: int
) -> None:
    """Vision and LM prefill run ahead on a second stream (each page prefilled alone into its own cache), beside
    graph-replayed decode steps: every page gets the plain run's tokens.  With kept logits, each chosen token's
    logits are within float32 rounding of the plain run's (a page prefilled alone, not in a left-padded batch, may
    meet other GEMM tilings: equal within 1e-4 relative, not bit for bit)."""
    plain = _gen(graphed_vision).run_continuous(_requests(pages), SLOTS, eos_token_id=None, no_repeat_ngram_size=NGRAM)
    run = _gen(graphed_vision).run_continuous(
        _requests(pages), SLOTS, eos_token_id=None, no_repeat_ngram_size=NGRAM, vision_ahead=ahead, prefill_ahead=True
    )
    assert run.decode_path == "graph" and run.tokens == plain.tokens
    n_ahead = 5 if ahead == 2 else 4
    assert (run.pages_ahead, run.pages_prefilled_ahead) == (n_ahead, n_ahead) and run.prefill_ahead_s > 0
    reqs = _requests(pages)
    kept = [
        _gen(graphed_vision).run_continuous(
            reqs, SLOTS, eos_token_id=None, keep_logits=True, vision_ahead=n, prefill_ahead=n > 0
        )
        for n in (0, ahead)
    ]
    assert kept[0].tokens == kept[1].tokens
    assert kept[0].logits is not None and kept[1].logits is not None
    for a, b in zip(kept[0].logits, kept[1].logits, strict=True):
        assert all(rel_err(y, x) < 1e-4 for x, y in zip(a, b, strict=True))


def test_a_wait_for_a_prefill_run_ahead_is_prefill_time_not_vision(
    graphed_vision: FastModel, pages: list[PreparedPage]
) -> None:
    """Every LM prefill made ~25 ms longer (a device sleep after it, on whichever stream it runs): the run's vision
    time stays the plain run's, within half a sleep.  The refill at step 8 takes the page prefilled ahead and runs
    one page's vision of its own while that prefill still sleeps on the second stream; its vision used to wait for
    the whole second stream, so the sleep showed up as vision (round 28's fix: the fill waits for its prefills
    first, as prefill time, so its vision's wait for the second stream holds none).  The first fill's own
    prefill sleeps on the main stream, so the prefill time grows by at least one sleep: the patch took effect."""
    cycles = 50_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    sleep_s = start.elapsed_time(end) / 1e3

    def run(slow: bool) -> ContinuousResult:
        gen = _gen(graphed_vision)
        if slow:
            real = gen._prefill

            def slow_prefill(*args: Any, **kwargs: Any) -> torch.Tensor:
                # after the prefill, not before: the prefill waits on the host for its stream (its lengths are read
                # back), so a sleep before it would end on the host inside the run-ahead, leaving nothing to wait for
                out = real(*args, **kwargs)
                torch.cuda._sleep(cycles)
                return out

            gen._prefill = slow_prefill  # type: ignore[method-assign]
        return gen.run_continuous(
            _requests(pages), SLOTS, eos_token_id=None, no_repeat_ngram_size=NGRAM, vision_ahead=1, prefill_ahead=True
        )

    run(False)  # every vision shape and stream met once: neither timed run below holds a capture
    plain, slowed = run(False), run(True)
    assert (plain.timed_setups, slowed.timed_setups) == (0, 0)
    assert slowed.tokens == plain.tokens and slowed.pages_prefilled_ahead == plain.pages_prefilled_ahead == 4
    assert slowed.prefill_s - plain.prefill_s > sleep_s
    assert slowed.vision_s - plain.vision_s < 0.5 * sleep_s, (slowed.vision_s, plain.vision_s, sleep_s)


def _draws_until(handle: int) -> int:
    """Pool streams drawn until one with ``handle`` comes (that one included)."""
    for n in range(1, 1025):
        if torch.cuda.Stream(torch.device("cuda")).cuda_stream == handle:
            return n
    raise AssertionError(f"stream {handle:#x} never came back from torch's stream pool")


def _next_draw_is(handle: int) -> None:
    """Leave torch's round-robin stream pool so that its next stream is ``handle``'s (a stream of that pool)."""
    _draws_until(handle)
    cycle = _draws_until(handle)  # the pool's size, whatever torch's build makes it
    for _ in range(cycle - 1):
        torch.cuda.Stream(torch.device("cuda"))


def test_the_run_ahead_stream_is_none_the_fast_path_holds(
    graphed_vision: FastModel, pages: list[PreparedPage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 32: torch hands out pool streams round-robin, and the run-ahead's second stream, drawn apart from the
    capture streams only, came out as the global view's stream in the GPU suite.  Vision run there is taken for the
    global view's chain, whose graphs are keyed by another capture stream: four graphs were captured inside the
    timed fills.  Here the pool is left so that its next stream is each stream the fast path holds in turn (the
    view stream, the capture streams, the prompt's shared-experts stream): the run's second stream is none of
    them, the run captures nothing (every shape was met before) and the vision graphs' keys stay the warm run's."""
    held = [s for s in (*graphed_vision.vision.streams, graphed_vision.prompt_stream) if s is not None]
    assert graphed_vision.vision.view_stream is not None  # the default vision_streams: what the draw must avoid
    handles = [s.cuda_stream for s in (default_capture_stream(), *held)]
    assert len(set(handles)) == len(handles), "the fast path's own streams collide"
    gen = _gen(graphed_vision)
    kwargs: dict[str, Any] = {"eos_token_id": None, "no_repeat_ngram_size": NGRAM, "vision_ahead": 1}
    warm = gen.run_continuous(_requests(pages), SLOTS, prefill_ahead=True, **kwargs)
    keys = {name: set(g.graphs) for name, g in graphed_vision.vision.graphs.items()}
    drawn: list[int] = []
    stream_apart = continuous.stream_apart

    def recorded(*args: Any, **kw: Any) -> Any:
        stream = stream_apart(*args, **kw)
        drawn.append(stream.cuda_stream)
        return stream

    monkeypatch.setattr(continuous, "stream_apart", recorded)
    for stream in held:
        _next_draw_is(stream.cuda_stream)
        run = gen.run_continuous(_requests(pages), SLOTS, prefill_ahead=True, **kwargs)
        assert len(drawn) == 1 and drawn.pop() not in handles  # the run's second stream
        assert run.tokens == warm.tokens and run.pages_ahead == warm.pages_ahead > 0
        assert run.timed_setups == 0, f"{run.timed_setups} captures in the timed fills with {stream} drawn next"
        assert {name: set(g.graphs) for name, g in graphed_vision.vision.graphs.items()} == keys


def test_the_fast_paths_streams_are_drawn_apart_from_the_shared_capture_stream() -> None:
    """A fast path built when the pool's next stream is torch's shared capture stream (where the decode and prefill
    graphs are captured): before round 32 the global view's stream was drawn as it came, so it would have been that
    stream.  Every stream the fast path holds is apart from it and from the others."""
    cfg = DeepseekOCRConfig.from_json(TINY / "config.json")
    model = build_model(cfg, "cuda", torch.float32, weights=TINY / "weights.safetensors")
    shared = default_capture_stream()
    _next_draw_is(shared.cuda_stream)
    fast = apply_fast_path(model, FastConfig(sam_compile=False, clip_compile=False))
    held = [s for s in (*fast.vision.streams, fast.prompt_stream) if s is not None]
    assert fast.vision.view_stream is not None and len(held) >= 3
    handles = [s.cuda_stream for s in (shared, *held)]
    assert len(set(handles)) == len(handles), handles


def test_a_run_stopped_by_an_error_leaves_no_work_ahead_unwaited(fast: FastModel, pages: list[PreparedPage]) -> None:
    """A page with a cap of 0 taken by the run-ahead: the refill that takes it raises ``ConfigError`` while that
    page's vision (with a ~0.5 s device sleep after it) is still on the second stream.  The main stream must wait
    for it before the error leaves the run (before round 29 nothing did: the next run's first fill ran vision on
    the main stream beside it).  Oracle: an event recorded after the sleep on the second stream is complete once an
    event recorded on the main stream after the error is.  The next run on the same generator gets the plain run's
    tokens.  Un-graphed steps: a graph capture synchronises the device, which would wait the sleep out before
    the error and leave the test unable to fail; nothing else between the run-ahead and the error syncs."""
    gen = _gen(fast, graphs=False)
    plain = gen.run_continuous(_requests(pages), SLOTS, eos_token_id=None, no_repeat_ngram_size=NGRAM)
    main = torch.cuda.current_stream()
    slept: list[tuple[torch.cuda.Stream, torch.cuda.Event]] = []
    real = gen.encode_pages

    def slow_encode(batch: Any) -> list[torch.Tensor]:
        out = real(batch)
        stream = torch.cuda.current_stream()
        if stream != main:  # the run-ahead's vision only
            torch.cuda._sleep(1_000_000_000)
            done = torch.cuda.Event()
            done.record(stream)
            slept.append((stream, done))
        return out

    gen.encode_pages = slow_encode  # type: ignore[method-assign]
    bad = [SlotRequest(pages[i], cap) for i, cap in WORKLOAD[:SLOTS]] + [SlotRequest(pages[0], 0)]
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 1"):
        gen.run_continuous(bad, SLOTS, eos_token_id=None, no_repeat_ngram_size=NGRAM, vision_ahead=1)
    after = torch.cuda.Event()
    after.record(main)
    after.synchronize()
    assert len(slept) == 1 and slept[0][0] != main
    assert slept[0][1].query(), "the main stream did not wait for the vision run ahead of the failed fill"
    gen.encode_pages = real  # type: ignore[method-assign]
    again = gen.run_continuous(_requests(pages), SLOTS, eos_token_id=None, no_repeat_ngram_size=NGRAM)
    assert again.tokens == plain.tokens


def test_refills_prefilled_page_by_page_replay_graphs(graphed_vision: FastModel, pages: list[PreparedPage]) -> None:
    """``prefill_per_page`` on the fast path: each refill page's LM prefill is a replay of the graph kept per prompt
    length (three lengths among the five refill pages: three captures, before the fills), beside graph-replayed
    decode steps: every page gets the plain run's tokens, and with kept logits each chosen token's logits are within
    1e-4 of the plain run's (a page prefilled alone, not in a left-padded batch, may meet other GEMM tilings).  A
    second run on the same generator captures nothing: the caches, and so their graphs, are kept."""
    plain = _gen(graphed_vision).run_continuous(_requests(pages), SLOTS, eos_token_id=None, no_repeat_ngram_size=NGRAM)
    gen = _gen(graphed_vision)
    assert gen.page_prefill_graphed
    setups = graphed_vision.capture_count
    run = gen.run_continuous(
        _requests(pages), SLOTS, eos_token_id=None, no_repeat_ngram_size=NGRAM, prefill_per_page=True
    )
    assert run.decode_path == "graph" and run.tokens == plain.tokens
    assert run.pages_prefilled_per_page == 5 and graphed_vision.capture_count - setups == 3
    again = gen.run_continuous(
        _requests(pages), SLOTS, eos_token_id=None, no_repeat_ngram_size=NGRAM, prefill_per_page=True
    )
    assert again.tokens == plain.tokens and again.graph_capture_s == 0.0
    assert graphed_vision.capture_count - setups == 3
    kept = [
        _gen(graphed_vision).run_continuous(
            _requests(pages), SLOTS, eos_token_id=None, keep_logits=True, prefill_per_page=per_page
        )
        for per_page in (False, True)
    ]
    assert kept[0].tokens == kept[1].tokens
    assert kept[0].logits is not None and kept[1].logits is not None
    for a, b in zip(kept[0].logits, kept[1].logits, strict=True):
        assert all(rel_err(y, x) < 1e-4 for x, y in zip(a, b, strict=True))
