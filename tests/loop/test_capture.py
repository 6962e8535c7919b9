"""comp_core.loop.capture: the calibration forward that captures block 0's inputs and every block's kwargs,
replaying blocks on them, the calibration context, and the bf16 forward precision."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from comp_core import CompConfig, get_adapter
from comp_core.loop.capture import (calibration_context, capture_block_inputs, forward_precision, replay,
                                    resolve_forward_dtype, run_block)
from comp_core.loop.stats import collect_block_stats

from tests.helpers import ARCHS, N_LAYERS, make_calib, make_tiny_model

by_arch = pytest.mark.parametrize("arch", ARCHS)


def _final_norm(model: nn.Module) -> nn.Module:
    return model.model.decoder.final_layer_norm if model.config.model_type == "opt" else model.model.norm


@by_arch
def test_replayed_blocks_reproduce_final_hidden_state(arch, tiny_model, calib):
    adapter = get_adapter(tiny_model)
    seen = []
    handle = _final_norm(tiny_model).register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            tiny_model(input_ids=calib, use_cache=False)
    finally:
        handle.remove()
    reference = seen[0]  # (8, 32, 64): input of the final norm = output of the last block

    with calibration_context(tiny_model):
        inputs = capture_block_inputs(tiny_model, adapter, calib, batch_size=3)  # batches of 3, 3, 2
        assert [h.shape[0] for h in inputs.hidden] == [3, 3, 2]
        outputs = []
        for b, hidden in enumerate(inputs.hidden):
            h = hidden
            for block in adapter.blocks(tiny_model):
                h = run_block(block, h, inputs.kwargs_for(block, b))
            outputs.append(h)
    replayed = torch.cat(outputs)
    assert replayed.shape == reference.shape
    assert float((replayed - reference).abs().max()) < 1e-5
    assert not any(m._forward_pre_hooks for m in tiny_model.modules())


def test_calibration_context_restores_mode_and_cache_flag():
    model = make_tiny_model("llama").train()
    model.config.use_cache = True
    with calibration_context(model):
        assert not model.training and model.config.use_cache is False and not torch.is_grad_enabled()
    assert model.training and model.config.use_cache is True



def test_forward_dtype_settings():
    model = make_tiny_model("llama")
    assert resolve_forward_dtype("float32", model) is None
    assert resolve_forward_dtype("bfloat16", model) is torch.bfloat16
    assert resolve_forward_dtype("bfloat16", model.to(torch.bfloat16)) is None  # stored bf16 runs as it is
    with pytest.raises(ValueError, match="forward dtype"):
        resolve_forward_dtype("fp8", model)
    with pytest.raises(ValueError, match="forward_dtype"):
        CompConfig(forward_dtype="half")


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_bf16_forwards_keep_float_streams_and_exact_statistics_of_what_the_denses_read(arch):
    """Under bf16 autocast the hidden states stay float32 and every Gram is the float64 product of the very
    inputs the autocast linears consumed (their bf16 rounding), not a bf16 product."""
    model = make_tiny_model(arch)
    adapter = get_adapter(model)
    block = adapter.blocks(model)[2]
    down = next(d.name for d in adapter.denses if d.kind == "down")
    seen = []
    handle = adapter.dense(block, down).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().to(torch.bfloat16).double().reshape(-1, args[0].shape[-1])))
    try:
        with calibration_context(model):
            inputs = capture_block_inputs(model, adapter, make_calib(), batch_size=4)
            kwargs = [inputs.kwargs_for(block, b) for b in range(len(inputs.hidden))]
            plain = replay(block, inputs.hidden, kwargs)
            seen.clear()
            with forward_precision(torch.bfloat16), collect_block_stats(block, adapter, only={down}) as stats:
                fast = replay(block, inputs.hidden, kwargs)
    finally:
        handle.remove()
    assert set(stats) == {down}  # only the group of the prunable dense was measured
    assert all(o.dtype == torch.float32 for o in fast)
    rel = max(float((a - b).norm() / a.norm()) for a, b in zip(plain, fast))
    assert 0 < rel < 0.03  # bf16 products, float32 residual stream
    reference = sum(x.T @ x for x in seen)
    assert torch.allclose(stats[down].gram, reference, rtol=1e-5, atol=1e-6)



def test_captured_inputs_are_the_embeddings_in_batches():
    """Block 0 of a Llama reads the token embeddings: the capture holds exactly those, batch by batch, and the
    kwargs of every block for every batch."""
    model, calib = make_tiny_model("llama"), make_calib()
    adapter = get_adapter(model)
    with calibration_context(model):
        inputs = capture_block_inputs(model, adapter, calib, batch_size=5)
        expected = model.model.embed_tokens(calib)  # (8, 32, 64)
    assert [tuple(h.shape) for h in inputs.hidden] == [(5, 32, 64), (3, 32, 64)]
    torch.testing.assert_close(torch.cat(inputs.hidden), expected, rtol=0, atol=0)
    assert len(inputs.kwargs) == 2
    blocks = adapter.blocks(model)
    assert sorted(inputs.block_ids.values()) == list(range(N_LAYERS))
    assert all(isinstance(inputs.kwargs_for(block, b), dict) for block in blocks for b in range(2))
