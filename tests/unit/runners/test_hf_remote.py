"""backend=hf_remote: the clear errors it raises before any vendor code is imported (CPU only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm_perf_opt.errors import DeviceError, ModelLoadError
from llm_perf_opt.runners.backends import hf_remote
from llm_perf_opt.runners.backends.hf_remote import (
    HfRemoteBackend,
    _check_environment,
    _check_snapshot,
    image_token_count,
)
from llm_perf_opt.runners.settings import ModelSettings

CUDA = torch.device("cuda", 0)


def test_newer_transformers_is_a_model_load_error_naming_version_and_extra() -> None:
    with pytest.raises(ModelLoadError) as err:
        _check_environment(CUDA, version="4.48.0")
    assert "4.48.0" in str(err.value)
    assert ".[hf]" in str(err.value) and ".[hf]" in (err.value.hint or "")


@pytest.mark.parametrize("version", ["4.46.3", "4.47.1", "4.46.0.dev0"])
def test_pinned_transformers_passes_on_cuda(version: str) -> None:
    _check_environment(CUDA, version=version)


def test_installed_transformers_version_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_remote.importlib.metadata, "version", lambda _name: "5.17.0")
    with pytest.raises(ModelLoadError, match=r"5\.17\.0"):
        _check_environment(CUDA)


def test_cpu_device_is_a_device_error() -> None:
    with pytest.raises(DeviceError, match="CUDA"):
        _check_environment(torch.device("cpu"), version="4.46.3")


def test_directory_without_remote_code_is_a_model_load_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"modeling_\*\.py"):
        _check_snapshot(tmp_path)


def test_backend_checks_snapshot_before_importing_vendor_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_remote, "_check_environment", lambda _device: None)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="not a DeepSeek-OCR snapshot"):
        HfRemoteBackend(
            ModelSettings(path=str(tmp_path), weights="dummy", backend="hf_remote"), CUDA, torch.bfloat16, tmp_path
        )


def test_backend_on_cpu_raises_device_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_remote.importlib.metadata, "version", lambda _name: "4.46.3")
    with pytest.raises(DeviceError):
        HfRemoteBackend(
            ModelSettings(path=str(tmp_path), backend="hf_remote"), torch.device("cpu"), torch.float32, tmp_path
        )


def test_gundam_image_token_count_matches_vendor_layout() -> None:
    crops = torch.ones(6, 3, 640, 640)
    ori = torch.ones(1, 3, 1024, 1024)
    # 2x3 tiles of 10x10 with a newline per row (30 x 21) + global 16 x 17 + separator
    assert image_token_count(crops, ori, (2, 3), has_crops=True) == 30 * 21 + 16 * 17 + 1 == 903
    assert image_token_count(crops, ori, (1, 1), has_crops=False) == 16 * 17 + 1
