"""``batch_result.routed_experts_read``: two snapshots of the grouped expert kernels' device counters ([experts read
summed over calls, calls] per MoE layer) turned into each layer's mean per decode step, by hand."""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.models.deepseek_ocr.batch_result import routed_experts_read


def test_the_mean_per_layer_is_the_difference_over_the_calls_between_the_snapshots() -> None:
    before = torch.tensor([[7, 2], [9, 2]])  # earlier runs' counts stay out of this one's
    after = torch.tensor([[7 + 12, 2 + 3], [9 + 30, 2 + 3]])
    assert routed_experts_read(before, after) == ([4.0, 10.0], 3)


def test_no_counters_or_no_grouped_call_gives_no_figure() -> None:
    same = torch.tensor([[5, 1], [6, 1]])
    assert routed_experts_read(None, None) == (None, 0)
    assert routed_experts_read(same, same.clone()) == (None, 0)


def test_layers_with_different_call_counts_give_no_figure_and_a_warning() -> None:
    before = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.warns(UserWarning, match="grouped expert calls differ"):
        assert routed_experts_read(before, torch.tensor([[4, 2], [3, 1]])) == (None, 0)
