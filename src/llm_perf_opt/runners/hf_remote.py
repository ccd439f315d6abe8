"""Backend ``hf_remote``: the vendor's own remote code from a DeepSeek-OCR snapshot, driven with the same
prefill/decode split as the native model.

Prefill = the vendor forward with images (vision + first LM forward); decode = single-token forwards with
``past_key_values``.  Never ``generate()``, which would hide prefill inside the decode timing.  The vendor
code needs transformers 4.46.x (``pip install -e ".[hf]"``) and CUDA (it calls ``.cuda()`` internally).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import torch

from llm_perf_opt.errors import DeviceError, ModelLoadError

HF_HOOKS = {"sam": "model.sam_model", "clip": "model.vision_model", "projector": "model.projector"}


def _check_environment(device: torch.device) -> None:
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError("backend=hf_remote needs transformers", hint='pip install -e ".[hf]"') from exc
    major_minor = tuple(int(x) for x in version.split(".")[:2])
    if major_minor > (4, 47):
        raise ModelLoadError(
            f"backend=hf_remote needs transformers 4.46.x (the vendor remote code breaks on newer), found {version}",
            hint='pip install -e ".[hf]" in a separate environment, or use model.backend=native',
        )
    if device.type != "cuda":
        raise DeviceError(
            "backend=hf_remote needs CUDA: the vendor code calls .cuda() internally",
            hint="use device=cuda:0, or model.backend=native (runs on CPU too)",
        )


class HfRemoteState:
    def __init__(self, past: Any, length: int) -> None:
        self.past = past
        self.length = length
        self.nbytes = 0


class HfRemoteBackend:
    """AutoModel/AutoTokenizer with trust_remote_code from the snapshot directory."""

    name = "hf_remote"

    def __init__(self, model_cfg: Any, device: torch.device, dtype: torch.dtype, project_root: Path) -> None:
        from transformers import AutoModel, AutoTokenizer

        from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig
        from llm_perf_opt.models.deepseek_ocr.preprocess import PreprocessConfig

        _check_environment(device)
        path = Path(str(model_cfg.get("path") or ""))
        if not path.is_absolute():
            path = project_root / path
        if not (path / "config.json").is_file() or not list(path.glob("modeling_*.py")):
            raise ModelLoadError(
                f"{path} is not a DeepSeek-OCR snapshot with remote code (config.json + modeling_*.py)",
                hint="see models/README.md for how to download it",
            )
        self.config = DeepseekOCRConfig.from_json(path / "config.json")
        pp = model_cfg.get("preprocess", {})
        self.preprocess_cfg = PreprocessConfig(
            base_size=int(pp.get("base_size", 1024)),
            image_size=int(pp.get("image_size", 640)),
            crop_mode=bool(pp.get("crop_mode", True)),
            vendor_quirks=bool(pp.get("vendor_quirks", True)),
        )
        weights = str(model_cfg.get("weights", "checkpoint"))
        if weights == "dummy":
            from transformers import AutoConfig

            hf_cfg = AutoConfig.from_pretrained(path, trust_remote_code=True)
            hf_cfg._attn_implementation = "eager"
            torch.manual_seed(0)
            model = AutoModel.from_config(hf_cfg, trust_remote_code=True, torch_dtype=dtype)
        else:
            model = AutoModel.from_pretrained(
                path, trust_remote_code=True, use_safetensors=True, _attn_implementation="eager", torch_dtype=dtype
            )
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = _HfTokenizer(AutoTokenizer.from_pretrained(path, trust_remote_code=True))
        self.weights_desc = "dummy" if weights == "dummy" else str(path)
        self.device = device

    def hook_targets(self) -> dict[str, str]:
        return HF_HOOKS

    def prefill(
        self,
        crops: torch.Tensor,
        ori: torch.Tensor,
        spatial: tuple[int, int],
        ids: torch.Tensor,
        mask: torch.Tensor,
        capacity: int,
        clock: Any,
    ) -> tuple[torch.Tensor, HfRemoteState, None]:
        spatial_t = torch.tensor([list(spatial)], dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=ids, images=[(crops, ori)], images_seq_mask=mask, images_spatial_crop=spatial_t, use_cache=True
        )
        return out.logits[:, -1, :], HfRemoteState(out.past_key_values, ids.shape[1]), None

    def decode(self, token: torch.Tensor, state: HfRemoteState) -> torch.Tensor:
        out = self.model(
            input_ids=token,
            past_key_values=state.past,
            use_cache=True,
            position_ids=torch.tensor([[state.length]], device=self.device),
        )
        state.past = out.past_key_values
        state.length += 1
        return out.logits[:, -1, :]


class _HfTokenizer:
    is_stand_in = False

    def __init__(self, tok: Any) -> None:
        self.tok = tok

    def encode_prompt(self, prompt: str) -> list[int]:
        after = prompt.split("<image>", 1)[1]
        return list(self.tok.encode(after, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=False))

    def describe(self) -> str:
        return f"{type(self.tok).__name__} from the snapshot"
