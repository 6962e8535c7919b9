"""Measuring a model: perplexity and calibration loss (``loss``), zero-shot accuracy through lm-eval (``zeroshot``),
speed and memory (``speed``), and several methods pruned and measured side by side (``compare``)."""
from .loss import PerplexityResult, calibration_loss, perplexity

__all__ = ["PerplexityResult", "calibration_loss", "perplexity"]
