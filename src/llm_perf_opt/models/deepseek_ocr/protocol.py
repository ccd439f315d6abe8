"""What a DeepSeek-OCR model offers its callers, as protocols: the runner and the batched generator type against
these instead of probing attributes.

* :class:`OCRModel`: one page's stages (``encode_images`` → ``embed_prompt`` → ``prefill`` → ``decode_step``),
  one-time setup count and routing counters.  The eager
  :class:`~llm_perf_opt.models.deepseek_ocr.model.DeepseekOCRForCausalLM` and the fast
  :class:`~llm_perf_opt.models.deepseek_ocr.fast.FastModel` satisfy it (``runners/backends`` drive either
  through these methods alone).
* :class:`LanguageModel`: the one decoder forward with explicit positions / mask / cache slot and the head,
  which the batched generator drives (eager and fast models).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from torch import Tensor, nn

from llm_perf_opt.models.deepseek_ocr.context import ForwardContext

__all__ = ["LanguageModel", "OCRModel"]


class OCRModel(Protocol):
    """One page through the model, stage by stage (see ``model.py``'s module doc)."""

    def encode_images(self, images_crop: Tensor, images_ori: Tensor, images_spatial_crop: Any) -> Any:
        """Image features of one page (passed on to :meth:`embed_prompt`)."""
        ...

    def embed_prompt(self, input_ids: Tensor, images_seq_mask: Tensor, image_features: Sequence[Any]) -> Tensor:
        """Token embeddings [B, L, hidden] with the image features in the image-token positions."""
        ...

    def prefill(self, inputs_embeds: Tensor, cache: Any) -> Tensor:
        """The decoder over the prompt, filling ``cache``; float32 logits [B, V] of the last position."""
        ...

    def decode_step(self, token_ids: Tensor, cache: Any) -> Tensor:
        """One token per row [B, 1] at the cache's length; float32 logits [B, V]."""
        ...

    @property
    def setup_count(self) -> int:
        """One-time setups (compiles, graph captures) so far: a rise during a page flags its times as cold."""
        ...

    def tokens_per_expert(self) -> dict[int, list[int]] | None:
        """Per MoE layer, tokens routed to each expert since the last prefill on an empty cache (None: unknown)."""
        ...

    def experts_hit_per_layer(self) -> list[int] | None:
        """Per MoE layer, distinct experts that got a token since the last reset (None: unknown)."""
        ...

    def parameters(self) -> Iterator[nn.Parameter]: ...


class LanguageModel(Protocol):
    """The decoder forward and head the batched generator drives."""

    def lm_forward(self, hidden: Tensor, ctx: ForwardContext) -> Tensor:
        """Normed hidden states of the decoder over ``hidden`` with positions / mask / cache slot from ``ctx``."""
        ...

    def logits(self, hidden: Tensor) -> Tensor:
        """float32 logits of normed hidden states."""
        ...

    def prefill(self, inputs_embeds: Tensor, cache: Any) -> Tensor:
        """One prompt per row at the cache's start, filling ``cache``; float32 logits [B, V] of the last position."""
        ...
