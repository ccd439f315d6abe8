"""What the session needs from a loaded model, declared once instead of probed with ``getattr``.

A backend owns the model (``model``: ``encode_images`` / ``embed_prompt`` / ``prefill`` / ``decode_step``),
its config, tokenizer and image geometry, and answers the questions where backends differ: who holds the KV
cache, how big it is, whether the model counts expert routing, whether batching is possible.  The native
backend delegates every answer to the model; hf_remote answers for the vendor code.
"""

from __future__ import annotations

import abc
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from llm_perf_opt.errors import ConfigError

if TYPE_CHECKING:
    from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig
    from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, FastModel
    from llm_perf_opt.models.deepseek_ocr.preprocess import PreprocessConfig
    from llm_perf_opt.models.deepseek_ocr.protocol import OCRModel
    from llm_perf_opt.runners.settings import ModelSettings

# model.backend -> "module:Class"; imported on use, so the vendor backend's imports stay out of native runs
BACKENDS = {
    "native": "llm_perf_opt.runners.backends.native:NativeBackend",
    "hf_remote": "llm_perf_opt.runners.backends.hf_remote:HfRemoteBackend",
    # transformers' own DeepSeek-OCR-2 class (RunSettings allows it for model.family=deepseek_ocr2 only)
    "hf_native": "llm_perf_opt.runners.backends.hf_native:HfNativeBackend",
}
# model.family -> the native backend of families other than v1 (used when model.backend=native)
FAMILY_BACKENDS = {"deepseek_ocr2": "llm_perf_opt.runners.backends.native_v2:NativeV2Backend"}


class Backend(abc.ABC):
    """One loaded model and the facts about it the session relies on."""

    name: ClassVar[str]
    # True when the model keeps its own KV cache (the session then preallocates none)
    owns_kv_cache: ClassVar[bool] = False
    # True when the batched-throughput phase can drive the model
    supports_batching: ClassVar[bool] = False
    # stage name -> dotted module path inside ``model`` that the timing hooks wrap
    hook_targets: ClassVar[dict[str, str]]
    # record slot -> this model's name for the stage, where they differ (v2: {"clip": "encoder"}); the hook of
    # that stage carries the model's name, its time fills the slot (metrics.json keys stay v1's)
    stage_names: ClassVar[dict[str, str]] = {}

    model: OCRModel
    config: DeepseekOCRConfig
    preprocess_cfg: PreprocessConfig
    tokenizer: Any
    # "dummy" or where the weights came from
    weights_desc: str

    @classmethod
    @abc.abstractmethod
    def load(
        cls, settings: ModelSettings, device: torch.device, dtype: torch.dtype, seed: int, project_root: Path
    ) -> Backend:
        """Build the model on ``device`` from the model settings."""

    @abc.abstractmethod
    def new_cache(self, max_len: int) -> Any:
        """A KV cache handle for one page of at most ``max_len`` positions."""

    @abc.abstractmethod
    def kv_cache_bytes(self, cache: Any) -> int:
        """Bytes the page's KV cache holds (after its last step)."""

    def prepare_page(self, image: Any, text_ids: list[int], uint8: bool = False) -> Any:
        """One page image as model inputs (a PreparedPage): views, tile grid, tensors, token layout.  ``uint8``:
        views left as uint8 pixels for the batched phase, which normalises them on the device."""
        from llm_perf_opt.models.deepseek_ocr.preprocess import preprocess_page

        return preprocess_page(image, self.preprocess_cfg, self.config, text_ids, uint8=uint8)

    def fast_model(self, switches: FastConfig) -> FastModel:
        """The model on the fast path (``infer.fast.enabled=true``); the settings allow it on native backends only."""
        raise ConfigError(f"model.backend={self.name} has no fast path", hint="set infer.fast.enabled=false")

    def routing_counts(self, model: Any) -> tuple[list[int] | None, dict[int, list[int]] | None]:
        """(experts hit per MoE layer, tokens per expert) of the last page, or (None, None) when not counted."""
        return None, None

    @property
    def text_is_meaningful(self) -> bool:
        """Decoded text means something only with real weights and the real tokenizer."""
        return not self.tokenizer.is_stand_in and self.weights_desc != "dummy"


def build_backend(
    settings: ModelSettings, device: torch.device, dtype: torch.dtype, seed: int, project_root: Path
) -> Backend:
    # names and (family, backend) pairs validated by the settings
    native_spec = FAMILY_BACKENDS.get(settings.family) if settings.backend == "native" else None
    spec = native_spec or BACKENDS[settings.backend]
    module, _, cls_name = spec.partition(":")
    cls: type[Backend] = getattr(importlib.import_module(module), cls_name)
    return cls.load(settings, device, dtype, seed, project_root)
