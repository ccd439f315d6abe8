"""Batched inference for the native DeepSeek-OCR: several pages per forward in vision, prefill and decode.

``BatchedGenerator(model).run(pages, max_new_tokens, eos_token_id=...)`` takes pages from
:func:`~llm_perf_opt.models.deepseek_ocr.preprocess.preprocess_page` and returns a :class:`BatchResult`
(per-sequence tokens, eos flags, stage times and throughput).  Nothing in the existing modules changes:
the decoder forward here is its own per-layer loop over the existing module weights (or, in the static
decode step, over a :class:`~llm_perf_opt.models.deepseek_ocr.fast.FastModel`'s fused layer weights).

* **Vision** — views of the same pixel size are batched across pages: all tiles of all pages in one
  SAM → CLIP → projector pass (the three modules are called as modules, so forward hooks fire once per
  pass), all global views in another (``vision_batch`` caps views per pass).  Each page's features are
  then laid out exactly as :meth:`DeepseekOCRForCausalLM.encode_images` lays them out (tile grid with
  ``image_newline`` per row, global view with newlines, ``view_seperator``).
* **Prefill** — prompts are LEFT-padded to the longest length ``L`` (``pad_b = L − len_b``) and run in
  one decoder forward over ``[B, L]``.  RoPE positions are per sequence (``index − pad_b``), the additive
  mask is causal and hides pad keys.  A pad query row attends only to itself (so no row is fully masked
  and no NaN appears); pad rows skip the MLP/MoE and their outputs are never read.  Because every prompt
  ends at column ``L − 1``, the first token of every sequence comes from that column.
* **Decode** — one forward per step for the whole batch: every sequence writes its K/V at the same cache
  slot ``L + step`` but is rotated at its own position ``len_b + step``; pad keys stay masked.  Two loops:

  - the **static step** (``decode_path`` "graph" on CUDA, "static" un-graphed elsewhere; used when no
    sequence asks for no_repeat_ngram and ``keep_logits`` is False): every input lives in a static device
    buffer (tokens [B, 1], per-row rotary position [B], the cache slot, per-row pad offsets), the additive
    key mask is built on the device from slot and pads over the cache's whole ``max_len``, K/V are written
    at the slot with ``index_copy_``, the token is chosen on the device
    (:func:`~llm_perf_opt.models.deepseek_ocr.fast.first_argmax`) and per-row done flags, counts and an
    output buffer [B, max_len] are updated on the device.  Shapes never change, so on CUDA the step is
    captured once per (batch, cache ``max_len``) as a CUDA graph and replayed; the graph and its KV cache are
    kept by the generator and reused by the next run of the same shape.  The host reads ``done.all()`` every
    ``check_every`` steps only (never without eos: the caps alone end the loop, at a known step), so up to
    ``check_every − 1`` steps may run after the last sequence finished (``BatchResult.idle_steps``; their
    tokens are not recorded).  Finished sequences keep feeding their last
    token and keep running **through the MLP/MoE too** (static shapes): their outputs are ignored, and
    routing statistics (``MoE.tokens_per_expert`` with eager experts, ``last_topk_idx``) include them.
    With a :class:`~llm_perf_opt.models.deepseek_ocr.fast.FastModel` the step uses its fused / grouped
    layer weights (``FastModel.layers``: fused QKV and gate/up, stacked experts; its ``decode_attention``);
    its device routing counters are not fed (``counts=None``), as in the host loop.
  - the **host loop** (``decode_path`` "host"; with no_repeat_ngram, ``keep_logits`` or
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

Timing: :class:`~llm_perf_opt.profiling.timers.DeviceClock` marks (CUDA events on CUDA, the host clock
on CPU) around vision, prefill (embedding + decoder + first token) and every decode step (recorded between
graph replays, no sync), resolved once at the end of :meth:`BatchedGenerator.run`.  A one-time CUDA-graph
capture is timed apart (``BatchResult.graph_capture_s``) and is in none of the stage times.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_perf_opt.errors import ConfigError, InputError
from llm_perf_opt.models.deepseek_ocr.decoder import (
    EXPERT_IMPLS,
    MLP,
    DecoderLayer,
    MoE,
    apply_experts_eager,
    apply_rotary,
)
from llm_perf_opt.models.deepseek_ocr.fast import VISION_SDPA, FastModel, capture_graph, first_argmax
from llm_perf_opt.models.deepseek_ocr.generation import banned_ngram_tokens
from llm_perf_opt.models.deepseek_ocr.kv_cache import StaticKVCache
from llm_perf_opt.models.deepseek_ocr.model import DeepseekOCRForCausalLM, parse_spatial_crop
from llm_perf_opt.models.deepseek_ocr.preprocess import PreparedPage
from llm_perf_opt.profiling.timers import DeviceClock

__all__ = ["BatchResult", "BatchedGenerator", "layout_page_features"]


# --------------------------------------------------------------------------------------------- result
@attrs.frozen
class BatchResult:
    """Tokens and timings of one batched run; throughput properties are derived from the stage times.

    ``tokens[b]`` are sequence b's generated ids (eos included when it stopped it); ``logits[b][i]`` (only
    with ``keep_logits``) the float32 host row that chose ``tokens[b][i]`` (row 0 from the prefill).
    ``step_ms[s]`` is decode step s (which produced token s + 1 of every sequence still running); the last
    ``idle_steps`` entries are steps the static loop ran after every sequence had finished (it checks only
    every ``check_every`` steps), which produced no token but did cost time, so they are in ``decode_s``.
    ``decode_path`` says which decode loop ran: "graph" (static step replayed from a CUDA graph), "static"
    (the same step un-graphed: CPU, ``cuda_graphs=False``, experts that sync, or a failed capture) or "host"
    (host-driven loop).  ``graph_capture_s`` is the host wall time of this run's one-time graph capture
    (warm-up steps + capture, synchronised), 0.0 when the graph was reused or none was captured; it is in
    none of the stage times (``total_s`` excludes it).
    """

    tokens: list[list[int]]
    stopped_by_eos: list[bool]
    prompt_lens: list[int]
    padded_len: int
    vision_s: float
    prefill_s: float
    decode_s: float
    step_ms: list[float]
    logits: list[list[Tensor]] | None = None
    decode_path: str = "host"
    graph_capture_s: float = 0.0
    idle_steps: int = 0

    @property
    def batch(self) -> int:
        return len(self.tokens)

    @property
    def total_s(self) -> float:
        """Vision + prefill + decode (first mark to last mark)."""
        return self.vision_s + self.prefill_s + self.decode_s

    @property
    def output_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def pages_per_s(self) -> float:
        return self.batch / self.total_s if self.total_s > 0 else math.inf

    @property
    def output_tok_per_s(self) -> float:
        """All generated tokens (first tokens included) over the whole run's time."""
        return self.output_tokens / self.total_s if self.total_s > 0 else math.inf

    @property
    def decode_tok_per_s(self) -> float:
        """Tokens produced by decode steps (not the prefill's first tokens) over decode time."""
        n = sum(max(len(t) - 1, 0) for t in self.tokens)
        return n / self.decode_s if self.decode_s > 0 else math.inf

    @property
    def ttft_s(self) -> float:
        """Time to first token, the same for every sequence of the batch: vision + prefill."""
        return self.vision_s + self.prefill_s

    @property
    def tpot_ms(self) -> list[float]:
        """Per sequence: mean decode-step time over the steps that produced its tokens after the first
        (NaN for a sequence with a single token)."""
        out: list[float] = []
        for toks in self.tokens:
            steps = self.step_ms[: len(toks) - 1]
            out.append(sum(steps) / len(steps) if steps else math.nan)
        return out

    @property
    def step_ms_p50(self) -> float:
        return statistics.median(self.step_ms) if self.step_ms else math.nan


# --------------------------------------------------------------------------------------------- layout
def layout_page_features(
    local: Tensor | None, glob: Tensor, grid: tuple[int, int], newline: Tensor, separator: Tensor
) -> Tensor:
    """One page's features in sequence order, exactly as ``encode_images`` lays them out -> [n, hidden].

    ``local`` [grid_w·grid_h, q², hidden] (tiles row-major; None without tiles), ``glob`` [1, q_b², hidden].
    """
    grid_w, grid_h = grid
    hidden = glob.shape[-1]
    parts: list[Tensor] = []
    if local is not None:
        q = _side(local.shape[1], "a tile")
        tiles = local.view(grid_h, grid_w, q, q, hidden).permute(0, 2, 1, 3, 4).reshape(grid_h * q, grid_w * q, hidden)
        tiles = torch.cat([tiles, newline.expand(grid_h * q, 1, hidden)], dim=1)
        parts.append(tiles.reshape(-1, hidden))
    q_b = _side(glob.shape[1], "the global view")
    g = torch.cat([glob.reshape(q_b, q_b, hidden), newline.expand(q_b, 1, hidden)], dim=1)
    parts.append(g.reshape(-1, hidden))
    parts.append(separator[None, :])
    return torch.cat(parts, dim=0)


def _side(tokens: int, what: str) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise InputError(f"{what} produced {tokens} tokens per view, not a square grid")
    return side


# --------------------------------------------------------------------------------------------- generator
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
    the run allows it (no no_repeat_ngram, no ``keep_logits``); False always runs the host loop.
    ``cuda_graphs`` (default True; effective only on CUDA, and only when the experts need no host sync, i.e.
    not ``"eager"``) replays that step from a CUDA graph captured on the first run of a (batch, cache
    length) shape; the generator keeps that graph and its KV cache (one shape at a time: a new shape frees
    the old one first; :meth:`release_decode_state` frees it explicitly).  ``check_every``: steps between
    the host's ``done.all()`` checks (each check is one device sync; none when eos is off).
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
        self.layers: list[DecoderLayer] = [m for m in self.base.model.layers if isinstance(m, DecoderLayer)]
        self._static: _StaticDecode | None = None  # the last static-step shape: its cache, buffers and graph
        self.capture_error: str | None = None  # why a CUDA-graph capture failed (then the step runs un-graphed)

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    # ------------------------------------------------------------------ vision
    @contextlib.contextmanager
    def _vision_context(self) -> Iterator[None]:
        base = self.base
        if self.fast is None:
            with base._sdpa_policy():
                yield
            return
        saved = base.sdpa_backends
        if VISION_SDPA[self.fast.fast_config.vision_sdpa] is not None:
            base.sdpa_backends = None  # the fast path's vision policy decides, as in FastModel.encode_images
        try:
            with self.fast._vision_policy(), self.fast.vision_mode(), base._sdpa_policy():
                yield
        finally:
            base.sdpa_backends = saved

    def _encode_views(self, pixels: Tensor) -> Tensor:
        """SAM → CLIP(SAM features) → projector for same-size views -> [n, h·w, hidden] (as the model does)."""
        m = self.base.model
        outs: list[Tensor] = []
        step = pixels.shape[0] if self.vision_batch is None else self.vision_batch
        for begin in range(0, pixels.shape[0], step):
            chunk = pixels[begin : begin + step]
            sam = m.sam_model(chunk)
            clip = m.vision_model(chunk, sam)
            feats = torch.cat((clip[:, 1:], sam.flatten(2).permute(0, 2, 1)), dim=-1)
            outs.append(m.projector(feats))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @torch.no_grad()
    def encode_pages(self, pages: Sequence[PreparedPage]) -> list[Tensor]:
        """Every page's image features ([n_image_tokens, hidden] each, as ``encode_images`` returns them),
        with the views of all pages grouped by pixel size into batched vision calls (tiles before globals)."""
        dev, dtype = self.device, self.dtype
        grids: list[tuple[int, int]] = []
        # group key (H, W) -> list of (page index, kind, tensor); dict order = first-seen order
        groups: dict[tuple[str, int, int], list[tuple[int, Tensor]]] = {}
        for i, page in enumerate(pages):
            grid = parse_spatial_crop(page.images_spatial_crop)
            grids.append(grid)
            ori = page.images_ori
            if ori.dim() != 4 or ori.shape[0] != 1:
                raise InputError(f"page {i}: images_ori must be [1, 3, H, W], got {tuple(ori.shape)}")
            if grid != (1, 1):
                crops = page.images_crop
                n_tiles = grid[0] * grid[1]
                if crops.dim() != 4 or crops.shape[0] != n_tiles:
                    raise InputError(
                        f"page {i}: crop grid {grid[0]}x{grid[1]} needs {n_tiles} tiles, "
                        f"images_crop has shape {tuple(crops.shape)}"
                    )
                groups.setdefault(("tile", int(crops.shape[2]), int(crops.shape[3])), []).append((i, crops))
            groups.setdefault(("global", int(ori.shape[2]), int(ori.shape[3])), []).append((i, ori))
        groups = dict(sorted(groups.items(), key=lambda kv: kv[0][0] != "tile"))  # tiles first, then globals

        local: list[Tensor | None] = [None] * len(pages)
        glob: list[Tensor | None] = [None] * len(pages)
        with self._vision_context():
            for (kind, _, _), members in groups.items():
                pixels = torch.cat([t for _, t in members]).to(device=dev, dtype=dtype)
                feats = self._encode_views(pixels)
                begin = 0
                for i, t in members:
                    n = int(t.shape[0])
                    (local if kind == "tile" else glob)[i] = feats[begin : begin + n]
                    begin += n

        m = self.base.model
        newline = m.image_newline.to(dtype)
        separator = m.view_seperator.to(dtype)
        out: list[Tensor] = []
        for i, grid in enumerate(grids):
            g = glob[i]
            assert g is not None
            out.append(layout_page_features(local[i], g, grid, newline, separator))
        return out

    # ------------------------------------------------------------------ decoder
    def _expert_fn(self, moe: MoE) -> Any:
        return EXPERT_IMPLS[self.expert_impl or moe.expert_impl]

    def _moe(self, moe: MoE, flat: Tensor) -> Tensor:
        topk_idx, topk_weight = moe.route(moe.gate(flat))
        routed, counts = self._expert_fn(moe)(flat, topk_idx, topk_weight, moe.experts)
        moe.last_topk_idx = topk_idx.detach()
        for expert_id, count in enumerate(counts):
            if count:
                moe.tokens_per_expert[expert_id] += count
        if moe.shared_experts is not None:
            routed = routed + moe.shared_experts(flat)
        out: Tensor = routed
        return out

    def _mlp(self, layer: DecoderLayer, x: Tensor, rows: Tensor | None) -> Tensor:
        """The layer's MLP / MoE on the rows ``rows`` of the flattened ``x`` [B, L, hidden] (None: all);
        other rows get zeros (pad positions, finished sequences)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        sub = flat if rows is None else flat.index_select(0, rows)
        mlp = layer.mlp
        y = self._moe(mlp, sub) if isinstance(mlp, MoE) else _dense(mlp, sub)
        if rows is None:
            return y.view(shape)
        return torch.zeros_like(flat).index_copy_(0, rows, y).view(shape)

    def _forward(
        self,
        hidden: Tensor,
        cos: Tensor,
        sin: Tensor,
        bias: Tensor,
        cache: StaticKVCache,
        rows: Tensor | None,
    ) -> Tensor:
        """Decoder over ``hidden`` [B, Lq, hidden] written at ``cache.length``; ``cos``/``sin`` [B, 1, Lq, D],
        ``bias`` additive [B, 1, Lq, cache.length + Lq].  Returns normed hidden states; advances the cache."""
        bsz, length, _ = hidden.shape
        cache.check_room(length)
        start = cache.length
        for layer in self.layers:
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            h, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
            q = apply_rotary(attn.q_proj(x).view(bsz, length, h, d).transpose(1, 2), cos, sin)
            k = apply_rotary(attn.k_proj(x).view(bsz, length, kvh, d).transpose(1, 2), cos, sin)
            v = attn.v_proj(x).view(bsz, length, kvh, d).transpose(1, 2)
            k_all, v_all = cache.write(layer.layer_idx, k, v, start)
            if kvh != h:
                k_all = k_all.repeat_interleave(h // kvh, dim=1)
                v_all = v_all.repeat_interleave(h // kvh, dim=1)
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=bias)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(bsz, length, h * d))
            hidden = hidden + self._mlp(layer, layer.post_attention_layernorm(hidden), rows)
        cache.advance(length)
        out_hidden: Tensor = self.base.model.norm(hidden)
        return out_hidden

    def _logits(self, hidden: Tensor) -> Tensor:
        out: Tensor = self.base.lm_head(hidden)
        return out.float()

    # ------------------------------------------------------------------ decode path
    def graph_safe(self) -> bool:
        """Whether the static step has no host sync, so it can be captured: every MoE layer's routed experts
        run on the device only (not ``"eager"``, whose expert loop reads the routing on the host)."""
        if self.fast is not None:
            return all(
                layer.moe is None or (layer.grouped and layer.expert_fn is not apply_experts_eager)
                for layer in self.fast.layers
            )
        return all(
            not isinstance(layer.mlp, MoE) or self._expert_fn(layer.mlp) is not apply_experts_eager
            for layer in self.layers
        )

    def decode_path_for(self, ngrams: Sequence[int], keep_logits: bool) -> str:
        """The decode loop a run with these options takes: "graph", "static" or "host" (see the class doc)."""
        if not self.static_decode or keep_logits or any(ngrams):
            return "host"
        if self.device.type != "cuda" or not self.cuda_graphs or not self.graph_safe():
            return "static"
        if self.capture_error is not None:  # a capture failed once: this model's step cannot be captured
            return "static"
        return "graph"

    def release_decode_state(self) -> None:
        """Drop the kept static-step cache, buffers and CUDA graph (the next static run rebuilds them)."""
        self._static = None

    def _static_for(self, bsz: int, max_len: int, use_graph: bool) -> _StaticDecode:
        """The kept static step for (``bsz``, ``max_len``), built on first use of that shape.

        Keyed by batch and cache length only: the prompt length, pads and caps live in device buffers, so
        they may change between runs without a new capture.
        """
        entry = self._static
        if entry is None or entry.key != (bsz, max_len, use_graph):
            self._static = None  # free the old cache and graph pool before allocating the new ones
            entry = self._static = _StaticDecode(self, bsz, max_len, use_graph)
        return entry

    # ------------------------------------------------------------------ run
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
    ) -> BatchResult:
        """Generate greedily for every page of ``pages`` as one batch.

        ``max_new_tokens`` and ``no_repeat_ngram_size`` are one value for all sequences or one per sequence.
        With ``ignore_eos`` (or ``eos_token_id=None``) a sequence runs to its cap.  Runs under
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
        clock = DeviceClock(self.device)
        base.reset_routing_stats()

        t_start = clock.mark()
        features = self.encode_pages(pages)
        t_vision = clock.mark()

        lens = [int(p.input_ids.shape[-1]) for p in pages]
        length = max(lens)
        max_len = length + max(caps) - 1  # the last token is never fed back
        if path == "host":
            cache = base.new_cache(bsz, max_len)
        else:
            static = self._static_for(bsz, max_len, use_graph=path == "graph")
            cache = static.cache
            cache.reset()  # stale K/V past a row's position stays masked until overwritten
        logits = self._prefill(pages, features, lens, cache)
        marks = _Marks(clock, t_start, t_vision)
        if path == "host":
            return self._decode_host(pages, logits, lens, caps, ngrams, eos, keep_logits, cache, marks)
        return self._decode_static(static, logits, lens, caps, eos, marks)

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
        positions = (idx[None, :] - pad_t[:, None]).clamp_min(0)  # [B, L]
        cos, sin = cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)
        key_ok = idx[None, :] >= pad_t[:, None]  # [B, L] real (non-pad) positions
        causal = idx[:, None] >= idx[None, :]  # [L, L]
        diagonal = torch.eye(length, device=dev, dtype=torch.bool)  # a pad query sees itself: no all-masked row
        allowed = causal[None] & (key_ok[:, None, :] | diagonal[None])  # [B, L, L]
        zero = torch.zeros((), device=dev, dtype=dtype)
        ninf = torch.full((), float("-inf"), device=dev, dtype=dtype)
        bias = torch.where(allowed, zero, ninf).unsqueeze(1)  # [B, 1, L, L]
        real_rows = (  # flattened (b, i) rows that hold prompt tokens; built on the host (no device sync)
            torch.tensor([b * length + i for b in range(bsz) for i in range(pads[b], length)], device=dev)
            if any(pads)
            else None
        )
        with base._sdpa_policy():
            hidden = self._forward(embeds, cos, sin, bias, cache, real_rows)
        return self._logits(hidden[:, -1])

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
        marks: _Marks,
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
            cos, sin = cos_table[pos][:, None, None, :], sin_table[pos][:, None, None, :]
            feed = torch.tensor(last, device=dev, dtype=torch.long).view(bsz, 1)
            hidden = base.model.embed_tokens(feed)
            with base._sdpa_policy():
                hidden = self._forward(hidden, cos, sin, key_bias[:, None, None, : slot + 1], cache, active_rows)
            logits = self._logits(hidden[:, -1])
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
        static: _StaticDecode,
        logits: Tensor,
        lens: list[int],
        caps: list[int],
        eos: int | None,
        marks: _Marks,
    ) -> BatchResult:
        """The static step: first token and state on the device, one (graphed) step per token, eos checks
        every ``check_every`` steps, one read-back at the end."""
        clock = marks.clock
        first = first_argmax(logits)  # [B, 1], first index on ties like the host's argmax
        static.load(first, lens, caps, eos)
        t_prefill = clock.mark()
        n_steps = max(caps) - 1  # the cache holds exactly this many decode slots
        capture_s = 0.0
        t_decode = t_prefill
        if n_steps > 0 and static.use_graph and static.graph is None:
            capture_s = static.capture()
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
        return marks.result(
            tokens=tokens,
            stopped_by_eos=[bool(x) for x in static.by_eos.tolist()],
            lens=lens,
            t_prefill=t_prefill,
            step_marks=step_marks,
            logits=None,
            decode_path="graph" if static.use_graph else "static",
            graph_capture_s=capture_s,
            idle_steps=steps - busy,
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


# --------------------------------------------------------------------------------------------- static decode
@attrs.frozen
class _Marks:
    """A run's clock and vision marks; turns the prefill / decode marks into a :class:`BatchResult`."""

    clock: DeviceClock
    t_start: object
    t_vision: object

    def result(
        self,
        *,
        tokens: list[list[int]],
        stopped_by_eos: list[bool],
        lens: list[int],
        t_prefill: object,
        step_marks: list[object],
        logits: list[list[Tensor]] | None,
        decode_path: str,
        graph_capture_s: float = 0.0,
        idle_steps: int = 0,
    ) -> BatchResult:
        """``step_marks[0]`` opens the decode (the prefill mark, or the mark after a graph capture)."""
        c = self.clock
        return BatchResult(
            tokens=tokens,
            stopped_by_eos=stopped_by_eos,
            prompt_lens=lens,
            padded_len=max(lens),
            vision_s=c.elapsed_ms(self.t_start, self.t_vision) / 1e3,
            prefill_s=c.elapsed_ms(self.t_vision, t_prefill) / 1e3,
            decode_s=c.elapsed_ms(step_marks[0], step_marks[-1]) / 1e3,
            step_ms=c.intervals_ms(step_marks),
            logits=logits,
            decode_path=decode_path,
            graph_capture_s=graph_capture_s,
            idle_steps=idle_steps,
        )


class _StaticDecode:
    """The static decode step for one (batch, cache ``max_len``): KV cache, static device buffers, CUDA graph.

    Buffers (on the model's device, never reallocated, so a captured graph reads and writes them in place):
    ``tokens`` [B, 1] the token each row feeds; ``pos`` [B] its rotary position (``len_b + step``); ``slot``
    [1] the cache column every row writes (``L + step``); ``meta`` [3, B] caps, pads and prompt lengths;
    ``eos`` [1] (-1 when eos is off); ``done`` / ``by_eos`` [B] bool; ``n_gen`` [B] tokens recorded per row;
    ``out`` [B, max_len] the recorded tokens (row b's output is its first ``n_gen[b]`` entries).

    One step (:meth:`_body`): embed ``tokens``; cos/sin gathered at ``pos``; additive key mask [B, 1, 1,
    max_len] from ``slot`` and pads (keys ``pad_b <= j <= slot``); per layer K/V ``index_copy_`` at ``slot``
    then attention over the whole cache; MLP/MoE on every row (finished ones too: static shapes; their
    output is ignored); greedy token on the device; then :meth:`_advance` records it for live rows and
    moves ``slot`` / ``pos`` on.  Nothing in it reads a device value on the host (unless the experts are
    ``"eager"``, which is why those are never graphed).
    """

    def __init__(self, gen: BatchedGenerator, bsz: int, max_len: int, use_graph: bool) -> None:
        base = gen.base
        dev, dtype = gen.device, gen.dtype
        self.gen = gen
        self.key = (bsz, max_len, use_graph)
        self.batch = bsz
        self.cache = base.new_cache(bsz, max_len)
        self.tokens = torch.zeros((bsz, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros(bsz, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.meta = torch.zeros((3, bsz), dtype=torch.long, device=dev)
        self.caps, self.pads = self.meta[0], self.meta[1]
        self.eos = torch.full((1,), -1, dtype=torch.long, device=dev)
        self.done = torch.zeros(bsz, dtype=torch.bool, device=dev)
        self.by_eos = torch.zeros(bsz, dtype=torch.bool, device=dev)
        self.n_gen = torch.zeros(bsz, dtype=torch.long, device=dev)
        self.out = torch.zeros((bsz, max_len), dtype=torch.long, device=dev)
        self.key_pos = torch.arange(max_len, device=dev)
        self.mask_zero = torch.zeros((), dtype=dtype, device=dev)
        self.mask_neg = torch.full((), float("-inf"), dtype=dtype, device=dev)
        # positions reach at most max_len - 1; built here, outside any capture
        self.cos_table, self.sin_table = base.model.rotary(0, max_len, dev, dtype)
        fast = gen.fast
        self.matmul_attention = fast is not None and fast.fast_config.decode_attention == "matmul"
        self.use_graph = bool(use_graph) and dev.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None

    # ------------------------------------------------------------------ state
    def load(self, first: Tensor, lens: list[int], caps: list[int], eos: int | None) -> None:
        """The state after the prefill: ``first`` [B, 1] (device) recorded and fed; no host sync."""
        length = max(lens)
        meta = torch.tensor([caps, [length - n for n in lens], lens], dtype=torch.long)
        self.meta.copy_(meta, non_blocking=True)  # pageable source: staged at once, no device sync
        self.pos.copy_(self.meta[2])
        self.slot.fill_(length)
        self.eos.fill_(-1 if eos is None else int(eos))
        self.tokens.copy_(first)
        self.out.zero_()
        self.out[:, :1].copy_(first)
        self.n_gen.fill_(1)
        hit = first[:, 0] == self.eos
        self.by_eos.copy_(hit)
        self.done.copy_(hit | (self.n_gen >= self.caps))

    def _advance(self, nxt: Tensor) -> None:
        """Record ``nxt`` [B, 1] for rows still live, update done / eos flags, feed it, move slot and positions.

        A finished row keeps its last token as input and records nothing more (its column write puts back
        the value already there)."""
        live = self.done.logical_not()
        col = self.n_gen.clamp(max=self.out.shape[1] - 1).unsqueeze(1)
        self.out.scatter_(1, col, torch.where(live.unsqueeze(1), nxt, self.out.gather(1, col)))
        self.n_gen.add_(live.to(torch.long))
        hit = live & (nxt[:, 0] == self.eos)
        self.by_eos.logical_or_(hit)
        self.done.logical_or_(hit | (self.n_gen >= self.caps))
        self.tokens.copy_(torch.where(live.unsqueeze(1), nxt, self.tokens))
        self.slot.add_(1)
        self.pos.add_(1)

    # ------------------------------------------------------------------ the step
    def _attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """Write k/v [B, kvh, 1, D] at ``slot``; q [B, h, 1, D] over the whole masked cache -> [B, 1, h·D]."""
        k_all, v_all = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k_all.index_copy_(2, self.slot, k)
        v_all.index_copy_(2, self.slot, v)
        heads, kv_heads = q.shape[1], k.shape[1]
        if kv_heads != heads:
            k_all = k_all.repeat_interleave(heads // kv_heads, dim=1)
            v_all = v_all.repeat_interleave(heads // kv_heads, dim=1)
        if self.matmul_attention:  # the FastModel's decode_attention="matmul" (as FastDecoder)
            scores = torch.matmul(q, k_all.transpose(-1, -2)) * (q.shape[-1] ** -0.5) + bias
            out = torch.matmul(scores.float().softmax(dim=-1).to(q.dtype), v_all)
        else:
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=bias)
        return out.transpose(1, 2).reshape(self.batch, 1, -1)

    def _body(self) -> None:
        gen = self.gen
        m = gen.base.model
        bsz = self.batch
        hidden = m.embed_tokens(self.tokens)  # [B, 1, hidden]
        cos = self.cos_table.index_select(0, self.pos).unsqueeze(1)  # [B, 1, D]: one position per row
        sin = self.sin_table.index_select(0, self.pos).unsqueeze(1)
        keys = self.key_pos[None, :]
        allowed = (keys >= self.pads[:, None]) & (keys <= self.slot)  # [B, max_len]
        bias = torch.where(allowed, self.mask_zero, self.mask_neg)[:, None, None, :]
        if gen.fast is not None:
            for fl in gen.fast.layers:
                q, k, v = fl.qkv(fl.in_norm(hidden), cos, sin)
                hidden = hidden + fl.attn.o_proj(self._attend(fl.idx, q, k, v, bias))
                hidden = hidden + fl.mlp(fl.post_norm(hidden), None)
        else:
            cos4, sin4 = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, 1, D]
            for layer in gen.layers:
                attn = layer.self_attn
                x = layer.input_layernorm(hidden)
                h, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
                q = apply_rotary(attn.q_proj(x).view(bsz, 1, h, d).transpose(1, 2), cos4, sin4)
                k = apply_rotary(attn.k_proj(x).view(bsz, 1, kvh, d).transpose(1, 2), cos4, sin4)
                v = attn.v_proj(x).view(bsz, 1, kvh, d).transpose(1, 2)
                hidden = hidden + attn.o_proj(self._attend(layer.layer_idx, q, k, v, bias))
                hidden = hidden + gen._mlp(layer, layer.post_attention_layernorm(hidden), None)
        logits = gen._logits(m.norm(hidden)[:, -1])
        self._advance(first_argmax(logits))

    def step(self) -> None:
        """One decode step for every row: a graph replay, or the same ops launched eagerly."""
        if self.graph is not None:
            self.graph.replay()
            return
        with self.gen.base._sdpa_policy():
            self._body()

    def capture(self) -> float:
        """Capture the step as a CUDA graph; host seconds it took (synchronised before and after).

        Two eager warm-up steps on a side stream first (cuBLAS handles, lazy inits, expert stacks); they
        advance the state and write K/V at slots ``L`` and ``L + 1``, so the caller reloads the state (the
        slots are rewritten by the real steps before any row reads them).  A capture that raises leaves the
        step un-graphed: the error is kept in ``BatchedGenerator.capture_error`` and warned about.
        """
        dev = self.cache.device
        torch.cuda.synchronize(dev)
        begin = time.perf_counter()
        try:
            self.graph, _ = capture_graph(self._body, dev, self.gen.base._sdpa_policy)
        except RuntimeError as exc:  # an op that cannot be captured: run the same step un-graphed, say why
            self.gen.capture_error = f"{type(exc).__name__}: {exc}"
            self.use_graph = False
            warnings.warn(f"batched decode CUDA graph capture failed, decoding un-graphed ({exc})", stacklevel=3)
        torch.cuda.synchronize(dev)
        return time.perf_counter() - begin


def _dense(mlp: nn.Module, x: Tensor) -> Tensor:
    assert isinstance(mlp, MLP)
    out: Tensor = mlp(x)
    return out


def _per_sequence(value: int | Sequence[int], bsz: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [int(value)] * bsz
    values = [int(v) for v in value]
    if len(values) != bsz:
        raise ConfigError(f"{name} has {len(values)} values for a batch of {bsz}")
    return values
