"""Fast path == eager on the full-size model (bf16, dummy weights) on a GPU.

Greedy tokens must match for 64 steps wherever the eager choice is not a near-tie: both models are
driven with the eager tokens (teacher forcing), so one near-tie cannot derail the rest of the comparison.
With dummy weights the logits are nearly flat (top-2 gaps of ~1e-2 happen), and the fast path's kernels
(fused GEMMs, grouped GEMM, masked attention) differ from eager's by bf16 rounding.
"""

from __future__ import annotations

import attrs
import pytest
import torch

from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model
from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, apply_fast_path

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CONFIG = "src/llm_perf_opt/models/deepseek_ocr/configs/deepseek-ocr.json"
STEPS = 64


def _forced(model: object, embeds: torch.Tensor, tokens: list[int] | None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decode; with ``tokens`` given, feed those instead of the model's own picks."""
    cache = model.new_cache(batch=1, max_len=embeds.shape[1] + STEPS + 1)  # type: ignore[attr-defined]
    logits = model.prefill(embeds, cache)  # type: ignore[attr-defined]
    picks, rows = [int(logits.argmax(-1))], [logits[0].float().cpu()]
    for i in range(STEPS):
        feed = picks[-1] if tokens is None else tokens[i]
        logits = model.decode_step(torch.tensor([[feed]], device=embeds.device), cache)  # type: ignore[attr-defined]
        picks.append(int(logits.argmax(-1)))
        rows.append(logits[0].float().cpu())
    return picks, rows


@pytest.fixture(scope="module")
def model() -> object:
    cfg = DeepseekOCRConfig.from_json(CONFIG)
    return build_model(cfg, "cuda", torch.bfloat16, "dummy")


@pytest.mark.parametrize(
    ("cuda_graphs", "kernels", "switches"),
    [
        (True, "triton", {}),
        (True, "torch", {}),
        (False, "triton", {}),
        (True, "triton", {"triton_linear": False}),  # QKV / o_proj through cuBLAS (the default: Triton GEMVs)
        (True, "triton", {"fused_router": False}),  # norm, cuBLAS router logits, top-k kernel: four launches
    ],
)
def test_fast_tokens_match_eager(model: object, cuda_graphs: bool, kernels: str, switches: dict[str, bool]) -> None:
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode():
        ids = torch.randint(0, 129280, (1, 300), generator=gen).cuda()
        embeds = model.model.embed_tokens(ids)  # type: ignore[attr-defined]
        ref_tokens, ref_rows = _forced(model, embeds, None)
        cfg = FastConfig(cuda_graphs=cuda_graphs, decode_kernels=kernels, **switches)
        fast = apply_fast_path(model, cfg)  # type: ignore[arg-type]
        assert fast.decode_kernels == kernels, fast.decode_kernels_note
        tokens, rows = _forced(fast, embeds, ref_tokens)
    scale = max(float(r.abs().max()) for r in ref_rows)
    diffs = [float((a - b).abs().max()) for a, b in zip(rows, ref_rows, strict=True)]
    assert max(diffs) <= 2e-2 * scale + 1e-2, (max(diffs), scale)
    for step, (got, want, row, diff) in enumerate(zip(tokens, ref_tokens, ref_rows, diffs, strict=True)):
        top2 = row.topk(2).values
        if float(top2[0] - top2[1]) > 2 * diff:  # a clear winner must be picked by both
            assert got == want, (step, got, want)
    # the rest were near-ties, where rounding may pick either: they must stay rare
    mismatches = sum(g != w for g, w in zip(tokens, ref_tokens, strict=True))
    assert mismatches <= len(tokens) // 10, mismatches


@pytest.mark.parametrize(
    ("graphs", "sam_attention", "window", "clip"),
    [
        (True, "augmented", "augmented", "sdpa"),
        (False, "augmented", "augmented", "triton"),
        (True, "triton", "augmented", "sdpa"),
        (True, "triton", "triton", "triton"),
    ],
)
def test_fast_vision_matches_eager(model: object, graphs: bool, sam_attention: str, window: str, clip: str) -> None:
    """SAM with folded rel-pos (or the Triton rel-pos kernel in its global / windowed blocks) + compiled/graphed SAM
    and CLIP blocks (CLIP's attention per view through SDPA, or all views in one Triton kernel) == eager
    encode_images to bf16 rounding."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    crops = torch.randn(6, 3, 640, 640, generator=gen).cuda().bfloat16()
    ori = torch.randn(1, 3, 1024, 1024, generator=gen).cuda().bfloat16()
    with torch.inference_mode():
        ref = model.encode_images(crops, ori, [2, 3]).float()  # type: ignore[attr-defined]
        cfg = FastConfig(
            vision_graphs=graphs, sam_attention=sam_attention, sam_window_attention=window, clip_attention=clip
        )
        fast = apply_fast_path(model, cfg)  # type: ignore[arg-type]
        assert fast.vision.sam_attention == sam_attention, fast.vision.sam_attention_note
        assert fast.vision.clip_attention == clip, fast.vision.clip_attention_note
        assert fast.vision.sam_window_attention == window, fast.vision.sam_window_attention_note
        for _ in range(2):  # the second call replays the captured graphs
            out = fast.encode_images(crops, ori, [2, 3]).float()
            rel = float((out - ref).norm() / ref.norm())
            assert rel < 3e-2, rel
        if graphs:
            assert fast._vision_graphs is not None
            assert all(g.capture_error is None for g in fast._vision_graphs)
            # the page's views: SAM per view shape, CLIP over both views at once (clip_merged_views)
            assert {name for name, g in fast.vision.graphs.items() if g.graphs} == {"sam", "clip-views"}


def test_vision_streams_give_the_serial_features_and_time_each_view(model: object) -> None:
    """The global view on its own stream (``vision_streams``) gives the serial path's features bit for bit (the
    same graphs and kernels, only another stream), the features are complete when encode_images returns (read
    right after on the current stream), and the stage hooks still time both views' SAM, CLIP (once: both views as one
    sequence) and projector."""
    from llm_perf_opt.profiling.hooks import StageHooks
    from llm_perf_opt.profiling.ranges import RangeMarker
    from llm_perf_opt.profiling.timers import DeviceClock

    gen = torch.Generator(device="cpu").manual_seed(1)
    crops = torch.randn(6, 3, 640, 640, generator=gen).cuda().bfloat16()
    ori = torch.randn(1, 3, 1024, 1024, generator=gen).cuda().bfloat16()
    with torch.inference_mode():
        serial = apply_fast_path(model, FastConfig(vision_streams=False))  # type: ignore[arg-type]
        ref = serial.encode_images(crops, ori, [2, 3]).clone()
        fast = apply_fast_path(model, FastConfig(vision_streams=True))  # type: ignore[arg-type]
        assert fast.view_stream is not None
        inner = model.model  # type: ignore[attr-defined]
        clock = DeviceClock(torch.device("cuda"))
        hooks = StageHooks(
            {"sam": inner.sam_model, "clip": inner.vision_model, "projector": inner.projector},
            clock,
            RangeMarker(use_nvtx=False),
        )
        try:
            for _ in range(3):  # capture, then replays
                hooks.reset()
                out = fast.encode_images(crops, ori, [2, 3])
                assert torch.equal(out, ref)
            torch.cuda.synchronize()
            ms = hooks.collect_ms()
            assert hooks.last_calls == {"sam": 2, "clip": 1, "projector": 2}  # CLIP over both views at once
            assert all(v > 0 for v in ms.values()), ms
            # CLIP per view (clip_merged_views=False): its GEMMs at 606 and 257 rows, not 863: within bf16 rounding
            per_view = apply_fast_path(model, FastConfig(clip_merged_views=False))  # type: ignore[arg-type]
            hooks.reset()
            out = per_view.encode_images(crops, ori, [2, 3])
            torch.cuda.synchronize()
            hooks.collect_ms()
            assert hooks.last_calls == {"sam": 2, "clip": 2, "projector": 2}
            assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
        finally:
            hooks.remove()
    assert model.view_stream is None  # type: ignore[attr-defined]  # restored after each call


def test_a_global_view_met_first_without_crops_gets_its_own_graph_on_the_view_stream(model: object) -> None:
    """``vision_streams``: a 1x1 page meets the global view's shape on the current stream first (captured on the crops'
    capture stream); a later page with crops runs its global view on ``view_stream`` beside the crops' graphs.  It
    must get a graph of its own captured on the global chain's stream (round 27, found by reading: it replayed the
    crops' chain's graph, both sharing that stream's cuBLAS workspace while replaying concurrently).  The cropped
    page's features equal the serial path's bit for bit, replay after replay."""
    gen = torch.Generator(device="cpu").manual_seed(2)
    crops = torch.randn(6, 3, 640, 640, generator=gen).cuda().bfloat16()
    ori = torch.randn(1, 3, 1024, 1024, generator=gen).cuda().bfloat16()
    placeholder = torch.zeros(1, 3, 640, 640, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = apply_fast_path(model, FastConfig(vision_streams=False)).encode_images(crops, ori, [2, 3]).clone()  # type: ignore[arg-type]
        fast = apply_fast_path(model, FastConfig(vision_streams=True))  # type: ignore[arg-type]
        fast.encode_images(placeholder, ori, [1, 1])  # the 1x1 page: the global view on the current stream
        sam = fast.vision.graphs["sam"]
        assert [k[0] for k in sam.graphs] == [(1, 3, 1024, 1024)]
        for _ in range(3):
            assert torch.equal(fast.encode_images(crops, ori, [2, 3]), ref)
        globals_ = [k for k in sam.graphs if k[0] == (1, 3, 1024, 1024)]
        assert len(globals_) == 2 and len({k[-1] for k in globals_}) == 2  # one per chain's capture stream


def test_prefill_graph_matches_ungraphed_and_is_reused(model: object) -> None:
    """The graphed LM prefill gives the un-graphed logits and K/V; a second prompt of the same length replays
    (no new capture), a new length captures once more."""
    torch.manual_seed(0)
    base = model.base if hasattr(model, "base") else model  # type: ignore[attr-defined]
    hidden = base.config.language.hidden_size  # type: ignore[attr-defined]
    embeds = torch.randn(1, 300, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    plain = apply_fast_path(base, FastConfig(prefill_graphs=False))  # type: ignore[arg-type]
    graphed = apply_fast_path(base, FastConfig())  # type: ignore[arg-type]
    c_plain, c_graph = plain.new_cache(1, 320), graphed.new_cache(1, 320)
    ref = plain.prefill(embeds, c_plain)
    out = graphed.prefill(embeds, c_graph)
    assert graphed._prefill_graph_error is None and graphed.capture_count == 1
    assert c_graph.length == c_plain.length == 300
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)  # same kernels; a graph may pick other algos
    torch.testing.assert_close(c_graph.k[:, :, :, :300], c_plain.k[:, :, :, :300], rtol=1e-2, atol=1e-2)
    c_graph.reset()
    again = graphed.prefill(embeds * 0.5, c_graph)
    c_plain.reset()
    torch.testing.assert_close(again, plain.prefill(embeds * 0.5, c_plain), rtol=1e-3, atol=1e-3)
    assert graphed.capture_count == 1  # replayed
    c_graph.reset()
    graphed.prefill(embeds[:, :200], c_graph)
    assert graphed.capture_count == 2


@pytest.mark.parametrize("graphs", [True, False])
def test_shared_experts_stream_gives_the_same_prefill(model: object, graphs: bool) -> None:
    """``prefill_shared_stream``: the prompt's shared experts on a second stream beside the router, the sort and the
    routed experts (a fork and a join per MoE layer, inside the prefill graph when graphed) run the same kernels on
    the same inputs: logits and the whole K/V cache equal the in-line prefill's bit for bit, also on a second prompt
    replayed from the captured graph."""
    torch.manual_seed(1)
    base = model.base if hasattr(model, "base") else model  # type: ignore[attr-defined]
    hidden = base.config.language.hidden_size  # type: ignore[attr-defined]
    embeds = torch.randn(1, 913, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    runs = []
    with torch.inference_mode():
        for side in (False, True):
            fast = apply_fast_path(base, FastConfig(prefill_graphs=graphs, prefill_shared_stream=side))  # type: ignore[arg-type]
            moe = [layer.mlp for layer in fast._prompt_layers[0] if hasattr(layer.mlp, "shared_stream")]
            assert moe and all((m.shared_stream is not None) == side for m in moe)
            cache = fast.new_cache(1, 920)
            first = fast.prefill(embeds, cache).clone()
            k, v = cache.k.clone(), cache.v.clone()
            cache.reset()
            second = fast.prefill(embeds * 0.5, cache).clone()
            assert fast._prefill_graph_error is None
            runs.append((first, second, k, v, cache.k.clone()))
    for a, b in zip(runs[0], runs[1], strict=True):
        assert torch.equal(a, b)


def test_pinned_page_upload() -> None:
    from llm_perf_opt.data.datasets import synthetic_page
    from llm_perf_opt.models.deepseek_ocr.preprocess import PreprocessConfig, preprocess_page
    from llm_perf_opt.models.deepseek_ocr.tokenizer import load_tokenizer

    cfg = DeepseekOCRConfig.from_json(CONFIG)
    ids = load_tokenizer(None, cfg).encode_prompt("<image>\nFree OCR.")
    page = preprocess_page(synthetic_page((1224, 1584), 0), PreprocessConfig.for_mode("gundam"), cfg, ids)
    pinned = page.pinned()
    assert pinned.images_crop.is_pinned() and pinned.images_ori.is_pinned() and pinned.input_ids.is_pinned()
    assert torch.equal(pinned.images_crop, page.images_crop) and pinned.n_crops == page.n_crops


@pytest.mark.parametrize(("switch", "ngram"), [("fused_pick", 0), ("fused_pick", 20), ("ngram_kernel", 20)])
def test_pick_switches_give_the_same_graphed_greedy_tokens(model: object, switch: str, ngram: int) -> None:
    """``fused_pick`` and ``ngram_kernel`` (the n-gram ban in one kernel) under graph capture at full size: the
    device greedy tokens with the switch off and on, step for step (the logits are the same kernels' in both, so
    this is exact), with the vendor's n-gram rule (random weights repeat one id, so from step ~20 the 20-gram ban
    steers the tokens)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    out = []
    with torch.inference_mode():
        ids = torch.randint(0, 129280, (1, 300), generator=gen).cuda()
        embeds = model.model.embed_tokens(ids)  # type: ignore[attr-defined]
        for on in (False, True):
            fast = apply_fast_path(model, attrs.evolve(FastConfig(), **{switch: on}))  # type: ignore[arg-type]
            assert fast.decode_kernels == "triton", fast.decode_kernels_note
            cache = fast.new_cache(batch=1, max_len=embeds.shape[1] + STEPS + 1)
            first = fast.prefill(embeds, cache).argmax(-1, keepdim=True)
            dec = fast.decoder_for(cache, ngram)
            out.append(dec.greedy(first, STEPS))
            assert getattr(dec, switch) == on and dec.graph is not None and not bool(dec.nonfinite)
    assert out[0] == out[1]


def _prompt_and_feed(seed: int, model: object) -> tuple[torch.Tensor, list[int]]:
    """A 300-token random prompt's embeddings and STEPS random tokens to feed (teacher forcing)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, 129280, (1, 300), generator=gen).cuda()
    feed = torch.randint(0, 129280, (STEPS,), generator=gen).tolist()
    return model.model.embed_tokens(ids), feed  # type: ignore[attr-defined]


def _forced_logits(fast: object, embeds: torch.Tensor, feed: list[int]) -> torch.Tensor:
    """[STEPS, V] logits of the graphed fast decode step fed ``feed`` after the prompt's prefill."""
    assert fast.decode_kernels == "triton", fast.decode_kernels_note  # type: ignore[attr-defined]
    cache = fast.new_cache(batch=1, max_len=embeds.shape[1] + STEPS + 1)  # type: ignore[attr-defined]
    fast.prefill(embeds, cache)  # type: ignore[attr-defined]
    step = fast.decode_step  # type: ignore[attr-defined]
    return torch.stack([step(torch.tensor([[t]], device="cuda"), cache).clone() for t in feed])


def _switched(switch: str, on: bool) -> FastConfig:
    """The default config with ``switch`` set; ``norm_router_f32`` acts only without the fused router."""
    return FastConfig(**{switch: on, **({"fused_router": False} if switch == "norm_router_f32" else {})})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("switch", "seed"), [("norm_router_f32", 2), ("one_launch_attention", 4), ("fused_rope", 6), ("down_norm", 8)]
)
def test_exact_switches_give_bit_identical_graphed_logits(model: object, switch: str, seed: int) -> None:
    """Switches that compute the same values another way, under graph capture at full size: every logit of a
    teacher-forced decode equals the step's without the switch, bit for bit.  ``norm_router_f32``: the router
    reads the same float32 values.  ``one_launch_attention`` (10 heads x ~20 splits racing for each counter): the
    last split's combine reads every partial; a missed partial or a counter left non-zero would change them.
    ``fused_rope``: the QKV GEMV's [4, 256] tiles sum as linear_rows' do and its epilogue is the rotary kernel's
    arithmetic, so q and the cache entries are the two launches' bit for bit.  ``down_norm`` (80 row blocks per
    token racing for its row counter): the program finishing the row last runs the norm kernel's code with the same
    warps and block, after reading every block's output."""
    with torch.inference_mode():
        embeds, feed = _prompt_and_feed(seed, model)
        rows = [
            _forced_logits(apply_fast_path(model, _switched(switch, on)), embeds, feed)  # type: ignore[arg-type]
            for on in (False, True)
        ]
    assert torch.equal(rows[0], rows[1])


def test_fused_router_under_replays_routes_like_the_four_launches(model: object) -> None:
    """``fused_router`` under graph capture at full size (64 routers x 11 layers, 16 programs per row racing for
    each counter): teacher-forced logits within bf16 rounding of the four-launch router's (its float32 logits are
    summed in another order) and the same number of picks per layer (each counted once: no replay losing its
    routing to a counter left non-zero), nearly all on the same experts (a bf16 step in a hidden state can move a
    near-tie of a later router)."""
    rows, counts = [], []
    with torch.inference_mode():
        embeds, feed = _prompt_and_feed(5, model)
        for on in (False, True):
            fast = apply_fast_path(model, FastConfig(fused_router=on))  # type: ignore[arg-type]
            fast.reset_routing_stats()
            rows.append(_forced_logits(fast, embeds, feed))
            counts.append(fast.tokens_per_expert())
    scale = float(rows[0].abs().max())
    assert float((rows[0] - rows[1]).abs().max()) <= 2e-2 * scale + 1e-2
    assert counts[0].keys() == counts[1].keys()
    for layer, off in counts[0].items():
        on = counts[1][layer]
        assert sum(on) == sum(off)  # prefill rows + STEPS steps, top-k picks each
        assert sum(abs(a - b) for a, b in zip(on, off, strict=True)) <= 0.02 * sum(off), layer


def test_dependent_launches_give_bit_identical_graphed_logits_and_tokens(model: object) -> None:
    """``pdl`` under graph capture at full size: every Triton kernel waits on the device for the one before it, so
    a teacher-forced decode's logits equal the plain launches' bit for bit, and so do the device greedy tokens
    (fused pick and the vendor's n-gram rule included).  A missing wait would read a previous kernel's outputs
    early: logits off by far more than zero."""
    rows, greedy = [], []
    with torch.inference_mode():
        embeds, feed = _prompt_and_feed(3, model)
        for pdl in (False, True):
            fast = apply_fast_path(model, FastConfig(pdl=pdl))  # type: ignore[arg-type]
            rows.append(_forced_logits(fast, embeds, feed))
            cache = fast.new_cache(batch=1, max_len=embeds.shape[1] + STEPS + 1)
            first = fast.prefill(embeds, cache).argmax(-1, keepdim=True)
            dec = fast.decoder_for(cache, 20)
            greedy.append(dec.greedy(first, STEPS))
            assert dec.graph is not None and not bool(dec.nonfinite)
    assert torch.equal(rows[0], rows[1])
    assert greedy[0] == greedy[1]


def test_default_switches_all_apply_on_this_gpu(model: object) -> None:
    """The default fast path on this GPU (sm_90+: the suite's H200) runs what it is configured to: the Triton
    decode kernels and dependent launches, so the report has no fallback note."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("dependent launches need sm_90+")
    fast = apply_fast_path(model, FastConfig())  # type: ignore[arg-type]
    assert fast.fast_config.pdl and fast.decode_kernels == "triton"
    assert fast.vision.clip_attention == "triton"
    assert fast.fallbacks() == {} and fast.pdl_note is None
