"""Budget sharing: across layers (eq. 10 with caps), parameter accounting, and the per-layer variance threshold."""
from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comp_core.math.allocation import (DenseShape, ImpossibleRatioError, LayerCut, choose_cuts, equal_share_cuts,
                                  harmonic_mean, layer_ratios, removed_parameters)


# ---------------------------------------------------------------------------------------------------------
# layer_ratios
# ---------------------------------------------------------------------------------------------------------

def _random_layers(rng: random.Random, n: int, equal_params: bool = False):
    importances = [rng.uniform(0.05, 1.0) for _ in range(n)]
    params = [4000] * n if equal_params else [rng.randint(1000, 5000) for _ in range(n)]
    return importances, params


def _unclipped(importances, params, budget):
    """Eq. 10 in its P-weighted form: r_l = B/ΣP · H/I_l with H = ΣP / Σ(P/I)."""
    h = harmonic_mean(importances, params)
    return [budget / sum(params) * h / i for i in importances]


@pytest.mark.parametrize("seed", range(8))
def test_layer_ratios_meet_budget_without_binding_caps(seed):
    rng = random.Random(seed)
    importances, params = _random_layers(rng, rng.randint(2, 10))
    # the largest unclipped ratio belongs to the least important layer: keep it under the cap
    free = _unclipped(importances, params, 1.0)
    budget = 0.9 * 0.9 / max(free)
    ratios = layer_ratios(importances, params, budget, cap=0.9)
    assert sum(r * p for r, p in zip(ratios, params)) == pytest.approx(budget, rel=1e-9)
    assert all(0.0 <= r < 0.9 for r in ratios)
    for r, expected in zip(ratios, _unclipped(importances, params, budget)):
        assert r == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", range(8))
def test_layer_ratios_meet_budget_with_binding_caps(seed):
    rng = random.Random(100 + seed)
    n = rng.randint(3, 10)
    importances, params = _random_layers(rng, n)
    importances[0] = 1e-3  # a near-useless layer wants far more than its cap
    caps = [rng.uniform(0.3, 0.9) for _ in range(n)]
    capacity = sum(c * p for c, p in zip(caps, params))
    budget = rng.uniform(0.3, 0.95) * capacity
    ratios = layer_ratios(importances, params, budget, cap=caps)
    assert sum(r * p for r, p in zip(ratios, params)) == pytest.approx(budget, rel=1e-9)
    assert all(0.0 <= r <= c + 1e-12 for r, c in zip(ratios, caps))
    assert ratios[0] == caps[0]  # the cap binds
    # the uncapped layers still follow the inverse-importance rule among themselves
    uncapped = [i for i in range(n) if ratios[i] < caps[i]]
    products = [ratios[i] * importances[i] for i in uncapped]
    if len(products) > 1:
        assert max(products) == pytest.approx(min(products), rel=1e-9)


def test_layer_ratios_at_full_capacity_hit_every_cap():
    importances, params, caps = [0.2, 0.5, 0.9], [100, 200, 300], [0.5, 0.6, 0.7]
    capacity = sum(c * p for c, p in zip(caps, params))
    ratios = layer_ratios(importances, params, capacity, cap=caps)
    assert ratios == pytest.approx(caps, rel=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_equal_params_follow_eq10_with_harmonic_mean(seed):
    rng = random.Random(200 + seed)
    n = rng.randint(2, 8)
    importances, params = _random_layers(rng, n, equal_params=True)
    budget = 0.2 * sum(params) * min(importances) / harmonic_mean(importances)  # max ratio 0.2, no cap binds
    ratios = layer_ratios(importances, params, budget, cap=0.9)
    products = [r * i for r, i in zip(ratios, importances)]
    h = harmonic_mean(importances)  # plain harmonic mean of the paper
    eq10 = budget / sum(params) * h
    for p in products:
        assert p == pytest.approx(eq10, rel=1e-9)
    for r, i in zip(ratios, importances):
        assert r == pytest.approx(budget / sum(params) * h / i, rel=1e-9)


def test_harmonic_mean():
    assert harmonic_mean([1.0, 2.0, 4.0]) == pytest.approx(3 / (1 + 0.5 + 0.25))
    assert harmonic_mean([1.0, 2.0], [3, 1]) == pytest.approx(4 / (3 + 0.5))


def test_layer_ratios_impossible_budgets():
    importances, params = [0.3, 0.6], [1000, 1000]
    with pytest.raises(ImpossibleRatioError):
        layer_ratios(importances, params, -1.0)
    with pytest.raises(ImpossibleRatioError):
        layer_ratios(importances, params, 0.9 * 2000 * 1.001, cap=0.9)
    with pytest.raises(ImpossibleRatioError):
        layer_ratios(importances, params, 1001.0, cap=[0.5, 0.5])
    with pytest.raises(ImpossibleRatioError):
        layer_ratios([], [], 10.0)
    assert layer_ratios([], [], 0.0) == []
    assert layer_ratios(importances, params, 0.0) == [0.0, 0.0]
    assert issubclass(ImpossibleRatioError, ValueError)


# ---------------------------------------------------------------------------------------------------------
# removed_parameters
# ---------------------------------------------------------------------------------------------------------

def llama_shapes(d: int = 64, kv: int = 32, ff: int = 128) -> list[DenseShape]:
    return [
        DenseShape(d, d, False),  # q
        DenseShape(kv, d, False),  # k
        DenseShape(kv, d, False),  # v
        DenseShape(d, d, False),  # o
        DenseShape(ff, d, False, consumer=6),  # gate: rows die with down's inputs
        DenseShape(ff, d, False, consumer=6),  # up
        DenseShape(d, ff, False),  # down
    ]


def opt_shapes(d: int = 64, ff: int = 128) -> list[DenseShape]:
    return [
        DenseShape(d, d, True),  # q
        DenseShape(d, d, True),  # k
        DenseShape(d, d, True),  # v
        DenseShape(d, d, True),  # out
        DenseShape(ff, d, True, consumer=5),  # fc1
        DenseShape(d, ff, True),  # fc2
    ]


def test_removed_parameters_llama_hand_count():
    shapes = llama_shapes()
    cut = [10, 5, 3, 7, 4, 6, 20]
    hand = (
        64 * 10  # q: 10 columns of 64 rows
        + 32 * 5  # k
        + 32 * 3  # v
        + 64 * 7  # o
        + (128 * 64 - (128 - 20) * (64 - 4))  # gate: 20 rows gone with down, 4 own columns
        + (128 * 64 - (128 - 20) * (64 - 6))  # up
        + 64 * 20  # down: 20 columns
    )
    assert removed_parameters(shapes, cut) == hand == 640 + 160 + 96 + 448 + 1712 + 1928 + 1280
    assert removed_parameters(shapes, [0] * 7) == 0
    # only down: each down column also takes one gate and one up row
    assert removed_parameters(shapes, [0, 0, 0, 0, 0, 0, 1]) == 64 + 2 * 64


def test_removed_parameters_opt_hand_count_with_biases():
    shapes = opt_shapes()
    cut = [2, 0, 5, 1, 3, 10]
    hand = (
        64 * 2 + 64 * 5 + 64 * 1  # q, v, out: columns only, biases stay
        + ((128 * 64 + 128) - ((128 - 10) * (64 - 3) + (128 - 10)))  # fc1: rows with their biases, 3 columns
        + 64 * 10  # fc2: 10 columns, its 64 biases stay
    )
    assert removed_parameters(shapes, cut) == hand == 128 + 320 + 64 + 1004 + 640
    assert removed_parameters(shapes, [0, 0, 0, 0, 0, 1]) == 64 + 64 + 1  # fc2 column, fc1 row + its bias


# ---------------------------------------------------------------------------------------------------------
# choose_cuts
# ---------------------------------------------------------------------------------------------------------

def _variances(shapes: list[DenseShape], max_share: float, seed: int) -> list[torch.Tensor]:
    """Noisy increasing variance curves (k = 0..max cut), as real mask paths look; variance[0] = 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        n = int(max_share * s.d_in)
        steps = torch.rand(n, generator=g, dtype=torch.float64) * torch.rand(1, generator=g, dtype=torch.float64)
        curve = torch.cumsum(steps, 0) + 0.05 * torch.randn(n, generator=g, dtype=torch.float64).abs()
        out.append(torch.cat([torch.zeros(1, dtype=torch.float64), curve]))
    return out


def _check_cut(cut: LayerCut, variances, shapes, budget):
    max_cut = [v.numel() - 1 for v in variances]
    assert all(0 <= k <= m for k, m in zip(cut.removed_inputs, max_cut))
    assert cut.removed_params == removed_parameters(shapes, cut.removed_inputs)
    assert cut.budget == budget
    assert cut.removed_params >= budget
    # within one neuron: some dense that gave neurons would fall below the budget with one fewer
    one_fewer = []
    for d, k in enumerate(cut.removed_inputs):
        if k > 0:
            trial = list(cut.removed_inputs)
            trial[d] -= 1
            one_fewer.append(removed_parameters(shapes, trial))
    assert min(one_fewer) < budget
    # every cut is under the threshold τ: the running max of the variance up to it is ≤ τ
    for v, k in zip(variances, cut.removed_inputs):
        if k > 0:
            assert float(torch.cummax(v, 0).values[k]) <= cut.tau


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("seed", range(6))
def test_choose_cuts_reaches_budget_within_one_neuron(family, seed):
    shapes = llama_shapes() if family == "llama" else opt_shapes()
    variances = _variances(shapes, 0.9, seed)
    capacity = removed_parameters(shapes, [v.numel() - 1 for v in variances])
    rng = random.Random(seed)
    for share in (0.01, 0.2, 0.5, 0.8, 0.999):
        budget = max(1, int(share * capacity) + rng.randint(0, 50))
        budget = min(budget, capacity)
        cut = choose_cuts(variances, shapes, budget)
        assert math.isfinite(cut.tau)
        _check_cut(cut, variances, shapes, budget)


def test_choose_cuts_respects_zero_length_paths():
    """A dense that may not be pruned (path of length 1) is never cut."""
    shapes = llama_shapes()
    variances = _variances(shapes, 0.9, 3)
    variances[0] = torch.zeros(1, dtype=torch.float64)
    variances[6] = torch.zeros(1, dtype=torch.float64)
    capacity = removed_parameters(shapes, [v.numel() - 1 for v in variances])
    cut = choose_cuts(variances, shapes, capacity // 2)
    assert cut.removed_inputs[0] == 0 and cut.removed_inputs[6] == 0
    _check_cut(cut, variances, shapes, capacity // 2)


def test_choose_cuts_unreachable_budget_gives_all_max_cuts():
    shapes = opt_shapes()
    variances = _variances(shapes, 0.5, 1)
    max_cut = [v.numel() - 1 for v in variances]
    capacity = removed_parameters(shapes, max_cut)
    cut = choose_cuts(variances, shapes, capacity + 1)
    assert cut.tau == float("inf")
    assert cut.removed_inputs == max_cut
    assert cut.removed_params == capacity
    # exactly the capacity is reachable, with a finite τ
    exact = choose_cuts(variances, shapes, capacity)
    assert math.isfinite(exact.tau) and exact.removed_params == capacity


def test_choose_cuts_zero_budget_cuts_nothing():
    shapes = llama_shapes()
    variances = _variances(shapes, 0.9, 2)
    for budget in (0, -5):
        cut = choose_cuts(variances, shapes, budget)
        assert cut.removed_inputs == [0] * len(shapes)
        assert cut.removed_params == 0


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("seed", range(3))
def test_choose_cuts_is_monotone_in_budget(family, seed):
    shapes = llama_shapes() if family == "llama" else opt_shapes()
    variances = _variances(shapes, 0.9, 50 + seed)
    capacity = removed_parameters(shapes, [v.numel() - 1 for v in variances])
    previous = [0] * len(shapes)
    previous_tau = 0.0
    for budget in range(0, capacity + 1, max(1, capacity // 120)):
        cut = choose_cuts(variances, shapes, budget)
        assert all(a >= b for a, b in zip(cut.removed_inputs, previous)), (budget, cut.removed_inputs, previous)
        assert cut.tau >= previous_tau
        previous, previous_tau = cut.removed_inputs, cut.tau


def test_choose_cuts_never_returns_negative_cuts():
    shapes = [DenseShape(10, 5, False), DenseShape(10, 5, False)]
    variances = [
        torch.tensor([1e-32, 1.0, 2.0], dtype=torch.float64),  # full-mask variance: rounding noise, not 0
        torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64),  # two dead inputs: exactly 0 variance
    ]
    cut = choose_cuts(variances, shapes, 5)  # currently removed_inputs == [-1, 2], removed_params == 10
    _check_cut(cut, variances, shapes, 5)


# ---------------------------------------------------------------------------------------------------------
# equal_share_cuts (the ablation of the variance threshold)
# ---------------------------------------------------------------------------------------------------------

def _check_uniform(cut: LayerCut, shapes, budget, max_cuts):
    assert all(0 <= k <= m for k, m in zip(cut.removed_inputs, max_cuts))  # caps respected, 0-cap denses kept
    assert cut.removed_params == removed_parameters(shapes, cut.removed_inputs) >= budget
    one_fewer = [removed_parameters(shapes, [k - (i == d) for i, k in enumerate(cut.removed_inputs)])
                 for d, k in enumerate(cut.removed_inputs) if k > 0]
    assert min(one_fewer) < budget  # on the budget within one neuron, as choose_cuts
    # equal shares within rounding: every dense below its cap is within two neurons of the largest share
    share = max(k / s.d_in for k, s in zip(cut.removed_inputs, shapes))
    for k, m, s in zip(cut.removed_inputs, max_cuts, shapes):
        if 0 < m and k < m:
            assert share * s.d_in - 2 <= k <= share * s.d_in + 1e-9, (k, share, s.d_in)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("prunable", ["all", "down+o"])
def test_equal_share_cuts_meet_budget_with_equal_shares(family, prunable):
    shapes = llama_shapes() if family == "llama" else opt_shapes()
    kinds = {"llama": (3, 6), "opt": (3, 5)}[family]
    max_cuts = [int(0.9 * s.d_in) if prunable == "all" or d in kinds else 0 for d, s in enumerate(shapes)]
    capacity = removed_parameters(shapes, max_cuts)
    rng = random.Random(7)
    for share in (0.01, 0.1, 0.3, 0.6, 0.95, 1.0):
        budget = min(capacity, max(1, int(share * capacity) + rng.randint(0, 40)))
        cut = equal_share_cuts(shapes, budget, max_cuts)
        assert math.isnan(cut.tau) and cut.budget == budget
        _check_uniform(cut, shapes, budget, max_cuts)


def test_equal_share_cuts_keep_going_past_a_binding_cap():
    """A dense at its cap stops; the others take the rest of the budget."""
    shapes = llama_shapes()
    max_cuts = [0, 0, 0, 6, 0, 0, 115]  # o may lose at most 6 of 64 inputs, down 115 of 128
    budget = removed_parameters(shapes, [6, 0, 0, 0, 0, 0, 60])
    cut = equal_share_cuts(shapes, budget, max_cuts)
    assert cut.removed_inputs[3] == 6 and cut.removed_inputs[6] > 6 * 128 / 64
    _check_uniform(cut, shapes, budget, max_cuts)


def test_equal_share_cuts_edges():
    shapes = opt_shapes()
    max_cuts = [int(0.5 * s.d_in) for s in shapes]
    capacity = removed_parameters(shapes, max_cuts)
    over = equal_share_cuts(shapes, capacity + 1, max_cuts)
    assert over.tau == float("inf") and over.removed_inputs == max_cuts and over.removed_params == capacity
    assert equal_share_cuts(shapes, capacity, max_cuts).removed_params == capacity
    for budget in (0, -3):
        assert equal_share_cuts(shapes, budget, max_cuts).removed_inputs == [0] * len(shapes)
    with pytest.raises(ValueError, match="one cap per dense"):
        equal_share_cuts(shapes, 10, max_cuts[:-1])


# ---------------------------------------------------------------------------------------------------------
# properties (hypothesis): each one sentence of the README or the module docstring, checked on generated inputs
# ---------------------------------------------------------------------------------------------------------

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
