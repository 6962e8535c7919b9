"""COMP's step on one block, in four named parts over one record per dense (``DenseStep``):

1. ``score_denses`` — per prunable dense: its Gram (and, with paired inputs, the unpruned target), the
   damped mask-tuning matrix C, neuron scores, the removal order and the mask-variance path;
2. ``choose_block_cuts`` — how many inputs each dense loses: the smallest variance threshold τ that meets
   the block's budget (or the same share of every dense, ``dense_allocation="uniform"``), then ``place_cuts``
   turns those counts into each dense's kept columns;
3. ``compensate`` — the fit of the kept columns (mask tuning, refit or blend) and the dense's report;
4. ``prune_block`` — the three above, the surgery (``apply_block_cuts``) when applying, and the layer report.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ...loop.stats import own_gram, own_moments
from ...math.allocation import (LayerCut, DenseShape, choose_cuts, choose_cuts_with_units, equal_share_cuts,
                                removed_parameters)
from ...math.linalg import damped, damping
from ...math.mask_tuning import (MaskPath, choose_ridge, coefficient_matrix, damped_target, mask_path, refit_columns,
                                 refit_relative_error, relative_error, ridge_refit, solve_mask, target_terms)
from ...math.scoring import score_neurons
from ...models.adapters import ArchAdapter, DenseSpec, get_adapter
from ...models.pruned import head_dim_of
from ...models.structure import AttentionUnits, attention_unit_params, attention_units, dense_by_kind
from ...models.surgery import apply_cuts, remove_attention_units
from ...results import DenseReport, LayerReport
from .config import CompConfig


@dataclass
class DenseStep:
    """One measured dense of one block, as the step goes: filled by ``score_denses``, cut by ``place_cuts``."""

    spec: DenseSpec
    module: nn.Module
    gram: torch.Tensor  # (d_in, d_in) Gram of the inputs it reads
    cross: torch.Tensor | None  # paired inputs: cross moments with the unpruned stream, else None
    target_gram: torch.Tensor | None  # paired inputs: the unpruned stream's Gram, else None
    target: tuple | None  # paired inputs: damped (b, ‖WX‖²) of the unpruned target, else None
    scores: torch.Tensor  # (d_in,) higher = keep
    order: torch.Tensor  # (d_in,) long, least important first
    path: MaskPath | None  # mask variance after each removal step (None: not needed)
    n_removed: int = 0  # input columns it loses
    keep: torch.Tensor | None = None  # (d_in − n_removed,) long: kept columns, ascending


# ---------------------------------------------------------------------------------------------------------
# the block's accounting
# ---------------------------------------------------------------------------------------------------------

def prunable_denses(adapter: ArchAdapter, cfg: CompConfig) -> set[str]:
    """The denses that may lose inputs: only theirs are measured and reported (the others keep every input)."""
    return {d.name for d in adapter.denses if cfg.dense_kinds is None or d.kind in cfg.dense_kinds}


def dense_shapes(block: nn.Module, adapter: ArchAdapter, units: AttentionUnits | None = None) -> list[DenseShape]:
    """Parameter accounting of the block's denses. With attention ``units``, o_proj's entry counts whole
    units: d_in = units, and each removed "input" takes one unit's parameters (its q/k/v rows and o columns)."""
    names = [d.name for d in adapter.denses]
    o_name = dense_by_kind(adapter)["o"] if units is not None else None
    shapes = []
    for spec in adapter.denses:
        module = adapter.dense(block, spec.name)
        if spec.name == o_name:
            shapes.append(DenseShape(d_out=attention_unit_params(block, adapter, units), d_in=units.count,
                                     has_bias=False))
            continue
        consumer = adapter.coupled_consumer(spec.name)
        shapes.append(DenseShape(d_out=module.weight.shape[0], d_in=module.weight.shape[1],
                                 has_bias=module.bias is not None,
                                 consumer=names.index(consumer) if consumer else None,
                                 rows_per_input=spec.row_blocks))
    return shapes


def block_units(block: nn.Module, adapter: ArchAdapter, cfg: CompConfig, head_dim: int) -> AttentionUnits | None:
    """The attention units o_proj loses inputs in, or None when it loses single columns (or is not pruned)."""
    if cfg.o_granularity != "units" or dense_by_kind(adapter)["o"] not in prunable_denses(adapter, cfg):
        return None
    return attention_units(block, adapter, head_dim)


def max_cuts(shapes: list[DenseShape], adapter: ArchAdapter, cfg: CompConfig) -> list[int]:
    """Most input neurons each dense may lose: a share of its inputs, 0 for kinds not being pruned."""
    prunable = prunable_denses(adapter, cfg)
    return [max(0, min(s.d_in - 1, math.floor(cfg.max_dense_ratio * s.d_in))) if spec.name in prunable else 0
            for s, spec in zip(shapes, adapter.denses)]


def layer_caps(model: nn.Module, cfg: CompConfig) -> list[float]:
    """Most of each block's parameters neuron pruning may remove: min(layer_cap, what its prunable denses
    can give at ``max_dense_ratio``). One entry per block of the model as it is now."""
    adapter = get_adapter(model)
    caps = []
    for block in adapter.blocks(model):
        shapes = dense_shapes(block, adapter, block_units(block, adapter, cfg, head_dim_of(model.config)))
        params = sum(p.numel() for p in block.parameters())
        caps.append(min(cfg.layer_cap, removed_parameters(shapes, max_cuts(shapes, adapter, cfg)) / params))
    return caps


def _unit_order(scores: torch.Tensor, units: AttentionUnits) -> torch.Tensor:
    """o_proj columns, least important unit first (unit score = the sum of its columns'), each unit's columns
    together (least important first): a prefix of whole units is then a prefix of this order."""
    of = units.column_units().to(scores.device)
    unit_scores = torch.zeros(units.count, dtype=scores.dtype, device=scores.device).index_add_(0, of, scores)
    rank = torch.empty_like(of)
    rank[torch.argsort(unit_scores, stable=True)] = torch.arange(units.count, device=scores.device)
    within = torch.argsort(scores, stable=True)  # least important column first
    return within[torch.argsort(rank[of][within], stable=True)]


def _unit_width(spec: DenseSpec, units: AttentionUnits | None, o_name: str | None) -> int:
    """Input columns per removal step: a whole attention unit's for o_proj in units, else 1."""
    return units.head_dim * units.query_heads_per_unit if spec.name == o_name else 1


# ---------------------------------------------------------------------------------------------------------
# 1. score
# ---------------------------------------------------------------------------------------------------------

def score_denses(block: nn.Module, adapter: ArchAdapter, grams: dict, cfg: CompConfig, *, budget: int,
                 caps: list[int], units: AttentionUnits | None, fisher: dict[str, torch.Tensor] | None
                 ) -> dict[str, DenseStep]:
    """Every measured dense's record, in the adapter's order: scores, removal order and (when the variance
    rule will choose the cuts) its mask-variance path up to ``caps`` removed inputs."""
    o_name = dense_by_kind(adapter)["o"] if units is not None else None
    steps: dict[str, DenseStep] = {}
    for spec, cap in zip(adapter.denses, caps):
        if spec.name not in grams:  # not prunable, so not measured (``prunable_denses``): keeps every input
            if cap > 0:
                raise ValueError(f"no calibration statistics for the prunable dense {spec.name}")
            continue
        module = adapter.dense(block, spec.name)
        gram, cross, target_gram = own_moments(module, grams[spec.name])
        raw = coefficient_matrix(module.weight, gram)
        eps = damping(raw, cfg.damp)
        coeff = damped(raw, cfg.damp)  # a d_in × d_in matrix per dense is the peak: formed again in ``compensate``
        del raw
        # paired inputs: b and ‖WX‖² of the unpruned target (None: target and inputs from one stream)
        target = damped_target(*target_terms(module.weight, cross, target_gram), eps) if cross is not None else None
        scores = score_neurons(cfg.score, coeff, module.weight, gram, damp=eps,
                               fisher=fisher.get(spec.name) if fisher else None)
        width = _unit_width(spec, units, o_name)
        order = _unit_order(scores, units) if width > 1 else torch.argsort(scores, stable=True)  # least important first
        path = (mask_path(coeff, order, cap * width, rhs=target[0] if target is not None else None)
                if cfg.dense_allocation == "variance" and budget > 0 and cap > 0 else None)
        if path is not None and width > 1:  # the variance after each whole unit
            path = dataclasses.replace(path, variance=path.variance[::width])
        del coeff
        steps[spec.name] = DenseStep(spec=spec, module=module, gram=gram, cross=cross, target_gram=target_gram,
                                     target=target, scores=scores, order=order, path=path)
    return steps


# ---------------------------------------------------------------------------------------------------------
# 2. choose the cuts
# ---------------------------------------------------------------------------------------------------------

def choose_block_cuts(steps: dict[str, DenseStep], shapes: list[DenseShape], budget: int, caps: list[int],
                      cfg: CompConfig, adapter: ArchAdapter, units: AttentionUnits | None) -> LayerCut:
    """Inputs (o_proj in units: whole units) each dense loses for ``budget`` parameters of the block."""
    if cfg.dense_allocation == "uniform":  # ablation: the same share of every prunable dense's inputs
        return equal_share_cuts(shapes, budget, caps)
    if budget <= 0:
        return choose_cuts([torch.zeros(1)] * len(shapes), shapes, 0)
    zero = torch.zeros(1, dtype=torch.float64)
    variances = [steps[d.name].path.variance if d.name in steps and steps[d.name].path is not None else zero
                 for d in adapter.denses]
    if units is None:
        return choose_cuts(variances, shapes, budget)
    names = [d.name for d in adapter.denses]
    return choose_cuts_with_units(variances, shapes, budget, names.index(dense_by_kind(adapter)["o"]))


def place_cuts(steps: dict[str, DenseStep], cut: LayerCut, adapter: ArchAdapter, columns: list[DenseShape],
               units: AttentionUnits | None) -> dict[str, int]:
    """Set every record's ``n_removed`` (input columns) and ``keep``; returns removed columns per dense name."""
    o_name = dense_by_kind(adapter)["o"] if units is not None else None
    removed = {spec.name: n * _unit_width(spec, units, o_name) for spec, n in zip(adapter.denses, cut.removed_inputs)}
    for spec, shape in zip(adapter.denses, columns):
        step = steps.get(spec.name)
        if step is not None:
            step.n_removed = removed[spec.name]
            step.keep = torch.sort(step.order.flip(0)[: shape.d_in - step.n_removed]).values  # kept, ascending
    return removed


# ---------------------------------------------------------------------------------------------------------
# 3. compensate
# ---------------------------------------------------------------------------------------------------------

def compensate(step: DenseStep, steps: dict[str, DenseStep], removed: dict[str, int], columns: list[DenseShape],
               adapter: ArchAdapter, grams: dict, cfg: CompConfig, layer_index: int) -> DenseReport:
    """The fit of ``step``'s kept columns (mask tuning, refit or blend, by ``cfg``) and its report."""
    spec, module, keep = step.spec, step.module, step.keep
    names = [d.name for d in adapter.denses]
    shape = columns[names.index(spec.name)]
    gram, cross, target_gram, target = step.gram, step.cross, step.target_gram, step.target
    consumer = adapter.coupled_consumer(spec.name)
    # Rows that die with the consumer's removed inputs do not count in this dense's own fit.
    rows = slice(None)
    if consumer is not None and removed[consumer] > 0:
        rows = adapter.producer_rows(spec.name, steps[consumer].keep, columns[names.index(consumer)].d_in)
        raw = coefficient_matrix(module.weight[rows], gram)
        coeff = damped(raw, cfg.damp)
        if target is not None:  # b and ‖WX‖² of the same rows, damped like their C̃
            target = damped_target(*target_terms(module.weight[rows], cross, target_gram), damping(raw, cfg.damp))
        del raw
    else:  # as in ``score_denses`` (same operations, same numbers)
        coeff = damped(coefficient_matrix(module.weight, gram), cfg.damp)
    rhs, total = target if target is not None else (None, None)
    indicator = torch.zeros(shape.d_in, dtype=coeff.dtype, device=coeff.device)
    indicator[keep] = 1.0
    err_plain = relative_error(coeff, indicator, rhs, total)
    mask = None
    new_weight = None
    err_tuned = err_plain
    variance = None
    compensation = "none"
    ridge = None
    if step.n_removed > 0:
        kept_mask = solve_mask(coeff, keep, rhs)
        variance = float(kept_mask.var(unbiased=False))
        if cfg.mask_tuning and cfg.refit == "blend":
            anchor = module.weight.detach().to(kept_mask.dtype)[:, keep] * kept_mask  # W_U diag(m_U)
            folds = tuple(own_gram(module, f) for f in grams[spec.name].fold_grams)
            choice = choose_ridge(module.weight, folds, keep, anchor)
            if math.isfinite(choice.ridge):
                ridge = choice.ridge
                new_weight = ridge_refit(module.weight, gram, keep, anchor, ridge)
                err_tuned = refit_relative_error(module.weight[rows], gram, keep, new_weight[rows])
                compensation = "blend"
        use_refit = cfg.refit == "always" or (
            cfg.refit == "auto" and grams[spec.name].n_tokens >= cfg.refit_tokens_per_input * shape.d_in)
        if cfg.mask_tuning and use_refit:  # never with refit="blend"
            new_weight = refit_columns(module.weight, gram, keep, cfg.refit_damp, cross=cross)
            err_tuned = refit_relative_error(module.weight[rows], gram, keep, new_weight[rows], cross=cross,
                                             target_gram=target_gram)
            compensation = "refit"
        elif cfg.mask_tuning and compensation != "blend":  # the mask, also where no ridge beat it
            mask = kept_mask
            full = torch.zeros_like(indicator)
            full[keep] = kept_mask
            err_tuned = relative_error(coeff, full, rhs, total)
            compensation = "mask"
    return dense_report(
        step, shape, layer_index, mask_variance=variance, error_no_tuning=err_plain, error_tuned=err_tuned,
        mask=mask.float().cpu() if mask is not None else None, compensation=compensation, ridge=ridge,
        # in the weight's own dtype (surgery casts to it anyway): an analysis keeps one per pruned dense
        new_weight=new_weight.to(module.weight.dtype).cpu() if new_weight is not None else None)


def dense_report(step: DenseStep, shape: DenseShape, layer_index: int, **fit) -> DenseReport:
    """One dense's report: its scores and pruned inputs (in original coordinates where the source was already
    pruned), plus what its fit gave (``fit``: errors, mask, compensation; none for an unfitted decision)."""
    module = step.module
    pruned = torch.sort(step.order[:step.n_removed]).values
    index_map = module.input_index if hasattr(module, "input_index") else None
    return DenseReport(
        layer=layer_index, name=step.spec.name, kind=step.spec.kind, d_in=shape.d_in, d_out=shape.d_out,
        n_removed=step.n_removed, scores=step.scores.float().cpu(),
        pruned_index=(index_map[pruned] if index_map is not None else pruned).cpu(),
        kept_index=index_map.cpu() if index_map is not None else None, **fit)


# ---------------------------------------------------------------------------------------------------------
# 4. the block
# ---------------------------------------------------------------------------------------------------------

def decided(step: DenseStep, columns: list[DenseShape], adapter: ArchAdapter, layer_index: int) -> DenseReport:
    """The report of a cut decided but not fitted (``prune_block(fit=False)``): scores and the pruned inputs,
    no compensation — what an analysis shows; the fit is the prune's work."""
    shape = columns[[d.name for d in adapter.denses].index(step.spec.name)]
    return dense_report(step, shape, layer_index, error_no_tuning=float("nan"), error_tuned=float("nan"),
                        compensation="not fitted")


def prune_block(block: nn.Module, adapter: ArchAdapter, grams: dict, ratio: float, cfg: CompConfig, *,
                layer_index: int, apply: bool, fisher: dict[str, torch.Tensor] | None = None,
                units: AttentionUnits | None = None, fit: bool = True,
                scored: dict[str, DenseStep] | None = None) -> tuple[LayerReport, list[DenseReport]]:
    """Decide (and with ``apply`` perform) the input-neuron pruning of one block to ``ratio`` of its params.
    ``units``: o_proj loses whole attention units (``CompConfig.o_granularity``), see ``block_units``.
    ``fit=False`` (analysis only): decide the cuts, skip compensating the kept columns.
    ``scored``: ``score_denses`` of this block (or of an identical one, computed with a positive budget), when
    one block is pruned at several ratios (the searched allocation's database): scored once, cut many times."""
    start = time.perf_counter()
    params = sum(p.numel() for p in block.parameters())
    shapes = dense_shapes(block, adapter, units)  # for the allocation: o_proj counted in units, if any
    columns = dense_shapes(block, adapter)  # the real input columns
    budget = int(round(ratio * params))
    caps = max_cuts(shapes, adapter, cfg)
    steps = ({name: dataclasses.replace(step) for name, step in scored.items()} if scored is not None and budget > 0
             else score_denses(block, adapter, grams, cfg, budget=budget, caps=caps, units=units, fisher=fisher))
    cut = choose_block_cuts(steps, shapes, budget, caps, cfg, adapter, units)
    removed = place_cuts(steps, cut, adapter, columns, units)
    if not fit and apply:
        raise ValueError("a block is pruned with its compensation fitted: fit=False is for analyses")
    reports = [compensate(step, steps, removed, columns, adapter, grams, cfg, layer_index) if fit
               else decided(step, columns, adapter, layer_index) for step in steps.values()]
    if apply:
        realised = apply_block_cuts(block, adapter, {name: s.keep for name, s in steps.items()},
                                    {d.name: d.mask for d in reports}, {d.name: d.new_weight for d in reports}, units)
        assert realised == cut.removed_params, (realised, cut.removed_params)
        for d in reports:  # now in the model: a plan holding every refit weight would be a second pruned model
            d.new_weight = None
    layer = LayerReport(index=layer_index, importance=float("nan"), ratio=ratio, budget=budget,
                        removed_params=cut.removed_params, tau=cut.tau, params=params,
                        seconds=time.perf_counter() - start)
    return layer, reports


def score_block(block: nn.Module, adapter: ArchAdapter, grams: dict, cfg: CompConfig,
                units: AttentionUnits | None = None) -> dict[str, DenseStep]:
    """``score_denses`` of ``block`` for any positive budget (the mask-variance path to every dense's cap), to
    hand ``prune_block`` as ``scored`` for each of several ratios."""
    caps = max_cuts(dense_shapes(block, adapter, units), adapter, cfg)
    return score_denses(block, adapter, grams, cfg, budget=1, caps=caps, units=units, fisher=None)


def apply_block_cuts(block: nn.Module, adapter: ArchAdapter, keeps: dict[str, torch.Tensor],
                     masks: dict[str, torch.Tensor | None], new_weights: dict[str, torch.Tensor | None],
                     units: AttentionUnits | None) -> int:
    """``surgery.apply_cuts``, except that with attention ``units`` o_proj's kept columns (whole units) go
    through ``remove_attention_units``, so the removed units' q/k/v rows go too. Returns the parameters gone."""
    o_name = dense_by_kind(adapter)["o"] if units is not None else None
    if o_name not in keeps:
        return apply_cuts(block, adapter, keeps, masks, new_weights)
    keeps = dict(keeps)
    o_keep = keeps.pop(o_name).cpu()
    kept_units = torch.unique(units.column_units()[o_keep])
    if not torch.equal(units.q_rows(kept_units), o_keep):
        raise ValueError(f"{o_name} keeps columns that are not whole attention units")
    gone = apply_cuts(block, adapter, keeps, masks, new_weights)
    return gone + remove_attention_units(block, adapter, units, kept_units, o_scale=masks.get(o_name),
                                         o_weight=new_weights.get(o_name))
