"""Peak table, device-name matching, peak resolution and the NVML sampler (mocked NVML + the real null path)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.profiling import device, peaks
from llm_perf_opt.profiling import nvml as sampling
from llm_perf_opt.profiling.mfu import Unavailable
from llm_perf_opt.profiling.nvml import NvmlSample, NvmlSampler

# ------------------------------------------------------------------------------------------------
# Peak table and matching
# ------------------------------------------------------------------------------------------------


def test_table_entries_are_sourced_and_dense() -> None:
    names = [s.name for s in peaks.PEAK_TABLE]
    assert len(names) == len(set(names))
    for spec in peaks.PEAK_TABLE:
        assert spec.source_title and spec.source_url.startswith("https://")
        assert spec.patterns
        # Ordering that holds on every listed part: bf16 tensor >= tf32 tensor >= fp32 CUDA cores.
        assert spec.bf16_dense_flops >= spec.tf32_flops >= spec.fp32_flops > 0
        assert spec.mem_bw_bytes_per_s > 1e11


@pytest.mark.parametrize(
    ("device_name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"),
        ("NVIDIA H100 SXM5 80GB", "NVIDIA H100 SXM5 80GB"),
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe 80GB"),
        ("NVIDIA H200", "NVIDIA H200 SXM 141GB"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 SXM4 80GB"),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 SXM4 40GB"),
        ("NVIDIA A100 80GB PCIe", "NVIDIA A100 PCIe 80GB"),
        ("NVIDIA A100-PCIE-40GB", "NVIDIA A100 PCIe 40GB"),
        ("NVIDIA L40S", "NVIDIA L40S"),
        ("NVIDIA L4", "NVIDIA L4"),
        ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090"),
        ("NVIDIA B200", "NVIDIA B200 (HGX, 1000 W)"),
    ],
)
def test_match_peak_known(device_name: str, expected: str) -> None:
    spec = peaks.match_peak(device_name)
    assert spec is not None and spec.name == expected


@pytest.mark.parametrize(
    "device_name",
    ["NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "NVIDIA GB200", "NVIDIA L40", "NVIDIA A100",
     "NVIDIA GeForce RTX 4090 D", "NVIDIA GeForce RTX 4090 Laptop GPU", "Tesla T4", "cpu", ""],
)  # fmt: skip
def test_match_peak_unknown_or_ambiguous_is_none(device_name: str) -> None:
    assert peaks.match_peak(device_name) is None


def test_h100_sxm_numbers() -> None:
    spec = peaks.match_peak("NVIDIA H100 80GB HBM3")
    assert spec is not None
    assert spec.bf16_dense_flops == pytest.approx(989.5e12)  # 1,979 TFLOPS with sparsity / 2
    assert spec.mem_bw_bytes_per_s == pytest.approx(3.35e12)


# ------------------------------------------------------------------------------------------------
# resolve_peak
# ------------------------------------------------------------------------------------------------


def test_resolve_peak_known_gpu_per_dtype() -> None:
    flops, bw, src = peaks.resolve_peak("NVIDIA H100 80GB HBM3", "bfloat16")
    assert flops == pytest.approx(989.5e12) and bw == pytest.approx(3.35e12)
    assert "H100 Tensor Core GPU Datasheet" in str(src) and "https://" in src.flops
    fp32, _, _ = peaks.resolve_peak("NVIDIA H100 80GB HBM3", "float32")
    tf32, _, src32 = peaks.resolve_peak("NVIDIA H100 80GB HBM3", "torch.float32", allow_tf32=True)
    assert fp32 == pytest.approx(67e12) and tf32 == pytest.approx(494.5e12)
    assert "TF32" in src32.flops
    unknown_dtype, _, _ = peaks.resolve_peak("NVIDIA H100 80GB HBM3", "int8")
    assert isinstance(unknown_dtype, Unavailable) and "int8" in unknown_dtype.reason


def test_resolve_peak_cpu_and_unknown_are_unavailable() -> None:
    flops, bw, src = peaks.resolve_peak("cpu", "bfloat16")
    assert isinstance(flops, Unavailable) and isinstance(bw, Unavailable)
    assert "CPU" in flops.reason and "peak.flops_per_s" in flops.reason
    assert src.flops == "unavailable"
    flops, _, _ = peaks.resolve_peak("NVIDIA H100 NVL", "bfloat16")
    assert isinstance(flops, Unavailable) and "not in the sourced peak table" in flops.reason
    flops, _, _ = peaks.resolve_peak(None, "bfloat16")
    assert isinstance(flops, Unavailable)


def test_resolve_peak_override_wins_and_is_labelled() -> None:
    flops, bw, src = peaks.resolve_peak("NVIDIA H100 80GB HBM3", "bfloat16", override_flops=800e12)
    assert flops == 800e12 and bw == pytest.approx(3.35e12)
    assert src.flops.startswith("user override") and "Datasheet" in src.bw
    flops, bw, src = peaks.resolve_peak("cpu", "float32", override_flops=2e12, override_bw=100e9)
    assert (flops, bw) == (2e12, 100e9)
    assert str(src) == "FLOP/s: user override (peak.flops_per_s); bandwidth: user override (peak.bw_bytes_per_s)"
    with pytest.raises(ConfigError):
        peaks.resolve_peak("cpu", "float32", override_flops=0)
    with pytest.raises(ConfigError):
        peaks.resolve_peak("cpu", "float32", override_bw=-1.0)


def test_detect_cpu_device() -> None:
    facts = device.detect_device("cpu")
    assert facts.device == "cpu" and facts.gpu_name is None and facts.cpu


def test_throttle_reason_names() -> None:
    assert sampling.throttle_reason_names(0) == ()
    assert sampling.throttle_reason_names(0x1 | 0x4) == ("gpu_idle", "sw_power_cap")
    assert sampling.throttle_reason_names(0x10000) == ("0x10000",)


# ------------------------------------------------------------------------------------------------
# Energy math on given samples
# ------------------------------------------------------------------------------------------------


def _samples(powers_w: list[float], dt: float = 0.1, energy: bool = True) -> list[NvmlSample]:
    out, e_mj = [], 0.0
    for i, p in enumerate(powers_w):
        if i:
            e_mj += (powers_w[i - 1] + p) / 2 * dt * 1000
        out.append(NvmlSample(i * dt, p, 1980, 2619, 50, 0, round(e_mj) if energy else None))
    return out


def test_trapezoid_energy_with_interpolated_edges() -> None:
    s = _samples([100.0, 200.0, 200.0, 100.0])  # t = 0, .1, .2, .3
    full = sampling.energy_from_power_j(s, 0.0, 0.3)
    assert not isinstance(full, Unavailable)
    assert full.energy_j == pytest.approx(0.1 * 150 + 0.1 * 200 + 0.1 * 150)
    part = sampling.energy_from_power_j(s, 0.05, 0.15)  # edges interpolated: 150 W and 200 W; sample at .1: 200 W
    assert not isinstance(part, Unavailable)
    assert part.energy_j == pytest.approx(0.05 * (150 + 200) / 2 + 0.05 * (200 + 200) / 2)
    assert part.method == "power_trapezoid" and part.samples_in_window == 1


def test_counter_energy_and_window_checks() -> None:
    s = _samples([100.0, 200.0, 200.0, 100.0])
    reading = sampling.energy_from_counter_j(s, 0.0, 0.3)
    assert not isinstance(reading, Unavailable)
    assert reading.method == "nvml_total_energy_counter" and reading.energy_j == pytest.approx(50.0)
    assert isinstance(sampling.energy_from_counter_j(s, 0.0, 0.5), Unavailable)  # past the last sample
    assert isinstance(sampling.energy_from_power_j(s, 0.2, 0.1), Unavailable)  # t1 <= t0
    assert isinstance(sampling.energy_from_counter_j(_samples([1.0, 2.0], energy=False), 0, 0.1), Unavailable)


# ------------------------------------------------------------------------------------------------
# The sampler: mocked NVML for the thread + math, the real null path on this CPU machine
# ------------------------------------------------------------------------------------------------


class _NotSupported(Exception):
    pass


def _fake_nvml(power_w: float = 250.0, energy: bool = True) -> Any:
    t0 = time.perf_counter()
    calls = {"init": 0, "shutdown": 0}

    def energy_mj(handle: object) -> int:
        if not energy:
            raise _NotSupported("Not Supported")
        return int((time.perf_counter() - t0) * power_w * 1000)

    def init() -> None:
        calls["init"] += 1

    def shutdown() -> None:
        calls["shutdown"] += 1

    return SimpleNamespace(
        calls=calls,
        NVML_CLOCK_SM=1,
        NVML_CLOCK_MEM=2,
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=init,
        nvmlShutdown=shutdown,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetPowerUsage=lambda h: int(power_w * 1000),
        nvmlDeviceGetClockInfo=lambda h, kind: 1980 if kind == 1 else 2619,
        nvmlDeviceGetTemperature=lambda h, sensor: 41,
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: 0x4,
        nvmlDeviceGetTotalEnergyConsumption=energy_mj,
    )


@pytest.mark.parametrize("counter", [True, False])
def test_sampler_with_mocked_nvml(counter: bool) -> None:
    nvml = _fake_nvml(power_w=250.0, energy=counter)
    with NvmlSampler(index=0, interval_s=0.005, max_samples=10_000, nvml_module=nvml) as s:
        assert s.available and s.counter_supported is counter
        time.sleep(0.02)
        t0 = s.now_s()
        time.sleep(0.1)
        t1 = s.now_s()
        time.sleep(0.02)
    assert nvml.calls == {"init": 1, "shutdown": 1}
    reading = s.energy_j(t0, t1)
    assert not isinstance(reading, Unavailable)
    assert reading.method == ("nvml_total_energy_counter" if counter else "power_trapezoid")
    assert reading.energy_j == pytest.approx(250.0 * (t1 - t0), rel=0.05)
    if not counter:
        assert "Not Supported" in reading.note
    summary = s.summary(t0, t1)
    assert not isinstance(summary, Unavailable)
    assert summary.mean_power_w == pytest.approx(250.0) and summary.min_sm_clock_mhz == 1980
    assert summary.max_temperature_c == 41 and summary.throttle_reasons_seen == ("sw_power_cap",)
    assert s.thread_error is None


def test_sampler_prefers_instantaneous_power_field() -> None:
    nvml = _fake_nvml(power_w=250.0, energy=False)  # averaged reading says 250 W
    nvml.NVML_FI_DEV_POWER_INSTANT = 186
    nvml.nvmlDeviceGetFieldValues = lambda h, ids: [
        SimpleNamespace(nvmlReturn=0, valueType=1, value=SimpleNamespace(uiVal=300_000))
    ]
    with NvmlSampler(interval_s=0.005, nvml_module=nvml) as s:
        t0 = s.now_s()
        time.sleep(0.05)
        t1 = s.now_s()
    assert s.power_source == "instant"
    reading = s.energy_j(t0, t1)
    assert not isinstance(reading, Unavailable) and reading.mean_power_w == pytest.approx(300.0)


def test_sampler_ring_buffer_is_bounded() -> None:
    with NvmlSampler(interval_s=0.001, max_samples=5, nvml_module=_fake_nvml()) as s:
        time.sleep(0.05)
    assert len(s.samples()) == 5 and s.dropped_samples > 0
    old = s.energy_j(0.0, s.samples()[-1].t_s)  # window starts before the buffer's oldest sample
    assert isinstance(old, Unavailable) and "ring buffer" in old.reason


def test_sampler_null_path_is_real_on_this_machine() -> None:
    """No NVIDIA driver here: NVML fails for real and every result says why."""
    pytest.importorskip("pynvml")
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine; the null path is covered by test_sampler_init_failure")
    with NvmlSampler(index=0) as s:
        assert not s.available
    assert s.unavailable_reason is not None and s.unavailable_reason.startswith("NVML unavailable:")
    for result in (s.energy_j(0.0, 1.0), s.summary()):
        assert isinstance(result, Unavailable) and result.reason == s.unavailable_reason
    assert s.samples() == []


def test_sampler_init_failure_and_missing_device() -> None:
    def boom() -> None:
        raise RuntimeError("Driver Not Loaded")

    nvml = _fake_nvml()
    nvml.nvmlInit = boom
    with NvmlSampler(nvml_module=nvml) as s:
        pass
    result = s.energy_j(0.0, 1.0)
    assert isinstance(result, Unavailable) and "Driver Not Loaded" in result.reason

    nvml = _fake_nvml()

    def no_device(i: int) -> None:
        raise RuntimeError("Invalid Argument")

    nvml.nvmlDeviceGetHandleByIndex = no_device
    with NvmlSampler(index=7, nvml_module=nvml) as s:
        pass
    assert s.unavailable_reason is not None and "no device 7" in s.unavailable_reason
    assert nvml.calls["shutdown"] == 1


def test_sampler_not_started() -> None:
    result = NvmlSampler().energy_j(0.0, 1.0)
    assert isinstance(result, Unavailable) and "never started" in result.reason


def test_benchmark_header_on_cpu() -> None:
    import torch

    from llm_perf_opt.profiling.bench_meta import benchmark_header

    h = benchmark_header("cpu")
    assert h["gpu"] == "cpu" and h["driver"] == "-" and h["cuda"] == "-"
    assert h["torch"] == torch.__version__ and h["date"].endswith("UTC")


@pytest.mark.parametrize(
    ("name", "tag"),
    [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"),
     ("NVIDIA L40S", "l40s"), ("NVIDIA L4", "l4"), ("Tesla T4", "t4")],
)  # fmt: skip
def test_gpu_tag_names_result_files(name: str, tag: str) -> None:
    from llm_perf_opt.profiling.bench_meta import gpu_tag

    assert gpu_tag(name) == tag
