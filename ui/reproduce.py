"""The command lines that redo a GUI run: what the report hands to a person who wants the same model again.

Only the settings that differ from the method's registered defaults are written (``--set KEY=VALUE``, read
back by the CLI's own parser), so the command stays short and still builds the very same settings object;
``tests/ui/test_reproduce.py`` checks that round trip through ``comp_core.cli``. A run with searched layer
shares (``allocation=search``) also writes its generations when they are the default: the budget decides
what the search finds, so the command keeps it even if the default changes.
"""
from __future__ import annotations

import shlex
from dataclasses import fields
from typing import Any, Sequence

from comp_core.methods import make_settings

BUNDLED = "bundled"
# fields with a flag of their own (the rest go through --set)
OWN_FLAGS = {"ratio": "--ratio", "sparsity": "--sparsity", "protected": "--protect"}
# written for a searched run even at their defaults (what the search finds depends on them)
SEARCH_BUDGET = ("search_generations",)


def setting_text(value: Any) -> str:
    """A settings value as ``--set`` reads it: tuples comma-separated, booleans true/false, None as none."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(setting_text(v) for v in value)
    if hasattr(value, "label"):  # a sparsity pattern
        return str(value.label)
    return str(value)


def changed_settings(method: str, settings: Any) -> dict[str, Any]:
    """The fields of ``settings`` that differ from ``method``'s registered defaults (and a searched run's budget)."""
    defaults = make_settings(method)
    searched = getattr(settings, "allocation", None) == "search"
    return {f.name: getattr(settings, f.name) for f in fields(settings)
            if getattr(settings, f.name) != getattr(defaults, f.name) or (searched and f.name in SEARCH_BUDGET)}


def prune_command(method: str, settings: Any, *, source: str, calibration: tuple, out: str,
                  eval_sets: Sequence[str] = ()) -> str:
    """``comp-explorer prune …`` that rebuilds ``settings`` for ``method`` on ``source`` with the calibration
    ``(name, n_samples, seq_len, seed)`` and saves to ``out``."""
    name, n_samples, seq_len, seed = calibration
    words = ["comp-explorer", "prune"]
    if source and source != BUNDLED:
        words += ["--model", source]
    words += ["--method", method, "--calib", name, "--n-samples", str(n_samples), "--seq-len", str(seq_len),
              "--seed", str(seed)]
    for key, value in changed_settings(method, settings).items():
        if key in OWN_FLAGS:
            words += [OWN_FLAGS[key], setting_text(value)]
        else:
            words += ["--set", f"{key}={setting_text(value)}"]
    if eval_sets:
        words += ["--eval", ",".join(eval_sets)]
    words += ["--out", out]
    return shlex.join(words)


def eval_command(out: str, eval_sets: Sequence[str]) -> str:
    """``comp-explorer eval`` of the saved model on the same sets."""
    return shlex.join(["comp-explorer", "eval", "--model", out, "--eval", ",".join(eval_sets or ["wikitext2"])])
