"""Assembly of the native DeepSeek-OCR model and its inference API.

The module tree mirrors the released checkpoint (``model.sam_model``, ``model.vision_model``,
``model.projector``, ``model.image_newline``, ``model.view_seperator`` [sic], ``model.embed_tokens``,
``model.layers.N``, ``model.norm``, ``lm_head``) so weights load by name with no remapping.

Inference is split into the stages the profiler times separately instead of one opaque ``forward``:

1. :meth:`DeepseekOCRForCausalLM.encode_images` — one page's views through SAM → CLIP → projector
   (each a separate module call, so forward hooks on the three modules fire: crops batched in one
   call, then the global view), laid out with ``image_newline`` / ``view_seperator`` tokens;
2. :meth:`~DeepseekOCRForCausalLM.embed_prompt` — token embeddings with the image features scattered
   into the image-token positions;
3. :meth:`~DeepseekOCRForCausalLM.prefill` — the decoder over the prompt, filling a
   :class:`StaticKVCache`; ``lm_head`` runs only where logits are needed (default: last position);
4. :meth:`~DeepseekOCRForCausalLM.decode_step` — one token per forward on the cache.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from llm_perf_opt.errors import InputError, ModelLoadError
from llm_perf_opt.models.deepseek_ocr.clip import ClipVisionTower
from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig
from llm_perf_opt.models.deepseek_ocr.context import ForwardContext
from llm_perf_opt.models.deepseek_ocr.decoder import DecoderLayer, MoE, RMSNorm, RotaryEmbedding, run_decoder
from llm_perf_opt.models.deepseek_ocr.kv_cache import StaticKVCache
from llm_perf_opt.models.deepseek_ocr.projector import LinearProjector
from llm_perf_opt.models.deepseek_ocr.sam import SamEncoder

__all__ = [
    "DeepseekOCRForCausalLM",
    "DeepseekOCRModel",
    "layout_page_features",
    "num_image_tokens",
    "parse_spatial_crop",
]

LOGITS_POSITIONS = ("last", "all")

# cuDNN's SDPA backend builds (and caches) an execution plan per input shape.  Every decode step has a new
# KV length and every page a new prompt length, so it re-plans on every call: ~5 ms of host time per layer
# call on an H100 with torch 2.11, which turned a ~10 ms decode step into ~95 ms.  Flash / memory-efficient /
# math kernels have no per-shape setup, so the model restricts SDPA to them (set ``sdpa_backends = None``
# on the model to let PyTorch choose freely).
DEFAULT_SDPA_BACKENDS: tuple[SDPBackend, ...] = (
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)


def parse_spatial_crop(images_spatial_crop: Tensor | Sequence[int] | Sequence[Sequence[int]]) -> tuple[int, int]:
    """Read one page's crop grid as ``(grid_w, grid_h)`` from a [2] / [1, 2] tensor or a (nested) sequence."""
    try:
        values = [int(v) for v in torch.as_tensor(images_spatial_crop).reshape(-1).tolist()]
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"images_spatial_crop is not a [grid_w, grid_h] pair: {images_spatial_crop!r}") from exc
    if len(values) != 2 or min(values) < 1:
        raise InputError(
            f"images_spatial_crop must be one page's [grid_w, grid_h] (both >= 1), got {values}",
            hint="encode_images takes one page at a time",
        )
    return values[0], values[1]


def num_image_tokens(
    cfg: DeepseekOCRConfig,
    grid_w: int = 1,
    grid_h: int = 1,
    base_size: int | None = None,
    image_size: int | None = None,
) -> int:
    """Image-token count of one page: global view ``q_b·(q_b+1) + 1`` plus ``(g_h·q)·(g_w·q + 1)`` for tiles.

    ``q_b``/``q`` are tokens per side of the global view (``base_size``) and of a tile (``image_size``):
    ceil(size / patch / 4); both default to the config's.  A 1×1 grid means no tiles.  The prompt length
    is this plus the text tokens (1 bos + 9 for the default markdown prompt).
    """
    per = cfg.sam.patch_size * 4
    q_b = math.ceil((base_size or cfg.base_size) / per)
    count = q_b * (q_b + 1) + 1
    if grid_w > 1 or grid_h > 1:
        q = math.ceil((image_size or cfg.image_size) / per)
        count += (grid_h * q) * (grid_w * q + 1)
    return count


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


class DeepseekOCRModel(nn.Module):
    """Vision encoders + projector + layout tokens + decoder stack (everything under the ``model.`` prefix)."""

    config: DeepseekOCRConfig

    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        self._init_decoder(cfg)
        self.sam_model = SamEncoder(cfg.sam)
        self.vision_model = ClipVisionTower(cfg.clip)
        self.projector = LinearProjector(cfg.projector)
        self.image_newline = nn.Parameter(torch.empty(cfg.projector.n_embed))
        self.view_seperator = nn.Parameter(torch.empty(cfg.projector.n_embed))

    def _init_decoder(self, cfg: Any) -> None:
        """The config and the decoder's modules (embeddings, layers, norm, rotary), after checking that the
        projector writes features as wide as the token embeddings; DeepSeek-OCR-2 builds its decoder here too."""
        lang = cfg.language
        if cfg.projector.n_embed != lang.hidden_size:
            raise ModelLoadError(
                f"projector n_embed {cfg.projector.n_embed} != language hidden_size {lang.hidden_size}",
                hint="the image features are written into the token embedding sequence, so widths must match",
            )
        self.config = cfg
        self.embed_tokens = nn.Embedding(lang.vocab_size, lang.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer.build(lang, i) for i in range(lang.num_hidden_layers))
        self.norm = RMSNorm(lang.hidden_size, lang.rms_norm_eps)
        self.rotary = RotaryEmbedding(lang.head_dim, lang.rope_theta, lang.max_position_embeddings)

    def causal_context(self, inputs_embeds: Tensor, cache: StaticKVCache | None) -> ForwardContext:
        """The context of a plain forward: positions ``cache.length ..`` (0 without a cache), causal attention."""
        bsz, length, _ = inputs_embeds.shape
        start = 0
        if cache is not None:
            if cache.batch != bsz:
                raise InputError(f"KV cache was sized for batch {cache.batch}, inputs have batch {bsz}")
            cache.check_room(length)
            start = cache.length
        rope = self.rotary(start, length, inputs_embeds.device, inputs_embeds.dtype)
        return ForwardContext.causal(rope, cache, start)

    def forward(self, inputs_embeds: Tensor, cache: StaticKVCache | None = None) -> Tensor:
        """Decoder over ``inputs_embeds`` [B, L, hidden] at positions ``cache.length ..`` -> normed hidden states.

        Writes every layer's keys/values into ``cache`` and advances it by L once all layers ran.
        """
        ctx = self.causal_context(inputs_embeds, cache)
        hidden = run_decoder(self.layers, self.norm, inputs_embeds, ctx)
        if cache is not None:
            cache.advance(inputs_embeds.shape[1])
        return hidden


class DeepseekOCRForCausalLM(nn.Module):
    """DeepSeek-OCR with its LM head; the stage-by-stage inference API lives here."""

    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DeepseekOCRModel(cfg)
        self.lm_head = nn.Linear(cfg.language.hidden_size, cfg.language.vocab_size, bias=False)
        self.sdpa_backends: tuple[SDPBackend, ...] | None = DEFAULT_SDPA_BACKENDS
        # A CUDA stream for the global view while the crops run on the current one (the fast path's
        # ``vision_streams`` sets it for the duration of encode_images); None: the views one after the other.
        self.view_stream: torch.cuda.Stream | None = None

    def _sdpa_policy(self) -> contextlib.AbstractContextManager[None]:
        """Restrict scaled_dot_product_attention to ``sdpa_backends`` for one stage call (see DEFAULT_SDPA_BACKENDS)."""
        if not self.sdpa_backends:
            return contextlib.nullcontext()
        return sdpa_kernel(list(self.sdpa_backends))

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        """A zeroed static KV cache for ``batch`` sequences of up to ``max_len`` positions on this model's device."""
        return StaticKVCache.for_model(self, batch=batch, max_len=max_len)

    def num_image_tokens(
        self, grid_w: int = 1, grid_h: int = 1, base_size: int | None = None, image_size: int | None = None
    ) -> int:
        return num_image_tokens(self.config, grid_w, grid_h, base_size, image_size)

    def lm_forward(self, hidden: Tensor, ctx: ForwardContext) -> Tensor:
        """The decoder layers over ``hidden`` [B, L, hidden] with explicit positions / mask / cache slot in ``ctx``
        -> normed hidden states (the cache's length is the caller's to advance).  The batched generator's entry."""
        return run_decoder(self.model.layers, self.model.norm, hidden, ctx)

    def logits(self, hidden: Tensor) -> Tensor:
        """float32 logits of normed hidden states (``lm_head`` on exactly the rows given)."""
        return self._logits(hidden)

    @property
    def setup_count(self) -> int:
        """One-time setups (compiles, graph captures) done so far: the eager model has none."""
        return 0

    # ------------------------------------------------------------------ MoE routing statistics
    def moe_layers(self) -> dict[int, MoE]:
        return {i: layer.mlp for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, MoE)}

    @property
    def last_routing(self) -> dict[int, Tensor]:
        """Per MoE layer index: expert ids [tokens, top_k] chosen in the most recent forward (detached, on device).

        Tokens are the flattened batch×positions of that forward (prefill: B·L, decode: B); ids per row are
        sorted by gate score, highest first.
        """
        return {i: moe.last_topk_idx for i, moe in self.moe_layers().items() if moe.last_topk_idx is not None}

    def tokens_per_expert(self) -> dict[int, list[int]]:
        """Per MoE layer: tokens routed to each expert since the last reset (a prefill on an empty cache resets)."""
        return {i: list(moe.tokens_per_expert) for i, moe in self.moe_layers().items()}

    def experts_hit_per_layer(self) -> list[int]:
        """Per MoE layer (in layer order): how many distinct experts got at least one token since the last reset."""
        return [sum(1 for c in counts if c) for counts in self.tokens_per_expert().values()]

    def reset_routing_stats(self) -> None:
        for moe in self.moe_layers().values():
            moe.reset_routing_stats()

    # ------------------------------------------------------------------ stage 1: vision
    def _encode_views(self, pixels: Tensor) -> Tensor:
        """SAM → CLIP(SAM features) → projector for a batch of same-size views -> [n, h·w, hidden]."""
        m = self.model
        sam = m.sam_model(pixels)
        return self._project(sam, m.vision_model(pixels, sam))

    def _project(self, sam: Tensor, clip: Tensor) -> Tensor:
        """The projector over CLIP's tokens (CLS dropped) beside SAM's features, per view -> [n, h·w, hidden]."""
        feats = torch.cat((clip[:, 1:], sam.flatten(2).permute(0, 2, 1)), dim=-1)
        out: Tensor = self.model.projector(feats)
        return out

    def _clip_views_merged(self) -> bool:
        """Whether the CLIP tower runs several views as one sequence now (the fast path's ``clip_merged_views``)."""
        tower = getattr(self.model, "vision_model", None)
        return tower is not None and getattr(tower, "views_layer_fn", None) is not None

    def _encode_page_views_merged(self, crops: Tensor, ori: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`_encode_page_views` with CLIP over both views at once: SAM per view (the global view's on
        ``view_stream`` when set, as there), then one CLIP call on the current stream over the crops' and the global
        view's features as one sequence (the tower's ``views_layer_fn``), then the projector per view."""
        m, dev, dtype = self.model, self.device, self.dtype

        def sam(pixels: Tensor) -> Tensor:
            with self._sdpa_policy():
                out: Tensor = m.sam_model(pixels.to(device=dev, dtype=dtype))
                return out

        sam_local, sam_glob = self._views_on_streams(sam, crops, ori)
        with self._sdpa_policy():
            clip_local, clip_glob = m.vision_model(None, (sam_local, sam_glob))
            return self._project(sam_local, clip_local), self._project(sam_glob, clip_glob)

    @staticmethod
    def _page_crops(images_crop: Tensor, grid_w: int, grid_h: int) -> Tensor | None:
        """The crops to encode for a ``grid_w`` x ``grid_h`` grid (None for 1x1: ``images_crop`` is a placeholder)."""
        if grid_w == 1 and grid_h == 1:
            return None
        n_tiles = grid_w * grid_h
        if images_crop.dim() != 4 or images_crop.shape[0] != n_tiles:
            raise InputError(
                f"crop grid {grid_w}x{grid_h} needs {n_tiles} tiles, images_crop has shape {tuple(images_crop.shape)}"
            )
        return images_crop

    def _encode_page_views(self, crops: Tensor | None, ori: Tensor) -> tuple[Tensor | None, Tensor]:
        """:meth:`_encode_views` of a page's crops (None: no grid) and of its global view -> (local, global).

        With ``view_stream`` set (CUDA) and crops present, the global view's towers run on that stream while the
        crops' run on the current one: the two chains are independent until the layout, and each leaves SMs idle
        in its small kernels.  The current stream waits for the side stream before returning, so everything after
        (and any timer recorded on the current stream) sees both views done.  The stage hooks then time each
        view's tower on its own stream, and the two views' intervals overlap."""
        if crops is not None and self._clip_views_merged():
            return self._encode_page_views_merged(crops, ori)
        dev, dtype = self.device, self.dtype

        def encode(pixels: Tensor) -> Tensor:
            with self._sdpa_policy():
                return self._encode_views(pixels.to(device=dev, dtype=dtype))

        if crops is None:
            return None, encode(ori)
        return self._views_on_streams(encode, crops, ori)

    def _views_on_streams(self, fn: Callable[[Tensor], Tensor], crops: Tensor, ori: Tensor) -> tuple[Tensor, Tensor]:
        """(``fn(crops)``, ``fn(ori)``): with ``view_stream`` set (CUDA) the global view's call runs on that stream
        while the crops' runs on the current one, and the current stream waits for the side stream before this
        returns; otherwise one after the other on the current stream."""
        dev = self.device
        if self.view_stream is None or dev.type != "cuda":
            return fn(crops), fn(ori)
        side, current = self.view_stream, torch.cuda.current_stream(dev)
        side.wait_stream(current)  # the pixels (uploaded on the current stream) are in place
        with torch.cuda.stream(side):
            glob = fn(ori)
        local = fn(crops)
        current.wait_stream(side)
        # allocated on the side stream, read (and freed) on the current one: not reused before that use is done
        glob.record_stream(current)
        return local, glob

    @torch.no_grad()
    def encode_images(
        self,
        images_crop: Tensor,
        images_ori: Tensor,
        images_spatial_crop: Tensor | Sequence[int] | Sequence[Sequence[int]],
    ) -> Tensor:
        """One page's image features in sequence order -> [n_image_tokens, hidden].

        ``images_crop`` [n_tiles, 3, s, s] (ignored when the grid is 1×1, e.g. the zeros placeholder),
        ``images_ori`` [1, 3, base, base], ``images_spatial_crop`` = (grid_w, grid_h).  Layout: tiles as one
        big grid (grid_h·q rows of grid_w·q tokens, each row + ``image_newline``), then the global view
        (q_b rows of q_b tokens, each + ``image_newline``), then one ``view_seperator``.
        """
        grid_w, grid_h = parse_spatial_crop(images_spatial_crop)
        if images_ori.dim() != 4 or images_ori.shape[0] != 1:
            raise InputError(f"images_ori must be [1, 3, H, W] for one page, got {tuple(images_ori.shape)}")
        local, glob = self._encode_page_views(self._page_crops(images_crop, grid_w, grid_h), images_ori)
        return self.layout_features(local, glob, (grid_w, grid_h))

    def layout_features(self, local: Tensor | None, glob: Tensor, grid: tuple[int, int]) -> Tensor:
        """One page's view features in sequence order (:func:`layout_page_features`, this model's ``image_newline``
        and ``view_seperator``) -> [n_image_tokens, hidden]: what :meth:`encode_images` returns, and what the
        batched phase lays out after encoding many pages' views together."""
        m, dtype = self.model, self.dtype
        return layout_page_features(local, glob, grid, m.image_newline.to(dtype), m.view_seperator.to(dtype))

    # ------------------------------------------------------------------ stage 2: embeddings
    @torch.no_grad()
    def embed_prompt(self, input_ids: Tensor, images_seq_mask: Tensor, image_features: Sequence[Tensor]) -> Tensor:
        """Token embeddings [B, L, hidden] with row b's image positions filled, in order, by ``image_features[b]``."""
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [B, L], got {tuple(input_ids.shape)}")
        if images_seq_mask.shape != input_ids.shape:
            raise InputError(
                f"images_seq_mask shape {tuple(images_seq_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        bsz = input_ids.shape[0]
        if len(image_features) not in (0, bsz):
            raise InputError(f"got image features for {len(image_features)} rows, input_ids has batch {bsz}")
        ids = input_ids.to(self.device)
        embeds: Tensor = self.model.embed_tokens(ids)
        mask = images_seq_mask.to(device=self.device, dtype=torch.bool)
        counts = mask.sum(dim=1).tolist()
        for b in range(bsz):
            feats = image_features[b] if image_features else None
            n_feat = 0 if feats is None else int(feats.shape[0])
            if int(counts[b]) != n_feat:
                raise InputError(
                    f"row {b}: {int(counts[b])} image-token positions in the prompt but {n_feat} image feature rows",
                    hint="the prompt's image tokens must be laid out for the same crop grid as the images "
                    "(num_image_tokens(cfg, grid_w, grid_h))",
                )
            if feats is not None and n_feat:
                embeds[b].masked_scatter_(mask[b].unsqueeze(-1), feats.to(embeds.dtype))
        return embeds

    # ------------------------------------------------------------------ stages 3/4: language model
    def _logits(self, hidden: Tensor) -> Tensor:
        out: Tensor = self.lm_head(hidden)
        return out.float()

    @torch.no_grad()
    def prefill(self, inputs_embeds: Tensor, cache: StaticKVCache, logits_positions: str = "last") -> Tensor:
        """Run the decoder over the prompt and fill ``cache``; float32 logits [B, V] ("last") or [B, L, V] ("all").

        ``lm_head`` runs only on the requested positions.  A prefill on an empty cache starts a new page,
        so it also resets the MoE routing statistics.
        """
        if logits_positions not in LOGITS_POSITIONS:
            raise ValueError(f"logits_positions must be one of {LOGITS_POSITIONS}, got {logits_positions!r}")
        if inputs_embeds.dim() != 3:
            raise InputError(f"inputs_embeds must be [B, L, hidden], got {tuple(inputs_embeds.shape)}")
        if cache.length == 0:
            self.reset_routing_stats()
        with self._sdpa_policy():
            hidden = self.model(inputs_embeds.to(self.dtype), cache)
        if logits_positions == "last":
            return self._logits(hidden[:, -1])
        return self._logits(hidden)

    @torch.no_grad()
    def decode_step(self, token_ids: Tensor, cache: StaticKVCache) -> Tensor:
        """One forward for ``token_ids`` [B, 1] at position ``cache.length``; returns float32 logits [B, V]."""
        if token_ids.dim() != 2 or token_ids.shape[1] != 1:
            raise InputError(f"decode_step takes token_ids [B, 1], got {tuple(token_ids.shape)}")
        embeds = self.model.embed_tokens(token_ids.to(self.device))
        with self._sdpa_policy():
            hidden = self.model(embeds, cache)
        return self._logits(hidden[:, -1])

    def forward(self, inputs_embeds: Tensor, cache: StaticKVCache | None = None) -> Tensor:
        """Logits for every position (float32 [B, L, V]); for tools that need a plain ``forward``."""
        with self._sdpa_policy():
            return self._logits(self.model(inputs_embeds, cache))
