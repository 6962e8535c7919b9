"""COMP: hybrid-granularity post-training structured pruning.

1. capture calibration inputs of block 0 (and every block's kwargs) once;
2. layer importance I_l = 1 − mean cos(x_l, y_l); iteratively remove the least important unprotected block;
3. share the remaining budget over the prunable blocks inversely to importance (eq. 10, ``allocation``);
4. block by block: Grams of every dense's input → neuron scores → exact mask-variance paths →
   smallest variance threshold τ that meets the block's budget → remove columns (and coupled rows),
   folding the least-squares mask into the kept columns;
5. the next block sees the unpruned (layer-removed) model's activations ("identical inputs", the paper's
   default) or the pruned block's ("accumulated": inputs and target both from the pruned model), or
   "paired", the paper's accumulated form (Table III): inputs X̃ from the pruned model, target W X from the
   unpruned one, min ‖W X − Ŵ X̃‖ (``mask_tuning``'s paired terms, ``loop``'s two streams).

``analyze`` runs the same loop without touching weights and returns the plan; ``prune`` applies it.
The settings live in ``config``, the step on one block in ``block``; this module is the run over the model.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict
from typing import Callable

import torch
from torch import nn

from ...events import ProgressCallback, emit
from ...loop.blocks import BlockVisit, block_loop
from ...loop.capture import BlockInputs, calibration_context, forward_precision, resolve_forward_dtype
from ...loop.fisher import collect_fisher
from ...loop.stats import STAT_DTYPE, collect_block_stats
from ...loop.importance import (RemovalResult, capture_with_importances, iterative_removal, layers_for_ratio,
                                layers_within)
from ...loop.similarity import LayerDistanceTally
from ...math.allocation import ImpossibleRatioError, layer_ratios
from ...math.magnitude import entering_scales
from ...models.adapters import get_adapter
from ...models.pruned import head_dim_of
from ...models.streaming import is_streamed, resident
from ...models.structure import attention_units
from ...models.surgery import check_stream_rescale
from ...results import DenseReport, Plan, PruneResult
from ...runtime import available_memory_mb, count_parameters
from ..base import check_dense_kinds, fold_layer_scales, scales_note
from ..registry import Method, finish, register_method
from ..search import SearchSpace, searched_prune
from ..search.settings import SEARCH_INPUTS_NOTE
from .block import apply_block_cuts, block_units, layer_caps, prunable_denses, prune_block, score_block
from .config import CompConfig
from ...evaluate.loss import calibration_loss


def _keep_positions(module: nn.Module, pruned_index: torch.Tensor) -> torch.Tensor:
    """Positions in ``module``'s current weight that a report's ``pruned_index`` (original coordinates for an
    input-indexed dense, current positions otherwise) does not name."""
    width = module.weight.shape[1]
    coords = module.input_index.cpu() if hasattr(module, "input_index") else torch.arange(width)
    return torch.nonzero(~torch.isin(coords, pruned_index.cpu())).flatten()


# ---------------------------------------------------------------------------------------------------------
# the whole model
# ---------------------------------------------------------------------------------------------------------

def fewest_layers(ratio: float, params_total: int, block_params: list[int], caps: list[float],
                  prunable: list[int], candidates: list[int]) -> int:
    """The fewest blocks to remove before ``ratio`` fits within the prunable blocks' caps. Removing a block
    takes its parameters off the budget and its capacity (cap × params) off what neuron pruning can give,
    so each removal closes (1 − cap) of a block; counted with the candidates' mean block and capacity
    (which blocks go is the removal search's choice)."""
    if not candidates:
        return 0
    mean_block = sum(block_params[i] for i in candidates) / len(candidates)
    mean_capacity = sum(caps[i] * block_params[i] for i in candidates) / len(candidates)
    capacity = sum(caps[i] * block_params[i] for i in prunable)
    for n in range(len(candidates) + 1):
        if ratio * params_total - n * mean_block <= (capacity - n * mean_capacity) * (1 + 1e-12):  # as layer_ratios
            return n
    return len(candidates)


def _layers_to_remove(cfg: CompConfig, candidates: int, params_total: int, block_params: list[int],
                      fewest: Callable[[], int] = lambda: 0) -> int:
    if cfg.granularity == "neurons":
        return 0
    if cfg.granularity == "layers":
        return layers_for_ratio(cfg.ratio, params_total, block_params, candidates)
    if cfg.remove_layers == "auto":
        raise AssertionError("auto is resolved by prune()")
    if cfg.remove_layers == "min":
        return layers_within(cfg.ratio, fewest(), params_total, block_params)
    if int(cfg.remove_layers) > candidates:
        raise ValueError(f"cannot remove {cfg.remove_layers} layers: only {candidates} are not protected")
    return layers_within(cfg.ratio, cfg.remove_layers, params_total, block_params)


def _run(model: nn.Module, samples: torch.Tensor, cfg: CompConfig, *, apply: bool,
         on_event: ProgressCallback | None, removal: RemovalResult | None = None,
         inputs: BlockInputs | None = None, removal_depth: int = 0, fit: bool = True) -> Plan:
    """The run in three named stages: capture (block 0's inputs and every block's importance), ``_plan_layers``
    (which blocks go, each prunable block's ratio), ``_prune_neurons`` (the block step over the block loop).

    An analysis that fits nothing (``fit=False``), removes no block and sees identical inputs reads every
    prunable block's statistics in the capture forward itself (``one_pass_blocks``): the block loop would
    replay the very same unpruned blocks on the very same inputs, so one forward serves both."""
    adapter = get_adapter(model)
    check_dense_kinds(cfg.dense_kinds, adapter)
    fit = fit or apply or cfg.inputs != "identical"  # the next block then sees this one pruned: fitted
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    initial = None  # every block's importance, measured by the capture forward when it runs here
    forward_dtype = resolve_forward_dtype(cfg.forward_dtype, model)
    one_pass = one_pass_blocks(model, cfg, removal_depth) if not fit and inputs is None else None
    with calibration_context(model), forward_precision(forward_dtype):
        held: dict[int, dict] = {}
        distance = None  # the layer-distance matrix, from the same capture forward
        if inputs is None:
            emit(on_event, "capture", 0, 1, "reading the calibration text through the model"
                 + (" (layer importances and neuron statistics in one pass)" if one_pass else ""))
            distance = LayerDistanceTally(len(adapter.blocks(model)))
            with _block_stats(model, adapter, cfg, one_pass or []) as held:
                inputs, initial = capture_with_importances(model, adapter, samples, batch_size=cfg.batch_size,
                                                           distance=distance)
        timings["capture"] = time.perf_counter() - t0
        plan = _plan_layers(model, cfg, inputs, initial, removal, removal_depth, timings, on_event)
        plan.fitted = fit
        plan.layer_distance = distance.distances() if distance is not None else None
        if one_pass:
            _decide_neurons(model, cfg, plan, held, on_event)
        else:
            _prune_neurons(model, samples, cfg, plan, inputs, apply=apply, on_event=on_event, fit=fit)
    if forward_dtype is not None:
        plan.notes.append(f"calibration forwards in {str(forward_dtype).removeprefix('torch.')} autocast "
                          "(statistics and solves in float32/float64); forward_dtype='float32' to turn it off")
    if fit and plan.compensation_summary():
        plan.notes.append(f"compensation of the pruned denses: {plan.compensation_summary()}")
    return plan


def _layers_text(layers: list[int]) -> str:
    if not layers:
        return "no whole layer"
    return f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"


def _plan_layers(model: nn.Module, cfg: CompConfig, inputs: BlockInputs, initial: list[float] | None,
                 removal: RemovalResult | None, removal_depth: int, timings: dict[str, float],
                 on_event: ProgressCallback | None) -> Plan:
    """The plan before any neuron is scored: the protected blocks, the blocks removed (iterative cosine
    removal, measured ``removal_depth`` deep), each prunable block's ratio (eq. 10) and cap."""
    blocks = list(get_adapter(model).blocks(model))
    n_layers = len(blocks)
    protected = cfg.protected_layers(n_layers)
    params_total = count_parameters(model)
    block_params = [sum(p.numel() for p in b.parameters()) for b in blocks]
    candidates = [i for i in range(n_layers) if i not in protected]
    caps = layer_caps(model, cfg)  # before any block is removed: indexed by original layer
    n_remove = _layers_to_remove(cfg, len(candidates), params_total, block_params, lambda: fewest_layers(
        cfg.ratio, params_total, block_params, caps, candidates, candidates))
    if n_remove > len(candidates):
        raise ValueError(f"cannot remove {n_remove} layers: only {len(candidates)} are not protected "
                         f"(protected: {sorted(protected)})")
    t0 = time.perf_counter()
    depth = min(max(n_remove, removal_depth), len(candidates))
    if cfg.rescales_layers and depth:
        check_stream_rescale(blocks[0], get_adapter(model))
    if removal is None or len(removal.removal_order) < depth:
        removal = iterative_removal(blocks, inputs, depth, protected, on_event, initial=initial, measured=removal,
                                    rescale=cfg.rescales_layers)
    if (removal.scales is not None) != cfg.rescales_layers:
        raise ValueError("the measured removal order was searched " + ("with" if removal.scales is not None else
                         "without") + " Prune&Comp's rescaling, unlike these settings; measure it again")
    timings["layer_removal"] = time.perf_counter() - t0
    removed = removal.removed(n_remove)
    emit(on_event, "layer-removal", 1, 1, f"the plan removes {_layers_text(removed)}")
    importances = removal.importances_after(n_remove)
    params_removed = sum(block_params[i] for i in removed)
    if cfg.granularity == "layers":
        prunable, budget = [], 0.0
    else:
        prunable = [i for i in range(n_layers) if i not in removed and i not in protected]
        budget = cfg.ratio * params_total - params_removed
    try:
        ratios = layer_ratios([importances[i] for i in prunable], [block_params[i] for i in prunable],
                              budget, cap=[caps[i] for i in prunable])
    except ImpossibleRatioError as err:
        raise ImpossibleRatioError(
            f"ratio {cfg.ratio:.3f} is impossible with {n_remove} removed layers and protected layers "
            f"{sorted(protected)}: {err}") from None
    plan = Plan(
        config=asdict(cfg), n_layers=n_layers, params_total=params_total, layer_params=block_params,
        protected=sorted(protected), initial_importance=[removal.history[0][i] for i in range(n_layers)],
        removal_order=removal.removal_order[:n_remove], importance_history=removal.history[:n_remove + 1],
        removed_layers=removed, layer_ratios=dict(zip(prunable, ratios)), layer_caps=caps, timings=timings,
        removal=removal, layer_scales=removal.scales_after(n_remove))
    plan.planned_params_after = params_total - params_removed  # neuron pruning takes its share off below
    if plan.layer_scales:
        plan.notes.append(scales_note(plan.layer_scales))
    return plan


# statistics held for every block at once by a one-pass analysis: at most this share of the available memory
ONE_PASS_MEMORY_SHARE = 0.25


def one_pass_blocks(model: nn.Module, cfg: CompConfig, removal_depth: int = 0) -> list[int] | None:
    """The blocks whose statistics an unfitted analysis can read in the capture forward, or None where it
    cannot: a plan that removes blocks (the statistics then come from the shortened model), inputs other than
    identical, the Fisher score (its own backward passes), a streamed model, or Grams of every block together
    above ``ONE_PASS_MEMORY_SHARE`` of the available memory (then block by block, as a prune)."""
    if (cfg.inputs != "identical" or cfg.granularity == "layers" or cfg.score == "fisher" or removal_depth
            or cfg.remove_layers == "auto" or is_streamed(model)):
        return None
    adapter = get_adapter(model)
    blocks = list(adapter.blocks(model))
    protected = cfg.protected_layers(len(blocks))
    params_total = count_parameters(model)
    block_params = [sum(p.numel() for p in b.parameters()) for b in blocks]
    candidates = [i for i in range(len(blocks)) if i not in protected]
    caps = layer_caps(model, cfg)
    n_remove = _layers_to_remove(cfg, len(candidates), params_total, block_params, lambda: fewest_layers(
        cfg.ratio, params_total, block_params, caps, candidates, candidates))
    if n_remove:
        return None
    wanted = prunable_denses(adapter, cfg)
    widths = [adapter.dense(blocks[0], g[0]).in_features for g in adapter.input_groups if set(g) & wanted]
    gram_bytes = len(candidates) * sum(w * w for w in widths) * torch.finfo(STAT_DTYPE).bits // 8
    available = available_memory_mb()
    if available is not None and gram_bytes > ONE_PASS_MEMORY_SHARE * available * 2**20:
        return None
    return candidates


@contextlib.contextmanager
def _block_stats(model: nn.Module, adapter, cfg: CompConfig, indices: list[int]):
    """index -> its denses' statistics, gathered while the context is open (every forward of those blocks)."""
    blocks = list(adapter.blocks(model))
    with contextlib.ExitStack() as stack:
        device = lambda b: next(b.parameters()).device  # noqa: E731
        yield {i: stack.enter_context(collect_block_stats(blocks[i], adapter, device(blocks[i]),
                                                          only=prunable_denses(adapter, cfg))) for i in indices}


def _decide_neurons(model: nn.Module, cfg: CompConfig, plan: Plan, held: dict[int, dict],
                    on_event: ProgressCallback | None) -> None:
    """The one-pass analysis's neuron step: every prunable block's scores and cuts from the statistics the
    capture held (no compensation fitted); fills the plan's layer and dense reports."""
    adapter = get_adapter(model)
    blocks = list(adapter.blocks(model))
    head_dim = head_dim_of(model.config)
    importances = plan.importance_history[0]
    t0 = time.perf_counter()
    prunable = list(plan.layer_ratios)
    for step, i in enumerate(prunable):
        units = block_units(blocks[i], adapter, cfg, head_dim)
        layer, dense_reports = prune_block(blocks[i], adapter, held[i], plan.layer_ratios[i], cfg, layer_index=i,
                                           apply=False, units=units, fit=False)
        layer.importance = importances[i]
        plan.layer_reports.append(layer)
        plan.dense_reports.extend(dense_reports)
        held[i] = None  # the Grams are read: free them as we go
        emit(on_event, "neuron-pruning", step + 1, len(prunable),
             f"layer {i}: ratio {plan.layer_ratios[i]:.3f} (decided from the capture's statistics)", layer=i)
    plan.timings["neuron_pruning"] = time.perf_counter() - t0
    plan.planned_params_after -= sum(r.removed_params for r in plan.layer_reports)


def _prune_neurons(model: nn.Module, samples: torch.Tensor, cfg: CompConfig, plan: Plan, inputs: BlockInputs, *,
                   apply: bool, on_event: ProgressCallback | None, fit: bool = True) -> None:
    """The block step (``block.prune_block``) on every prunable block over the block loop, after removing the
    plan's blocks (when applying); fills the plan's layer and dense reports and its parameter count."""
    adapter = get_adapter(model)
    blocks = list(adapter.blocks(model))
    timings = plan.timings
    ratio_of = plan.layer_ratios
    prunable = list(ratio_of)
    active = [i for i in range(plan.n_layers) if i not in plan.removed_layers]
    importances = plan.importance_history[len(plan.removed_layers)]
    head_dim = head_dim_of(model.config)
    if apply and plan.removed_layers:
        adapter.keep_blocks(model, active)
    fisher = None
    if cfg.score == "fisher" and prunable and is_streamed(model):
        raise ValueError("score='fisher' back-propagates through the whole model, which a streamed model never "
                         "holds; choose another score or load the model without streaming (--stream off)")
    if cfg.score == "fisher" and prunable:
        t0 = time.perf_counter()
        with adapter.only_blocks(model, [blocks[i] for i in active]):
            positions = [active.index(i) for i in prunable]
            raw = collect_fisher(model, adapter, samples, positions, on_event)
        fisher = {(active[pos], name): v for (pos, name), v in raw.items()}
        timings["fisher"] = time.perf_counter() - t0

    t0 = time.perf_counter()

    def visit(v: BlockVisit) -> nn.Module | None:
        i = v.index
        if i not in ratio_of:
            return None
        layer_fisher = {name: f for (li, name), f in fisher.items() if li == i} if fisher else None
        units = block_units(v.block, adapter, cfg, head_dim)
        layer, dense_reports = prune_block(v.block, adapter, v.stats, ratio_of[i], cfg, layer_index=i,
                                           apply=apply, fisher=layer_fisher, units=units, fit=fit)
        layer.importance = importances[i]
        plan.layer_reports.append(layer)
        plan.dense_reports.extend(dense_reports)
        if apply:
            return v.block
        if cfg.inputs in ("accumulated", "paired"):  # analysis must predict prune: the next block sees it pruned
            pruned_copy = copy.deepcopy(v.block)
            prune_block(pruned_copy, adapter, v.stats, ratio_of[i], cfg, layer_index=i, apply=True,
                        fisher=layer_fisher, units=units)
            return pruned_copy
        return None

    block_loop(blocks, inputs, active, visit, adapter=adapter, with_stats=lambda i: i in ratio_of,
               propagation=cfg.inputs,
               stat_folds=2 if cfg.refit == "blend" and cfg.mask_tuning and fit else 0,
               stat_denses=prunable_denses(adapter, cfg), on_event=on_event,
               stage="neuron-pruning",
               describe=lambda i: f"layer {i}: ratio {ratio_of[i]:.3f}" if i in ratio_of else f"layer {i}: kept",
               input_scales=entering_scales(active, plan.layer_scales) if plan.layer_scales else None)
    if apply and plan.layer_scales:  # after the loop: it replays the unfolded blocks on the rescaled stream
        fold_layer_scales(blocks, adapter, plan.layer_scales)
    timings["neuron_pruning"] = time.perf_counter() - t0
    plan.planned_params_after -= sum(r.removed_params for r in plan.layer_reports)


def reallocate(plan: Plan, ratio: float, n_remove: int) -> tuple[list[int], dict[int, float]]:
    """What-if without touching the model: removed layers and per-layer ratios for another target ratio or
    number of removed layers, from a plan whose removal path is at least ``n_remove`` long (same protected
    set and caps). Raises ImpossibleRatioError like ``prune`` would."""
    if n_remove > len(plan.removal_order):
        raise ValueError(f"the plan measured only {len(plan.removal_order)} removals; analyze with more")
    removed = sorted(plan.removal_order[:n_remove])
    importances = plan.importance_history[n_remove]
    prunable = [i for i in sorted(importances) if i not in plan.protected]
    budget = ratio * plan.params_total - sum(plan.layer_params[i] for i in removed)
    ratios = layer_ratios([importances[i] for i in prunable], [plan.layer_params[i] for i in prunable], budget,
                          cap=[plan.layer_caps[i] for i in prunable])
    return removed, dict(zip(prunable, ratios))


def analyze(model: nn.Module, samples: torch.Tensor, cfg: CompConfig | None = None,
            on_event: ProgressCallback | None = None, *, removal_depth: int = 0, fit: bool = True) -> Plan:
    """Everything COMP would do — importances, removal order, per-layer ratios, per-dense scores and cuts —
    without changing the model. With ``remove_layers="auto"``, the plan for the smallest n of the sweep
    (0) is returned; use ``prune`` to run the sweep.

    ``removal_depth``: measure the iterative removal order this many removals deep (``plan.removal``), so a
    what-if over the number of removed layers (``reallocate``) needs no new measurement.
    ``fit=False``: decide the cuts but fit no compensation (the views need none; ``apply_plan`` then refuses
    the plan; accumulated and paired inputs fit anyway, the next block sees the fitted one) — with identical inputs and no removed layer, the statistics come from the capture forward
    itself, so the analysis costs about one forward pass plus the scores (``one_pass_blocks``).
    """
    cfg = cfg or CompConfig()
    if cfg.remove_layers == "auto":
        cfg = _replace(cfg, remove_layers=0)
    return _run(model, samples, cfg, apply=False, on_event=on_event, removal_depth=removal_depth, fit=fit)


def apply_plan(model: nn.Module, plan: Plan, *, inplace: bool = False) -> tuple[nn.Module, PruneResult]:
    """Prune ``model`` exactly as an ``analyze`` plan says — removed layers, kept columns, tuned masks or refit
    weights — without measuring anything again. The plan must come from this model (same parameter count
    and layers); with unchanged settings the result equals ``prune``'s."""
    if not plan.fitted:
        raise ValueError("this plan was analysed with fit=False: it decides the cuts but holds no fitted weights; "
                         "prune the model (or analyse with fit=True) to apply it")
    start = time.perf_counter()
    params_before = count_parameters(model)
    adapter = get_adapter(model)
    if params_before != plan.params_total or len(adapter.blocks(model)) != plan.n_layers:
        raise ValueError(f"the plan was made for a model with {plan.params_total:,} parameters in {plan.n_layers} "
                         f"layers, not this one ({params_before:,} in {len(adapter.blocks(model))}); analyse it again")
    target = model if inplace else copy.deepcopy(model)
    blocks = list(adapter.blocks(target))
    by_layer: dict[int, list[DenseReport]] = {}
    for d in plan.dense_reports:
        by_layer.setdefault(d.layer, []).append(d)
    in_units = plan.config.get("o_granularity") == "units"
    for layer, reports in by_layer.items():
        block = blocks[layer]
        with resident(block, modifies=True):
            keeps = {d.name: _keep_positions(adapter.dense(block, d.name), d.pruned_index) for d in reports}
            units = (attention_units(block, adapter, head_dim_of(model.config))
                     if in_units and any(d.kind == "o" for d in reports) else None)
            apply_block_cuts(block, adapter, keeps, {d.name: d.mask for d in reports},
                             {d.name: d.new_weight for d in reports}, units)
    rescaled = plan.removed_layers if plan.config.get("layer_rescale", False) else []
    if set(plan.layer_scales) != set(rescaled):  # a plan changed after its analysis must not fold stale scales
        raise ValueError(f"the plan's Prune&Comp scales are for layers {sorted(plan.layer_scales)}, but it "
                         f"{'removes' if rescaled else 'rescales'} {rescaled or 'none'}; analyse it again")
    fold_layer_scales(blocks, adapter, plan.layer_scales)
    if plan.removed_layers:
        adapter.keep_blocks(target, [i for i in range(plan.n_layers) if i not in plan.removed_layers])
    return target, finish(target, plan, params_before, start)  # the plan's parameter count checked, blocks measured


def _replace(cfg: CompConfig, **changes) -> CompConfig:
    values = asdict(cfg)
    values.update(changes)
    return CompConfig(**values)


def prune(model: nn.Module, samples: torch.Tensor, cfg: CompConfig | None = None, *,
          on_event: ProgressCallback | None = None, inplace: bool = False) -> tuple[nn.Module, PruneResult]:
    """Prune ``model`` (a copy unless ``inplace``) with COMP; returns the pruned model and its result."""
    cfg = cfg or CompConfig()
    if cfg.searched:
        return searched_prune(_search_setup(cfg), model, samples, cfg, on_event=on_event, inplace=inplace)
    start = time.perf_counter()
    params_before = count_parameters(model)
    if cfg.remove_layers != "auto" or cfg.granularity != "hybrid":
        target = model if inplace else copy.deepcopy(model)
        plan = _run(target, samples, cfg, apply=True, on_event=on_event)
    else:
        target, plan = _auto_sweep(model, samples, cfg, on_event)
    result = finish(target, plan, params_before, start)
    result.extra = {"compensation": plan.compensation_summary()}
    return target, result


def _search_setup(cfg: CompConfig):
    """COMP's search space (``methods.search``): one capture forward (block inputs and importances), the layer
    plan (removed blocks, eq. 10's ratio per prunable block — the one-shot allocation — and each block's cap),
    the removed blocks taken out, and the block step (``prune_block``) at any parameter count."""
    def setup(run, samples: torch.Tensor, on_event: ProgressCallback | None) -> SearchSpace:
        model, adapter = run.model, run.adapter
        check_dense_kinds(cfg.dense_kinds, adapter)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        emit(on_event, "capture", 0, 1, "reading the calibration text through the model")
        with forward_precision(resolve_forward_dtype(cfg.forward_dtype, model)):
            inputs, initial = capture_with_importances(model, adapter, samples, batch_size=cfg.batch_size)
        timings["capture"] = time.perf_counter() - t0
        plan = _plan_layers(model, cfg, inputs, initial, None, 0, timings, on_event)
        if cfg.inputs != "identical":
            plan.notes.append(SEARCH_INPUTS_NOTE)
        if plan.layer_scales:  # Prune&Comp folded first: the database's replay and the fitness see the rescaled stream
            fold_layer_scales(run.blocks, adapter, plan.layer_scales)
        if plan.removed_layers:
            adapter.keep_blocks(model, [i for i in range(plan.n_layers) if i not in plan.removed_layers])
        importances = plan.importance_history[len(plan.removed_layers)]
        head_dim = head_dim_of(model.config)

        def layer_context(block: nn.Module, layer: int, stats) -> tuple:
            """The layer's statistics and its scores, once for all its levels (scored on the original block)."""
            return stats, score_block(block, adapter, stats, cfg, block_units(block, adapter, cfg, head_dim))

        def step(block: nn.Module, layer: int, removed: float, context) -> tuple:
            stats, scored = context
            params = sum(p.numel() for p in block.parameters())
            report, denses = prune_block(block, adapter, stats, removed / params, cfg, layer_index=layer, apply=True,
                                         units=block_units(block, adapter, cfg, head_dim), scored=scored)
            report.importance = importances[layer]
            return report, denses

        return SearchSpace(
            inputs=inputs, plan=plan, step=step, layer_context=layer_context,
            one_shot={i: r * plan.layer_params[i] for i, r in plan.layer_ratios.items()},
            capacity={i: plan.layer_caps[i] * plan.layer_params[i] for i in plan.layer_ratios},
            loop_settings={"stat_folds": 2 if cfg.refit == "blend" and cfg.mask_tuning else 0,
                           "stat_denses": prunable_denses(adapter, cfg)})
    return setup


def _auto_sweep(model, samples, cfg, on_event):
    """Try n = 0, 1, … removed layers; keep the run with the lowest calibration loss.

    Every trial prunes its own copy (``inplace`` cannot apply: trials differ in shape), and the removal
    order is measured once for the largest n, since iterative removal of n layers is a prefix of it.
    """
    adapter = get_adapter(model)
    blocks = list(adapter.blocks(model))
    protected = cfg.protected_layers(len(blocks))
    params_total = count_parameters(model)
    block_params = [sum(p.numel() for p in b.parameters()) for b in blocks]
    mean_block = sum(block_params) / len(block_params)
    candidates = [i for i in range(len(blocks)) if i not in protected]
    n_max = min(cfg.auto_max_layers, len(candidates), int(cfg.ratio * params_total // mean_block))
    with calibration_context(model), forward_precision(resolve_forward_dtype(cfg.forward_dtype, model)):
        distance = LayerDistanceTally(len(blocks))
        inputs, initial = capture_with_importances(model, adapter, samples, batch_size=cfg.batch_size,
                                                   distance=distance)
        removal = iterative_removal(blocks, inputs, n_max, protected, on_event, initial=initial,
                                    rescale=cfg.rescales_layers)
    best = None
    sweep = []
    for n in range(n_max + 1):
        emit(on_event, "auto-sweep", n, n_max + 1, f"trying {n} removed layers")
        trial_cfg = _replace(cfg, remove_layers=n)
        trial = copy.deepcopy(model)
        try:
            plan = _run(trial, samples, trial_cfg, apply=True, on_event=on_event, removal=removal,
                        inputs=_rebind(inputs, blocks, list(adapter.blocks(trial))))
        except ImpossibleRatioError as err:
            sweep.append({"remove_layers": n, "calibration_loss": None, "error": str(err)})
            continue
        loss = calibration_loss(trial, samples)
        sweep.append({"remove_layers": n, "calibration_loss": loss})
        if best is None or loss < best[0]:
            best = (loss, trial, plan)
        else:
            del trial
    if best is None:
        raise ImpossibleRatioError(f"no number of removed layers in 0..{n_max} reaches ratio {cfg.ratio}")
    _, target, plan = best
    plan.auto_sweep = sweep
    plan.layer_distance = distance.distances()  # the trials reuse the capture: it measured the matrix once
    emit(on_event, "auto-sweep", n_max + 1, n_max + 1, f"chose {len(plan.removed_layers)} removed layers")
    return target, plan


def _rebind(inputs: BlockInputs, old_blocks: list[nn.Module], new_blocks: list[nn.Module]) -> BlockInputs:
    """Captured inputs re-keyed to a deep copy's block objects (kwargs are shared, not copied)."""
    ids = {id(new): inputs.block_ids[id(old)] for old, new in zip(old_blocks, new_blocks)}
    return BlockInputs(hidden=inputs.hidden, kwargs=inputs.kwargs, block_ids=ids)


# decorators run bottom-up: the registry (and every list of methods) shows "comp" first
@register_method("comp-neurons", summary="COMP ablation: input-neuron pruning with mask tuning, no layer removed",
                 granularity="neurons")
@register_method("comp-layers", summary="COMP ablation: iterative cosine layer removal only", granularity="layers")
@register_method("comp", summary="COMP: iterative layer removal + input-neuron pruning with mask tuning (hybrid)")
class Comp(Method):
    kind = "structured"
    settings_class = CompConfig
    streams = True

    def prune(self, model, samples, settings, *, on_event=None, inplace=False):
        return prune(model, samples, settings, on_event=on_event, inplace=inplace)

    def analyze(self, model, samples, settings, on_event=None):
        plan = analyze(model, samples, settings, on_event)
        if settings.searched:
            plan.notes.append("this analysis shows the one-shot shares (eq. 10); a prune with allocation='search' "
                              "searches them (the plan then records both)")
        return plan

    def search_setup(self, settings):
        return _search_setup(settings)
