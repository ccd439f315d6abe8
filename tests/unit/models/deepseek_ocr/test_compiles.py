"""JIT compiles outside graph captures count as one-time setups (``compiles.WATCH``, ``FastModel.setup_count``).

Oracles by construction: a ``torch.compile``'d function (Dynamo, ``dynamic=False``) compiles on its first call
and once more per new input shape, never on a repeat; Triton calls its post-compile hook once per variant it
compiles.  A run whose timed marks hold such a compile reports it in ``timed_setups``; one made outside the marks
(a new decode step's warm-up) or inside a graph capture does not count."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from llm_perf_opt.models.deepseek_ocr import continuous
from llm_perf_opt.models.deepseek_ocr.batched import BatchedGenerator
from llm_perf_opt.models.deepseek_ocr.compiles import WATCH, CompileWatch
from llm_perf_opt.models.deepseek_ocr.continuous import SlotRequest
from llm_perf_opt.models.deepseek_ocr.preprocess import PreparedPage
from tests.conftest import tiny_case_pages, tiny_fast_model


def _compiled() -> Any:
    """A fresh compiled function with its own Dynamo cache (Dynamo keeps it on the code object, so each gets a code
    object of its own): compiles once per input shape."""
    fn = eval("lambda t: t * 1.0")  # a new code object per call
    return torch.compile(fn, backend="eager", dynamic=False)


def test_dynamo_compiles_are_counted_once_per_shape_and_not_inside_a_capture() -> None:
    WATCH.install()
    f = _compiled()
    before, in_captures = WATCH.count, WATCH.in_captures
    f(torch.ones(3))
    assert WATCH.count - before == 1  # the first call compiles
    f(torch.ones(3))
    assert WATCH.count - before == 1  # the repeat replays the compiled frame
    f(torch.ones(4))
    assert WATCH.count - before == 2  # a new shape compiles again
    with WATCH.capturing():
        f(torch.ones(5))
    assert WATCH.count - before == 2 and WATCH.in_captures - in_captures == 1


def test_a_failed_capture_hands_its_compiles_back() -> None:
    """A capture that raises is no capture (its caller runs un-graphed, inside the timed run): what its warm-up
    compiled counts as a compile outside captures."""
    WATCH.install()
    f = _compiled()
    before, in_captures = WATCH.count, WATCH.in_captures
    with pytest.raises(RuntimeError, match="stand-in"), WATCH.capturing():
        f(torch.ones(3))
        raise RuntimeError("stand-in for a capture that failed")
    assert (WATCH.count - before, WATCH.in_captures - in_captures) == (1, 0)
    with WATCH.capturing():
        f(torch.ones(4))
    assert (WATCH.count - before, WATCH.in_captures - in_captures) == (1, 1)


def test_the_hooks_are_put_back_after_a_dynamo_reset() -> None:
    """``torch._dynamo.reset()`` clears Dynamo's callbacks: the next ``setup_count`` read puts the watch's back, so
    a compile after it counts again."""
    fast = tiny_fast_model()
    torch._dynamo.reset()
    f = _compiled()
    before = fast.setup_count  # reinstalls
    f(torch.ones(3))
    assert fast.setup_count - before == 1


def test_the_triton_hook_counts_and_chains_to_the_one_installed_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's hook is called with keyword arguments, once per variant compiled; the hook found installed keeps
    being called with them, and its result is passed back."""
    knobs = pytest.importorskip("triton.knobs")
    if not hasattr(knobs.runtime, "jit_post_compile_hook"):
        pytest.skip("this Triton has no jit_post_compile_hook")
    seen: list[dict[str, Any]] = []

    def earlier(**kwargs: Any) -> str:
        seen.append(kwargs)
        return "earlier's"

    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", earlier)
    watch = CompileWatch().install()
    assert "triton" not in watch.unwatched
    hook = knobs.runtime.jit_post_compile_hook
    assert hook is not earlier
    assert hook(key="k", repr="variant") == "earlier's"
    assert (watch.triton, watch.dynamo, seen) == (1, 0, [{"key": "k", "repr": "variant"}])
    with watch.capturing():
        hook(key="k2", repr="variant 2")
    assert (watch.triton, watch.in_captures, len(seen)) == (1, 1, 2)


@pytest.fixture(scope="module")
def pages() -> list[PreparedPage]:
    return tiny_case_pages(tiny_fast_model().base.config)  # prompt lengths 29, 39, 59; crop grids differ


def _compiling_vision(gen: BatchedGenerator) -> None:
    """``gen``'s vision passes each page's features through a compiled function: a compile inside the timed vision
    the first time a features shape comes."""
    f = _compiled()
    real = gen.encode_pages

    def encode(batch: Any) -> list[Tensor]:
        return [f(x) for x in real(batch)]

    gen.encode_pages = encode  # type: ignore[method-assign]


def test_a_compile_inside_a_runs_marks_is_a_timed_setup(pages: list[PreparedPage]) -> None:
    fast = tiny_fast_model()
    gen = BatchedGenerator(fast)
    gen.run([pages[0]], 2, eos_token_id=None)  # every capture-free setup of the plain run made
    _compiling_vision(gen)
    assert gen.run([pages[0]], 2, eos_token_id=None).timed_setups == 1
    assert gen.run([pages[0]], 2, eos_token_id=None).timed_setups == 0


def test_a_compile_in_a_new_steps_warm_up_is_outside_the_continuous_runs_marks(
    pages: list[PreparedPage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Continuous batching builds its decode step inside the run, before the first fill's marks: a compile there
    (the kernel variants a new step warms up) is not the run's timed setup; one in a fill's vision is."""
    fast = tiny_fast_model()
    reqs = [SlotRequest(pages[i % 3], cap) for i, cap in enumerate([3, 2, 4])]
    BatchedGenerator(fast).run_continuous(reqs, 2, eos_token_id=None)  # the plain run's setups made
    f = _compiled()
    step_for = continuous._step_for

    def compiling_step_for(*args: Any, **kwargs: Any) -> Any:
        f(torch.ones(len(args) + 1))  # a new shape each time the run builds a step (stands in for its warm-up)
        return step_for(*args, **kwargs)

    monkeypatch.setattr(continuous, "_step_for", compiling_step_for)
    before = WATCH.count
    run = BatchedGenerator(fast).run_continuous(reqs, 2, eos_token_id=None)
    assert WATCH.count - before == 1 and run.timed_setups == 0
    gen = BatchedGenerator(fast)
    _compiling_vision(gen)
    monkeypatch.setattr(continuous, "_step_for", step_for)
    run = gen.run_continuous(reqs, 2, eos_token_id=None)
    assert run.timed_setups == len({tuple(x.shape) for r in reqs for x in gen.encode_pages([r.prepared])}) > 0


def test_sams_rel_pos_attention_compiles_once_for_repeated_calls() -> None:
    """Round 32's finding through the watch: the augmented rel-pos attention looked its key one-hot table up in a
    module cache inside the compiled block, so the second call failed Dynamo's guard on that cache (the first call
    had filled it) and compiled again.  Two calls at one shape, each on a fresh table size: one compile."""
    from llm_perf_opt.models.deepseek_ocr import sam

    hw = (5, 7)  # a grid no other test uses: the cache holds no table for it when this starts
    assert (*hw, torch.device("cpu"), torch.float32) not in sam._ONE_HOT
    fn = torch.compile(eval("lambda *a: sam.rel_pos_attention(*a)", {"sam": sam}), backend="eager", dynamic=False)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 35, 8, generator=g) for _ in range(3))
    rel_h, rel_w = torch.randn(9, 8, generator=g), torch.randn(13, 8, generator=g)
    WATCH.install()
    before = WATCH.count
    first = fn(q, k, v, rel_h, rel_w, hw)
    second = fn(q, k, v, rel_h, rel_w, hw)
    assert WATCH.count - before == 1
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(first, sam.rel_pos_attention(q, k, v, rel_h, rel_w, hw), rtol=1e-5, atol=1e-6)


def test_the_moe_ones_table_compiles_once_for_repeated_calls() -> None:
    """The same guard recompile in the grouped MoE's routing counts (``fast_layers._ones_like_ids``, reached by
    ``decode_compile``): two calls at a size the cache does not hold yet, one compile."""
    from llm_perf_opt.models.deepseek_ocr import fast_layers

    ids = torch.arange(37)  # a size no other test routes
    assert (37, ids.device) not in fast_layers._ONES
    fn = torch.compile(eval("lambda t: fl._ones_like_ids(t) * 2", {"fl": fast_layers}), backend="eager", dynamic=False)
    WATCH.install()
    before = WATCH.count
    assert fn(ids).tolist() == [2] * 37
    assert fn(ids).tolist() == [2] * 37
    assert WATCH.count - before == 1
