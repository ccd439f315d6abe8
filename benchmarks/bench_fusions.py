"""Candidate fusions for the prefill's unfused elementwise work, each against the torch path (H200 decisions).

    PYTHONPATH=src python benchmarks/bench_fusions.py --out /tmp/res

Round 11's profiles (``benchmarks/results/2026-12-03-h200-r11/``) put ~0.8 ms of SAM's 9.1 ms in GELU passes over
the MLP's 3072-wide hidden rows, and ~3.5 ms of the LM prefill's 6.4 ms outside its GEMMs (sorting, gathers,
conversions, elementwise).  Per candidate this prints ms (CUDA events, median of 20 after 3 warm-ups) and the
max |Δ| against the eager float32 math:

* SAM's MLP up projection + GELU at the Gundam view batches: ``F.gelu(F.linear(...))`` (exact GELU, what the
  compiled block runs with ``sam_gelu_epilogue`` off: an nvjet GEMM and an inductor GELU pass) vs
  ``torch._addmm_activation(use_gelu=True)`` (cuBLASLt's GELU epilogue, the tanh approximation: the default) eager;
* the MoE routing sort at the prompt's (token, slot) count: int64 keys vs uint8 keys;
* one MoE layer of the LM at 913 prompt tokens (router, routing, grouped experts, shared experts): the torch path
  eager vs ``torch.compile`` (inductor, static shapes);
* the LM prefill's causal attention per SDPA backend and ``prompt_attention``'s kernel per launch setting, and its
  rotary embedding (the torch path) eager vs compiled;
* ``prompt_experts``: one MoE layer's routed experts at 913 tokens under random routing through ``prompt_moe``
  (``infer.fast.prefill_experts=triton``) vs the torch path, whole and by piece, per launch setting;
* ``clip_attention``: one CLIP layer's attention over a Gundam page's views, SDPA per view vs
  ``clip_attention.views_attention`` per launch setting (``infer.fast.clip_attention``).

The prompt kernels and the attention are timed from CUDA graphs (``graph_ms``), as the prefill runs them: timed as
Python calls, a slow host's launch cost hides the GPU time (round 12's 0.502 ms per expert layer under random
routing was such a figure; from a graph the same torch path takes 0.219 ms on an H200).

Weights are seeded random of the real shapes (bf16).  Without CUDA the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmath next to this script
from bench_kernels import graph_ms  # noqa: E402
from benchmath import cuda_ms  # noqa: E402

from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig  # noqa: E402
from llm_perf_opt.models.deepseek_ocr.decoder import MoE  # noqa: E402
from llm_perf_opt.models.deepseek_ocr.fast_layers import GroupedMoE  # noqa: E402

CONFIG = ROOT / "src/llm_perf_opt/models/deepseek_ocr/configs/deepseek-ocr.json"
PROMPT = 913  # the Gundam 1224x1584 page's prompt (bench_fast)


def gelu_rows(dev: torch.device, width: int, hidden: int) -> list[dict[str, Any]]:
    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)
    w = (torch.randn(hidden, width, device=dev, generator=gen) * width**-0.5).bfloat16()
    b = (torch.randn(hidden, device=dev, generator=gen) * 0.1).bfloat16()
    for view, tokens in (("tiles 640 x6", 6 * 40 * 40), ("global 1024", 64 * 64)):
        x = torch.randn(tokens, width, device=dev, generator=gen).bfloat16()
        ref = F.gelu(F.linear(x.float(), w.float(), b.float()))
        compiled = torch.compile(lambda x: F.gelu(F.linear(x, w, b)), dynamic=False)
        variants = {
            "linear + exact GELU (compiled, as in the block with the epilogue off)": functools.partial(compiled, x),
            "linear + exact GELU (eager)": lambda x=x: F.gelu(F.linear(x, w, b)),
            "cuBLASLt GELU epilogue (_addmm_activation, tanh GELU)": lambda x=x: torch._addmm_activation(
                b, x, w.t(), use_gelu=True
            ),
            "linear alone (no GELU)": lambda x=x: F.linear(x, w, b),
        }
        for name, fn in variants.items():
            out = fn()
            rows.append(
                dict(
                    part=f"SAM MLP up + GELU, {view} ({tokens} tokens)",
                    variant=name,
                    ms=cuda_ms(fn, warmup=3, reps=20),
                    max_abs_diff=float((out.float() - ref).abs().max()) if name != "linear alone (no GELU)" else None,
                )
            )
    return rows


def sort_rows(dev: torch.device, n_experts: int, top_k: int) -> list[dict[str, Any]]:
    gen = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, n_experts, (PROMPT * top_k,), device=dev, generator=gen)
    ref = torch.sort(ids, stable=True)[1]
    rows = []
    for name, dtype in (("int64 keys", torch.int64), ("int32 keys", torch.int32), ("uint8 keys", torch.uint8)):
        keys = ids.to(dtype)
        same = bool(torch.equal(torch.sort(keys, stable=True)[1], ref))
        ms = cuda_ms(lambda keys=keys: torch.sort(keys, stable=True), warmup=3, reps=20)
        rows.append(dict(part=f"routing sort, {ids.numel()} (token, slot) pairs", variant=name, ms=ms, same_order=same))
    return rows


def moe_rows(dev: torch.device, cfg: DeepseekOCRConfig) -> list[dict[str, Any]]:
    lang = cfg.language
    torch.manual_seed(2)
    moe = MoE(lang).to(dev, torch.bfloat16).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)
    fast = GroupedMoE(moe, grouped=True, expert_impl="grouped", fused=True)
    x = (torch.randn(PROMPT, lang.hidden_size, device=dev) * 0.5).bfloat16()
    rows = []
    with torch.inference_mode():
        ref = moe(x).float()
        compiled = torch.compile(fast, dynamic=False)
        for name, fn in (("eager (the torch path)", fast), ("torch.compile (inductor)", compiled)):
            out = fn(x)
            ms = cuda_ms(functools.partial(fn, x), warmup=3, reps=20)
            rows.append(
                dict(
                    part=f"one MoE layer at {PROMPT} tokens",
                    variant=name,
                    ms=ms,
                    max_abs_diff=float((out.float() - ref).abs().max()),
                    ref_max_abs=float(ref.abs().max()),
                )
            )
    return rows


# (block_m, block_n, block_k, num_stages, num_warps) of kernels.moe_experts_grouped at the prompt's 913 tokens (~86
# rows per routed expert): its decode defaults (16-row blocks) first, then wider row blocks for tensor cores
PREFILL_GROUPED_VARIANTS = [
    (16, 64, 128, None, 4),
    (32, 64, 128, None, 4),
    (64, 64, 64, 3, 4),
    (64, 64, 128, 3, 4),
    (64, 128, 64, 3, 4),
    (64, 128, 64, 4, 8),
    (128, 64, 64, 3, 8),
    (128, 128, 64, 3, 8),
]


def random_routed_case(dev: torch.device, cfg: DeepseekOCRConfig) -> tuple[Any, ...]:
    """One MoE layer's routed experts at the prompt's 913 tokens, seeded: (E, k, the generator for further draws,
    w13 [E, 2I, H], w2 [E, H, I], x [T, H] bf16, random top-k ids [T, k], softmax weights [T, k] float32)."""
    lang = cfg.language
    e, hidden, inter, k = lang.n_routed_experts, lang.hidden_size, lang.moe_intermediate_size, lang.num_experts_per_tok
    gen = torch.Generator(device=dev).manual_seed(5)
    w13 = (torch.randn(e, 2 * inter, hidden, device=dev, generator=gen) * hidden**-0.5).bfloat16()
    w2 = (torch.randn(e, hidden, inter, device=dev, generator=gen) * inter**-0.5).bfloat16()
    x = torch.randn(PROMPT, hidden, device=dev, generator=gen).bfloat16()
    idx = torch.stack([torch.randperm(e, device=dev, generator=gen)[:k] for _ in range(PROMPT)])
    wts = torch.softmax(torch.randn(PROMPT, k, device=dev, generator=gen), -1)
    return e, k, gen, w13, w2, x, idx, wts


def grouped_prefill_rows(dev: torch.device, cfg: DeepseekOCRConfig) -> list[dict[str, Any]]:
    """The routed experts of one MoE layer at the prompt's 913 tokens (top-6 of 64, random routing): the prefill's
    torch path (sort, ``torch._grouped_mm`` x2 with the SwiGLU kernel between, torch un-permute and weighted sum)
    vs the Triton grouped-GEMM kernels of the batched decode step (``kernels.moe_experts_grouped``, routed slots
    only), per block size; max |Δ| against ``kernels.moe_experts_ref``."""
    from llm_perf_opt.models.deepseek_ocr import kernels as K
    from llm_perf_opt.models.deepseek_ocr.experts import grouped_experts_stacked

    e, k, _gen, w13, w2, x, idx, wts = random_routed_case(dev, cfg)
    ref = K.moe_experts_ref(x, idx, wts, w13, w2).float()
    part = f"routed experts of one MoE layer at {PROMPT} tokens (random top-{k} of {e})"
    rows = []

    def torch_path() -> torch.Tensor:
        return grouped_experts_stacked(x, idx, wts, w13, w2, use_gmm=True, swiglu=K.silu_mul)

    out = torch_path()
    rows.append(
        dict(
            part=part,
            variant="torch._grouped_mm x2 + SwiGLU kernel (the prefill's path)",
            ms=cuda_ms(torch_path, warmup=3, reps=20),
            max_abs_diff=float((out.float() - ref).abs().max()),
        )
    )
    for bm, bn, bk, stages, warps in PREFILL_GROUPED_VARIANTS:
        blocks = dict(block_m=bm, block_n_up=bn, block_k_up=bk, block_n_down=bn, block_k_down=bk)
        fn = functools.partial(K.moe_experts_grouped, x, idx, wts, w13, w2, 0, None, **blocks)
        name = f"moe_experts_grouped block_m={bm} block_n={bn} block_k={bk} stages={stages or 'default'} warps={warps}"
        try:
            fn = functools.partial(fn, num_stages=stages, num_warps=warps)
            out = fn()
            rows.append(
                dict(
                    part=part,
                    variant=name,
                    ms=cuda_ms(fn, warmup=3, reps=20),
                    max_abs_diff=float((out.float() - ref).abs().max()),
                )
            )
        except Exception as exc:  # a variant that does not fit (shared memory) is reported, not fatal
            rows.append(dict(part=part, variant=f"{name}: {type(exc).__name__}"[:200], ms=float("nan")))
    return rows


# (block_m, block_n, block_k, num_warps, num_stages) of prompt_moe's grouped GEMMs swept at the prompt's 913 tokens
PROMPT_UP_VARIANTS = [
    (64, 128, 64, 8, 3),
    (128, 64, 64, 8, 4),
    (128, 128, 64, 8, 3),
    (64, 128, 64, 8, 4),
    (64, 256, 64, 8, 3),
    (64, 64, 64, 4, 5),
    (128, 64, 64, 4, 4),
    (128, 128, 64, 8, 4),
    (128, 128, 32, 8, 6),
    (128, 128, 32, 8, 8),
    (128, 256, 32, 8, 4),
]
PROMPT_DOWN_VARIANTS = [
    (64, 128, 64, 4, 4),
    (64, 256, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (64, 128, 64, 8, 4),
    (128, 128, 64, 8, 4),
    (128, 128, 32, 8, 6),
    (128, 256, 64, 8, 3),
    (64, 128, 64, 4, 3),
]


def prompt_expert_rows(dev: torch.device, cfg: DeepseekOCRConfig) -> list[dict[str, Any]]:
    """The routed experts of one MoE layer at the prompt's 913 tokens (top-6 of 64, random routing: a real page's
    spread) through ``prompt_moe`` (``infer.fast.prefill_experts=triton``) vs the torch path, whole and by piece:
    the sort (align vs radix sort + searchsorted + inverse scatter), the up GEMM + SwiGLU and the down GEMM per
    launch setting; max |Δ| against the torch path (the GEMMs) or bit-equality (the sort).  Timed from CUDA graphs
    (:func:`graph_ms`), as the prefill runs: a Python launch costs more than some of these kernels."""
    from llm_perf_opt.models.deepseek_ocr import kernels as K
    from llm_perf_opt.models.deepseek_ocr import prompt_moe as PM
    from llm_perf_opt.models.deepseek_ocr.experts import grouped_experts_stacked

    e, k, gen, w13, w2, x, idx, wts = random_routed_case(dev, cfg)
    shared = torch.randn(PROMPT, x.shape[1], device=dev, generator=gen).bfloat16()
    part = f"routed experts at {PROMPT} tokens (random top-{k} of {e})"
    rows: list[dict[str, Any]] = []

    def torch_path() -> torch.Tensor:
        return grouped_experts_stacked(
            x,
            idx,
            wts,
            w13,
            w2,
            use_gmm=True,
            swiglu=K.silu_mul,
            combine=lambda y, inv: K.moe_gather_combine(y, inv, wts, shared),
        )

    def triton_path() -> torch.Tensor:
        al = PM.align(idx, e)
        act = PM.grouped_swiglu(x, al.order, al.offs, w13, k)
        return K.moe_gather_combine(PM.grouped_down(act, al.offs, w2), al.inverse, wts, shared)

    ref = torch_path()
    for name, fn in (("whole: torch path (prefill today)", torch_path), ("whole: prompt_moe (triton)", triton_path)):
        out = fn()
        rows.append(
            dict(
                part=part,
                variant=name,
                ms=graph_ms(fn),
                max_abs_diff=float((out.float() - ref.float()).abs().max()),
            )
        )

    def torch_sort() -> Any:
        sorted_ids, order = torch.sort(idx.reshape(-1).to(torch.uint8), stable=True)
        offs = torch.searchsorted(
            sorted_ids, torch.arange(e, device=dev, dtype=torch.uint8), right=True, out_int32=True
        )
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=dev))
        return order, offs, inverse

    al_ref = PM.align_ref(idx, e)
    al = PM.align(idx, e)
    same = bool(
        torch.equal(al.order, al_ref.order)
        and torch.equal(al.inverse, al_ref.inverse)
        and torch.equal(al.offs, al_ref.offs)
    )
    rows.append(
        dict(
            part=part,
            variant="sort: uint8 radix sort + searchsorted + inverse scatter (torch)",
            ms=graph_ms(torch_sort),
        )
    )
    rows.append(
        dict(
            part=part,
            variant="sort: prompt_moe.align (2 launches)",
            ms=graph_ms(lambda: PM.align(idx, e)),
            same_as_torch_sort=same,
        )
    )

    rows_sorted = x.index_select(0, al.order.long() // k)
    offs64 = al.offs[1:].contiguous()
    h = torch._grouped_mm(rows_sorted, w13.transpose(1, 2), offs=offs64)
    act_ref = K.silu_mul(h)
    rows.append(
        dict(
            part=part,
            variant="up: gather + torch._grouped_mm + silu_mul (torch)",
            ms=graph_ms(
                lambda: K.silu_mul(
                    torch._grouped_mm(x.index_select(0, al.order.long() // k), w13.transpose(1, 2), offs=offs64)
                )
            ),
        )
    )
    used = int((al.offs[1:] > al.offs[:-1]).sum())  # experts with rows: the weights each GEMM must read
    up_bytes, down_bytes = used * w13[0].numel() * w13.element_size(), used * w2[0].numel() * w2.element_size()
    for blocks in PROMPT_UP_VARIANTS:
        b = PM.GemmBlocks(*blocks)
        try:
            fn = functools.partial(PM.grouped_swiglu, x, al.order, al.offs, w13, k, b)
            out = fn()
            ms = graph_ms(fn)
            rows.append(
                dict(
                    part=part,
                    variant=f"up: grouped_swiglu {b}",
                    ms=ms,
                    weights_tb_s=up_bytes / ms / 1e9,
                    max_abs_diff=float((out.float() - act_ref.float()).abs().max()),
                )
            )
        except Exception as exc:  # a variant that does not fit (shared memory) is reported, not fatal
            rows.append(dict(part=part, variant=f"up: grouped_swiglu {b}: {type(exc).__name__}"[:200], ms=float("nan")))
    y_ref = torch._grouped_mm(act_ref, w2.transpose(1, 2), offs=offs64)
    rows.append(
        dict(
            part=part,
            variant="down: torch._grouped_mm (torch)",
            ms=graph_ms(lambda: torch._grouped_mm(act_ref, w2.transpose(1, 2), offs=offs64)),
        )
    )
    for blocks in PROMPT_DOWN_VARIANTS:
        b = PM.GemmBlocks(*blocks)
        try:
            fn = functools.partial(PM.grouped_down, act_ref, al.offs, w2, b)
            out = fn()
            ms = graph_ms(fn)
            rows.append(
                dict(
                    part=part,
                    variant=f"down: grouped_down {b}",
                    ms=ms,
                    weights_tb_s=down_bytes / ms / 1e9,
                    max_abs_diff=float((out.float() - y_ref.float()).abs().max()),
                )
            )
        except Exception as exc:
            rows.append(dict(part=part, variant=f"down: grouped_down {b}: {type(exc).__name__}"[:200], ms=float("nan")))
    return rows


def attention_rows(dev: torch.device, cfg: DeepseekOCRConfig) -> list[dict[str, Any]]:
    """The LM prefill's causal attention at the prompt (q, and k/v as the static cache's strided views), per SDPA
    backend: flash is what the model's policy picks today (its split-KV form at one prompt's 10 heads)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lang = cfg.language
    heads, dim = lang.num_attention_heads, lang.hidden_size // lang.num_attention_heads
    gen = torch.Generator(device=dev).manual_seed(3)
    q = torch.randn(1, PROMPT, heads, dim, device=dev, generator=gen).bfloat16().transpose(1, 2)
    cache = torch.randn(2, 1, heads, 8192, dim, device=dev, generator=gen).bfloat16()
    k, v = cache[0][:, :, :PROMPT], cache[1][:, :, :PROMPT]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    rows = []
    for name, backend in (
        ("flash (today)", SDPBackend.FLASH_ATTENTION),
        ("cuDNN", SDPBackend.CUDNN_ATTENTION),
        ("memory-efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        fn = functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)
        try:
            with sdpa_kernel([backend]):
                out = fn()
                ms = graph_ms(fn)
        except RuntimeError as exc:
            rows.append(dict(part="LM prefill attention", variant=name, ms=float("nan"), error=str(exc)[:120]))
            continue
        rows.append(
            dict(
                part=f"LM prefill attention, {PROMPT} tokens x {heads} heads x {dim}",
                variant=name,
                ms=ms,
                max_abs_diff=float((out.float() - ref).abs().max()),
            )
        )
    from llm_perf_opt.models.deepseek_ocr import prompt_attention as PA

    q_rows = q.transpose(1, 2)  # [1, L, heads, D]: what the rotary kernel hands over
    variants = [(blocks, 0) for blocks in PROMPT_ATTENTION_VARIANTS]
    variants += [(blocks, steps) for blocks, steps in PROMPT_ATTENTION_SPLITS]
    for blocks, steps in variants:
        name = f"prompt_attention (triton) blocks (m, n, warps, stages)={blocks}"
        if steps:  # the split form: a query block's keys in chunks of ~steps key blocks, merged by the last chunk
            name += f", split_steps={steps}"
        try:
            counters = PA.split_counters(1, heads, PROMPT, dev, blocks[0]) if steps else None
            fn = functools.partial(
                PA.prompt_attention, q_rows, cache[0], cache[1], 0, blocks, split_steps=steps, counters=counters
            )
            out = fn().transpose(1, 2)
            rows.append(
                dict(
                    part=f"LM prefill attention, {PROMPT} tokens x {heads} heads x {dim}",
                    variant=name,
                    ms=graph_ms(fn),
                    max_abs_diff=float((out.float() - ref).abs().max()),
                )
            )
        except Exception as exc:  # a variant that does not fit (shared memory) is reported, not fatal
            rows.append(
                dict(part="LM prefill attention", variant=f"{name}: {type(exc).__name__}"[:200], ms=float("nan"))
            )
    return rows


# (block_m, block_n, num_warps, num_stages) of prompt_attention swept at the prompt
PROMPT_ATTENTION_VARIANTS = [
    (64, 64, 4, 3),
    (128, 32, 8, 3),
    (32, 64, 4, 3),
    (64, 32, 4, 3),
    (128, 64, 8, 3),
]


# the split form (prompt_attention(split_steps=...)): (block_m, block_n, num_warps, num_stages), key steps per chunk
PROMPT_ATTENTION_SPLITS = [
    ((64, 64, 4, 3), 2),
    ((64, 64, 4, 3), 3),
    ((64, 64, 4, 3), 4),
    ((64, 64, 4, 3), 6),
    ((64, 64, 4, 3), 8),
    ((64, 64, 4, 2), 4),
    ((64, 64, 8, 3), 4),
    ((64, 128, 4, 2), 2),
    ((64, 128, 8, 2), 3),
    ((32, 64, 4, 3), 4),
]


# (block_m, block_n, num_warps, num_stages) of clip_attention.views_attention swept at a Gundam page's views
CLIP_ATTENTION_VARIANTS = [
    (64, 64, 4, 3),
    (32, 64, 4, 3),
    (64, 128, 4, 3),
    (128, 64, 8, 3),
    (32, 32, 2, 3),
    (64, 64, 4, 2),
]


def clip_attention_rows(dev: torch.device, cfg: DeepseekOCRConfig) -> list[dict[str, Any]]:
    """One CLIP layer's attention over a Gundam page's views (six 101-token crops, the 257-token global view; CLIP-L's
    16 heads of 64) from the QKV GEMM's rows: SDPA per view (with its layout copies: the "sdpa" choice) vs
    ``clip_attention.views_attention`` per launch setting, each against the float32 SDPA; from CUDA graphs."""
    from llm_perf_opt.models.deepseek_ocr import clip_attention as CA

    views = ((6, 101), (1, 257))
    heads = cfg.clip.num_attention_heads
    rows_n = sum(n * s for n, s in views)
    gen = torch.Generator(device=dev).manual_seed(5)
    qkv = torch.randn(rows_n, 3 * cfg.clip.hidden_size, device=dev, generator=gen).bfloat16()
    ref = CA.views_attention_ref(qkv.float(), views, heads)
    part = f"CLIP attention, views {views} x {heads} heads"
    rows = []
    candidates = [("SDPA per view (sdpa)", functools.partial(CA.views_attention_ref, qkv, views, heads))]
    for blocks in CLIP_ATTENTION_VARIANTS:
        name = f"views_attention (triton) blocks (m, n, warps, stages)={blocks}"
        candidates.append((name, functools.partial(CA.views_attention, qkv, views, heads, blocks)))
    for name, fn in candidates:
        try:
            out = fn()
            diff = float((out.float() - ref).abs().max())
            rows.append(dict(part=part, variant=name, ms=graph_ms(fn), max_abs_diff=diff))
        except Exception as exc:  # a variant that does not fit (shared memory) is reported, not fatal
            rows.append(dict(part=part, variant=f"{name}: {type(exc).__name__}"[:200], ms=float("nan")))
    return rows


def rotary_rows(dev: torch.device, cfg: DeepseekOCRConfig) -> list[dict[str, Any]]:
    """The prefill's rotary embedding of q and k (``fast_layers.FusedAttention.project``): eager (a roll, two
    products, a sum) vs the same expression compiled (one fused kernel)."""
    lang = cfg.language
    heads, dim = lang.num_attention_heads, lang.hidden_size // lang.num_attention_heads
    gen = torch.Generator(device=dev).manual_seed(4)
    qk = torch.randn(1, PROMPT, 2 * heads, dim, device=dev, generator=gen).bfloat16()
    cos = torch.randn(1, PROMPT, 1, dim, device=dev, generator=gen).bfloat16()
    sin = torch.randn(1, PROMPT, 1, dim, device=dev, generator=gen).bfloat16()

    def rotate(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return qk * cos + qk.roll(dim // 2, dims=-1) * sin

    ref = rotate(qk.float(), cos.float(), sin.float())
    rows = []
    for name, fn in (("eager (the torch path)", rotate), ("torch.compile", torch.compile(rotate, dynamic=True))):
        out = fn(qk, cos, sin)
        rows.append(
            dict(
                part=f"LM prefill rotary of q and k, {PROMPT} tokens",
                variant=name,
                ms=cuda_ms(functools.partial(fn, qk, cos, sin), warmup=3, reps=20),
                max_abs_diff=float((out.float() - ref).abs().max()),
            )
        )
    return rows


PARTS = ("gelu", "sort", "moe", "grouped", "prompt_experts", "attention", "rotary", "clip_attention")


def render(rows: list[dict[str, Any]], env: dict[str, str]) -> str:
    lines = [
        f"# Prefill fusion candidates — {env['gpu']}",
        "",
        f"{env['date']}; torch {env['torch']}; bf16, seeded random weights of the real shapes; CUDA events, median of"
        " 20 after 3 warm-ups.",
        "",
        "| part | variant | ms | note |",
        "| --- | --- | ---: | --- |",
    ]
    for r in rows:
        note = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in r.items()
            if k not in {"part", "variant", "ms"} and v is not None
        )
        lines.append(f"| {r['part']} | {r['variant']} | {r['ms']:.3f} | {note} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for fusions.md / .json")
    ap.add_argument("--parts", default="", help="comma-separated candidates to time (default: all)")
    args = ap.parse_args()
    chosen = args.parts.split(",") if args.parts else list(PARTS)
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        ap.error(f"unknown --parts {unknown}; choose from {', '.join(PARTS)}")
    if not torch.cuda.is_available():
        print("bench_fusions: no CUDA device; nothing timed")
        return
    dev = torch.device("cuda:0")
    cfg = DeepseekOCRConfig.from_json(CONFIG)
    env = dict(
        gpu=torch.cuda.get_device_name(dev),
        torch=torch.__version__,
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    rows: list[dict[str, Any]] = []
    parts = {
        "gelu": lambda: gelu_rows(dev, cfg.sam.embed_dim, int(cfg.sam.embed_dim * cfg.sam.mlp_ratio)),
        "sort": lambda: sort_rows(dev, cfg.language.n_routed_experts, cfg.language.num_experts_per_tok),
        "moe": lambda: moe_rows(dev, cfg),
        "grouped": lambda: grouped_prefill_rows(dev, cfg),
        "prompt_experts": lambda: prompt_expert_rows(dev, cfg),
        "attention": lambda: attention_rows(dev, cfg),
        "rotary": lambda: rotary_rows(dev, cfg),
        "clip_attention": lambda: clip_attention_rows(dev, cfg),
    }
    for part in (parts[name] for name in chosen):
        try:
            with torch.no_grad():
                rows += part()
        except Exception as exc:  # one failing candidate must not lose the others
            rows.append(dict(part="failed", variant=f"{type(exc).__name__}: {exc}"[:300], ms=float("nan")))
    text = render(rows, env)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fusions.md").write_text(text)
        (args.out / "fusions.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))


if __name__ == "__main__":
    main()
