"""``compiles.WATCH`` sees real Triton compiles on a GPU: a kernel of this module compiles on its first launch and
once per new specialisation (here the pointer's dtype), never on a repeat; a compile inside ``capturing`` (what
``graphs.capture_graph`` wraps its warm-up in) is the capture's.  And a fast-path kernel met at a new
specialisation inside a timed run is a timed setup.

Skipped without CUDA (the interpreter compiles nothing), and under TRITON_INTERPRET=1."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA (run on the device machine)", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 compiles nothing", allow_module_level=True)
pytest.importorskip("triton")

import triton
import triton.language as tl

from llm_perf_opt.models.deepseek_ocr.compiles import WATCH

pytestmark = pytest.mark.gpu


@triton.jit
def _plus_one(x_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    tl.store(x_ptr + i, x + 1, mask=i < n)


def _launch(x: torch.Tensor) -> None:
    _plus_one[(1,)](x, x.numel(), BLOCK=64)


def test_triton_compiles_counted_once_per_variant_and_not_inside_a_capture() -> None:
    assert "triton" not in WATCH.install().unwatched
    before, in_captures = WATCH.triton, WATCH.in_captures
    x = torch.zeros(33, device="cuda")
    _launch(x)
    assert WATCH.triton - before == 1  # the first launch compiles
    _launch(x)
    _launch(torch.zeros(35, device="cuda"))  # same dtype, n neither 1 nor a multiple of 16: the same variant
    assert WATCH.triton - before == 1
    _launch(torch.zeros(33, device="cuda", dtype=torch.float16))
    assert WATCH.triton - before == 2  # another dtype: another variant
    with WATCH.capturing():
        _launch(torch.zeros(33, device="cuda", dtype=torch.bfloat16))
    assert WATCH.triton - before == 2 and WATCH.in_captures - in_captures == 1
    torch.cuda.synchronize()
    assert float(x.sum()) == 66.0  # both launches on x ran
