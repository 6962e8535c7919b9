"""Property-based tests (hypothesis) of the pure math: allocation, mask tuning, the mask path, ratio 0.

Each property is one sentence of the README or a module docstring, checked on generated inputs instead of a
few hand-picked ones.
"""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from comp_core.math.allocation import (DenseShape, ImpossibleRatioError, choose_cuts, equal_share_cuts,  # noqa: E402
                                  layer_ratios, removed_parameters)
from comp_core.math.linalg import cholesky, damped  # noqa: E402
from comp_core.math.mask_tuning import (coefficient_matrix, mask_path, mask_variance_plain,  # noqa: E402
                                   reconstruction_error, solve_mask)

from tests.helpers import ARCHS, make_calib, make_tiny_model  # noqa: E402

FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

importances = st.floats(min_value=1e-4, max_value=10.0, allow_nan=False)
params = st.integers(min_value=1, max_value=10**7)
caps = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def layers(draw):
    n = draw(st.integers(min_value=1, max_value=12))
    imp = draw(st.lists(importances, min_size=n, max_size=n))
    size = draw(st.lists(params, min_size=n, max_size=n))
    cap = draw(st.lists(caps, min_size=n, max_size=n))
    share = draw(st.floats(min_value=0.0, max_value=1.0, allow_nan=False))
    return imp, size, cap, share


@FAST
@given(layers())
def test_layer_ratios_sum_to_the_budget_and_respect_the_caps(case):
    imp, size, cap, share = case
    capacity = sum(c * p for c, p in zip(cap, size))
    budget = share * capacity
    ratios = layer_ratios(imp, size, budget, cap=cap)
    assert sum(r * p for r, p in zip(ratios, size)) == pytest.approx(budget, rel=1e-9, abs=1e-6)
    assert all(-1e-12 <= r <= c + 1e-9 for r, c in zip(ratios, cap))


@FAST
@given(layers(), st.floats(min_value=1.001, max_value=10.0))
def test_layer_ratios_refuse_a_budget_beyond_the_caps(case, excess):
    imp, size, cap, _ = case
    capacity = sum(c * p for c, p in zip(cap, size))
    with pytest.raises(ImpossibleRatioError):
        layer_ratios(imp, size, capacity * excess + 1.0, cap=cap)


@st.composite
def layer_denses(draw):
    n = draw(st.integers(min_value=1, max_value=4))
    shapes = [DenseShape(d_out=draw(st.integers(1, 24)), d_in=draw(st.integers(2, 24)), has_bias=draw(st.booleans()))
              for _ in range(n)]
    variances = [torch.tensor(draw(st.lists(st.floats(0.0, 5.0, allow_nan=False), min_size=s.d_in, max_size=s.d_in)),
                              dtype=torch.float64) for s in shapes]
    share = draw(st.floats(min_value=0.0, max_value=1.0, allow_nan=False))
    return shapes, variances, share


@FAST
@given(layer_denses())
def test_variance_threshold_cuts_reach_the_layer_budget_within_one_neuron(case):
    shapes, variances, share = case
    max_cut = [v.numel() - 1 for v in variances]
    budget = int(share * removed_parameters(shapes, max_cut))
    cut = choose_cuts(variances, shapes, budget)
    assert cut.removed_params == removed_parameters(shapes, cut.removed_inputs) >= budget
    assert all(0 <= k <= m for k, m in zip(cut.removed_inputs, max_cut))
    one_neuron = max(s.d_out + (1 if s.has_bias else 0) for s in shapes)
    assert budget == 0 or cut.removed_params - budget <= one_neuron
    equal = equal_share_cuts(shapes, budget, max_cut)
    assert equal.removed_params >= budget and all(k <= m for k, m in zip(equal.removed_inputs, max_cut))


@st.composite
def dense_problems(draw):
    d_out, d_in = draw(st.integers(1, 12)), draw(st.integers(2, 16))
    tokens = draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    x = torch.randn(tokens, d_in, generator=generator, dtype=torch.float64)  # (N, d_in)
    n_removed = draw(st.integers(1, d_in - 1))
    order = torch.randperm(d_in, generator=generator)
    damp = draw(st.sampled_from([1e-8, 1e-4, 1e-2, 0.1]))
    return weight, x, order, n_removed, damp


@FAST
@given(dense_problems())
def test_mask_tuning_never_increases_the_calibration_reconstruction_error(case):
    weight, x, order, n_removed, damp = case
    coeff = coefficient_matrix(weight, x.T @ x)  # undamped: the error the calibration sees
    keep = order[n_removed:]
    untuned = torch.zeros(coeff.shape[0], dtype=coeff.dtype)
    untuned[keep] = 1.0
    tuned = untuned.clone()
    tuned[keep] = solve_mask(damped(coeff, damp), keep)
    before, after = reconstruction_error(coeff, untuned), reconstruction_error(coeff, tuned)
    assert after <= before * (1 + 1e-9) + 1e-9 * float(coeff.diagonal().sum())


@FAST
@given(dense_problems())
def test_the_mask_path_equals_a_fresh_solve_at_every_prefix(case):
    weight, x, order, n_removed, damp = case
    coeff = damped(coefficient_matrix(weight, x.T @ x), damp)
    path = mask_path(coeff, order, n_removed, keep_masks=True)
    plain = mask_variance_plain(coeff, order, n_removed)
    assert torch.allclose(path.variance, plain, rtol=1e-5, atol=1e-10)
    for k in range(n_removed + 1):
        reference = solve_mask(coeff, path.keep_index(k))
        assert torch.allclose(path.mask(k), reference, rtol=1e-6, atol=1e-8)


@FAST
@given(st.integers(3, 12), st.integers(0, 2**31 - 1))
def test_the_mask_path_stays_exact_when_the_cholesky_needs_more_damping(d_in, seed):
    """A dead input (a zero weight column) makes C singular: the factorisation retries with damping, and the
    path must then solve the damped system on both sides, as solve_mask on that same matrix does."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, d_in, generator=generator, dtype=torch.float64)
    weight[:, seed % d_in] = 0.0
    x = torch.randn(32, d_in, generator=generator, dtype=torch.float64)
    coeff = coefficient_matrix(weight, x.T @ x)
    _, retry = cholesky(coeff)
    assert retry > 0
    order = torch.randperm(d_in, generator=generator)
    path = mask_path(coeff, order, d_in - 1, keep_masks=True)
    system = damped(coeff, retry)  # what the path factorised
    for k in range(d_in):
        assert torch.allclose(path.mask(k), solve_mask(system, path.keep_index(k)), rtol=1e-6, atol=1e-6), k


@settings(max_examples=8, deadline=None, database=None)
@given(st.sampled_from(ARCHS), st.integers(0, 1000), st.sampled_from(["comp", "wanda-sp", "flap", "magnitude-sp"]))
def test_ratio_zero_is_the_identity(arch, seed, method):
    from comp_core.methods import make_settings, prune_with

    model = make_tiny_model(arch, seed=seed)
    calib = make_calib(seed)
    with torch.no_grad():
        before = model(calib[:2]).logits
    pruned, result = prune_with(method, model, calib, make_settings(method, ratio=0.0))
    with torch.no_grad():
        after = pruned(calib[:2]).logits
    assert result.realised_ratio == 0.0 and math.isclose(result.params_after, result.params_before)
    assert torch.equal(before, after)
