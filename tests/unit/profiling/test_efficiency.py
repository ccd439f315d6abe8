"""profiling/efficiency.py: MFU/MBU, energy and routing as functions of records (hand-computed oracles)."""

from __future__ import annotations

import pytest

from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig
from llm_perf_opt.profiling import efficiency as E
from llm_perf_opt.profiling import flops as F
from llm_perf_opt.profiling.nvml import PowerSummary
from llm_perf_opt.results.types import BatchRecord, HardwareInfo, PageRecord, Unavailable
from tests.conftest import TINY

VIEWS = [(1, 64, 64)]


@pytest.fixture(scope="module")
def tiny_cfg() -> DeepseekOCRConfig:
    return DeepseekOCRConfig.from_json(TINY / "config.json")


def _page(page_id: str, decode_ms: float, generated: int, prompt: int = 30, energy_j: float | None = None):
    return PageRecord(
        page_id=page_id,
        repeat=0,
        status="ok",
        prompt_tokens=prompt,
        generated_tokens=generated,
        vision_views=list(VIEWS),
        sam_ms=1.0,
        clip_ms=1.0,
        projector_ms=0.5,
        vision_ms=3.0,
        prefill_ms=5.0,
        decode_ms=decode_ms,
        energy_j=energy_j,
    )


def _hardware(peak_flops: float | None, peak_bw: float | None) -> HardwareInfo:
    return HardwareInfo("cuda:0", "GPU X", None, None, "t", "c", peak_flops, "sheet", peak_bw, "sheet")


def test_decode_efficiency_is_sum_over_sum_not_mean_of_ratios(tiny_cfg: DeepseekOCRConfig) -> None:
    a, b = _page("a", decode_ms=10.0, generated=5), _page("b", decode_ms=30.0, generated=9)
    section = E.compute_efficiency(tiny_cfg, [a, b], _hardware(1e12, 1e11), dtype_bytes=2)
    decode = next(e for e in section.efficiency if e.stage == "decode")
    fa = F.page_flops(tiny_cfg, VIEWS, 30, 5).stages()["decode"]
    fb = F.page_flops(tiny_cfg, VIEWS, 30, 9).stages()["decode"]
    assert decode.achieved_flops_per_s == pytest.approx((fa + fb) / 0.040)  # Σ FLOPs ÷ Σ seconds
    assert decode.achieved_flops_per_s != pytest.approx((fa / 0.010 + fb / 0.030) / 2)
    assert decode.mfu == pytest.approx((fa + fb) / 0.040 / 1e12)
    assert decode.flops == pytest.approx((fa + fb) / 2) and decode.seconds == pytest.approx(0.020)
    db = F.decode_bytes(tiny_cfg, 30, 5, 2).total_bytes + F.decode_bytes(tiny_cfg, 30, 9, 2).total_bytes
    assert decode.mbu == pytest.approx(db / 0.040 / 1e11)
    assert [f.stage for f in section.flops] == ["sam", "clip", "projector", "prefill_lm", "decode"]


def test_no_peak_means_mfu_absent_with_the_sources_reason(tiny_cfg: DeepseekOCRConfig) -> None:
    hw = HardwareInfo("cpu", None, None, None, "t", "c", None, "no sourced peak for CPUs", None, "no bw for CPUs")
    section = E.compute_efficiency(tiny_cfg, [_page("a", 10.0, 5)], hw, dtype_bytes=4)
    assert all(e.mfu is None and e.mbu is None for e in section.efficiency)
    reasons = {u.metric: u.reason for u in section.unavailable}
    assert reasons["mfu"] == "no sourced peak for CPUs" and reasons["mbu"] == "no bw for CPUs"
    assert "peak_mem_allocated_bytes" in reasons  # no page has the CUDA allocator's peak


def test_a_single_token_page_has_no_decode_figure(tiny_cfg: DeepseekOCRConfig) -> None:
    section = E.compute_efficiency(tiny_cfg, [_page("a", 10.0, generated=1)], _hardware(1e12, 1e11), 2)
    assert "decode" not in {e.stage for e in section.efficiency}
    assert any(u.metric == "mfu.decode" for u in section.unavailable)


def test_energy_totals_and_power_aggregates() -> None:
    pages = [_page("a", 10.0, 10, energy_j=2.0), _page("b", 10.0, 30, energy_j=4.0), _page("c", 10.0, 7)]
    power = PowerSummary(3, 250.0, 300.0, 1800.0, 1700, 2600.0, 71, ("sw_power_cap",))
    out = E.energy_summary(pages, power, None)
    assert out.energy["energy_total_j"] == 6.0
    assert out.energy["energy_per_page_mean_j"] == 3.0
    assert out.energy["energy_per_output_token_j"] == pytest.approx(6.0 / 40)  # page c has no reading
    assert out.energy["max_power_w"] == 300.0 and out.energy["min_sm_clock_mhz"] == 1700.0
    assert out.notes == ["GPU clock throttle reasons seen: sw_power_cap"] and out.unavailable == []


def test_energy_absent_with_the_samplers_reason() -> None:
    out = E.energy_summary([_page("a", 10.0, 5)], None, "CPU run: NVML measures NVIDIA GPUs only")
    assert out.energy == {}
    assert [(u.metric, u.reason) for u in out.unavailable] == [("energy", "CPU run: NVML measures NVIDIA GPUs only")]


def test_routing_sums_pages_per_layer() -> None:
    a, b = _page("a", 10.0, generated=3, prompt=10), _page("b", 10.0, generated=1, prompt=6)
    out = E.routing_summary([(a, {1: [3, 0, 1, 0]}), (b, {1: [1, 0, 3, 0]})], top_k=2)
    assert out["pages"] == 2 and out["top_k"] == 2
    assert out["tokens"] == (10 + 2) + (6 + 0)  # prompt + decode steps (generated - 1) per page
    layer = out["layers"]["1"]
    assert layer["tokens_per_expert"] == [4, 0, 4, 0]
    assert layer["experts_hit"] == 2 and layer["max_tokens"] == 4
    assert layer["mean_tokens"] == 2.0 and layer["imbalance"] == 2.0
    assert E.routing_summary([], top_k=2) == {}


def test_one_token_pages_keep_a_model_level_mfu_and_say_why_decode_has_none(tiny_cfg: DeepseekOCRConfig) -> None:
    """infer.max_new_tokens=1: no decode step, yet the model-level figure is the prefill's work over its time
    (issue 14: 'mfu.total: no page with a positive time' was wrong)."""
    pages = [_page("a", decode_ms=None, generated=1), _page("b", decode_ms=None, generated=1)]  # type: ignore[arg-type]
    section = E.compute_efficiency(tiny_cfg, pages, _hardware(1e12, 1e11), dtype_bytes=2)
    total = next(e for e in section.efficiency if e.stage == "total")
    prefill = F.page_flops(tiny_cfg, VIEWS, 30, 1).stages()["prefill"]
    assert total.achieved_flops_per_s == pytest.approx(2 * prefill / 0.010)
    reasons = {u.metric: u.reason for u in section.unavailable}
    assert "mfu.total" not in reasons
    assert "no page decoded a second token" in reasons["mfu.decode"]


def test_context_len_mode_max_counts_every_step_at_the_cap(tiny_cfg: DeepseekOCRConfig) -> None:
    page = _page("a", decode_ms=10.0, generated=5)
    auto = E.compute_efficiency(tiny_cfg, [page], _hardware(1e12, 1e11), dtype_bytes=2)
    mx = E.compute_efficiency(tiny_cfg, [page], _hardware(1e12, 1e11), dtype_bytes=2, context=("max", 64, None))
    dec = {s.stage: s for s in mx.efficiency}["decode"]
    assert dec.flops == pytest.approx(4 * F.decode_step_flops(tiny_cfg.language, 30 + 64).total_flops)
    assert dec.flops > {s.stage: s for s in auto.efficiency}["decode"].flops


def _batch(ms: float, steps: int, rows: int, keys: int | None, read: list[float] | None = None, counted: int = 0):
    return BatchRecord(0, ["a", "b"], 2, 30, 20, 1.0, 2.0, ms, None, None, [], decode_steps=steps, row_steps=rows,
                       key_steps=keys, routed_experts_read=read, grouped_steps=counted or None)  # fmt: skip


def test_batched_decode_traffic_by_hand(tiny_cfg: DeepseekOCRConfig) -> None:
    """Two records: 4 steps of 2 rows over 150 keys in 8 ms with every step's experts counted (per MoE layer 3 and
    5, mean 4), and 2 steps of 2 rows over 70 keys in 2 ms with none counted: 10 ms for the bytes of both."""
    lang = tiny_cfg.language
    read = [3.0, 5.0]  # per MoE layer, the mean over the 4 counted steps
    batches = [_batch(8.0, 4, 8, 150, read, 4), _batch(2.0, 2, 4, 70)]
    t = E.batched_decode_traffic(tiny_cfg, batches, 2, _hardware(1e12, 1e11))
    assert not isinstance(t, Unavailable)
    # by hand, tiny sizes (hidden 64, 3 layers of 4 heads x 16 (1 dense, 2 MoE), dense MLP 128, experts 32 wide,
    # 8 routed + 2 shared, top_k 3, vocab 512), bf16.  Every step: attention 3 x 64 x 16 x 16 + norms 3 x 2 x 64 + 64
    # + dense MLP 3 x 64 x 128 + gates 2 x 8 x 64 + shared 2 x 2 x 3 x 64 x 32 + lm_head 512 x 64 = 132,544 weights.
    # Routed experts (3 x 64 x 32 each): 4 steps x (3 + 5) counted + 2 steps x 2 layers x 3 = 44.  Per row: an
    # embedding row (64); K/V 2 x 3 x 4 x 16 per position, read over 150 + 70 keys, written for 8 + 4 rows
    assert [lang.is_moe_layer(i) for i in range(3)] == [False, True, True]
    weights = 6 * 132_544 + 44 * 6_144 + 12 * 64
    assert t.bytes_moved == 2 * weights + 2 * 384 * (150 + 70 + 8 + 4) == 2_310_912
    assert t.seconds == pytest.approx(0.010) and t.bytes_per_s == pytest.approx(t.bytes_moved / 0.010)
    assert t.mbu == pytest.approx(t.bytes_moved / 0.010 / 1e11) and t.mbu_unavailable is None
    assert t.lower_bound and "counted on the device in 4 of 6 steps; the other 2 taken as top_k" in t.note
    kv = 2 * lang.num_hidden_layers * lang.num_key_value_heads * lang.head_dim * 2  # one position, bf16
    assert t.kv_bytes == (150 + 70 + 8 + 4) * kv and t.weights_bytes == t.bytes_moved - t.kv_bytes
    # no peak bandwidth: the bytes and the rate stay, the MBU is absent with the source's reason
    hw = HardwareInfo("cpu", None, None, None, "t", "c", None, "none", None, "no bw for CPUs")
    cpu = E.batched_decode_traffic(tiny_cfg, batches, 2, hw)
    assert not isinstance(cpu, Unavailable)
    assert cpu.mbu is None and cpu.mbu_unavailable == "no bw for CPUs" and cpu.bytes_moved == t.bytes_moved
    # a record written before the keys were counted: no figure, and why
    old = E.batched_decode_traffic(tiny_cfg, [*batches, _batch(1.0, 1, 2, None)], 2, _hardware(1e12, 1e11))
    assert isinstance(old, Unavailable) and "1 of 3 batched record(s)" in old.reason
    odd = E.batched_decode_traffic(tiny_cfg, [_batch(8.0, 4, 8, 150, read, 5)], 2, _hardware(1e12, 1e11))
    assert isinstance(odd, Unavailable) and "more steps than they ran (5 of 4)" in odd.reason  # never a raise
    none = E.batched_decode_traffic(tiny_cfg, [_batch(0.0, 0, 0, 0)], 2, _hardware(1e12, 1e11))
    assert isinstance(none, Unavailable) and "no decode step" in none.reason
