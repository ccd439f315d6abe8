"""Typed settings (runners/settings.py): every bad value is one ConfigError naming the key, with a hint, before
anything loads; unknown keys get a did-you-mean; ``resolved`` records the values that run."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from omegaconf import DictConfig

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.runners.settings import RunSettings, load_settings

OUT = "output.dir=tmp/test-run"


@pytest.fixture
def settings_of(compose_cfg: Callable[..., DictConfig]) -> Callable[..., RunSettings]:
    def _load(*overrides: str) -> RunSettings:
        return load_settings(compose_cfg([*overrides, OUT]))

    return _load


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("seed=abc", "seed"),
        ("peak.flops_per_s=abc", "peak.flops_per_s"),
        ("peak.bw_bytes_per_s=-1", "peak.bw_bytes_per_s"),
        ("dataset.max_pages=abc", "dataset.max_pages"),
        ("dataset.max_pages=0", "dataset.max_pages"),
        ("dataset.sizes=[[300]]", "dataset.sizes"),
        ("dataset.num_pages=0", "dataset.num_pages"),
        ("dataset.num_pages=abc", "dataset.num_pages"),
        ("infer.batch_size=0", "infer.batch_size"),
        ("infer.batch_size=-3", "infer.batch_size"),
        ("output.top_k_operators=-1", "output.top_k_operators"),
        ("infer.temperature=-1", "infer.temperature"),
        ("infer.temperature=abc", "infer.temperature"),
        ("infer.no_repeat_ngram_size=-1", "infer.no_repeat_ngram_size"),
        ("fail_fast=no", "fail_fast"),
        ("infer.ignore_eos=yes", "infer.ignore_eos"),
        ("profiling.activities=[bogus]", "profiling.activities"),
        ("profiling.activities=[]", "profiling.activities"),
        ("infer.max_new_tokens=abc", "infer.max_new_tokens"),
        ("infer.max_new_tokens=true", "infer.max_new_tokens"),
        ("max_new_tokens=0", "max_new_tokens"),
        ("profiling.warmup_rounds=-1", "profiling.warmup_rounds"),
        ("profiling.rep_max_new_tokens=0", "profiling.rep_max_new_tokens"),
        ("model.backend=vllm", "model.backend"),
        ("model.weights=random", "model.weights"),
        ("model.dtype=int4", "model.dtype"),
        ("model.preprocess.base_size=0", "model.preprocess.base_size"),
        ("model.preprocess.crop_mode=maybe", "model.preprocess.crop_mode"),
        ("infer.fast.grouped_moe=yes", "infer.fast.grouped_moe"),
        ("infer.fast.decode_kernels=cutlass", "decode_kernels"),
        ("infer.fast.vision_compile_mode=max-autotune", "vision_compile_mode"),
        ("repeats=1.5", "repeats"),
        ("progress=sometimes", "progress"),
        ("model.prompt=free_ocrr", "model.prompt"),
        ("model.prompt='Free OCR.'", "model.prompt"),
        ("infer.no_repeat_ngram_window=0", "infer.no_repeat_ngram_window"),
        ("infer.no_repeat_ngram_window=10", "infer.no_repeat_ngram_window"),  # < no_repeat_ngram_size 20
        ("infer.no_repeat_ngram_exempt_ids=[128821,-1]", "infer.no_repeat_ngram_exempt_ids"),
        ("infer.no_repeat_ngram_exempt_ids=[td]", "infer.no_repeat_ngram_exempt_ids"),
        ("infer.no_repeat_ngram_scope=prompt", "infer.no_repeat_ngram_scope"),
        ("infer.batching=dynamic", "infer.batching"),
        ("per_page_pages=0", "per_page_pages"),
        ("dataset.target_lengths=gaussian", "dataset.target_lengths"),
        ("dataset.target_lengths=lognormal", "dataset.target_lengths"),  # without a median
        ("dataset.target_median_tokens=1", "dataset.target_median_tokens"),
        ("dataset.target_sigma=-0.5", "dataset.target_sigma"),
        ("infer.refill_vision_ahead=-1", "infer.refill_vision_ahead"),
        ("infer.refill_vision_ahead=1", "infer.refill_vision_ahead"),  # batch_size 1: no refill to run ahead of
        ("infer.refill_prefill_ahead=true", "infer.refill_vision_ahead=0"),  # no page runs ahead to prefill
        ("infer.refill_prefill_ahead=maybe", "infer.refill_prefill_ahead"),
        ("infer.refill_prefill=graphed", "infer.refill_prefill"),
        ("infer.refill_prefill=per_page", "infer.refill_prefill=per_page"),  # batch_size 1: no refill
    ],
)
def test_bad_value_is_one_config_error_with_a_hint(
    settings_of: Callable[..., RunSettings], override: str, key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        settings_of(override)
    assert key in info.value.message, info.value.message
    assert info.value.hint, f"{override}: no hint"
    assert "\n" not in info.value.message


def test_cross_group_rules(settings_of: Callable[..., RunSettings]) -> None:
    with pytest.raises(ConfigError, match=r"num_pages=4 only applies to synthetic"):
        settings_of("dataset=folder", "dataset.root=/tmp", "+dataset.num_pages=4")
    with pytest.raises(ConfigError, match=r"needs model\.backend=native"):
        settings_of("model.backend=hf_remote", "infer.fast.enabled=true")
    with pytest.raises(ConfigError, match=r"needs model\.backend=native"):
        settings_of("model.backend=hf_remote", "infer.batch_size=4")
    with pytest.raises(ConfigError, match="min_crops"):
        settings_of("model.preprocess.min_crops=5", "model.preprocess.max_crops=3")


def test_prompt_presets_are_named_and_recorded(settings_of: Callable[..., RunSettings]) -> None:
    """A typo of a preset lists the presets (not "no <image>"); a preset runs as its text and the record keeps
    both the text (issue 17: "\\nFree OCR." is the official free-OCR prompt) and the name."""
    with pytest.raises(ConfigError, match="unknown prompt preset 'free_ocrr'") as info:
        settings_of("model.prompt=free_ocrr")
    for name in ("document_markdown", "free_ocr", "grounding_ocr", "parse_figure", "describe_image"):
        assert name in info.value.message
    assert "model.prompt=free_ocr" in (info.value.hint or "")
    used = settings_of("model.prompt=free_ocr").resolved("cpu")
    assert used.model.prompt == "<image>\nFree OCR." and used.model.prompt_preset == "free_ocr"
    assert used.resolved("cpu") == used  # idempotent
    recorded = used.as_config()["model"]
    assert (recorded["prompt"], recorded["prompt_preset"]) == ("<image>\nFree OCR.", "free_ocr")
    text = settings_of("model.prompt='<image>\nOCR.'").resolved("cpu").model
    assert (text.prompt, text.prompt_preset) == ("<image>\nOCR.", None)


def test_vllm_preset_is_recorded_with_its_rule_and_tile_cap(settings_of: Callable[..., RunSettings]) -> None:
    used = settings_of("model/deepseek_ocr/infer=deepseek_ocr.vllm_gundam").resolved("cpu").as_config()
    assert used["infer"]["preset"] == "vllm_gundam" and used["infer"]["preprocess_override"] is None
    assert {k: used["infer"][f"no_repeat_ngram_{k}"] for k in ("size", "window", "exempt_ids", "scope")} == {
        "size": 30, "window": 90, "exempt_ids": [128821, 128822], "scope": "output"
    }  # fmt: skip
    pp = used["model"]["preprocess"]
    assert (pp["base_size"], pp["image_size"], pp["crop_mode"], pp["min_crops"], pp["max_crops"]) == (
        1024, 640, True, 2, 6
    )  # fmt: skip
    with pytest.raises(ConfigError, match="batched phase") as info:
        settings_of("model/deepseek_ocr/infer=deepseek_ocr.vllm_gundam", "infer.batch_size=2")
    assert info.value.hint
    with pytest.raises(ConfigError, match=r"infer\.preprocess_override\.max_crops must be an integer >= 1") as info:
        settings_of("model/deepseek_ocr/infer=deepseek_ocr.vllm_gundam", "infer.preprocess_override.max_crops=0")
    assert info.value.hint
    with pytest.raises(ConfigError, match="min_crops"):  # the cap below the preset's min: refused when resolved
        vllm = "model/deepseek_ocr/infer=deepseek_ocr.vllm_gundam"
        settings_of(vllm, "infer.preprocess_override.max_crops=1").resolved("cpu")


def test_folder_dataset_without_root_names_the_key(settings_of: Callable[..., RunSettings]) -> None:
    with pytest.raises(ConfigError, match=r"dataset\.root is required") as info:
        settings_of("dataset=folder")
    assert "dataset.root=" in (info.value.hint or "")


def test_unknown_keys_get_a_did_you_mean(compose_cfg: Callable[..., DictConfig]) -> None:
    cases = [
        ("+infer.temprature=0.5", "infer.temprature", "infer.temperature"),
        ("+infer.fast.cuda_graph=true", "infer.fast.cuda_graph", "infer.fast.cuda_graphs"),
        ("+output.plot=false", "output.plot", "output.plots"),
        ("+repeatz=3", "repeatz", "repeats"),
    ]
    for override, key, suggestion in cases:
        with pytest.raises(ConfigError) as info:
            load_settings(compose_cfg([override, OUT]))
        assert info.value.message == f"unknown setting {key}", override
        assert info.value.hint == f"did you mean {suggestion}?", override


def test_values_parse_to_their_types(settings_of: Callable[..., RunSettings]) -> None:
    s = settings_of("peak.flops_per_s=1000", "infer.temperature=0", "fail_fast=true", "dataset.max_pages=2")
    assert s.peak.flops_per_s == 1000.0 and isinstance(s.peak.flops_per_s, float)
    assert s.infer.temperature == 0.0 and s.fail_fast is True and s.dataset.max_pages == 2
    assert s.dataset.sizes == ((595, 842), (800, 600), (600, 2000))
    assert s.profiling.activities == ("cpu", "cuda")


def test_token_cap_falls_back_once(settings_of: Callable[..., RunSettings]) -> None:
    s = settings_of("infer.max_new_tokens=null", "max_new_tokens=17")
    assert s.infer.max_new_tokens is None and s.token_cap == 17
    used = s.resolved("cpu")
    assert used.infer.max_new_tokens == 17 and used.token_cap == 17
    assert used.as_config()["infer"]["max_new_tokens"] == 17
    assert settings_of("infer.max_new_tokens=5", "max_new_tokens=17").token_cap == 5


def test_profiler_tokens_never_exceed_the_cap(settings_of: Callable[..., RunSettings]) -> None:
    assert settings_of("infer.max_new_tokens=8", "profiling.rep_max_new_tokens=32").profiler_tokens == 8
    assert settings_of("infer.max_new_tokens=64", "profiling.rep_max_new_tokens=32").profiler_tokens == 32
    assert settings_of("infer.max_new_tokens=64", "profiling.rep_max_new_tokens=null").profiler_tokens == 64


@pytest.mark.parametrize(
    ("mode", "geometry"),
    [
        ("base", (1024, 1024, False)),
        ("tiny", (512, 512, False)),
        ("gundam", (1024, 640, True)),
        ("large", (1280, 1280, False)),
    ],
)
def test_resolution_mode_geometry_is_what_gets_recorded(
    settings_of: Callable[..., RunSettings], mode: str, geometry: tuple[int, int, bool]
) -> None:
    # the tiny arch's own geometry is 256/128 with crops: the mode must win (vendor table, DESIGN.md)
    s = settings_of(f"model/deepseek_ocr/infer=deepseek_ocr.{mode}")
    assert (s.model.preprocess.base_size, s.model.preprocess.image_size) == (256, 128)
    pre = s.resolved("cpu").model.preprocess
    assert (pre.base_size, pre.image_size, pre.crop_mode) == geometry
    recorded = s.resolved("cpu").as_config()
    assert recorded["model"]["preprocess"]["base_size"] == geometry[0]
    assert recorded["infer"]["mode"] == mode and recorded["infer"]["preprocess_override"] is None


def test_resolved_is_idempotent_and_switches_cuda_only_fast_paths_off_on_cpu(
    settings_of: Callable[..., RunSettings],
) -> None:
    s = settings_of(
        "infer.fast.enabled=true", "infer.fast.vision_streams=true", "model/deepseek_ocr/infer=deepseek_ocr.base"
    )
    cpu = s.resolved("cpu")
    assert cpu.infer.fast.switches.cuda_graphs is False and cpu.infer.fast.switches.vision_graphs is False
    assert cpu.infer.fast.switches.vision_streams is False
    assert cpu.infer.fast.switches.prefill_shared_stream is False  # the shipped presets turn it on
    assert cpu.infer.fast.switches.grouped_moe is True
    assert cpu.resolved("cpu") == cpu
    cuda = s.resolved("cuda").infer.fast.switches
    assert cuda.cuda_graphs is True and cuda.vision_streams is True and cuda.prefill_shared_stream is True


def test_recorded_config_loads_back_to_the_same_settings(settings_of: Callable[..., RunSettings]) -> None:
    used = settings_of("infer.fast.enabled=true", "dataset.max_pages=1").resolved("cpu")
    assert load_settings(used.as_config()) == used


def test_batching_mode_default_and_did_you_mean(settings_of: Callable[..., RunSettings]) -> None:
    assert settings_of().infer.batching == "continuous"
    assert settings_of("infer.batching=static").infer.batching == "static"
    with pytest.raises(ConfigError) as info:
        settings_of("infer.batching=contnuous")
    assert info.value.hint == "did you mean infer.batching=continuous?"
    assert settings_of().infer.refill_vision_ahead == 0
    assert settings_of("infer.batch_size=4", "infer.refill_vision_ahead=2").infer.refill_vision_ahead == 2
    with pytest.raises(ConfigError, match=r"infer\.batching=static") as info:
        settings_of("infer.batch_size=4", "infer.batching=static", "infer.refill_vision_ahead=1")
    assert info.value.hint == "add infer.batch_size=8 infer.batching=continuous, or set infer.refill_vision_ahead=0"
    assert settings_of().infer.refill_prefill_ahead is False
    both = settings_of("infer.batch_size=4", "infer.refill_vision_ahead=2", "infer.refill_prefill_ahead=true").infer
    assert (both.refill_vision_ahead, both.refill_prefill_ahead) == (2, True)
    with pytest.raises(ConfigError, match=r"infer\.refill_vision_ahead=0") as info:
        settings_of("infer.batch_size=4", "infer.refill_prefill_ahead=true")
    assert info.value.hint == "add infer.refill_vision_ahead=2, or set infer.refill_prefill_ahead=false"
    assert settings_of().infer.refill_prefill == "auto"  # valid at batch 1 too: it only picks, where it applies
    assert settings_of("infer.batch_size=4", "infer.refill_prefill=batched").infer.refill_prefill == "batched"
    assert settings_of("infer.batch_size=4", "infer.refill_prefill=per_page").infer.refill_prefill == "per_page"
    with pytest.raises(ConfigError, match=r"infer\.batching=static") as info:
        settings_of("infer.batch_size=4", "infer.batching=static", "infer.refill_prefill=per_page")
    assert info.value.hint == "add infer.batch_size=8 infer.batching=continuous, or set infer.refill_prefill=batched"
    ds = settings_of("dataset.target_lengths=lognormal", "dataset.target_median_tokens=1000").dataset
    assert (ds.target_lengths, ds.target_median_tokens, ds.target_sigma) == ("lognormal", 1000, 0.5)


def test_refill_prefill_auto_is_per_page_where_its_prefill_is_a_graph_replay() -> None:
    """``infer.refill_prefill``: an explicit choice holds either way; auto picks per_page only where the per-page
    prefill replays a CUDA graph (an eager per-page prefill pays the forward's launches per page)."""
    from llm_perf_opt.runners.settings import refill_per_page

    assert [refill_per_page(s, g) for s in ("auto", "batched", "per_page") for g in (True, False)] == [
        True,
        False,
        False,
        False,
        True,
        True,
    ]
