"""The settings every searchable method shares: whether the per-layer allocation is the method's own rule
("one-shot") or searched ("search"), and the search's budget."""
from __future__ import annotations

from dataclasses import dataclass

from ...math.evolution import SearchBudget

ALLOCATIONS = ("one-shot", "search")
# the plan's note where a method's ``inputs`` setting says otherwise than the search's database does
SEARCH_INPUTS_NOTE = ("the searched allocation prunes every layer on the original model's inputs (its database "
                      "holds each layer pruned alone); the inputs setting applies to one-shot runs")
# held-out calibration sequences the fitness reads by default (never the evaluation text)
DEFAULT_HOLDOUT = 8


@dataclass
class SearchSettings:
    """allocation: "one-shot" (the method's own per-layer rule) or "search" (EvoPress-style evolutionary
        search of the per-layer shares, starting from the one-shot ones, fitness = KL divergence to the
        original model's next-token distribution on held-out calibration sequences).
    search_generations / search_seconds: the search's budget (it stops at whichever comes first; seconds
        None = generations only, which keeps a run reproducible).
    search_seed: the mutations' and minibatches' seed (same seed, same allocation).
    search_step: one level, as a share of a prunable layer's parameters (every level is the same number of
        parameters in every layer, so moving one keeps the total exactly).
    search_levels: levels each side of the one-shot share.
    search_holdout: calibration sequences held out for the fitness (the rest calibrate the pruning)."""

    allocation: str = "one-shot"
    search_generations: int = 40
    search_seconds: float | None = None
    search_seed: int = 0
    search_step: float = 0.025
    search_levels: int = 3
    search_holdout: int = DEFAULT_HOLDOUT

    def check_search(self) -> None:
        """Refuse search settings that cannot run (called by each settings class's ``__post_init__``)."""
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got '{self.allocation}'")
        if self.search_generations < 0:
            raise ValueError("search_generations must be >= 0")
        if self.search_seconds is not None and self.search_seconds <= 0:
            raise ValueError("search_seconds must be > 0 (or None: generations only)")
        if not 0.0 < self.search_step < 1.0:
            raise ValueError(f"search_step must be in (0, 1), got {self.search_step}")
        if self.search_levels < 0:
            raise ValueError("search_levels must be >= 0")
        if self.search_holdout < 1:
            raise ValueError("search_holdout must be >= 1 calibration sequence")

    @property
    def searched(self) -> bool:
        return self.allocation == "search"

    def search_budget(self) -> SearchBudget:
        return SearchBudget(generations=self.search_generations, seconds=self.search_seconds, seed=self.search_seed)
