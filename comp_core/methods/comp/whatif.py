"""One COMP analysis, many instant re-plans: what COMP would decide for another ratio, number of removed layers
or protected set, without measuring anything again.

An analysis (``comp_core.methods.comp.analyze(..., removal_depth=N)``) measures the iterative removal order N
removals deep (``plan.removal``). From it:

* removed layers = the first n entries of the measured order — valid for another protected set only while the
  measured path is the one that set would take (``removal_path`` replays it against the recorded importances);
* per-layer ratios = ``reallocate`` on the importances after n removals, with the caps of the prunable denses.

Neuron scores and cuts come from the analysed plan only: a changed score, mask tuning or set of denses needs a
new analysis (``stale_reasons``), and pruning may reuse the analysed plan only when nothing changed
(``changed_settings``). Everything here is pure over plans and configs except ``analyze_nearest``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ...math.allocation import ImpossibleRatioError
from ...events import ProgressCallback
from .block import layer_caps
from .config import CompConfig
from .run import analyze, reallocate
from ...loop.capture import calibration_context, capture_block_inputs, forward_precision, resolve_forward_dtype
from ...loop.importance import RemovalResult, iterative_removal, layers_within
from ...models.adapters import get_adapter
from ...results import CompPlan
from ...runtime import count_parameters

# readable names of the CompConfig fields, for "changed since the analysis" messages
SETTING_LABELS = {
    "ratio": "target ratio", "remove_layers": "layers to remove", "protected": "protected layers",
    "granularity": "granularity", "score": "importance score", "mask_tuning": "mask tuning",
    "inputs": "calibration inputs", "damp": "damping", "max_dense_ratio": "dense cap", "layer_cap": "layer cap",
    "dense_kinds": "prunable denses", "refit": "refit", "refit_tokens_per_input": "refit tokens per input",
    "refit_damp": "refit damping", "auto_max_layers": "auto sweep depth", "batch_size": "batch size",
    "dense_allocation": "per-dense allocation", "allocation": "layer allocation",
    "layer_rescale": "layer rescaling (Prune&Comp)",
}
# settings that change neuron scores or cuts: a what-if cannot cover them, the neuron maps need a new analysis
STALE_SETTINGS = ("score", "mask_tuning", "inputs", "dense_kinds", "granularity", "damp", "refit",
                  "max_dense_ratio", "layer_cap", "dense_allocation", "allocation", "layer_rescale")


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
    layer_scales: dict[int, float] = field(default_factory=dict)  # Prune&Comp: {removed layer: scale}, if rescaled

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


def analyze_nearest(model: nn.Module, samples: torch.Tensor, cfg: CompConfig, depth: int,
                    on_event: ProgressCallback | None = None, *, fit: bool = True) -> tuple[CompPlan, float]:
    """(plan, ratio it used): ``analyze`` with the removal order measured ``depth`` removals deep.

    A ratio the settings cannot reach is moved to the nearest reachable one, so a person still sees the
    importances, the removal order and the neuron maps (what-if then explains the requested ratio). That
    case measures the removal order once more (a layers-only analysis, no neuron work) to know which layers
    go. ``remove_layers`` must be a number; ``model`` is not changed.
    """
    if not isinstance(cfg.remove_layers, int):
        raise ValueError("a what-if analysis needs a number of layers to remove, not 'auto'")
    depth = max(int(depth), cfg.remove_layers)
    try:
        return analyze(model, samples, cfg, on_event, removal_depth=depth, fit=fit), cfg.ratio
    except ImpossibleRatioError:
        pass
    probe = analyze(model, samples, replace(cfg, granularity="layers", ratio=0.0), on_event,
                    removal_depth=cfg.remove_layers)
    n_layers = probe.n_layers
    protected = cfg.protected_layers(n_layers)
    n_remove = 0 if cfg.granularity == "neurons" else layers_within(cfg.ratio, cfg.remove_layers,
                                                                     probe.params_total, probe.layer_params)
    removed = probe.removal.removed(n_remove)
    prunable = [] if cfg.granularity == "layers" else [
        i for i in range(n_layers) if i not in removed and i not in protected]
    ratio = feasible_ratio(cfg.ratio, removed, prunable, probe.layer_params, count_parameters(model),
                           layer_caps(model, cfg))
    return analyze(model, samples, replace(cfg, ratio=ratio), on_event, removal_depth=depth, fit=fit), ratio


def measure_deeper(model: nn.Module, samples: torch.Tensor, plan: CompPlan, depth: int,
                   on_event: ProgressCallback | None = None) -> CompPlan:
    """``plan`` with its removal order measured ``depth`` removals deep, for a what-if over more removed layers
    than the analysis measured: one capture forward, then only the removals not measured yet (same protected
    set and forward precision as the analysis). Neuron maps and cuts are the analysed ones. An analysis
    measures no further than its own plan, so this is the what-if material, paid for only when asked for.
    ``model`` gets capture hooks for the duration: pass a copy where others may be running it."""
    if plan.removal is None:
        raise ValueError("the plan has no measured removal order")
    depth = min(int(depth), plan.n_layers - len(plan.protected))
    if depth <= len(plan.removal.removal_order):
        return plan
    adapter = get_adapter(model)
    if len(adapter.blocks(model)) != plan.n_layers or count_parameters(model) != plan.params_total:
        raise ValueError("the plan was made for another model; analyse this one")
    forward_dtype = resolve_forward_dtype(plan.config.get("forward_dtype", "auto"), model)
    with calibration_context(model), forward_precision(forward_dtype):
        inputs = capture_block_inputs(model, adapter, samples, batch_size=plan.config.get("batch_size", 4))
        removal = iterative_removal(list(adapter.blocks(model)), inputs, depth, set(plan.protected), on_event,
                                    measured=plan.removal, rescale=plan.removal.scales is not None)
    return replace(plan, removal=removal)


# ------------------------------------------------------------------------------------------------- what-if


def removal_path(removal: RemovalResult, n_remove: int, protected: Iterable[int]) -> tuple[list[int], bool]:
    """The first ``n_remove`` victims under ``protected`` and whether the measured order gives them exactly.

    At step k the core removes argmin over (active_k \\ protected) of the importances after k removals; the
    recorded history has those importances for every active layer, so the path can be replayed for another
    protected set until it would pick a layer the measurement did not remove (then ``exact`` is False).
    """
    protected = set(protected)
    order, history = removal.removal_order, removal.history
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


def what_if(plan: CompPlan, ratio: float, n_remove: int, protected: Iterable[int] | None = None,
            caps: list[float] | None = None) -> WhatIf:
    """Allocation for ``ratio`` with ``n_remove`` removed layers and ``protected`` (None = the analysed set),
    from an analysed ``plan`` whose ``plan.removal`` holds the deep removal order. ``caps``: per-layer caps
    of the current prunable denses (default: the analysed ones). Never raises for a bad combination:
    ``WhatIf.message`` explains it and the ratios are empty.
    """
    removal: RemovalResult = plan.removal
    if removal is None:
        raise ValueError("the plan has no measured removal order; analyse with removal_depth")
    depth = len(removal.removal_order)
    protected = set(plan.protected if protected is None else (int(i) % plan.n_layers for i in protected))
    fits = layers_within(ratio, n_remove, plan.params_total, plan.layer_params)
    capped = ""
    if fits < n_remove:
        capped = (f"The target {ratio:.0%} holds only {fits} whole layer{'s' if fits != 1 else ''}: COMP removes "
                  f"{fits}, not {n_remove}.")
        n_remove = fits
    base = dict(ratio=ratio, n_remove=n_remove, protected=sorted(protected), params_total=plan.params_total)
    candidates = plan.n_layers - len(protected)
    if n_remove > candidates:
        return WhatIf(**base, removed=[], importances={}, layer_ratios={}, params_removed_layers=0,
                      params_removed_neurons=0, message=f"Only {candidates} layers are not protected: "
                                                        f"cannot remove {n_remove}.")
    victims, exact = removal_path(removal, n_remove, protected)
    if not exact:
        why = (f"Which layers go is measured for {depth} removed layer{'s' if depth != 1 else ''} so far; "
               f"measure it to {n_remove} to see this plan."
               if n_remove > depth else
               "The protected layers changed the removal order; click Analyse to re-measure it.")
        return WhatIf(**base, removed=sorted(victims), importances={}, layer_ratios={}, params_removed_layers=0,
                      params_removed_neurons=0, exact=False, message=why)
    # the plan, seen with the deeper removal order and the current protected set and caps
    view = replace(plan, removal_order=list(removal.removal_order), importance_history=list(removal.history),
                   protected=sorted(protected), layer_caps=list(caps) if caps is not None else plan.layer_caps)
    removed = sorted(victims)
    importances = removal.history[n_remove]
    params_removed_layers = sum(plan.layer_params[i] for i in removed)
    prunable = [i for i in importances if i not in protected]
    note = capped
    if ratio * plan.params_total < params_removed_layers and not prunable:
        note = (f"The {n_remove} removed layers alone remove {params_removed_layers / plan.params_total:.1%} "
                f"of the parameters, more than the target {ratio:.0%}.")
    # the scales of the first n removals hold for n: each was measured with the earlier ones applied
    scales = removal.scales_after(n_remove)
    try:
        removed, layer_ratio = reallocate(view, ratio, n_remove)
    except ImpossibleRatioError as err:
        return WhatIf(**base, removed=removed, importances=importances, layer_ratios={},
                      params_removed_layers=params_removed_layers, params_removed_neurons=0,
                      message=f"Ratio {ratio:.0%} is impossible with {n_remove} removed layers: {err}.",
                      layer_scales=scales)
    neurons = int(round(sum(r * plan.layer_params[i] for i, r in layer_ratio.items())))
    return WhatIf(**base, removed=removed, importances=importances, layer_ratios=layer_ratio,
                  params_removed_layers=params_removed_layers, params_removed_neurons=neurons, note=note,
                  layer_scales=scales)


# --------------------------------------------------------------------------------------- settings vs plan


def _comparable(cfg: CompConfig, n_layers: int | None = None) -> dict:
    """The config's fields as the core reads them: the prunable dense kinds are a set, and with ``n_layers``
    the protected layers are the resolved set (None = the default ones)."""
    values = asdict(cfg)
    if values["dense_kinds"] is not None:
        values["dense_kinds"] = frozenset(values["dense_kinds"])
    if n_layers is not None:
        values["protected"] = frozenset(cfg.protected_layers(n_layers))
    return values


def changed_settings(old: CompConfig, new: CompConfig, n_layers: int | None = None) -> list[str]:
    """Labels of every setting that differs between two configs (empty: an analysed plan can be applied as is).

    The auto-sweep depth only matters when the number of removed layers is "auto", so it is ignored otherwise.
    ``n_layers``: compare the protected layers as resolved for a model of that depth.
    """
    a, b = _comparable(old, n_layers), _comparable(new, n_layers)
    ignore = set() if "auto" in (old.remove_layers, new.remove_layers) else {"auto_max_layers"}
    return [SETTING_LABELS.get(k, k) for k in a if k not in ignore and a[k] != b.get(k)]


def stale_reasons(old: CompConfig | None, new: CompConfig) -> list[str]:
    """Settings that differ from the analysed ones and are *not* covered by :func:`what_if`."""
    if old is None:
        return []
    a, b = _comparable(old), _comparable(new)
    return [SETTING_LABELS[k] for k in STALE_SETTINGS if a[k] != b[k]]


# ------------------------------------------------------------------------------------------- neuron maps


def _original_width(d) -> int:
    """Columns of a dense's row in the neuron map: its original input width (more than ``d_in`` when the source
    was already pruned)."""
    width = d.d_in
    for index in (d.kept_index, d.pruned_index):
        if index is not None and index.numel():
            width = max(width, int(index.max()) + 1)
    return width


def neuron_maps(plan: CompPlan) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """kind -> (log10 scores [n_layers, max d_in] float32, NaN where a layer has no such dense report,
    pruned mask [n_layers, max d_in] bool), from ``plan.dense_reports`` of any method: the layer × neuron
    picture of where a plan cuts."""
    by_kind: dict[str, list] = {}
    for d in plan.dense_reports:
        by_kind.setdefault(d.kind, []).append(d)
    out = {}
    for kind, reports in by_kind.items():
        width = max(_original_width(d) for d in reports)
        scores = np.full((plan.n_layers, width), np.nan, dtype=np.float32)
        pruned = np.zeros((plan.n_layers, width), dtype=bool)
        for d in reports:
            if d.scores is not None and d.scores.numel():
                # scores come in the dense's kept coordinates; the map (and pruned_index) uses the original ones,
                # so inputs an earlier pruning removed stay NaN
                where = (d.kept_index.cpu().numpy() if d.kept_index is not None
                         else np.arange(d.scores.numel()))
                scores[d.layer, where] = d.scores.detach().double().clamp_min(1e-30).log10().float().cpu().numpy()
            if d.pruned_index is not None and d.pruned_index.numel():
                pruned[d.layer, d.pruned_index.cpu().numpy()] = True
        out[kind] = (scores, pruned)
    return out
