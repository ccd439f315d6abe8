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
from typing import Any, ClassVar

import torch

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.models.deepseek_ocr2.config import DeepseekOCR2Config
from llm_perf_opt.runners.backends.native import NativeBackend, checkpoint_dir
from llm_perf_opt.runners.settings import ModelSettings


class NativeV2Backend(NativeBackend):
    """DeepSeek-OCR-2 from its checkpoint (the checkpoint's own keys) or seeded dummy weights of a config."""

    # the batched-throughput phase drives v1's layout; RunSettings refuses batch_size > 1 for v2 before loading
    supports_batching: ClassVar[bool] = False
    hook_targets: ClassVar[dict[str, str]] = {
        "sam": "model.sam_model",
        "encoder": "model.qwen2_model",
        "projector": "model.projector",
    }
    stage_names: ClassVar[dict[str, str]] = {"clip": "encoder"}
    config: DeepseekOCR2Config  # type: ignore[assignment]  # v2's config: same .language and image_token_id as v1's

    @classmethod
    def load(
        cls, settings: ModelSettings, device: torch.device, dtype: torch.dtype, seed: int, project_root: Path
    ) -> NativeV2Backend:
        from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig
        from llm_perf_opt.models.deepseek_ocr.tokenizer import load_tokenizer
        from llm_perf_opt.models.deepseek_ocr2 import build_model_v2

        model_dir = checkpoint_dir(
            settings, project_root, hub="DeepSeek-OCR-2", folder="deepseek-ocr2", preset="deepseek_ocr2"
        )
        if settings.weights == "checkpoint":
            assert model_dir is not None  # checkpoint_dir raised otherwise
            config = DeepseekOCR2Config.from_json(model_dir / "config.json")
            weights_source: str | Path = model_dir
        else:  # dummy: ModelSettings guarantees config_json
            config = DeepseekOCR2Config.from_json(config_json_path_v2(str(settings.config_json), project_root))
            weights_source = "dummy"
        model = build_model_v2(config, device=device, dtype=dtype, weights=weights_source, seed=seed)
        # v2's tokenizer files are byte-identical to v1's: v1's loader reads them with v2's ids (bos, eos, image)
        ids = DeepseekOCRConfig(language=config.language, image_token_id=config.image_token_id)
        tokenizer = load_tokenizer(model_dir if settings.weights == "checkpoint" else None, ids)
        return cls(model, config, preprocess_config_v2(settings), tokenizer, str(weights_source))

    def fast_model(self, switches: Any) -> Any:
        """v1's fast path for the language model and SAM, with the encoder's (fused layers, graphs per view)."""
        from llm_perf_opt.models.deepseek_ocr2.fast import apply_fast_path_v2

        return apply_fast_path_v2(self.model, switches)

    def prepare_page(self, image: Any, text_ids: list[int], uint8: bool = False) -> Any:
        from llm_perf_opt.models.deepseek_ocr2.preprocess import preprocess_page_v2

        if uint8:  # only the batched phase asks for uint8 views, and settings refuse batching for v2
            raise ConfigError("DeepSeek-OCR-2 has no batched phase", hint="run it with infer.batch_size=1")

        return preprocess_page_v2(image, self.preprocess_cfg, self.config, text_ids)


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
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        path = Path(__file__).resolve().parents[2] / "models" / "deepseek_ocr2" / "configs" / f"{name}.json"
        if not path.is_file():
            raise ConfigError(f"model.config_json={spec}: no built-in DeepSeek-OCR-2 config named {name!r}",
                              hint="e.g. model.config_json=builtin:deepseek-ocr2 (or builtin:tiny)")  # fmt: skip
        return path
    path = Path(spec)
    return path if path.is_absolute() else project_root / path
