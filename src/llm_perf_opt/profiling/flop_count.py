"""Counted FLOPs: run (or trace) the real module and count what its operators do.

Two independent counters cross-check the analytic formulas in ``flops.py``; both report
**2 FLOPs per multiply-add** here:

* ``count_fvcore`` — ``fvcore.nn.FlopCountAnalysis`` traces the module with ``torch.jit`` and counts
  one multiply-add as one "flop", so every figure is multiplied by 2.  fvcore has no handle for
  ``aten::scaled_dot_product_attention`` (it would be listed as unsupported and contribute 0); we add
  one that counts ``Q·Kᵀ`` and ``P·V`` over the full ``L×S`` grid (``is_causal`` and masks ignored),
  one for ``aten::baddbmm``, and an exact two-operand ``aten::einsum`` handle (fvcore's parses a
  4-significant-digit printout from numpy and was off by a few FLOPs on SAM's rel-pos einsums).
  fvcore's default handles for norms, upsampling, pooling and grid_sample count elementwise work,
  which ``flops.py`` leaves out by convention; they are replaced by zero-FLOP handles and listed in
  ``skipped_ops`` so nothing disappears silently.
* ``count_flop_counter`` — ``torch.utils.flop_counter.FlopCounterMode`` counts dispatched aten ops
  (already 2 FLOPs per multiply-add).  Its registry covers the CUDA SDPA kernels (flash, efficient,
  cuDNN) but not the CPU kernel ``aten::_scaled_dot_product_flash_attention_for_cpu``, which would
  count 0; we register the same full-grid formula for it.  Ops that ran but are not in the registry
  (elementwise, softmax, ...) are listed in ``skipped_ops``; pure views are not listed.

Known convention gap: both counters count causal SDPA as the full ``L×S`` grid (what a math
kernel executes); ``flops.attention_flops(causal=True)`` counts only the kept pairs, so a causal
prefill differs by ``flops.attention_flops(L, L, h, d, False) - flops.attention_flops(L, L, h, d, True)``.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["CountedFlops", "count_flop_counter", "count_fvcore"]

_SDPA_NOTE = "SDPA counted over the full L×S grid (Q·Kᵀ + P·V; is_causal/attn_mask not discounted)"


@attrs.frozen
class CountedFlops:
    """FLOPs one counter measured (2 per multiply-add), per module (inclusive) and per operator."""

    counter: str  # "fvcore" | "flop_counter"
    total_flops: int
    by_module: dict[str, int]  # qualified module name relative to the root ("" = root) -> FLOPs
    by_op: dict[str, int]  # operator -> FLOPs (fvcore: its short names, e.g. "linear"; FlopCounterMode: "aten::mm")
    skipped_ops: dict[str, int]  # "aten::name" -> calls that ran and contributed 0 FLOPs
    notes: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# fvcore
# --------------------------------------------------------------------------------------------------

_FVCORE_ELEMENTWISE_DEFAULTS = (
    "aten::batch_norm",
    "aten::group_norm",
    "aten::layer_norm",
    "aten::instance_norm",
    "aten::upsample_nearest2d",
    "aten::upsample_bilinear2d",
    "aten::adaptive_avg_pool2d",
    "aten::grid_sampler",
)


def _fvcore_sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle (unit: multiply-adds) for ``aten::scaled_dot_product_attention``: full L×S grid."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    if q is None or k is None or v is None:
        raise ValueError("scaled_dot_product_attention traced without static shapes; cannot count it")
    batch_heads = 1
    for s in q[:-2]:
        batch_heads *= int(s)
    seq_q, dim_qk = int(q[-2]), int(q[-1])
    seq_k, dim_v = int(k[-2]), int(v[-1])
    return batch_heads * seq_q * seq_k * (dim_qk + dim_v)


def _fvcore_baddbmm_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``aten::baddbmm(input, batch1, batch2)``: the bmm part only."""
    from fvcore.nn.jit_handles import get_shape

    b1, b2 = get_shape(inputs[1]), get_shape(inputs[2])
    if b1 is None or b2 is None:
        raise ValueError("baddbmm traced without static shapes; cannot count it")
    return int(b1[0]) * int(b1[1]) * int(b1[2]) * int(b2[2])


def _fvcore_einsum_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """Exact multiply-adds of a two-operand einsum: the product of every index's size.

    fvcore's own handle reads the count back from ``numpy.einsum_path``'s printout, which shows it
    with 4 significant digits, so SAM's rel-pos einsums came out a few FLOPs off.  Other einsums
    (three or more operands, ``...``) still go to fvcore's handle.
    """
    from fvcore.nn.jit_handles import einsum_flop_jit, get_shape

    equation = str(inputs[0].toIValue()).replace(" ", "")
    operands = [get_shape(v) for v in inputs[1].node().inputs()]
    lhs = equation.split("->")[0].split(",")
    if len(operands) != 2 or "." in equation or any(s is None for s in operands):
        return int(einsum_flop_jit(inputs, outputs))
    sizes: dict[str, int] = {}
    for letters, shape in zip(lhs, operands, strict=True):
        for letter, size in zip(letters, shape, strict=True):
            sizes[letter] = int(size)
    macs = 1
    for size in sizes.values():
        macs *= size
    return macs


def _import_fvcore_analysis() -> Any:
    # fvcore.nn's package init runs torch.jit.script (focal loss), which torch >= 2.10 flags as
    # deprecated on every import; the warning is about fvcore's unrelated helper, not our counts.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
        from fvcore.nn import FlopCountAnalysis
    return FlopCountAnalysis


def count_fvcore(module: torch.nn.Module, inputs: tuple[Any, ...]) -> CountedFlops:
    """Count ``module(*inputs)`` with fvcore's tracer; FLOPs = 2 × fvcore's multiply-adds."""
    flop_count_analysis = _import_fvcore_analysis()

    excluded: Counter[str] = Counter()

    def _excluded_handle(name: str) -> Callable[[list[Any], list[Any]], int]:
        def handle(inputs: list[Any], outputs: list[Any]) -> int:
            excluded[name] += 1
            return 0

        return handle

    analysis = flop_count_analysis(module, inputs)
    analysis.set_op_handle(
        "aten::scaled_dot_product_attention",
        _fvcore_sdpa_macs,
        "aten::baddbmm",
        _fvcore_baddbmm_macs,
        "aten::einsum",
        _fvcore_einsum_macs,
    )
    for name in _FVCORE_ELEMENTWISE_DEFAULTS:
        analysis.set_op_handle(name, _excluded_handle(name))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    total_macs = int(analysis.total())  # runs the trace (and the handles) once
    by_module = {name: 2 * int(v) for name, v in analysis.by_module().items() if v}
    by_op = {str(name): 2 * int(v) for name, v in analysis.by_operator().items() if v}
    skipped: Counter[str] = Counter({str(k): int(v) for k, v in analysis.unsupported_ops().items()})
    skipped.update(excluded)
    notes = ["fvcore counts 1 per multiply-add: all figures ×2"]
    if "scaled_dot_product_attention" in by_op:
        notes.append(_SDPA_NOTE)
    if excluded:
        notes.append(
            "excluded by convention (elementwise, flops.py does not count them): " + ", ".join(sorted(excluded))
        )
    return CountedFlops(
        counter="fvcore",
        total_flops=2 * total_macs,
        by_module=by_module,
        by_op=by_op,
        skipped_ops=dict(sorted(skipped.items())),
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------------------------------
# torch.utils.flop_counter
# --------------------------------------------------------------------------------------------------


def _sdpa_shape_flops(
    query_shape: tuple[int, ...],
    key_shape: tuple[int, ...],
    value_shape: tuple[int, ...],
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    """FlopCounterMode formula (2 per multiply-add) for SDPA kernels it does not know: full L×S grid."""
    batch_heads = 1
    for s in query_shape[:-2]:
        batch_heads *= int(s)
    seq_q, dim_qk = int(query_shape[-2]), int(query_shape[-1])
    seq_k, dim_v = int(key_shape[-2]), int(value_shape[-1])
    return 2 * batch_heads * seq_q * seq_k * (dim_qk + dim_v)


def _extra_flop_formulas() -> dict[Any, Any]:
    extra: dict[Any, Any] = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            extra[packet] = _sdpa_shape_flops
    return extra


def _op_name(packet: Any) -> str:
    qualified = getattr(packet, "_qualified_op_name", None)
    return str(qualified) if qualified else str(packet).replace(".", "::", 1)


def _is_view_packet(packet: Any) -> bool:
    overloads = getattr(packet, "overloads", None)
    if overloads is None:
        return False
    return any(getattr(getattr(packet, o), "is_view", False) for o in overloads())


class _RecordingFlopCounterMode(FlopCounterMode):
    """FlopCounterMode that also records the ops it executed without a FLOP formula.

    ``_count_flops`` is FlopCounterMode's per-executed-op hook (private API, torch 2.4–2.13); if a
    future torch stops calling it the skipped list stays empty, which ``count_flop_counter`` notes.
    """

    def __init__(self, custom_mapping: dict[Any, Any]) -> None:
        super().__init__(display=False, custom_mapping=custom_mapping)
        self.uncounted: Counter[str] = Counter()
        self.hook_calls = 0

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        self.hook_calls += 1
        if func_packet not in self.flop_registry and not _is_view_packet(func_packet):
            self.uncounted[_op_name(func_packet)] += 1
        return super()._count_flops(func_packet, out, args, kwargs)


def count_flop_counter(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> CountedFlops:
    """Run ``fn(*args, **kwargs)`` under FlopCounterMode (2 FLOPs per multiply-add).

    ``by_module`` is keyed like fvcore's (``""`` = ``fn`` itself when it is a module, children by
    qualified name); with a plain function the tracker's class-based names are kept.
    """
    mode = _RecordingFlopCounterMode(_extra_flop_formulas())
    with mode:
        fn(*args, **kwargs)
    counts: Mapping[str, Mapping[Any, int]] = mode.get_flop_counts()
    root = type(fn).__name__ if isinstance(fn, torch.nn.Module) else None
    by_module: dict[str, int] = {}
    for name, ops in counts.items():
        if name == "Global":
            continue
        if root is not None:
            if name == root:
                name = ""
            elif name.startswith(root + "."):
                name = name[len(root) + 1 :]
        total = int(sum(ops.values()))
        if total:
            by_module[name] = by_module.get(name, 0) + total
    by_op: Counter[str] = Counter()
    for packet, v in counts.get("Global", {}).items():
        by_op[_op_name(packet)] += int(v)
    notes = [_SDPA_NOTE] if any("attention" in name for name in by_op) else []
    if mode.hook_calls == 0:
        notes.append("skipped-op tracking saw no ops: FlopCounterMode._count_flops not called by this torch version")
    return CountedFlops(
        counter="flop_counter",
        total_flops=int(mode.get_total_flops()),
        by_module=by_module,
        by_op={k: v for k, v in by_op.items() if v},
        skipped_ops=dict(sorted(mode.uncounted.items())),
        notes=tuple(notes),
    )
