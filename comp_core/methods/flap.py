"""FLAP (An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models", AAAI 2024).

Follows the public reference code (CASIA-IVA-Lab/FLAP ``lib/prune.py``: ``prune_flap`` with metric
``WIFV``, structure ``AL-AM`` and ``compress(..., bias=True)``; ``lib/layerwrapper.py``: ``BiasGPT``):

1. **Statistics** on the *unpruned* model: every block is calibrated on the unpruned model's activations
   (identical inputs), and nothing is pruned before every block has been measured. Per input channel j of
   o_proj and down_proj: the fluctuation f_j = sample variance of the channel over the calibration tokens
   (BiasGPT keeps a running estimate proportional to it; ``InputStats.variance`` is exact) and the mean.
2. **WIFV** metric s_j = f_j · Σ_i W_ij² (squared column norm); o_proj's metric is squared once more, as in
   the reference's attention branch.
3. **AL-AM** (adaptive across layers and modules): each layer's metric row is standardised,
   (s − mean) / std (unbiased), attention channels are averaged into one score per attention unit, MLP
   channels stay single; all units of all layers are ranked together under **one global threshold**: in
   descending score order, the kept units are the prefix whose cumulative parameter cost is nearest to
   what the target leaves (the reference's ``argmin |cumsum(compression_weight) − total·(1 − ratio)|``).
4. **Bias compensation**: the removed channels' mean input, pushed through the removed columns, is added
   to the output bias of o_proj / down_proj (``(mean · ~mask) @ Wᵀ``); a linear without a bias gets one.

Where this differs from the reference, and why:

* **Exact costs and ratio.** ``ratio`` is the share of *all* parameters (embeddings included) removed,
  and the bias parameters the compensation adds are counted: the units removed must cost
  ratio · params + added biases. Every unit weighs its exact parameter count (``BlockShape.unit_params``,
  ``channel_params``) instead of the reference's 512/3 per head vs 1 per channel (LLaMA-7B's ratio).
* **Attention units.** In a multi-head model a unit is one head, as in the reference. In a grouped-query
  model (SmolLM2-135M: 9 query heads over 3 KV heads) a unit is a whole **KV group** (its k/v head and the
  query heads that read it; score = mean of its o_proj channels' standardised metric): removing whole
  groups keeps the stock attention and the export uniform (``comp_core.models.structure``).
* **At least one attention unit and one MLP channel stay in every block**: the reference can empty a
  block, but a stock attention cannot run without heads. The best-scoring unit and channel of each block
  rank first; their cost counts as kept.
* **The threshold unit is kept.** The reference keeps scores strictly above the unit where the cumulative
  cost is nearest the target, so the unit whose cost was counted as kept is removed (at ratio 0 it still
  removes one unit). Here the kept set is exactly the counted prefix, so ratio 0 is the identity and the
  removed parameters are within half a unit's cost of the target.
* **Two calibration passes.** The selection is global, but keeping every block's Grams until then would
  cost gigabytes (d² float64 per dense). The first pass keeps only the per-channel metrics; the second
  replays the same captured inputs, and with identical propagation each block sees exactly the inputs
  of the first pass, so its means (for the bias) and Grams (for the error reports) are the same ones.
  With ``inputs="accumulated"`` (not FLAP's) the second pass measures the means on the already
  pruned model instead; the selection always comes from the unpruned model.

The plan's ``DenseReport.scores`` hold the raw (unstandardised, unsquared) WIFV metric of every o_proj /
down_proj input column, so the GUI's log-scale heatmaps can show it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..loop.blocks import BlockVisit
from ..models.structure import AttentionUnits, dense_by_kind, mlp_consumer
from ..results import Plan
from .base import Run, timed
from .registry import Method, register_method
from .search import SearchSpace, searched_prune
from .structured import BlockCut, BlockShape, StructuredSettings, apply_block_cut, block_shapes, structured_plan

BIAS_ROUNDS = 4  # fixed-point rounds for the added-bias accounting (settles in two in practice)


@dataclass
class FlapSettings(StructuredSettings):
    """FLAP's defaults: bias compensation, every block calibrated on the unpruned model, no layer protected."""

    compensation: str = "bias"
    inputs: str = "identical"


# ---------------------------------------------------------------------------------------------------------
# pure functions: metric, standardisation, unit scores, global selection
# ---------------------------------------------------------------------------------------------------------

def wifv(weight: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """WIFV per input column: variance_j · Σ_i W_ij² — (d_out, d_in), (d_in,) -> (d_in,) float64."""
    w = weight.detach().to(device=variance.device, dtype=torch.float64)  # (d_out, d_in)
    return variance.to(torch.float64) * w.pow(2).sum(dim=0)


def standardise(metric: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std over one layer's metric (unbiased std, as ``torch.std``); all zeros when the std is 0."""
    x = metric.to(torch.float64)
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    if not bool(std > 0):
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def unit_scores(column_scores: torch.Tensor, units: AttentionUnits) -> torch.Tensor:
    """Mean of every attention unit's o_proj column scores: (heads · head_dim,) -> (units,)."""
    index = units.column_units().to(column_scores.device)
    sums = torch.zeros(units.count, dtype=column_scores.dtype, device=column_scores.device)
    sums.index_add_(0, index, column_scores)
    return sums / torch.bincount(index, minlength=units.count).to(sums.dtype)


def select_global(scores: torch.Tensor, costs: torch.Tensor, remove: float,
                  forced: torch.Tensor | None = None) -> torch.Tensor:
    """FLAP's global threshold: which units stay (bool, like ``scores``) when about ``remove`` cost must go.

    Units are ranked by score, descending (stable; ``forced`` units first); the kept set is the prefix whose
    cumulative cost is nearest to ``costs.sum() − remove`` (the first such prefix on a tie), never shorter
    than the forced units. ``scores``/``costs``/``forced``: (n,) float, (n,) float, (n,) bool.
    """
    ranked = torch.where(forced, torch.inf, scores.double()) if forced is not None else scores.double()
    order = torch.sort(ranked, descending=True, stable=True).indices  # (n,)
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(costs.double()[order], 0)])  # (n + 1,)
    target = float(costs.double().sum()) - remove
    n_forced = int(forced.sum()) if forced is not None else 0
    n_keep = n_forced + int(torch.argmin((cum[n_forced:] - target).abs()))
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[order[:n_keep]] = True
    return keep


def flap_scores(o_metric: torch.Tensor, down_metric: torch.Tensor, units: AttentionUnits
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's AL-AM scores from its raw WIFV metrics: attention units (the o_proj metric squared,
    standardised, averaged per unit) and MLP channels (standardised): (units,), (channels,) float64."""
    return unit_scores(standardise(o_metric.pow(2)), units), standardise(down_metric)


# ---------------------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------------------

@dataclass
class _LayerMetrics:
    """What the statistics pass keeps of one block: the raw WIFV of o_proj and down_proj input columns."""

    o: torch.Tensor  # (heads · head_dim,) float64, not squared
    down: torch.Tensor  # (mlp width,) float64


def _bias_params(module: nn.Module) -> int:
    return module.weight.shape[0] if module.bias is None else 0


@register_method("flap", summary="FLAP: fluctuation (WIFV) scores, one adaptive threshold over all layers "
                                 "and modules, bias compensation")
class Flap(Method):
    kind = "structured"
    settings_class = FlapSettings

    def prune(self, model, samples, settings, *, on_event=None, inplace=False):
        if samples is None:
            raise ValueError("FLAP needs calibration samples")
        if settings.searched:
            return searched_prune(self.search_setup(settings), model, samples, settings, on_event=on_event,
                                  inplace=inplace)
        run = Run.begin(model, inplace)
        target, adapter, blocks, params_before = run.model, run.adapter, run.blocks, run.params_before
        shapes, plan = self._begin(run, settings)
        with run.calibration():
            inputs, metrics = self._measure(run, samples, settings, shapes, plan, on_event)
            with timed(plan, "selection"):
                cuts = select_cuts(metrics, shapes, blocks, adapter, settings.ratio * params_before, settings)

            def cut(v: BlockVisit):
                if v.index not in cuts:
                    return None
                report, dense = apply_block_cut(v.block, adapter, shapes[v.index], cuts[v.index], v.stats, settings)
                plan.layer_reports.append(report)
                plan.dense_reports.extend(dense)
                plan.layer_ratios[v.index] = report.ratio
                return v.block

            run.loop(inputs, cut, plan, timing="neuron_pruning", with_stats=lambda i: i in cuts,
                     propagation=settings.inputs, on_event=on_event, stage="neuron-pruning",
                     describe=lambda i: (f"layer {i}: keep {cuts[i].keep_units.numel()}/{shapes[i].units.count} "
                                         f"units, {cuts[i].keep_channels.numel()}/{shapes[i].channels} channels")
                     if i in cuts else f"layer {i}: kept")
        plan.planned_params_after = params_before - sum(r.removed_params for r in plan.layer_reports)
        return target, run.finish(plan)

    @staticmethod
    def _begin(run: Run, settings) -> tuple[dict[int, BlockShape], Plan]:
        layers = settings.prunable_layers(len(run.blocks))
        shapes = block_shapes(run.model, run.adapter, layers)
        plan = structured_plan(run.model, settings, method="flap", params_total=run.params_before,
                               layer_params=run.layer_params,
                               protected=[i for i in range(len(run.blocks)) if i not in shapes])
        plan.notes.append("attention units: " + ("KV groups (grouped-query attention)"
                                                 if any(s.units.grouped for s in shapes.values()) else "heads"))
        plan.notes.append("every block keeps at least one attention unit and one MLP channel")
        plan.notes.append("dense scores: raw WIFV (variance × squared column norm); o_proj is ranked by its square")
        return shapes, plan

    @staticmethod
    def _measure(run: Run, samples, settings, shapes: dict[int, BlockShape], plan, on_event):
        """The statistics pass on the unpruned model: block inputs and every prunable layer's WIFV metrics."""
        adapter = run.adapter
        names = dense_by_kind(adapter)
        o_name, down_name = names["o"], mlp_consumer(adapter)
        metrics: dict[int, _LayerMetrics] = {}

        def measure(v: BlockVisit) -> None:
            if v.index not in shapes:  # protected
                return None
            metrics[v.index] = _LayerMetrics(
                o=wifv(adapter.dense(v.block, o_name).weight, v.stats[o_name].variance).cpu(),
                down=wifv(adapter.dense(v.block, down_name).weight, v.stats[down_name].variance).cpu())
            return None  # nothing changes in the statistics pass

        inputs = run.capture(samples, plan, batch_size=settings.batch_size, on_event=on_event,
                             message="capturing block inputs")
        run.loop(inputs, measure, plan, timing="statistics", with_stats=lambda i: i in shapes,
                 propagation="identical", on_event=on_event, stage="calibration",
                 describe=lambda i: f"layer {i}: fluctuation statistics")
        return inputs, metrics

    def search_setup(self, settings):
        """FLAP's search space: the statistics pass, the global AL-AM threshold's removal per layer as the one-shot
        allocation; the block step removes a parameter count from one layer by the same ranking within it."""
        def setup(run: Run, samples, on_event) -> SearchSpace:
            shapes, plan = self._begin(run, settings)
            inputs, metrics = self._measure(run, samples, settings, shapes, plan, on_event)
            cuts = select_cuts(metrics, shapes, run.blocks, run.adapter, settings.ratio * run.params_before, settings)
            one_shot = {i: float(_gross_removed(shapes[i], cuts[i])) for i in shapes}

            def step(block, layer: int, removed: float, stats) -> tuple:
                cut = layer_cut(layer, metrics[layer], shapes[layer], removed)
                return apply_block_cut(block, run.adapter, shapes[layer], cut, stats, settings)

            return SearchSpace(inputs=inputs, plan=plan, step=step, one_shot=one_shot,
                               capacity={i: float(shapes[i].prunable_params) for i in shapes})
        return setup


def _gross_removed(shape: BlockShape, cut: BlockCut) -> int:
    """Parameters a cut's removed units and channels hold (before any bias the compensation adds)."""
    return ((shape.units.count - cut.keep_units.numel()) * shape.unit_params
            + (shape.channels - cut.keep_channels.numel()) * shape.channel_params)


def layer_cut(layer: int, metrics: _LayerMetrics, shape: BlockShape, remove: float) -> BlockCut:
    """One layer's AL-AM selection alone, removing ``remove`` parameters to within half an MLP channel.

    The attention units go by the joint ranking of units and channels (standardised scores, as
    ``select_global`` ranks them over all layers): the lowest-ranked items are removed while their cost fits
    in ``remove``. The MLP channels then fill what is left, lowest-ranked first. An attention unit is worth
    hundreds of channels (~295 k parameters on SmolLM2), so the nearest prefix alone would round whole layers
    by up to half a unit; where ``remove`` is the cost of a prefix (the global threshold's own removal) both
    rules agree. The best unit and the best channel are always kept.
    """
    units, channels = flap_scores(metrics.o, metrics.down, shape.units)
    units, channels = units.cpu(), channels.cpu()
    n_units = units.numel()
    forced = torch.zeros(n_units + channels.numel(), dtype=torch.bool)
    forced[int(torch.argmax(units))] = True
    forced[n_units + int(torch.argmax(channels))] = True
    costs = torch.cat([torch.full((n_units,), float(shape.unit_params), dtype=torch.float64),
                       torch.full((channels.numel(),), float(shape.channel_params), dtype=torch.float64)])
    ranked = torch.where(forced, torch.inf, torch.cat([units, channels]).double())
    removal_order = torch.sort(ranked, descending=False, stable=True).indices  # lowest first
    fits = torch.cumsum(costs[removal_order], 0) <= remove + 0.5  # the prefix whose whole cost fits
    fitting = removal_order[:int(fits.sum())]
    removed_units = fitting[fitting < n_units]
    keep_units = torch.ones(n_units, dtype=torch.bool)
    keep_units[removed_units] = False
    rest = remove - removed_units.numel() * shape.unit_params
    n_channels = min(max(0, round(rest / shape.channel_params)), channels.numel() - 1)
    channel_order = torch.sort(channels.double(), descending=True, stable=True).indices  # best first
    keep_channels = torch.sort(channel_order[:channels.numel() - n_channels]).values
    return BlockCut(layer, keep_units=torch.nonzero(keep_units).flatten(), keep_channels=keep_channels,
                    o_scores=metrics.o, down_scores=metrics.down)


def select_cuts(metrics: dict[int, _LayerMetrics], shapes: dict[int, BlockShape], blocks: list[nn.Module],
                adapter, remove: float, settings: StructuredSettings) -> dict[int, BlockCut]:
    """One global AL-AM selection over every prunable layer's attention units and MLP channels, removing
    ``remove`` parameters net of the biases the compensation adds; returns each layer's ``BlockCut``."""
    layers = sorted(shapes)
    names = dense_by_kind(adapter)
    o_name, down_name = names["o"], mlp_consumer(adapter)
    layer_scores = {layer: flap_scores(metrics[layer].o, metrics[layer].down, shapes[layer].units)
                    for layer in layers}
    scores, costs, forced, owner = [], [], [], []  # owner: (layer, "unit"/"channel", count)
    for position, kind in enumerate(("unit", "channel")):  # all attention scores, then all MLP scores
        for layer in layers:
            shape, s = shapes[layer], layer_scores[layer][position].cpu()  # layers may sit on several GPUs
            cost = shape.unit_params if kind == "unit" else shape.channel_params
            top = torch.zeros(s.numel(), dtype=torch.bool)
            top[int(torch.argmax(s))] = True  # torch.argmax: the first maximum
            scores.append(s)
            costs.append(torch.full((s.numel(),), float(cost), dtype=torch.float64))
            forced.append(top)
            owner.append((layer, kind, s.numel()))
    scores_all, costs_all, forced_all = torch.cat(scores), torch.cat(costs), torch.cat(forced)
    capacity = float(costs_all[~forced_all].sum())

    def biases(keep: torch.Tensor) -> int:
        total, offset = 0, 0
        for layer, kind, n in owner:
            if settings.compensation == "bias" and not bool(keep[offset:offset + n].all()):
                total += _bias_params(adapter.dense(blocks[layer], o_name if kind == "unit" else down_name))
            offset += n
        return total

    added = 0
    keep = torch.ones(scores_all.numel(), dtype=torch.bool)
    for _ in range(BIAS_ROUNDS if remove > 0 else 0):
        goal = remove + added
        if goal > capacity:
            raise ValueError(f"cannot remove {goal:,.0f} parameters: the prunable layers can give at most "
                             f"{capacity:,.0f} (every block keeps one attention unit and one MLP channel)")
        keep = select_global(scores_all, costs_all, goal, forced_all)
        now = biases(keep)
        if now == added:
            break
        added = now

    keep_of: dict[tuple[int, str], torch.Tensor] = {}
    offset = 0
    for layer, kind, n in owner:
        keep_of[(layer, kind)] = torch.nonzero(keep[offset:offset + n]).flatten()
        offset += n
    return {layer: BlockCut(layer, keep_units=keep_of[(layer, "unit")], keep_channels=keep_of[(layer, "channel")],
                            o_scores=metrics[layer].o, down_scores=metrics[layer].down) for layer in layers}
