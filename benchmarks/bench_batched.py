"""Batched throughput of the native DeepSeek-OCR (``models.deepseek_ocr.batched``) on one GPU.

Full-size dummy weights in bf16, synthetic pages (``llm_perf_opt.data.datasets.synthetic_page``, several
page sizes) in Base mode (one 1024×1024 view per page, 273 image tokens, prompt length 283), greedy with
``ignore_eos`` so every sequence makes exactly ``--tokens`` tokens.  For each batch size (default 1, 8, 32,
64): one short warm-up run of the same batch, then one timed run (CUDA events via ``DeviceClock``).

    PYTHONPATH=src python benchmarks/bench_batched.py --out benchmarks/results

Columns: pages/s and output tok/s over the whole run (vision + prefill + decode, all tokens counted);
decode tok/s (decode steps only); TTFT (vision + prefill, the same for every page of the batch);
TPOT p50 = median decode-step time (each step gives every live sequence one token, so it is the per-token
latency each sequence sees; per-sequence TPOT means are equal with ``ignore_eos``); peak memory =
``torch.cuda.max_memory_allocated`` during the timed run (weights included).

Writes ``<out>/<date>-<gpu>-batched.md`` and ``.json`` when ``--out`` is given; always prints the table.
Imports only torch/attrs/safetensors/pillow code paths (no hydra).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from llm_perf_opt.data.datasets import synthetic_page
from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model
from llm_perf_opt.models.deepseek_ocr.batched import BatchedGenerator
from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, apply_fast_path
from llm_perf_opt.models.deepseek_ocr.preprocess import PreparedPage, PreprocessConfig, preprocess_page
from llm_perf_opt.models.deepseek_ocr.tokenizer import load_tokenizer
from llm_perf_opt.profiling.hw import benchmark_header

CONFIG = "src/llm_perf_opt/models/deepseek_ocr/configs/deepseek-ocr.json"
PROMPT = "<image>\n<|grounding|>Convert the document to markdown."
PAGE_SIZES = [(1224, 1584), (1700, 2200), (850, 1100), (1584, 1224), (2480, 3508)]
GiB = 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_pages(cfg: DeepseekOCRConfig, n: int, mode: str) -> list[PreparedPage]:
    ids = load_tokenizer(None, cfg).encode_prompt(PROMPT)
    pre = PreprocessConfig.for_mode(mode)
    return [preprocess_page(synthetic_page(PAGE_SIZES[i % len(PAGE_SIZES)], i), pre, cfg, ids) for i in range(n)]


def measure(
    gen: BatchedGenerator, pages: list[PreparedPage], tokens: int, eos: int, warmup_tokens: int
) -> dict[str, Any]:
    dev = gen.device
    gen.run(pages, warmup_tokens, eos_token_id=eos, ignore_eos=True)  # same prefill shapes, allocator warm
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    res = gen.run(pages, tokens, eos_token_id=eos, ignore_eos=True)
    _sync(dev)
    # CUDA allocator peak; None off CUDA (printed "n/a", never as a number)
    peak = torch.cuda.max_memory_allocated(dev) / GiB if dev.type == "cuda" else None
    tpot = [t for t in res.tpot_ms if t == t]  # drop NaN (single-token sequences)
    return {
        "batch": len(pages),
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
        "tpot_p90_ms": statistics.quantiles(res.step_ms, n=10)[-1] if len(res.step_ms) > 1 else res.step_ms_p50,
        "tpot_mean_per_seq_ms": statistics.fmean(tpot) if tpot else None,
        "peak_gib": peak,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| batch | pages/s | output tok/s | decode tok/s | TTFT s | TPOT p50 ms | TPOT p90 ms | peak memory GiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['pages_per_s']:.3f} | {r['output_tok_per_s']:.1f} | {r['decode_tok_per_s']:.1f} "
            f"| {r['ttft_s']:.3f} | {r['tpot_p50_ms']:.2f} | {r['tpot_p90_ms']:.2f} | {_gib(r['peak_gib'])} |"
        )
    return "\n".join(lines)


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per sequence (ignore_eos)")
    ap.add_argument("--warmup-tokens", type=int, default=4)
    ap.add_argument("--mode", default="base", help="PreprocessConfig.for_mode name")
    ap.add_argument(
        "--vision-batch",
        type=int,
        default=8,
        help="views per SAM/CLIP call (eager SAM materialises a [views, 12, 4096, 4096] rel-pos bias at 1024 px); "
        "0 = all views in one call",
    )
    ap.add_argument("--expert-impl", default="grouped", help="decoder.EXPERT_IMPLS key for the routed experts")
    ap.add_argument(
        "--fast-vision", action="store_true", help="wrap in FastModel (fast SAM/CLIP, compiled blocks, vision graphs)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only to smoke-test the script")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None, help="directory for the .md / .json report")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_batched.py needs a CUDA GPU (or --device cpu for a smoke test)")
    torch.manual_seed(args.seed)
    cfg = DeepseekOCRConfig.from_json(args.config)
    model = build_model(cfg, device, args.dtype, "dummy", seed=args.seed)
    target: Any = model
    if args.fast_vision:
        target = apply_fast_path(model, FastConfig(cuda_graphs=False))
    gen = BatchedGenerator(target, expert_impl=args.expert_impl, vision_batch=args.vision_batch or None)
    eos = int(cfg.language.eos_token_id)
    pages = make_pages(cfg, max(args.batches), args.mode)
    env = benchmark_header(device)

    rows: list[dict[str, Any]] = []
    for bsz in args.batches:
        row = measure(gen, pages[:bsz], args.tokens, eos, args.warmup_tokens)
        rows.append(row)
        print(
            f"batch {bsz}: {row['pages_per_s']:.3f} pages/s, {row['output_tok_per_s']:.1f} tok/s, "
            f"TPOT p50 {row['tpot_p50_ms']:.2f} ms, peak {_gib(row['peak_gib'])} GiB",
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()

    header = (
        f"# DeepSeek-OCR batched throughput — {env['gpu']}\n\n"
        f"{env['date']}; driver {env['driver']}; torch {env['torch']} (CUDA {env['cuda']}); "
        f"{args.dtype}, dummy weights; "
        f"mode {args.mode}, {args.tokens} tokens/sequence (ignore_eos), prompt length {rows[0]['prompt_len']}; "
        f"experts {args.expert_impl}, vision batch {args.vision_batch or 'all'}, "
        f"fast vision {'on' if args.fast_vision else 'off'}.\n"
    )
    report = f"{header}\n{table(rows)}\n"
    print()
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d')}-{env['gpu'].replace(' ', '_').lower()}-batched"
        (out / f"{stem}.md").write_text(report)
        (out / f"{stem}.json").write_text(json.dumps({"env": env, "args": vars(args), "rows": rows}, indent=2))
        print(f"wrote {out / stem}.md / .json")


if __name__ == "__main__":
    main()
