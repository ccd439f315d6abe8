"""Native plain-PyTorch DeepSeek-OCR-2: v1's language model, KV cache, generation and SAM, with v2's
Qwen2-style vision encoder, 768-px tiles and token layout."""

from llm_perf_opt.models.deepseek_ocr2.config import DeepseekOCR2Config, EncoderConfig
from llm_perf_opt.models.deepseek_ocr2.encoder import Qwen2Encoder, prefix_causal_mask
from llm_perf_opt.models.deepseek_ocr2.hf_native import hf_native_config
from llm_perf_opt.models.deepseek_ocr2.model import DeepseekOCR2ForCausalLM, DeepseekOCR2Model, num_image_tokens_v2
from llm_perf_opt.models.deepseek_ocr2.weights import build_model_v2, count_parameters, empty_model_v2

__all__ = [
    "DeepseekOCR2Config",
    "DeepseekOCR2ForCausalLM",
    "DeepseekOCR2Model",
    "EncoderConfig",
    "Qwen2Encoder",
    "build_model_v2",
    "count_parameters",
    "empty_model_v2",
    "hf_native_config",
    "num_image_tokens_v2",
    "prefix_causal_mask",
]
