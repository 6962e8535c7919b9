"""COMP (hybrid granularity): iterative layer removal by cosine redundancy, per-layer ratios by the variance rule,
input-neuron pruning with least-squares compensation.

``config`` holds the settings (``CompConfig``) and the paper's setting; ``block`` the step on one block (score →
choose cuts → compensate → report, over one ``DenseStep`` per dense); ``run`` the run over the model (analyse,
prune, apply a plan, reallocate) and the registry entry; ``whatif`` re-plans an analysed model for another
ratio or removal depth without a new forward pass."""
from .block import layer_caps
from .config import PAPER_CALIBRATION, PAPER_SETTINGS, CompConfig
from .run import Comp, analyze, apply_plan, prune, reallocate

__all__ = ["PAPER_CALIBRATION", "PAPER_SETTINGS", "Comp", "CompConfig", "analyze", "apply_plan", "layer_caps", "prune",
           "reallocate"]
