"""Backend ``native``: the plain-PyTorch model in ``llm_perf_opt.models.deepseek_ocr`` (CPU and GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from llm_perf_opt.errors import ConfigError, ModelLoadError
from llm_perf_opt.runners.backends.base import Backend
from llm_perf_opt.runners.settings import ModelSettings

if TYPE_CHECKING:
    from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, FastModel
    from llm_perf_opt.models.deepseek_ocr.model import DeepseekOCRForCausalLM
    from llm_perf_opt.models.deepseek_ocr.protocol import OCRModel


class NativeBackend(Backend):
    """Checkpoint or seeded dummy weights; every model question is answered by the model itself."""

    name: ClassVar[str] = "native"
    supports_batching: ClassVar[bool] = True
    hook_targets: ClassVar[dict[str, str]] = {
        "sam": "model.sam_model",
        "clip": "model.vision_model",
        "projector": "model.projector",
    }

    def __init__(self, model: OCRModel, config: Any, preprocess_cfg: Any, tokenizer: Any, weights_desc: str) -> None:
        self.model = model
        self.config = config
        self.preprocess_cfg = preprocess_cfg
        self.tokenizer = tokenizer
        self.weights_desc = weights_desc

    # where the checkpoint comes from, for the error when it is missing: hub repo, models/<folder>, arch preset stem
    checkpoint_place: ClassVar[tuple[str, str, str]] = ("DeepSeek-OCR", "deepseek-ocr", "deepseek_ocr")
    # the model package whose configs/<name>.json ``model.config_json=builtin:<name>`` names
    builtin_configs: ClassVar[str] = "deepseek_ocr"

    @classmethod
    def load(
        cls, settings: ModelSettings, device: torch.device, dtype: torch.dtype, seed: int, project_root: Path
    ) -> NativeBackend:
        """The one load sequence of every native family; a family overrides only the steps that differ."""
        from llm_perf_opt.models.deepseek_ocr.tokenizer import load_tokenizer

        hub, folder, preset = cls.checkpoint_place
        model_dir = checkpoint_dir(settings, project_root, hub=hub, folder=folder, preset=preset)
        if settings.weights == "checkpoint":
            assert model_dir is not None  # checkpoint_dir raised otherwise
            config_file = model_dir / "config.json"
            weights_source: str | Path = model_dir
        else:  # dummy: ModelSettings guarantees config_json
            config_file = config_json_path(str(settings.config_json), project_root, cls.builtin_configs)
            weights_source = "dummy"
        config = cls.read_config(config_file)
        model = cls.build(config, device, dtype, weights_source, seed)
        tokenizer = load_tokenizer(model_dir if settings.weights == "checkpoint" else None, cls.tokenizer_ids(config))
        return cls(model, config, cls.preprocess(settings), tokenizer, str(weights_source))

    @classmethod
    def read_config(cls, path: Path) -> Any:
        from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig

        return DeepseekOCRConfig.from_json(path)

    @classmethod
    def build(
        cls, config: Any, device: torch.device, dtype: torch.dtype, weights: str | Path, seed: int
    ) -> DeepseekOCRForCausalLM:
        """The model on ``device`` in eval mode: checkpoint weights, or seeded dummy weights of the real shapes."""
        from llm_perf_opt.models.deepseek_ocr import build_model

        return build_model(config, device=device, dtype=dtype, weights=weights, seed=seed)

    @classmethod
    def tokenizer_ids(cls, config: Any) -> Any:
        """The config whose special-token ids (bos, eos, image) the tokenizer loader reads."""
        return config

    @classmethod
    def preprocess(cls, settings: ModelSettings) -> Any:
        return preprocess_config(settings)

    def new_cache(self, max_len: int) -> Any:
        from llm_perf_opt.models.deepseek_ocr.kv_cache import StaticKVCache

        return StaticKVCache.for_model(self.model, batch=1, max_len=max_len)

    def kv_cache_bytes(self, cache: Any) -> int:
        return int(cache.nbytes)

    def fast_model(self, switches: FastConfig) -> FastModel:
        from llm_perf_opt.models.deepseek_ocr.fast import apply_fast_path
        from llm_perf_opt.models.deepseek_ocr.model import DeepseekOCRForCausalLM

        if not isinstance(self.model, DeepseekOCRForCausalLM):  # a subclass's own model class (hf_native)
            return Backend.fast_model(self, switches)  # the base's refusal
        return apply_fast_path(self.model, switches)

    def routing_counts(self, model: Any) -> tuple[list[int] | None, dict[int, list[int]] | None]:
        # ``model`` may be the fast path's wrapper of self.model: it counts routing the same way
        return model.experts_hit_per_layer(), model.tokens_per_expert()


def checkpoint_dir(settings: ModelSettings, project_root: Path, *, hub: str, folder: str, preset: str) -> Path | None:
    """The model folder (a relative path is read against the project); with ``weights=checkpoint`` it must exist,
    else one ModelLoadError that says where to put the download and which presets run without it."""
    model_dir = None
    if settings.path:
        model_dir = Path(settings.path)
        if not model_dir.is_absolute():
            model_dir = project_root / model_dir
    if settings.weights == "checkpoint" and (model_dir is None or not model_dir.is_dir()):
        raise ModelLoadError(
            f"model directory not found: {model_dir}",
            hint=f"download deepseek-ai/{hub} into models/{folder} (see models/README.md), "
            f"or profile without it: model/deepseek_ocr/arch={preset}.dummy (full size) or "
            f"model/deepseek_ocr/arch={preset}.tiny",
        )
    return model_dir


def preprocess_config(settings: ModelSettings) -> Any:
    """The model package's PreprocessConfig from the (resolved) image geometry settings."""
    from llm_perf_opt.models.deepseek_ocr.preprocess import PreprocessConfig

    p = settings.preprocess
    return PreprocessConfig(
        base_size=p.base_size,
        image_size=p.image_size,
        crop_mode=p.crop_mode,
        min_crops=p.min_crops,
        max_crops=p.max_crops,
        vendor_quirks=p.vendor_quirks,
    )


def config_json_path(spec: str, project_root: Path, package: str = "deepseek_ocr") -> Path:
    """``builtin:<name>`` (a config shipped in the model package ``package``) or a path (relative to the
    project)."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        path = Path(__file__).resolve().parents[2] / "models" / package / "configs" / f"{name}.json"
        if not path.is_file():
            shipped = sorted(f"builtin:{p.stem}" for p in path.parent.glob("*.json"))
            raise ConfigError(f"model.config_json={spec}: no built-in config named {name!r} for {package}",
                              hint=f"the shipped ones: {', '.join(shipped)}")  # fmt: skip
        return path
    path = Path(spec)
    return path if path.is_absolute() else project_root / path
