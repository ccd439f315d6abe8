"""The fast path's Triton decode step (``FastConfig(decode_kernels="triton")``) against its torch step.

Runs the real kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernels
module is first imported); skipped where Triton is not installed or the kernels were already imported
compiled-mode in this process.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest
import torch

_PREVIOUS = os.environ.get("TRITON_INTERPRET")
os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton and the kernels module are first imported
try:
    pytest.importorskip("triton")
    from llm_perf_opt.models.deepseek_ocr import kernels
    from llm_perf_opt.models.deepseek_ocr import prompt_attention as PA
    from llm_perf_opt.models.deepseek_ocr import prompt_moe as PM
finally:  # leave the environment as found: CLI subprocesses of other tests inherit it
    if _PREVIOUS is None:
        del os.environ["TRITON_INTERPRET"]

from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model  # noqa: E402
from llm_perf_opt.models.deepseek_ocr import triton_layers as TL  # noqa: E402
from llm_perf_opt.models.deepseek_ocr.batched import BatchedGenerator  # noqa: E402
from llm_perf_opt.models.deepseek_ocr.fast import TRITON_MAX_ROWS, FastConfig, apply_fast_path  # noqa: E402
from llm_perf_opt.models.deepseek_ocr.generation import NoRepeatNGram  # noqa: E402
from llm_perf_opt.models.deepseek_ocr.model import DeepseekOCRForCausalLM  # noqa: E402
from tests.conftest import TINY, CpuGraph, rel_err, tiny_case_pages  # noqa: E402

# Switches of the tests below that run pages or decode steps on the CPU: no graphs or compiles, SAM's global and
# windowed blocks on the augmented attention and CLIP's on SDPA (the interpreter would otherwise run the Triton SAM
# and CLIP kernels on every page; test_sam_kernels, test_clip_attention and test_fast_vision cover them): what these
# tests hold is the decode step.
NO_GRAPHS_PLAIN_VISION: dict[str, object] = dict(
    cuda_graphs=False,
    sam_compile=False,
    clip_compile=False,
    vision_graphs=False,
    sam_attention="augmented",
    sam_window_attention="augmented",
    clip_attention="sdpa",
)

pytestmark = pytest.mark.skipif(
    not kernels.INTERPRETED, reason="the kernels were imported compiled-mode before TRITON_INTERPRET was set"
)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The interpreter's switch is read again at launch: set it only while these tests run.  The global RNG is
    seeded per test: a prompt drawn from it otherwise follows whatever ran before, and one draw in a few put a
    comparison near its bound (round 30: a flaky logit bound)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    yield


def _model(seed: int) -> DeepseekOCRForCausalLM:
    model = build_model(DeepseekOCRConfig.from_json(TINY / "config.json"), "cpu", torch.float32, "dummy", seed=seed)
    for p in model.model.layers.parameters():  # far from the dummy init's ~0 so routing and logits differ
        p.data.mul_(10.0)
    return model


def _decode(
    fast: object, embeds: torch.Tensor, feed: list[torch.Tensor] | None, steps: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prefill, then ``steps`` decode steps fed the argmax (or ``feed``'s [B, 1] tokens); picks and logits."""
    cache = fast.new_cache(batch=embeds.shape[0], max_len=embeds.shape[1] + steps + 1)  # type: ignore[attr-defined]
    logits = fast.prefill(embeds, cache)  # type: ignore[attr-defined]
    picks, rows = [], []
    for i in range(steps):
        tok = logits.argmax(dim=-1, keepdim=True) if feed is None else feed[i]
        picks.append(tok)
        logits = fast.decode_step(tok, cache).clone()  # type: ignore[attr-defined]
        rows.append(logits)
    return picks, rows


def _off_and_on(
    model: DeepseekOCRForCausalLM, switch: str, steps: int, **others: bool
) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Teacher-forced Triton decodes of a 2-row, 7-position prompt with ``FastConfig(<switch>=False)``, then
    ``True`` fed the first run's picks (``others``: further switches for both): [(picks, logits)] for off and on."""
    embeds = torch.randn(2, 7, model.config.language.hidden_size)
    runs: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    for on in (False, True):
        cfg = FastConfig(cuda_graphs=False, decode_kernels="triton", **{switch: on, **others})  # type: ignore[arg-type]
        fast = apply_fast_path(model, cfg)
        runs.append(_decode(fast, embeds, None if not runs else runs[0][0], steps))
    return runs


def _rows_of_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """``kernels.<name>`` wrapped to record the rows of its first argument at every call (the list it fills)."""
    rows: list[int] = []
    real = getattr(kernels, name)

    def counted(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        rows.append(x.shape[0])
        out: torch.Tensor = real(x, *args, **kwargs)
        return out

    monkeypatch.setattr(kernels, name, counted)
    return rows


@pytest.mark.parametrize(
    ("batch", "fused"), [(1, False), (2, False), (12, False), (12, True)]
)  # 12 rows: torch attention, Triton norms + grouped-GEMM experts (routed in the norm with batched_fused_router)
def test_triton_decode_step_matches_torch_step(batch: int, fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The single-page Triton step against the torch step, teacher-forced; from 9 rows on it runs the row layers,
    whose norms route the rows with ``batched_fused_router`` (``fused``) without counting, so the MoE block counts
    the picks itself: the routing counts stay every pick's."""
    grouped_rows = _rows_of_calls(monkeypatch, "moe_experts_grouped")
    norm_routed = _rows_of_calls(monkeypatch, "add_rms_norm_route")
    masked = _count_masked_attention(monkeypatch)
    model = _model(seed=3)
    # a seeded prompt: unseeded, the draw followed the process's RNG use before it, and one draw in a few put a
    # logit 1.6e-4 (2.7e-4 of the largest) off, past the old 1e-4 absolute bound (round 30)
    gen = torch.Generator().manual_seed(batch)
    embeds = torch.randn(batch, 9, model.config.language.hidden_size, generator=gen)
    ref = apply_fast_path(model, FastConfig(cuda_graphs=False, decode_kernels="torch"))
    tri = apply_fast_path(model, FastConfig(cuda_graphs=False, decode_kernels="triton", batched_fused_router=fused))
    assert tri.decode_kernels == "triton" and tri.decode_kernels_note is None
    ref_tokens, ref_rows = _decode(ref, embeds, None, 5)
    _, rows = _decode(tri, embeds, ref_tokens, 5)  # teacher-forced: one near-tie cannot derail the rest
    for want, got in zip(ref_rows, rows, strict=True):
        # float32 sums in another order through 12 layers of weights scaled x10: within 1e-3 of the largest logit
        # (4 prompts x 5 steps at 12 rows measured 1.6e-6 .. 9.8e-5 of it); a wrong kernel is off by O(1)
        assert rel_err(got, want) <= 1e-3, rel_err(got, want)
    assert all(torch.equal(got.argmax(-1), want.argmax(-1)) for got, want in zip(rows, ref_rows, strict=True))
    # routing counts: prefill (batch x 9 tokens) + 5 steps, top-k picks each, in every MoE layer
    k = model.config.language.num_experts_per_tok
    assert all(sum(c) == batch * (9 + 5) * k for c in tri.tokens_per_expert().values())
    if fused:  # ...per expert as the torch step counted them (the same ids: no float32 near-tie here)
        assert tri.tokens_per_expert() == ref.tokens_per_expert()
    n_moe = len(tri.tokens_per_expert())
    # the norm routes the decode steps' rows at 1-2 rows (fused_router) and, with the switch, at 12 (the row layers)
    assert [n for n in norm_routed if n == batch] == ([batch] * 5 * n_moe if batch <= 8 or fused else [])
    assert grouped_rows == ([batch] * 5 * n_moe if batch >= kernels.GROUPED_MIN_ROWS else [])
    # more than 8 rows: the torch step's slot context runs the row attention (one shared position, mask [1, n])
    n_layers = model.config.language.num_hidden_layers
    assert masked == ([batch] * 5 * n_layers if batch > TRITON_MAX_ROWS else [])


def _count_masked_attention(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows of every ``kernels.decode_attention`` call made with a key mask (the row attention's)."""
    calls: list[int] = []
    attention = kernels.decode_attention

    def counted(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if kwargs.get("key_mask") is not None:
            calls.append(q.shape[0])
        return attention(q, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "decode_attention", counted)
    return calls


@pytest.mark.parametrize(
    ("copies", "router"), [(1, "kernel"), (4, "kernel"), (4, "cublas"), (1, "fused"), (4, "fused")]
)  # 3 rows (GEMV experts) and 12 rows (grouped-GEMM experts, routed by TL.BATCHED_ROUTER's form or the norm)
def test_triton_batched_step_matches_torch_host_loop(copies: int, router: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched static step with the Triton row layers (each row at its own position over the left-padded
    cache: prompt lengths 29, 39, 59) gives the host loop's tokens with the torch layers (float32); from 9 rows on
    its MoE rows are routed by the one-launch router (``BATCHED_ROUTER="kernel"``) or cuBLAS's logits + top-k, and
    with ``batched_fused_router`` ("fused") by the post-attention norm's kernel at every row count, which then
    routes every MoE layer's rows of every step (spied: one call per layer and step, the batch's rows) and adds
    nothing to the routing counts (the batched steps record none)."""
    masked = _count_masked_attention(monkeypatch)
    monkeypatch.setattr(TL, "BATCHED_ROUTER", "kernel" if router == "fused" else router)
    one_launch: list[int] = []
    fused: list[int] = []
    real_rows, real_fused = kernels.moe_route_rows, kernels.add_rms_norm_route

    def rows_spy(x: torch.Tensor, *args: object, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
        one_launch.append(x.shape[0])
        return real_rows(x, *args, **kw)  # type: ignore[arg-type]

    def fused_spy(x: torch.Tensor, *args: object, **kw: object) -> tuple[torch.Tensor, ...]:
        counts = args[6] if len(args) > 6 else kw.get("counts")  # (residual, weight, eps, gate, top_k, flags, counts)
        fused.append(x.shape[0] if counts is None else -x.shape[0])  # counted calls as negative rows
        return real_fused(x, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "moe_route_rows", rows_spy)
    monkeypatch.setattr(kernels, "add_rms_norm_route", fused_spy)
    model = build_model(
        DeepseekOCRConfig.from_json(TINY / "config.json"), "cpu", torch.float32, TINY / "weights.safetensors"
    )
    pages = tiny_case_pages(model.config) * copies
    common = NO_GRAPHS_PLAIN_VISION
    ref_fast = apply_fast_path(model, FastConfig(decode_kernels="torch", **common))  # type: ignore[arg-type]
    ref = BatchedGenerator(ref_fast, static_decode=False).run(pages, 8, eos_token_id=None)
    switch = {"batched_fused_router": router == "fused"}
    tri_fast = apply_fast_path(model, FastConfig(decode_kernels="triton", **switch, **common))  # type: ignore[arg-type]
    assert tri_fast.decode_kernels == "triton"
    fused.clear()
    res = BatchedGenerator(tri_fast).run(pages, 8, eos_token_id=None)
    assert ref.decode_path == "host" and res.decode_path == "static"
    assert res.tokens == ref.tokens
    n_layers = model.config.language.num_hidden_layers
    assert masked and set(masked) == {len(pages)} and len(masked) % n_layers == 0
    steps = len(masked) // n_layers
    n_moe = sum(1 for layer in model.model.layers if layer.mlp.__class__.__name__ != "MLP")
    decode_rows = [n for n in one_launch if n == len(pages)]  # (the prompts' own routing has other row counts)
    assert decode_rows == ([len(pages)] * (steps * n_moe) if copies == 4 and router == "kernel" else [])
    # every decode step's MoE layers, the batch's rows, no counts (a prompt's rows are not routed by a norm here)
    assert fused == ([len(pages)] * (steps * n_moe) if router == "fused" else [])


def test_triton_batched_step_reads_no_pad_and_one_key_of_a_finished_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """``skip_keys`` (on by default): the row attention gets each row's first column, its pad count (59 minus its
    prompt length: 30, 20, 0) while it runs and the step's own column (59 + s) once it has finished (caps 2, 6, 4:
    rows 0 and 2 end after steps 0 and 2); off, none.  The host loop's tokens either way (float32, torch layers)."""
    firsts: list[list[int] | None] = []
    attention = kernels.decode_attention

    def spy(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if kwargs.get("key_mask") is not None:
            first = kwargs.get("key_first")
            firsts.append(None if first is None else first.tolist())  # type: ignore[attr-defined]
        return attention(q, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "decode_attention", spy)
    model = build_model(
        DeepseekOCRConfig.from_json(TINY / "config.json"), "cpu", torch.float32, TINY / "weights.safetensors"
    )
    pages, caps = tiny_case_pages(model.config), [2, 6, 4]
    ref_fast = apply_fast_path(model, FastConfig(decode_kernels="torch", **NO_GRAPHS_PLAIN_VISION))  # type: ignore[arg-type]
    ref = BatchedGenerator(ref_fast, static_decode=False).run(pages, caps, eos_token_id=None)
    tri_fast = apply_fast_path(model, FastConfig(decode_kernels="triton", **NO_GRAPHS_PLAIN_VISION))  # type: ignore[arg-type]
    n_layers = model.config.language.num_hidden_layers
    for skip in (True, False):
        firsts.clear()
        res = BatchedGenerator(tri_fast).run(pages, caps, eos_token_id=None, skip_keys=skip)
        assert res.decode_path == "static" and res.tokens == ref.tokens
        rows = list(zip([30, 20, 0], caps, strict=True))
        want = [[59 + s if skip and s >= cap - 1 else pad for pad, cap in rows] for s in range(5)]
        assert firsts == [w if skip else None for w in want for _ in range(n_layers)]


def test_triton_continuous_step_reads_one_key_of_a_row_ended_by_eos(monkeypatch: pytest.MonkeyPatch) -> None:
    """Continuous batching with eos read every 8 steps: a row that ended waits for the read, and with ``skip_keys``
    (the default) the row attention gets its last column as its first (the mask shows that column alone) while a
    running row's first is 0 (the mask shows ``0 .. pos``); off, no first column.  The torch step's tokens
    either way (float32; eos 384 ends pages 0 and 1 early, see test_batched_static.EOS)."""
    from llm_perf_opt.models.deepseek_ocr.continuous import SlotRequest

    calls: list[tuple[list[int] | None, list[int], list[int]]] = []  # (first, mask's first shown column, its count)
    attention = kernels.decode_attention

    def spy(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        mask = kwargs.get("key_mask")
        if isinstance(mask, torch.Tensor):
            shown = mask.reshape(mask.shape[0], -1) == 0
            first = kwargs.get("key_first")
            calls.append(
                (
                    None if first is None else first.tolist(),  # type: ignore[attr-defined]
                    shown.int().argmax(dim=1).tolist(),
                    shown.sum(dim=1).tolist(),
                )
            )
        return attention(q, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "decode_attention", spy)
    model = build_model(
        DeepseekOCRConfig.from_json(TINY / "config.json"), "cpu", torch.float32, TINY / "weights.safetensors"
    )
    pages = tiny_case_pages(model.config)
    reqs = [SlotRequest(pages[i], cap) for i, cap in ((0, 12), (1, 14), (2, 6), (0, 9))]
    torch_fast = apply_fast_path(model, FastConfig(decode_kernels="torch", **NO_GRAPHS_PLAIN_VISION))  # type: ignore[arg-type]
    ref = BatchedGenerator(torch_fast, check_every=8).run_continuous(reqs, 2, eos_token_id=384, skip_keys=False)
    assert any(ref.stopped_by_eos) and not calls  # the torch step calls no Triton attention
    tri_fast = apply_fast_path(model, FastConfig(decode_kernels="triton", **NO_GRAPHS_PLAIN_VISION))  # type: ignore[arg-type]
    for skip in (True, False):
        calls.clear()
        res = BatchedGenerator(tri_fast, check_every=8).run_continuous(reqs, 2, eos_token_id=384, skip_keys=skip)
        assert res.tokens == ref.tokens and res.stopped_by_eos == ref.stopped_by_eos
        assert calls
        ended = 0
        for first, shown_from, count in calls:
            if not skip:
                assert first is None and shown_from == [0, 0]
                continue
            assert first == shown_from  # the kernel starts where the mask does
            for f, n in zip(first, count, strict=True):
                assert f == 0 or n == 1  # a running (or empty) row from column 0, an ended one its last column
                ended += f > 0
        assert (ended > 0) is skip  # some row did wait for the read with one key


def test_the_batched_step_counts_the_routed_experts_its_expert_kernels_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """``BatchResult.routed_experts_read``: per MoE layer, the mean distinct experts of each decode step's routing,
    counted on the device by the align kernel (12 rows) or the GEMV up kernel (3 rows); oracle: the same calls'
    routing counted by a spy (a set per call), over 7 decode steps.  A graph capture's warm-up calls count into a
    scratch pair, the capture itself (and so its replays) into the layer's counters."""
    from llm_perf_opt.models.deepseek_ocr.compiles import WATCH

    picked: list[int] = []
    grouped = kernels.moe_experts_grouped

    def spy(x: torch.Tensor, idx: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        picked.append(len(set(idx.flatten().tolist())))
        return grouped(x, idx, *args, **kw)  # type: ignore[arg-type]

    def gemv_spy(x: torch.Tensor, idx: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        if kw.get("reads") is not None:
            picked.append(len(set(idx.flatten().tolist())))
        return gemv(x, idx, *args, **kw)  # type: ignore[arg-type]

    gemv = kernels.moe_experts
    monkeypatch.setattr(kernels, "moe_experts_grouped", spy)
    monkeypatch.setattr(kernels, "moe_experts", gemv_spy)
    model = build_model(
        DeepseekOCRConfig.from_json(TINY / "config.json"), "cpu", torch.float32, TINY / "weights.safetensors"
    )
    tri_fast = apply_fast_path(model, FastConfig(decode_kernels="triton", **NO_GRAPHS_PLAIN_VISION))  # type: ignore[arg-type]
    for copies in (4, 1):  # 12 rows: the grouped kernels; 3 rows: the GEMV kernels count too
        picked.clear()
        res = BatchedGenerator(tri_fast).run(tiny_case_pages(model.config) * copies, 8, eos_token_id=None)
        assert res.decode_path == "static" and res.grouped_steps == 7
        layers = len(picked) // 7
        assert layers > 0 and len(picked) == 7 * layers
        assert res.routed_experts_read == [sum(picked[i::layers]) / 7 for i in range(layers)]
    pages = tiny_case_pages(model.config) * 4
    moe = next(layer.mlp for layer in tri_fast._triton_rows[0] if isinstance(layer.mlp, TL.TritonMoE))  # type: ignore[index]
    rows = torch.zeros(12, model.config.language.hidden_size)
    assert moe._reads_for(rows) is moe.expert_reads
    with WATCH.capturing():  # a capture's warm-up (no stream is capturing on the CPU)
        assert moe._reads_for(rows) is moe._warmup_reads
    # without the Triton row layers nothing counts the reads: no figure
    plain = apply_fast_path(model, FastConfig(decode_kernels="torch", **NO_GRAPHS_PLAIN_VISION))  # type: ignore[arg-type]
    assert plain.expert_reads() is None
    again = BatchedGenerator(plain).run(pages, 3, eos_token_id=None)
    assert again.routed_experts_read is None and again.grouped_steps == 0


def test_graphed_steps_count_their_replays_not_their_capture_warm_ups(
    cpu_graphs: list[CpuGraph], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graph paths on the CPU (``cpu_graphs``: a capture's two warm-up steps, then every step a replay): every
    decode step counts (a static batch's 4; a continuous run's steps on its full 12-row step through the grouped
    kernels and its drain's narrower ones through the GEMV kernels), and the mean per layer is the spies' over the
    replays' calls only, the warm-ups' calls (made inside the capture, ``WATCH.in_capture``) left out."""
    from llm_perf_opt.models.deepseek_ocr.compiles import WATCH
    from llm_perf_opt.models.deepseek_ocr.continuous import SlotRequest

    calls: list[tuple[bool, int]] = []  # (a capture's warm-up, distinct experts picked)
    grouped, gemv = kernels.moe_experts_grouped, kernels.moe_experts

    def spy(x: torch.Tensor, idx: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        calls.append((WATCH.in_capture, len(set(idx.flatten().tolist()))))
        return grouped(x, idx, *args, **kw)  # type: ignore[arg-type]

    def gemv_spy(x: torch.Tensor, idx: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        if kw.get("reads") is not None:  # the batched steps' calls (a single page's step counts nothing)
            calls.append((WATCH.in_capture, len(set(idx.flatten().tolist()))))
        return gemv(x, idx, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "moe_experts_grouped", spy)
    monkeypatch.setattr(kernels, "moe_experts", gemv_spy)
    model = build_model(
        DeepseekOCRConfig.from_json(TINY / "config.json"), "cpu", torch.float32, TINY / "weights.safetensors"
    )
    pages = tiny_case_pages(model.config) * 4
    cfg = FastConfig(decode_kernels="triton", **{**NO_GRAPHS_PLAIN_VISION, "cuda_graphs": True})  # type: ignore[arg-type]
    gen = BatchedGenerator(apply_fast_path(model, cfg), cuda_graphs=True)

    def expected(steps: int) -> list[float]:
        replays = [n for warm, n in calls if not warm]
        layers = len(replays) // steps
        assert layers > 0 and len(replays) == layers * steps
        return [sum(replays[i::layers]) / steps for i in range(layers)]

    res = gen.run(pages, 5, eos_token_id=None)
    assert res.decode_path == "graph" and len(cpu_graphs) == 1 and res.grouped_steps == 4
    assert any(warm for warm, _ in calls)  # the warm-ups ran the grouped kernels too
    assert res.routed_experts_read == expected(4)
    calls.clear()
    reqs = [SlotRequest(pages[i % 3], cap) for i, cap in enumerate([3, 4, 2, 5, 3, 4] * 2 + [6, 7])]
    cont = gen.run_continuous(reqs, 12, eos_token_id=None)
    wide = sum(1 for rows in cont.step_rows if rows >= kernels.GROUPED_MIN_ROWS)
    assert cont.decode_path == "graph" and 0 < wide < len(cont.step_rows)  # the drain narrowed to 8 rows or fewer
    steps = len(cont.step_rows)
    assert cont.grouped_steps == steps and cont.routed_experts_read == expected(steps)


def test_triton_device_greedy_matches_torch_greedy() -> None:
    model = _model(seed=4)
    embeds = torch.randn(1, 7, model.config.language.hidden_size)
    out = []
    for kern in ("torch", "triton"):
        fast = apply_fast_path(model, FastConfig(cuda_graphs=False, decode_kernels=kern))
        cache = fast.new_cache(batch=1, max_len=7 + 8)
        first = fast.prefill(embeds, cache).argmax(dim=-1, keepdim=True)
        out.append(fast.decoder_for(cache).greedy(first, 6))
    assert out[0] == out[1]


@pytest.mark.parametrize("ngram", [0, 2])
def test_fused_pick_gives_the_torch_greedy_tokens(ngram: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fused_pick``: the same greedy tokens as the torch step's pick, with and without the n-gram ban (size 2
    bans most of the tiny vocabulary's repeats, so the ban decides many steps); it is really the kernel that
    picks and ends the step (``feed``: the token fed back, kept, the position advanced), and the non-finite flag
    stays clear on finite logits."""
    calls: list[int] = []
    pick = kernels.pick_token

    def counted(logits: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        assert kwargs.get("feed") is not None
        calls.append(logits.shape[0])
        return pick(logits, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "pick_token", counted)
    model = _model(seed=6)
    embeds = torch.randn(2, 7, model.config.language.hidden_size)
    out = []
    for kern, fused in (("torch", False), ("triton", True)):
        fast = apply_fast_path(model, FastConfig(cuda_graphs=False, decode_kernels=kern, fused_pick=fused))
        cache = fast.new_cache(batch=2, max_len=7 + 24)
        first = fast.prefill(embeds, cache).argmax(dim=-1, keepdim=True)
        dec = fast.decoder_for(cache, ngram)
        out.append(dec.greedy(first, 20))
        assert not bool(dec.nonfinite)
    assert out[0] == out[1]
    assert calls == [2] * 20  # every step's pick, on both rows, by the kernel
    assert ngram == 0 or any(len(set(row)) > 2 for row in out[0])  # the ban really steered the tokens


@pytest.mark.parametrize("rule", [2, NoRepeatNGram(3, window=6, exempt_ids={5})])
def test_ngram_kernel_gives_the_torch_masks_greedy_tokens(
    rule: int | NoRepeatNGram, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ngram_kernel``: the same greedy tokens as the torch mask's (``generation.banned_ngram_mask``) step after
    step on two rows, with the vLLM-style window and exempt id too; the kernel really built every step's ban."""
    calls = _rows_of_calls(monkeypatch, "ngram_ban")
    model = _model(seed=8)
    embeds = torch.randn(2, 7, model.config.language.hidden_size)
    out = []
    for on in (False, True):
        fast = apply_fast_path(model, FastConfig(cuda_graphs=False, decode_kernels="triton", ngram_kernel=on))
        cache = fast.new_cache(batch=2, max_len=7 + 24)
        first = fast.prefill(embeds, cache).argmax(dim=-1, keepdim=True)
        out.append(fast.decoder_for(cache, rule).greedy(first, 20))
    assert out[0] == out[1]
    assert calls == [2] * 20  # every step of the kernel's run; none of the torch mask's
    assert any(len(set(row)) > 2 for row in out[0])  # the ban really steered the tokens


def test_ngram_kernel_in_the_batched_and_continuous_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ngram_kernel`` in the static batched step and continuous batching's slot step: the host loop's tokens
    (its rule: ``banned_ngram_tokens`` per sequence, no kernel) from the static step, and the torch mask's tokens
    from the continuous one, with the kernel building every ban (one row per sequence or slot, each step and each
    refill's first token); the rule really steered the tokens (bigrams: n = 2; the kernel's own tests cover the
    other sizes)."""
    ngram = 2
    from llm_perf_opt.models.deepseek_ocr.continuous import SlotRequest

    calls: list[tuple[int, int]] = []  # (history rows, lengths) of every ngram_ban call
    real = kernels.ngram_ban

    def counted(history: torch.Tensor, length: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append((history.shape[0], length.numel()))
        return real(history, length, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "ngram_ban", counted)
    model = build_model(
        DeepseekOCRConfig.from_json(TINY / "config.json"), "cpu", torch.float32, TINY / "weights.safetensors"
    )
    pages = tiny_case_pages(model.config)  # prompt lengths 29, 39, 59
    common = NO_GRAPHS_PLAIN_VISION
    torch_mask = BatchedGenerator(apply_fast_path(model, FastConfig(ngram_kernel=False, **common)))  # type: ignore[arg-type]
    kernel = BatchedGenerator(apply_fast_path(model, FastConfig(ngram_kernel=True, **common)))  # type: ignore[arg-type]
    assert kernel.ngram_kernel and not torch_mask.ngram_kernel
    # with the torch decode step the batched steps keep Triton out of the decode, ban included (as at batch 1)
    assert not BatchedGenerator(
        apply_fast_path(model, FastConfig(ngram_kernel=True, decode_kernels="torch", **common))  # type: ignore[arg-type]
    ).ngram_kernel
    host = BatchedGenerator(model, static_decode=False).run(pages, 10, eos_token_id=None, no_repeat_ngram_size=ngram)
    free = BatchedGenerator(model, static_decode=False).run(pages, 10, eos_token_id=None)
    assert host.tokens != free.tokens  # the rule decides tokens here
    assert not calls
    static = kernel.run(pages, 10, eos_token_id=None, no_repeat_ngram_size=ngram)
    assert static.decode_path == "static" and static.tokens == host.tokens
    # the step's set-up runs both length layouts once (a compile lands there, not in a timed fill), then the first
    # token's ban and one per decode step, every row under one length (the shared cache column)
    rows = len(pages)
    assert sorted(calls[:2]) == [(rows, 1), (rows, rows)] and calls[2:] == [(rows, 1)] * 10
    calls.clear()
    reqs = [SlotRequest(pages[i], cap) for i, cap in ((0, 12), (1, 9), (2, 10), (0, 7))]
    ref = torch_mask.run_continuous(reqs, 2, eos_token_id=None, no_repeat_ngram_size=ngram)
    assert not calls
    res = kernel.run_continuous(reqs, 2, eos_token_id=None, no_repeat_ngram_size=ngram)
    assert res.tokens == ref.tokens
    assert res.tokens != kernel.run_continuous(reqs, 2, eos_token_id=None).tokens  # the rule decided tokens here
    # set-up (2 slots: one length, one per slot), then slot steps (a length per slot) and refills (1 or 2 pages)
    assert sorted(calls[:2]) == [(2, 1), (2, 2)] and set(calls[2:]) <= {(1, 1), (2, 2)} and (2, 2) in calls[2:]


def test_norm_router_f32_gives_the_same_logits_without_the_casts(monkeypatch: pytest.MonkeyPatch) -> None:
    """``norm_router_f32``: the router reads the norm kernel's float32 copy (no ``.float()`` of the normed rows)
    and every logit is bit-identical to the step without it (the router's input values are the same)."""
    from llm_perf_opt.models.deepseek_ocr.triton_layers import TritonRMSNorm

    kept: list[bool] = []
    real = TritonRMSNorm.f32_of

    def spy(self: TritonRMSNorm, rows: torch.Tensor) -> torch.Tensor:
        held = self._f32
        out = real(self, rows)
        kept.append(held is not None and out is held[1] and self._f32 is None)  # taken, and let go of
        return out

    monkeypatch.setattr(TritonRMSNorm, "f32_of", spy)
    model = _model(seed=7)
    runs = _off_and_on(model, "norm_router_f32", 6, fused_router=False)  # (the fused router needs no copy)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    n_moe = sum(1 for layer in model.model.layers if layer.mlp.__class__.__name__ != "MLP")
    assert n_moe > 0 and kept == [True] * (6 * n_moe)  # every decode step's every MoE router took the copy


def test_fused_router_routes_every_moe_layer_in_the_norm_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fused_router``: every decode step's MoE layers are routed by the post-attention norm's kernel (no router
    kernel, no cuBLAS logits), the teacher-forced logits equal the four-launch step's to float32 rounding (the
    router logits are summed in another order) and the routing counts are the same (each pick counted once)."""
    fused: list[int] = []
    routed: list[int] = []
    real_fused, real_route = kernels.add_rms_norm_route, kernels.moe_route

    def spy_fused(x: torch.Tensor, *args: object, **kw: object) -> tuple[torch.Tensor, ...]:
        fused.append(x.shape[0])
        return real_fused(x, *args, **kw)  # type: ignore[arg-type]

    def spy_route(x: torch.Tensor, *args: object, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
        routed.append(x.shape[0])
        return real_route(x, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "add_rms_norm_route", spy_fused)
    monkeypatch.setattr(kernels, "moe_route", spy_route)
    model = _model(seed=12)
    embeds = torch.randn(2, 7, model.config.language.hidden_size)
    runs, counts = [], []
    for on in (False, True):
        # (the prompt's MoE blocks on the torch routing: this test counts the decode steps' router launches)
        cfg = FastConfig(cuda_graphs=False, decode_kernels="triton", fused_router=on, prefill_experts="torch")
        fast = apply_fast_path(model, cfg)
        fast.reset_routing_stats()
        runs.append(_decode(fast, embeds, None if not runs else runs[0][0], 5))
        counts.append(fast.tokens_per_expert())
    n_moe = sum(1 for layer in model.model.layers if layer.mlp.__class__.__name__ != "MLP")
    assert n_moe > 0 and routed == [2] * (5 * n_moe) and fused == [2] * (5 * n_moe)  # off: router; on: the norm
    scale = max(float(r.abs().max()) for r in runs[0][1])
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4 * scale)
    assert counts[0] == counts[1] and all(sum(c) > 0 for c in counts[1].values())


def test_fused_rope_projects_and_rotates_in_one_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fused_rope``: every decode step's QKV goes through ``kernels.qkv_rope`` (no separate rotary launch, the
    o_proj still through linear_rows) and the teacher-forced logits equal the two-launch step's bit for bit."""
    fused: list[int] = []
    rotary: list[int] = []
    real_fused, real_rope = kernels.qkv_rope, kernels.rope_kv_write

    def spy_fused(x: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        fused.append(x.shape[0])
        return real_fused(x, *args, **kw)  # type: ignore[arg-type]

    def spy_rope(qkv: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        rotary.append(qkv.shape[0])
        return real_rope(qkv, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "qkv_rope", spy_fused)
    monkeypatch.setattr(kernels, "rope_kv_write", spy_rope)
    model = _model(seed=13)
    runs = _off_and_on(model, "fused_rope", 4, fused_input_norm=False)  # (that one is tested below)
    steps = 4 * model.config.language.num_hidden_layers
    assert rotary == [2] * steps and fused == [2] * steps  # off: the rotary kernel; on: the fused projection
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_fused_input_norm_runs_the_input_norm_inside_the_qkv_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fused_input_norm``: every decode step's input norms run inside ``qkv_rope`` (the norm kernel runs only for
    the post-attention norms of dense layers and the final norm) and the teacher-forced logits equal the step with
    the norm launches bit for bit."""
    with_norm: list[bool] = []
    norms: list[int] = []
    real_fused, real_norm = kernels.qkv_rope, kernels.add_rms_norm

    def spy_fused(x: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        with_norm.append(kw.get("norm") is not None)
        return real_fused(x, *args, **kw)  # type: ignore[arg-type]

    def spy_norm(x: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
        norms.append(x.shape[0])
        return real_norm(x, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "qkv_rope", spy_fused)
    monkeypatch.setattr(kernels, "add_rms_norm", spy_norm)
    model = _model(seed=14)
    runs = _off_and_on(model, "fused_input_norm", 4, down_norm=False)  # down_norm: tested below
    lang = model.config.language
    n_dense = sum(1 for layer in model.model.layers if layer.mlp.__class__.__name__ == "MLP")
    steps = 4 * lang.num_hidden_layers
    assert with_norm == [False] * steps + [True] * steps
    # decode steps (2 rows) off: every input norm, the dense layers' post-attention norms and the final norm; on:
    # the last two only; the two prefills' (2 x 7 rows, triton_prefill) run every norm
    assert norms.count(2) == 4 * (lang.num_hidden_layers + n_dense + 1) + 4 * (n_dense + 1)
    assert norms.count(14) == 2 * (2 * lang.num_hidden_layers + 1)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_folded_input_norm_refuses_rows_it_did_not_get() -> None:
    """The folded norm returns its input un-normalised: any rows but those, handed to its attention, are an error."""
    from llm_perf_opt.models.deepseek_ocr.decoder import RMSNorm
    from llm_perf_opt.models.deepseek_ocr.triton_layers import TritonRMSNorm

    norm = TritonRMSNorm(RMSNorm(64, 1e-6), deferred=True)
    delta, residual = torch.randn(3, 64), torch.randn(3, 64)
    out, summed = norm.add_norm(delta, residual)
    assert out is delta and summed.shape == delta.shape and summed.data_ptr() != delta.data_ptr()
    with pytest.raises(RuntimeError, match="unchanged"):
        norm.pending_for(delta.clone())
    out, summed = norm.add_norm(delta, None)
    assert summed.data_ptr() == delta.data_ptr()  # the first layer: the sum is the embeddings themselves
    got, res, buf = norm.pending_for(out)
    assert got.data_ptr() == delta.data_ptr() and res is None and buf.data_ptr() == delta.data_ptr()
    with pytest.raises(RuntimeError, match="unchanged"):
        norm.pending_for(out)  # taken once


def test_fused_router_refuses_rows_it_did_not_route() -> None:
    """The norm's kernel has counted its rows' picks: routing any other rows from it would count twice."""
    from llm_perf_opt.models.deepseek_ocr.decoder import RMSNorm
    from llm_perf_opt.models.deepseek_ocr.triton_layers import Router, TritonRMSNorm

    counts = torch.zeros(8, dtype=torch.int64)
    norm = TritonRMSNorm(RMSNorm(64, 1e-6), router=Router(torch.randn(8, 64), 2, counts, 1.0, False))
    normed, _ = norm.add_norm(torch.randn(3, 64), torch.randn(3, 64))
    assert int(counts.sum()) == 3 * 2
    with pytest.raises(RuntimeError, match="no row subset"):
        norm.routing_of(normed[1:].clone())
    norm.add_norm(torch.randn(3, 64), None)
    with pytest.raises(RuntimeError, match="no row subset"):
        norm.routing_of(normed)  # an earlier call's output
    second, _ = norm.add_norm(torch.randn(3, 64), None)
    idx, weights = norm.routing_of(second)
    assert idx.shape == weights.shape == (3, 2) and int(counts.sum()) == 3 * 2 * 3


def test_batched_fused_router_counts_in_the_block_only_where_it_records() -> None:
    """``batched_fused_router``: the row layers' norms route without counts, while the single-page layers' fused
    norms count; a row-layer MoE block asked to record routing (the single-page step of more than 8 rows) counts
    each pick once itself (by hand: a bincount of the ids it returns), and one that does not record adds nothing."""
    from llm_perf_opt.models.deepseek_ocr.context import ForwardContext
    from llm_perf_opt.models.deepseek_ocr.triton_layers import TritonMoE, TritonRMSNorm

    model = build_model(
        DeepseekOCRConfig.from_json(TINY / "config.json"), "cpu", torch.float32, TINY / "weights.safetensors"
    )
    fast = apply_fast_path(model, FastConfig(batched_fused_router=True, **NO_GRAPHS_PLAIN_VISION))  # type: ignore[arg-type]
    assert fast._triton_rows is not None and fast._triton is not None
    rows = [layer for layer in fast._triton_rows[0] if isinstance(layer.mlp, TritonMoE)]
    single = [layer for layer in fast._triton[0] if isinstance(layer.mlp, TritonMoE)]
    assert rows and single
    for layer in rows:
        post = layer.post_attention_layernorm
        assert isinstance(post, TritonRMSNorm) and post.router is not None and post.router.counts is None
    for layer in single:
        post = layer.post_attention_layernorm
        assert isinstance(post, TritonRMSNorm) and post.router is not None and post.router.counts is not None
    layer = rows[0]
    post = layer.post_attention_layernorm
    assert isinstance(post, TritonRMSNorm) and isinstance(layer.mlp, TritonMoE)
    hidden = model.config.language.hidden_size
    counts = layer.mlp.counts
    assert counts is not None
    before = counts.clone()
    normed, _ = post.add_norm(torch.randn(3, hidden), torch.randn(3, hidden))
    idx, _ = layer.mlp.select_experts(normed, None)  # no context: routing is recorded
    assert torch.equal(counts - before, torch.bincount(idx.reshape(-1), minlength=counts.numel()))
    before = counts.clone()
    normed, _ = post.add_norm(torch.randn(3, hidden), torch.randn(3, hidden))
    quiet = ForwardContext(cos=None, sin=None, record_routing=False)
    idx, weights = layer.mlp.select_experts(normed, quiet)
    assert idx.shape == weights.shape == (3, model.config.language.num_experts_per_tok)
    assert torch.equal(counts, before)


@pytest.mark.parametrize("pdl", [False, True])
def test_pdl_launches_every_decode_kernel_as_a_dependent_launch(pdl: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pdl``: every Triton launch of a decode step (the single-page step with its fused pick, and the batched
    row step) happens inside ``kernels.dependent_launches``, and nothing outside the step does (the prefill's
    norm and rotary kernels launch plainly); the interpreter itself launches plainly (no device to depend on), so
    the tokens are those of the plain launches."""
    seen: list[bool] = []
    real = kernels._pdl

    def spy() -> dict[str, bool]:
        seen.append(kernels._DEPENDENT_LAUNCH.get())
        return real()

    monkeypatch.setattr(kernels, "_pdl", spy)
    model = _model(seed=8)
    embeds = torch.randn(2, 7, model.config.language.hidden_size)
    common = NO_GRAPHS_PLAIN_VISION
    fast = apply_fast_path(model, FastConfig(decode_kernels="triton", pdl=pdl, **common))  # type: ignore[arg-type]
    cache = fast.new_cache(batch=2, max_len=7 + 8)
    first = fast.prefill(embeds, cache).argmax(dim=-1, keepdim=True)
    n_layers = model.config.language.num_hidden_layers
    n_moe = sum(1 for layer in model.model.layers if layer.mlp.__class__.__name__ == "MoE")
    # a prefill's Triton launches: per layer two norms, the rotary, the attention and a SwiGLU (the dense MLP's or
    # the shared experts'); per MoE block the router, the sort's two launches, the two grouped GEMMs and the
    # combine; then the final norm
    prompt = 5 * n_layers + 6 * n_moe + 1
    assert seen == [False] * prompt
    seen.clear()
    tokens = fast.decoder_for(cache, 2).greedy(first, 4)
    # >= 4 launches per layer per step (norm, rotary, attention, combine) plus the pick's two
    assert len(seen) >= 4 * (4 * n_layers + 2) and set(seen) == {pdl}
    seen.clear()
    res = BatchedGenerator(fast).run(tiny_case_pages(model.config) * 2, 4, eos_token_id=None)
    assert res.decode_path == "static" and seen.count(pdl) > prompt
    if pdl:  # the plain launches are its prefills' (left-padded rows: an additive mask, so SDPA attends there)
        assert seen.count(False) % (prompt - n_layers) == 0
    assert not kernels._DEPENDENT_LAUNCH.get() and real() == {}  # reset after the step; plain in the interpreter
    plain = apply_fast_path(model, FastConfig(decode_kernels="triton", pdl=False, **common))  # type: ignore[arg-type]
    cache = plain.new_cache(batch=2, max_len=7 + 8)
    assert plain.decoder_for(cache, 2).greedy(plain.prefill(embeds, cache).argmax(dim=-1, keepdim=True), 4) == tokens


def test_triton_linear_projects_qkv_and_o_proj_with_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """``triton_linear``: every decode step's fused QKV and o_proj go through ``kernels.linear_rows`` (two per layer
    per step), and teacher-forced logits equal the cuBLAS-projection step's to float32 rounding (the same
    products, summed in another order); the prefill keeps its GEMMs."""
    shapes: list[tuple[int, int]] = []
    real = kernels.linear_rows

    def counted(x: torch.Tensor, w: torch.Tensor, **kw: object) -> torch.Tensor:
        shapes.append((x.shape[0], w.shape[0]))
        return real(x, w, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "linear_rows", counted)
    model = _model(seed=9)
    lang = model.config.language
    runs = _off_and_on(model, "triton_linear", 5, fused_rope=False)  # (fused_rope: the QKV in qkv_rope)
    qkv = (lang.num_attention_heads + 2 * lang.num_key_value_heads) * lang.head_dim
    assert shapes == [(2, qkv), (2, lang.hidden_size)] * (5 * lang.num_hidden_layers)
    scale = max(float(r.abs().max()) for r in runs[0][1])
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4 * scale)  # fp32 rounding, through every layer


def test_one_launch_attention_gives_bit_identical_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """``one_launch_attention``: every decode step's attention runs with counters (no combine launch) and the
    teacher-forced logits equal the two-launch step's bit for bit (the same combine arithmetic)."""
    with_counters: list[bool] = []
    real = kernels.decode_attention

    def spy(*args: object, **kw: object) -> torch.Tensor:
        with_counters.append(kw.get("counters") is not None)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "decode_attention", spy)
    model = _model(seed=10)
    runs = _off_and_on(model, "one_launch_attention", 4)
    steps = 4 * model.config.language.num_hidden_layers
    assert with_counters == [False] * steps + [True] * steps
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_one_launch_attention_keeps_one_counter_buffer_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A captured graph keeps the address of the counters it was captured with, so a layer never swaps its buffer:
    decoding one row and then eight (the single-page step's widest) uses the same zeroed buffer in each layer."""
    seen: list[int] = []
    real = kernels.decode_attention

    def spy(*args: object, **kw: object) -> torch.Tensor:
        counters = kw["counters"]
        assert isinstance(counters, torch.Tensor)
        seen.append(counters.data_ptr())
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "decode_attention", spy)
    model = _model(seed=11)
    fast = apply_fast_path(model, FastConfig(cuda_graphs=False, decode_kernels="triton", one_launch_attention=True))
    n_layers = model.config.language.num_hidden_layers
    for rows in (1, TRITON_MAX_ROWS):
        embeds = torch.randn(rows, 5, model.config.language.hidden_size)
        _decode(fast, embeds, None, 1)
    assert len(seen) == 2 * n_layers and seen[:n_layers] == seen[n_layers:]


def test_moe_down_split_runs_the_split_down_kernel_with_one_kept_counter_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``moe_down_split``: every decode step's experts run the split down form with counters a layer keeps (one
    buffer from 1 row to the widest single-page step: a captured graph holds its address), and the teacher-forced
    logits equal the rows form's (the tiny sizes fit one K tile in both forms, so the float32 sums are the same)."""
    forms: list[tuple[str, int | None]] = []
    real = kernels.moe_experts

    def spy(*args: object, **kw: object) -> torch.Tensor:
        counters = kw.get("counters")
        forms.append((str(kw.get("down", "rows")), None if counters is None else counters.data_ptr()))  # type: ignore[attr-defined]
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "moe_experts", spy)
    model = _model(seed=15)
    runs = _off_and_on(model, "moe_down_split", 3, triton_dense_mlp=False)  # the MoE layers' calls only
    n_moe = sum(1 for layer in model.model.layers if layer.mlp.__class__.__name__ == "MoE")
    assert n_moe > 0
    assert [f for f, _ in forms] == ["rows"] * 3 * n_moe + ["split"] * 3 * n_moe
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    forms.clear()
    cfg = FastConfig(cuda_graphs=False, decode_kernels="triton", moe_down_split=True, triton_dense_mlp=False)
    fast = apply_fast_path(model, cfg)
    for rows in (1, TRITON_MAX_ROWS):
        _decode(fast, torch.randn(rows, 5, model.config.language.hidden_size), None, 1)
    ptrs = [p for _, p in forms]
    assert None not in ptrs and ptrs[:n_moe] == ptrs[n_moe:]


def test_down_norm_runs_the_next_norm_in_each_moe_down_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """``down_norm``: every MoE layer's split down kernel runs the norm after it (the next layer's input norm, or the
    final norm), so per decode step the norm kernel runs once per MoE layer less, and the teacher-forced logits
    equal the step with the norm launches bit for bit (the same math and rounding points; the interpreter sums in
    one order).  With ``fused_input_norm`` the next layers' input norms stay in their QKV kernels and only the final
    norm moves."""
    norms: list[int] = []
    with_norm: list[bool] = []
    real_norm, real_experts = kernels.add_rms_norm, kernels.moe_experts

    def spy_norm(x: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
        norms.append(x.shape[0])
        return real_norm(x, *args)  # type: ignore[arg-type]

    def spy_experts(*args: object, **kw: object) -> torch.Tensor:
        with_norm.append(kw.get("norm") is not None)
        return real_experts(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "add_rms_norm", spy_norm)
    monkeypatch.setattr(kernels, "moe_experts", spy_experts)
    model = _model(seed=16)
    runs = _off_and_on(model, "down_norm", 4, triton_dense_mlp=False)  # the MoE layers' expert calls only
    lang = model.config.language
    n_moe = sum(1 for layer in model.model.layers if layer.mlp.__class__.__name__ == "MoE")
    n_dense = lang.num_hidden_layers - n_moe
    assert n_moe > 0
    assert with_norm == [False] * 4 * n_moe + [True] * 4 * n_moe
    # decode steps (2 rows): every input norm, the dense layers' post-attention norms and the final norm; on: one
    # per MoE layer fewer
    assert norms.count(2) == 4 * (lang.num_hidden_layers + n_dense + 1) + 4 * (
        lang.num_hidden_layers + n_dense + 1 - n_moe
    )
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    # with the input norms folded into the QKV kernels, only the final norm runs in the last MoE layer's down kernel
    with_norm.clear()
    cfg = FastConfig(
        cuda_graphs=False, decode_kernels="triton", fused_input_norm=True, down_norm=True, triton_dense_mlp=False
    )
    _decode(apply_fast_path(model, cfg), torch.randn(2, 7, lang.hidden_size), None, 1)
    last_moe = max(i for i, layer in enumerate(model.model.layers) if layer.mlp.__class__.__name__ == "MoE")
    assert with_norm == [
        i == last_moe for i, layer in enumerate(model.model.layers) if layer.mlp.__class__.__name__ == "MoE"
    ]


def test_norm_run_ahead_refuses_rows_its_moe_did_not_produce() -> None:
    """A norm run in the MoE down kernel before it returns that kernel's result only for that kernel's output and
    the residual stream it read; a post-attention norm hands its sum only to the MoE that got its output."""
    from llm_perf_opt.models.deepseek_ocr.decoder import RMSNorm
    from llm_perf_opt.models.deepseek_ocr.triton_layers import TritonRMSNorm

    nxt = TritonRMSNorm(RMSNorm(64, 1e-6))
    nxt.ahead = True
    delta, residual, normed, summed = (torch.randn(3, 64) for _ in range(4))
    with pytest.raises(RuntimeError, match="unchanged"):
        nxt.add_norm(delta, residual)  # nothing run ahead
    nxt.expect(delta, residual, normed, summed)
    with pytest.raises(RuntimeError, match="unchanged"):
        nxt.add_norm(delta.clone(), residual)
    nxt.expect(delta, residual, normed, summed)
    with pytest.raises(RuntimeError, match="unchanged"):
        nxt.add_norm(delta, residual.clone())
    nxt.expect(delta, residual, normed, summed)
    got_normed, got_summed = nxt.add_norm(delta.view(3, 1, 64), residual.view(3, 1, 64))
    assert got_normed.data_ptr() == normed.data_ptr() and got_summed.data_ptr() == summed.data_ptr()
    assert got_normed.shape == (3, 1, 64)
    post = TritonRMSNorm(RMSNorm(64, 1e-6))
    post.keep_summed = True
    out, total = post.add_norm(delta, residual)
    torch.testing.assert_close(total, delta + residual)
    with pytest.raises(RuntimeError, match="unchanged"):
        post.summed_for(out.clone())
    out, total = post.add_norm(delta, residual)
    assert post.summed_for(out).data_ptr() == total.data_ptr()


def test_triton_dense_mlp_runs_the_dense_layer_on_the_expert_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """``triton_dense_mlp``: the first layer's dense MLP runs as one always-on slot of the expert kernels (no routed
    picks, the fused MLP's own weights as the slot's stacks: no copy) in every decode step of up to 8 rows; the
    teacher-forced logits equal the cuBLAS MLP's within float32 summation order.  More rows run the MLP as it is."""
    dense_calls: list[tuple[int, int, int, bool]] = []
    real = kernels.moe_experts

    def spy(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, *a, **kw):  # type: ignore[no-untyped-def]
        if idx.shape[1] == 0:
            dense_calls.append(
                (x.shape[0], w13.shape[0], kw.get("n_always", a[0] if a else 0), kw.get("down") == "rows")
            )
        return real(x, idx, w, w13, w2, *a, **kw)

    monkeypatch.setattr(kernels, "moe_experts", spy)
    model = _model(seed=16)
    dense = model.model.layers[0].mlp
    assert dense.__class__.__name__ == "MLP"  # the tiny model's first layer is dense, as the real one's
    runs = _off_and_on(model, "triton_dense_mlp", 3)
    assert dense_calls == [(2, 1, 1, True)] * 3  # on: each of the 3 steps' 2 rows, one always-on slot
    for want, got in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fast = apply_fast_path(model, FastConfig(cuda_graphs=False, decode_kernels="triton", triton_dense_mlp=True))
    layer0 = fast._triton[0][0].mlp  # type: ignore[index]
    assert isinstance(layer0, TL.TritonDenseMLP)
    assert layer0.mlp.w13.data_ptr() == fast.layers[0].mlp.w13.data_ptr()  # the fused MLP's own weights
    dense_calls.clear()
    _decode(fast, torch.randn(TRITON_MAX_ROWS + 1, 5, model.config.language.hidden_size), None, 1)
    assert dense_calls == []  # 9 rows: the batched step's layers, the MLP as it is


def test_triton_unavailable_falls_back_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernels cannot run, the torch step runs and the model says why (warned only on CUDA, where
    Triton was expected; on the CPU the torch step is the normal one)."""
    monkeypatch.setattr(kernels, "triton_available", lambda device: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = apply_fast_path(_model(seed=5), FastConfig(cuda_graphs=False, decode_kernels="triton"))
    assert fast.decode_kernels == "torch"
    assert fast.decode_kernels_note and "cannot run" in fast.decode_kernels_note
    assert not any("decoding with the torch kernels" in str(w.message) for w in caught)
    assert apply_fast_path(fast, FastConfig(grouped_moe=False)).decode_kernels_note == (
        "decode_kernels=triton needs grouped_moe (stacked expert weights)"
    )


def test_triton_prefill_runs_every_norm_rotary_and_moe_tail_in_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """``triton_prefill``: the prompt's residual add + RMSNorm (two per layer, then the final norm), each layer's
    rotary + cache write, every SwiGLU and each MoE block's weighted sum + shared add run the Triton kernels; with
    ``prefill_experts=triton`` also the routing (one router kernel, the sort by expert) and the routed experts
    (prompt_moe's grouped GEMMs, their SwiGLU inside), with ``prefill_attention=triton`` the causal attention
    (prompt_attention's kernel); the prefill logits, the cache's keys and values and the
    routing counters equal the eager model's (the oracle) to float32 rounding, for a prompt at column 0 and one
    continuing the cache (start 7)."""
    calls: list[str] = []
    real_norm, real_rope, real_combine = kernels.add_rms_norm, kernels.prompt_rope_kv_write, kernels.moe_gather_combine

    def norm_spy(x: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(f"norm {x.shape[0]}")
        return real_norm(x, *args)  # type: ignore[arg-type]

    def rope_spy(qkv: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(f"rope {qkv.shape[1]}")
        return real_rope(qkv, *args)  # type: ignore[arg-type]

    def combine_spy(
        y: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor, shared: torch.Tensor
    ) -> torch.Tensor:
        calls.append(f"moe {weights.shape[0]}")
        return real_combine(y, inverse, weights, shared)

    real_silu = kernels.silu_mul

    def silu_spy(h: torch.Tensor) -> torch.Tensor:
        calls.append(f"swiglu {h.numel() // h.shape[-1]}")
        return real_silu(h)

    real_route, real_route_rows, real_up = kernels.moe_route, kernels.moe_route_rows, PM.grouped_swiglu

    def route_spy(x: torch.Tensor, *args: object, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(f"route {x.shape[0]} cublas")
        return real_route(x, *args, **kw)  # type: ignore[arg-type]

    def route_rows_spy(x: torch.Tensor, *args: object, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(f"route {x.shape[0]} kernel")
        return real_route_rows(x, *args, **kw)  # type: ignore[arg-type]

    def up_spy(x: torch.Tensor, order: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(f"experts {order.numel()}")
        return real_up(x, order, *args)  # type: ignore[arg-type]

    real_attn = PA.prompt_attention

    def attn_spy(q: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        calls.append(f"attn {q.shape[1]}")
        return real_attn(q, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(PA, "prompt_attention", attn_spy)
    monkeypatch.setattr(kernels, "moe_route", route_spy)
    monkeypatch.setattr(kernels, "moe_route_rows", route_rows_spy)
    monkeypatch.setattr(PM, "grouped_swiglu", up_spy)
    monkeypatch.setattr(kernels, "add_rms_norm", norm_spy)
    monkeypatch.setattr(kernels, "prompt_rope_kv_write", rope_spy)
    monkeypatch.setattr(kernels, "moe_gather_combine", combine_spy)
    monkeypatch.setattr(kernels, "silu_mul", silu_spy)
    model = _model(seed=11)
    layers = list(model.model.layers)
    moe = [layer.mlp.__class__.__name__ == "MoE" for layer in layers]
    top_k = model.config.language.num_experts_per_tok
    assert any(moe) and not all(moe)  # the tiny model has a dense first layer and MoE layers
    gen = torch.Generator().manual_seed(5)  # (a seed without float32 near-ties in the top-k routing)
    first, more = (torch.randn(2, n, model.config.language.hidden_size, generator=gen) for n in (7, 3))
    ref_cache = model.new_cache(batch=2, max_len=12)
    expected = [model.prefill(first, ref_cache), model.prefill(more, ref_cache)]
    expected_counts = {i: list(layer.mlp.tokens_per_expert) for i, layer in enumerate(layers) if moe[i]}
    runs = [(False, "torch", "sdpa", "kernel"), (True, "torch", "sdpa", "kernel")]
    runs += [(True, "triton", "triton", router) for router in TL.ROWS_ROUTERS]
    for on, experts, attention, router in runs:
        calls.clear()
        monkeypatch.setattr(TL, "ROWS_ROUTER", router)
        cfg = FastConfig(
            cuda_graphs=False,
            decode_kernels="triton",
            triton_prefill=on,
            prefill_experts=experts,
            prefill_attention=attention,
        )
        fast = apply_fast_path(model, cfg)
        cache = fast.new_cache(batch=2, max_len=12)
        for embeds, want in zip((first, more), expected, strict=True):
            assert rel_err(fast.prefill(embeds, cache), want) < 1e-5
        assert rel_err(cache.k, ref_cache.k) < 1e-5 and rel_err(cache.v, ref_cache.v) < 1e-5
        assert fast.tokens_per_expert() == expected_counts
        per_prompt = []
        for n in (7, 3):
            for m in moe:
                rows = 2 * n  # a MoE block: shared SwiGLU, routed SwiGLU over k picks per row, the tail
                # the shared SwiGLU first (issued before the routing: with prefill_shared_stream on its own stream)
                routed = [f"swiglu {rows}", f"route {rows} {router}", f"experts {rows * top_k}"]
                if experts == "torch":
                    routed = [f"swiglu {rows}", f"swiglu {rows * top_k}"]
                tail = [*routed, f"moe {rows}"] if m else [f"swiglu {rows}"]
                attn = [f"attn {n}"] if attention == "triton" else []
                per_prompt += [f"norm {rows}", f"rope {n}", *attn, f"norm {rows}", *tail]
            per_prompt.append(f"norm {2 * n}")
        assert calls == (per_prompt if on else [])
