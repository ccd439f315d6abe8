"""Backend ``hf_remote``: the vendor's own remote code from a DeepSeek-OCR snapshot, driven with the same
prefill/decode split as the native model.

Prefill = the vendor forward with images (vision + first LM forward); decode = single-token forwards with
``past_key_values``.  Never ``generate()``, which would hide prefill inside the decode timing.  The vendor
code needs transformers 4.46.x (``pip install -e ".[hf]"``) and CUDA (it calls ``.cuda()`` internally).

Two ways in:

* ``HfRemoteBackend.prefill`` / ``.decode`` — the plain vendor calls (``DeepseekOCRForCausalLM.forward`` with
  ``images=`` and ``use_cache=True``, then single-token forwards on its ``DynamicCache``).
* ``HfRemoteBackend.model`` — a ``VendorSessionModel`` with the interface ``DeepSeekOCRSession.run`` calls on
  the native model (``encode_images`` / ``embed_prompt`` / ``prefill`` / ``decode_step``), so the profiler's
  session times vision, prefill and each decode step of the vendor code exactly as it does for ours.  Vision
  runs the vendor's own ``DeepseekOCRModel.forward`` (its SAM → CLIP → projector → newline/separator layout and
  ``masked_scatter_``) and stops at the first decoder layer; prefill runs the vendor's ``DeepseekV2Model``
  forward on those embeddings; decode is the vendor's ``DeepseekOCRForCausalLM.forward`` with one token.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from llm_perf_opt.errors import DeviceError, ModelLoadError
from llm_perf_opt.runners.backends.base import Backend
from llm_perf_opt.runners.settings import ModelSettings

log = logging.getLogger(__name__)

# Relative to HfRemoteBackend.model (a VendorSessionModel whose ``.model`` is the vendor DeepseekOCRModel).
HF_HOOKS = {"sam": "model.sam_model", "clip": "model.vision_model", "projector": "model.projector"}
MAX_TRANSFORMERS = (4, 47)
HF_EXTRA_HINT = 'pip install -e ".[hf]" (transformers 4.46.x) in a separate environment, or use model.backend=native'


def _version_tuple(version: str) -> tuple[int, int]:
    parts = [int(m.group()) if (m := re.match(r"\d+", p)) else 0 for p in version.split(".")[:2]]
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


def _check_environment(device: torch.device, version: str | None = None) -> None:
    """Clear errors before anything vendor-side is imported: transformers too new, or no CUDA device."""
    if version is None:
        try:
            version = importlib.metadata.version("transformers")
        except importlib.metadata.PackageNotFoundError as exc:
            raise ModelLoadError("backend=hf_remote needs transformers 4.46.x", hint=HF_EXTRA_HINT) from exc
    if _version_tuple(version) > MAX_TRANSFORMERS:
        raise ModelLoadError(
            f"backend=hf_remote needs transformers 4.46.x (the vendor remote code breaks on newer), found {version}; "
            'install the ".[hf]" extra',
            hint=HF_EXTRA_HINT,
        )
    if device.type != "cuda":
        raise DeviceError(
            "backend=hf_remote needs CUDA: the vendor code calls .cuda() internally",
            hint="use device=cuda:0, or model.backend=native (runs on CPU too)",
        )


def _check_snapshot(path: Path) -> None:
    if not (path / "config.json").is_file() or not list(path.glob("modeling_*.py")):
        raise ModelLoadError(
            f"{path} is not a DeepSeek-OCR snapshot with remote code (config.json + modeling_*.py)",
            hint="put the vendor files (modeling_deepseekocr.py, deepencoder.py, conversation.py, "
            "modeling_deepseekv2.py, configuration_deepseek_v2.py) beside config.json; see models/README.md",
        )


def image_token_count(crops: torch.Tensor, ori: torch.Tensor, spatial: tuple[int, int], has_crops: bool) -> int:
    """Rows the vendor forward scatters for one page: tiles with a newline per row, global view likewise, separator.

    SAM's 16-pixel patches and the two stride-2 convolutions give ``size // 64`` tokens per side.
    """
    g = int(ori.shape[-1]) // 64
    n = g * (g + 1) + 1
    if has_crops:
        t = int(crops.shape[-1]) // 64
        w, h = int(spatial[0]), int(spatial[1])
        n += (h * t) * (w * t + 1)
    return n


class HfRemoteState:
    def __init__(self, past: Any, length: int) -> None:
        self.past = past
        self.length = length
        self.nbytes = 0


class _Captured(Exception):
    """Raised from the first decoder layer's pre-hook to stop the vendor forward once the embeddings exist."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("captured")
        self.hidden = hidden


class _Images:
    """What ``encode_images`` hands ``embed_prompt``: the vendor's image rows for one page."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows


class VendorSessionModel(nn.Module):
    """The vendor ``DeepseekOCRForCausalLM`` behind the interface ``DeepSeekOCRSession.run`` drives.

    ``config`` is our ``DeepseekOCRConfig`` (the session sizes its cache from ``config.language``); the vendor
    keeps its own ``DynamicCache`` (``past_key_values``), held here between ``prefill`` and ``decode_step`` for
    the page whose cache object was passed to ``prefill``.
    """

    def __init__(self, vendor: nn.Module, config: Any) -> None:
        super().__init__()
        self.vendor = vendor
        self.config = config
        self._state: HfRemoteState | None = None
        self._cache_id: int | None = None

    @property
    def model(self) -> nn.Module:
        inner: nn.Module = self.vendor.model  # type: ignore[assignment]
        return inner

    @property
    def state(self) -> HfRemoteState | None:
        return self._state

    def kv_cache_bytes(self) -> int:
        """Bytes held by the vendor's own (dynamic) KV cache after the last step."""
        if self._state is None:
            return 0
        return _tensor_bytes(self._state.past)

    @property
    def setup_count(self) -> int:
        """The vendor's eager code: no compiles or graph captures."""
        return 0

    def tokens_per_expert(self) -> None:
        """Not counted: the vendor code has no routing counters."""
        return None

    def experts_hit_per_layer(self) -> None:
        """Not counted: the vendor code has no routing counters."""
        return None

    def encode_images(self, images_crop: torch.Tensor, images_ori: torch.Tensor, images_spatial_crop: Any) -> _Images:
        """The vendor forward's vision block on a placeholder sequence that is all image tokens."""
        crops, ori, spatial = images_crop, images_ori, images_spatial_crop
        inner: Any = self.model
        grid = tuple(int(v) for v in (spatial.flatten().tolist() if torch.is_tensor(spatial) else spatial))
        spatial_t = torch.tensor([list(grid)], dtype=torch.long, device=ori.device)
        has_crops = bool(crops.numel()) and bool(torch.sum(crops).item() != 0)
        n = image_token_count(crops, ori, (grid[0], grid[1]), has_crops)
        ids = torch.zeros((1, n), dtype=torch.long, device=ori.device)
        mask = torch.ones((1, n), dtype=torch.bool, device=ori.device)

        def grab(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            raise _Captured(args[0] if args else kwargs["hidden_states"])

        handle = inner.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            inner(input_ids=ids, images=[(crops, ori)], images_seq_mask=mask, images_spatial_crop=spatial_t,
                  use_cache=False)  # fmt: skip
        except _Captured as got:
            return _Images(got.hidden[0])
        finally:
            handle.remove()
        raise RuntimeError("the vendor forward never reached its first decoder layer")

    def embed_prompt(
        self, input_ids: torch.Tensor, images_seq_mask: torch.Tensor, image_features: Sequence[_Images]
    ) -> torch.Tensor:
        """The vendor's embedding + ``masked_scatter_`` of the image rows into the image-token positions."""
        mask, feats = images_seq_mask, image_features
        inner: Any = self.model
        embeds = inner.get_input_embeddings()(input_ids)
        for b, f in enumerate(feats):
            if int(mask[b].sum()) != f.rows.shape[0]:
                raise ModelLoadError(
                    f"the prompt has {int(mask[b].sum())} image tokens but the vendor vision made {f.rows.shape[0]}",
                    hint="preprocess geometry (base_size/image_size/crop_mode) must match the vendor's",
                )
            embeds[b].masked_scatter_(mask[b].unsqueeze(-1), f.rows.to(embeds.dtype))
        return embeds

    def _lm(self, embeds: torch.Tensor) -> Any:
        inner: Any = self.model
        base: Any = type(inner).__mro__[1]  # DeepseekV2Model: what the vendor forward calls via super()
        return base.forward(inner, input_ids=None, inputs_embeds=embeds, use_cache=True, return_dict=True)

    def prefill(self, inputs_embeds: torch.Tensor, cache: Any) -> torch.Tensor:
        embeds = inputs_embeds
        out = self._lm(embeds)
        vendor: Any = self.vendor
        logits = vendor.lm_head(out.last_hidden_state).float()  # all positions, as the vendor forward does
        self._state = HfRemoteState(out.past_key_values, int(embeds.shape[1]))
        self._cache_id = id(cache)
        return logits[:, -1, :]

    def decode_step(self, token_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        if self._state is None or self._cache_id != id(cache):
            raise RuntimeError("decode_step before prefill on this cache")
        return _vendor_decode(self.vendor, token_ids, self._state)


def _vendor_decode(vendor: Any, token: torch.Tensor, state: HfRemoteState) -> torch.Tensor:
    out = vendor(
        input_ids=token,
        past_key_values=state.past,
        use_cache=True,
        position_ids=torch.tensor([[state.length]], device=token.device),
        return_dict=True,
    )
    state.past = out.past_key_values
    state.length += 1
    return out.logits[:, -1, :]


def _tensor_bytes(obj: Any) -> int:
    """Σ nbytes of every tensor in a cache object (legacy tuples or a transformers Cache)."""
    if isinstance(obj, torch.Tensor):
        return int(obj.numel() * obj.element_size())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(x) for x in obj)
    if hasattr(obj, "key_cache") and hasattr(obj, "value_cache"):
        return _tensor_bytes(list(obj.key_cache)) + _tensor_bytes(list(obj.value_cache))
    return 0


class VendorCache:
    """The page's cache handle: the vendor grows its own ``DynamicCache``; ``VendorSessionModel`` keys its state
    to this object, so a decode step on another page's handle is refused."""


class HfRemoteBackend(Backend):
    """AutoModel with trust_remote_code from the snapshot directory; our tokenizer loader (stand-in fallback)."""

    name: ClassVar[str] = "hf_remote"
    # The vendor code grows its own cache per step: the session must not preallocate one for it.
    owns_kv_cache: ClassVar[bool] = True
    hook_targets: ClassVar[dict[str, str]] = HF_HOOKS
    model: VendorSessionModel

    def __init__(self, settings: ModelSettings, device: torch.device, dtype: torch.dtype, project_root: Path) -> None:
        from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig
        from llm_perf_opt.runners.backends.native import preprocess_config

        _check_environment(device)
        path = Path(settings.path or "")
        if not path.is_absolute():
            path = project_root / path
        _check_snapshot(path)

        from transformers import AutoConfig, AutoModel

        self.config = DeepseekOCRConfig.from_json(path / "config.json")
        self.preprocess_cfg = preprocess_config(settings)
        if settings.weights == "dummy":
            hf_cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=True)
            hf_cfg._attn_implementation = "eager"
            torch.manual_seed(0)
            with torch.device(device):  # random init of 3.3 B parameters on the GPU, not the host
                model = AutoModel.from_config(hf_cfg, trust_remote_code=True, torch_dtype=dtype)
        else:
            model = AutoModel.from_pretrained(
                str(path), trust_remote_code=True, use_safetensors=True, attn_implementation="eager", torch_dtype=dtype
            )
        self.vendor = model.to(device=device, dtype=dtype).eval()
        self.model = VendorSessionModel(self.vendor, self.config).eval()
        self.tokenizer = _load_tokenizer(path, self.config)
        self.weights_desc = "dummy" if settings.weights == "dummy" else str(path)
        self.device = device

    @classmethod
    def load(
        cls, settings: ModelSettings, device: torch.device, dtype: torch.dtype, seed: int, project_root: Path
    ) -> HfRemoteBackend:
        return cls(settings, device, dtype, project_root)

    def new_cache(self, max_len: int) -> VendorCache:
        return VendorCache()

    def kv_cache_bytes(self, cache: Any) -> int:
        return self.model.kv_cache_bytes()

    def prefill(
        self,
        crops: torch.Tensor,
        ori: torch.Tensor,
        spatial: tuple[int, int],
        ids: torch.Tensor,
        mask: torch.Tensor,
        capacity: int = 0,
        clock: Any = None,
    ) -> tuple[torch.Tensor, HfRemoteState, None]:
        """The vendor forward with images and ``use_cache=True``: vision + the first LM forward, one call."""
        spatial_t = torch.tensor([list(spatial)], dtype=torch.long, device=self.device)
        out = self.vendor(
            input_ids=ids,
            images=[(crops, ori)],
            images_seq_mask=mask,
            images_spatial_crop=spatial_t,
            use_cache=True,
            return_dict=True,
        )
        return out.logits[:, -1, :], HfRemoteState(out.past_key_values, int(ids.shape[1])), None

    def decode(self, token: torch.Tensor, state: HfRemoteState) -> torch.Tensor:
        return _vendor_decode(self.vendor, token, state)


def _load_tokenizer(path: Path, cfg: Any) -> Any:
    """The snapshot's tokenizer when transformers can read it, else the labelled stand-in (``is_stand_in``)."""
    from llm_perf_opt.models.deepseek_ocr.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path, cfg)
    except Exception as exc:
        log.warning(
            "cannot load the tokenizer in %s (%s: %s); using the stand-in tokenizer (decoded text is not meaningful)",
            path,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "no message",
        )
        return load_tokenizer(None, cfg)
