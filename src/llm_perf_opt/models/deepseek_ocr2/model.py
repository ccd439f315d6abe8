"""Assembly of the native DeepSeek-OCR-2 model: v1's language model and inference API, v2's vision path.

The module tree mirrors the released checkpoint (``model.sam_model``, ``model.qwen2_model``,
``model.projector``, ``model.view_seperator`` [sic], ``model.embed_tokens``, ``model.layers.N``,
``model.norm``, ``lm_head``), so its 2,707 keys load by name with no remapping.

Everything after the image features is DeepSeek-OCR's: the classes here subclass v1's
:class:`DeepseekOCRModel` (decoder forward over a :class:`StaticKVCache`) and :class:`DeepseekOCRForCausalLM`
(``embed_prompt``, ``prefill``, ``decode_step``, MoE routing statistics, SDPA backend policy), so generation,
the KV cache and every decoder path of v1 apply unchanged.  Only the constructors (no CLIP, no
``image_newline``; a Qwen2-style encoder) and the vision stage differ:

* :meth:`DeepseekOCR2ForCausalLM.encode_images` runs SAM → encoder → projector as three module calls
  (tiles batched in one call, then the global view), so forward hooks on the three modules fire, and lays the
  features out as every tile's tokens (tile after tile, row-major over the grid), then the global view's, then
  one ``view_seperator``: ``q_b² + k·q² + 1`` image tokens (256 + 144·k + 1 for the real geometry).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from llm_perf_opt.errors import InputError
from llm_perf_opt.models.deepseek_ocr.model import (
    DEFAULT_SDPA_BACKENDS,
    DeepseekOCRForCausalLM,
    DeepseekOCRModel,
    parse_spatial_crop,
)
from llm_perf_opt.models.deepseek_ocr.projector import LinearProjector
from llm_perf_opt.models.deepseek_ocr.sam import SamEncoder
from llm_perf_opt.models.deepseek_ocr2.config import DeepseekOCR2Config
from llm_perf_opt.models.deepseek_ocr2.encoder import Qwen2Encoder

__all__ = ["DeepseekOCR2ForCausalLM", "DeepseekOCR2Model", "num_image_tokens_v2"]


def num_image_tokens_v2(
    cfg: DeepseekOCR2Config, n_tiles: int = 0, base_size: int | None = None, image_size: int | None = None
) -> int:
    """Image tokens of one page: ``q_b² + n_tiles·q² + 1`` (global view, tiles, ``view_seperator``).

    ``q_b`` / ``q`` are SAM tokens per side of the global view (``base_size``, default 1024 → 16) and of a
    tile (``image_size``, default 768 → 12): 256 + 144·k + 1 with the real geometry.  No ``image_newline``.
    """
    q_b = cfg.tokens_per_side(base_size or cfg.base_size)
    q = cfg.tokens_per_side(image_size or cfg.image_size)
    if n_tiles < 0:
        raise InputError(f"n_tiles must be >= 0, got {n_tiles}")
    return q_b * q_b + n_tiles * q * q + 1


class DeepseekOCR2Model(DeepseekOCRModel):
    """SAM + encoder + projector + ``view_seperator`` + v1's decoder stack (everything under ``model.``).

    The decoder part is built from v1's public layer classes with the same attribute names, so v1's
    ``forward`` (the decoder over a KV cache) is inherited as it is.  v1's constructor is not called: it
    would build CLIP and ``image_newline``, which v2 does not have.
    """

    config: DeepseekOCR2Config  # type: ignore[assignment]  # v2's config in place of v1's (same .language)

    def __init__(self, cfg: DeepseekOCR2Config) -> None:
        nn.Module.__init__(self)
        self._init_decoder(cfg)
        self.sam_model = SamEncoder(cfg.sam)
        self.qwen2_model = Qwen2Encoder(cfg.encoder)
        self.projector = LinearProjector(cfg.projector)
        self.view_seperator = nn.Parameter(torch.empty(cfg.projector.n_embed))


class DeepseekOCR2ForCausalLM(DeepseekOCRForCausalLM):
    """DeepSeek-OCR-2 with its LM head: v1's stage-by-stage inference API with v2's vision stage."""

    config: DeepseekOCR2Config  # type: ignore[assignment]
    model: DeepseekOCR2Model

    def __init__(self, cfg: DeepseekOCR2Config) -> None:
        nn.Module.__init__(self)
        self.config = cfg
        self.model = DeepseekOCR2Model(cfg)
        self.lm_head = nn.Linear(cfg.language.hidden_size, cfg.language.vocab_size, bias=False)
        self.sdpa_backends = DEFAULT_SDPA_BACKENDS
        self.view_stream = None  # v1's (DeepseekOCRForCausalLM._encode_page_views)

    def num_image_tokens(  # type: ignore[override]
        self, n_tiles: int = 0, base_size: int | None = None, image_size: int | None = None
    ) -> int:
        return num_image_tokens_v2(self.config, n_tiles, base_size, image_size)

    def _encode_views(self, pixels: Tensor) -> Tensor:
        """SAM → encoder (query outputs) → projector for a batch of same-size views -> [n, tokens, hidden]."""
        m = self.model
        sam = m.sam_model(pixels)
        encoded = m.qwen2_model(sam)
        out: Tensor = m.projector(encoded)
        return out

    @torch.no_grad()
    def encode_images(
        self,
        images_crop: Tensor,
        images_ori: Tensor,
        images_spatial_crop: Tensor | Sequence[int] | Sequence[Sequence[int]],
    ) -> Tensor:
        """One page's image features in sequence order -> [n_image_tokens, hidden].

        ``images_crop`` [n_tiles, 3, s, s] (ignored for a 1×1 grid, e.g. the zeros placeholder),
        ``images_ori`` [1, 3, base, base], ``images_spatial_crop`` = (grid_w, grid_h).
        """
        grid_w, grid_h = parse_spatial_crop(images_spatial_crop)
        if images_ori.dim() != 4 or images_ori.shape[0] != 1:
            raise InputError(f"images_ori must be [1, 3, H, W] for one page, got {tuple(images_ori.shape)}")
        local, glob = self._encode_page_views(self._page_crops(images_crop, grid_w, grid_h), images_ori)
        return self.layout_features(local, glob, (grid_w, grid_h))

    def layout_features(self, local: Tensor | None, glob: Tensor, grid: tuple[int, int]) -> Tensor:
        """v2's layout: every tile's tokens (tile after tile, row-major over the grid; ``local`` [tiles, q², hidden],
        None without tiles), the global view's, one ``view_seperator``; no ``image_newline`` -> [n, hidden]."""
        m = self.model
        hidden = m.view_seperator.shape[0]
        parts = [] if local is None else [local.reshape(-1, hidden)]
        parts.append(glob.reshape(-1, hidden))
        parts.append(m.view_seperator.to(self.dtype)[None, :])
        return torch.cat(parts, dim=0)
