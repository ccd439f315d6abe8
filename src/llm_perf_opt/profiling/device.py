"""What this machine is (GPU, driver, CUDA, torch, CPU), for the run's hardware record and env.json."""

from __future__ import annotations

import importlib
import platform

import attrs

from llm_perf_opt.profiling.mfu import Unavailable

__all__ = ["DeviceFacts", "cpu_name", "detect_device", "nvml_driver_version"]


@attrs.frozen
class DeviceFacts:
    """What this machine is: the fields HardwareInfo needs, plus a few that explain the numbers."""

    device: str
    gpu_name: str | None
    driver: str | None
    cuda: str | None
    torch: str
    cpu: str
    compute_capability: tuple[int, int] | None = None
    total_memory_bytes: int | None = None
    multiprocessors: int | None = None
    pci_bus_id: str | None = None
    notes: tuple[str, ...] = ()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError as exc:  # not Linux: fall back to platform's answer, noting nothing is lost
        return platform.processor() or f"{platform.machine()} (cpu model unknown: {exc.strerror})"
    return platform.processor() or platform.machine()


def nvml_driver_version() -> str | Unavailable:
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError as exc:
        return Unavailable(f"pynvml not importable: {exc}")
    try:
        nvml.nvmlInit()
    except Exception as exc:  # pynvml raises NVMLError subclasses; keep the text as the reason
        return Unavailable(f"NVML unavailable: {exc}")
    try:
        version = nvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception as exc:
        return Unavailable(f"NVML driver version query failed: {exc}")
    finally:
        nvml.nvmlShutdown()


def detect_device(device: object) -> DeviceFacts:
    """Facts about ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``)."""
    import torch

    dev = torch.device(str(device))
    notes: list[str] = []
    if dev.type != "cuda":
        return DeviceFacts(
            device=str(dev),
            gpu_name=None,
            driver=None,
            cuda=torch.version.cuda,
            torch=torch.__version__,
            cpu=cpu_name(),
        )
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    bus = None
    pci = [getattr(props, a, None) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
    if all(isinstance(v, int) for v in pci):
        bus = f"{pci[0]:08X}:{pci[1]:02X}:{pci[2]:02X}.0"
    driver = nvml_driver_version()
    if isinstance(driver, Unavailable):
        notes.append(driver.reason)
    return DeviceFacts(
        device=f"cuda:{index}",
        gpu_name=torch.cuda.get_device_name(index),
        driver=None if isinstance(driver, Unavailable) else driver,
        cuda=torch.version.cuda,
        torch=torch.__version__,
        cpu=cpu_name(),
        compute_capability=(props.major, props.minor),
        total_memory_bytes=int(props.total_memory),
        multiprocessors=int(props.multi_processor_count),
        pci_bus_id=bus,
        notes=tuple(notes),
    )
