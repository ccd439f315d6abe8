"""Fast path of the native DeepSeek-OCR-2: v1's fast path for the language model, SAM and the encoder's own.

DeepSeek-OCR-2's language model *is* DeepSeek-OCR's decoder, so everything after the image features runs on
v1's :class:`~llm_perf_opt.models.deepseek_ocr.fast.FastModel` unchanged: fused QKV/gate-up and grouped MoE
over the same weights, the LM prefill replayed from a CUDA graph per prompt length, the Triton decode step in
a CUDA graph, on-device greedy with the no-repeat-ngram rule.  Only the vision towers differ, and SAM is v1's
(a 896-channel last conv changes nothing in its fast forward), so :class:`EncoderVisionFast` extends v1's
:class:`~llm_perf_opt.models.deepseek_ocr.fast.VisionFast` with the Qwen2-style encoder:

* every layer as :func:`~llm_perf_opt.models.deepseek_ocr2.encoder.encoder_layer_fast`: q/k/v (with biases)
  and gate/up as single GEMMs over fused weights (views: the eager modules keep the same storage), image rows
  attending without a mask (flash-eligible), query rows with an ``[N, 2N]`` boolean mask; with
  ``clip_compile`` (the switch of the second vision tower, CLIP in v1) the layer is ``torch.compile``'d, one
  compile per view shape;
* with ``vision_graphs``, the encoder's forward replayed from a CUDA graph per input shape: the query counts are
  fixed (144 per 768-px tile, 256 for the 1024-px global view), so the shapes are the global view and each tile
  count (2–6 tiles run as one batch), which the profiler's warm-up meets once each (one page per crop grid).

The projector (one linear) needs nothing.  ``apply_fast_path_v2(model, cfg)`` is ``apply_fast_path`` with this
vision part; the result is a :class:`FastModel` with the v2 model as ``base``.
"""

from __future__ import annotations

from typing import cast

from llm_perf_opt.errors import InputError
from llm_perf_opt.models.deepseek_ocr.fast import (
    FastConfig,
    FastModel,
    VisionFast,
    apply_fast_path,
)
from llm_perf_opt.models.deepseek_ocr.model import DeepseekOCRForCausalLM
from llm_perf_opt.models.deepseek_ocr2.encoder import EncoderLayer, Qwen2Encoder, encoder_layer_fast
from llm_perf_opt.models.deepseek_ocr2.model import DeepseekOCR2ForCausalLM

__all__ = ["EncoderVisionFast", "apply_fast_path_v2"]


class EncoderVisionFast(VisionFast):
    """DeepSeek-OCR-2's towers: SAM (v1's fast forward, the base class) + the Qwen2-style encoder."""

    def __init__(self, model: DeepseekOCRForCausalLM, cfg: FastConfig) -> None:
        if not isinstance(model, DeepseekOCR2ForCausalLM):
            raise InputError(
                f"EncoderVisionFast needs a DeepSeek-OCR-2 model, got {type(model).__name__}",
                hint="for DeepSeek-OCR (v1) use llm_perf_opt.models.deepseek_ocr.fast.apply_fast_path",
            )
        super().__init__(model.model.sam_model, cfg)
        encoder: Qwen2Encoder = model.model.qwen2_model
        for layer in encoder.stack.layers:  # fuse q/k/v and gate/up now, at load, not inside a first capture
            cast(EncoderLayer, layer).fast_weights()
        self._set_tower("encoder", encoder, encoder_layer_fast)


def apply_fast_path_v2(model: DeepseekOCR2ForCausalLM | FastModel, cfg: FastConfig | None = None) -> FastModel:
    """v1's fast path (language model, SAM) over a DeepSeek-OCR-2 model, with the encoder's fast forward."""
    return apply_fast_path(model, cfg, vision=EncoderVisionFast)
