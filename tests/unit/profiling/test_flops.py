"""Analytic FLOPs (flops.py) against the fixture's parameter counts and against two op counters
(flop_count.py) run on small reference modules built like the real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm_perf_opt.models.deepseek_ocr.config import ClipConfig, DeepseekOCRConfig, LanguageConfig, SamConfig
from llm_perf_opt.profiling import flops as fl
from llm_perf_opt.profiling.flop_count import CountedFlops, count_flop_counter, count_fvcore

REAL = Path(__file__).resolve().parents[2] / "fixtures" / "deepseek_ocr_real"
TINY_JSON = Path(__file__).resolve().parents[3] / "src/llm_perf_opt/models/deepseek_ocr/configs/tiny.json"


@pytest.fixture(scope="module")
def real_cfg() -> DeepseekOCRConfig:
    return DeepseekOCRConfig.from_json(REAL / "config.json")


@pytest.fixture(scope="module")
def tiny_cfg() -> DeepseekOCRConfig:
    return DeepseekOCRConfig.from_json(TINY_JSON)


def both(module: nn.Module, *inputs: torch.Tensor) -> tuple[CountedFlops, CountedFlops]:
    with torch.no_grad():
        return count_fvcore(module, inputs), count_flop_counter(module, *inputs)


# ------------------------------------------------------------------------------------------------
# Primitive formulas
# ------------------------------------------------------------------------------------------------


def test_primitives_count_a_multiply_add_as_two() -> None:
    assert fl.linear_flops(3, 4, 5) == 2 * 3 * 4 * 5
    assert fl.conv2d_flops(1, 3, 8, 3, 3, 10, 10) == 2 * 100 * 8 * 3 * 9
    assert fl.conv_out_size(64, 3, 2, 1) == 32
    assert fl.conv_out_size(40, 3, 2, 1) == 20
    assert fl.attention_flops(5, 7, 2, 4, causal=False) == 2 * 2 * 5 * 7 * (4 + 4)


def test_causal_counts_lower_triangle_including_diagonal() -> None:
    assert fl.causal_pairs(4, 4) == 10  # 1+2+3+4
    assert fl.causal_pairs(1, 9) == 9  # one decode token sees every key
    assert fl.causal_pairs(2, 5) == 4 + 5  # chunked prefill: last two queries of five
    full = fl.attention_flops(4, 4, 1, 8, causal=False)
    assert fl.attention_flops(4, 4, 1, 8, causal=True) == full * 10 // 16
    assert fl.attention_flops(1, 9, 3, 8, causal=True) == fl.attention_flops(1, 9, 3, 8, causal=False)
    with pytest.raises(ValueError):
        fl.causal_pairs(5, 4)


def test_breakdown_total_must_equal_components() -> None:
    with pytest.raises(ValueError):
        fl.FlopsBreakdown(name="x", components_flops={"a": 1}, total_flops=2)
    b = fl.FlopsBreakdown.of("x", {"a": 1, "b": 2}) + fl.FlopsBreakdown.of("x", {"b": 3})
    assert b.components_flops == {"a": 1, "b": 5} and b.total_flops == 6


# ------------------------------------------------------------------------------------------------
# Parameters against the real checkpoint's fixture
# ------------------------------------------------------------------------------------------------


def test_param_counts_match_every_fixture_entry(real_cfg: DeepseekOCRConfig) -> None:
    ref = json.loads((REAL / "param_counts.json").read_text())
    pc = fl.param_counts(real_cfg)
    assert pc.total == ref["total"]
    assert pc.sam_model == ref["sam_model"]
    assert pc.clip == ref["vision_model(clip)"]
    assert pc.projector == ref["projector"]
    assert pc.image_newline_view_separator == ref["image_newline+view_seperator"]
    assert pc.embed_tokens == ref["embed_tokens"]
    assert pc.lm_head == ref["lm_head"]
    assert pc.final_norm == ref["final_norm"]
    assert pc.decoder_layers_total == ref["decoder_layers_total"]
    per = ref["per_layer"]
    assert pc.per_layer_self_attn == per["self_attn"]
    assert pc.per_layer_norms == per["input+post_norms"]
    assert pc.per_layer_dense_mlp == per["dense_mlp(layer0)"]
    assert pc.per_layer_routed_expert == per["routed_expert(one)"]
    assert pc.n_routed_experts == per["n_routed_experts"]
    assert pc.per_layer_shared_experts == per["shared_experts"]
    assert pc.per_layer_gate == per["gate"]


def test_activated_params_per_token(real_cfg: DeepseekOCRConfig) -> None:
    ref = json.loads((REAL / "param_counts.json").read_text())
    expected = ref["activated_per_decode_token(incl_lm_head, excl_embedding_lookup)"]
    assert expected == 574_127_360
    assert fl.activated_params_per_token(real_cfg) == expected


def test_decode_step_flops_are_twice_activated_params_plus_attention(real_cfg: DeepseekOCRConfig) -> None:
    lang = real_cfg.language
    step = fl.decode_step_flops(lang, 1000)
    attn = fl.attention_flops(1, 1000, lang.num_attention_heads, lang.head_dim, causal=True)
    norm_params = (2 * lang.num_hidden_layers + 1) * lang.hidden_size  # weights, but elementwise: no matmul
    matmul_params = fl.activated_params_per_token(real_cfg) - norm_params
    assert step.total_flops == 2 * matmul_params + lang.num_hidden_layers * attn


# ------------------------------------------------------------------------------------------------
# Counters on single ops
# ------------------------------------------------------------------------------------------------


def test_linear_counted_equals_analytic() -> None:
    torch.manual_seed(0)
    fv, fc = both(nn.Linear(16, 24), torch.randn(2, 5, 16))
    assert fv.total_flops == fc.total_flops == fl.linear_flops(10, 16, 24)


def test_conv2d_counted_equals_analytic() -> None:
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
    fv, fc = both(conv, torch.randn(2, 8, 10, 10))
    oh = fl.conv_out_size(10, 3, 2, 1)
    assert fv.total_flops == fc.total_flops == fl.conv2d_flops(2, 8, 12, 3, 3, oh, oh)


class _Sdpa(nn.Module):
    def __init__(self, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


def test_sdpa_counted_equals_analytic_and_is_not_skipped() -> None:
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    fv, fc = both(_Sdpa(), q, k, v)
    expected = fl.attention_flops(7, 11, 3, 8, causal=False, batch=2)
    assert fv.total_flops == fc.total_flops == expected
    # Without our handles both counters would report 0 here (fvcore: unsupported op; FlopCounterMode:
    # the CPU kernel _scaled_dot_product_flash_attention_for_cpu is not in its registry).
    assert "aten::scaled_dot_product_attention" not in fv.skipped_ops
    assert not any("scaled_dot_product" in op for op in fc.skipped_ops)


def test_causal_sdpa_gap_is_the_masked_upper_triangle() -> None:
    """Documented convention gap: counters count the full L×L grid, analytic only the kept pairs."""
    q = torch.randn(1, 2, 9, 4)
    fv, fc = both(_Sdpa(causal=True), q, q, q)
    full = fl.attention_flops(9, 9, 2, 4, causal=False)
    useful = fl.attention_flops(9, 9, 2, 4, causal=True)
    assert fv.total_flops == fc.total_flops == full
    assert full - useful == 2 * 2 * (9 * 8 // 2) * (4 + 4)


def test_skipped_ops_are_listed_not_silently_dropped() -> None:
    mod = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GELU())
    fv, fc = both(mod, torch.randn(3, 4))
    assert fv.total_flops == fc.total_flops == fl.linear_flops(3, 4, 4)
    assert "aten::layer_norm" in fv.skipped_ops and "aten::gelu" in fv.skipped_ops
    assert any("gelu" in op for op in fc.skipped_ops)
    assert fv.by_module["0"] == fc.by_module["0"] == fl.linear_flops(3, 4, 4)


# ------------------------------------------------------------------------------------------------
# A tiny attention block
# ------------------------------------------------------------------------------------------------


class _AttnBlock(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return x + self.proj(o.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("causal", [False, True])
def test_tiny_attention_block(causal: bool) -> None:
    b, t, d, h = 2, 10, 32, 4
    fv, fc = both(_AttnBlock(d, h, causal), torch.randn(b, t, d))
    linear = fl.linear_flops(b * t, d, 3 * d) + fl.linear_flops(b * t, d, d)
    analytic = linear + fl.attention_flops(t, t, h, d // h, causal=causal, batch=b)
    gap = fl.attention_flops(t, t, h, d // h, causal=False, batch=b) - fl.attention_flops(
        t, t, h, d // h, causal=True, batch=b
    )
    assert fv.total_flops == fc.total_flops == analytic + (gap if causal else 0)
    assert fv.by_module["qkv"] == fc.by_module["qkv"] == fl.linear_flops(b * t, d, 3 * d)


# ------------------------------------------------------------------------------------------------
# Reference SAM / CLIP / decoder built like the real ones (tiny sizes): analytic == counted
# ------------------------------------------------------------------------------------------------


def _rel_pos_table(rel_pos: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
    coords = torch.arange(q_size)[:, None] - torch.arange(k_size)[None, :] + (k_size - 1)
    return rel_pos[coords.long()]


class _SamAttention(nn.Module):
    def __init__(self, dim: int, heads: int, size: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.randn(2 * size - 1, dim // heads))
        self.rel_pos_w = nn.Parameter(torch.randn(2 * size - 1, dim // heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.heads, h * w, -1).unbind(0)
        dim = q.shape[-1]
        r_q = q.reshape(b * self.heads, h, w, dim)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, _rel_pos_table(self.rel_pos_h, h, h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, _rel_pos_table(self.rel_pos_w, w, w))
        bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(b, self.heads, h * w, h * w)
        q, k, v = (t.view(b, self.heads, h * w, dim) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(o.view(b, self.heads, h, w, dim).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


class _SamBlock(nn.Module):
    def __init__(self, sam: SamConfig, window: int, grid: int) -> None:
        super().__init__()
        d = sam.embed_dim
        self.window = window
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _SamAttention(d, sam.num_heads, window if window else grid)
        hidden = int(d * sam.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut, x = x, self.norm1(x)
        b, h, w, c = x.shape
        if self.window:
            ws = self.window
            ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
            x = self.attn(x)
            x = x.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
            x = x[:, :h, :w, :]
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class _LayerNorm2d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + 1e-6)) + self.bias[:, None, None]


class _Sam(nn.Module):
    def __init__(self, sam: SamConfig, grid: int) -> None:
        super().__init__()
        d, oc = sam.embed_dim, sam.out_chans
        self.patch_embed = nn.Conv2d(3, d, sam.patch_size, sam.patch_size)
        self.blocks = nn.ModuleList(
            _SamBlock(sam, 0 if i in sam.global_attn_indexes else sam.window_size, grid) for i in range(sam.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(d, oc, 1, bias=False), _LayerNorm2d(oc), nn.Conv2d(oc, oc, 3, padding=1, bias=False)
        )
        c1, c2 = sam.downsample_channels
        self.net_2 = nn.Conv2d(oc, c1, 3, 2, 1, bias=False)
        self.net_3 = nn.Conv2d(c1, c2, 3, 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = blk(x)
        return self.net_3(self.net_2(self.neck(x.permute(0, 3, 1, 2))))


@pytest.mark.parametrize(("size", "batch"), [(128, 2), (256, 1)])
def test_sam_analytic_equals_counted(tiny_cfg: DeepseekOCRConfig, size: int, batch: int) -> None:
    """Windowed blocks with padding (8x8 and 16x16 grids, window 6), global block, neck, convs."""
    sam = tiny_cfg.sam
    torch.manual_seed(0)
    model = _Sam(sam, size // sam.patch_size).eval()
    fv, fc = both(model, torch.randn(batch, 3, size, size))
    analytic = fl.sam_flops(sam, size, size, batch)
    assert fv.total_flops == fc.total_flops == analytic.total_flops
    assert fc.by_module["net_2"] == analytic.components_flops["net_2"]
    assert fc.by_module["patch_embed"] == analytic.components_flops["patch_embed"]
    assert model(torch.randn(1, 3, size, size)).shape[-1] == fl.sam_output_grid(sam, size, size)[1]


class _ClipLayer(nn.Module):
    def __init__(self, clip: ClipConfig) -> None:
        super().__init__()
        d = clip.hidden_size
        self.heads = clip.num_attention_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, clip.ffn_hidden_size), nn.Linear(clip.ffn_hidden_size, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv_proj(self.ln1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        h = self.fc1(self.ln2(x))
        return x + self.fc2(h * torch.sigmoid(1.702 * h))


class _Clip(nn.Module):
    def __init__(self, clip: ClipConfig) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(clip.hidden_size))
        self.pre = nn.LayerNorm(clip.hidden_size)
        self.layers = nn.ModuleList(_ClipLayer(clip) for _ in range(clip.num_layers))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.flatten(2).transpose(1, 2)
        x = self.pre(torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1))
        for layer in self.layers:
            x = layer(x)
        return x


def test_clip_analytic_equals_counted(tiny_cfg: DeepseekOCRConfig) -> None:
    clip = tiny_cfg.clip
    feats = torch.randn(3, clip.hidden_size, 4, 4)
    fv, fc = both(_Clip(clip).eval(), feats)
    assert fv.total_flops == fc.total_flops == fl.clip_flops(clip, 4, 4, batch=3).total_flops


class _Mlp(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _DecoderLayer(nn.Module):
    def __init__(self, lang: LanguageConfig, moe: bool) -> None:
        super().__init__()
        hid, hd = lang.hidden_size, lang.head_dim
        self.lang, self.moe = lang, moe
        self.q_proj = nn.Linear(hid, lang.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(hid, lang.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(hid, lang.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(lang.num_attention_heads * hd, hid, bias=False)
        if moe:
            self.gate = nn.Linear(hid, lang.n_routed_experts, bias=False)
            self.experts = nn.ModuleList(_Mlp(hid, lang.moe_intermediate_size) for _ in range(lang.n_routed_experts))
            self.shared_experts = _Mlp(hid, lang.moe_intermediate_size * lang.n_shared_experts)
        else:
            self.mlp = _Mlp(hid, lang.intermediate_size)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, hid = x.shape
        heads, hd = self.lang.num_attention_heads, self.lang.head_dim
        q = self.q_proj(x).view(b, t, heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, heads, hd).transpose(1, 2)
        kv = torch.stack([k, v]) if past is None else torch.cat([past, torch.stack([k, v])], dim=3)
        o = F.scaled_dot_product_attention(q, kv[0], kv[1], is_causal=past is None)
        x = x + self.o_proj(o.transpose(1, 2).reshape(b, t, hid))
        if not self.moe:
            return x + self.mlp(x), kv
        flat = x.view(-1, hid)
        weights, idx = torch.softmax(self.gate(flat), dim=-1).topk(self.lang.num_experts_per_tok, dim=-1)
        routed = torch.zeros_like(flat)
        for e in idx.unique().tolist():  # HF-style dispatch: each expert runs on its tokens only
            rows, slot = (idx == e).nonzero(as_tuple=True)
            routed.index_add_(0, rows, self.experts[e](flat[rows]) * weights[rows, slot, None])
        return x + routed.view(b, t, hid) + self.shared_experts(x), kv


class _Decoder(nn.Module):
    def __init__(self, lang: LanguageConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_DecoderLayer(lang, lang.is_moe_layer(i)) for i in range(lang.num_hidden_layers))
        self.lm_head = nn.Linear(lang.hidden_size, lang.vocab_size, bias=False)

    def forward(self, x: torch.Tensor, past: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list]:
        cache = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, None if past is None else past[i])
            cache.append(kv)
        return self.lm_head(x[:, -1:]), cache


def test_decoder_prefill_and_decode_step_equal_counted(tiny_cfg: DeepseekOCRConfig) -> None:
    lang = tiny_cfg.language
    torch.manual_seed(0)
    dec = _Decoder(lang).eval()
    prompt = 13
    x = torch.randn(1, prompt, lang.hidden_size)
    with torch.no_grad():
        fc = count_flop_counter(dec, x)
        _, cache = dec(x)
        step = count_flop_counter(dec, torch.randn(1, 1, lang.hidden_size), cache)
    analytic = fl.prefill_flops(lang, prompt, lm_head_positions=1)
    hd, heads = lang.head_dim, lang.num_attention_heads
    gap = lang.num_hidden_layers * (
        fl.attention_flops(prompt, prompt, heads, hd, causal=False)
        - fl.attention_flops(prompt, prompt, heads, hd, True)
    )
    assert fc.total_flops == analytic.total_flops + gap  # counters count the causal square in full
    # One decode token attends over every cached key: no causal gap, exact match.
    assert step.total_flops == fl.decode_step_flops(lang, prompt + 1).total_flops


def test_decode_flops_sum_over_steps(real_cfg: DeepseekOCRConfig) -> None:
    lang = real_cfg.language
    total = fl.decode_flops(lang, 913, 256)
    by_step = sum(fl.decode_step_flops(lang, 913 + i).total_flops for i in range(1, 256))
    assert total.total_flops == by_step
    assert fl.decode_flops(lang, 913, 1).total_flops == 0
    assert fl.decode_flops(lang, 913, 2).total_flops == fl.decode_step_flops(lang, 914).total_flops


def test_decode_bytes(real_cfg: DeepseekOCRConfig) -> None:
    lang = real_cfg.language
    step = fl.decode_bytes_per_step(real_cfg, 1000, dtype_bytes=2)
    weights = sum(v for k, v in step.components_bytes.items() if k.startswith("weights."))
    assert weights == 2 * (fl.activated_params_per_token(real_cfg) + lang.hidden_size)  # + embedding row
    assert step.components_bytes["kv.read"] == 2 * 12 * 10 * 128 * 1000 * 2
    assert step.components_bytes["kv.write"] == 2 * 12 * 10 * 128 * 2
    assert any("assumed top_k" in n for n in step.notes)
    measured = fl.decode_bytes_per_step(real_cfg, 1000, 2, experts_hit_per_layer=[0] + [3] * 11)
    expert_bytes = 3 * lang.hidden_size * lang.moe_intermediate_size * 2
    assert step.total_bytes - measured.total_bytes == 11 * 3 * expert_bytes
    assert measured.notes == ("routed experts hit: measured",)
    with pytest.raises(ValueError):
        fl.decode_bytes_per_step(real_cfg, 1000, 2, experts_hit_per_layer=[6] * 5)
    with pytest.raises(ValueError, match="page-level union"):  # 40 distinct experts can't be one batch-1 step
        fl.decode_bytes_per_step(real_cfg, 1000, 2, experts_hit_per_layer=[40] * 11)
    batched = fl.decode_bytes_per_step(real_cfg, 1000, 2, batch=4)
    assert batched.components_bytes["kv.read"] == 4 * step.components_bytes["kv.read"]
    assert batched.components_bytes["weights.lm_head"] == step.components_bytes["weights.lm_head"]
    assert batched.components_bytes["weights.moe.routed"] == 11 * 24 * expert_bytes
    run = fl.decode_bytes(real_cfg, 913, 256, 2)
    assert run.total_bytes == sum(fl.decode_bytes_per_step(real_cfg, 913 + i, 2).total_bytes for i in range(1, 256))


def test_batched_decode_bytes_by_hand(real_cfg: DeepseekOCRConfig) -> None:
    """10 steps, 40 rows computed, 12,345 keys attended; the routed experts counted in 6 steps (20 per MoE layer
    each), the other 4 taken as top_k = 6 per MoE layer.  Real sizes: 12 layers (11 MoE) of 10 K/V heads x 128,
    experts of 3 x 1280 x 896, bf16."""
    lang = real_cfg.language
    kv_token = 2 * 12 * 10 * 128 * 2  # K and V of one position over every layer
    expert = 3 * 1280 * 896 * 2
    # every other weight a step reads once: attention 12 x 1280 x 128 x (2 x 10 + 2 x 10), norms 12 x 2 x 1280 + 1280,
    # the dense MLP 3 x 1280 x 6848, gates 11 x 64 x 1280, shared experts 11 x 2 x 3 x 1280 x 896, lm_head 129280 x 1280
    non_routed = 2 * (78_643_200 + 32_000 + 26_296_320 + 901_120 + 75_694_080 + 165_478_400)
    assert non_routed == 2 * fl.activated_params_per_token(real_cfg) - 11 * 6 * expert  # the batch-1 count agrees
    got = fl.batched_decode_bytes(lang, 10, 40, 12_345, 2, experts_read=6 * 11 * 20, counted_steps=6)
    c = got.components_bytes
    assert c["weights.moe.routed"] == (6 * 11 * 20 + 4 * 11 * 6) * expert
    assert sum(v for k, v in c.items() if k.startswith("weights.") and k != "weights.moe.routed") == (
        10 * non_routed + 40 * 1280 * 2  # + one embedding row per row
    )
    assert c["kv.read"] == 12_345 * kv_token and c["kv.write"] == 40 * kv_token
    assert got.notes == (
        "routed experts read: counted on the device in 6 of 10 steps; the other 4 taken as top_k=6 per MoE "
        "layer, the fewest a row picks (a lower bound)",
    )
    every = fl.batched_decode_bytes(lang, 10, 40, 12_345, 2, experts_read=10 * 11 * 20, counted_steps=10)
    assert every.total_bytes - got.total_bytes == 4 * 11 * (20 - 6) * expert
    assert every.notes == ("routed experts read: counted on the device in every step",)
    # one row, one step, the experts not counted: the batch-1 step at the same context
    one = fl.batched_decode_bytes(lang, 1, 1, 1000, 2)
    assert one.total_bytes == fl.decode_bytes_per_step(real_cfg, 1000, 2).total_bytes
    with pytest.raises(ValueError, match="counted steps need a count"):
        fl.batched_decode_bytes(lang, 10, 40, 100, 2, counted_steps=3)
    with pytest.raises(ValueError, match="at most all of them"):
        fl.batched_decode_bytes(lang, 10, 40, 100, 2, experts_read=5, counted_steps=11)


# ------------------------------------------------------------------------------------------------
# Full-size sanity: the real config on the default Gundam page (1224x1584 -> 6 crops + global)
# ------------------------------------------------------------------------------------------------


def test_full_size_gundam_page(real_cfg: DeepseekOCRConfig) -> None:
    tokens = json.loads((REAL / "image_tokens.json").read_text())
    page = tokens["gundam(default: base 1024, tiles 640, crop)"]["1224x1584"]
    assert page["n_crops"] == 6 and page["image_tokens"] == 903
    prompt_len = 1 + page["image_tokens"] + 9
    assert prompt_len == 913

    views = fl.gundam_views(real_cfg, page["n_crops"])
    assert views == ((6, 640, 640), (1, 1024, 1024))
    # Image tokens from the SAM/CLIP grids: global (16+1)*16 + 1 separator, crops (10*2+1)*(10*3).
    g = fl.sam_output_grid(real_cfg.sam, 1024, 1024)
    c = fl.sam_output_grid(real_cfg.sam, 640, 640)
    assert g == (16, 16) and c == (10, 10)
    assert (g[1] + 1) * g[0] + 1 + (c[1] * page["grid_w"] + 1) * (c[0] * page["grid_h"]) == 903

    sam_global = fl.sam_flops(real_cfg.sam, 1024, 1024)
    assert 5e11 < sam_global.total_flops < 2e12  # ~0.98 TFLOPs: "hundreds of GFLOPs" per 1024² view
    assert sam_global.components_flops["mlp"] > sam_global.components_flops["global_attn.core"]

    pf = fl.page_flops(real_cfg, views, prompt_len, n_generated=256)
    for part in (pf.sam, pf.clip, pf.projector, pf.prefill_lm, pf.decode):
        assert part.total_flops == sum(part.components_flops.values())
    st = pf.stages()
    assert st["vision"] == st["sam"] + st["clip"] + st["projector"]
    assert st["prefill"] == st["vision"] + st["prefill_lm"]
    assert st["total"] == st["prefill"] + st["decode"]
    assert 2e12 < st["sam"] < 4e12
    assert 3e11 < st["clip"] < 8e11
    assert st["projector"] == fl.linear_flops(6 * 100 + 256, 2048, 1280)
    # LM prefill ≈ 2 · activated params (without lm_head) · tokens + attention.
    body = 2 * (fl.activated_params_per_token(real_cfg) - fl.param_counts(real_cfg).lm_head) * prompt_len
    assert body < st["prefill_lm"] < 1.1 * body
    # Decode: 255 steps of ≈ 2 · 574M FLOPs plus attention over ~1k keys.
    assert 255 * 2 * 574_127_360 < st["decode"] < 255 * 2 * 574_127_360 * 1.1


def test_stage_min_bytes_lower_bounds(real_cfg: DeepseekOCRConfig) -> None:
    from llm_perf_opt.profiling.flops import kv_cache_bytes, param_counts, stage_min_bytes

    views = [(6, 640, 640), (1, 1024, 1024)]
    b = stage_min_bytes(real_cfg, views, prompt_len=913, dtype_bytes=2)
    pc = param_counts(real_cfg)
    # every stage reads its weights at least once, plus its inputs and outputs
    assert b["sam"] > 2 * pc.sam_model and b["clip"] > 2 * pc.clip and b["projector"] > 2 * pc.projector
    assert b["vision"] == b["sam"] + b["clip"] + b["projector"]
    # 913 tokens × top-6 hit every one of the 64 experts: the whole decoder is read, plus embeddings and K/V
    lang = real_cfg.language
    weights = 2 * (pc.decoder_layers_total + pc.final_norm + pc.lm_head)
    assert b["prefill_lm"] == weights + 913 * lang.hidden_size * 2 + kv_cache_bytes(lang, 913, 2)
    assert b["prefill"] == b["vision"] + b["prefill_lm"]
    # SAM is compute-bound on an H100 (ridge ≈ 295 FLOP/byte): its FLOP/byte upper bound is far above that
    sam_flops = 2_930_630_000_000
    assert sam_flops / b["sam"] > 295
