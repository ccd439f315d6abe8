"""DeepSeekOCRSession: load the model once, then run pages with honest prefill/decode timing.

Timeline of one page (DESIGN.md, "Rules that make the numbers true")::

    preprocess (host)  | prefill: upload → SAM/CLIP/projector → embed → LM forward → token 1 | decode: token 2..N
                       ^ prefill start                                          TTFT ^        each step = one
                                                                                              forward on the KV cache

Marks are CUDA events on the current stream (host clock on CPU) and are resolved once per page, so the
only synchronisations inside decode are the ones the eager algorithm itself needs (the host reads each
token for no-repeat-ngram and eos).  Decode step i spans mark i → mark i+1, so Σ steps == decode_ms.

The session takes typed settings (``runners.settings``) and a backend (``runners.backends``); the decode loops
live in ``decode_loop.py`` and the record with its guards in ``page_record.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch

from llm_perf_opt.data.datasets import Page
from llm_perf_opt.errors import ConfigError
from llm_perf_opt.models.deepseek_ocr import weights
from llm_perf_opt.models.deepseek_ocr.generation import NoRepeatNGram
from llm_perf_opt.models.deepseek_ocr.kv_cache import StaticKVCache
from llm_perf_opt.models.deepseek_ocr.protocol import OCRModel
from llm_perf_opt.models.deepseek_ocr.weights import resolve_device
from llm_perf_opt.profiling.hooks import StageHooks
from llm_perf_opt.profiling.ranges import RangeMarker
from llm_perf_opt.profiling.rss import peak_rss_bytes
from llm_perf_opt.profiling.timers import DeviceClock
from llm_perf_opt.results.types import BatchRecord, Prediction
from llm_perf_opt.runners.backends import Backend, build_backend
from llm_perf_opt.runners.decode_loop import DecodeState, decode_on_device, decode_on_host
from llm_perf_opt.runners.page_record import PageMeasurements, PageRun, build_page_record
from llm_perf_opt.runners.settings import InferSettings, RunSettings, refill_per_page

__all__ = ["DeepSeekOCRSession", "PageRun", "resolve_device"]

if TYPE_CHECKING:
    from llm_perf_opt.models.deepseek_ocr.fast import FastModel

log = logging.getLogger(__name__)


@attrs.frozen
class _Prefill:
    """What the prefill of one page hands to decode and to the record."""

    ids: torch.Tensor
    crops_hw: tuple[int, int]
    ori_hw: tuple[int, int]
    m_prefill: Any
    m_vision0: Any
    m_vision1: Any
    m_ttft: Any


class DeepSeekOCRSession:
    """Model, tokenizer, preprocessing, device and dtype for the life of a run."""

    def __init__(
        self,
        backend: Backend,
        device: torch.device,
        dtype: torch.dtype,
        infer: InferSettings,
        prompt: str,
        use_nvtx: bool,
        reserve_new_tokens: int = 0,
    ) -> None:
        from llm_perf_opt.profiling.hooks import module_named

        self.backend = backend
        # the model the page runs through: the backend's, or on the fast path its wrapper (``fast_model``, the same
        # object, for what only the fast path has: its decoder, kernels, graph-capture errors, fallbacks)
        self.model: OCRModel = backend.model
        self.fast_model: FastModel | None = None
        self.device = device
        self.dtype = dtype
        self.infer = infer
        self.clock = DeviceClock(device)
        self.ranges = RangeMarker(use_nvtx=use_nvtx and device.type == "cuda")
        self.hooks = StageHooks(
            {name: module_named(backend.model, dotted) for name, dotted in backend.hook_targets.items()},
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
        # new tokens the fast path's shared cache is sized for at least (the run's token cap): a warm-up with fewer
        # tokens then allocates the same cache as the timed runs, so the graphs bound to it (decode step, prefill
        # per prompt length) are captured once, in the warm-up
        self.reserve_new_tokens = reserve_new_tokens
        # the fast path's switches (None: eager); device-adjusted already (RunSettings.resolved)
        self.fast = infer.fast.switches if infer.fast.enabled else None
        if self.fast is not None:
            self.model = self.fast_model = backend.fast_model(self.fast)
        # the no-repeat-ngram rule: the reference's (HF, whole sequence) or vLLM's (window, exempt ids, output)
        self.ngram_rule = infer.ngram_rule
        self.prompt = prompt
        self.text_ids = backend.tokenizer.encode_prompt(prompt)

    @classmethod
    def load(cls, settings: RunSettings, project_root: Path) -> DeepSeekOCRSession:
        """Resolve device and dtype, build the backend the settings name, wrap it for the run."""
        device = resolve_device(settings.device)
        dtype = weights.resolve_dtype(settings.model.dtype)
        weights.check_dtype_on_device(dtype, device)
        used = settings.resolved(device.type)
        backend = build_backend(used.model, device, dtype, used.seed, project_root)
        return cls(
            backend, device, dtype, used.infer, used.model.prompt_text, use_nvtx=True, reserve_new_tokens=used.token_cap
        )

    def optimisations(self) -> dict[str, bool]:
        """What the report lists as active: the eager path always has the static, preallocated KV cache; on the
        fast path every boolean switch of FastConfig, the Triton decode kernels and CLIP's Triton attention."""
        f, fast = self.fast, self.fast_model
        out = {"static_kv_cache": not self.backend.owns_kv_cache}
        if f is None or fast is None:
            out.update(grouped_moe=False, fused_qkv=False, cuda_graphs=False)
            return out
        out.update({k: v for k, v in attrs.asdict(f).items() if isinstance(v, bool)})
        out["decode_kernels_triton"] = fast.decode_kernels == "triton"  # what runs (CPU: torch)
        vision = fast.vision  # DeepSeek-OCR-2's encoder: no merged form, no CLIP attention (None)
        out["clip_merged_views"] = bool(f.clip_merged_views and vision.merges_views)
        out["clip_attention_triton"] = vision.clip_attention == "triton"  # what runs (CPU: SDPA)
        return out

    def _setup_count(self) -> int:
        """One-time setups so far (``FastModel.setup_count``: its graph captures and the process's JIT compiles
        outside captures); the eager model does none."""
        return int(self.model.setup_count) if self.fast is not None else 0

    def _page_cache(self, needed: int, reserve: int | None = None) -> Any:
        """A KV cache for ``needed`` positions: the backend's per page (eager), or one reused bucketed cache
        (fast) sized for at least ``reserve`` positions."""
        if self.fast_model is None:
            return self.backend.new_cache(needed)
        if self._cache is None or self._cache.max_len < needed:
            want = max(needed, reserve or 0)
            bucket = -(-want // 256) * 256  # keep the slack small: the torch decode step attends over all of it
            self._cache = StaticKVCache.for_model(self.model, batch=1, max_len=bucket)
        self._cache.reset()
        self.fast_model.decoder_for(self._cache, self._device_ngram()).prepare()
        return self._cache

    def _device_ngram(self) -> NoRepeatNGram | None:
        """The no-repeat-ngram rule of the on-device decode loop, or None when the host loop runs."""
        if self.fast is None or not self.fast.device_decode or self.infer.temperature != 0:
            return None
        if self.infer.nvtx_decode_step:  # per-step NVTX ranges need the host loop
            return None
        return self.ngram_rule

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

    def prepare(self, page: Page, uint8: bool = False) -> Any:
        """The page decoded and preprocessed (a PreparedPage): model inputs, no model work.  ``uint8``: views left
        as uint8 pixels, normalised on the device by the batched vision (4× less host work and upload)."""
        return self.backend.prepare_page(page.load(), self.text_ids, uint8=uint8)

    def prepare_for_batch(self, page: Page) -> Any:
        """:meth:`prepare` for the batched phase (uint8 views; run by the prefetcher's worker threads)."""
        return self.prepare(page, uint8=True)

    def run_batch(
        self,
        pages: list[Page],
        max_new_tokens: int,
        repeat: int,
        prepared: list[Any] | None = None,
        page_wait_ms: float | None = None,
    ) -> BatchRecord:
        """One batch of pages through the batched generator (throughput phase); greedy, per-sequence eos.
        ``prepared``: the pages already prepared (by the prefetcher), after ``page_wait_ms`` of waiting."""
        from llm_perf_opt.models.deepseek_ocr.continuous import slot_occupancy

        generator = self._generator()
        if prepared is None:
            t_pre = time.perf_counter()
            prepared = [self.prepare_for_batch(p) for p in pages]
            page_wait_ms = (time.perf_counter() - t_pre) * 1e3
        # the host preprocessing this batch waited for: all of it when serial, what the pool had not done ahead
        preprocess_ms = page_wait_ms
        ignore_eos = self.infer.ignore_eos
        targets = [self.simulated_target(p) for p in pages]
        caps = [max_new_tokens if t is None else min(max_new_tokens, t) for t in targets]
        with torch.inference_mode():
            res = generator.run(
                prepared,
                caps,
                eos_token_id=None if ignore_eos else self.backend.config.language.eos_token_id,
                no_repeat_ngram_size=self.infer.no_repeat_ngram_size,
                ignore_eos=ignore_eos,
                skip_keys=self.infer.static_skip_keys,
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
            graph_capture_error=res.graph_capture_error,
            graph_captures=int(res.graph_capture_s > 0 and res.graph_capture_error is None),  # the step, once
            idle_steps=res.idle_steps,
            preprocess_ms=preprocess_ms,
            pages_per_s_with_preprocess=None
            if preprocess_ms is None
            else res.batch / (res.total_s + preprocess_ms / 1e3),
            output_tok_s_with_preprocess=(
                None if preprocess_ms is None else res.output_tokens / (res.total_s + preprocess_ms / 1e3)
            ),
            simulated_eos=[
                _ended_at_target(len(t), eos, target)
                for t, eos, target in zip(res.tokens, res.stopped_by_eos, targets, strict=True)
            ],
            page_wait_ms=page_wait_ms,
            batching="static",
            timed_setups=res.timed_setups,
            slot_occupancy=slot_occupancy(res.tokens, len(res.step_ms), res.batch),
            decode_steps=len(res.step_ms),
            row_steps=len(res.step_ms) * res.batch,
            key_steps=res.key_steps,
            finished_rows_attend=res.finished_rows_attend,
            **self._expert_reads(res.routed_experts_read, res.grouped_steps),
        )

    def _expert_reads(self, read: list[float] | None, steps: int) -> dict[str, Any]:
        """A batched record's routed-expert reads (None where nothing counted them) and the experts a layer holds."""
        if read is None:
            return {}
        return {
            "routed_experts_read": read,
            "grouped_steps": steps,
            "routed_experts": self.backend.config.language.n_routed_experts,
        }

    def _generator(self) -> Any:
        """The BatchedGenerator of the throughput phase (built on first use, then kept with its graphs)."""
        from llm_perf_opt.models.deepseek_ocr.batched import BatchedGenerator

        if not self.backend.supports_batching:
            raise ConfigError(
                f"infer.batch_size > 1 needs model.backend=native (got {self.backend.name})",
                hint="set infer.batch_size=1",
            )
        if self._batched is None:
            from llm_perf_opt.models.deepseek_ocr.model import DeepseekOCRForCausalLM

            eager = self.backend.model
            if self.fast_model is not None:
                self._batched = BatchedGenerator(self.fast_model, clock=self.clock)
            elif isinstance(eager, DeepseekOCRForCausalLM):  # supports_batching: the native backend's model
                self._batched = BatchedGenerator(eager, clock=self.clock)
            else:
                raise ConfigError(
                    f"model.backend={self.backend.name} has no batched phase", hint="set infer.batch_size=1"
                )
        return self._batched

    def warm_batched_vision(self, prepared: list[Any]) -> int:
        """Compile / capture the batched phase's vision chunk shapes for these pages' view sizes before it is
        timed (fast path only; see ``BatchedGenerator.warm_vision``); returns the shapes run."""
        n: int = self._generator().warm_vision(prepared)
        return n

    def run_continuous(
        self, items: Iterable[tuple[Page, Any]], max_new_tokens: int, repeat: int, slots: int
    ) -> BatchRecord:
        """Every (page, prepared page) of ``items`` through ``slots`` continuously refilled sequence slots (the
        batched phase with ``infer.batching=continuous``); one record for the whole run.  ``items`` is consumed
        lazily (the prefetcher prepares pages while the slots decode); the time spent waiting on it is the run's
        page wait."""
        from llm_perf_opt.models.deepseek_ocr.continuous import SlotRequest

        generator = self._generator()
        taken: list[Page] = []
        targets: list[int | None] = []

        def requests() -> Iterator[SlotRequest]:
            for page, prepared in items:
                target = self.simulated_target(page)
                taken.append(page)
                targets.append(target)
                yield SlotRequest(prepared, max_new_tokens if target is None else min(max_new_tokens, target))

        ignore_eos = self.infer.ignore_eos
        per_page = refill_per_page(self.infer.refill_prefill, generator.page_prefill_graphed)
        with torch.inference_mode():
            res = generator.run_continuous(
                requests(),
                slots,
                eos_token_id=None if ignore_eos else self.backend.config.language.eos_token_id,
                no_repeat_ngram_size=self.infer.no_repeat_ngram_size,
                narrow_drain=self.infer.narrow_drain,
                vision_ahead=self.infer.refill_vision_ahead,
                prefill_ahead=self.infer.refill_prefill_ahead,
                prefill_per_page=per_page,
                skip_keys=self.infer.continuous_skip_keys,
            )
        wait_ms = res.page_wait_s * 1e3
        total_s = res.total_s
        drain_steps, drain_ms, drain_tokens = res.drain
        return BatchRecord(
            repeat=repeat,
            page_ids=[p.page_id for p in taken],
            batch=slots,
            padded_prompt_tokens=max(res.prompt_lens, default=0),
            output_tokens=res.output_tokens,
            vision_ms=res.vision_s * 1e3,
            prefill_ms=(res.vision_s + res.prefill_s) * 1e3,
            decode_ms=res.decode_s * 1e3,
            pages_per_s=res.pages / total_s if total_s > 0 else None,
            output_tok_s=res.output_tokens / total_s if total_s > 0 else None,
            tpot_ms=list(res.tpot_ms),
            decode_path=res.decode_path,
            graph_capture_ms=res.graph_capture_s * 1e3,
            graph_capture_error=res.graph_capture_error,
            graph_captures=res.graph_captures,
            idle_steps=res.idle_steps,
            preprocess_ms=wait_ms,
            pages_per_s_with_preprocess=res.pages / (total_s + res.page_wait_s) if total_s > 0 else None,
            output_tok_s_with_preprocess=res.output_tokens / (total_s + res.page_wait_s) if total_s > 0 else None,
            simulated_eos=[
                _ended_at_target(len(t), eos, target)
                for t, eos, target in zip(res.tokens, res.stopped_by_eos, targets, strict=True)
            ],
            page_wait_ms=wait_ms,
            batching="continuous",
            timed_setups=res.timed_setups,
            slot_occupancy=res.slot_occupancy,
            fills=res.fills,
            decode_steps=len(res.step_ms),
            drain_steps=drain_steps,
            drain_ms=drain_ms,
            drain_tokens=drain_tokens,
            narrowed_steps=sum(1 for rows in res.step_rows if rows < slots),
            row_steps=sum(res.step_rows),
            key_steps=res.key_steps,
            finished_rows_attend=res.finished_rows_attend,
            **self._expert_reads(res.routed_experts_read, res.grouped_steps),
            vision_ahead_ms=res.vision_ahead_s * 1e3 if res.pages_ahead else None,
            pages_ahead=res.pages_ahead or None,
            prefill_ahead_ms=res.prefill_ahead_s * 1e3 if res.pages_prefilled_ahead else None,
            pages_prefilled_ahead=res.pages_prefilled_ahead or None,
            pages_prefilled_per_page=res.pages_prefilled_per_page or None,
            refill_prefill="per_page" if per_page else "batched",
        )

    def simulated_target(self, page: Page) -> int | None:
        """Where this page's sequence ends when the weights cannot say (dummy weights): its target output length;
        None with real weights (they end at eos) or a page without a target."""
        if self.backend.weights_desc != "dummy":
            return None
        return page.target_tokens

    # ------------------------------------------------------------------ one page
    def run(
        self,
        page: Page,
        max_new_tokens: int,
        repeat: int = 0,
        ignore_eos: bool | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> PageRun:
        """Preprocess, prefill (token 1), decode (tokens 2..N) one page; its record, text and FLOP inputs."""
        from llm_perf_opt.models.deepseek_ocr.generation import select_next_token

        if max_new_tokens < 1:
            raise ConfigError(
                f"max_new_tokens must be >= 1, got {max_new_tokens}", hint="e.g. infer.max_new_tokens=256"
            )
        ignore_eos = self.infer.ignore_eos if ignore_eos is None else ignore_eos
        temperature, ngram = self.infer.temperature, self.ngram_rule
        eos_id = self.backend.config.language.eos_token_id
        generator = torch.Generator(device="cpu").manual_seed(repeat)

        def choose(logits: torch.Tensor, history: list[int]) -> int:
            return select_next_token(logits, history, temperature, ngram, generator)

        def done(token: int) -> bool:
            return not ignore_eos and token == eos_id

        simulated = self.simulated_target(page)
        cap = max_new_tokens if simulated is None else min(max_new_tokens, simulated)
        window_start_s = time.perf_counter()
        prepared, preprocess_ms = self._preprocess(page)
        prompt_len = int(prepared.prompt_len)
        cache = self._page_cache(prompt_len + max_new_tokens, prompt_len + max(max_new_tokens, self.reserve_new_tokens))
        if self.clock.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.hooks.reset()
        setups_before = self._setup_count()
        state = DecodeState(
            generated=[],
            history=ngram.host_history(prepared.input_ids[0].tolist()),  # what the rule looks at
            marks=[],
            nonfinite=torch.zeros((), dtype=torch.bool, device=self.device),
        )
        with torch.inference_mode():
            pre = self._prefill(prepared, cache, state, choose)
            with self.ranges.range("decode"):
                device_ngram = self._device_ngram()
                fast = self.fast_model
                if (
                    device_ngram is not None
                    and fast is not None
                    and len(state.generated) < cap
                    and not done(state.last)
                ):
                    decode_on_device(
                        fast, cache, pre.ids, state, cap - 1, device_ngram,
                        None if ignore_eos else eos_id, self.clock, page.page_id, should_stop,
                    )  # fmt: skip
                # the host loop: every step when tokens are picked on the host (nothing left after the device loop)
                decode_on_host(
                    self.model, cache, state, cap, done, choose, self.clock, self.ranges,
                    self.infer.nvtx_decode_step, page.page_id, should_stop,
                )  # fmt: skip
        self.clock.synchronize()
        window_end_s = time.perf_counter()
        return self._page_run(page, repeat, prepared, pre, state, cache, max_new_tokens, ignore_eos, eos_id,
                              preprocess_ms, setups_before, (window_start_s, window_end_s), simulated)  # fmt: skip

    def _stage_ms(self) -> dict[str, float]:
        """The hooks' times under the record's slots (v2's ``encoder`` fills ``clip``; see Backend.stage_names)."""
        slot_of = {name: slot for slot, name in self.backend.stage_names.items()}
        return {slot_of.get(name, name): ms for name, ms in self.hooks.collect_ms().items()}

    def _preprocess(self, page: Page) -> tuple[Any, float]:
        """Decode and preprocess the page on the host (its own stage, not part of prefill)."""
        t0 = time.perf_counter_ns()
        with self.ranges.range("preprocess"):
            image = page.load()
            prepared = self.backend.prepare_page(image, self.text_ids)
            if self.fast is not None and self.fast.pinned_upload and self.device.type == "cuda":
                prepared = prepared.pinned()  # host-side work: counted in preprocess, not in the prefill
        return prepared, (time.perf_counter_ns() - t0) / 1e6

    def _prefill(
        self, prepared: Any, cache: Any, state: DecodeState, choose: Callable[[torch.Tensor, list[int]], int]
    ) -> _Prefill:
        """Upload → vision → embed → first LM forward → token 1 (TTFT), each edge a clock mark."""
        clock, model = self.clock, self.model
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
            state.nonfinite |= ~torch.isfinite(logits).all()
            token = choose(logits[0], state.history)
            m_ttft = clock.mark()
        state.push([token])
        state.marks.append(m_ttft)
        return _Prefill(
            ids=ids,
            crops_hw=(int(crops.shape[-2]), int(crops.shape[-1])),
            ori_hw=(int(ori.shape[-2]), int(ori.shape[-1])),
            m_prefill=m_prefill,
            m_vision0=m_vision0,
            m_vision1=m_vision1,
            m_ttft=m_ttft,
        )

    def _page_run(
        self,
        page: Page,
        repeat: int,
        prepared: Any,
        pre: _Prefill,
        state: DecodeState,
        cache: Any,
        max_new_tokens: int,
        ignore_eos: bool,
        eos_id: int,
        preprocess_ms: float,
        setups_before: int,
        window_s: tuple[float, float],
        simulated_target: int | None = None,
    ) -> PageRun:
        """Resolve the page's clock marks (after the final sync) into its record, text and FLOP inputs."""
        clock = self.clock
        peak_alloc = peak_reserved = None
        if clock.is_cuda:
            peak_alloc = int(torch.cuda.max_memory_allocated(self.device))
            peak_reserved = int(torch.cuda.max_memory_reserved(self.device))
        generated = state.generated
        stopped_by_eos = (not ignore_eos) and generated[-1] == eos_id
        simulated_eos = _ended_at_target(len(generated), stopped_by_eos, simulated_target)
        experts_hit, tokens_per_expert = self.backend.routing_counts(self.model)
        n_crops = int(prepared.n_crops)
        views = [(n_crops, *pre.crops_hw)] * (n_crops > 0) + [(1, *pre.ori_hw)]
        record = build_page_record(
            page,
            repeat,
            prepared,
            PageMeasurements(
                preprocess_ms=preprocess_ms,
                prefill_ms=clock.elapsed_ms(pre.m_prefill, pre.m_ttft),
                vision_ms=clock.elapsed_ms(pre.m_vision0, pre.m_vision1),
                stage_ms=self._stage_ms(),
                decode_step_ms=clock.intervals_ms(state.marks),
                generated=generated,
                max_new_tokens=max_new_tokens,
                stopped_by_eos=stopped_by_eos,
                simulated_eos=simulated_eos,
                nonfinite=bool(state.nonfinite.item()),
                one_time_setup=self._setup_count() > setups_before,
                peak_mem_allocated_bytes=peak_alloc,
                peak_mem_reserved_bytes=peak_reserved,
                peak_rss_bytes=peak_rss_bytes(),
                kv_cache_bytes=self.backend.kv_cache_bytes(cache),
                energy_j=self._energy(*window_s),
                experts_hit_per_layer=experts_hit,
                vision_views=[(int(a), int(b), int(c)) for a, b, c in views],
            ),
        )
        text = self.backend.tokenizer.decode([t for t in generated if not (t == eos_id and stopped_by_eos)])
        prediction = Prediction(
            page_id=page.page_id,
            path=record.path,
            text=text,
            token_ids=generated,
            text_is_meaningful=self.backend.text_is_meaningful,
        )
        return PageRun(record, prediction, prepared, window_s, tokens_per_expert)


def _ended_at_target(n_generated: int, stopped_by_eos: bool, target: int | None) -> bool:
    """A simulated eos: the sequence ended because it reached its page's target length (not eos, not the cap
    below the target)."""
    return target is not None and not stopped_by_eos and n_generated == target
