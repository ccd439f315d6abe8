"""Continuous batching (slots refilled as sequences end) vs every page run alone on the eager single-page path.

The oracle is ``generation.generate`` over the eager ``encode_images`` / ``embed_prompt`` path, one page at a
time: for every page of a mixed-length workload (the tiny fixture's three pages, prompt lengths 29, 39, 59,
cycled with different caps, so slots end at different steps and are refilled while the others decode),
continuous batching must give the same greedy tokens and every chosen token's logits within 1e-4 relative
(random weights repeat ids, so equal tokens alone would prove little).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import attrs
import pytest
import torch

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.models.deepseek_ocr import DeepseekOCRForCausalLM
from llm_perf_opt.models.deepseek_ocr.batched import BatchedGenerator
from llm_perf_opt.models.deepseek_ocr.continuous import (
    LEN_QUANTUM,
    ContinuousResult,
    SlotDecodeStep,
    SlotRequest,
    cache_len_for,
    slot_occupancy,
)
from llm_perf_opt.models.deepseek_ocr.preprocess import PreparedPage
from tests.conftest import generate_alone, rel_err, tiny_case_pages

TOL = 1e-4
# (fixture page, cap): 8 pages through 3 slots; caps differ so slots end (and are refilled) at different steps,
# one page ends at its prefill (cap 1)
WORKLOAD = [(0, 9), (1, 4), (2, 13), (0, 6), (1, 1), (2, 5), (1, 11), (0, 3)]
SLOTS = 3


@pytest.fixture(scope="module")
def model(tiny_reference_model: DeepseekOCRForCausalLM) -> DeepseekOCRForCausalLM:
    return tiny_reference_model


@pytest.fixture(scope="module")
def pages(model: DeepseekOCRForCausalLM) -> list[PreparedPage]:
    return tiny_case_pages(model.config)


def requests(pages: list[PreparedPage]) -> list[SlotRequest]:
    return [SlotRequest(pages[i], cap) for i, cap in WORKLOAD]


def continuous(
    model: DeepseekOCRForCausalLM,
    pages: list[PreparedPage],
    eos: int | None = None,
    ngram: int = 0,
    keep_logits: bool = True,
    slots: int = SLOTS,
) -> ContinuousResult:
    gen = BatchedGenerator(model)
    return gen.run_continuous(
        requests(pages), slots, eos_token_id=eos, no_repeat_ngram_size=ngram, keep_logits=keep_logits
    )


def assert_matches_alone(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], res: ContinuousResult, eos: int | None, ngram: int
) -> None:
    assert res.pages == len(WORKLOAD)
    for i, (p, cap) in enumerate(WORKLOAD):
        ref = generate_alone(model, pages[p], cap, eos, ngram)
        assert res.tokens[i] == ref.tokens, f"page {i}"
        assert res.prompt_lens[i] == pages[p].prompt_len
        if res.logits is not None:
            assert ref.logits is not None and len(res.logits[i]) == len(ref.logits)
            for got, want in zip(res.logits[i], ref.logits, strict=True):
                assert rel_err(got, want.reshape(-1)) < TOL, f"page {i}"


@pytest.fixture(scope="module")
def plain(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> ContinuousResult:
    return continuous(model, pages)


def test_every_page_as_alone(model: DeepseekOCRForCausalLM, pages: list[PreparedPage], plain: ContinuousResult) -> None:
    assert_matches_alone(model, pages, plain, None, 0)
    assert [len(t) for t in plain.tokens] == [cap for _, cap in WORKLOAD]  # every cap honoured exactly


def keys_by_hand(pages: list[PreparedPage]) -> int:
    """Keys the decode steps attend over without eos: page i's j-th decode step (j < cap - 1) feeds the token it
    wrote at column prompt_len + j, so it attends over prompt_len + j + 1 keys; a slot holds a page only while it
    has steps left (ended slots are refilled before the next step, or left empty)."""
    return sum(pages[p].prompt_len + j + 1 for p, cap in WORKLOAD for j in range(cap - 1))


def test_slots_were_refilled(plain: ContinuousResult) -> None:
    # 8 pages, 3 slots: the first fill takes 3 pages; every later page came in a refill
    assert plain.fills >= 2 and plain.slots == SLOTS
    decode_tokens = sum(cap - 1 for _, cap in WORKLOAD)
    # never fewer steps than the busiest slot needs, never more than a one-slot run would
    assert decode_tokens / SLOTS <= len(plain.step_ms) <= decode_tokens
    assert plain.slot_occupancy == pytest.approx(decode_tokens / (len(plain.step_ms) * SLOTS))
    # each page's TPOT is the mean of the steps its slot ran for it (found from its first step and token count)
    for toks, first, tpot in zip(plain.tokens, plain.first_step, plain.tpot_ms, strict=True):
        own = plain.step_ms[first : first + len(toks) - 1]
        assert (tpot == pytest.approx(sum(own) / len(own))) if own else tpot != tpot
    assert plain.idle_steps == 0  # without eos every step fed a live slot
    assert plain.finished_rows_attend is None  # ...and no row waited for a read of the done flags


def test_without_kept_logits_same_tokens(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], plain: ContinuousResult
) -> None:
    res = continuous(model, pages, keep_logits=False)
    assert res.tokens == plain.tokens and res.logits is None
    # without eos the host knows every end: only steps that fed a live slot run, refills exactly on time
    assert res.decode_path == "static"
    # decode steps per page (cap - 1): 8 3 12 5 0 4 10 2 through 3 slots in arrival order, by hand: slot 1's
    # page ends at step 3 (refill: 5 more, ends at 8); at 8 slot 0 and 1 end (refills: the 0-step page, ended
    # at once and replaced by the 10-step one -> 18, and the 4-step one -> 12); at 12 slot 1 and 2 end (refill:
    # 2 steps -> 14, one slot left empty); the last slot ends at step 18
    assert len(res.step_ms) == 18
    assert res.first_step == [0, 0, 0, 3, 8, 8, 8, 12]
    # the drain: at step 12 the source ran dry (one slot left empty), at 14 only the 10-step page is left:
    # one row of three, so the last 4 steps run on a one-row step
    assert res.step_rows == [3] * 14 + [1] * 4


def test_drain_narrowing_keeps_every_token(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], plain: ContinuousResult
) -> None:
    """12 slots for 8 pages: the drain narrows 12 -> 8 -> 4 -> 2 -> 1 rows (each width the power of two covering
    the sequences left, once they are at most half the rows), moving K/V and state each time; every page's
    tokens and logits stay those of the page alone, and the same as a run that never narrows."""
    gen = BatchedGenerator(model)
    res = gen.run_continuous(requests(pages), 12, eos_token_id=None, keep_logits=True)
    assert_matches_alone(model, pages, res, None, 0)
    # by hand: decode steps per page 8 3 12 5 0 4 10 2, all 8 pages in the first fill (the source is dry), page 4
    # ends at its prefill: 7 sequences on 12 rows.  Pages end after steps 2 (page 7: 6 left <= 12/2 -> 8 rows),
    # 3 (page 1: 5 left > 4), 4 (page 5: 4 left -> 4 rows), 5 (page 3: 3 left > 2), 8 (page 0: 2 left -> 2 rows),
    # 10 (page 6: 1 left -> 1 row) and 12 (page 2)
    assert len(res.step_ms) == 12
    assert res.step_rows == [12] * 2 + [8] * 2 + [4] * 4 + [2] * 2 + [1] * 2
    assert gen._slots is not None and sorted(gen._slots.narrower) == [1, 2, 4, 8]  # kept for the next run
    wide = gen.run_continuous(requests(pages), 12, eos_token_id=None, narrow_drain=False)
    assert wide.tokens == res.tokens == plain.tokens
    assert wide.step_rows == [12] * 12
    # the keys attended are the sequences' own, however wide the step: the empty slots attend over nothing
    assert res.key_steps == wide.key_steps == plain.key_steps == keys_by_hand(pages)
    again = gen.run_continuous(requests(pages), 12, eos_token_id=None)  # the kept narrower steps, reloaded
    assert again.tokens == plain.tokens and again.step_rows == res.step_rows


def test_eos_ends_slots_early(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    # 384: the 3rd greedy token of page 0 and the 9th of page 1 (see test_batched_static.EOS)
    res = continuous(model, pages, eos=384)
    assert_matches_alone(model, pages, res, 384, 0)
    assert any(res.stopped_by_eos)
    res_fast = continuous(model, pages, eos=384, keep_logits=False)  # eos checked every 16 steps
    assert res_fast.tokens == res.tokens and res_fast.stopped_by_eos == res.stopped_by_eos


def test_the_keys_counted_are_the_devices_with_eos_read_late(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With eos read every k steps, a row that ended keeps running, held at its last column, until the next read:
    the keys counted must be the ones the attention saw, read off the mask each step hands it (the columns it
    shows each occupied row; an empty slot sits at column 0 and is left out).  With ``skip_keys`` (the default) an
    ended row sees its last column only, without it its whole context; running rows see ``0 .. pos`` either way,
    so the tokens do not change."""
    seen: list[int] = []
    idle: list[int] = []  # per step, the occupied rows shown one key only
    logits = SlotDecodeStep._logits

    def spy(self: SlotDecodeStep, slot: torch.Tensor, key_len: int, mask: torch.Tensor, **kw: object) -> torch.Tensor:
        shown = (mask[:, 0, 0, :] == 0).sum(dim=1).tolist()
        occupied = [n for n, p in zip(shown, self.pos.tolist(), strict=True) if p > 0]
        seen.append(sum(occupied))
        idle.append(sum(1 for n in occupied if n == 1))
        return logits(self, slot, key_len, mask, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(SlotDecodeStep, "_logits", spy)
    for every in (1, 4, 8):
        totals = {}
        for skip in (True, False):
            seen.clear()
            idle.clear()
            gen = BatchedGenerator(model, check_every=every)
            res = gen.run_continuous(requests(pages), SLOTS, eos_token_id=384, skip_keys=skip)
            assert any(res.stopped_by_eos) and res.key_steps == sum(seen), (every, skip)
            assert res.finished_rows_attend is not skip
            assert (sum(idle) > 0) is (skip and every > 1), (every, skip)  # ended rows wait for a read of k > 1
            totals[skip] = (res.tokens, res.key_steps)
        assert totals[True][0] == totals[False][0]
        assert (totals[True][1] < totals[False][1]) is (every > 1)


def test_no_repeat_ngram_on_the_device(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    res = continuous(model, pages, ngram=3)
    assert_matches_alone(model, pages, res, None, 3)
    assert continuous(model, pages, ngram=3, keep_logits=False).tokens == res.tokens


def test_one_slot_and_more_slots_than_pages(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    one = continuous(model, pages, keep_logits=False, slots=1)
    many = continuous(model, pages, keep_logits=False, slots=12)
    ref = continuous(model, pages, keep_logits=False)
    assert one.tokens == ref.tokens == many.tokens
    assert one.slot_occupancy == pytest.approx(1.0)  # one slot is never idle
    assert many.fills == 1


def test_cache_grows_for_a_longer_page(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], monkeypatch: pytest.MonkeyPatch
) -> None:
    # first fill: short prompt and cap; then a page whose prompt + cap needs more than the first cache length
    long_cap = LEN_QUANTUM + 5
    widths: list[int] = []
    step = SlotDecodeStep.step

    def spy(self: SlotDecodeStep) -> None:
        widths.append(self.key_len)
        step(self)

    monkeypatch.setattr(SlotDecodeStep, "step", spy)
    reqs = [SlotRequest(pages[0], 2), SlotRequest(pages[2], long_cap)]
    res = BatchedGenerator(model).run_continuous(reqs, 1, eos_token_id=None)
    assert res.tokens[1] == generate_alone(model, pages[2], long_cap).tokens
    assert cache_len_for(pages[2].prompt_len + long_cap) == 2 * LEN_QUANTUM
    # attention width by hand: page 0 (29 + 1 step) reads 256 columns; page 2 (prompt 59, 260 steps) writes
    # columns 59..318: 256 while its steps stay below column 255 (196 steps), then 512 for the other 64
    assert widths == [256] * (1 + 196) + [512] * 64


def test_kept_step_reused_across_runs(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    gen = BatchedGenerator(model)
    first = gen.run_continuous(requests(pages), SLOTS, eos_token_id=None)
    kept = gen._slots
    second = gen.run_continuous(requests(pages), SLOTS, eos_token_id=None)
    assert gen._slots is kept and first.tokens == second.tokens


def test_slot_occupancy_by_hand() -> None:
    # 2 slots, 4 steps: sequences of 5 and 3 tokens produced 4 + 2 tokens in decode steps -> 6 / 8
    assert slot_occupancy([[1] * 5, [2] * 3], 4, 2) == pytest.approx(0.75)
    assert slot_occupancy([[1]], 0, 2) is None


def test_drain_by_hand() -> None:
    """2 slots, 5 steps of 1..5 ms: A (5 tokens) and B (3) start at step 0, C (4) takes B's slot at step 2, so
    the source ran dry at step 2.  Steps 2-4 drain (3 + 4 + 5 ms); tokens produced there: A's at steps 2 and 3,
    C's at 2, 3 and 4 = 5."""
    res = ContinuousResult(
        tokens=[[1] * 5, [2] * 3, [3] * 4],
        stopped_by_eos=[False] * 3,
        prompt_lens=[4, 4, 4],
        slots=2,
        vision_s=0.0,
        prefill_s=0.0,
        decode_s=0.015,
        step_ms=[1.0, 2.0, 3.0, 4.0, 5.0],
        fills=2,
        page_wait_s=0.0,
        wall_s=0.02,
        decode_path="static",
        first_step=[0, 0, 2],
    )
    assert res.drain == (3, 12.0, 5)
    no_steps = attrs.evolve(res, tokens=[[1]], stopped_by_eos=[False], prompt_lens=[4], step_ms=[], first_step=[0])
    assert no_steps.drain == (0, 0.0, 0)


def test_bad_arguments(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    gen = BatchedGenerator(model)
    with pytest.raises(ConfigError):
        gen.run_continuous(requests(pages), 0, eos_token_id=None)
    with pytest.raises(ConfigError):
        gen.run_continuous([SlotRequest(pages[0], 0)], 1, eos_token_id=None)
    with torch.inference_mode(), pytest.raises(ConfigError):
        gen.run_continuous(requests(pages), 2, eos_token_id=None, no_repeat_ngram_size=-1)
    with pytest.raises(ConfigError, match="vision_ahead must be >= 0"):
        gen.run_continuous(requests(pages), 2, eos_token_id=None, vision_ahead=-1)
    with pytest.raises(ConfigError, match=r"prefill_ahead runs the LM prefill .* but vision_ahead is 0"):
        gen.run_continuous(requests(pages), 2, eos_token_id=None, prefill_ahead=True)


@pytest.mark.parametrize("prefill", [False, True], ids=["vision", "vision+prefill"])
def test_a_bad_page_run_ahead_stops_the_run_and_the_next_run_is_whole(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], plain: ContinuousResult, prefill: bool
) -> None:
    """A cap of 0 on the page the run-ahead takes (the 4th, after the first fill's 3): the refill that takes it
    raises one ``ConfigError`` naming the cap, after its vision (and prefill) ran ahead; the same generator's next
    run gives every page the plain run's tokens.  (On CUDA the main stream then waits for the second stream's
    work: ``tests/gpu/test_continuous_gpu.py``.)"""
    gen = BatchedGenerator(model)
    bad = [SlotRequest(pages[i], cap) for i, cap in WORKLOAD[:SLOTS]] + [SlotRequest(pages[0], 0)]
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 1, got 0"):
        gen.run_continuous(bad, SLOTS, eos_token_id=None, vision_ahead=1, prefill_ahead=prefill)
    again = gen.run_continuous(requests(pages), SLOTS, eos_token_id=None, keep_logits=True)
    assert again.tokens == plain.tokens


@pytest.mark.parametrize("prefill", [False, True], ids=["vision", "vision+prefill"])
@pytest.mark.parametrize(("ahead", "pages_ahead"), [(1, 4), (2, 5)])
def test_work_run_ahead_keeps_every_page_as_alone(
    model: DeepseekOCRForCausalLM,
    pages: list[PreparedPage],
    monkeypatch: pytest.MonkeyPatch,
    ahead: int,
    pages_ahead: int,
    prefill: bool,
) -> None:
    """Pages whose vision (and with ``prefill_ahead`` their LM prefill, each alone into its own cache) ran ahead of
    their refill get their own features, in arrival order: tokens and logits stay those of each page alone, the
    schedule is the plain run's, and every page is encoded and prefilled exactly once.  By hand (the schedule of
    test_without_kept_logits_same_tokens: refills of pages 3 | 4, 5 | 6, the last after page 4 ended at its
    prefill, then 7): with 2 ahead all five refill pages ran ahead; with 1 ahead the refill of two pages at step 8
    takes page 4 from ahead and page 5 from the source (4 pages ahead), so an ahead page and a fresh one share a
    fill.  Prefill calls: the first fill's three pages together, then the refills' [1], [2], [1], [1] pages; with
    the prefill ahead every refill page alone (ahead, or the one fresh page of a fill)."""
    gen = BatchedGenerator(model)
    encoded: list[int] = []
    prefilled: list[list[int]] = []
    encode, prefill_fn = gen.encode_pages, gen._prefill

    def encode_spy(batch: list[PreparedPage]) -> list[torch.Tensor]:
        encoded.extend(id(p) for p in batch)
        return encode(batch)

    def prefill_spy(batch: list[PreparedPage], *args: object) -> torch.Tensor:
        prefilled.append([id(p) for p in batch])
        return prefill_fn(batch, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(gen, "encode_pages", encode_spy)
    monkeypatch.setattr(gen, "_prefill", prefill_spy)
    res = gen.run_continuous(
        requests(pages), SLOTS, eos_token_id=None, keep_logits=True, vision_ahead=ahead, prefill_ahead=prefill
    )
    assert_matches_alone(model, pages, res, None, 0)
    assert res.first_step == [0, 0, 0, 3, 8, 8, 8, 12] and res.fills == 5
    assert res.pages_ahead == pages_ahead and res.vision_ahead_s > 0
    assert res.pages_prefilled_ahead == (pages_ahead if prefill else 0) and (res.prefill_ahead_s > 0) == prefill
    every_page = sorted(id(pages[i]) for i, _ in WORKLOAD)  # every page once (two share a fixture)
    assert sorted(encoded) == every_page and sorted(i for call in prefilled for i in call) == every_page
    assert [len(call) for call in prefilled] == ([3, 1, 1, 1, 1, 1] if prefill else [3, 1, 2, 1, 1])


def test_vision_ahead_times_with_a_scripted_clock(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    """The vision run ahead is timed on its own (two marks a page: 1 ms each), and what it held the main stream up
    (two marks around each run-ahead, after each fill until the source is found dry) is vision time of the run: on
    CPU all of it, since nothing overlaps, so no rate gains from moving it.  By hand: run-aheads after the first
    fill and the refills at steps 3, 8 and 8 (the page that ended at its prefill) take 2, 1, 2 and 0 pages (the
    last finds the source dry: no marks, no more run-aheads), so their main-stream intervals are 1 + 2k ms:
    5 + 3 + 5 = 13 ms; with the fills' 5 ms, vision is 18 ms.  The source's pages arrive 100 ms late each on the
    same clock: that is page wait, taken before any mark, so no stage time holds it."""
    clock = ScriptedClock()

    def slow_source() -> Iterator[SlotRequest]:  # each page arrives 100 ms late: page wait, in no stage time
        for req in requests(pages):
            clock.now_ns += 100_000_000
            yield req

    gen = BatchedGenerator(model, clock=clock)
    res = gen.run_continuous(slow_source(), SLOTS, eos_token_id=None, vision_ahead=2)
    assert (res.pages_ahead, res.vision_ahead_s) == (5, pytest.approx(5e-3))
    assert res.fills == 5 and res.vision_s == pytest.approx(18e-3)
    assert res.step_ms == [1.0] * 18
    assert res.total_s == pytest.approx((18 + 5 + 18) * 1e-3)


def test_prefill_ahead_times_with_a_scripted_clock(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    """The LM prefill run ahead is timed on its own (two marks a page), and what it held the main stream up (a mark
    after the run-ahead's vision to one after its prefills) is prefill time of the run: on CPU all of it.  By hand
    (test_vision_ahead_times_with_a_scripted_clock's schedule): the run-aheads take 2, 1 and 2 pages; each of k
    pages is a mark before, two marks a page of vision, a mark between, two a page of prefill and a mark after, so
    the vision interval is 2k + 1 ms and so is the prefill one: 5 + 3 + 5 = 13 ms each.  Each of the four
    refills takes a page prefilled ahead (the five refill pages are the five run ahead) and waits for those
    prefills between a mark at its start and one after the waits (1 ms), before its vision: prefill time, not
    vision.  With the fills' 5 ms each, vision is 18 ms and prefill 18 + 4 = 22 ms; the vision and prefill run
    ahead 5 ms each (1 ms a page)."""
    gen = BatchedGenerator(model, clock=ScriptedClock())
    res = gen.run_continuous(requests(pages), SLOTS, eos_token_id=None, vision_ahead=2, prefill_ahead=True)
    assert (res.pages_ahead, res.vision_ahead_s) == (5, pytest.approx(5e-3))
    assert (res.pages_prefilled_ahead, res.prefill_ahead_s) == (5, pytest.approx(5e-3))
    assert res.fills == 5 and res.vision_s == pytest.approx(18e-3) and res.prefill_s == pytest.approx(22e-3)
    assert res.step_ms == [1.0] * 18
    assert res.total_s == pytest.approx((18 + 22 + 18) * 1e-3)


class ScriptedClock:
    """Every mark is 1 ms after the previous one: stage times then count marks, so they can be checked by hand."""

    def __init__(self) -> None:
        self.now_ns = 0

    def mark(self) -> object:
        self.now_ns += 1_000_000
        return self.now_ns

    def synchronize(self) -> None:
        return None

    def elapsed_ms(self, start: object, end: object) -> float:
        assert isinstance(start, int) and isinstance(end, int)
        return (end - start) / 1e6

    def intervals_ms(self, marks: list[object]) -> list[float]:
        return [self.elapsed_ms(a, b) for a, b in itertools.pairwise(marks)]


def test_stage_times_with_a_scripted_clock(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    # each fill marks before vision, after vision and after prefill + insert (1 ms each); each step one mark
    res = BatchedGenerator(model, clock=ScriptedClock()).run_continuous(requests(pages), SLOTS, eos_token_id=None)
    assert res.vision_s == pytest.approx(res.fills * 1e-3) and res.prefill_s == pytest.approx(res.fills * 1e-3)
    assert res.step_ms == [1.0] * 18  # the 18 steps of the hand-made schedule (test_without_kept_logits...)
    assert res.decode_s == pytest.approx(18e-3)
    assert res.total_s == pytest.approx((2 * res.fills + 18) * 1e-3)
    # fills by hand: the first fill, then refills at steps 3 (1 page), 8 (2 pages, then 1 more for the page that
    # ended at its prefill) and 12 (1 page; the other slot stays empty)
    assert res.fills == 5


def test_dropped_steps_are_freed_without_a_garbage_collection(model: DeepseekOCRForCausalLM) -> None:
    """No step is in a reference cycle (a narrower step links back to its full-width step weakly): a grown
    step's predecessor, and a full-width step with its narrower steps, go the moment their last reference does.
    On a GPU a step left to the collector was destroyed, graphs and all, in the middle of a later capture."""
    import gc
    import weakref

    gen = BatchedGenerator(model)
    was = gc.isenabled()
    gc.disable()
    try:
        root = SlotDecodeStep(
            gen.lm, gen.base, 4, LEN_QUANTUM, use_graph=False, matmul_attention=True, expert_impl=gen.expert_impl
        )
        small = root.narrowed([1])
        assert small.root is root and root.narrower == {1: small} and small.slots == 1
        grown = root.grown(2 * LEN_QUANTUM)
        assert grown.root is grown and grown.max_len == 2 * LEN_QUANTUM
        old, old_small = weakref.ref(root), weakref.ref(small)
        del root, small
        assert old() is None and old_small() is None  # freed by reference counting alone
        kept_small = grown.narrowed([0, 2])
        assert kept_small.root is grown
        del grown
        with pytest.raises(RuntimeError, match="outlived its full-width step"):
            _ = kept_small.root
    finally:
        if was:
            gc.enable()


def _prefill_spies(gen: BatchedGenerator, monkeypatch: pytest.MonkeyPatch) -> tuple[list[list[int]], list[int]]:
    """Record the batched prefill's pages per call and the per-page prefill's prompt length per call."""
    batched: list[list[int]] = []
    per_page: list[int] = []
    batched_fn, page_fn = gen._prefill, gen.prefill_page

    def batched_spy(batch: list[PreparedPage], *args: object) -> torch.Tensor:
        batched.append([p.prompt_len for p in batch])
        return batched_fn(batch, *args)  # type: ignore[arg-type]

    def page_spy(page: PreparedPage, *args: object) -> torch.Tensor:
        per_page.append(page.prompt_len)
        return page_fn(page, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(gen, "_prefill", batched_spy)
    monkeypatch.setattr(gen, "prefill_page", page_spy)
    return batched, per_page


@pytest.mark.parametrize(
    ("ahead", "prefill_ahead", "want_batched", "want_per_page"),
    [
        (0, False, [[29, 39, 59]], [29, 39, 59, 39, 29]),
        (2, False, [[29, 39, 59]], [29, 39, 59, 39, 29]),
        (1, True, [[29, 39, 59], [29], [39], [39], [29]], [59]),
    ],
    ids=["plain", "vision-ahead", "prefill-ahead"],
)
def test_refills_prefilled_page_by_page_keep_every_page_as_alone(
    model: DeepseekOCRForCausalLM,
    pages: list[PreparedPage],
    monkeypatch: pytest.MonkeyPatch,
    ahead: int,
    prefill_ahead: bool,
    want_batched: list[list[int]],
    want_per_page: list[int],
) -> None:
    """``prefill_per_page``: the first fill stays one batched forward over its three pages, and every refill page
    (pages 3..7 of WORKLOAD: fixture pages 0, 1, 2, 1, 0, prompt lengths 29, 39, 59, 39, 29) is prefilled alone, once,
    in arrival order, into a cache kept per length: three caches for five pages, each of one row and exactly its
    prompt's length.  With the vision run ahead the same; with the LM prefill run ahead too (1 page ahead), the
    pages run ahead (3, 4, 6, 7: 29, 39, 39, 29) keep their own one-page forward on the second stream, and only page 5
    (59), taken fresh into the refill at step 8 beside page 4 from ahead, goes page by page.  Tokens and every chosen
    token's logits stay those of each page alone, on the plain schedule."""
    gen = BatchedGenerator(model)
    batched, per_page = _prefill_spies(gen, monkeypatch)
    made: list[tuple[int, int]] = []
    new_cache = gen.base.new_cache

    def cache_spy(batch: int, max_len: int) -> object:
        made.append((batch, max_len))
        return new_cache(batch, max_len)

    monkeypatch.setattr(gen.base, "new_cache", cache_spy)
    res = gen.run_continuous(
        requests(pages),
        SLOTS,
        eos_token_id=None,
        keep_logits=True,
        vision_ahead=ahead,
        prefill_ahead=prefill_ahead,
        prefill_per_page=True,
    )
    assert_matches_alone(model, pages, res, None, 0)
    assert res.first_step == [0, 0, 0, 3, 8, 8, 8, 12] and res.fills == 5
    lens = [p.prompt_len for p in pages]
    assert lens == [29, 39, 59]
    assert batched == want_batched
    assert per_page == want_per_page and res.pages_prefilled_per_page == len(want_per_page)
    kept = [made.count((1, n)) for n in lens]  # one kept cache per length used (the steps and run-ahead make others)
    assert kept == [1, 1, 1] if not prefill_ahead else kept[2] == 1
    assert res.graph_capture_s == 0.0  # nothing is captured on the CPU


def test_per_page_prefill_captures_before_the_marks(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the per-page prefill replays a graph (scripted here on the CPU), each new prompt length is prepared by
    one prefill of zeros before the fill that first needs it: three lengths, three extra calls, their host time in
    ``graph_capture_s`` and none in the stages.  By the scripted clock (1 ms a mark, three marks a fill, one a step;
    each capture moves it 100 ms on) vision and prefill stay 1 ms per fill and the steps 1 ms each, as in the plain
    run: a capture inside a fill's or a step's marks would add 100 ms there.  With room for one length only, kept
    for good once taken (a dropped length would be captured again and again), page 3 (29, step 3) takes it; the
    refill of pages 4 and 5 (39, 59, step 8) and then of page 6 (39) go back to one batched forward each, and page 7
    (29, step 12) is a replay again."""
    monkeypatch.setattr(BatchedGenerator, "page_prefill_graphed", property(lambda self: True))
    prefills: list[tuple[int, float]] = []
    prefill = model.prefill
    clock = ScriptedClock()

    def prefill_spy(embeds: torch.Tensor, cache: object) -> torch.Tensor:
        total = float(embeds.abs().sum())
        prefills.append((embeds.shape[1], total))
        if total == 0.0:  # a capture: 100 ms on the scripted clock, which a stage would show if it held it
            clock.now_ns += 100_000_000
        return prefill(embeds, cache)  # type: ignore[arg-type]

    monkeypatch.setattr(model, "prefill", prefill_spy)
    gen = BatchedGenerator(model, clock=clock)
    res = gen.run_continuous(requests(pages), SLOTS, eos_token_id=None, keep_logits=True, prefill_per_page=True)
    zeros = [n for n, total in prefills if total == 0.0]
    assert zeros == [29, 39, 59] and len(prefills) == 3 + 5  # before the oracle below prefills too
    assert_matches_alone(model, pages, res, None, 0)
    assert res.graph_capture_s > 0
    assert res.vision_s == pytest.approx(5e-3) and res.prefill_s == pytest.approx(5e-3)
    assert res.step_ms == [1.0] * 18

    monkeypatch.setattr(BatchedGenerator, "page_prefill_graphs", property(lambda self: 1))
    gen = BatchedGenerator(model)
    batched, per_page = _prefill_spies(gen, monkeypatch)
    res = gen.run_continuous(requests(pages), SLOTS, eos_token_id=None, keep_logits=True, prefill_per_page=True)
    assert_matches_alone(model, pages, res, None, 0)
    assert batched == [[29, 39, 59], [39, 59], [39]] and per_page == [29, 29]


def test_per_page_refills_on_the_fast_model(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    """The fast model (its own copy of the tiny weights: the fast path re-points modules to fused storage) prefills
    each refill page through ``FastModel.prefill``, un-graphed on the CPU (no capture, nothing prepared): every page
    still gives the eager model's tokens alone, and every chosen token's logits within 1e-4."""
    from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model
    from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, apply_fast_path
    from tests.conftest import TINY

    own = build_model(DeepseekOCRConfig.from_json(TINY / "config.json"), "cpu", torch.float32, weights=TINY)
    cpu = FastConfig(cuda_graphs=False, sam_compile=False, clip_compile=False, vision_graphs=False)
    fast = apply_fast_path(own, cpu)
    gen = BatchedGenerator(fast)
    assert not gen.page_prefill_graphed
    res = gen.run_continuous(requests(pages), SLOTS, eos_token_id=None, keep_logits=True, prefill_per_page=True)
    assert res.pages_prefilled_per_page == 5 and res.graph_capture_s == 0.0
    assert_matches_alone(model, pages, res, None, 0)


def test_per_page_refills_with_eos_and_a_growing_cache(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage]
) -> None:
    """Refills prefilled page by page where eos ends slots (384: the 3rd greedy token of page 0, the 9th of page 1),
    and where a refill's page needs a longer cache than the first fill's (test_cache_grows_for_a_longer_page's
    requests): the kept per-length caches are the refill's own, so every page still gives its tokens alone."""
    res = BatchedGenerator(model).run_continuous(
        requests(pages), SLOTS, eos_token_id=384, keep_logits=True, prefill_per_page=True
    )
    assert_matches_alone(model, pages, res, 384, 0)
    assert any(res.stopped_by_eos) and res.pages_prefilled_per_page == len(WORKLOAD) - SLOTS
    long_cap = LEN_QUANTUM + 5
    reqs = [SlotRequest(pages[0], 2), SlotRequest(pages[2], long_cap)]
    grown = BatchedGenerator(model).run_continuous(reqs, 1, eos_token_id=None, prefill_per_page=True)
    assert grown.pages_prefilled_per_page == 1
    assert grown.tokens[1] == generate_alone(model, pages[2], long_cap).tokens
