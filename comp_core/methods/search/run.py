"""The searched prune, for any method that describes its per-layer levels as a ``SearchSpace``.

1. the original's next-token distribution on held-out calibration sequences (``fitness.Reference``);
2. the method's setup on the other sequences: block 0's inputs, whole layers removed (if its rule removes
   any), its one-shot removal per layer, each layer's capacity, its block step (``SearchSpace``);
3. the database: the one block loop, on the original's inputs, prunes every searched layer at every level
   (``database.layer_variants``);
4. ``math.evolution.evolve`` from the one-shot levels, scoring a candidate by swapping the variants into the
   model's block list (``fitness.StagedKL``);
5. the result only if it beats the one-shot levels on every held-out token, else the one-shot levels; the
   chosen variants stay in the model, and the plan records both allocations and the fitness curve.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ...events import ProgressCallback, emit
from ...loop.blocks import BlockVisit
from ...loop.capture import BlockInputs
from ...math.evolution import LevelGrid, evolve, level_grid, removed_by_level
from ...models.streaming import discard_copy, is_streamed
from ...results import DenseReport, LayerReport, Plan, PruneResult, SearchRecord
from ..base import Run
from .database import VariantDatabase, layer_variants
from .fitness import Reference, StagedKL
from .settings import SearchSettings

# the block step a method hands the search: prune ``block`` (a copy) of ``layer`` in place so that it loses
# ``removed`` parameters, from the layer's context (its input statistics, or what ``layer_context`` made of
# them); returns its reports
BlockStep = Callable[[nn.Module, int, float, Any], tuple[LayerReport, list[DenseReport]]]
# once per layer, on the original block: what every level's step shares (e.g. the scores)
LayerContext = Callable[[nn.Module, int, Any], Any]


@dataclass
class SearchSpace:
    """What a method hands the search after its setup on the calibration sequences."""

    inputs: BlockInputs  # block 0's inputs
    plan: Plan  # the method's plan so far (removed layers, protected, importances); the search fills the rest
    one_shot: dict[int, float]  # searched layer -> parameters the method's own rule removes there
    capacity: dict[int, float]  # searched layer -> most parameters it may lose
    step: BlockStep
    loop_settings: dict = field(default_factory=dict)  # the block loop's statistics keywords (stat_folds, …)
    layer_context: LayerContext | None = None  # None: the step gets the layer's statistics


Setup = Callable[[Run, torch.Tensor, ProgressCallback | None], SearchSpace]


def split_holdout(samples: torch.Tensor, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, held-out): the last ``holdout`` sequences, at most a quarter of them (at least one),
    are the fitness's; the rest calibrate the pruning."""
    n = samples.shape[0]
    if n < 2:
        raise ValueError("a searched allocation needs at least 2 calibration sequences: one to prune with, one "
                         "held out for the fitness")
    k = max(1, min(holdout, n // 4))
    return samples[:n - k], samples[n - k:]


@dataclass
class Prepared:
    """A search ready to run: the method's space, the searched layers, the level grid and unit, the database
    and the fitness (whose ``assemble`` puts any candidate in the model)."""

    space: SearchSpace
    layers: list[int]
    grid: LevelGrid
    unit: float
    database: VariantDatabase
    reference: Reference
    fitness: StagedKL
    assemble: Callable[[tuple[int, ...]], None]


def prepare_search(setup: Setup, run: Run, calibration: torch.Tensor, held: torch.Tensor, settings: SearchSettings,
                   on_event: ProgressCallback | None = None) -> Prepared:
    """Steps 1–3 of the module docstring on ``run.model`` (inside ``run.calibration()``)."""
    emit(on_event, "search", 0, 1, f"the original model's next-token distribution on {held.shape[0]} held-out "
                                   "sequences")
    reference = Reference.of(run.model, held)
    space = setup(run, calibration, on_event)
    layers = sorted(space.one_shot)
    if not layers:
        raise ValueError("nothing to search: no layer is left to prune at this ratio (every one is protected or "
                         "removed whole); use allocation='one-shot'")
    params = run.layer_params
    unit = settings.search_step * sum(params[i] for i in layers) / max(len(layers), 1)
    one_shot = [space.one_shot[i] for i in layers]
    grid = level_grid(one_shot, [space.capacity[i] for i in layers], unit, settings.search_levels)
    database = build_database(run, space, layers, grid, one_shot, unit, on_event)
    container = run.adapter.blocks(run.model)
    position = {id(b): p for p, b in enumerate(container)}
    positions = [position[id(run.blocks[i])] for i in layers]

    def assemble(levels: tuple[int, ...]) -> None:
        for layer, pos, level in zip(layers, positions, levels):
            container[pos] = database[(layer, level)].block

    budget = settings.search_budget()
    fitness = StagedKL(run.model, reference, assemble, [t for _, t in budget.stages], settings.search_seed,
                       container=container, offspring=budget.offspring)
    return Prepared(space=space, layers=layers, grid=grid, unit=unit, database=database, reference=reference,
                    fitness=fitness, assemble=assemble)


def searched_prune(setup: Setup, model: nn.Module, samples: torch.Tensor, settings: SearchSettings, *,
                   on_event: ProgressCallback | None = None, inplace: bool = False) -> tuple[nn.Module, PruneResult]:
    """Prune ``model`` (a copy unless ``inplace``) with the method whose ``setup`` gives its search space, at
    the per-layer levels the search finds; see the module docstring."""
    if samples is None:
        raise ValueError("a searched allocation needs calibration samples (its fitness reads held-out sequences)")
    calibration, held = split_holdout(samples, settings.search_holdout)
    run = Run.begin(model, inplace)
    with run.calibration():
        t0 = time.perf_counter()
        prepared = prepare_search(setup, run, calibration, held, settings, on_event)
        grid, database, fitness, layers = prepared.grid, prepared.database, prepared.fitness, prepared.layers
        budget = settings.search_budget()
        t_search = time.perf_counter()

        def progress(generation: int, best: float, _levels) -> None:
            emit(on_event, "search", generation, budget.generations,
                 f"generation {generation}/{budget.generations}: KL to the original {best:.4f} on the selection "
                 "tokens (best so far)")

        result = evolve(grid, fitness, budget, on_generation=progress, fixed_last_stage=True)
        emit(on_event, "search", budget.generations, budget.generations,
             "comparing the searched and the one-shot allocation on every held-out token")
        start_kl = fitness.full(grid.start())
        final_kl = fitness.full(result.levels) if result.levels != grid.start() else start_kl
        chosen = result.levels if final_kl < start_kl else grid.start()
        prepared.assemble(chosen)
        on_disk = is_streamed(run.model)
        if on_disk:  # the variants the model does not use leave the spill folder now
            for (layer, level), variant in database.variants.items():
                if chosen[layers.index(layer)] != level:
                    discard_copy(variant.block)
        search_seconds = time.perf_counter() - t_search
    plan = prepared.space.plan
    params = run.layer_params
    for layer, level in zip(layers, chosen):
        variant = database[(layer, level)]
        plan.layer_reports.append(variant.report)
        plan.dense_reports.extend(variant.denses)
        plan.layer_ratios[layer] = variant.removed_params / params[layer]
    plan.planned_params_after = (run.params_before - sum(params[i] for i in plan.removed_layers)
                                 - sum(r.removed_params for r in plan.layer_reports))
    plan.search = SearchRecord(
        layers=layers, one_shot={i: database[(i, 0)].removed_params / params[i] for i in layers},
        searched={i: database[(i, v)].removed_params / params[i] for i, v in zip(layers, result.levels)},
        levels=list(result.levels), fitness=result.history, seconds=result.seconds, start_kl=start_kl,
        final_kl=final_kl, improved=chosen != grid.start(), unit_params=int(round(prepared.unit)),
        levels_each_side=settings.search_levels, database_mb=database.megabytes,
        reference_mb=prepared.reference.megabytes, database_seconds=database.seconds, search_seconds=search_seconds,
        evaluations=result.evaluations, generations=result.generations, holdout=int(held.shape[0]),
        tokens_scored=fitness.tokens_scored, database_on_disk=on_disk, blocks_replayed=fitness.replayed_share)
    plan.timings["search_database"] = database.seconds
    plan.timings["search"] = search_seconds
    plan.timings["search_total"] = time.perf_counter() - t0
    plan.notes.append(_note(plan.search))
    return run.model, run.finish(plan)


def build_database(run: Run, space: SearchSpace, layers: list[int], grid: LevelGrid, one_shot: list[float],
                    unit: float, on_event: ProgressCallback | None) -> VariantDatabase:
    """Every searched layer at every level of ``grid``, over the one block loop on the original's inputs."""
    database = VariantDatabase()
    t0 = time.perf_counter()
    index = {layer: k for k, layer in enumerate(layers)}

    def visit(v: BlockVisit) -> None:
        k = index.get(v.index)
        if k is None:
            return None
        levels = range(grid.low[k], grid.high[k] + 1)
        removed_at = lambda level: removed_by_level([one_shot[k]], [level], unit)[0]  # noqa: E731
        context = space.layer_context(v.block, v.index, v.stats) if space.layer_context else v.stats
        for variant in layer_variants(v.block, v.index, levels, removed_at,
                                      lambda block, layer, removed: space.step(block, layer, removed, context)):
            database.add(variant)
        return None  # the original's outputs go on: every variant sees the original's inputs

    active = [i for i in range(len(run.blocks)) if i not in space.plan.removed_layers]
    run.loop(space.inputs, visit, space.plan, timing="search_database", layers=active,
             with_stats=lambda i: i in index, propagation="identical", on_event=on_event, stage="search-database",
             describe=lambda i: (f"layer {i}: {grid.high[index[i]] - grid.low[index[i]] + 1} levels"
                                 if i in index else f"layer {i}: kept"), **space.loop_settings)
    database.seconds = time.perf_counter() - t0
    return database


def _note(record: SearchRecord) -> str:
    if record.improved:
        return (f"searched allocation: KL to the original on {record.holdout} held-out sequences "
                f"{record.start_kl:.4f} (one-shot) → {record.final_kl:.4f} after {record.generations} generations "
                f"({record.search_seconds:.0f} s; database {record.database_mb:.0f} MB"
                f"{' on disk' if record.database_on_disk else ''} built in {record.database_seconds:.0f} s)")
    return (f"searched allocation: no allocation found beat the one-shot one on the held-out sequences "
            f"(KL {record.start_kl:.4f}); the one-shot allocation is kept")
