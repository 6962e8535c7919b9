"""The method registry: every pruning method under one name, one settings dataclass and one result shape.

A method is a small class over the shared block loop and statistics (``comp_core.loop.blocks``/``stats``)::

    @register_method("wanda-sp", summary="...", compensation="none")
    @register_method("wanda-sp+mask", summary="...", compensation="mask")
    class WandaSP(Method):
        kind = "structured"
        settings_class = WandaSPSettings
        def prune(self, model, samples, settings, *, on_event=None, inplace=False): ...

One class may be registered under several names with different default settings (an ablation or a
variant is a registry entry, not a copy). ``make_settings`` validates overrides against the dataclass, so
the CLI and the GUI never need an if/elif per method.
"""
from __future__ import annotations

import copy
import dataclasses
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..events import ProgressCallback
from ..results import CompPlan, PruneResult
from ..runtime import check_ratio_of, count_parameters, peak_rss_mb, ratio_over_all
from ..models.adapters import count_block_parameters
from ..models.streaming import is_streamed

KINDS = ("structured", "unstructured", "composed")  # composed: structured, then masks


class Method:
    """Interface of a pruning method. Subclasses set the class attributes and implement ``prune``."""

    kind: ClassVar[str] = "structured"
    settings_class: ClassVar[type]
    requires_calibration: ClassVar[bool] = True
    has_plan: ClassVar[bool] = True  # whether ``analyze`` returns a per-layer plan to show
    # whether it prunes a streamed model (``comp_core.models.streaming``: blocks read from disk one at a time), i.e.
    # reads and changes blocks only inside the block loop or a forward
    streams: ClassVar[bool] = False

    def prune(self, model: nn.Module, samples: torch.Tensor | None, settings: Any, *,
              on_event: ProgressCallback | None = None, inplace: bool = False) -> tuple[nn.Module, PruneResult]:
        raise NotImplementedError

    def analyze(self, model: nn.Module, samples: torch.Tensor | None, settings: Any,
                on_event: ProgressCallback | None = None) -> CompPlan:
        """What the method would cut, without changing ``model``. Default: prune a copy and keep its plan."""
        _, result = self.prune(model, samples, settings, on_event=on_event, inplace=False)
        return result.plan

    def search_setup(self, settings: Any) -> Callable:
        """The method's search space for a searched allocation (``methods.search.run.Setup``): a method with
        per-layer levels overrides this and runs ``search.searched_prune`` when ``settings.allocation`` is
        "search"."""
        raise ValueError(f"{type(self).__name__} has no per-layer levels to search")

    @property
    def searchable(self) -> bool:
        return type(self).search_setup is not Method.search_setup


@dataclass(frozen=True)
class MethodEntry:
    name: str
    method: Method
    summary: str
    defaults: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.method.kind

    @property
    def settings_class(self) -> type:
        return self.method.settings_class


REGISTRY: dict[str, MethodEntry] = {}
# Former names of settings, still accepted wherever a user types one (``--set KEY=VALUE``, ``make_settings``, a
# saved report's config): one word per concept in the dataclasses, nothing a user typed breaks.
SETTING_ALIASES = {"propagation": "inputs"}  # the non-COMP methods' name for COMP's ``inputs`` until issue 30


def canonical_setting(key: str) -> str:
    return SETTING_ALIASES.get(key, key)


def register_method(name: str, *, summary: str, **defaults) -> Callable[[type], type]:
    """Class decorator: register an instance of the class as ``name`` with default setting overrides."""
    def decorate(cls: type) -> type:
        if name in REGISTRY:
            raise ValueError(f"method '{name}' is registered twice")
        if cls.kind not in KINDS:
            raise ValueError(f"{cls.__name__}.kind must be one of {KINDS}")
        fields = {f.name for f in dataclasses.fields(cls.settings_class)}
        unknown = set(defaults) - fields
        if unknown:
            raise ValueError(f"defaults {sorted(unknown)} are not fields of {cls.settings_class.__name__}")
        REGISTRY[name] = MethodEntry(name=name, method=cls(), summary=summary, defaults=dict(defaults))
        return cls
    return decorate


def method_names(kind: str | None = None) -> list[str]:
    return [n for n, e in REGISTRY.items() if kind is None or e.kind == kind]


def get_method(name: str) -> MethodEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}'; choose one of: {', '.join(REGISTRY)}") from None


def setting_names(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(get_method(name).settings_class)]


def make_settings(name: str, **overrides):
    """The settings of method ``name``: its registered defaults, then ``overrides`` (validated)."""
    entry = get_method(name)
    fields = {f.name: f for f in dataclasses.fields(entry.settings_class)}
    overrides = {canonical_setting(k) if k not in fields else k: v for k, v in overrides.items()}
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a setting of method '{name}'; its settings are: "
                         f"{', '.join(fields)}")
    return entry.settings_class(**{**entry.defaults, **overrides})


def parse_setting(name: str, key: str, text: str):
    """A ``key=value`` setting from the command line, converted to the type of the dataclass field."""
    entry = get_method(name)
    hints = typing.get_type_hints(entry.settings_class)
    key = key if key in hints else canonical_setting(key)
    if key not in hints:
        raise ValueError(f"{key}: not a setting of method '{name}'; its settings are: {', '.join(setting_names(name))}")
    return _convert(text, hints[key], key)


def _convert(text: str, hint, key: str):
    text = text.strip()
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(text, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(f"{key}: cannot read '{text}' ({'; '.join(errors)})")
    if hint is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}: expected true/false, got '{text}'")
    if origin is tuple:
        inner = args[0] if args else str
        return tuple(_convert(t, inner, key) for t in text.split(",") if t.strip())
    if hint in (int, float, str):
        try:
            return hint(text)
        except ValueError:
            raise ValueError(f"{key}: expected {hint.__name__}, got '{text}'") from None
    raise ValueError(f"{key}: settings of type {hint} cannot be set from text")


def check_streamable(name: str, model: nn.Module) -> None:
    """Refuse a method that needs the whole model in memory on a streamed model, naming those that do not."""
    if is_streamed(model) and not get_method(name).method.streams:
        able = [n for n, e in REGISTRY.items() if e.method.streams]
        raise ValueError(f"method '{name}' needs the whole model in memory, and this model is streamed (its blocks "
                         f"are read from disk one at a time); methods that stream: {', '.join(able)}; or load the "
                         "model without streaming (--stream off)")


def settings_over_all(model: nn.Module, settings, ratio_of: str = "all") -> tuple[Any, dict | None]:
    """``settings`` with its ``ratio`` read as a share of ``ratio_of`` (``runtime.RATIO_BASES``) and turned into
    the share of all parameters every method works with (``runtime.ratio_over_all``), and what was asked
    (``{"ratio": …, "ratio_of": …}``; None for a method without a ratio, which ``ratio_of`` leaves alone)."""
    check_ratio_of(ratio_of)
    ratio = getattr(settings, "ratio", None)
    if ratio is None:
        return settings, None
    requested = {"ratio": ratio, "ratio_of": ratio_of}
    if ratio_of == "all":
        return settings, requested
    over_all = ratio_over_all(ratio, ratio_of, count_parameters(model), count_block_parameters(model))
    return dataclasses.replace(settings, ratio=over_all), requested


def prune_with(name: str, model: nn.Module, samples: torch.Tensor | None, settings=None, *,
               ratio_of: str = "all", on_event: ProgressCallback | None = None, inplace: bool = False, **overrides
               ) -> tuple[nn.Module, PruneResult]:
    """Prune with the registered method ``name`` (settings = its defaults + ``overrides`` unless given).

    ``ratio_of``: what the settings' ``ratio`` is a share of, "all" parameters (the default) or the decoder
    "blocks"' parameters; converted here, once, so the method works on the share of all. The result's
    ``plan.config["requested"]`` records what was asked; ``realised_ratio`` and ``realised_block_ratio``
    what went."""
    entry = get_method(name)
    check_streamable(name, model)
    settings = settings if settings is not None else make_settings(name, **overrides)
    settings, requested = settings_over_all(model, settings, ratio_of)
    if entry.method.requires_calibration and samples is None:
        raise ValueError(f"method '{name}' needs calibration samples")
    pruned, result = entry.method.prune(model, samples, settings, on_event=on_event, inplace=inplace)
    result.method = result.plan.method = name
    result.kind = entry.kind
    if requested is not None:
        result.plan.config["requested"] = requested
    return pruned, result


def analyze_with(name: str, model: nn.Module, samples: torch.Tensor | None, settings=None, *,
                 ratio_of: str = "all", on_event: ProgressCallback | None = None, **overrides) -> CompPlan:
    """What ``name`` would cut, without changing ``model``; ``ratio_of`` as in :func:`prune_with`."""
    entry = get_method(name)
    check_streamable(name, model)
    settings = settings if settings is not None else make_settings(name, **overrides)
    settings, requested = settings_over_all(model, settings, ratio_of)
    plan = entry.method.analyze(model, samples, settings, on_event=on_event)
    plan.method = name
    if requested is not None:
        plan.config["requested"] = requested
    return plan


def finish(model: nn.Module, plan: CompPlan, params_before: int, start: float) -> PruneResult:
    """The shared tail of every ``prune``: check the plan's accounting against the model, measure the
    decoder blocks before (the plan's layer sizes) and after, time it."""
    params_after = count_parameters(model)
    if plan.planned_params_after and params_after != plan.planned_params_after:
        raise AssertionError(f"planned {plan.planned_params_after} parameters after pruning, model has {params_after}")
    plan.planned_params_after = params_after
    return PruneResult(plan=plan, params_before=params_before, params_after=params_after,
                       seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb(),
                       block_params_before=plan.block_params, block_params_after=count_block_parameters(model))


def working_copy(model: nn.Module, inplace: bool) -> nn.Module:
    return model if inplace else copy.deepcopy(model)
