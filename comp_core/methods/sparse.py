"""Masks inside every linear of every block: magnitude, Wanda, SparseGPT and APT (RIA lives in ``ria``).

Per decoder block, sequentially, on the captured calibration inputs with the already pruned earlier blocks
(``loop.block_loop`` with accumulated propagation, as Wanda's and SparseGPT's reference loops do): one
statistics pass per block (the Gram of every dense input, shared by denses that read the same tensor),
then every dense gets its mask (and, for the OBS methods, its compensated weights). Embeddings and the LM
head stay dense. Nothing is physically removed, so the realised ratio is 0; the result reports the sparsity
over the pruned linears and the share of all parameters that are zero.

* ``magnitude`` — |W|, compared over the whole matrix (wanda's ``prune_magnitude``); no data.
* ``wanda`` — |W_ij| · ‖X_j‖₂, compared within each output row (locuslab/wanda ``prune_wanda``).
* ``sparsegpt`` / ``apt`` — ``comp_core.math.obs_solvers`` (block size 128, damping 1 % of the mean Hessian diagonal).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..loop.blocks import BlockVisit
from ..models.adapters import get_adapter
from ..math.obs_solvers import apt, reconstruction_error, sparsegpt
from ..results import DenseReport, LayerReport, Plan
from ..math.sparsity import SparsityPattern, pattern_mask, zero_counts
from ..loop.stats import InputStats, own_gram
from ..models.surgery import apply_input_order
from .base import Run, check_dense_kinds, protected_layers, timed
from .registry import Method, register_method
from .search import SearchSettings, SearchSpace, searched_prune
from .search.settings import SEARCH_INPUTS_NOTE
from .structured import structured_plan


@dataclass
class SparseSettings(SearchSettings):
    """sparsity: "0.5" (any share in [0, 1)), "2:4" or "4:8". protected: blocks left dense. dense_kinds: which
    linears get masks (None = all of q/k/v/o/gate/up/down). percdamp/blocksize: the OBS solvers'."""

    sparsity: str = "0.5"
    protected: tuple[int, ...] = ()
    dense_kinds: tuple[str, ...] | None = None
    percdamp: float = 0.01
    blocksize: int = 128
    batch_size: int = 8
    inputs: str = "accumulated"  # what the next block is calibrated on (alias: propagation)

    def __post_init__(self) -> None:
        self.sparsity = SparsityPattern.parse(self.sparsity).label
        if self.percdamp <= 0 or math.isnan(self.percdamp):
            raise ValueError("percdamp must be > 0")
        if self.blocksize < 1:
            raise ValueError("blocksize must be >= 1")
        if self.inputs not in ("identical", "accumulated"):
            raise ValueError(f"inputs must be 'identical' or 'accumulated', got '{self.inputs}'")
        self.check_search()
        self.protected = tuple(sorted({int(i) for i in self.protected}))

    @property
    def pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.sparsity)


@dataclass
class BlockMasks:
    """What masking one block did: its reports, the masked linears, column orders (RIA) and odd-width tails."""

    layer: int
    report: LayerReport | None = None
    denses: list[DenseReport] = field(default_factory=list)
    linears: list[nn.Module] = field(default_factory=list)
    orders: list[tuple[int, str, torch.Tensor]] = field(default_factory=list)
    reports: list[dict] = field(default_factory=list)
    tails: int = 0


@dataclass
class MaskedWeight:
    weight: torch.Tensor  # new weight (pruned entries 0), the dense's dtype
    mask: torch.Tensor  # bool, True = pruned
    scores: torch.Tensor | None = None  # what ranked the weights, for reports (d_out, d_in)
    # Stored column order (stored position -> original input), when the mask holds its pattern only in that
    # order (RIA's channel permutation); the dense is re-laid out after the loop (``surgery.apply_input_order``).
    input_order: torch.Tensor | None = None
    report: dict | None = None  # per-dense facts for ``summarize`` (e.g. retained importance)


class MaskMethod(Method):
    """Masks every selected dense of every block; subclasses decide one dense's mask and weight."""

    kind = "unstructured"
    settings_class = SparseSettings
    uses_activations = True

    def mask_dense(self, weight: torch.Tensor, stats: InputStats | None, gram: torch.Tensor | None,
                   pattern: SparsityPattern, settings) -> MaskedWeight:
        raise NotImplementedError

    def summarize(self, reports: list[dict], pattern: SparsityPattern) -> tuple[dict, list[str]]:
        """Method-specific ``result.extra`` entries and plan notes from the per-dense ``report`` dicts."""
        return {}, []

    def relayout(self, model: nn.Module, orders: list[tuple[int, str, torch.Tensor]]) -> None:
        """Store each reordered dense in its mask's column order. Changes no output, so doing it after the
        loop (every later block was calibrated on the masked weights in original order) is equivalent."""
        adapter = get_adapter(model)
        blocks = list(adapter.blocks(model))
        for layer, name, order in orders:
            d_in = adapter.dense(blocks[layer], name).weight.shape[1]
            full = torch.cat([order.cpu(), torch.arange(order.numel(), d_in)])  # a ragged tail stays in place
            apply_input_order(blocks[layer], adapter, name, full)

    def _pattern_for(self, weight: torch.Tensor, pattern: SparsityPattern) -> tuple[SparsityPattern, int]:
        """N:M over the columns that fill whole groups; the < M tail columns of an odd width stay dense."""
        if not pattern.is_nm:
            return pattern, weight.shape[1]
        return pattern, weight.shape[1] - weight.shape[1] % pattern.m

    def mask_block(self, layer: int, block: nn.Module, stats: dict[str, InputStats] | None, specs: list,
                   pattern: SparsityPattern, settings, adapter, params: int) -> BlockMasks:
        """Every selected dense of ``block`` masked to ``pattern`` (in place), and what that did."""
        t0 = time.perf_counter()
        out = BlockMasks(layer=layer)
        zeroed = 0
        for spec in specs:
            module = adapter.dense(block, spec.name)
            weight = module.weight.data
            _, width = self._pattern_for(weight, pattern)
            st = stats[spec.name] if stats is not None else None
            gram = own_gram(module, st.gram) if st is not None else None
            part = slice(0, width)
            result = self.mask_dense(weight[:, part], st, gram[part, part] if gram is not None else None,
                                     pattern, settings)
            if width < weight.shape[1]:
                out.tails += 1
            before = weight.clone() if gram is not None else None
            weight[:, part] = result.weight.to(weight.dtype)
            mask = result.mask
            zeroed += int(mask.sum())
            out.linears.append(module)
            order = result.input_order
            reordered = order is not None and not torch.equal(order.cpu(), torch.arange(order.numel()))
            if reordered:
                out.orders.append((layer, spec.name, order))
            if result.report is not None:
                out.reports.append({"layer": layer, "name": spec.name, "permuted": reordered, **result.report})
            err = reconstruction_error(before, weight, gram) if gram is not None else float("nan")
            out.denses.append(DenseReport(
                layer=layer, name=spec.name, kind=spec.kind, d_in=weight.shape[1], d_out=weight.shape[0],
                n_removed=0, scores=mask.float().mean(dim=0).cpu(), pruned_index=torch.zeros(0, dtype=torch.long),
                error_no_tuning=err, error_tuned=err, sparsity=float(mask.float().mean())))
        out.report = LayerReport(index=layer, importance=float("nan"), ratio=zeroed / params, budget=zeroed,
                                 removed_params=0, params=params, sparsity=zeroed / params,
                                 seconds=time.perf_counter() - t0)
        return out

    def _begin(self, run: Run, settings) -> tuple[set[int], list, Plan]:
        protected = protected_layers(settings.protected, len(run.blocks))
        kinds = settings.dense_kinds
        check_dense_kinds(kinds, run.adapter, allow_empty=True)
        specs = [d for d in run.adapter.denses if kinds is None or d.kind in kinds]
        plan = structured_plan(run.model, settings, method=type(self).__name__.lower(),
                               params_total=run.params_before, layer_params=run.layer_params,
                               protected=sorted(protected))
        return protected, specs, plan

    def _finish(self, run: Run, plan: Plan, masks: list[BlockMasks], pattern: SparsityPattern):
        """The shared tail: re-lay out permuted denses, count the zeros, notes and extras."""
        target, blocks = run.model, list(run.adapter.blocks(run.model))
        counts = zero_counts(target, [m for b in masks for m in b.linears], blocks)
        self.relayout(target, [o for b in masks for o in b.orders])
        plan.planned_params_after = run.params_before
        tails = sum(b.tails for b in masks)
        if tails:
            plan.notes.append(f"{tails} linears have a width that is not a multiple of {pattern.m}: their last "
                              f"(width mod {pattern.m}) columns stay dense")
        extra, notes = self.summarize([r for b in masks for r in b.reports], pattern)
        plan.notes.extend(notes)
        result = run.finish(plan)
        result.extra = {"sparsity": pattern.label, **counts, **extra}
        return target, result

    def prune(self, model, samples, settings, *, on_event=None, inplace=False):
        if settings.searched:
            return self._searched(model, samples, settings, on_event=on_event, inplace=inplace)
        if self.uses_activations and samples is None:
            raise ValueError("this method needs calibration samples")
        run = Run.begin(model, inplace)
        protected, specs, plan = self._begin(run, settings)
        pattern = settings.pattern
        done: list[BlockMasks] = []

        def mask_block(layer: int, block: nn.Module, stats: dict[str, InputStats] | None) -> None:
            masks = self.mask_block(layer, block, stats, specs, pattern, settings, run.adapter, plan.layer_params[layer])
            done.append(masks)
            plan.dense_reports.extend(masks.denses)
            plan.layer_reports.append(masks.report)
            plan.layer_ratios[layer] = masks.report.ratio

        active = [i for i in range(len(run.blocks)) if i not in protected]
        if self.uses_activations:
            with run.calibration():
                inputs = run.capture(samples, plan, batch_size=settings.batch_size)

                def visit(v: BlockVisit):
                    if v.index in protected:
                        return None
                    mask_block(v.index, v.block, v.stats)
                    return v.block

                run.loop(inputs, visit, plan, timing="masking", with_stats=lambda i: i not in protected,
                         propagation=settings.inputs, on_event=on_event, stage="masking")
        else:
            with timed(plan, "masking"):
                for i in active:
                    mask_block(i, run.blocks[i], None)
        return self._finish(run, plan, done, pattern)

    def search_setup(self, settings):
        """The searched per-layer sparsity (EvoPress's unstructured search): each layer's level is its share of
        zeros among the masked linears; the one-shot allocation is the same share everywhere."""
        pattern = settings.pattern
        if pattern.is_nm:
            raise ValueError(f"allocation='search' shares unstructured sparsity between layers; {pattern.label} "
                             "fixes every group's zeros: use a share like 0.5, or allocation='one-shot'")

        def setup(run: Run, calibration, on_event) -> SearchSpace:
            protected, specs, plan = self._begin(run, settings)
            if settings.inputs != "identical":
                plan.notes.append(SEARCH_INPUTS_NOTE)
            masked = {i: sum(run.adapter.dense(run.blocks[i], d.name).weight.numel() for d in specs)
                      for i in range(len(run.blocks)) if i not in protected}
            inputs = run.capture(calibration, plan, batch_size=settings.batch_size, on_event=on_event,
                                 message="reading the calibration text through the model")

            def step(block, layer: int, removed: float, stats):
                level = SparsityPattern(fraction=min(max(removed / masked[layer], 0.0), 1.0))
                masks = self.mask_block(layer, block, stats, specs, level, settings, run.adapter,
                                        run.layer_params[layer])
                return masks.report, masks.denses

            return SearchSpace(inputs=inputs, plan=plan, step=step,
                               one_shot={i: pattern.fraction * n for i, n in masked.items()},
                               capacity={i: float(n) for i, n in masked.items()})
        return setup

    def _searched(self, model, samples, settings, *, on_event, inplace):
        pattern = settings.pattern
        target, result = searched_prune(self.search_setup(settings), model, samples, settings, on_event=on_event,
                                        inplace=inplace)
        adapter = get_adapter(target)
        blocks = list(adapter.blocks(target))
        kinds = settings.dense_kinds
        layers = [r.index for r in result.plan.layer_reports]
        linears = [adapter.dense(blocks[i], d.name) for i in layers for d in adapter.denses
                   if kinds is None or d.kind in kinds]
        result.extra = {"sparsity": pattern.label, **zero_counts(target, linears, blocks)}
        return target, result


@register_method("magnitude", summary="magnitude: |W| over the whole matrix (no data)")
class Magnitude(MaskMethod):
    uses_activations = False
    requires_calibration = False

    def mask_dense(self, weight, stats, gram, pattern, settings):
        scores = weight.detach().abs().float()
        mask = pattern_mask(scores, pattern, per_row=False)
        return MaskedWeight(weight=weight.masked_fill(mask, 0), mask=mask, scores=scores)


@register_method("wanda", summary="Wanda: |W|·‖X‖ compared within each output row")
class Wanda(MaskMethod):
    def mask_dense(self, weight, stats, gram, pattern, settings):
        x_norm = gram.diagonal().sqrt().to(weight.device, torch.float32)  # ‖X_j‖₂ of the inputs it reads
        scores = weight.detach().abs().float() * x_norm.unsqueeze(0)
        mask = pattern_mask(scores, pattern, per_row=True)
        return MaskedWeight(weight=weight.masked_fill(mask, 0), mask=mask, scores=scores)


@register_method("sparsegpt", summary="SparseGPT: OBS one weight at a time with lazy batch updates")
class SparseGPT(MaskMethod):
    def mask_dense(self, weight, stats, gram, pattern, settings):
        out = sparsegpt(weight, gram, pattern, blocksize=settings.blocksize, percdamp=settings.percdamp)
        return MaskedWeight(weight=out.weight, mask=out.mask)


@register_method("apt", summary="APT: joint multi-weight OBS per row with closed-form compensation")
class APT(MaskMethod):
    def mask_dense(self, weight, stats, gram, pattern, settings):
        out = apt(weight, gram, pattern, blocksize=settings.blocksize, percdamp=settings.percdamp)
        return MaskedWeight(weight=out.weight, mask=out.mask)
