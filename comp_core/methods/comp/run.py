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
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ...math.allocation import (DenseShape, ImpossibleRatioError, choose_cuts, choose_cuts_with_units, layer_ratios,
                          removed_parameters, equal_share_cuts)
from ...loop.capture import FORWARD_DTYPES, BlockInputs, calibration_context, forward_precision, resolve_forward_dtype
from ...events import ProgressCallback, emit
from ...loop.fisher import collect_fisher
from ...math.linalg import damping, damped
from ...loop.blocks import BlockVisit, block_loop
from ...loop.stats import own_gram, own_moments
from ...math.mask_tuning import (choose_ridge, coefficient_matrix, damped_target, mask_path, refit_columns,
                           refit_relative_error, ridge_refit,
                           relative_error, solve_mask, target_terms)
from ...models.adapters import ArchAdapter, get_adapter
from ...loop.importance import RemovalResult, capture_with_importances, iterative_removal, layers_for_ratio, layers_within
from ...results import CompPlan, DenseReport, LayerReport, PruneResult
from ..registry import Method, register_method
from ...runtime import count_parameters, peak_rss_mb
from ...math.scoring import SCORES, score_neurons
from ...models.streaming import is_streamed, resident
from ...models.pruned import head_dim_of
from ...models.structure import AttentionUnits, attention_unit_params, attention_units, dense_by_kind
from ...models.surgery import apply_cuts, remove_attention_units

GRANULARITIES = ("hybrid", "layers", "neurons")
INPUT_MODES = ("identical", "accumulated", "paired")
REFIT_MODES = ("never", "auto", "always", "blend")
ALLOCATIONS = ("variance", "uniform")
O_GRANULARITIES = ("columns", "units")
DEFAULT_DENSE_KINDS = ("down", "o")
# The COMP paper's setting, one flag away (``--paper`` on the command line): its calibration budget, the
# mask tuning of eq. 7 as the only compensation, the diagonal score and one removed layer on this model.
PAPER_SETTINGS = {"refit": "never", "remove_layers": 1, "score": "diag"}
PAPER_CALIBRATION = (10, 128)  # samples × tokens


@dataclass
class CompConfig:
    """Settings of one COMP run. Layer indices are those of the original model.

    The defaults are the measured best within two minutes on two cores (docs/RESULTS.md, "levers": 64 × 512
    C4 tokens, no removed layer, activation score, blend compensation — 58.6 WikiText-2 perplexity at 20 %
    on SmolLM2-135M against 70.4 for the paper's setting); ``PAPER_SETTINGS`` with ``PAPER_CALIBRATION`` is
    the paper's own (10 × 128 tokens, mask tuning, one removed layer, the diagonal score).

    ratio: share of *all* parameters (embeddings included) to remove.
    remove_layers: how many blocks to remove first (at most as many as the ratio's budget holds, so ratio 0
        removes none), "auto" (sweep, keep the lowest calibration loss) or "min" (the default: as few as the
        ratio needs — none when neuron pruning alone reaches it within the caps, as on SmolLM2-135M up to
        ~50 %; with 64 × 512 tokens and the blend, removing one block first measured 61.4 against 58.6).
    protected: blocks never removed and never neuron-pruned; None = first two and last.
    granularity: "hybrid" (COMP), "layers" (layer removal only, as many blocks as the ratio needs),
        "neurons" (no layer removal).
    dense_kinds: which denses may lose input neurons (kinds "q", "k", "v", "o", "gate", "up", "down"; OPT's
        fc1/fc2 are "up"/"down"; fused families' qkv_proj / gate_up_proj are "qkv" / "gate_up", see
        ``models.adapters.REGISTRY``); None = all, as in the paper. The default prunes only the inputs of down
        (with the coupled gate/up rows) and o: on SmolLM2-135M at 20 % pruning every dense measured 341
        perplexity against 69.8 for down+o — the hidden-state inputs of q/k/v/gate/up carry the residual
        stream's outlier features and lose far more per removed parameter.
    mask_tuning: compensate the pruned columns (False = plain removal, for ablations).
    refit: with compensation on, "never" = always the paper's mask tuning; "always" = full least-squares
        refit of the kept columns; "auto" = refit a dense only when calibration has at least
        ``refit_tokens_per_input`` tokens per input column, else mask tuning (too few tokens make the
        refit overfit: shared notes/calibration.md). ``refit_damp`` is its relative damping: a free weight
        per entry needs less than the mask solve (measured 64.3 vs 69.9 perplexity at 1e-3 vs 1e-2).
        "blend" = per dense, the ridge between the two (``mask_tuning.ridge_refit``) whose fit on half of the
        calibration sequences best predicts the other half (``choose_ridge``), or the mask itself if no
        ridge beats it: the rank-aware choice, made from the data instead of a tokens-per-column threshold.
    allocation: how a block's budget is shared by its denses: "variance" (COMP: the smallest variance
        threshold τ of the tuned masks that meets the budget) or "uniform" (ablation: every prunable dense
        loses the same share of its inputs, ``allocation.equal_share_cuts``).
    o_granularity: how o_proj loses inputs: "columns" (one head dimension at a time, the paper) or "units"
        (whole attention units, ``structure.AttentionUnits``: a head, or a KV group under grouped-query
        attention, together with its q/k/v rows; scored by the sum of its columns' scores, its mask-variance
        step taken at unit boundaries). Units free about 2.7× the parameters per o column on SmolLM2
        (q, k and v rows go too) but come 192 columns at a time.
    """

    ratio: float = 0.2
    remove_layers: int | str = "min"
    protected: tuple[int, ...] | None = None
    granularity: str = "hybrid"
    score: str = "activation"  # measured ahead of "diag" at every budget tried (60.2 vs 60.9 at 32 × 512)
    mask_tuning: bool = True
    inputs: str = "identical"
    damp: float = 0.01
    max_dense_ratio: float = 0.9
    layer_cap: float = 0.9
    dense_kinds: tuple[str, ...] | None = DEFAULT_DENSE_KINDS
    refit: str = "default"  # "blend"; "auto" under paired inputs, which cannot hold out folds
    refit_tokens_per_input: float = 8.0
    refit_damp: float = 1e-3
    auto_max_layers: int = 8
    batch_size: int = 4  # calibration sequences per forward: 8 raised the peak RSS by 0.4 GB, no faster
    allocation: str = "variance"  # per-dense cuts: the variance threshold τ, or "uniform" (ablation)
    forward_dtype: str = "auto"  # calibration forwards: "auto" (bf16 autocast where native), "float32", "bfloat16"
    o_granularity: str = "columns"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got '{self.granularity}'")
        if self.inputs not in INPUT_MODES:
            raise ValueError(f"inputs must be one of {INPUT_MODES}, got '{self.inputs}'")
        if self.score not in SCORES:
            raise ValueError(f"unknown importance score '{self.score}'; choose one of: {', '.join(SCORES)}")
        if self.remove_layers not in ("auto", "min") and (
                not isinstance(self.remove_layers, int) or self.remove_layers < 0):
            raise ValueError(f"remove_layers must be a non-negative integer, 'min' or 'auto', got {self.remove_layers!r}")
        if not 0.0 < self.max_dense_ratio < 1.0 or not 0.0 < self.layer_cap < 1.0:
            raise ValueError("max_dense_ratio and layer_cap must be in (0, 1)")
        if self.refit == "default":
            self.refit = "auto" if self.inputs == "paired" else "blend"
        if self.refit not in REFIT_MODES:
            raise ValueError(f"refit must be one of {REFIT_MODES}, got '{self.refit}'")
        if self.refit == "blend" and self.inputs == "paired":
            raise ValueError("refit='blend' chooses its ridge on held-out unpaired statistics; use inputs="
                             "'identical' or 'accumulated' with it")
        if self.forward_dtype not in FORWARD_DTYPES:
            raise ValueError(f"forward_dtype must be one of {FORWARD_DTYPES}, got '{self.forward_dtype}'")
        if self.o_granularity not in O_GRANULARITIES:
            raise ValueError(f"o_granularity must be one of {O_GRANULARITIES}, got '{self.o_granularity}'")
        if self.o_granularity == "units" and self.allocation != "variance":
            raise ValueError("o_granularity='units' shares the layer budget by the variance threshold; "
                             "use allocation='variance' with it")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got '{self.allocation}'")
        if self.damp <= 0 or self.refit_damp <= 0:
            raise ValueError("damp and refit_damp must be > 0")
        if self.protected is not None:
            self.protected = tuple(sorted({int(i) for i in self.protected}))

    def protected_layers(self, n_layers: int) -> set[int]:
        if self.protected is None:
            return {0, 1, n_layers - 1} if n_layers > 3 else {0}
        bad = [i for i in self.protected if not -n_layers <= i < n_layers]
        if bad:
            raise ValueError(f"protected layers {bad} do not exist: the model has layers 0..{n_layers - 1}")
        protected = {i % n_layers for i in self.protected}
        if len(protected) >= n_layers and self.ratio > 0:
            raise ValueError("every layer is protected: nothing can be pruned")
        return protected


# ---------------------------------------------------------------------------------------------------------
# one block: decide the cuts, optionally apply them
# ---------------------------------------------------------------------------------------------------------

def _dense_shapes(block: nn.Module, adapter: ArchAdapter, units: AttentionUnits | None = None) -> list[DenseShape]:
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


def _max_cuts(shapes: list[DenseShape], adapter: ArchAdapter, cfg: CompConfig) -> list[int]:
    """Most input neurons each dense may lose: a share of its inputs, 0 for kinds not being pruned."""
    prunable = prunable_denses(adapter, cfg)
    return [max(0, min(s.d_in - 1, math.floor(cfg.max_dense_ratio * s.d_in))) if spec.name in prunable else 0
            for s, spec in zip(shapes, adapter.denses)]


def _check_dense_kinds(cfg: CompConfig, adapter: ArchAdapter) -> None:
    if cfg.dense_kinds is None:
        return
    kinds = [d.kind for d in adapter.denses]
    unknown = [k for k in cfg.dense_kinds if k not in kinds]
    if unknown or not cfg.dense_kinds:
        raise ValueError(f"dense kinds {unknown or '()'} do not exist in this {adapter.family} model; "
                         f"its denses are: {', '.join(kinds)}")


def prunable_denses(adapter: ArchAdapter, cfg: CompConfig) -> set[str]:
    """The denses that may lose inputs: only theirs are measured and reported (the others keep every input)."""
    return {d.name for d in adapter.denses if cfg.dense_kinds is None or d.kind in cfg.dense_kinds}


def layer_caps(model: nn.Module, cfg: CompConfig) -> list[float]:
    """Most of each block's parameters neuron pruning may remove: min(layer_cap, what its prunable denses
    can give at ``max_dense_ratio``). One entry per block of the model as it is now."""
    adapter = get_adapter(model)
    caps = []
    for block in adapter.blocks(model):
        shapes = _dense_shapes(block, adapter, block_units(block, adapter, cfg, head_dim_of(model.config)))
        params = sum(p.numel() for p in block.parameters())
        caps.append(min(cfg.layer_cap, removed_parameters(shapes, _max_cuts(shapes, adapter, cfg)) / params))
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


def prune_block(block: nn.Module, adapter: ArchAdapter, grams: dict, ratio: float, cfg: CompConfig, *,
                layer_index: int, apply: bool, fisher: dict[str, torch.Tensor] | None = None,
                units: AttentionUnits | None = None) -> tuple[LayerReport, list[DenseReport]]:
    """Decide (and with ``apply`` perform) the input-neuron pruning of one block to ``ratio`` of its params.
    ``units``: o_proj loses whole attention units (``CompConfig.o_granularity``), see ``block_units``."""
    start = time.perf_counter()
    names = [d.name for d in adapter.denses]
    params = sum(p.numel() for p in block.parameters())
    shapes = _dense_shapes(block, adapter, units)  # for the allocation: o_proj counted in units, if any
    columns = _dense_shapes(block, adapter)  # the real input columns
    o_name = dense_by_kind(adapter)["o"] if units is not None else None
    budget = int(round(ratio * params))
    coeffs, orders, paths, moments, targets = [], [], [], [], []
    max_cuts = _max_cuts(shapes, adapter, cfg)
    scores_by_dense = []
    for spec, cap in zip(adapter.denses, max_cuts):
        if spec.name not in grams:  # not prunable, so not measured (``prunable_denses``): keeps every input
            if cap > 0:
                raise ValueError(f"no calibration statistics for the prunable dense {spec.name}")
            for collected in (coeffs, orders, paths, moments, targets, scores_by_dense):
                collected.append(None)
            continue
        module = adapter.dense(block, spec.name)
        gram, cross, target_gram = own_moments(module, grams[spec.name])
        moments.append((gram, cross, target_gram))
        raw = coefficient_matrix(module.weight, gram)
        eps = damping(raw, cfg.damp)
        coeff = damped(raw, cfg.damp)
        del raw
        # paired inputs: b and ‖WX‖² of the unpruned target (None: target and inputs from one stream)
        target = damped_target(*target_terms(module.weight, cross, target_gram), eps) if cross is not None else None
        targets.append(target)
        scores = score_neurons(cfg.score, coeff, module.weight, gram, damp=eps,
                               fisher=fisher.get(spec.name) if fisher else None)
        width = units.head_dim * units.query_heads_per_unit if spec.name == o_name else 1  # columns per step
        order = _unit_order(scores, units) if width > 1 else torch.argsort(scores, stable=True)  # least important first
        coeffs.append(None)  # re-formed below, one dense at a time: a d_in × d_in matrix per dense is the peak
        orders.append(order)
        scores_by_dense.append(scores)
        variance_cuts = cfg.allocation == "variance"
        path = (mask_path(coeff, order, cap * width, rhs=target[0] if target is not None else None)
                if variance_cuts and budget > 0 and cap > 0 else None)
        if path is not None and width > 1:  # the variance after each whole unit
            path = dataclasses.replace(path, variance=path.variance[::width])
        paths.append(path)
        del coeff
    if cfg.allocation == "uniform":  # ablation: the same share of every prunable dense's inputs
        cut = equal_share_cuts(shapes, budget, max_cuts)
    elif budget > 0:
        zero = torch.zeros(1, dtype=torch.float64)
        variances = [p.variance if p is not None else zero for p in paths]
        cut = (choose_cuts_with_units(variances, shapes, budget, names.index(o_name)) if o_name is not None
               else choose_cuts(variances, shapes, budget))
    else:
        cut = choose_cuts([torch.zeros(1)] * len(shapes), shapes, 0)

    reports: list[DenseReport] = []
    removed_columns = [n * units.head_dim * units.query_heads_per_unit if spec.name == o_name else n
                       for spec, n in zip(adapter.denses, cut.removed_inputs)]
    keeps: dict[str, torch.Tensor] = {}
    for spec, shape, order, n_removed in zip(adapter.denses, columns, orders, removed_columns):
        if order is not None:
            keeps[spec.name] = torch.sort(order.flip(0)[: shape.d_in - n_removed]).values  # kept, ascending
    for i, (spec, shape, coeff, order, n_removed) in enumerate(
            zip(adapter.denses, columns, coeffs, orders, removed_columns)):
        if order is None:
            continue
        module = adapter.dense(block, spec.name)
        keep = keeps[spec.name]
        consumer = adapter.coupled_consumer(spec.name)
        gram, cross, target_gram = moments[i]
        target = targets[i]
        # Rows that die with the consumer's removed inputs do not count in this dense's own fit.
        rows = slice(None)
        if consumer is not None and removed_columns[names.index(consumer)] > 0:
            rows = adapter.producer_rows(spec.name, keeps[consumer], columns[names.index(consumer)].d_in)
            raw = coefficient_matrix(module.weight[rows], gram)
            coeff = damped(raw, cfg.damp)
            if target is not None:  # b and ‖WX‖² of the same rows, damped like their C̃
                target = damped_target(*target_terms(module.weight[rows], cross, target_gram), damping(raw, cfg.damp))
            del raw
        else:  # as in the first pass (same operations, same numbers)
            coeff = damped(coefficient_matrix(module.weight, gram), cfg.damp)
        rhs, total = target if target is not None else (None, None)
        indicator = torch.zeros(shape.d_in, dtype=coeff.dtype, device=coeff.device)
        indicator[keep] = 1.0
        err_plain = relative_error(coeff, indicator, rhs, total)
        mask = None
        new_weight = None
        err_tuned = err_plain
        variance = 0.0
        compensation = "none"
        ridge = None
        if n_removed > 0:
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
        pruned = torch.sort(order[:n_removed]).values
        index_map = module.input_index if hasattr(module, "input_index") else None
        reports.append(DenseReport(
            layer=layer_index, name=spec.name, kind=spec.kind, d_in=shape.d_in, d_out=shape.d_out,
            n_removed=n_removed, scores=scores_by_dense[i].float().cpu(),
            pruned_index=(index_map[pruned] if index_map is not None else pruned).cpu(),
            mask_variance=variance, error_no_tuning=err_plain, error_tuned=err_tuned,
            mask=mask.float().cpu() if mask is not None else None, compensation=compensation, ridge=ridge,
            # in the weight's own dtype (surgery casts to it anyway): an analysis keeps one per pruned dense
            new_weight=new_weight.to(module.weight.dtype).cpu() if new_weight is not None else None,
            kept_index=index_map.cpu() if index_map is not None else None))
    if apply:
        realised = apply_block_cuts(block, adapter, keeps, {d.name: d.mask for d in reports},
                                    {d.name: d.new_weight for d in reports}, units)
        assert realised == cut.removed_params, (realised, cut.removed_params)
        for d in reports:  # now in the model: a plan holding every refit weight would be a second pruned model
            d.new_weight = None
    layer = LayerReport(index=layer_index, importance=float("nan"), ratio=ratio, budget=budget,
                        removed_params=cut.removed_params, tau=cut.tau, params=params,
                        seconds=time.perf_counter() - start)
    return layer, reports


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
         inputs: BlockInputs | None = None, removal_depth: int = 0) -> CompPlan:
    adapter = get_adapter(model)
    _check_dense_kinds(cfg, adapter)
    blocks = list(adapter.blocks(model))
    n_layers = len(blocks)
    protected = cfg.protected_layers(n_layers)
    params_total = count_parameters(model)
    block_params = [sum(p.numel() for p in b.parameters()) for b in blocks]
    head_dim = head_dim_of(model.config)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    initial = None  # every block's importance, measured by the capture forward when it runs here
    forward_dtype = resolve_forward_dtype(cfg.forward_dtype, model)
    with calibration_context(model), forward_precision(forward_dtype):
        if inputs is None:
            emit(on_event, "capture", 0, 1, "capturing block inputs and layer importances")
            inputs, initial = capture_with_importances(model, adapter, samples, batch_size=cfg.batch_size)
        timings["capture"] = time.perf_counter() - t0
        candidates = [i for i in range(n_layers) if i not in protected]
        caps = layer_caps(model, cfg)  # before any block is removed: indexed by original layer
        n_remove = _layers_to_remove(cfg, len(candidates), params_total, block_params, lambda: fewest_layers(
            cfg.ratio, params_total, block_params, caps, candidates, candidates))
        if n_remove > len(candidates):
            raise ValueError(f"cannot remove {n_remove} layers: only {len(candidates)} are not protected "
                             f"(protected: {sorted(protected)})")
        t0 = time.perf_counter()
        depth = min(max(n_remove, removal_depth), len(candidates))
        if removal is None or len(removal.removal_order) < depth:
            removal = iterative_removal(blocks, inputs, depth, protected, on_event, initial=initial)
        timings["layer_removal"] = time.perf_counter() - t0
        removed = removal.removed(n_remove)
        active = [i for i in range(n_layers) if i not in removed]
        importances = removal.importances_after(n_remove)
        params_removed = sum(block_params[i] for i in removed)
        if cfg.granularity == "layers":
            prunable = []
        else:
            prunable = [i for i in active if i not in protected]
        budget = cfg.ratio * params_total - params_removed
        if cfg.granularity == "layers":
            budget = 0.0
        try:
            ratios = layer_ratios([importances[i] for i in prunable], [block_params[i] for i in prunable],
                                  budget, cap=[caps[i] for i in prunable])
        except ImpossibleRatioError as err:
            raise ImpossibleRatioError(
                f"ratio {cfg.ratio:.3f} is impossible with {n_remove} removed layers and protected layers "
                f"{sorted(protected)}: {err}") from None
        ratio_of = dict(zip(prunable, ratios))

        plan = CompPlan(
            config=asdict(cfg), n_layers=n_layers, params_total=params_total, layer_params=block_params,
            protected=sorted(protected), initial_importance=[removal.history[0][i] for i in range(n_layers)],
            removal_order=removal.removal_order[:n_remove], importance_history=removal.history[:n_remove + 1],
            removed_layers=removed, layer_ratios=ratio_of, layer_caps=caps, timings=timings, removal=removal)

        if apply and removed:
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
                                               apply=apply, fisher=layer_fisher, units=units)
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
                   stat_folds=2 if cfg.refit == "blend" and cfg.mask_tuning else 0,
                   stat_denses=prunable_denses(adapter, cfg), on_event=on_event,
                   stage="neuron-pruning",
                   describe=lambda i: f"layer {i}: ratio {ratio_of[i]:.3f}" if i in ratio_of else f"layer {i}: kept")
        timings["neuron_pruning"] = time.perf_counter() - t0
    neuron_removed = sum(r.removed_params for r in plan.layer_reports)
    plan.planned_params_after = params_total - params_removed - neuron_removed
    if forward_dtype is not None:
        plan.notes.append(f"calibration forwards in {str(forward_dtype).removeprefix('torch.')} autocast "
                          "(statistics and solves in float32/float64); forward_dtype='float32' to turn it off")
    if plan.compensation_summary():
        plan.notes.append(f"compensation of the pruned denses: {plan.compensation_summary()}")
    return plan


def reallocate(plan: CompPlan, ratio: float, n_remove: int) -> tuple[list[int], dict[int, float]]:
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
            on_event: ProgressCallback | None = None, *, removal_depth: int = 0) -> CompPlan:
    """Everything COMP would do — importances, removal order, per-layer ratios, per-dense scores and cuts —
    without changing the model. With ``remove_layers="auto"``, the plan for the smallest n of the sweep
    (0) is returned; use ``prune`` to run the sweep.

    ``removal_depth``: measure the iterative removal order this many removals deep (``plan.removal``), so a
    what-if over the number of removed layers (``reallocate``) needs no new measurement.
    """
    cfg = cfg or CompConfig()
    if cfg.remove_layers == "auto":
        cfg = _replace(cfg, remove_layers=0)
    return _run(model, samples, cfg, apply=False, on_event=on_event, removal_depth=removal_depth)


def apply_plan(model: nn.Module, plan: CompPlan, *, inplace: bool = False) -> tuple[nn.Module, PruneResult]:
    """Prune ``model`` exactly as an ``analyze`` plan says — removed layers, kept columns, tuned masks or refit
    weights — without measuring anything again. The plan must come from this model (same parameter count
    and layers); with unchanged settings the result equals ``prune``'s."""
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
    if plan.removed_layers:
        adapter.keep_blocks(target, [i for i in range(plan.n_layers) if i not in plan.removed_layers])
    params_after = count_parameters(target)
    if params_after != plan.planned_params_after:
        raise AssertionError(f"the plan promised {plan.planned_params_after} parameters, applying it left {params_after}")
    result = PruneResult(plan=plan, params_before=params_before, params_after=params_after,
                         seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb())
    return target, result


def _replace(cfg: CompConfig, **changes) -> CompConfig:
    values = asdict(cfg)
    values.update(changes)
    return CompConfig(**values)


def prune(model: nn.Module, samples: torch.Tensor, cfg: CompConfig | None = None, *,
          on_event: ProgressCallback | None = None, inplace: bool = False) -> tuple[nn.Module, PruneResult]:
    """Prune ``model`` (a copy unless ``inplace``) with COMP; returns the pruned model and its result."""
    cfg = cfg or CompConfig()
    start = time.perf_counter()
    params_before = count_parameters(model)
    if cfg.remove_layers != "auto" or cfg.granularity != "hybrid":
        target = model if inplace else copy.deepcopy(model)
        plan = _run(target, samples, cfg, apply=True, on_event=on_event)
    else:
        target, plan = _auto_sweep(model, samples, cfg, on_event)
    params_after = count_parameters(target)
    assert params_after == plan.planned_params_after, (params_after, plan.planned_params_after)
    result = PruneResult(plan=plan, params_before=params_before, params_after=params_after,
                         seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb(),
                         extra={"compensation": plan.compensation_summary()})
    return target, result


def _auto_sweep(model, samples, cfg, on_event):
    """Try n = 0, 1, … removed layers; keep the run with the lowest calibration loss.

    Every trial prunes its own copy (``inplace`` cannot apply: trials differ in shape), and the removal
    order is measured once for the largest n, since iterative removal of n layers is a prefix of it.
    """
    from ...evaluate.loss import calibration_loss

    adapter = get_adapter(model)
    blocks = list(adapter.blocks(model))
    protected = cfg.protected_layers(len(blocks))
    params_total = count_parameters(model)
    block_params = [sum(p.numel() for p in b.parameters()) for b in blocks]
    mean_block = sum(block_params) / len(block_params)
    candidates = [i for i in range(len(blocks)) if i not in protected]
    n_max = min(cfg.auto_max_layers, len(candidates), int(cfg.ratio * params_total // mean_block))
    with calibration_context(model), forward_precision(resolve_forward_dtype(cfg.forward_dtype, model)):
        inputs, initial = capture_with_importances(model, adapter, samples, batch_size=cfg.batch_size)
        removal = iterative_removal(blocks, inputs, n_max, protected, on_event, initial=initial)
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
        return analyze(model, samples, settings, on_event)
