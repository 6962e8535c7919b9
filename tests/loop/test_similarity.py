"""comp_core.loop.similarity: the layer-distance matrix D[n-1][l] = mean over tokens of arccos(cos(x^l_t, x^{l+n}_t))/π
between the hidden states entering layers l and l + n, against hand computations, summed over batches, and
collected by the capture forward (plain, streamed, through accelerate's hooks, under bf16 autocast)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from comp_core import get_adapter
from comp_core.loop.capture import calibration_context, capture_block_inputs, forward_precision
from comp_core.loop.importance import capture_with_importances, cosine_importance
from comp_core.loop.similarity import LayerDistanceTally, angular_distance_sums, stride_for, token_rows
from comp_core.models.placement import place_on_devices, split_blocks_map
from comp_core.models.streaming import open_streamed

from tests.helpers import ARCHS, N_LAYERS, make_tiny_model

by_arch = pytest.mark.parametrize("arch", ARCHS)


def _direct(states: list[torch.Tensor]) -> np.ndarray:
    """The matrix straight from the definition, in float64 numpy: [n-1, l], NaN where l + n > L."""
    flat = [s.detach().reshape(-1, s.shape[-1]).double().numpy() for s in states]
    n_layers = len(states) - 1
    out = np.full((n_layers, n_layers), np.nan)
    for n in range(1, n_layers + 1):
        for layer in range(n_layers - n + 1):
            a, b = flat[layer], flat[layer + n]
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            out[n - 1, layer] = np.mean(np.arccos(np.clip(cos, -1, 1)) / np.pi)
    return out


# ------------------------------------------------------------------------------------------------ the math


def test_angular_distance_sums_match_a_hand_computation():
    """Two tokens in the plane, three states (L = 2): angles of 45°, 0°, 90°, … read as quarters and halves."""
    x0 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (batch 1, seq 2, d 2)
    x1 = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])  # token 0 turned 45°, token 1 only scaled
    x2 = torch.tensor([[[0.0, 3.0], [-1.0, 0.0]]])  # from x0: 90°, 90°; from x1: 45°, 90°
    sums, count = angular_distance_sums([x0, x1, x2])
    assert count == 2 and sums.dtype == torch.float64 and sums.shape == (2, 2)
    assert sums[0, 0].item() == pytest.approx(0.25 + 0.0, abs=1e-6)  # x0 → x1
    assert sums[0, 1].item() == pytest.approx(0.25 + 0.5, abs=1e-6)  # x1 → x2
    assert sums[1, 0].item() == pytest.approx(0.5 + 0.5, abs=1e-6)  # x0 → x2
    assert sums[1, 1].item() == 0.0  # layer 1 + 2 > L: nothing summed
    tally = LayerDistanceTally(2)
    tally.add([x0, x1, x2])
    d = tally.distances()
    assert d[0] == pytest.approx([0.125, 0.375], abs=1e-6) and d[1][0] == pytest.approx(0.5, abs=1e-6)
    assert math.isnan(d[1][1])


def test_angular_distance_sums_match_the_definition_on_random_states():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 7, 16, generator=g)
    states = [base + 0.3 * k * torch.randn(2, 7, 16, generator=g) for k in range(5)]  # drifting apart
    tally = LayerDistanceTally(4)
    tally.add(states)
    np.testing.assert_allclose(np.array(tally.distances()), _direct(states), rtol=1e-5, atol=1e-7)


def test_the_first_row_is_arccos_of_one_minus_the_cosine_importance_when_every_token_turns_alike():
    """With one cosine c for every token, I = 1 − c exactly, and D[0][l] = arccos(1 − I)/π (in general the
    mean of arccos is not arccos of the mean)."""
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(3, 5, 8, generator=g), dim=-1)
    ortho = torch.randn(3, 5, 8, generator=g)
    ortho = torch.nn.functional.normalize(ortho - (ortho * x).sum(-1, keepdim=True) * x, dim=-1)
    angle = 0.4  # radians, the same for every token
    y = 2.5 * (math.cos(angle) * x + math.sin(angle) * ortho)
    tally = LayerDistanceTally(1)
    tally.add([x, y])
    s, n = cosine_importance(x, y)
    importance = s / n
    assert importance == pytest.approx(1 - math.cos(angle), rel=1e-5)
    assert tally.distances()[0][0] == pytest.approx(math.acos(1 - importance) / math.pi, rel=1e-4)
    assert tally.distances()[0][0] == pytest.approx(angle / math.pi, rel=1e-5)


def test_identical_and_opposite_states_give_zero_and_one_without_nan():
    """Rounding leaves some float32 cosines of a token with itself just above 1: the clamp keeps arccos finite."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 256, 48, generator=g) * torch.logspace(-3, 3, 48)  # badly scaled features
    tally = LayerDistanceTally(2)
    tally.add([x, x.clone(), -x])
    d = np.array(tally.distances())
    assert np.isfinite(d[0]).all() and np.isfinite(d[1, 0])
    assert d[0, 0] == pytest.approx(0.0, abs=1e-3)  # x → x
    assert d[0, 1] == pytest.approx(1.0, abs=1e-3) and d[1, 0] == pytest.approx(1.0, abs=1e-3)  # x → −x


def test_the_tally_over_two_batches_equals_one_batch_of_both():
    g = torch.Generator().manual_seed(1)
    a = [torch.randn(2, 6, 8, generator=g) for _ in range(4)]
    b = [torch.randn(3, 6, 8, generator=g) for _ in range(4)]
    twice = LayerDistanceTally(3)
    twice.add(a)
    twice.add(b)
    once = LayerDistanceTally(3)
    once.add([torch.cat([sa, sb]) for sa, sb in zip(a, b)])
    assert twice.count == once.count == 30
    np.testing.assert_allclose(np.array(twice.distances()), np.array(once.distances()), rtol=1e-12, atol=1e-12)
    # the mean weighs tokens, not batches: a plain average of the two batches' matrices differs
    alone = [LayerDistanceTally(3), LayerDistanceTally(3)]
    alone[0].add(a)
    alone[1].add(b)
    halfway = (np.array(alone[0].distances()) + np.array(alone[1].distances())) / 2
    assert not np.allclose(halfway[0], np.array(once.distances())[0], rtol=1e-6)


def test_observe_gathers_a_batch_block_by_block_like_add():
    g = torch.Generator().manual_seed(4)
    batches = [[torch.randn(2, 5, 8, generator=g) for _ in range(4)] for _ in range(2)]
    added, observed = LayerDistanceTally(3), LayerDistanceTally(3)
    for states in batches:
        added.add(states)
        for i in range(3):
            observed.observe(i, states[i], states[i + 1])
    assert observed.count == added.count == 20
    np.testing.assert_allclose(np.array(observed.distances()), np.array(added.distances()), rtol=1e-12)
    with pytest.raises(RuntimeError, match="block 2 where block 0 was due"):
        observed.observe(2, batches[0][2], batches[0][3])


def test_distances_before_any_batch_are_nan_and_the_tally_checks_its_inputs():
    assert all(math.isnan(v) for row in LayerDistanceTally(3).distances() for v in row)
    with pytest.raises(ValueError, match="expected 4 hidden states"):
        LayerDistanceTally(3).add([torch.ones(1, 2, 4)] * 3)
    with pytest.raises(ValueError, match="at least one layer"):
        LayerDistanceTally(0)
    with pytest.raises(ValueError, match="max_bytes"):
        LayerDistanceTally(2, max_bytes=0)


def test_zero_states_count_as_cosine_zero():
    x = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # token 1 has no direction
    tally = LayerDistanceTally(1)
    tally.add([x, x])
    assert tally.distances()[0][0] == pytest.approx((0.0 + 0.5) / 2, abs=1e-6)


def test_max_bytes_keeps_an_even_stride_of_the_tokens():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)  # 8 tokens
    assert torch.equal(token_rows(x), x.reshape(8, 3))
    assert torch.equal(token_rows(x, 3), x.reshape(8, 3)[[0, 3, 6]])
    assert stride_for(8, 3, 6, 4, None) == 1 and stride_for(8, 3, 6, 4, 8 * 3 * 6 * 4) == 1
    assert stride_for(8, 3, 6, 4, 8 * 3 * 6 * 4 - 1) == 2 and stride_for(8, 3, 6, 4, 4 * 3 * 6 * 4 - 1) == 3
    g = torch.Generator().manual_seed(5)
    states = [torch.randn(2, 4, 6, generator=g) for _ in range(3)]
    for fill in ("add", "observe"):
        capped = LayerDistanceTally(2, max_bytes=4 * 3 * 6 * 4)  # room for 4 of the 8 tokens: every 2nd
        if fill == "add":
            capped.add(states)
        else:
            capped.observe(0, states[0], states[1])
            capped.observe(1, states[1], states[2])
        assert capped.count == 4 and capped.seen == 8  # tokens 0, 2, 4, 6 of the flattened batch
        np.testing.assert_allclose(np.array(capped.distances()),
                                   _direct([s.reshape(8, 6)[::2] for s in states]), rtol=1e-5)


def test_sixteen_bit_states_are_measured_exactly_and_counted_at_two_bytes():
    g = torch.Generator().manual_seed(6)
    states = [torch.randn(2, 5, 8, generator=g).to(torch.bfloat16) for _ in range(3)]
    observed = LayerDistanceTally(2, max_bytes=10 * 3 * 8 * 2)  # room for every token in bf16, not in float32
    observed.observe(0, states[0], states[1])
    observed.observe(1, states[1], states[2])
    assert observed.count == 10
    np.testing.assert_allclose(np.array(observed.distances()), _direct([s.float() for s in states]), rtol=1e-5)


def test_a_state_changed_in_place_before_the_batch_is_summed_is_refused():
    """The tally keeps the forward's own tensors (no copy) until the batch's last block: a later write into one
    it already saw would change what it measures, and must not go unnoticed."""
    states = [torch.randn(1, 4, 8) for _ in range(3)]
    tally = LayerDistanceTally(2)
    tally.observe(0, states[0], states[1])
    states[0].mul_(2.0)  # e.g. a block that reuses an earlier buffer for its work
    with pytest.raises(RuntimeError, match="in place"):
        tally.observe(1, states[1], states[2])
    copied = LayerDistanceTally(2, max_bytes=2 * 3 * 8 * 4)  # strided: it keeps copies, which nothing can touch
    copied.observe(0, states[0], states[1])
    states[0].mul_(2.0)
    copied.observe(1, states[1], states[2])
    assert copied.count == 2


# ----------------------------------------------------------------------------------- the capture forward


def _states_by_hooks(model, calib: torch.Tensor) -> list[torch.Tensor]:
    """Every block's input and the last block's output on ``calib`` from a plain forward, by hooks."""
    blocks = get_adapter(model).blocks(model)
    states: list[torch.Tensor] = []
    handles = [b.register_forward_pre_hook(
        lambda _m, args, kwargs: states.append((args[0] if args else kwargs["hidden_states"]).detach().clone()),
        with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(
        lambda _m, _a, out: states.append((out[0] if isinstance(out, (tuple, list)) else out).detach().clone())))
    try:
        with calibration_context(model):
            model(input_ids=calib, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return states


@by_arch
def test_the_capture_forward_measures_the_matrix_a_direct_computation_gives(arch, tiny_model, calib):
    adapter = get_adapter(tiny_model)
    tally = LayerDistanceTally(N_LAYERS)
    with calibration_context(tiny_model):
        _, importances = capture_with_importances(tiny_model, adapter, calib, batch_size=3, distance=tally)
    d = np.array(tally.distances())
    assert d.shape == (N_LAYERS, N_LAYERS) and tally.count == calib.numel()
    for n in range(1, N_LAYERS + 1):
        assert np.isfinite(d[n - 1, :N_LAYERS - n + 1]).all() and np.isnan(d[n - 1, N_LAYERS - n + 1:]).all(), n
    assert ((d[np.isfinite(d)] > 0) & (d[np.isfinite(d)] < 1)).all()
    states = _states_by_hooks(tiny_model, calib)
    np.testing.assert_allclose(d, _direct(states), rtol=2e-5, atol=1e-6)
    # the n = 1 row is the per-layer cosine importance seen through arccos, token by token
    for layer in range(N_LAYERS):
        x, y = (s.reshape(-1, s.shape[-1]).double() for s in states[layer:layer + 2])
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
        assert importances[layer] == pytest.approx(float((1 - cos).mean()), rel=1e-4)
        assert d[0, layer] == pytest.approx(float(torch.arccos(cos.clamp(-1, 1)).mean() / math.pi), rel=1e-4)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny_model.modules())


def test_the_matrix_does_not_depend_on_the_batch_size(calib):
    model = make_tiny_model("llama")
    adapter = get_adapter(model)
    tallies = {size: LayerDistanceTally(N_LAYERS) for size in (3, 8)}
    with calibration_context(model):
        for size, tally in tallies.items():
            capture_with_importances(model, adapter, calib, batch_size=size, distance=tally)
    np.testing.assert_allclose(np.array(tallies[3].distances()), np.array(tallies[8].distances()),
                               rtol=1e-5, atol=1e-7)


def test_the_capture_importances_are_unchanged_by_the_matrix(calib):
    model = make_tiny_model("qwen2")
    adapter = get_adapter(model)
    with calibration_context(model):
        _, plain = capture_with_importances(model, adapter, calib, batch_size=3)
        _, with_matrix = capture_with_importances(model, adapter, calib, batch_size=3,
                                                  distance=LayerDistanceTally(N_LAYERS))
    assert with_matrix == plain


def test_bfloat16_autocast_does_not_lower_the_matrix_to_bfloat16(calib):
    """The capture hooks run inside the forward's autocast; the products must stay float32 there."""
    model = make_tiny_model("llama")
    adapter = get_adapter(model)
    tally = LayerDistanceTally(N_LAYERS)
    states: list[torch.Tensor] = []
    blocks = adapter.blocks(model)

    def keep(index, x, y):
        states.append(x.detach().clone())
        if index == N_LAYERS - 1:
            states.append(y.detach().clone())

    with calibration_context(model), forward_precision(torch.bfloat16):
        capture_with_importances(model, adapter, calib, batch_size=8, distance=tally)
        capture_block_inputs(model, adapter, calib, batch_size=8, observe=keep)
    assert len(states) == len(blocks) + 1 and states[0].dtype == torch.float32
    np.testing.assert_allclose(np.array(tally.distances()), _direct(states), rtol=2e-5, atol=1e-6)


def test_streamed_and_hooked_models_measure_the_same_matrix(tmp_path, calib):
    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "folder", max_shard_size="150KB")
    hooked = make_tiny_model("llama")
    models = {"plain": model, "streamed": open_streamed(tmp_path / "folder", dtype=torch.float32),
              "hooked": place_on_devices(hooked, {k: "cpu" for k in split_blocks_map(hooked, [0, 1])})}
    found = {}
    for name, m in models.items():
        tally = LayerDistanceTally(N_LAYERS)
        with calibration_context(m):
            capture_with_importances(m, get_adapter(m), calib, batch_size=3, distance=tally)
        found[name] = np.array(tally.distances())
    np.testing.assert_allclose(found["streamed"], found["plain"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(found["hooked"], found["plain"], rtol=1e-6, atol=1e-9)
