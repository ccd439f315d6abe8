"""DeepSeek-OCR-2: eager vs fast path of the native v2 model, side by side, on one GPU (issue 20 point 4).

Full-size dummy weights in bf16, one synthetic 1224×1584 page in v2's default mode (1024-px global view + a
2×3 grid of 768-px tiles: 256 + 6·144 + 1 = 1,121 image tokens).  Measures with CUDA events after warm-up:
vision ms (and SAM / encoder / projector each alone on the page's views), LM prefill ms, prefill = vision + LM,
decode ms/token (host greedy loop for both; the fast path's on-device greedy loop too), peak memory against
weights + KV + 2 GiB, and the fast path's logits against eager's, teacher-forced with the eager tokens.  The first
table holds the three goals of issue 20 for the v2 fast path with their measured values, in ONE run.

    PYTHONPATH=src python benchmarks/bench_fast_v2.py --out benchmarks/results

Writes ``<out>/<date>-<gpu>-fast-v2.md`` and ``.json`` next to it.  Helpers (CUDA-event timing, decode loops) are
bench_fast.py's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from llm_perf_opt.data.datasets import synthetic_page
from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig
from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, FastModel
from llm_perf_opt.models.deepseek_ocr.tokenizer import load_tokenizer
from llm_perf_opt.models.deepseek_ocr2 import DeepseekOCR2Config, build_model_v2
from llm_perf_opt.models.deepseek_ocr2.fast import apply_fast_path_v2
from llm_perf_opt.models.deepseek_ocr2.preprocess import preprocess_config_v2, preprocess_page_v2
from llm_perf_opt.profiling.bench_meta import benchmark_header, gpu_tag
from llm_perf_opt.profiling.flops import decode_bytes, prefill_flops
from llm_perf_opt.profiling.flops_ocr2 import v2_views, vision_flops_v2
from llm_perf_opt.profiling.peaks import match_peak

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers next to this script, also under `python -m`
from bench_fast import cuda_ms, decode_loop, greedy_device, prefill_ms
from benchmath import fmt, mbu_pct, mfu_pct

CONFIG = "src/llm_perf_opt/models/deepseek_ocr2/configs/deepseek-ocr2.json"
PROMPT = "<image>\n<|grounding|>Convert the document to markdown."
PAGE_PX = (1224, 1584)
GiB = 2**30
# Issue 20's goals for the v2 fast path (H200, bf16, dummy weights, a 6-tile page)
GOAL_PREFILL_MS = 30.0
GOAL_DECODE_MS = 1.0
GOAL_MEM_SLACK_GIB = 2.0


class Page:
    """The benchmark page's views on the device and its prompt, as the profiler's session prepares them."""

    def __init__(self, cfg: DeepseekOCR2Config, device: torch.device, dtype: torch.dtype) -> None:
        ids = DeepseekOCRConfig(language=cfg.language, image_token_id=cfg.image_token_id)
        prompt = load_tokenizer(None, ids).encode_prompt(PROMPT)
        self.prep = preprocess_page_v2(synthetic_page(PAGE_PX, 0), preprocess_config_v2("default"), cfg, prompt)
        self.crops = self.prep.images_crop.to(device, dtype)
        self.ori = self.prep.images_ori.to(device, dtype)
        self.prompt_len = int(self.prep.prompt_len)
        self.n_tiles = int(self.prep.n_crops)

    def vision(self, m: Any) -> torch.Tensor:
        return m.encode_images(self.crops, self.ori, self.prep.images_spatial_crop)

    def embeds(self, m: Any) -> torch.Tensor:
        return m.embed_prompt(self.prep.input_ids, self.prep.images_seq_mask, [self.vision(m)])

    def components(self, m: Any) -> dict[str, Callable[[], Any]]:
        """SAM, the encoder and the projector each alone on the page's views (inputs precomputed), as callables
        (a FastModel's under its vision mode: compiled / graphed forwards)."""
        base = m.base if isinstance(m, FastModel) else m
        mm = base.model

        def mode() -> Any:
            import contextlib

            stack = contextlib.ExitStack()
            stack.enter_context(base._sdpa_policy())
            if isinstance(m, FastModel):
                stack.enter_context(m.vision_mode())
            return stack

        views = (self.crops, self.ori)
        with mode():
            sam_out = [mm.sam_model(x) for x in views]
            enc_out = [mm.qwen2_model(s) for s in sam_out]

        def sam() -> None:
            with mode():
                for x in views:
                    mm.sam_model(x)

        def encoder() -> None:
            with mode():
                for s in sam_out:
                    mm.qwen2_model(s)

        def projector() -> None:
            for e in enc_out:
                mm.projector(e)

        return {"sam": sam, "encoder": encoder, "projector": projector}


def teacher_forced(m: Any, embeds: torch.Tensor, tokens: list[int]) -> list[torch.Tensor]:
    """Prefill logits, then one step per token of ``tokens`` (fed those, not the model's own picks)."""
    cache = m.new_cache(batch=1, max_len=embeds.shape[1] + len(tokens) + 1)
    rows = [m.prefill(embeds, cache)[0].float().cpu()]
    for tok in tokens:
        rows.append(m.decode_step(torch.tensor([[tok]], device=embeds.device), cache)[0].float().cpu())
    return rows


def measure(page: Page, m: Any, res: dict[str, Any], steps: int) -> dict[str, Any]:
    """Vision (and each stage alone), LM prefill, host-loop decode and peak memory of one path."""
    r: dict[str, Any] = {}
    t0 = time.perf_counter()
    page.vision(m)
    torch.cuda.synchronize()
    r["first_vision_call_s"] = time.perf_counter() - t0  # the fast path compiles + captures here
    r["vision_ms"] = cuda_ms(lambda: page.vision(m), warmup=2, reps=7)
    r.update({f"{k}_alone_ms": cuda_ms(fn, warmup=2, reps=7) for k, fn in page.components(m).items()})
    embeds = page.embeds(m)
    r["prefill_lm_ms"] = prefill_ms(m, embeds)
    r["prefill_ms"] = r["vision_ms"] + r["prefill_lm_ms"]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    dec = decode_loop(m, embeds, steps, 0)
    page.vision(m)  # the whole page's working set inside the same peak window
    r["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
    r["decode_ms_per_token"] = dec["ms_per_token"]
    r["decode_tokens"] = steps
    r["tokens"] = dec["tokens"]
    r["kv_bytes"] = dec["kv_bytes"]
    peak = res["peak_bf16_flops"]
    for stage in ("sam", "encoder", "projector"):
        r[f"{stage}_mfu_pct"] = mfu_pct(res["flops"][stage], r[f"{stage}_alone_ms"], peak)
    r["vision_mfu_pct"] = mfu_pct(res["flops"]["vision"], r["vision_ms"], peak)
    r["prefill_lm_mfu_pct"] = mfu_pct(res["flops"]["prefill_lm"], r["prefill_lm_ms"], peak)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--eager-decode-tokens", type=int, default=64, help="eager is ~15-30 ms/token: fewer suffice")
    ap.add_argument("--parity-steps", type=int, default=32)
    ap.add_argument("--config", default=CONFIG, help="the v2 config.json (default: the full-size model)")
    ap.add_argument("--device", default="cuda", help="a CUDA device (cuda, cuda:N)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        raise SystemExit("bench_fast_v2 needs CUDA")
    dev, dtype = torch.device(args.device), torch.bfloat16
    res: dict[str, Any] = {"env": benchmark_header(dev)}
    spec = match_peak(torch.cuda.get_device_name(dev))
    if spec is None:
        raise SystemExit(f"no datasheet peak for {torch.cuda.get_device_name(dev)!r} in profiling/peaks.py PEAK_TABLE")
    res["peak_bf16_flops"], res["peak_bytes_per_s"] = spec.bf16_dense_flops, spec.mem_bw_bytes_per_s
    res["peak_source"] = f"{spec.name}: {spec.source}"
    t0 = time.perf_counter()
    cfg = DeepseekOCR2Config.from_json(args.config)
    model = build_model_v2(cfg, dev, dtype, "dummy")
    res["build_s"] = time.perf_counter() - t0
    res["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    page = Page(cfg, dev, dtype)
    res.update(prompt_len=page.prompt_len, n_tiles=page.n_tiles, grid=list(page.prep.images_spatial_crop))
    sam_f, enc_f, proj_f = vision_flops_v2(cfg, v2_views(cfg, page.n_tiles))
    res["flops"] = {
        "sam": sam_f.total_flops,
        "encoder": enc_f.total_flops,
        "projector": proj_f.total_flops,
        "vision": sam_f.total_flops + enc_f.total_flops + proj_f.total_flops,
        "prefill_lm": prefill_flops(cfg.language, page.prompt_len).total_flops,
    }
    ids_cfg = DeepseekOCRConfig(language=cfg.language, image_token_id=cfg.image_token_id)  # v1's LM = v2's
    decode_total = decode_bytes(ids_cfg, page.prompt_len, args.decode_tokens + 1, dtype_bytes=2).total_bytes
    res["decode_bytes_per_token"] = decode_total / args.decode_tokens
    print(f"built in {res['build_s']:.1f}s; prompt {page.prompt_len}; {page.n_tiles} tiles {res['grid']}", flush=True)

    with torch.inference_mode():
        eager = measure(page, model, res, args.eager_decode_tokens)
        print("eager:", {k: v for k, v in eager.items() if k != "tokens"}, flush=True)
        t1 = time.perf_counter()
        fast = apply_fast_path_v2(model, FastConfig())
        res["apply_fast_path_s"] = time.perf_counter() - t1
        res["fast_config"] = attrs.asdict(fast.fast_config)
        res["decode_kernels"] = fast.decode_kernels
        fres = measure(page, fast, res, args.decode_tokens)
        fres["decode_device_greedy_ms_per_token"] = greedy_device(fast, page.embeds(fast), args.decode_tokens)[
            "ms_per_token"
        ]
        fres["decode_mbu_pct"] = mbu_pct(
            res["decode_bytes_per_token"], fres["decode_device_greedy_ms_per_token"], res["peak_bytes_per_s"]
        )
        res["vision_graphs"] = {
            name: {"shapes": len(g.graphs), "capture_error": g.capture_error} for name, g in fast.vision.graphs.items()
        }
        # parity on the same (eager) embeddings: logits teacher-forced with the eager model's own tokens
        embeds = page.embeds(model)
        f_embeds = page.embeds(fast)
        fres["image_features_rel_err"] = float((f_embeds.float() - embeds.float()).norm() / embeds.float().norm())
        keep = args.parity_steps
        ref_tokens = eager["tokens"][1 : keep + 1]
        ref_rows = teacher_forced(model, embeds, ref_tokens)
        rows = teacher_forced(fast, embeds, ref_tokens)
        fres["logits_max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(rows, ref_rows, strict=True))
        fres["logits_max_abs"] = max(float(r.abs().max()) for r in ref_rows)
        picks, ref_picks = [int(r.argmax()) for r in rows], [int(r.argmax()) for r in ref_rows]
        fres["teacher_forced_picks_equal"] = sum(a == b for a, b in zip(picks, ref_picks, strict=True))
        fres["teacher_forced_steps"] = len(picks)
        fres["greedy_tokens_equal_prefix"] = next(
            (i for i, (a, b) in enumerate(zip(fres["tokens"], eager["tokens"], strict=False)) if a != b),
            min(len(fres["tokens"]), len(eager["tokens"])),
        )
        print("fast:", {k: v for k, v in fres.items() if k != "tokens"}, flush=True)
        # SAM's other global-attention kernel on the whole fast vision (default beside it, timed in turn)
        other = "augmented" if fast.fast_config.sam_attention != "augmented" else "triton"
        vm = apply_fast_path_v2(model, FastConfig(sam_attention=other))
        res["sam_attention_variant"] = {
            "default": fast.vision.sam_attention,
            "other": vm.vision.sam_attention,
            "other_note": vm.vision.sam_attention_note,
            "vision_ms_default": cuda_ms(lambda: page.vision(fast), warmup=2, reps=7),
            "vision_ms_other": cuda_ms(lambda: page.vision(vm), warmup=2, reps=7),
            "image_features_rel_err_other": float(
                (page.embeds(vm).float() - embeds.float()).norm() / embeds.float().norm()
            ),
        }
        # the page's two view chains on two streams (vision_streams) against the other setting, timed in turn
        on = fast.fast_config.vision_streams
        vs = apply_fast_path_v2(model, attrs.evolve(fast.fast_config, vision_streams=not on))
        res["vision_streams_variant"] = {
            "default": on,
            "vision_ms_default": cuda_ms(lambda: page.vision(fast), warmup=2, reps=7),
            "vision_ms_other": cuda_ms(lambda: page.vision(vs), warmup=2, reps=7),
            "features_identical": bool(torch.equal(page.vision(vs), page.vision(fast))),
        }
    for r in (eager, fres):
        r.pop("tokens")
    res.update(eager=eager, fast=fres)
    write_report(res, out)


def write_report(res: dict[str, Any], out: Path) -> None:
    e, f, env = res["eager"], res["fast"], res["env"]
    weights_gib, kv_gib = res["weight_bytes"] / GiB, f["kv_bytes"] / GiB
    budget = weights_gib + kv_gib + GOAL_MEM_SLACK_GIB
    decode_f = f["decode_device_greedy_ms_per_token"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    def row(name: str, key: str, spec: str = "{:.2f}", with_ratio: bool = True) -> str:
        a, b = e.get(key), f.get(key)
        ok = with_ratio and isinstance(a, float) and isinstance(b, float) and b > 0
        ratio = f"{a / b:.1f}×" if ok else ""
        return f"| {name} | {fmt(a, spec)} | {fmt(b, spec)} | {ratio} |"

    lines = [
        f"# DeepSeek-OCR-2: fast path vs eager — {env['gpu']}",
        "",
        f"{env['date']}; driver {env['driver']}; torch {env['torch']} (CUDA {env['cuda']}); bf16, dummy weights;"
        f" synthetic {PAGE_PX[0]}×{PAGE_PX[1]} page, v2 default mode, {res['n_tiles']} tiles (grid {res['grid']}),"
        f" prompt {res['prompt_len']} tokens; CUDA events after warm-up, medians. Peaks: {res['peak_source']}.",
        "",
        "## Goals (issue 20, v2 fast path), one run",
        "",
        "| goal | target | eager | fast | verdict |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| prefill (vision + LM) ms, {res['n_tiles']}-tile page | ≤ {GOAL_PREFILL_MS:g} | {e['prefill_ms']:.2f}"
        f" | {f['prefill_ms']:.2f} | {verdict(f['prefill_ms'] <= GOAL_PREFILL_MS)} |",
        f"| decode ms/token (fast: on-device greedy, {f['decode_tokens']} tokens) | ≤ {GOAL_DECODE_MS:g}"
        f" | {e['decode_ms_per_token']:.2f} ({e['decode_tokens']} tok, host loop) | {decode_f:.3f}"
        f" | {verdict(decode_f <= GOAL_DECODE_MS)} |",
        f"| peak GiB ≤ weights {weights_gib:.2f} + KV {kv_gib:.3f} + {GOAL_MEM_SLACK_GIB:g} | ≤ {budget:.2f}"
        f" | {e['peak_gib']:.2f} | {f['peak_gib']:.2f} | {verdict(f['peak_gib'] <= budget)} |",
        "",
        "## Detail",
        "",
        "| metric | eager | fast | eager/fast |",
        "| --- | ---: | ---: | ---: |",
        row("vision ms (SAM + encoder + projector + layout)", "vision_ms"),
        row("  SAM alone ms (tiles batch + global view)", "sam_alone_ms"),
        row("  encoder alone ms", "encoder_alone_ms"),
        row("  projector alone ms", "projector_alone_ms"),
        row("LM prefill ms", "prefill_lm_ms"),
        row("prefill = vision + LM ms", "prefill_ms"),
        row("decode ms/token, host greedy loop", "decode_ms_per_token", "{:.3f}"),
        f"| decode ms/token, on-device greedy | | {decode_f:.3f} | |",
        row("vision MFU %", "vision_mfu_pct", "{:.1f}", with_ratio=False),
        row("  SAM MFU %", "sam_mfu_pct", "{:.1f}", with_ratio=False),
        row("  encoder MFU %", "encoder_mfu_pct", "{:.1f}", with_ratio=False),
        row("LM prefill MFU %", "prefill_lm_mfu_pct", "{:.1f}", with_ratio=False),
        f"| decode MBU % (activated weights + KV per token) | | {fmt(f['decode_mbu_pct'], '{:.1f}')} | |",
        row("first vision call s (fast: compile + graph capture)", "first_vision_call_s", with_ratio=False),
        row("peak GiB", "peak_gib"),
        "",
        f"Parity: image features rel. error {f['image_features_rel_err']:.2e} (L2); logits teacher-forced with the"
        f" eager tokens for {f['teacher_forced_steps'] - 1} steps: max |Δ| {f['logits_max_abs_diff']:.4f}"
        f" (max |logit| {f['logits_max_abs']:.3f}), argmax equal at {f['teacher_forced_picks_equal']} of"
        f" {f['teacher_forced_steps']} positions; free-running greedy tokens equal for the first"
        f" {f['greedy_tokens_equal_prefix']} (dummy weights: near-flat logits, near-ties may flip under bf16"
        " rounding).",
        "",
        f"FLOPs per page: SAM {res['flops']['sam'] / 1e12:.3f} T, encoder {res['flops']['encoder'] / 1e12:.3f} T"
        f" (useful pairs of the prefix mask), projector {res['flops']['projector'] / 1e9:.2f} G,"
        f" LM prefill {res['flops']['prefill_lm'] / 1e12:.3f} T.  Decode kernels: {res['decode_kernels']}."
        f" Vision graphs: {res['vision_graphs']}.  apply_fast_path {res['apply_fast_path_s']:.2f} s.",
        "",
        f"Fast config: {res['fast_config']}.",
    ]
    if "sam_attention_variant" in res:
        v = res["sam_attention_variant"]
        lines += [
            "",
            f"SAM's global-attention kernel: vision {v['vision_ms_default']:.2f} ms with the default ({v['default']}),"
            f" {v['vision_ms_other']:.2f} ms with {v['other']} (timed in turn; image features rel err vs eager"
            f" {v['image_features_rel_err_other']:.2e}){'; ' + v['other_note'] if v['other_note'] else ''}.",
        ]
    if "vision_streams_variant" in res:
        v = res["vision_streams_variant"]
        lines += [
            "",
            f"vision_streams: vision {v['vision_ms_default']:.2f} ms with the default ({v['default']}),"
            f" {v['vision_ms_other']:.2f} ms with {not v['default']} (timed in turn; image features identical:"
            f" {v['features_identical']}).",
        ]
    text = "\n".join(lines) + "\n"
    stem = f"{dt.date.today().isoformat()}-{gpu_tag(env['gpu'])}-fast-v2"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
