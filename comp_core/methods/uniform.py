"""Uniform structured baselines from FLAP's reference code (lib/prune.py ``prune_wanda_sp`` and
``prune_magnitude_sp``): the same share of heads and MLP channels in every layer, scored per input column
of o_proj and down_proj, a head (here: an attention unit) scoring the sum of its columns.

* **Wanda-sp**: column score = mean over output rows of |W_ij| · ‖X_j‖₂ (with ‖X_j‖₂ over calibration
  tokens; FLAP's ``scaler_row`` is the same up to a constant per dense), calibrated block by block on the
  already pruned model's activations (accumulated inputs), as the reference code does.
* **magnitude-sp**: column score = ‖W_:,j‖₂; needs no calibration data.

Each also comes with COMP's compensation (``+mask``: least-squares mask tuning of the kept columns), so a
comparison can separate the selection from the compensation.
"""
from __future__ import annotations

import torch

from ..loop.blocks import BlockVisit
from ..loop.stats import InputStats
from ..models.structure import dense_by_kind, mlp_consumer
from .base import Run, timed
from .registry import Method, register_method
from ..results import Plan
from .search import SearchSpace, searched_prune
from .search.settings import SEARCH_INPUTS_NOTE
from .structured import (BlockCut, BlockShape, StructuredSettings, added_bias_params, apply_block_cut, block_shapes,
                         keep_top, structured_plan, uniform_cuts)


class UniformStructured(Method):
    """Same share of every prunable layer; subclasses only score input columns."""

    kind = "structured"
    settings_class = StructuredSettings
    uses_activations = True

    def column_scores(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        """One score per input column (higher = keep), float64 (d_in,)."""
        raise NotImplementedError

    def cut_block(self, layer: int, block, adapter, shape: BlockShape, counts: tuple[int, int], stats,
                  settings) -> tuple:
        """Remove ``counts`` = (attention units, MLP channels) of ``block``, the lowest-scored; its reports."""
        names = dense_by_kind(adapter)
        o_name, down_name = names["o"], mlp_consumer(adapter)
        n_units, n_channels = counts
        o = adapter.dense(block, o_name)
        o_scores = self.column_scores(o.weight, stats[o_name] if stats else None)
        unit_scores = torch.zeros(shape.units.count, dtype=o_scores.dtype).index_add_(
            0, shape.units.column_units(), o_scores.cpu())
        down_scores = self.column_scores(adapter.dense(block, down_name).weight, stats[down_name] if stats else None)
        cut = BlockCut(layer, keep_units=keep_top(unit_scores, n_units),
                       keep_channels=keep_top(down_scores, n_channels), o_scores=o_scores, down_scores=down_scores)
        return apply_block_cut(block, adapter, shape, cut, stats, settings)

    def prune(self, model, samples, settings, *, on_event=None, inplace=False):
        if settings.searched:
            return searched_prune(self.search_setup(settings), model, samples, settings, on_event=on_event,
                                  inplace=inplace)
        needs_data = self.uses_activations or settings.compensation != "none"
        if needs_data and samples is None:
            raise ValueError("this method (or its compensation) needs calibration samples")
        run = Run.begin(model, inplace)
        target, adapter, blocks, params_before = run.model, run.adapter, run.blocks, run.params_before
        layers = settings.prunable_layers(len(blocks))
        shapes = block_shapes(target, adapter, layers)
        budget = settings.ratio * params_before + sum(added_bias_params(blocks[i], adapter, settings) for i in layers)
        counts = uniform_cuts(shapes, budget) if settings.ratio > 0 else {i: (0, 0) for i in layers}
        plan = self._plan(run, settings, shapes)

        def cut_block(layer: int, block, stats) -> None:
            report, dense = self.cut_block(layer, block, adapter, shapes[layer], counts[layer], stats, settings)
            plan.layer_reports.append(report)
            plan.dense_reports.extend(dense)
            plan.layer_ratios[layer] = report.ratio

        if needs_data:
            with run.calibration():
                inputs = run.capture(samples, plan, batch_size=settings.batch_size)

                def visit(v: BlockVisit):
                    if v.index not in shapes:
                        return None
                    cut_block(v.index, v.block, v.stats)
                    return v.block

                run.loop(inputs, visit, plan, timing="neuron_pruning", with_stats=lambda i: i in shapes,
                         propagation=settings.inputs, on_event=on_event, stage="neuron-pruning")
        else:  # weights alone decide: no calibration pass at all
            with timed(plan, "neuron_pruning"):
                for layer in layers:
                    cut_block(layer, blocks[layer], None)
        plan.planned_params_after = params_before - sum(r.removed_params for r in plan.layer_reports)
        return target, run.finish(plan)

    def _plan(self, run: Run, settings, shapes: dict) -> Plan:
        return structured_plan(run.model, settings, method=type(self).__name__.lower(), params_total=run.params_before,
                               layer_params=run.layer_params,
                               protected=[i for i in range(len(run.blocks)) if i not in shapes])

    def search_setup(self, settings):
        """The search space: every prunable layer's one-shot removal is the same share of its attention and MLP
        parameters (``uniform_cuts``'s), its capacity all but one unit and one channel; the block step cuts
        the counts ``uniform_cuts`` gives that layer alone for a parameter count."""
        def setup(run: Run, samples, on_event) -> SearchSpace:
            adapter = run.adapter
            layers = settings.prunable_layers(len(run.blocks))
            shapes = block_shapes(run.model, adapter, layers)
            budget = settings.ratio * run.params_before + sum(
                added_bias_params(run.blocks[i], adapter, settings) for i in layers)
            whole = {i: s.units.count * s.unit_params + s.channels * s.channel_params for i, s in shapes.items()}
            share = budget / sum(whole.values())
            plan = self._plan(run, settings, shapes)
            if settings.inputs != "identical":
                plan.notes.append(SEARCH_INPUTS_NOTE)
            inputs = run.capture(samples, plan, batch_size=settings.batch_size, on_event=on_event,
                                 message="reading the calibration text through the model")

            def step(block, layer: int, removed: float, stats) -> tuple:
                counts = uniform_cuts({layer: shapes[layer]}, removed)[layer]
                return self.cut_block(layer, block, adapter, shapes[layer], counts, stats, settings)

            return SearchSpace(inputs=inputs, plan=plan, step=step, one_shot={i: share * whole[i] for i in layers},
                               capacity={i: float(shapes[i].prunable_params) for i in layers})
        return setup


@register_method("wanda-sp+mask", summary="Wanda-sp selection with COMP's mask tuning as compensation",
                 compensation="mask")
@register_method("wanda-sp", summary="Wanda-sp (FLAP's baseline): |W|·‖X‖ per column, same share every layer")
class WandaSP(UniformStructured):
    def column_scores(self, weight, stats):
        x_norm = stats.sq_norms.sqrt()  # (d_in,)
        return (weight.detach().abs().to(x_norm.dtype).to(x_norm.device) * x_norm).mean(dim=0)


@register_method("magnitude-sp+mask", summary="magnitude-sp selection with COMP's mask tuning as compensation",
                 compensation="mask")
@register_method("magnitude-sp", summary="magnitude-sp (FLAP's baseline): ‖W_:,j‖ per column, same share every layer")
class MagnitudeSP(UniformStructured):
    uses_activations = False
    requires_calibration = False

    def column_scores(self, weight, stats):
        return weight.detach().double().norm(dim=0)
