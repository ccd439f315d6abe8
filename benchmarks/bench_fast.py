"""Eager vs fast path of the native DeepSeek-OCR (and the vendor HF code), side by side, on one GPU (issue 9).

Full-size dummy weights in bf16, one synthetic 1224×1584 page in Gundam mode.  Measures with CUDA events
after warm-up: vision ms (and SAM / CLIP / projector alone), LM prefill ms, decode ms/token over N tokens
(batch 1), peak memory, greedy-token parity for the first 64 steps, plus fast-path variants (decode kernels,
decode attention, expert kernel, no graphs, prefill graphs, vision SDPA backends, dense-masked MoE prefill)
and a kernel profile of one fast decode step.  The first table holds every goal of issue 9 with its
measured value, in ONE run, so the ratios hold even though absolute times move ±25–50 % between machines.

With ``--vendor DIR`` (a snapshot holding the vendor's remote code, e.g. models/deepseek-ocr) the vendor
path is measured first in a subprocess (``benchmarks/hf_remote_check.py``; transformers 4.46.x must be
importable there: ``--vendor-pythonpath`` is prepended to its PYTHONPATH) and gets its own column.

    PYTHONPATH=src python benchmarks/bench_fast.py --out benchmarks/results [--vendor models/deepseek-ocr]

Writes ``<out>/<date>-<gpu>-fast.md`` (markdown table + environment) and ``.json`` next to it.
Imports only torch/attrs/safetensors/pillow code paths (no hydra).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import torch

from llm_perf_opt.data.datasets import synthetic_page
from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model
from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, FastModel, apply_fast_path
from llm_perf_opt.models.deepseek_ocr.preprocess import PreprocessConfig, preprocess_page
from llm_perf_opt.models.deepseek_ocr.tokenizer import load_tokenizer
from llm_perf_opt.profiling.bench_meta import benchmark_header, gpu_tag
from llm_perf_opt.profiling.flops import activated_params_per_token, decode_bytes, prefill_flops, vision_flops
from llm_perf_opt.profiling.peaks import match_peak

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmath next to this script, also under `python -m`
from benchmath import (
    cuda_ms,
    decode_step_profile,
    fmt,
    goals_table,
    mbu_pct,
    mfu_pct,
    module_setting,
    paired_ab,
    ratio,
    step_timeline,
)

CONFIG = "src/llm_perf_opt/models/deepseek_ocr/configs/deepseek-ocr.json"
PROMPT = "<image>\n<|grounding|>Convert the document to markdown."
GiB = 2**30
ROOT = Path(__file__).resolve().parents[1]
# Goals of issue 9 (set for an H100 80GB, bf16, Gundam page, dummy weights): benchmath.ISSUE9.


class Page:
    def __init__(self, cfg: DeepseekOCRConfig, device: torch.device, dtype: torch.dtype) -> None:
        ids = load_tokenizer(None, cfg).encode_prompt(PROMPT)
        self.prep = preprocess_page(synthetic_page((1224, 1584), 0), PreprocessConfig.for_mode("gundam"), cfg, ids)
        self.crops = self.prep.images_crop.to(device, dtype)
        self.ori = self.prep.images_ori.to(device, dtype)
        self.prompt_len = int(self.prep.prompt_len)

    def vision(self, m: Any) -> torch.Tensor:
        return m.encode_images(self.crops, self.ori, self.prep.images_spatial_crop)

    def sam(self, m: Any) -> None:
        """SAM alone on the page's views (tiles batched, then the global view); a FastModel's vision settings."""
        base = m.base if isinstance(m, FastModel) else m
        ctx = m.vision_mode() if isinstance(m, FastModel) else contextlib.nullcontext()
        with base._sdpa_policy(), ctx:
            base.model.sam_model(self.crops)
            base.model.sam_model(self.ori)

    def components(self, m: Any) -> dict[str, Callable[[], Any]]:
        """SAM, CLIP and the projector each alone on the page's views (inputs precomputed), as callables (CLIP as the
        page runs it: both views in one call with ``clip_merged_views``)."""
        base = m.base if isinstance(m, FastModel) else m
        ctx: Callable[[], Any] = m.vision_mode if isinstance(m, FastModel) else contextlib.nullcontext
        mm = base.model
        with base._sdpa_policy(), ctx():
            sam_feats = [mm.sam_model(self.crops), mm.sam_model(self.ori)]
            clip_feats = [mm.vision_model(x, f) for x, f in zip((self.crops, self.ori), sam_feats, strict=True)]
            proj_in = [
                torch.cat((c[:, 1:], f.flatten(2).permute(0, 2, 1)), dim=-1)
                for c, f in zip(clip_feats, sam_feats, strict=True)
            ]

        def sam() -> None:
            with base._sdpa_policy(), ctx():
                mm.sam_model(self.crops)
                mm.sam_model(self.ori)

        def clip() -> None:
            with base._sdpa_policy(), ctx():
                if base._clip_views_merged():  # clip_merged_views: one call, as the page's encode makes it
                    mm.vision_model(None, tuple(sam_feats))
                    return
                for x, f in zip((self.crops, self.ori), sam_feats, strict=True):
                    mm.vision_model(x, f)

        def projector() -> None:
            for t in proj_in:
                mm.projector(t)

        return {"sam": sam, "clip": clip, "projector": projector}

    def embeds(self, m: Any) -> torch.Tensor:
        return m.embed_prompt(self.prep.input_ids, self.prep.images_seq_mask, [self.vision(m)])


# sam_kernels.BY_GRID settings bench_fast times on the whole vision (label, {grid width: (block_m, block_n, warps,
# stages, patch_w)}); each compiled for sm_90 without spills with the local Triton (bench_kernels --sm90-check holds
# the 640-px ones to it).
SAM_GRID_CANDIDATES: list[tuple[str, dict[int, tuple[int, ...]]]] = [
    # round 22: round 21's shipped settings (the tiles' patches at 2 k/v stages; the default is 3 since round 22)
    ("round 21's settings (tiles at 2 stages)", {40: (64, 64, 4, 2, 8), 48: (128, 64, 8, 3, 8)}),
    # round 16: the tiles' 40-wide grid (v2's 48-wide) in patches of 8 key columns, 64 keys a step with no padding
    # columns (the default's one-row steps leave 24 of 64 empty); round 15's several-whole-rows candidates were all
    # slower or within 1 % (benchmarks/README.md) and are not re-timed
    ("tiles 8x8 patches", {40: (64, 64, 4, 2, 8), 48: (64, 64, 4, 2, 8)}),
    ("tiles 8x8 patches, 128 queries 8 warps", {40: (128, 64, 8, 2, 8), 48: (128, 64, 8, 2, 8)}),
    ("tiles 16x8 patches, 128 queries 8 warps", {40: (128, 128, 8, 2, 8), 48: (128, 128, 8, 2, 8)}),
]


def decode_loop(m: Any, embeds: torch.Tensor, steps: int, keep: int) -> dict[str, Any]:
    """Prefill, then ``steps`` host-greedy decode steps (argmax read on the host each step, as generate())."""
    cache = m.new_cache(batch=1, max_len=embeds.shape[1] + steps + 1)
    logits = m.prefill(embeds, cache)
    if isinstance(m, FastModel):  # capture the graph outside the timed region
        t0 = time.perf_counter()
        if m.fast_config.cuda_graphs:
            m.decoder_for(cache)._capture()
        torch.cuda.synchronize()
        capture_s = time.perf_counter() - t0
    else:
        capture_s = 0.0
    tokens = [int(logits.argmax(-1))]
    rows = [logits[0].float().cpu()]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    t0 = time.perf_counter()
    for i in range(steps):
        logits = m.decode_step(torch.tensor([[tokens[-1]]], device=embeds.device), cache)
        tokens.append(int(logits.argmax(-1)))  # host sync per token, like select_next_token
        if i + 1 < keep:
            rows.append(logits[0].float().cpu())
    end.record()
    end.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    return {
        "ms_per_token": start.elapsed_time(end) / steps,
        "wall_ms_per_token": wall / steps,
        "tokens": tokens,
        "rows": rows,
        "capture_s": capture_s,
        "kv_bytes": cache.nbytes,
    }


def greedy_device(m: FastModel, embeds: torch.Tensor, steps: int, ngram: int = 0) -> dict[str, Any]:
    """Prefill, then ``steps`` on-device greedy steps (graph replays, no per-token host sync); ``ngram``: under
    the no-repeat-ngram rule of that size (the default config's is 20; 0: none, the goals' rows).  The rule's
    history holds zeros at the prompt's positions (only its embeddings are here, not its ids): the same work per
    step as the CLI's, and the same input for both sides of an A/B."""
    cache = m.new_cache(batch=1, max_len=embeds.shape[1] + steps + 1)
    first = m.prefill(embeds, cache).argmax(-1, keepdim=True)
    dec = m.decoder_for(cache, ngram)
    if m.fast_config.cuda_graphs:
        dec._capture()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    rows = dec.greedy(first, steps)
    end.record()
    end.synchronize()
    return {"ms_per_token": start.elapsed_time(end) / steps, "tokens": [int(first[0, 0]), *rows[0]]}


def prefill_ms(m: Any, embeds: torch.Tensor) -> float:
    cache = m.new_cache(batch=1, max_len=embeds.shape[1] + 8)

    def run() -> None:
        cache.reset()
        m.prefill(embeds, cache)

    return cuda_ms(run, warmup=2, reps=5)


SPREAD_LABEL = "routing spread at random after the router (every expert of every layer read, as on a real page)"


@contextlib.contextmanager
def spread_routing(tokens: int, n_experts: int, top_k: int, seed: int = 0, device: str = "cuda") -> Iterator[list[int]]:
    """Inside the block, a ``tokens``-row call of the Triton routers (``kernels.moe_route_rows``, or
    ``kernels.moe_route``: the prefill's at a page's rows, or a batched decode step's at its batch's rows; or
    ``kernels.add_rms_norm_route``, the norm that routes the batched steps' rows with ``batched_fused_router``, whose
    normed and summed rows are kept) runs as
    usual and then returns fixed random picks instead of its ids: each token's ``top_k`` distinct experts drawn
    uniformly (seeded), so the expert kernels that follow read every expert's weights, as a real checkpoint's spread
    routing does.  The router's own cost stays in the time; other row counts are left alone.  The picks are one
    tensor, so a CUDA graph captured inside the block reads it: replay such a graph only inside the block.  A
    benchmark double only: the logits are then not the model's.  Yields a list that gets the row count of every call
    it spread (empty: nothing ran the Triton routers at ``tokens`` rows, so the routing stayed the model's)."""
    from llm_perf_opt.models.deepseek_ocr import kernels

    gen = torch.Generator().manual_seed(seed)
    picks = torch.rand(tokens, n_experts, generator=gen).argsort(dim=1)[:, :top_k].to(device)
    names = ("moe_route", "moe_route_rows", "add_rms_norm_route")
    real = {name: getattr(kernels, name) for name in names}

    applied: list[int] = []

    def spread(router: Callable[..., tuple[torch.Tensor, ...]]) -> Callable[..., Any]:
        def route(x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
            out = router(x, *args, **kwargs)  # (idx, weights), or (normed, summed, idx, weights) from the norm's
            if x.shape[0] != tokens:
                return out
            applied.append(tokens)
            *kept, idx, weights = out
            return (*kept, picks.to(idx.dtype), weights)

        return route

    try:
        for name in names:
            setattr(kernels, name, spread(real[name]))
        yield applied
    finally:
        for name in names:
            setattr(kernels, name, real[name])


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None


def device_kernels(prof: Any) -> list[tuple[str, float, float, Any]]:
    """A torch profiler's device events as (name, start µs, duration µs, stream), in start order."""
    return sorted(
        (
            (e.name, float(e.time_range.start), float(e.device_time), e.device_resource_id)
            for e in prof.events()
            if e.device_type.name == "CUDA"
        ),
        key=lambda k: k[1],
    )


def profile_decode_step(m: FastModel, embeds: torch.Tensor, out: Path, compile_mode: str = "none") -> dict[str, Any]:
    """Kernels of un-graphed fast decode steps: count and GPU time per step (what the graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    eager_cfg = FastConfig(cuda_graphs=False, decode_compile=compile_mode)
    fm = apply_fast_path(m, eager_cfg)
    cache = fm.new_cache(batch=1, max_len=embeds.shape[1] + 16)
    tok = fm.prefill(embeds, cache).argmax(-1, keepdim=True)
    for _ in range(3):
        fm.decode_step(tok, cache)
    torch.cuda.synchronize()
    n = 5
    # the same token fed every step: an argmax here would add the benchmark's own reduction (~27 us) to the step
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fm.decode_step(tok, cache)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    suffix = "" if compile_mode == "none" else f"_compile_{compile_mode}"
    (out / f"fast_decode_profile{suffix}.txt").write_text(table)
    return decode_step_profile([(start, dur, stream) for _, start, dur, stream in device_kernels(prof)], n)


def profile_graphed_decode_step(m: FastModel, embeds: torch.Tensor, out: Path, steps: int = 20) -> dict[str, Any]:
    """Where the graphed decode step's time goes (``m``'s own config: CUDA graph, dependent launches): ``steps``
    replays of the on-device greedy loop (:meth:`FastDecoder.greedy`, what the session and ``greedy_device`` run:
    replay after replay, nothing between) under the profiler, which records each kernel of a graph replay; per
    kernel its busy and idle-before µs per step (:func:`benchmath.step_timeline`), written to
    ``fast_decode_timeline.md``.  The un-graphed profile (:func:`profile_decode_step`) counts kernels as launched
    one by one; this one is the step as it runs.  Until round 29 it profiled ``decode_step`` instead, whose host
    sets the position and copies the token in before each replay: two more kernels and ~30 µs more idle a step
    on an H100 (round 29), which the on-device loop does not pay."""
    from torch.profiler import ProfilerActivity, profile

    cache = m.new_cache(batch=1, max_len=embeds.shape[1] + steps + 16)
    first = m.prefill(embeds, cache).argmax(-1, keepdim=True)
    dec = m.decoder_for(cache)
    dec.greedy(first, 3)  # capture, then replays (their tokens are not used)
    torch.cuda.synchronize()

    # one replay alone names the kernels that open and close a step: the loop's set-up before its first replay
    # (the token and position written, the profiler's first launch) and its read-back after the last are then
    # totalled apart, not spread over the steps (round 31's first table, on round 30's tree, put a 1.7 ms set-up
    # gap at 86 µs a step)
    assert dec.graph is not None, dec.capture_error
    with profile(activities=[ProfilerActivity.CUDA]) as one:
        dec.graph.replay()
        torch.cuda.synchronize()
    replay = device_kernels(one)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.greedy(first, steps)  # one read-back at its end (a copy of the chosen tokens), no sync between steps
        torch.cuda.synchronize()
    kernels = device_kernels(prof)
    tl = step_timeline(kernels, steps, first=replay[0][0], last=replay[-1][0])
    out_ = tl["outside"]
    window_note = (
        ""
        if tl["events_in_steps"] == steps * len(replay)
        else f" **Check the window**: {tl['events_in_steps']} kernels fell between the first and the last replay's"
        f" opening and closing kernels, not {steps} × {len(replay)} (a set-up kernel named like a step's first?)."
    )
    lines = [
        f"Graphed decode step, {steps} replays of the on-device greedy loop (batch 1, the page's prompt; one"
        " read-back of the tokens at the end):"
        f" busy {tl['busy_us_per_step']:.1f} µs + idle {tl['idle_us_per_step']:.1f} µs = span"
        f" {tl['span_us_per_step']:.1f} µs per step on the device, {len(replay)} kernels per step (one replay"
        f" profiled alone). Left out, once per loop: {out_['events']} kernels before the first replay or after the"
        f" last (set-up, read-back), {out_['busy_us']:.1f} µs busy + {out_['idle_us']:.1f} µs idle.{window_note}",
        "",
        "| kernel | calls/step | busy µs/step | idle µs before it/step | raw µs/call |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| `{r['kernel'][:70]}` | {r['calls_per_step']:.1f} | {r['busy_us_per_step']:.1f} |"
        f" {r['idle_us_before_per_step']:.1f} | {r['raw_us_per_call']:.2f} |"
        for r in tl["rows"]
    ]
    lines += [
        "",
        "Where the idle time sits (the kernel whose end the stream waited from → the kernel that then started):",
        "",
        "| after | before | gaps/step | idle µs/step |",
        "| --- | --- | ---: | ---: |",
    ]
    lines += [
        f"| `{g['after'][:60]}` | `{g['before'][:60]}` | {g['gaps_per_step']:.1f} | {g['idle_us_per_step']:.1f} |"
        for g in tl["gaps"][:8]
    ]
    (out / "fast_decode_timeline.md").write_text("\n".join(lines) + "\n")
    return tl


def profile_sam(m: Any, page: Page, out: Path, tag: str, stage: str = "sam", rows: int = 20) -> None:
    """Top kernels of one ``stage`` pass over the page's views (``sam``; ``vision``: SAM, CLIP, projector and
    layout, where CLIP's time goes beside SAM's), to ``<stage>_profile_<tag>.txt``."""
    from torch.profiler import ProfilerActivity, profile

    run = getattr(page, stage)
    run(m)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(m)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)
    (out / f"{stage}_profile_{tag}.txt").write_text(table)


def profile_prefill(m: Any, embeds: torch.Tensor, out: Path) -> None:
    """Top kernels of one LM prefill over the page's prompt (``m`` ungraphed), to ``prefill_profile_fast.txt``."""
    from torch.profiler import ProfilerActivity, profile

    cache = m.new_cache(batch=1, max_len=embeds.shape[1] + 8)
    m.prefill(embeds, cache)
    torch.cuda.synchronize()
    cache.reset()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        m.prefill(embeds, cache)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    (out / "prefill_profile_fast.txt").write_text(table)


def run_vendor(path: Path, tokens: int, pythonpath: str | None, out: Path) -> dict[str, Any]:
    """The vendor HF remote code through ``hf_remote_check.py`` in a subprocess (own transformers pin);
    its JSON, or ``{"error": ...}`` (the rest of the benchmark still runs)."""
    target = out / "vendor_hf_remote.json"
    env = dict(os.environ)
    paths = [p for p in (pythonpath, str(ROOT / "src"), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    cmd = [sys.executable, str(ROOT / "benchmarks/hf_remote_check.py"), "--path", str(path)]
    cmd += ["--tokens", str(tokens), "--out", str(target)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    if not target.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"hf_remote_check exit {proc.returncode}: {' | '.join(tail)}"[:400]}
    data: dict[str, Any] = json.loads(target.read_text())
    data["check_exit"] = proc.returncode
    return data


def add_efficiency(res: dict[str, Any], r: dict[str, Any]) -> None:
    """MFU of vision, SAM, CLIP, projector and the LM prefill; decode MBU (activated weights + KV per token)."""
    peak = res["peak_bf16_flops"]
    r["vision_mfu_pct"] = mfu_pct(res["vision_flops"], r.get("vision_ms"), peak)
    r["sam_mfu_pct"] = mfu_pct(res["sam_flops"], r.get("sam_ms"), peak)
    for comp, flops in res["component_flops"].items():
        r[f"{comp}_mfu_pct"] = mfu_pct(flops, r.get(f"{comp}_alone_ms"), peak)
    r["prefill_lm_mfu_pct"] = mfu_pct(res["prefill_lm_flops"], r.get("prefill_ms"), peak)
    ms = r.get("decode_device_greedy_ms_per_token") or r.get("decode_ms_per_token")
    r["decode_mbu_pct"] = mbu_pct(res["decode_bytes_per_token"], ms, res["peak_bytes_per_s"])


def time_components(page: Page, m: Any) -> dict[str, float]:
    """Median ms of SAM, CLIP and the projector, each alone on the page's views."""
    return {f"{k}_alone_ms": cuda_ms(fn, warmup=2, reps=5) for k, fn in page.components(m).items()}


# bench_fast's variant groups (--parts): each times the switches of one part beside the default, in this order; the
# kernel profiles (decode step, SAM, the serial vision) always run
# ("settings": the recent rounds' module settings and switches, each flipped beside the default, vision and prefill
# rows paired: the greedy step's end on the device (fast_decoder.HOST_STEP_END), the windows' tables in one launch
# (sam_kernels.GATHER_MAX_GRID), SAM's one-hot position terms in the score product's accumulator
# (sam_kernels.BIAS_IN_MMA), the one-row steps' rel_h term in the row's max (sam_kernels.ROW_TERM_IN_MAX), the
# prompt's shared experts on a second stream (prefill_shared_stream, also with the
# routing spread), the prompt attention's key chunks (prompt_attention.SPLIT_STEPS) and the up GEMM's stages)
VARIANT_PARTS = ("vision", "by-grid", "tables", "decode", "prefill", "settings", "other")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--parity-steps", type=int, default=64)
    ap.add_argument("--eager-decode-tokens", type=int, default=128, help="eager is ~20 ms/token: fewer suffice")
    ap.add_argument("--vendor", default=None, help="snapshot dir with the vendor remote code (adds its column)")
    ap.add_argument("--vendor-pythonpath", default=None, help="prepended to PYTHONPATH for the vendor subprocess")
    ap.add_argument("--vendor-tokens", type=int, default=64, help="vendor decode tokens (it is ~30 ms/token)")
    ap.add_argument(
        "--decode-compile-variant",
        action="store_true",
        help="also time and profile decode_compile='default' (~35 s of compile per max_len)",
    )
    ap.add_argument(
        "--vision-compile-variant",
        action="store_true",
        help="also time vision_compile_mode='max-autotune-no-cudagraphs' (inductor autotunes every block shape: "
        "its first vision call may take minutes)",
    )
    ap.add_argument(
        "--parts",
        default=",".join(VARIANT_PARTS),
        help="comma-separated variant groups to run after the eager and default fast rows (default: all of "
        f"{', '.join(VARIANT_PARTS)}); fewer fit a short device call",
    )
    ap.add_argument(
        "--ab-rounds",
        type=int,
        default=6,
        help="rounds of the paired A/B rows (a vision or prefill variant and the default timed alternately, judged "
        "by the sign test over the rounds; 0: no paired rows)",
    )
    args = ap.parse_args()
    if args.ab_rounds < 0:
        raise SystemExit(f"--ab-rounds must be >= 0, got {args.ab_rounds}")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(VARIANT_PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown group(s) {unknown}; choose from {', '.join(VARIANT_PARTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        raise SystemExit("bench_fast needs CUDA")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    res: dict[str, Any] = {"env": benchmark_header(torch.device("cuda"))}
    spec = match_peak(torch.cuda.get_device_name(dev))
    if spec is None:
        raise SystemExit(f"no datasheet peak for {torch.cuda.get_device_name(dev)!r} in profiling/peaks.py PEAK_TABLE")
    res["peak_bf16_flops"], res["peak_bytes_per_s"], res["peak_source"] = (
        spec.bf16_dense_flops,
        spec.mem_bw_bytes_per_s,
        f"{spec.name}: {spec.source}",
    )
    if args.vendor:  # first, while the GPU is empty; a separate process with its own transformers
        print("vendor HF remote code ...", flush=True)
        res["vendor"] = run_vendor(Path(args.vendor), args.vendor_tokens, args.vendor_pythonpath, out)
        print("vendor:", {k: v for k, v in res["vendor"].items() if not isinstance(v, dict)}, flush=True)
    t0 = time.perf_counter()
    cfg = DeepseekOCRConfig.from_json(CONFIG)
    model = build_model(cfg, dev, dtype, "dummy")
    res["build_s"] = time.perf_counter() - t0
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    page = Page(cfg, dev, dtype)
    res["prompt_len"] = page.prompt_len
    res["grid"] = list(page.prep.images_spatial_crop)
    grid_w, grid_h = (int(v) for v in res["grid"])
    views = [(grid_w * grid_h, cfg.image_size, cfg.image_size), (1, cfg.base_size, cfg.base_size)]
    sam_f, clip_f, proj_f = vision_flops(cfg, views)
    res["vision_flops"] = sam_f.total_flops + clip_f.total_flops + proj_f.total_flops
    res["sam_flops"] = sam_f.total_flops
    res["component_flops"] = {"sam": sam_f.total_flops, "clip": clip_f.total_flops, "projector": proj_f.total_flops}
    res["prefill_lm_flops"] = prefill_flops(cfg.language, page.prompt_len).total_flops
    res["activated_params_per_token"] = activated_params_per_token(cfg)
    res["n_routed_experts"] = cfg.language.n_routed_experts
    # the report's MBU numerator: activated weights + K/V read and written, summed over the decode steps
    decode_total = decode_bytes(cfg, page.prompt_len, args.decode_tokens + 1, dtype_bytes=2).total_bytes
    res["decode_bytes_per_token"] = decode_total / args.decode_tokens
    res["decode_roofline_ms"] = res["decode_bytes_per_token"] / res["peak_bytes_per_s"] * 1e3
    steps = args.decode_tokens
    keep = args.parity_steps
    print(f"built in {res['build_s']:.1f}s; prompt {page.prompt_len} tokens; grid {res['grid']}", flush=True)

    with torch.inference_mode():
        # ---------------- eager
        eager: dict[str, Any] = {}
        eager["vision_ms"] = cuda_ms(lambda: page.vision(model), warmup=1, reps=5)
        eager["sam_ms"] = cuda_ms(lambda: page.sam(model), warmup=1, reps=5)
        eager.update(time_components(page, model))
        embeds = page.embeds(model)
        eager["prefill_ms"] = prefill_ms(model, embeds)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
        res["eager_decode_tokens"] = max(args.eager_decode_tokens, keep)
        e_dec = decode_loop(model, embeds, res["eager_decode_tokens"], keep)
        eager["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        eager["peak_over_base_gib"] = (torch.cuda.max_memory_allocated() - base_mem) / GiB
        eager["decode_ms_per_token"] = e_dec["ms_per_token"]
        eager["decode_wall_ms_per_token"] = e_dec["wall_ms_per_token"]
        kv_bytes = e_dec["kv_bytes"]
        print("eager:", {k: round(v, 3) for k, v in eager.items()}, flush=True)

        # ---------------- fast (default config)
        t1 = time.perf_counter()
        fast = apply_fast_path(model, FastConfig())
        torch.cuda.synchronize()
        res["apply_fast_path_s"] = time.perf_counter() - t1
        res["fast_config"] = attrs.asdict(fast.fast_config)
        fres: dict[str, Any] = {}
        t1 = time.perf_counter()
        page.vision(fast)
        torch.cuda.synchronize()
        res["first_fast_vision_s"] = time.perf_counter() - t1  # includes torch.compile of SAM / CLIP blocks
        fres["vision_ms"] = cuda_ms(lambda: page.vision(fast), warmup=2, reps=7)
        fres["sam_ms"] = cuda_ms(lambda: page.sam(fast), warmup=2, reps=7)
        fres.update(time_components(page, fast))
        graphs = fast._vision_graphs or ()
        res["vision_graphs"] = {
            "shapes": [len(g.graphs) for g in graphs],
            "capture_errors": [g.capture_error for g in graphs],
        }
        f_embeds = page.embeds(fast)
        fres["embeds_max_abs_diff"] = float((f_embeds.float() - embeds.float()).abs().max())
        fres["prefill_ms"] = prefill_ms(fast, embeds)
        # the routed experts the prefill read per MoE layer: dummy weights route the page's 913 tokens to fewer
        # experts than random top-6 routing would (all 64), so the LM prefill reads fewer expert weights than
        # that; bench_fusions' "grouped" part times the experts under random routing
        fres["prefill_experts_hit_per_layer"] = fast.experts_hit_per_layer()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
        f_dec = decode_loop(fast, embeds, steps, keep)
        fres["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        fres["peak_over_base_gib"] = (torch.cuda.max_memory_allocated() - base_mem) / GiB
        fres["decode_ms_per_token"] = f_dec["ms_per_token"]
        fres["decode_wall_ms_per_token"] = f_dec["wall_ms_per_token"]
        fres["graph_capture_s"] = f_dec["capture_s"]  # includes torch.compile when decode_compile is on
        fres["capture_error"] = fast._decoder.capture_error if fast._decoder else None
        g = greedy_device(fast, embeds, steps)
        fres["decode_device_greedy_ms_per_token"] = g["ms_per_token"]
        fres["device_greedy_tokens_match_step_loop"] = g["tokens"][: keep + 1] == f_dec["tokens"][: keep + 1]
        et, ft = e_dec["tokens"][: keep + 1], f_dec["tokens"][: keep + 1]
        fres["tokens_identical"] = et == ft
        for r in (eager, fres):
            add_efficiency(res, r)
        fres["first_divergence"] = first_divergence(et, ft)
        diffs = [float((a - b).abs().max()) for a, b in zip(e_dec["rows"], f_dec["rows"], strict=False)]
        scale = max(float(r.abs().max()) for r in e_dec["rows"])
        fres["logits_max_abs_diff"] = max(diffs)
        fres["logits_max_abs"] = scale
        print("fast:", fres, flush=True)

        # ---------------- variants
        var: dict[str, Any] = {}

        def checkpoint(next_part: str | None) -> None:
            """Write the report as it stands: a call cut short by its time limit keeps what was measured."""
            res.update(eager=eager, fast=fres, variants=var, weight_gib=weight_bytes / GiB, kv_gib=kv_bytes / GiB)
            res["decode_tokens"] = steps
            if next_part is None:
                res.pop("partial", None)
            else:
                res["partial"] = f"written before {next_part} ran; rows after it are missing if the run stopped there"
            write_report(res, out, keep, echo=next_part is None)

        checkpoint("the variants")
        if args.decode_compile_variant:
            other = "none" if fast.fast_config.decode_compile != "none" else "default"
            try:
                t2 = time.perf_counter()
                cm = apply_fast_path(model, FastConfig(decode_compile=other))
                c_dec = decode_loop(cm, embeds, steps, keep)  # same max_len as above: one compile
                var[f"decode compile={other}: first capture incl. compile s"] = time.perf_counter() - t2
                var[f"decode compile={other} (host greedy) ms/token"] = c_dec["ms_per_token"]
                var[f"decode compile={other} (device greedy) ms/token"] = greedy_device(cm, embeds, steps)[
                    "ms_per_token"
                ]
                ct = c_dec["tokens"][: keep + 1]
                var[f"decode compile={other}: tokens == eager, {keep} steps"] = (
                    f"{ct == et} (first divergence {first_divergence(et, ct)})"
                )
                del cm, c_dec
            except Exception as exc:  # a compile failure must not lose the rest of the report
                var[f"decode compile={other}"] = f"failed: {type(exc).__name__}: {exc}"[:200]
        checkpoint("the vision variants")
        vision_configs = {
            "sam_fast=False (reference SAM, no graph), CLIP graphed": FastConfig(
                sam_fast=False, sam_compile=False, clip_compile=False
            ),
            "sam_fast=True, no compile, graphs": FastConfig(sam_compile=False, clip_compile=False),
            "sam_fast=True, compile, no graphs": FastConfig(vision_graphs=False),
        }
        for name, vcfg in vision_configs.items() if "vision" in parts else ():
            vm = apply_fast_path(model, vcfg)
            var[f"vision {name} ms"] = cuda_ms(functools.partial(page.vision, vm), 2, 5)
            var[f"sam only, {name} ms"] = cuda_ms(functools.partial(page.sam, vm), 2, 5)
        var["vision sam_fast: max |Δ| of image features vs eager"] = fres["embeds_max_abs_diff"]
        # vision_streams: the global view's stream at the highest priority instead
        if fast.view_stream is not None and "vision" in parts:
            vm = apply_fast_path(model, fast.fast_config)
            vm.vision.view_stream = torch.cuda.Stream(vm.device, priority=-1)  # lower is higher
            var["vision vision_streams, the global view's stream at high priority ms"] = cuda_ms(
                functools.partial(page.vision, vm), 2, 7
            )
            del vm

        def paired(label: str, time_default: Callable[[], float], time_variant: Callable[[], float]) -> None:
            """``label``'s paired A/B row: the default (a) and the variant (b) timed in ``--ab-rounds`` alternating
            rounds; single timings of the whole vision move ±0.25 ms between runs on an H200, more than many of
            the changes they would judge."""
            if args.ab_rounds:
                ab = paired_ab(time_default, time_variant, args.ab_rounds)
                var[f"{label}: paired A/B, b - a (the default)"] = ab.cell()

        def default_side(setting: tuple[Any, str, Any] | None) -> contextlib.AbstractContextManager[Any]:
            """The default's side of a paired A/B: ``setting`` = (module, name, default value), put back while a
            variant runs under another value (the ``before`` its ``module_setting`` block was given)."""
            return contextlib.nullcontext() if setting is None else module_setting(*setting)

        def time_vision_variant(key: str, vm: FastModel, setting: tuple[Any, str, Any] | None = None) -> None:
            """The whole fast vision (compiled, graphed) and SAM alone of ``vm``, and its features against eager;
            then the whole vision paired with the default's (``setting``: the module setting the variant runs
            under, with its default value, put back for the default's rounds)."""
            var[f"vision {key} ms"] = cuda_ms(functools.partial(page.vision, vm), 2, 7)
            var[f"sam only, {key} ms"] = cuda_ms(functools.partial(page.sam, vm), 2, 7)
            var[f"vision {key}: max |Δ| of image features vs eager"] = float(
                (page.embeds(vm).float() - embeds.float()).abs().max()
            )

            def time_default() -> float:
                with default_side(setting):
                    return cuda_ms(functools.partial(page.vision, fast), 1, 3)

            paired(f"vision {key}", time_default, lambda: cuda_ms(functools.partial(page.vision, vm), 1, 3))

        # SAM's rel-pos attention kernels other than the default, global and windowed blocks, each on the whole fast
        # vision (compiled, graphed)
        d = fast.fast_config
        vision_switches: list[tuple[str, tuple[Any, ...]]] = [
            ("sam_attention", ("augmented", "triton")),
            ("sam_window_attention", ("augmented", "triton")),
            ("sam_gelu_epilogue", (False, True)),
            ("vision_streams", (False, True)),
        ]

        def time_vision_switches(switches: list[tuple[str, tuple[Any, ...]]]) -> None:
            """Each other choice of each vision switch: its first call (compile, capture), the whole vision, SAM
            alone, its features against eager, and a SAM kernel profile."""
            for switch, choices in switches:
                for kind in [k for k in choices if k != getattr(d, switch)]:
                    key = f"{switch}={kind}"
                    checkpoint(f"vision {key}")
                    try:
                        vm = apply_fast_path(model, attrs.evolve(d, **{switch: kind}))
                        if isinstance(kind, str) and getattr(vm.vision, switch, kind) != kind:  # resolved elsewhere
                            var[f"vision {key}"] = f"not run: {getattr(vm.vision, switch + '_note')}"
                            continue
                        t0 = time.perf_counter()
                        page.vision(vm)  # the first call: compiles (and, for a compile mode, autotunes) and captures
                        torch.cuda.synchronize()
                        var[f"vision {key}: first call (compile, capture) s"] = time.perf_counter() - t0
                        time_vision_variant(key, vm)
                        profile_sam(vm, page, out, f"fast_{switch}_{kind}")
                        del vm
                    except Exception as exc:  # a kernel compile failure must not lose the rest of the report
                        var[f"vision {key}"] = f"failed: {type(exc).__name__}: {exc}"[:300]

        if "vision" in parts:
            time_vision_switches(vision_switches)
        # sam_kernels.BY_GRID candidates (each replacing the shipped settings), each on the whole fast vision
        # (compiled, graphed) beside the default above
        checkpoint("the sam_kernels.BY_GRID candidates")
        if "triton" in (d.sam_attention, d.sam_window_attention):
            from llm_perf_opt.models.deepseek_ocr import sam_kernels

            for label, by_grid in SAM_GRID_CANDIDATES if "by-grid" in parts else ():
                key = f"sam_kernels.BY_GRID={label}"
                try:
                    with module_setting(sam_kernels, "BY_GRID", dict(by_grid)) as before:
                        vm = apply_fast_path(model, d)
                        time_vision_variant(key, vm, (sam_kernels, "BY_GRID", before))
                        del vm
                except Exception as exc:  # a launch setting that fails must not lose the rest of the report
                    var[f"vision {key}"] = f"failed: {type(exc).__name__}: {exc}"[:300]
            # the kernel's position tables in their other Triton form (a module setting: a program per query line,
            # or both tables from one read of q); the einsum and gemm forms, slower in rounds 15-16, are not re-timed
            for form in [f for f in ("triton", "gather") if f != sam_kernels.TABLES and "tables" in parts]:
                key = f"sam_kernels.TABLES={form}"
                try:
                    with module_setting(sam_kernels, "TABLES", form) as before:
                        vm = apply_fast_path(model, d)
                        time_vision_variant(key, vm, (sam_kernels, "TABLES", before))
                        profile_sam(vm, page, out, f"fast_tables_{form}")
                        del vm
                except Exception as exc:  # must not lose the rest of the report
                    var[f"vision {key}"] = f"failed: {type(exc).__name__}: {exc}"[:300]
        checkpoint("the decode variants")

        def time_variant(key: str, cfg: FastConfig) -> None:
            """Device-greedy ms/token of ``cfg`` (the switches and module settings in force act in that loop) and its
            tokens vs the default's."""
            try:
                g_sw = greedy_device(apply_fast_path(model, cfg), embeds, steps)
                st, gt = g_sw["tokens"][: keep + 1], g["tokens"][: keep + 1]
                var[f"decode {key} (device greedy) ms/token"] = g_sw["ms_per_token"]
                var[f"decode {key}: device greedy tokens == the default's, {keep} steps"] = (
                    f"{st == gt} (first divergence {first_divergence(gt, st)})"
                )
            except Exception as exc:  # a kernel compile failure must not lose the rest of the report
                var[f"decode {key}"] = f"failed: {type(exc).__name__}: {exc}"[:300]

        decode_configs = {
            "attn=sdpa": FastConfig(decode_attention="sdpa"),
            "experts=gather_bmm": FastConfig(expert_impl="gather_bmm"),
        }
        for name, fcfg in decode_configs.items() if "decode" in parts else ():
            fm = apply_fast_path(model, fcfg)
            var[f"decode {name} (device greedy) ms/token"] = greedy_device(fm, embeds, steps)["ms_per_token"]
            del fm
        if fast.fast_config.decode_kernels == "triton" and "decode" in parts:  # the opt-in switches, one run
            d = fast.fast_config
            switches = {
                f"{name}={not getattr(d, name)}": {name: not getattr(d, name)}
                for name in (
                    "fused_pick",
                    "norm_router_f32",
                    "pdl",
                    "triton_linear",
                    "one_launch_attention",
                    "fused_router",
                    "fused_rope",
                    "fused_input_norm",
                    "moe_down_split",
                    "triton_dense_mlp",
                    "down_norm",
                )
            }

            for key, change in switches.items():
                time_variant(key, attrs.evolve(d, **change))
            # the expert up kernel's software pipelining (a kernels-module setting, not a FastConfig switch)
            from llm_perf_opt.models.deepseek_ocr import kernels as triton_kernels

            for stages in sorted({0, 2, 3} - {triton_kernels.UP_STAGES}):
                with module_setting(triton_kernels, "UP_STAGES", stages):
                    time_variant(f"kernels.UP_STAGES={stages}", d)

        def time_prompt_setting(name: str, other: Any, label: str, module: Any = None) -> None:
            """The LM prefill with ``<module>.<name>`` (default ``prompt_moe``) at ``other`` (a module setting: the
            fast path re-applied under it), paired with the default, and with the routing spread at random after the
            router runs, at the default and at ``other``: a real page's expert reads (the dummy weights route the
            prompt to 28-46 of the 64 experts per layer, a real checkpoint to nearly all).  The default's spread row
            is timed once per report."""
            from llm_perf_opt.models.deepseek_ocr import prompt_moe

            module = module or prompt_moe
            setting = f"{module.__name__.rsplit('.', 1)[-1]}.{name}"
            lang = model.config.language
            default = getattr(module, name)
            for is_default, value in ((True, default), (False, other)):
                tag = "" if is_default else f", {setting}={label}"
                if is_default and f"prefill {SPREAD_LABEL} ms" in var:
                    continue
                try:
                    with module_setting(module, name, value):
                        if not is_default:
                            fm = apply_fast_path(model, fast.fast_config)
                            var[f"prefill {setting}={label} ms"] = prefill_ms(fm, embeds)

                            def time_default() -> float:
                                with default_side((module, name, default)):
                                    return prefill_ms(fast, embeds)

                            paired(f"prefill {setting}={label}", time_default, lambda fm=fm: prefill_ms(fm, embeds))
                        with spread_routing(embeds.shape[1], lang.n_routed_experts, lang.num_experts_per_tok):
                            fm = apply_fast_path(model, fast.fast_config)
                            var[f"prefill {SPREAD_LABEL}{tag} ms"] = prefill_ms(fm, embeds)
                except Exception as exc:  # must not lose the rest of the report
                    var[f"prefill {SPREAD_LABEL}{tag}"] = f"failed: {type(exc).__name__}: {exc}"[:300]

        checkpoint("the prefill variants")
        if "prefill" in parts:
            fm = apply_fast_path(model, FastConfig(prefill_graphs=False))
            var["prefill prefill_graphs=False ms"] = prefill_ms(fm, embeds)
            profile_prefill(fm, embeds, out)  # ungraphed: the profiler sees each kernel
            if fast.fast_config.triton_prefill:
                fm = apply_fast_path(model, attrs.evolve(fast.fast_config, triton_prefill=False))
                var["prefill triton_prefill=False ms"] = prefill_ms(fm, embeds)
                from llm_perf_opt.models.deepseek_ocr import prompt_moe

                for key, change in (
                    ("prefill_experts", {"torch": "triton", "triton": "torch"}[fast.fast_config.prefill_experts]),
                    ("prefill_attention", {"sdpa": "triton", "triton": "sdpa"}[fast.fast_config.prefill_attention]),
                ):
                    try:
                        fm = apply_fast_path(model, attrs.evolve(fast.fast_config, **{key: change}))
                        var[f"prefill {key}={change} ms"] = prefill_ms(fm, embeds)
                    except Exception as exc:  # a kernel compile failure must not lose the rest of the report
                        var[f"prefill {key}={change}"] = f"failed: {type(exc).__name__}: {exc}"[:300]
                if fast.fast_config.prefill_experts == "triton":  # its down GEMM (a module setting, not a switch)
                    for down in sorted(set(prompt_moe.DOWN_GEMMS) - {prompt_moe.DOWN_GEMM}):
                        with module_setting(prompt_moe, "DOWN_GEMM", down):
                            fm = apply_fast_path(model, fast.fast_config)
                            var[f"prefill prompt_moe.DOWN_GEMM={down} ms"] = prefill_ms(fm, embeds)
                    # a real page's expert reads, then with the grouped GEMMs' weight tiles through the other load
                    # form (prompt_moe.W_TMA)
                    time_prompt_setting("W_TMA", not prompt_moe.W_TMA, str(not prompt_moe.W_TMA))
        checkpoint("this round's kernel settings")
        if "settings" in parts and fast.fast_config.decode_kernels == "triton":
            from llm_perf_opt.models.deepseek_ocr import fast_decoder, prompt_moe, sam_kernels

            # the greedy step's end: on the device only (the graph replayed back to back), or with round 19's three
            # device ops between replays as well (fast_decoder.HOST_STEP_END)
            host_end = not fast_decoder.HOST_STEP_END
            with module_setting(fast_decoder, "HOST_STEP_END", host_end):
                time_variant(f"fast_decoder.HOST_STEP_END={host_end}", fast.fast_config)

            # SAM's module settings flipped, each on a fast model compiled and captured under it: the rel-pos tables'
            # kernel by grid width (GATHER_MAX_GRID: the windows' tables in one launch per window-head, or the line
            # kernel everywhere), the one-hot steps' position terms as the score product's accumulator or added after
            # it (BIAS_IN_MMA), the one-row steps' rel_h term as a shift of the row's max (ROW_TERM_IN_MAX)
            for name, flipped in (
                ("GATHER_MAX_GRID", 0 if sam_kernels.GATHER_MAX_GRID else 16),
                ("BIAS_IN_MMA", not sam_kernels.BIAS_IN_MMA),
                ("ROW_TERM_IN_MAX", not sam_kernels.ROW_TERM_IN_MAX),
            ):
                key = f"sam_kernels.{name}={flipped}"
                try:
                    with module_setting(sam_kernels, name, flipped) as before:
                        vm = apply_fast_path(model, fast.fast_config)
                        page.vision(vm)  # the first call: compiles and captures
                        time_vision_variant(key, vm, (sam_kernels, name, before))
                        del vm
                except Exception as exc:  # must not lose the rest of the report
                    var[f"vision {key}"] = f"failed: {type(exc).__name__}: {exc}"[:300]
            # the prompt's shared experts on their own stream beside the routed ones (FastConfig.prefill_shared_stream)
            # flipped: on the dummy routing and with the routing spread, each paired with the default
            if fast.fast_config.triton_prefill and fast.fast_config.prefill_experts == "triton":
                flip = not fast.fast_config.prefill_shared_stream
                key = f"prefill_shared_stream={flip}"
                try:
                    sm = apply_fast_path(model, attrs.evolve(fast.fast_config, prefill_shared_stream=flip))
                    var[f"prefill {key} ms"] = prefill_ms(sm, embeds)
                    paired(f"prefill {key}", lambda: prefill_ms(fast, embeds), lambda: prefill_ms(sm, embeds))
                    lang = model.config.language
                    with spread_routing(embeds.shape[1], lang.n_routed_experts, lang.num_experts_per_tok):
                        spread_a = apply_fast_path(model, fast.fast_config)
                        spread_b = apply_fast_path(model, attrs.evolve(fast.fast_config, prefill_shared_stream=flip))
                        paired(
                            f"prefill {SPREAD_LABEL}, {key}",
                            lambda: prefill_ms(spread_a, embeds),
                            lambda: prefill_ms(spread_b, embeds),
                        )
                    del sm, spread_a, spread_b
                except Exception as exc:  # must not lose the rest of the report
                    var[f"prefill {key}"] = f"failed: {type(exc).__name__}: {exc}"[:300]
            # the prompt attention's split form (prompt_attention.SPLIT_STEPS) on at each chunk length, or off
            if fast.fast_config.triton_prefill and fast.fast_config.prefill_attention == "triton":
                from llm_perf_opt.models.deepseek_ocr import prompt_attention

                for chunk_steps in [n for n in (0, 6, 8) if n != prompt_attention.SPLIT_STEPS]:
                    time_prompt_setting("SPLIT_STEPS", chunk_steps, str(chunk_steps), prompt_attention)
            # the prompt's up GEMM at three stages instead of four (or the other way)
            if fast.fast_config.triton_prefill and fast.fast_config.prefill_experts == "triton":
                up = prompt_moe.UP_BLOCKS
                other_up = up._replace(num_stages=3 if up.num_stages == 4 else 4)
                time_prompt_setting("UP_BLOCKS", other_up, str(tuple(other_up)))
            # the default config's no-repeat-ngram rule (size 20), which the goals' decode rows leave out: its ban
            # built by kernels.ngram_ban's one launch (FastConfig.ngram_kernel, the default since round 31) or by
            # generation.banned_ngram_mask's ~20 torch kernels, paired, with the tokens compared
            ngram = 20
            on = fast.fast_config.ngram_kernel
            rule_key = f"decode no_repeat_ngram_size={ngram}"
            other_key = f"{rule_key}, ngram_kernel={not on}"
            try:
                other = apply_fast_path(model, attrs.evolve(fast.fast_config, ngram_kernel=not on))
                g_default = greedy_device(fast, embeds, steps, ngram)
                g_other = greedy_device(other, embeds, steps, ngram)
                var[f"{rule_key} (the default config, ngram_kernel={on}) (device greedy) ms/token"] = g_default[
                    "ms_per_token"
                ]
                var[f"{other_key} (device greedy) ms/token"] = g_other["ms_per_token"]
                dt_, ot = g_default["tokens"][: keep + 1], g_other["tokens"][: keep + 1]
                var[f"{other_key}: tokens == the default's, {keep} steps"] = (
                    f"{dt_ == ot} (first divergence {first_divergence(dt_, ot)})"
                )
                paired(
                    other_key,
                    lambda: greedy_device(fast, embeds, steps, ngram)["ms_per_token"],
                    lambda: greedy_device(other, embeds, steps, ngram)["ms_per_token"],
                )
                del other
            except Exception as exc:  # a kernel compile failure must not lose the rest of the report
                var[other_key] = f"failed: {type(exc).__name__}: {exc}"[:300]
        checkpoint("the torch decode kernels, the ungraphed decode and the vision SDPA policies")
        if "other" in parts:
            other_kernels = "torch" if fast.fast_config.decode_kernels == "triton" else "triton"
            try:
                fm = apply_fast_path(model, FastConfig(decode_kernels=other_kernels))
                k_dec = decode_loop(fm, embeds, keep, keep)
                kt = k_dec["tokens"][: keep + 1]
                var[f"decode decode_kernels={other_kernels} (device greedy) ms/token"] = greedy_device(
                    fm, embeds, steps
                )["ms_per_token"]
                var[f"decode decode_kernels={other_kernels}: tokens == eager, {keep} steps"] = (
                    f"{kt == et} (first divergence {first_divergence(et, kt)})"
                )
            except Exception as exc:  # a kernel compile failure must not lose the rest of the report
                var[f"decode decode_kernels={other_kernels}"] = f"failed: {type(exc).__name__}: {exc}"[:300]
            fm = apply_fast_path(model, FastConfig(cuda_graphs=False))
            var["decode no graphs (host greedy) ms/token"] = decode_loop(fm, embeds, 64, 0)["ms_per_token"]
            fm = apply_fast_path(model, FastConfig(expert_impl="dense"))
            var["prefill experts=dense ms"] = prefill_ms(fm, embeds)
            fm = apply_fast_path(model, FastConfig(grouped_moe=False))
            var["prefill grouped_moe=False (fused qkv only) ms"] = prefill_ms(fm, embeds)
            # each policy gets its own compiled graph of the vision blocks (graphs.check_sdpa_policy; before round 10
            # they reused the first compile's backend, so these rows timed the default's)
            for vis in ("cudnn", "flash"):
                vm = apply_fast_path(model, FastConfig(vision_sdpa=vis))
                try:
                    var[f"vision sdpa={vis} ms"] = cuda_ms(functools.partial(page.vision, vm), warmup=2, reps=5)
                except RuntimeError as exc:
                    var[f"vision sdpa={vis} ms"] = f"failed: {exc}"[:120]
            del fm
        checkpoint("the kernel profiles")
        try:
            prof = profile_decode_step(fast, embeds, out)
            var["fast decode step: kernels/step (no graph)"] = prof["kernels_per_step"] or f"n/a: {prof['reason']}"
            var["fast decode step: GPU us/step (busy: each kernel from the end of the previous)"] = (
                prof["gpu_us_per_step"] or f"n/a: {prof['reason']}"
            )
            var["fast decode step: GPU us/step (raw sum of kernel durations)"] = (
                prof["raw_us_per_step"] or f"n/a: {prof['reason']}"
            )
        except Exception as exc:
            var["profile"] = f"failed: {exc}"[:200]
        try:
            tl = profile_graphed_decode_step(fast, embeds, out)
            var["fast decode step, graphed: busy us/step"] = tl["busy_us_per_step"]
            var["fast decode step, graphed: idle us/step (the stream waiting between kernels)"] = tl["idle_us_per_step"]
        except Exception as exc:  # must not lose the rest of the report
            var["profile graphed"] = f"failed: {type(exc).__name__}: {exc}"[:300]
        if args.decode_compile_variant:
            try:
                prof = profile_decode_step(fast, embeds, out, "default")
                var["compiled decode step: kernels/step (no graph)"] = (
                    prof["kernels_per_step"] or f"n/a: {prof['reason']}"
                )
                var["compiled decode step: GPU us/step (busy)"] = prof["gpu_us_per_step"] or f"n/a: {prof['reason']}"
            except Exception as exc:
                var["profile compiled"] = f"failed: {exc}"[:200]
        profile_sam(model, page, out, "eager")
        profile_sam(fast, page, out, "fast")
        try:  # the whole vision, views one after the other (kernel times not shared between two streams)
            serial = apply_fast_path(model, attrs.evolve(fast.fast_config, vision_streams=False))
            profile_sam(serial, page, out, "fast_serial", stage="vision", rows=45)
            del serial
        except Exception as exc:  # a profile failure must not lose the rest of the report
            var["vision profile"] = f"failed: {type(exc).__name__}: {exc}"[:200]
        if args.vision_compile_variant:  # last: inductor's autotuning of every block shape may take minutes
            time_vision_switches([("vision_compile_mode", ("default", "max-autotune-no-cudagraphs"))])
        print("variants:", var, flush=True)
        checkpoint(None)


def write_report(res: dict[str, Any], out: Path, keep: int, echo: bool = True) -> None:
    """The markdown table and the JSON beside it; ``res["partial"]`` (a run still going) is said at the top."""
    e, f, env = res["eager"], res["fast"], res["env"]

    tok_e, tok_f = res.get("eager_decode_tokens"), res["decode_tokens"]

    def row(name: str, a: float | None, b: float | None, tokens: tuple[int | None, int | None] | None = None) -> str:
        te, tf = tokens or (None, None)
        return f"| {name} | {fmt(a)} | {fmt(b)} | {ratio(a, b, te, tf)} |"

    budget = res["weight_gib"] + res["kv_gib"] + 2.0
    lines = [
        f"# Fast path vs eager — {env['gpu']}",
        "",
        f"{env['date']}; driver {env['driver']}; torch {env['torch']} (CUDA {env['cuda']}); bf16, dummy weights;"
        f" synthetic 1224×1584 page, Gundam, grid {res['grid']}, prompt {res['prompt_len']} tokens;"
        f" CUDA events after warm-up, medians. Peaks: {res['peak_source']}"
        f" ({res['peak_bf16_flops'] / 1e12:.1f} TFLOP/s bf16 dense, {res['peak_bytes_per_s'] / 1e12:.2f} TB/s).",
        "",
        *([f"**Partial report:** {res['partial']}.", ""] if res.get("partial") else []),
        "## Goals (issue 9), one run",
        "",
        *goals_table(res, keep),
        "",
        "## Detail",
        "",
        "| metric | eager | fast | eager/fast |",
        "| --- | ---: | ---: | ---: |",
        row(
            f"decode ms/token (batch 1, host greedy; eager {tok_e} tok, fast {tok_f} tok)",
            e["decode_ms_per_token"],
            f["decode_ms_per_token"],
            (tok_e, tok_f),
        ),
        row(
            "decode ms/token, fast on-device greedy",
            e["decode_ms_per_token"],
            f["decode_device_greedy_ms_per_token"],
            (tok_e, tok_f),
        ),
        row("prefill ms (LM over the prompt)", e["prefill_ms"], f["prefill_ms"]),
        row("vision ms (SAM+CLIP+projector)", e["vision_ms"], f["vision_ms"]),
        row("SAM ms (all views)", e["sam_ms"], f["sam_ms"]),
        f"| vision MFU % ({res['vision_flops'] / 1e12:.4g} TFLOP/page)"
        f" | {fmt(e['vision_mfu_pct'], '{:.1f}')} | {fmt(f['vision_mfu_pct'], '{:.1f}')} | |",
        f"| SAM MFU % ({res['sam_flops'] / 1e12:.4g} TFLOP/page) | {fmt(e['sam_mfu_pct'], '{:.1f}')}"
        f" | {fmt(f['sam_mfu_pct'], '{:.1f}')} | |",
        row("peak GiB during prefill+decode", e["peak_gib"], f["peak_gib"], (tok_e, tok_f)),
        f"| greedy tokens identical, {keep} steps | — | {'yes' if f['tokens_identical'] else 'no'}"
        f" (first divergence: {f['first_divergence']}) | |",
        "",
        f"Weights {res['weight_gib']:.2f} GiB + KV {res['kv_gib']:.3f} GiB + 2 GiB = {budget:.2f} GiB budget;"
        f" fast peak {f['peak_gib']:.2f} GiB. Max |Δlogit| over {keep} steps {f['logits_max_abs_diff']:.4f}"
        f" (max |logit| {f['logits_max_abs']:.3f}). Graph capture {f['graph_capture_s']:.2f} s,"
        f" apply_fast_path {res['apply_fast_path_s']:.2f} s; first fast vision call (torch.compile of the"
        f" SAM/CLIP blocks) {res['first_fast_vision_s']:.1f} s. Host wall per token: eager"
        f" {e['decode_wall_ms_per_token']:.2f} ms, fast {f['decode_wall_ms_per_token']:.2f} ms.",
        "",
        f"Fast config: {res['fast_config']}. Vision graphs (SAM, CLIP): {res['vision_graphs']}.",
        "",
        f"Routed experts the fast LM prefill read per MoE layer, of {res['n_routed_experts']} (dummy weights;"
        f" random top-k routing of the prompt would reach nearly all): {f.get('prefill_experts_hit_per_layer')}."
        f" The variant row 'prefill {SPREAD_LABEL}' times the LM prefill with every expert read.",
        "",
        "| fast-path variant | value |",
        "| --- | ---: |",
    ]
    for k, v in res["variants"].items():
        lines.append(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    text = "\n".join(lines) + "\n"
    gpu = gpu_tag(env["gpu"])
    stem = f"{dt.date.today().isoformat()}-{gpu}-fast"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str))
    if echo:
        print(text)


if __name__ == "__main__":
    main()
