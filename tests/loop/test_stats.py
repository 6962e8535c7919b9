"""comp_core.loop.stats: the float64 input statistics (Gram, totals, fold Grams) and their collection from a
block's denses during a forward."""
from __future__ import annotations

import pytest
import torch

from comp_core import get_adapter
from comp_core.loop.capture import calibration_context, capture_block_inputs, replay
from comp_core.loop.stats import InputStats, collect_block_stats

from tests.helpers import ARCHS, make_calib, make_tiny_model

by_arch = pytest.mark.parametrize("arch", ARCHS)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_gram_accumulator_equals_xtx_over_batches():
    g = _gen(0)
    batches = [torch.randn(2, 7, 5, generator=g), torch.randn(3, 4, 5, generator=g), torch.randn(11, 5, generator=g)]
    acc = InputStats(5)
    for b in batches:
        acc.update(b)
    x = torch.cat([b.reshape(-1, 5) for b in batches]).to(torch.float64)  # (N, d)
    assert acc.gram.dtype == torch.float64
    assert acc.n_tokens == 2 * 7 + 3 * 4 + 11 == x.shape[0]
    # float32 products per batch: ~1e-7 relative each, summed in float64
    torch.testing.assert_close(acc.gram, x.T @ x, rtol=1e-5, atol=1e-5)
    exact = InputStats(5)
    for b in batches:
        exact.update(b.double())  # float64 inputs stay float64 throughout
    torch.testing.assert_close(exact.gram, x.T @ x, rtol=1e-12, atol=1e-12)



def test_gram_accumulator_does_not_drift_over_many_batches():
    """Float64 accumulation: 400 float32 batch products sum to the float64 Gram within float32's rounding of
    one batch, not 400 times it."""
    g = _gen(3)
    batches = [torch.randn(4, 64, 6, generator=g) * 30 + 5 for _ in range(400)]
    acc = InputStats(6)
    for b in batches:
        acc.update(b)
    x = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    exact = x.T @ x
    assert float((acc.gram - exact).abs().max() / exact.abs().max()) < 1e-6
    assert float(acc.total.sub(x.sum(0)).abs().max() / x.sum(0).abs().max()) < 1e-9



def test_gram_accumulator_reads_low_precision_inputs():
    """bfloat16 inputs: their products are exact in float32, so one batch's Gram is exact up to the sum."""
    g = _gen(1)
    x = torch.randn(64, 3, generator=g).to(torch.bfloat16)
    acc = InputStats(3)
    acc.update(x)
    exact = x.double().T @ x.double()
    torch.testing.assert_close(acc.gram, exact, rtol=1e-6, atol=1e-6)



def test_fold_grams_split_by_sequence_and_sum_to_the_gram():
    """folds=2: every other calibration sequence in each fold, counted across batches (batch of 3 then 2:
    fold 0 = sequences 0, 2, 4, fold 1 = 1, 3)."""
    g = _gen(4)
    first, second = torch.randn(3, 5, 4, generator=g).double(), torch.randn(2, 5, 4, generator=g).double()
    acc = InputStats(4, folds=2)
    acc.update(first)
    acc.update(second)
    seqs = torch.cat([first, second])  # (5, 5, 4)

    def gram(rows):
        x = seqs[rows].reshape(-1, 4)
        return x.T @ x
    torch.testing.assert_close(acc.fold_grams[0], gram([0, 2, 4]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.fold_grams[1], gram([1, 3]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.gram, gram([0, 1, 2, 3, 4]), rtol=1e-12, atol=1e-12)
    assert acc.n_tokens == 25
    with pytest.raises(ValueError, match="folds"):
        InputStats(4, folds=3)
    with pytest.raises(ValueError, match="unpaired"):
        InputStats(4, folds=2, paired=True)


@by_arch
def test_collect_input_grams_sums_dense_inputs_and_leaves_no_hooks(arch, tiny_model, calib):
    adapter = get_adapter(tiny_model)
    block = adapter.blocks(tiny_model)[2]
    with calibration_context(tiny_model):
        inputs = capture_block_inputs(tiny_model, adapter, calib, batch_size=4)
        hidden = inputs.hidden
        for b0 in adapter.blocks(tiny_model)[:2]:
            hidden = replay(b0, hidden, [inputs.kwargs_for(b0, b) for b in range(len(hidden))])
        kwargs = [inputs.kwargs_for(block, b) for b in range(len(hidden))]
        # reference: the real inputs of every dense, recorded by our own hooks
        recorded: dict[str, list[torch.Tensor]] = {d.name: [] for d in adapter.denses}
        handles = [adapter.dense(block, d.name).register_forward_pre_hook(
            lambda _m, args, name=d.name: recorded[name].append(args[0].reshape(-1, args[0].shape[-1]).double()))
            for d in adapter.denses]
        try:
            with collect_block_stats(block, adapter) as grams:
                replay(block, hidden, kwargs)
        finally:
            for h in handles:
                h.remove()
    assert set(grams) == {d.name for d in adapter.denses}
    for group in adapter.input_groups:
        assert all(grams[n] is grams[group[0]] for n in group)  # one accumulator per shared input
    for d in adapter.denses:
        x = torch.cat(recorded[d.name])
        assert grams[d.name].n_tokens == calib.numel() == x.shape[0]
        x = x.double()  # float32 products per batch (stats.PRODUCT_DTYPE), float64 sums
        torch.testing.assert_close(grams[d.name].gram, x.T @ x, rtol=1e-5, atol=1e-6 * float((x * x).sum(0).max()))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny_model.modules())

    # hooks are removed even when the body raises
    with pytest.raises(RuntimeError, match="boom"):
        with collect_block_stats(block, adapter):
            raise RuntimeError("boom")
    assert not any(m._forward_pre_hooks for m in tiny_model.modules())



def test_mean_norms_and_variance_are_the_columns_of_the_inputs():
    g = _gen(6)
    batches = [torch.randn(2, 9, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 1.5 for _ in range(3)]
    acc = InputStats(4)
    for b in batches:
        acc.update(b)
    x = torch.cat([b.reshape(-1, 4) for b in batches]).double()  # (54, 4)
    assert acc.width == 4 and acc.n_tokens == 54
    torch.testing.assert_close(acc.mean, x.mean(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(acc.sq_norms, (x * x).sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(acc.variance, x.var(0, unbiased=True), rtol=1e-5, atol=1e-6)
    assert torch.equal(InputStats(4).variance, torch.zeros(4, dtype=torch.float64))  # no tokens: no spread


def test_the_block_gram_is_xtx_of_the_captured_inputs_the_norm_hands_on():
    """On block 0 of a Llama the MLP's gate/up read post_attention_layernorm(h + attn(h)) and q/k/v read
    input_layernorm(h), h the captured inputs: the collected Gram of q_proj is exactly XᵀX of the latter."""
    model, calib = make_tiny_model("llama"), make_calib()
    adapter = get_adapter(model)
    block = adapter.blocks(model)[0]
    with calibration_context(model):
        inputs = capture_block_inputs(model, adapter, calib, batch_size=4)
        with collect_block_stats(block, adapter, only={"self_attn.q_proj"}) as stats:
            replay(block, inputs.hidden, [inputs.kwargs_for(block, b) for b in range(len(inputs.hidden))])
        x = torch.cat([block.input_layernorm(h) for h in inputs.hidden]).reshape(-1, 64).double()
    assert set(stats) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}  # one group, one accumulator
    assert stats["self_attn.q_proj"] is stats["self_attn.v_proj"]
    assert stats["self_attn.q_proj"].n_tokens == calib.numel()
    torch.testing.assert_close(stats["self_attn.q_proj"].gram, x.T @ x, rtol=1e-5, atol=1e-4)
