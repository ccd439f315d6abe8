"""Typed configuration of the native DeepSeek-OCR model.

One config object describes every size of the architecture, so the full-size checkpoint and the tiny
test models come from the same code.  ``DeepseekOCRConfig.from_json`` reads either the real
checkpoint's ``config.json`` (vision sizes implied by the model name ``deeplip_b_l``) or the tiny
fixture's config (explicit ``tiny_vision`` block).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from llm_perf_opt.errors import ModelLoadError


@attrs.frozen
class SamConfig:
    """SAM ViT-B image encoder (windowed + global attention, rel-pos, neck, two stride-2 convs)."""

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 256
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    use_rel_pos: bool = True
    layernorm_eps: float = 1e-6
    downsample_channels: tuple[int, ...] = (512, 1024)


@attrs.frozen
class ClipConfig:
    """CLIP-L/14 vision tower whose patch embeddings are replaced by SAM features."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_attention_heads: int = 16
    ffn_hidden_size: int = 4096
    image_size: int = 224
    patch_size: int = 14
    layernorm_epsilon: float = 1e-5
    pre_layernorm_epsilon: float = 1e-5

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@attrs.frozen
class ProjectorConfig:
    """Linear projector from concat(CLIP, SAM) features to the language model width."""

    input_dim: int = 2048
    n_embed: int = 1280
    projector_type: str = "linear"


@attrs.frozen
class LanguageConfig:
    """DeepSeek-V2-style decoder as DeepSeek-OCR configures it (MHA, no MLA)."""

    vocab_size: int = 129280
    hidden_size: int = 1280
    intermediate_size: int = 6848
    moe_intermediate_size: int = 896
    num_hidden_layers: int = 12
    num_attention_heads: int = 10
    num_key_value_heads: int = 10
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    bos_token_id: int = 0
    eos_token_id: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )


@attrs.frozen
class DeepseekOCRConfig:
    """The whole model: vision encoders, projector, decoder, and the image-token geometry."""

    sam: SamConfig = SamConfig()
    clip: ClipConfig = ClipConfig()
    projector: ProjectorConfig = ProjectorConfig()
    language: LanguageConfig = LanguageConfig()
    image_token_id: int = 128815
    base_size: int = 1024
    image_size: int = 640

    @property
    def patch_tokens_per_side(self) -> int:
        """Tokens per side of one view after SAM (patch 16) and the two stride-2 convs (×4)."""
        return self.sam.img_size // self.sam.patch_size // 4

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> DeepseekOCRConfig:
        """Build from the checkpoint's config.json layout or the tiny fixture's layout."""
        lang_raw = raw.get("language_config", raw)
        fields = {f.name for f in attrs.fields(LanguageConfig)}
        lang_kwargs = {k: v for k, v in lang_raw.items() if k in fields and v is not None}
        # Top-level keys win over language_config for the tiny layout, which has no sub-dict.
        for key in ("rms_norm_eps", "rope_theta"):
            if key in raw and raw[key] is not None and key not in lang_kwargs:
                lang_kwargs[key] = raw[key]
        try:
            language = LanguageConfig(**lang_kwargs)
        except TypeError as exc:  # pragma: no cover - attrs names the field
            raise ModelLoadError(f"{source}: invalid language config ({exc})") from exc

        if "tiny_vision" in raw:
            tv = raw["tiny_vision"]
            sam_raw = dict(tv["sam"])
            sam_raw["global_attn_indexes"] = tuple(sam_raw["global_attn_indexes"])
            sam_raw["downsample_channels"] = tuple(sam_raw["downsample_channels"])
            sam = SamConfig(**sam_raw)
            clip = ClipConfig(**tv["clip"])
            projector = ProjectorConfig(**tv["projector"])
            return cls(
                sam=sam,
                clip=clip,
                projector=projector,
                language=language,
                image_token_id=int(tv["image_token_id"]),
                base_size=int(tv["base_size"]),
                image_size=int(tv["image_size"]),
            )

        vision = raw.get("vision_config", {})
        widths = vision.get("width", {})
        sam_w = widths.get("sam_vit_b", {})
        clip_w = widths.get("clip-l-14-224", {})
        sam = SamConfig(
            img_size=int(vision.get("image_size", 1024)),
            embed_dim=int(sam_w.get("width", 768)),
            depth=int(sam_w.get("layers", 12)),
            num_heads=int(sam_w.get("heads", 12)),
            global_attn_indexes=tuple(sam_w.get("global_attn_indexes", (2, 5, 8, 11))),
            downsample_channels=tuple(sam_w.get("downsample_channels", (512, 1024))),
        )
        clip = ClipConfig(
            hidden_size=int(clip_w.get("width", 1024)),
            num_layers=int(clip_w.get("layers", 24)),
            num_attention_heads=int(clip_w.get("heads", 16)),
            image_size=int(clip_w.get("image_size", 224)),
            patch_size=int(clip_w.get("patch_size", 14)),
        )
        proj_raw = raw.get("projector_config", {})
        projector = ProjectorConfig(
            input_dim=int(proj_raw.get("input_dim", 2048)),
            n_embed=int(proj_raw.get("n_embed", language.hidden_size)),
            projector_type=str(proj_raw.get("projector_type", "linear")),
        )
        return cls(sam=sam, clip=clip, projector=projector, language=language)

    @classmethod
    def from_json(cls, path: str | Path) -> DeepseekOCRConfig:
        hint = "point model.path at a DeepSeek-OCR snapshot (see models/README.md) or use model/arch=tiny"
        return cls.from_dict(read_config_json(Path(path), hint), source=str(path))


def read_config_json(path: Path, hint: str) -> dict[str, Any]:
    """A checkpoint's config.json as a dict; a missing file or bad JSON is one ModelLoadError (``hint`` on the
    missing file: where the model's snapshot goes)."""
    if not path.is_file():
        raise ModelLoadError(f"config file not found: {path}", hint=hint)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc})") from exc
    return raw
