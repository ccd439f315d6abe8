"""The batched static decode step (``decode_path`` "static": the CUDA-graph step, un-graphed on CPU) vs the host loop.

Same tiny fixture pages as ``test_batched.py`` (prompt lengths 29, 39, 59).  The host loop
(``static_decode=False``) is the reference: the static step must give the same tokens token for token, with
eos hit by different rows at different steps (eos ids are picked from the host loop's own greedy tokens,
see ``EOS``), per-row caps, eos checked every ``check_every`` steps, and its cache and buffers reused
across runs of the same shape.
"""

from __future__ import annotations

import attrs
import pytest
import torch

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.models.deepseek_ocr import DeepseekOCRForCausalLM
from llm_perf_opt.models.deepseek_ocr.batched import BatchedGenerator, BatchResult
from llm_perf_opt.models.deepseek_ocr.context import ForwardContext
from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, FastModel
from llm_perf_opt.models.deepseek_ocr.preprocess import PreparedPage
from tests.conftest import tiny_case_pages, tiny_fast_model

STEPS = 24
# Greedy tokens of the three pages (host loop, no eos): 384 is row 0's 3rd and row 1's 9th token and never
# row 2's; 137 is the 3rd token of rows 1 and 2; 80 is the FIRST token (from the prefill) of rows 0 and 1;
# 500 is row 0's 2nd and row 1's 7th; 278 is row 2's 14th and row 1's 16th.  ``test_eos_ids_hit_where_expected``
# pins these positions, so a fixture change fails there first rather than weakening the other tests.
EOS = [384, 137, 80, 500, 278]
EXPECTED_FIRST_HIT = {384: [2, 8, None], 137: [None, 2, 2], 80: [0, 0, None], 500: [1, 6, None], 278: [None, 15, 13]}


@pytest.fixture(scope="module")
def model(tiny_reference_model: DeepseekOCRForCausalLM) -> DeepseekOCRForCausalLM:
    return tiny_reference_model


@pytest.fixture(scope="module")
def pages(model: DeepseekOCRForCausalLM) -> list[PreparedPage]:
    return tiny_case_pages(model.config)


@pytest.fixture(scope="module")
def host_tokens(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> list[list[int]]:
    return BatchedGenerator(model, static_decode=False).run(pages, STEPS, eos_token_id=None).tokens


@pytest.fixture(scope="module")
def fast_model() -> FastModel:
    """Its own copy of the tiny model: the fast path re-points the module weights to fused storage."""
    return tiny_fast_model(cuda_graphs=False, vision_graphs=False)  # type: ignore[no-any-return]


def host_run(model: object, pages: list[PreparedPage], caps: int | list[int], eos: int | None) -> BatchResult:
    return BatchedGenerator(model, static_decode=False).run(pages, caps, eos_token_id=eos)  # type: ignore[arg-type]


def assert_same(static: BatchResult, host: BatchResult) -> None:
    assert static.decode_path == "static" and host.decode_path == "host"
    assert static.tokens == host.tokens
    assert static.stopped_by_eos == host.stopped_by_eos
    assert static.prompt_lens == host.prompt_lens and static.padded_len == host.padded_len
    # every step that produced a token is timed; idle steps (after the last finish) only trail them
    assert len(static.step_ms) - static.idle_steps == len(host.step_ms) == max(len(t) for t in host.tokens) - 1
    assert static.graph_capture_s == 0.0  # CPU: never graphed
    # every row runs every step: while it runs (the host loop's tokens but its first: one step each) step s
    # attends over row b's prompt + its s + 1 tokens; once it has finished, over its newest key only
    steps = len(static.step_ms)
    live = [len(t) - 1 for t in host.tokens]
    rows = zip(static.prompt_lens, live, strict=True)
    want = sum(n + s + 1 if s < run else 1 for n, run in rows for s in range(steps))
    assert not static.finished_rows_attend and static.key_steps == want


def test_eos_ids_hit_where_expected(host_tokens: list[list[int]]) -> None:
    for eos, where in EXPECTED_FIRST_HIT.items():
        got = [row.index(eos) if eos in row else None for row in host_tokens]
        assert got == where, eos


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 0], [1], [0, 0, 2, 1]], ids=["all", "long-short", "one", "dup"])
def test_static_matches_host_loop_without_eos(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], order: list[int]
) -> None:
    batch = [pages[i] for i in order]
    static = BatchedGenerator(model).run(batch, STEPS, eos_token_id=None)
    host = host_run(model, batch, STEPS, None)
    assert_same(static, host)
    assert static.idle_steps == 0 and len(static.step_ms) == STEPS - 1
    assert not any(static.stopped_by_eos)


@pytest.mark.parametrize("check_every", [1, 3, 16])
@pytest.mark.parametrize("eos", EOS)
@pytest.mark.parametrize("caps", [STEPS, [5, STEPS, 10], [1, 12, 3]], ids=["same", "mixed", "tight"])
def test_static_matches_host_loop_with_eos_and_caps(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], eos: int, caps: int | list[int], check_every: int
) -> None:
    static = BatchedGenerator(model, check_every=check_every).run(pages, caps, eos_token_id=eos)
    host = host_run(model, pages, caps, eos)
    assert_same(static, host)
    assert 0 <= static.idle_steps < check_every


def test_idle_steps_after_everyone_finished(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    """eos 384 stops row 0 after 3 tokens and row 1 after 9; row 2's cap is 6: 8 useful steps of 23."""
    caps = [STEPS, STEPS, 6]
    by_check = {}
    for check_every in (16, 3, 100):
        res = BatchedGenerator(model, check_every=check_every).run(pages, caps, eos_token_id=384)
        assert [len(t) for t in res.tokens] == [3, 9, 6] and res.stopped_by_eos == [True, True, False]
        by_check[check_every] = (len(res.step_ms), res.idle_steps)
        assert res.decode_s == pytest.approx(sum(res.step_ms) / 1e3, rel=1e-6)
    # checks at 16 / at 3, 6, 9 / never (runs to the last slot, 23 steps)
    assert by_check == {16: (16, 8), 3: (9, 1), 100: (23, 15)}


def test_ignore_eos_runs_to_the_caps(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    static = BatchedGenerator(model).run(pages, [4, 9, 2], eos_token_id=384, ignore_eos=True)
    host = BatchedGenerator(model, static_decode=False).run(pages, [4, 9, 2], eos_token_id=384, ignore_eos=True)
    assert_same(static, host)
    assert [len(t) for t in static.tokens] == [4, 9, 2] and static.stopped_by_eos == [False] * 3


def test_reuse_across_runs(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    """The kept cache and buffers serve every later run they fit: stale K/V stays masked, the state is reloaded
    (other pads, other eos, fewer steps: its columns past the run's last stay masked), and only a longer run
    replaces them (with a graph, a shorter batch must not capture again: round 27)."""
    gen = BatchedGenerator(model)
    first = gen.run(pages, 12, eos_token_id=384)
    entry = gen._static
    assert entry is not None
    swapped = [pages[2], pages[0], pages[1]]  # same batch and padded length: other pads per row, same shape
    other = gen.run(swapped, 12, eos_token_id=None)
    assert gen._static is entry
    assert other.tokens == host_run(model, swapped, 12, None).tokens
    again = gen.run(pages, 12, eos_token_id=384)
    assert gen._static is entry
    assert again.tokens == first.tokens and again.stopped_by_eos == first.stopped_by_eos
    assert again.idle_steps == first.idle_steps

    short = gen.run(pages, 5, eos_token_id=None)  # fewer columns than the kept cache's 59 + 11: it fits
    assert gen._static is entry and short.tokens == host_run(model, pages, 5, None).tokens
    gen.run(pages, 20, eos_token_id=None)  # more: a new cache
    assert gen._static is not entry and gen._static is not None and gen._static.cache.max_len == 59 + 19
    assert gen.run(pages, 12, eos_token_id=384).tokens == first.tokens
    gen.release_decode_state()
    assert gen._static is None


def test_path_selection(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    gen = BatchedGenerator(model, cuda_graphs=True)  # graphs only on CUDA: CPU runs the static step
    assert gen.decode_path_for([0, 0, 0], keep_logits=False) == "static"
    assert gen.decode_path_for([0, 2, 0], keep_logits=False) == "host"  # sizes differ: the host rule per row
    assert gen.decode_path_for([3, 3, 3], keep_logits=False) == "static"  # one size: the rule on the device
    assert gen.decode_path_for([0, 0, 0], keep_logits=True) == "host"
    assert BatchedGenerator(model, static_decode=False).decode_path_for([0], keep_logits=False) == "host"

    ngram = gen.run(pages, 8, eos_token_id=None, no_repeat_ngram_size=[0, 2, 0])
    assert ngram.decode_path == "host" and ngram.idle_steps == 0 and ngram.graph_capture_s == 0.0
    ref = BatchedGenerator(model, static_decode=False).run(pages, 8, eos_token_id=None, no_repeat_ngram_size=[0, 2, 0])
    assert ngram.tokens == ref.tokens
    kept = gen.run(pages, 4, eos_token_id=None, keep_logits=True)
    assert kept.decode_path == "host" and kept.logits is not None
    plain = gen.run(pages, 4, eos_token_id=None)
    assert plain.decode_path == "static" and plain.logits is None and plain.graph_capture_s == 0.0
    assert plain.tokens == kept.tokens


def test_graph_safety(model: DeepseekOCRForCausalLM, fast_model: FastModel) -> None:
    """Eager experts read the routing on the host: never captured (the step runs un-graphed)."""
    assert not BatchedGenerator(model).graph_safe()  # the tiny model's MoE layers default to "eager"
    assert BatchedGenerator(model, expert_impl="grouped").graph_safe()
    assert BatchedGenerator(fast_model).graph_safe()
    eager_fast = FastModel(fast_model.base, FastConfig(grouped_moe=False, cuda_graphs=False))
    assert not BatchedGenerator(eager_fast).graph_safe()


def test_bad_check_every(model: DeepseekOCRForCausalLM) -> None:
    with pytest.raises(ConfigError, match="check_every"):
        BatchedGenerator(model, check_every=0)


def test_routing_stats_include_finished_rows(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    """Eager experts count on the host: the static step runs every row through the MoE at every step
    (3 steps × 3 rows), the host loop only live rows (3 + 2 + 1) — the documented difference."""
    top_k = model.config.language.num_experts_per_tok
    prompt = 29 + 39 + 59
    BatchedGenerator(model).run(pages, [2, 4, 3], eos_token_id=None)
    assert all(sum(c) == (prompt + 9) * top_k for c in model.tokens_per_expert().values())
    BatchedGenerator(model, static_decode=False).run(pages, [2, 4, 3], eos_token_id=None)
    assert all(sum(c) == (prompt + 6) * top_k for c in model.tokens_per_expert().values())


@pytest.mark.parametrize("attention", ["matmul", "sdpa"])
def test_fast_model_static_step(
    fast_model: FastModel, pages: list[PreparedPage], host_tokens: list[list[int]], attention: str
) -> None:
    """With a FastModel the static step runs its fused / grouped layers; same tokens as the host loop."""
    fast = FastModel(fast_model.base, attrs.evolve(fast_model.fast_config, decode_attention=attention))
    gen = BatchedGenerator(fast)
    res = gen.run(pages, STEPS, eos_token_id=None)
    assert res.decode_path == "static" and res.tokens == host_tokens
    caps = [5, STEPS, 10]
    assert_same(gen.run(pages, caps, eos_token_id=384), host_run(fast, pages, caps, 384))


@pytest.mark.parametrize("ngram", [1, 2, 3, 20])
@pytest.mark.parametrize(("caps", "eos"), [(STEPS, None), ([5, STEPS, 10], 384), ([1, 12, 3], 137)])
def test_device_ngram_rule_matches_host_loop(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], ngram: int, caps: int | list[int], eos: int | None
) -> None:
    """The no-repeat-ngram rule on the device (static step, left-padded history) gives the host loop's tokens
    (host rule: ``banned_ngram_tokens`` per sequence), with prompt lengths 29 / 39 / 59, eos and caps."""
    static = BatchedGenerator(model).run(pages, caps, eos_token_id=eos, no_repeat_ngram_size=ngram)
    host = BatchedGenerator(model, static_decode=False).run(pages, caps, eos_token_id=eos, no_repeat_ngram_size=ngram)
    assert_same(static, host)


def test_device_ngram_rule_binds(model: DeepseekOCRForCausalLM, pages: list[PreparedPage]) -> None:
    """The comparison above is not vacuous: the rule changes the tokens of every row, and each row's tokens obey
    it (no bigram repeats in prompt + output for n=2, checked by brute force)."""
    ruled = BatchedGenerator(model).run(pages, STEPS, eos_token_id=None, no_repeat_ngram_size=2)
    free = BatchedGenerator(model).run(pages, STEPS, eos_token_id=None)
    assert ruled.decode_path == "static"
    for b, page in enumerate(pages):
        assert ruled.tokens[b] != free.tokens[b]
        seq = page.input_ids.reshape(-1).tolist() + ruled.tokens[b]
        prompt_len = page.input_ids.numel()
        for i in range(prompt_len - 1, len(seq) - 1):  # each generated token's bigram was new when it was chosen
            assert (seq[i], seq[i + 1]) not in {(seq[j], seq[j + 1]) for j in range(i)}


def test_uint8_pages_normalised_on_the_device_give_the_same_features_and_tokens(
    model: DeepseekOCRForCausalLM,
) -> None:
    """Pages prepared as uint8 (normalised after the upload) vs the host-normalised pages: identical vision features
    (the normalisation is bit-exact) and so identical tokens, with a mixed batch (tiles and none)."""
    from llm_perf_opt.data.datasets import synthetic_page
    from llm_perf_opt.models.deepseek_ocr.preprocess import PreprocessConfig, preprocess_page

    cfg = PreprocessConfig.for_mode("gundam")
    images = [synthetic_page(s, seed=i) for i, s in enumerate([(300, 200), (900, 640), (640, 1400)])]
    host = [preprocess_page(im, cfg, model.config, [1, 2, 3]) for im in images]
    raw = [preprocess_page(im, cfg, model.config, [1, 2, 3], uint8=True) for im in images]
    assert any(p.n_crops for p in host) and not all(p.n_crops for p in host)
    gen = BatchedGenerator(model)
    for a, b in zip(gen.encode_pages(raw), gen.encode_pages(host), strict=True):
        assert torch.equal(a, b)
    assert gen.run(raw, 6, eos_token_id=None).tokens == gen.run(host, 6, eos_token_id=None).tokens


def test_capture_warm_up_steps_stay_inside_a_one_step_cache(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage]
) -> None:
    """A run with caps of 2 has one decode step, so its cache ends at column L (the padded prompt length, 59).
    A CUDA capture first runs the step twice (``graphs.capture_graph``'s warm-up): the second of those used to
    read rotary row L + 1 and write K/V at column L + 1, past the end (a device-side assert on an H100).  Here the
    same two steps run un-graphed: positions stop at the last column, and the next run still gives the host
    loop's tokens."""
    gen = BatchedGenerator(model)
    res = gen.run(pages, 2, eos_token_id=None)
    assert res.decode_path == "static" and res.tokens == host_run(model, pages, 2, None).tokens
    static = gen._static
    assert static is not None and static.cache.max_len == 60  # columns 0..59: the prompt's 0..58, one step's 59
    with torch.inference_mode(), model._sdpa_policy():  # the run's buffers are inference tensors
        static.load(static.out[:, :1].clone(), res.prompt_lens, [2, 2, 2], None)
        static._body()
        static._body()  # unclamped: rotary row 60 of a 60-row table
    assert static.slot.flatten().tolist() == [59]
    assert static.pos.tolist() == [29 + 2, 39 + 2, 59]  # each row's prompt length + 2, the last one held at 59
    assert gen.run(pages, 2, eos_token_id=None).tokens == res.tokens


def test_a_new_shape_is_made_before_the_marks(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new (batch, length) step's cache and buffers are made before the batch's marks, as continuous batching's
    are: one-time setup, not prefill.  Scripted clock, 1 ms a mark (three before decode: start, vision, prefill);
    making a step moves it 100 ms on.  Batches A (longest prompt 39), A, B (59: a new step), A (fits B's): the
    prefill reads 1 ms each time (it read 101 ms for every new step, round 27)."""
    from llm_perf_opt.models.deepseek_ocr.batched_decode import StaticBatchStep
    from tests.unit.models.deepseek_ocr.test_continuous import ScriptedClock

    clock = ScriptedClock()
    init = StaticBatchStep.__init__

    def slow_init(self: StaticBatchStep, *args: object, **kw: object) -> None:
        init(self, *args, **kw)  # type: ignore[arg-type]
        clock.now_ns += 100_000_000

    monkeypatch.setattr(StaticBatchStep, "__init__", slow_init)
    gen = BatchedGenerator(model, clock=clock)  # type: ignore[arg-type]
    a, b = [pages[0], pages[1]], [pages[0], pages[2]]
    runs = [gen.run(batch, 4, eos_token_id=None) for batch in (a, a, b, a)]
    assert [r.prefill_s * 1e3 for r in runs] == pytest.approx([1.0] * 4)
    assert [r.vision_s * 1e3 for r in runs] == pytest.approx([1.0] * 4)


@pytest.mark.parametrize("skip", [True, False])
def test_finished_rows_see_only_their_newest_key(
    model: DeepseekOCRForCausalLM, pages: list[PreparedPage], skip: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``skip_keys``: at step s row b sees columns from its pad count (59 - its prompt length) while it runs and
    from the step's own column (59 + s) once it has finished; the mask agrees (a spy on the step's decoder
    forward).  Caps 2, 5, 3 without eos: rows run 1, 4 and 2 steps.  Off: every row from its pads, to the end,
    and the keys counted so.  The running rows' tokens are the host loop's either way."""
    seen: list[tuple[list[int] | None, list[list[bool]]]] = []
    gen = BatchedGenerator(model)
    real = gen.lm.lm_forward

    def spy(hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if ctx.slot is not None:  # a decode step (the prefill has none)
            first = None if ctx.key_first is None else ctx.key_first.tolist()
            assert ctx.mask is not None
            seen.append((first, (ctx.mask[:, 0, 0] == 0).tolist()))
        return real(hidden, ctx)

    monkeypatch.setattr(gen.lm, "lm_forward", spy)
    caps = [2, 5, 3]
    res = gen.run(pages, caps, eos_token_id=None, skip_keys=skip)
    assert res.tokens == host_run(model, pages, caps, None).tokens
    pads, length = [30, 20, 0], 59  # prompt lengths 29, 39, 59
    assert len(seen) == 4 == len(res.step_ms)
    for s, (first, visible) in enumerate(seen):
        want = [length + s if skip and s >= cap - 1 else pad for pad, cap in zip(pads, caps, strict=True)]
        assert first == (want if skip else None)
        assert visible == [[want[b] <= j <= length + s for j in range(len(visible[b]))] for b in range(3)]
    live = [cap - 1 if skip else 4 for cap in caps]
    per_row = [sum(n + s + 1 if s < run else 1 for s in range(4)) for n, run in zip([29, 39, 59], live, strict=True)]
    assert res.finished_rows_attend is not skip and res.key_steps == sum(per_row)
