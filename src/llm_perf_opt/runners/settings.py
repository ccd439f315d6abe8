"""Typed settings: the composed Hydra config converted once, at the boundary, and validated before anything loads.

``load_settings(cfg)`` turns the config tree into frozen attrs objects, one class per group (run, dataset, model,
infer, fast, profiling, output, peak).  Every field validates its own type and range, so a bad value is one
``ConfigError`` naming the key, what it got and an example (``seed=abc``, ``infer.temperature=-1``,
``fail_fast=no``), raised before the model loads; an unknown key is refused with a did-you-mean.  Code below the
runner reads attributes; no ``.get("key", default)`` repeats a YAML default.

``RunSettings.resolved(device)`` is the one place where requested values become the values that run: the token
cap after its fallback, the image geometry after a resolution mode (``infer=deepseek_ocr.base``), the fast-path
switches a CPU cannot honour.  Its ``as_config()`` is what config.yaml, metrics.json and the report record.

To add a knob: a field with a validator in the group's class (and the key in its YAML); a new group: a class
with a ``SECTION`` and a field of that class in its parent.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import attrs
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.models.deepseek_ocr.fast import FastConfig
from llm_perf_opt.models.deepseek_ocr.generation import NoRepeatNGram
from llm_perf_opt.models.deepseek_ocr.tokenizer import IMAGE_PLACEHOLDER, PROMPT_PRESETS

T = TypeVar("T")
Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]

DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "half")
ACTIVITIES = ("cpu", "cuda")
FAMILIES = ("deepseek_ocr", "deepseek_ocr2")
# DeepSeek-OCR-2's encoder has learned queries for these view sizes only (768-px tiles, 1024-px global view)
V2_VIEW_PX = (768, 1024)


# ---------------------------------------------------------------------------------------------- validators
def _key(instance: Any, attribute: attrs.Attribute[Any]) -> str:
    section = type(instance).SECTION
    return f"{section}.{attribute.name}" if section else attribute.name


def _integer(minimum: int | None = None, optional: bool = False, example: str = "") -> Validator:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        ok = isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)
        if not ok:
            key = _key(instance, attribute)
            want = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (" or null" if optional else "")
            raise ConfigError(
                f"{key} must be {want}, got {value!r}", hint=f"e.g. {key}={example or max(minimum or 0, 1)}"
            )

    return check


def _number(
    minimum: float | None = None, positive: bool = False, optional: bool = False, example: str = "1"
) -> Validator:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        ok = isinstance(value, float) and math.isfinite(value)
        ok = ok and (minimum is None or value >= minimum) and (not positive or value > 0)
        if not ok:
            key = _key(instance, attribute)
            want = "a finite number" + (" > 0" if positive else f" >= {minimum:g}" if minimum is not None else "")
            raise ConfigError(
                f"{key} must be {want}{' or null' if optional else ''}, got {value!r}", hint=f"e.g. {key}={example}"
            )

    return check


def _to_float(value: Any) -> Any:
    """ints (and only ints) become floats; anything else is left for the validator to refuse."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _boolean(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    # bool("no") is True: a string must never pass as a switch
    if not isinstance(value, bool):
        key = _key(instance, attribute)
        raise ConfigError(f"{key} must be true or false, got {value!r}", hint=f"e.g. {key}=true")


def _choice(options: tuple[str, ...], optional: bool = False) -> Validator:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if (value is None and optional) or value in options:
            return
        key = _key(instance, attribute)
        close = difflib.get_close_matches(value, options, n=1) if isinstance(value, str) else []
        hint = f"did you mean {key}={close[0]}?" if close else f"e.g. {key}={options[0]}"
        raise ConfigError(f"{key} must be one of {', '.join(options)}, got {value!r}", hint=hint)

    return check


def _text(optional: bool = False) -> Validator:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if (value is None and optional) or (isinstance(value, str) and value != "???"):
            return
        key = _key(instance, attribute)
        if value == "???":
            raise ConfigError(f"{key} is required but not set", hint=f"set it on the command line: {key}=...")
        raise ConfigError(f"{key} must be a string{' or null' if optional else ''}, got {value!r}", hint=f"{key}=...")

    return check


def _shown(value: Any) -> str:
    """A value as the user typed it (lists, not the tuples the settings hold)."""
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _str_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


# ---------------------------------------------------------------------------------------------- groups
@attrs.frozen
class PeakSettings:
    """Peak figures for MFU/MBU where the device is not in the sourced table."""

    SECTION: ClassVar[str] = "peak"
    flops_per_s: float | None = attrs.field(
        default=None, converter=_to_float, validator=_number(positive=True, optional=True, example="9.89e14")
    )
    bw_bytes_per_s: float | None = attrs.field(
        default=None, converter=_to_float, validator=_number(positive=True, optional=True, example="4.8e12")
    )


def _sizes(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    ok = isinstance(value, tuple) and all(
        isinstance(s, tuple)
        and len(s) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s)
        for s in value
    )
    if not ok:
        raise ConfigError(
            f"dataset.sizes must be a list of [width, height] pairs of positive integers, got {_shown(value)}",
            hint="e.g. dataset.sizes=[[595,842],[800,600]]",
        )


def _pairs(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(tuple(v) if isinstance(v, list | tuple) else v for v in value)
    return value


@attrs.frozen
class DatasetSettings:
    """Which pages: synthetic Pillow pages, or image files under ``root``."""

    SECTION: ClassVar[str] = "dataset"
    name: str = attrs.field(default="synthetic", validator=_text())
    kind: str = attrs.field(default="synthetic", validator=_choice(("synthetic", "files")))
    root: str | None = attrs.field(default=None, validator=_text(optional=True))
    subset_filelist: str | None = attrs.field(default=None, validator=_text(optional=True))
    fallback_patterns: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    max_pages: int | None = attrs.field(default=None, validator=_integer(1, optional=True, example="10"))
    sizes: tuple[tuple[int, int], ...] = attrs.field(default=(), converter=_pairs, validator=_sizes)
    seed: int = attrs.field(default=0, validator=_integer(0))
    # Synthetic pages to draw, cycling through ``sizes`` (each with its own seed, so its own strokes); null = one
    # page per size.  Batched throughput needs at least ``infer.batch_size`` pages.
    num_pages: int | None = attrs.field(default=None, validator=_integer(1, optional=True, example="64"))
    # File datasets: '<page id> <tokens>' per line (relative to root), each page's target output length, where
    # dummy weights end its sequence ("simulated eos"); synthetic pages carry theirs from the drawing.
    lengths_file: str | None = attrs.field(default=None, validator=_text(optional=True))
    # Synthetic pages' target output lengths: strokes = one token per drawn word stroke and table cell (grows with
    # the page, a few hundred at most); lognormal = drawn per page (seeded) from a log-normal with this median and
    # sigma, e.g. target_median_tokens=1000 for a realistic length mix (see data.datasets.lognormal_target_tokens)
    target_lengths: str = attrs.field(default="strokes", validator=_choice(("strokes", "lognormal")))
    target_median_tokens: int | None = attrs.field(default=None, validator=_integer(2, optional=True, example="1000"))
    target_sigma: float = attrs.field(default=0.5, converter=_to_float, validator=_number(minimum=0.0, example="0.5"))

    @fallback_patterns.validator
    def _patterns(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(
                f"dataset.fallback_patterns must be a list of glob patterns, got {_shown(value)}",
                hint="e.g. dataset.fallback_patterns='[images/*.png]'",
            )

    def __attrs_post_init__(self) -> None:
        if self.kind == "files" and self.root is None:
            raise ConfigError("dataset.root must be set for a file dataset", hint="e.g. dataset.root=/path/to/pages")
        if self.kind == "synthetic" and not self.sizes:
            raise ConfigError("dataset.sizes is empty: a synthetic dataset needs page sizes",
                              hint="e.g. dataset.sizes=[[595,842]]")  # fmt: skip
        if self.kind == "synthetic" and self.lengths_file is not None:
            raise ConfigError("dataset.lengths_file only applies to file datasets (synthetic pages carry their own)",
                              hint="set dataset.lengths_file=null")  # fmt: skip
        if self.target_lengths == "lognormal" and (self.kind != "synthetic" or self.target_median_tokens is None):
            raise ConfigError(
                "dataset.target_lengths=lognormal needs a synthetic dataset and dataset.target_median_tokens",
                hint="e.g. dataset=synthetic dataset.target_lengths=lognormal dataset.target_median_tokens=1000 "
                "(file datasets take dataset.lengths_file)",
            )
        if self.kind == "files" and self.num_pages is not None:
            raise ConfigError(f"dataset.num_pages={self.num_pages} only applies to synthetic datasets",
                              hint="limit a file dataset with dataset.max_pages instead")  # fmt: skip


@attrs.frozen
class PreprocessSettings:
    """Image geometry: global view ``base_size``, tiles of ``image_size`` when ``crop_mode``."""

    SECTION: ClassVar[str] = "model.preprocess"
    base_size: int = attrs.field(default=1024, validator=_integer(1, example="1024"))
    image_size: int = attrs.field(default=640, validator=_integer(1, example="640"))
    crop_mode: bool = attrs.field(default=True, validator=_boolean)
    min_crops: int = attrs.field(default=2, validator=_integer(1, example="2"))
    max_crops: int = attrs.field(default=9, validator=_integer(1, example="9"))
    vendor_quirks: bool = attrs.field(default=True, validator=_boolean)

    def __attrs_post_init__(self) -> None:
        if self.min_crops > self.max_crops:
            raise ConfigError(
                f"model.preprocess.min_crops ({self.min_crops}) exceeds max_crops ({self.max_crops})",
                hint="e.g. model.preprocess.min_crops=2 model.preprocess.max_crops=9",
            )


@attrs.frozen
class PreprocessOverride:
    """What a vendor resolution mode (``infer=deepseek_ocr.<mode>``) sets on top of ``model.preprocess``; a
    deployment preset also caps the tiles (vLLM: 6), otherwise the tile range stays ``model.preprocess``'s."""

    SECTION: ClassVar[str] = "infer.preprocess_override"
    base_size: int = attrs.field(validator=_integer(1, example="1024"))
    image_size: int = attrs.field(validator=_integer(1, example="1024"))
    crop_mode: bool = attrs.field(validator=_boolean)
    min_crops: int | None = attrs.field(default=None, validator=_integer(1, optional=True, example="2"))
    max_crops: int | None = attrs.field(default=None, validator=_integer(1, optional=True, example="6"))


def _prompt(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A preset name (``free_ocr``) or the prompt text with exactly one ``<image>``; a word that is no preset
    (a typo of one) is refused as a name, not with the less helpful "no <image>"."""
    if isinstance(value, str) and value.strip() in PROMPT_PRESETS:
        return
    names = ", ".join(PROMPT_PRESETS)
    if isinstance(value, str) and IMAGE_PLACEHOLDER not in value and value.strip().replace("_", "").isalnum():
        close = difflib.get_close_matches(value.strip(), list(PROMPT_PRESETS), n=1)
        raise ConfigError(
            f"model.prompt: unknown prompt preset {value.strip()!r} (presets: {names})",
            hint=(f"did you mean model.prompt={close[0]}? " if close else "")
            + f"or give the prompt text itself with one {IMAGE_PLACEHOLDER}",
        )
    if not isinstance(value, str) or value.count(IMAGE_PLACEHOLDER) != 1:
        raise ConfigError(
            f"model.prompt must be a preset name ({names}) or text with exactly one <image> placeholder, got {value!r}",
            hint="e.g. model.prompt=free_ocr, or text such as model.prompt='<image>\\nFree OCR.'",
        )


@attrs.frozen
class ModelSettings:
    """Which model, where its weights come from, how it runs, and its image geometry."""

    SECTION: ClassVar[str] = "model"
    name: str = attrs.field(default="deepseek-ocr", validator=_text())
    # which model: deepseek_ocr (v1: SAM → CLIP → projector) or deepseek_ocr2 (SAM → Qwen2-style encoder → projector)
    family: str = attrs.field(default="deepseek_ocr", validator=_choice(FAMILIES))
    path: str | None = attrs.field(default=None, validator=_text(optional=True))
    config_json: str | None = attrs.field(default=None, validator=_text(optional=True))
    weights: str = attrs.field(default="checkpoint", validator=_choice(("checkpoint", "dummy")))
    dtype: str = attrs.field(default="bfloat16", validator=_choice(DTYPES))
    # hf_native: transformers' own DeepseekOcr2ForConditionalGeneration (>= 5.10.1), DeepSeek-OCR-2 only
    backend: str = attrs.field(default="native", validator=_choice(("native", "hf_remote", "hf_native")))
    preprocess: PreprocessSettings = attrs.field(factory=PreprocessSettings)
    # a preset name (PROMPT_PRESETS: free_ocr, ...) or the prompt text; resolved() records the text that ran
    prompt: str = attrs.field(default="<image>\n<|grounding|>Convert the document to markdown.", validator=_prompt)
    # the preset the prompt came from: filled in by resolved() (null for free text), so the record names both
    prompt_preset: str | None = attrs.field(default=None, validator=_choice(tuple(PROMPT_PRESETS), optional=True))

    @property
    def prompt_text(self) -> str:
        """The prompt that is tokenized: a preset's text, or the text given."""
        return PROMPT_PRESETS.get(self.prompt.strip(), self.prompt)

    def __attrs_post_init__(self) -> None:
        if self.prompt_preset is not None and PROMPT_PRESETS[self.prompt_preset] != self.prompt_text:
            raise ConfigError(
                f"model.prompt_preset={self.prompt_preset} is not the preset of model.prompt={self.prompt!r}",
                hint="set only model.prompt (a preset name or text); the run records prompt_preset itself",
            )
        if self.backend in ("native", "hf_native") and self.weights == "dummy" and not self.config_json:
            raise ConfigError("model.weights=dummy needs model.config_json (the shapes to build)",
                              hint="e.g. model.config_json=builtin:deepseek-ocr")  # fmt: skip


@attrs.frozen
class FastSettings:
    """``infer.fast``: ``enabled`` plus every :class:`FastConfig` switch (the one list of fast-path knobs)."""

    SECTION: ClassVar[str] = "infer.fast"
    enabled: bool = attrs.field(default=False, validator=_boolean)
    switches: FastConfig = attrs.field(factory=FastConfig)

    @classmethod
    def structure(cls, data: Any) -> FastSettings:
        """The YAML mapping is flat (``infer.fast.grouped_moe``), so the switches are taken field by field."""
        data = _mapping(data, cls.SECTION)
        fields = {f.name: f for f in attrs.fields(FastConfig)}
        _refuse_unknown(data, ["enabled", *fields], cls.SECTION)
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name == "enabled":
                continue
            if isinstance(fields[name].default, bool) and not isinstance(value, bool):
                raise ConfigError(f"infer.fast.{name} must be true or false, got {value!r}",
                                  hint=f"e.g. infer.fast.{name}=false")  # fmt: skip
            values[name] = value
        try:
            switches = FastConfig(**values)
        except (ValueError, TypeError) as exc:
            reason = exc.args[0] if exc.args else str(exc)  # attrs' in_ validator: the message, then details
            raise ConfigError(
                f"invalid infer.fast value: {reason}",
                hint="see conf/model/deepseek_ocr/infer/deepseek_ocr.default.yaml",
            ) from exc
        enabled = data.get("enabled", attrs.fields(cls).enabled.default)
        return cls(enabled=enabled, switches=switches)

    def unstructure(self) -> dict[str, Any]:
        return {"enabled": self.enabled, **attrs.asdict(self.switches)}


@attrs.frozen
class InferSettings:
    """Decoding rules and the phases that decode: token cap, sampling, batching, fast path, resolution mode."""

    SECTION: ClassVar[str] = "infer"
    # None: fall back to the top-level max_new_tokens (RunSettings.token_cap)
    max_new_tokens: int | None = attrs.field(default=None, validator=_integer(1, optional=True, example="256"))
    temperature: float = attrs.field(default=0.0, converter=_to_float, validator=_number(minimum=0.0, example="0"))
    no_repeat_ngram_size: int = attrs.field(default=20, validator=_integer(0, example="20"))
    # only n-grams starting within the last N tokens count (None: the whole history; vLLM's recipe: 90)
    no_repeat_ngram_window: int | None = attrs.field(default=None, validator=_integer(1, optional=True, example="90"))
    # token ids never banned (vLLM: <td> 128821, </td> 128822)
    no_repeat_ngram_exempt_ids: tuple[int, ...] = attrs.field(default=(), converter=_str_tuple)
    # sequence = prompt + output (HF, the reference infer()); output = generated tokens only (vLLM)
    no_repeat_ngram_scope: str = attrs.field(default="sequence", validator=_choice(("sequence", "output")))
    ignore_eos: bool = attrs.field(default=False, validator=_boolean)
    # Batched phase: threads preparing the next batches' pages while the current one runs (0 = serially, on the
    # critical path: the reference for the pooled figures)
    preprocess_workers: int = attrs.field(default=4, validator=_integer(0, example="4"))
    nvtx_decode_step: bool = attrs.field(default=False, validator=_boolean)
    batch_size: int = attrs.field(default=1, validator=_integer(1, example="8"))
    # Batched phase: continuous = batch_size sequence slots, each refilled with the next page as its sequence ends
    # (the batch stays full with mixed lengths); static = batches of batch_size pages run until the longest ends
    batching: str = attrs.field(default="continuous", validator=_choice(("continuous", "static")))
    # Continuous batching's drain (no page left to refill with): once at most half the slots hold a sequence, go on
    # with a step over the power of two of rows covering them (same tokens, fewer rows per kernel); false keeps
    # the full width to the end (to measure what narrowing saves)
    narrow_drain: bool = attrs.field(default=True, validator=_boolean)
    # Static batching: the step's attention shows no row its left pads and a finished row only its newest key (running
    # rows' outputs keep their bits; the Triton row attention skips reading the rest, the torch attention reads them
    # masked); false shows every row its whole context to the end (to measure what skipping saves)
    static_skip_keys: bool = attrs.field(default=True, validator=_boolean)
    # Continuous batching: a sequence that ended by eos sees only its newest key until the host reads the done flags
    # and refills its slot (up to check_every - 1 steps; the Triton row attention skips reading the rest, the torch
    # attention reads them masked); false: its whole context until then (to measure what skipping saves)
    continuous_skip_keys: bool = attrs.field(default=True, validator=_boolean)
    # Continuous batching: pages past the filled slots whose vision runs ahead on a second CUDA stream, beside the
    # decode steps, instead of in the refill that needs them (0 = off: each page's vision in its refill)
    refill_vision_ahead: int = attrs.field(default=0, validator=_integer(0, example="1"))
    # with refill_vision_ahead: those pages' LM prefill runs ahead on the second stream too, each page into a cache
    # of its own, so their refill only copies the K/V into the slot's rows and loads the slot.  Off: on an H200 it
    # was slower on Base (0.93x, 0.87x the plain continuous run) and 1.03x on Gundam (round 25): the eager prefill's
    # host time keeps the host from enqueueing decode steps
    refill_prefill_ahead: bool = attrs.field(default=False, validator=_boolean)
    # Continuous batching: how a refill's pages get their LM prefill: batched = one left-padded forward over them
    # (eager); per_page = one page at a time through the model's per-page prefill into a cache kept per prompt
    # length (on the fast path a CUDA-graph replay per length, captured before the fill, outside the stages);
    # auto = per_page where that prefill is a graph replay (the fast path on CUDA: 1.07x / 1.10x the output tok/s
    # of batched on an H100, Gundam, round 29; Base 1.17x, round 30; DeepSeek-OCR-2 1.05x, round 31, each paired
    # over 6 rounds, p = 0.031), else batched (:func:`refill_per_page`)
    refill_prefill: str = attrs.field(default="auto", validator=_choice(("auto", "batched", "per_page")))
    fast: FastSettings = attrs.field(factory=FastSettings)
    # name of the vendor resolution mode this preset stands for (a label; its geometry is preprocess_override)
    mode: str | None = attrs.field(default=None, validator=_text(optional=True))
    preprocess_override: PreprocessOverride | None = None
    # which deployment the decoding rules reproduce (reference_infer, vllm_gundam): a label the report shows
    preset: str = attrs.field(default="reference_infer", validator=_text())
    # context behind the decode FLOPs (MFU): auto = each step's real context, max = prompt + token cap for every
    # step (the original convention), fixed = context_len_fixed keys for every step
    context_len_mode: str = attrs.field(default="auto", validator=_choice(("auto", "max", "fixed")))
    context_len_fixed: int | None = attrs.field(default=None, validator=_integer(1, optional=True, example="1024"))
    # the model family a preset is for (the DeepSeek-OCR-2 modes say deepseek_ocr2); null: any
    family: str | None = attrs.field(default=None, validator=_choice(FAMILIES, optional=True))

    @no_repeat_ngram_exempt_ids.validator
    def _exempt_ids(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        ok = isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        if not ok:
            raise ConfigError(
                f"infer.no_repeat_ngram_exempt_ids must be a list of token ids >= 0, got {_shown(value)}",
                hint="e.g. infer.no_repeat_ngram_exempt_ids=[128821,128822] (or [] for none)",
            )

    def __attrs_post_init__(self) -> None:
        if self.context_len_mode == "fixed" and self.context_len_fixed is None:
            raise ConfigError(
                "infer.context_len_mode=fixed needs infer.context_len_fixed >= 1, got None",
                hint="e.g. infer.context_len_mode=fixed infer.context_len_fixed=1024",
            )
        n, window = self.no_repeat_ngram_size, self.no_repeat_ngram_window
        if n > 0 and window is not None and window < n:
            raise ConfigError(
                f"infer.no_repeat_ngram_window ({window}) is smaller than no_repeat_ngram_size ({n}): "
                "no n-gram fits in the window, so the rule could never ban anything",
                hint=f"e.g. infer.no_repeat_ngram_window={3 * n}, or null for the whole history",
            )
        if self.batch_size > 1 and not self.ngram_rule.is_hf and self.ngram_rule:
            raise ConfigError(
                f"the batched phase applies the plain no-repeat-ngram rule only, not {self.ngram_rule.describe()}",
                hint="set infer.batch_size=1, or infer.no_repeat_ngram_window=null "
                "infer.no_repeat_ngram_exempt_ids=[] infer.no_repeat_ngram_scope=sequence",
            )
        if self.refill_vision_ahead and (self.batch_size < 2 or self.batching != "continuous"):
            raise ConfigError(
                f"infer.refill_vision_ahead={self.refill_vision_ahead} applies to continuous batching's refills, but "
                f"this run has infer.batch_size={self.batch_size} and infer.batching={self.batching}",
                hint="add infer.batch_size=8 infer.batching=continuous, or set infer.refill_vision_ahead=0",
            )
        if self.refill_prefill == "per_page" and (self.batch_size < 2 or self.batching != "continuous"):
            raise ConfigError(
                "infer.refill_prefill=per_page applies to continuous batching's refills, but this run has "
                f"infer.batch_size={self.batch_size} and infer.batching={self.batching}",
                hint="add infer.batch_size=8 infer.batching=continuous, or set infer.refill_prefill=batched",
            )
        if self.refill_prefill_ahead and not self.refill_vision_ahead:
            raise ConfigError(
                "infer.refill_prefill_ahead=true runs the LM prefill of the pages whose vision runs ahead, but "
                "infer.refill_vision_ahead=0",
                hint="add infer.refill_vision_ahead=2, or set infer.refill_prefill_ahead=false",
            )

    @property
    def ngram_rule(self) -> NoRepeatNGram:
        """The no-repeat-ngram rule: the reference's (HF, whole sequence) or vLLM's (window, exempt ids, output)."""
        return NoRepeatNGram(
            self.no_repeat_ngram_size,
            window=self.no_repeat_ngram_window,
            exempt_ids=self.no_repeat_ngram_exempt_ids,
            scope=self.no_repeat_ngram_scope,
        )


def refill_per_page(setting: str, graphed: bool) -> bool:
    """Whether continuous batching prefills its refills page by page: ``infer.refill_prefill`` as set, ``auto``
    where the per-page prefill is a CUDA-graph replay (``graphed``: the fast path on CUDA); elsewhere each page
    would be an eager forward of its own, ~700 launches, where the batched refill pays them once."""
    return setting == "per_page" or (setting == "auto" and graphed)


@attrs.frozen
class ProfilingSettings:
    """The single torch-profiler pass and the warmup before the timed repeats."""

    SECTION: ClassVar[str] = "profiling"
    enabled: bool = attrs.field(default=True, validator=_boolean)
    activities: tuple[str, ...] = attrs.field(default=("cpu", "cuda"), converter=_str_tuple)
    record_shapes: bool = attrs.field(default=False, validator=_boolean)
    profile_memory: bool = attrs.field(default=False, validator=_boolean)
    with_stack: bool = attrs.field(default=False, validator=_boolean)
    # None: the run's token cap
    rep_max_new_tokens: int | None = attrs.field(default=None, validator=_integer(1, optional=True, example="32"))
    warmup_rounds: int = attrs.field(default=1, validator=_integer(0, example="1"))
    warmup_synthetic: bool = attrs.field(default=True, validator=_boolean)
    static_compute: bool = attrs.field(default=True, validator=_boolean)

    @activities.validator
    def _activities(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, tuple) or not value or any(a not in ACTIVITIES for a in value):
            raise ConfigError(
                f"profiling.activities must be a non-empty list of {', '.join(ACTIVITIES)}, got {_shown(value)}",
                hint="e.g. profiling.activities=[cpu,cuda]",
            )


@attrs.frozen
class OutputSettings:
    """Where the run writes and what it writes besides the journal and metrics."""

    SECTION: ClassVar[str] = "output"
    dir: str = attrs.field(validator=_text())
    top_k_operators: int = attrs.field(default=30, validator=_integer(0, example="30"))
    export_trace: bool = attrs.field(default=True, validator=_boolean)
    plots: bool = attrs.field(default=True, validator=_boolean)


def _progress(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value not in ("auto", True, False):
        raise ConfigError(f"progress must be auto, true or false, got {value!r}", hint="e.g. progress=false")


def _cpu_threads(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    if not ok:
        raise ConfigError(f"cpu_threads must be auto or an integer >= 1, got {value!r}", hint="e.g. cpu_threads=2")


@attrs.frozen
class RunSettings:
    """The whole run; top-level keys of conf/config.yaml plus one object per group."""

    SECTION: ClassVar[str] = ""
    dataset: DatasetSettings
    model: ModelSettings
    infer: InferSettings
    profiling: ProfilingSettings
    output: OutputSettings
    experiment: str = attrs.field(default="stage1", validator=_text())
    run_id: str = attrs.field(default="", validator=_text())
    repeats: int = attrs.field(default=3, validator=_integer(1, example="3"))
    # the per-page timed repeats run over the first N pages only (null: all); the batched phase takes every page,
    # so a large batched workload need not also be timed page by page
    per_page_pages: int | None = attrs.field(default=None, validator=_integer(1, optional=True, example="4"))
    device: str = attrs.field(default="cpu", validator=_text())
    seed: int = attrs.field(default=0, validator=_integer(0, example="0"))
    use_flash_attn: bool = attrs.field(default=True, validator=_boolean)
    # the token cap when infer.max_new_tokens is null
    max_new_tokens: int = attrs.field(default=64, validator=_integer(1, example="64"))
    fail_fast: bool = attrs.field(default=False, validator=_boolean)
    resume: str | None = attrs.field(default=None, validator=_text(optional=True))
    peak: PeakSettings = attrs.field(factory=PeakSettings)
    progress: str | bool = attrs.field(default="auto", validator=_progress)
    # torch intra-op threads on CPU: auto = OMP_NUM_THREADS when set, else the cores in the CPU affinity
    cpu_threads: str | int = attrs.field(default="auto", validator=_cpu_threads)

    def __attrs_post_init__(self) -> None:
        # checks across groups: still before anything loads
        if self.model.backend != "native" and self.infer.fast.enabled:
            raise ConfigError(f"infer.fast.enabled=true needs model.backend=native, got {self.model.backend}",
                              hint="set infer.fast.enabled=false (the fast path is the native model's; "
                              f"{self.model.backend} runs its own code eagerly) or model.backend=native")  # fmt: skip
        if self.model.backend != "native" and self.infer.batch_size > 1:
            raise ConfigError(f"infer.batch_size > 1 needs model.backend=native, got {self.model.backend}",
                              hint="set infer.batch_size=1 or model.backend=native")  # fmt: skip
        if self.infer.family is not None and self.infer.family != self.model.family:
            raise ConfigError(
                f"the infer preset is for model.family={self.infer.family}, but the model is {self.model.family}",
                hint=f"pick a {self.infer.family} arch (model/deepseek_ocr/arch={self.infer.family}.*) or an infer "
                f"preset of {self.model.family} (model/deepseek_ocr/infer={self.model.family}.*)",
            )
        if self.model.backend == "hf_native" and self.model.family != "deepseek_ocr2":
            raise ConfigError(f"model.backend=hf_native is transformers' DeepSeek-OCR-2 class, the model is "
                              f"model.family={self.model.family}",
                              hint="use model/deepseek_ocr/arch=deepseek_ocr2.* with it, or model.backend=native "
                              "(or hf_remote) for DeepSeek-OCR")  # fmt: skip
        if self.model.family == "deepseek_ocr2":
            self._check_v2()

    def _check_v2(self) -> None:
        """DeepSeek-OCR-2 runs on the native backend (eager or fast; batched phase included) or on transformers'
        class (hf_native, eager, one page at a time), at its own view sizes."""
        if self.model.backend not in ("native", "hf_native"):
            raise ConfigError(f"model.family=deepseek_ocr2 runs on model.backend=native or hf_native, got "
                              f"{self.model.backend}",
                              hint="set model.backend=native (or hf_native: transformers' own class)")  # fmt: skip
        pre: PreprocessSettings | PreprocessOverride = self.infer.preprocess_override or self.model.preprocess
        views = [("base_size", pre.base_size)] + [("image_size", pre.image_size)] * pre.crop_mode
        for key, px in views:
            if px not in V2_VIEW_PX:
                raise ConfigError(
                    f"DeepSeek-OCR-2 views are 768 or 1024 px, got {key} {px} (model.preprocess or the infer mode)",
                    hint="use a v2 resolution mode: model/deepseek_ocr/infer=deepseek_ocr2.default "
                    "(or deepseek_ocr2.1024 / deepseek_ocr2.768)",
                )

    @property
    def token_cap(self) -> int:
        """New tokens per page: ``infer.max_new_tokens``, or the top-level fallback when that is null."""
        return self.infer.max_new_tokens if self.infer.max_new_tokens is not None else self.max_new_tokens

    @property
    def profiler_tokens(self) -> int:
        """Tokens decoded in the profiler pass: ``profiling.rep_max_new_tokens``, never above the token cap."""
        rep = self.profiling.rep_max_new_tokens
        return self.token_cap if rep is None else min(rep, self.token_cap)

    def resolved(self, device_type: str) -> RunSettings:
        """The settings as they will run on ``device_type``: what config.yaml, metrics.json and the report record.

        Idempotent: the token cap is filled in, a resolution mode's geometry (tile cap included) is folded into
        ``model.preprocess`` (``infer.mode`` stays as its label), a prompt preset becomes its text with the name in
        ``model.prompt_preset``, and CUDA-only fast switches are off elsewhere.
        """
        model, infer = self.model, self.infer
        if infer.preprocess_override is not None:
            o = infer.preprocess_override
            pre = attrs.evolve(
                model.preprocess,
                base_size=o.base_size,
                image_size=o.image_size,
                crop_mode=o.crop_mode,
                min_crops=model.preprocess.min_crops if o.min_crops is None else o.min_crops,
                max_crops=model.preprocess.max_crops if o.max_crops is None else o.max_crops,
            )
            model = attrs.evolve(model, preprocess=pre)
        if model.prompt.strip() in PROMPT_PRESETS:
            model = attrs.evolve(model, prompt=model.prompt_text, prompt_preset=model.prompt.strip())
        fast = infer.fast
        if fast.enabled and device_type != "cuda":  # graphs and streams are CUDA-only: the record says they were off
            switches = attrs.evolve(
                fast.switches, cuda_graphs=False, vision_graphs=False, vision_streams=False, prefill_shared_stream=False
            )
            fast = attrs.evolve(fast, switches=switches)
        infer = attrs.evolve(infer, max_new_tokens=self.token_cap, preprocess_override=None, fast=fast)
        return attrs.evolve(self, model=model, infer=infer)

    def as_config(self) -> dict[str, Any]:
        """Plain YAML/JSON tree in the shape of conf/ (config.yaml, metrics.json ``run.config``)."""
        return _unstructure(self)


# ---------------------------------------------------------------------------------------------- structure
def load_settings(cfg: DictConfig | Mapping[str, Any]) -> RunSettings:
    """The composed config (interpolations resolved, ``hydra`` node dropped) as validated settings."""
    try:
        if isinstance(cfg, DictConfig):  # the hydra node (present in compose()) is Hydra's, not the run's
            tree = OmegaConf.to_container(
                OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"]), resolve=True
            )
        else:
            tree = dict(cfg)
    except (OmegaConfBaseException, ValueError) as exc:  # a bad or unresolvable interpolation
        raise ConfigError(f"the config does not resolve: {exc}".splitlines()[0],
                          hint="check the ${...} interpolations you overrode") from exc  # fmt: skip
    assert isinstance(tree, dict)
    tree.pop("hydra", None)
    return structure(RunSettings, tree)


def structure(cls: type[T], data: Any) -> T:
    """``data`` (a mapping from YAML) as ``cls``: unknown keys refused, nested groups structured, fields validated."""
    custom = getattr(cls, "structure", None)
    if custom is not None:
        result: T = custom(data)
        return result
    section: str = cls.SECTION  # type: ignore[attr-defined]
    data = _mapping(data, section or "the config")
    fields = attrs.fields_dict(cls)  # type: ignore[arg-type]
    _refuse_unknown(data, list(fields), section)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = _group_type(cls, name)
        if sub is not None and value is not None:
            value = structure(sub, value)
        kwargs[name] = value
    missing = [n for n, f in fields.items() if f.default is attrs.NOTHING and n not in kwargs]
    if missing:
        key = f"{section}.{missing[0]}" if section else missing[0]
        raise ConfigError(f"{key} is missing from the config", hint=f"set it: {key}=...")
    return cls(**kwargs)


# The nested groups of each class (the types attrs cannot see through ``from __future__ import annotations``).
_GROUPS: dict[type, dict[str, type]] = {
    RunSettings: {
        "dataset": DatasetSettings,
        "model": ModelSettings,
        "infer": InferSettings,
        "profiling": ProfilingSettings,
        "output": OutputSettings,
        "peak": PeakSettings,
    },
    ModelSettings: {"preprocess": PreprocessSettings},
    InferSettings: {"fast": FastSettings, "preprocess_override": PreprocessOverride},
}


def _group_type(cls: type, name: str) -> type | None:
    return _GROUPS.get(cls, {}).get(name)


def _mapping(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys, got {data!r}", hint=f"see conf/ for the keys of {where}")
    return dict(data)


def _refuse_unknown(data: Mapping[str, Any], known: list[str], section: str) -> None:
    for name in data:
        if name in known:
            continue
        key = f"{section}.{name}" if section else name
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = (
            f"did you mean {section + '.' if section else ''}{close[0]}?"
            if close
            else f"valid keys: {', '.join(known)}"
        )
        raise ConfigError(f"unknown setting {key}", hint=hint)


def unstructured_defaults(cls: type) -> dict[str, Any]:
    """A settings group's defaults in config.yaml's shape (what an older run meant by a key it lacked)."""
    return dict(_unstructure(cls()))


def _unstructure(obj: Any) -> Any:
    if isinstance(obj, FastSettings):
        return obj.unstructure()
    if attrs.has(type(obj)):
        return {f.name: _unstructure(getattr(obj, f.name)) for f in attrs.fields(type(obj))}
    if isinstance(obj, tuple):
        return [_unstructure(v) for v in obj]
    return obj
