"""COMP's settings: ``CompConfig`` (validated in ``__post_init__``), its choices and the paper's setting."""
from __future__ import annotations

from dataclasses import dataclass

from ...loop.capture import FORWARD_DTYPES
from ...math.scoring import SCORES
from ..base import protected_layers
from ..search.settings import SearchSettings

GRANULARITIES = ("hybrid", "layers", "neurons")
INPUT_MODES = ("identical", "accumulated", "paired")
REFIT_MODES = ("never", "auto", "always", "blend")
DENSE_ALLOCATIONS = ("variance", "uniform")
O_GRANULARITIES = ("columns", "units")
DEFAULT_DENSE_KINDS = ("down", "o")
# The COMP paper's setting, one flag away (``--paper`` on the command line): its calibration budget, the
# mask tuning of eq. 7 as the only compensation, the diagonal score and one removed layer on this model.
PAPER_SETTINGS = {"refit": "never", "remove_layers": 1, "score": "diag"}
PAPER_CALIBRATION = (10, 128)  # samples × tokens


# settings a searched allocation cannot run with: (field, value, why — after "allocation='search' ")
_NOT_SEARCHABLE = (
    ("inputs", "paired", "prunes every layer on the original model's inputs (its database); paired inputs need "
                         "the pruned stream: use inputs='identical' with it"),
    ("granularity", "layers", "shares neuron pruning between layers; granularity 'layers' (comp-layers) removes "
                              "whole layers only, so there is nothing to search"),
    ("score", "fisher", "scores from each layer's input statistics; the Fisher score back-propagates through the "
                        "whole model: choose another score"),
    ("remove_layers", "auto", "searches the neuron shares after a fixed number of removed layers; give "
                              "remove_layers a number (or 'min')"),
)


@dataclass
class CompConfig(SearchSettings):
    """Settings of one COMP run. Layer indices are those of the original model.

    The defaults are the measured best within two minutes on two cores (docs/RESULTS.md, "levers": 64 × 512
    C4 tokens, no removed layer, activation score, blend compensation — 58.6 WikiText-2 perplexity at 20 %
    on SmolLM2-135M against 70.4 for the paper's setting); ``PAPER_SETTINGS`` with ``PAPER_CALIBRATION`` is
    the paper's own (10 × 128 tokens, mask tuning, one removed layer, the diagonal score).

    ratio: share of *all* parameters (embeddings included) to remove.
    remove_layers: how many blocks to remove first (at most as many as the ratio's budget holds, so ratio 0
        removes none), "auto" (sweep, keep the lowest calibration loss) or "min" (the default: as few as the
        ratio needs — none when neuron pruning alone reaches it within the caps, as on SmolLM2-135M up to
        ~50 %; with 64 × 512 tokens and the blend, removing one block first measured 61.4 against 58.6).
    protected: blocks never removed and never neuron-pruned; None = first two and last.
    granularity: "hybrid" (COMP), "layers" (layer removal only, as many blocks as the ratio needs),
        "neurons" (no layer removal).
    dense_kinds: which denses may lose input neurons (kinds "q", "k", "v", "o", "gate", "up", "down"; OPT's
        fc1/fc2 are "up"/"down"; fused families' qkv_proj / gate_up_proj are "qkv" / "gate_up", see
        ``models.adapters.REGISTRY``); None = all, as in the paper. The default prunes only the inputs of down
        (with the coupled gate/up rows) and o: on SmolLM2-135M at 20 % pruning every dense measured 341
        perplexity against 69.8 for down+o — the hidden-state inputs of q/k/v/gate/up carry the residual
        stream's outlier features and lose far more per removed parameter.
    mask_tuning: compensate the pruned columns (False = plain removal, for ablations).
    refit: with compensation on, "never" = always the paper's mask tuning; "always" = full least-squares
        refit of the kept columns; "auto" = refit a dense only when calibration has at least
        ``refit_tokens_per_input`` tokens per input column, else mask tuning (too few tokens make the
        refit overfit: shared notes/calibration.md). ``refit_damp`` is its relative damping: a free weight
        per entry needs less than the mask solve (measured 64.3 vs 69.9 perplexity at 1e-3 vs 1e-2).
        "blend" = per dense, the ridge between the two (``mask_tuning.ridge_refit``) whose fit on half of the
        calibration sequences best predicts the other half (``choose_ridge``), or the mask itself if no
        ridge beats it: the rank-aware choice, made from the data instead of a tokens-per-column threshold.
    dense_allocation: how a block's budget is shared by its denses: "variance" (COMP: the smallest variance
        threshold τ of the tuned masks that meets the budget) or "uniform" (ablation: every prunable dense
        loses the same share of its inputs, ``allocation.equal_share_cuts``). Until the searched allocation
        this setting was called ``allocation``; those two values given there still land here.
    allocation: how the ratio is shared by the layers: "one-shot" (eq. 10 over the importances) or "search"
        (``methods.search``; its budget and the other search_* settings: ``SearchSettings``).
    o_granularity: how o_proj loses inputs: "columns" (one head dimension at a time, the paper) or "units"
        (whole attention units, ``structure.AttentionUnits``: a head, or a KV group under grouped-query
        attention, together with its q/k/v rows; scored by the sum of its columns' scores, its mask-variance
        step taken at unit boundaries). Units free about 2.7× the parameters per o column on SmolLM2
        (q, k and v rows go too) but come 192 columns at a time.
    layer_rescale: Prune&Comp (Chen et al., AAAI 2026): where a block is removed, multiply the residual stream
        by s = mean over calibration sequences and channels of mean_t |y| / mean_t |x| (the removed block's
        output over its input, ``math.magnitude``), measured at each removal on the stream already compensated
        for the earlier ones (the iterative search then ranks the compensated model); folded as 1/s into the
        o/down projections of the kept blocks after the gap. Only acts where layers are removed
        ("layers", or "hybrid" when it removes any). Off by default although it helped comp-layers on the
        bundled model (4 layers removed, C4 10 × 128: 61.12 → 57.96 WikiText-2 perplexity): on by default,
        comp-layers would change its recorded behaviour (tools/fingerprints.py) and refuse the families it
        cannot fold into (``ArchAdapter.stream_rescale``).
    """

    ratio: float = 0.2
    remove_layers: int | str = "min"
    protected: tuple[int, ...] | None = None
    granularity: str = "hybrid"
    score: str = "activation"  # measured ahead of "diag" at every budget tried (60.2 vs 60.9 at 32 × 512)
    mask_tuning: bool = True
    inputs: str = "identical"
    damp: float = 0.01
    max_dense_ratio: float = 0.9
    layer_cap: float = 0.9
    dense_kinds: tuple[str, ...] | None = DEFAULT_DENSE_KINDS
    refit: str = "default"  # "blend"; "auto" under paired inputs, which cannot hold out folds
    refit_tokens_per_input: float = 8.0
    refit_damp: float = 1e-3
    auto_max_layers: int = 8
    batch_size: int = 4  # calibration sequences per forward: 8 raised the peak RSS by 0.4 GB, no faster
    dense_allocation: str = "variance"  # per-dense cuts: the variance threshold τ, or "uniform" (ablation)
    forward_dtype: str = "auto"  # calibration forwards: "auto" (bf16 autocast where native), "float32", "bfloat16"
    o_granularity: str = "columns"
    layer_rescale: bool = False  # Prune&Comp: rescale the stream where a layer was removed

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got '{self.granularity}'")
        if self.inputs not in INPUT_MODES:
            raise ValueError(f"inputs must be one of {INPUT_MODES}, got '{self.inputs}'")
        if self.score not in SCORES:
            raise ValueError(f"unknown importance score '{self.score}'; choose one of: {', '.join(SCORES)}")
        if self.remove_layers not in ("auto", "min") and (
                not isinstance(self.remove_layers, int) or self.remove_layers < 0):
            raise ValueError(f"remove_layers must be a non-negative integer, 'min' or 'auto', got {self.remove_layers!r}")
        if not 0.0 < self.max_dense_ratio < 1.0 or not 0.0 < self.layer_cap < 1.0:
            raise ValueError("max_dense_ratio and layer_cap must be in (0, 1)")
        if self.refit == "default":
            self.refit = "auto" if self.inputs == "paired" else "blend"
        if self.refit not in REFIT_MODES:
            raise ValueError(f"refit must be one of {REFIT_MODES}, got '{self.refit}'")
        if self.refit == "blend" and self.inputs == "paired":
            raise ValueError("refit='blend' chooses its ridge on held-out unpaired statistics; use inputs="
                             "'identical' or 'accumulated' with it")
        if self.forward_dtype not in FORWARD_DTYPES:
            raise ValueError(f"forward_dtype must be one of {FORWARD_DTYPES}, got '{self.forward_dtype}'")
        if self.o_granularity not in O_GRANULARITIES:
            raise ValueError(f"o_granularity must be one of {O_GRANULARITIES}, got '{self.o_granularity}'")
        if self.allocation in DENSE_ALLOCATIONS:  # the name this setting had before the searched allocation
            self.dense_allocation, self.allocation = self.allocation, "one-shot"
        self.check_search()
        if self.o_granularity == "units" and self.dense_allocation != "variance":
            raise ValueError("o_granularity='units' shares the layer budget by the variance threshold; "
                             "use dense_allocation='variance' with it")
        if self.dense_allocation not in DENSE_ALLOCATIONS:
            raise ValueError(f"dense_allocation must be one of {DENSE_ALLOCATIONS}, got '{self.dense_allocation}'")
        if self.searched:
            for field_name, value, why in _NOT_SEARCHABLE:
                if getattr(self, field_name) == value:
                    raise ValueError(f"allocation='search' {why}")
        if self.damp <= 0 or self.refit_damp <= 0:
            raise ValueError("damp and refit_damp must be > 0")
        if self.protected is not None:
            self.protected = tuple(sorted({int(i) for i in self.protected}))

    @property
    def rescales_layers(self) -> bool:
        """Whether removed layers get Prune&Comp's rescaling (``layer_rescale``; never without layer removal)."""
        return self.layer_rescale and self.granularity != "neurons"

    def protected_layers(self, n_layers: int) -> set[int]:
        """The protected blocks; None = the first two and the last (only the first in a model of ≤ 3 blocks)."""
        if self.protected is None:
            return {0, 1, n_layers - 1} if n_layers > 3 else {0}
        return protected_layers(self.protected, n_layers, ratio=self.ratio)
