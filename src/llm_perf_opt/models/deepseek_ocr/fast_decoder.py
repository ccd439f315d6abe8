"""The fast path's single-page decode step: static buffers, one CUDA graph per cache, on-device token choice.

:class:`FastDecoder` feeds the fast model's layers (:meth:`FastModel.lm_forward`) one token per row at a
position held in a device tensor, so one captured graph serves every step of a page; with the Triton kernels
the same layer loop runs with Triton modules swapped in.  Greedy argmax and the no-repeat-ngram ban are
computed inside the graph, and so is the step's end: the token fed back, kept at its position, the position
advanced (:meth:`FastDecoder.greedy` replays the graph step after step with no other device op between).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from llm_perf_opt.errors import InputError
from llm_perf_opt.models.deepseek_ocr.context import ForwardContext
from llm_perf_opt.models.deepseek_ocr.generation import NoRepeatNGram, banned_ngram_mask
from llm_perf_opt.models.deepseek_ocr.graphs import capture_graph, first_argmax
from llm_perf_opt.models.deepseek_ocr.kv_cache import StaticKVCache

if TYPE_CHECKING:
    from llm_perf_opt.models.deepseek_ocr.fast import FastModel

__all__ = ["TRITON_MAX_ROWS", "FastDecoder"]

TRITON_MAX_ROWS = 8  # the Triton expert kernels re-read weights per token: decode batches up to 8 rows
# True: greedy() also runs round 19's three device ops between the graph's replays (the position set, the token
# copied out and fed back), on top of the step's own end on the device; a module setting so bench_fast times both.
HOST_STEP_END = False


class FastDecoder:
    """A sync-free decode step over one preallocated cache, replayed from a CUDA graph when ``use_graph``.

    ``step(tokens[B, 1]) -> logits[B, V]`` (a static buffer, overwritten by the next step) writes position
    ``cache.length`` and advances the cache, exactly like ``model.decode_step``.  Attention covers the
    cache's whole ``max_len`` with an additive mask (positions past the current one get -inf).

    Each step ends on the device (:func:`kernels.feed_back`, inside the token pick's last launch with
    ``fused_pick``): its token becomes the next step's input (``tokens``), is kept at the step's position
    (``chosen`` [B, max_len]) and ``pos`` advances (clamped to ``max_len - 1``; the host checks the room).
    :meth:`step` sets ``tokens`` and ``pos`` itself before every step, so it sees none of that.
    """

    def __init__(
        self,
        fast: FastModel,
        cache: StaticKVCache,
        max_len: int | None = None,
        use_graph: bool = True,
        ngram: int | NoRepeatNGram = 0,
    ):
        base = fast.base
        self.fast = fast
        self.cache = cache
        self.max_len = cache.max_len if max_len is None else int(max_len)
        if self.max_len > cache.max_len:
            raise InputError(f"FastDecoder max_len {self.max_len} > cache max_len {cache.max_len}")
        dev, dtype = cache.device, cache.dtype
        self.batch = cache.batch
        self.tokens = torch.zeros((self.batch, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.key_pos = torch.arange(self.max_len, device=dev)
        self.mask_zero = torch.zeros((), dtype=dtype, device=dev)
        self.mask_neg = torch.full((), float("-inf"), dtype=dtype, device=dev)
        rot = base.model.rotary
        rot(0, self.max_len, dev, dtype)  # build the table once, outside any capture
        self.cos_table, self.sin_table = rot._tables[(dev, dtype)]
        self.use_graph = bool(use_graph) and dev.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_error: str | None = None
        self.logits: Tensor | None = None
        self.next_token: Tensor | None = None
        self._compiled = fast.compiled_step()
        self.kernels = fast.decode_kernels if self.batch <= TRITON_MAX_ROWS else "torch"
        self.fused_pick = self.kernels == "triton" and fast.fast_config.fused_pick
        self.ngram_kernel = self.kernels == "triton" and fast.fast_config.ngram_kernel
        # On-device token choice: every row's tokens by position (prompt via set_history, then each fed token
        # written at its position by the step), the no-repeat-ngram ban applied before the argmax, and a
        # sticky flag for non-finite logits (read once, after the loop).
        self.ngram = NoRepeatNGram.of(ngram)  # its own check: size >= 0 (ConfigError)
        self.history = torch.zeros((self.batch, self.max_len), dtype=torch.long, device=dev) if self.ngram else None
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
        self.chosen = torch.zeros((self.batch, self.max_len), dtype=torch.long, device=dev)

    def set_history(self, ids: Tensor) -> None:
        """The prompt's token ids [B, P] (image-token ids included) as positions 0..P-1 of the history."""
        if self.history is not None:
            self.history[:, : ids.shape[-1]].copy_(ids.view(self.batch, -1), non_blocking=True)

    def _pick(self, logits: Tensor) -> Tensor:
        """Next token per row on the device: argmax (first index on ties) after the no-repeat-ngram ban, then the
        step's end (:func:`kernels.feed_back`); with ``fused_pick`` (Triton step only) the flag, ban, argmax and
        the step's end in :func:`kernels.pick_token`'s two launches."""
        from llm_perf_opt.models.deepseek_ocr.kernels import feed_back, ngram_ban, pick_token

        banned = None
        if self.history is not None:
            self.history.index_copy_(1, self.pos, self.tokens)  # the fed token joins the history
            if self.ngram_kernel:
                rule = self.ngram
                with self.fast.triton_launches():
                    banned = ngram_ban(
                        self.history, self.pos, rule.n, logits.shape[-1], rule.window, rule.exempt_ids, length_offset=1
                    )
            else:
                banned = banned_ngram_mask(self.history, self.pos + 1, self.ngram, logits.shape[-1])
        feed = (self.tokens, self.chosen, self.pos)
        if self.fused_pick:
            with self.fast.triton_launches():
                return pick_token(logits, banned, self.nonfinite, feed=feed)
        self.nonfinite |= ~torch.isfinite(logits).all()
        token = first_argmax(logits if banned is None else logits.masked_fill(banned, float("-inf")))
        feed_back(token, *feed)
        return token

    def _forward_triton(self) -> tuple[Tensor, Tensor]:
        """The decode step with the Triton modules swapped in (:mod:`~llm_perf_opt.models.deepseek_ocr.triton_layers`)
        plus cuBLAS for the QKV, o_proj and lm_head GEMMs; attention reads only keys 0..pos."""
        fast, base = self.fast, self.fast.base
        ctx = ForwardContext(
            cos=None, sin=None, cache=self.cache, slot=self.pos, rope_tables=(self.cos_table, self.sin_table)
        )
        normed = fast.lm_forward(base.model.embed_tokens(self.tokens).view(self.batch, -1), ctx, triton=True)
        logits = base.lm_head(normed).float()
        return logits, self._pick(logits)

    def _body(self) -> tuple[Tensor, Tensor]:
        if self.kernels == "triton":
            return self._forward_triton()
        if self._compiled is None:
            return self._forward()
        out: tuple[Tensor, Tensor] = self._compiled(self)
        return out

    # ------------------------------------------------------------------ the step body
    def _forward(self) -> tuple[Tensor, Tensor]:
        """The decode step in torch kernels: K/V written at ``pos`` with ``index_copy_``, attention over the
        first ``max_len`` cache columns with an additive mask by position (static shapes, no host read)."""
        fast, base = self.fast, self.fast.base
        n = self.max_len
        cos = self.cos_table.index_select(0, self.pos).unsqueeze(0)  # [1, 1, D]
        sin = self.sin_table.index_select(0, self.pos).unsqueeze(0)
        bias = torch.where(self.key_pos <= self.pos, self.mask_zero, self.mask_neg).view(1, 1, 1, n)
        ctx = ForwardContext(
            cos=cos,
            sin=sin,
            cache=self.cache,
            slot=self.pos,
            key_len=n,
            mask=bias,
            matmul_attention=fast.fast_config.decode_attention == "matmul",
        )
        hidden = fast.lm_forward(base.model.embed_tokens(self.tokens), ctx)
        logits = base.lm_head(hidden[:, -1]).float()
        return logits, self._pick(logits)

    def _capture(self) -> None:
        # the warm-up runs the step twice, each ending on the device (tokens fed back, pos advanced): both put back
        kept = (self.tokens.clone(), self.pos.clone())
        with self.fast.routing_counts_kept():
            self.graph, (self.logits, self.next_token) = capture_graph(
                self._body, self.cache.device, self.fast.base._sdpa_policy
            )
        self.tokens.copy_(kept[0])
        self.pos.copy_(kept[1])

    def _run(self) -> Tensor:
        if not self.use_graph:
            with self.fast.base._sdpa_policy():
                self.logits, self.next_token = self._body()
            return self.logits
        if self.graph is None:
            try:
                self._capture()
            except RuntimeError as exc:  # an op that cannot be captured: run the same step un-graphed
                self.capture_error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"CUDA graph capture failed, decoding without graphs ({exc})", stacklevel=2)
                self.use_graph = False
                return self._run()
        assert self.graph is not None and self.logits is not None
        self.graph.replay()
        return self.logits

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def prepare(self) -> None:
        """Capture the graph now, so a timed decode loop never includes the one-time capture.

        The capture's warm-up writes one garbage K/V row at the current position, which the next prefill
        or step overwrites; routing counters are restored by ``_capture``.
        """
        if not self.use_graph or self.graph is not None:
            return
        try:
            self._capture()
        except RuntimeError as exc:  # same fallback as _run: decode un-graphed, and say why
            self.capture_error = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"CUDA graph capture failed, decoding without graphs ({exc})", stacklevel=2)
            self.use_graph = False

    @torch.no_grad()
    def step(self, token_ids: Tensor) -> Tensor:
        """Feed ``token_ids`` [B, 1] at position ``cache.length``; float32 logits [B, V] (static buffer)."""
        self.cache.check_room(1)
        self.tokens.copy_(token_ids, non_blocking=True)
        self.pos.fill_(self.cache.length)
        logits = self._run()
        self.cache.advance(1)
        return logits

    @torch.no_grad()
    def greedy(
        self,
        first_token: Tensor,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        check_every: int = 16,
        on_step: Callable[[], None] | None = None,
    ) -> list[list[int]]:
        """Greedy decode on the device: feed ``first_token`` [B, 1], then each step's pick (argmax after the
        decoder's no-repeat-ngram ban), no host sync except an eos check every ``check_every`` steps.  Returns
        per row the tokens chosen by the ``max_new_tokens`` steps, cut after the first eos (rows stop together
        when all have hit eos, so up to ``check_every - 1`` steps past it run and are dropped).  ``on_step``
        runs on the host after each step is queued (e.g. a CUDA-event mark, an interrupt check)."""
        start = self.cache.length
        self.tokens.copy_(first_token, non_blocking=True)
        self.pos.fill_(start)
        done = 0
        for i in range(max_new_tokens):
            self.cache.check_room(1)
            if HOST_STEP_END:
                self.pos.fill_(self.cache.length)
            self._run()  # ends on the device: the token fed back, kept in chosen at its position, pos advanced
            if HOST_STEP_END:
                assert self.next_token is not None
                self.chosen[:, start + i : start + i + 1].copy_(self.next_token)
                self.tokens.copy_(self.next_token)
            self.cache.advance(1)
            if on_step is not None:
                on_step()
            done = i + 1
            if (
                eos_token_id is not None
                and done % check_every == 0
                and bool((self.chosen[:, start : start + done] == eos_token_id).any(dim=1).all())
            ):
                break
        rows: list[list[int]] = []
        for row in self.chosen[:, start : start + done].tolist():
            if eos_token_id is not None and eos_token_id in row:
                row = row[: row.index(eos_token_id) + 1]
            rows.append(row)
        return rows
