"""Backend ``hf_native``: transformers' own DeepSeek-OCR-2 class behind the session's interface.

The oracle for the numbers is the tiny fixture's reference (logits at every position and 12 greedy tokens from
the model's own code), not the native model: both backends load the fixture's weights and must each reproduce
it, and so agree with each other.  The settings and version checks are tested without transformers' class.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.runners.backends.hf_native import hf_native_class, version_tuple
from llm_perf_opt.runners.settings import ModelSettings, PreprocessSettings, load_settings
from tests.conftest import ROOT, rel_err

TINY = ROOT / "tests" / "fixtures" / "deepseek_ocr2_tiny"
OUT = "output.dir=tmp/test-run"
V2_TINY = "model/deepseek_ocr/arch=deepseek_ocr2.tiny"


@pytest.mark.parametrize("version", ["4.46.3", "5.9.2", "5.10.0", "5.10.0.dev0"])
def test_too_old_transformers_is_one_config_error_naming_the_version(version: str) -> None:
    with pytest.raises(ConfigError, match=rf"needs transformers >= 5\.10\.1 .*found {re.escape(version)}") as err:
        hf_native_class(version)
    assert err.value.hint and "transformers>=5.10.1" in err.value.hint


def test_version_tuple_reads_release_and_prerelease_strings() -> None:
    assert version_tuple("5.10.1") == (5, 10, 1)
    assert version_tuple("5.24.0rc1") == (5, 24, 0)
    assert version_tuple("6") == (6, 0, 0)
    assert version_tuple("5.10.1") >= (5, 10, 1) > version_tuple("5.10.0.dev0")


def test_hf_native_runs_deepseek_ocr2(compose_cfg: Callable[..., DictConfig]) -> None:
    s = load_settings(compose_cfg([V2_TINY, "model.backend=hf_native", OUT]))
    assert (s.model.backend, s.model.family) == ("hf_native", "deepseek_ocr2")


@pytest.mark.parametrize(
    ("overrides", "match", "hint"),
    [
        (["model.backend=hf_native"], r"hf_native is transformers' DeepSeek-OCR-2 class", "deepseek_ocr2"),
        ([V2_TINY, "model.backend=hf_native", "infer.fast.enabled=true"],
         r"fast\.enabled=true needs model\.backend=native", "fast path is the native model's"),
        ([V2_TINY, "model.backend=hf_native", "infer.batch_size=2"], r"batch_size > 1 needs model\.backend=native",
         "batch_size=1"),
        ([V2_TINY, "model.backend=hf_remote"], r"runs on model\.backend=native or hf_native", "hf_native"),
    ],
)  # fmt: skip
def test_backend_and_family_combinations_refused_before_loading(
    compose_cfg: Callable[..., DictConfig], overrides: list[str], match: str, hint: str
) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        load_settings(compose_cfg([*overrides, OUT]))
    assert err.value.hint and hint in err.value.hint


def test_hf_native_dummy_needs_a_config_json() -> None:
    with pytest.raises(ConfigError, match="config_json"):
        ModelSettings(family="deepseek_ocr2", backend="hf_native", weights="dummy", config_json=None)


# ----------------------------------------------------------------------------- against the fixture (transformers)
def _needs_hf_class() -> None:
    try:
        hf_native_class()
    except ConfigError as exc:
        pytest.skip(f"transformers' native DeepSeek-OCR-2 class is not available: {exc.message}")


def _fixture_settings(backend: str) -> ModelSettings:
    pre = PreprocessSettings(base_size=1024, image_size=768, crop_mode=True, min_crops=2, max_crops=6)
    return ModelSettings(
        family="deepseek_ocr2", backend=backend, weights="checkpoint", path=str(TINY), dtype="float32", preprocess=pre
    )


def _prefill_all(backend: Any, case: dict[str, torch.Tensor]) -> torch.Tensor:
    m = backend.model
    feats = m.encode_images(case["images_crop"].float(), case["images_ori"].float(), case["images_spatial_crop"])
    embeds = m.embed_prompt(case["input_ids"], case["images_seq_mask"].bool(), [feats])
    cache = backend.new_cache(embeds.shape[1] + 16)
    logits: torch.Tensor = m.prefill(embeds, cache, logits_positions="all")[0]
    return logits


@pytest.fixture(scope="module")
def backends() -> dict[str, Any]:
    _needs_hf_class()
    from llm_perf_opt.runners.backends import build_backend

    return {
        name: build_backend(_fixture_settings(name), torch.device("cpu"), torch.float32, 0, ROOT)
        for name in ("native", "hf_native")
    }


def test_hf_native_prefill_logits_reproduce_the_fixture_and_the_native_backend(backends: dict[str, Any]) -> None:
    case = load_file(str(TINY / "cases" / "crop_2x1.safetensors"))
    ref = case["prefill_logits"]
    with torch.no_grad():
        hf_logits = _prefill_all(backends["hf_native"], case)
        native_logits = _prefill_all(backends["native"], case)
    assert hf_logits.shape == ref.shape == (553, 512)
    # float32 compute against a float64 reference (the fixture README's tolerance)
    assert rel_err(hf_logits, ref) < 1e-4
    assert rel_err(native_logits, ref) < 1e-4
    assert torch.equal(hf_logits.argmax(-1), ref.argmax(-1))
    assert torch.equal(hf_logits.argmax(-1), native_logits.argmax(-1))


def test_hf_native_decode_on_its_cache_gives_the_fixture_greedy_tokens(backends: dict[str, Any]) -> None:
    case = load_file(str(TINY / "cases" / "crop_2x1.safetensors"))
    backend = backends["hf_native"]
    m = backend.model
    with torch.no_grad():
        feats = m.encode_images(case["images_crop"].float(), case["images_ori"].float(), case["images_spatial_crop"])
        embeds = m.embed_prompt(case["input_ids"], case["images_seq_mask"].bool(), [feats])
        cache = backend.new_cache(embeds.shape[1] + 12)
        tokens = [int(m.prefill(embeds, cache)[0].argmax())]
        while len(tokens) < 12 and tokens[-1] != 1:
            tokens.append(int(m.decode_step(torch.tensor([[tokens[-1]]]), cache)[0].argmax()))
    want = case["greedy_tokens"].tolist()
    assert tokens == want[: len(tokens)] and len(tokens) == len(want)
    # the DynamicCache holds k and v of 3 layers × 4 heads × 16 dims, float32, for every position fed
    positions = 553 + len(tokens) - 1
    assert backend.kv_cache_bytes(cache) == 2 * 3 * 4 * 16 * 4 * positions


def test_hf_native_hooks_name_modules_of_transformers_class(backends: dict[str, Any]) -> None:
    from llm_perf_opt.profiling.hooks import module_named

    backend = backends["hf_native"]
    names = {
        stage: type(module_named(backend.model, dotted)).__name__ for stage, dotted in backend.hook_targets.items()
    }
    assert names == {
        "sam": "DeepseekOcr2SamVisionEncoder",
        "encoder": "DeepseekOcr2VisionEncoder",
        "projector": "Linear",
    }
    assert backend.stage_names == {"clip": "encoder"}
    assert sum(p.numel() for p in backend.model.parameters()) == sum(
        p.numel() for p in backends["native"].model.parameters()
    )


def test_hf_native_routing_counts_equal_the_native_models(backends: dict[str, Any]) -> None:
    """Tokens per expert after the fixture's prefill: transformers' router ids (counted by the backend's hooks)
    and the native model's own counters agree, and each layer routes every position to top-3 experts."""
    case = load_file(str(TINY / "cases" / "crop_2x1.safetensors"))
    counts = {}
    for name, backend in backends.items():
        with torch.no_grad():
            _prefill_all(backend, case)
        hit, per_expert = backend.routing_counts(backend.model)
        assert hit is not None and per_expert is not None
        counts[name] = per_expert
    assert set(counts["hf_native"]) == {1, 2}
    assert counts["hf_native"] == counts["native"]
    assert all(sum(c) == 3 * 553 for c in counts["hf_native"].values())
