"""What the run ran on: Python, torch, CUDA, driver, GPU, CPU, package versions, git commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from llm_perf_opt.profiling.device import cpu_name, nvml_driver_version
from llm_perf_opt.profiling.mfu import Unavailable

PACKAGES = ("torch", "transformers", "hydra-core", "omegaconf", "attrs", "cattrs", "fvcore", "nvtx",
            "nvidia-ml-py", "pillow", "safetensors", "numpy", "matplotlib", "rich", "llm-perf-opt")  # fmt: skip


# A source revision given by whoever copied the tree here (a copied tree's own .git can name an older commit).
SOURCE_REV_ENV = "LLM_PERF_OPT_SOURCE_REV"


def git_commit(root: Path) -> str | None:
    """HEAD (``-dirty`` with uncommitted changes), or ``$LLM_PERF_OPT_SOURCE_REV`` when the tree was copied.

    A remote GPU machine may receive the working tree beside a stale ``.git``; the script that ships the tree
    names the revision it sent, and that wins (marked, so nobody mistakes it for git's own answer).
    """
    given = os.environ.get(SOURCE_REV_ENV, "").strip()
    if given:
        return f"{given} (from ${SOURCE_REV_ENV})"
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=False
    )
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def _driver(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    version = nvml_driver_version()
    return f"unavailable ({version.reason})" if isinstance(version, Unavailable) else version


def collect_env(root: Path, device: torch.device) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    gpu = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {
            "name": props.name,
            "memory_bytes": int(props.total_memory),
            "sm_count": int(props.multi_processor_count),
            "capability": f"{props.major}.{props.minor}",
        }
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "driver": _driver(device),
        "gpu": gpu,
        "torch_num_threads": torch.get_num_threads(),
        "packages": versions,
        "git_commit": git_commit(root),
    }
