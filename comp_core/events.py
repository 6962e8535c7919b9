"""Progress reporting without UI coupling: the core emits ``PruneEvent``s to an optional callback.

The CLI turns them into a tqdm bar, the GUI into ``gr.Progress`` updates; the core imports neither.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

STAGES = ("load", "calibration", "capture", "layer-removal", "fisher", "neuron-pruning", "evaluate", "auto-sweep",
          "search-database", "search")


@dataclass(frozen=True)
class PruneEvent:
    stage: str
    step: int
    total: int
    message: str = ""
    metrics: dict = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 1.0


ProgressCallback = Callable[[PruneEvent], None]


class Cancelled(RuntimeError):
    """Raised from a progress callback to stop a run; the model being pruned must then be discarded."""


def emit(callback: ProgressCallback | None, stage: str, step: int, total: int, message: str = "", **metrics) -> None:
    if callback is not None:
        callback(PruneEvent(stage, step, total, message, metrics))
