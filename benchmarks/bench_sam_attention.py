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
  blocks' shape (14×14 windows of each view; ``infer.fast.sam_window_attention``);
* the whole SAM tower on the fast path (compiled blocks, CUDA graph per shape) per variant (global and windowed
  blocks' kernels, SDPA policy): ms per view batch, and max |Δ| of the output against the reference tower in bf16.

Everything runs under an SDPA backend policy as the product does: the model's own (flash, efficient, math: no
cuDNN) unless a row says cuDNN (``infer.fast.vision_sdpa=cudnn``).  Until round 11 this script set none, so SDPA was
free to pick cuDNN for the augmented rows, unlike the product (round 10's op and tower rows disagreed with it).

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
from bench_kernels import graph_ms  # noqa: E402
from benchmath import cuda_ms, module_setting, paired_ab  # noqa: E402
from torch.nn.attention import sdpa_kernel  # noqa: E402

from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, sam_kernels  # noqa: E402
from llm_perf_opt.models.deepseek_ocr.fast import VISION_SDPA  # noqa: E402
from llm_perf_opt.models.deepseek_ocr.graphs import ShapeGraphs  # noqa: E402
from llm_perf_opt.models.deepseek_ocr.model import DEFAULT_SDPA_BACKENDS  # noqa: E402
from llm_perf_opt.models.deepseek_ocr.sam import (  # noqa: E402
    SamBlock,
    SamEncoder,
    decomposed_rel_pos_bias,
    rel_pos_attention,
    rel_pos_flex_attention,
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


def _policy(name: str) -> Any:
    """The SDPA backend context of a vision SDPA policy, as the product applies it: "model" is the model's own
    DEFAULT_SDPA_BACKENDS (the stage call's context), the others ``FastConfig.vision_sdpa``'s lists.  Without it SDPA
    may pick cuDNN for the augmented operands, which the product never runs by default (round 10's op rows)."""
    backends = VISION_SDPA[name] or DEFAULT_SDPA_BACKENDS
    return sdpa_kernel(list(backends))


# (label, kernel, SDPA policy, Triton block_n: 0 = attention_blocks' default)
OP_VARIANTS = [
    ("augmented", "augmented", "model", 0),
    ("augmented, cudnn", "augmented", "cudnn", 0),
    ("flex", "flex", "model", 0),
    ("triton", "triton", "model", 0),
    ("triton, 128-wide key steps", "triton", "model", 128),
]


def op_rows(sam: SamEncoder, dev: torch.device, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rel-pos attention op alone at each view's token grid and each windowed grid, per variant."""
    heads, dim, rel_h, rel_w = global_attention(sam)
    fns = {
        "augmented": torch.compile(rel_pos_attention, dynamic=False),  # static shapes, as the product compiles
        "flex": torch.compile(rel_pos_flex_attention, dynamic=False),
        "triton": torch.compile(sam_kernels.rel_pos_triton_attention, dynamic=False),  # takes block_n
    }
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)
    shapes = [(m, v, b, side // int(sam.cfg.patch_size)) for m, v, b, side in VIEWS] + WINDOW_VIEWS
    for model, view, batch, grid in shapes:
        n = grid * grid
        q, k, v = (torch.randn(batch, heads, n, dim, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(3))
        bias = decomposed_rel_pos_bias(q.float(), rel_h.float(), rel_w.float(), (grid, grid), (grid, grid))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)
        del bias
        flops = 4 * batch * heads * n * n * dim
        for label, kind, policy, block_n in OP_VARIANTS:
            if kind not in kinds or (block_n and block_n < grid):
                continue
            extra = dict(block_n=block_n) if block_n else {}
            fn = functools.partial(fns[kind], q, k, v, rel_h, rel_w, (grid, grid), **extra)
            with _policy(policy):
                out = fn()
                ms = cuda_ms(fn, warmup=3, reps=20)
            rows.append(
                dict(
                    model=model,
                    view=view,
                    batch=batch,
                    tokens=n,
                    kind=label,
                    ms=ms,
                    tflops=flops / ms / 1e9,
                    max_abs_diff=float((out.float() - ref).abs().max()),
                    ref_max_abs=float(ref.abs().max()),
                )
            )
        del ref
    return rows


def sweep_settings(grid: int) -> list[tuple[int, int, int, int, bool, int]]:
    """(queries per program, key columns per step, warps, stages, rel_h prefetched, patch width) tried by --sweep at
    a grid width: key steps of one row (the width rounded up to a power of two) up to 256 columns (several whole
    rows, their position terms through one-hot products; a 14x14 window whole in one step); 32-query programs for
    windows; on a grid whose width is a multiple of 8 but no power of two (the 640/768-px tiles' 40/48), steps of
    8-column patches of 64 and 128 keys (no padding columns)."""
    width = max(16, 1 << (grid - 1).bit_length())
    widths = [n for n in (16, 32, 64, 128, 256) if n >= width] or [width]
    programs = [(64, 4, 2), (128, 4, 2), (128, 8, 2), (128, 8, 3)] + ([(32, 4, 2)] if grid <= 16 else [])
    out = [(m, n, w, s, True, 0) for n in widths for m, w, s in programs]
    if grid % 8 == 0 and grid != width:
        out += [(m, n, w, s, True, 8) for n in (64, 128) for m, w, s in programs]
    return [*out, (128, width, 8, 2, False, 0)]


# (queries per program, warps) of sam_kernels.tables_gather_kernel tried by the tables' rows
GATHER_SETTINGS = [(16, 1), (32, 2), (32, 4), (64, 4), (64, 8), (128, 8)]


def table_rows(view: str, tables: Any, q: torch.Tensor, grid: int) -> list[dict[str, Any]]:
    """The two tables alone at one view (compiled, as inside the fast path's SAM blocks, graph-timed): each form of
    ``sam_kernels.TABLES``, then the gather form at each of :data:`GATHER_SETTINGS`.  GB/s counts one read of
    ``q`` and one write of both tables (the least any form must move)."""
    batch, heads, n, dim = q.shape
    useful = batch * heads * n * (dim + 2 * grid) * q.element_size()
    runs = [(form, None) for form in sam_kernels.TABLE_FORMS] + [("gather", s) for s in GATHER_SETTINGS]
    rows = []
    for form, setting in runs:
        label = f"the two tables alone, compiled, TABLES={form}" + (
            f", {setting[0]} queries / {setting[1]} warps" if setting else ""
        )
        try:
            # GATHER_BLOCK is read inside the custom op at each call, TABLES while tracing (a guard: recompiled)
            block = setting or sam_kernels.GATHER_BLOCK
            with module_setting(sam_kernels, "TABLES", form), module_setting(sam_kernels, "GATHER_BLOCK", block):
                compiled = torch.compile(tables, dynamic=False)
                compiled()  # compile outside the graph capture
                ms = graph_ms(compiled)
        except Exception as exc:  # one form failing must not lose the sweep
            rows.append(dict(view=view, setting=label, error=f"{type(exc).__name__}: {exc}"[:200]))
            continue
        rows.append(dict(view=view, setting=label, ms=ms, gbps=useful / ms / 1e6))
    return rows


def grid_shapes(sam: SamEncoder) -> list[tuple[str, int, int]]:
    """(view, batch, key-grid width) of each view's global blocks and of the windows, as the sweeps walk them."""
    return [(v, b, side // int(sam.cfg.patch_size)) for _, v, b, side in VIEWS] + [
        (v, b, g) for _, v, b, g in WINDOW_VIEWS
    ]


def tables_only_rows(sam: SamEncoder, dev: torch.device) -> list[dict[str, Any]]:
    """``--tables``: :func:`table_rows` at each view's global grid and the windows' (no attention settings)."""
    heads, dim, rel_h, rel_w = global_attention(sam)
    gen = torch.Generator(device=dev).manual_seed(2)
    rows = []
    for view, batch, grid in grid_shapes(sam):
        qkv = torch.randn(batch, grid * grid, 3, heads, dim, device=dev, generator=gen, dtype=torch.bfloat16)
        q = qkv.permute(2, 0, 3, 1, 4)[0]  # the block's strided view of its QKV output
        rows += table_rows(view, functools.partial(sam_kernels.rel_pos_tables, q, rel_h, rel_w, (grid, grid)), q, grid)
    return rows


def sweep_rows(sam: SamEncoder, dev: torch.device) -> list[dict[str, Any]]:
    """The Triton kernel's launch settings at each view's global grid and the windows' (ms, useful TFLOP/s)."""
    heads, dim, rel_h, rel_w = global_attention(sam)
    gen = torch.Generator(device=dev).manual_seed(2)
    rows = []
    for view, batch, grid in grid_shapes(sam):
        n = grid * grid
        q, k, v = (torch.randn(batch, heads, n, dim, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(3))
        tables = functools.partial(sam_kernels.rel_pos_tables, q, rel_h, rel_w, (grid, grid))
        rows += table_rows(view, tables, q, grid)
        th, tw = tables()
        default = sam_kernels.attention_blocks(n, grid, interpreter=False)
        rows.append(dict(view=view, setting=f"default: {default}", ms=float("nan")))
        for block_m, block_n, warps, stages, prefetch, patch_w in sweep_settings(grid):
            kernel = functools.partial(  # block_n given: whole key rows unless the setting names a patch width
                sam_kernels.attention_kernel,
                *(q, k, v, th, tw, grid, grid, block_m, block_n, warps, stages, prefetch, patch_w),
            )
            shape = f"{block_n // patch_w}x{patch_w} patches" if patch_w else f"{block_n // grid} rows"
            setting = (
                f"{block_m} queries, {block_n} keys ({shape}), {warps} warps, {stages} stages,"
                f" rel_h prefetch {prefetch}"
            )
            try:
                ms = graph_ms(kernel)
            except Exception as exc:  # a launch setting that does not compile is a row, not the end of the sweep
                rows.append(dict(view=view, setting=setting, error=f"{type(exc).__name__}: {exc}"[:200]))
                continue
            flops = 4 * batch * heads * n * n * dim
            rows.append(dict(view=view, setting=setting, ms=ms, tflops=flops / ms / 1e9))
    return rows


# --forms: launch settings per key-grid width, (block_m, block_n, warps, stages, patch_w), zeros = attention_blocks'
# default; each one-hot setting (patches, several rows) is timed in both forms of sam_kernels.BIAS_IN_MMA, each
# one-row setting in both forms of sam_kernels.ROW_TERM_IN_MAX, paired.
# The 1024-px view's 64-wide grid in 8x8 patches is new: with the terms in the accumulator the one-hot steps do less
# float32 work per score than one key row a step.
FORM_SETTINGS: dict[int, list[tuple[int, int, int, int, int]]] = {
    40: [(0, 0, 0, 0, 0), (128, 64, 8, 3, 8), (128, 64, 4, 2, 8), (64, 64, 4, 3, 8), (64, 64, 8, 2, 8)],
    64: [(0, 0, 0, 0, 0), (64, 64, 4, 2, 8), (128, 64, 8, 3, 8), (128, 64, 4, 2, 8), (64, 128, 4, 2, 8)],
    48: [(0, 0, 0, 0, 0), (64, 64, 4, 2, 8), (128, 64, 8, 2, 8), (128, 64, 4, 3, 8), (64, 64, 4, 3, 8)],
    # the windows: also a whole 14x14 window in one 256-wide step at 8 warps and one stage (nothing to pipeline: 255
    # registers, no spill for sm_90, where 4 warps or 2 stages spill 72-184 B), and 9 rows a 128-wide step at 8 warps
    14: [(0, 0, 0, 0, 0), (64, 64, 4, 2, 0), (64, 32, 4, 2, 0), (64, 256, 8, 1, 0), (64, 128, 8, 2, 0)],
}


def forms_rows(
    sam: SamEncoder, dev: torch.device, rounds: int, grids: frozenset[int] = frozenset()
) -> list[dict[str, Any]]:
    """``--forms``: the kernel alone (graph-timed) at each :data:`FORM_SETTINGS` setting per view; a one-hot
    setting in both forms of ``sam_kernels.BIAS_IN_MMA``, round 21's (a) and the accumulator's (b), a one-row setting
    in both forms of ``sam_kernels.ROW_TERM_IN_MAX`` (off a, on b), paired over
    ``rounds`` (the sign test), with the largest |Δ| between the two forms' outputs; ``grids`` (key-grid widths)
    narrows the views (empty: all)."""
    heads, dim, rel_h, rel_w = global_attention(sam)
    gen = torch.Generator(device=dev).manual_seed(3)
    rows = []
    for view, batch, grid in grid_shapes(sam):
        if grids and grid not in grids:
            continue
        n = grid * grid
        q, k, v = (torch.randn(batch, heads, n, dim, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(3))
        th, tw = sam_kernels.rel_pos_tables(q, rel_h, rel_w, (grid, grid))
        flops = 4 * batch * heads * n * n * dim
        for block_m, block_n, warps, stages, patch_w in FORM_SETTINGS.get(grid, [(0, 0, 0, 0, 0)]):
            b = sam_kernels.attention_blocks(
                n, grid, False, block_m=block_m, block_n=block_n, warps=warps, stages=stages, patch_w=patch_w
            )
            kernel = functools.partial(
                sam_kernels.attention_kernel,
                *(q, k, v, th, tw, grid, grid, b.block_m, b.block_n, b.warps, b.stages, True, b.patch_w),
            )
            label = ("default: " if not any((block_m, block_n, warps, stages, patch_w)) else "") + str(b)
            # the form that applies to these steps: one-hot steps BIAS_IN_MMA, one-row steps ROW_TERM_IN_MAX
            name = "BIAS_IN_MMA" if b.one_hot else "ROW_TERM_IN_MAX"

            def timed(form: bool, fn: Any = kernel, name: str = name) -> float:
                with module_setting(sam_kernels, name, form):
                    return graph_ms(fn)

            try:
                with module_setting(sam_kernels, name, False):
                    old = kernel()
                with module_setting(sam_kernels, name, True):
                    diff = float((kernel().float() - old.float()).abs().max())
                ab = paired_ab(functools.partial(timed, False), functools.partial(timed, True), rounds)
                rows.append(
                    dict(view=view, setting=label, a_ms=ab.a_ms, ms=ab.b_ms, tflops=flops / ab.b_ms / 1e9)
                    | dict(paired=ab.cell(), forms_max_abs_diff=diff, row_shift=not b.one_hot)
                )
            except Exception as exc:  # a setting that does not compile is a row, not the end of the run
                rows.append(dict(view=view, setting=label, error=f"{type(exc).__name__}: {exc}"[:200]))
    return rows


def forms_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## The position terms' forms (--forms: sam_kernels.BIAS_IN_MMA, ROW_TERM_IN_MAX), the kernel alone",
        "",
        "One-hot steps (patches, several rows): a, the terms scaled and added after the score product (round 21);",
        "b, the terms as the product's accumulator (BIAS_IN_MMA). One key row a step (rows marked 'row'): a, the",
        "row's rel_h term added to every score; b, the term as a shift of the row's max (ROW_TERM_IN_MAX). CUDA",
        "graph of 10 calls, median of 10 replays per round; the rounds alternate a b / b a.",
        "",
        "| view | setting | a ms | b ms | b TFLOP/s | b - a, paired | max abs Δ a vs b |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['view']} | {r['setting']} | failed: {r['error']} | | | | |")
        else:
            mark = " (row)" if r["row_shift"] else ""
            lines.append(
                f"| {r['view']} | {r['setting']}{mark} | {r['a_ms']:.4f} | {r['ms']:.4f} | {r['tflops']:.0f} |"
                f" {r['paired']} | {r['forms_max_abs_diff']:.3g} |"
            )
    return lines


# (label, global blocks' kernel, windowed blocks' kernel, SDPA policy)
TOWER_VARIANTS = [
    ("augmented", "augmented", "augmented", "model"),
    ("augmented, cudnn", "augmented", "augmented", "cudnn"),
    ("flex", "flex", "augmented", "model"),
    ("triton (global blocks)", "triton", "augmented", "model"),
    ("triton (global + windowed blocks)", "triton", "triton", "model"),
]


def tower_rows(sam: SamEncoder, dev: torch.device, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    """The whole SAM tower on the fast path (compiled blocks, graph per shape) per variant, under its SDPA policy
    as the product runs it (the block function is called with the policy, so each gets its own graph)."""
    rows = []
    compiled = torch.compile(sam_block_fast, dynamic=False)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    gen = torch.Generator(device=dev).manual_seed(1)
    for model, view, batch, side in VIEWS:
        x = torch.randn(batch, 3, side, side, device=dev, generator=gen, dtype=torch.bfloat16)
        sam.fast = False
        with torch.no_grad(), _policy("model"):
            ref = sam(x).float()
        for label, global_kind, window_kind, policy in TOWER_VARIANTS:
            if global_kind not in kinds:
                continue
            sam.fast, sam.global_attention, sam.window_attention = True, global_kind, window_kind
            sam.block_fn = functools.partial(compiled, sdpa_policy=policy)
            graphed = ShapeGraphs(sam._forward_fast)
            sam.forward_fn = graphed
            with torch.no_grad(), _policy(policy):
                out = sam(x).float()
                ms = cuda_ms(functools.partial(sam, x), warmup=3, reps=20)
            rows.append(
                dict(
                    model=model,
                    view=view,
                    batch=batch,
                    kind=label,
                    ms=ms,
                    graphed=graphed.capture_error is None,
                    max_abs_diff_vs_reference=float((out - ref).abs().max()),
                    ref_max_abs=float(ref.abs().max()),
                )
            )
            sam.fast, sam.block_fn, sam.forward_fn = False, None, None
            sam.global_attention = sam.window_attention = "augmented"
    return rows


def _op_tower_lines(ops: list[dict[str, Any]], towers: list[dict[str, Any]]) -> list[str]:
    lines = [
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
    for label, *_ in TOWER_VARIANTS[1:]:
        pairs = [(v, by[(v, "augmented")], by[(v, label)]) for _, v, _, _ in VIEWS if (v, label) in by]
        if pairs:
            speedups = ", ".join(f"{v} {a / f:.2f}×" for v, a, f in pairs)
            lines += ["", f"Tower speed-up {label} vs augmented: {speedups}."]
    return lines


def render(
    ops: list[dict[str, Any]],
    towers: list[dict[str, Any]],
    env: dict[str, str],
    sweep: list[dict[str, Any]],
    forms: list[dict[str, Any]] | None = None,
) -> str:
    lines = [
        f"# SAM rel-pos attention: augmented flash vs FlexAttention vs Triton — {env['gpu']}",
        "",
        f"{env['date']}; torch {env['torch']}; bf16, seeded random weights of the real shapes; CUDA events,"
        " median of 20 runs after 3 warm-ups.",
    ]
    if ops or towers:  # --tables times the tables alone
        lines += _op_tower_lines(ops, towers)
    if sweep:
        lines += [
            "",
            "## The Triton kernel's launch settings (--sweep; default: sam_kernels.attention_blocks)",
            "",
            "Each setting is the kernel alone on precomputed tables, timed from a CUDA graph of 10 calls (median of",
            "10 replays); the first rows per view are the tables alone (compiled) in each form of sam_kernels.TABLES.",
            "Several key rows per step add the",
            "position terms through one-hot products (since round 14; round 11's several-rows rows selected them).",
            "",
            "| view | setting | ms | useful rate (the tables: one read of q + the writes) |",
            "| --- | --- | ---: | ---: |",
        ]
        for r in sweep:
            if "error" in r:
                cells = f"failed: {r['error']} | "
            elif r["ms"] != r["ms"]:  # the default setting's row: no timing of its own
                cells = " | "
            elif "tflops" in r:
                cells = f"{r['ms']:.3f} | {r['tflops']:.0f} TFLOP/s"
            else:
                cells = f"{r['ms']:.3f} | {r['gbps']:.0f} GB/s" if "gbps" in r else f"{r['ms']:.3f} | "
            lines.append(f"| {r['view']} | {r['setting']} | {cells} |")
    if forms:
        lines += forms_lines(forms)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for sam_attention.md / .json")
    ap.add_argument("--flex", action="store_true", help="also time FlexAttention (slow to compile and to run)")
    ap.add_argument("--sweep", action="store_true", help="also sweep the Triton kernel's launch settings")
    ap.add_argument("--tables", action="store_true", help="only the position tables' forms and settings")
    ap.add_argument(
        "--forms", action="store_true", help="only the position terms' forms (BIAS_IN_MMA, ROW_TERM_IN_MAX), paired"
    )
    ap.add_argument("--ab-rounds", type=int, default=6, help="rounds of --forms' paired rows")
    ap.add_argument("--forms-grids", default="", help="--forms on these key-grid widths only, e.g. 40,48")
    args = ap.parse_args()
    if args.ab_rounds < 1:
        raise SystemExit(f"--ab-rounds must be >= 1, got {args.ab_rounds}")
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
    ops: list[dict[str, Any]] = []
    towers: list[dict[str, Any]] = []
    forms: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    if args.forms:
        with torch.no_grad():
            grids = frozenset(int(g) for g in args.forms_grids.split(",") if g.strip())
            forms = forms_rows(sam, dev, args.ab_rounds, grids)
    elif args.tables:
        with torch.no_grad():
            sweep = tables_only_rows(sam, dev)
    else:
        with torch.no_grad():
            kinds = KINDS if args.flex else tuple(k for k in KINDS if k != "flex")
            ops = op_rows(sam, dev, kinds)
        towers = tower_rows(sam, dev, kinds)
        if args.sweep:
            with torch.no_grad():
                sweep = sweep_rows(sam, dev)
    text = render(ops, towers, env, sweep, forms)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sam_attention.md").write_text(text)
        (args.out / "sam_attention.json").write_text(
            json.dumps(dict(env=env, ops=ops, towers=towers, sweep=sweep, forms=forms), indent=1)
        )


if __name__ == "__main__":
    main()
