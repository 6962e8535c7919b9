"""comp_core.loop.blocks: the one block loop every method uses (identical and accumulated propagation)."""
from __future__ import annotations

import pytest
import torch

from comp_core import get_adapter
from comp_core.loop.blocks import block_loop
from comp_core.loop.capture import calibration_context, capture_block_inputs, replay

from tests.helpers import N_LAYERS, make_calib, make_tiny_model


def _setup():
    model = make_tiny_model("llama")
    adapter = get_adapter(model)
    return model, adapter, adapter.blocks(model)


def test_identical_propagation_visits_the_active_blocks_in_order_on_the_unpruned_stream():
    model, adapter, blocks = _setup()
    seen = []
    with calibration_context(model):
        inputs = capture_block_inputs(model, adapter, make_calib(), batch_size=4)
        stream = inputs.hidden
        expected = {}
        for i, block in enumerate(blocks):  # the reference: every block replayed in turn
            kwargs = [inputs.kwargs_for(block, b) for b in range(len(stream))]
            expected[i] = (stream, replay(block, stream, kwargs))
            stream = expected[i][1]

        def visit(v):
            seen.append((v.index, v.step, v.stats))
            for got, want in zip(v.inputs, expected[v.index][0]):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            for got, want in zip(v.outputs, expected[v.index][1]):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            return None

        last = block_loop(blocks, inputs, range(N_LAYERS), visit)
    assert [(i, s) for i, s, _ in seen] == [(i, i) for i in range(N_LAYERS)]
    assert all(stats is None for *_, stats in seen)  # no statistics unless asked for
    for got, want in zip(last, stream):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_statistics_are_collected_only_where_asked():
    model, adapter, blocks = _setup()
    with_stats = []
    with calibration_context(model):
        inputs = capture_block_inputs(model, adapter, make_calib(), batch_size=8)
        block_loop(blocks, inputs, [1, 3], lambda v: with_stats.append((v.index, v.stats is not None)),
                   adapter=adapter, with_stats=lambda i: i == 3)
    assert with_stats == [(1, False), (3, True)]


@pytest.mark.parametrize("propagation", ["identical", "accumulated"])
def test_a_changed_block_reaches_the_next_block_only_when_accumulated(propagation):
    """Block 0's visitor zeroes its MLP output: with accumulated propagation block 1 reads the changed
    outputs (= block 0 replayed after the change), with identical propagation the unpruned ones."""
    model, adapter, blocks = _setup()
    inputs_of_1 = {}
    with calibration_context(model):
        inputs = capture_block_inputs(model, adapter, make_calib(), batch_size=8)

        def visit(v):
            if v.index == 0:
                inputs_of_1["unpruned"] = v.outputs
                v.block.mlp.down_proj.weight.data.zero_()
                inputs_of_1["changed"] = replay(v.block, v.inputs, v.kwargs)
                return v.block
            inputs_of_1["seen"] = v.inputs
            return None

        block_loop(blocks, inputs, [0, 1], visit, propagation=propagation)
    want = inputs_of_1["changed" if propagation == "accumulated" else "unpruned"]
    other = inputs_of_1["unpruned" if propagation == "accumulated" else "changed"]
    torch.testing.assert_close(inputs_of_1["seen"][0], want[0], rtol=1e-6, atol=1e-6)
    assert float((inputs_of_1["seen"][0] - other[0]).abs().max()) > 1e-3


def test_unknown_propagation_is_refused():
    model, adapter, blocks = _setup()
    with calibration_context(model):
        inputs = capture_block_inputs(model, adapter, make_calib()[:2], batch_size=2)
        with pytest.raises(ValueError, match="propagation"):
            block_loop(blocks, inputs, [0], lambda v: None, propagation="sideways")


@pytest.mark.parametrize("propagation", ["identical", "paired"])
def test_input_scales_multiply_the_stream_entering_a_block(propagation):
    """Prune&Comp's replay: block 2 (block 1 skipped) sees block 0's outputs times the gap's scale, on both
    streams of a paired loop; blocks without an entry and the captured inputs are left as they were."""
    model, adapter, blocks = _setup()
    seen = {}
    with calibration_context(model):
        inputs = capture_block_inputs(model, adapter, make_calib(), batch_size=4)
        captured = [h.clone() for h in inputs.hidden]

        def visit(v):
            seen[v.index] = (v.inputs, v.outputs, v.shifted_inputs)

        block_loop(blocks, inputs, [0, 2, 3], visit, propagation=propagation, input_scales={2: 1.7})
    for got, out0 in zip(seen[2][0], seen[0][1]):
        torch.testing.assert_close(got, 1.7 * out0, rtol=1e-6, atol=1e-6)
    for got, out2 in zip(seen[3][0], seen[2][1]):
        torch.testing.assert_close(got, out2, rtol=0, atol=0)
    if propagation == "paired":
        for got, want in zip(seen[2][2], seen[2][0]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(inputs.hidden, captured):
        assert torch.equal(got, want)
