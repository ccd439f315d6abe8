"""Backend ``native`` for DeepSeek-OCR-2 (``model.family=deepseek_ocr2``): the plain-PyTorch v2 model in
``llm_perf_opt.models.deepseek_ocr2``, CPU and GPU.

The v2 model keeps v1's inference API (``encode_images`` / ``embed_prompt`` / ``prefill`` / ``decode_step``,
the KV cache, MoE routing counters), so everything but loading, the hooked vision modules, the page
preprocessing and the vision part of the fast path is the v1 native backend's.  The second vision stage is the
Qwen2-style encoder: its hook is named ``encoder`` and its time fills the record's ``clip_ms`` slot (kept so
metrics.json keys stay those of v1); ``stage_names`` records that mapping for the report and for scripts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from llm_perf_opt.models.deepseek_ocr2.config import DeepseekOCR2Config
from llm_perf_opt.runners.backends.base import Backend
from llm_perf_opt.runners.backends.native import NativeBackend, config_json_path
from llm_perf_opt.runners.settings import ModelSettings

if TYPE_CHECKING:
    from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, FastModel
    from llm_perf_opt.models.deepseek_ocr2.model import DeepseekOCR2ForCausalLM


class NativeV2Backend(NativeBackend):
    """DeepSeek-OCR-2 from its checkpoint (the checkpoint's own keys) or seeded dummy weights of a config."""

    # the batched-throughput phase drives v2 too: its vision batches views through the model's own view encoder
    # and layout (``_encode_views`` / ``layout_features``), and the language model is v1's
    supports_batching: ClassVar[bool] = True
    hook_targets: ClassVar[dict[str, str]] = {
        "sam": "model.sam_model",
        "encoder": "model.qwen2_model",
        "projector": "model.projector",
    }
    stage_names: ClassVar[dict[str, str]] = {"clip": "encoder"}
    config: DeepseekOCR2Config  # type: ignore[assignment]  # v2's config: same .language and image_token_id as v1's

    checkpoint_place: ClassVar[tuple[str, str, str]] = ("DeepSeek-OCR-2", "deepseek-ocr2", "deepseek_ocr2")
    builtin_configs: ClassVar[str] = "deepseek_ocr2"

    @classmethod
    def read_config(cls, path: Path) -> DeepseekOCR2Config:
        return DeepseekOCR2Config.from_json(path)

    @classmethod
    def build(
        cls, config: Any, device: torch.device, dtype: torch.dtype, weights: str | Path, seed: int
    ) -> DeepseekOCR2ForCausalLM:
        from llm_perf_opt.models.deepseek_ocr2 import build_model_v2

        return build_model_v2(config, device=device, dtype=dtype, weights=weights, seed=seed)

    @classmethod
    def tokenizer_ids(cls, config: Any) -> Any:
        """v2's tokenizer files are byte-identical to v1's: v1's loader reads them with v2's ids."""
        from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig

        return DeepseekOCRConfig(language=config.language, image_token_id=config.image_token_id)

    @classmethod
    def preprocess(cls, settings: ModelSettings) -> Any:
        return preprocess_config_v2(settings)

    def fast_model(self, switches: FastConfig) -> FastModel:
        """v1's fast path for the language model and SAM, with the encoder's (fused layers, graphs per view)."""
        from llm_perf_opt.models.deepseek_ocr2.fast import apply_fast_path_v2
        from llm_perf_opt.models.deepseek_ocr2.model import DeepseekOCR2ForCausalLM

        if not isinstance(self.model, DeepseekOCR2ForCausalLM):  # a subclass's own model class (hf_native)
            return Backend.fast_model(self, switches)  # the base's refusal
        return apply_fast_path_v2(self.model, switches)

    def prepare_page(self, image: Any, text_ids: list[int], uint8: bool = False) -> Any:
        from llm_perf_opt.models.deepseek_ocr2.preprocess import preprocess_page_v2

        return preprocess_page_v2(image, self.preprocess_cfg, self.config, text_ids, uint8=uint8)


def preprocess_config_v2(settings: ModelSettings) -> Any:
    """v2's PreprocessConfig from the (resolved) geometry: the processor's 768-px crop threshold in every mode."""
    from llm_perf_opt.models.deepseek_ocr.preprocess import PreprocessConfig
    from llm_perf_opt.models.deepseek_ocr2.preprocess import V2_TILE_PX

    p = settings.preprocess
    return PreprocessConfig(
        base_size=p.base_size,
        image_size=p.image_size,
        crop_mode=p.crop_mode,
        min_crops=p.min_crops,
        max_crops=p.max_crops,
        crop_threshold_px=V2_TILE_PX,
        vendor_quirks=p.vendor_quirks,
    )


def config_json_path_v2(spec: str, project_root: Path) -> Path:
    """``builtin:<name>`` (``deepseek-ocr2`` or ``tiny``, shipped in the v2 model package) or a path."""
    return config_json_path(spec, project_root, NativeV2Backend.builtin_configs)
