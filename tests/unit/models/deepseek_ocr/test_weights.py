"""Checkpoint loading (single file, sharded, every user error) and seeded dummy initialisation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_perf_opt.errors import DeviceError, ModelLoadError
from llm_perf_opt.models.deepseek_ocr import (
    DeepseekOCRConfig,
    DeepseekOCRForCausalLM,
    build_model,
    empty_model,
    init_dummy_weights,
    load_weights,
    materialize,
    resolve_dtype,
)

TINY = Path(__file__).resolve().parents[3] / "fixtures" / "deepseek_ocr_tiny"


@pytest.fixture(scope="module")
def cfg() -> DeepseekOCRConfig:
    return DeepseekOCRConfig.from_json(TINY / "config.json")


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(TINY / "weights.safetensors"))


def _checkpoint_dir(tmp_path: Path, tensors: dict[str, torch.Tensor], name: str = "model.safetensors") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / name))
    return tmp_path


def _assert_state_equals(model: DeepseekOCRForCausalLM, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key


def test_load_fixture_directory(cfg: DeepseekOCRConfig, reference: dict[str, torch.Tensor]) -> None:
    model = build_model(cfg, weights=TINY)
    _assert_state_equals(model, reference)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    position_ids = model.model.vision_model.embeddings.position_ids
    assert torch.equal(position_ids.flatten(), torch.arange(cfg.clip.num_positions))


def test_load_single_file_in_bfloat16(cfg: DeepseekOCRConfig, reference: dict[str, torch.Tensor]) -> None:
    model = build_model(cfg, dtype="bf16", weights=TINY / "weights.safetensors")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    _assert_state_equals(model, reference)


def test_load_sharded_checkpoint(tmp_path: Path, cfg: DeepseekOCRConfig, reference: dict[str, torch.Tensor]) -> None:
    keys = sorted(reference)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    weight_map = {}
    for shard, shard_keys in halves.items():
        save_file({k: reference[k] for k in shard_keys}, str(tmp_path / shard))
        weight_map.update(dict.fromkeys(shard_keys, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _assert_state_equals(build_model(cfg, weights=tmp_path), reference)

    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="missing from"):
        build_model(cfg, weights=tmp_path)


def test_directory_without_config(tmp_path: Path, cfg: DeepseekOCRConfig) -> None:
    shutil.copy(TINY / "weights.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"no config\.json") as err:
        build_model(cfg, weights=tmp_path)
    assert err.value.hint


def test_directory_without_weights(tmp_path: Path, cfg: DeepseekOCRConfig) -> None:
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError) as err:
        build_model(cfg, weights=tmp_path)
    msg = str(err.value)
    assert "model.safetensors.index.json" in msg and "model.safetensors" in msg and "pytorch_model.bin" in msg
    with pytest.raises(ModelLoadError, match="not found"):
        build_model(cfg, weights=tmp_path / "nope")


def test_missing_and_unexpected_keys(
    tmp_path: Path, cfg: DeepseekOCRConfig, reference: dict[str, torch.Tensor]
) -> None:
    dropped = sorted(k for k in reference if k.startswith("model.layers.2."))
    partial = {k: v for k, v in reference.items() if k not in dropped}
    with pytest.raises(ModelLoadError) as err:
        build_model(cfg, weights=_checkpoint_dir(tmp_path / "a", partial))
    assert f"{len(dropped)} weight(s) missing" in str(err.value)
    assert dropped[0] in str(err.value) and f"({len(dropped) - 10} more)" in str(err.value)
    assert err.value.hint

    extra = dict(reference)
    extra["model.layers.9.mlp.gate.weight"] = torch.zeros(8, 64)
    with pytest.raises(ModelLoadError, match=r"1 unexpected weight\(s\).*model.layers.9.mlp.gate.weight"):
        build_model(cfg, weights=_checkpoint_dir(tmp_path / "b", extra))


def test_wrong_shape(tmp_path: Path, cfg: DeepseekOCRConfig, reference: dict[str, torch.Tensor]) -> None:
    bad = dict(reference)
    bad["lm_head.weight"] = torch.zeros(500, 64)
    with pytest.raises(ModelLoadError, match=r"lm_head.weight: expected \(512, 64\), found \(500, 64\)"):
        build_model(cfg, weights=_checkpoint_dir(tmp_path, bad))


def test_corrupt_file(tmp_path: Path, cfg: DeepseekOCRConfig) -> None:
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot read"):
        build_model(cfg, weights=tmp_path)


def test_load_weights_into_meta_model(cfg: DeepseekOCRConfig, reference: dict[str, torch.Tensor]) -> None:
    model = empty_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    load_weights(model, TINY, device="cpu", dtype=torch.float32)
    assert not any(p.is_meta for p in model.parameters())
    _assert_state_equals(model, reference)


# ---------------------------------------------------------------------------------------------- dummy weights
def test_dummy_init_is_seeded(cfg: DeepseekOCRConfig) -> None:
    a = build_model(cfg, weights="dummy", seed=7).state_dict()
    b = build_model(cfg, weights="dummy", seed=7).state_dict()
    c = build_model(cfg, weights="dummy", seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert torch.equal(a["model.norm.weight"], torch.ones(64))
    assert torch.equal(a["model.layers.0.input_layernorm.weight"], torch.ones(64))
    assert torch.equal(a["model.projector.layers.bias"], torch.zeros(64))
    assert torch.equal(a["model.sam_model.neck.1.weight"], torch.ones(16))  # LayerNorm2d
    std = float(a["model.embed_tokens.weight"].std())
    assert 0.018 < std < 0.022
    assert not torch.equal(a["model.embed_tokens.weight"], a["lm_head.weight"])
    serial = init_dummy_weights(materialize(empty_model(cfg), "cpu", torch.float32), seed=7, workers=1)
    assert all(torch.equal(a[k], v) for k, v in serial.state_dict().items())  # threads change no value


def test_dummy_bfloat16_model_runs(cfg: DeepseekOCRConfig) -> None:
    model = build_model(cfg, dtype=torch.bfloat16, weights="dummy", seed=0)
    fp32 = build_model(cfg, dtype=torch.float32, weights="dummy", seed=0)
    assert torch.equal(model.lm_head.weight, fp32.lm_head.weight.to(torch.bfloat16))
    ids = torch.tensor([[0, 5, 6, 7]])
    embeds = model.embed_prompt(ids, torch.zeros_like(ids, dtype=torch.bool), [])
    cache = model.new_cache(1, 8)
    assert cache.dtype == torch.bfloat16
    logits = model.prefill(embeds, cache)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert torch.isfinite(model.decode_step(logits.argmax(-1, keepdim=True), cache)).all()


def test_dtype_and_device_errors(cfg: DeepseekOCRConfig) -> None:
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(DeviceError) as err:
        resolve_dtype("float8")
    assert "bfloat16" in (err.value.hint or "") and "float32" in (err.value.hint or "")
    with pytest.raises(DeviceError):
        resolve_dtype(torch.int8)
    with pytest.raises(DeviceError):
        build_model(cfg, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            build_model(cfg, device="cuda")
