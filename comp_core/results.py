"""Plans and results as data: what the GUI plots and the CLI prints as JSON."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch


@dataclass
class DenseReport:
    """One dense of one layer: its neuron scores, what was (or would be) pruned, and the fit."""

    layer: int  # original layer index
    name: str
    kind: str
    d_in: int
    d_out: int
    n_removed: int
    scores: torch.Tensor  # (d_in,) float32, higher = keep
    pruned_index: torch.Tensor  # (n_removed,) long, positions in the original input
    error_no_tuning: float  # ‖WX − W_pruned X‖² / ‖WX‖² with mask = 1 on the kept set (nan: not measured)
    error_tuned: float  # after compensation (mask or refit; equals error_no_tuning without)
    mask_variance: float | None = None  # tuned mask: variance of its kept entries at the chosen cut (None: no mask solved)
    mask: torch.Tensor | None = None  # (d_in - n_removed,) tuned mask of the kept columns
    compensation: str = "none"  # "mask", "refit", "blend", "bias" or "none"
    ridge: float | None = None  # blend: the ridge towards the mask solution chosen on held-out sequences
    removed_heads: int = 0  # whole attention heads among the removed inputs (o_proj of head-pruning methods)
    new_weight: torch.Tensor | None = None  # refit weight of the kept columns (kept in memory, never serialised)
    sparsity: float | None = None  # masks: share of this dense's weights that are zero
    kept_index: torch.Tensor | None = None  # (d_in,) long: original input position of each score (None: 0..d_in-1;
    # set where the source was already pruned, whose denses read only some of their original inputs)

    def to_dict(self, with_scores: bool = False) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if not isinstance(getattr(self, f.name), torch.Tensor) and getattr(self, f.name) is not None}
        if with_scores:
            out["scores"] = self.scores.tolist()
            out["pruned_index"] = self.pruned_index.tolist()
            if self.kept_index is not None:
                out["kept_index"] = self.kept_index.tolist()
        return out


@dataclass
class LayerReport:
    """One block: its share removed (structured: parameters gone; masks: weights zeroed) and how long it took."""

    index: int  # original layer index
    importance: float  # after the layer removals (nan: the method measures none)
    ratio: float  # structured: allocated share of the layer's parameters to remove; masks: share zeroed
    budget: int
    removed_params: int  # parameters physically gone (0 for masks)
    params: int
    seconds: float
    tau: float | None = None  # COMP: the mask-variance threshold τ its cuts met (inf: capped); None elsewhere
    sparsity: float | None = None  # masks: share of the block's parameters that are zero; None for structured

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tau"] = None if self.tau == float("inf") else self.tau
        return out


@dataclass
class SearchRecord:
    """A searched allocation (``methods.search``): each searched layer's share of its parameters removed under
    the method's own rule (``one_shot``) and under the search's best (``searched``), the parent's fitness per
    generation (KL to the original, per token, on that generation's last-stage minibatch), and the decisive
    comparison on every held-out token (``start_kl`` vs ``final_kl``; ``improved``: the searched one is used)."""

    layers: list[int]
    one_shot: dict[int, float]
    searched: dict[int, float]
    levels: list[int]
    fitness: list[float]
    seconds: list[float]
    start_kl: float
    final_kl: float
    improved: bool
    unit_params: int
    levels_each_side: int
    database_mb: float
    reference_mb: float
    database_seconds: float
    search_seconds: float
    evaluations: int
    generations: int
    holdout: int
    tokens_scored: int
    database_on_disk: bool = False  # a streamed model's variants wait in the spill folder, not in memory
    blocks_replayed: float = 0.0  # share of the search's block forwards replayed from an earlier candidate's

    def to_dict(self) -> dict:
        out = asdict(self)
        out["one_shot"] = {str(k): v for k, v in self.one_shot.items()}
        out["searched"] = {str(k): v for k, v in self.searched.items()}
        return out


@dataclass
class Plan:
    """What a method decided (or would decide), in one shape for every method: the layers it removed, each
    layer's share (``layer_ratios``, ``layer_reports``) and each dense's cut or mask (``dense_reports``).
    COMP fills its own parts too (importances, removal path, caps, τ, mask variances); a mask method reports
    per-layer and per-dense ``sparsity`` and leaves COMP's parts empty or None."""

    config: dict
    n_layers: int
    params_total: int
    layer_params: list[int]
    protected: list[int]
    initial_importance: list[float]  # per original layer, before any removal
    removal_order: list[int]
    importance_history: list[dict[int, float]]
    removed_layers: list[int]
    layer_ratios: dict[int, float]  # prunable layers only
    layer_caps: list[float] = field(default_factory=list)  # per original layer: most neuron pruning can take
    layer_reports: list[LayerReport] = field(default_factory=list)
    dense_reports: list[DenseReport] = field(default_factory=list)
    planned_params_after: int = 0
    auto_sweep: list[dict] = field(default_factory=list)  # [{"remove_layers": n, "calibration_loss": x}]
    timings: dict = field(default_factory=dict)
    method: str = "comp"
    removal: Any = None  # comp_core.loop.importance.RemovalResult measured to the analysis depth (GUI what-if)
    notes: list[str] = field(default_factory=list)  # what the method did that a reader should know
    sparse_plan: Any = None  # composed methods: the mask stage's plan (per-layer sparsity), else None
    fitted: bool = True  # False: an analysis that decided the cuts without fitting the kept weights (``analyze(fit=False)``)
    # COMP: mean angular distance between the inputs of layers l and l+n, [n-1][l] (NaN where l+n > n_layers;
    # comp_core.loop.similarity), measured by the capture forward of the unpruned model; None when not measured
    layer_distance: list[list[float]] | None = None
    search: SearchRecord | None = None  # a searched allocation's record (``methods.search``), else None
    # Prune&Comp: {removed layer: its scale s}, folded as 1/(product over earlier gaps) into the output
    # projections of every kept layer after a gap (``math.magnitude``); empty when the stream is not rescaled
    layer_scales: dict[int, float] = field(default_factory=dict)

    @property
    def removed_per_layer(self) -> dict[int, int]:
        """Parameters gone from every original layer: whole removed blocks plus what pruning took."""
        out = {i: self.layer_params[i] for i in self.removed_layers}
        for r in self.layer_reports:
            out[r.index] = out.get(r.index, 0) + r.removed_params
        return dict(sorted(out.items()))

    @property
    def planned_ratio(self) -> float:
        """The planned share of all parameters removed."""
        return 1.0 - self.planned_params_after / self.params_total

    @property
    def block_params(self) -> int:
        """Parameters in the decoder blocks of the model the plan was made for (every original layer)."""
        return sum(self.layer_params)

    @property
    def planned_block_ratio(self) -> float | None:
        """The same removal as a share of the decoder blocks' parameters (every method removes parameters
        only inside the blocks); None when the plan holds no block sizes."""
        if not self.block_params:
            return None
        return (self.params_total - self.planned_params_after) / self.block_params

    def dense(self, layer: int, kind: str) -> DenseReport:
        return next(d for d in self.dense_reports if d.layer == layer and d.kind == kind)

    def compensation_summary(self) -> str:
        """"blend 40 (ridge 0.003–0.3), mask 14" over the denses that lost inputs ('' when none did)."""
        cut = [d for d in self.dense_reports if d.n_removed > 0]
        parts = []
        for kind in sorted({d.compensation for d in cut}):
            ridges = sorted(d.ridge for d in cut if d.compensation == kind and d.ridge is not None)
            span = (f" (ridge {ridges[0]:g}" + (f"–{ridges[-1]:g}" if ridges[-1] != ridges[0] else "") + ")"
                    if ridges else "")
            parts.append(f"{kind} {sum(d.compensation == kind for d in cut)}{span}")
        return ", ".join(parts)

    def to_dict(self, with_scores: bool = False) -> dict:
        return {
            "method": self.method,
            "config": self.config,
            "n_layers": self.n_layers,
            "params_total": self.params_total,
            "layer_params": self.layer_params,
            "protected": self.protected,
            "initial_importance": self.initial_importance,
            "removal_order": self.removal_order,
            "importance_history": [{str(k): v for k, v in h.items()} for h in self.importance_history],
            "removed_layers": self.removed_layers,
            "layer_ratios": {str(k): v for k, v in self.layer_ratios.items()},
            "layer_caps": self.layer_caps,
            "layers": [r.to_dict() for r in self.layer_reports],
            "denses": [d.to_dict(with_scores) for d in self.dense_reports],
            "planned_ratio": self.planned_ratio,
            "planned_block_ratio": self.planned_block_ratio,
            "auto_sweep": self.auto_sweep,
            "timings": self.timings,
            "notes": self.notes,
            "layer_distance": (None if self.layer_distance is None else
                               [[None if math.isnan(v) else v for v in row] for row in self.layer_distance]),
            "search": None if self.search is None else self.search.to_dict(),
            "layer_scales": {str(k): v for k, v in sorted(self.layer_scales.items())},
        }


CompPlan = Plan  # the name the GUI, the tests and saved code know


@dataclass
class PruneResult:
    """A finished pruning run: the plan it followed and the realised figures of the model in memory, as a share
    of all parameters (``realised_ratio``) and of the decoder blocks' parameters (``realised_block_ratio``)."""

    plan: Plan
    params_before: int
    params_after: int
    seconds: float
    peak_rss_mb: float
    method: str = "comp"
    kind: str = "structured"
    extra: dict = field(default_factory=dict)
    block_params_before: int = 0  # parameters in the decoder blocks before and after (0: not measured)
    block_params_after: int = 0

    @property
    def realised_ratio(self) -> float:
        """The share of all parameters (embeddings included) the pruned model no longer has."""
        return 1.0 - self.params_after / self.params_before

    @property
    def realised_block_ratio(self) -> float | None:
        """The share of the decoder blocks' parameters the pruned model no longer has (None: not measured)."""
        if not self.block_params_before:
            return None
        return 1.0 - self.block_params_after / self.block_params_before

    def to_dict(self, with_scores: bool = False) -> dict:
        return {
            "method": self.method,
            "kind": self.kind,
            "realised_ratio": self.realised_ratio,
            "realised_block_ratio": self.realised_block_ratio,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "block_params_before": self.block_params_before,
            "block_params_after": self.block_params_after,
            "removed_layers": self.plan.removed_layers,
            "layer_ratios": {str(k): v for k, v in self.plan.layer_ratios.items()},
            "removed_per_layer": {str(k): v for k, v in self.plan.removed_per_layer.items()},
            "removed_inputs": [{"layer": d.layer, "name": d.name, "removed": d.n_removed,
                                "removed_heads": d.removed_heads} for d in self.plan.dense_reports if d.n_removed],
            "seconds": self.seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "timings": self.plan.timings,
            **self.extra,
            "plan": self.plan.to_dict(with_scores),
        }
