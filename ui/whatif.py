"""Analysis once, what-if many times: the GUI's bridge between ``comp_core.analyze`` and instant re-planning.

``run_analysis`` computes a full COMP plan for the current settings *and* the iterative removal order to a
deeper ``depth`` (one importance pass per extra removal), so the "layers to remove" control can move
without recomputing. ``what_if`` then asks the core's ``reallocate`` what it would decide for another target
ratio, number of removed layers or protected set, in microseconds:

* removed layers = the first n entries of the measured removal order — valid for another protected set only
  while the measured path is the one that set would take (``removal_path`` replays it step by step against
  the recorded importances);
* per-layer ratios = ``comp_core.reallocate`` on the importances after n removals, with the caps of the
  current prunable denses (``comp_core.methods.comp.layer_caps``).

Neuron scores and cuts (the heatmaps) come from the analysed plan only; changing the score, mask tuning or
the dense kinds needs a new analysis (``stale_reasons`` says which settings differ).

Candidate for ``comp_core`` (reported to the lead): ``analyze(..., removal_depth=)`` (or ``removal=, inputs=``).
Until then ``_plan`` calls the private ``comp_core.methods.comp._run`` with the captured inputs and the deeper
removal order, as the core's own ``_auto_sweep`` does, and falls back to plain ``analyze`` if that changes.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from comp_core import CompConfig, CompPlan, ImpossibleRatioError, count_parameters, get_adapter, reallocate
from comp_core.events import ProgressCallback
from comp_core.methods.comp import layer_caps
from comp_core.removal import RemovalResult


@dataclass
class Analysis:
    """What the GUI keeps after one analysis: the plan, the deep removal order and per-dense score maps."""

    plan: CompPlan
    removal: RemovalResult  # measured to ``depth`` removals (≥ the plan's own)
    protected: list[int]  # the protected set the removal order was measured with
    cfg: CompConfig
    seconds: float
    timings: dict = field(default_factory=dict)
    heatmaps: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # kind -> (log-scores, pruned)
    plan_ratio: float | None = None  # the ratio the plan used (the requested one unless it was unreachable)

    @property
    def depth(self) -> int:
        return len(self.removal.removal_order)

    @property
    def n_layers(self) -> int:
        return self.plan.n_layers

    @property
    def kinds(self) -> list[str]:
        return list(self.heatmaps)


@dataclass
class WhatIf:
    """What COMP would allocate for one setting of ratio / removed layers / protected set."""

    ratio: float
    n_remove: int
    protected: list[int]
    removed: list[int]
    importances: dict[int, float]  # after the removals, active layers only
    layer_ratios: dict[int, float]  # prunable layers only
    params_total: int
    params_removed_layers: int
    params_removed_neurons: int
    exact: bool = True  # False: the removal order was measured with another protected set
    message: str = ""  # non-empty: why no allocation could be made (ratios then empty)
    note: str = ""  # a warning that does not block the plan (e.g. the removed layers overshoot the target)

    @property
    def params_after(self) -> int:
        return self.params_total - self.params_removed_layers - self.params_removed_neurons

    @property
    def planned_ratio(self) -> float:
        return 1.0 - self.params_after / self.params_total if self.params_total else 0.0


# ------------------------------------------------------------------------------------------------ analysis


def feasible_ratio(ratio: float, removed: list[int], prunable: list[int], layer_params: list[int],
                   params_total: int, caps: list[float]) -> float:
    """``ratio`` moved just inside what the ``removed`` layers plus capped neuron pruning of ``prunable`` reach."""
    low = sum(layer_params[i] for i in removed) / params_total
    if not prunable:
        return max(0.0, low - 1e-9)
    high = low + sum(caps[i] * layer_params[i] for i in prunable) / params_total
    margin = 1e-3 * max(high - low, 1e-6)
    return min(max(ratio, low + margin), max(low, high - margin))


def _plan(model, samples, cfg: CompConfig, depth: int, on_event: ProgressCallback | None):
    """(plan, removal order measured to ``depth``, timings, ratio the plan used) on ``model``.

    The calibration inputs are captured and the removal order measured once; the plan reuses them. A ratio
    the settings cannot reach is moved to the nearest reachable one for the plan (importances and removal
    order do not depend on it; ``what_if`` explains the requested one). ``model`` is mutated temporarily
    (capture hooks): pass a private copy.
    """
    from comp_core.capture import calibration_context, capture_block_inputs
    from comp_core.events import emit
    from comp_core.removal import iterative_removal

    adapter = get_adapter(model)
    blocks = list(adapter.blocks(model))
    protected = cfg.protected_layers(len(blocks))
    timings = {}
    t0 = time.perf_counter()
    with calibration_context(model):
        emit(on_event, "capture", 0, 1, "capturing block inputs")
        inputs = capture_block_inputs(model, adapter, samples, batch_size=cfg.batch_size)
        timings["capture"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        removal = iterative_removal(blocks, inputs, depth, protected, on_event)
        timings["layer_removal"] = time.perf_counter() - t0
    try:
        from comp_core.methods.comp import _run  # private: see the module docstring
    except ImportError:  # pragma: no cover - core refactored: the public API (measures everything again)
        from comp_core import analyze

        def _run(model, samples, cfg, *, apply, on_event, removal, inputs):
            return analyze(model, samples, cfg, on_event=on_event)

    def plan_for(ratio: float) -> CompPlan:
        return _run(model, samples, replace(cfg, ratio=ratio), apply=False, on_event=on_event, removal=removal,
                    inputs=inputs)

    ratio = cfg.ratio
    try:
        plan = plan_for(ratio)
    except ImpossibleRatioError:  # raised by the allocation, before any neuron work
        layer_params = [sum(p.numel() for p in b.parameters()) for b in blocks]
        removed = removal.removed(int(cfg.remove_layers))
        prunable = [i for i in range(len(blocks)) if i not in removed and i not in protected]
        ratio = feasible_ratio(cfg.ratio, removed, prunable, layer_params, count_parameters(model),
                               layer_caps(model, cfg))
        plan = plan_for(ratio)
    timings.update({k: v for k, v in plan.timings.items() if k not in ("capture", "layer_removal")})
    return plan, removal, timings, ratio


def heatmap_arrays(plan: CompPlan) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """kind -> (log10 scores [n_layers, max d_in] float32, NaN where the layer has no such dense,
    pruned mask [n_layers, max d_in] bool). Every prunable layer reports every dense, pruned or not."""
    by_kind: dict[str, list] = {}
    for d in plan.dense_reports:
        by_kind.setdefault(d.kind, []).append(d)
    out = {}
    for kind, reports in by_kind.items():
        width = max(d.d_in for d in reports)
        scores = np.full((plan.n_layers, width), np.nan, dtype=np.float32)
        pruned = np.zeros((plan.n_layers, width), dtype=bool)
        for d in reports:
            scores[d.layer, : d.d_in] = d.scores.detach().double().clamp_min(1e-30).log10().float().numpy()
            if d.pruned_index.numel():
                pruned[d.layer, d.pruned_index.numpy()] = True
        out[kind] = (scores, pruned)
    return out


def run_analysis(model, samples: torch.Tensor, cfg: CompConfig, depth: int,
                 on_event: ProgressCallback | None = None, *, copy_model: bool = True) -> Analysis:
    """Plan ``cfg`` (``remove_layers`` must be an int) and measure the removal order to ``depth`` removals.

    ``model`` is never changed: with ``copy_model`` (default) the work happens on a deep copy, so other
    threads may keep running forward passes on the original meanwhile.
    """
    if not isinstance(cfg.remove_layers, int):
        raise ValueError("run_analysis needs a number of layers to remove, not 'auto'")
    start = time.perf_counter()
    work = copy.deepcopy(model) if copy_model else model
    n_layers = len(get_adapter(work).blocks(work))
    protected = sorted(cfg.protected_layers(n_layers))
    candidates = n_layers - len(protected)
    if cfg.remove_layers > candidates:
        raise ValueError(f"cannot remove {cfg.remove_layers} layers: only {candidates} are not protected "
                         f"(protected: {protected})")
    depth = max(cfg.remove_layers, min(depth, candidates))
    plan, removal, timings, plan_ratio = _plan(work, samples, cfg, depth, on_event)
    del work
    analysis = Analysis(plan=plan, removal=removal, protected=protected, cfg=cfg,
                        seconds=time.perf_counter() - start, timings=timings, plan_ratio=plan_ratio)
    analysis.heatmaps = heatmap_arrays(plan)
    return analysis


# ------------------------------------------------------------------------------------------------- what-if


def removal_path(analysis: Analysis, n_remove: int, protected: set[int]) -> tuple[list[int], bool]:
    """The first ``n_remove`` victims under ``protected`` and whether the measured order gives them exactly.

    At step k the core removes argmin over (active_k \\ protected) of the importances after k removals; the
    recorded history has those importances for every active layer, so the path can be replayed for another
    protected set until it would pick a layer the measurement did not remove (then ``exact`` is False).
    """
    order = analysis.removal.removal_order
    history = analysis.removal.history
    victims = []
    for k in range(min(n_remove, len(order))):
        imps = history[k]
        free = [i for i in imps if i not in protected]
        if not free:
            return victims, False
        pick = min(free, key=lambda i: imps[i])
        if pick != order[k]:
            return victims, False
        victims.append(pick)
    return victims, len(victims) == n_remove


def what_if(analysis: Analysis, ratio: float, n_remove: int, protected: list[int] | set[int] | None,
            caps: list[float] | None = None) -> WhatIf:
    """Allocation for ``ratio`` with ``n_remove`` removed layers and ``protected`` (None = the analysed set),
    by ``comp_core.reallocate``. ``caps``: per-layer caps for the current prunable denses (default: the
    analysed ones). Never raises for a bad combination: ``WhatIf.message`` explains it, the ratios are empty.
    """
    plan = analysis.plan
    protected = set(analysis.protected if protected is None else (int(i) % plan.n_layers for i in protected))
    base = dict(ratio=ratio, n_remove=n_remove, protected=sorted(protected), params_total=plan.params_total)
    candidates = plan.n_layers - len(protected)
    if n_remove > candidates:
        return WhatIf(**base, removed=[], importances={}, layer_ratios={}, params_removed_layers=0,
                      params_removed_neurons=0, message=f"Only {candidates} layers are not protected: "
                                                        f"cannot remove {n_remove}.")
    victims, exact = removal_path(analysis, n_remove, protected)
    if not exact:
        why = (f"The removal order was measured for {analysis.depth} removals; click Analyse to measure "
               f"{n_remove}." if n_remove > analysis.depth else
               "The protected layers changed the removal order; click Analyse to re-measure it.")
        return WhatIf(**base, removed=sorted(victims), importances={}, layer_ratios={}, params_removed_layers=0,
                      params_removed_neurons=0, exact=False, message=why)
    # the plan, seen with the deeper removal order and the current protected set and caps
    view = replace(plan, removal_order=list(analysis.removal.removal_order),
                   importance_history=list(analysis.removal.history), protected=sorted(protected),
                   layer_caps=list(caps) if caps is not None else plan.layer_caps)
    removed = sorted(victims)
    importances = analysis.removal.history[n_remove]
    params_removed_layers = sum(plan.layer_params[i] for i in removed)
    prunable = [i for i in importances if i not in protected]
    note = ""
    if ratio * plan.params_total < params_removed_layers and not prunable:
        note = (f"The {n_remove} removed layers alone remove {params_removed_layers / plan.params_total:.1%} "
                f"of the parameters, more than the target {ratio:.0%}.")
    try:
        removed, layer_ratio = reallocate(view, ratio, n_remove)
    except ImpossibleRatioError as err:
        return WhatIf(**base, removed=removed, importances=importances, layer_ratios={},
                      params_removed_layers=params_removed_layers, params_removed_neurons=0,
                      message=f"Ratio {ratio:.0%} is impossible with {n_remove} removed layers: {err}.")
    neurons = int(round(sum(r * plan.layer_params[i] for i, r in layer_ratio.items())))
    return WhatIf(**base, removed=removed, importances=importances, layer_ratios=layer_ratio,
                  params_removed_layers=params_removed_layers, params_removed_neurons=neurons, note=note)


def stale_reasons(analysis: Analysis | None, cfg: CompConfig) -> list[str]:
    """Settings that differ from the analysed ones and are *not* covered by :func:`what_if`."""
    if analysis is None:
        return []
    labels = {"score": "importance score", "mask_tuning": "mask tuning", "inputs": "calibration inputs",
              "dense_kinds": "prunable denses", "granularity": "granularity", "damp": "damping",
              "refit": "refit", "max_dense_ratio": "dense cap", "layer_cap": "layer cap"}
    old, new = analysis.cfg, cfg
    return [label for key, label in labels.items() if getattr(old, key) != getattr(new, key)]
