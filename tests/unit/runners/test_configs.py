"""Every shipped config composes and validates; bad overrides fail with the right error."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.runners.settings import load_settings
from tests.conftest import CONF

ARCHES = sorted(p.stem for p in (CONF / "model/deepseek_ocr/arch").glob("*.yaml"))
INFERS = sorted(p.stem for p in (CONF / "model/deepseek_ocr/infer").glob("*.yaml"))
PROFILING = sorted(p.stem for p in (CONF / "profiling/torch").glob("*.yaml"))
# output.dir is ${hydra:runtime.output_dir}, which only a running Hydra app resolves
OUT = "output.dir=tmp/test-run"
DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))


# presets of DeepSeek-OCR-2 (model.family=deepseek_ocr2) and of v1, by file name
V2_ARCHES = [a for a in ARCHES if a.startswith("deepseek_ocr2.")]
V2_INFERS = [i for i in INFERS if i.startswith("deepseek_ocr2.")]
V1_ARCHES = [a for a in ARCHES if a not in V2_ARCHES]
V1_INFERS = [i for i in INFERS if i not in V2_INFERS]


def test_shipped_option_lists_are_complete() -> None:
    assert {"deepseek_ocr.default", "deepseek_ocr.tiny", "deepseek_ocr.dummy"} <= set(ARCHES)
    for mode in ("tiny", "small", "base", "large", "gundam"):
        assert f"deepseek_ocr.{mode}" in INFERS
    assert {"deepseek_ocr2.checkpoint", "deepseek_ocr2.dummy", "deepseek_ocr2.tiny"} == set(V2_ARCHES)
    assert {"deepseek_ocr2.default", "deepseek_ocr2.1024", "deepseek_ocr2.768"} == set(V2_INFERS)
    assert {"torch-profiler.default", "torch-profiler.min", "torch-profiler.max"} == set(PROFILING)
    assert {"synthetic", "omnidocbench", "folder"} == set(DATASETS)


# every arch with every infer preset of its family (DeepSeek-OCR-2's arches also run v1's default infer preset: the
# decoding rules are the same, the geometry is the arch's)
FAMILY_PAIRS = [(a, i) for a in V1_ARCHES for i in V1_INFERS] + [
    (a, i) for a in V2_ARCHES for i in [*V2_INFERS, "deepseek_ocr.default"]
]


@pytest.mark.parametrize(("arch", "infer"), FAMILY_PAIRS)
def test_every_arch_and_infer_mode_composes_and_validates(compose_cfg, arch: str, infer: str) -> None:
    cfg = compose_cfg([f"model/deepseek_ocr/arch={arch}", f"model/deepseek_ocr/infer={infer}", OUT])
    used = load_settings(cfg).resolved("cpu")
    if infer == "deepseek_ocr.vllm_gundam":  # vLLM's recipe: 6 tiles, n-gram 30 within 90 over the output, <td> exempt
        assert used.infer.preset == "vllm_gundam"
        assert (used.model.preprocess.min_crops, used.model.preprocess.max_crops) == (2, 6)
        assert (used.infer.no_repeat_ngram_window, used.infer.no_repeat_ngram_exempt_ids) == (90, (128821, 128822))
        assert used.infer.no_repeat_ngram_scope == "output"
    else:  # the reference infer(): 2..9 tiles (DeepSeek-OCR-2's processor: 2..6), HF's rule
        assert used.infer.preset == "reference_infer" and used.infer.ngram_rule.is_hf
        want = (2, 6) if arch in V2_ARCHES else (2, 9)
        assert (used.model.preprocess.min_crops, used.model.preprocess.max_crops) == want
    assert cfg.model.backend in ("native", "hf_remote")
    assert cfg.model.dtype in ("float32", "bfloat16", "float16")
    assert cfg.infer.temperature == 0.0
    # the reference infer() presets use HF's rule of size 20; the vLLM preset its own rule of size 30
    assert cfg.infer.no_repeat_ngram_size == (30 if infer == "deepseek_ocr.vllm_gundam" else 20)
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("hydra", "output")])
    OmegaConf.to_container(body, resolve=True)  # every interpolation outside hydra.* resolves


@pytest.mark.parametrize("preset", PROFILING)
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_profiling_preset_and_dataset_composes(compose_cfg, preset: str, dataset: str) -> None:
    overrides = [f"profiling/torch={preset}", f"dataset={dataset}", OUT]
    if dataset == "folder":
        overrides.append("dataset.root=/somewhere")
    cfg = compose_cfg(overrides)
    load_settings(cfg)
    assert set(cfg.profiling) >= {"activities", "record_shapes", "profile_memory", "with_stack", "rep_max_new_tokens",
                                  "warmup_rounds", "warmup_synthetic"}  # fmt: skip


# hand-written from DeepSeek-OCR-2's processor: (global view px, tile px, crop mode) of each mode
V2_GEOMETRY = {
    "deepseek_ocr2.default": (1024, 768, True),
    "deepseek_ocr2.1024": (1024, 1024, False),
    "deepseek_ocr2.768": (768, 768, False),
}


@pytest.mark.parametrize("arch", ["deepseek_ocr2.checkpoint", "deepseek_ocr2.dummy", "deepseek_ocr2.tiny"])
@pytest.mark.parametrize("infer", sorted(V2_GEOMETRY))
def test_v2_presets_resolve_to_the_processor_geometry(compose_cfg, arch: str, infer: str) -> None:
    settings = load_settings(compose_cfg([f"model/deepseek_ocr/arch={arch}", f"model/deepseek_ocr/infer={infer}", OUT]))
    assert settings.model.family == "deepseek_ocr2" and settings.model.backend == "native"
    pre = settings.resolved("cpu").model.preprocess
    assert (pre.base_size, pre.image_size, pre.crop_mode) == V2_GEOMETRY[infer]
    assert (pre.min_crops, pre.max_crops) == (2, 6)
    want = {"deepseek_ocr2.tiny": ("dummy", "builtin:tiny", "float32"),
            "deepseek_ocr2.dummy": ("dummy", "builtin:deepseek-ocr2", "bfloat16"),
            "deepseek_ocr2.checkpoint": ("checkpoint", "builtin:deepseek-ocr2", "bfloat16")}[arch]  # fmt: skip
    assert (settings.model.weights, settings.model.config_json, settings.model.dtype) == want


@pytest.mark.parametrize("arch", V1_ARCHES)
@pytest.mark.parametrize("infer", sorted(V2_GEOMETRY))
def test_v2_infer_preset_refuses_a_v1_model(compose_cfg, arch: str, infer: str) -> None:
    with pytest.raises(ConfigError, match=r"infer preset is for model\.family=deepseek_ocr2") as err:
        load_settings(compose_cfg([f"model/deepseek_ocr/arch={arch}", f"model/deepseek_ocr/infer={infer}", OUT]))
    assert err.value.hint and "deepseek_ocr2" in err.value.hint


@pytest.mark.parametrize("mode", ["tiny", "small", "large", "gundam"])
def test_v1_modes_with_other_view_sizes_refuse_a_v2_model(compose_cfg, mode: str) -> None:
    with pytest.raises(ConfigError, match="DeepSeek-OCR-2 views are 768 or 1024 px"):
        load_settings(
            compose_cfg(
                ["model/deepseek_ocr/arch=deepseek_ocr2.tiny", f"model/deepseek_ocr/infer=deepseek_ocr.{mode}", OUT]
            )
        )


def test_v2_refuses_what_only_v1_has(compose_cfg) -> None:
    with pytest.raises(ConfigError, match=r"runs on model\.backend=native or hf_native"):
        load_settings(compose_cfg(["model/deepseek_ocr/arch=deepseek_ocr2.dummy", "model.backend=hf_remote", OUT]))


def test_v2_takes_the_batched_phase(compose_cfg) -> None:
    """The batched phase applies to DeepSeek-OCR-2 on the native backend (it used to be refused here); on
    transformers' class it stays refused, as for every backend but native."""
    s = load_settings(
        compose_cfg(["model/deepseek_ocr/arch=deepseek_ocr2.dummy", "infer.batch_size=4", "infer.batching=static", OUT])
    )
    assert s.model.family == "deepseek_ocr2" and (s.infer.batch_size, s.infer.batching) == (4, "static")
    hf_native = ["model/deepseek_ocr/arch=deepseek_ocr2.dummy", "model.backend=hf_native", "infer.batch_size=4", OUT]
    with pytest.raises(ConfigError, match=r"batch_size > 1 needs model\.backend=native"):
        load_settings(compose_cfg(hf_native))


def test_v2_takes_the_fast_path(compose_cfg) -> None:
    """The fast path applies to DeepSeek-OCR-2 (v1's language model and SAM, the encoder's own); it used to be
    refused here, so the settings must now carry every switch through."""
    s = load_settings(
        compose_cfg(
            [
                "model/deepseek_ocr/arch=deepseek_ocr2.dummy",
                "infer.fast.enabled=true",
                "infer.fast.sam_compile=false",
                OUT,
            ]
        )
    )
    assert s.model.family == "deepseek_ocr2" and s.infer.fast.enabled
    assert s.infer.fast.switches.sam_compile is False and s.infer.fast.switches.vision_graphs is True
    assert s.resolved("cpu").infer.fast.switches.vision_graphs is False  # CUDA-only, off on the CPU as for v1


def test_seed_names_and_defaults(compose_cfg) -> None:
    cfg = compose_cfg([OUT])
    assert cfg.experiment == "stage1"
    assert cfg.device == "cpu"
    assert cfg.model.name == "deepseek-ocr-tiny"
    assert load_settings(cfg).token_cap == 64
    ds = compose_cfg(["dataset=omnidocbench"]).dataset
    assert ds.root == "datasets/omnidocbench/source-data"
    assert list(ds.fallback_patterns) == ["images/*.png", "images/*.jpg"]
    assert "subset_filelist" in ds
    default = compose_cfg(["model/deepseek_ocr/arch=deepseek_ocr.default"])
    assert default.infer.max_new_tokens == 8192
    assert default.model.path == "models/deepseek-ocr"
    assert default.model.preprocess.base_size == 1024 and default.model.preprocess.image_size == 640


def test_run_dir_is_sortable_timestamp_plus_suffix(compose_cfg) -> None:
    cfg = compose_cfg()
    run_dir = cfg.hydra.run.dir
    assert run_dir.startswith("tmp/stage1/")
    stamp, suffix = run_dir.removeprefix("tmp/stage1/").rsplit("-", 1)
    assert len(stamp) == len("20260101-000000") and len(suffix) == 4


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("repeats=0", "repeats must be an integer >= 1"),
        ("repeats=-2", "repeats must be an integer >= 1"),
        ("infer.max_new_tokens=0", "max_new_tokens must be an integer >= 1"),
        ("infer.max_new_tokens=-5", "max_new_tokens must be an integer >= 1"),
        ("model.prompt=no-image-here", "exactly one <image>"),
    ],
)
def test_out_of_range_values_are_config_errors(compose_cfg, override: str, match: str) -> None:
    cfg = compose_cfg([override, OUT])
    with pytest.raises(ConfigError, match=match):
        load_settings(cfg)


def test_unknown_group_option_and_misspelled_key_fail_in_hydra(compose_cfg) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["dataset=nope"])
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["repeatz=3"])


@pytest.mark.parametrize("preset", ["local_parallel", "slurm_gpu"])
def test_launcher_presets_compose(compose_cfg, preset: str) -> None:
    cfg = compose_cfg([f"hydra/launcher={preset}"])
    target = cfg.hydra.launcher._target_
    assert ("Joblib" in target) if preset == "local_parallel" else ("Slurm" in target)
    if preset == "slurm_gpu":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min == 60


def test_ray_preset_composes_when_plugin_installed(compose_cfg) -> None:
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="hydra-ray-launcher is optional (needs ray)")
    cfg = compose_cfg(["hydra/launcher=ray_local"])
    assert cfg.hydra.launcher.ray.remote.num_gpus == 1
