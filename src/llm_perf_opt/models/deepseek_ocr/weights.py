"""Build the native DeepSeek-OCR model on a device: safetensors checkpoint or seeded dummy weights.

The 3.3 B-parameter model is never materialised twice: it is constructed with its *parameters* on the
meta device (buffers such as CLIP's ``position_ids`` are real, so they keep their values), then every
parameter gets uninitialised storage directly on the target device/dtype, and finally each checkpoint
tensor is read from the memory-mapped safetensors file and copied into its parameter one at a time.
Peak host memory is one tensor, not one model.

Every problem a user can cause (wrong directory, no weight files, a checkpoint for another
architecture, an unknown dtype, a missing GPU) is a :mod:`llm_perf_opt.errors` error with a hint.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from llm_perf_opt.errors import DeviceError, ModelLoadError
from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig
from llm_perf_opt.models.deepseek_ocr.model import DeepseekOCRForCausalLM

__all__ = [
    "DTYPES",
    "build_model",
    "empty_model",
    "find_weight_files",
    "init_dummy_weights",
    "load_weights",
    "materialize",
    "resolve_device",
    "resolve_dtype",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DUMMY_STD = 0.02
_MAX_LISTED = 10


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name (``bf16``, ``float32``, ...) or a torch dtype to a supported torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _SUPPORTED:
            raise DeviceError(f"unsupported dtype {dtype}", hint=f"use one of {sorted(DTYPES)}")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise DeviceError(f"unknown dtype {dtype!r}", hint=f"use one of {sorted(DTYPES)}")
    return DTYPES[key]


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse a device and check it exists on this machine."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(
            f"unknown device string {str(device)!r}", hint="use device=cpu, device=cuda or device=cuda:N"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device={device} requested but CUDA is not available on this machine",
                hint="run with device=cpu (the tiny model is the default), "
                "or on a machine with an NVIDIA GPU and CUDA torch",
            )
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    if dev.type not in ("cpu", "meta"):
        raise DeviceError(f"device type {dev.type!r} is not supported", hint="use device=cpu or device=cuda:N")
    return dev


def check_dtype_on_device(dtype: torch.dtype, device: torch.device) -> None:
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DeviceError(
            f"bfloat16 is not supported on {torch.cuda.get_device_name(device)}", hint="use dtype=float16"
        )
    # float16 / bfloat16 on CPU are allowed (slow matmuls for fp16, but correct).


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` on the meta device while modules are constructed; buffers stay real.

    Parameters are swapped for meta ones the moment they are registered, so the default initialisers
    that modules run afterwards (``reset_parameters``) are free no-ops.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    setattr(nn.Module, "register_parameter", register)  # noqa: B010 - a plain assignment upsets mypy
    try:
        yield
    finally:
        setattr(nn.Module, "register_parameter", original)  # noqa: B010


def empty_model(cfg: DeepseekOCRConfig) -> DeepseekOCRForCausalLM:
    """The full module tree with parameters on the meta device (no memory), buffers real on the CPU."""
    with _parameters_on_meta():
        return DeepseekOCRForCausalLM(cfg)


def materialize(model: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """Give every parameter storage on ``device`` (floating ones in ``dtype``); contents are uninitialised
    for meta parameters, converted for real ones.  Buffers are moved (floating buffers cast to ``dtype``).
    """
    dev = torch.device(device)
    converted: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) in converted:  # tied parameters stay tied
                module._parameters[name] = converted[id(param)]
                continue
            target = dtype if param.is_floating_point() else param.dtype
            if param.is_meta:
                data = torch.empty(param.shape, device=dev, dtype=target)
            else:
                data = param.detach().to(device=dev, dtype=target)
            new = nn.Parameter(data, requires_grad=False)
            converted[id(param)] = new
            module._parameters[name] = new
        for name, buf in list(module._buffers.items()):
            if buf is None:
                continue
            if buf.is_meta:
                raise ModelLoadError(
                    f"buffer {name!r} of {type(module).__name__} was created on the meta device; its values are lost",
                    hint="build the model with weights.empty_model(), which keeps buffers real",
                )
            module._buffers[name] = buf.to(device=dev, dtype=dtype if buf.is_floating_point() else buf.dtype)
    return model


def _has_meta_params(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


# ---------------------------------------------------------------------------------------------- loading
def find_weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (index-listed shards, ``model.safetensors`` or any
    ``*.safetensors``) or the file itself.  A directory must hold ``config.json``.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(
            f"checkpoint path not found: {path}",
            hint="point model.path at a DeepSeek-OCR snapshot directory (config.json + *.safetensors)",
        )
    if not path.is_dir():
        require_regular_file(path)  # a FIFO or device would block in open() or read forever
    if path.is_file():
        if path.name.endswith(".json"):
            return _shards_from_index(path)
        if not path.name.endswith(".safetensors"):
            raise ModelLoadError(
                f"{path} is not a .safetensors file", hint="only safetensors checkpoints are supported"
            )
        return [path]
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"checkpoint directory {path} has no config.json",
            hint="download the full deepseek-ai/DeepSeek-OCR snapshot (config.json + model weights) into it",
        )
    if (path / INDEX_FILE).is_file():
        return _shards_from_index(path / INDEX_FILE)
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    extra = f"; found only {', '.join(others[:_MAX_LISTED])} (not safetensors)" if others else ""
    raise ModelLoadError(
        f"no weight files in {path}: expected {INDEX_FILE} (sharded), {SINGLE_FILE}, or another *.safetensors{extra}",
        hint="download the weights (huggingface-cli download deepseek-ai/DeepSeek-OCR --local-dir <dir>)",
    )


def require_regular_file(path: Path) -> None:
    """Refuse FIFOs, devices and sockets before opening them: open() on a FIFO blocks with no writer."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        raise ModelLoadError(
            f"{path} is not a regular file (a FIFO, device or socket)",
            hint="the checkpoint directory must hold plain config.json / *.safetensors files",
        )


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{index} is not a valid safetensors index ({exc})") from exc
    shards = sorted({str(name) for name in weight_map.values()})
    files = [index.parent / name for name in shards]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise ModelLoadError(
            f"{index.name} lists {len(absent)} shard(s) missing from {index.parent}: {', '.join(absent[:_MAX_LISTED])}",
            hint="the download is incomplete; fetch the missing shards",
        )
    return files


def _read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """key -> (file, shape) for every tensor in ``files``, reading only the headers."""
    from safetensors import SafetensorError, safe_open

    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        require_regular_file(file)
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                names = handle.keys()
                for key in names:
                    if key in found:
                        raise ModelLoadError(f"tensor {key!r} appears in both {found[key][0].name} and {file.name}")
                    found[key] = (file, tuple(handle.get_slice(key).get_shape()))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"cannot read {file} as safetensors ({exc})", hint="re-download the file") from exc
    return found


def _listing(names: set[str] | list[str]) -> str:
    ordered = sorted(names)
    shown = ", ".join(ordered[:_MAX_LISTED])
    more = f", ... ({len(ordered) - _MAX_LISTED} more)" if len(ordered) > _MAX_LISTED else ""
    return f"{shown}{more}"


def load_weights(
    model: nn.Module,
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> nn.Module:
    """Load a safetensors checkpoint (file, directory, or sharded via ``model.safetensors.index.json``) into
    ``model`` by exact key match, tensor by tensor, converting to each parameter's dtype/device.

    Parameters still on the meta device are first materialised on ``device``/``dtype`` (default cpu / float32).
    All keys and shapes are checked before anything is copied.
    """
    files = find_weight_files(path)
    found = _read_headers(files)
    targets = model.state_dict(keep_vars=True)
    missing = set(targets) - set(found)
    unexpected = set(found) - set(targets)
    where = Path(path)
    if missing:
        raise ModelLoadError(
            f"{len(missing)} weight(s) missing from {where}: {_listing(missing)}",
            hint="the checkpoint does not match this architecture/config (is config.json from the same snapshot?)",
        )
    if unexpected:
        raise ModelLoadError(
            f"{len(unexpected)} unexpected weight(s) in {where}: {_listing(unexpected)}",
            hint="the checkpoint does not match this architecture/config (is config.json from the same snapshot?)",
        )
    wrong = [
        f"{key}: expected {tuple(targets[key].shape)}, found {shape}"
        for key, (_, shape) in sorted(found.items())
        if tuple(targets[key].shape) != shape
    ]
    if wrong:
        raise ModelLoadError(
            f"{len(wrong)} weight(s) in {where} have the wrong shape: {'; '.join(wrong[:_MAX_LISTED])}"
            + (f"; ... ({len(wrong) - _MAX_LISTED} more)" if len(wrong) > _MAX_LISTED else ""),
            hint="config.json does not describe these weights (sizes differ)",
        )

    if _has_meta_params(model):
        target_device = resolve_device(device if device is not None else "cpu")
        target_dtype = resolve_dtype(dtype if dtype is not None else torch.float32)
        check_dtype_on_device(target_dtype, target_device)
        materialize(model, target_device, target_dtype)
        targets = model.state_dict(keep_vars=True)

    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for key, (file, _) in found.items():
        by_file.setdefault(file, []).append(key)
    with torch.no_grad():
        for file, keys in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in keys:
                    targets[key].copy_(handle.get_tensor(key))
    return model


# ---------------------------------------------------------------------------------------------- dummy init
def _param_seed(seed: int, name: str) -> int:
    """Per-tensor seed from the run seed and the parameter name: values don't depend on iteration order."""
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63 - 1)


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__


def _fill_random(param: nn.Parameter, seed: int) -> None:
    with torch.no_grad():  # grad mode is per thread
        gen = torch.Generator(device="cpu").manual_seed(seed)
        param.copy_(torch.empty(param.shape, dtype=torch.float32).normal_(0.0, DUMMY_STD, generator=gen))


def init_dummy_weights(model: nn.Module, seed: int = 0, workers: int | None = None) -> nn.Module:
    """Seeded random weights for profiling without a checkpoint.

    Norm weights (any module whose class name contains ``Norm``) are 1, biases are 0, everything else is
    normal(0, 0.02).  Random values are drawn on the CPU in float32 from a generator seeded per tensor
    (run seed + parameter name) and then copied/cast to the parameter, so a seed gives the same float32
    values on any device, and bit-identical weights for the same dtype.  Because every tensor has its own
    generator, tensors are filled by a thread pool (``workers``, default up to 8) without changing a value:
    3.3 B draws take ~30 s on one core.
    """
    if _has_meta_params(model):
        raise ModelLoadError("init_dummy_weights needs materialised parameters", hint="call materialize() first")
    modules = dict(model.named_modules())
    random_params: list[tuple[nn.Parameter, int]] = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            owner_name, _, leaf = name.rpartition(".")
            if _is_norm(modules[owner_name]):
                param.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                param.zero_()
            else:
                random_params.append((param, _param_seed(seed, name)))
    random_params.sort(key=lambda item: -item[0].numel())  # largest first: better balance across threads
    n_workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    if n_workers <= 1:
        for param, param_seed in random_params:
            _fill_random(param, param_seed)
    else:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            list(pool.map(lambda item: _fill_random(*item), random_params))
    return model


ModelT = TypeVar("ModelT", bound=torch.nn.Module)


# ---------------------------------------------------------------------------------------------- entry point
def build_model(
    cfg: DeepseekOCRConfig,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    weights: str | Path = "dummy",
    seed: int = 0,
) -> DeepseekOCRForCausalLM:
    """Build on meta, materialise on ``device``/``dtype``, then load ``weights`` (a checkpoint path) or
    initialise seeded dummy weights (``weights="dummy"``).  Returns the model in eval mode, no grads.
    """
    return populate(empty_model(cfg), device, dtype, weights, seed)


def populate(
    model: ModelT, device: str | torch.device, dtype: str | torch.dtype, weights: str | Path, seed: int
) -> ModelT:
    """A model built on meta, given ``weights`` (a checkpoint path, loaded key for key) or seeded dummy weights
    (``weights="dummy"``) on ``device``/``dtype``; eval mode, no grads.  Shared by DeepSeek-OCR and -OCR-2."""
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype)
    check_dtype_on_device(target_dtype, target_device)
    if isinstance(weights, str) and weights == "dummy":
        materialize(model, target_device, target_dtype)
        init_dummy_weights(model, seed)
    else:
        load_weights(model, weights, target_device, target_dtype)
    model.eval()
    model.requires_grad_(False)
    return model
