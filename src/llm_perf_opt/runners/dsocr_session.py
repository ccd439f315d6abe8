"""DeepSeekOCRSession: load the model once, then run pages with honest prefill/decode timing.

Timeline of one page (DESIGN.md, "Rules that make the numbers true")::

    preprocess (host)  | prefill: upload → SAM/CLIP/projector → embed → LM forward → token 1 | decode: token 2..N
                       ^ prefill start                                          TTFT ^        each step = one
                                                                                              forward on the KV cache

Marks are CUDA events on the current stream (host clock on CPU) and are resolved once per page, so the
only synchronisations inside decode are the ones the eager algorithm itself needs (the host reads each
token for no-repeat-ngram and eos).  Decode step i spans mark i → mark i+1, so Σ steps == decode_ms.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from omegaconf import OmegaConf

from llm_perf_opt.data.datasets import Page
from llm_perf_opt.errors import ConfigError, InputError, ModelLoadError, RunInterrupted
from llm_perf_opt.models.deepseek_ocr import weights
from llm_perf_opt.models.deepseek_ocr.kv_cache import StaticKVCache
from llm_perf_opt.models.deepseek_ocr.weights import resolve_device
from llm_perf_opt.profiling.hooks import StageHooks
from llm_perf_opt.profiling.ranges import RangeMarker
from llm_perf_opt.profiling.stats import percentiles
from llm_perf_opt.profiling.timers import DeviceClock
from llm_perf_opt.results.types import BatchRecord, PageRecord, Prediction

log = logging.getLogger(__name__)

HOOKED_MODULES = {"sam": "model.sam_model", "clip": "model.vision_model", "projector": "model.projector"}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The model dtype from config, checked against what ``device`` supports."""
    dtype = weights.resolve_dtype(name)
    weights.check_dtype_on_device(dtype, device)
    return dtype


class _BackendOwnedCache:
    """Placeholder handed to a backend that keeps its own KV cache (hf_remote); its identity marks the page."""

    nbytes = 0


@attrs.frozen
class PageRun:
    """What one page produced: the timed record, the decoded text, and the inputs FLOPs need."""

    record: PageRecord
    prediction: Prediction
    prepared: Any  # the PreparedPage (inputs of the static-compute pass)
    host_window_s: tuple[float, float]  # perf_counter at page start / after the final sync (energy window)
    tokens_per_expert: dict[int, list[int]] | None = None


class NativeBackend:
    """The plain-PyTorch model in llm_perf_opt.models.deepseek_ocr."""

    name = "native"

    def __init__(self, model_cfg: Any, device: torch.device, dtype: torch.dtype, seed: int, project_root: Path) -> None:
        from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model
        from llm_perf_opt.models.deepseek_ocr.preprocess import PreprocessConfig
        from llm_perf_opt.models.deepseek_ocr.tokenizer import load_tokenizer

        path = model_cfg.get("path")
        weights = str(model_cfg.get("weights", "checkpoint"))
        model_dir = None
        if path:
            model_dir = Path(str(path))
            if not model_dir.is_absolute():
                model_dir = project_root / model_dir
        if weights == "checkpoint":
            if model_dir is None or not model_dir.is_dir():
                raise ModelLoadError(
                    f"model directory not found: {model_dir}",
                    hint="download deepseek-ai/DeepSeek-OCR into models/deepseek-ocr (see models/README.md), "
                    "or profile without it: model/deepseek_ocr/arch=deepseek_ocr.dummy (full size) or "
                    "model/deepseek_ocr/arch=deepseek_ocr.tiny",
                )
            self.config = DeepseekOCRConfig.from_json(model_dir / "config.json")
            weights_source: str | Path = model_dir
        elif weights == "dummy":
            self.config = DeepseekOCRConfig.from_json(
                _config_json_path(str(model_cfg.get("config_json")), project_root)
            )
            weights_source = "dummy"
        else:
            raise ConfigError(f"model.weights must be 'checkpoint' or 'dummy', got {weights!r}")

        pp = model_cfg.get("preprocess", {})
        self.preprocess_cfg = PreprocessConfig(
            base_size=int(pp.get("base_size", self.config.base_size)),
            image_size=int(pp.get("image_size", self.config.image_size)),
            crop_mode=bool(pp.get("crop_mode", True)),
            vendor_quirks=bool(pp.get("vendor_quirks", True)),
        )
        self.model = build_model(self.config, device=device, dtype=dtype, weights=weights_source, seed=seed)
        self.model.eval()
        self.tokenizer = load_tokenizer(model_dir if weights == "checkpoint" else None, self.config)
        self.weights_desc = str(weights_source)

    def hook_targets(self) -> dict[str, str]:
        return HOOKED_MODULES


def _config_json_path(spec: str, project_root: Path) -> Path:
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        path = Path(__file__).resolve().parents[1] / "models" / "deepseek_ocr" / "configs" / f"{name}.json"
        if not path.is_file():
            raise ConfigError(f"model.config_json={spec}: no built-in config named {name!r}")
        return path
    path = Path(spec)
    return path if path.is_absolute() else project_root / path


class DeepSeekOCRSession:
    """Model, tokenizer, preprocessing, device and dtype for the life of a run."""

    def __init__(self, backend: NativeBackend, device: torch.device, dtype: torch.dtype, infer: Any, use_nvtx: bool):
        from llm_perf_opt.profiling.hooks import module_named

        self.backend = backend
        self.model: Any = backend.model
        self.device = device
        self.dtype = dtype
        self.infer = infer
        self.clock = DeviceClock(device)
        self.ranges = RangeMarker(use_nvtx=use_nvtx and device.type == "cuda")
        self.hooks = StageHooks(
            {name: module_named(self.model, dotted) for name, dotted in backend.hook_targets().items()},
            self.clock,
            self.ranges,
        )
        from llm_perf_opt.profiling.device import detect_device
        from llm_perf_opt.profiling.nvml import NvmlSampler

        # Power/clock sampling for energy per page (a null object without NVML or on CPU).
        self.nvml = (
            NvmlSampler(index=device.index or 0, pci_bus_id=detect_device(device).pci_bus_id)
            if device.type == "cuda"
            else None
        )
        if self.nvml is not None:
            self.nvml.__enter__()
        self.energy_unavailable_reason = (
            "CPU run: NVML measures NVIDIA GPUs only" if self.nvml is None else self.nvml.unavailable_reason
        )
        self._batched: Any = None  # BatchedGenerator, built on first use of the throughput phase
        self._cache: Any = None  # the fast path reuses one bucketed cache, so its CUDA graph is captured once
        # new tokens the fast path's shared cache is sized for at least (the run's token cap, set by run_stage1):
        # a warm-up with fewer tokens then allocates the same cache as the timed runs, so the graphs bound to it
        # (decode step, prefill per prompt length) are captured once, in the warm-up
        self.reserve_new_tokens = 0
        self.fast = self._fast_config(infer.get("fast") or {}, device)
        if self.fast is not None:
            from llm_perf_opt.models.deepseek_ocr.fast import apply_fast_path

            self.model = apply_fast_path(backend.model, self.fast)
        prompt = str(infer.get("prompt") or "")
        self.prompt = prompt
        self.text_ids = backend.tokenizer.encode_prompt(prompt)

    @staticmethod
    def _fast_config(fast: Any, device: torch.device) -> Any:
        """``infer.fast.*`` -> :class:`FastConfig` (None when not enabled); every FastConfig field is a switch."""
        if not fast.get("enabled", False):
            return None
        from llm_perf_opt.models.deepseek_ocr.fast import FastConfig

        fields = {f.name: f for f in attrs.fields(FastConfig)}
        unknown = sorted(set(fast) - set(fields) - {"enabled"})
        if unknown:
            raise ConfigError(
                f"unknown infer.fast switch(es) {unknown}",
                hint=f"valid switches: enabled, {', '.join(fields)}",
            )
        values: dict[str, Any] = {}
        for name, field in fields.items():
            if name not in fast:
                continue
            value = fast[name]
            values[name] = bool(value) if isinstance(field.default, bool) else str(value)
        if device.type != "cuda":  # graphs are CUDA-only: say so in the report by switching them off
            values.update(cuda_graphs=False, vision_graphs=False)
        try:
            return FastConfig(**values)
        except ValueError as exc:
            reason = exc.args[0] if exc.args else str(exc)  # attrs' in_ validator: the message, then details
            raise ConfigError(
                f"invalid infer.fast value: {reason}",
                hint="see conf/model/deepseek_ocr/infer/deepseek_ocr.default.yaml",
            ) from exc

    def optimisations(self) -> dict[str, bool]:
        """What the report lists as active: the eager path always has the static, preallocated KV cache; on the
        fast path every boolean switch of FastConfig, and the Triton decode kernels."""
        f = self.fast
        out = {"static_kv_cache": not getattr(self.backend, "owns_kv_cache", False)}
        if f is None:
            out.update(grouped_moe=False, fused_qkv=False, cuda_graphs=False)
            return out
        out.update({k: v for k, v in attrs.asdict(f).items() if isinstance(v, bool)})
        kernels = getattr(self.model, "decode_kernels", None)  # what runs, not what was asked (CPU: torch)
        if kernels is not None:
            out["decode_kernels_triton"] = kernels == "triton"
        return out

    def _page_cache(self, needed: int, reserve: int | None = None) -> Any:
        """A KV cache for ``needed`` positions: fresh per page (eager), or one reused bucketed cache (fast)
        sized for at least ``reserve`` positions."""
        if getattr(self.backend, "owns_kv_cache", False):
            return _BackendOwnedCache()
        if self.fast is None:
            return StaticKVCache.for_model(self.model, batch=1, max_len=needed)
        if self._cache is None or self._cache.max_len < needed:
            want = max(needed, reserve or 0)
            bucket = -(-want // 256) * 256  # keep the slack small: the torch decode step attends over all of it
            self._cache = StaticKVCache.for_model(self.model, batch=1, max_len=bucket)
        self._cache.reset()
        fast_model: Any = self.model
        fast_model.decoder_for(self._cache, self._device_ngram()).prepare()
        return self._cache

    @staticmethod
    def _decode_on_device(
        model: Any,
        cache: Any,
        prompt_ids: torch.Tensor,
        first: int,
        steps: int,
        ngram: int,
        eos_id: int | None,
        marks: list[Any],
        clock: DeviceClock,
        page: Page,
        should_stop: Callable[[], bool] | None,
    ) -> tuple[list[int], torch.Tensor]:
        """Up to ``steps`` tokens after ``first`` chosen on the device (FastDecoder.greedy): one clock mark per
        step, no host sync but an eos check every 16 steps.  Steps computed past eos are dropped from the
        tokens and from ``marks``, so they count in no time."""
        dec = model.decoder_for(cache, ngram)
        dec.set_history(prompt_ids)
        dec.nonfinite.zero_()
        n_before = len(marks)

        def on_step() -> None:
            marks.append(clock.mark())
            if should_stop is not None and should_stop():
                raise RunInterrupted(f"interrupted during decode of page {page.page_id} after {len(marks)} tokens")

        first_t = torch.tensor([[first]], device=prompt_ids.device)
        new = dec.greedy(first_t, steps, eos_id, check_every=16, on_step=on_step)[0]
        del marks[n_before + len(new) :]
        return new, dec.nonfinite.clone()

    def _device_ngram(self) -> int | None:
        """The no-repeat-ngram size of the on-device decode loop, or None when the host loop runs."""
        if self.fast is None or not self.fast.device_decode or float(self.infer.get("temperature", 0.0)) != 0:
            return None
        if bool(self.infer.get("nvtx_decode_step", False)):  # per-step NVTX ranges need the host loop
            return None
        return int(self.infer.get("no_repeat_ngram_size") or 0)

    @classmethod
    def load(cls, cfg: Any, project_root: Path) -> DeepSeekOCRSession:
        device = resolve_device(str(cfg.device))
        dtype = resolve_dtype(str(cfg.model.get("dtype", "bfloat16")), device)
        backend_name = str(cfg.model.get("backend", "native"))
        model_cfg = cfg.model
        override = cfg.infer.get("preprocess_override")
        if override:  # a vendor resolution mode (infer=deepseek_ocr.<mode>) sets the image geometry
            model_cfg = OmegaConf.merge(cfg.model, {"preprocess": override})
        if backend_name == "native":
            backend = NativeBackend(model_cfg, device, dtype, int(cfg.seed), project_root)
        elif backend_name == "hf_remote":
            from llm_perf_opt.runners.hf_remote import HfRemoteBackend

            backend = HfRemoteBackend(model_cfg, device, dtype, project_root)  # type: ignore[assignment]
        else:
            raise ConfigError(f"model.backend must be 'native' or 'hf_remote', got {backend_name!r}")
        infer = dict(cfg.infer)
        infer["prompt"] = cfg.model.get("prompt")
        return cls(backend, device, dtype, infer, use_nvtx=True)

    # ------------------------------------------------------------------ helpers
    @property
    def params_total(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def close(self) -> None:
        self.hooks.remove()
        if self.nvml is not None:
            self.nvml.__exit__(None, None, None)

    def _energy(self, t0_s: float, t1_s: float) -> float | None:
        """Energy of the page window (J); None with ``energy_unavailable_reason`` set when NVML can't say."""
        from llm_perf_opt.profiling.mfu import Unavailable as Missing

        if self.nvml is None or not self.nvml.available:
            return None
        # Wait until a sample past the window exists, so the window's end can be interpolated.
        deadline = t1_s + 2.5 * self.nvml.interval_s
        while time.perf_counter() < deadline:
            time.sleep(self.nvml.interval_s / 2)
        reading = self.nvml.energy_j(t0_s, t1_s)
        if isinstance(reading, Missing):
            self.energy_unavailable_reason = reading.reason
            return None
        return float(reading.energy_j)

    def prepare(self, page: Page) -> Any:
        """The page decoded and preprocessed (a PreparedPage): model inputs, no model work."""
        from llm_perf_opt.models.deepseek_ocr.preprocess import preprocess_page

        return preprocess_page(page.load(), self.backend.preprocess_cfg, self.backend.config, self.text_ids)

    def run_batch(self, pages: list[Page], max_new_tokens: int, repeat: int) -> BatchRecord:
        """One batch of pages through the batched generator (throughput phase); greedy, per-sequence eos."""
        from llm_perf_opt.models.deepseek_ocr.batched import BatchedGenerator

        if self.backend.name != "native":
            raise ConfigError("infer.batch_size > 1 needs model.backend=native", hint="set infer.batch_size=1")
        if self._batched is None:
            self._batched = BatchedGenerator(self.model)
        prepared = [self.prepare(p) for p in pages]
        ignore_eos = bool(self.infer.get("ignore_eos", False))
        with torch.inference_mode():
            res = self._batched.run(
                prepared,
                max_new_tokens,
                eos_token_id=None if ignore_eos else self.backend.config.language.eos_token_id,
                no_repeat_ngram_size=int(self.infer.get("no_repeat_ngram_size") or 0),
                ignore_eos=ignore_eos,
            )
        return BatchRecord(
            repeat=repeat,
            page_ids=[p.page_id for p in pages],
            batch=res.batch,
            padded_prompt_tokens=res.padded_len,
            output_tokens=res.output_tokens,
            vision_ms=res.vision_s * 1e3,
            prefill_ms=res.ttft_s * 1e3,
            decode_ms=res.decode_s * 1e3,
            pages_per_s=res.pages_per_s if res.total_s > 0 else None,
            output_tok_s=res.output_tok_per_s if res.total_s > 0 else None,
            tpot_ms=list(res.tpot_ms),
            decode_path=res.decode_path,
            graph_capture_ms=res.graph_capture_s * 1e3,
            idle_steps=res.idle_steps,
        )

    # ------------------------------------------------------------------ one page
    def run(
        self,
        page: Page,
        max_new_tokens: int,
        repeat: int = 0,
        ignore_eos: bool | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> PageRun:
        from llm_perf_opt.models.deepseek_ocr.generation import select_next_token
        from llm_perf_opt.models.deepseek_ocr.preprocess import preprocess_page

        if max_new_tokens < 1:
            raise ConfigError(
                f"max_new_tokens must be >= 1, got {max_new_tokens}", hint="e.g. infer.max_new_tokens=256"
            )
        ignore_eos = bool(self.infer.get("ignore_eos", False)) if ignore_eos is None else ignore_eos
        temperature = float(self.infer.get("temperature", 0.0))
        ngram = int(self.infer.get("no_repeat_ngram_size") or 0)
        nvtx_steps = bool(self.infer.get("nvtx_decode_step", False))
        eos_id = self.backend.config.language.eos_token_id
        model = self.model
        clock = self.clock
        generator = torch.Generator(device="cpu").manual_seed(repeat)

        t0 = time.perf_counter_ns()
        window_start_s = time.perf_counter()
        with self.ranges.range("preprocess"):
            image = page.load()
            prepared = preprocess_page(image, self.backend.preprocess_cfg, self.backend.config, self.text_ids)
            if self.fast is not None and self.fast.pinned_upload and self.device.type == "cuda":
                prepared = prepared.pinned()  # host-side work: counted in preprocess, not in the prefill
        preprocess_ms = (time.perf_counter_ns() - t0) / 1e6

        prompt_len = int(prepared.prompt_len)
        cache = self._page_cache(prompt_len + max_new_tokens, prompt_len + max(max_new_tokens, self.reserve_new_tokens))
        if clock.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.hooks.reset()
        setups_before = getattr(self.model, "setup_count", 0)
        history: list[int] = [int(t) for t in prepared.input_ids[0].tolist()]
        generated: list[int] = []
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)

        with torch.inference_mode():
            with self.ranges.range("prefill"):
                m_prefill = clock.mark()
                crops = prepared.images_crop.to(self.device, self.dtype, non_blocking=True)
                ori = prepared.images_ori.to(self.device, self.dtype, non_blocking=True)
                ids = prepared.input_ids.to(self.device)
                mask = prepared.images_seq_mask.to(self.device)
                m_vision0 = clock.mark()
                feats = model.encode_images(crops, ori, prepared.images_spatial_crop)
                m_vision1 = clock.mark()
                embeds = model.embed_prompt(ids, mask, [feats])
                logits = model.prefill(embeds, cache)
                nonfinite |= ~torch.isfinite(logits).all()
                token = select_next_token(logits[0], history, temperature, ngram, generator)
                m_ttft = clock.mark()
            generated.append(token)
            history.append(token)
            decode_marks = [m_ttft]
            device_ngram = self._device_ngram() if isinstance(cache, StaticKVCache) else None
            with self.ranges.range("decode"):
                if device_ngram is not None and len(generated) < max_new_tokens and (ignore_eos or token != eos_id):
                    new, dec_nonfinite = self._decode_on_device(
                        model, cache, ids, token, max_new_tokens - 1, device_ngram, None if ignore_eos else eos_id,
                        decode_marks, clock, page, should_stop,
                    )  # fmt: skip
                    nonfinite |= dec_nonfinite
                    generated += new
                    history += new
                    token = generated[-1]
                # the host loop: every step when tokens are picked on the host (nothing left after the device loop)
                while len(generated) < max_new_tokens and (ignore_eos or token != eos_id):
                    if should_stop is not None and should_stop():
                        raise RunInterrupted(
                            f"interrupted during decode of page {page.page_id} after {len(generated)} tokens"
                        )
                    if nvtx_steps:
                        self.ranges.push("decode_step")
                    step_in = torch.tensor([[token]], device=self.device)
                    logits = model.decode_step(step_in, cache)
                    nonfinite |= ~torch.isfinite(logits).all()
                    token = select_next_token(logits[0], history, temperature, ngram, generator)
                    decode_marks.append(clock.mark())
                    if nvtx_steps:
                        self.ranges.pop()
                    generated.append(token)
                    history.append(token)
        clock.synchronize()
        window_end_s = time.perf_counter()

        comp = self.hooks.collect_ms()
        prefill_ms = clock.elapsed_ms(m_prefill, m_ttft)
        vision_ms = clock.elapsed_ms(m_vision0, m_vision1)
        steps = clock.intervals_ms(decode_marks)
        decode_ms = sum(steps)
        n_tok = len(generated)
        flags: list[str] = []
        if bool(nonfinite.item()):
            flags.append("nonfinite_logits: NaN/Inf in the logits; tokens after that point are not meaningful")
        tpot = decode_ms / (n_tok - 1) if n_tok >= 2 and decode_ms > 0 else None
        if n_tok < 2:
            flags.append("single_token: eos right after prefill, no decode step to time (TPOT not available)")
        if prefill_ms <= 0 or any(s <= 0 for s in steps):
            flags.append("nonpositive_timing: a stage measured <= 0 ms (clock resolution?); rates left out")
            tpot = None if decode_ms <= 0 else tpot
        if getattr(self.model, "setup_count", 0) > setups_before:
            flags.append(
                "one_time_setup: a new view shape or prompt length made the fast path compile/capture its vision "
                "or prefill graphs inside "
                "this page's prefill; its vision and prefill times are not steady-state"
            )
        pct = percentiles(steps) if steps else None
        peak_alloc = peak_reserved = None
        if clock.is_cuda:
            peak_alloc = int(torch.cuda.max_memory_allocated(self.device))
            peak_reserved = int(torch.cuda.max_memory_reserved(self.device))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        stopped_by_eos = (not ignore_eos) and generated[-1] == eos_id
        routing = getattr(model, "experts_hit_per_layer", None)
        experts_hit = routing() if callable(routing) else None
        per_expert = getattr(model, "tokens_per_expert", None)
        tokens_per_expert = per_expert() if callable(per_expert) else None
        energy = self._energy(window_start_s, window_end_s)
        text = self.backend.tokenizer.decode([t for t in generated if not (t == eos_id and stopped_by_eos)])

        grid = tuple(int(v) for v in prepared.images_spatial_crop)
        record = PageRecord(
            page_id=page.page_id,
            repeat=repeat,
            status="ok",
            path=str(page.path) if page.path else None,
            size_px=(int(prepared.page_size[0]), int(prepared.page_size[1])),
            crop_grid=(grid[0], grid[1]),
            n_tiles=int(prepared.n_crops),
            prompt_tokens=prompt_len,
            image_tokens=int(prepared.image_token_count),
            generated_tokens=n_tok,
            hit_token_cap=n_tok >= max_new_tokens,
            stopped_by_eos=stopped_by_eos,
            preprocess_ms=preprocess_ms,
            sam_ms=comp.get("sam"),
            clip_ms=comp.get("clip"),
            projector_ms=comp.get("projector"),
            vision_ms=vision_ms,
            prefill_ms=prefill_ms,
            decode_ms=decode_ms if steps else None,
            e2e_ms=preprocess_ms + prefill_ms + decode_ms,
            tpot_ms=tpot,
            decode_tok_s=(1000.0 / tpot) if tpot else None,
            decode_step_p50_ms=pct[0] if pct else None,
            decode_step_p90_ms=pct[1] if pct else None,
            decode_step_p99_ms=pct[2] if pct else None,
            decode_step_ms=steps,
            peak_mem_allocated_bytes=peak_alloc,
            peak_mem_reserved_bytes=peak_reserved,
            peak_rss_bytes=rss,
            kv_cache_bytes=int(self.model.kv_cache_bytes() if isinstance(cache, _BackendOwnedCache) else cache.nbytes),
            energy_j=energy,
            energy_per_token_j=energy / n_tok if energy is not None and n_tok else None,
            experts_hit_per_layer=experts_hit,
            vision_views=[(int(prepared.n_crops), int(crops.shape[-2]), int(crops.shape[-1]))] * (prepared.n_crops > 0)
            + [(1, int(ori.shape[-2]), int(ori.shape[-1]))],
            flags=flags,
        )
        prediction = Prediction(
            page_id=page.page_id,
            path=record.path,
            text=text,
            token_ids=generated,
            text_is_meaningful=not getattr(self.backend.tokenizer, "is_stand_in", False)
            and self.backend.weights_desc != "dummy",
        )
        return PageRun(
            record=record,
            prediction=prediction,
            prepared=prepared,
            host_window_s=(window_start_s, window_end_s),
            tokens_per_expert=tokens_per_expert,
        )


def check_prompt(prompt: str) -> None:
    if "<image>" not in prompt:
        raise InputError(
            f"prompt {prompt!r} has no <image> placeholder but every page is an image",
            hint="use e.g. model.prompt='<image>\\n<|grounding|>Convert the document to markdown.'",
        )
