"""DeepSeek-OCR-2 in the run's efficiency section: per-stage FLOPs, MFU and bytes of a full-size v2 page come
from flops_ocr2 and carry the model's stage name (encoder), checked against FLOPs and bytes worked by hand from
the published sizes (encoder: hidden 896, 24 layers, GQA 14/2 heads of 64, SwiGLU 4864; 144 SAM tokens per
768-px tile, 256 per 1024-px global view) and a scripted time."""

from __future__ import annotations

import pytest

from llm_perf_opt.models.deepseek_ocr2 import DeepseekOCR2Config, count_parameters, empty_model_v2
from llm_perf_opt.profiling.efficiency import compute_efficiency
from llm_perf_opt.results.types import HardwareInfo
from llm_perf_opt.runners.backends.native_v2 import config_json_path_v2
from tests.conftest import ROOT
from tests.unit.builders import make_page

PEAK_FLOPS = 1.0e15
PEAK_BW = 4.0e12
ENCODER_MS = 40.0
N_TILES = 6


def _encoder_flops_by_hand(n_image: int, views: int) -> int:
    h, ffn, kv, heads, hd, layers = 896, 4864, 2 * 64, 14, 64, 24
    per_position = 2 * (h * h + 2 * h * kv + h * h + 2 * h * ffn + ffn * h)
    pairs = n_image * n_image * 2 + n_image * (n_image + 1) // 2  # prefix mask: image block, queries causal
    return views * layers * (2 * n_image * per_position + pairs * heads * 2 * (hd + hd))


def _hardware() -> HardwareInfo:
    return HardwareInfo(device="cuda:0", gpu_name="test GPU", driver=None, cuda=None, torch="x", cpu="x",
                        peak_flops_per_s=PEAK_FLOPS, peak_flops_source="test", peak_bw_bytes_per_s=PEAK_BW,
                        peak_bw_source="test")  # fmt: skip


@pytest.fixture(scope="module")
def cfg() -> DeepseekOCR2Config:
    # what model/deepseek_ocr/arch=deepseek_ocr2.dummy builds
    return DeepseekOCR2Config.from_json(config_json_path_v2("builtin:deepseek-ocr2", ROOT))


def test_dummy_preset_config_is_the_full_size_model(cfg: DeepseekOCR2Config) -> None:
    assert count_parameters(empty_model_v2(cfg)) == 3_389_119_360  # issue 20's figure for the released model


def test_v2_efficiency_names_the_encoder_and_uses_its_flops(cfg: DeepseekOCR2Config) -> None:
    page = make_page(
        vision_views=[(N_TILES, 768, 768), (1, 1024, 1024)],
        prompt_tokens=1131,
        image_tokens=256 + 144 * N_TILES + 1,
        generated_tokens=17,
        clip_ms=ENCODER_MS,
    )
    section = compute_efficiency(cfg, [page], _hardware(), dtype_bytes=2)
    rows = {e.stage: e for e in section.efficiency}
    assert "clip" not in rows and "encoder" in rows
    want = _encoder_flops_by_hand(144, N_TILES) + _encoder_flops_by_hand(256, 1)
    enc = rows["encoder"]
    assert enc.flops == want
    assert enc.achieved_flops_per_s == pytest.approx(want / (ENCODER_MS / 1e3), rel=1e-12)
    assert enc.mfu == pytest.approx(want / (ENCODER_MS / 1e3) / PEAK_FLOPS, rel=1e-12)
    # bytes: the encoder's weights once (layers with q/k/v bias, 2 norms; final norm; 144 + 256 query rows) plus
    # its input (SAM tokens, 896 wide) and output (query outputs, 896 wide), 2 bytes each
    layer = (896 * 896 + 896) + 2 * (896 * 128 + 128) + 896 * 896 + 3 * 896 * 4864 + 2 * 896
    weights = 24 * layer + 896 + (144 + 256) * 896
    io = 2 * (N_TILES * 144 + 256) * 896
    assert enc.bytes_moved == 2 * (weights + io)
    assert [f.stage for f in section.flops] == ["sam", "encoder", "projector", "prefill_lm", "decode"]
    assert section.flops[1].analytic_flops == want


def test_v2_stage_without_time_is_absent_under_its_name(cfg: DeepseekOCR2Config) -> None:
    page = make_page(vision_views=[(1, 1024, 1024)], prompt_tokens=300, generated_tokens=5, clip_ms=None)
    section = compute_efficiency(cfg, [page], _hardware(), dtype_bytes=2)
    assert "mfu.encoder" in {u.metric for u in section.unavailable}
    assert "mfu.clip" not in {u.metric for u in section.unavailable}
