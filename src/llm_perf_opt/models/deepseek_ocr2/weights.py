"""Build the native DeepSeek-OCR-2 on a device: the checkpoint's safetensors or seeded dummy weights.

Same recipe and the same loader as v1 (:mod:`llm_perf_opt.models.deepseek_ocr.weights`): the module tree is
built with its parameters on the meta device (v2 has no buffers, so ``torch.device("meta")`` suffices), then
either loaded key for key from the safetensors files (missing, unexpected or mis-shaped keys are one
:class:`ModelLoadError`) or materialised and filled with per-name seeded random values.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llm_perf_opt.models.deepseek_ocr.weights import populate
from llm_perf_opt.models.deepseek_ocr2.config import DeepseekOCR2Config
from llm_perf_opt.models.deepseek_ocr2.model import DeepseekOCR2ForCausalLM

__all__ = ["build_model_v2", "count_parameters", "empty_model_v2"]


def empty_model_v2(cfg: DeepseekOCR2Config) -> DeepseekOCR2ForCausalLM:
    """The full module tree with every parameter on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        return DeepseekOCR2ForCausalLM(cfg)


def count_parameters(model: nn.Module) -> int:
    """Parameters from their shapes (works on the meta device); tied tensors counted once."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def build_model_v2(
    cfg: DeepseekOCR2Config,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    weights: str | Path = "dummy",
    seed: int = 0,
) -> DeepseekOCR2ForCausalLM:
    """Build on meta, then load ``weights`` (a checkpoint directory or file) or seeded dummy weights
    (``weights="dummy"``) on ``device``/``dtype``.  Returns the model in eval mode without grads.
    """
    return populate(empty_model_v2(cfg), device, dtype, weights, seed)
