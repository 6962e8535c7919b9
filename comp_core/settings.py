"""User controls → a method's settings dataclass, for every face.

The command line and the GUI both read ratios, sparsity patterns, protected layers, evaluation sets and
``KEY=VALUE`` settings from what a person typed or ticked. They parse them here, so both accept the same
text ("20%" as well as 0.2), refuse the same mistakes with the same message, and build a method's settings
in one place (:func:`settings_for`, which hands over to the registry's ``make_settings``).
Every refusal is a :class:`SettingsError` (a ``ValueError``) whose message says what is accepted. What a ratio
is a share of (``ratio_of``: :data:`RATIO_BASES`, all parameters or the decoder blocks') is checked by
``runtime.check_ratio_of`` and converted by ``runtime.ratio_over_all`` where the model is known.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

from .math.sparsity import SparsityPattern
from .methods import get_method, make_settings, parse_setting, setting_names
from .methods.comp import PAPER_SETTINGS, CompConfig
from .runtime import RATIO_BASES, SettingsError, check_ratio_of  # noqa: F401  (every face's names, kept here)

EVAL_SETS: tuple[str, ...] = ("wikitext2", "ptb", "c4", "sample")  # sample: shipped, needs no data folder
# the structured methods a comparison runs when none are named (CLI ``compare``, the GUI's Compare tab)
COMPARE_METHODS: tuple[str, ...] = ("comp", "flap", "shortgpt", "wanda-sp", "magnitude-sp")
_SEPARATORS = re.compile(r"[,;\s]+")


def _parts(value: str | Iterable | None) -> list[str]:
    """Items of a list typed as text ("0.2, 0.3", "20% 30%;0.2") or given as a sequence."""
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [p for p in _SEPARATORS.split(str(value).strip()) if p]
    return [str(v).strip() for v in value if str(v).strip()]


# ------------------------------------------------------------------------------------------- targets


def parse_ratio(value: str | float, *, allow_zero: bool = True) -> float:
    """A share of all parameters to remove: 0.2 or "20%"; in [0, 1) (in (0, 1) when ``allow_zero`` is False)."""
    text = "".join(str(value).split())
    try:
        ratio = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise SettingsError(f"'{value}' is not a ratio; type a share of the parameters like 0.2 or 20%") from None
    low = "[0, 1)" if allow_zero else "(0, 1)"
    if math.isnan(ratio) or not (0.0 <= ratio < 1.0) or (ratio == 0.0 and not allow_zero):
        raise SettingsError(f"ratio {value} is out of range: a ratio is the share of the parameters to remove, "
                            f"in {low} (e.g. 0.2 or 20%)")
    return ratio


def parse_ratios(value: str | Iterable | None, *, allow_zero: bool = True) -> tuple[float, ...]:
    """Several ratios: "0.1,0.2", "20% 30%;0.2" or a sequence; duplicates dropped, order kept."""
    parts = _parts(value)
    if not parts:
        raise SettingsError("type one or more ratios, e.g. 0.2, 0.3 (or 20%, 30%)")
    for part in parts:
        try:
            float(part[:-1] if part.endswith("%") else part)
        except ValueError:
            raise SettingsError(f"'{part}' is not a ratio; expected comma-separated numbers like 0.2, 0.3 "
                                "(or 20%, 30%)") from None
    return tuple(dict.fromkeys(parse_ratio(p, allow_zero=allow_zero) for p in parts))


def parse_sparsity(value: str | float | None, *, allow_zero: bool = False) -> str:
    """A mask pattern: a share ("0.5", "50%") or N:M ("2:4", " 4 : 8 "), as the core labels it ("0.5", "2:4").
    A share of 0 masks nothing and is refused unless ``allow_zero``."""
    spec = "".join(str(value if value is not None else "").split())
    if not spec:
        raise SettingsError("choose a sparsity: a share like 0.5, or N:M like 2:4")
    if spec.endswith("%"):
        try:
            spec = f"{float(spec[:-1]) / 100:g}"
        except ValueError:
            raise SettingsError(f"'{value}' is not a sparsity; type 0.5, 50% or N:M like 2:4") from None
    try:
        pattern = SparsityPattern.parse(spec)
    except ValueError as err:
        raise SettingsError(f"'{value}' is not a sparsity ({err}); type a share in (0, 1) like 0.5 or 50%, "
                            "or N:M like 2:4") from None
    if pattern.fraction <= 0 and not allow_zero:
        raise SettingsError("a sparsity of 0 masks nothing; use a share in (0, 1) like 0.5, or N:M like 2:4")
    return pattern.label


def parse_sparsities(value: str | Iterable | None, *, allow_zero: bool = False) -> tuple[str, ...]:
    """Several patterns: "0.5, 2:4" or "50% 4:8"; duplicates dropped, order kept."""
    parts = _parts(value)
    if not parts:
        raise SettingsError("type one or more sparsities for the mask methods, e.g. 0.5, 2:4")
    return tuple(dict.fromkeys(parse_sparsity(p, allow_zero=allow_zero) for p in parts))


# ------------------------------------------------------------------------------------------- layers


def parse_layers(value: str | Iterable | None, n_layers: int | None = None) -> tuple[int, ...]:
    """Protected layers: "0,1,29" or a sequence of numbers, sorted and without duplicates. Negative numbers
    count from the end (-1: the last layer). With ``n_layers``, numbers outside the model are refused."""
    layers = set()
    for part in _parts(value):
        try:
            layer = int(part)
        except ValueError:
            raise SettingsError(f"'{part}' is not a layer number; type layer numbers like 0,1,29") from None
        if n_layers is not None and not -n_layers <= layer < n_layers:
            raise SettingsError(f"layer {layer} does not exist: the model has layers 0..{n_layers - 1}")
        layers.add(layer)
    return tuple(sorted(layers))


def parse_remove_layers(value: str | int) -> int | str:
    """COMP's blocks to remove first: a whole number >= 0, "min" or "auto"."""
    text = str(value).strip()
    if text in ("auto", "min"):
        return text
    try:
        count = int(text)
    except ValueError:
        raise SettingsError(f"layers to remove: expected a whole number, 'min' or 'auto', got '{value}'") from None
    if count < 0:
        raise SettingsError(f"layers to remove must be >= 0, got {count}")
    return count


def parse_dense_kinds(value: str | Iterable) -> tuple[str, ...] | None:
    """COMP's denses that may lose inputs: "down,o" → ("down", "o"); "all" → None (every dense)."""
    if isinstance(value, str) and value.strip() == "all":
        return None
    return tuple(_parts(value))


def chosen_dense_kinds(ticked: Iterable[str] | None, all_kinds: Sequence[str] | None) -> dict[str, Any]:
    """``{"dense_kinds": ...}`` from ticked boxes: every kind ticked means None (all); nothing known yet
    (``ticked`` None or no ``all_kinds``) gives {} so the method's default stays."""
    if ticked is None or not all_kinds:
        return {}
    chosen = tuple(k for k in all_kinds if k in set(ticked))
    return {"dense_kinds": None if set(chosen) == set(all_kinds) else chosen}


# ------------------------------------------------------------------------------------------- evaluation


def parse_count(value: str | float | None, what: str) -> int | None:
    """How many windows or items to use: a whole number; empty or < 1 means all (None)."""
    if value is None or str(value).strip() == "":
        return None
    try:
        count = float(value)
        if not count.is_integer():
            raise ValueError
    except (TypeError, ValueError):
        raise SettingsError(f"{what} must be a whole number (0 or empty = all), got '{value}'") from None
    return int(count) if count >= 1 else None



def parse_eval_sets(value: str | Iterable | None) -> tuple[str, ...]:
    """Perplexity sets: "wikitext2,ptb" or a sequence, each one of :data:`EVAL_SETS`."""
    names = tuple(dict.fromkeys(_parts(value)))
    unknown = [n for n in names if n not in EVAL_SETS]
    if unknown:
        raise SettingsError(f"unknown evaluation set '{unknown[0]}'; choose from {', '.join(EVAL_SETS)}")
    return names


# ------------------------------------------------------------------------------------------- KEY=VALUE


def parse_assignment(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` → (key, value) (the value unparsed: its type is the method's field's)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SettingsError(f"expected KEY=VALUE, got '{text}'")
    return key.strip(), value


def parse_overrides(method: str, items: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """(key, text) pairs → values typed as ``method``'s settings dataclass declares them (the registry's
    ``parse_setting``); unknown keys name the method's settings."""
    try:
        return {key: parse_setting(method, key, value) for key, value in items}
    except SettingsError:
        raise
    except ValueError as err:
        raise SettingsError(str(err)) from None


def split_per_method(methods: Sequence[str], items: Iterable[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """``METHOD.KEY=VALUE`` pairs of a comparison → each method's own (key, value) pairs."""
    out: dict[str, list[tuple[str, str]]] = {m: [] for m in methods}
    for key, value in items:
        method, dot, name = key.rpartition(".")
        if not dot or method not in out:
            raise SettingsError(f"--set {key}={value}: write METHOD.KEY=VALUE with METHOD one of {', '.join(methods)}")
        out[method].append((name, value))
    return out


# ------------------------------------------------------------------------------------------- settings


def uses_comp_settings(method: str) -> bool:
    """Whether ``method``'s settings are COMP's ``CompConfig``, so COMP's own controls apply to it."""
    return issubclass(get_method(method).settings_class, CompConfig)


def settings_for(method: str, *, ratio: str | float | None = None, sparsity: str | float | None = None,
                 protected: str | Iterable | None = None, comp: Mapping[str, Any] | None = None,
                 paper: bool = False, values: Mapping[str, Any] | None = None,
                 overrides: Iterable[tuple[str, str]] = ()) -> Any:
    """The settings dataclass ``method`` runs with: its registered defaults, then, in this order, ``ratio``
    and ``sparsity`` (each only if the method has it), COMP's paper setting (``paper``), COMP's own fields
    (``comp``: typed values, refused for other methods), ``protected``, typed ``values`` and text ``overrides``
    (``KEY=VALUE`` pairs). The one place every face builds settings."""
    fields = set(setting_names(method))
    is_comp = uses_comp_settings(method)
    chosen: dict[str, Any] = {}
    if ratio is not None:
        parsed = parse_ratio(ratio)  # checked even where unused: a typo is refused, not ignored
        if "ratio" in fields:
            chosen["ratio"] = parsed
    if paper:
        if not is_comp:
            raise SettingsError(f"--paper is COMP's setting, not one of method '{method}'")
        chosen.update(PAPER_SETTINGS)
    if comp:
        if not is_comp:
            raise SettingsError(f"{', '.join(comp)}: COMP settings, not settings of method '{method}' "
                                f"(its settings are: {', '.join(sorted(fields))})")
        chosen.update(comp)
    if sparsity not in (None, "") and "sparsity" in fields:
        chosen["sparsity"] = parse_sparsity(sparsity, allow_zero=True)
    if protected is not None:
        chosen["protected"] = parse_layers(protected)
    chosen.update(values or {})
    chosen.update(parse_overrides(method, overrides))
    try:
        return make_settings(method, **chosen)
    except SettingsError:
        raise
    except ValueError as err:
        raise SettingsError(str(err)) from None
