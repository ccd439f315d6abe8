"""Batched throughput of the native DeepSeek-OCR (``models.deepseek_ocr.batched``) on one GPU, graph vs host decode.

Full-size dummy weights in bf16, synthetic pages (``llm_perf_opt.data.datasets.synthetic_page``, several
page sizes) in Base mode (one 1024×1024 view per page, 273 image tokens, prompt length 283), greedy with
``ignore_eos`` so every sequence makes exactly ``--tokens`` tokens.  The model is the fast path by default
(``FastModel``: fused QKV / gate-up, grouped experts, fast SAM/CLIP with compiled blocks and vision graphs);
``--model eager`` runs the plain module weights with ``--expert-impl`` experts.

``--decode`` picks the decode loop of ``BatchedGenerator`` (default ``both``: graph and host side by side):
``graph`` = the static step replayed from a CUDA graph, ``static`` = the same step un-graphed, ``host`` = the
host-driven loop (host tensors per step, logits to the host).  ``--ngram 0 20`` times each loop without and
with the vendor's no-repeat-ngram rule (on the device in graph/static, on the host in the host loop) and
prints device/host and with/without ratios.  For each batch size (default 1, 8, 32, 64)
and loop: one warm-up run of the SAME shape (same pages, same ``--tokens``), which pays the one-time CUDA
graph capture (and the vision compile / graphs of its shapes), then one timed run that only replays
(CUDA events via ``DeviceClock``).  The capture time of the warm-up run is reported in its own column;
a timed run that still captured is flagged.

    PYTHONPATH=src python benchmarks/bench_batched.py --out benchmarks/results
    # CPU smoke check of the script (tiny model, seconds):
    PYTHONPATH=src python benchmarks/bench_batched.py --config tiny --device cpu --dtype float32 \\
        --batches 1,2 --tokens 4

Columns: decode = the loop that ran; pages/s and output tok/s over the whole run (vision + prefill + decode,
all tokens counted); decode tok/s (tokens from decode steps over decode time); TTFT (vision + prefill, the
same for every page of the batch); TPOT p50 / p90 = decode-step time percentiles (each step gives every
live sequence one token, so it is the per-token latency each sequence sees); capture s = host wall time of
the warm-up run's graph capture (excluded from every other column); peak memory =
``torch.cuda.max_memory_allocated`` during the timed run (weights and the kept graph cache included); expert
slots read = distinct routed experts + shared-expert slots per MoE layer per decode step, from an untimed 8-step
un-graphed run of the same pages (the bytes a step's expert kernels stream: dummy weights decode repeated ids,
so rows share experts more than on real pages; compare with ``bench_kernels.py``'s step on random rows).

``--mixed-pages N`` adds static vs continuous batching on N pages whose output lengths are drawn log-normal
(``--mixed-median``, ``--mixed-sigma``; each sequence ends there, "simulated eos") at batch max(--batches), with
the ``--ngram-mixed`` rule on the device, printed as a ratio row.

Writes ``<out>/<date>-<gpu>-batched.md`` and ``.json`` when ``--out`` is given; always prints the table.
Imports only torch/attrs/safetensors/pillow code paths (no hydra).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from llm_perf_opt.data.datasets import Page, lognormal_target_tokens, synthetic_page
from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model
from llm_perf_opt.models.deepseek_ocr.batched import BatchedGenerator
from llm_perf_opt.models.deepseek_ocr.continuous import SlotRequest, drain_is_whole_run
from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, apply_fast_path
from llm_perf_opt.models.deepseek_ocr.preprocess import PreparedPage, PreprocessConfig, preprocess_page
from llm_perf_opt.models.deepseek_ocr.tokenizer import load_tokenizer
from llm_perf_opt.models.deepseek_ocr2 import DeepseekOCR2Config, build_model_v2
from llm_perf_opt.models.deepseek_ocr2.fast import apply_fast_path_v2
from llm_perf_opt.models.deepseek_ocr2.preprocess import preprocess_config_v2, preprocess_page_v2
from llm_perf_opt.profiling.bench_meta import benchmark_header, gpu_tag
from llm_perf_opt.profiling.peaks import match_peak
from llm_perf_opt.profiling.timers import DeviceClock
from llm_perf_opt.runners.prefetch import Prefetcher

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmath next to this script, also under `python -m`
from bench_fast import spread_routing
from benchmath import batched_goal, batched_speedups, p90_ms, paired_ab

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "full": ROOT / "src/llm_perf_opt/models/deepseek_ocr/configs/deepseek-ocr.json",
    "tiny": ROOT / "tests/fixtures/deepseek_ocr_tiny/config.json",  # CPU smoke checks of this script
}
# --family v2: DeepSeek-OCR-2's configs (the same names)
CONFIGS_V2 = {
    "full": ROOT / "src/llm_perf_opt/models/deepseek_ocr2/configs/deepseek-ocr2.json",
    "tiny": ROOT / "tests/fixtures/deepseek_ocr2_tiny/config.json",
}
PROMPT = "<image>\n<|grounding|>Convert the document to markdown."
PAGE_SIZES = [(1224, 1584), (1700, 2200), (850, 1100), (1584, 1224), (2480, 3508)]
DECODE_LOOPS = {"graph": ["graph"], "static": ["static"], "host": ["host"], "both": ["graph", "host"]}
GiB = 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def page_preparer(cfg: Any, mode: str) -> Any:
    """``prepare(image, uint8) -> PreparedPage`` for the model family of ``cfg``: v1's ``preprocess_page`` at a
    vendor mode (``PreprocessConfig.for_mode``), or v2's ``preprocess_page_v2`` at a v2 mode (default / 1024 / 768).
    The prompt's ids come from the real tokenizer (v2's files are v1's)."""
    if isinstance(cfg, DeepseekOCR2Config):
        v1_ids = DeepseekOCRConfig(language=cfg.language, image_token_id=cfg.image_token_id)
        ids = load_tokenizer(None, v1_ids).encode_prompt(PROMPT)
        pre_v2 = preprocess_config_v2(mode)
        return lambda image, uint8: preprocess_page_v2(image, pre_v2, cfg, ids, uint8=uint8)
    ids = load_tokenizer(None, cfg).encode_prompt(PROMPT)
    pre = PreprocessConfig.for_mode(mode)
    return lambda image, uint8: preprocess_page(image, pre, cfg, ids, uint8=uint8)


def make_pages(cfg: Any, n: int, mode: str) -> list[PreparedPage]:
    prepare = page_preparer(cfg, mode)
    return [prepare(synthetic_page(PAGE_SIZES[i % len(PAGE_SIZES)], i), False) for i in range(n)]


def preprocess_rates(cfg: Any, n: int, mode: str, workers: int) -> dict[str, float]:
    """Host preparation of ``n`` synthetic pages: serial with host normalisation (the old path) vs the pool of
    ``workers`` threads with uint8 views (the batched phase's path; normalisation moves to the device)."""
    pages = [Page(f"p{i}", synthetic_size=PAGE_SIZES[i % len(PAGE_SIZES)], seed=i) for i in range(n)]
    prepare_image = page_preparer(cfg, mode)

    def prepare(page: Page, uint8: bool) -> PreparedPage:
        return prepare_image(page.load(), uint8)  # type: ignore[no-any-return]

    t0 = time.perf_counter()
    for p in pages:
        prepare(p, False)
    serial_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with Prefetcher(lambda p: prepare(p, True), [[p] for p in pages], workers=workers, depth=2 * workers) as pool:
        for ready in pool:
            ready.prepared()
    pooled_s = time.perf_counter() - t0
    return {"pages": n, "workers": workers, "serial_pages_per_s": n / serial_s, "pooled_pages_per_s": n / pooled_s}


def generator(target: Any, loop: str, args: argparse.Namespace) -> BatchedGenerator:
    """The BatchedGenerator that runs decode loop ``loop`` ("graph", "static" or "host")."""
    return BatchedGenerator(
        target,
        expert_impl=args.expert_impl if args.model == "eager" else None,
        vision_batch=args.vision_batch or None,
        static_decode=loop != "host",
        cuda_graphs=loop == "graph",
        check_every=args.check_every,
        clock=DeviceClock(target.device),
    )


def measure(
    gen: BatchedGenerator, pages: list[PreparedPage], tokens: int, eos: int, warmup_tokens: int, ngram: int = 0
) -> dict[str, Any]:
    dev = gen.device
    # warm-up: capture, allocator, compile
    warm = gen.run(pages, warmup_tokens, eos_token_id=eos, ignore_eos=True, no_repeat_ngram_size=ngram)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    res = gen.run(pages, tokens, eos_token_id=eos, ignore_eos=True, no_repeat_ngram_size=ngram)
    _sync(dev)
    # CUDA allocator peak; None off CUDA (printed "n/a", never as a number)
    peak = torch.cuda.max_memory_allocated(dev) / GiB if dev.type == "cuda" else None
    tpot = [t for t in res.tpot_ms if t == t]  # drop NaN (single-token sequences)
    return {
        "batch": len(pages),
        "decode": res.decode_path,
        "ngram": ngram,
        "prompt_len": res.padded_len,
        "tokens_per_seq": tokens,
        "pages_per_s": res.pages_per_s,
        "output_tok_per_s": res.output_tok_per_s,
        "decode_tok_per_s": res.decode_tok_per_s,
        "vision_s": res.vision_s,
        "prefill_s": res.prefill_s,
        "decode_s": res.decode_s,
        "ttft_s": res.ttft_s,
        "tpot_p50_ms": res.step_ms_p50,
        "tpot_p90_ms": p90_ms(res.step_ms),
        "tpot_mean_per_seq_ms": statistics.fmean(tpot) if tpot else None,
        "idle_steps": res.idle_steps,
        "warmup_capture_s": warm.graph_capture_s,
        "timed_capture_s": res.graph_capture_s,  # 0.0 unless the warm-up shape differed (--warmup-tokens)
        "capture_error": gen.capture_error,
        "peak_gib": peak,
    }


def routing(args: argparse.Namespace, cfg: Any, rows: int) -> contextlib.AbstractContextManager[list[int]]:
    """With ``--spread-routing``: the ``rows``-row router calls (a decode step of that many sequences) spread at random
    after the router (``bench_fast.spread_routing``); else the dummy model's own routing.  Yields the calls spread."""
    if not args.spread_routing:
        return contextlib.nullcontext([])
    lang = cfg.language
    return spread_routing(rows, lang.n_routed_experts, lang.num_experts_per_tok, args.seed, args.device)


def routing_note(requested: bool, unapplied: list[int]) -> str:
    """The report's routing line: what the decode steps' experts read."""
    if not requested:
        return (
            "Routing: the dummy model's own. Its rows greedily repeat one token, so they share a few experts and a "
            "step reads far fewer expert weights than real pages would (the expert slots read column says how "
            "many); `--spread-routing` reads every expert, as real pages do."
        )
    note = (
        "Routing: each decode step's picks spread at random after the router (every expert of every layer read, as "
        "on real pages; the router still runs), at a batch's full width"
    )
    if unapplied:
        sizes = ", ".join(str(n) for n in unapplied)
        note += (
            f"; not applied at batch {sizes}: no Triton router ran at that row count, so the dummy model's own "
            "routing ran there"
        )
    return note + "."


def mixed_workload(
    cfg: Any, n: int, mode: str, median: int, sigma: float, seed: int
) -> tuple[list[PreparedPage], list[int]]:
    """``n`` pages of mixed sizes with per-page output lengths drawn log-normal around ``median`` (the synthetic
    dataset's ``target_lengths=lognormal`` recipe, seeded), where each sequence ends (simulated eos)."""
    pages = make_pages(cfg, n, mode)
    return pages, [lognormal_target_tokens(seed + i, median, sigma) for i in range(n)]


# the mode of static_vs_continuous whose refills are prefilled page by page (infer.refill_prefill=per_page)
PER_PAGE = "continuous, refills prefilled page by page"


def static_vs_continuous(
    gen: BatchedGenerator,
    pages: list[PreparedPage],
    caps: list[int],
    slots: int,
    ngram: int,
    vision_ahead: int = 0,
    prefill_ahead: bool = False,
    rounds: int = 0,
    per_page_prefill: bool = False,
) -> list[dict[str, Any]]:
    """The same mixed-length workload through static batches of ``slots`` pages (each until its longest sequence
    ends) and through ``slots`` continuously refilled slots; with ``vision_ahead`` > 0 a third run has that many
    pages' vision run ahead of their refills on a second stream (``run_continuous(vision_ahead=...)``), and with
    ``prefill_ahead`` a fourth has their LM prefill run ahead too (``prefill_ahead=True``); with
    ``per_page_prefill`` one more prefills each refill's pages one at a time (``prefill_per_page=True``: on the fast
    path graph replays per prompt length); with ``rounds`` > 0 each of these modes is then also paired with the
    plain continuous run over that many alternating rounds (``benchmath.paired_ab`` on the stage time: one run of
    each a round), so its ratio comes with the sign test's verdict (``paired_vs_continuous``).  Each mode runs twice
    (the first run pays graph captures and the vision shapes of its refills), the second is timed; rates are over
    stage time (vision + prefill + decode, captures excluded, preprocessing excluded: the pages are
    prepared beforehand; of the vision run ahead, what held the main stream up is stage time: on CPU all of it)."""
    dev = gen.device
    rows = []
    modes = ["static", "continuous"] + ([f"continuous, vision {vision_ahead} ahead"] if vision_ahead else [])
    modes += [f"continuous, vision + prefill {vision_ahead} ahead"] if vision_ahead and prefill_ahead else []
    modes += [PER_PAGE] if per_page_prefill else []

    def continuous(mode: str) -> Any:
        return gen.run_continuous(
            [SlotRequest(p, c) for p, c in zip(pages, caps, strict=True)],
            slots,
            eos_token_id=None,
            no_repeat_ngram_size=ngram,
            vision_ahead=vision_ahead if "ahead" in mode else 0,
            prefill_ahead="prefill" in mode and "ahead" in mode,
            prefill_per_page=mode == PER_PAGE,
        )

    for mode in modes:
        for timed in (False, True):
            _sync(dev)
            if mode == "static":
                stage_s = capture_s = 0.0
                tokens = decode_tokens = slot_steps = 0
                for i in range(0, len(pages), slots):
                    res = gen.run(
                        pages[i : i + slots], caps[i : i + slots], eos_token_id=None, no_repeat_ngram_size=ngram
                    )
                    stage_s += res.total_s
                    capture_s += res.graph_capture_s
                    tokens += res.output_tokens
                    decode_tokens += res.output_tokens - res.batch
                    slot_steps += len(res.step_ms) * res.batch
                occupancy = decode_tokens / slot_steps if slot_steps else None
                steady: float | None = None  # a static batch has no drain: each ends with its longest sequence
                steady_note = "n/a (no drain)"
                ahead_s, pages_ahead, prefill_ahead_s = 0.0, 0, 0.0
            else:
                cont = continuous(mode)
                stage_s, tokens, occupancy = cont.total_s, cont.output_tokens, cont.slot_occupancy
                capture_s = cont.graph_capture_s
                ahead_s, pages_ahead = cont.vision_ahead_s, cont.pages_ahead
                prefill_ahead_s = cont.prefill_ahead_s
                drain_steps, drain_ms, drain_tokens = cont.drain  # slots emptying after the last page started
                steady_s = stage_s - drain_ms / 1e3
                steady = (tokens - drain_tokens) / steady_s if steady_s > 0 else None
                steady_note = "n/a (no time outside the drain)"
                if drain_is_whole_run(drain_steps, len(cont.step_ms)):
                    # every page started decoding at the first step (no more pages than slots): the time outside
                    # the drain is the fill's vision and prefill alone, no steady state
                    steady, steady_note = None, "n/a (every step in the drain: one fill)"
            _sync(dev)
            if timed:
                rows.append(
                    {
                        "batching": mode,
                        "slots": slots,
                        "pages": len(pages),
                        "output_tokens": tokens,
                        "stage_s": stage_s,
                        "pages_per_s": len(pages) / stage_s,
                        "output_tok_per_s": tokens / stage_s,
                        "slot_occupancy": occupancy,
                        "steady_output_tok_per_s": steady,
                        "steady_note": steady_note,  # what the table gives where the steady rate is None
                        "ngram": ngram,
                        "vision_ahead_s": ahead_s,
                        "pages_ahead": pages_ahead,
                        "prefill_ahead_s": prefill_ahead_s,
                        "timed_capture_s": capture_s,  # 0.0 unless the timed run met a shape the first run did not
                    }
                )
                # as it goes: a run cut short by a caller's time limit still says what it measured (round 27: two
                # device runs killed in the mixed workload left no figure at all)
                print(
                    f"mixed {mode}: {tokens / stage_s:.1f} output tok/s, stage {stage_s:.3f} s, "
                    f"capture {capture_s:.3f} s",
                    flush=True,
                )
        if rounds and mode not in ("static", "continuous"):

            def stage_ms(m: str) -> float:
                _sync(dev)
                res = continuous(m)
                _sync(dev)
                return float(res.total_s * 1e3)

            rows[-1]["paired_vs_continuous"] = paired_ab(
                lambda: stage_ms("continuous"), lambda m=mode: stage_ms(m), rounds
            ).cell()
            print(f"mixed {mode} vs continuous over {rounds} rounds: {rows[-1]['paired_vs_continuous']}", flush=True)
        gen.release_decode_state()
    return rows


def mixed_table(rows: list[dict[str, Any]], lengths: list[int]) -> str:
    ordered = sorted(lengths)
    lines = [
        f"Mixed-length workload: {rows[0]['pages']} pages, output lengths (simulated eos) median "
        f"{statistics.median(ordered):.0f}, min {ordered[0]}, max {ordered[-1]} tokens; batch / slots "
        f"{rows[0]['slots']}; no_repeat_ngram {rows[0]['ngram']}; stage time (vision + prefill + decode), "
        "preprocessing and captures excluded. Steady state: the continuous run's tokens and stage time without its "
        "drain (the steps after the last page started decoding, when slots only empty).\n",
        "| batching | pages/s | output tok/s | steady-state output tok/s | slot occupancy | stage s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        occ = "n/a" if r["slot_occupancy"] is None else f"{100 * r['slot_occupancy']:.1f} %"
        steady = r.get("steady_output_tok_per_s")
        st = r.get("steady_note", "n/a (no drain)") if steady is None else f"{steady:.1f}"
        stage = f"{r['stage_s']:.3f}"
        if r.get("timed_capture_s"):  # left out of the stage time, but a timed run should meet no new shape
            stage += f" (+{r['timed_capture_s']:.3f} s of captures in the timed run, left out)"
        lines.append(
            f"| {r['batching']} | {r['pages_per_s']:.3f} | {r['output_tok_per_s']:.1f} | {st} | {occ} | {stage} |"
        )
    by = {r["batching"]: r for r in rows}
    if "static" in by and "continuous" in by:
        lines.append(
            f"\n- continuous / static = {by['continuous']['output_tok_per_s'] / by['static']['output_tok_per_s']:.2f}× "
            f"output tok/s, {by['continuous']['pages_per_s'] / by['static']['pages_per_s']:.2f}× pages/s (same pages, "
            "same tokens)"
        )
    for name, r in by.items():
        if name.startswith("continuous, vision") and "continuous" in by:
            lines.append(
                f"- {name} / continuous = {r['output_tok_per_s'] / by['continuous']['output_tok_per_s']:.2f}× output "
                f"tok/s (vision run ahead: {r['vision_ahead_s']:.3f} s over {r['pages_ahead']} pages, on a second "
                "stream on CUDA; what held the slots up is in the stage time, on CPU all of it"
                + (f"; their LM prefill run ahead: {r['prefill_ahead_s']:.3f} s)" if "prefill" in name else ")")
                + (f"; stage time paired with it: {r['paired_vs_continuous']}" if "paired_vs_continuous" in r else "")
            )
        if name == PER_PAGE and "continuous" in by:
            lines.append(
                f"- {name} / continuous = {r['output_tok_per_s'] / by['continuous']['output_tok_per_s']:.2f}× output "
                "tok/s (each refill page's LM prefill alone through the per-page prefill: on the fast path a graph "
                "replay per prompt length, captured before the fills and left out)"
                + (f"; stage time paired with it: {r['paired_vs_continuous']}" if "paired_vs_continuous" in r else "")
            )
    return "\n".join(lines)


def experts_read(
    target: Any, pages: list[PreparedPage], tokens: int, eos: int, args: argparse.Namespace
) -> tuple[float | None, float | None]:
    """Mean expert slots each MoE layer's decode step reads (distinct routed experts + the shared-expert slots), over
    ``tokens`` un-graphed steps of ``pages`` (an untimed run): what a step's expert kernels stream, so a TPOT here
    can be set beside ``bench_kernels.py``'s step (random hidden states: ~62 slots at 32 rows); and the mean distinct
    routed experts alone over the calls that route (the MoE layers: the dense MLP's call has no routed column), for
    the step's floor (:func:`step_floor`).  (None, None) when the decode step does not run the Triton expert kernels
    (eager model, torch decode kernels)."""
    from llm_perf_opt.models.deepseek_ocr import kernels

    seen: list[int] = []
    routed: list[int] = []
    real = {name: getattr(kernels, name) for name in ("moe_experts", "moe_experts_grouped")}

    def spy(name: str) -> Any:
        def run(x: torch.Tensor, idx: torch.Tensor, *rest: Any, **kw: Any) -> torch.Tensor:
            distinct = int(torch.unique(idx).numel())
            seen.append(distinct + int(kw.get("n_always", 0)))
            if idx.numel():
                routed.append(distinct)
            return real[name](x, idx, *rest, **kw)

        return run

    gen = generator(target, "static", args)
    try:
        for name in real:
            setattr(kernels, name, spy(name))
        gen.run(pages, tokens, eos_token_id=eos, ignore_eos=True)
    finally:
        for name, fn in real.items():
            setattr(kernels, name, fn)
        gen.release_decode_state()
    return (statistics.fmean(seen) if seen else None), (statistics.fmean(routed) if routed else None)


def step_floor(cfg: Any, row: dict[str, Any], tokens: int, bandwidth: float | None) -> tuple[float | None, str | None]:
    """The floor of ``row``'s decode step: the bytes a step must move (``flops.decode_bytes_per_step``: every weight
    once, the routed experts the untimed run's steps read in each MoE layer, each sequence's K/V at the run's mean
    context, prompt + ``tokens`` / 2) at ``bandwidth`` (the datasheet's, bytes/s), in ms; or None and why not."""
    from llm_perf_opt.profiling.flops import decode_bytes_per_step

    if bandwidth is None:
        return None, "no datasheet bandwidth for this device"
    routed = row.get("routed_read")
    if routed is None:
        return None, "no step ran the Triton expert kernels (routed experts read not counted)"
    lang = cfg.language
    moe_layers = lang.num_hidden_layers - lang.first_k_dense_replace
    context = row["prompt_len"] + tokens // 2
    need = decode_bytes_per_step(cfg, context, 2, [round(routed)] * moe_layers, batch=row["batch"]).total_bytes
    return need / bandwidth * 1e3, None


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| batch | decode | no-repeat n | pages/s | output tok/s | decode tok/s | TTFT s | TPOT p50 ms | TPOT p90 ms "
        "| capture s | peak memory GiB | expert slots read per MoE layer-step | step floor ms | floor / TPOT p50 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        floor = r.get("floor_ms")
        share = "n/a" if floor is None else f"{floor / r['tpot_p50_ms']:.0%}"
        floor_cell = f"{floor:.3f}" if floor is not None else f"n/a ({r.get('floor_unavailable', 'not computed')})"
        capture = f"{r['warmup_capture_s']:.3f}" if r["decode"] == "graph" else "-"
        if r["timed_capture_s"] > 0:
            capture += f" (+{r['timed_capture_s']:.3f} in the timed run)"
        lines.append(
            f"| {r['batch']} | {r['decode']} | {r['ngram'] or '-'} | {r['pages_per_s']:.3f} "
            f"| {r['output_tok_per_s']:.1f} "
            f"| {r['decode_tok_per_s']:.1f} | {r['ttft_s']:.3f} | {r['tpot_p50_ms']:.2f} | {_opt(r['tpot_p90_ms'])} "
            f"| {capture} | {_gib(r['peak_gib'])} | {_opt(r.get('experts_read'), 1)} | {floor_cell} | {share} |"
        )
    return "\n".join(lines)


def _opt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _batches(values: list[str]) -> list[int]:
    """``--batches 1 8 32`` or ``--batches 1,8,32``."""
    out = [int(v) for item in values for v in item.split(",") if v.strip()]
    if not out or min(out) < 1:
        raise SystemExit(f"--batches needs sizes >= 1, got {values}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="full", help=f"{' / '.join(CONFIGS)} or a config.json path")
    ap.add_argument(
        "--family",
        choices=["v1", "v2"],
        default="v1",
        help="v1: DeepSeek-OCR; v2: DeepSeek-OCR-2 (its config of the same name, its page geometry: --mode default "
        "| 1024 | 768)",
    )
    ap.add_argument("--batches", nargs="+", default=["1,8,32,64"], help="batch sizes: 1 8 32 64 or 1,8,32,64")
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per sequence (ignore_eos)")
    ap.add_argument(
        "--warmup-tokens",
        type=int,
        default=None,
        help="tokens of the warm-up run (default: --tokens; another value is another graph shape, so the timed "
        "run would capture again)",
    )
    ap.add_argument("--decode", choices=sorted(DECODE_LOOPS), default="both", help="decode loop(s) to time")
    ap.add_argument(
        "--ngram",
        nargs="+",
        type=int,
        default=[0],
        help="no_repeat_ngram sizes to time (e.g. 0 20: without the rule and with the vendor's; graph/static apply "
        "it on the device, host on the host), printed as device/host and with/without ratios",
    )
    ap.add_argument(
        "--preprocess-workers",
        type=int,
        default=0,
        help="also time host preparation of max(--batches) pages: serial float32 vs this many threads with uint8 "
        "views (0 = skip)",
    )
    ap.add_argument(
        "--mixed-pages",
        type=int,
        default=0,
        help="also run static vs continuous batching on this many pages with log-normal output lengths (simulated "
        "eos) at batch max(--batches), printed as a ratio (0 = skip)",
    )
    ap.add_argument("--mixed-median", type=int, default=1000, help="--mixed-pages: median output length (tokens)")
    ap.add_argument("--mixed-sigma", type=float, default=0.5, help="--mixed-pages: sigma of the log-normal")
    ap.add_argument(
        "--ngram-mixed", type=int, default=20, help="--mixed-pages: no_repeat_ngram_size of both runs (vendor: 20)"
    )
    ap.add_argument(
        "--vision-ahead",
        type=int,
        default=0,
        help="--mixed-pages: also run continuous batching with this many pages' vision run ahead of their refills "
        "on a second CUDA stream (infer.refill_vision_ahead), printed as a ratio to the plain continuous run",
    )
    ap.add_argument(
        "--prefill-ahead",
        action="store_true",
        help="with --vision-ahead: also run continuous batching with those pages' LM prefill run ahead as well "
        "(infer.refill_prefill_ahead), printed as a ratio to the plain continuous run",
    )
    ap.add_argument(
        "--per-page-prefill",
        action="store_true",
        help="--mixed-pages: also run continuous batching with each refill's pages prefilled one at a time "
        "(infer.refill_prefill=per_page: graph replays per prompt length on the fast path), printed as a ratio to "
        "the plain continuous run",
    )
    ap.add_argument(
        "--mixed-rounds",
        type=int,
        default=0,
        help="with --vision-ahead or --per-page-prefill: also pair each such mode with the plain continuous run over "
        "this many "
        "alternating rounds (one run of each a round; the sign test says whether the stage times differ; 6 rounds "
        "that agree give p = 0.031; 0: single timed runs only)",
    )
    ap.add_argument(
        "--spread-routing",
        action="store_true",
        help="spread each decode step's routing at random after the router (every expert read, as on real pages; "
        "the dummy model's rows repeat one token and share a few experts); a benchmark double: tokens are not the "
        "model's",
    )
    ap.add_argument("--check-every", type=int, default=16, help="static loop: steps between eos checks")
    ap.add_argument(
        "--mode", default=None, help="PreprocessConfig.for_mode name (v1; default base) or a v2 mode (default default)"
    )
    ap.add_argument(
        "--vision-batch",
        type=int,
        default=None,
        help="views per SAM/CLIP call; 0 = all views in one call. Default: all with --model fast (its SAM needs no "
        "N×N bias; H200 batch 64: 10.6k vs 9.2k output tok/s with 8), 8 with --model eager (eager SAM materialises "
        "a [views, 12, 4096, 4096] rel-pos bias at 1024 px)",
    )
    ap.add_argument(
        "--model",
        choices=["fast", "eager"],
        default="fast",
        help="fast: FastModel (fused weights, grouped experts, fast vision); eager: the module weights",
    )
    ap.add_argument("--expert-impl", default="grouped", help="--model eager: decoder.EXPERT_IMPLS key")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only to smoke-test the script")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None, help="directory for the .md / .json report")
    args = ap.parse_args()
    if args.prefill_ahead and not (args.mixed_pages and args.vision_ahead > 0):
        ap.error("--prefill-ahead applies to the run-ahead modes: add --mixed-pages N --vision-ahead 2")
    if args.per_page_prefill and not args.mixed_pages:
        ap.error("--per-page-prefill applies to the mixed-length workload: add --mixed-pages N")
    if args.mixed_rounds and not (args.mixed_pages and (args.vision_ahead > 0 or args.per_page_prefill)):
        ap.error(
            "--mixed-rounds pairs the run-ahead and per-page-prefill modes with the plain continuous run: add "
            "--mixed-pages N and --vision-ahead 2 or --per-page-prefill"
        )
    if args.mixed_rounds < 0:
        ap.error(f"--mixed-rounds must be >= 0, got {args.mixed_rounds}")
    if args.mode is None:
        args.mode = "default" if args.family == "v2" else "base"
    if args.vision_batch is None:
        args.vision_batch = 0 if args.model == "fast" else 8

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_batched.py needs a CUDA GPU (or --device cpu for a smoke test)")
    batches = _batches(args.batches)
    warmup_tokens = args.tokens if args.warmup_tokens is None else args.warmup_tokens
    torch.manual_seed(args.seed)
    v2 = args.family == "v2"
    config_path = (CONFIGS_V2 if v2 else CONFIGS).get(args.config, Path(args.config))
    cfg: Any = DeepseekOCR2Config.from_json(config_path) if v2 else DeepseekOCRConfig.from_json(config_path)
    model = (build_model_v2 if v2 else build_model)(cfg, device, args.dtype, "dummy", seed=args.seed)
    target: Any = model
    fast_cfg: FastConfig | None = None
    if args.model == "fast":
        on_gpu = device.type == "cuda"  # off CUDA: no torch.compile of the vision blocks, no vision graphs
        fast_cfg = FastConfig(sam_compile=on_gpu, clip_compile=on_gpu, vision_graphs=on_gpu)
        target = (apply_fast_path_v2 if v2 else apply_fast_path)(model, fast_cfg)
    eos = int(cfg.language.eos_token_id)
    pages = make_pages(cfg, max(batches), args.mode)
    env = benchmark_header(device)
    loops = DECODE_LOOPS[args.decode]
    spec = match_peak(env["gpu"]) if device.type == "cuda" else None
    bandwidth = None if spec is None else spec.mem_bw_bytes_per_s

    rows: list[dict[str, Any]] = []
    unspread: list[int] = []  # batch sizes --spread-routing could not reach (no Triton router at that row count)
    for bsz in batches:
        with routing(args, cfg, bsz) as spread:
            read, routed = experts_read(target, pages[:bsz], 8, eos, args) if args.model == "fast" else (None, None)
        if args.spread_routing and not spread:
            unspread.append(bsz)
        print(f"batch {bsz}: {_opt(read, 1)} expert slots read per MoE layer per decode step", flush=True)
        for ngram, loop in [(n, loop) for n in args.ngram for loop in loops]:
            gen = generator(target, loop, args)
            with routing(args, cfg, bsz):
                row = measure(gen, pages[:bsz], args.tokens, eos, warmup_tokens, ngram)
            gen.release_decode_state()  # free the kept graph and cache before the next loop / batch size
            row["experts_read"] = read
            row["routed_read"] = routed
            row["floor_ms"], row["floor_unavailable"] = step_floor(cfg, row, args.tokens, bandwidth)
            rows.append(row)
            flag = " (TIMED RUN CAPTURED)" if row["timed_capture_s"] > 0 else ""
            print(
                f"batch {bsz} {row['decode']} no-repeat {ngram}: {row['pages_per_s']:.3f} pages/s, "
                f"{row['output_tok_per_s']:.1f} tok/s, "
                f"TPOT p50 {row['tpot_p50_ms']:.2f} ms, capture {row['warmup_capture_s']:.3f} s{flag}, "
                f"peak {_gib(row['peak_gib'])} GiB",
                flush=True,
            )
            if row["capture_error"]:
                print(f"  graph capture failed, ran un-graphed: {row['capture_error']}", flush=True)
            del gen
            if device.type == "cuda":
                torch.cuda.empty_cache()

    model_desc = (
        f"FastModel (experts {fast_cfg.expert_impl}, decode attention {fast_cfg.decode_attention}, "
        f"vision compile/graphs {'on' if fast_cfg.vision_graphs else 'off'})"
        if fast_cfg is not None
        else f"eager modules (experts {args.expert_impl})"
    )
    header = (
        f"# {'DeepSeek-OCR-2' if v2 else 'DeepSeek-OCR'} batched throughput — {env['gpu']}\n\n"
        f"{env['date']}; driver {env['driver']}; torch {env['torch']} (CUDA {env['cuda']}); "
        f"{args.dtype}, dummy weights (config {args.config}); "
        f"mode {args.mode}, {args.tokens} tokens/sequence (ignore_eos), prompt length {rows[0]['prompt_len']}; "
        f"{model_desc}; vision batch {args.vision_batch or 'all'}; decode {', '.join(loops)} "
        f"(eos check every {args.check_every} steps); warm-up run of each shape first ({warmup_tokens} tokens), "
        f"capture excluded from the timed run.\n"
    )
    floor_note = (
        "Step floor: the bytes a decode step must move (every weight once, the routed experts the untimed run's steps "
        "read per MoE layer, each sequence's K/V at the run's mean context) at the datasheet bandwidth"
        + (f" ({bandwidth / 1e12:.2f} TB/s, {spec.name})" if spec is not None and bandwidth is not None else "")
        + "; floor / TPOT p50 is the share of that bandwidth the step reaches (a device-to-device copy reaches "
        "about 90 % of it)."
    )
    report = f"{header}\n{routing_note(args.spread_routing, unspread)}\n\n{table(rows)}\n\n{floor_note}\n"
    if args.preprocess_workers:
        pp = preprocess_rates(cfg, max(batches), args.mode, args.preprocess_workers)
        report += (
            f"\nHost preparation of {pp['pages']} pages ({args.mode}): serial, host-normalised "
            f"{pp['serial_pages_per_s']:.1f} pages/s; pool of {pp['workers']} threads, uint8 views "
            f"{pp['pooled_pages_per_s']:.1f} pages/s = {pp['pooled_pages_per_s'] / pp['serial_pages_per_s']:.1f}× "
            "(normalisation moves to the device).\n"
        )
    out = Path(args.out) if args.out else None
    stem = f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d')}-{gpu_tag(env['gpu'])}-batched"
    meta = {**vars(args), "batches": batches, "warmup_tokens": warmup_tokens}

    def save(text: str, mixed_rows: list[dict[str, Any]]) -> None:
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.md").write_text(text)
        (out / f"{stem}.json").write_text(
            json.dumps({"env": env, "args": meta, "rows": rows, "mixed": mixed_rows}, indent=2)
        )

    if args.mixed_pages:  # written now, rewritten at the end: a run cut short keeps the batch rows
        save(report + "\n**Cut short**: the mixed-length workload did not finish.\n", [])
        gen = generator(target, "graph" if device.type == "cuda" else "static", args)
        mixed_pages, caps = mixed_workload(cfg, args.mixed_pages, args.mode, args.mixed_median, args.mixed_sigma,
                                           args.seed)  # fmt: skip
        with routing(args, cfg, max(batches)) as spread:
            mixed = static_vs_continuous(
                gen,
                mixed_pages,
                caps,
                max(batches),
                args.ngram_mixed,
                args.vision_ahead,
                args.prefill_ahead,
                args.mixed_rounds,
                args.per_page_prefill,
            )
        if args.spread_routing and not spread and max(batches) not in unspread:
            unspread.append(max(batches))
        del gen
        report += "\n" + mixed_table(mixed, caps) + "\n"
        rows_mixed: list[dict[str, Any]] = mixed
    else:
        rows_mixed = []
    extra = "\n".join(batched_speedups(rows))
    if extra:
        report += f"\n{extra}\n"
    report += f"\n{batched_goal(rows, env['gpu'])}\n"
    print()
    print(report)
    save(report, rows_mixed)
    if out is not None:
        print(f"wrote {out / stem}.md / .json")


if __name__ == "__main__":
    main()
