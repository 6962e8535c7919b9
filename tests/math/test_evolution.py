"""The evolutionary search over per-layer levels (EvoPress's (1 + λ) scheme) on synthetic fitness functions."""
from __future__ import annotations

import itertools
import random

import pytest

from comp_core.math.evolution import LevelGrid, SearchBudget, evolve, level_grid, mutate, removed_by_level


def constrained(grid: LevelGrid) -> list[tuple[int, ...]]:
    """Every level vector of ``grid`` whose levels sum to 0 (the one-shot total)."""
    ranges = [range(lo, hi + 1) for lo, hi in zip(grid.low, grid.high)]
    return [c for c in itertools.product(*ranges) if sum(c) == 0]


def table_fitness(seed: int, grid: LevelGrid):
    """A fixed random score per candidate: no structure a search could exploit but the table itself."""
    rng = random.Random(seed)
    table = {c: rng.random() for c in constrained(grid)}
    calls = []

    def fitness(candidates, stage):
        calls.append((len(candidates), stage))
        return [table[c] for c in candidates]

    return table, fitness, calls


def test_mutation_never_changes_the_total_and_stays_on_the_grid():
    grid = LevelGrid(low=(-3, -1, 0, -2, -3), high=(3, 2, 1, 0, 3))
    rng = random.Random(0)
    levels = grid.start()
    moved = 0
    for _ in range(2000):
        child = mutate(levels, grid, rng)
        assert sum(child) == 0
        assert grid.contains(child)
        moved += child != levels
        levels = child
    assert moved > 1000  # it does move


def test_mutation_flip_counts_follow_evopress():
    # min(randint(1,3), randint(1,3)): 1 flip with probability 5/9, 2 with 3/9, 3 with 1/9
    grid = LevelGrid(low=(-50,) * 40, high=(50,) * 40)
    rng = random.Random(1)
    counts = {1: 0, 2: 0, 3: 0}
    for _ in range(9000):
        child = mutate(grid.start(), grid, rng)
        moved = sum(abs(v) for v in child)
        # a flip moves two layers by one (or none when both picks coincide); up to 3 flips
        assert moved <= 6 and moved % 2 == 0
        counts[max(1, moved // 2)] += 1
    # 5/9, 3/9, 1/9 before the rare flips that undo or repeat a pick (40 layers: a few per cent)
    assert counts[1] / 9000 == pytest.approx(5 / 9, abs=0.06)
    assert counts[2] / 9000 == pytest.approx(3 / 9, abs=0.06)
    assert counts[3] / 9000 == pytest.approx(1 / 9, abs=0.04)


def test_a_single_level_per_layer_returns_the_one_shot_allocation():
    grid = LevelGrid(low=(0, 0, 0), high=(0, 0, 0))
    calls = []

    def fitness(candidates, stage):
        calls.append(candidates)
        return [1.0] * len(candidates)

    result = evolve(grid, fitness, SearchBudget(generations=10))
    assert result.levels == (0, 0, 0)
    assert calls == [[(0, 0, 0)]]  # only the start was scored
    assert result.generations == 0


@pytest.mark.parametrize("seed", range(5))
def test_it_finds_the_brute_force_optimum_of_a_small_grid(seed):
    grid = LevelGrid(low=(-1,) * 4, high=(1,) * 4)  # 4 layers, 3 levels each: 19 candidates keep the total
    table, fitness, _ = table_fitness(seed, grid)
    best = min(table, key=table.get)
    result = evolve(grid, fitness, SearchBudget(generations=30, offspring=6, stages=((2, 1), (1, 1)), seed=seed))
    assert result.levels == best
    assert result.history[-1] == table[best]
    assert result.history == sorted(result.history, reverse=True)  # the parent only ever gets better


def test_the_parent_is_rescored_in_the_last_stage_and_kept_unless_beaten():
    grid = LevelGrid(low=(-1,) * 3, high=(1,) * 3)

    def fitness(candidates, stage):  # the start is the best: no child may replace it
        return [0.0 if c == (0, 0, 0) else 1.0 + sum(abs(v) for v in c) for c in candidates]

    result = evolve(grid, fitness, SearchBudget(generations=8, offspring=4, stages=((2, 1), (1, 1))))
    assert result.levels == (0, 0, 0)
    assert result.history == [0.0] * 9


def test_the_same_seed_gives_the_same_search():
    grid = LevelGrid(low=(-2,) * 6, high=(2,) * 6)
    rng = random.Random(7)
    weights = [rng.uniform(-1, 1) for _ in range(6)]

    def fitness(candidates, stage):
        return [sum(w * v * v + 0.1 * w * v for w, v in zip(weights, c)) for c in candidates]

    runs = [evolve(grid, fitness, SearchBudget(generations=12, seed=3)) for _ in range(2)]
    assert runs[0].levels == runs[1].levels and runs[0].history == runs[1].history
    other = evolve(grid, fitness, SearchBudget(generations=1, seed=4, offspring=8))
    assert other.evaluations == runs[0].evaluations // 12 + 1 or other.evaluations > 1


def test_stages_score_fewer_candidates_each_and_the_budget_in_seconds_stops_it():
    grid = LevelGrid(low=(-2,) * 6, high=(2,) * 6)
    _, fitness, calls = table_fitness(0, LevelGrid(low=(-2,) * 6, high=(2,) * 6))
    evolve(grid, fitness, SearchBudget(generations=3, offspring=8, stages=((3, 10), (1, 100))))
    # start; then per generation 8 children in stage 0, 3 survivors + the parent in stage 1
    assert calls == [(1, 1)] + [(8, 0), (4, 1)] * 3
    ticks = iter(range(100))
    result = evolve(grid, fitness, SearchBudget(generations=50, seconds=3.0), clock=lambda: float(next(ticks)))
    assert result.generations < 50


def test_with_a_fixed_last_stage_the_parent_is_not_scored_again_and_only_improves():
    grid = LevelGrid(low=(-2,) * 6, high=(2,) * 6)
    table, fitness, calls = table_fitness(1, grid)
    result = evolve(grid, fitness, SearchBudget(generations=5, offspring=8, stages=((3, 10), (1, 100))),
                    fixed_last_stage=True)
    assert calls == [(1, 1)] + [(8, 0), (3, 1)] * 5  # the parent's known score joins the last stage
    assert result.history == sorted(result.history, reverse=True)
    assert result.history[-1] == table[result.levels]


def test_budget_and_grid_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="last selection stage"):
        SearchBudget(stages=((2, 10),))
    with pytest.raises(ValueError, match="shrink"):
        SearchBudget(offspring=4, stages=((8, 10), (1, 10)))
    with pytest.raises(ValueError, match="include 0"):
        LevelGrid(low=(1,), high=(2,))


def test_level_grid_stays_within_zero_and_each_layers_capacity():
    grid = level_grid(one_shot=[100.0, 25.0, 0.0, 380.0], capacity=[400.0, 400.0, 400.0, 400.0], unit=50.0,
                      levels_each_side=3)
    assert grid.low == (-2, 0, 0, -3)
    assert grid.high == (3, 3, 3, 0)
    assert removed_by_level([100.0, 25.0], [-2, 3], 50.0) == [0.0, 175.0]
