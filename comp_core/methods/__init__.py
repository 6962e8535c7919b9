"""Pruning methods behind one registry (see ``registry``); importing this package registers them all."""
from . import comp, composed, flap, ria, shortgpt, sparse, uniform  # noqa: F401  (importing registers them)
from .registry import (REGISTRY, Method, MethodEntry, analyze_with, get_method, make_settings, method_names,
                       parse_setting, prune_with, register_method, setting_names, settings_over_all)

__all__ = ["REGISTRY", "Method", "MethodEntry", "analyze_with", "get_method", "make_settings", "method_names",
           "parse_setting", "prune_with", "register_method", "setting_names", "settings_over_all"]
