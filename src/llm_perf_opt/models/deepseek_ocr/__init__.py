"""Native plain-PyTorch DeepSeek-OCR: config, model, KV cache, generation rules and weight loading."""

from llm_perf_opt.models.deepseek_ocr.config import (
    ClipConfig,
    DeepseekOCRConfig,
    LanguageConfig,
    ProjectorConfig,
    SamConfig,
)
from llm_perf_opt.models.deepseek_ocr.decoder import route_tokens
from llm_perf_opt.models.deepseek_ocr.generation import (
    GenerationResult,
    NoRepeatNGram,
    banned_ngram_tokens,
    generate,
    select_next_token,
)
from llm_perf_opt.models.deepseek_ocr.kv_cache import KVCacheFullError, StaticKVCache
from llm_perf_opt.models.deepseek_ocr.model import (
    DeepseekOCRForCausalLM,
    DeepseekOCRModel,
    num_image_tokens,
    parse_spatial_crop,
)
from llm_perf_opt.models.deepseek_ocr.weights import (
    build_model,
    empty_model,
    init_dummy_weights,
    load_weights,
    materialize,
    resolve_dtype,
)

__all__ = [
    "ClipConfig",
    "DeepseekOCRConfig",
    "DeepseekOCRForCausalLM",
    "DeepseekOCRModel",
    "GenerationResult",
    "KVCacheFullError",
    "LanguageConfig",
    "NoRepeatNGram",
    "ProjectorConfig",
    "SamConfig",
    "StaticKVCache",
    "banned_ngram_tokens",
    "build_model",
    "empty_model",
    "generate",
    "init_dummy_weights",
    "load_weights",
    "materialize",
    "num_image_tokens",
    "parse_spatial_crop",
    "resolve_dtype",
    "route_tokens",
    "select_next_token",
]
