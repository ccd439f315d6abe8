"""Value objects for everything a run measures.  metrics.json is these objects, serialised by one
cattrs converter (results/serialize.py); report.md and operators.md are rendered from them.

Units are in the field names.  ``None`` means "not measured"; the reason is in ``RunSummary.unavailable``
(never a silent 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import attrs

# 1.1: Stats gains the median interval and outliers; quality, runaway pages, per-page repetition loops, batch
# preprocessing time (all optional: 1.0 files still read).  1.3: BatchRecord.graph_capture_error (optional).
# 1.4: KernelAttribution.stream_overlap_ms (optional: kernels then count from the end of the one before them).
# 1.5: BatchRecord.graph_captures (optional: how many graphs ``graph_capture_ms`` captured) and refill_prefill.
# 1.6: HostLoad.run_queue_mean / run_queue_max / run_queue_updates / load_cpus (optional: the run queue in the run).
# 1.7: BatchRecord.routed_experts_read / grouped_steps / routed_experts, BatchedPhase.routed_experts_read (optional:
# the routed experts the batched decode steps read, counted on the device).
# 1.8: BatchRecord.key_steps, BatchedPhase.decode_traffic (optional: the batched decode steps' bytes and bandwidth).
# 1.9: BatchRecord.finished_rows_attend (optional: whether a static batch's finished rows attended their whole context);
# the batched steps of 8 rows or fewer count the routed experts they read too (``grouped_steps``: every Triton step).
# 1.10: BatchRecord.finished_rows_attend set for continuous runs too (a row ended by eos, until its slot's refill);
# their key_steps count such a row's last column alone with infer.continuous_skip_keys (on by default).
# 1.11: BatchedPhase.steady_unavailable (optional: why a continuous run has no steady-state rates, e.g. every page
# started in the first fill, so every decode step was in the drain).
SCHEMA_VERSION = "1.11"

# Name of the synthetic operator row that holds device time the profiler could not attribute to any operator
# (CUDA-graph replays, kernels launched outside torch ops): the profiler writes it, the report explains it.
UNATTRIBUTED = "[device work not under any operator]"

PageStatus = Literal["ok", "failed"]
RunStatus = Literal["running", "complete", "partial", "failed"]


@attrs.frozen
class Stats:
    """Distribution of one metric across pages × repeats.

    ``median_ci95_*``: order-statistic 95 % interval of the median (None when n < 6: no pair of order
    statistics reaches 95 %).  ``ci95_*``: Student-t interval of the mean, None when not meaningful
    (``mean_ci_reason``).  ``n_outliers``: samples above 3× the median.
    """

    n: int
    mean: float
    std: float
    min: float
    max: float
    p50: float
    p90: float
    p99: float
    ci95_low: float | None
    ci95_high: float | None
    median_ci95_low: float | None = None
    median_ci95_high: float | None = None
    n_outliers: int = 0  # samples above 3× the median
    mean_ci_reason: str | None = None

    @property
    def ci95_half_width(self) -> float | None:
        if self.ci95_low is None or self.ci95_high is None:
            return None
        return (self.ci95_high - self.ci95_low) / 2

    @property
    def cv(self) -> float | None:
        """Coefficient of variation (std / mean); None when the mean is not positive or n < 2."""
        if self.n < 2 or self.mean <= 0:
            return None
        return self.std / self.mean


@attrs.frozen
class Unavailable:
    """A figure that could not be computed, and why."""

    metric: str
    reason: str


@attrs.frozen
class PageRecord:
    """One page in one timed repeat (or the failure that stopped it)."""

    page_id: str
    repeat: int
    status: PageStatus
    path: str | None = None
    size_px: tuple[int, int] | None = None
    crop_grid: tuple[int, int] | None = None
    n_tiles: int | None = None
    prompt_tokens: int | None = None
    image_tokens: int | None = None
    generated_tokens: int | None = None
    hit_token_cap: bool | None = None
    stopped_by_eos: bool | None = None
    # Period (tokens) of the repetition loop the output ends in (profiling/noise.py), None when it does not.
    repetition_period: int | None = None
    # ended at the page's target output length, as dummy weights never end at eos ("simulated eos")
    simulated_eos: bool = False
    preprocess_ms: float | None = None
    sam_ms: float | None = None
    clip_ms: float | None = None
    projector_ms: float | None = None
    vision_ms: float | None = None
    prefill_ms: float | None = None
    decode_ms: float | None = None
    e2e_ms: float | None = None
    tpot_ms: float | None = None
    decode_tok_s: float | None = None
    decode_step_p50_ms: float | None = None
    decode_step_p90_ms: float | None = None
    decode_step_p99_ms: float | None = None
    decode_step_ms: list[float] = attrs.field(factory=list)
    peak_mem_allocated_bytes: int | None = None
    peak_mem_reserved_bytes: int | None = None
    peak_rss_bytes: int | None = None
    kv_cache_bytes: int | None = None
    energy_j: float | None = None
    energy_per_token_j: float | None = None
    experts_hit_per_layer: list[int] | None = None
    # (count, height_px, width_px) of each batch of vision inputs: crops, then the global view.
    vision_views: list[tuple[int, int, int]] | None = None
    flags: list[str] = attrs.field(factory=list)
    error: str | None = None
    error_type: str | None = None


@attrs.frozen
class BatchRecord:
    """One batch of the throughput phase (``infer.batch_size`` pages per forward)."""

    repeat: int
    page_ids: list[str]
    batch: int
    padded_prompt_tokens: int
    output_tokens: int
    vision_ms: float
    prefill_ms: float  # vision + batched LM prefill: time to the first token of every sequence
    decode_ms: float
    pages_per_s: float | None
    output_tok_s: float | None
    tpot_ms: list[float]  # per sequence
    # "graph" (CUDA-graph decode step), "static" (the same static step un-graphed) or "host" (host loop:
    # per-sequence no_repeat_ngram sizes or kept logits need each step's logits on the host)
    decode_path: str = "host"
    graph_capture_ms: float = 0.0  # one-time warm-up + capture of the decode graph (not in any stage time)
    graph_capture_error: str | None = None  # why the decode graph's capture failed (the step then ran un-graphed)
    # graphs those ms captured: 1 for a static batch's step; continuous: the step's per (width, key-length bucket)
    # and the per-page refills' prefill graphs per prompt length; None in records written before it was counted
    graph_captures: int | None = None
    idle_steps: int = 0  # steps after every sequence had finished (eos is checked every k steps)
    preprocess_ms: float | None = None  # host preprocessing of the batch's pages (decode + resize + tiling)
    # The same rates with the host preprocessing of the batch added to its time (pages_per_s leaves it out).
    pages_per_s_with_preprocess: float | None = None
    output_tok_s_with_preprocess: float | None = None
    # infer.batch_size as configured: more than ``batch`` when the dataset has fewer pages (the report warns)
    requested_batch: int | None = None
    # per sequence: ended at its page's target length ("simulated eos", dummy weights), not at eos or the cap
    simulated_eos: list[bool] = attrs.field(factory=list)
    # host ms this batch waited for its pages to be prepared (pool behind, or serial preprocessing); None: not measured
    page_wait_ms: float | None = None
    # "static" (one batch of pages until its longest sequence ends) or "continuous" (one record per repeat:
    # ``batch`` sequence slots refilled with the next page as sequences end; ``padded_prompt_tokens`` is then the
    # longest prompt, nothing is padded)
    batching: str = "static"
    # decode tokens (each sequence's first token comes from its prefill) over decode steps × slots: the mean share
    # of the slots doing useful work per step; None without a decode step
    slot_occupancy: float | None = None
    # prefill rounds: 1 for a static batch; the first fill plus every refill for a continuous run
    fills: int = 1
    # decode steps run (idle ones included); None in records written before it was counted
    decode_steps: int | None = None
    # continuous only: the drain, from the step at which the last page started decoding (the source ran dry) to
    # the end: its decode steps, their ms and the tokens they produced (None for static batches and old records)
    drain_steps: int | None = None
    drain_ms: float | None = None
    drain_tokens: int | None = None
    # continuous with infer.refill_vision_ahead: the own time of the vision run ahead of the refills (on CUDA on a
    # second stream, beside the decode steps; what of it held the slots up is in ``vision_ms``, on CPU all of it)
    # and how many pages it covered; None when nothing ran ahead
    vision_ahead_ms: float | None = None
    pages_ahead: int | None = None
    # with infer.refill_prefill_ahead as well: the LM prefill run ahead, its own time and its pages (what of it held
    # the slots up is in ``prefill_ms``, on CPU all of it); None when no prefill ran ahead
    prefill_ahead_ms: float | None = None
    pages_prefilled_ahead: int | None = None
    # continuous with infer.refill_prefill=per_page: the refills' pages prefilled one at a time through the model's
    # per-page prefill (on the fast path graph replays); None when none was
    pages_prefilled_per_page: int | None = None
    # continuous only: how the refills' LM prefill ran, as ``infer.refill_prefill`` resolved for this run ("batched"
    # or "per_page"; auto picks per_page where that prefill is a graph replay); None for static batches, old records
    refill_prefill: str | None = None
    # continuous only: decode steps run on a narrower step than ``batch`` rows (the drain, once at most half the
    # slots held a sequence); None for static batches and old records
    narrowed_steps: int | None = None
    # the fast path's one-time setups (a vision shape compiled / captured, a prefill length captured, from round 32
    # a kernel variant or torch.compile frame compiled outside a capture) inside this
    # record's timed stages, so their time is in them; 0 without the fast path, None in records written before
    timed_setups: int | None = None
    # rows the decode steps computed, summed over the steps (decode_steps × batch for a static batch; a narrowed
    # drain step counts its own width); None in records written before it was counted
    row_steps: int | None = None
    # keys the decode steps attended over: each row's own context (left pads and empty slots left out) summed over
    # rows and steps, for the K/V bytes of the decode traffic; None in records written before it was counted
    key_steps: int | None = None
    # whether a finished row's attention went on attending its whole context (static: to the batch's end, the host
    # loop or infer.static_skip_keys=false; continuous, since 1.10: a row ended by eos until its slot was refilled,
    # infer.continuous_skip_keys=false) or its newest key only; None in older records and continuous runs without eos
    finished_rows_attend: bool | None = None
    # per MoE layer: the mean number of distinct routed experts a decode step read (their weights), counted on the
    # device by the expert kernels over ``grouped_steps`` steps (every Triton step from schema 1.9; before it, the
    # grouped ones only: 9 rows or more), of ``routed_experts`` a layer holds; None where no step counted them (the
    # torch decode step, no Triton) and in older records
    routed_experts_read: list[float] | None = None
    grouped_steps: int | None = None
    routed_experts: int | None = None


@attrs.frozen
class ExpertsRead:
    """The routed experts the batched decode steps read: per MoE layer the mean over ``counted_steps`` (the steps
    the expert kernels counted, of ``decode_steps``), of ``routed_experts`` per layer (None: not known)."""

    per_layer: list[float]
    counted_steps: int
    decode_steps: int
    routed_experts: int | None

    @property
    def mean(self) -> float:
        return sum(self.per_layer) / len(self.per_layer)


def experts_read_of(batches: Sequence[BatchRecord]) -> ExpertsRead | None:
    """The routed experts the batched decode steps read per MoE layer (``BatchRecord.routed_experts_read``),
    weighted by each record's counted steps; None where no record counted them, or where they disagree on the
    number of MoE layers (records of different models)."""
    counted = [b for b in batches if b.routed_experts_read and b.grouped_steps]
    layers = {len(b.routed_experts_read or []) for b in counted}
    if not counted or len(layers) != 1:
        return None
    steps = sum(b.grouped_steps or 0 for b in counted)
    per_layer = [
        sum((b.routed_experts_read or [])[i] * (b.grouped_steps or 0) for b in counted) / steps
        for i in range(layers.pop())
    ]
    return ExpertsRead(
        per_layer=per_layer,
        counted_steps=steps,
        decode_steps=sum(b.decode_steps or 0 for b in batches),
        routed_experts=counted[0].routed_experts,
    )


@attrs.frozen
class DecodeTraffic:
    """The batched decode steps' minimum device-memory traffic (``flops.batched_decode_bytes``: the weights once per
    step with the routed experts counted on the device, each row's K/V) over their device time.

    ``lower_bound``: some steps' routed experts were not counted and were taken as the fewest a row picks, so the
    bytes, the bandwidth and ``mbu`` are lower bounds.  ``mbu`` is None without a peak bandwidth, with the reason
    in ``mbu_unavailable``.  ``note`` says how the experts were counted."""

    bytes_moved: int
    seconds: float
    bytes_per_s: float
    mbu: float | None
    lower_bound: bool
    note: str
    weights_bytes: int  # of ``bytes_moved``: the weights (routed experts included)
    kv_bytes: int  # of ``bytes_moved``: K/V read and written
    mbu_unavailable: str | None = None


@attrs.frozen
class BatchedPhase:
    """The batched phase end to end: host wall time with page preparation included, and where it went.

    ``wall_ms`` is host time from the first page requested to the last batch synchronised, one-time CUDA-graph
    captures left out; ``stage_ms`` the device-clocked vision + prefill + decode of every batch; ``page_wait_ms``
    the host time blocked waiting for prepared pages; ``other_ms`` the rest (host work between stages: token
    read-back, refill bookkeeping; negative when device stages ran while the host waited for pages).
    ``gpu_busy_share`` is ``stage_ms / wall_ms`` on CUDA (an upper bound: a gap inside a stage counts as busy);
    absent on other devices, with the reason in ``gpu_busy_unavailable``.
    """

    batching: str
    slots: int
    batches: int
    pages: int
    output_tokens: int
    wall_ms: float
    stage_ms: float
    page_wait_ms: float
    other_ms: float
    pages_per_s: float | None
    output_tok_s: float | None
    slot_occupancy: float | None
    gpu_busy_share: float | None
    gpu_busy_unavailable: str | None = None
    # continuous batching: the drains of its runs (slots emptying after the last page started) summed, and the
    # rates without them (wall minus drain; every page entered a slot before it): what a run over far more pages
    # approaches.  None for static batches (each batch ends with its longest sequence, an inherent cost of the mode)
    drain_ms: float | None = None
    steady_pages_per_s: float | None = None
    steady_output_tok_s: float | None = None
    # why the steady-state rates are absent where a continuous run has none (every decode step in the drain)
    steady_unavailable: str | None = None
    # the drains' decode steps, and how many of them ran on a narrower step (None where a record lacks them)
    drain_steps: int | None = None
    narrowed_steps: int | None = None
    # decode tokens over the rows the steps computed (``row_steps``): the share of the GPU's decode rows that
    # produced a token.  Above slot_occupancy once the drain narrows (its empty slots are no longer computed)
    row_occupancy: float | None = None
    # the routed experts a decode step read per MoE layer, the mean over layers and counted steps
    # (``RunSummary.experts_read``); None where nothing counted them
    routed_experts_read: float | None = None
    # the decode steps' bytes and achieved bandwidth; None with the reason in ``decode_traffic_unavailable``
    decode_traffic: DecodeTraffic | None = None
    decode_traffic_unavailable: str | None = None

    @property
    def decode_gb_per_s(self) -> float | None:
        """The decode steps' achieved bandwidth, GB/s (a lower bound where ``decode_traffic.lower_bound``)."""
        return None if self.decode_traffic is None else self.decode_traffic.bytes_per_s / 1e9


@attrs.frozen
class Prediction:
    page_id: str
    path: str | None
    text: str
    token_ids: list[int]
    text_is_meaningful: bool


@attrs.frozen
class RunInfo:
    run_id: str
    started_at: str
    finished_at: str | None
    status: RunStatus
    argv: list[str]
    git_commit: str | None
    config: dict[str, Any]
    status_reason: str | None = None


@attrs.frozen
class HardwareInfo:
    device: str
    gpu_name: str | None
    driver: str | None
    cuda: str | None
    torch: str
    cpu: str
    peak_flops_per_s: float | None
    peak_flops_source: str | None
    peak_bw_bytes_per_s: float | None
    peak_bw_source: str | None


@attrs.frozen
class ModelInfo:
    name: str
    backend: str
    weights: str
    dtype: str
    params_total: int
    params_activated_per_token: int | None
    weights_bytes: int
    tokenizer: str
    optimisations: dict[str, bool] = attrs.field(factory=dict)
    # deepseek_ocr (v1) | deepseek_ocr2
    family: str = "deepseek_ocr"
    # record slot -> the model's name of that stage where they differ (v2: {"clip": "encoder"}: the encoder's time
    # is in ``clip_ms``); empty for v1
    stage_names: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class OperatorRow:
    name: str
    calls: int
    self_device_ms: float | None
    total_device_ms: float | None
    self_cpu_ms: float
    total_cpu_ms: float
    pct_of_total: float


@attrs.frozen
class RangeCheck:
    """One named range in the profiler pass: our CUDA-event time vs what the trace saw on the GPU."""

    name: str
    event_ms: float
    gpu_span_ms: float
    kernel_busy_ms: float
    rel_diff: float  # event_ms / gpu_span_ms - 1


@attrs.frozen
class KernelRow:
    """One device kernel (or memcpy/memset) name over the profiler pass, graph replays included."""

    name: str
    calls: int
    device_ms: float
    mean_device_us: float
    pct_of_device: float


@attrs.frozen
class StageDeviceTime:
    """Device time of the kernels launched while the host was inside one stage's range."""

    stage: str
    device_ms: float
    calls: int
    graph_replayed_ms: float  # part of device_ms launched by cudaGraphLaunch
    pct_of_device: float
    top_kernels: list[KernelRow] = attrs.field(factory=list)  # this stage's largest kernels (pct: of the stage)


@attrs.frozen
class KernelAttribution:
    """Every kernel of the pass mapped to its name and to the stage whose host range launched it.

    ``attributed_pct`` is the share of device time that lands in a named stage (the rest was launched outside
    every range of ours, e.g. by the profiler itself or between stages).
    """

    device_total_ms: float
    attributed_pct: float
    graph_launches: int
    n_kernel_names: int
    kernels: list[KernelRow]
    stages: list[StageDeviceTime]
    # device time that overlapped the previous work on the same stream (programmatic dependent launches) and is
    # not counted: each kernel counts from the end of the one before it, so the rows add up to busy time
    stream_overlap_ms: float = 0.0


@attrs.frozen
class ProfileSummary:
    """The single PyTorch-profiler pass (separate from the timed repeats)."""

    page_id: str
    max_new_tokens: int
    sort_key: str
    total_self_ms: float
    operators: list[OperatorRow]
    range_ms: dict[str, float] = attrs.field(factory=dict)  # host wall time of each named range
    trace_file: str | None = None
    range_checks: list[RangeCheck] = attrs.field(factory=list)
    # GPU-timeline span of each named range (CUDA only): per host occurrence the union of its device-side mirrors
    # (one per stream), summed over occurrences
    range_device_ms: dict[str, float] = attrs.field(factory=dict)
    # how long at least one kernel lying wholly inside each range's span was running (CUDA only), per occurrence,
    # summed: busy / span is the range's GPU utilisation
    range_busy_ms: dict[str, float] = attrs.field(factory=dict)
    kernels: KernelAttribution | None = None
    kernels_reason: str | None = None  # why ``kernels`` is absent
    total_note: str | None = None  # when operator rows and the kernels' total disagree, by how much and why


@attrs.frozen
class StageFlops:
    """FLOPs of one stage for the representative page: analytic and counted (2 FLOPs per multiply-add)."""

    stage: str
    analytic_flops: float
    fvcore_flops: float | None = None
    flop_counter_flops: float | None = None
    rel_diff_fvcore: float | None = None
    rel_diff_flop_counter: float | None = None
    flagged: bool = False
    note: str | None = None
    components: dict[str, float] = attrs.field(factory=dict)


@attrs.frozen
class Efficiency:
    """MFU / MBU of one stage: achieved rate over the device peak (None with a reason when unknown)."""

    stage: str
    flops: float
    seconds: float | None
    achieved_flops_per_s: float | None
    mfu: float | None
    bytes_moved: float | None = None
    mbu: float | None = None
    arithmetic_intensity: float | None = None
    reason: str | None = None


@attrs.frozen
class HostLoad:
    """Host conditions sampled during the run (profiling/noise.py); None fields were not readable here."""

    usable_cores: int
    samples: int
    interval_s: float
    load_1m_mean: float | None
    load_1m_max: float | None
    other_cpu_share_mean: float | None  # other processes' busy time ÷ (wall × usable cores)
    other_cpu_share_max: float | None
    note: str | None = None
    # The host's own speed: a fixed CPU workload (``probe_work``) timed in a window when the run starts and one
    # when it ends, in ms (the fastest trial of each).  Other processes' share misses a slower host (a co-tenant
    # VM, lowered clocks); this does not, and ``compare`` sets one run's probe against the other's.
    probe_ms_start: float | None = None
    probe_ms_end: float | None = None
    probe_work: str | None = None
    # The run queue during the run (runnable + uninterruptible threads on the host's CPUs, ours included), backed
    # out of the 1-minute load average at each of its updates (profiling/noise.py ``run_queue_windows``): the mean
    # and max over the windows, None when fewer than 3 updates were seen (``run_queue_updates``, None when no load
    # average was read).  The verdict judges it against ``load_cpus`` (the host's CPUs, which the load average
    # counts), not the load average itself, which mostly repeats the minute before a short run.
    run_queue_mean: float | None = None
    run_queue_max: float | None = None
    run_queue_updates: int | None = None
    load_cpus: int | None = None

    @property
    def probe_ms(self) -> float | None:
        """The run's probe time: the faster of its two windows (a burst of other work can fill one window)."""
        vals = [v for v in (self.probe_ms_start, self.probe_ms_end) if v is not None]
        return min(vals) if vals else None


@attrs.frozen
class MeasurementQuality:
    """Is the run fit for comparison: ``good`` or ``noisy`` with the reasons, and what could not be checked."""

    verdict: Literal["good", "noisy"]
    reasons: list[str] = attrs.field(factory=list)
    not_checked: list[str] = attrs.field(factory=list)
    stage_cv: dict[str, float] = attrs.field(factory=dict)  # median over pages of the CV across repeats
    outlier_share: dict[str, float] = attrs.field(factory=dict)  # share of samples > 3× their page's median
    host: HostLoad | None = None
    gpu_throttle_reasons: list[str] = attrs.field(factory=list)
    cpu_threads: str | None = None  # how many torch threads a CPU run used, and why

    def line(self) -> str:
        text = f"**Measurement quality: {self.verdict}**"
        if self.reasons:
            text += " — " + "; ".join(self.reasons)
        if self.not_checked:
            text += " (not checked: " + "; ".join(self.not_checked) + ")"
        return text


@attrs.frozen
class RunawaySummary:
    """Page runs that hit the token cap or ended in a repetition loop, and what they do to decode throughput."""

    page_runs: int
    hit_token_cap: int
    repetition_loop: int
    runaway: int  # either of the two
    share_of_page_runs: float
    share_of_decode_time: float | None
    decode_tok_s_all: float | None
    decode_tok_s_without_runaway: float | None
    window_tokens: int
    max_period: int


@attrs.frozen
class RunSummary:
    schema_version: str
    run: RunInfo
    hardware: HardwareInfo
    model: ModelInfo
    pages: list[PageRecord]
    aggregates: dict[str, Stats]
    flops: list[StageFlops] = attrs.field(factory=list)
    efficiency: list[Efficiency] = attrs.field(factory=list)
    profile: ProfileSummary | None = None
    energy: dict[str, float] = attrs.field(factory=dict)
    moe_routing: dict[str, Any] = attrs.field(factory=dict)
    batches: list[BatchRecord] = attrs.field(factory=list)
    # Statistics over ``batches`` (pages_per_s, output_tok_s, prefill_ms, vision_ms over batches; tpot_ms over
    # sequences), computed by the runner so the report only formats them.
    batch_aggregates: dict[str, Stats] = attrs.field(factory=dict)
    # the batched phase end to end (wall time with preparation, GPU busy share, slot occupancy); None: no phase
    batched_phase: BatchedPhase | None = None
    unavailable: list[Unavailable] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)
    quality: MeasurementQuality | None = None
    runaway: RunawaySummary | None = None

    @property
    def ok_pages(self) -> list[PageRecord]:
        return [p for p in self.pages if p.status == "ok"]

    @property
    def failed_pages(self) -> list[PageRecord]:
        return [p for p in self.pages if p.status == "failed"]

    @property
    def experts_read(self) -> ExpertsRead | None:
        """The routed experts the batched decode steps read (:func:`experts_read_of` over ``batches``)."""
        return experts_read_of(self.batches)

    @property
    def refill_modes(self) -> list[str]:
        """How the continuous records' refills were prefilled (``BatchRecord.refill_prefill``), sorted; empty for
        static batches and records from before it was kept."""
        return sorted({b.refill_prefill for b in self.batches if b.refill_prefill})
