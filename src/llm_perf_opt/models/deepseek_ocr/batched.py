"""Batched inference for the native DeepSeek-OCR: several pages per forward in vision, prefill and decode.

``BatchedGenerator(model).run(pages, max_new_tokens, eos_token_id=...)`` takes pages from
:func:`~llm_perf_opt.models.deepseek_ocr.preprocess.preprocess_page` and returns a :class:`BatchResult`
(per-sequence tokens, eos flags, stage times and throughput).  This module is scheduling only: masks and
positions go into a :class:`~llm_perf_opt.models.deepseek_ocr.context.ForwardContext` and the model's one
decoder forward (``lm_forward``: the eager layers, or a FastModel's fused ones) runs them.  Vision batching is
:mod:`~llm_perf_opt.models.deepseek_ocr.batched_vision`, the static step
:mod:`~llm_perf_opt.models.deepseek_ocr.batched_decode`, the result
:mod:`~llm_perf_opt.models.deepseek_ocr.batch_result`.

* **Vision** — views of the same pixel size are batched across pages: all tiles of all pages in one pass of
  the model's view encoder (SAM → CLIP → projector; DeepSeek-OCR-2: SAM → encoder → projector; the modules are
  called as modules, so forward hooks fire once per pass), all global views in another (``vision_batch`` caps
  views per pass).  Each page's features are then laid out exactly as the model's ``encode_images`` lays them
  out (its ``layout_features``).
* **Prefill** — prompts are LEFT-padded to the longest length ``L`` (``pad_b = L − len_b``) and run in
  one decoder forward over ``[B, L]``.  RoPE positions are per sequence (``index − pad_b``), the additive
  mask is causal and hides pad keys.  A pad query row attends only to itself (so no row is fully masked
  and no NaN appears); pad rows skip the MLP/MoE and their outputs are never read.  Because every prompt
  ends at column ``L − 1``, the first token of every sequence comes from that column.
* **Decode** — one forward per step for the whole batch: every sequence writes its K/V at the same cache
  slot ``L + step`` but is rotated at its own position ``len_b + step``; pad keys stay masked.  Two loops:

  - the **static step** (``decode_path`` "graph" on CUDA, "static" un-graphed elsewhere; used when every
    sequence has the same no_repeat_ngram size, 0 or not, and ``keep_logits`` is False): every input lives in a
    static device buffer (tokens [B, 1], per-row rotary position [B], the cache slot, per-row pad offsets), the additive
    key mask is built on the device from slot and pads over the cache's whole ``max_len``, K/V are written
    at the slot with ``index_copy_``, the token is chosen on the device
    (:func:`~llm_perf_opt.models.deepseek_ocr.fast.first_argmax`, after the no-repeat-ngram mask of
    :func:`~llm_perf_opt.models.deepseek_ocr.generation.banned_ngram_mask` when n > 0) and per-row done flags,
    counts and an output buffer [B, max_len] are updated on the device.  Shapes never change, so on CUDA the step is
    captured once per (batch, cache ``max_len``) as a CUDA graph and replayed; the graph and its KV cache are
    kept by the generator and reused by the next run of the same shape.  The host reads ``done.all()`` every
    ``check_every`` steps only (never without eos: the caps alone end the loop, at a known step), so up to
    ``check_every − 1`` steps may run after the last sequence finished (``BatchResult.idle_steps``; their
    tokens are not recorded).  Finished sequences keep feeding their last
    token and keep running **through the MLP/MoE too** (static shapes): their outputs are ignored, and
    routing statistics (``MoE.tokens_per_expert`` with eager experts, ``last_topk_idx``) include them.  Their
    attention sees their newest key only, and no row sees (or, on the Triton row attention, reads) its left pads
    (``skip_keys``, on by default: ``StaticBatchStep``).
    With a :class:`~llm_perf_opt.models.deepseek_ocr.fast.FastModel` the step uses its fused / grouped
    layer weights (``FastModel.layers``: fused QKV and gate/up, stacked experts; its ``decode_attention``);
    its device routing counters are not fed (``counts=None``), as in the host loop.
  - the **host loop** (``decode_path`` "host"; with per-sequence no_repeat_ngram sizes, ``keep_logits`` or
    ``static_decode=False``): tensors built on the host each step, the mask sliced to the current length,
    float32 logits to the host for the token choice.  Finished sequences are **not compacted** (attention
    still runs for them, logits ignored) but they skip the MLP/MoE (routing statistics count live tokens).

  Both loops end when every sequence has finished (eos, or its own ``max_new_tokens`` cap).
* **Token choice** — greedy (temperature 0) like :func:`~llm_perf_opt.models.deepseek_ocr.generation.select_next_token`:
  first index on ties.  The host loop adds, per sequence, the optional no-repeat-ngram rule over its own
  history (prompt ids + generated tokens).

Exactness: the same function as the single-page eager path (``encode_images`` / ``embed_prompt`` /
``prefill`` / ``decode_step``) computed on bigger batches with masked attention over padded keys, so
logits agree to float rounding (fp32: ~1e-6 relative), not bit for bit; greedy tokens match unless two
logits tie within rounding.  The static step differs from the host loop only in such rounding (attention
over the whole masked cache, the MLP on every row, a FastModel's fused GEMMs), so both loops give the same
tokens except at such ties.

Continuous batching (:meth:`BatchedGenerator.run_continuous`, a fixed number of sequence slots refilled as
sequences end, per-slot KV and per-row positions) is :mod:`~llm_perf_opt.models.deepseek_ocr.continuous`; it
shares this generator's vision, left-padded prefill and kept-state handling.

Timing: marks of the :class:`~llm_perf_opt.models.deepseek_ocr.clock.Clock` the caller passes (the profiler
passes its ``DeviceClock``: CUDA events on CUDA; on CPU the default is the host clock) around vision, prefill
(embedding + decoder + first token) and every decode step (recorded between graph replays, no sync), resolved
once at the end of :meth:`BatchedGenerator.run`. A one-time CUDA-graph capture is timed apart
(``BatchResult.graph_capture_s``) and is in none of the stage times.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs
import torch
from torch import Tensor

from llm_perf_opt.errors import ConfigError, InputError
from llm_perf_opt.models.deepseek_ocr.batch_result import BatchResult, StageMarks, routed_experts_read
from llm_perf_opt.models.deepseek_ocr.batched_decode import StaticBatchStep
from llm_perf_opt.models.deepseek_ocr.batched_vision import encode_pages, warm_view_chunks
from llm_perf_opt.models.deepseek_ocr.clock import Clock, HostClock
from llm_perf_opt.models.deepseek_ocr.context import ForwardContext, padded_prefill_mask
from llm_perf_opt.models.deepseek_ocr.continuous import (
    ContinuousResult,
    PageCaches,
    SlotDecodeStep,
    SlotRequest,
    run_continuous,
)
from llm_perf_opt.models.deepseek_ocr.decoder import EXPERT_IMPLS, MoE, apply_experts_eager
from llm_perf_opt.models.deepseek_ocr.fast import FastModel
from llm_perf_opt.models.deepseek_ocr.fast_layers import GroupedMoE
from llm_perf_opt.models.deepseek_ocr.generation import banned_ngram_tokens
from llm_perf_opt.models.deepseek_ocr.kv_cache import StaticKVCache
from llm_perf_opt.models.deepseek_ocr.model import DeepseekOCRForCausalLM
from llm_perf_opt.models.deepseek_ocr.preprocess import PreparedPage
from llm_perf_opt.models.deepseek_ocr.protocol import LanguageModel

__all__ = ["BatchResult", "BatchedGenerator"]


class BatchedGenerator:
    """Batched vision + left-padded prefill + masked batched decode over a (shared) native model.

    ``model``: a :class:`DeepseekOCRForCausalLM` or a :class:`FastModel` wrapping one (then vision runs in
    its fast vision mode; the prefill and the host decode loop use the wrapped model's modules, whose weights
    the fast path re-points to its fused storage, so the values are the same; the static decode step uses
    ``FastModel.layers`` directly).  ``expert_impl``: a key of ``decoder.EXPERT_IMPLS`` for the routed
    experts of the prefill and of the decode over module weights (default: each MoE layer's own
    ``expert_impl``, or the FastModel's when it groups experts; a FastModel's static step uses its own).
    ``vision_batch``: at most this many views per SAM/CLIP/projector call (None: all views of one size in
    a single call).

    Decode (see the module doc): ``static_decode`` (default True) uses the static, sync-free step whenever
    the run allows it (one no_repeat_ngram size for all sequences, no ``keep_logits``); False always runs the
    host loop.
    ``cuda_graphs`` (default True; effective only on CUDA, and only when the experts need no host sync, i.e.
    not ``"eager"``) replays that step from a CUDA graph captured on the first run of a (batch, cache
    length) shape; the generator keeps that graph and its KV cache (one shape at a time: a new shape frees
    the old one first; :meth:`release_decode_state` frees it explicitly).  ``check_every``: steps between
    the host's ``done.all()`` checks (each check is one device sync; none when eos is off).  ``clock``: marks
    the stage times (required off the CPU: pass ``profiling.timers.DeviceClock``).  With a FastModel the
    decoder is its fused layers, whose MoE uses the FastModel's expert implementation; ``expert_impl``
    overrides the eager model's MoE layers.
    """

    def __init__(
        self,
        model: DeepseekOCRForCausalLM | FastModel,
        *,
        expert_impl: str | None = None,
        vision_batch: int | None = None,
        static_decode: bool = True,
        cuda_graphs: bool = True,
        check_every: int = 16,
        clock: Clock | None = None,
    ) -> None:
        self.fast: FastModel | None = model if isinstance(model, FastModel) else None
        self.base: DeepseekOCRForCausalLM = model.base if isinstance(model, FastModel) else model
        if expert_impl is None and self.fast is not None and self.fast.fast_config.grouped_moe:
            expert_impl = self.fast.fast_config.expert_impl
        if expert_impl is not None and expert_impl not in EXPERT_IMPLS:
            raise ConfigError(f"unknown expert_impl {expert_impl!r}", hint=f"use one of {sorted(EXPERT_IMPLS)}")
        if vision_batch is not None and vision_batch < 1:
            raise ConfigError(f"vision_batch must be >= 1 or None, got {vision_batch}")
        if check_every < 1:
            raise ConfigError(f"check_every must be >= 1, got {check_every}", hint="16 checks eos every 16 steps")
        self.expert_impl = expert_impl
        self.vision_batch = vision_batch
        self.static_decode = bool(static_decode)
        self.cuda_graphs = bool(cuda_graphs)
        self.check_every = int(check_every)
        self.lm: LanguageModel = model
        if clock is None and self.base.device.type != "cpu":
            raise ConfigError(
                f"BatchedGenerator on {self.base.device} needs a device clock",
                hint="pass clock=profiling.timers.DeviceClock(device) (a host clock would time the enqueue)",
            )
        self.clock: Clock = HostClock() if clock is None else clock
        self._static: StaticBatchStep | None = None  # the last static-step shape: its cache, buffers and graph
        self._slots: SlotDecodeStep | None = None  # the last continuous-batching step: its cache, buffers, graph
        self.capture_error: str | None = None  # why a CUDA-graph capture failed (then the step runs un-graphed)
        self._page_caches: PageCaches | None = None  # continuous refills prefilled page by page: caches per length

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def matmul_attention(self) -> bool:
        """Whether the decode steps attend with two GEMMs (the FastModel's ``decode_attention="matmul"``)."""
        return self.fast is not None and self.fast.fast_config.decode_attention == "matmul"

    @property
    def ngram_kernel(self) -> bool:
        """Whether the decode steps build the no-repeat ban with :func:`kernels.ngram_ban` instead of the torch
        mask's ~20 kernels: the FastModel's ``ngram_kernel`` with its Triton decode step (``decode_kernels`` resolved
        to ``triton``: Triton runs on this device), as at batch 1; ``decode_kernels=torch`` keeps Triton out of the
        decode."""
        return self.fast is not None and self.fast.fast_config.ngram_kernel and self.fast.decode_kernels == "triton"

    def warm_vision(self, pages: Sequence[PreparedPage]) -> int:
        """With a FastModel: compile and capture every vision chunk shape the pages' view sizes can meet
        (:func:`batched_vision.warm_view_chunks`), outside any timed region; returns the shapes run (0 without)."""
        if self.fast is None:
            return 0
        return warm_view_chunks(self.base, self.fast, pages, self.vision_batch)

    @torch.no_grad()
    def encode_pages(self, pages: Sequence[PreparedPage]) -> list[Tensor]:
        """Every page's image features, views batched across pages (see :func:`batched_vision.encode_pages`)."""
        return encode_pages(self.base, self.fast, pages, self.vision_batch)

    def _context(
        self, cos: Tensor, sin: Tensor, mask: Tensor, cache: StaticKVCache, rows: Tensor | None
    ) -> ForwardContext:
        """A forward of new positions at ``cache.length`` (host column), per-row rotary and an additive mask."""
        return ForwardContext(
            cos=cos,
            sin=sin,
            cache=cache,
            start=cache.length,
            mask=mask,
            rows=rows,
            expert_impl=self.expert_impl,
            record_routing=False,
        )

    def _forward(self, hidden: Tensor, ctx: ForwardContext) -> Tensor:
        """The model's decoder over ``hidden`` [B, Lq, hidden] written at ``cache.length``; advances the cache."""
        assert ctx.cache is not None
        length = hidden.shape[1]
        ctx.cache.check_room(length)
        with self.base._sdpa_policy():
            out = self.lm.lm_forward(hidden, ctx)
        ctx.cache.advance(length)
        return out

    # ------------------------------------------------------------------ decode path
    def graph_safe(self) -> bool:
        """Whether the static step has no host sync, so it can be captured: every MoE layer's routed experts
        run on the device only (not ``"eager"``, whose expert loop reads the routing on the host)."""
        layers = self.fast.layers if self.fast is not None else self.base.model.layers
        return not any(self._syncs_host(layer.mlp) for layer in layers)

    def _syncs_host(self, mlp: object) -> bool:
        """Whether this MLP / MoE reads the routing on the host (the eager expert loop)."""
        if isinstance(mlp, GroupedMoE):
            return mlp.syncs_host
        return isinstance(mlp, MoE) and EXPERT_IMPLS[self.expert_impl or mlp.expert_impl] is apply_experts_eager

    def decode_path_for(self, ngrams: Sequence[int], keep_logits: bool) -> str:
        """The decode loop a run with these options takes: "graph", "static" or "host" (see the class doc)."""
        if not self.static_decode or keep_logits or len(set(ngrams)) > 1:
            return "host"  # the static step applies one no-repeat-ngram size to the whole batch
        if self.device.type != "cuda" or not self.cuda_graphs or not self.graph_safe():
            return "static"
        if self.capture_error is not None:  # a capture failed once: this model's step cannot be captured
            return "static"
        return "graph"

    def release_decode_state(self) -> None:
        """Drop the kept static / slot steps' caches, buffers and CUDA graphs (the next run rebuilds them)."""
        self._static = None
        self._slots = None
        self._page_caches = None

    def _static_for(
        self, bsz: int, max_len: int, use_graph: bool, ngram: int = 0, skip_keys: bool = True
    ) -> StaticBatchStep:
        """The kept static step when it serves ``bsz`` rows and has at least ``max_len`` columns, else a new one.

        The prompt length, pads and caps live in device buffers, and columns past a run's last one stay masked, so a
        kept step (and its graph) serves every later batch of its size that fits it.  Batches whose longest prompt or
        cap differ captured again each (round 27, found by reading): over mixed pages nearly every batch, each capture
        then left out of the wall time as one-time.  Now only a batch longer than any before it builds a new step.
        The cost: a shorter batch's step attends over the kept step's masked columns too.
        """
        entry = self._static
        if entry is None or not entry.serves(bsz, max_len, use_graph, ngram, skip_keys):
            self._static = None  # free the old cache and graph pool before allocating the new ones
            entry = self._static = StaticBatchStep(
                self.lm,
                self.base,
                bsz,
                max_len,
                use_graph=use_graph,
                matmul_attention=self.matmul_attention,
                expert_impl=self.expert_impl,
                no_repeat_ngram=ngram,
                ngram_kernel=self.ngram_kernel,
                skip_keys=skip_keys,
            )
        return entry

    # ------------------------------------------------------------------ run
    def run_continuous(
        self,
        source: Iterable[SlotRequest],
        slots: int,
        *,
        eos_token_id: int | None,
        no_repeat_ngram_size: int = 0,
        keep_logits: bool = False,
        narrow_drain: bool = True,
        vision_ahead: int = 0,
        prefill_ahead: bool = False,
        prefill_per_page: bool = False,
        skip_keys: bool = True,
    ) -> ContinuousResult:
        """Every page of ``source`` through ``slots`` continuously refilled sequence slots
        (:mod:`~llm_perf_opt.models.deepseek_ocr.continuous`); the static-batching :meth:`run` is kept beside it."""
        self.release_static()
        return run_continuous(
            self,
            source,
            slots,
            eos_token_id=eos_token_id,
            no_repeat_ngram_size=no_repeat_ngram_size,
            keep_logits=keep_logits,
            narrow_drain=narrow_drain,
            vision_ahead=vision_ahead,
            prefill_ahead=prefill_ahead,
            prefill_per_page=prefill_per_page,
            skip_keys=skip_keys,
        )

    def release_static(self) -> None:
        """Drop the kept static-batching step only (a continuous run needs its memory more)."""
        self._static = None

    @torch.inference_mode()
    def run(
        self,
        pages: Sequence[PreparedPage],
        max_new_tokens: int | Sequence[int],
        *,
        eos_token_id: int | None,
        no_repeat_ngram_size: int | Sequence[int] = 0,
        ignore_eos: bool = False,
        keep_logits: bool = False,
        skip_keys: bool = True,
    ) -> BatchResult:
        """Generate greedily for every page of ``pages`` as one batch.

        ``max_new_tokens`` and ``no_repeat_ngram_size`` are one value for all sequences or one per sequence.
        With ``ignore_eos`` (or ``eos_token_id=None``) a sequence runs to its cap.  ``skip_keys``: the static
        step's attention shows no row its pads and a finished row its newest key only (``StaticBatchStep``: the
        Triton row attention then reads none of the rest; the host loop shows them all, masked).  Runs under
        ``torch.inference_mode`` (the kept static buffers are inference tensors); kept logits are host copies.
        """
        bsz = len(pages)
        if bsz == 0:
            raise InputError("BatchedGenerator.run needs at least one page")
        caps = _per_sequence(max_new_tokens, bsz, "max_new_tokens")
        ngrams = _per_sequence(no_repeat_ngram_size, bsz, "no_repeat_ngram_size")
        if min(caps) < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {caps}")
        if min(ngrams) < 0:
            raise ConfigError(f"no_repeat_ngram_size must be >= 0, got {ngrams}", hint="use 0 to disable the rule")
        eos = None if ignore_eos else eos_token_id
        path = self.decode_path_for(ngrams, keep_logits)
        base = self.base
        clock = self.clock
        base.reset_routing_stats()

        lens = [int(p.input_ids.shape[-1]) for p in pages]
        length = max(lens)
        max_len = length + max(caps) - 1  # the last token is never fed back
        if path != "host":  # a new shape's cache and buffers are made before the marks (one-time setup, not prefill)
            static = self._static_for(bsz, max_len, use_graph=path == "graph", ngram=ngrams[0], skip_keys=skip_keys)

        setups = self.setup_count
        t_start = clock.mark()
        features = self.encode_pages(pages)
        t_vision = clock.mark()

        if path == "host":
            cache = base.new_cache(bsz, max_len)
        else:
            cache = static.cache
            cache.reset()  # stale K/V past a row's position stays masked until overwritten
        logits = self._prefill(pages, features, lens, cache)
        marks = StageMarks(clock, t_start, t_vision)
        if path == "host":
            res = self._decode_host(pages, logits, lens, caps, ngrams, eos, keep_logits, cache, marks)
        else:
            static.load_prompts([p.input_ids for p in pages])
            res = self._decode_static(static, logits, lens, caps, eos, marks)
        return attrs.evolve(res, timed_setups=self.setup_count - setups)  # the decode graph's capture is not one

    @property
    def capture_count(self) -> int:
        """The fast path's graph captures so far (``FastModel.capture_count``); 0 without a FastModel."""
        return 0 if self.fast is None else int(self.fast.capture_count)

    def expert_reads(self) -> Tensor | None:
        """A device copy of the decode steps' grouped expert counters (``FastModel.expert_reads``); None without
        them."""
        return None if self.fast is None else self.fast.expert_reads()

    @property
    def setup_count(self) -> int:
        """The fast path's one-time setups so far (``FastModel.setup_count``: vision shapes compiled / captured,
        prefill lengths captured, kernel variants compiled outside a capture); 0 without a FastModel."""
        return 0 if self.fast is None else int(self.fast.setup_count)

    def _prefill(
        self, pages: Sequence[PreparedPage], features: Sequence[Tensor], lens: list[int], cache: StaticKVCache
    ) -> Tensor:
        """Left-padded prefill of every prompt into ``cache`` (empty); float32 logits [B, V] of the last column."""
        base = self.base
        dev, dtype = self.device, self.dtype
        bsz, length = len(pages), max(lens)
        pads = [length - n for n in lens]
        embeds = torch.zeros((bsz, length, base.model.embed_tokens.embedding_dim), device=dev, dtype=dtype)
        for b, (page, feats) in enumerate(zip(pages, features, strict=True)):
            e = base.embed_prompt(page.input_ids.reshape(1, -1), page.images_seq_mask.reshape(1, -1), [feats])
            embeds[b, pads[b] :] = e[0].to(dtype)
        pad_t = torch.tensor(pads, device=dev)
        cos_table, sin_table = base.model.rotary(0, max(cache.max_len, 1), dev, dtype)
        idx = torch.arange(length, device=dev)
        positions = (idx[None, :] - pad_t[:, None]).clamp_min(0)  # [B, L]: each row's own positions
        real_rows = (  # flattened (b, i) rows that hold prompt tokens; built on the host (no device sync)
            torch.tensor([b * length + i for b in range(bsz) for i in range(pads[b], length)], device=dev)
            if any(pads)
            else None
        )
        mask = padded_prefill_mask(pad_t, length, dtype)
        ctx = self._context(cos_table[positions], sin_table[positions], mask, cache, real_rows)
        hidden = self._forward(embeds, ctx)
        return self.lm.logits(hidden[:, -1])

    def prefill_page(self, page: PreparedPage, features: Tensor, cache: StaticKVCache) -> Tensor:
        """One page's prompt alone (no pads: column = position) through the model's own per-page prefill into
        ``cache`` (batch 1, length 0); float32 logits [1, V] of its last position.  Where
        :attr:`page_prefill_graphed`, a replay of the CUDA graph the fast path keeps per (prompt length, cache): the
        first call per pair captures it, so a caller that keeps one cache per length pays one capture a length."""
        embeds = self.base.embed_prompt(page.input_ids.reshape(1, -1), page.images_seq_mask.reshape(1, -1), [features])
        return self.lm.prefill(embeds.to(self.dtype), cache)

    def page_caches(self) -> PageCaches:
        """The batch-1 caches kept per prompt length for refills prefilled page by page (made on first use, kept
        across runs with their prefill graphs, as many lengths as the model keeps graphs)."""
        if self._page_caches is None:
            self._page_caches = PageCaches(self.page_prefill_graphs)
        return self._page_caches

    @property
    def page_prefill_graphed(self) -> bool:
        """Whether :meth:`prefill_page` replays a CUDA graph (the fast path's ``prefill_graphs``, on CUDA)."""
        return self.fast is not None and self.fast.prefill_graphs_on(self.device)

    @property
    def page_prefill_graphs(self) -> int:
        """How many (prompt length, cache) prefill graphs the fast path keeps (least recently used dropped first): the
        number of prompt lengths whose caches the per-page refills keep, graphed or not."""
        return FastModel.MAX_PREFILL_GRAPHS if self.fast is None else self.fast.MAX_PREFILL_GRAPHS

    def _decode_host(
        self,
        pages: Sequence[PreparedPage],
        logits: Tensor,
        lens: list[int],
        caps: list[int],
        ngrams: list[int],
        eos: int | None,
        keep_logits: bool,
        cache: StaticKVCache,
        marks: StageMarks,
    ) -> BatchResult:
        """The host-driven loop: host tensors per step, mask sliced to the length, token chosen on the host."""
        base = self.base
        dev, dtype = self.device, self.dtype
        bsz, length, max_len = len(pages), max(lens), cache.max_len
        clock = marks.clock
        histories = [[int(t) for t in p.input_ids.reshape(-1).tolist()] for p in pages]
        tokens: list[list[int]] = [[] for _ in range(bsz)]
        kept: list[list[Tensor]] | None = [[] for _ in range(bsz)] if keep_logits else None
        done = [False] * bsz
        by_eos = [False] * bsz
        last = [0] * bsz
        self._choose(logits, histories, ngrams, done, tokens, kept, last, by_eos, eos, caps)
        t_prefill = clock.mark()

        # ---- decode: same slot for all, own position per sequence
        pad_t = torch.tensor([length - n for n in lens], device=dev)
        lens_t = torch.tensor(lens, device=dev)
        cos_table, sin_table = base.model.rotary(0, max(max_len, 1), dev, dtype)
        zero = torch.zeros((), device=dev, dtype=dtype)
        ninf = torch.full((), float("-inf"), device=dev, dtype=dtype)
        key_bias = torch.where(torch.arange(max_len, device=dev)[None, :] >= pad_t[:, None], zero, ninf)  # [B, N]
        step_marks: list[object] = [t_prefill]
        step = 0
        active_rows: Tensor | None = None
        active_for: list[bool] = [False] * bsz
        while not all(done):
            slot = length + step
            if done != active_for:  # rebuild the live-row index only when a sequence finished
                active_for = list(done)
                live = [b for b in range(bsz) if not done[b]]
                active_rows = None if len(live) == bsz else torch.tensor(live, device=dev)
            pos = lens_t + step  # [B]
            cos, sin = cos_table[pos][:, None, :], sin_table[pos][:, None, :]  # [B, 1, D]
            feed = torch.tensor(last, device=dev, dtype=torch.long).view(bsz, 1)
            mask = key_bias[:, None, None, : slot + 1]
            hidden = self._forward(base.model.embed_tokens(feed), self._context(cos, sin, mask, cache, active_rows))
            logits = self.lm.logits(hidden[:, -1])
            self._choose(logits, histories, ngrams, done, tokens, kept, last, by_eos, eos, caps)
            step_marks.append(clock.mark())
            step += 1

        clock.synchronize()
        return marks.result(
            tokens=tokens,
            stopped_by_eos=by_eos,
            lens=lens,
            t_prefill=t_prefill,
            step_marks=step_marks,
            logits=kept,
            decode_path="host",
        )

    def _decode_static(
        self,
        static: StaticBatchStep,
        logits: Tensor,
        lens: list[int],
        caps: list[int],
        eos: int | None,
        marks: StageMarks,
    ) -> BatchResult:
        """The static step: first token and state on the device, one (graphed) step per token, eos checks
        every ``check_every`` steps, one read-back at the end."""
        clock = marks.clock
        first = static.first_token(logits, max(lens))  # [B, 1], first index on ties like the host's argmax
        static.load(first, lens, caps, eos)
        reads_before = self.expert_reads()  # a device copy (one small kernel, at the end of the prefill), no sync
        t_prefill = clock.mark()
        n_steps = max(caps) - 1  # the run's decode steps (a kept, longer cache holds more slots: masked)
        capture_s = 0.0
        t_decode = t_prefill
        if n_steps > 0 and static.use_graph and static.graph is None:
            capture_s = static.capture()
            if static.capture_error is not None:  # this model's step cannot be captured: later runs go un-graphed
                self.capture_error = static.capture_error  # (decode_path_for), as continuous batching's do
            static.load(first, lens, caps, eos)  # the capture's warm-up steps advanced the state
            t_decode = clock.mark()

        step_marks: list[object] = [t_decode]
        steps = 0
        # Without eos only the caps end rows, and the longest cap ends exactly at n_steps: never check.
        check = eos is not None
        while steps < n_steps:
            static.step()
            step_marks.append(clock.mark())
            steps += 1
            if check and steps % self.check_every == 0 and steps < n_steps and bool(static.done.all()):
                break
        static.cache.advance(steps)  # host bookkeeping only: the step wrote slots length .. length + steps - 1

        clock.synchronize()
        n_gen = static.n_gen.tolist()
        out = static.out.tolist()
        tokens = [row[:n] for row, n in zip(out, n_gen, strict=True)]
        busy = max(n_gen) - 1  # steps that produced a token for some sequence
        read, grouped = routed_experts_read(reads_before, self.expert_reads())
        res = marks.result(
            tokens=tokens,
            stopped_by_eos=[bool(x) for x in static.by_eos.tolist()],
            lens=lens,
            t_prefill=t_prefill,
            step_marks=step_marks,
            logits=None,
            decode_path="graph" if static.use_graph else "static",
            graph_capture_s=capture_s,
            idle_steps=steps - busy,
            graph_capture_error=static.capture_error,
        )
        return attrs.evolve(
            res, routed_experts_read=read, grouped_steps=grouped, finished_rows_attend=not static.skip_keys
        )

    @staticmethod
    def _choose(
        logits: Tensor,
        histories: list[list[int]],
        ngrams: list[int],
        done: list[bool],
        tokens: list[list[int]],
        kept: list[list[Tensor]] | None,
        last: list[int],
        by_eos: list[bool],
        eos: int | None,
        caps: list[int],
    ) -> None:
        """Greedy token per live sequence (host side, ``select_next_token`` semantics); updates state in place."""
        greedy = logits.argmax(dim=-1).tolist()  # one transfer for the whole batch
        host = logits.cpu() if kept is not None else None
        for b, token in enumerate(greedy):
            if done[b]:
                continue
            token = int(token)
            if ngrams[b]:
                banned = banned_ngram_tokens(histories[b], ngrams[b])
                if token in banned:
                    row = logits[b].index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))
                    token = int(torch.argmax(row).item())
            if kept is not None and host is not None:
                kept[b].append(host[b].clone())
            tokens[b].append(token)
            histories[b].append(token)
            last[b] = token
            if eos is not None and token == eos:
                done[b] = by_eos[b] = True
            elif len(tokens[b]) >= caps[b]:
                done[b] = True


def _per_sequence(value: int | Sequence[int], bsz: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [int(value)] * bsz
    values = [int(v) for v in value]
    if len(values) != bsz:
        raise ConfigError(f"{name} has {len(values)} values for a batch of {bsz}")
    return values
