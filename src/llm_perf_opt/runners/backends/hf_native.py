"""Backend ``hf_native``: transformers' own ``DeepseekOcr2ForConditionalGeneration`` (transformers >= 5.10.1, no
remote code) driven through the same page loop as the native model, as a second, independent implementation.

Why it exists: a reference for the native DeepSeek-OCR-2 that someone else wrote, at full size, on the CPU and
the GPU, timed with the same hooks and clock marks.  To make the two comparable number for number, it is given
exactly the native backend's weights: the native model is built first (checkpoint, or seeded dummy weights of
the config with the run's seed: the same values the native backend would use), and its state dict — which
carries the checkpoint's own key names — is handed to ``from_pretrained(state_dict=...)``, so transformers'
own key renaming and expert fusion load it.  Preprocessing and the prompt are the native v2 backend's.

Stages: SAM is ``vision_tower.sam_encoder``, the Qwen2-style encoder ``vision_tower.vision_encoder`` (its time
fills the record's ``clip_ms`` slot, as for the native v2 model), the projector ``multi_modal_projector``.  The
KV cache is transformers' ``DynamicCache`` (grown per step, so the session preallocates none).  Decode is one
``language_model`` forward per token on that cache, never ``generate()``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from llm_perf_opt.errors import ConfigError, ModelLoadError
from llm_perf_opt.runners.backends.native_v2 import NativeV2Backend
from llm_perf_opt.runners.settings import ModelSettings

log = logging.getLogger(__name__)

# transformers' first release with the native DeepSeek-OCR-2 class
MIN_TRANSFORMERS = (5, 10, 1)
HF_CLASS = "DeepseekOcr2ForConditionalGeneration"
INSTALL_HINT = 'pip install "transformers>=5.10.1" (no remote code needed), or use model.backend=native'


def version_tuple(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version string; pre-release tails (``5.10.0.dev0``, ``rc1``) read as their digits."""
    parts = [int(m.group()) if (m := re.match(r"\d+", p)) else 0 for p in version.split(".")[:3]]
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


def hf_native_class(version: str | None = None) -> Any:
    """transformers' native class, or one ConfigError naming the installed version and what to install."""
    if version is None:
        try:
            version = importlib.metadata.version("transformers")
        except importlib.metadata.PackageNotFoundError as exc:
            raise ConfigError(
                f"model.backend=hf_native needs transformers >= 5.10.1 ({HF_CLASS}); transformers is not installed",
                hint=INSTALL_HINT,
            ) from exc
    if version_tuple(version) < MIN_TRANSFORMERS:
        raise ConfigError(
            f"model.backend=hf_native needs transformers >= 5.10.1 (its native {HF_CLASS}); found {version}",
            hint=INSTALL_HINT,
        )
    import transformers

    cls = getattr(transformers, HF_CLASS, None)
    if cls is None:
        raise ConfigError(f"model.backend=hf_native: transformers {version} has no {HF_CLASS}", hint=INSTALL_HINT)
    return cls


class HfNativeCache:
    """One page's cache handle: transformers' ``DynamicCache`` plus the positions it holds."""

    def __init__(self, dynamic: Any) -> None:
        self.dynamic = dynamic
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Keys and values of every layer (``DynamicCache.layers[i].keys/values``)."""
        total = 0
        for layer in getattr(self.dynamic, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


class HfNativeSessionModel(nn.Module):
    """transformers' model behind the interface the session drives (``encode_images`` / ``embed_prompt`` /
    ``prefill`` / ``decode_step``), each a call into transformers' own modules."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        lm: Any = hf.model.language_model  # type: ignore[union-attr]
        # transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name is deprecated until 5.40)
        self._cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        # tokens per expert of each MoE layer since the last prefill, counted on the device from the router's
        # top-k ids, read once per page: what the native model's counters give
        self._counts: dict[int, torch.Tensor] = {}
        self.routing_unavailable: str | None = None
        for i, layer in enumerate(lm.layers):
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                gate.register_forward_hook(self._count_hook(i, int(gate.num_experts)))

    def _count_hook(self, layer: int, n_experts: int) -> Any:
        def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
            # the router's expert ids: its one integer tensor (5.2x returns logits, weights, ids)
            found = [
                t
                for t in (out if isinstance(out, tuple) else (out,))
                if torch.is_tensor(t) and not t.is_floating_point()
            ]
            if len(found) != 1:
                if self.routing_unavailable is None:
                    self.routing_unavailable = f"transformers' router returns {len(found)} integer tensors, not 1"
                    log.warning("hf_native: no expert routing counts (%s)", self.routing_unavailable)
                return
            counts = torch.bincount(found[0].reshape(-1), minlength=n_experts)
            self._counts[layer] = counts if layer not in self._counts else self._counts[layer] + counts

        return hook

    def tokens_per_expert(self) -> dict[int, list[int]]:
        """Per MoE layer: tokens routed to each expert since the last prefill (one device sync)."""
        return {i: [int(c) for c in t.tolist()] for i, t in sorted(self._counts.items())}

    def experts_hit_per_layer(self) -> list[int]:
        """Per MoE layer (in layer order): distinct experts that got at least one token since the last prefill."""
        return [sum(1 for c in counts if c) for counts in self.tokens_per_expert().values()]

    @property
    def setup_count(self) -> int:
        """transformers' eager modules: no compiles or graph captures."""
        return 0

    @property
    def _inner(self) -> Any:
        return self.hf.model

    @torch.no_grad()
    def encode_images(
        self, images_crop: torch.Tensor, images_ori: torch.Tensor, images_spatial_crop: Any
    ) -> torch.Tensor:
        """transformers' ``get_image_features``: global view, then the tiles (when the page has a grid), each
        through SAM → encoder → projector; its layout is tiles, global view, separator — the native one."""
        spatial = images_spatial_crop
        grid = [int(v) for v in (spatial.flatten().tolist() if torch.is_tensor(spatial) else spatial)]
        tiles = grid[0] * grid[1] if len(grid) == 2 and (grid[0] > 1 or grid[1] > 1) else 0
        out = self._inner.get_image_features(
            pixel_values=images_ori,
            pixel_values_local=images_crop if tiles else None,
            num_local_patches=[tiles] if tiles else None,
            return_dict=True,
        )
        feats: torch.Tensor = out.pooler_output[0]
        return feats

    def embed_prompt(
        self, input_ids: torch.Tensor, images_seq_mask: torch.Tensor, image_features: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Token embeddings with the image rows scattered into the image-token positions, as transformers'
        forward does (``masked_scatter``)."""
        mask, feats = images_seq_mask, image_features
        embeds = self._inner.get_input_embeddings()(input_ids)
        for b, f in enumerate(feats):
            n = int(mask[b].sum())
            if n != f.shape[0]:
                raise ModelLoadError(
                    f"the prompt has {n} image tokens but transformers' vision made {f.shape[0]}",
                    hint="preprocess geometry (base_size/image_size/crop_mode) must be DeepSeek-OCR-2's",
                )
        rows = torch.cat(list(feats), dim=0).to(embeds.dtype)
        return embeds.masked_scatter(mask.bool().unsqueeze(-1), rows)

    def _lm(self, cache: HfNativeCache, **inputs: Any) -> torch.Tensor:
        first: torch.Tensor = next(iter(inputs.values()))
        n = int(first.shape[1])
        pos = torch.arange(cache.length, cache.length + n, device=first.device)[None]
        out = self._inner.language_model(position_ids=pos, use_cache=True, **{self._cache_kw: cache.dynamic}, **inputs)
        cache.length += n
        hidden: torch.Tensor = out.last_hidden_state
        return hidden

    @torch.no_grad()
    def prefill(
        self, inputs_embeds: torch.Tensor, cache: HfNativeCache, logits_positions: str = "last"
    ) -> torch.Tensor:
        """The first LM forward over the prompt -> logits of the last position ([1, vocab]), or of every position
        ([1, len, vocab]) with ``logits_positions="all"`` (for comparisons)."""
        if cache.length:
            raise RuntimeError("prefill on a cache that already holds a page; take a new_cache per page")
        self._counts.clear()
        hidden = self._lm(cache, inputs_embeds=inputs_embeds)
        if logits_positions == "all":
            return self.hf.lm_head(hidden).float()  # type: ignore[operator]
        return self.hf.lm_head(hidden[:, -1, :]).float()  # type: ignore[operator]

    @torch.no_grad()
    def decode_step(self, token_ids: torch.Tensor, cache: HfNativeCache) -> torch.Tensor:
        if not cache.length:
            raise RuntimeError("decode_step before prefill on this cache")
        hidden = self._lm(cache, input_ids=token_ids)
        return self.hf.lm_head(hidden[:, -1, :]).float()  # type: ignore[operator]


class HfNativeBackend(NativeV2Backend):
    """DeepSeek-OCR-2 in transformers' native class, with the native v2 backend's weights, tokenizer and pages."""

    name: ClassVar[str] = "hf_native"
    owns_kv_cache: ClassVar[bool] = True
    supports_batching: ClassVar[bool] = False
    hook_targets: ClassVar[dict[str, str]] = {
        "sam": "hf.model.vision_tower.sam_encoder",
        "encoder": "hf.model.vision_tower.vision_encoder",
        "projector": "hf.model.multi_modal_projector",
    }
    stage_names: ClassVar[dict[str, str]] = {"clip": "encoder"}
    model: HfNativeSessionModel

    @classmethod
    def load(
        cls, settings: ModelSettings, device: torch.device, dtype: torch.dtype, seed: int, project_root: Path
    ) -> HfNativeBackend:
        hf_cls = hf_native_class()
        native = NativeV2Backend.load(settings, device, dtype, seed, project_root)
        assert isinstance(native.model, nn.Module)  # NativeV2Backend builds a DeepseekOCR2ForCausalLM
        hf = hf_from_native(hf_cls, native.model, dtype, device)
        return cls(HfNativeSessionModel(hf).eval(), native.config, native.preprocess_cfg, native.tokenizer,
                   native.weights_desc)  # fmt: skip

    def new_cache(self, max_len: int) -> HfNativeCache:
        from transformers import DynamicCache

        config: Any = self.model.hf.config  # transformers' PreTrainedConfig
        return HfNativeCache(DynamicCache(config=config))

    def kv_cache_bytes(self, cache: Any) -> int:
        return int(cache.nbytes)

    def routing_counts(self, model: Any) -> tuple[list[int] | None, dict[int, list[int]] | None]:
        if model.routing_unavailable is not None:
            return None, None
        return model.experts_hit_per_layer(), model.tokens_per_expert()


def hf_from_native(hf_cls: Any, native: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """transformers' class with the native model's weights: its config from ``hf_native_config``, its tensors
    from the native state dict (the checkpoint's key names), loaded by transformers' own key mapping.  Anything
    missing, unexpected or mis-shaped is one ModelLoadError."""
    import transformers

    from llm_perf_opt.models.deepseek_ocr2.hf_native import hf_native_config

    config = transformers.DeepseekOcr2Config(**hf_native_config(native.config))  # type: ignore[arg-type]
    state = native.state_dict()
    # float64 is not a grouped_mm dtype: the per-expert loop there (comparisons only; profiles use 16/32 bits)
    extra: dict[str, Any] = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    # with accelerate, a device_map keeps the tensors on ``device``; without it transformers loads them on the
    # host and the model is moved after (slower, same values)
    if importlib.util.find_spec("accelerate") is not None:
        extra["device_map"] = {"": str(device)}
    hf, info = hf_cls.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, output_loading_info=True, **extra
    )
    bad = {k: sorted(info[k])[:5] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
    if bad:
        raise ModelLoadError(
            f"transformers' {HF_CLASS} did not take the native weights key for key: {bad}",
            hint="the transformers version maps the checkpoint's key names differently; try transformers 5.24",
        )
    # device only: the dtypes are transformers' choice (a module it keeps in float32 stays so)
    model: nn.Module = hf.to(device=device).eval()
    model.requires_grad_(False)
    return model
