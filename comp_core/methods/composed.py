"""Structured pruning followed by masks on the smaller model, in one run and one report (no peer offers it).

``comp+nm``: COMP removes its share of all parameters physically, then a mask method (SparseGPT by default)
puts an N:M pattern into every linear of the smaller model, calibrated on the same samples passing through
the already pruned model. The realised ratio is the structural one (parameters really gone); the sparsity
figures say how many of the remaining weights are zero on top.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..math.sparsity import SparsityPattern
from .registry import Method, get_method, make_settings, prune_with, register_method


@dataclass
class ComposedSettings:
    """ratio: the structured method's share of all parameters; sparsity: the mask pattern on what is left;
    structured / sparse: the two registered methods run one after the other."""

    ratio: float = 0.2
    sparsity: str = "2:4"
    structured: str = "comp"
    sparse: str = "sparsegpt"

    def __post_init__(self) -> None:
        self.sparsity = SparsityPattern.parse(self.sparsity).label
        if get_method(self.structured).kind != "structured":
            raise ValueError(f"'{self.structured}' is not a structured method")
        if get_method(self.sparse).kind != "unstructured":
            raise ValueError(f"'{self.sparse}' is not a mask method")
        make_settings(self.structured, ratio=self.ratio)  # validates the ratio with the method's own rules


@register_method("comp+nm", summary="COMP structured pruning, then N:M masks (SparseGPT) on the smaller model")
class Composed(Method):
    kind = "composed"
    settings_class = ComposedSettings

    def prune(self, model, samples, settings, *, on_event=None, inplace=False):
        start = time.perf_counter()
        smaller, first = prune_with(settings.structured, model, samples, ratio=settings.ratio, on_event=on_event,
                                    inplace=inplace)
        masked, second = prune_with(settings.sparse, smaller, samples, sparsity=settings.sparsity,
                                    on_event=on_event, inplace=True)
        plan = first.plan
        plan.timings = {**{f"{settings.structured}_{k}": v for k, v in first.plan.timings.items()},
                        **{f"{settings.sparse}_{k}": v for k, v in second.plan.timings.items()}}
        plan.notes = [*first.plan.notes, *second.plan.notes]
        plan.sparse_plan = second.plan
        result = first
        result.params_after = second.params_after
        result.seconds = time.perf_counter() - start
        result.peak_rss_mb = max(first.peak_rss_mb, second.peak_rss_mb)
        result.extra = {**first.extra, **second.extra, "structured_seconds": first.seconds,
                        "sparse_seconds": second.seconds}
        return masked, result
