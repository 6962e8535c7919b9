"""comp-explorer: post-training structured pruning of LLMs with COMP.

Typical use::

    from comp_core import load_model, get_calibration, CompConfig, analyze, prune, perplexity, get_eval_tokens
    loaded = load_model()                                   # bundled SmolLM2-135M-Instruct
    samples = get_calibration("c4", loaded.tokenizer)       # 64 × 512 tokens, seed 0
    plan = analyze(loaded.model, samples, CompConfig(ratio=0.2))
    pruned, result = prune(loaded.model, samples, CompConfig(ratio=0.2))
    print(result.realised_ratio, perplexity(pruned, get_eval_tokens("wikitext2", loaded.tokenizer), 512).ppl)

Any registered method (``method_names()``) runs the same way::

    from comp_core import make_settings, prune_with
    pruned, result = prune_with("wanda-sp", loaded.model, samples, make_settings("wanda-sp", ratio=0.2))
"""
import importlib
import sys

from .math.allocation import ImpossibleRatioError
from .data import DataError, get_calibration, get_eval_tokens
from .evaluate.loss import PerplexityResult, calibration_loss, perplexity
from .events import Cancelled, PruneEvent
from .export.folder import load_pruned, save_pruned
from .methods import analyze_with, make_settings, method_names, prune_with
from .methods.comp import CompConfig, analyze, prune, reallocate
from .models.adapters import UnsupportedModelError, get_adapter
from .models.loading import LoadedModel, ModelLoadError, load_model
from .results import CompPlan, DenseReport, LayerReport, Plan, PruneResult
from .runtime import count_parameters

__all__ = [
    "CompConfig", "CompPlan", "Cancelled", "DataError", "DenseReport", "ImpossibleRatioError", "LayerReport", "Plan",
    "LoadedModel", "ModelLoadError", "PerplexityResult", "PruneEvent", "PruneResult", "UnsupportedModelError",
    "analyze", "analyze_with", "calibration_loss", "count_parameters", "get_adapter", "get_calibration",
    "get_eval_tokens", "load_model", "load_pruned", "make_settings", "method_names", "perplexity", "prune",
    "prune_with", "reallocate", "save_pruned",
]

# Where the flat modules of 0.x went when the package was laid out by concern (issue 30). Old imports such as
# ``from comp_core.sparse_export import save_compressed`` keep working: each old name is the moved module itself.
MOVED_MODULES = {
    "allocation": "math.allocation", "linalg": "math.linalg", "mask_tuning": "math.mask_tuning",
    "obs": "math.obs_solvers", "permutation": "math.permutation", "scoring": "math.scoring",
    "sparsity": "math.sparsity", "structure": "models.structure", "surgery": "models.surgery",
    "streaming": "models.streaming", "synthetic": "models.synthetic", "capture": "loop.capture",
    "stats": "loop.stats", "fisher": "loop.fisher", "removal": "loop.importance", "atomic": "export.atomic",
    "sparse_export": "export.compressed", "gguf_export": "export.gguf", "gguf_tokenizer": "export.gguf_tokenizer",
    "zeroshot": "evaluate.zeroshot", "speed": "evaluate.speed", "compare": "evaluate.compare",
    "whatif": "methods.comp.whatif",
}


def _alias_moved_modules() -> None:
    for old, new in MOVED_MODULES.items():
        module = importlib.import_module(f"{__name__}.{new}")
        sys.modules[f"{__name__}.{old}"] = module
        globals()[old] = module


_alias_moved_modules()
