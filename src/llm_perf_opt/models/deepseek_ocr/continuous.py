"""Continuous batching for the native DeepSeek-OCR: a fixed number of sequence slots kept full with mixed lengths.

A static batch runs until its longest sequence ends; the rows that ended earlier keep computing for nothing.
Here ``slots`` sequences decode together and a slot whose sequence ends (eos, simulated eos through its cap, or
the token cap) is refilled with the next page from the source: that page's vision and prefill run (several
refills at once are batched like a static batch's), its K/V are copied into the slot's rows of the shared cache
(columns ``0 .. len - 1``: no left padding), and the slot's state (fed token, position, cap, flags, history) is
reset on the device.  The batch shape never changes, so the decode step stays a CUDA graph (one per attention
width, below).

* **Per-slot KV**: :class:`SlotDecodeStep` keeps one :class:`~llm_perf_opt.models.deepseek_ocr.kv_cache.StaticKVCache`
  [layers, slots, heads, max_len, dim].  Each row writes its new K/V at its own column ``pos[b]``
  (:class:`~llm_perf_opt.models.deepseek_ocr.context.ForwardContext` with a per-row ``slot`` [B]: a scatter) and
  is rotated at that same position (no pads: column = position); its additive mask shows columns ``0 .. pos[b]``,
  so whatever a previous sequence left past ``pos[b]`` is never read (it is overwritten column by column first).
  A row whose sequence ended but whose slot the host has not refilled yet sees its last column only
  (``skip_keys``), as an empty slot does.
* **The step** is the model's one decoder forward, like the static step's, with per-row positions: tokens [B, 1],
  ``pos`` [B], caps, eos, done flags, token counts and the output buffer all live in device buffers, so on CUDA
  it is captured once per (slots, max_len, n-gram size) and replayed.  A finished (or empty) row keeps running
  (static shapes) with its position frozen; it records nothing.  The vendor no-repeat-ngram rule runs on the
  device with one history length per row (:func:`~llm_perf_opt.models.deepseek_ocr.generation.banned_ngram_mask`,
  or :func:`~llm_perf_opt.models.deepseek_ocr.kernels.ngram_ban`'s one launch with the fast path's ``ngram_kernel``).
* **When slots are refilled**: without eos the host knows when every row ends (its cap), so it runs exactly
  the steps until the next row ends, then refills; no device value is read until the end.  With eos it also
  reads the done flags every ``check_every`` steps (one sync each), so a row ended by eos may idle up to
  ``check_every - 1`` steps before its slot is refilled (that shows as slot occupancy below 1).
* **Attention width**: a step attends over the first ``key_len`` cache columns, not the whole ``max_len``: the
  host knows how far every slot can have got (prompt length + steps since its fill, at most its cap) and picks
  the ``LEN_QUANTUM`` bucket covering it for the next run of steps; one graph per bucket, captured on first use.
  With mixed lengths the cache is sized for the longest page, and attending over all of it every step would
  read that many K/V columns for every slot.
* **Vision of a refill** runs page by page (the first fill batches views across pages).  This was chosen when a
  batched refill of k pages meant a new compiled vision shape for every k; since the fast path cuts views into
  warmed power-of-two chunks (``batched_vision.view_chunks``) that reason is gone, and batching a refill's views
  is the untried, unmeasured alternative.  It would change little: in the H200 goals run (256 pages, 64
  slots) the 192 pages after the first fill came in 184 refills (185 fills in all), 1.04 pages each.  The
  refills' cost is that they run between decode steps, not beside them (there: vision 5.7 s and LM prefill + K/V
  insertion 6.3 s of a 33.2 s run).
* **Vision ahead** (``vision_ahead`` = N > 0): after every fill the next N pages are taken from the source and
  their vision runs at once on a second CUDA stream, so it overlaps the decode steps enqueued after it instead of
  stalling every slot in the refill that needs the page.  The refill then waits on the device for that page's
  vision (an event; nothing waits on the host) and runs only its LM prefill and K/V insertion.  Every vision call
  is ordered after the one before it whichever stream it ran on (the second stream first waits for the main one,
  a vision call on the main stream for the second), since the fast path's graphed towers keep static buffers;
  the features are handed to the main stream's allocator (``record_stream``).  The second stream is drawn apart
  from the main one and from the capture streams of the steps' and the vision's graphs (one cuBLAS workspace per
  stream, baked into a graph captured on it: ``graphs.stream_apart``).  The same pages, in the same order,
  get the same features, so tokens and logits do not change.  On CPU (no streams) the pages' vision simply runs
  ahead of their refill.  ``vision_s`` is then the vision time on the main stream: what held the slots up, i.e.
  a fill's wait for a page's vision that had not finished, and the main stream's time while the host enqueued
  the vision run ahead (on CPU, where nothing overlaps, all of that vision).  ``vision_ahead_s`` is the run-ahead
  vision's own time (on CUDA on the second stream, beside the decode steps; the steps it slowed show in theirs).
* **Prefill ahead** (``prefill_ahead``, with ``vision_ahead``): after their vision, the pages run ahead also get
  their LM prefill on the second stream, each page alone into a cache of its own (no pads: column = position,
  the function the page computes alone), so the refill that takes such a page waits on the device for its
  prefill, copies its K/V into the slot's rows and loads the slot with its logits.  Only one prefill runs at a
  time: a fill's own prefill (of pages that did not run ahead) comes after its waits for every page run ahead,
  and the second stream's next work waits for the fill, since the prompt path's kernels keep counters across
  calls.  ``prefill_s`` then counts what held the slots up (those waits, the copies, and the main stream's idle
  time while the host enqueued the prefills: on CPU all of it), ``prefill_ahead_s`` the prefills' own time.  A
  fill waits for its pages' prefills before any vision of its own, so its vision's wait for the second stream
  holds no prefill, and a wait for a prefill is never counted as vision (until round 28 it was: the vision waited
  for the second stream, prefills included, before the fill waited for them).
  Measured on an H200 (128 mixed pages, 64 slots, every expert read): the vision ahead 1.00x / 0.99x the plain
  run (Base), 1.00x (Gundam); with the prefill ahead 0.93x / 0.87x (Base), 1.03x (Gundam).  The prefill run ahead
  is this generator's eager one, bound by the host: while the host enqueues it, no decode step is enqueued, and
  the main stream runs dry.  Replaying a graph per prompt length instead is the untried alternative.
* **Refills prefilled page by page** (``prefill_per_page``): a refill's pages (those not prefilled ahead) go
  through the model's own per-page prefill one at a time, each into a batch-1 cache kept per prompt length
  (:class:`PageCaches`), and their K/V are copied into the slots' rows, instead of one left-padded eager forward
  over the refill's pages.  On the fast path with ``prefill_graphs`` (CUDA) each is a replay of the graph kept per
  (prompt length, cache): a few launches for the host instead of ~700, the lever the eager refill prefill lacks
  (above).  A length's graph is captured before the fill that first needs it, outside its marks, and its time
  goes to ``graph_capture_s`` like the steps' captures.  The first fill stays one batched forward (many pages
  at once); so does a fill whose lengths would take the kept lengths past as many as the model keeps graphs for
  (none is dropped, so every capture stays one-time).  The graphs replay on the main
  stream only: they were captured on the decode steps' capture stream and share its cuBLAS workspace, so they
  must not run beside the steps (the run-ahead prefill keeps its eager forward).  Measured on H100s (64 slots,
  every expert read, 6 paired rounds each): 1.07x the batched refill on Gundam (round 29), 1.17x on Base (round
  30); so the session's ``infer.refill_prefill=auto`` takes it where the prefill is a graph replay.
* **The drain**: once the source is dry, slots only empty; a step over 64 rows of which a few still decode
  still routes 64 tokens through the experts and runs every kernel over 64 rows.  When at most half the rows
  hold a sequence, the run goes on with a step over the first ``n`` rows of the same cache (``n`` the power of
  two covering them): the live rows' K/V and state move to the front, each row computes the same function
  (:meth:`SlotDecodeStep.narrowed`, kept with its graphs for later runs).  ``ContinuousResult.step_rows``
  records each step's width.
* **Cache length**: sized from the first fill (longest prompt + cap, rounded up to ``LEN_QUANTUM``); a later page
  that needs more grows the cache (state copied, graph recaptured, the capture timed apart).

Exactness: each row computes the same function as the page alone (masked attention over its own columns, its
own positions), so logits agree to float rounding and greedy tokens match unless two logits tie within it.

Timing: marks of the caller's clock around each fill (vision, then prefill + insert) and every decode step,
resolved once at the end; the host time spent waiting for the source's next page is measured apart
(``page_wait_s``) and lies outside every stage.
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import attrs
import torch
from torch import Tensor

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.models.deepseek_ocr.batch_result import routed_experts_read
from llm_perf_opt.models.deepseek_ocr.batched_decode import DecodeRows
from llm_perf_opt.models.deepseek_ocr.context import decode_key_mask
from llm_perf_opt.models.deepseek_ocr.graphs import capture_graph, default_capture_stream, first_argmax, stream_apart
from llm_perf_opt.models.deepseek_ocr.kv_cache import StaticKVCache
from llm_perf_opt.models.deepseek_ocr.model import DeepseekOCRForCausalLM
from llm_perf_opt.models.deepseek_ocr.preprocess import PreparedPage
from llm_perf_opt.models.deepseek_ocr.protocol import LanguageModel

if TYPE_CHECKING:
    from llm_perf_opt.models.deepseek_ocr.batched import BatchedGenerator

__all__ = ["LEN_QUANTUM", "ContinuousResult", "SlotDecodeStep", "SlotRequest", "run_continuous"]

# Cache lengths are rounded up to a multiple of this, so runs (and repeats) with slightly different prompt
# lengths reuse one captured graph instead of capturing a new one each.
LEN_QUANTUM = 256


@attrs.frozen
class SlotRequest:
    """One page for a slot: its prepared inputs and its own token cap (the simulated-eos target, or the cap)."""

    prepared: PreparedPage
    max_new_tokens: int


@attrs.frozen
class ContinuousResult:
    """Tokens and times of one continuous-batching run over every page its source gave.

    ``tokens[i]`` / ``stopped_by_eos[i]`` / ``prompt_lens[i]`` are the i-th page taken from the source.
    ``vision_s`` and ``prefill_s`` add up every fill (the first one and each refill); ``decode_s`` every decode
    step (``step_ms``); ``page_wait_s`` is host time blocked on the source (outside every stage); ``wall_s`` is
    host time from the first request to the final sync, one-time graph captures (``graph_capture_s``) left out.
    """

    tokens: list[list[int]]
    stopped_by_eos: list[bool]
    prompt_lens: list[int]
    slots: int
    vision_s: float
    prefill_s: float
    decode_s: float
    step_ms: list[float]
    fills: int
    page_wait_s: float
    wall_s: float
    decode_path: str
    graph_capture_s: float = 0.0
    # graphs captured in this run: the decode step's, one per (step width, key-length bucket) met, and with
    # ``prefill_per_page`` the refills' prefill graphs, one per prompt length (their time is in ``graph_capture_s``)
    graph_captures: int = 0
    graph_capture_error: str | None = None  # why a capture of the step failed (that step then ran un-graphed)
    logits: list[list[Tensor]] | None = None  # only with keep_logits: float32 host rows, row 0 from the prefill
    # per page: the index in ``step_ms`` of the step that produced its second token (its slot's first step)
    first_step: list[int] = attrs.field(factory=list)
    # per decode step: the rows of the step that ran it (``slots``, or fewer once the drain narrowed the batch)
    step_rows: list[int] = attrs.field(factory=list)
    # keys the decode steps attended over, each occupied slot's own context summed over slots and steps (the
    # position the host tracks for it, as ``_reach``, set right at each eos read for a row the device held at its
    # last column once it ended: its whole context, or that one column with ``skip_keys``; empty slots left out)
    key_steps: int = 0
    # the run-ahead vision's own time (``vision_ahead``; on CUDA on a second stream beside the decode steps); what of
    # it held the slots up is in ``vision_s`` (on CPU all of it: nothing overlaps)
    vision_ahead_s: float = 0.0
    pages_ahead: int = 0  # pages whose vision ran ahead (the rest ran theirs in their fill)
    # with ``prefill_ahead``: the LM prefill run ahead, its own time (on CUDA on the second stream) and its pages;
    # what of it held the slots up is in ``prefill_s`` (on CPU all of it)
    prefill_ahead_s: float = 0.0
    pages_prefilled_ahead: int = 0
    # with ``prefill_per_page``: the refills' pages prefilled one at a time (their time is in ``prefill_s``)
    pages_prefilled_per_page: int = 0
    # the fast path's one-time setups (vision shapes compiled / captured, prefill lengths captured, kernel variants
    # compiled outside a capture: FastModel.setup_count) inside the run's marks, so their time is in its stages;
    # those made outside them (the per-page refills' captures, a new or narrower step's warm-up) are not
    timed_setups: int = 0
    # per MoE layer: the mean distinct routed experts a decode step read, counted on the device by the batched steps'
    # expert kernels over ``grouped_steps`` steps (batch_result.routed_experts_read); None where none counted them
    routed_experts_read: list[float] | None = None
    grouped_steps: int = 0
    # whether a row that ended by eos attended over its whole context until its slot was refilled (``skip_keys``
    # off), or over its last column alone (``key_steps`` counts whichever it did); None without eos (no row waits)
    finished_rows_attend: bool | None = None

    @property
    def pages(self) -> int:
        return len(self.tokens)

    @property
    def output_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def total_s(self) -> float:
        """Stage time: every fill's vision + prefill, and every decode step."""
        return self.vision_s + self.prefill_s + self.decode_s

    @property
    def tpot_ms(self) -> list[float]:
        """Per page: mean time of the decode steps that produced its tokens after the first (NaN with one token)."""
        out: list[float] = []
        for toks, first in zip(self.tokens, self.first_step, strict=True):
            steps = self.step_ms[first : first + len(toks) - 1]
            out.append(sum(steps) / len(steps) if steps else math.nan)
        return out

    @property
    def drain(self) -> tuple[int, float, int]:
        """The run's drain, after the source ran dry: (steps, their ms, tokens they produced) from the step at
        which the last page started decoding to the end.  Until then every refill found a page waiting; after it
        the slots only empty, so a run over more pages would not spend that time (a run over a million pages
        barely drains).  Page p decodes its tokens after the first at steps ``first_step[p]`` onwards, one per
        step."""
        start = max(self.first_step, default=len(self.step_ms))
        tokens = sum(
            max(0, first + len(toks) - 1 - max(first, start))
            for toks, first in zip(self.tokens, self.first_step, strict=True)
        )
        return len(self.step_ms) - start, sum(self.step_ms[start:]), tokens

    @property
    def idle_steps(self) -> int:
        """Decode steps in which no slot produced a token (rows ended by eos wait for the next check)."""
        busy = [False] * len(self.step_ms)
        for toks, first in zip(self.tokens, self.first_step, strict=True):
            for s in range(first, min(first + len(toks) - 1, len(busy))):
                busy[s] = True
        return busy.count(False)

    @property
    def slot_occupancy(self) -> float | None:
        """Mean share of the slots that produced a token per decode step (None without a step)."""
        return slot_occupancy(self.tokens, len(self.step_ms), self.slots)


def drain_is_whole_run(drain_steps: int, decode_steps: int) -> bool:
    """Whether a continuous run has no steady state: it took decode steps and every one was in its drain
    (:attr:`ContinuousResult.drain`: each page started decoding at the first step, e.g. no more pages than slots),
    so its time outside the drain is the first fill's vision and prefill alone.  A run without a decode step has no
    drain to leave out."""
    return decode_steps > 0 and drain_steps >= decode_steps


def slot_occupancy(tokens: list[list[int]], steps: int, slots: int) -> float | None:
    """Tokens produced by decode steps (each sequence's first token comes from its prefill) over ``steps ×
    slots``: 1.0 when every slot did useful work in every step; None when no step ran."""
    if steps <= 0 or slots <= 0:
        return None
    return sum(max(len(t) - 1, 0) for t in tokens) / (steps * slots)


class SlotDecodeStep(DecodeRows):
    """The continuous-batching decode step for (``slots``, cache ``max_len``): per-slot KV, device state, graph.

    Buffers (never reallocated, so a captured graph reads and writes them in place): ``tokens`` [B, 1] the token
    each row feeds; ``pos`` [B] the column (= rotary position) it is written at; ``caps`` [B]; ``eos`` [1] (-1:
    off); ``done`` / ``by_eos`` [B] bool (an empty slot is done); ``n_gen`` [B] tokens recorded; ``out`` [B,
    max_len] the recorded tokens; ``hist`` [B, max_len + 1] each row's prompt + output (no-repeat rule only;
    ``vocab`` past the end).  See the module doc for the step.

    ``skip_keys`` (``infer.continuous_skip_keys``): a finished row (ended by eos on the device, not yet collected:
    up to ``check_every - 1`` steps) sees only the key it writes at its last column, and the Triton row attention
    (``ForwardContext.key_first``) reads nothing before it, where it read the row's whole context until collected.
    Running rows see columns ``0 .. pos`` either way (same bits); finished rows' outputs are ignored.
    """

    def __init__(
        self,
        lm: LanguageModel,
        base: DeepseekOCRForCausalLM,
        slots: int,
        max_len: int,
        *,
        use_graph: bool,
        matmul_attention: bool,
        expert_impl: str | None,
        no_repeat_ngram: int = 0,
        ngram_kernel: bool = False,
        cache: StaticKVCache | None = None,
        skip_keys: bool = True,
    ) -> None:
        super().__init__(
            lm,
            base,
            slots,
            max_len,
            use_graph=use_graph,
            matmul_attention=matmul_attention,
            expert_impl=expert_impl,
            no_repeat_ngram=no_repeat_ngram,
            ngram_kernel=ngram_kernel,
            cache=cache,
            skip_keys=skip_keys,
        )
        dev = base.device
        self.slots, self.max_len = slots, max_len
        self.caps = torch.ones(slots, dtype=torch.long, device=dev)
        self.done.fill_(True)  # every slot starts empty
        self.first_col = torch.zeros(1, dtype=torch.long, device=dev)  # a running row sees its keys from column 0
        # attention reads the first key_len cache columns only (a host value, so one graph per key_len): the host
        # sets it to the bucket that covers every slot's position for the coming steps (see run_continuous)
        self.key_len = max_len
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.last_logits: Tensor | None = None  # the last step's logits [B, V] (read only with keep_logits)
        # the drain's narrower steps over the first rows of this step's cache (:meth:`narrowed`), kept with their
        # graphs on the full-width step (``root``) for later runs; a narrower step links back weakly, so no step
        # is in a reference cycle: a dropped step (a grown cache's old one) frees its graphs and cache at once,
        # never in a later garbage collection that could land inside another graph's capture
        self._root: weakref.ref[SlotDecodeStep] | None = None
        self.narrower: dict[int, SlotDecodeStep] = {}

    @property
    def root(self) -> SlotDecodeStep:
        """The full-width step this one narrows (itself for a full-width step)."""
        if self._root is None:
            return self
        root = self._root()
        if root is None:
            raise RuntimeError("a narrowed step outlived its full-width step (which holds the shared cache)")
        return root

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The graph of the current ``key_len`` (None: not captured, or no graphs)."""
        return self.graphs.get(self.key_len)

    def _state(self) -> list[Tensor]:
        """The buffers a step advances (what a capture's warm-up steps must give back)."""
        state = [self.tokens, self.pos, self.done, self.by_eos, self.n_gen, self.out]
        return state if self.hist is None else [*state, self.hist]

    # ------------------------------------------------------------------ slots
    def insert_kv(self, row: int, src: StaticKVCache, src_row: int, begin: int, n: int) -> None:
        """Copy one prompt's K/V, columns ``begin .. begin + n - 1`` of ``src``'s row ``src_row`` (past any left pads),
        into slot ``row``'s columns ``0 .. n - 1``: column = position, as the slot's step reads them."""
        self.cache.k[:, row, :, :n].copy_(src.k[:, src_row, :, begin : begin + n])
        self.cache.v[:, row, :, :n].copy_(src.v[:, src_row, :, begin : begin + n])

    def load_slots(self, rows: list[int], prompts: list[Tensor], logits: Tensor, caps: list[int]) -> None:
        """Start page i of ``prompts`` in slot ``rows[i]``: its first token chosen from ``logits`` [n, V] (the rule
        over its prompt), recorded and fed at column ``len_i``; its K/V must already be in the slot's rows."""
        dev = self.pos.device
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        lens = torch.tensor([int(p.numel()) for p in prompts], dtype=torch.long)
        lens_d = lens.to(dev)
        if self.hist is not None:
            width = self.hist.shape[1]
            hist = torch.full((len(rows), width), self.vocab, dtype=torch.long)
            for i, ids in enumerate(prompts):
                hist[i, : ids.numel()] = ids.reshape(-1).cpu()
            hist_d = hist.to(dev)
            banned = self._ban(hist_d, lens_d)
            logits = logits.masked_fill(banned, float("-inf"))
        first = first_argmax(logits)  # [n, 1]
        if self.hist is not None:
            hist_d.scatter_(1, lens_d.unsqueeze(1), first)
            self.hist[idx] = hist_d
        caps_d = torch.tensor(caps, dtype=torch.long).to(dev)
        self.pos[idx] = lens_d
        self.caps[idx] = caps_d
        self.tokens[idx] = first
        out = torch.zeros((len(rows), self.out.shape[1]), dtype=torch.long, device=dev)
        out[:, :1] = first
        self.out[idx] = out
        self.n_gen[idx] = 1
        hit = first[:, 0] == self.eos
        self.by_eos[idx] = hit
        self.done[idx] = hit | (caps_d <= 1)

    def empty(self, rows: list[int]) -> None:
        """Slots left without a page: done, at column 0 (a stale position past ``key_len`` would see no key)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.pos.device)
        self.done[idx] = True
        self.pos[idx] = 0

    def set_eos(self, eos: int | None) -> None:
        self.eos.fill_(-1 if eos is None else int(eos))

    def clear(self) -> None:
        """Every slot empty (done), nothing recorded: the state before a run's first fill."""
        self.done.fill_(True)
        self.by_eos.zero_()
        self.n_gen.zero_()
        self.pos.zero_()

    # ------------------------------------------------------------------ the step
    def _choose(self, logits: Tensor) -> Tensor:
        if self.hist is not None:
            hist_len = (self.pos + 1).clamp(max=self.hist.shape[1])  # prompt + tokens up to the one fed now
            logits = logits.masked_fill(self._ban(self.hist, hist_len), float("-inf"))
        return first_argmax(logits)

    def _body(self) -> None:
        first: Tensor | None = None
        if self.skip_keys:  # a finished row (eos read or not yet) sees only the key it writes now, at its last column
            first = torch.where(self.done, self.pos, self.first_col)
        shown = self.first_col if first is None else first
        mask = decode_key_mask(self.key_pos[: self.key_len], shown, self.pos, self.mask_zero, self.mask_neg)
        logits = self._logits(self.pos, self.key_len, mask, key_first=first)  # K/V written at each row's position
        self.last_logits = logits
        self._advance(self._choose(logits))

    def _advance(self, nxt: Tensor) -> None:
        """Record ``nxt`` (:meth:`_record`), then move live rows' positions on; a done row keeps its token and
        position (its writes land on its own last column, which nothing reads)."""
        live = self._record(nxt)
        if self.hist is not None:
            hcol = (self.pos + 1).clamp(max=self.hist.shape[1] - 1).unsqueeze(1)
            self.hist.scatter_(1, hcol, torch.where(live.unsqueeze(1), nxt, self.hist.gather(1, hcol)))
        self.pos.add_(live.to(torch.long)).clamp_(max=self.max_len - 1)

    def step(self) -> None:
        graph = self.graphs.get(self.key_len)
        if graph is not None:
            graph.replay()
            return
        with self.base._sdpa_policy():
            self._body()

    def capture(self) -> float:
        """Capture the step as a CUDA graph (state saved and restored around the warm-up steps); host seconds."""
        dev = self.cache.device
        saved = [t.clone() for t in self._state()]
        torch.cuda.synchronize(dev)
        begin = time.perf_counter()
        try:
            self.graphs[self.key_len], _ = capture_graph(self._body, dev, self.base._sdpa_policy)
        except RuntimeError as exc:  # an op that cannot be captured: run the same step un-graphed, say why
            self.capture_error = f"{type(exc).__name__}: {exc}"
            self.use_graph = False
            warnings.warn(f"continuous decode CUDA graph capture failed, decoding un-graphed ({exc})", stacklevel=3)
        for buf, old in zip(self._state(), saved, strict=True):
            buf.copy_(old)
        torch.cuda.synchronize(dev)
        return time.perf_counter() - begin

    def _like(self, slots: int, max_len: int, cache: StaticKVCache | None = None) -> SlotDecodeStep:
        """A step of this one's model and settings for (``slots``, ``max_len``), on ``cache`` when given."""
        return SlotDecodeStep(
            self.lm,
            self.base,
            slots,
            max_len,
            use_graph=self.use_graph,
            matmul_attention=self.matmul_attention,
            expert_impl=self.expert_impl,
            no_repeat_ngram=self.ngram,
            ngram_kernel=self.ngram_kernel,
            cache=cache,
            skip_keys=self.skip_keys,
        )

    def narrowed(self, rows: list[int]) -> SlotDecodeStep:
        """The step over the first ``n`` rows of the same cache (``n``: the power of two covering ``rows``, less
        than this step's width) holding the state of this step's ``rows``: row i there is ``rows[i]`` here (its
        K/V moved to cache row i, in place), rows past ``len(rows)`` are empty.  For the drain: once no page is
        left to refill with, a step over 64 rows of which 3 still decode reads every expert for 64 tokens and
        keeps empty rows in every kernel; the narrower step computes each row's same function on fewer rows.
        Narrower steps share the full-width step's cache (views) and are kept on it, graphs and all."""
        width = 1 << (len(rows) - 1).bit_length()  # the power of two covering them: 1, 2, 4, ...
        if not rows or width >= self.slots:
            raise ValueError(f"narrowing {len(rows)} of {self.slots} rows must leave fewer rows")
        root = self.root
        small = root.narrower.get(width)
        if small is None:
            small = root._like(width, root.max_len, cache=root.cache.first_rows(width))
            small._root = weakref.ref(root)
            root.narrower[width] = small
        idx = torch.tensor(rows, dtype=torch.long, device=self.pos.device)
        n = len(rows)
        for layer in range(self.cache.num_layers):  # a layer at a time: the gathered copy stays small
            for buf in (self.cache.k, self.cache.v):
                buf[layer, :n].copy_(buf[layer].index_select(0, idx))
        # every per-row buffer: the advancing state and the caps (one n-gram size, so both lists match)
        for dst, src in zip([small.caps, *small._state()], [self.caps, *self._state()], strict=True):
            dst[:n].copy_(src.index_select(0, idx))
        small.eos.copy_(self.eos)
        if width > n:
            small.empty(list(range(n, width)))
        small.key_len = self.key_len
        return small

    def grown(self, max_len: int) -> SlotDecodeStep:
        """A step with a longer cache holding this one's state (K/V, positions, flags, outputs, histories)."""
        if self.root is not self:
            raise RuntimeError("a narrowed (drain) step is never grown: no page is left to fill it with")
        new = self._like(self.slots, max_len)
        old = self.max_len
        new.cache.k[:, :, :, :old].copy_(self.cache.k)
        new.cache.v[:, :, :, :old].copy_(self.cache.v)
        for mine, theirs in ((new.tokens, self.tokens), (new.pos, self.pos), (new.caps, self.caps)):
            mine.copy_(theirs)
        for mine, theirs in ((new.eos, self.eos), (new.done, self.done), (new.by_eos, self.by_eos)):
            mine.copy_(theirs)
        new.n_gen.copy_(self.n_gen)
        new.out[:, :old].copy_(self.out)
        if new.hist is not None and self.hist is not None:
            new.hist[:, : old + 1].copy_(self.hist)
        return new


def cache_len_for(need: int) -> int:
    """``need`` columns rounded up to :data:`LEN_QUANTUM`."""
    return int(math.ceil(need / LEN_QUANTUM) * LEN_QUANTUM)


@attrs.frozen
class _Ahead:
    """A page taken from the source whose vision ran ahead of its fill: its features and, on CUDA, the event
    recorded on the second stream after them (None on CPU); with the LM prefill run ahead too, the page's own
    cache (its prompt's K/V at columns ``0 .. len - 1``), its float32 logits [1, V] and the event recorded after
    those."""

    request: SlotRequest
    features: list[Tensor]
    done: torch.cuda.Event | None
    cache: StaticKVCache | None = None
    logits: Tensor | None = None
    prefilled: torch.cuda.Event | None = None

    def vision_to(self, stream: torch.cuda.Stream | None) -> None:
        """Wait on ``stream`` for the vision run ahead and hand it the features (:func:`_hand_over`)."""
        _hand_over(stream, self.done, self.features)

    def prefill_to(self, stream: torch.cuda.Stream | None) -> None:
        """The same for the LM prefill run ahead: its cache and logits."""
        if self.cache is not None and self.logits is not None:
            _hand_over(stream, self.prefilled, [self.cache.k, self.cache.v, self.logits])


def _hand_over(stream: torch.cuda.Stream | None, done: torch.cuda.Event | None, tensors: list[Tensor]) -> None:
    """Make ``stream`` wait for ``done`` (recorded on the second stream after ``tensors`` were made), then hand the
    tensors to ``stream``'s allocator: they were allocated on the second stream, and without this their memory could
    be reused there while ``stream`` reads them.  Nothing on CPU (no event, no stream)."""
    if done is not None and stream is not None:
        stream.wait_event(done)
        for t in tensors:
            t.record_stream(stream)


class PageCaches:
    """Batch-1 caches kept per prompt length for refills prefilled page by page (``prefill_per_page``).

    The fast path keeps a prefill graph per (prompt length, cache), so a cache kept per length makes every later page
    of that length one replay.  At most ``limit`` lengths are kept, as many as the model keeps graphs, and none is
    ever dropped: a fill that would need more goes back to the batched forward (:meth:`fits`), since a dropped length
    would be captured again and again, a cost that is no longer one-time.  :meth:`prepare` makes the caches (and,
    where the prefill replays a graph, captures it with a page of zeros) before a fill's marks; :meth:`get` hands out
    an emptied one.  The generator keeps them across runs (:meth:`BatchedGenerator.page_caches`), so a repeat
    captures nothing again."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.caches: dict[int, StaticKVCache] = {}

    def fits(self, lens: list[int]) -> bool:
        """Whether a fill's prompt lengths all have kept caches, or room for them."""
        return len(self.caches.keys() | set(lens)) <= self.limit

    def prepare(self, gen: BatchedGenerator, lens: list[int]) -> float:
        """Make the caches of ``lens`` that are not kept (:meth:`fits` them first); where
        :attr:`BatchedGenerator.page_prefill_graphed`, capture the graph of each one the model does not keep now (a
        new cache's, or a kept cache's whose graph the model dropped since for prefills into other caches: the
        session's own per-page prefills share its ``MAX_PREFILL_GRAPHS``) by a prefill of zeros, so no fill's prefill
        captures inside its marks.  Returns the host seconds of those captures (device synced around them: a
        one-time setup, left out of every stage, as the steps' captures are); 0 where nothing was captured."""
        if not self.fits(lens):
            raise ValueError(
                f"{len(self.caches.keys() | set(lens))} prompt lengths do not fit {self.limit} kept caches"
            )
        graphed_path = gen.page_prefill_graphed
        fast = gen.fast if graphed_path else None
        missing = [
            n
            for n in dict.fromkeys(lens)
            if n not in self.caches or (fast is not None and not fast.prefill_graph_kept(n, self.caches[n]))
        ]
        graphed = bool(missing) and graphed_path
        if graphed:
            gen.clock.synchronize()
        t0 = time.perf_counter()
        hidden = gen.base.model.embed_tokens.embedding_dim
        for n in missing:
            cache = self.caches.get(n)
            if cache is None:
                cache = self.caches[n] = gen.base.new_cache(1, n)
            if graphed:
                cache.length = 0
                gen.lm.prefill(torch.zeros((1, n, hidden), device=gen.device, dtype=gen.dtype), cache)
        if not graphed:
            return 0.0
        gen.clock.synchronize()
        return time.perf_counter() - t0

    def get(self, n: int) -> StaticKVCache:
        """The kept cache of length ``n`` (made by :meth:`prepare`), emptied for the next page."""
        cache = self.caches[n]
        cache.length = 0
        return cache


class _Run:
    """One continuous run's host bookkeeping (see :func:`run_continuous`)."""

    def __init__(self, gen: BatchedGenerator, source: Iterator[SlotRequest], slots: int, keep_logits: bool) -> None:
        self.gen = gen
        self.source = source
        self.slots = slots
        self.exhausted = False
        self.page_wait_s = 0.0
        self.slot_page: list[int | None] = [None] * slots  # which page (arrival index) each slot holds
        self.left: list[int] = [0] * slots  # decode tokens the slot's cap still allows (host mirror)
        self.slot_cap: list[int] = [0] * slots  # the cap of the page each slot holds
        self.slot_len: list[int] = [0] * slots  # its prompt length
        self.slot_step: list[int] = [0] * slots  # the run's step count when it was filled
        self.tokens: list[list[int] | Tensor] = []
        self.by_eos: list[bool] = []
        self.prompt_lens: list[int] = []
        self.logits: list[list[Tensor]] | None = [] if keep_logits else None
        # each fill's marks: start, after its waits for the prefills run ahead (= start when none), after vision, end
        self.fill_marks: list[tuple[object, object, object, object]] = []
        self.step_runs: list[list[object]] = []
        self.capture_s = 0.0
        self.captures = 0  # graphs captured (see ContinuousResult.graph_captures)
        self.capture_error: str | None = None
        # the full-width step of the run (its narrower steps link to it weakly): held here for the whole run
        self.root: SlotDecodeStep | None = None
        self.steps_done = 0
        self.fills = 0
        self.first_step: list[int] = []
        self.step_rows: list[int] = []  # the width of the step each decode step ran (narrower in the drain)
        self.key_steps = 0  # ContinuousResult.key_steps
        self.ahead: collections.deque[_Ahead] = collections.deque()  # pages taken, vision run ahead, not filled
        self.ahead_marks: list[tuple[object, object]] = []  # each page's vision run ahead (second stream)
        self.ahead_stalls: list[tuple[object, object]] = []  # main stream, around each run-ahead (see run_ahead)
        self.prefill_ahead_marks: list[tuple[object, object]] = []  # each page's LM prefill run ahead (second stream)
        self.prefill_stalls: list[tuple[object, object]] = []  # main stream, around enqueueing those prefills
        self.pages_per_page = 0  # refill pages prefilled one at a time (prefill_per_page)
        # one-time setups made outside the marks: the per-page refills' captures before a fill, a new or narrower
        # step's warm-up (kernel variants compiled) between them
        self.setups_outside = 0

    @contextlib.contextmanager
    def outside_marks(self, gen: BatchedGenerator) -> Iterator[None]:
        """Within: one-time setups made outside the marks (``setups_outside``, not the run's timed setups), and the
        prefill / vision graphs among them (``captures``)."""
        setups, graphs = gen.setup_count, gen.capture_count
        try:
            yield
        finally:
            self.setups_outside += gen.setup_count - setups
            self.captures += gen.capture_count - graphs  # graphs only (setup_count holds compiles too)

    def take(self, n: int) -> list[SlotRequest]:
        got: list[SlotRequest] = []
        while len(got) < n and not self.exhausted:
            t0 = time.perf_counter()
            try:
                got.append(next(self.source))
            except StopIteration:
                self.exhausted = True
            finally:
                self.page_wait_s += time.perf_counter() - t0
        return got


def run_continuous(
    gen: BatchedGenerator,
    source: Iterable[SlotRequest],
    slots: int,
    *,
    eos_token_id: int | None,
    no_repeat_ngram_size: int = 0,
    keep_logits: bool = False,
    narrow_drain: bool = True,
    vision_ahead: int = 0,
    prefill_ahead: bool = False,
    prefill_per_page: bool = False,
    skip_keys: bool = True,
) -> ContinuousResult:
    """Decode every page of ``source`` greedily through ``slots`` continuously refilled slots (module doc).

    ``eos_token_id=None``: every sequence runs to its own cap.  ``keep_logits`` (testing) keeps every chosen
    token's float32 logits row on the host; it reads the device after every step and never uses a graph.
    ``narrow_drain``: once the source is dry and at most half the step's rows hold a sequence, go on with a
    step half as wide or narrower (:meth:`SlotDecodeStep.narrowed`); False keeps the full width to the end.
    ``vision_ahead``: how many pages past the filled slots have their vision run ahead, on a second CUDA stream
    beside the decode steps (module doc); 0 runs each page's vision in its fill.  ``prefill_ahead`` (needs
    ``vision_ahead``): those pages' LM prefill runs ahead as well, each page into a cache of its own, so their fill
    only waits for it and copies the K/V into the slot's rows (module doc).  ``prefill_per_page``: a refill's pages
    are prefilled one at a time through the model's per-page prefill (on the fast path a graph replay per prompt
    length) into caches kept per length, instead of one batched forward (module doc).  ``skip_keys``: a row that
    ended by eos sees only its last column until its slot is refilled (:class:`SlotDecodeStep`); False: its whole
    context, as before round 36.
    """
    if slots < 1:
        raise ConfigError(f"continuous batching needs at least one slot, got {slots}")
    if vision_ahead < 0:
        raise ConfigError(f"vision_ahead must be >= 0 pages, got {vision_ahead}")
    if prefill_ahead and not vision_ahead:
        raise ConfigError(
            "prefill_ahead runs the LM prefill of the pages whose vision runs ahead, but vision_ahead is 0",
            hint="set vision_ahead >= 1 (infer.refill_vision_ahead=2), or prefill_ahead off",
        )
    if no_repeat_ngram_size < 0:
        raise ConfigError(f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size}")
    path = gen.decode_path_for([no_repeat_ngram_size], False)
    if path == "host" or keep_logits:
        path = "static"  # the slot step is the only continuous loop; un-graphed it is exact on any device
    clock = gen.clock
    gen.base.reset_routing_stats()
    run = _Run(gen, iter(source), slots, keep_logits)
    page_caches = gen.page_caches() if prefill_per_page else None
    wall0 = time.perf_counter()
    setups = gen.setup_count
    step: SlotDecodeStep | None = None

    device = gen.base.device
    main = torch.cuda.current_stream(device) if device.type == "cuda" else None
    side: torch.cuda.Stream | None = None
    if vision_ahead and main is not None:
        # not the capture stream of the step's graphs (torch's shared one) nor the vision graphs': their cuBLAS
        # workspaces are baked in, and the vision's own GEMMs on this stream run beside the steps' replays; not the
        # global view's stream (vision there is taken for that view's chain: other graphs, captured in a timed fill,
        # round 32) nor the prompt's shared-experts stream (the main stream's prefill would wait for the run-ahead)
        held: tuple[torch.cuda.Stream | None, ...] = ()
        if gen.fast is not None:
            held = (*gen.fast.vision.streams, gen.fast.prompt_stream)
        side = stream_apart(lambda: torch.cuda.Stream(device), [default_capture_stream(), main, *held])

    def encode_here(pages: list[PreparedPage]) -> list[Tensor]:
        """Vision on the main stream, after every vision call run ahead (the towers' static buffers).  By then the
        fill has waited for every LM prefill run ahead, first, in its prefill time (``fill``), so this wait for the
        second stream holds no prefill: that order keeps those waits out of the vision marks."""
        if side is not None and main is not None:
            main.wait_stream(side)
        return [f for p in pages for f in gen.encode_pages([p])]

    def on_side() -> contextlib.AbstractContextManager[object]:
        return torch.cuda.stream(side) if side is not None else contextlib.nullcontext()

    def side_event() -> torch.cuda.Event | None:
        """An event recorded on the second stream now (None on CPU): what the fill that takes the page waits for."""
        if side is None:
            return None
        event = torch.cuda.Event()
        event.record(side)
        return event

    def run_ahead() -> None:
        """Take pages until ``vision_ahead`` wait with their vision (and with ``prefill_ahead`` their LM prefill)
        done or enqueued on the second stream.  Marks on the main stream around it time what it held the slots
        up: on CPU (no second stream) all of that work, on CUDA the main stream's idle time while the host
        enqueued it; the vision part goes into ``vision_s``, the prefill part into ``prefill_s``.  The pages are
        taken first, so a wait for the source stays page wait (``page_wait_s``), outside every stage."""
        reqs = run.take(vision_ahead - len(run.ahead))
        if not reqs:
            return
        stall = clock.mark()
        encoded: list[tuple[SlotRequest, list[Tensor], torch.cuda.Event | None]] = []
        for req in reqs:
            with on_side():
                if side is not None and main is not None:
                    side.wait_stream(main)  # after the fill before it (and any vision it ran)
                a = clock.mark()
                features = gen.encode_pages([req.prepared])
                b = clock.mark()
                done = side_event()
            run.ahead_marks.append((a, b))
            encoded.append((req, features, done))
        mid = clock.mark()
        run.ahead_stalls.append((stall, mid))
        for req, features, done in encoded:
            cache = logits = prefilled = None
            if prefill_ahead:  # the page alone into its own cache: no pads, columns = positions
                with on_side():
                    n = int(req.prepared.input_ids.shape[-1])
                    a = clock.mark()
                    cache = gen.base.new_cache(1, n)
                    logits = gen._prefill([req.prepared], features, [n], cache)
                    run.prefill_ahead_marks.append((a, clock.mark()))
                    prefilled = side_event()
            run.ahead.append(_Ahead(req, features, done, cache, logits, prefilled))
        if prefill_ahead:
            run.prefill_stalls.append((mid, clock.mark()))

    def fill(rows: list[int]) -> None:
        nonlocal step
        early = [run.ahead.popleft() for _ in range(min(len(rows), len(run.ahead)))]
        reqs = [a.request for a in early] + run.take(len(rows) - len(early))
        if not reqs:
            return
        rows = rows[: len(reqs)]
        for r in reqs:
            if r.max_new_tokens < 1:
                raise ConfigError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}")
        pages = [r.prepared for r in reqs]
        lens = [int(p.input_ids.shape[-1]) for p in pages]
        need = max(n + r.max_new_tokens for n, r in zip(lens, reqs, strict=True))
        if step is None or need > step.max_len:
            with run.outside_marks(gen):  # a new step's warm-up (kernel variants compiled) is before the marks
                step = run.root = _step_for(
                    gen, step, slots, cache_len_for(need), path == "graph", no_repeat_ngram_size, skip_keys
                )
        first_fill = run.fills == 0
        # pages whose LM prefill ran ahead bring their own cache and logits; the others are prefilled here, together
        # (with prefill_ahead every page run ahead has its cache, without it none: they lead ``pages`` either way),
        # or with prefill_per_page one at a time into caches kept per length, made (graphs captured) before the marks
        here = sum(1 for a in early if a.cache is not None)
        per_page = page_caches is not None and not first_fill and page_caches.fits(lens[here:])
        if per_page:
            assert page_caches is not None
            with run.outside_marks(gen):
                run.capture_s += page_caches.prepare(gen, lens[here:])
        t0 = clock.mark()
        # pages whose LM prefill ran ahead: the main stream waits for those prefills first, and that wait is prefill
        # time (t0 .. tv).  Waited for inside the vision below, it was counted as vision: on CUDA the second stream
        # runs them after the vision ahead.  When this fill runs vision of its own, every page still ahead is among
        # these (a fill takes the pages ahead first), so the vision's wait below then covers vision only
        done_ahead = early[:here]
        for a in done_ahead:
            a.prefill_to(main)
        tv = clock.mark() if done_ahead else t0
        # the first fill batches its views across pages; a refill (usually a few pages) runs vision page by page
        # (see the module doc: measured this way, the batched alternative is not); pages whose vision ran ahead
        # come first (they were taken first), waited for on the device
        features: list[Tensor] = []
        for a in early:
            if a.cache is None:  # its features are read here; a page prefilled ahead needs only its cache
                a.vision_to(main)
                features += a.features
        rest = pages[len(early) :]
        # a fill with pages of its own took every page still ahead (``early``), so the main stream has waited for
        # every prefill run ahead: this fill's vision and own prefill never run beside one (the prompt kernels'
        # counters), and no such wait lands in the vision marks
        assert not rest or not run.ahead, "a fill took fresh pages while pages run ahead were still waiting"
        if rest:
            features += gen.encode_pages(rest) if first_fill else encode_here(rest)
        run.fills += 1
        t1 = clock.mark()
        parts: list[Tensor] = []
        for i, (a, row) in enumerate(zip(done_ahead, rows, strict=False)):  # columns = positions already
            n = lens[i]
            assert a.cache is not None and a.logits is not None  # its prefill was waited for at t0 .. tv
            parts.append(a.logits)
            step.insert_kv(row, a.cache, 0, 0, n)
        if per_page:
            assert page_caches is not None
            for page, feats, row, n in zip(pages[here:], features, rows[here:], lens[here:], strict=True):
                cache = page_caches.get(n)
                parts.append(gen.prefill_page(page, feats, cache))
                run.pages_per_page += 1
                step.insert_kv(row, cache, 0, 0, n)
        elif here < len(pages):
            here_lens = lens[here:]
            length = max(here_lens)
            tmp = gen.base.new_cache(len(pages) - here, length)
            parts.append(gen._prefill(pages[here:], features, here_lens, tmp))
            for i, (row, n) in enumerate(zip(rows[here:], here_lens, strict=True)):  # drop the left pads
                step.insert_kv(row, tmp, i, length - n, n)
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        step.load_slots(rows, [p.input_ids for p in pages], logits, [r.max_new_tokens for r in reqs])
        t2 = clock.mark()
        run.fill_marks.append((t0, tv, t1, t2))
        for row, r, n in zip(rows, reqs, lens, strict=True):
            run.slot_page[row] = len(run.tokens)
            run.slot_cap[row] = r.max_new_tokens
            run.slot_len[row] = n
            run.slot_step[row] = run.steps_done
            run.left[row] = r.max_new_tokens - 1
            run.tokens.append([])
            run.by_eos.append(False)
            run.prompt_lens.append(n)
            run.first_step.append(run.steps_done)
        if run.logits is not None:
            host = logits.float().cpu()
            run.logits.extend([[host[i].clone()] for i in range(len(reqs))])

    eos = eos_token_id
    with torch.inference_mode(), _second_stream_waited_on_error(main, side):
        kept = gen._slots
        if kept is not None:
            kept.clear()
        reads_before = gen.expert_reads()  # a device copy before the first mark (no sync): the decode steps' reads
        fill(list(range(slots)))
        if vision_ahead and not run.exhausted:
            run_ahead()
        while any(p is not None for p in run.slot_page):
            assert step is not None
            step.set_eos(eos)
            occupied = [b for b in range(step.slots) if run.slot_page[b] is not None]
            # slots that ended (at their cap, eos, or at once after their prefill) are refilled before any step
            finished = _finished(run, step, occupied, eos is not None)
            if finished:
                for b in finished:
                    run.slot_page[b] = None
                fill(finished)
                if vision_ahead and not run.exhausted:
                    run_ahead()
                unfilled = [b for b in finished if run.slot_page[b] is None]
                if unfilled:
                    step.empty(unfilled)
                    if narrow_drain and run.exhausted and not run.ahead:
                        with run.outside_marks(gen):  # a narrower step's warm-up: between the marks, not in them
                            step = _narrow(run, step)
                continue
            # rows whose cap allows more tokens (with eos some of them may already be done on the device: they
            # idle until the next check reads the flags)
            live = [b for b in occupied if run.left[b] > 0]
            if live:
                n_steps = min(run.left[b] for b in live)
                if eos is not None and not keep_logits:
                    n_steps = min(n_steps, gen.check_every)
                if keep_logits:
                    n_steps = 1

                # attention covers the columns every slot can reach by the end of these steps, in buckets; a run
                # of steps stops where the furthest slot would cross into the next bucket
                now = _reach(run, occupied, 0)
                n_steps = min(n_steps, max(1, cache_len_for(now + 1) - 1 - now))
                step.key_len = min(step.max_len, cache_len_for(_reach(run, occupied, n_steps) + 1))
                if step.use_graph and step.graph is None:
                    run.capture_s += step.capture()
                    run.captures += step.capture_error is None
                    if step.capture_error is not None:  # the run's record (its report says why), the generator's
                        run.capture_error = gen.capture_error = step.capture_error  # (later runs: un-graphed)
                marks = [clock.mark()]
                for _ in range(n_steps):
                    before = step.done.logical_not().tolist() if keep_logits else None
                    step.step()
                    marks.append(clock.mark())
                    if before is not None and run.logits is not None and step.last_logits is not None:
                        host = step.last_logits.float().cpu()
                        for b in range(step.slots):
                            page = run.slot_page[b]
                            if before[b] and page is not None:
                                run.logits[page].append(host[b].clone())
                run.step_runs.append(marks)
                run.step_rows += [step.slots] * n_steps
                run.key_steps += _keys(run, occupied, n_steps)
                for b in live:
                    run.left[b] -= n_steps
                run.steps_done += n_steps
        clock.synchronize()
    wall_s = time.perf_counter() - wall0 - run.capture_s
    read, grouped = routed_experts_read(reads_before, gen.expert_reads())  # after the sync: no wait, and no wall
    gen._slots = run.root  # the full-width step (its narrower ones hang on it), kept for the next run
    tokens = [t if isinstance(t, list) else [int(x) for x in t.tolist()] for t in run.tokens]
    vision_ms = sum(clock.elapsed_ms(v, b) for _, v, b, _ in run.fill_marks)
    vision_ms += sum(clock.elapsed_ms(a, b) for a, b in run.ahead_stalls)
    ahead_ms = sum(clock.elapsed_ms(a, b) for a, b in run.ahead_marks)
    prefill_ms = sum(clock.elapsed_ms(a, v) + clock.elapsed_ms(b, c) for a, v, b, c in run.fill_marks)
    prefill_ms += sum(clock.elapsed_ms(a, b) for a, b in run.prefill_stalls)
    prefill_ahead_ms = sum(clock.elapsed_ms(a, b) for a, b in run.prefill_ahead_marks)
    step_ms = [ms for marks in run.step_runs for ms in clock.intervals_ms(marks)]
    return ContinuousResult(
        tokens=tokens,
        stopped_by_eos=run.by_eos,
        prompt_lens=run.prompt_lens,
        slots=slots,
        vision_s=vision_ms / 1e3,
        prefill_s=prefill_ms / 1e3,
        decode_s=sum(step_ms) / 1e3,
        step_ms=step_ms,
        fills=len(run.fill_marks),
        page_wait_s=run.page_wait_s,
        wall_s=wall_s,
        decode_path="graph" if step is not None and step.graphs else "static",
        graph_capture_s=run.capture_s,
        graph_captures=run.captures,
        graph_capture_error=run.capture_error,
        logits=run.logits,
        first_step=run.first_step,
        step_rows=run.step_rows,
        key_steps=run.key_steps,
        finished_rows_attend=None if eos is None else not skip_keys,
        vision_ahead_s=ahead_ms / 1e3,
        pages_ahead=len(run.ahead_marks),
        prefill_ahead_s=prefill_ahead_ms / 1e3,
        pages_prefilled_ahead=len(run.prefill_ahead_marks),
        pages_prefilled_per_page=run.pages_per_page,
        timed_setups=gen.setup_count - setups - run.setups_outside,
        routed_experts_read=read,
        grouped_steps=grouped,
    )


@contextlib.contextmanager
def _second_stream_waited_on_error(main: torch.cuda.Stream | None, side: torch.cuda.Stream | None) -> Iterator[None]:
    """A run that stops early (a ConfigError in a fill, an error from the source) may leave vision or prefill run
    ahead enqueued on the second stream: on the way out the main stream waits for it, so the next run's work (its
    first fill's vision on the main stream reuses the towers' static buffers) never runs beside it.  (A run that
    ends normally synchronised the device.)  A wait that fails itself (a sticky CUDA error) is noted on the error
    that stopped the run, which is the one raised."""
    try:
        yield
    except BaseException as exc:
        if side is not None and main is not None:
            try:
                main.wait_stream(side)
            except RuntimeError as wait_error:
                exc.add_note(
                    f"the main stream could not wait for the work run ahead on the second stream: {wait_error}"
                )
        raise


def _narrow(run: _Run, step: SlotDecodeStep) -> SlotDecodeStep:
    """``step`` narrowed to the occupied slots when they are at most half its rows (the drain), the host's
    per-slot records moved along (slot i of the narrower step is the i-th occupied one); else ``step``."""
    rows = [b for b in range(step.slots) if run.slot_page[b] is not None]
    if not rows or len(rows) > step.slots // 2:
        return step
    small = step.narrowed(rows)
    pad = small.slots - len(rows)
    run.slot_page = [run.slot_page[b] for b in rows] + [None] * pad
    for name in ("left", "slot_cap", "slot_len", "slot_step"):
        old: list[int] = getattr(run, name)
        setattr(run, name, [old[b] for b in rows] + [0] * pad)
    return small


def _column(run: _Run, b: int, after: int) -> int:
    """The cache column slot ``b`` can have written ``after`` more steps from now (its prompt length + the steps
    since its fill, at most its cap)."""
    return run.slot_len[b] + min(run.steps_done + after - run.slot_step[b], run.slot_cap[b])


def _reach(run: _Run, occupied: list[int], after: int) -> int:
    """The furthest :func:`_column` of any occupied slot ``after`` more steps from now."""
    return max(_column(run, b, after) for b in occupied)


def _keys(run: _Run, occupied: list[int], n_steps: int) -> int:
    """Keys the next ``n_steps`` steps attend over in the occupied slots: at step i a slot attends over every
    column up to its :func:`_column`."""
    return sum(_column(run, b, i) + 1 for b in occupied for i in range(n_steps))


def _finished(run: _Run, step: SlotDecodeStep, occupied: list[int], eos_on: bool) -> list[int]:
    """The occupied slots whose sequence ended; their tokens are collected (a device copy when the host knows
    the count without eos, so nothing syncs; the host values after the eos check's sync otherwise)."""
    if not eos_on:
        ended = [b for b in occupied if run.left[b] <= 0]
        for b in ended:
            page = run.slot_page[b]
            assert page is not None
            run.tokens[page] = step.out[b, : run.slot_cap[b]].clone()  # read once, at the end
        return ended
    flags = torch.stack([step.done.long(), step.n_gen, step.by_eos.long()]).tolist()  # one read-back
    done, n_gen, by_eos = flags[0], flags[1], flags[2]
    ended = [b for b in occupied if done[b]]
    for b in occupied:
        run.left[b] = run.slot_cap[b] - n_gen[b] if not done[b] else 0
    for b in ended:
        page = run.slot_page[b]
        assert page is not None
        run.tokens[page] = [int(x) for x in step.out[b, : n_gen[b]].tolist()]
        run.by_eos[page] = bool(by_eos[b])
        # ``_keys`` took the row on by one column a step over its context (``c`` keys at the first of the m steps
        # after its last token, c + 1 at the next, ...); the device held it at its last column from that token on,
        # attending over c keys each step, or over that column alone with ``skip_keys``
        m = max(run.steps_done - run.slot_step[b] - (n_gen[b] - 1), 0)
        c = run.slot_len[b] + n_gen[b]
        run.key_steps -= m * (m - 1) // 2 + (m * (c - 1) if step.skip_keys else 0)
    return ended


def _step_for(
    gen: BatchedGenerator,
    current: SlotDecodeStep | None,
    slots: int,
    max_len: int,
    use_graph: bool,
    ngram: int,
    skip_keys: bool,
) -> SlotDecodeStep:
    """The step to run with: the current one grown, the generator's kept one when it fits, or a new one."""
    if current is not None:
        gen._slots = None  # the generator must not keep the outgrown cache and graphs alive
        return current.grown(max(max_len, current.max_len))
    kept = gen._slots
    # a kept step at least as long serves the run: a repeat after its cache grew finds the grown one (attention covers
    # key_len, not max_len, so the longer cache costs nothing); a new step would capture every graph again, each
    # capture then left out of the wall time as one-time (round 27, found by reading)
    if kept is not None and kept.serves(slots, max_len, use_graph, ngram, skip_keys):
        return kept
    gen._slots = None  # free the old cache and graph pool before allocating the new ones
    return SlotDecodeStep(
        gen.lm,
        gen.base,
        slots,
        max_len,
        use_graph=use_graph,
        matmul_attention=gen.matmul_attention,
        expert_impl=gen.expert_impl,
        no_repeat_ngram=ngram,
        ngram_kernel=gen.ngram_kernel,
        skip_keys=skip_keys,
    )
