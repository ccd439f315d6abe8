"""Fast path for the native DeepSeek-OCR model: fused weights, grouped MoE, a CUDA-graph decode step.

``apply_fast_path(model, FastConfig(...))`` returns a :class:`FastModel` that the session can use in
place of :class:`~llm_perf_opt.models.deepseek_ocr.model.DeepseekOCRForCausalLM`: same stage methods
(``encode_images``, ``embed_prompt``, ``prefill``, ``decode_step``, ``new_cache``), every other attribute
delegated to the wrapped model (``fast.model.sam_model`` is the same module, so hooks keep firing).

What changes, all at load (``apply_fast_path``), with no second copy of any weight but the shared experts':
the decoder layers are converted (:func:`~llm_perf_opt.models.deepseek_ocr.fast_layers.convert_layer`: the
same :class:`~llm_perf_opt.models.deepseek_ocr.decoder.DecoderLayer` class and forward over the same weights,
fused / grouped modules swapped in; the eager model's own layers are left as they are), and every LM forward
(prefill, torch step, Triton step with :mod:`~llm_perf_opt.models.deepseek_ocr.triton_layers` swapped in) is
:func:`~llm_perf_opt.models.deepseek_ocr.decoder.run_decoder` fed a
:class:`~llm_perf_opt.models.deepseek_ocr.context.ForwardContext`.  The decode step is
:mod:`~llm_perf_opt.models.deepseek_ocr.fast_decoder`, the graph helpers
:mod:`~llm_perf_opt.models.deepseek_ocr.graphs`.

* ``fused_qkv``: q/k/v projections become one [3·hidden, hidden] matrix; gate/up of the dense MLP and the
  shared experts become one [2·I, hidden] matrix.  The original ``nn.Linear`` weights are re-pointed to
  views of the fused tensors (same values), so the eager model still works on the same storage.
* ``grouped_moe``: routed experts are stacked ([E, 2·I, hidden] and [E, hidden, I]; plus the shared experts
  copied into extra slots, ~14 MB per layer, for the Triton expert kernel) and applied with
  :func:`~llm_perf_opt.models.deepseek_ocr.decoder.apply_experts_grouped` (device-side sort by expert,
  ``searchsorted`` offsets, ``torch._grouped_mm``): no Python loop over experts, no host sync.
* ``cuda_graphs``: a decode step reads its token from a static buffer and its position from a static
  device tensor; the KV write is an ``index_copy_`` at that position and attention runs over the cache's
  whole ``max_len`` with an additive mask by position, so one captured graph serves every step of a page.
  Greedy argmax is computed on the device inside the graph (:meth:`FastDecoder.greedy`).
* vision (``sam_fast``, ``sam_compile``, ``clip_compile``, ``vision_graphs``; :class:`VisionFast`):
  SAM attention with the decomposed rel-pos folded into the q/k operands (no N×N bias: flash applies) and a
  channels-last neck; SAM and CLIP blocks as ``torch.compile``'d functions of their weights; both towers'
  forwards replayed from CUDA graphs per view shape.  Set on the shared modules only inside
  ``encode_images`` (the modules are still called, so hooks fire); the eager model's path is untouched.
  The vision part is the one model-specific piece: ``apply_fast_path(model, cfg, vision=...)`` takes the
  builder of the model's :class:`VisionFast` (v1: :class:`ClipVisionFast`; DeepSeek-OCR-2, whose language
  model is v1's, passes its SAM + encoder one from ``llm_perf_opt.models.deepseek_ocr2.fast``).
* ``decode_compile``: ``torch.compile`` of the decode step before capture (measured no faster; off).
* ``decode_kernels="triton"`` (default where Triton runs): the decode step as fused Triton kernels
  (:mod:`~llm_perf_opt.models.deepseek_ocr.kernels`: add+RMSNorm, rotary+KV write, split-K attention over
  keys ``0..pos`` only, router top-k, routed + shared experts in two GEMV kernels) plus cuBLAS for the QKV,
  o_proj and lm_head GEMMs: ~170 launches per step instead of ~700 (H200: 0.88 vs 2.29 ms/token).  The
  batched step (rows at their own positions, left pads masked) runs the same kernels with per-row rotary rows and
  an additive key mask, and grouped-GEMM experts from 9 rows on (``triton_layers.triton_row_layers``).
* ``prefill_graphs``: the LM prefill replayed from a CUDA graph per (prompt length, cache) (LRU of 8).
* ``triton_prefill`` (with the Triton decode kernels): the prompt's layers
  (``triton_layers.triton_prompt_layers``) run the add + RMSNorm, the rotary + K/V cache write, every SwiGLU and
  each MoE block's un-permute + weighted sum + shared add as one Triton kernel each, around cuBLAS's and the
  grouped GEMMs (H200: LM prefill 6.4 -> 4.4 ms on the Gundam page's 913 tokens).
* ``sam_attention`` / ``sam_window_attention`` / ``sam_gelu_epilogue``: SAM's rel-pos attention kernel for the
  global / windowed blocks (:mod:`~llm_perf_opt.models.deepseek_ocr.sam_kernels`) and its MLP's GELU in
  cuBLASLt's GEMM epilogue (:func:`~llm_perf_opt.models.deepseek_ocr.sam.linear_gelu_tanh`).
* ``device_decode`` (used by the profiler's session): :meth:`FastDecoder.greedy` with the no-repeat-ngram ban
  computed inside the graph (:func:`~llm_perf_opt.models.deepseek_ocr.generation.banned_ngram_mask`).
* ``pinned_upload`` (used by the session): page pixels in page-locked memory before the timed upload.

Exactness: the fast path computes the same function as the eager model, with different kernels (fused
GEMMs, grouped GEMM, masked attention over ``max_len``), so logits agree to bf16 rounding, not bit for bit.
``no_repeat_ngram`` needs the host-side history: use :meth:`FastModel.decode_step` (logits to the host,
exact rule in :func:`~llm_perf_opt.models.deepseek_ocr.generation.select_next_token`).
:meth:`FastDecoder.greedy` is exact greedy (first index on ties, as ``torch.argmax``) and checks eos
every ``check_every`` steps, so up to ``check_every - 1`` tokens past eos are computed (and dropped).

Routing statistics: the grouped path counts tokens per expert on the device; ``tokens_per_expert()``
reads them (one sync, only when called).  ``last_routing`` holds the most recent forward's expert ids.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from llm_perf_opt.errors import InputError
from llm_perf_opt.models.deepseek_ocr.clip import CLIP_ATTENTION, clip_block_fast, clip_block_views
from llm_perf_opt.models.deepseek_ocr.compiles import WATCH
from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig
from llm_perf_opt.models.deepseek_ocr.context import ForwardContext
from llm_perf_opt.models.deepseek_ocr.decoder import EXPERT_IMPLS, DecoderLayer, MoE, RMSNorm, run_decoder
from llm_perf_opt.models.deepseek_ocr.fast_decoder import TRITON_MAX_ROWS, FastDecoder
from llm_perf_opt.models.deepseek_ocr.fast_layers import GroupedMoE, convert_layer, fuse_linears
from llm_perf_opt.models.deepseek_ocr.generation import NoRepeatNGram
from llm_perf_opt.models.deepseek_ocr.graphs import (
    ShapeGraphs,
    capture_graph,
    default_capture_stream,
    first_argmax,
    stream_apart,
)
from llm_perf_opt.models.deepseek_ocr.kv_cache import StaticKVCache
from llm_perf_opt.models.deepseek_ocr.model import DEFAULT_SDPA_BACKENDS, DeepseekOCRForCausalLM
from llm_perf_opt.models.deepseek_ocr.sam import SAM_ATTENTION, SamEncoder, sam_block_fast

__all__ = [
    "TRITON_MAX_ROWS",
    "VISION_COMPILE_MODES",
    "VISION_SDPA",
    "ClipVisionFast",
    "FastConfig",
    "FastDecoder",
    "FastModel",
    "ShapeGraphs",
    "VisionFast",
    "apply_fast_path",
    "capture_graph",
    "first_argmax",
    "fuse_linears",
]

# SDPA backend lists for the vision towers (SAM's rel-pos bias rules flash out; CLIP has no mask).
VISION_SDPA: dict[str, tuple[SDPBackend, ...] | None] = {
    "model": None,  # whatever the wrapped model uses (DEFAULT_SDPA_BACKENDS: no cuDNN)
    "cudnn": (SDPBackend.CUDNN_ATTENTION, *DEFAULT_SDPA_BACKENDS),
    "flash": DEFAULT_SDPA_BACKENDS,
}
DECODE_ATTN = ("matmul", "sdpa")
# decode-step kernels: "torch" (cuBLAS + PyTorch elementwise ops) or "triton" (models/deepseek_ocr/kernels.py)
DECODE_KERNELS = ("torch", "triton")
# a prompt's routed experts with triton_prefill: "torch" (experts.grouped_experts_stacked) or "triton" (prompt_moe.py)
PREFILL_EXPERTS = ("torch", "triton")
# a prompt's causal attention with triton_prefill: "sdpa" (the model's SDPA policy) or "triton" (prompt_attention.py)
PREFILL_ATTENTION = ("sdpa", "triton")
# torch.compile of the decode step body (then captured in the CUDA graph as before): "none" or an inductor mode.
DECODE_COMPILE = ("none", "default", "max-autotune-no-cudagraphs")
VISION_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


@attrs.frozen
class FastConfig:
    """Switches of the fast path (``infer.fast.*`` in the session config)."""

    grouped_moe: bool = True
    cuda_graphs: bool = True
    fused_qkv: bool = True
    vision_sdpa: str = attrs.field(default="model", validator=attrs.validators.in_(tuple(VISION_SDPA)))
    decode_attention: str = attrs.field(default="matmul", validator=attrs.validators.in_(DECODE_ATTN))
    # decoder.EXPERT_IMPLS key used when grouped_moe (measure "gather_bmm")
    expert_impl: str = attrs.field(default="grouped", validator=attrs.validators.in_(tuple(EXPERT_IMPLS)))
    # SAM with rel-pos folded into the attention operands (no N×N bias, flash-eligible) and a channels-last
    # neck (sam.SamEncoder.fast); set on the shared module only for the duration of encode_images.
    sam_fast: bool = True
    # the global SAM blocks' attention with sam_fast (sam.SAM_ATTENTION): "triton" keeps head size 64 and adds the
    # relative positions per key row in one Triton kernel (sam_kernels; augmented, with a note in fallbacks(), where
    # Triton cannot run); "augmented" folds them into 192-wide flash operands (sam.rel_pos_attention); "flex" adds
    # them inside a FlexAttention kernel.  H200, bench_fast (v1 Gundam page, the fast vision as the profiler runs
    # it): vision 15.8-16.0 -> 14.1-14.5 ms with triton (two calls); flex is 7-24x slower per op (its score_mod
    # gathers; benchmarks/results/2026-12-02-h200-sam-attention.md)
    sam_attention: str = attrs.field(default="triton", validator=attrs.validators.in_(SAM_ATTENTION))
    # the same choice for SAM's windowed blocks (14x14 windows, 196 keys; the fallback and its note as above).  H200
    # (bench_sam_attention, round 11): flash on the augmented operands is faster per call than the kernel here, but
    # the kernel reads the block's qkv views and needs no concatenated operands: the tower is 0.3 ms (640-px tiles
    # x6) and 0.16 ms (1024-px view) faster with triton
    sam_window_attention: str = attrs.field(default="triton", validator=attrs.validators.in_(SAM_ATTENTION))
    # SAM's MLP up projection and GELU as one GEMM with cuBLASLt's GELU epilogue (sam.linear_gelu_tanh: the tanh
    # approximation of the exact GELU, within bf16 rounding of it) instead of a GEMM and a GELU pass over the
    # 3072-wide rows; on CUDA only (elsewhere there is no epilogue to gain).  H200 (bench_fusions, round 11):
    # Gundam tiles x6 0.189 -> 0.103 ms per block's up projection
    sam_gelu_epilogue: bool = True
    # with decode_kernels=triton (where its kernels run): the prefill's residual add + RMSNorm (kernels.add_rms_norm,
    # the torch norm's rounding points), rotary of q/k + cache write of k/v (kernels.prompt_rope_kv_write,
    # bit-identical), SwiGLUs (kernels.silu_mul) and MoE un-permute + weighted sum + shared add
    # (kernels.moe_gather_combine) as one Triton kernel each (triton_layers.triton_prompt_layers).  H200 (bench_fast,
    # round 11): LM prefill 6.45 -> 4.42 ms on the Gundam page's 913 tokens
    triton_prefill: bool = True
    # with triton_prefill: the prompt's routed experts as prompt_moe's kernels ("triton": the router's top-k in one
    # kernel over cuBLAS's float32 logits, a two-launch counting sort by expert, and two tiled grouped GEMMs that
    # gather their token rows and fuse the SwiGLU) instead of torch's routing kernels, radix sort, gathers and
    # torch._grouped_mm ("torch").  H200 (bench_fast, round 13, call 3, Gundam page, 913-token prompt on dummy
    # routing): LM prefill 4.38 -> 3.69 ms; one layer under random routing (bench_fusions, from CUDA graphs) 0.219 ->
    # 0.216 ms at the first launch settings (the sort 0.030 -> 0.010 ms; up + SwiGLU 0.124 -> 0.110 at the settings now
    # default, down 0.058 -> 0.059)
    prefill_experts: str = attrs.field(default="triton", validator=attrs.validators.in_(PREFILL_EXPERTS))
    # with triton_prefill: the prompt's causal attention over the cache as prompt_attention's kernel ("triton": flash
    # attention's online softmax, heaviest query blocks first, GQA in place, output in the o_proj's layout) instead
    # of SDPA ("sdpa": flash's split-KV form and its combine at one page's 913 positions x 10 heads).  H200 (round 13,
    # call 3): 0.029 -> 0.020 ms per layer (bench_fusions, from CUDA graphs); LM prefill 3.79 -> 3.69 ms (bench_fast)
    prefill_attention: str = attrs.field(default="triton", validator=attrs.validators.in_(PREFILL_ATTENTION))
    # with prefill_experts=triton on CUDA: each MoE layer's shared experts (two GEMMs and the SwiGLU between) on a
    # second stream while the router, the sort and the routed experts' grouped GEMMs run on the current one
    # (triton_layers.TritonPromptMoE._shared_beside): the router's and the sort's launches are a few programs each and
    # leave most SMs idle.  The same kernels, so the same bits (GPU test).  H200 (round 21, bench_fast, the LM prefill
    # paired with the in-line form over six alternating rounds): -0.074 ms on the dummy routing (every round faster,
    # sign test p = 0.03; 3.20 vs ~3.27 ms), -0.070 median with the routing spread (five of six rounds faster)
    prefill_shared_stream: bool = True
    # torch.compile of one SAM block (sam.sam_block_fast) when sam_fast: fuses the layout copies, norms and
    # the augmented-attention concatenations; compiled once per view shape (tiles, global view) and block kind.
    sam_compile: bool = True
    # the same for CLIP's layers (clip.clip_block_fast via ClipVisionTower.layer_fn): one compile per view shape;
    # for DeepSeek-OCR-2 the second tower's: the encoder's fused layer (deepseek_ocr2.encoder.encoder_layer_fast)
    clip_compile: bool = True
    # torch.compile's mode for those blocks: "default", or "max-autotune-no-cudagraphs" (inductor times Triton GEMM
    # templates with fused epilogues, e.g. CLIP's bias + quick GELU, against cuBLAS per shape: the first vision call
    # compiles for minutes; the graphs stay ours). Not yet timed on a GPU: bench_fast times it as a variant.
    vision_compile_mode: str = attrs.field(default="default", validator=attrs.validators.in_(VISION_COMPILE_MODES))
    # replay SAM's and CLIP's (v2: the encoder's) fast forwards from CUDA graphs captured per input shape (vision is
    # host-bound: ~500 launches + compiled-guard checks per page); the module calls, and so the timing hooks, stay.
    vision_graphs: bool = True
    # a page's global view through SAM / the second tower / the projector on a second CUDA stream while its crops
    # run on the current one (model._encode_page_views; CUDA and a crop grid only): the two chains are independent
    # until the layout and each leaves SMs idle in its small kernels.  The stage hooks then time each view on its
    # own stream, and the two views' intervals overlap (the report says so).  H200 (bench_fast, round 12, Gundam
    # page, two calls): vision 11.87 -> 11.24 and 12.04 -> 11.36 ms, features bit-identical to the serial path's
    # (GPU test); the global view's stream at high priority gains nothing (11.41 ms)
    vision_streams: bool = True
    # v1: a page's tiles and global view through CLIP as one sequence (clip.clip_block_views: each weight's GEMM once
    # over all 863 tokens of a Gundam page instead of once per view at 606 and 257 rows, attention per view), after
    # both views' SAM (model._encode_page_views_merged); the projector per view.  Same math per token
    clip_merged_views: bool = True
    # v1: CLIP's attention in its fast blocks (clip.CLIP_ATTENTION): "triton" runs one layer's attention for every
    # view of the page in one kernel (clip_attention.views_attention: q, k, v read in place from the QKV GEMM's rows,
    # the output written in the out_proj's layout; "sdpa" where Triton cannot run, with a note in fallbacks());
    # "sdpa": SDPA per view (flash, the global view's 257 tokens in its split-KV form plus a combine kernel, and the
    # heads' layout copies around it).  H200 (round 19): one layer's attention 0.017 -> 0.008 ms (bench_fusions, from
    # CUDA graphs); the Gundam page's vision 10.07 -> 9.70 ms (bench_fast, one run), features vs eager max |d| 0.172
    # either way
    clip_attention: str = attrs.field(default="triton", validator=attrs.validators.in_(CLIP_ATTENTION))
    decode_compile: str = attrs.field(default="none", validator=attrs.validators.in_(DECODE_COMPILE))
    # replay the language-model prefill from a CUDA graph per prompt length (needs cuda_graphs; batch 1)
    prefill_graphs: bool = True
    # fused Triton decode step (kernels.py) where Triton runs (CUDA); elsewhere the torch step, said once
    decode_kernels: str = attrs.field(default="triton", validator=attrs.validators.in_(DECODE_KERNELS))
    # with the Triton decode step at batch 1-8: the token pick after the lm_head (non-finite flag, n-gram ban,
    # first argmax) as kernels.pick_token's two launches instead of ~6 torch kernels.  On an H200 (bench_fast,
    # 2026-12-02 r7): 0.854 -> 0.819 ms/token with the same 64 greedy tokens; the pick itself 34.4 -> 3.1 us.
    fused_pick: bool = True
    # the no-repeat-ngram ban (the default config's no_repeat_ngram_size=20) as one kernel (kernels.ngram_ban: the
    # mask cleared, every window compared, the banned ids set) instead of generation.banned_ngram_mask's ~20 small
    # torch kernels a step, with the Triton decode step: at batch 1 and in the batched and continuous steps.  The
    # same mask bit for bit (interpreter and GPU tests against the torch mask).  On an H100 (round 31, 6 paired
    # rounds): batch-1 decode under the rule 0.744 -> 0.712 ms/token, the same 64 greedy tokens; issue 18's goals
    # run (64 slots, continuous) 1.05-1.06x the output tok/s
    ngram_kernel: bool = True
    # with the Triton decode step: each MoE layer's post-attention norm kernel also writes the router's float32
    # input (the same values as ``normed.float()``), saving one cast launch per MoE layer.  On an H200
    # (bench_fast, 2026-12-02 r7): 0.854 -> 0.827 ms/token, bit-identical logits (GPU and interpreter tests).
    # Applies only with fused_router off (the fused router reads the normed rows in its own kernel)
    norm_router_f32: bool = True
    # with the Triton decode step: every Triton kernel launched as a programmatic dependent launch (Hopper PDL,
    # kernels.dependent_launches): a kernel's programs are scheduled while the one before it finishes and wait on
    # the device before their first load of anything the step writes, so results are bit-identical and launch
    # latency overlaps (H200, round 8: 0.756 -> 0.722 ms/token, the same greedy tokens; neutral at 32 and 64
    # rows).  sm_90+ only: on an older GPU the kernels launch plainly and the report says so
    pdl: bool = True
    # with the Triton decode step at batch 1-8: the fused QKV and the o_proj products as Triton GEMVs
    # (kernels.linear_rows: float32 accumulator, one rounding, like cuBLAS's, summed in another order) instead of
    # cuBLAS's small GEMMs (0.7-1.9 TB/s on an H200, 120 us per step).  H200, round 8: 0.786 -> 0.722 ms/token,
    # the same greedy tokens over 64 steps
    triton_linear: bool = True
    # with the Triton decode step at batch 1-8: decode attention in one launch instead of two (the split that
    # finishes last for a row-head combines the partials, ordered by an acq_rel counter), 12 launches fewer per
    # step; bit-identical to the two launches (both sum the splits in one fixed order).  H200: 0.727 -> 0.722
    one_launch_attention: bool = True
    # with the Triton decode step at batch 1-8: each MoE layer's post-attention add+RMSNorm, router logits, top-k
    # and routing counts in one launch (kernels.add_rms_norm_route; the last program of a row routes it) instead of
    # four (norm, cuBLAS's two-kernel float32 GEMV, the top-k kernel).  The logits are summed in another order than
    # cuBLAS's: ids equal except at float32 near-ties.  Replaces norm_router_f32 where it applies.  H200, round 9:
    # 0.722 -> 0.670 ms/token, the same 64 greedy tokens
    fused_router: bool = True
    # with the Triton decode step: the row layers' MoE rows (the batched and continuous steps, and a single-page step of
    # more than 8 rows, whose MoE block then counts the picks) routed in the post-attention norm's kernel too
    # (kernels.add_rms_norm_route at any row count: grid rows x expert slices, the last program of a row routes it;
    # no counts in the kernel), one launch where the norm, cuBLAS's float32 logits GEMM and the top-k kernel are
    # three.  Ids equal cuBLAS's except at float32 near-ties, as fused_router's.  H100, round 37 (bench_kernels, the
    # graphed static step, one run): 8 rows 1.831 -> 1.819 ms, 32 rows 2.931 -> 2.886, 64 rows 3.514 -> 3.466
    batched_fused_router: bool = True
    # with triton_linear: the rotary and the K/V cache writes in the QKV GEMV's epilogue (kernels.qkv_rope: each
    # program computes rotary pairs of one head), one launch fewer per layer; bit-identical to the two launches
    # (H200, round 9: 0.667 -> 0.661 ms/token)
    fused_rope: bool = True
    # with fused_rope: each layer's input residual add + RMSNorm inside that QKV kernel too (every program normalises
    # the row it multiplies; the norm launch goes), one launch fewer per layer; bit-identical to the norm kernel.
    # Off: on an H200 it pays alone (bench_kernels: 9.8 -> 7.5 us for the three launches it replaces) but not in
    # the step with dependent launches, which already hide the norm launch while the fused kernel puts the
    # row's RMS on its critical path (round 9: 0.661 ms/token without, 0.670 with).  Worth trying where pdl is off
    fused_input_norm: bool = False
    # with the Triton decode step at batch 1-8: the experts' down GEMV with the slots split across programs
    # (kernels.moe_experts(down="split"): a program per (row, slot, 16 hidden rows), pipelined K loop like the up
    # kernel's; the slot finishing last combines them with the same rounding points) instead of a program per (row,
    # 2 hidden rows) over all slots.  On since round 15: the H200 step 0.654 -> 0.632 and 0.654 -> 0.633 ms/token in
    # two bench_fast runs (the same greedy tokens; the other switches' no-op rows within 0.002 of the default).
    # Round 12 had found it no faster (0.653 vs 0.654 ms/token; both expert kernels of a layer at T=4 49.5 vs 48.6 us,
    # so a 2-8-row step may lose ~1 us per layer)
    moe_down_split: bool = True
    # with the Triton decode step at batch 1-8: the first layer's dense MLP on the expert GEMV kernels as one always-on
    # slot (triton_layers.TritonDenseMLP: two dependent launches, SwiGLU fused) instead of cuBLAS's GEMMs and an
    # elementwise SwiGLU (four launches, outside the dependent-launch chain)
    triton_dense_mlp: bool = True
    # with moe_down_split: the norm after each MoE layer (the next layer's input residual add + RMSNorm, or the final
    # norm) in that layer's down kernel, run by the program that finishes a token's row last (kernels.moe_experts'
    # ``norm``: add_rms_norm's math and rounding points, bit-identical logits on the GPU), one launch fewer per MoE
    # layer; where fused_input_norm folds that norm into the next QKV kernel instead, that fold stays.  Off: on an
    # H200 (bench_fast, round 19, call 3) 0.590 ms/token without, 0.600 with; the graphed step's timeline shows the
    # 11 norm launches gone (-37 us) and the down kernel 3.1 us a call longer (+34 us): the row's second counter
    # and its tail cost what a dependent launch's boundary costs
    down_norm: bool = False
    # the session's decode loop picks tokens on the device (greedy + the no-repeat-ngram ban inside the decode
    # graph, eos checked every 16 steps) instead of reading every step's logits on the host; temperature > 0
    # keeps the host loop
    device_decode: bool = True
    # the session copies each page's pixels into page-locked memory during preprocessing, so the upload
    # inside the timed prefill is an asynchronous DMA (CUDA only)
    pinned_upload: bool = True


_COMPILED: dict[Any, Any] = {}
# Compiled shapes per vision block function: one per (view batch, block kind) the run meets: Gundam's 2-9 crops
# and DeepSeek-OCR-2's 2-6 tiles plus the global views.  Dynamo's default (8) would silently run every shape
# after the 8th uncompiled, so a dataset with many tile counts would measure a slower path for some pages.
VISION_RECOMPILE_LIMIT = 64


def _compiled(fn: Any, sdpa_policy: str, mode: str = "default", **bound: Any) -> Any:
    """``torch.compile(fn)`` for a vision block function, shared by all models (weights are arguments, so
    one compile per input shape and block kind), called with ``sdpa_policy`` (``FastConfig.vision_sdpa``): the
    block functions check it (:func:`graphs.check_sdpa_policy`), so each policy gets its own graph with the SDPA
    backend chosen under that policy, also when several configs run in one process (a Hydra multirun).
    ``mode``: ``FastConfig.vision_compile_mode`` (one compiled function per mode); ``bound``: further keyword
    arguments the calls pass (constants the graph is specialised on, like the policy: CLIP's attention kind)."""
    if mode not in VISION_COMPILE_MODES:
        raise ValueError(f"vision compile mode must be one of {VISION_COMPILE_MODES}, got {mode!r}")
    if (fn, mode) not in _COMPILED:
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, VISION_RECOMPILE_LIMIT)
        _COMPILED[fn, mode] = torch.compile(fn, dynamic=False, mode=None if mode == "default" else mode)
    return functools.partial(_COMPILED[fn, mode], sdpa_policy=sdpa_policy, **bound)


def _resolve_kernel(
    kind: str, device: torch.device, module: str, setting: str, fallback: str
) -> tuple[str, str | None]:
    """``kind``, or ``fallback`` and why where it is "triton" and the kernels of ``module`` (a module of this
    package with ``unavailable_reason``) cannot run on ``device`` (a CPU without Triton's interpreter, no Triton);
    warns on CUDA, where the Triton kernel was expected to run (``setting`` names the switch in the warning)."""
    if kind != "triton":
        return kind, None
    why = importlib.import_module(f"llm_perf_opt.models.deepseek_ocr.{module}").unavailable_reason(device)
    if not why:
        return kind, None
    if device.type == "cuda":
        warnings.warn(f"{setting}=triton: {why}; {setting}={fallback} runs instead", stacklevel=3)
    return fallback, why


def _resolve_sam_attention(kind: str, device: torch.device, blocks: str = "global") -> tuple[str, str | None]:
    """``kind``, or "augmented" and why where it is "triton" and its kernel cannot run on ``device``
    (:func:`_resolve_kernel`; ``blocks`` names SAM's blocks: "global" or "windowed")."""
    setting = "sam_attention" if blocks == "global" else "sam_window_attention"
    return _resolve_kernel(kind, device, "sam_kernels", setting, "augmented")


class VisionFast:
    """The fast forwards of a model's vision towers, switched on around ``encode_images`` (:meth:`mode`).

    The towers stay the model's own modules (so the stage hooks fire); what changes inside :meth:`mode` is which
    function their ``forward`` runs: SAM with rel-pos folded into the attention operands (``sam_fast``), its
    blocks ``torch.compile``'d (``sam_compile``), each tower's forward replayed from a CUDA graph per input shape
    (``vision_graphs``).  This base class handles SAM, which v1 and DeepSeek-OCR-2 share; a subclass adds the
    second tower (:class:`ClipVisionFast` for v1, ``deepseek_ocr2.fast.EncoderVisionFast`` for v2) through
    :meth:`_set_tower`: a module with ``layer_fn`` / ``forward_fn`` / ``forward_fast`` and its fast layer function.
    """

    def __init__(self, sam: SamEncoder, cfg: FastConfig) -> None:
        self.sam = sam
        self.cfg = cfg
        # the global blocks' attention that runs: cfg.sam_attention, or "augmented" where its kernel cannot (and why)
        self.sam_attention, self.sam_attention_note = _resolve_sam_attention(cfg.sam_attention, sam.pos_embed.device)
        self.sam_window_attention, self.sam_window_attention_note = _resolve_sam_attention(
            cfg.sam_window_attention, sam.pos_embed.device, "windowed"
        )
        # the GELU epilogue is cuBLASLt's: elsewhere it would only swap the exact GELU for the tanh one
        self.sam_gelu_epilogue = cfg.sam_gelu_epilogue and sam.pos_embed.device.type == "cuda"
        # one ShapeGraphs per tower, created on first use ("sam", then the second tower's name)
        self.graphs: dict[str, ShapeGraphs] = {}
        # the second tower: (graph name, module, fast layer function, several views' layer function or None, keyword
        # arguments both functions are called with); None in this base class
        self._tower: tuple[str, Any, Any, Any, dict[str, Any]] | None = None
        # v1's CLIP attention that runs (ClipVisionFast): cfg.clip_attention, or "sdpa" where its kernel cannot
        self.clip_attention: str | None = None
        self.clip_attention_note: str | None = None
        # vision_streams (CUDA): the global view's stream.  On CUDA, one capture stream per view chain: the chains'
        # graphs replay concurrently with vision_streams, so they must not share the cuBLAS workspace of one capture
        # stream (capture_graph); and neither is torch's shared capture stream, where the decode steps' graphs are
        # captured, since continuous batching's refill vision can run beside those (run_continuous's vision_ahead)
        self.view_stream: torch.cuda.Stream | None = None
        self._capture_streams: tuple[torch.cuda.Stream, torch.cuda.Stream] | None = None
        device = sam.pos_embed.device
        if device.type == "cuda":
            # drawn apart from each other and from torch's shared capture stream: pool streams are handed out
            # round-robin, so a stream made later in a process can be one made earlier (stream_apart)
            shared = default_capture_stream()
            if cfg.vision_streams:
                self.view_stream = stream_apart(lambda: torch.cuda.Stream(device), [shared])
            own = stream_apart(lambda: torch.cuda.Stream(device), [shared, self.view_stream])
            crops = stream_apart(lambda: torch.cuda.Stream(device), [shared, self.view_stream, own])
            self._capture_streams = (own, crops)

    def _set_tower(self, name: str, module: Any, layer_fast: Any, views_fast: Any = None, **bound: Any) -> None:
        """The second tower: its layers run ``layer_fast`` (compiled with ``clip_compile``) and its forward is
        replayed per view shape under ``name`` with ``vision_graphs``; with ``views_fast`` (and ``clip_merged_views``)
        a page's views run as one sequence through it (the module's ``views_layer_fn`` / ``views_fn``).  Both
        functions are called with the keyword arguments ``bound``."""
        self._tower = (name, module, layer_fast, views_fast, bound)

    @property
    def merges_views(self) -> bool:
        """Whether a page's views run through the second tower as one sequence (``clip_merged_views`` where the
        tower has that form: v1's CLIP; DeepSeek-OCR-2's encoder has none)."""
        return self._tower is not None and self._tower[3] is not None and self.cfg.clip_merged_views

    @property
    def graph_count(self) -> int:
        """Vision CUDA graphs captured so far, over all towers (one per tower and input shape)."""
        return sum(len(g.graphs) for g in self.graphs.values())

    def graphed(self, name: str, fn: Any) -> ShapeGraphs:
        """The per-shape graph replay of ``fn`` for the tower ``name`` (created once, kept across pages)."""
        if name not in self.graphs:
            self.graphs[name] = ShapeGraphs(fn, None if self._capture_streams is None else self._capture_stream)
        return self.graphs[name]

    @property
    def capture_streams(self) -> tuple[torch.cuda.Stream, ...]:
        """The streams this vision's graphs are captured on (none off CUDA): work beside a replay must avoid them."""
        return self._capture_streams or ()

    @property
    def streams(self) -> tuple[torch.cuda.Stream, ...]:
        """Every stream this vision holds (none off CUDA): the global view's (``vision_streams``) and the capture
        streams.  A stream made for other work must be none of them (:func:`stream_apart`): work on the view stream
        is taken for the global view's chain (its graphs are keyed by the capture stream it picks), and a capture
        stream's cuBLAS workspace is baked into the graphs captured on it."""
        view = () if self.view_stream is None else (self.view_stream,)
        return (*view, *self.capture_streams)

    def _capture_stream(self) -> torch.cuda.Stream | None:
        """The capture stream of the view chain running now: the global view's on ``view_stream``, else the crops'."""
        if self._capture_streams is None:
            return None
        if self.view_stream is None:
            return self._capture_streams[1]
        current = torch.cuda.current_stream(self.view_stream.device)
        return self._capture_streams[0 if current.cuda_stream == self.view_stream.cuda_stream else 1]

    @contextlib.contextmanager
    def mode(self) -> Iterator[None]:
        sam, cfg = self.sam, self.cfg
        saved = (sam.fast, sam.block_fn, sam.forward_fn, sam.global_attention, sam.window_attention, sam.gelu_epilogue)
        sam.fast = cfg.sam_fast
        sam.global_attention, sam.window_attention = self.sam_attention, self.sam_window_attention
        sam.gelu_epilogue = self.sam_gelu_epilogue
        if cfg.sam_compile and cfg.sam_fast:
            sam.block_fn = _compiled(sam_block_fast, cfg.vision_sdpa, cfg.vision_compile_mode)
        if cfg.vision_graphs and cfg.sam_fast:
            sam.forward_fn = self.graphed("sam", sam._forward_fast)
        try:
            with self._tower_mode():
                yield
        finally:
            sam.fast, sam.block_fn, sam.forward_fn, sam.global_attention, sam.window_attention, sam.gelu_epilogue = (
                saved
            )

    @contextlib.contextmanager
    def _tower_mode(self) -> Iterator[None]:
        """The second tower's fast forward (set on entry, restored on exit)."""
        if self._tower is None:
            yield
            return
        name, tower, layer_fast, views_fast, bound = self._tower
        saved = (tower.layer_fn, tower.forward_fn)
        cfg = self.cfg

        def fast_fn(fn: Any) -> Any:
            if cfg.clip_compile:
                return _compiled(fn, cfg.vision_sdpa, cfg.vision_compile_mode, **bound)
            return functools.partial(fn, **bound) if bound else fn

        tower.layer_fn = fast_fn(layer_fast)
        if cfg.vision_graphs:
            tower.forward_fn = self.graphed(name, tower.forward_fast)
        merged = views_fast is not None and cfg.clip_merged_views
        if merged:
            saved_views = (tower.views_layer_fn, tower.views_fn)
            tower.views_layer_fn = fast_fn(views_fast)
            if cfg.vision_graphs:
                tower.views_fn = self.graphed(f"{name}-views", tower.forward_views_fast)
        try:
            yield
        finally:
            tower.layer_fn, tower.forward_fn = saved
            if merged:
                tower.views_layer_fn, tower.views_fn = saved_views


class ClipVisionFast(VisionFast):
    """v1's towers: SAM (the base class) + CLIP, its layers through :func:`~llm_perf_opt.models.deepseek_ocr.clip.
    clip_block_fast` (compiled with ``clip_compile``), its whole forward (embeddings, pre-LayerNorm, layers) graphed
    per view shape with ``vision_graphs``."""

    def __init__(self, model: DeepseekOCRForCausalLM, cfg: FastConfig) -> None:
        vision_model = getattr(model.model, "vision_model", None)
        if vision_model is None:
            raise InputError(
                f"{type(model).__name__} has no CLIP tower, so v1's vision fast path does not apply",
                hint="for DeepSeek-OCR-2 use llm_perf_opt.models.deepseek_ocr2.fast.apply_fast_path_v2",
            )
        super().__init__(model.model.sam_model, cfg)
        device = self.sam.pos_embed.device
        self.clip_attention, self.clip_attention_note = _resolve_kernel(
            cfg.clip_attention, device, "clip_attention", "clip_attention", "sdpa"
        )
        self._set_tower("clip", vision_model, clip_block_fast, clip_block_views, attention=self.clip_attention)


class FastModel:
    """The fast path over a (shared, not copied) :class:`DeepseekOCRForCausalLM`; see the module doc."""

    MAX_PREFILL_GRAPHS = 8  # prompt lengths kept captured (each graph holds its activations' memory pool)

    def __init__(self, model: DeepseekOCRForCausalLM, cfg: FastConfig, vision: VisionFast | None = None) -> None:
        self.base = model
        self.fast_config = cfg
        # the model conversion: the same DecoderLayer class over the same weights, fused / grouped modules in
        self.layers: list[DecoderLayer] = [
            convert_layer(layer, fused=cfg.fused_qkv, grouped=cfg.grouped_moe, expert_impl=cfg.expert_impl)
            for layer in model.model.layers
            if isinstance(layer, DecoderLayer)
        ]
        self.norm: RMSNorm = model.model.norm
        self.decode_kernels, self.decode_kernels_note = self._resolve_kernels(model, cfg)
        self.pdl_note: str | None = None  # why infer.fast.pdl is configured but not applied (None: applied or off)
        if cfg.pdl and self.decode_kernels == "triton" and model.device.type == "cuda":
            self.pdl_note = pdl_unsupported(torch.cuda.get_device_capability(model.device))
            if self.pdl_note is not None:
                warnings.warn(self.pdl_note, stacklevel=2)
        self._decoder: FastDecoder | None = None
        self._compiled_step: Any = None
        # the vision towers' fast forwards (v1: SAM + CLIP; DeepSeek-OCR-2 passes its SAM + encoder one)
        self.vision: VisionFast = vision if vision is not None else ClipVisionFast(model, cfg)
        # prefill graphs per (embeds shape, cache storage), least recently used first; see prefill()
        # (the cache is held weakly and checked by identity on every hit: a freed cache's k storage can be handed
        # to the next cache, whose v then lies elsewhere, and a replay by address alone would write freed memory)
        self._prefill_graphs: dict[
            tuple[Any, ...], tuple[torch.cuda.CUDAGraph, Tensor, Tensor, weakref.ref[StaticKVCache]]
        ] = {}
        self._prefill_graph_error: str | None = None
        self._prefill_setups = 0
        self._counts: dict[int, Tensor] = {
            layer.layer_idx: layer.mlp.counts
            for layer in self.layers
            if isinstance(layer.mlp, GroupedMoE) and layer.mlp.counts is not None
        }
        self._triton: tuple[list[DecoderLayer], RMSNorm] | None = None
        # decode steps over other slot contexts (the batched step, > 8 rows): per-row positions and key masks
        self._triton_rows: tuple[list[DecoderLayer], RMSNorm] | None = None
        if self.decode_kernels == "triton":
            from llm_perf_opt.models.deepseek_ocr.triton_layers import triton_layers, triton_row_layers

            self._triton = triton_layers(
                self.layers,
                self.norm,
                cfg.norm_router_f32,
                cfg.triton_linear,
                cfg.one_launch_attention,
                cfg.fused_router,
                cfg.fused_rope,
                cfg.fused_input_norm,
                cfg.moe_down_split,
                cfg.triton_dense_mlp,
                cfg.down_norm,
            )
            if cfg.decode_compile == "none":  # a compiled step traces the torch layers
                self._triton_rows = triton_row_layers(
                    self.layers, self.norm, cfg.norm_router_f32, cfg.batched_fused_router
                )
        # the prefill's (and any other multi-position forward's) layers: the fast layers, or with triton_prefill
        # the same weights with their elementwise work on Triton kernels (triton_layers.triton_prompt_layers)
        self._prompt_layers: tuple[list[DecoderLayer], RMSNorm] = (self.layers, self.norm)
        # the stream the prompt's shared experts run on beside its routed ones (prefill_shared_stream), else None
        self.prompt_stream: torch.cuda.Stream | None = None
        if self.decode_kernels == "triton" and cfg.triton_prefill:
            from llm_perf_opt.models.deepseek_ocr.triton_layers import triton_prompt_layers

            if cfg.prefill_shared_stream and cfg.prefill_experts == "triton" and model.device.type == "cuda":
                # its eager GEMMs run beside graph replays: not the decode / prefill graphs' capture stream (torch's
                # shared one) nor any of the vision's (VisionFast.streams)
                self.prompt_stream = stream_apart(
                    lambda: torch.cuda.Stream(model.device), [default_capture_stream(), *self.vision.streams]
                )
            side = self.prompt_stream
            self._prompt_layers = triton_prompt_layers(
                self.layers, self.norm, cfg.prefill_experts, cfg.prefill_attention, side
            )

    def _resolve_kernels(self, model: DeepseekOCRForCausalLM, cfg: FastConfig) -> tuple[str, str | None]:
        """The decode kernels that will run: "triton" only where its kernels can (else "torch", and why)."""
        if cfg.decode_kernels != "triton":
            return "torch", None
        from llm_perf_opt.models.deepseek_ocr import kernels

        why = None
        if not cfg.grouped_moe:
            why = "decode_kernels=triton needs grouped_moe (stacked expert weights)"
        elif not kernels.triton_available(model.device):
            reason = kernels.unavailable_reason(model.device)
            why = f"the Triton decode step cannot run on {model.device}" + (f": {reason}" if reason else "")
        elif any(isinstance(layer.mlp, MoE) and layer.mlp.scoring_func != "softmax" for layer in self.layers):
            why = "the Triton router implements softmax scoring only"
        if why is None:
            return "triton", None
        if model.device.type == "cuda":  # on the CPU the torch step is the expected one: no warning
            warnings.warn(f"{why}: decoding with the torch kernels", stacklevel=3)
        return "torch", why

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found on FastModel: model, config, device, dtype, lm_head, ...
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.base.parameters()

    @property
    def config(self) -> DeepseekOCRConfig:
        return self.base.config

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    # ------------------------------------------------------------------ routing statistics
    def reset_routing_stats(self) -> None:
        self.base.reset_routing_stats()
        for counts in self._counts.values():
            counts.zero_()

    def tokens_per_expert(self) -> dict[int, list[int]]:
        """Per MoE layer: tokens routed to each expert since the last reset (reads device counters: one sync)."""
        if not self._counts:
            return self.base.tokens_per_expert()
        return {i: [int(c) for c in counts.tolist()] for i, counts in self._counts.items()}

    def experts_hit_per_layer(self) -> list[int]:
        return [sum(1 for c in counts if c) for counts in self.tokens_per_expert().values()]

    def expert_reads(self) -> Tensor | None:
        """The batched decode steps' expert counters, one row per MoE layer: [distinct routed experts read, summed
        over the layer's calls (grouped, and GEMV at 8 rows or fewer); those calls] (int64 [layers, 2], a device
        copy made now, no sync).
        None without the Triton row layers (``decode_kernels`` torch, or no Triton here): nothing counts them."""
        if self._triton_rows is None:
            return None
        from llm_perf_opt.models.deepseek_ocr.triton_layers import TritonMoE

        moes = [layer.mlp for layer in self._triton_rows[0] if isinstance(layer.mlp, TritonMoE)]
        return torch.stack([m.expert_reads for m in moes]) if moes else None

    # ------------------------------------------------------------------ stages 1/2: delegated
    def _vision_policy(self) -> contextlib.AbstractContextManager[None]:
        backends = VISION_SDPA[self.fast_config.vision_sdpa]
        if backends is None:
            return contextlib.nullcontext()
        return sdpa_kernel(list(backends))

    @property
    def vision_graph_count(self) -> int:
        """How many vision CUDA graphs exist (one per view shape seen): a rise means a one-time capture ran."""
        return self.vision.graph_count

    def graph_capture_errors(self) -> dict[str, str]:
        """What ran un-graphed because its CUDA-graph capture failed, and why: the vision towers (by name), the
        LM prefill and the single-page decode step; empty when every capture so far worked."""
        out = {f"vision ({name})": g.capture_error for name, g in self.vision.graphs.items() if g.capture_error}
        if self._prefill_graph_error is not None:
            out["LM prefill"] = self._prefill_graph_error
        if self._decoder is not None and self._decoder.capture_error is not None:
            out["decode step"] = self._decoder.capture_error
        return out

    def fallbacks(self) -> dict[str, str]:
        """Configured fast-path switches that are not what runs on this GPU, and why (empty on the CPU, where the
        torch decode step is the expected one): the Triton decode kernels, programmatic dependent launches."""
        if self.device.type != "cuda":
            return {}
        out = {}
        if self.fast_config.decode_kernels == "triton" and self.decode_kernels_note is not None:
            out["decode_kernels=triton"] = f"{self.decode_kernels_note}: the torch decode kernels ran"
        if self.pdl_note is not None:
            out["pdl"] = self.pdl_note
        if self.vision.sam_attention_note is not None:
            out["sam_attention=triton"] = f"{self.vision.sam_attention_note}: the augmented flash attention ran"
        if self.vision.sam_window_attention_note is not None:
            out["sam_window_attention=triton"] = (
                f"{self.vision.sam_window_attention_note}: the augmented flash attention ran"
            )
        if self.vision.clip_attention_note is not None:
            out["clip_attention=triton"] = f"{self.vision.clip_attention_note}: SDPA per view ran"
        return out

    @property
    def _vision_graphs(self) -> tuple[ShapeGraphs, ...] | None:
        """The vision towers' per-shape graph sets, once built (None before the first graphed vision call)."""
        return tuple(self.vision.graphs.values()) or None

    def vision_mode(self) -> contextlib.AbstractContextManager[None]:
        """Within: the shared vision modules run this config's fast forwards (restored on exit)."""
        return self.vision.mode()

    @torch.no_grad()
    def encode_images(self, images_crop: Tensor, images_ori: Tensor, images_spatial_crop: Any) -> Tensor:
        """The wrapped model's ``encode_images`` (its vision modules called as modules), SDPA per ``vision_sdpa``,
        the towers per ``sam_fast`` / ``sam_compile`` / ``clip_compile`` / ``vision_graphs`` (:class:`VisionFast`)."""
        base = self.base
        saved = base.sdpa_backends, base.view_stream
        if VISION_SDPA[self.fast_config.vision_sdpa] is not None:
            base.sdpa_backends = None  # the policy below decides
        base.view_stream = self.view_stream
        try:
            with self._vision_policy(), self.vision_mode():
                return base.encode_images(images_crop, images_ori, images_spatial_crop)
        finally:
            base.sdpa_backends, base.view_stream = saved

    @property
    def view_stream(self) -> torch.cuda.Stream | None:
        """The global view's stream with ``vision_streams`` on CUDA, else None (:class:`VisionFast`)."""
        return self.vision.view_stream

    def embed_prompt(self, input_ids: Tensor, images_seq_mask: Tensor, image_features: Sequence[Tensor]) -> Tensor:
        return self.base.embed_prompt(input_ids, images_seq_mask, image_features)

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        return self.base.new_cache(batch, max_len)

    # ------------------------------------------------------------------ stage 3: prefill
    def lm_forward(self, hidden: Tensor, ctx: ForwardContext, *, triton: bool = False) -> Tensor:
        """The fast decoder layers over ``hidden`` with positions / mask / cache slot in ``ctx`` -> normed hidden
        states (the cache's length is the caller's to advance); ``triton``: the layers with the Triton modules
        swapped in (one token per row, [B, hidden]; only when ``decode_kernels == "triton"``).  Any other decode
        step (a slot context: the batched step, the torch step of more than 8 rows) runs the Triton row layers
        (``triton_layers.triton_row_layers``) when ``decode_kernels == "triton"``."""
        if triton:
            if self._triton is None:
                raise InputError("the Triton decode layers were not built", hint=str(self.decode_kernels_note))
            with self.triton_launches():
                return run_decoder(self._triton[0], self._triton[1], hidden, ctx)
        if self._triton_rows is not None and ctx.slot is not None:
            with self.triton_launches():
                return run_decoder(self._triton_rows[0], self._triton_rows[1], hidden, ctx)
        return run_decoder(*self._prompt_layers, hidden, ctx)

    def triton_launches(self) -> contextlib.AbstractContextManager[None]:
        """How the Triton decode kernels are launched here: as programmatic dependent launches when
        ``infer.fast.pdl`` (:func:`kernels.dependent_launches`), plainly otherwise."""
        if not self.fast_config.pdl or self.pdl_note is not None:
            return contextlib.nullcontext()
        from llm_perf_opt.models.deepseek_ocr.kernels import dependent_launches

        return dependent_launches()

    def logits(self, hidden: Tensor) -> Tensor:
        """float32 logits of normed hidden states."""
        return self.base.logits(hidden)

    @torch.no_grad()
    def prefill(self, inputs_embeds: Tensor, cache: StaticKVCache, logits_positions: str = "last") -> Tensor:
        """Decoder over the prompt with fused/grouped weights, filling ``cache``; float32 logits like the model's.

        With ``prefill_graphs`` (and ``cuda_graphs``), a batch-1 prompt written at position 0 with last-position
        logits replays a CUDA graph captured per (prompt length, cache): the un-graphed prefill is host-bound
        (~700 launches for ~1.3 ms of tensor-core work on an H100).  The first prompt of a new length pays the
        capture (``setup_count`` rises, so the session flags that page as one-time setup).
        """
        if logits_positions not in ("last", "all"):
            raise ValueError(f"logits_positions must be 'last' or 'all', got {logits_positions!r}")
        if inputs_embeds.dim() != 3:
            raise InputError(f"inputs_embeds must be [B, L, hidden], got {tuple(inputs_embeds.shape)}")
        base = self.base
        if cache.length == 0:
            self.reset_routing_stats()
        bsz, length, _ = inputs_embeds.shape
        if cache.batch != bsz:
            raise InputError(f"KV cache was sized for batch {cache.batch}, inputs have batch {bsz}")
        cache.check_room(length)
        start = cache.length
        hidden = inputs_embeds.to(device=base.device, dtype=base.dtype)
        graphable = (
            self.prefill_graphs_on(hidden.device)
            and bsz == 1
            and start == 0
            and logits_positions == "last"
            and not torch.is_grad_enabled()
        )
        if graphable:
            logits = self._prefill_graphed(hidden, cache)
        else:
            logits = self._prefill_body(hidden, cache, start, logits_positions)
        cache.advance(length)
        return logits

    def prefill_graphs_on(self, device: torch.device) -> bool:
        """Whether a batch-1 prefill at position 0 with last-position logits on ``device`` replays a CUDA graph kept
        per (prompt length, cache) (:meth:`prefill`), the first one per pair capturing it.  ``grouped_moe``: the
        loop-over-experts MoE reads expert counts on the host (a sync); a capture that failed once turns it off."""
        cfg = self.fast_config
        return (
            cfg.cuda_graphs
            and cfg.prefill_graphs
            and cfg.grouped_moe
            and device.type == "cuda"
            and self._prefill_graph_error is None
        )

    def _prefill_body(self, hidden: Tensor, cache: StaticKVCache, start: int, logits_positions: str) -> Tensor:
        """The prefill computation (writes K/V at ``start``..; does not advance the cache's length)."""
        base = self.base
        length = hidden.shape[1]
        ctx = ForwardContext.causal(base.model.rotary(start, length, hidden.device, hidden.dtype), cache, start)
        with base._sdpa_policy():
            hidden = self.lm_forward(hidden, ctx)
        if logits_positions == "last":
            hidden = hidden[:, -1]
        logits: Tensor = base.lm_head(hidden).float()
        return logits

    @staticmethod
    def _prefill_key(shape: tuple[int, ...], cache: StaticKVCache) -> tuple[Any, ...]:
        return (shape, cache.k.data_ptr(), cache.v.data_ptr(), tuple(cache.k.shape))

    def prefill_graph_kept(self, length: int, cache: StaticKVCache) -> bool:
        """Whether a batch-1 prefill of ``length`` tokens into ``cache`` would replay a kept graph, not capture one:
        the graphs are kept least recently used first (``MAX_PREFILL_GRAPHS``), so one a caller made earlier may have
        been dropped since by prefills into other caches."""
        hidden = self.base.model.embed_tokens.embedding_dim
        entry = self._prefill_graphs.get(self._prefill_key((1, length, hidden), cache))
        return entry is not None and entry[3]() is cache

    def _prefill_graphed(self, hidden: Tensor, cache: StaticKVCache) -> Tensor:
        key = self._prefill_key(tuple(hidden.shape), cache)
        entry = self._prefill_graphs.pop(key, None)
        if entry is not None and entry[3]() is not cache:  # captured for a cache that is gone (same addresses)
            entry = None
        if entry is None:
            try:
                entry = self._capture_prefill(hidden, cache)
            except RuntimeError as exc:  # an op that cannot be captured: prefill un-graphed from now on
                self._prefill_graph_error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"prefill CUDA graph capture failed, running un-graphed ({exc})", stacklevel=3)
                return self._prefill_body(hidden, cache, 0, "last")
            while len(self._prefill_graphs) >= self.MAX_PREFILL_GRAPHS:  # least recently used first
                self._prefill_graphs.pop(next(iter(self._prefill_graphs)))
            self._prefill_setups += 1
        self._prefill_graphs[key] = entry  # (re)inserted last: most recently used
        graph, static_in, static_out, _ = entry
        static_in.copy_(hidden)
        graph.replay()
        return static_out.clone()

    def _capture_prefill(
        self, hidden: Tensor, cache: StaticKVCache
    ) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor, weakref.ref[StaticKVCache]]:
        static_in = hidden.clone()
        with self.routing_counts_kept():
            graph, static_out = capture_graph(lambda: self._prefill_body(static_in, cache, 0, "last"), hidden.device)
        return graph, static_in, static_out, weakref.ref(cache)

    @contextlib.contextmanager
    def routing_counts_kept(self) -> Iterator[None]:
        """Within: forwards that are not measured (graph warm-up and capture) leave the routing counts as found."""
        before = {i: c.clone() for i, c in self._counts.items()}
        try:
            yield
        finally:
            for i, c in before.items():
                self._counts[i].copy_(c)

    @property
    def capture_count(self) -> int:
        """Graphs captured so far: the vision's per view shape, the prefill's per prompt length (each capture
        compiles what it runs first: those compiles are its own)."""
        return self.vision_graph_count + self._prefill_setups

    @property
    def setup_count(self) -> int:
        """One-time setups done so far: :attr:`capture_count`, plus the process's JIT compiles outside captures
        (a Triton kernel variant or a ``torch.compile`` frame met for the first time: :mod:`compiles`).  A rise
        during a page or a fill means its timings include a capture or a compile."""
        return self.capture_count + WATCH.install().count  # (install: hooks put back if taken out since)

    # ------------------------------------------------------------------ stage 4: decode
    def compiled_step(self) -> Any:
        """``torch.compile(FastDecoder._forward)`` per ``decode_compile`` (None when "none"), one per FastModel.

        Inductor fuses the step's ~600 small kernels (norm casts, rotary, routing, combine).  Shared by all
        decoders of this model, so a new cache of the same ``max_len`` reuses the compiled code (another
        ``max_len`` compiles once more); the decoder compiles in its capture warm-up, outside the graph.
        """
        mode = self.fast_config.decode_compile
        if mode == "none":
            return None
        if self._compiled_step is None:
            self._compiled_step = torch.compile(
                FastDecoder._forward, mode=None if mode == "default" else mode, dynamic=False
            )
        return self._compiled_step

    def decoder_for(self, cache: StaticKVCache, no_repeat_ngram_size: int | NoRepeatNGram | None = None) -> FastDecoder:
        """The decoder bound to ``cache`` (built, and captured, on first use; one cache at a time).

        ``no_repeat_ngram_size``: the rule its on-device token choice applies (part of the graph; another value
        rebuilds it); None takes the current decoder of ``cache`` whatever its rule (the logits are the same).
        """
        dec = self._decoder
        ngram = None if no_repeat_ngram_size is None else NoRepeatNGram.of(no_repeat_ngram_size)
        if dec is None or dec.cache is not cache or (ngram is not None and dec.ngram != ngram):
            self._decoder = None  # free the old graph's pool first
            dec = FastDecoder(self, cache, use_graph=self.fast_config.cuda_graphs, ngram=ngram or 0)
            self._decoder = dec
        return dec

    @torch.no_grad()
    def decode_step(self, token_ids: Tensor, cache: StaticKVCache) -> Tensor:
        """One token per row at ``cache.length``; float32 logits [B, V] (a copy, safe to keep)."""
        if token_ids.dim() != 2 or token_ids.shape[1] != 1:
            raise InputError(f"decode_step takes token_ids [B, 1], got {tuple(token_ids.shape)}")
        return self.decoder_for(cache).step(token_ids).clone()

    def forward(self, inputs_embeds: Tensor, cache: StaticKVCache | None = None) -> Tensor:
        return self.base(inputs_embeds, cache)

    __call__ = forward


def pdl_unsupported(capability: tuple[int, int]) -> str | None:
    """Why ``infer.fast.pdl`` cannot apply on a GPU of this compute capability (None where it can): programmatic
    dependent launches and the ``griddepcontrol`` instructions the kernels then compile in are sm_90+ (Hopper)."""
    if capability >= (9, 0):
        return None
    major, minor = capability
    return (
        f"infer.fast.pdl needs an sm_90+ GPU (Hopper: programmatic dependent launches); this one is sm_{major}{minor}:"
        " the Triton decode kernels were launched plainly"
    )


def apply_fast_path(
    model: DeepseekOCRForCausalLM | FastModel,
    cfg: FastConfig | None = None,
    vision: Callable[[DeepseekOCRForCausalLM, FastConfig], VisionFast] = ClipVisionFast,
) -> FastModel:
    """Prepare ``model``'s weights (fused QKV/gate-up, stacked experts; views, no copies) and wrap it.

    ``vision`` builds the vision towers' fast path for the model (v1's SAM + CLIP by default); the language
    model's fast path is the same for every model with v1's decoder (DeepSeek-OCR-2 passes its own ``vision``).
    """
    base = model.base if isinstance(model, FastModel) else model
    cfg = cfg or FastConfig()
    return FastModel(base, cfg, vision(base, cfg))
