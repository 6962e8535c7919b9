"""comp_core.math.magnitude: Prune&Comp's scale of a removed block against a hand computation, and the
products of scales that a replay and the fold apply."""
from __future__ import annotations

import pytest
import torch

from comp_core.math.magnitude import (channel_magnitudes, cumulative_scales, entering_scales, magnitude_ratio_sum,
                                      magnitude_scale)


def _by_hand(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    """(1/D) Σ_c (1/N) Σ_n mean_t|y_n[t,c]| / mean_t|x_n[t,c]|, written out with loops."""
    rows_x = [row for x in xs for row in x]  # every sequence: (seq, d)
    rows_y = [row for y in ys for row in y]
    n, d = len(rows_x), rows_x[0].shape[1]
    total = 0.0
    for c in range(d):
        per_channel = 0.0
        for x, y in zip(rows_x, rows_y):
            mean_x = sum(abs(float(v)) for v in x[:, c]) / x.shape[0]
            mean_y = sum(abs(float(v)) for v in y[:, c]) / y.shape[0]
            per_channel += mean_y / mean_x
        total += per_channel / n
    return total / d


def test_scale_is_the_hand_computed_mean_of_per_channel_per_sequence_ratios():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 3, generator=g), torch.randn(1, 5, 3, generator=g)]  # two batches, 3 sequences
    ys = [x * 1.5 + 0.3 * torch.randn(x.shape, generator=g) for x in xs]
    assert magnitude_scale(xs, ys) == pytest.approx(_by_hand(xs, ys), rel=1e-12)
    total, count = magnitude_ratio_sum(xs[0], ys[0])
    assert count == 2 * 3


def test_scale_is_not_a_ratio_of_means():
    # sequence 0: x = 1, y = 4 (ratio 4); sequence 1: x = 3, y = 3 (ratio 1); one channel, two tokens
    x = torch.tensor([[[1.0], [1.0]], [[3.0], [3.0]]])
    y = torch.tensor([[[4.0], [-4.0]], [[3.0], [3.0]]])
    assert magnitude_scale([x], [y]) == pytest.approx(2.5, rel=1e-15)  # (4 + 1) / 2
    assert magnitude_scale([x], [y]) != pytest.approx(float(y.abs().mean() / x.abs().mean()))  # 7/4
    # channels weigh the same whatever their size: channel 0 ratio 2, channel 1 ratio 1 → 1.5
    x2 = torch.tensor([[[1.0, 100.0]]])
    y2 = torch.tensor([[[2.0, 100.0]]])
    assert magnitude_scale([x2], [y2]) == pytest.approx(1.5, rel=1e-15)


def test_magnitudes_accumulate_in_float64_and_refuse_a_dead_channel():
    x = torch.full((1, 3, 2), 0.1, dtype=torch.float32)
    assert channel_magnitudes(x).dtype == torch.float64
    assert channel_magnitudes(x).shape == (1, 2)
    dead = x.clone()
    dead[0, :, 1] = 0
    with pytest.raises(ValueError, match="channel 1 of calibration sequence 0 is zero"):
        magnitude_ratio_sum(dead, x)
    with pytest.raises(ValueError, match="shape"):
        magnitude_ratio_sum(torch.ones(2, 3), torch.ones(2, 3))


def test_cumulative_scales_multiply_every_gap_before_a_kept_block():
    scales = {2: 2.0, 3: 3.0, 6: 5.0}
    assert cumulative_scales([0, 1, 4, 5, 7], scales) == {0: 1.0, 1: 1.0, 4: 6.0, 5: 6.0, 7: 30.0}


def test_entering_scales_apply_each_gap_once_at_the_next_active_block():
    scales = {0: 1.5, 2: 2.0, 3: 3.0, 7: 5.0}
    # block 0 removed before the first active block; 2 and 3 together before 4; 7 after the last active block
    assert entering_scales([1, 4, 5, 6], scales) == {1: 1.5, 4: 6.0}
    assert entering_scales([1, 4, 5, 6], {}) == {}
