"""The native SAM / CLIP / projector reproduce DeepSeek-OCR's own vision outputs and checkpoint layout.

The tiny fixture's reference tensors come from the vendor's remote code; every case is replayed in
call order (the batch of tiles first when the page has any, then the global view), so position-table
resizing (tiles are smaller than ``img_size``) and window padding are both covered.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from llm_perf_opt.models.deepseek_ocr.clip import ClipVisionTower, interpolate_clip_pos_embed
from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig
from llm_perf_opt.models.deepseek_ocr.projector import LinearProjector
from llm_perf_opt.models.deepseek_ocr.sam import (
    SamEncoder,
    interpolate_sam_pos_embed,
    window_partition,
    window_unpartition,
)
from tests.conftest import REAL, TINY

CASES = ("global_only", "crop_2x1", "crop_2x3")
REL_TOL = 1e-4

PREFIXES = {
    "sam": "model.sam_model.",
    "clip": "model.vision_model.",
    "projector": "model.projector.",
}

Vision = tuple[SamEncoder, ClipVisionTower, LinearProjector]


def _sub_state_dict(weights: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


def _rel_err(actual: Tensor, expected: Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def _encode(vision: Vision, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One view batch through the chain the reference uses: SAM → CLIP(SAM) → projector(concat)."""
    sam, clip, projector = vision
    sam_out = sam(images)
    clip_out = clip(images, sam_out)
    features = torch.cat([clip_out[:, 1:], sam_out.flatten(2).transpose(1, 2)], dim=-1)
    return sam_out, clip_out, projector(features)


@pytest.fixture(scope="module")
def tiny_vision() -> Vision:
    cfg = DeepseekOCRConfig.from_json(TINY / "config.json")
    weights = load_file(TINY / "weights.safetensors")
    modules: Vision = (SamEncoder(cfg.sam), ClipVisionTower(cfg.clip), LinearProjector(cfg.projector))
    for name, module in zip(PREFIXES, modules, strict=True):
        module.load_state_dict(_sub_state_dict(weights, PREFIXES[name]), strict=True)
        module.eval()
    return modules


@pytest.mark.parametrize("case", CASES)
def test_vision_outputs_match_reference(tiny_vision: Vision, case: str) -> None:
    data = load_file(TINY / "cases" / f"{case}.safetensors")
    # The reference skips the tile pass when images_crop is all zeros (no tiles for this page).
    views = [data["images_crop"]] if data["images_crop"].abs().sum() != 0 else []
    views.append(data["images_ori"])
    assert f"sam_{len(views)}" not in data, "fixture has more vision calls than views"

    with torch.no_grad():
        for i, images in enumerate(views):
            outputs = dict(zip(("sam", "clip", "projector"), _encode(tiny_vision, images), strict=True))
            for name, actual in outputs.items():
                expected = data[f"{name}_{i}"]
                assert actual.shape == expected.shape, f"{case} {name}_{i}"
                err = _rel_err(actual, expected)
                assert err <= REL_TOL, f"{case} {name}_{i}: relative error {err:.2e}"


def test_full_size_modules_match_checkpoint_keys_and_shapes() -> None:
    cfg = DeepseekOCRConfig.from_json(REAL / "config.json")
    checkpoint = json.loads(Path(REAL / "full_state_dict.json").read_text())
    with torch.device("meta"):
        modules = {
            "sam": SamEncoder(cfg.sam),
            "clip": ClipVisionTower(cfg.clip),
            "projector": LinearProjector(cfg.projector),
        }
    for name, module in modules.items():
        prefix = PREFIXES[name]
        expected = {k.removeprefix(prefix): v["shape"] for k, v in checkpoint.items() if k.startswith(prefix)}
        actual = {k: list(v.shape) for k, v in module.state_dict().items()}
        assert expected, prefix
        assert set(actual) == set(expected), (
            f"{name}: missing {set(expected) - set(actual)}, extra {set(actual) - set(expected)}"
        )
        assert actual == expected, name


def test_clip_position_ids_buffer_exists_but_is_not_saved() -> None:
    cfg = DeepseekOCRConfig.from_json(TINY / "config.json")
    clip = ClipVisionTower(cfg.clip)
    assert torch.equal(clip.embeddings.position_ids, torch.arange(cfg.clip.num_positions)[None])
    assert "embeddings.position_ids" not in clip.state_dict()


def test_window_partition_round_trip_with_padding() -> None:
    x = torch.randn(2, 7, 5, 3)
    windows, padded = window_partition(x, 3)
    assert padded == (9, 6)
    assert windows.shape == (2 * 3 * 2, 3, 3, 3)
    # Padding is zeros appended bottom/right; the first window is the grid's top-left corner.
    assert torch.equal(windows[0], x[0, :3, :3])
    assert torch.equal(window_unpartition(windows, 3, padded, (7, 5)), x)


def test_pos_embed_helpers_are_identity_at_trained_size() -> None:
    sam_pos = torch.randn(1, 4, 4, 8)
    assert interpolate_sam_pos_embed(sam_pos, (4, 4)) is sam_pos
    assert interpolate_sam_pos_embed(sam_pos, (2, 3)).shape == (1, 2, 3, 8)
    clip_pos = torch.randn(17, 8)
    assert interpolate_clip_pos_embed(clip_pos, (4, 4)) is clip_pos
    resized = interpolate_clip_pos_embed(clip_pos, (2, 2))
    assert resized.shape == (5, 8)
    assert torch.equal(resized[0], clip_pos[0])


def test_bf16_forward_tracks_float32(tiny_vision: Vision) -> None:
    """bf16 weights and inputs run end to end, stay bf16, and land near the float32 result."""
    sam, clip, projector = tiny_vision
    low_vision = (
        copy.deepcopy(sam).to(torch.bfloat16),
        copy.deepcopy(clip).to(torch.bfloat16),
        copy.deepcopy(projector).to(torch.bfloat16),
    )
    images = load_file(TINY / "cases" / "crop_2x1.safetensors")["images_crop"]
    with torch.no_grad():
        reference = _encode(tiny_vision, images)
        low = _encode(low_vision, images.to(torch.bfloat16))
    for ref, out in zip(reference, low, strict=True):
        assert out.dtype == torch.bfloat16
        assert _rel_err(out.float(), ref) < 5e-2
