"""The batched generator's static decode step: static device buffers, a masked step over the whole cache, a graph.

Every row writes its K/V at the same cache column ``slot`` (``L + step``) but is rotated at its own position
(``len_b + step``); pad keys stay masked.  The step is the model's one decoder forward
(``lm_forward``) fed a slot :class:`~llm_perf_opt.models.deepseek_ocr.context.ForwardContext`, so on CUDA it is
captured once per (batch, cache length) and replayed.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import Tensor

from llm_perf_opt.models.deepseek_ocr.context import ForwardContext, decode_key_mask
from llm_perf_opt.models.deepseek_ocr.generation import banned_ngram_mask
from llm_perf_opt.models.deepseek_ocr.graphs import capture_graph, first_argmax
from llm_perf_opt.models.deepseek_ocr.kv_cache import StaticKVCache
from llm_perf_opt.models.deepseek_ocr.model import DeepseekOCRForCausalLM
from llm_perf_opt.models.deepseek_ocr.protocol import LanguageModel

__all__ = ["DecodeRows", "StaticBatchStep"]


class DecodeRows:
    """Device state and step pieces shared by the static step and continuous batching's slot step.

    Buffers (on the model's device, never reallocated, so a captured graph reads and writes them in place):
    ``tokens`` [B, 1] the token each row feeds; ``pos`` [B] its rotary position; ``eos`` [1] (-1 when eos is
    off); ``done`` / ``by_eos`` [B] bool; ``n_gen`` [B] tokens recorded per row; ``out`` [B, max_len] the
    recorded tokens (row b's output is its first ``n_gen[b]`` entries); ``hist`` [B, max_len + 1] each row's
    sequence for the no-repeat rule (``vocab``, a value no token has, where there is none).  A subclass adds
    ``caps`` [B] and how its rows map to cache columns (the context of :meth:`_logits`).
    """

    caps: Tensor

    def __init__(
        self,
        lm: LanguageModel,
        base: DeepseekOCRForCausalLM,
        rows: int,
        max_len: int,
        *,
        use_graph: bool,
        matmul_attention: bool,
        expert_impl: str | None,
        no_repeat_ngram: int,
        ngram_kernel: bool = False,
        cache: StaticKVCache | None = None,
        skip_keys: bool = True,
    ) -> None:
        dev, dtype = base.device, base.dtype
        self.lm, self.base = lm, base
        self.key = (rows, max_len, use_graph, no_repeat_ngram)
        # a subclass's rule for which keys a finished row (and, static, a padded one) sees; baked into its graphs
        self.skip_keys = bool(skip_keys)
        if cache is not None and (cache.batch, cache.max_len) != (rows, max_len):
            raise ValueError(f"cache of {cache.batch} rows x {cache.max_len} does not fit {rows} x {max_len}")
        self.cache = base.new_cache(rows, max_len) if cache is None else cache  # a given one: e.g. a view of rows
        self.tokens = torch.zeros((rows, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros(rows, dtype=torch.long, device=dev)
        self.eos = torch.full((1,), -1, dtype=torch.long, device=dev)
        self.done = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.by_eos = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.n_gen = torch.zeros(rows, dtype=torch.long, device=dev)
        self.out = torch.zeros((rows, max_len), dtype=torch.long, device=dev)
        self.ngram = int(no_repeat_ngram)
        self.vocab = int(base.lm_head.out_features)
        self.hist = torch.full((rows, max_len + 1), self.vocab, dtype=torch.long, device=dev) if self.ngram else None
        # the ban as kernels.ngram_ban's one launch instead of banned_ngram_mask's ~20 torch kernels (the same bits),
        # its two length layouts (one for every row, one per row) run once here, so a kernel compile lands in the
        # step's set-up, not in a timed fill or step
        self.ngram_kernel = bool(ngram_kernel) and self.ngram > 0
        if self.ngram_kernel:
            assert self.hist is not None
            for n_len in {1, rows}:
                self._ban(self.hist, torch.zeros(n_len, dtype=torch.long, device=dev))
        self.key_pos = torch.arange(max_len, device=dev)
        self.mask_zero = torch.zeros((), dtype=dtype, device=dev)
        self.mask_neg = torch.full((), float("-inf"), dtype=dtype, device=dev)
        # positions reach at most max_len - 1; built here, outside any capture
        self.cos_table, self.sin_table = base.model.rotary(0, max_len, dev, dtype)
        self.matmul_attention = matmul_attention
        self.expert_impl = expert_impl
        self.use_graph = bool(use_graph) and dev.type == "cuda"
        self.capture_error: str | None = None

    def serves(self, rows: int, max_len: int, use_graph: bool, no_repeat_ngram: int, skip_keys: bool = True) -> bool:
        """Whether this step (and its graphs) can run a batch of ``rows`` needing ``max_len`` cache columns: the same
        rows, graph use, n-gram size and ``skip_keys``, and at least as many columns (those past a run's last stay
        masked)."""
        same = self.key[2:] == (bool(use_graph), int(no_repeat_ngram)) and self.skip_keys == bool(skip_keys)
        return self.key[0] == rows and self.key[1] >= max_len and same

    def _ban(self, hist: Tensor, length: Tensor) -> Tensor:
        """bool [rows of ``hist``, V]: the ids the no-repeat rule bans after each row's first ``length`` entries
        ([1] or one per row): :func:`kernels.ngram_ban` with ``ngram_kernel``, else the torch mask."""
        if self.ngram_kernel:
            from llm_perf_opt.models.deepseek_ocr import kernels

            return kernels.ngram_ban(hist, length, self.ngram, self.vocab)
        return banned_ngram_mask(hist, length, self.ngram, self.vocab)

    def _logits(self, slot: Tensor, key_len: int, mask: Tensor, key_first: Tensor | None = None) -> Tensor:
        """float32 logits [B, V] of one decoder forward of ``tokens``, each row rotated at its own ``pos``, K/V
        written at ``slot`` and attention over the first ``key_len`` columns under ``mask`` (``key_first``: the
        first column the mask shows each row, for kernels that skip reading the ones before it)."""
        cos = self.cos_table.index_select(0, self.pos).unsqueeze(1)  # [B, 1, D]: one position per row
        sin = self.sin_table.index_select(0, self.pos).unsqueeze(1)
        ctx = ForwardContext(
            cos=cos,
            sin=sin,
            cache=self.cache,
            slot=slot,
            key_len=key_len,
            mask=mask,
            matmul_attention=self.matmul_attention,
            expert_impl=self.expert_impl,
            record_routing=False,
            key_first=key_first,
        )
        hidden = self.lm.lm_forward(self.base.model.embed_tokens(self.tokens), ctx)
        return self.lm.logits(hidden[:, -1])

    def _record(self, nxt: Tensor) -> Tensor:
        """Record ``nxt`` [B, 1] for rows still live, update done / eos flags and feed it; the live mask [B].

        A finished row keeps its last token as input and records nothing more (its column write puts back the
        value already there)."""
        live = self.done.logical_not()
        col = self.n_gen.clamp(max=self.out.shape[1] - 1).unsqueeze(1)
        self.out.scatter_(1, col, torch.where(live.unsqueeze(1), nxt, self.out.gather(1, col)))
        self.n_gen.add_(live.to(torch.long))
        hit = live & (nxt[:, 0] == self.eos)
        self.by_eos.logical_or_(hit)
        self.done.logical_or_(hit | (self.n_gen >= self.caps))
        self.tokens.copy_(torch.where(live.unsqueeze(1), nxt, self.tokens))
        return live


class StaticBatchStep(DecodeRows):
    """The static decode step for one (batch, cache ``max_len``): KV cache, static device buffers, CUDA graph.

    Buffers (on the model's device, never reallocated, so a captured graph reads and writes them in place):
    ``tokens`` [B, 1] the token each row feeds; ``pos`` [B] its rotary position (``len_b + step``); ``slot``
    [1] the cache column every row writes (``L + step``); ``meta`` [3, B] caps, pads and prompt lengths;
    ``eos`` [1] (-1 when eos is off); ``done`` / ``by_eos`` [B] bool; ``n_gen`` [B] tokens recorded per row;
    ``out`` [B, max_len] the recorded tokens (row b's output is its first ``n_gen[b]`` entries).

    One step (:meth:`_body`): embed ``tokens``; cos/sin gathered at ``pos``; additive key mask [B, 1, 1,
    max_len] from ``slot`` and pads (keys ``pad_b <= j <= slot``); per layer K/V ``index_copy_`` at ``slot``
    then attention over the whole cache; MLP/MoE on every row (finished ones too: static shapes; their
    output is ignored); greedy token on the device; then :meth:`_advance` records it for live rows and
    moves ``slot`` / ``pos`` on.  Nothing in it reads a device value on the host (unless the experts are
    ``"eager"``, which is why those are never graphed).

    With ``no_repeat_ngram`` n > 0 the step also applies the no-repeat-ngram rule on the device
    (:func:`~llm_perf_opt.models.deepseek_ocr.generation.banned_ngram_mask`, or with ``ngram_kernel``
    :func:`~llm_perf_opt.models.deepseek_ocr.kernels.ngram_ban`'s one launch; static shapes) before the argmax:
    ``hist`` [B, max_len + 1] holds every row's sequence aligned with the cache columns (prompt left-padded,
    pads hold ``vocab``, a value no token has, so no window that touches a pad matches a row's suffix and a
    match never bans a pad), so one ``length`` (``slot + 1``) serves every row.  One n for the whole batch (it
    is baked into the graph); a rule with more parameters (window, exempt ids) replaces :meth:`_banned`.

    ``skip_keys`` (``infer.static_skip_keys``): each row sees cache columns ``first_b..slot`` with ``first_b`` its
    pad count while it runs and ``slot`` (its newest key only) once it has finished, and the Triton row attention
    (``ForwardContext.key_first``) reads nothing before ``first_b``: no pads, and of a finished row one key instead
    of its whole context, which a static batch otherwise reads to the end (81 % of the decode steps' bytes on
    issue 18's workload, round 34).  Running rows' outputs keep their bits (the keys skipped were masked), finished
    rows' are ignored.  Off: every row attends over its whole masked context to the end, as before round 35.
    """

    def __init__(
        self,
        lm: LanguageModel,
        base: DeepseekOCRForCausalLM,
        bsz: int,
        max_len: int,
        *,
        use_graph: bool,
        matmul_attention: bool,
        expert_impl: str | None,
        no_repeat_ngram: int = 0,
        ngram_kernel: bool = False,
        skip_keys: bool = True,
    ) -> None:
        super().__init__(
            lm,
            base,
            bsz,
            max_len,
            use_graph=use_graph,
            matmul_attention=matmul_attention,
            expert_impl=expert_impl,
            no_repeat_ngram=no_repeat_ngram,
            ngram_kernel=ngram_kernel,
            skip_keys=skip_keys,
        )
        dev = base.device
        self.batch = bsz
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.meta = torch.zeros((3, bsz), dtype=torch.long, device=dev)
        self.caps, self.pads = self.meta[0], self.meta[1]
        self.graph: torch.cuda.CUDAGraph | None = None

    # ------------------------------------------------------------------ state
    def load_prompts(self, prompts: list[Tensor]) -> None:
        """Each row's prompt ids, left-padded, into ``hist`` (no-repeat rule only; before :meth:`first_token`)."""
        if self.hist is None:
            return
        length = max(int(p.numel()) for p in prompts)
        rows = torch.full((len(prompts), length), self.vocab, dtype=torch.long)
        for b, ids in enumerate(prompts):
            rows[b, length - ids.numel() :] = ids.reshape(-1).cpu()
        self.hist.fill_(self.vocab)
        self.hist[:, :length].copy_(rows, non_blocking=True)  # pageable source: staged at once, no device sync

    def first_token(self, logits: Tensor, length: int) -> Tensor:
        """The token the prefill's logits [B, V] choose, the rule applied over the ``length`` prompt columns."""
        return self._choose(logits, torch.full((1,), length, dtype=torch.long, device=logits.device))

    def _banned(self, hist_len: Tensor) -> Tensor | None:
        """bool [B, V]: the tokens the no-repeat rule bans given ``hist_len`` [1] columns; None without a rule."""
        if self.hist is None:
            return None
        return self._ban(self.hist, hist_len.clamp(max=self.hist.shape[1]))

    def _choose(self, logits: Tensor, hist_len: Tensor) -> Tensor:
        """Greedy [B, 1] on the device, first index on ties; banned tokens masked first (as the host loop)."""
        banned = self._banned(hist_len)
        if banned is not None:
            logits = logits.masked_fill(banned, float("-inf"))
        return first_argmax(logits)

    def load(self, first: Tensor, lens: list[int], caps: list[int], eos: int | None) -> None:
        """The state after the prefill: ``first`` [B, 1] (device) recorded and fed; no host sync."""
        length = max(lens)
        meta = torch.tensor([caps, [length - n for n in lens], lens], dtype=torch.long)
        self.meta.copy_(meta, non_blocking=True)  # pageable source: staged at once, no device sync
        self.pos.copy_(self.meta[2])
        self.slot.fill_(length)
        self.eos.fill_(-1 if eos is None else int(eos))
        self.tokens.copy_(first)
        self.out.zero_()
        self.out[:, :1].copy_(first)
        self.n_gen.fill_(1)
        hit = first[:, 0] == self.eos
        self.by_eos.copy_(hit)
        self.done.copy_(hit | (self.n_gen >= self.caps))
        if self.hist is not None:
            self.hist[:, length : length + 1].copy_(first)

    def _advance(self, nxt: Tensor) -> None:
        """Record ``nxt`` (:meth:`_record`), then move the shared cache column and every row's position on,
        clamped to the last column as the batch-1 and continuous steps clamp theirs.  A run's own steps never
        reach the clamp (the cache holds exactly their columns); the capture's second warm-up step does when the
        run has one decode step (its cache has no column ``L + 1``: unclamped, the rotary lookup and the K/V write
        went past the end, a device-side assert on an H100 in round 27)."""
        self._record(nxt)
        if self.hist is not None:  # the fed token is the sequence's next entry (finished rows: ignored)
            col = (self.slot + 1).clamp(max=self.hist.shape[1] - 1).expand(self.batch).unsqueeze(1)
            self.hist.scatter_(1, col, self.tokens)
        last = self.cache.max_len - 1
        self.slot.add_(1).clamp_(max=last)
        self.pos.add_(1).clamp_(max=last)

    # ------------------------------------------------------------------ the step
    def _body(self) -> None:
        first: Tensor | None = None
        if self.skip_keys:  # a finished row sees only the key it writes now (finite, never read back)
            first = torch.where(self.done, self.slot, self.pads)
        shown = self.pads if first is None else first
        mask = decode_key_mask(self.key_pos, shown, self.slot, self.mask_zero, self.mask_neg)
        logits = self._logits(self.slot, self.cache.max_len, mask, key_first=first)
        self._advance(self._choose(logits, self.slot + 1))

    def step(self) -> None:
        """One decode step for every row: a graph replay, or the same ops launched eagerly."""
        if self.graph is not None:
            self.graph.replay()
            return
        with self.base._sdpa_policy():
            self._body()

    def capture(self) -> float:
        """Capture the step as a CUDA graph; host seconds it took (synchronised before and after).

        Two eager warm-up steps on a side stream first (cuBLAS handles, lazy inits, expert stacks); they
        advance the state and write K/V at slots ``L`` and ``L + 1`` (``L`` again when that is past the cache:
        :meth:`_advance` clamps), so the caller reloads the state (the slots are rewritten by the real steps
        before any row reads them).  A capture that raises leaves the
        step un-graphed: the error is kept in ``capture_error`` and warned about.
        """
        dev = self.cache.device
        torch.cuda.synchronize(dev)
        begin = time.perf_counter()
        try:
            self.graph, _ = capture_graph(self._body, dev, self.base._sdpa_policy)
        except RuntimeError as exc:  # an op that cannot be captured: run the same step un-graphed, say why
            self.capture_error = f"{type(exc).__name__}: {exc}"
            self.use_graph = False
            warnings.warn(f"batched decode CUDA graph capture failed, decoding un-graphed ({exc})", stacklevel=3)
        torch.cuda.synchronize(dev)
        return time.perf_counter() - begin
