"""Typed configuration of the native DeepSeek-OCR-2 model.

DeepSeek-OCR-2 keeps v1's SAM (except its last conv), projector type and language model, and replaces CLIP by
a Qwen2-0.5B-style decoder used as an encoder.  So the v1 config classes are reused as they are
(:class:`SamConfig`, :class:`ProjectorConfig`, :class:`LanguageConfig`) and only the encoder gets a new one.

The checkpoint's ``config.json`` does not describe the encoder (the remote code hard-codes it) and still
says ``downsample_channels: [512, 1024]`` for SAM although the remote code builds a 896-channel last conv.
:meth:`DeepseekOCR2Config.from_dict` therefore takes the encoder sizes from the code's defaults unless the
file names them (the tiny fixture's config does, under ``vision_config.width["qwen2-0-5b"]``), and always
sets SAM's last conv to the encoder width: SAM's output tokens *are* the encoder's input embeddings, so any
other value could not run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from llm_perf_opt.errors import ModelLoadError
from llm_perf_opt.models.deepseek_ocr.config import LanguageConfig, ProjectorConfig, SamConfig, read_config_json

__all__ = ["DeepseekOCR2Config", "EncoderConfig", "LanguageConfig", "ProjectorConfig", "SamConfig"]

IMAGE_TOKEN_ID = 128815  # "<image>" of the tokenizer v1 and v2 share
ENCODER_KEY = "qwen2-0-5b"  # the checkpoint's name of the encoder's block in vision_config.width


@attrs.frozen
class EncoderConfig:
    """DeepEncoder V2: a Qwen2-style decoder (GQA, q/k/v bias, SwiGLU, RMSNorm, RoPE) run as a vision encoder.

    ``queries`` maps a view's SAM token count to its learned-query table: 144 tokens (a 768-px tile, 12×12)
    use ``query_768``, 256 (the 1024-px global view, 16×16) use ``query_1024``; each view gets as many
    queries as it has SAM tokens, and only the query outputs leave the encoder.
    """

    hidden_size: int = 896
    num_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    intermediate_size: int = 4864
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    query_768_tokens: int = 144
    query_1024_tokens: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __attrs_post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ModelLoadError(
                f"encoder hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"encoder heads {self.num_attention_heads} not a multiple of kv heads {self.num_key_value_heads}"
            )


@attrs.frozen
class DeepseekOCR2Config:
    """The whole v2 model: SAM, encoder, projector, decoder, and the view geometry (global 1024, tiles 768)."""

    sam: SamConfig = attrs.field(factory=lambda: SamConfig(downsample_channels=(512, 896)))
    encoder: EncoderConfig = attrs.field(factory=EncoderConfig)
    projector: ProjectorConfig = attrs.field(factory=lambda: ProjectorConfig(input_dim=896, n_embed=1280))
    language: LanguageConfig = attrs.field(factory=LanguageConfig)
    image_token_id: int = IMAGE_TOKEN_ID
    base_size: int = 1024
    image_size: int = 768

    def __attrs_post_init__(self) -> None:
        if self.sam.downsample_channels[-1] != self.encoder.hidden_size:
            raise ModelLoadError(
                f"SAM's last conv has {self.sam.downsample_channels[-1]} channels but the encoder is "
                f"{self.encoder.hidden_size} wide",
                hint="SAM's tokens are the encoder's input embeddings: the widths must match",
            )
        if self.projector.input_dim != self.encoder.hidden_size:
            raise ModelLoadError(
                f"projector input_dim {self.projector.input_dim} != encoder hidden_size {self.encoder.hidden_size}",
                hint="v2's projector maps the encoder's query outputs (nothing is concatenated with SAM)",
            )

    def tokens_per_side(self, view_px: int) -> int:
        """SAM tokens along one side of a square view: patch 16, then two stride-2 convs (1024 → 16, 768 → 12)."""
        return view_px // self.sam.patch_size // 4

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> DeepseekOCR2Config:
        """Build from the checkpoint's config.json layout (optionally with explicit encoder / SAM sizes)."""
        lang_raw = raw.get("language_config", raw)
        fields = {f.name for f in attrs.fields(LanguageConfig)}
        lang_kwargs = {k: v for k, v in lang_raw.items() if k in fields and v is not None}
        try:
            language = LanguageConfig(**lang_kwargs)
        except TypeError as exc:  # pragma: no cover - attrs names the field
            raise ModelLoadError(f"{source}: invalid language config ({exc})") from exc

        vision = raw.get("vision_config", {})
        widths = vision.get("width", {})
        if ENCODER_KEY not in widths:
            raise ModelLoadError(
                f"{source}: vision_config.width has no {ENCODER_KEY!r} block, so this is not a DeepSeek-OCR-2 config",
                hint="use the DeepSeek-OCR (v1) model for checkpoints with a CLIP tower (model=deepseek_ocr)",
            )
        enc_w = widths[ENCODER_KEY]
        default_enc = EncoderConfig()
        encoder = EncoderConfig(
            hidden_size=int(enc_w.get("dim", default_enc.hidden_size)),
            num_layers=int(enc_w.get("layers", default_enc.num_layers)),
            num_attention_heads=int(enc_w.get("heads", default_enc.num_attention_heads)),
            num_key_value_heads=int(enc_w.get("kv_heads", default_enc.num_key_value_heads)),
            intermediate_size=int(enc_w.get("intermediate_size", default_enc.intermediate_size)),
            rms_norm_eps=float(enc_w.get("rms_norm_eps", default_enc.rms_norm_eps)),
            rope_theta=float(enc_w.get("rope_theta", default_enc.rope_theta)),
        )
        sam_w = widths.get("sam_vit_b", {})
        default_sam = SamConfig()
        mid = int(sam_w.get("downsample_channels", default_sam.downsample_channels)[0])
        sam = SamConfig(
            img_size=int(vision.get("image_size", default_sam.img_size)),
            patch_size=int(sam_w.get("patch_size", default_sam.patch_size)),
            embed_dim=int(sam_w.get("width", default_sam.embed_dim)),
            depth=int(sam_w.get("layers", default_sam.depth)),
            num_heads=int(sam_w.get("heads", default_sam.num_heads)),
            mlp_ratio=float(sam_w.get("mlp_ratio", default_sam.mlp_ratio)),
            out_chans=int(sam_w.get("out_chans", default_sam.out_chans)),
            global_attn_indexes=tuple(sam_w.get("global_attn_indexes", default_sam.global_attn_indexes)),
            window_size=int(sam_w.get("window_size", default_sam.window_size)),
            downsample_channels=(mid, encoder.hidden_size),
        )
        proj_raw = raw.get("projector_config", {})
        if str(proj_raw.get("projector_type", "linear")) != "linear":
            raise ModelLoadError(f"{source}: projector_type {proj_raw.get('projector_type')!r} is not 'linear'")
        projector = ProjectorConfig(
            input_dim=int(proj_raw.get("input_dim", encoder.hidden_size)),
            n_embed=int(proj_raw.get("n_embed", language.hidden_size)),
        )
        return cls(
            sam=sam,
            encoder=encoder,
            projector=projector,
            language=language,
            image_token_id=int(raw.get("image_token_id", IMAGE_TOKEN_ID)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> DeepseekOCR2Config:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        hint = "point model.path at a DeepSeek-OCR-2 snapshot (config.json + model.safetensors)"
        return cls.from_dict(read_config_json(path, hint), source=str(path))
