"""Triton decode kernels (models/deepseek_ocr/kernels.py) vs the torch ops they replace, on one GPU.

Real DeepSeek-OCR sizes from the shipped config (H=1280, 10 heads x 128, 64 experts of I=896, top-6,
2 shared experts), bf16.  Each variant is captured as N back-to-back calls in one CUDA graph, replayed,
and timed with CUDA events: per-call µs = replay time / N, so launch overhead is excluded exactly as in
the graphed decode step.  The N calls cycle through ``--layers`` copies of the weights / KV caches (12,
like the model), so nothing stays L2-resident from one call to the next, as in a real decode step.

    PYTHONPATH=src python benchmarks/bench_kernels.py --out benchmarks/results
    PYTHONPATH=src python benchmarks/bench_kernels.py --sweep          # also try block sizes for moe / attention
    PYTHONPATH=src python benchmarks/bench_kernels.py --sm90-check     # no GPU needed: compile for sm_90
    PYTHONPATH=src python benchmarks/bench_kernels.py --only-grouped   # batched-decode rows and step only

Per op: torch µs, Triton µs, speedup, bytes moved (the memory-bound ops: attention's K/V up to pos,
the experts' weights of the distinct slots used, the router's float32 gate), achieved GB/s and % of the
datasheet bandwidth (``profiling/peaks.py``), TFLOP/s for the expert kernels, and the max |Δ| of the Triton
output vs the op's ``*_ref``.  The grouped-GEMM expert kernels run at ``--grouped-tokens`` rows (9,16,32,64;
the GEMV kernels next to them up to 16), then the full-size model's batched decode step (``--batched-step``
batch sizes: torch kernels, Triton with the torch attention, Triton) with a per-kernel profile.
``--sm90-check`` compiles every kernel for an H100 without a GPU (frontend + ptxas from the Triton wheel) and
prints registers, spills and whether the weight/KV tiles use 16-byte loads;
``tests/unit/models/deepseek_ocr/test_kernels.py`` runs it.  Without CUDA (and without ``--sm90-check``) the
script says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmath next to this script, also under `python -m`
from benchmath import module_setting

from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig, LanguageConfig
from llm_perf_opt.models.deepseek_ocr.decoder import RMSNorm, RotaryEmbedding, grouped_experts_stacked, use_grouped_mm
from llm_perf_opt.models.deepseek_ocr.graphs import first_argmax
from llm_perf_opt.models.deepseek_ocr.kernels import (
    DOWN_SPLIT_STAGES,
    GROUPED_MIN_ROWS,
    KEYS_PER_SPLIT,
    NGRAM_BLOCK_S,
    NGRAM_BLOCK_V,
    PICK_BLOCK,
    UP_STAGES,
    add_rms_norm,
    add_rms_norm_f32,
    add_rms_norm_ref,
    add_rms_norm_route,
    add_rms_norm_route_ref,
    attention_counters,
    attention_splits,
    decode_attention,
    decode_attention_ref,
    dependent_launches,
    down_counters,
    exact_bf16,
    linear_block_sizes,
    linear_rows,
    moe_block_sizes,
    moe_down_split_block_sizes,
    moe_experts,
    moe_experts_grouped,
    moe_experts_ref,
    moe_grouped_block_sizes,
    moe_route,
    moe_route_ref,
    moe_route_rows,
    pick_token,
    qkv_rope,
    rope_kv_write,
    rope_kv_write_ref,
    route_flags,
)

CONFIG = Path(__file__).resolve().parents[1] / "src/llm_perf_opt/models/deepseek_ocr/configs/deepseek-ocr.json"
H100_SMS = 132  # SMs of an H100 SXM (NVIDIA H100 datasheet): the launch shapes --sm90-check compiles
# Shared memory one block may have on compute capability 9.0 (H100, H200), opt-in: 227 KB (CUDA C++ Programming
# Guide, "Technical Specifications per Compute Capability"), the limit Triton checks at launch (round 22's GPU suite:
# "Required: 260096, Hardware limit: 232448").  --sm90-check compares every kernel's compiled need against it, so a
# launch setting that cannot fit fails on the CPU, not first on a GPU (rounds 21 and 22 each found one there).
SM90_MAX_SHARED = 232_448


@attrs.frozen
class Row:
    """One op at one token count: median per-call times in µs, bytes it must move, max |Δ| vs its ref."""

    op: str
    tokens: int
    torch_us: float
    triton_us: float
    bytes_moved: int
    max_abs_err: float
    note: str = ""
    flops: int = 0  # useful FLOPs of the op (the expert GEMMs: 2 per multiply-add); 0 where not counted

    @property
    def speedup(self) -> float:
        return self.torch_us / self.triton_us

    def gbps(self, us: float) -> float:
        return self.bytes_moved / (us * 1e-6) / 1e9

    def tflops(self, us: float) -> float:
        return self.flops / (us * 1e-6) / 1e12


def graph_us(fns: list[Callable[[], Any]], calls: int, reps: int) -> float:
    """Median µs per call of ``calls`` back-to-back calls (cycling through ``fns``) replayed from one graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture: Triton compiles, cuBLAS picks kernels
        for fn in fns[:2]:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def graph_ms(fn: Callable[[], Any]) -> float:
    """Milliseconds per call of ``fn`` replayed from a CUDA graph of 10 back-to-back calls (median of 10 replays):
    the GPU's time, without the Python launch cost a graphed prefill or vision pass does not pay either (a
    Python-timed loop of sub-0.3 ms kernels measures the host's launches: round 13)."""
    return graph_us([fn], calls=10, reps=10) / 1e3


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


class Bench:
    """Inputs at the real sizes, ``layers`` copies of everything large, and the timing loop."""

    def __init__(self, lang: LanguageConfig, args: argparse.Namespace, device: torch.device) -> None:
        self.lang, self.args = lang, args
        self.dev, self.dtype = device, torch.bfloat16
        self.gen = torch.Generator(device=self.dev).manual_seed(0)
        self.layers = args.layers
        self.pos = torch.tensor([args.pos], device=self.dev)
        self._moe_layers: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        self.use_gmm = True

    def randn(self, *shape: int, std: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        out = torch.randn(shape, generator=self.gen, device=self.dev, dtype=torch.float32) * std
        return out.to(dtype or self.dtype)

    def time(self, torch_fns: list[Callable[[], Any]], triton_fns: list[Callable[[], Any]]) -> tuple[float, float]:
        a = self.args
        return graph_us(torch_fns, a.calls, a.reps), graph_us(triton_fns, a.calls, a.reps)

    # ------------------------------------------------------------------ ops
    def norm(self, tokens: int) -> Row:
        hid = self.lang.hidden_size
        xs = [(self.randn(tokens, hid), self.randn(tokens, hid)) for _ in range(self.layers)]
        norm = RMSNorm(hid, self.lang.rms_norm_eps).to(self.dev, self.dtype)
        eps = self.lang.rms_norm_eps

        def torch_fn(x: torch.Tensor, r: torch.Tensor) -> Callable[[], Any]:
            return lambda: norm(x + r)

        t_us, k_us = self.time(
            [torch_fn(x, r) for x, r in xs],
            [lambda x=x, r=r: add_rms_norm(x, r, norm.weight, eps) for x, r in xs],
        )
        x, r = xs[0]
        err = max_err(add_rms_norm(x, r, norm.weight, eps)[0], add_rms_norm_ref(x, r, norm.weight, eps)[0])
        return Row("add_rms_norm", tokens, t_us, k_us, 4 * tokens * hid * 2 + hid * 2, err)

    def rope(self, tokens: int) -> Row:
        lang = self.lang
        hq, hk, d = lang.num_attention_heads, lang.num_key_value_heads, lang.head_dim
        cos, sin = self.randn(self.args.max_len, d), self.randn(self.args.max_len, d)
        cache_shape = (tokens, hk, self.args.max_len, d)
        bufs = [
            (self.randn(tokens, (hq + 2 * hk) * d), self.randn(*cache_shape), self.randn(*cache_shape))
            for _ in range(self.layers)
        ]
        shape = (hq, hk, d)
        t_us, k_us = self.time(
            [lambda b=b: rope_kv_write_ref(b[0], cos, sin, self.pos, b[1], b[2], *shape) for b in bufs],
            [lambda b=b: rope_kv_write(b[0], cos, sin, self.pos, b[1], b[2], *shape) for b in bufs],
        )
        qkv, k_cache, v_cache = bufs[0]
        k2, v2 = k_cache.clone(), v_cache.clone()
        q = rope_kv_write(qkv, cos, sin, self.pos, k_cache, v_cache, *shape)
        err = max(
            max_err(q, rope_kv_write_ref(qkv, cos, sin, self.pos, k2, v2, *shape)),
            max_err(k_cache, k2),
            max_err(v_cache, v2),
        )
        moved = tokens * d * 2 * ((hq + 2 * hk) + hq + 2 * hk) + 2 * d * 2  # qkv in; q, k, v out; cos/sin row
        return Row("rope_kv_write", tokens, t_us, k_us, moved, err)

    def attention(self, tokens: int, block_n: int | None = None, one_launch: bool = False) -> Row:
        """Decode attention vs the torch path; ``one_launch``: the form without the combine launch (counters)."""
        lang, n, pos = self.lang, self.args.max_len, self.args.pos
        hq, hk, d = lang.num_attention_heads, lang.num_key_value_heads, lang.head_dim
        scale = d**-0.5
        bufs = [
            (self.randn(tokens, hq, d), self.randn(tokens, hk, n, d), self.randn(tokens, hk, n, d))
            for _ in range(self.layers)
        ]
        key_pos = torch.arange(n, device=self.dev)
        zero = torch.zeros((), device=self.dev, dtype=self.dtype)
        neg = torch.full((), float("-inf"), device=self.dev, dtype=self.dtype)

        def torch_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            """fast.FastDecoder._forward, decode_attention="matmul": masked attention over all max_len keys."""
            bias = torch.where(key_pos <= self.pos, zero, neg)
            rep = hq // hk
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            scores = torch.matmul(q.unsqueeze(2), k.transpose(-1, -2)) * scale + bias
            out = torch.matmul(scores.float().softmax(dim=-1).to(q.dtype), v)
            return out.transpose(1, 2).reshape(q.shape[0], -1)

        counters = attention_counters(tokens * hq, self.dev) if one_launch else None

        def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return decode_attention(q, k, v, self.pos, scale, block_n=block_n, counters=counters)

        t_us, k_us = self.time([lambda b=b: torch_path(*b) for b in bufs], [lambda b=b: kernel(*b) for b in bufs])
        q, k, v = bufs[0]
        err = max_err(kernel(q, k, v), decode_attention_ref(q, k, v, self.pos, scale))
        kv_bytes = 2 * tokens * hk * (pos + 1) * d * 2
        note = f"pos {pos} of max_len {n}" + (f", block_n {block_n}" if block_n else "")
        name = "decode_attention (one launch)" if one_launch else "decode_attention"
        return Row(name, tokens, t_us, k_us, kv_bytes, err, note)

    def attention_split_rules(self) -> list[str]:
        """The split rule before / after in one run: ``attention_splits`` with the SM rule alone (``keys_per_split``
        past every length: what ran before) vs the default (also <= ``KEYS_PER_SPLIT`` keys per program), on the
        key layouts the decode paths see: batch 1; the batched step's equal rows; the continuous step's 64 slots
        at their own lengths (913-token Gundam prompts plus 0..4,087 tokens out, a 5,120-column bucket); and its
        drain (4 long rows left, 60 empty slots at column 0)."""
        lang = self.lang
        hq, hk, d = lang.num_attention_heads, lang.num_key_value_heads, lang.head_dim
        scale = d**-0.5
        cases = [
            ("batch 1, pos 1000", [1000], 1200),
            ("batch 64, every row at 411 (batched step)", [411] * 64, 539),
            ("64 slots, 913..5,000 keys (continuous)", [913 + (4087 * b) // 63 for b in range(64)], 5120),
            ("64 slots, drain: 4 rows at ~4,900, 60 empty", [4900 + b for b in range(4)] + [0] * 60, 5120),
        ]
        sms = torch.cuda.get_device_properties(self.dev).multi_processor_count
        out = [
            "| keys | splits before | µs before | GB/s before | µs, ≤ 128 keys per split |"
            f" splits now (≤ {KEYS_PER_SPLIT}) | µs now | GB/s now | µs, ≤ 512 keys per split | now vs before |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for label, positions, width in cases:
            rows = len(positions)
            pos = torch.tensor(positions, device=self.dev)
            pos_arg = pos if rows > 1 else pos[:1]
            mask = torch.zeros((rows, width), device=self.dev, dtype=self.dtype)
            copies = 2 if rows > 1 else self.layers  # a 64-row layer's K/V (~1 GB) is far past L2 already
            bufs = [
                (self.randn(rows, hq, d), self.randn(rows, hk, width, d), self.randn(rows, hk, width, d))
                for _ in range(copies)
            ]
            kv_bytes = sum(2 * hk * (p + 1) * d * 2 for p in positions)
            timed = []
            for per_split in (1 << 30, 128, KEYS_PER_SPLIT, 512):
                splits = attention_splits(rows * hq, width, 64, sms, per_split)

                fns: list[Callable[[], Any]] = [
                    functools.partial(decode_attention, *b, pos_arg, scale, n_splits=splits, key_mask=mask)
                    for b in bufs
                ]
                us = graph_us(fns, self.args.calls, self.args.reps)
                timed.append((splits, us))
            q, k, v = bufs[0]
            err = max_err(
                decode_attention(q, k, v, pos_arg, scale, key_mask=mask),
                decode_attention_ref(q, k, v, pos_arg, scale, key_mask=mask),
            )
            (s0, t0), (_, t128), (s1, t1), (_, t512) = timed
            out.append(
                f"| {label} (max err {err:.2g}) | {s0} | {t0:.1f} | {kv_bytes / t0 / 1e3:.0f} | {t128:.1f} | {s1} |"
                f" {t1:.1f} | {kv_bytes / t1 / 1e3:.0f} | {t512:.1f} | {t0 / t1:.2f}× |"
            )
            print(out[-1], flush=True)
            del bufs
            torch.cuda.empty_cache()
        return out

    def route(self, tokens: int, logits_in: bool = False) -> Row:
        """The router; with ``logits_in`` as the decode step runs it: cuBLAS float32 logits, then the kernel's
        softmax / top-k / counts."""
        lang = self.lang
        e, hid, k = lang.n_routed_experts, lang.hidden_size, lang.num_experts_per_tok
        bufs = [
            (self.randn(tokens, hid), self.randn(e, hid, std=hid**-0.5, dtype=torch.float32))
            for _ in range(self.layers)
        ]
        counts = torch.zeros(e, device=self.dev, dtype=torch.int64)

        def kernel(b: Any, counts: Any = counts) -> Any:
            logits = torch.nn.functional.linear(b[0].float(), b[1]) if logits_in else None
            return moe_route(b[0], b[1], k, counts, logits=logits)

        t_us, k_us = self.time(
            [lambda b=b: moe_route_ref(b[0], b[1], k, counts) for b in bufs],
            [lambda b=b: kernel(b) for b in bufs],
        )
        x, gate = bufs[0]
        ids, w = kernel(bufs[0], None)
        ref_ids, ref_w = moe_route_ref(x, gate, k)
        note = "cuBLAS logits + top-k kernel; " if logits_in else ""
        note += "ids identical" if torch.equal(ids, ref_ids) else "ids DIFFER"
        name = "moe_route (logits in)" if logits_in else "moe_route"
        return Row(name, tokens, t_us, k_us, e * hid * 4, max_err(w, ref_w), note)

    def norm_route(self, tokens: int, counted: bool = True, rows_per_program: int | None = None) -> Row:
        """A MoE layer's post-attention norm and router: in one launch (``add_rms_norm_route``) against what the
        step runs without it (``add_rms_norm_f32``, cuBLAS float32 logits: one kernel, or two at one row, then
        ``moe_route``'s top-k).  ``counted``: both add their picks to routing counts, as the single-page step does;
        else neither, as the batched steps (``batched_fused_router``).  ``rows_per_program``: the kernel's
        (None: its default)."""
        lang = self.lang
        e, hid, k, eps = lang.n_routed_experts, lang.hidden_size, lang.num_experts_per_tok, lang.rms_norm_eps
        bufs = [
            (
                self.randn(tokens, hid),
                self.randn(tokens, hid),
                1 + 0.1 * self.randn(hid),
                self.randn(e, hid, std=hid**-0.5, dtype=torch.float32),
            )
            for _ in range(self.layers)
        ]
        counts = torch.zeros(e, device=self.dev, dtype=torch.int64) if counted else None
        flags = route_flags(tokens, self.dev)

        def unfused(b: Any) -> Any:
            normed, _, f32 = add_rms_norm_f32(b[0], b[1], b[2], eps)
            return normed, moe_route(normed, b[3], k, counts, logits=torch.nn.functional.linear(f32, b[3]))

        def fused(b: Any) -> Any:
            return add_rms_norm_route(b[0], b[1], b[2], eps, b[3], k, flags, counts, rows_per_program=rows_per_program)

        t_us, k_us = self.time([lambda b=b: unfused(b) for b in bufs], [lambda b=b: fused(b) for b in bufs])
        b = bufs[0]
        normed, _, ids, w = fused(b)
        ref_normed, _, ref_ids, ref_w = add_rms_norm_route_ref(b[0], b[1], b[2], eps, b[3], k)
        note = "vs add_rms_norm_f32 + cuBLAS logits + moe_route; " + ("counted; " if counted else "no counts; ")
        note += "ids identical" if torch.equal(ids, ref_ids) else "ids DIFFER"
        note += f"; normed max |Δ| vs torch {max_err(normed, ref_normed):.3g}"
        nbytes = e * hid * 4 + 3 * tokens * hid * 2 + hid * 2
        name = "add_rms_norm_route" if counted else "add_rms_norm_route (no counts)"
        if rows_per_program is not None:
            name += f" ({rows_per_program} rows a program)"
        return Row(name, tokens, t_us, k_us, nbytes, max_err(w, ref_w), note)

    def route_rows(self, tokens: int, fp32: bool = False, **blocks: Any) -> Row:
        """The many-row router (``moe_route_rows``: logits + top-k in one launch) against what the prefill and the
        batched step ran before (``triton_layers.ROWS_ROUTER="cublas"``): the float32 cast, cuBLAS's float32 GEMM
        and ``moe_route``'s top-k.  The router is a bf16 checkpoint's widened to float32 (as the fast path keeps it);
        the kernel gets its bf16 values (``exact_bf16``, as the model passes them), or with ``fp32`` the float32
        operands; ``blocks`` are ``moe_route_rows``' launch settings (the sweep)."""
        lang = self.lang
        e, hid, k = lang.n_routed_experts, lang.hidden_size, lang.num_experts_per_tok
        bufs = []
        for _ in range(self.layers):
            gate32 = self.randn(e, hid, std=hid**-0.5).float()
            low = exact_bf16(gate32)
            assert low is not None  # randn rounded to bf16, widened
            bufs.append((self.randn(tokens, hid), gate32, gate32 if fp32 else low))

        def cublas(b: Any) -> Any:
            return moe_route(b[0], b[1], k, logits=torch.nn.functional.linear(b[0].float(), b[1]))

        t_us, k_us = self.time(
            [lambda b=b: cublas(b) for b in bufs], [lambda b=b: moe_route_rows(b[0], b[2], k, **blocks) for b in bufs]
        )
        x, gate, operand = bufs[0]
        ids, w = moe_route_rows(x, operand, k, **blocks)
        ref_ids, ref_w = moe_route_ref(x, gate, k)
        differ = int((ids != ref_ids).any(dim=1).sum())
        note = "vs cast + cuBLAS float32 logits + moe_route (3 launches); "
        note += "ids identical" if not differ else f"ids differ in {differ} of {tokens} rows"
        note += "; float32 operands (IEEE)" if fp32 else "; bf16 operands (tensor cores)"
        if blocks:
            note += f"; {blocks}"
        return Row("moe_route_rows", tokens, t_us, k_us, e * hid * 4 + tokens * hid * 2, max_err(w, ref_w), note)

    def pick(self, tokens: int) -> Row:
        """The token pick after the lm_head, as ``FastDecoder._pick`` runs it without the n-gram rule: the
        non-finite flag (isfinite + all + or) and ``first_argmax``, against :func:`pick_token`'s two launches."""
        vocab = self.lang.vocab_size
        bufs = [self.randn(tokens, vocab, dtype=torch.float32) for _ in range(self.layers)]
        flag = torch.zeros((), dtype=torch.bool, device=self.dev)

        def torch_fn(x: torch.Tensor) -> Any:
            flag.logical_or_(~torch.isfinite(x).all())
            return first_argmax(x)

        t_us, k_us = self.time(
            [lambda x=x: torch_fn(x) for x in bufs], [lambda x=x: pick_token(x, None, flag) for x in bufs]
        )
        ids, ref_ids = pick_token(bufs[0], None, flag), first_argmax(bufs[0])
        note = "ids identical" if torch.equal(ids, ref_ids) else "ids DIFFER"
        return Row("pick_token", tokens, t_us, k_us, tokens * vocab * 4, max_err(ids, ref_ids), note)

    def linear(self, tokens: int, n_out: int, name: str, **blocks: int) -> Row:
        """One decode projection (the fused QKV or o_proj) of ``tokens`` rows: cuBLAS's ``F.linear`` against
        :func:`linear_rows` (``blocks``: its block_n / block_k / num_warps); max |Δ| between the two (both
        float32-accumulated, summed in different orders)."""
        hid = self.lang.hidden_size
        ops = [(self.randn(tokens, hid), self.randn(n_out, hid, std=hid**-0.5)) for _ in range(self.layers)]
        t_us, k_us = self.time(
            [lambda x=x, w=w: F.linear(x, w) for x, w in ops],
            [lambda x=x, w=w: linear_rows(x, w, **blocks) for x, w in ops],
        )
        x, w = ops[0]
        bn, bk = linear_block_sizes(n_out, hid, torch.cuda.get_device_properties(self.dev).multi_processor_count)
        bn, bk = blocks.get("block_n", bn), blocks.get("block_k", bk)
        note = f"{name}; vs cuBLAS; block_n {bn}, block_k {bk}, {blocks.get('num_warps', 4)} warps"
        return Row(
            f"linear_rows ({name})",
            tokens,
            t_us,
            k_us,
            n_out * hid * 2,
            max_err(linear_rows(x, w, **blocks), F.linear(x, w)),
            note,
        )

    def qkv_rope(self, tokens: int) -> Row:
        """A layer's attention input as the step runs it: add + RMSNorm, QKV GEMV, rotary + K/V cache writes in one
        launch (``qkv_rope`` with its norm) against the three launches it replaces (``add_rms_norm``,
        ``linear_rows``, ``rope_kv_write``); outputs compared bit for bit."""
        lang = self.lang
        hid, hq, hk, d = lang.hidden_size, lang.num_attention_heads, lang.num_key_value_heads, lang.head_dim
        n_out, max_len, eps = (hq + 2 * hk) * d, self.args.max_len, lang.rms_norm_eps
        cos, sin = RotaryEmbedding(d, 10000.0, max_len)(0, max_len, self.dev, self.dtype)
        ops = [
            (
                self.randn(tokens, hid),
                self.randn(tokens, hid),
                1 + 0.1 * self.randn(hid),
                self.randn(n_out, hid, std=hid**-0.5),
                torch.zeros(tokens, hk, max_len, d, device=self.dev, dtype=self.dtype),
                torch.zeros(tokens, hk, max_len, d, device=self.dev, dtype=self.dtype),
            )
            for _ in range(self.layers)
        ]
        summed = torch.empty(tokens, hid, device=self.dev, dtype=self.dtype)

        def three(o: Any) -> Any:
            normed, _ = add_rms_norm(o[0], o[1], o[2], eps)
            return rope_kv_write(linear_rows(normed, o[3]), cos, sin, self.pos, o[4], o[5], hq, hk, d)

        def one(o: Any) -> Any:
            return qkv_rope(o[0], o[3], cos, sin, self.pos, o[4], o[5], hq, hk, d, norm=(o[1], o[2], eps, summed))

        t_us, k_us = self.time([lambda o=o: three(o) for o in ops], [lambda o=o: one(o) for o in ops])
        same = torch.equal(one(ops[0]), three(ops[0]))
        note = f"vs add_rms_norm + linear_rows + rope_kv_write (3 launches); q {'bit-identical' if same else 'DIFFERS'}"
        return Row("qkv_rope + input norm", tokens, t_us, k_us, n_out * hid * 2, 0.0 if same else float("nan"), note)

    def _moe(self, tokens: int) -> tuple[list[tuple[torch.Tensor, ...]], list[tuple[torch.Tensor, ...]]]:
        """Per layer copy: the kernels' operands (x, idx, w, stacks with shared slots, residual) and the torch
        path's (routed stacks, fused shared gate/up [2·2I, H], shared down)."""
        lang = self.lang
        hid, inter, e, k = lang.hidden_size, lang.moe_intermediate_size, lang.n_routed_experts, lang.num_experts_per_tok
        n_always = lang.n_shared_experts
        if tokens not in self._moe_layers:  # kept for the sweep: ~450 MB of expert stacks per layer copy
            layers = []
            for _ in range(self.layers):
                w13 = self.randn(e + n_always, 2 * inter, hid, std=hid**-0.5)
                w2 = self.randn(e + n_always, hid, inter, std=inter**-0.5)
                x, res = self.randn(tokens, hid), self.randn(tokens, hid)
                idx, w = moe_route_ref(x, self.randn(e, hid, std=hid**-0.5, dtype=torch.float32), k)
                layers.append((x, idx, w, w13, w2, res))
            self._moe_layers[tokens] = layers
        layers = self._moe_layers[tokens]
        use_gmm = use_grouped_mm(layers[0][3])
        # the torch path's operands: routed stacks, fused shared gate/up [2·2I, H], shared down
        prepared: list[tuple[torch.Tensor, ...]] = []
        for x, idx, w, w13, w2, res in layers:
            s13 = torch.cat((w13[e:, :inter].reshape(-1, hid), w13[e:, inter:].reshape(-1, hid)))
            s2 = w2[e:].transpose(0, 1).reshape(hid, -1).contiguous()
            prepared.append((x, idx, w, w13[:e], w2[:e], res, s13, s2))
        self.use_gmm = use_gmm
        return layers, prepared

    def experts(self, tokens: int, pdl: bool = False, **blocks: Any) -> Row:
        """The expert kernels vs the torch path; ``pdl``: the kernels launched as programmatic dependent launches
        (each call's up kernel waits on the previous call's down kernel, as in the step).  ``down="split"``: the
        split down form (row "moe_experts (down=split)"), with one counter buffer kept across the calls as a caller
        would (not a zeroed buffer per call: that memset would be timed too)."""
        lang = self.lang
        hid, inter, k = lang.hidden_size, lang.moe_intermediate_size, lang.num_experts_per_tok
        n_always = lang.n_shared_experts
        layers, prepared = self._moe(tokens)
        cuda = self.dev.type == "cuda"
        split = blocks.get("down") == "split"
        if split:
            split_h, split_k = moe_down_split_block_sizes(
                hid, inter, not cuda, blocks.get("block_h"), blocks.get("block_k_down"), tokens
            )
            blocks = {**blocks, "counters": down_counters(tokens, hid, self.dev, block_h=split_h)}

        def kernel(c: tuple[torch.Tensor, ...]) -> torch.Tensor:
            with dependent_launches(pdl):
                return moe_experts(*c[:5], n_always, c[5], **blocks)

        t_us, k_us = self.time(
            [lambda p=p: torch_moe(*p, use_gmm=self.use_gmm) for p in prepared],
            [lambda c=c: kernel(c) for c in layers],
        )
        x, idx, w, w13, w2, res = layers[0]
        out = moe_experts(x, idx, w, w13, w2, n_always, res, **blocks)
        err = max_err(out, moe_experts_ref(x, idx, w, w13, w2, n_always, res))
        err_torch = max_err(out, torch_moe(*prepared[0], use_gmm=self.use_gmm))
        per_slot = (2 * inter * hid + hid * inter) * 2
        distinct = int(torch.unique(idx).numel()) + n_always
        sms = torch.cuda.get_device_properties(self.dev).multi_processor_count if cuda else 1
        rows = {key: blocks.get(key) for key in ("block_n", "block_h")}
        sizes = moe_block_sizes(tokens, k + n_always, hid, inter, sms, not cuda, **rows)
        used = {**dict(zip(("block_n", "block_k_up", "block_h", "block_k_down"), sizes, strict=True)), **blocks}
        if split:  # the down kernel's own blocks and stages, not the rows form's
            used.update(block_h=split_h, block_k_down=split_k, stages_down=blocks.get("stages_down", DOWN_SPLIT_STAGES))
            used.pop("counters")
        note = f"{distinct} distinct slots; vs torch path max |Δ| {err_torch:.3g}; {used}"
        stages = ("stages_up", "stages_down")
        if any(key in blocks for key in stages):  # settings that must not change the sums: vs the same call without
            base = {key: value for key, value in blocks.items() if key not in stages}
            same = torch.equal(out, moe_experts(x, idx, w, w13, w2, n_always, res, **base))
            note += f"; {'bit-identical to' if same else 'DIFFERENT output from'} the default settings"
        if split:  # the same combine, but y summed in another order: a few bf16 ulps may differ
            rows_out = moe_experts(x, idx, w, w13, w2, n_always, res, down="rows")
            differ, gap = int((out != rows_out).sum()), max_err(out, rows_out)
            note += f"; vs the rows form: {differ} of {out.numel()} elements differ (max |Δ| {gap:.3g})"
        if pdl:
            same = torch.equal(kernel(layers[0]), out)
            note += f"; dependent launches ({'bit-identical' if same else 'DIFFERENT output'})"
        op = "moe_experts (down=split)" if split else "moe_experts"
        return Row(op, tokens, t_us, k_us, distinct * per_slot, err, note, _expert_flops(lang, tokens))

    def experts_grouped(self, tokens: int, **blocks: Any) -> Row:
        """The grouped-GEMM kernels vs the torch path at batched-decode row counts (same inputs as ``experts``)."""
        lang = self.lang
        n_always = lang.n_shared_experts
        layers, prepared = self._moe(tokens)
        t_us, k_us = self.time(
            [lambda p=p: torch_moe(*p, use_gmm=self.use_gmm) for p in prepared],
            [lambda c=c: moe_experts_grouped(*c[:5], n_always, c[5], **blocks) for c in layers],
        )
        x, idx, w, w13, w2, res = layers[0]
        out = moe_experts_grouped(x, idx, w, w13, w2, n_always, res, **blocks)
        err = max_err(out, moe_experts_ref(x, idx, w, w13, w2, n_always, res))
        err_torch = max_err(out, torch_moe(*prepared[0], use_gmm=self.use_gmm))
        distinct, moved = _grouped_bytes(lang, idx, tokens)
        names = ("block_m", "block_n_up", "block_k_up", "block_n_down", "block_k_down")
        used = {**dict(zip(names, moe_grouped_block_sizes(tokens), strict=True)), **blocks}
        note = f"{distinct} distinct slots; vs torch path max |Δ| {err_torch:.3g}; {used}"
        return Row("moe_experts_grouped", tokens, t_us, k_us, moved, err, note, _expert_flops(lang, tokens))

    def reads_cost(self, tokens: int) -> Row:
        """What counting the routed experts read costs (``reads=``, on in every batched decode step): in the grouped
        kernels from 9 rows, in the GEMV kernels (``moe_experts``) at 8 rows or fewer.  The "torch" column is the
        same kernels without the count, the "triton" column with it; the outputs must be bit-identical (the count
        writes only its counter)."""
        lang = self.lang
        n_always = lang.n_shared_experts
        layers, _ = self._moe(tokens)
        experts = moe_experts if tokens < GROUPED_MIN_ROWS else moe_experts_grouped
        counters = [torch.zeros(2, dtype=torch.int64, device=self.dev) for _ in layers]
        t_us, k_us = self.time(
            [lambda c=c: experts(*c[:5], n_always, c[5]) for c in layers],
            [lambda c=c, r=r: experts(*c[:5], n_always, c[5], reads=r) for c, r in zip(layers, counters, strict=True)],
        )
        x, idx, w, w13, w2, res = layers[0]
        reads = torch.zeros(2, dtype=torch.int64, device=self.dev)
        with_count = experts(x, idx, w, w13, w2, n_always, res, reads=reads)
        same = torch.equal(with_count, experts(x, idx, w, w13, w2, n_always, res))
        slots, moved = _grouped_bytes(lang, idx, tokens)
        counted = reads.tolist()
        note = (
            f"torch column: the same kernels without the count; outputs {'bit-identical' if same else 'DIFFERENT'};"
            f" counted {counted[0]} experts in {counted[1]} call (torch.unique: {slots - n_always})"
        )
        return Row(f"{experts.__name__} (reads counted)", tokens, t_us, k_us, moved, 0.0, note)


def _grouped_bytes(lang: LanguageConfig, idx: torch.Tensor, tokens: int) -> tuple[int, int]:
    """(slots the grouped kernels read: the distinct routed experts ``idx`` picks + the shared ones, the bytes they
    move: those slots' weights once, and x, the residual and the output rows)."""
    hid, inter = lang.hidden_size, lang.moe_intermediate_size
    slots = int(torch.unique(idx).numel()) + lang.n_shared_experts
    return slots, slots * (2 * inter * hid + hid * inter) * 2 + 3 * tokens * hid * 2


def _expert_flops(lang: LanguageConfig, tokens: int) -> int:
    """Useful FLOPs of routed + shared experts for ``tokens`` rows: 3 GEMMs of I x H per (row, slot), 2 per MAC."""
    slots = lang.num_experts_per_tok + lang.n_shared_experts
    return 2 * 3 * tokens * slots * lang.moe_intermediate_size * lang.hidden_size


def torch_moe(*p: torch.Tensor, use_gmm: bool = True) -> torch.Tensor:
    """fast_layers.GroupedMoE: grouped routed experts + the shared MLP (fused gate/up), then the residual add."""
    x, idx, w, w13, w2, res, s13, s2 = p
    routed = grouped_experts_stacked(x, idx, w, w13, w2, use_gmm)
    h = F.linear(x, s13)
    half = h.shape[-1] // 2
    return res + (routed + F.linear(F.silu(h[:, :half]) * h[:, half:], s2))


# ---------------------------------------------------------------------------------------- sm_90 check
def sm90_specs(lang: LanguageConfig) -> list[tuple[str, dict[str, str], dict[str, Any], int]]:
    """(kernel, runtime signature, constexprs, num_warps) as the ops launch them at the real sizes."""
    bf, f32, i64 = "*bf16", "*fp32", "*i64"
    hq, hk, d = lang.num_attention_heads, lang.num_key_value_heads, lang.head_dim
    hid, inter, k, n_always = (
        lang.hidden_size,
        lang.moe_intermediate_size,
        lang.num_experts_per_tok,
        lang.n_shared_experts,
    )
    norm = dict(x_ptr=bf, res_ptr=bf, w_ptr=bf, normed_ptr=bf, summed_ptr=bf, f32_ptr=f32, H="i32", eps="fp32")
    rope = dict(qkv_ptr=bf, cos_ptr=bf, sin_ptr=bf, pos_ptr=i64, q_ptr=bf, k_ptr=bf, v_ptr=bf, max_len="i32")
    partial = dict(q_ptr=bf, k_ptr=bf, v_ptr=bf, pos_ptr=i64, m_ptr=f32, l_ptr=f32, acc_ptr=f32)
    partial.update(qk_scale="fp32", max_len="i32", N_SPLITS="i32")
    tail = dict(key_limit="i32")  # after the mask arguments
    combine = dict(m_ptr=f32, l_ptr=f32, acc_ptr=f32, out_ptr=bf, N_SPLITS="i32")
    route = dict(x_ptr=bf, gate_ptr=f32, idx_ptr=i64, wout_ptr=f32, counts_ptr=i64, H="i32", scaling="fp32")
    attn = dict(HQ=hq, HK=hk, D=d, BLOCK_N=64, BLOCK_D=d)  # N_SPLITS is a runtime int
    two_launch = dict(out_ptr=None, count_ptr=None, BLOCK_S=1, FUSED_COMBINE=False)  # the combine kernel follows
    two_launch.update(PF_KV=False, PF_LANES=128)  # no K / V prefetch (kernels.ATTN_PREFETCH)
    no_first = dict(first_ptr=None, FIRST_STRIDE=0, HAS_FIRST=False)  # every key from column 0 (no key_first)
    two_launch.update(no_first)
    one_launch = {**attn, "mask_ptr": None, "HAS_MASK": False, "POS_STRIDE": 0, "BLOCK_S": 32, "FUSED_COMBINE": True}
    one_launch.update(no_first)
    static_first = {k: v for k, v in two_launch.items() if k != "first_ptr"} | dict(FIRST_STRIDE=1, HAS_FIRST=True)
    specs = [
        ("_add_rms_norm_kernel", norm, dict(HAS_RESIDUAL=True, BLOCK_H=2048, HAS_F32=False), 4),
        ("_add_rms_norm_kernel", norm, dict(HAS_RESIDUAL=True, BLOCK_H=2048, HAS_F32=True), 4),
        ("_rope_kv_write_kernel", rope, dict(HQ=hq, HK=hk, D=d, BLOCK_D=d, ROW_TABLES=False, POS_STRIDE=0), 1),
        ("_rope_kv_write_kernel", rope, dict(HQ=hq, HK=hk, D=d, BLOCK_D=d, ROW_TABLES=True, POS_STRIDE=1), 1),
        (
            "_attn_partial_kernel",
            {**partial, "mask_stride": "i32", **tail},
            {**attn, "mask_ptr": None, "HAS_MASK": False, "POS_STRIDE": 0, **two_launch},
            4,
        ),
        (
            "_attn_partial_kernel",
            {**partial, "mask_ptr": bf, "mask_stride": "i32", **tail},
            {**attn, "HAS_MASK": True, "POS_STRIDE": 1, **two_launch},
            4,
        ),
        (  # the static batched step's: one last column, a mask, each row's first column (decode_attention(key_first=))
            "_attn_partial_kernel",
            {**partial, "mask_ptr": bf, "mask_stride": "i32", **tail, "first_ptr": i64},
            {**attn, "HAS_MASK": True, "POS_STRIDE": 0, **static_first},
            4,
        ),
        (  # ...as it launches under dependent launches: K / V prefetched before the wait (kernels.ATTN_PREFETCH)
            "_attn_partial_kernel",
            {**partial, "mask_ptr": bf, "mask_stride": "i32", **tail, "first_ptr": i64},
            {**attn, "HAS_MASK": True, "POS_STRIDE": 0, **static_first, "PF_KV": True, "USE_GDC": True},
            4,
        ),
        (  # the one-launch form (decode_attention(counters=...)): the last split combines
            "_attn_partial_kernel",
            {**partial, "mask_stride": "i32", **tail, "out_ptr": bf, "count_ptr": "*i32"},
            {**one_launch, "PF_KV": False, "PF_LANES": 128},
            4,
        ),
        (  # ...asking L2 for its K / V rows before its wait (kernels.ATTN_PREFETCH)
            "_attn_partial_kernel",
            {**partial, "mask_stride": "i32", **tail, "out_ptr": bf, "count_ptr": "*i32"},
            {**one_launch, "PF_KV": True, "PF_LANES": 128},
            4,
        ),
        ("_attn_combine_kernel", combine, dict(D=d, BLOCK_S=32, BLOCK_D=d), 2),
    ]
    route_consts = dict(E=lang.n_routed_experts, TOP_K=k, RENORM=False, HAS_COUNTS=True, BLOCK_E=64, BLOCK_KSLOT=8)
    specs.append(("_moe_route_kernel", route, {**route_consts, "BLOCK_K": 128, "LOGITS_IN": False}, 8))
    norm_route = dict(x_ptr=bf, res_ptr=bf, nw_ptr=bf, normed_ptr=bf, summed_ptr=bf, gate_ptr=f32, logits_ptr=f32)
    norm_route.update(flag_ptr="*i32", idx_ptr=i64, wout_ptr=f32, counts_ptr=i64, T="i32", H="i32", eps="fp32")
    norm_route["scaling"] = "fp32"
    fused_consts = dict(HAS_RESIDUAL=True, E_PER=4, BLOCK_H=2048)  # add_rms_norm_route's launch at E = 64
    specs.append(("_norm_route_kernel", norm_route, {**route_consts, **fused_consts, "ROWS": 1}, 4))
    # the batched steps' (no counts, dependent launches), one row a program and several (kernels.NORM_ROUTE_ROWS)
    for rows_a_program in (1, 4):
        batched = {**route_consts, **fused_consts, "HAS_COUNTS": False, "ROWS": rows_a_program, "USE_GDC": True}
        specs.append(("_norm_route_kernel", norm_route, batched, 4))
    # the many-row router (moe_route_rows): bf16 operands on the tensor cores (the default blocks first), the batched
    # decode step's form (counts kept), then float32 operands (IEEE float32)
    rows = dict(x_ptr=bf, gate_ptr=bf, idx_ptr=i64, wout_ptr=f32, counts_ptr=i64, T="i32", H="i32", scaling="fp32")
    rows_consts = dict(E=lang.n_routed_experts, TOP_K=k, RENORM=False, BLOCK_E=64, BLOCK_KSLOT=8, HAS_COUNTS=False)
    rows_consts["UPCAST"] = False
    for bm, bk in ((32, 64), (16, 64), (64, 128)):
        specs.append(("_route_rows_kernel", rows, {**rows_consts, "BLOCK_M": bm, "BLOCK_K": bk}, 4))
    counted = {**rows_consts, "BLOCK_M": 32, "BLOCK_K": 64, "HAS_COUNTS": True}
    specs.append(("_route_rows_kernel", rows, counted, 4))
    specs.append(("_route_rows_kernel", {**rows, "gate_ptr": f32}, {**rows_consts, "BLOCK_M": 32, "BLOCK_K": 64}, 4))
    for tokens in (1, 8):
        bn, bku, bh, bkd = moe_block_sizes(tokens, k + n_always, hid, inter, H100_SMS)
        up = dict(x_ptr=bf, idx_ptr=i64, w13_ptr=bf, h_ptr=bf, H="i32", INTER="i32", N_EXPERTS="i32")
        down = dict(
            h_ptr=bf, idx_ptr=i64, wts_ptr=f32, w2_ptr=bf, res_ptr=bf, out_ptr=bf, H="i32", INTER="i32", N_EXPERTS="i32"
        )
        common = dict(TOP_K=k, N_ALWAYS=n_always)
        up_warps = 8 if tokens == 1 else 4  # moe_experts' defaults (the down kernel: 4 at every T)
        up_consts = {**common, "BLOCK_N": bn, "BLOCK_K": bku, "EVEN_K": hid % bku == 0, "STAGES": UP_STAGES}
        uncounted = {"reads_ptr": None, "HAS_READS": False, "BLOCK_PICKS": 1}
        specs.append(("_moe_up_kernel", up, {**up_consts, **uncounted}, up_warps))  # as launched (pipelined), then
        specs.append(("_moe_up_kernel", up, {**up_consts, **uncounted, "STAGES": 0}, up_warps))  # the plain loop
        # the batched steps' of 8 rows or fewer (a drain's narrow steps, small static batches): the experts counted
        counted_up = {**up_consts, "HAS_READS": True, "BLOCK_PICKS": 1 << (tokens * k - 1).bit_length()}
        specs.append(("_moe_up_kernel", {**up, "reads_ptr": i64}, counted_up, up_warps))
        down_consts = {**common, "HAS_RESIDUAL": True, "BLOCK_H": bh, "BLOCK_K": bkd, "EVEN_K": inter % bkd == 0}
        specs.append(("_moe_down_kernel", down, down_consts, 4))
    # the split down form (moe_experts(down="split")) at one token and at more: as launched (pipelined), then the
    # plain loop
    split = dict(
        h_ptr=bf, idx_ptr=i64, wts_ptr=f32, w2_ptr=bf, res_ptr=bf, out_ptr=bf, y_ptr=f32, count_ptr="*i32", H="i32"
    )
    split.update(INTER="i32", N_EXPERTS="i32")
    for tokens in (1, 8):
        split_h, split_k = moe_down_split_block_sizes(hid, inter, n_tokens=tokens)
        split_consts = dict(TOP_K=k, N_ALWAYS=n_always, HAS_RESIDUAL=True, BLOCK_H=split_h, BLOCK_K=split_k)
        split_consts.update(EVEN_K=inter % split_k == 0, STAGES=DOWN_SPLIT_STAGES)
        no_norm = dict(nres_ptr=None, nw_ptr=None, normed_ptr=None, nsum_ptr=None, row_count_ptr=None)
        no_norm.update(HAS_NORM=False, BLOCK_R=1)
        plain = {**split, "eps": "fp32"}
        specs.append(("_moe_down_split_kernel", plain, {**split_consts, **no_norm}, 4))
        specs.append(("_moe_down_split_kernel", plain, {**split_consts, **no_norm, "STAGES": 0}, 4))
        # with the next norm (moe_experts(norm=...), FastConfig.down_norm: off by default, measured slower)
        with_norm = {**split, "nres_ptr": bf, "nw_ptr": bf, "normed_ptr": bf, "nsum_ptr": bf, "row_count_ptr": "*i32"}
        with_norm["eps"] = "fp32"
        specs.append(("_moe_down_split_kernel", with_norm, {**split_consts, "HAS_NORM": True, "BLOCK_R": 2048}, 4))
    ids = dict(ids_ptr=i64, order_ptr="*i32", offs_ptr="*i32", reads_ptr=i64, P="i32")
    # 64 tokens x top-6, the routed experts read counted (as every batched decode step does)
    align = dict(E=lang.n_routed_experts, BLOCK_P=16, BLOCK_ALL=512, BLOCK_E=128, HAS_READS=True)
    specs.append(("_moe_align_kernel", ids, align, 4))
    gmm = dict(order_ptr="*i32", offs_ptr="*i32", P="i32", T="i32", H="i32", INTER="i32", N_ROUTED="i32")
    for tokens in (32, 64):  # 16- and 32-row blocks
        bm, bnu, bku, bnd, bkd = moe_grouped_block_sizes(tokens)
        gmm_consts = dict(TOP_K=k, BLOCK_M=bm, PRECISION="tf32", UPCAST=False)
        up = dict(x_ptr=bf, w13_ptr=bf, h_ptr=bf, **gmm)
        up_consts = dict(BLOCK_N=bnu, BLOCK_K=bku, EVEN_K=hid % bku == 0)
        specs.append(("_moe_gmm_up_kernel", up, {**gmm_consts, **up_consts}, 4))
        down = dict(h_ptr=bf, w2_ptr=bf, y_ptr=f32, **gmm)
        down_consts = dict(BLOCK_N=bnd, BLOCK_K=bkd, EVEN_K=inter % bkd == 0)
        specs.append(("_moe_gmm_down_kernel", down, {**gmm_consts, **down_consts}, 4))
    comb = dict(y_ptr=f32, wts_ptr=f32, res_ptr=bf, out_ptr=bf, P="i32", T="i32", H="i32")
    comb_consts = dict(TOP_K=k, N_ALWAYS=n_always, HAS_RESIDUAL=True, BLOCK_H=256)
    specs.append(("_moe_combine_kernel", comb, comb_consts, 2))
    pick = dict(logits_ptr=f32, ban_ptr="*i1", val_ptr=f32, idx_ptr="*i32", bad_ptr="*i32", V="i32")
    pick.update(ban_stride="i32", N_CHUNKS="i32")
    n_chunks = -(-lang.vocab_size // PICK_BLOCK)
    for has_ban in (False, True):
        specs.append(("_pick_partial_kernel", pick, dict(BLOCK=PICK_BLOCK, HAS_BAN=has_ban), 4))
    final = dict(val_ptr=f32, idx_ptr="*i32", bad_ptr="*i32", out_ptr=i64, flag_ptr="*i1", tokens_ptr=i64)
    final.update(chosen_ptr=i64, pos_ptr=i64, V="i32", N_CHUNKS="i32", ROWS="i32", SLOTS="i32")
    for feed in (False, True):  # the decoder's step ends in it (feed) or not
        specs.append(("_pick_final_kernel", final, dict(BLOCK_C=1 << (n_chunks - 1).bit_length(), FEED=feed), 1))
    ban = dict(hist_ptr=i64, len_ptr=i64, out_ptr="*u8", W="i32", hist_stride="i32", V="i32", len_offset="i32")
    ban.update(window="i32")
    for n, has_window in ((1, False), (20, False), (30, True)):  # the default rule, vLLM Gundam's (30, window 90)
        ban_consts = dict(LEN_STRIDE=0, N=n, HAS_WINDOW=has_window, BLOCK_V=NGRAM_BLOCK_V, BLOCK_S=NGRAM_BLOCK_S)
        specs.append(("_ngram_ban_kernel", ban, ban_consts, 4))
    linear = dict(x_ptr=bf, w_ptr=bf, y_ptr=bf, N="i32")
    for _, n_out in projections(lang):  # as linear_rows launches them on an H100
        bn, bk = linear_block_sizes(n_out, hid, H100_SMS)
        specs.append(("_linear_rows_kernel", linear, dict(K=hid, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=hid % bk == 0), 4))
    qkv_rope = dict(
        x_ptr=bf, w_ptr=bf, cos_ptr=bf, sin_ptr=bf, pos_ptr=i64, q_ptr=bf, k_ptr=bf, v_ptr=bf, max_len="i32"
    )
    bn, bk = linear_block_sizes(projections(lang)[0][1], hid, H100_SMS)  # as qkv_rope launches it: 2 pairs at 4 rows
    rope_consts = dict(K=hid, HQ=hq, HK=hk, D=d, PAIRS=max(1, bn // 2), BLOCK_K=bk, EVEN_K=hid % bk == 0)
    # as the step launches it (fused_input_norm: the input add + RMSNorm first; the dependent-launch variant), then
    # without the norm (fused_rope alone)
    with_norm = {**qkv_rope, "res_ptr": bf, "nw_ptr": bf, "summed_ptr": bf, "eps": "fp32"}
    norm_consts = dict(HAS_NORM=True, HAS_RESIDUAL=True, BLOCK_H=2048)
    specs.append(("_qkv_rope_kernel", with_norm, {**rope_consts, **norm_consts}, 4))
    no_norm = dict(res_ptr=None, nw_ptr=None, summed_ptr=None, HAS_NORM=False, HAS_RESIDUAL=False, BLOCK_H=1)
    specs.append(("_qkv_rope_kernel", {**qkv_rope, "eps": "fp32"}, {**rope_consts, **no_norm}, 4))
    specs += prompt_specs(lang)
    specs += sam_specs()
    return specs


# SAM's attention grids at v1's views: the 640-px tiles (40×40), the 1024-px view (64×64), the 14×14 windows; with
# the launch settings the sweep weighs beside the default one row per step: (block_m, block_n, warps[, patch_w]),
# several rows per 64/128-wide step, or patches of 8 key columns (the tiles in 8×8 patches of 64 keys)
SAM_GRIDS: tuple[tuple[int, tuple[tuple[int, ...], ...]], ...] = (
    (40, ((64, 128, 4), (128, 128, 8), (64, 64, 4, 8), (128, 64, 8, 8), (128, 128, 8, 8))),
    (64, ((64, 64, 4, 8), (0, 128, 0))),  # the 1024-px view in 8x8 patches (round 22's candidate with BIAS_IN_MMA)
    (14, ((64, 64, 4), (64, 128, 4), (128, 128, 8))),
    (48, ((0, 128, 0), (0, 64, 0, 8))),  # v2's 768-px tiles: the default is BY_GRID's 8x8 patches at 128 queries
)
# The GPU tests' 256-wide steps (grid, block_n): correctness settings only, never launched by the model (they spill,
# 248-584 B): compiled with the role "test", so the check holds them to shared memory, not to spills
SAM_TEST_STEPS: tuple[tuple[int, int], ...] = ((40, 256), (14, 256))
# ...and one launch that cannot fit, compiled as a probe (its result's role: "probe"): round 22's 256-wide
# steps of the 40-wide grid at BY_GRID[40]'s three k/v stages, which asked the GPU for 260,096 bytes; the check must
# see the same need, or its shared-memory figures prove nothing
SAM_OVER_LIMIT_PROBE = dict(grid=40, block_m=64, block_n=256, warps=4, stages=3)
SAM_DIVISIBLE = {"s_qb", "s_qh", "s_qn", "s_kb", "s_kh", "s_kn", "s_vb", "s_vh", "s_vn"}


def sam_specs() -> list[tuple[str, dict[str, str], dict[str, Any], int]]:
    """SAM's rel-pos attention kernel (``sam_kernels``) at head size 64 on each grid of :data:`SAM_GRIDS`: the
    default launch (one key row per step) and several-rows settings (q/k/v strides of the block's fused qkv
    are multiples of 16: hinted; N only where the grid is, not 14² = 196)."""
    from llm_perf_opt.models.deepseek_ocr import sam_kernels

    bf = "*bf16"
    sig = dict(q_ptr=bf, k_ptr=bf, v_ptr=bf, rh_ptr=bf, rw_ptr=bf, out_ptr=bf)
    sig.update(dict.fromkeys((*sorted(SAM_DIVISIBLE), "N", "HEADS", "KH", "KW"), "i32"), qk_scale="fp32")
    specs = []

    def attention(grid: int, b: sam_kernels.Blocks) -> dict[str, Any]:
        consts: dict[str, Any] = dict(D=64, BLOCK_M=b.block_m, BLOCK_N=b.block_n, ROWS=b.rows, STAGES=b.stages)
        consts.update(ROW_PAD=sam_kernels._pow2(b.rows), COL_PAD=sam_kernels._pow2(b.patch_w or grid))
        consts.update(PATCH_W=b.patch_w)
        consts.update(PRECISION="tf32", UPCAST=False, PREFETCH_RH=True, N_DIVISIBLE=grid * grid % 16 == 0)
        consts.update(sam_kernels._term_forms(64, grid, grid, b))  # the position terms' form as launched
        return consts

    for grid, several in SAM_GRIDS:
        for block_m, block_n, warps, *patch in ((0, 0, 0), *several):  # zeros: attention_blocks' default
            b = sam_kernels.attention_blocks(  # the default with sam_kernels.BY_GRID, a candidate as written
                grid * grid, grid, False, block_m=block_m, block_n=block_n, warps=warps, patch_w=(patch or [0])[0]
            )
            consts = attention(grid, b)
            specs.append(("sam_kernels._rel_pos_attention_kernel", sig, consts, b.warps))
            if not b.one_hot:  # one-row steps also with the row's term in the max (ROW_TERM_IN_MAX)
                specs.append(("sam_kernels._rel_pos_attention_kernel", sig, {**consts, "ROW_SHIFT": True}, b.warps))
    for grid, block_n in SAM_TEST_STEPS:
        b = sam_kernels.attention_blocks(grid * grid, grid, False, block_n=block_n)
        specs.append(("sam_kernels._rel_pos_attention_kernel", sig, {**attention(grid, b), "ROLE": "test"}, b.warps))
    probe = dict(SAM_OVER_LIMIT_PROBE)
    grid = probe.pop("grid")
    b = sam_kernels.attention_blocks(grid * grid, grid, False, **probe)
    specs.append(("sam_kernels._rel_pos_attention_kernel", sig, {**attention(grid, b), "ROLE": "probe"}, b.warps))
    # sam_kernels.TABLES="triton": the two tables' kernel (a program per query row / column) on the same grids
    tables = dict(q_ptr=bf, pos_ptr=bf, out_ptr=bf, s_qb="i32", s_qh="i32", s_qn="i32", HEADS="i32", H="i32", W="i32")
    for grid, _ in SAM_GRIDS:
        for row_table in (True, False):
            consts = dict(D=64, SIDE=max(16, sam_kernels._pow2(grid)), ROW_TABLE=row_table, PRECISION="tf32")
            specs.append(("sam_kernels._rel_pos_tables_kernel", tables, {**consts, "UPCAST": False}, 4))
    # sam_kernels.TABLES="gather": both tables in one launch, at sam_kernels.GATHER_BLOCK and the sweep's largest
    gather = dict(q_ptr=bf, pos_h_ptr=bf, pos_w_ptr=bf, rh_ptr=bf, rw_ptr=bf, s_qb="i32", s_qh="i32", s_qn="i32")
    gather.update(HEADS="i32", H="i32", W="i32")
    for grid, _ in SAM_GRIDS:
        pads = dict(KH_PAD=sam_kernels._pow2(grid), KW_PAD=sam_kernels._pow2(grid))
        pads.update(PH_PAD=sam_kernels._pow2(2 * grid - 1), PW_PAD=sam_kernels._pow2(2 * grid - 1))
        for block, warps in {sam_kernels.GATHER_BLOCK, (128, 8)}:
            consts = dict(D=64, BLOCK=block, **pads, PRECISION="tf32", UPCAST=False)
            specs.append(("sam_kernels._rel_pos_tables_gather_kernel", gather, consts, warps))
    return specs


# Integer arguments of the prefill's kernels that the launcher sees divisible by 16 at the real sizes (and so
# specialises: 16-byte loads and async copies depend on it): the GEMMs' N and K, the attention's strides.
PROMPT_DIVISIBLE = {"N", "K", "s_qb", "s_ql", "s_qh", "s_kb", "s_kh", "s_kn", "s_vb", "s_vh", "s_vn"}


def prompt_specs(lang: LanguageConfig) -> list[tuple[str, dict[str, str], dict[str, Any], int]]:
    """The prefill's kernels (``prompt_moe``, ``prompt_attention``; names prefixed by their module) as they launch
    at one Gundam page's 913-token prompt with their GPU defaults (all at three pipeline stages, the compile's
    default)."""
    from llm_perf_opt.models.deepseek_ocr import clip_attention, prompt_attention, prompt_moe

    bf = "*bf16"
    n_experts, k = lang.n_routed_experts, lang.num_experts_per_tok
    block_e = 1 << n_experts.bit_length()  # _pow2(E + 1): room for the offsets' end
    chunks = -(-913 * k // 128)
    hist = dict(ids_ptr="*i64", hist_ptr="*i32", P="i32")
    place = dict(ids_ptr="*i64", hist_ptr="*i32", order_ptr="*i32", inverse_ptr="*i64", offs_ptr="*i32")
    place.update(counts_ptr="*i64", P="i32", C="i32")
    place_consts = dict(E=n_experts, BLOCK_P=128, BLOCK_E=block_e, BLOCK_C=1 << (chunks - 1).bit_length())
    specs: list[tuple[str, dict[str, str], dict[str, Any], int]] = [
        ("prompt_moe._align_hist_kernel", hist, dict(E=n_experts, BLOCK_P=128, BLOCK_E=block_e), 4),
        ("prompt_moe._align_place_kernel", place, {**place_consts, "HAS_COUNTS": True}, 4),
    ]
    gemm = dict(a_ptr=bf, order_ptr="*i32", offs_ptr="*i32", w_ptr=bf, w_desc=bf, out_ptr=bf)
    gemm.update(P="i32", N="i32", K="i32")
    hid, inter = lang.hidden_size, lang.moe_intermediate_size
    for which, n, kk, gather in (("up", inter, hid, True), ("down", hid, inter, False)):
        blocks = prompt_moe.gemm_blocks(which, interpreter=False)
        bm, bn, bk, warps, stages = blocks
        consts = dict(E=n_experts, TOP_K=k, GATHER=gather, SWIGLU=gather, BLOCK_E=1 << (n_experts - 1).bit_length())
        consts.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=kk % bk == 0, EVEN_N=n % bn == 0)
        consts.update(PRECISION="tf32", UPCAST=False, NUM_STAGES=stages)
        specs.append(("prompt_moe._grouped_gemm_kernel", gemm, {**consts, "W_TMA": False}, warps))
        # a float32 model's launch: its own blocks (prompt_moe.FLOAT32_UP_BLOCKS), the stages fitted to the block's
        # shared memory as _launch_gemm fits them (round 21's four-stage float32 up GEMM asked for 294,912 bytes on
        # the GPU)
        f32 = {**gemm, **{arg: "*fp32" for arg in ("a_ptr", "w_ptr", "w_desc", "out_ptr")}}
        f32_blocks = prompt_moe.gemm_blocks(which, interpreter=False, float32=True)
        fitted = prompt_moe.gemm_stages(f32_blocks, gather, 4, SM90_MAX_SHARED)
        f32_consts = {**consts, "PRECISION": "ieee", "NUM_STAGES": fitted, "W_TMA": False, "ROLE": "float32"}
        fm, fn, fk, f_warps, _ = f32_blocks
        f32_consts.update(BLOCK_M=fm, BLOCK_N=fn, BLOCK_K=fk, EVEN_K=kk % fk == 0, EVEN_N=n % fn == 0)
        specs.append(("prompt_moe._grouped_gemm_kernel", f32, f32_consts, f_warps))
        # prompt_moe.W_TMA: the weight tiles through a tensor descriptor (the launcher passes one of [bn, bk] blocks)
        tma = {**gemm, "w_desc": f"tensordesc<bf16[{bn},{bk}]>"}
        specs.append(("prompt_moe._grouped_gemm_kernel", tma, {**consts, "W_TMA": True}, warps))
    # the prompt's attention (one kernel for both forms: prompt_attention.SPLIT_STEPS chunks, or one per block)
    attn = dict(q_ptr=bf, k_ptr=bf, v_ptr=bf, o_ptr=bf, part_ptr="*fp32", ml_ptr="*fp32", count_ptr="*i32")
    attn.update(dict.fromkeys(("s_qb", "s_ql", "s_qh", "s_kb", "s_kh", "s_kn", "s_vb", "s_vh", "s_vn"), "i32"))
    attn.update(L="i32", start="i32", HEADS="i32", GROUP="i32", qk_scale="fp32", SPLIT_STEPS="i32", SLOTS="i32")
    bm, bn, warps, stages = prompt_attention.BLOCKS
    assert stages == 3, "the check compiles at Triton's default of three stages"
    attn_consts = dict(D=lang.head_dim, BLOCK_M=bm, BLOCK_N=bn, PRECISION="tf32", UPCAST=False)
    specs.append(("prompt_attention._prompt_attention_kernel", attn, attn_consts, warps))
    # CLIP's attention over a page's views (clip_attention): CLIP-L's 16 heads of 64
    views = dict(qkv_ptr=bf, o_ptr=bf, N0="i32", S0="i32", N1="i32", S1="i32", qk_scale="fp32")
    bm, bn, warps, stages = clip_attention.BLOCKS
    assert stages == 3, "the check compiles at Triton's default of three stages"
    views_consts = dict(HEADS=16, D=64, BLOCK_M=bm, BLOCK_N=bn, PRECISION="tf32", UPCAST=False)
    specs.append(("clip_attention._views_attention_kernel", views, views_consts, warps))
    return specs


def projections(lang: LanguageConfig) -> tuple[tuple[str, int], ...]:
    """The decode step's attention projections linear_rows serves, as (name, output width): the fused QKV and
    o_proj (both read the hidden size)."""
    qkv = (lang.num_attention_heads + 2 * lang.num_key_value_heads) * lang.head_dim
    return ("QKV", qkv), ("o_proj", lang.hidden_size)


STREAMING = {
    "_attn_partial_kernel",
    "_norm_route_kernel",
    "_moe_route_kernel",
    "_moe_up_kernel",
    "_moe_down_kernel",
    "_moe_down_split_kernel",
    "_pick_partial_kernel",
    "_linear_rows_kernel",
    "_qkv_rope_kernel",
}


def sm90_check(lang: LanguageConfig) -> list[dict[str, Any]]:
    """Compile every kernel for sm_90 (no GPU needed) with the runtime's alignment specialisation."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import compiler as nvidia
    from triton.compiler import ASTSource

    from llm_perf_opt.models.deepseek_ocr import kernels

    if kernels.INTERPRETED:
        raise SystemExit("--sm90-check compiles the kernels: unset TRITON_INTERPRET")
    get_ptxas = getattr(nvidia, "get_ptxas", None)  # the ptxas Triton compiles with; its API moved over versions
    ptxas = None
    if get_ptxas is not None:
        tool = get_ptxas(90) if inspect.signature(get_ptxas).parameters else get_ptxas()
        ptxas = getattr(tool, "path", None)
    results = []
    from llm_perf_opt.models.deepseek_ocr import clip_attention, prompt_attention, prompt_moe, sam_kernels

    modules = {"": kernels, "prompt_moe": prompt_moe, "prompt_attention": prompt_attention, "sam_kernels": sam_kernels}
    modules["clip_attention"] = clip_attention

    def kernel_fn(name: str) -> Any:
        module, _, kernel_name = name.rpartition(".")
        return getattr(modules[module], kernel_name)

    # the kernels that can be programmatic dependent launches (kernels.dependent_launches: USE_GDC + launch_pdl)
    # compile both ways; one never launched dependently (SAM's: no USE_GDC) once, as it launches
    base = sm90_specs(lang)
    dependent = {name for name, *_ in base if "USE_GDC" in kernel_fn(name).arg_names}
    specs = [
        (name, sig, {"USE_GDC": False, **consts} if name in dependent else consts, warps)  # a spec may set it
        for name, sig, consts, warps in base
    ]
    first: dict[str, tuple[str, dict[str, str], dict[str, Any], int]] = {}
    for spec in specs:
        first.setdefault(spec[0], spec)
    specs += [(n, sig, {**c, "USE_GDC": True}, warps) for n, sig, c, warps in first.values() if n in dependent]
    for name, signature, constexprs, num_warps in specs:
        module = name.rpartition(".")[0]
        fn = kernel_fn(name)
        pdl = bool(constexprs.get("USE_GDC", False))
        # the launcher specialises 16-byte aligned pointers and ints divisible by 16 (H = 1280, I = 896, V = 129,280)
        hinted = PROMPT_DIVISIBLE if module.startswith("prompt_") else SAM_DIVISIBLE if module else set()
        if constexprs.pop("N_DIVISIBLE", False):
            hinted = {*hinted, "N"}
        stages = constexprs.pop("NUM_STAGES", None)  # a launch option, not a constexpr (Triton's default: 3)
        # "launch": as the model launches it or a sweep weighs it; "float32": a float32 model's launch, "test": a GPU
        # test's setting (both correctness paths: they must fit, may spill); "probe": known not to fit
        role = constexprs.pop("ROLE", "launch")
        attrs_ = {
            (fn.arg_names.index(arg),): [["tt.divisibility", 16]]
            for arg, ty in signature.items()
            if ty.startswith("*") or arg in ("H", "INTER", "V") or arg in hinted
        }
        full = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        res: dict[str, Any] = {"kernel": name, "constexprs": constexprs, "num_warps": num_warps, "role": role}
        try:
            compiled = triton.compile(
                ASTSource(fn, full, constexprs, attrs_),
                target=GPUTarget("cuda", 90, 32),
                options={
                    "num_warps": num_warps,
                    **({"launch_pdl": True} if pdl else {}),
                    **({"num_stages": stages} if stages else {}),
                },
            )
        except Exception as exc:  # recorded and reported: the check's purpose is to show compile failures
            res["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
            results.append(res)
            continue
        ptx = compiled.asm["ptx"]
        res.update(
            error="",
            v4_loads=len(re.findall(r"ld\.global(?:\.[\w:]+)*\.v4\.b32", ptx)),
            # 16-byte asynchronous copies into shared memory (a software-pipelined loop's loads)
            cp_async_16=len(
                re.findall(
                    r"cp\.async\.\w+\.shared\.global[^;]*,\s*0x10\b|cp\.async\.\w+\.shared\.global[^;]*,\s*16\b", ptx
                )
            ),
            # tensor-descriptor (TMA) copies into shared memory (prompt_moe.W_TMA's weight tiles)
            tma_copies=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
            # the dependent-launch instructions in the PTX (griddepcontrol.wait / .launch_dependents)
            griddepcontrol=sorted(set(re.findall(r"griddepcontrol\.(\w+)", ptx))),
            # global loads (and async copies to shared memory) the PTX issues before its first wait (None: no
            # wait): only reads of what no kernel of the step writes (linear_rows' weights) may come before it
            loads_before_wait=(
                len(
                    re.findall(
                        r"\bld\.global\b|\bcp\.async\.\w+\.shared\.global\b", ptx.split("griddepcontrol.wait", 1)[0]
                    )
                )
                if "griddepcontrol.wait" in ptx
                else None
            ),
            # atomics (with their scope and memory order) and loads that bypass L1 (.cg)
            atomics=sorted(set(re.findall(r"\batom\.global\.([\w.]+)", ptx))),
            cg_loads=len(re.findall(r"\bld\.global\.cg\b", ptx)),
            shared_bytes=int(compiled.metadata.shared),
            registers=None,
            spill_bytes=None,  # None: ptxas not found (the cubin was still built)
        )
        if ptxas is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{name}.ptx"
                path.write_text(ptx)
                cmd = [ptxas, "-arch=sm_90a", "-v", str(path), "-o", os.devnull]
                info = subprocess.run(cmd, capture_output=True, text=True, check=False)
            regs = re.search(r"Used (\d+) registers", info.stderr)
            spills = re.search(r"(\d+) bytes spill stores", info.stderr)
            res.update(
                error="" if info.returncode == 0 else info.stderr[-3000:],
                registers=int(regs.group(1)) if regs else None,
                spill_bytes=int(spills.group(1)) if spills else None,
            )
        results.append(res)
    return results


def over_limit(result: dict[str, Any]) -> str:
    """A compiled kernel's note on its shared memory: '' when it fits :data:`SM90_MAX_SHARED`, else how far over
    (and, for the probe, that this was expected)."""
    need = result.get("shared_bytes") or 0
    if need <= SM90_MAX_SHARED:
        return ""
    expected = ": the probe, as expected" if result.get("role") == "probe" else ""
    return f" (OVER the {SM90_MAX_SHARED:,} B limit{expected})"


# ---------------------------------------------------------------------------------------- report
def _pct(value: float, peak: float | None) -> str:
    return "n/a" if peak is None else f"{100 * value / peak:.0f} %"


def render(
    rows: list[Row],
    env: dict[str, str],
    args: argparse.Namespace,
    sweep: list[str],
    peaks: tuple[float, float] | None = None,
    steps: list[str] | None = None,
    splits: list[str] | None = None,
) -> str:
    """Markdown report; ``peaks`` (bytes/s, bf16 FLOP/s) from the GPU's datasheet entry (None: not in the table)."""
    bw, fl = (peaks[0] / 1e9, peaks[1] / 1e12) if peaks else (None, None)
    peak_note = (
        f" Roofline: {bw:.0f} GB/s and {fl:.0f} dense bf16 TFLOP/s ({env.get('peak_source', 'datasheet')})."
        if peaks
        else " No datasheet peak for this GPU: % of roofline absent."
    )
    lines = [
        f"# Triton decode kernels vs torch — {env['gpu']}",
        "",
        f"{env['date']}; driver {env['driver']}; torch {env['torch']} (CUDA {env['cuda']}); Triton {env['triton']};"
        f" bf16, real DeepSeek-OCR sizes; per call: CUDA graph of {args.calls} back-to-back calls cycling through"
        f" {args.layers} layer copies, median of {args.reps} replays (launch overhead excluded).{peak_note}",
        "",
        "| op | T | torch µs | triton µs | speedup | bytes | torch GB/s | triton GB/s | torch % BW | triton % BW |"
        " triton TFLOP/s (% peak) | max abs err vs ref | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        tf = f"{r.tflops(r.triton_us):.1f} ({_pct(r.tflops(r.triton_us), fl)})" if r.flops else ""
        lines.append(
            f"| {r.op} | {r.tokens} | {r.torch_us:.2f} | {r.triton_us:.2f} | {r.speedup:.2f}× | {r.bytes_moved:,} |"
            f" {r.gbps(r.torch_us):.0f} | {r.gbps(r.triton_us):.0f} | {_pct(r.gbps(r.torch_us), bw)} |"
            f" {_pct(r.gbps(r.triton_us), bw)} | {tf} | {r.max_abs_err:.3g} | {r.note} |"
        )
    one = [r for r in rows if r.tokens == 1]
    if one:  # absent (not 0.0) when the T = 1 ops were not run (--only-grouped)
        lines += [
            "",
            f"Sum over the T=1 ops: torch {sum(r.torch_us for r in one):.1f} µs, Triton"
            f" {sum(r.triton_us for r in one):.1f} µs per layer (the QKV / o_proj GEMMs are not included).",
        ]
    if splits:
        lines += ["", "## decode_attention: the split rule before / after (per layer, one op)", "", *splits]
    if steps:
        lines += ["", "## Batched decode step (full model, CUDA graph)", "", *steps]
    if sweep:
        lines += ["", "## Block-size sweep (Triton µs)", "", *sweep]
    return "\n".join(lines) + "\n"


# moe_experts variants: the 2026-12-01 sweep (block_n 16..64 x block_h 4..32 x 4/8 warps, both kernels alike) found
# the smallest blocks and 8 warps fastest at T = 1; these go below those, one kernel at a time (the other at its
# default): the up kernel's gate/up rows per program, then the down kernel's hidden rows and its own warps
UP_VARIANTS = [(4, 8), (8, 4), (8, 8), (16, 4), (16, 8)]  # (block_n, warps)
DOWN_VARIANTS = [(1, 4), (1, 8), (2, 2), (2, 4), (2, 8), (4, 4), (4, 8)]  # (block_h, warps of the down kernel)
# the split down form (moe_experts(down="split")): (block_h, block_k, stages, warps) of its kernel, every row block x
# K width x pipelining at 4 warps, then 8 warps at each row block (the defaults: moe_down_split_block_sizes)
SPLIT_VARIANTS = [(bh, bk, st, 4) for bh in (8, 16, 32) for bk in (128, 256) for st in (0, 2)]
SPLIT_VARIANTS += [(bh, 128, 2, 8) for bh in (8, 16, 32)]
# deeper pipelines and wider row blocks (round 17: the form had never been swept on a GPU)
SPLIT_VARIANTS += [(16, 128, 3, 4), (16, 128, 4, 4), (32, 128, 3, 4), (32, 64, 3, 4), (64, 64, 2, 4), (64, 64, 2, 8)]
SWEEP_PARTS = ("experts", "attention", "linear", "grouped")


def run_sweep(bench: Bench, parts: tuple[str, ...] = SWEEP_PARTS) -> list[str]:
    """The block-size variants of ``parts`` (``SWEEP_PARTS``: the expert GEMVs, decode attention, the attention
    projections, the grouped expert kernels), each against its default in the same run."""
    out = ["| op | T | config | triton µs | GB/s |", "| --- | ---: | --- | ---: | ---: |"]
    for tokens in (1, 4) if "experts" in parts else ():
        r = bench.experts(tokens)
        out.append(f"| moe_experts | {tokens} | defaults | {r.triton_us:.2f} | {r.gbps(r.triton_us):.0f} |")
        variants = [
            (f"up: block_n={bn} warps={w} (down: defaults)", dict(block_n=bn, num_warps=w)) for bn, w in UP_VARIANTS
        ]
        variants += [
            (f"down: block_h={bh} warps={w} (up: defaults)", dict(block_h=bh, num_warps_down=w))
            for bh, w in DOWN_VARIANTS
        ]
        variants += [
            (
                f"down=split: block_h={bh} block_k={bk} stages={st} warps={w} (up: defaults)",
                dict(down="split", block_h=bh, block_k_down=bk, stages_down=st, num_warps_down=w),
            )
            for bh, bk, st, w in SPLIT_VARIANTS
        ]
        for cfg, blocks in variants:
            try:
                r = bench.experts(tokens, **blocks)
            except Exception as exc:  # a variant that cannot compile / launch is reported, not fatal
                out.append(f"| moe_experts | {tokens} | {cfg} | failed: {type(exc).__name__} | |")
                continue
            out.append(f"| moe_experts | {tokens} | {cfg} | {r.triton_us:.2f} | {r.gbps(r.triton_us):.0f} |")
    for block_n in (32, 64, 128) if "attention" in parts else ():
        r = bench.attention(1, block_n=block_n)
        out.append(f"| decode_attention | 1 | block_n={block_n} | {r.triton_us:.2f} | {r.gbps(r.triton_us):.0f} |")
    for name, n_out in projections(bench.lang) if "linear" in parts else ():
        for bn, bk, warps in LINEAR_VARIANTS:
            cfg = f"{name}: block_n={bn} block_k={bk} warps={warps}"
            try:
                r = bench.linear(1, n_out, name, block_n=bn, block_k=bk, num_warps=warps)
            except Exception as exc:  # a variant that cannot compile / launch is reported, not fatal
                out.append(f"| linear_rows | 1 | {cfg} | failed: {type(exc).__name__} | |")
                continue
            out.append(f"| linear_rows | 1 | {cfg} | {r.triton_us:.2f} | {r.gbps(r.triton_us):.0f} |")
    if "grouped" in parts:
        out += run_grouped_sweep(bench)
    return out


# (block_n, block_k, num_warps) of linear_rows at one row: tile shape and width against programs per SM
LINEAR_VARIANTS = [(2, 256, 4), (4, 256, 4), (8, 256, 4), (16, 256, 4), (8, 128, 4), (8, 512, 4), (16, 512, 8)]


# moe_route_rows' launch forms besides its default (route_rows_block_sizes): rows per program (each program reads
# the whole router from L2) x K width x warps, on bf16 operands (round 17's first sweep, on float32 operands in IEEE
# float32 on the CUDA cores, took 41-98 us at 913 rows against the three launches' 24)
ROUTE_ROWS_VARIANTS: list[dict[str, Any]] = [
    dict(block_m=16, block_k=64),
    dict(block_m=64, block_k=64),
    dict(block_m=32, block_k=128),
    dict(block_m=64, block_k=128),
    dict(block_m=32, block_k=64, num_warps=8),
    dict(block_m=16, block_k=128, num_warps=2),
]


# (block_m, block_n, block_k, num_stages, num_warps) for both grouped GEMMs; the first is the default
GROUPED_VARIANTS = [
    (16, 64, 128, None, 4),
    (16, 64, 128, 4, 4),
    (16, 64, 256, 3, 4),
    (16, 64, 64, 6, 4),
    (16, 128, 64, 4, 4),
    (16, 128, 128, 3, 8),
    (16, 32, 256, 4, 4),
    (16, 32, 128, 5, 4),
    (32, 64, 128, 3, 4),
]


def run_grouped_sweep(bench: Bench, tokens_list: tuple[int, ...] = (32, 64)) -> list[str]:
    """Block sizes of the grouped expert kernels (both GEMMs alike); a variant that does not fit (shared memory)
    is listed with the reason."""
    out = []
    for tokens in tokens_list:
        for bm, bn, bk, stages, warps in GROUPED_VARIANTS:
            cfg = f"block_m={bm} block_n={bn} block_k={bk} stages={stages or 'default'} warps={warps}"
            blocks = dict(block_m=bm, block_n_up=bn, block_k_up=bk, block_n_down=bn, block_k_down=bk)
            try:
                r = bench.experts_grouped(tokens, **blocks, num_stages=stages, num_warps=warps)
            except Exception as exc:  # a variant that cannot compile / launch is reported, not fatal
                out.append(f"| moe_experts_grouped | {tokens} | {cfg} | failed: {type(exc).__name__} | |")
                continue
            out.append(f"| moe_experts_grouped | {tokens} | {cfg} | {r.triton_us:.2f} | {r.gbps(r.triton_us):.0f} |")
    return out


# ---------------------------------------------------------------------------------------- batched step
def _measure_step(fast: Any, model: Any, bsz: int, prompt_len: int, new_tokens: int, reps: int) -> dict[str, Any]:
    """One (kernels, batch) point: capture, ``reps`` timed replays, then 3 un-graphed steps under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    from llm_perf_opt.models.deepseek_ocr.batched_decode import StaticBatchStep

    dev = torch.device("cuda")
    step = StaticBatchStep(
        fast,
        model,
        bsz,
        prompt_len + new_tokens,
        use_graph=True,
        matmul_attention=fast.fast_config.decode_attention == "matmul",
        expert_impl=fast.fast_config.expert_impl,
    )
    gen = torch.Generator(device=dev).manual_seed(bsz)
    first = torch.randint(0, int(model.lm_head.out_features), (bsz, 1), device=dev, generator=gen)

    def reload() -> None:
        step.load(first, [prompt_len] * bsz, [new_tokens] * bsz, None)

    reload()
    capture_s = step.capture()
    reload()
    times = []
    for _ in range(min(reps, new_tokens - 1)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step.step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    step.graph = None  # un-graphed steps for the profile: the same kernels, launched one by one
    reload()
    n_prof = 3
    from llm_perf_opt.models.deepseek_ocr import kernels

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n_prof):
            step.step()
        torch.cuda.synchronize()
    # the routed experts each MoE layer reads, from the same steps run again outside the profile (the count's own
    # kernels are no part of a step)
    # distinct routed experts per expert call with routed picks (a MoE layer of one step): the grouped kernels from 9
    # rows on, the GEMV kernels up to 8 (the dense first layer's GEMV call has no routed pick and is left out)
    hits: list[int] = []
    real = {name: getattr(kernels, name) for name in ("moe_experts_grouped", "moe_experts")}

    def spy_of(fn: Any) -> Any:
        def spy(x: torch.Tensor, idx: torch.Tensor, *rest: Any, **kw: Any) -> torch.Tensor:
            if idx.numel():
                hits.append(int(torch.unique(idx).numel()))
            return fn(x, idx, *rest, **kw)

        return spy

    reload()
    for name, fn in real.items():
        setattr(kernels, name, spy_of(fn))
    try:
        for _ in range(n_prof):
            step.step()
    finally:
        for name, fn in real.items():
            setattr(kernels, name, fn)
    per_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            per_name.setdefault(e.name, []).append(float(e.device_time))
    top = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:25]
    return {
        "batch": bsz,
        "decode_kernels": fast.decode_kernels,
        "decode_kernels_note": fast.decode_kernels_note,
        "step_ms": statistics.median(times),
        "step_ms_all": times,
        "capture_s": capture_s,
        "capture_error": step.capture_error,
        # routed experts read per MoE layer, mean over the profiled steps (the Triton expert kernels' calls; none
        # when the step runs other expert code), and the keys the middle profiled step attends
        "routed_hit_per_layer": [statistics.fmean(hits[i :: len(hits) // n_prof]) for i in range(len(hits) // n_prof)],
        "context_len": prompt_len + 2,
        "kernels_per_step": sum(len(v) for v in per_name.values()) / n_prof,
        "gpu_ms_per_step": sum(sum(v) for v in per_name.values()) / n_prof / 1e3,
        "top_kernels": [
            {"name": name[:160], "calls_per_step": len(v) / n_prof, "us_per_step": sum(v) / n_prof} for name, v in top
        ],
    }


def step_floor_lines(results: list[dict[str, Any]], bandwidth: float | None) -> list[str]:
    """Per batch size: the bytes a step must move (``flops.decode_bytes_per_step``: every weight it reads once, the
    routed experts the profiled steps hit, each row's K/V) and the step time that moving them at ``bandwidth``
    (the datasheet's, bytes/s) takes: the floor no kernel beats, beside the fastest measured step."""
    from llm_perf_opt.profiling.flops import decode_bytes_per_step

    cfg = DeepseekOCRConfig.from_json(CONFIG)
    lines = [
        "",
        "Floor per step: the bytes a step must move (weights once, the routed experts the profiled steps read, each"
        " row's K/V) at the datasheet bandwidth.",
        "",
        "| batch | routed experts read per MoE layer | GB per step | floor ms | fastest step ms | floor / fastest |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for bsz in sorted({r["batch"] for r in results}):
        mine = [r for r in results if r["batch"] == bsz and "step_ms" in r]
        hit = next((r for r in mine if r.get("routed_hit_per_layer")), None)
        if not mine or hit is None or bandwidth is None:
            why = "no step ran the Triton expert kernels" if hit is None else "no datasheet bandwidth for this GPU"
            lines.append(f"| {bsz} | not computed: {why if mine else 'no step measured'} | | | | |")
            continue
        per_layer = [round(h) for h in hit["routed_hit_per_layer"]]
        need = decode_bytes_per_step(cfg, hit["context_len"], 2, per_layer, batch=bsz).total_bytes
        floor_ms = need / bandwidth * 1e3
        best = min(r["step_ms"] for r in mine)
        lines.append(
            f"| {bsz} | {statistics.fmean(per_layer):.1f} | {need / 1e9:.2f} | {floor_ms:.3f} | {best:.3f} |"
            f" {floor_ms / best:.0%} |"
        )
    return lines


STEP_VARIANTS = (
    "torch",
    "triton, torch attention",
    "triton",
    "triton, pdl",
    "triton, pdl, no attention prefetch",
    "triton, pdl, fused router",
    "triton, pdl, fused router, 4 rows a program",
)
# the variants as --step-variants names them (no spaces): "triton+pdl+fused router" -> "triton, pdl, fused router"
STEP_VARIANT_NAMES = {v.replace(", ", "+").replace(" ", "-"): v for v in STEP_VARIANTS}


def batched_steps(
    batches: list[int],
    prompt_len: int,
    new_tokens: int,
    reps: int,
    bandwidth: float | None = None,
    variants: tuple[str, ...] = STEP_VARIANTS,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The batched decode step (``batched_decode.StaticBatchStep``, CUDA graph) of the full-size dummy model at
    each batch size, with the torch kernels and with ``decode_kernels="triton"`` (Triton norms, router and
    grouped-GEMM experts from 9 rows on), the Triton step again with its kernels as programmatic dependent launches
    (``pdl``), without the attention's K/V prefetch, and with each MoE layer's rows routed in its norm's kernel
    (``batched_fused_router``), plus the GPU time per kernel name of un-graphed steps (``variants``: which)."""
    from llm_perf_opt.models.deepseek_ocr import build_model
    from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, apply_fast_path
    from llm_perf_opt.models.deepseek_ocr.triton_layers import TritonRowAttention

    model = build_model(DeepseekOCRConfig.from_json(CONFIG), torch.device("cuda"), torch.bfloat16, "dummy")
    results: list[dict[str, Any]] = []
    lines = [
        f"Full-size dummy weights, prompt length {prompt_len} (every row), cache {prompt_len + new_tokens}; median of"
        f" {reps} graph replays per step (each replay is one step: slot and positions advance on the device).",
        "",
        "| batch | decode kernels | step ms | tok/s | capture s | kernels/step (un-graphed) |"
        " GPU ms/step (un-graphed) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]

    from llm_perf_opt.models.deepseek_ocr import kernels as triton_kernels

    no_prefetch = "triton, pdl, no attention prefetch"
    for variant in variants:
        kern = variant.split(",")[0]
        # (the last: kernels.ATTN_PREFETCH flipped, the row attention's K / V prefetch before its wait)
        attn_prefetch = (variant == no_prefetch) != triton_kernels.ATTN_PREFETCH
        # kernels.NORM_ROUTE_ROWS: the fused router's rows a program above 8 rows
        route_rows = 4 if variant.endswith("4 rows a program") else triton_kernels.NORM_ROUTE_ROWS
        fast = apply_fast_path(
            model,
            FastConfig(
                decode_kernels=kern,
                pdl="pdl" in variant,
                batched_fused_router="fused router" in variant,
                sam_compile=False,
                clip_compile=False,
                vision_graphs=False,
            ),
        )
        if variant == "triton, torch attention" and fast._triton_rows is not None:
            for layer in fast._triton_rows[0]:  # bench only: the row layers' attention back to the torch module
                if isinstance(layer.self_attn, TritonRowAttention):
                    layer.self_attn = layer.self_attn.attn
        for bsz in batches:
            try:
                with (  # read at the graph's capture
                    module_setting(triton_kernels, "ATTN_PREFETCH", attn_prefetch),
                    module_setting(triton_kernels, "NORM_ROUTE_ROWS", route_rows),
                ):
                    row = _measure_step(fast, model, bsz, prompt_len, new_tokens, reps)
            except Exception as exc:  # one failed point is reported with its error; the others still run
                traceback.print_exc()
                row = {"batch": bsz, "decode_kernels": variant, "error": f"{type(exc).__name__}: {exc}"}
                lines.append(f"| {bsz} | {variant} | failed: {row['error'][:200]} | | | | |")
                results.append(row)
                continue
            if fast.decode_kernels != kern:
                row["decode_kernels_note"] = f"asked for {kern}, ran {fast.decode_kernels}: {fast.decode_kernels_note}"
            row["decode_kernels"] = variant if fast.decode_kernels == kern else fast.decode_kernels
            results.append(row)
            flag = f" (capture failed: {row['capture_error']})" if row["capture_error"] else ""
            lines.append(
                f"| {bsz} | {row['decode_kernels']}{flag} | {row['step_ms']:.3f} | {bsz / row['step_ms'] * 1e3:.0f} |"
                f" {row['capture_s']:.2f} | {row['kernels_per_step']:.0f} | {row['gpu_ms_per_step']:.3f} |"
            )
            print(lines[-1], flush=True)
            torch.cuda.empty_cache()
    lines += step_floor_lines(results, bandwidth)
    for row in results:
        if "top_kernels" not in row:
            continue
        lines += [
            "",
            f"Top kernels, batch {row['batch']}, {row['decode_kernels']} (GPU µs per un-graphed step):",
            "",
            "| kernel | calls/step | µs/step |",
            "| --- | ---: | ---: |",
        ]
        lines += [
            f"| `{k['name'][:90]}` | {k['calls_per_step']:.0f} | {k['us_per_step']:.1f} |"
            for k in row["top_kernels"][:12]
        ]
    return results, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write <date>-<gpu>-kernels.md (and .json) into this directory")
    ap.add_argument("--calls", type=int, default=20, help="back-to-back calls per captured graph")
    ap.add_argument("--reps", type=int, default=50, help="timed graph replays (median)")
    ap.add_argument("--layers", type=int, default=12, help="copies of weights / caches the calls cycle through")
    ap.add_argument("--max-len", type=int, default=1200, help="KV cache length (prompt ~900 + new tokens)")
    ap.add_argument("--pos", type=int, default=1000, help="decode position attended up to")
    ap.add_argument("--sweep", action="store_true", help="also time moe / attention block-size variants")
    ap.add_argument(
        "--sweep-parts",
        default=",".join(SWEEP_PARTS),
        help=f"with --sweep: which variant groups ({', '.join(SWEEP_PARTS)}; comma-separated)",
    )
    ap.add_argument("--sm90-check", action="store_true", help="compile every kernel for sm_90 (no GPU needed)")
    ap.add_argument("--json", action="store_true", help="with --sm90-check: print the results as one JSON line")
    ap.add_argument("--grouped-tokens", default="9,16,32,64", help="row counts of the grouped expert kernels")
    ap.add_argument(
        "--batched-step",
        default="32,64",
        help="batch sizes of the full-model batched decode step, torch vs triton kernels ('' to skip)",
    )
    ap.add_argument(
        "--step-variants",
        default=",".join(STEP_VARIANT_NAMES),
        help=f"batched step: which variants, comma-separated ({', '.join(STEP_VARIANT_NAMES)})",
    )
    ap.add_argument("--step-prompt-len", type=int, default=283, help="batched step: prompt length (Base mode: 283)")
    ap.add_argument("--step-tokens", type=int, default=128, help="batched step: new tokens the cache holds")
    ap.add_argument("--step-reps", type=int, default=100, help="batched step: timed graph replays (median)")
    ap.add_argument("--only-grouped", action="store_true", help="skip the batch-1 decode ops (T = 1, 4)")
    ap.add_argument("--prompt-rows", type=int, default=913, help="the prompt router's rows (the Gundam page: 913)")
    args = ap.parse_args()
    parts = tuple(p for p in args.sweep_parts.split(",") if p)
    unknown = sorted(set(parts) - set(SWEEP_PARTS))
    if unknown:
        raise SystemExit(f"--sweep-parts: unknown {', '.join(unknown)}; choose from {', '.join(SWEEP_PARTS)}")
    names = [n for n in args.step_variants.split(",") if n]
    unknown_variants = sorted(set(names) - set(STEP_VARIANT_NAMES))
    if unknown_variants:
        raise SystemExit(
            f"--step-variants: unknown {', '.join(unknown_variants)}; choose from {', '.join(STEP_VARIANT_NAMES)}"
        )
    lang = DeepseekOCRConfig.from_json(CONFIG).language
    if args.sm90_check:
        results = sm90_check(lang)
        if args.json:
            print(json.dumps(results))
            return
        for r in results:
            status = r["error"][:200] or (
                f"{r['registers']} regs, {r['spill_bytes']} B spilled, {r['v4_loads']} v4 loads, "
                f"{r['shared_bytes']:,} B shared{over_limit(r)}"
            )
            print(f"{r['kernel']:24s} {json.dumps(r['constexprs'])}: {status}")
        return
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; nothing timed (--sm90-check compiles the kernels without a GPU)")
        return
    if args.pos >= args.max_len:
        raise SystemExit(f"--pos {args.pos} must be < --max-len {args.max_len}")
    import triton

    from llm_perf_opt.profiling.bench_meta import benchmark_header
    from llm_perf_opt.profiling.peaks import match_peak

    env = {**benchmark_header(torch.device("cuda")), "triton": triton.__version__}
    spec = match_peak(env["gpu"])
    peaks = None
    if spec is not None:
        peaks = (spec.mem_bw_bytes_per_s, spec.bf16_dense_flops)
        env["peak_source"] = f"{spec.name}: {spec.source_title}"
    bench = Bench(lang, args, torch.device("cuda"))
    rows: list[Row] = []
    grouped_tokens = [int(t) for t in args.grouped_tokens.split(",") if t]
    with torch.inference_mode():
        if not args.only_grouped:
            rows += [bench.norm(1), bench.rope(1), bench.attention(1), bench.attention(1, one_launch=True)]
            rows += [bench.route(1), bench.route(1, logits_in=True), bench.norm_route(1)]
            rows += [bench.pick(1)]
            # the prompt router at the Gundam page's 913 rows: its default launch, then the other forms
            rows += [bench.route_rows(args.prompt_rows)]
            rows += [bench.route_rows(args.prompt_rows, **blocks) for blocks in ROUTE_ROWS_VARIANTS]
            rows += [bench.route_rows(args.prompt_rows, fp32=True), bench.route_rows(32), bench.route_rows(64)]
            rows += [bench.linear(1, n_out, name) for name, n_out in projections(bench.lang)]
            rows += [bench.qkv_rope(1)]
            # the up kernel's loop plain and software-pipelined (moe_experts(stages_up=...)) in the same run, and
            # the default kernels as dependent launches (each call's up kernel waits on the previous call's down)
            for tokens in (1, 4):
                if tokens == 4:
                    rows += [bench.route(4), bench.norm_route(4)]
                rows += [bench.experts(tokens, stages_up=n) for n in (0, 2, 3)]
                rows += [bench.experts(tokens, pdl=True)]
                # the split down form (moe_experts(down="split")) in the same run: before / after in one table
                rows += [bench.experts(tokens, down="split", stages_down=n) for n in (0, DOWN_SPLIT_STAGES)]
                rows += [bench.experts(tokens, down="split", pdl=True)]
        for tokens in grouped_tokens:
            if tokens <= 16:  # the GEMV kernels re-read weights per token: where the grouped kernels take over
                rows.append(bench.experts(tokens))
            rows.append(bench.experts_grouped(tokens))
            if tokens >= 32:
                rows.append(bench.reads_cost(tokens))
            rows.append(bench.norm_route(tokens, counted=False))  # the batched steps' (batched_fused_router)
            if tokens >= 16:  # each program's router slice read once for several rows (kernels.NORM_ROUTE_ROWS)
                rows += [bench.norm_route(tokens, counted=False, rows_per_program=r) for r in (2, 4, 8)]
        rows.append(bench.reads_cost(8))  # the GEMV kernels' count: the widest batched step they run (a drain's)
        rows.append(bench.norm_route(8, counted=False))
        print(render(rows, env, args, [], peaks), flush=True)  # the op rows first, in case a later part fails
        split_lines = [] if args.only_grouped else bench.attention_split_rules()
        # ...and written, marked partial, so a call cut short during the batched step keeps them (rewritten below)
        write_results(args.out, env, rows, split_lines, [], [], render(rows, env, args, [], peaks, [], split_lines))
        bench._moe_layers.clear()  # ~5 GB of expert copies per row count: freed before the full model is built
        torch.cuda.empty_cache()
    step_rows: list[dict[str, Any]] = []
    step_lines: list[str] = []
    step_batches = [int(b) for b in args.batched_step.split(",") if b]
    if step_batches:  # the model as the batched generator runs it: no_grad, not inference mode
        with torch.no_grad():
            bandwidth = None if peaks is None else peaks[0]
            step_rows, step_lines = batched_steps(
                step_batches,
                args.step_prompt_len,
                args.step_tokens,
                args.step_reps,
                bandwidth,
                tuple(STEP_VARIANT_NAMES[n] for n in names),
            )
    with torch.inference_mode():
        sweep: list[str] = []
        if args.sweep:
            head = ["| op | T | config | triton µs | GB/s |", "| --- | ---: | --- | ---: | ---: |"]
            sweep = run_sweep(bench, parts) if not args.only_grouped else [*head, *run_grouped_sweep(bench)]
    text = render(rows, env, args, sweep, peaks, step_lines, split_lines)
    print(text)
    write_results(args.out, env, rows, split_lines, step_rows, sweep, text, partial=False)


def write_results(
    out_dir: str | None,
    env: dict[str, Any],
    rows: list[Row],
    split_lines: list[str],
    step_rows: list[dict[str, Any]],
    sweep: list[str],
    text: str,
    partial: bool = True,
) -> None:
    """``<date>-<gpu>-kernels.md`` and ``.json`` in ``out_dir`` (nothing when None); ``partial``: written before the
    batched step and the sweep ran, and says so at its top."""
    if not out_dir:
        return
    from llm_perf_opt.profiling.bench_meta import gpu_tag

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{dt.date.today().isoformat()}-{gpu_tag(env['gpu'])}-kernels"
    if partial:
        text = "**Partial: the op rows only; the batched step and the sweep had not run yet.**\n\n" + text
    (out / f"{stem}.md").write_text(text)
    payload = {
        "env": env,
        "partial": partial,
        "rows": [attrs.asdict(r) for r in rows],
        "attention_split_rules": split_lines,
        "batched_step": step_rows,
        "sweep": sweep,
    }
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {out / stem}.md{' (partial)' if partial else ''}", file=sys.stderr)


if __name__ == "__main__":
    main()
