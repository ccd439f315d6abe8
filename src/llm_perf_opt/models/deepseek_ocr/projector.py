"""Vision-to-language projector of DeepSeek-OCR.

The released checkpoint uses the plain ``linear`` variant: one affine map from the per-token
concatenation ``[CLIP token (no CLS), SAM token]`` (1024 + 1024 = 2048) to the decoder width (1280).
The vendor code supports several other projector types; none ships with DeepSeek-OCR, so they are
rejected instead of silently mis-built.
"""

from __future__ import annotations

from torch import Tensor, nn

from llm_perf_opt.errors import ModelLoadError
from llm_perf_opt.models.deepseek_ocr.config import ProjectorConfig

__all__ = ["LinearProjector"]


class LinearProjector(nn.Module):
    """[..., input_dim] → [..., n_embed]; the attribute name ``layers`` matches the checkpoint key."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        if cfg.projector_type != "linear":
            raise ModelLoadError(
                f"projector_type {cfg.projector_type!r} is not supported by the native model",
                hint="DeepSeek-OCR checkpoints use projector_type 'linear'",
            )
        self.cfg = cfg
        self.layers = nn.Linear(cfg.input_dim, cfg.n_embed)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
