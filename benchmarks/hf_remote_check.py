"""Check backend=hf_remote on a GPU: the vendor remote code with the same prefill/decode split as ours.

Builds ``HfRemoteBackend`` (dummy weights of the real shapes) for a synthetic 1224x1584 page in Gundam mode
(base 1024, tiles 640, crop_mode), then

* prefill A: the vendor forward with ``images=`` and ``use_cache=True`` (``HfRemoteBackend.prefill``),
* decode: N single-token vendor forwards on its ``past_key_values`` (``HfRemoteBackend.decode``), greedy,
* prefill B: the split the profiler's session drives (``VendorSessionModel.encode_images`` → ``embed_prompt``
  → ``prefill``), compared with A (same last-position logits, same decode tokens),

with CUDA events around prefill, each decode step and every call of ``model.sam_model`` / ``vision_model`` /
``projector`` (forward pre/post hooks).  Never ``generate()``.  Prints one JSON object (and writes it to
``--out``).  Needs transformers 4.46.x and CUDA::

    PYTHONPATH=src python benchmarks/hf_remote_check.py --path models/deepseek-ocr --tokens 64 --out r.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llm_perf_opt.models.deepseek_ocr.preprocess import preprocess_page  # noqa: E402
from llm_perf_opt.runners.backends.hf_remote import HF_HOOKS, HfRemoteBackend  # noqa: E402
from llm_perf_opt.runners.settings import ModelSettings, PreprocessSettings  # noqa: E402

PROMPT = "<image>\n<|grounding|>Convert the document to markdown."


def synthetic_page(width: int = 1224, height: int = 1584) -> Image.Image:
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i, y in enumerate(range(80, height - 80, 36)):
        draw.text((90, y), f"Line {i}: the quick brown fox jumps over the lazy dog 0123456789", fill="black")
        if i % 7 == 0:
            draw.rectangle((80, y - 4, width - 80, y + 24), outline="black")
    return img


class EventHooks:
    """CUDA events before/after every call of each named module; ms summed per module over its calls."""

    def __init__(self, root: torch.nn.Module, targets: dict[str, str]) -> None:
        self.pairs: dict[str, list[tuple[Any, Any]]] = {k: [] for k in targets}
        self.handles = []
        for name, dotted in targets.items():
            mod: Any = root
            for part in dotted.split("."):
                mod = getattr(mod, part)
            self.handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self.handles.append(mod.register_forward_hook(self._post(name)))

    def _pre(self, name: str) -> Any:
        def hook(_m: Any, _a: Any) -> None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.pairs[name].append((ev, None))

        return hook

    def _post(self, name: str) -> Any:
        def hook(_m: Any, _a: Any, _o: Any) -> None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            start, _ = self.pairs[name][-1]
            self.pairs[name][-1] = (start, ev)

        return hook

    def reset(self) -> None:
        for v in self.pairs.values():
            v.clear()

    def collect(self) -> dict[str, dict[str, float]]:
        torch.cuda.synchronize()
        return {
            k: {"calls": len(v), "ms": sum(a.elapsed_time(b) for a, b in v if b is not None)}
            for k, v in self.pairs.items()
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default="models/deepseek-ocr")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import transformers

    device = torch.device(args.device)
    dtype = torch.bfloat16
    model_cfg = ModelSettings(
        path=args.path,
        weights="dummy",
        backend="hf_remote",
        preprocess=PreprocessSettings(base_size=1024, image_size=640, crop_mode=True, vendor_quirks=True),
    )
    t0 = time.perf_counter()
    backend = HfRemoteBackend(model_cfg, device, dtype, ROOT)
    load_s = time.perf_counter() - t0
    tok = backend.tokenizer
    prepared = preprocess_page(synthetic_page(), backend.preprocess_cfg, backend.config, tok.encode_prompt(PROMPT))
    crops = prepared.images_crop.to(device, dtype)
    ori = prepared.images_ori.to(device, dtype)
    ids = prepared.input_ids.to(device)
    mask = prepared.images_seq_mask.to(device)
    grid = (int(prepared.images_spatial_crop[0]), int(prepared.images_spatial_crop[1]))
    hooks = EventHooks(backend.model, HF_HOOKS)

    def ev() -> Any:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "weights": backend.weights_desc,
        "tokenizer": type(tok).__name__,
        "tokenizer_is_stand_in": bool(getattr(tok, "is_stand_in", False)),
        "load_s": round(load_s, 2),
        "page_px": list(prepared.page_size),
        "crop_grid": list(grid),
        "n_tiles": int(prepared.n_crops),
        "prompt_tokens": int(prepared.prompt_len),
        "image_tokens": int(prepared.image_token_count),
        "decode_tokens": args.tokens,
        "params": sum(p.numel() for p in backend.vendor.parameters()),
    }
    runs = []
    with torch.inference_mode():
        for _rep in range(2):  # rep 0 warms cuBLAS / allocator; rep 1 is reported
            hooks.reset()
            torch.cuda.synchronize()
            a = ev()
            logits, state, _ = backend.prefill(crops, ori, grid, ids, mask)
            token = int(torch.argmax(logits[0]))
            b = ev()
            comp = hooks.collect()
            hooks.reset()
            finite = bool(torch.isfinite(logits).all())
            tokens = [token]
            marks = [b]
            for _ in range(args.tokens):
                logits = backend.decode(torch.tensor([[token]], device=device), state)
                finite &= bool(torch.isfinite(logits).all())
                token = int(torch.argmax(logits[0]))  # the host reads each token, as the session's eager loop
                tokens.append(token)
                marks.append(ev())
            torch.cuda.synchronize()
            steps = [marks[i].elapsed_time(marks[i + 1]) for i in range(len(marks) - 1)]
            decode_hooks = hooks.collect()
            runs.append(
                {
                    "prefill_ms": a.elapsed_time(b),
                    "decode_ms": sum(steps),
                    "decode_ms_per_token": sum(steps) / len(steps),
                    "decode_step_p50_ms": sorted(steps)[len(steps) // 2],
                    "sam_ms": comp["sam"]["ms"],
                    "clip_ms": comp["clip"]["ms"],
                    "projector_ms": comp["projector"]["ms"],
                    "hook_calls_prefill": {k: v["calls"] for k, v in comp.items()},
                    "hook_calls_decode": {k: v["calls"] for k, v in decode_hooks.items()},
                    "logits_finite": finite,
                    "kv_len_after": state.length,
                    "tokens_head": tokens[:8],
                }
            )
            ref_logits_tokens = tokens
        # The session's split: vision (vendor forward up to its first decoder layer) → embed → LM prefill.
        model: Any = backend.model
        torch.cuda.synchronize()
        a = ev()
        feats = model.encode_images(crops, ori, grid)
        m = ev()
        embeds = model.embed_prompt(ids, mask, [feats])
        split_logits = model.prefill(embeds, "page-cache")
        b = ev()
        ref_logits, ref_state, _ = backend.prefill(crops, ori, grid, ids, mask)
        diff = float((split_logits - ref_logits).abs().max())
        split_tokens = [int(torch.argmax(split_logits[0]))]
        for _ in range(min(8, args.tokens)):
            lg = model.decode_step(torch.tensor([[split_tokens[-1]]], device=device), "page-cache")
            split_tokens.append(int(torch.argmax(lg[0])))
        torch.cuda.synchronize()
        result["split"] = {
            "vision_ms": a.elapsed_time(m),
            "prefill_total_ms": a.elapsed_time(b),
            "image_rows": int(feats.rows.shape[0]),
            "max_abs_logit_diff_vs_vendor_forward": diff,
            "tokens_head": split_tokens,
            "tokens_match_vendor_forward": split_tokens == ref_logits_tokens[: len(split_tokens)],
        }
        del ref_state
    result["warmup"] = runs[0]
    result.update(runs[1])
    result["hooks_fired"] = all(v > 0 for v in runs[1]["hook_calls_prefill"].values())
    result["peak_mem_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    ok = result["hooks_fired"] and result["logits_finite"] and result["split"]["image_rows"] == result["image_tokens"]
    print("CHECK", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
