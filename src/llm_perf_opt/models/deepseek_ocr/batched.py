"""Batched inference for the native DeepSeek-OCR: several pages per forward in vision, prefill and decode.

``BatchedGenerator(model).run(pages, max_new_tokens, eos_token_id=...)`` takes pages from
:func:`~llm_perf_opt.models.deepseek_ocr.preprocess.preprocess_page` and returns a :class:`BatchResult`
(per-sequence tokens, eos flags, stage times and throughput).  Nothing in the existing modules changes:
the decoder forward here is its own per-layer loop over the existing module weights.

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
  slot ``L + step`` but is rotated at its own position ``len_b + step``; pad keys stay masked.  Finished
  sequences (eos, or their own ``max_new_tokens`` cap) are **not compacted**: they keep running with
  their last token (their attention still runs, their logits are ignored) so shapes stay static, but
  they skip the MLP/MoE (fewer tokens through the experts, and routing statistics count live tokens
  only).  The loop ends when every sequence has finished.
* **Token choice** — greedy on the host like :func:`~llm_perf_opt.models.deepseek_ocr.generation.select_next_token`
  (temperature 0): one device argmax for all rows (first index on ties), and per sequence the optional
  no-repeat-ngram rule over its own history (prompt ids + generated tokens).

Exactness: the same function as the single-page eager path (``encode_images`` / ``embed_prompt`` /
``prefill`` / ``decode_step``) computed on bigger batches with masked attention over padded keys, so
logits agree to float rounding (fp32: ~1e-6 relative), not bit for bit; greedy tokens match unless two
logits tie within rounding.

Timing: :class:`~llm_perf_opt.profiling.timers.DeviceClock` marks (CUDA events on CUDA, the host clock
on CPU) around vision, prefill (embedding + decoder + first token) and every decode step, resolved once
at the end of :meth:`BatchedGenerator.run`.
"""

from __future__ import annotations

import contextlib
import math
import statistics
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
    apply_rotary,
)
from llm_perf_opt.models.deepseek_ocr.fast import VISION_SDPA, FastModel
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
    ``step_ms[s]`` is decode step s (which produced token s + 1 of every sequence still running).
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
    its fast vision mode; the decoder loop uses the wrapped model's modules, whose weights the fast path
    re-points to its fused storage, so the values are the same).  ``expert_impl``: a key of
    ``decoder.EXPERT_IMPLS`` for the routed experts (default: each MoE layer's own ``expert_impl``, or the
    FastModel's when it groups experts).  ``vision_batch``: at most this many views per SAM/CLIP/projector
    call (None: all views of one size in a single call).
    """

    def __init__(
        self,
        model: DeepseekOCRForCausalLM | FastModel,
        *,
        expert_impl: str | None = None,
        vision_batch: int | None = None,
    ) -> None:
        self.fast: FastModel | None = model if isinstance(model, FastModel) else None
        self.base: DeepseekOCRForCausalLM = model.base if isinstance(model, FastModel) else model
        if expert_impl is None and self.fast is not None and self.fast.fast_config.grouped_moe:
            expert_impl = self.fast.fast_config.expert_impl
        if expert_impl is not None and expert_impl not in EXPERT_IMPLS:
            raise ConfigError(f"unknown expert_impl {expert_impl!r}", hint=f"use one of {sorted(EXPERT_IMPLS)}")
        if vision_batch is not None and vision_batch < 1:
            raise ConfigError(f"vision_batch must be >= 1 or None, got {vision_batch}")
        self.expert_impl = expert_impl
        self.vision_batch = vision_batch
        self.layers: list[DecoderLayer] = [m for m in self.base.model.layers if isinstance(m, DecoderLayer)]

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

    # ------------------------------------------------------------------ run
    @torch.no_grad()
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
        With ``ignore_eos`` (or ``eos_token_id=None``) a sequence runs to its cap.
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
        base = self.base
        dev, dtype = self.device, self.dtype
        clock = DeviceClock(dev)
        base.reset_routing_stats()

        t_start = clock.mark()
        features = self.encode_pages(pages)
        t_vision = clock.mark()

        # ---- prefill: left-padded batch
        lens = [int(p.input_ids.shape[-1]) for p in pages]
        length = max(lens)
        pads = [length - n for n in lens]
        max_len = length + max(caps) - 1  # the last token is never fed back
        embeds = torch.zeros((bsz, length, base.model.embed_tokens.embedding_dim), device=dev, dtype=dtype)
        for b, (page, feats) in enumerate(zip(pages, features, strict=True)):
            e = base.embed_prompt(page.input_ids.reshape(1, -1), page.images_seq_mask.reshape(1, -1), [feats])
            embeds[b, pads[b] :] = e[0].to(dtype)
        pad_t = torch.tensor(pads, device=dev)
        lens_t = torch.tensor(lens, device=dev)
        cos_table, sin_table = base.model.rotary(0, max(max_len, 1), dev, dtype)
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

        cache = base.new_cache(bsz, max_len)
        with base._sdpa_policy():
            hidden = self._forward(embeds, cos, sin, bias, cache, real_rows)
        logits = self._logits(hidden[:, -1])

        histories = [[int(t) for t in p.input_ids.reshape(-1).tolist()] for p in pages]
        tokens: list[list[int]] = [[] for _ in range(bsz)]
        kept: list[list[Tensor]] | None = [[] for _ in range(bsz)] if keep_logits else None
        done = [False] * bsz
        by_eos = [False] * bsz
        last = [0] * bsz
        self._choose(logits, histories, ngrams, done, tokens, kept, last, by_eos, eos, caps)
        t_prefill = clock.mark()

        # ---- decode: same slot for all, own position per sequence
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
        return BatchResult(
            tokens=tokens,
            stopped_by_eos=by_eos,
            prompt_lens=lens,
            padded_len=length,
            vision_s=clock.elapsed_ms(t_start, t_vision) / 1e3,
            prefill_s=clock.elapsed_ms(t_vision, t_prefill) / 1e3,
            decode_s=clock.elapsed_ms(t_prefill, step_marks[-1]) / 1e3,
            step_ms=clock.intervals_ms(step_marks),
            logits=kept,
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
