"""COMP (hybrid granularity): iterative layer removal by cosine redundancy, per-layer ratios by the variance rule,
input-neuron pruning with least-squares compensation. ``run`` holds the method and its registry entry, ``whatif``
re-plans an analysed model for another ratio or removal depth without a new forward pass."""
from .run import (PAPER_CALIBRATION, PAPER_SETTINGS, Comp, CompConfig, analyze, apply_plan, layer_caps, prune,
                  reallocate)

__all__ = ["PAPER_CALIBRATION", "PAPER_SETTINGS", "Comp", "CompConfig", "analyze", "apply_plan", "layer_caps", "prune",
           "reallocate"]
