"""The same model in the config format of transformers' native ``DeepseekOcr2ForConditionalGeneration``.

transformers (>= 5.10.1) ships DeepSeek-OCR-2 without remote code and loads the checkpoint's original key
names, but its config spells the sizes its own way (``text_config``, ``vision_config.sam_config`` /
``encoder_config``, ``mlp_layer_types``).  :func:`hf_native_config` writes that dict for any
:class:`DeepseekOCR2Config`, so the native class can be built as an independent second implementation at any
size: the tiny fixture (its ``hf_native_config.json``) or full-size dummy weights.  Pure data: transformers
is not imported here.
"""

from __future__ import annotations

from typing import Any

from llm_perf_opt.models.deepseek_ocr2.config import DeepseekOCR2Config

__all__ = ["hf_native_config"]

# The encoder's unused token table size in transformers' config (Qwen2-0.5B's vocabulary; no weights exist).
_ENCODER_VOCAB = 151936
_ENCODER_MAX_POSITIONS = 131072


def hf_native_config(cfg: DeepseekOCR2Config) -> dict[str, Any]:
    """``config.json`` content for transformers' ``DeepseekOcr2ForConditionalGeneration`` describing ``cfg``."""
    lang, sam, enc = cfg.language, cfg.sam, cfg.encoder
    text = {
        "model_type": "deepseek_ocr2_text",
        "vocab_size": lang.vocab_size,
        "hidden_size": lang.hidden_size,
        "intermediate_size": lang.intermediate_size,
        "moe_intermediate_size": lang.moe_intermediate_size,
        "num_hidden_layers": lang.num_hidden_layers,
        "num_attention_heads": lang.num_attention_heads,
        "num_key_value_heads": lang.num_key_value_heads,
        "n_routed_experts": lang.n_routed_experts,
        "n_shared_experts": lang.n_shared_experts,
        "num_experts_per_tok": lang.num_experts_per_tok,
        "topk_method": lang.topk_method,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": lang.routed_scaling_factor,
        "rms_norm_eps": lang.rms_norm_eps,
        "max_position_embeddings": lang.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": lang.rope_theta},
        "mlp_layer_types": ["sparse" if lang.is_moe_layer(i) else "dense" for i in range(lang.num_hidden_layers)],
        "bos_token_id": lang.bos_token_id,
        "eos_token_id": lang.eos_token_id,
    }
    sam_config = {
        "model_type": "deepseek_ocr2_sam_vision_model",
        "hidden_size": sam.embed_dim,
        "output_channels": sam.out_chans,
        "num_hidden_layers": sam.depth,
        "num_attention_heads": sam.num_heads,
        "image_size": sam.img_size,
        "patch_size": sam.patch_size,
        "window_size": sam.window_size,
        "global_attn_indexes": list(sam.global_attn_indexes),
        "downsample_channels": list(sam.downsample_channels),
        "mlp_ratio": sam.mlp_ratio,
    }
    encoder_config = {
        "model_type": "deepseek_ocr2_encoder",
        "hidden_size": enc.hidden_size,
        "intermediate_size": enc.intermediate_size,
        "num_hidden_layers": enc.num_layers,
        "num_attention_heads": enc.num_attention_heads,
        "num_key_value_heads": enc.num_key_value_heads,
        "rms_norm_eps": enc.rms_norm_eps,
        "max_position_embeddings": _ENCODER_MAX_POSITIONS,
        "rope_parameters": {"rope_type": "default", "rope_theta": enc.rope_theta},
        "vocab_size": _ENCODER_VOCAB,
    }
    return {
        "architectures": ["DeepseekOcr2ForConditionalGeneration"],
        "model_type": "deepseek_ocr2",
        "image_token_id": cfg.image_token_id,
        "tie_word_embeddings": False,
        "text_config": text,
        "vision_config": {
            "model_type": "deepseek_ocr2_vision",
            "sam_config": sam_config,
            "encoder_config": encoder_config,
        },
    }
