"""EvoPress's evolutionary search over per-layer compression levels (Sieberling et al., arXiv 2410.14649;
IST-DASLab/EvoPress ``evo_prune_search.py``), as pure functions over level vectors and a fitness callable.

A candidate gives every layer an integer *level*: level j removes ``j`` more parameter units than the
method's one-shot allocation (level 0 everywhere is the one-shot allocation itself). Every unit is the same
number of parameters in every layer, so the mutation — take one level from a layer, give one to another —
keeps the total exactly. Each generation mutates the parent into ``offspring`` distinct children and keeps
the best in stages, each stage scoring the survivors on more tokens; the parent joins the last stage
(elitism), so the parent is replaced only by a child that beats it on the same tokens.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

Levels = tuple[int, ...]
# fitness(candidates, stage) -> one score per candidate, lower = better; ``stage`` indexes ``SearchBudget.stages``
Fitness = Callable[[list[Levels], int], list[float]]


@dataclass(frozen=True)
class LevelGrid:
    """The levels each layer may take: layer l from ``low[l]`` (≤ 0) to ``high[l]`` (≥ 0)."""

    low: tuple[int, ...]
    high: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.low) != len(self.high):
            raise ValueError("low and high must have one entry per layer")
        if any(lo > 0 or hi < 0 for lo, hi in zip(self.low, self.high)):
            raise ValueError("every layer's levels must include 0 (its one-shot allocation)")

    @property
    def n_layers(self) -> int:
        return len(self.low)

    def start(self) -> Levels:
        return (0,) * self.n_layers

    def contains(self, levels: Sequence[int]) -> bool:
        return len(levels) == self.n_layers and all(lo <= v <= hi for lo, v, hi in zip(self.low, levels, self.high))


def mutate(levels: Levels, grid: LevelGrid, rng: random.Random, max_flips: int = 3) -> Levels:
    """EvoPress's mutation: ``min(randint(1, m), randint(1, m))`` flips (1 flip most often), each one level
    down in a random layer that can go down and one level up in a random layer that can go up — the sum of
    the levels, hence the parameter total, never changes. A layer may be picked for both (a no-op flip)."""
    out = list(levels)
    flips = min(rng.randint(1, max_flips), rng.randint(1, max_flips))
    for _ in range(flips):
        down = [i for i, v in enumerate(out) if v > grid.low[i]]
        up = [i for i, v in enumerate(out) if v < grid.high[i]]
        if not down or not up:
            break
        out[rng.choice(down)] -= 1
        out[rng.choice(up)] += 1
    return tuple(out)


@dataclass(frozen=True)
class SearchBudget:
    """How long and how wide to search. ``stages``: (survivors, tokens) per selection stage, the tokens a
    fitness provider spends on each candidate there; the last stage keeps one."""

    generations: int = 40
    seconds: float | None = None  # stop earlier when this many seconds have passed (None: generations only)
    offspring: int = 8
    stages: tuple[tuple[int, int], ...] = ((2, 256), (1, 1024))
    max_flips: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.generations < 0 or self.offspring < 1 or not self.stages:
            raise ValueError("a search needs generations >= 0, offspring >= 1 and at least one stage")
        if self.stages[-1][0] != 1:
            raise ValueError("the last selection stage keeps exactly one candidate")
        survivors = [s for s, _ in self.stages]
        if survivors != sorted(survivors, reverse=True) or survivors[0] > self.offspring:
            raise ValueError(f"stage survivors {survivors} must shrink and start at most at offspring={self.offspring}")
        if self.seconds is not None and self.seconds <= 0:
            raise ValueError("seconds must be > 0 (or None)")


@dataclass
class SearchResult:
    """The best levels found, and how the parent's fitness went (one entry per generation, on that
    generation's last-stage tokens; entry 0 is the start)."""

    levels: Levels
    history: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # since the start, per history entry
    evaluations: int = 0  # candidate scorings, all stages
    generations: int = 0


def evolve(grid: LevelGrid, fitness: Fitness, budget: SearchBudget, *,
           on_generation: Callable[[int, float, Levels], None] | None = None,
           clock: Callable[[], float] = time.perf_counter, fixed_last_stage: bool = False) -> SearchResult:
    """(1 + λ) evolution from the one-shot allocation (all levels 0): each generation ``budget.offspring``
    distinct mutants of the parent, selected in ``budget.stages``; the parent re-scored in the last stage
    and kept unless a child beats it there. Deterministic for a seed and a deterministic ``fitness``.
    ``fixed_last_stage``: the fitness scores the last stage on the same tokens every time, so the parent's
    score there is known and not computed again (its last score joins the ranking)."""
    rng = random.Random(budget.seed)
    start = clock()
    parent = grid.start()
    last = len(budget.stages) - 1
    result = SearchResult(levels=parent)
    parent_score = fitness([parent], last)[0]
    result.history.append(parent_score)
    result.seconds.append(clock() - start)
    result.evaluations = 1
    if on_generation is not None:
        on_generation(0, result.history[0], parent)
    for generation in range(1, budget.generations + 1):
        if budget.seconds is not None and clock() - start >= budget.seconds:
            break
        candidates = _offspring(parent, grid, rng, budget)
        if not candidates:  # every layer has a single level: nothing to search
            break
        for stage, (survivors, _tokens) in enumerate(budget.stages):
            if stage == last and fixed_last_stage:
                scores = fitness(candidates, stage) + [parent_score]
                result.evaluations += len(candidates)
                candidates = candidates + [parent]
            else:
                if stage == last:
                    candidates = candidates + [parent]
                scores = fitness(candidates, stage)
                result.evaluations += len(candidates)
            ranked = sorted(range(len(candidates)), key=lambda i: (scores[i], i))
            keep = survivors if stage < last else 1
            best_score = scores[ranked[0]]
            candidates = [candidates[i] for i in ranked[:keep]]
        parent, parent_score = candidates[0], best_score
        result.history.append(best_score)
        result.seconds.append(clock() - start)
        result.generations = generation
        if on_generation is not None:
            on_generation(generation, best_score, parent)
    result.levels = parent
    return result


def _offspring(parent: Levels, grid: LevelGrid, rng: random.Random, budget: SearchBudget) -> list[Levels]:
    """Up to ``budget.offspring`` distinct mutants, none equal to the parent (EvoPress rejects duplicates);
    fewer when the grid holds fewer, none when no layer can move."""
    seen = {parent}
    out: list[Levels] = []
    for _ in range(budget.offspring * 20):  # a small grid may hold fewer distinct neighbours
        child = mutate(parent, grid, rng, budget.max_flips)
        if child not in seen:
            seen.add(child)
            out.append(child)
            if len(out) == budget.offspring:
                break
    return out


def removed_by_level(one_shot: Sequence[float], levels: Sequence[int], unit: float) -> list[float]:
    """Parameters each layer loses at ``levels``: its one-shot share plus ``level × unit``."""
    return [r + v * unit for r, v in zip(one_shot, levels)]


def level_grid(one_shot: Sequence[float], capacity: Sequence[float], unit: float, levels_each_side: int) -> LevelGrid:
    """The levels around each layer's one-shot removal ``one_shot[l]`` (parameters), ``unit`` parameters apart,
    at most ``levels_each_side`` each way, never below 0 nor above the layer's ``capacity[l]``."""
    if unit <= 0:
        raise ValueError("the level unit must be > 0 parameters")
    low, high = [], []
    for removed, cap in zip(one_shot, capacity):
        low.append(-min(levels_each_side, int((removed + 1e-9) // unit)))
        high.append(min(levels_each_side, max(0, int((cap - removed + 1e-9) // unit))))
    return LevelGrid(low=tuple(low), high=tuple(high))
