"""Backends are declared, not probed: ``model.backend`` picks the class from one registry, and the native
backend answers the session's questions by asking its model."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import pytest
import torch
from omegaconf import DictConfig

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.runners.backends import build_backend
from llm_perf_opt.runners.backends.base import BACKENDS, Backend
from llm_perf_opt.runners.backends.native import NativeBackend
from llm_perf_opt.runners.settings import ModelSettings, load_settings
from tests.conftest import ROOT


def test_registry_and_settings_agree_on_the_backend_names() -> None:
    # every name ModelSettings accepts has a class, and no class is unreachable
    accepted = set()
    for name in ("native", "hf_remote", "hf_native", "vllm"):
        try:
            ModelSettings(backend=name)
        except ConfigError:
            continue
        accepted.add(name)
    assert accepted == set(BACKENDS) == {"native", "hf_remote", "hf_native"}


def test_native_backend_from_settings_delegates_to_its_model(compose_cfg: Callable[..., DictConfig]) -> None:
    s = load_settings(compose_cfg(["output.dir=tmp/test-run", "model/deepseek_ocr/infer=deepseek_ocr.base"]))
    used = s.resolved("cpu")
    backend = build_backend(used.model, torch.device("cpu"), torch.float32, used.seed, ROOT)
    assert isinstance(backend, NativeBackend) and isinstance(backend, Backend)
    assert not backend.owns_kv_cache and backend.supports_batching
    # the geometry handed to preprocessing is the resolved one (Base mode), not the tiny arch's 256 / 128
    pre = backend.preprocess_cfg
    assert (pre.base_size, pre.image_size, pre.crop_mode, pre.min_crops, pre.max_crops) == (1024, 1024, False, 2, 9)
    # KV cache: tiny config = 3 layers, 4 KV heads of 64 / 4 = 16 dims; k and v, fp32, batch 1, 10 positions
    cache = backend.new_cache(10)
    assert backend.kv_cache_bytes(cache) == 2 * 3 * 1 * 4 * 10 * 16 * 4
    # routing counters come from the model (no probing): one entry per MoE layer (layers 1..2 of 3)
    hit, per_expert = backend.routing_counts(backend.model)
    assert hit is not None and per_expert is not None
    assert len(hit) == len(per_expert) == 2
    assert backend.text_is_meaningful is False  # dummy weights, stand-in tokenizer


def test_a_native_backend_with_another_model_class_has_no_fast_path() -> None:
    """A native backend's fast path needs the native model class; a subclass's own model (``hf_native``'s
    transformers wrapper) gets one ConfigError naming the backend, not an error deep in ``apply_fast_path``."""
    from llm_perf_opt.models.deepseek_ocr.fast import FastConfig
    from llm_perf_opt.runners.backends.hf_native import HfNativeBackend

    other = HfNativeBackend(torch.nn.Identity(), None, None, None, "dummy")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"model\.backend=hf_native has no fast path"):
        other.fast_model(FastConfig())


def test_dummy_native_weights_need_a_config_json() -> None:
    with pytest.raises(ConfigError, match="config_json"):
        ModelSettings(weights="dummy", config_json=None)
    attrs.evolve(ModelSettings(weights="dummy", config_json="builtin:tiny"), backend="hf_remote", config_json=None)


@pytest.mark.parametrize(
    ("package", "wanted", "shipped"),
    [("deepseek_ocr", "deepseek-ocr2", "builtin:deepseek-ocr, builtin:tiny"),
     ("deepseek_ocr2", "deepseek-ocr", "builtin:deepseek-ocr2, builtin:tiny")],
)  # fmt: skip
def test_an_unknown_builtin_config_names_the_family_and_what_ships(package: str, wanted: str, shipped: str) -> None:
    """Each family reads its own package's configs: v1's name under v2 (and back) is one error listing the
    configs that do ship (the files in models/<package>/configs/)."""
    from llm_perf_opt.runners.backends.native import config_json_path

    with pytest.raises(ConfigError) as exc:
        config_json_path(f"builtin:{wanted}", ROOT, package)
    assert f"no built-in config named '{wanted}' for {package}" in str(exc.value)
    assert exc.value.hint == f"the shipped ones: {shipped}"
    assert config_json_path("builtin:tiny", ROOT, package).parent.parent.name == package
