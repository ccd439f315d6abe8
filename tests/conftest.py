"""Shared fixtures: Hydra compose of the shipped config tree, fixture paths, CUDA skip marker."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY = FIXTURES / "deepseek_ocr_tiny"
REAL = FIXTURES / "deepseek_ocr_real"


def _import_triton_for_the_interpreter() -> None:
    """Without CUDA, Triton can only run through its interpreter, and the choice is made when ``triton`` and our
    kernels module are first imported.  Importing both here, with ``TRITON_INTERPRET=1``, keeps that choice
    independent of test order (an earlier test could import Triton through torch in compiled mode, and the CPU
    kernel tests would then fail).  The variable is unset again, so ``kernels.triton_available("cpu")`` stays
    False for every test that does not set it itself (tests/unit/models/deepseek_ocr/test_fast_triton.py)."""
    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        # Triton is a dev dependency on x86-64 Linux only; where it is missing the kernel tests skip themselves.
        with contextlib.suppress(ImportError):
            import triton  # noqa: F401

            import llm_perf_opt.models.deepseek_ocr.clip_attention
            import llm_perf_opt.models.deepseek_ocr.kernels
            import llm_perf_opt.models.deepseek_ocr.prompt_attention
            import llm_perf_opt.models.deepseek_ocr.prompt_moe
            import llm_perf_opt.models.deepseek_ocr.sam_kernels  # noqa: F401
    finally:
        del os.environ["TRITON_INTERPRET"]


_import_triton_for_the_interpreter()

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")


# The tiny fixture's page images and the crop mode each was made with; the text ids of their prompt.
TINY_CASES = [("global_only", False), ("crop_2x1", True), ("crop_2x3", True)]
TINY_TEXT_IDS = list(range(10, 17))


def tiny_case_pages(config: Any) -> list[Any]:
    """The tiny fixture's case pages preprocessed for ``config`` (prompt lengths 29, 39, 59)."""
    from llm_perf_opt.data.images import load_image
    from llm_perf_opt.models.deepseek_ocr.preprocess import PreprocessConfig, preprocess_page

    out = []
    for name, crop in TINY_CASES:
        cfg = PreprocessConfig(base_size=256, image_size=128, crop_mode=crop, vendor_quirks=False)
        out.append(preprocess_page(load_image(TINY / "cases" / f"{name}.png"), cfg, config, TINY_TEXT_IDS))
    return out


def generate_alone(model: Any, page: Any, cap: int, eos: int | None = None, ngram: int = 0) -> Any:
    """One prepared page through the single-page eager path (vision, prompt, greedy ``generate`` with kept
    logits): the oracle the batched and continuous paths are held to."""
    from llm_perf_opt.models.deepseek_ocr import generate

    feats = model.encode_images(page.images_crop, page.images_ori, page.images_spatial_crop)
    embeds = model.embed_prompt(page.input_ids, page.images_seq_mask, [feats])
    return generate(
        model, embeds, page.input_ids[0].tolist(), cap, eos_token_id=eos, no_repeat_ngram_size=ngram, keep_logits=True
    )


def tiny_fast_model(**switches: Any) -> Any:
    """A FastModel over its own copy of the tiny fixture model in float32 on the CPU (the fast path re-points the
    module weights to fused storage, so it must not share the reference model's), SAM / CLIP not compiled;
    ``switches`` are further ``FastConfig`` fields."""
    from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model
    from llm_perf_opt.models.deepseek_ocr.fast import FastConfig, apply_fast_path

    own = build_model(
        DeepseekOCRConfig.from_json(TINY / "config.json"), "cpu", torch.float32, weights=TINY / "weights.safetensors"
    )
    return apply_fast_path(own, FastConfig(sam_compile=False, clip_compile=False, **switches))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the tolerance metric of fixtures/deepseek_ocr_tiny/README.md."""
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())


@pytest.fixture(scope="module")
def tiny_reference_model() -> Any:
    """The tiny native model with the fixture's seeded weights (fp32, CPU): the model the parity tests check."""
    from llm_perf_opt.models.deepseek_ocr import DeepseekOCRConfig, build_model

    cfg = DeepseekOCRConfig.from_json(TINY / "config.json")
    return build_model(cfg, device="cpu", dtype=torch.float32, weights=TINY)


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """compose_cfg(overrides) -> the config exactly as the CLI would compose it (hydra.* resolved)."""

    def _compose(overrides: list[str] | None = None) -> DictConfig:
        import llm_perf_opt.runners.llm_profile_runner  # noqa: F401  (registers the run_suffix resolver)

        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=overrides or [], return_hydra_config=True)

    return _compose


def _copy_into(static: Any, new: Any) -> None:
    """Write ``new``'s tensors into ``static``'s (same structure: a tensor, a tuple / list of them, or None)."""
    if isinstance(static, torch.Tensor):
        static.copy_(new)
    elif isinstance(static, (tuple, list)):
        for a, b in zip(static, new, strict=True):
            _copy_into(a, b)


class CpuGraph:
    """A stand-in for a captured CUDA graph on the CPU: ``replay`` runs the captured function again under the
    context it was captured in and, as a graph's replay rewrites its static outputs, copies what it returns into
    the outputs the capture handed out (see :func:`cpu_graphs`)."""

    def __init__(self, fn: Callable[[], Any], context: Callable[[], Any], out: Any) -> None:
        self.fn, self.context, self.out, self.replays = fn, context, out, 0

    def replay(self) -> None:
        self.replays += 1
        with self.context():
            _copy_into(self.out, self.fn())


CUDA = torch.device("cuda")  # only compared against: nothing is allocated on it


@pytest.fixture
def cpu_graphs(monkeypatch: pytest.MonkeyPatch) -> list[CpuGraph]:
    """The decode steps' CUDA-graph paths run on the CPU, so a CPU test reaches the code that only a GPU run reaches
    otherwise: the capture (``graphs.capture_graph``: two eager warm-up calls that advance the step's state, then
    a capture that runs nothing), the state reloaded after it, and every later step a replay.  The static batched
    step, the continuous step and the batch-1 fast decoder take their graph path (``decode_path`` "graph"), a
    FastModel's batch-1 prefill its graph per (prompt length, cache), and the vision towers their graph per input
    shape (``ShapeGraphs``, with ``vision_graphs``).

    What it checks: the steps' state handling and bounds around a capture (round 27: a one-step batched run's second
    warm-up wrote past its cache, a device-side assert on an H100 that no CPU test could meet).  What it cannot:
    what a real capture freezes (host values read while capturing, memory allocated in it) and kernel timing.
    Returns the graphs captured, in order."""
    from llm_perf_opt.models.deepseek_ocr import batched_decode, continuous, fast, fast_decoder, graphs
    from llm_perf_opt.models.deepseek_ocr.batched import BatchedGenerator
    from llm_perf_opt.models.deepseek_ocr.compiles import WATCH

    captured: list[CpuGraph] = []

    def capture(
        fn: Callable[[], Any], device: Any, context: Callable[[], Any] = contextlib.nullcontext, stream: Any = None
    ) -> tuple[CpuGraph, Any]:
        with context(), WATCH.capturing():  # as graphs.capture_graph: the warm-up's compiles are the capture's
            for _ in range(2):  # the warm-up of graphs.capture_graph
                out = fn()
        captured.append(CpuGraph(fn, context, out))  # out: the static outputs every replay rewrites
        return captured[-1], out

    for module in (batched_decode, continuous, fast_decoder, fast, graphs):
        monkeypatch.setattr(module, "capture_graph", capture)
    monkeypatch.setattr(graphs.ShapeGraphs, "graph_devices", ("cuda", "cpu"))
    prefill_graphs_on = fast.FastModel.prefill_graphs_on  # every other condition of it still applies
    monkeypatch.setattr(fast.FastModel, "prefill_graphs_on", lambda self, _: prefill_graphs_on(self, CUDA))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_, **__: None)
    for cls in (batched_decode.DecodeRows, fast_decoder.FastDecoder):
        init = cls.__init__

        def keep_graph(self: Any, *args: Any, _init: Any = init, **kw: Any) -> None:
            _init(self, *args, **kw)
            self.use_graph = bool(kw.get("use_graph", True))  # the CPU would have turned it off

        monkeypatch.setattr(cls, "__init__", keep_graph)
    decode_path_for = BatchedGenerator.decode_path_for

    def graph_path(self: Any, ngrams: Any, keep_logits: bool) -> str:
        path = decode_path_for(self, ngrams, keep_logits)
        on_gpu = path == "static" and self.cuda_graphs and self.graph_safe() and self.capture_error is None
        return "graph" if on_gpu else path  # decode_path_for's answer on CUDA

    monkeypatch.setattr(BatchedGenerator, "decode_path_for", graph_path)
    return captured
