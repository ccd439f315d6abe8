"""Shared fixtures: Hydra compose of the shipped config tree, fixture paths, CUDA skip marker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY = FIXTURES / "deepseek_ocr_tiny"
REAL = FIXTURES / "deepseek_ocr_real"

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """compose_cfg(overrides) -> the config exactly as the CLI would compose it (hydra.* resolved)."""

    def _compose(overrides: list[str] | None = None) -> DictConfig:
        import llm_perf_opt.runners.llm_profile_runner  # noqa: F401  (registers the run_suffix resolver)

        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=overrides or [], return_hydra_config=True)

    return _compose
