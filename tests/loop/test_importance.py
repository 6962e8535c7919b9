"""comp_core.loop.importance: block importances (mean 1 − cos between a block's input and output), measured
during the capture forward or by replaying the blocks, and how many blocks a ratio removes."""
from __future__ import annotations

import pytest
import torch

from comp_core import get_adapter
from comp_core.loop.capture import calibration_context, capture_block_inputs, run_block
from comp_core.loop.importance import (ImportanceTally, capture_with_importances, cosine_importance, gap_scales,
                                       iterative_removal, layer_importances)
from comp_core.math.magnitude import magnitude_scale

from tests.helpers import ARCHS, N_LAYERS, make_tiny_model

by_arch = pytest.mark.parametrize("arch", ARCHS)


@by_arch
def test_capture_measures_the_layer_importances_a_replay_would(arch, tiny_model, calib):
    """The capture forward's importances (no pass of their own) equal those of replaying every block."""
    adapter = get_adapter(tiny_model)
    blocks = list(adapter.blocks(tiny_model))
    with calibration_context(tiny_model):
        inputs, fused = capture_with_importances(tiny_model, adapter, calib, batch_size=3)
        replayed = layer_importances(blocks, list(range(len(blocks))), inputs)
    assert sorted(fused) == list(range(N_LAYERS))
    for i in range(N_LAYERS):
        assert 0.0 < fused[i] < 2.0
        assert fused[i] == pytest.approx(replayed[i], rel=1e-6, abs=1e-9), i
    assert len(set(round(v, 9) for v in fused.values())) > 1  # real, layer-specific measurements
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny_model.modules())



def test_cosine_importance_is_the_summed_one_minus_cosine_per_token():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, generator=g)  # (batch, seq, d): 6 tokens
    assert cosine_importance(x, x)[1] == 6 and cosine_importance(x, x)[0] == pytest.approx(0.0, abs=1e-5)
    assert cosine_importance(x, -x)[0] == pytest.approx(12.0, rel=1e-6)  # 1 − (−1) per token
    assert cosine_importance(x, 3.0 * x)[0] == pytest.approx(0.0, abs=1e-5)  # scale-free
    y = torch.randn(2, 3, 8, generator=g)
    flat_x, flat_y = x.reshape(-1, 8).double(), y.reshape(-1, 8).double()
    expected = float((1 - (flat_x * flat_y).sum(1) / (flat_x.norm(dim=1) * flat_y.norm(dim=1))).sum())
    assert cosine_importance(x, y)[0] == pytest.approx(expected, rel=1e-5)


def test_importance_tally_averages_over_every_token_of_every_batch():
    g = torch.Generator().manual_seed(1)
    tally = ImportanceTally()
    a, b = torch.randn(4, 8, generator=g), torch.randn(2, 8, generator=g)
    tally.add(3, a, a)  # 4 tokens, 0 each
    tally.add(3, b, -b)  # 2 tokens, 2 each
    tally.add(1, a, -a)
    importances = tally.importances()
    assert list(importances) == [1, 3]
    assert importances[3] == pytest.approx(4.0 / 6, rel=1e-6) and importances[1] == pytest.approx(2.0, rel=1e-6)


# ------------------------------------------------------------------------------- Prune&Comp's rescaling

def _replay_by_hand(blocks, inputs, removed: dict[int, float]):
    """Every kept block in order, the stream multiplied by ``removed[r]`` where block r was skipped; returns
    {block: (inputs, outputs)} for every block, a removed one run on the stream at its place."""
    stream = inputs.hidden
    out = {}
    for i, block in enumerate(blocks):
        kwargs = [inputs.kwargs_for(block, b) for b in range(len(stream))]
        y = [run_block(block, h, kw) for h, kw in zip(stream, kwargs)]
        out[i] = (stream, y)
        stream = [h * removed[i] for h in stream] if i in removed else y
    return out


def _importance(x_batches, y_batches) -> float:
    tally = ImportanceTally()
    for x, y in zip(x_batches, y_batches):
        tally.add(0, x, y)
    return tally.importances()[0]


def test_iterative_removal_with_rescale_records_each_victims_scale_and_replays_with_it(tiny_model, calib):
    adapter = get_adapter(tiny_model)
    blocks = list(adapter.blocks(tiny_model))
    with calibration_context(tiny_model):
        inputs = capture_block_inputs(tiny_model, adapter, calib, batch_size=3)
        protected = {0, N_LAYERS - 1}  # the first victim then has blocks after it
        plain = iterative_removal(blocks, inputs, 3, protected)
        scaled = iterative_removal(blocks, inputs, 3, protected, rescale=True)
        removed: dict[int, float] = {}
        for k, victim in enumerate(scaled.removal_order):
            by_hand = _replay_by_hand(blocks, inputs, removed)
            for i, imp in scaled.history[k].items():  # the importances of the compensated model
                assert imp == pytest.approx(_importance(*by_hand[i]), rel=1e-5, abs=1e-7), (k, i)
            assert scaled.scales[k] == pytest.approx(magnitude_scale(*by_hand[victim]), rel=1e-6), k
            removed[victim] = scaled.scales[k]
    assert plain.scales is None and plain.scales_after(3) == {}
    assert len(scaled.scales) == len(scaled.removal_order) == 3
    assert scaled.scales_after(2) == dict(zip(scaled.removal_order[:2], scaled.scales[:2]))
    assert all(s > 1.0 for s in scaled.scales)  # a block adds to the stream
    assert scaled.history[0] == plain.history[0]  # nothing removed yet: the same measurement
    first = scaled.removal_order[0]
    assert first == plain.removal_order[0]
    later = [i for i in scaled.history[1] if i > first]
    assert later and all(scaled.history[1][i] != pytest.approx(plain.history[1][i], rel=1e-6) for i in later), \
        "later blocks add unscaled outputs to a scaled stream: their importances move"


def test_default_removal_replays_the_plain_shortened_model(tiny_model, calib):
    adapter = get_adapter(tiny_model)
    blocks = list(adapter.blocks(tiny_model))
    with calibration_context(tiny_model):
        inputs = capture_block_inputs(tiny_model, adapter, calib, batch_size=4)
        result = iterative_removal(blocks, inputs, 1, set())
        by_hand = _replay_by_hand(blocks, inputs, {result.removal_order[0]: 1.0})
    for i, imp in result.history[1].items():
        assert imp == pytest.approx(_importance(*by_hand[i]), rel=1e-5, abs=1e-7)


def test_rescaled_search_gives_the_same_scales_from_the_capture_importances_or_going_deeper(calib):
    model = make_tiny_model("llama")
    adapter = get_adapter(model)
    blocks = list(adapter.blocks(model))
    with calibration_context(model):
        inputs, initial = capture_with_importances(model, adapter, calib, batch_size=4)
        full = iterative_removal(blocks, inputs, 3, {0}, rescale=True)
        from_capture = iterative_removal(blocks, inputs, 1, {0}, initial=initial, rescale=True)
        deeper = iterative_removal(blocks, inputs, 3, {0}, measured=from_capture, rescale=True)
        with pytest.raises(ValueError, match="searched with Prune&Comp's rescaling"):
            iterative_removal(blocks, inputs, 3, {0}, measured=from_capture)
    assert deeper.removal_order == full.removal_order
    assert deeper.scales == pytest.approx(full.scales, rel=1e-6)


def test_gap_scales_measure_each_gap_in_layer_order_on_the_pruned_stream(tiny_model, calib):
    """Removed blocks 2, 3 (adjacent) and 5: block 3's input is block 2's input times block 2's scale."""
    adapter = get_adapter(tiny_model)
    blocks = list(adapter.blocks(tiny_model))
    with calibration_context(tiny_model):
        inputs = capture_block_inputs(tiny_model, adapter, calib, batch_size=3)
        scales = gap_scales(blocks, inputs, [5, 2, 3])
        expected: dict[int, float] = {}
        for r in (2, 3, 5):
            expected[r] = magnitude_scale(*_replay_by_hand(blocks, inputs, expected)[r])
    assert list(scales) == [2, 3, 5]
    for r in (2, 3, 5):
        assert scales[r] == pytest.approx(expected[r], rel=1e-6)
