"""What the head/channel methods (FLAP, Wanda-sp, magnitude-sp) share: settings, cuts, accounting, surgery.

A method decides, per block, which attention units (``structure.AttentionUnits``: heads, or KV groups in
grouped-query models) and which MLP channels stay; this module turns that decision into the physically
smaller block, the optional compensation and the reports every method returns:

* compensation ``"none"`` — plain removal;
* ``"bias"`` — FLAP's: the removed inputs' calibration mean, pushed through the removed columns, is added to
  the output bias of o_proj / down_proj (a linear without a bias gets one, counted in the ratio);
* ``"mask"`` — COMP's mask tuning: one least-squares scale per kept input column of o_proj / down_proj
  (``mask_tuning.solve_mask`` on C = (WᵀW) ⊙ XXᵀ), folded into the weights.

Ratios are shares of *all* parameters; ``uniform_cuts`` turns one into the same share of every prunable
block's attention and MLP parameters (heads rounded down, as FLAP's reference code does, the MLP taking
the rest of the block's budget).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..math.linalg import damped
from ..math.mask_tuning import bias_compensation, coefficient_matrix, removal_error, solve_mask
from ..models.adapters import ArchAdapter
from ..models.pruned import head_dim_of
from ..results import DenseReport, LayerReport, Plan
from ..loop.stats import InputStats
from ..models.structure import (AttentionUnits, attention_unit_params, attention_units, dense_by_kind, mlp_channel_params,
                         mlp_consumer, mlp_width)
from ..models.surgery import add_output_bias, apply_cuts, remove_attention_units
from .base import protected_layers
from .search.settings import SearchSettings

COMPENSATIONS = ("none", "bias", "mask")


@dataclass
class StructuredSettings(SearchSettings):
    """ratio: share of all parameters to remove. protected: layers left untouched (FLAP and Wanda-sp prune
    every layer, so none by default). compensation: "none", "bias" (FLAP) or "mask" (COMP's mask tuning).
    damp: relative damping of the mask solve. inputs: what the next block is calibrated on. allocation and
    search_*: the per-layer shares, the method's own or searched (``search.settings.SearchSettings``)."""

    ratio: float = 0.2
    protected: tuple[int, ...] = ()
    compensation: str = "none"
    damp: float = 0.01
    inputs: str = "accumulated"  # what the next block is calibrated on (alias: propagation)
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0 or math.isnan(self.ratio):
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.compensation not in COMPENSATIONS:
            raise ValueError(f"compensation must be one of {COMPENSATIONS}, got '{self.compensation}'")
        if self.damp <= 0:
            raise ValueError("damp must be > 0")
        if self.inputs not in ("identical", "accumulated"):
            raise ValueError(f"inputs must be 'identical' or 'accumulated', got '{self.inputs}'")
        self.check_search()
        self.protected = tuple(sorted({int(i) for i in self.protected}))

    def prunable_layers(self, n_layers: int) -> list[int]:
        protected = protected_layers(self.protected, n_layers, ratio=self.ratio)
        return [i for i in range(n_layers) if i not in protected]


@dataclass
class BlockShape:
    """The structured budget of one block: its units and what one of each costs."""

    units: AttentionUnits
    unit_params: int
    channels: int
    channel_params: int
    params: int  # the whole block

    @classmethod
    def of(cls, block: nn.Module, adapter: ArchAdapter, head_dim: int) -> "BlockShape":
        units = attention_units(block, adapter, head_dim)
        return cls(units=units, unit_params=attention_unit_params(block, adapter, units),
                   channels=mlp_width(block, adapter), channel_params=mlp_channel_params(block, adapter),
                   params=sum(p.numel() for p in block.parameters()))

    @property
    def prunable_params(self) -> int:
        """What removing everything but one unit and one channel would take."""
        return (self.units.count - 1) * self.unit_params + (self.channels - 1) * self.channel_params


@dataclass
class BlockCut:
    """One block's decision: kept units and channels (ascending) and the scores behind them (higher = keep)."""

    layer: int
    keep_units: torch.Tensor
    keep_channels: torch.Tensor
    o_scores: torch.Tensor | None = None  # per o_proj input column
    down_scores: torch.Tensor | None = None  # per MLP channel


def keep_top(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Indices of all but the ``n_remove`` lowest scores, ascending (ties: the lower index is removed first)."""
    order = torch.argsort(scores.double().cpu(), stable=True)
    return torch.sort(order[n_remove:]).values


def added_bias_params(block: nn.Module, adapter: ArchAdapter, settings: StructuredSettings) -> int:
    """Parameters bias compensation adds to this block (o_proj and down_proj without a bias get one)."""
    if settings.compensation != "bias":
        return 0
    names = dense_by_kind(adapter)
    return sum(adapter.dense(block, names[k]).weight.shape[0] for k in ("o", "down")
               if adapter.dense(block, names[k]).bias is None)


def uniform_cuts(shapes: dict[int, BlockShape], budget: float) -> dict[int, tuple[int, int]]:
    """(units, channels) to remove per layer for the same share of every layer's prunable parameters, summing
    to ``budget`` parameters: units rounded down (FLAP's ``int(ratio · heads)``), channels fill the rest."""
    total = sum(s.units.count * s.unit_params + s.channels * s.channel_params for s in shapes.values())
    share = budget / total if total else 0.0
    if share > 0 and budget > sum(s.prunable_params for s in shapes.values()):
        raise ValueError(f"cannot remove {budget:,.0f} parameters: the prunable layers can give at most "
                         f"{sum(s.prunable_params for s in shapes.values()):,}")
    out = {}
    for layer, s in shapes.items():
        layer_budget = share * (s.units.count * s.unit_params + s.channels * s.channel_params)
        units = min(int(share * s.units.count), s.units.count - 1)
        channels = round((layer_budget - units * s.unit_params) / s.channel_params)
        out[layer] = (units, max(0, min(channels, s.channels - 1)))
    return out


def _mask_scale(weight: torch.Tensor, stats: InputStats, keep: torch.Tensor, damp: float) -> torch.Tensor:
    coeff = damped(coefficient_matrix(weight, stats.gram), damp)
    return solve_mask(coeff, keep.to(coeff.device))


def apply_block_cut(block: nn.Module, adapter: ArchAdapter, shape: BlockShape, cut: BlockCut,
                    stats: dict[str, InputStats] | None, settings: StructuredSettings
                    ) -> tuple[LayerReport, list[DenseReport]]:
    """Remove what ``cut`` does not keep from ``block`` (in place), with the settings' compensation."""
    start = time.perf_counter()
    names = dense_by_kind(adapter)
    o_name, down_name = names["o"], mlp_consumer(adapter)
    o, down = adapter.dense(block, o_name), adapter.dense(block, down_name)
    units = shape.units
    o_keep = units.q_rows(cut.keep_units)
    o_removed = torch.nonzero(~torch.isin(torch.arange(o.weight.shape[1]), o_keep)).flatten()
    down_removed = torch.nonzero(~torch.isin(torch.arange(down.weight.shape[1]), cut.keep_channels.cpu())).flatten()
    if settings.compensation != "none" and stats is None:
        raise ValueError(f"compensation '{settings.compensation}' needs calibration statistics")
    reports = []
    for name, module, keep, removed, scores, heads in (
            (o_name, o, o_keep, o_removed, cut.o_scores, (units.count - cut.keep_units.numel()) * units.query_heads_per_unit),
            (down_name, down, cut.keep_channels.cpu(), down_removed, cut.down_scores, 0)):
        st = stats[name] if stats is not None else None
        err_plain = err_tuned = float("nan")
        if st is not None:
            err_plain = removal_error(module.weight, st.gram, removed.to(st.gram.device))
            err_tuned = err_plain
        reports.append(DenseReport(
            layer=cut.layer, name=name, kind=adapter.dense_spec(name).kind, d_in=module.weight.shape[1],
            d_out=module.weight.shape[0], n_removed=int(removed.numel()),
            scores=(scores if scores is not None else torch.zeros(module.weight.shape[1])).float().cpu(),
            pruned_index=removed, error_no_tuning=err_plain, error_tuned=err_tuned,
            compensation=settings.compensation if removed.numel() else "none", removed_heads=heads))
    params = sum(p.numel() for p in block.parameters())
    scales: dict[str, torch.Tensor | None] = {o_name: None, down_name: None}
    for report, module, keep, removed in ((reports[0], o, o_keep, o_removed),
                                           (reports[1], down, cut.keep_channels.cpu(), down_removed)):
        if not removed.numel():
            continue
        st = stats[report.name] if stats is not None else None
        if settings.compensation == "bias":
            delta = bias_compensation(module.weight, st.mean, removed.to(st.mean.device))
            add_output_bias(module, delta)
            report.error_tuned = removal_error(module.weight, st.gram, removed.to(st.gram.device),
                                               total=st.total, n_tokens=st.n_tokens)
        elif settings.compensation == "mask":
            scale = _mask_scale(module.weight, st, keep, settings.damp)
            scales[report.name] = scale
            report.mask = scale.float().cpu()
            report.mask_variance = float(scale.var(unbiased=False))
            full = torch.zeros(module.weight.shape[1], dtype=scale.dtype, device=scale.device)
            full[keep.to(scale.device)] = scale
            coeff = coefficient_matrix(module.weight, st.gram)
            report.error_tuned = float((1 - full) @ coeff @ (1 - full)) / max(float(coeff.sum()), 1e-300)
    remove_attention_units(block, adapter, units, cut.keep_units, o_scale=scales[o_name])
    apply_cuts(block, adapter, {down_name: cut.keep_channels}, masks={down_name: scales[down_name]})
    removed_params = params - sum(p.numel() for p in block.parameters())
    layer = LayerReport(index=cut.layer, importance=float("nan"), ratio=removed_params / params, budget=removed_params,
                        removed_params=removed_params, params=params,
                        seconds=time.perf_counter() - start)
    return layer, reports


def block_shapes(model: nn.Module, adapter: ArchAdapter, layers: list[int]) -> dict[int, BlockShape]:
    head_dim = head_dim_of(model.config)
    blocks = adapter.blocks(model)
    return {i: BlockShape.of(blocks[i], adapter, head_dim) for i in layers}


def structured_plan(model: nn.Module, settings, *, method: str, params_total: int, layer_params: list[int],
                    protected: list[int], removed_layers: list[int] | None = None,
                    initial_importance: list[float] | None = None) -> Plan:
    """An empty plan in the shape every method returns; the method fills the reports."""
    config = asdict(settings) if hasattr(settings, "__dataclass_fields__") else dict(settings)
    return Plan(config=config, n_layers=len(layer_params), params_total=params_total,
                    layer_params=layer_params, protected=protected,
                    initial_importance=initial_importance or [], removal_order=list(removed_layers or []),
                    importance_history=[], removed_layers=sorted(removed_layers or []), layer_ratios={},
                    method=method)
