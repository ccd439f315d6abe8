"""What one batched run returns: tokens, stage times and the throughput derived from them."""

from __future__ import annotations

import math
import statistics
import warnings

import attrs
from torch import Tensor

from llm_perf_opt.models.deepseek_ocr.clock import Clock

__all__ = ["BatchResult", "StageMarks", "routed_experts_read"]


@attrs.frozen
class BatchResult:
    """Tokens and timings of one batched run; throughput properties are derived from the stage times.

    ``tokens[b]`` are sequence b's generated ids (eos included when it stopped it); ``logits[b][i]`` (only
    with ``keep_logits``) the float32 host row that chose ``tokens[b][i]`` (row 0 from the prefill).
    ``step_ms[s]`` is decode step s (which produced token s + 1 of every sequence still running); the last
    ``idle_steps`` entries are steps the static loop ran after every sequence had finished (it checks only
    every ``check_every`` steps), which produced no token but did cost time, so they are in ``decode_s``.
    ``decode_path`` says which decode loop ran: "graph" (static step replayed from a CUDA graph), "static"
    (the same step un-graphed: CPU, ``cuda_graphs=False``, experts that sync, or a failed capture) or "host"
    (host-driven loop).  ``graph_capture_s`` is the host wall time of this run's one-time graph capture
    (warm-up steps + capture, synchronised), 0.0 when the graph was reused or none was captured; it is in
    none of the stage times (``total_s`` excludes it).  ``graph_capture_error`` says why a capture failed (the
    step then ran un-graphed: ``decode_path`` "static"), None when none did.  ``timed_setups``: one-time setups of
    the fast path (a vision shape compiled / captured, a prefill length captured, a kernel variant compiled
    outside a capture: ``FastModel.setup_count``) that
    happened inside this run's stage marks, so their time is in its stages (0 without a FastModel).
    ``routed_experts_read``: per MoE layer, the mean number of distinct routed experts a decode step read, counted
    on the device by the batched steps' expert kernels (:func:`routed_experts_read`) over ``grouped_steps`` steps (the
    name from when only the grouped ones counted); None where no step counted them (the torch decode step, no
    Triton).  ``finished_rows_attend``: whether a finished row went on attending over its whole context (the host
    loop; the static step with ``skip_keys`` off) or over its newest key only (:attr:`key_steps`).
    """

    tokens: list[list[int]]
    stopped_by_eos: list[bool]
    prompt_lens: list[int]
    padded_len: int
    vision_s: float
    prefill_s: float
    decode_s: float
    step_ms: list[float]
    logits: list[list[Tensor]] | None = None
    decode_path: str = "host"
    graph_capture_s: float = 0.0
    idle_steps: int = 0
    graph_capture_error: str | None = None
    timed_setups: int = 0
    routed_experts_read: list[float] | None = None
    grouped_steps: int = 0
    finished_rows_attend: bool = True

    @property
    def batch(self) -> int:
        return len(self.tokens)

    @property
    def total_s(self) -> float:
        """Vision + prefill + decode (first mark to last mark)."""
        return self.vision_s + self.prefill_s + self.decode_s

    @property
    def output_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def pages_per_s(self) -> float:
        return self.batch / self.total_s if self.total_s > 0 else math.inf

    @property
    def output_tok_per_s(self) -> float:
        """All generated tokens (first tokens included) over the whole run's time."""
        return self.output_tokens / self.total_s if self.total_s > 0 else math.inf

    @property
    def decode_tok_per_s(self) -> float:
        """Tokens produced by decode steps (not the prefill's first tokens) over decode time."""
        n = sum(max(len(t) - 1, 0) for t in self.tokens)
        return n / self.decode_s if self.decode_s > 0 else math.inf

    @property
    def ttft_s(self) -> float:
        """Time to first token, the same for every sequence of the batch: vision + prefill."""
        return self.vision_s + self.prefill_s

    @property
    def tpot_ms(self) -> list[float]:
        """Per sequence: mean decode-step time over the steps that produced its tokens after the first
        (NaN for a sequence with a single token)."""
        out: list[float] = []
        for toks in self.tokens:
            steps = self.step_ms[: len(toks) - 1]
            out.append(sum(steps) / len(steps) if steps else math.nan)
        return out

    @property
    def key_steps(self) -> int:
        """Keys the decode steps attended over, each row's own context summed over rows and steps (its left pads
        left out: they are masked): step s feeds the token that sequence b wrote at ``prompt_lens[b] + s``, so it
        attends over ``prompt_lens[b] + s + 1`` keys.  Every row runs every step; a finished one (sequence b
        from step ``len(tokens[b]) - 1`` on, idle steps included) over its whole context too when
        ``finished_rows_attend``, else over one key."""
        n = len(self.step_ms)
        total = 0
        for length, toks in zip(self.prompt_lens, self.tokens, strict=True):
            live = n if self.finished_rows_attend else min(max(len(toks) - 1, 0), n)
            total += live * length + live * (live + 1) // 2 + (n - live)
        return total

    @property
    def step_ms_p50(self) -> float:
        return statistics.median(self.step_ms) if self.step_ms else math.nan


@attrs.frozen
class StageMarks:
    """A run's clock and vision marks; turns the prefill / decode marks into a :class:`BatchResult`."""

    clock: Clock
    t_start: object
    t_vision: object

    def result(
        self,
        *,
        tokens: list[list[int]],
        stopped_by_eos: list[bool],
        lens: list[int],
        t_prefill: object,
        step_marks: list[object],
        logits: list[list[Tensor]] | None,
        decode_path: str,
        graph_capture_s: float = 0.0,
        idle_steps: int = 0,
        graph_capture_error: str | None = None,
    ) -> BatchResult:
        """``step_marks[0]`` opens the decode (the prefill mark, or the mark after a graph capture)."""
        c = self.clock
        return BatchResult(
            tokens=tokens,
            stopped_by_eos=stopped_by_eos,
            prompt_lens=lens,
            padded_len=max(lens),
            vision_s=c.elapsed_ms(self.t_start, self.t_vision) / 1e3,
            prefill_s=c.elapsed_ms(self.t_vision, t_prefill) / 1e3,
            decode_s=c.elapsed_ms(step_marks[0], step_marks[-1]) / 1e3,
            step_ms=c.intervals_ms(step_marks),
            logits=logits,
            decode_path=decode_path,
            graph_capture_s=graph_capture_s,
            idle_steps=idle_steps,
            graph_capture_error=graph_capture_error,
        )


def routed_experts_read(before: Tensor | None, after: Tensor | None) -> tuple[list[float] | None, int]:
    """(per MoE layer the mean distinct routed experts a grouped decode call read, the calls per layer) between
    two snapshots of ``FastModel.expert_reads`` (int64 [layers, 2]: experts read summed over calls, calls), the
    later one taken after a sync; (None, 0) where nothing counts them or no grouped call ran in between.  Every
    decode step calls each MoE layer once, so the calls are the steps that counted.  Layers whose
    call counts differ (no path does that) give no figure, with a warning: the run's other figures stand."""
    if before is None or after is None:
        return None, 0
    delta = (after - before).tolist()
    calls = {int(n) for _, n in delta}
    if len(calls) != 1:
        warnings.warn(
            f"routed experts read not given: the MoE layers' grouped expert calls differ ({sorted(calls)})",
            stacklevel=2,
        )
        return None, 0
    n = calls.pop()
    if n <= 0:
        return None, 0
    return [read / n for read, _ in delta], n
