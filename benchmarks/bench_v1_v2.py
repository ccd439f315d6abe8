"""DeepSeek-OCR (v1, Gundam) beside DeepSeek-OCR-2 (v2, its default mode), per stage, on the same pages (issue 20).

Six columns, each one run of the profiler itself (the real CLI in a subprocess, one after the other on the same
device, so each starts with an empty allocator): v1 native eager, v1 native fast, v2 native eager, v2 native eager
with grouped experts (like for like with transformers' default ``grouped_mm`` experts), v2 native fast and v2 in
transformers' own class (``model.backend=hf_native``, the baseline).  Per column: SAM, CLIP / encoder
and projector ms (the stage hooks), vision ms, LM prefill ms (prefill − vision), prefill (TTFT) ms, decode
ms/token, image tokens, prompt length, peak memory, the analytic FLOPs of every stage and the run's MFU for it —
all read from the run's metrics.json, nothing recomputed here.  A column whose run is refused (e.g. a fast path
not built yet) or fails is printed absent with the run's own error as the reason; the other columns still run.

Then native-vs-transformers logits on the same page (full-size seeded dummy weights unless ``--tiny``): both
implementations loaded with the same values (``hf_from_native``), the prefill logits at every position compared
(max abs / max rel difference, argmax agreement), greedy tokens of both for ``--check-steps`` steps, and the
teacher-forced decode logits (transformers fed the native model's tokens) compared step by step.

    PYTHONPATH=src python benchmarks/bench_v1_v2.py --out benchmarks/results            # GPU, full size
    PYTHONPATH=src python benchmarks/bench_v1_v2.py --tiny --device cpu --out /tmp/v1v2  # CPU smoke test

Writes ``<out>/<date>-<gpu>-v1v2.md`` (markdown table + environment) and ``.json`` next to it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from llm_perf_opt.profiling.bench_meta import benchmark_header, gpu_tag

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmath next to this script, also under `python -m`
from benchmath import fmt

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
PROMPT = "<image>\n<|grounding|>Convert the document to markdown."

# the fast-path switches a like-for-like comparison with transformers' class turns off (all but grouped_moe)
EAGER_OFF = (
    "cuda_graphs",
    "fused_qkv",
    "sam_fast",
    "sam_compile",
    "clip_compile",
    "vision_graphs",
    "prefill_graphs",
    "device_decode",
    "pinned_upload",
)
# column -> (model family, CLI overrides); the arch preset (dummy or tiny) is added per run
COLUMNS: dict[str, tuple[str, list[str]]] = {
    "v1 native eager": ("deepseek_ocr", ["model/deepseek_ocr/infer=deepseek_ocr.gundam"]),
    "v1 native fast": ("deepseek_ocr", ["model/deepseek_ocr/infer=deepseek_ocr.gundam", "infer.fast.enabled=true"]),
    "v2 native eager": ("deepseek_ocr2", ["model/deepseek_ocr/infer=deepseek_ocr2.default"]),
    # like for like with transformers' class, whose experts default to one grouped GEMM (experts_implementation
    # "grouped_mm" since 5.x): the native model with the grouped experts and every other fast-path switch off
    # (no fused QKV, no compile, no CUDA graphs, torch decode ops, host token loop)
    "v2 native eager + grouped experts": (
        "deepseek_ocr2",
        [
            "model/deepseek_ocr/infer=deepseek_ocr2.default",
            "infer.fast.enabled=true",
            *(f"infer.fast.{k}=false" for k in EAGER_OFF),
            "infer.fast.decode_kernels=torch",
        ],
    ),
    "v2 native fast": ("deepseek_ocr2", ["model/deepseek_ocr/infer=deepseek_ocr2.default", "infer.fast.enabled=true"]),
    "v2 transformers native": (
        "deepseek_ocr2",
        ["model/deepseek_ocr/infer=deepseek_ocr2.default", "model.backend=hf_native"],
    ),
}
# the order the columns run in (the table keeps COLUMNS' order)
RUN_ORDER = [
    "v2 transformers native",
    "v2 native eager",
    "v2 native eager + grouped experts",
    "v1 native eager",
    "v2 native fast",
    "v1 native fast",
]
# rows of the table: (label, key of the column's figures, format)
ROWS: list[tuple[str, str, str]] = [
    ("SAM ms", "sam_ms", "{:.2f}"),
    ("CLIP (v1) / encoder (v2) ms", "clip_ms", "{:.2f}"),
    ("projector ms", "projector_ms", "{:.3f}"),
    ("vision ms (all views + layout)", "vision_ms", "{:.2f}"),
    ("LM prefill ms (prefill − vision)", "prefill_lm_ms", "{:.2f}"),
    ("prefill ms (TTFT)", "prefill_ms", "{:.2f}"),
    ("decode ms/token", "tpot_ms", "{:.3f}"),
    ("image tokens", "image_tokens", "{}"),
    ("prompt tokens", "prompt_tokens", "{}"),
    ("peak memory GiB", "peak_gib", "{:.2f}"),
    ("SAM GFLOP", "sam_gflop", "{:.1f}"),
    ("CLIP / encoder GFLOP", "clip_gflop", "{:.1f}"),
    ("projector GFLOP", "projector_gflop", "{:.2f}"),
    ("LM prefill GFLOP", "prefill_lm_gflop", "{:.1f}"),
    ("decode GFLOP/token", "decode_gflop_per_token", "{:.3f}"),
    ("SAM MFU %", "sam_mfu_pct", "{:.1f}"),
    ("CLIP / encoder MFU %", "clip_mfu_pct", "{:.1f}"),
    ("projector MFU %", "projector_mfu_pct", "{:.1f}"),
    ("vision MFU %", "vision_mfu_pct", "{:.1f}"),
    ("LM prefill MFU %", "prefill_lm_mfu_pct", "{:.1f}"),
    ("decode MFU %", "decode_mfu_pct", "{:.2f}"),
    ("parameters (B)", "params_b", "{:.3f}"),
]


def arch(family: str, tiny: bool) -> str:
    return f"model/deepseek_ocr/arch={family}.{'tiny' if tiny else 'dummy'}"


def run_column(name: str, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """One profiler run through the real CLI; its figures, or ``{"absent": reason}`` when it did not finish."""
    family, overrides = COLUMNS[name]
    sizes = "[" + ",".join(f"[{w},{h}]" for w, h in args.sizes) + "]"
    cli = [
        arch(family, args.tiny), *overrides, f"device={args.device}", f"repeats={args.repeats}",
        f"infer.max_new_tokens={args.tokens}", "infer.ignore_eos=true", f"dataset.sizes={sizes}", "progress=false",
        "profiling.enabled=false", "profiling.static_compute=false", f"profiling.warmup_rounds={args.warmup_rounds}",
        "output.plots=false", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "llm_perf_opt.runners.llm_profile_runner", *cli],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout_s, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"absent": f"run did not finish within --timeout-s {args.timeout_s:g} s"}
    metrics = run_dir / "metrics.json"
    if proc.returncode != 0 or not metrics.is_file():
        lines = [ln.strip() for ln in proc.stderr.splitlines() if "Error" in ln or "hint" in ln.lower()]
        reason = " ".join(lines[-2:]) or (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"absent": f"run exited {proc.returncode}: {reason}"[:400]}
    return figures(json.loads(metrics.read_text()))


def _p50(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def figures(m: dict[str, Any]) -> dict[str, Any]:
    """The table's figures from one run's metrics.json: medians over its page runs, its per-stage FLOPs and MFU."""
    pages = [p for p in m["pages"] if p.get("error") is None]
    if not pages:
        return {"absent": "the run finished without a successful page"}
    out: dict[str, Any] = {}
    for key in ("sam_ms", "clip_ms", "projector_ms", "vision_ms", "prefill_ms", "tpot_ms"):
        out[key] = _p50([p[key] for p in pages if p.get(key) is not None])
    out["prefill_lm_ms"] = _p50([p["prefill_ms"] - p["vision_ms"] for p in pages])
    out["image_tokens"] = "/".join(sorted({str(p["image_tokens"]) for p in pages}))
    out["prompt_tokens"] = "/".join(sorted({str(p["prompt_tokens"]) for p in pages}))
    peaks = [p["peak_mem_allocated_bytes"] for p in pages if p.get("peak_mem_allocated_bytes") is not None]
    out["peak_gib"] = max(peaks) / GiB if peaks else None
    out["peak_source"] = "CUDA allocator peak (allocated)" if peaks else "absent: not a CUDA run"
    eff = {e["stage"]: e for e in m["efficiency"]}
    enc = "encoder" if "encoder" in eff else "clip"
    for slot, stage in (("sam", "sam"), ("clip", enc), ("projector", "projector"), ("vision", "vision"),
                        ("prefill_lm", "prefill_lm"), ("decode", "decode")):  # fmt: skip
        e = eff.get(stage)
        out[f"{slot}_gflop"] = e["flops"] / 1e9 if e else None
        out[f"{slot}_mfu_pct"] = e["mfu"] * 100 if e and e.get("mfu") is not None else None
    steps = _p50([p["generated_tokens"] - 1 for p in pages])
    out["decode_gflop_per_token"] = out.pop("decode_gflop") / steps if out["decode_gflop"] and steps else None
    out["params_b"] = m["model"]["params_total"] / 1e9
    out["backend"] = m["model"]["backend"]
    out["dtype"] = m["model"]["dtype"]
    out["generated_tokens"] = _p50([p["generated_tokens"] for p in pages])
    out["page_runs"] = len(pages)
    hw = m["hardware"]
    out["peak_flops_per_s"] = hw.get("peak_flops_per_s")
    out["peak_flops_source"] = hw.get("peak_flops_source")
    mfu_missing = [u["reason"] for u in m["unavailable"] if u["metric"] == "mfu"]
    out["mfu_absent_reason"] = mfu_missing[0] if mfu_missing else None
    return out


# ----------------------------------------------------------------------------- native vs transformers logits
def logits_check(args: argparse.Namespace) -> dict[str, Any]:
    """Native v2 and transformers' class on the same weights and page: prefill logits, greedy and teacher-forced
    decode.  Returns the differences and a verdict against ``args.check_tol`` (max relative difference)."""
    from llm_perf_opt.errors import ConfigError
    from llm_perf_opt.models.deepseek_ocr import weights as W
    from llm_perf_opt.runners.backends.hf_native import hf_native_class
    from llm_perf_opt.runners.settings import ModelSettings, PreprocessSettings

    try:
        hf_cls = hf_native_class()
    except ConfigError as exc:  # names the installed transformers: the check is absent, not failed
        return {"absent": exc.message}
    device, dtype = torch.device(args.device), W.resolve_dtype(args.check_dtype)
    pre = PreprocessSettings(base_size=1024, image_size=768, crop_mode=True, min_crops=2, max_crops=6)
    settings = ModelSettings(
        family="deepseek_ocr2", backend="native", weights="dummy", dtype=args.check_dtype, preprocess=pre,
        config_json="builtin:tiny" if args.tiny else "builtin:deepseek-ocr2",
    )  # fmt: skip
    # plain float32 on CUDA (no TF32 in matmuls or cuDNN convolutions), so differences are the implementations'
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _compare(args, settings, device, dtype, hf_cls)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32


def _compare(
    args: argparse.Namespace, settings: Any, device: torch.device, dtype: torch.dtype, hf_cls: Any
) -> dict[str, Any]:
    from llm_perf_opt.data.datasets import synthetic_page
    from llm_perf_opt.runners.backends.hf_native import HfNativeSessionModel, hf_from_native
    from llm_perf_opt.runners.backends.native_v2 import NativeV2Backend

    native = NativeV2Backend.load(settings, device, dtype, 0, ROOT)
    hf = HfNativeSessionModel(hf_from_native(hf_cls, native.model, dtype, device))
    from transformers import DynamicCache

    prepared = native.prepare_page(synthetic_page(tuple(args.sizes[0]), 0), native.tokenizer.encode_prompt(PROMPT))
    crops = prepared.images_crop.to(device, dtype)
    ori = prepared.images_ori.to(device, dtype)
    ids, mask = prepared.input_ids.to(device), prepared.images_seq_mask.to(device)
    n = int(prepared.prompt_len)
    steps = args.check_steps
    with torch.inference_mode():
        nm = native.model
        n_cache = nm.new_cache(1, n + steps + 1)
        n_logits = nm.prefill(nm.embed_prompt(ids, mask, [nm.encode_images(crops, ori, prepared.images_spatial_crop)]),
                              n_cache, logits_positions="all")[0].float()  # fmt: skip
        h_cache = _hf_cache(hf, DynamicCache)
        h_logits = hf.prefill(hf.embed_prompt(ids, mask, [hf.encode_images(crops, ori, prepared.images_spatial_crop)]),
                              h_cache, logits_positions="all")[0].float()  # fmt: skip
        diff = (n_logits - h_logits).abs()
        out: dict[str, Any] = {
            "dtype": args.check_dtype,
            "tf32": False,
            "prompt_tokens": n,
            "prefill_max_abs_diff": float(diff.max()),
            "prefill_max_rel_diff": float(diff.max() / n_logits.abs().max()),
            "prefill_argmax_agree_frac": float((n_logits.argmax(-1) == h_logits.argmax(-1)).float().mean()),
        }
        # greedy on each; teacher-forced: transformers fed the native model's tokens, logits compared per step
        n_tok, h_tok = [int(n_logits[-1].argmax())], [int(h_logits[-1].argmax())]
        tf_cache = _hf_cache(hf, DynamicCache)
        hf.prefill(hf.embed_prompt(ids, mask, [hf.encode_images(crops, ori, prepared.images_spatial_crop)]), tf_cache)
        step_rel: list[float] = []
        for _ in range(steps - 1):
            nl = nm.decode_step(torch.tensor([[n_tok[-1]]], device=device), n_cache)[0].float()
            tl = hf.decode_step(torch.tensor([[n_tok[-1]]], device=device), tf_cache)[0].float()
            step_rel.append(float((nl - tl).abs().max() / nl.abs().max()))
            hl = hf.decode_step(torch.tensor([[h_tok[-1]]], device=device), h_cache)[0].float()
            n_tok.append(int(nl.argmax()))
            h_tok.append(int(hl.argmax()))
    first_div = next((i for i, (a, b) in enumerate(zip(n_tok, h_tok, strict=True)) if a != b), None)
    out.update(
        greedy_steps=steps,
        greedy_tokens_equal=n_tok == h_tok,
        greedy_first_divergence=first_div,
        native_tokens=n_tok,
        transformers_tokens=h_tok,
        teacher_forced_decode_max_rel_diff=max(step_rel) if step_rel else None,
        tolerance_rel=args.check_tol,
    )
    worst = max([out["prefill_max_rel_diff"], *step_rel])
    out["passed"] = bool(worst <= args.check_tol and out["greedy_tokens_equal"])
    return out


def _hf_cache(hf: Any, dynamic_cache: Any) -> Any:
    from llm_perf_opt.runners.backends.hf_native import HfNativeCache

    return HfNativeCache(dynamic_cache(config=hf.hf.config))


# ----------------------------------------------------------------------------- report
def render(res: dict[str, Any]) -> str:
    env, cols = res["env"], res["columns"]
    names = list(COLUMNS)
    weights = "tiny presets (pipeline smoke, not model figures)" if res["tiny"] else "full-size seeded dummy weights"
    sizes = ", ".join(f"{w}×{h}" for w, h in res["sizes"])
    lines = [
        f"# DeepSeek-OCR v1 vs DeepSeek-OCR-2 — {env['gpu']}",
        "",
        f"{env['date']}; driver {env['driver']}; torch {env['torch']} (CUDA {env['cuda']}); transformers "
        f"{res['transformers']}; {weights};"
        f" synthetic page(s) {sizes}; v1 in Gundam mode (1024 global + 640 tiles), v2 in its default mode"
        f" (1024 global + 768 tiles); {res['repeats']} timed repeat(s), {res['tokens']} new tokens (eos ignored);"
        " medians over page runs, each column one profiler run (the CLI) on the same device.",
        "",
        "| metric | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    for label, key, spec in ROWS:
        cells = []
        for n in names:
            c = cols[n]
            cells.append("absent" if "absent" in c else fmt(c.get(key), spec))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Absent columns and figures:", ""]
    absent = [f"- {n}: {cols[n]['absent']}" for n in names if "absent" in cols[n]]
    mfu = {cols[n].get("mfu_absent_reason") for n in names if "absent" not in cols[n]} - {None}
    absent += [f"- MFU: {r}" for r in sorted(mfu)]
    lines += absent or ["- none"]
    chk = res["logits_check"]
    lines += ["", "## Native vs transformers' class, same weights and page", ""]
    if "absent" in chk:
        lines.append(f"absent: {chk['absent']}")
    else:
        lines += [
            f"{chk['dtype']} (TF32 off), prompt {chk['prompt_tokens']} tokens. Prefill logits at every position: "
            f"max |Δ| {chk['prefill_max_abs_diff']:.3g}, max rel {chk['prefill_max_rel_diff']:.3g}, argmax agrees at "
            f"{100 * chk['prefill_argmax_agree_frac']:.2f} % of positions. Greedy tokens equal for "
            f"{chk['greedy_steps']} steps: {'yes' if chk['greedy_tokens_equal'] else 'no'}"
            + (
                ""
                if chk["greedy_first_divergence"] is None
                else f" (first divergence at {chk['greedy_first_divergence']})"
            )
            + f". Teacher-forced decode logits max rel {fmt(chk['teacher_forced_decode_max_rel_diff'], '{:.3g}')}."
            f" Verdict (max rel ≤ {chk['tolerance_rel']:g} and tokens equal): {'PASS' if chk['passed'] else 'FAIL'}.",
        ]
    return "\n".join(lines) + "\n"


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    try:
        return int(w), int(h)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"page size {text!r} is not WIDTHxHEIGHT, e.g. 1224x1584") from exc


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--tiny", action="store_true", help="tiny presets (CPU smoke test), not the full-size dummies")
    ap.add_argument("--sizes", type=parse_size, nargs="+", default=[(1224, 1584)], help="page sizes WIDTHxHEIGHT")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per page (eos ignored)")
    ap.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds before each column's repeats")
    ap.add_argument("--columns", nargs="*", default=list(COLUMNS), choices=list(COLUMNS), help="none: the check only")
    ap.add_argument("--check-steps", type=int, default=16, help="greedy / teacher-forced steps of the logits check")
    ap.add_argument("--check-dtype", default="float32", help="dtype of the logits check (float32 or bfloat16)")
    ap.add_argument("--check-tol", type=float, default=None, help="max rel diff (default 1e-4 fp32, 3e-2 bf16)")
    ap.add_argument("--timeout-s", type=float, default=600, help="per column run")
    args = ap.parse_args(argv)
    if args.check_tol is None:
        args.check_tol = 1e-4 if args.check_dtype == "float32" else 3e-2
    try:
        hf_version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        hf_version = "not installed"
    res: dict[str, Any] = {
        "env": benchmark_header(args.device),
        "transformers": hf_version,
        "tiny": args.tiny,
        "sizes": [list(s) for s in args.sizes],
        "repeats": args.repeats,
        "tokens": args.tokens,
        "columns": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{dt.date.today().isoformat()}-{gpu_tag(res['env']['gpu'])}-v1v2{'-tiny' if args.tiny else ''}"
    partial = args.out / f"{stem}.partial.json"  # what is done so far, in case the device time runs out
    # the logits check first (in this process; its memory is returned before the columns run), then the
    # columns, v2 first: the rarest figures come first when a run is cut short
    res["logits_check"] = logits_check(args)
    gc.collect()  # both models of the check, before the columns' processes take the device
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    partial.write_text(json.dumps(res, indent=2, default=str))
    print(f"logits check: {res['logits_check']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="v1v2-") as tmp:
        for name in RUN_ORDER:
            if name not in args.columns:
                res["columns"][name] = {"absent": "not selected (--columns)"}
                continue
            t0 = time.perf_counter()
            res["columns"][name] = run_column(name, args, Path(tmp) / name.replace(" ", "_"))
            res["columns"][name]["wall_s"] = round(time.perf_counter() - t0, 1)  # the whole CLI run, load included
            partial.write_text(json.dumps(res, indent=2, default=str))
            print(f"{name}: {res['columns'][name]}", flush=True)
    res["columns"] = {name: res["columns"][name] for name in COLUMNS}  # the table's order
    text = render(res)
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str))
    partial.unlink()
    print(text)
    return res


if __name__ == "__main__":
    main()
