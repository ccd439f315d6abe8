"""The batched CUDA-graph step with the Triton norms and grouped-GEMM experts (``decode_kernels="triton"``, more
than 8 rows) against the host loop, which runs the torch layers.

Tiny fixture model in bf16, 12 pages (the three tiny cases four times): the step's MoE runs
``kernels.moe_experts_grouped``.  Tokens must match the host loop's except after a near-tie (the rule of
``test_batched_gpu.assert_tokens_match``); the same step un-graphed gives identical tokens.
"""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model
from llm_perf_opt.models.deepseek_ocr.batched import BatchedGenerator
from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, FastModel, apply_fast_path
from llm_perf_opt.models.deepseek_ocr.preprocess import PreparedPage
from llm_perf_opt.profiling.timers import DeviceClock
from tests.conftest import TINY, requires_cuda, tiny_case_pages
from tests.gpu.test_batched_gpu import assert_tokens_match

pytestmark = [pytest.mark.gpu, requires_cuda]

STEPS = 24


def _tiny_fast_pages(batched_fused_router: bool | None = None) -> tuple[FastModel, list[PreparedPage], DeviceClock]:
    """The tiny fixture model's fast path in bf16 with the Triton decode step, its 12 pages (the three tiny cases
    four times: the step's MoE runs the grouped kernels) and a device clock; ``batched_fused_router``: the fast
    path's default unless a test asks for the other form."""
    cfg = DeepseekOCRConfig.from_json(TINY / "config.json")
    model = build_model(cfg, "cuda", torch.bfloat16, weights=TINY / "weights.safetensors")
    router = {} if batched_fused_router is None else {"batched_fused_router": batched_fused_router}
    switches = FastConfig(sam_compile=False, clip_compile=False, vision_graphs=False, **router)
    fast = apply_fast_path(model, switches)
    assert fast.decode_kernels == "triton", fast.decode_kernels_note
    return fast, tiny_case_pages(model.config) * 4, DeviceClock(model.device)


def test_grouped_expert_step_matches_host_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_perf_opt.models.deepseek_ocr import kernels

    calls: list[int] = []
    grouped = kernels.moe_experts_grouped

    def counted(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return grouped(x, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "moe_experts_grouped", counted)
    fast, pages, clock = _tiny_fast_pages()
    ref = BatchedGenerator(fast, clock=clock, static_decode=False).run(
        pages, STEPS, eos_token_id=None, keep_logits=True
    )
    graph_gen = BatchedGenerator(fast, clock=clock)
    res = graph_gen.run(pages, STEPS, eos_token_id=None)
    assert ref.decode_path == "host" and res.decode_path == "graph", graph_gen.capture_error
    assert calls and set(calls) == {len(pages)}  # the grouped kernels ran, at 12 rows (during warm-up / capture)
    assert_tokens_match(res, ref)
    plain = BatchedGenerator(fast, clock=clock, cuda_graphs=False).run(pages, STEPS, eos_token_id=None)
    assert plain.decode_path == "static" and plain.tokens == res.tokens


def test_the_steps_count_the_routed_experts_they_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """``routed_experts_read``: the graphed step's device count equals, per MoE layer, the mean number of distinct
    experts each grouped call's routing picked, counted by a spy (``torch.unique``) in the same steps run
    un-graphed (the same kernels on the same inputs: the same routing); the capture's warm-up steps are not
    counted (``grouped_steps`` is the run's decode steps)."""
    from llm_perf_opt.models.deepseek_ocr import kernels

    picked: list[int] = []
    grouped = kernels.moe_experts_grouped

    def spy(x: torch.Tensor, idx: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        picked.append(int(torch.unique(idx).numel()))
        return grouped(x, idx, *args, **kwargs)  # type: ignore[arg-type]

    fast, pages, clock = _tiny_fast_pages()
    res = BatchedGenerator(fast, clock=clock).run(pages, STEPS, eos_token_id=None)
    assert res.decode_path == "graph" and res.grouped_steps == STEPS - 1  # the capture's warm-ups not counted
    monkeypatch.setattr(kernels, "moe_experts_grouped", spy)
    plain = BatchedGenerator(fast, clock=clock, cuda_graphs=False).run(pages, STEPS, eos_token_id=None)
    assert plain.decode_path == "static" and plain.tokens == res.tokens
    layers = len(picked) // (STEPS - 1)
    assert layers == len(res.routed_experts_read or []) > 0 and len(picked) == layers * (STEPS - 1)
    expected = [sum(picked[i::layers]) / (STEPS - 1) for i in range(layers)]
    assert plain.routed_experts_read == expected and plain.grouped_steps == STEPS - 1
    assert res.routed_experts_read == expected


def test_skipping_pads_and_finished_rows_keys_keeps_the_graphed_tokens() -> None:
    """``skip_keys`` (the default) against off, both graphed, caps mixed so rows finish at different steps: the
    same tokens (the running rows' attention keeps its bits: the keys skipped were masked), and the host loop's
    except after a near-tie; the keys counted by hand from each row's own steps."""
    fast, pages, clock = _tiny_fast_pages()
    caps = [3, STEPS, 9] * 4
    ref = BatchedGenerator(fast, clock=clock, static_decode=False).run(pages, caps, eos_token_id=None, keep_logits=True)
    on = BatchedGenerator(fast, clock=clock).run(pages, caps, eos_token_id=None)
    off = BatchedGenerator(fast, clock=clock).run(pages, caps, eos_token_id=None, skip_keys=False)
    assert on.decode_path == off.decode_path == "graph"
    assert on.tokens == off.tokens
    assert_tokens_match(on, ref)
    steps = STEPS - 1
    assert on.key_steps == sum(
        n + s + 1 if s < cap - 1 else 1 for n, cap in zip(on.prompt_lens, caps, strict=True) for s in range(steps)
    )
    assert off.key_steps == sum(n + s + 1 for n in off.prompt_lens for s in range(steps))


def test_continuous_rows_ended_by_eos_keep_the_graphed_tokens_with_one_key() -> None:
    """Continuous batching, graphed, eos read every 8 steps: ``skip_keys`` (the default) against off give the same
    tokens (a row ended by eos waits for the read, seeing its last column only; running rows keep their bits) and
    the same as un-graphed (the tokens are this test's check; the keys counted are the host's arithmetic, which the
    CPU test pins against the masks the attention got)."""
    from llm_perf_opt.models.deepseek_ocr.continuous import SlotRequest

    fast, pages, clock = _tiny_fast_pages()
    reqs = [SlotRequest(p, cap) for p, cap in zip(pages, [STEPS, 9, 14] * 4, strict=True)]
    free = BatchedGenerator(fast, clock=clock).run_continuous(reqs, 8, eos_token_id=None)
    eos = free.tokens[0][2]
    runs = {}
    for skip in (True, False):
        gen = BatchedGenerator(fast, clock=clock, check_every=8)
        runs[skip] = gen.run_continuous(reqs, 8, eos_token_id=eos, skip_keys=skip)
    plain = BatchedGenerator(fast, clock=clock, check_every=8, cuda_graphs=False).run_continuous(
        reqs, 8, eos_token_id=eos
    )
    on, off = runs[True], runs[False]
    assert on.decode_path == off.decode_path == "graph" and plain.decode_path == "static"
    assert any(on.stopped_by_eos)
    assert on.tokens == off.tokens == plain.tokens
    assert on.finished_rows_attend is False and off.finished_rows_attend is True
    assert on.key_steps <= off.key_steps


@pytest.mark.parametrize("rows", [3, 12])  # the GEMV experts and the grouped ones
def test_batched_fused_router_keeps_the_host_loops_tokens(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``batched_fused_router``: the graphed step whose MoE layers route in the norm's kernel gives the host loop's
    tokens (except after a near-tie) and the un-graphed step's exactly; the kernel ran at the batch's rows."""
    from llm_perf_opt.models.deepseek_ocr import kernels

    calls: list[int] = []
    fused = kernels.add_rms_norm_route

    def spy(x: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, ...]:
        calls.append(x.shape[0])
        return fused(x, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "add_rms_norm_route", spy)
    fast, pages, clock = _tiny_fast_pages(batched_fused_router=True)
    pages = pages[:rows]
    ref = BatchedGenerator(fast, clock=clock, static_decode=False).run(
        pages, STEPS, eos_token_id=None, keep_logits=True
    )
    res = BatchedGenerator(fast, clock=clock).run(pages, STEPS, eos_token_id=None)
    assert res.decode_path == "graph" and rows in calls
    assert_tokens_match(res, ref)
    plain = BatchedGenerator(fast, clock=clock, cuda_graphs=False).run(pages, STEPS, eos_token_id=None)
    assert plain.decode_path == "static" and plain.tokens == res.tokens
