"""SAM's rel-pos attention on the GPU: augmented flash operands vs FlexAttention vs the Triton kernel, op and tower.

    PYTHONPATH=src python benchmarks/bench_sam_attention.py --out /tmp/res

SAM's four global blocks add decomposed relative positions to the attention logits.  Three kernels apply them:
``sam.rel_pos_attention`` folds the two position terms into the operands (q and k 64 + h + w = 192 wide, v
zero-padded to 192, flash); ``sam.rel_pos_flex_attention`` keeps head size 64 and adds them in a FlexAttention
``score_mod`` (``--flex``: slow, measured in round 6); ``sam_kernels.rel_pos_triton_attention`` keeps head size 64
and adds them per key row in one Triton kernel (``infer.fast.sam_attention=triton``).  Per view shape of
DeepSeek-OCR (Gundam: 640-px tiles ×6 and the 1024-px global view) and DeepSeek-OCR-2 (768-px tiles ×6), this prints

* the attention op alone (each compiled, CUDA events, median of replays): ms, useful TFLOP/s (4·B·heads·N²·64),
  max |Δ| against the dense-bias reference (``decomposed_rel_pos_bias`` + SDPA in float32); also at the windowed
  blocks' shape (14×14 windows of each view, augmented vs Triton: the windowed blocks always run augmented today);
* the whole SAM tower on the fast path (compiled blocks, CUDA graph per shape) with each global-attention kernel:
  ms per view batch, and max |Δ| of the output against the reference tower in bf16.

Weights are seeded random of the real shapes (bf16).  Without CUDA the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmath next to this script
from benchmath import cuda_ms  # noqa: E402

from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, sam_kernels  # noqa: E402
from llm_perf_opt.models.deepseek_ocr.graphs import ShapeGraphs  # noqa: E402
from llm_perf_opt.models.deepseek_ocr.sam import (  # noqa: E402
    SamBlock,
    SamEncoder,
    decomposed_rel_pos_bias,
    rel_pos_attention,
    rel_pos_flex_attention,
    rel_pos_triton_attention,
    sam_block_fast,
)

# (model, view, views in the batch, side in px)
VIEWS = [
    ("v1 Gundam", "tiles 640", 6, 640),
    ("v1 / v2", "global 1024", 1, 1024),
    ("v2", "tiles 768", 6, 768),
]
# the windowed blocks' attention at each v1 view: 14x14 windows over the padded grid (42² -> 9 per tile, 70² -> 25)
WINDOW_VIEWS = [("v1 Gundam", "tiles 640, 14x14 windows", 6 * 9, 14), ("v1 / v2", "global 1024, 14x14 windows", 25, 14)]
KINDS = ("augmented", "flex", "triton")
CONFIG = ROOT / "src/llm_perf_opt/models/deepseek_ocr/configs/deepseek-ocr.json"


def global_attention(sam: SamEncoder) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(heads, head size, rel_pos_h, rel_pos_w) of SAM's first global-attention block."""
    block = next(cast(SamBlock, b) for b in sam.blocks if cast(SamBlock, b).window_size == 0)
    heads = int(block.attn.num_heads)
    return heads, int(sam.cfg.embed_dim) // heads, block.attn.rel_pos_h.detach(), block.attn.rel_pos_w.detach()


def op_rows(sam: SamEncoder, dev: torch.device, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    """The global-attention op alone at each view's token grid."""
    heads, dim, rel_h, rel_w = global_attention(sam)
    fns = {
        "augmented": torch.compile(rel_pos_attention),
        "flex": torch.compile(rel_pos_flex_attention),
        "triton": torch.compile(rel_pos_triton_attention),
    }
    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)
    shapes = [(m, v, b, side // int(sam.cfg.patch_size), kinds) for m, v, b, side in VIEWS]
    shapes += [(m, v, b, grid, ("augmented", "triton")) for m, v, b, grid in WINDOW_VIEWS]
    for model, view, batch, grid, kinds in shapes:
        n = grid * grid
        q, k, v = (torch.randn(batch, heads, n, dim, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(3))
        bias = decomposed_rel_pos_bias(q.float(), rel_h.float(), rel_w.float(), (grid, grid), (grid, grid))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)
        del bias
        flops = 4 * batch * heads * n * n * dim
        for kind in kinds:
            fn = fns[kind]
            out = fn(q, k, v, rel_h, rel_w, (grid, grid))
            ms = cuda_ms(functools.partial(fn, q, k, v, rel_h, rel_w, (grid, grid)), warmup=3, reps=20)
            rows.append(
                dict(
                    model=model,
                    view=view,
                    batch=batch,
                    tokens=n,
                    kind=kind,
                    ms=ms,
                    tflops=flops / ms / 1e9,
                    max_abs_diff=float((out.float() - ref).abs().max()),
                    ref_max_abs=float(ref.abs().max()),
                )
            )
        del ref
    return rows


# (queries per program, warps, k/v pipeline stages, rel_h prefetched a step ahead) tried by --sweep
SWEEP = [(m, w, s, p) for m in (64, 128) for w in (4, 8) for s in (1, 2, 3) for p in (True, False)]


def sweep_rows(sam: SamEncoder, dev: torch.device) -> list[dict[str, Any]]:
    """The Triton kernel's launch settings at each view's global grid and the windows' (ms, useful TFLOP/s)."""
    heads, dim, rel_h, rel_w = global_attention(sam)
    gen = torch.Generator(device=dev).manual_seed(2)
    shapes = [(v, b, side // int(sam.cfg.patch_size)) for _, v, b, side in VIEWS] + [
        (v, b, g) for _, v, b, g in WINDOW_VIEWS
    ]
    rows = []
    for view, batch, grid in shapes:
        n = grid * grid
        q, k, v = (torch.randn(batch, heads, n, dim, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(3))
        tables = functools.partial(sam_kernels.rel_pos_tables, q, rel_h, rel_w, (grid, grid))
        rows.append(dict(view=view, setting="the two tables alone (einsums)", ms=cuda_ms(tables, warmup=3, reps=20)))
        th, tw = tables()
        for block_m, warps, stages, prefetch in SWEEP:
            kernel = functools.partial(
                sam_kernels.attention_kernel, q, k, v, th, tw, grid, grid, block_m, warps, stages, prefetch
            )
            setting = f"{block_m} queries, {warps} warps, {stages} stages, rel_h prefetch {prefetch}"
            try:
                ms = cuda_ms(kernel, warmup=3, reps=20)
            except Exception as exc:  # a launch setting that does not compile is a row, not the end of the sweep
                rows.append(dict(view=view, setting=setting, error=f"{type(exc).__name__}: {exc}"[:200]))
                continue
            flops = 4 * batch * heads * n * n * dim
            rows.append(dict(view=view, setting=setting, ms=ms, tflops=flops / ms / 1e9))
    return rows


def tower_rows(sam: SamEncoder, dev: torch.device, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    """The whole SAM tower on the fast path (compiled blocks, graph per shape) with each global kernel."""
    rows = []
    compiled = torch.compile(sam_block_fast, dynamic=False)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    gen = torch.Generator(device=dev).manual_seed(1)
    for model, view, batch, side in VIEWS:
        x = torch.randn(batch, 3, side, side, device=dev, generator=gen, dtype=torch.bfloat16)
        sam.fast = False
        with torch.no_grad():
            ref = sam(x).float()
        outs = {}
        for kind in kinds:
            sam.fast, sam.block_fn, sam.global_attention = True, compiled, kind
            graphed = ShapeGraphs(sam._forward_fast)
            sam.forward_fn = graphed
            with torch.no_grad():
                outs[kind] = sam(x).float()
                ms = cuda_ms(functools.partial(sam, x), warmup=3, reps=20)
            rows.append(
                dict(
                    model=model,
                    view=view,
                    batch=batch,
                    kind=kind,
                    ms=ms,
                    graphed=graphed.capture_error is None,
                    max_abs_diff_vs_reference=float((outs[kind] - ref).abs().max()),
                    ref_max_abs=float(ref.abs().max()),
                )
            )
            sam.fast, sam.block_fn, sam.forward_fn, sam.global_attention = False, None, None, "augmented"
    return rows


def render(
    ops: list[dict[str, Any]], towers: list[dict[str, Any]], env: dict[str, str], sweep: list[dict[str, Any]]
) -> str:
    lines = [
        f"# SAM rel-pos attention: augmented flash vs FlexAttention vs Triton — {env['gpu']}",
        "",
        f"{env['date']}; torch {env['torch']}; bf16, seeded random weights of the real shapes; CUDA events,"
        " median of 20 runs after 3 warm-ups.",
        "",
        "## The op alone (one block's attention, compiled)",
        "",
        "| model | view | batch | tokens | kernel | ms | useful TFLOP/s | max abs Δ vs fp32 dense-bias ref (ref max) |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in ops:
        lines.append(
            f"| {r['model']} | {r['view']} | {r['batch']} | {r['tokens']} | {r['kind']} | {r['ms']:.3f} |"
            f" {r['tflops']:.0f} | {r['max_abs_diff']:.3g} ({r['ref_max_abs']:.3g}) |"
        )
    lines += [
        "",
        "## The SAM tower on the fast path (compiled blocks, CUDA graph per shape)",
        "",
        "| model | view | batch | global kernel | ms | graphed | max abs Δ vs reference tower (ref max) |",
        "| --- | --- | ---: | --- | ---: | --- | ---: |",
    ]
    for r in towers:
        lines.append(
            f"| {r['model']} | {r['view']} | {r['batch']} | {r['kind']} | {r['ms']:.3f} | {r['graphed']} |"
            f" {r['max_abs_diff_vs_reference']:.3g} ({r['ref_max_abs']:.3g}) |"
        )
    by = {(r["view"], r["kind"]): r["ms"] for r in towers}
    for kind in KINDS[1:]:
        pairs = [(v, by[(v, "augmented")], by[(v, kind)]) for _, v, _, _ in VIEWS if (v, kind) in by]
        speedups = ", ".join(f"{v} {a / f:.2f}×" for v, a, f in pairs)
        lines += ["", f"Tower speed-up {kind} vs augmented: {speedups}."]
    if sweep:
        lines += [
            "",
            "## The Triton kernel's launch settings (--sweep; default: sam_kernels.attention_blocks)",
            "",
            "Each setting is the kernel alone on precomputed tables; the first row per view is the tables' einsums",
            "alone (eager).",
            "",
            "| view | setting | ms | useful TFLOP/s |",
            "| --- | --- | ---: | ---: |",
        ]
        for r in sweep:
            if "error" in r:
                cells = f"failed: {r['error']} | "
            else:
                cells = f"{r['ms']:.3f} | {r['tflops']:.0f}" if "tflops" in r else f"{r['ms']:.3f} | "
            lines.append(f"| {r['view']} | {r['setting']} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for sam_attention.md / .json")
    ap.add_argument("--flex", action="store_true", help="also time FlexAttention (slow to compile and to run)")
    ap.add_argument("--sweep", action="store_true", help="also sweep the Triton kernel's launch settings")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_sam_attention: no CUDA device; nothing timed")
        return
    dev = torch.device("cuda:0")
    cfg = DeepseekOCRConfig.from_json(CONFIG)
    torch.manual_seed(0)
    sam = SamEncoder(cfg.sam).to(dev, torch.bfloat16).eval()
    with torch.no_grad():
        for p in sam.parameters():
            p.normal_(0.0, 0.02)
    env = dict(
        gpu=torch.cuda.get_device_name(dev),
        torch=torch.__version__,
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    with torch.no_grad():
        kinds = KINDS if args.flex else tuple(k for k in KINDS if k != "flex")
        ops = op_rows(sam, dev, kinds)
    towers = tower_rows(sam, dev, kinds)
    sweep = []
    if args.sweep:
        with torch.no_grad():
            sweep = sweep_rows(sam, dev)
    text = render(ops, towers, env, sweep)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sam_attention.md").write_text(text)
        (args.out / "sam_attention.json").write_text(
            json.dumps(dict(env=env, ops=ops, towers=towers, sweep=sweep), indent=1)
        )


if __name__ == "__main__":
    main()
