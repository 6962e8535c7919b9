"""How the parameter budget is shared: across layers (paper eq. 10) and across the denses of one layer
(variance threshold τ). Pure functions over numbers and tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class ImpossibleRatioError(ValueError):
    """The requested ratio cannot be reached with the given layers, protections and caps."""


def layer_ratios(importances: list[float], layer_params: list[int], budget: float, *, cap: float | list[float] = 0.9,
                 ) -> list[float]:
    """Per-layer pruning ratios r_l for the prunable layers (paper eq. 10), capped, summing to the budget.

    r_l = B / (Σ_k P_k) · H / I_l, with B = r·P − P_removed the parameters still to remove and H the
    P-weighted harmonic mean of the importances, H = Σ P_k / Σ (P_k / I_k). Then
    Σ r_l P_l = B / ΣP · H · Σ P_l / I_l = B / ΣP · ΣP = B exactly (for equal P_l, H is the plain harmonic
    mean of the paper). A ratio above its cap is clipped and what it leaves is shared by the uncapped layers
    with the same inverse-importance weights (water-filling), so the sum still equals B.
    """
    n = len(importances)
    if n == 0:
        if budget > 0:
            raise ImpossibleRatioError("no prunable layers are left, but the target needs more parameters removed")
        return []
    caps = [cap] * n if isinstance(cap, (int, float)) else list(cap)
    if budget < 0:
        raise ImpossibleRatioError("the removed layers alone exceed the target ratio")
    capacity = sum(c * p for c, p in zip(caps, layer_params))
    if budget > capacity * (1 + 1e-12):
        raise ImpossibleRatioError(
            f"the prunable layers can give at most {capacity:,.0f} parameters at their caps, "
            f"but {budget:,.0f} must be removed")
    eps = 1e-12
    weights = [p / max(i, eps) for i, p in zip(importances, layer_params)]  # P_l / I_l
    ratios = [0.0] * n
    free = set(range(n))
    remaining = budget
    while free:
        wsum = sum(weights[i] for i in free)
        scale = remaining / wsum  # r_l = scale / I_l; equals eq. 10 when nothing is capped
        over = [i for i in free if scale / max(importances[i], eps) > caps[i]]
        if not over:
            for i in free:
                ratios[i] = scale / max(importances[i], eps)
            break
        for i in over:
            ratios[i] = caps[i]
            remaining -= caps[i] * layer_params[i]
            free.discard(i)
    return ratios


def harmonic_mean(importances: list[float], weights: list[int] | None = None) -> float:
    weights = weights or [1] * len(importances)
    return sum(weights) / sum(w / i for w, i in zip(weights, importances))


@dataclass(frozen=True)
class DenseShape:
    """Shape facts of one dense for parameter accounting: kept params = kept_in × kept_out (+ bias)."""

    d_out: int
    d_in: int
    has_bias: bool
    consumer: int | None = None  # index of the dense whose removed inputs delete this dense's output rows
    rows_per_input: int = 1  # output rows one removed consumer input deletes (2 for a fused gate_up)


def removed_parameters(shapes: list[DenseShape], removed_inputs: list[int]) -> int:
    """Parameters physically removed from a layer's denses when dense d loses removed_inputs[d] columns."""
    removed = 0
    for shape, k in zip(shapes, removed_inputs):
        rows_gone = removed_inputs[shape.consumer] * shape.rows_per_input if shape.consumer is not None else 0
        before = shape.d_out * shape.d_in + (shape.d_out if shape.has_bias else 0)
        out = shape.d_out - rows_gone
        after = out * (shape.d_in - k) + (out if shape.has_bias else 0)
        removed += before - after
    return removed


@dataclass
class LayerCut:
    """How many input neurons each dense of a layer loses, and the threshold τ that decided it."""

    removed_inputs: list[int]
    tau: float
    removed_params: int
    budget: int


def choose_cuts(variances: list[torch.Tensor], shapes: list[DenseShape], budget: int) -> LayerCut:
    """Variance-threshold stopping with the smallest τ that reaches the layer budget, exactly.

    With threshold τ, dense d prunes neurons in importance order and stops before the first step whose
    kept-mask variance exceeds τ: k_d(τ) = #{k ≥ 1 : max_{i≤k} var_d[i] ≤ τ}. Starting from τ = 0 and raising
    τ until the layer reaches its budget (the paper's loop) visits exactly the running maxima of the curves,
    so we bisect over those. The denses whose cut jumps at the final τ then give neurons one at a time, in
    dense order, until the budget is met — so the layer lands on its budget within one neuron.
    """
    run_max = []
    for v in variances:
        r = torch.cummax(v.double(), dim=0).values
        r[0] = 0.0  # nothing pruned = all-ones mask: variance 0 by definition (the solve leaves ~1e-32 noise)
        run_max.append(r)

    def cuts(tau: float) -> list[int]:
        return [int(torch.searchsorted(r, torch.tensor([tau], dtype=r.dtype), right=True).item()) - 1
                for r in run_max]

    max_cut = [r.numel() - 1 for r in run_max]
    if budget <= 0:
        return LayerCut([0] * len(shapes), 0.0, 0, budget)
    if removed_parameters(shapes, max_cut) < budget:
        return LayerCut(max_cut, float("inf"), removed_parameters(shapes, max_cut), budget)
    candidates = torch.unique(torch.cat(run_max)).tolist()  # sorted
    current, tau = _land_on_budget(shapes, budget, cuts, candidates)
    return LayerCut(current, tau, removed_parameters(shapes, current), budget)


def choose_cuts_with_units(variances: list[torch.Tensor], shapes: list[DenseShape], budget: int,
                           unit_dense: int) -> LayerCut:
    """``choose_cuts`` when dense ``unit_dense`` loses whole units (attention heads or KV groups: its
    ``shapes`` entry counts units, each a large block of parameters) and the others single neurons.

    Landing on the budget one unit at a time would overshoot by up to a unit, so every unit count k whose
    units fit in the budget is tried: the fine denses take the rest (``choose_cuts``, within one neuron),
    and the layer's threshold is max(running max of the unit dense's variance up to k, the fine denses' τ).
    The k with the smallest threshold wins (the paper's "smallest τ that meets the budget"), ties to fewer
    units; parameters are additive over the denses here (the unit dense's shape has no coupled producers).
    """
    unit_curve = torch.cummax(variances[unit_dense].double(), dim=0).values
    unit_curve[0] = 0.0
    fine = list(variances)
    fine[unit_dense] = torch.zeros(1, dtype=torch.float64)  # no units: the fine denses alone
    per_unit = removed_parameters(shapes, [1 if d == unit_dense else 0 for d in range(len(shapes))])
    best: LayerCut | None = None
    for k in range(unit_curve.numel()):
        rest = budget - k * per_unit
        if rest < 0:  # k units alone overshoot the budget
            break
        sub = choose_cuts(fine, shapes, rest)
        if rest > 0 and sub.removed_params < rest:  # the fine denses cannot make up the rest at their caps
            continue
        tau = max(float(unit_curve[k]), sub.tau if rest > 0 else 0.0)
        if best is None or tau < best.tau:
            cuts = list(sub.removed_inputs)
            cuts[unit_dense] = k
            best = LayerCut(cuts, tau, removed_parameters(shapes, cuts), budget)
    if best is None:  # not even every unit plus the fine denses' caps reaches it: everything at its cap
        cuts = [v.numel() - 1 for v in variances]
        return LayerCut(cuts, float("inf"), removed_parameters(shapes, cuts), budget)
    return best


def _land_on_budget(shapes: list[DenseShape], budget: int, cuts, candidates: list) -> tuple[list[int], float]:
    """The smallest candidate level whose ``cuts(level)`` reaches ``budget`` (bisection; cuts grow with the
    level), then from the level below, the denses whose cut jumps there give neurons one at a time, in dense
    order, so the layer lands on its budget within one neuron. Returns (cuts, that level)."""
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if removed_parameters(shapes, cuts(candidates[mid])) >= budget:
            hi = mid
        else:
            lo = mid + 1
    top = cuts(candidates[lo])
    current = cuts(candidates[lo - 1]) if lo > 0 else [0] * len(shapes)
    for d in range(len(shapes)):
        trial = current.copy()
        trial[d] = top[d]
        if removed_parameters(shapes, trial) < budget:
            current = trial
            continue
        low, high = current[d], top[d]  # smallest k_d reaching the budget
        while low < high:
            mid = (low + high) // 2
            trial[d] = mid
            if removed_parameters(shapes, trial) >= budget:
                high = mid
            else:
                low = mid + 1
        current[d] = low
        break
    return current, candidates[lo]


def equal_share_cuts(shapes: list[DenseShape], budget: int, max_cuts: list[int]) -> LayerCut:
    """The ablation of the variance threshold: every prunable dense (``max_cuts[d] > 0``) loses the same
    share s of its inputs, k_d(s) = min(max_cuts[d], ⌊s · d_in⌋), with the smallest s that reaches the
    layer budget — then, as in ``choose_cuts``, the denses whose cut jumps at that s give neurons one at a
    time, in dense order, so the layer lands on its budget within one neuron. Shares differ by less than
    one neuron per dense (1/d_in) until a dense reaches its cap; the others then keep going. ``tau`` is
    NaN (no threshold decided it); above the capacity at the caps every dense is cut to its cap (τ = inf,
    as ``choose_cuts`` reports it).
    """
    if len(max_cuts) != len(shapes):
        raise ValueError(f"one cap per dense: got {len(max_cuts)} caps for {len(shapes)} denses")
    caps = [max(0, min(int(c), s.d_in - 1)) for c, s in zip(max_cuts, shapes)]
    if budget <= 0:
        return LayerCut([0] * len(shapes), 0.0, 0, budget)
    if removed_parameters(shapes, caps) < budget:
        return LayerCut(caps, float("inf"), removed_parameters(shapes, caps), budget)

    def cuts(share: float) -> list[int]:
        return [min(cap, math.floor(share * s.d_in + 1e-9)) for cap, s in zip(caps, shapes)]

    # the shares at which some dense's cut steps up: j / d_in for j = 1..cap
    candidates = sorted({j / s.d_in for cap, s in zip(caps, shapes) for j in range(1, cap + 1)})
    current, _ = _land_on_budget(shapes, budget, cuts, candidates)
    return LayerCut(current, float("nan"), removed_parameters(shapes, current), budget)
