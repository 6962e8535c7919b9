"""Event functions of the GUI: small plain functions over a :class:`~ui.session.Session` and control values.

They call the public ``comp_core`` API, build figures with :mod:`ui.plots` and return values / component
updates. Gradio calls them from worker threads; tests call them directly (``progress`` defaults to a
``gr.Progress`` that does nothing outside an event). Every error a user can cause comes back as a
``gr.Error`` with a plain-language message, never a traceback (``user_errors``).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import logging
import math
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import torch

from comp_core import (Cancelled, CompConfig, DataError, ImpossibleRatioError, ModelLoadError, PruneEvent,
                       UnsupportedModelError, count_parameters, get_adapter, get_calibration, get_eval_tokens,
                       perplexity, prune)
from comp_core.methods.comp import layer_caps

from . import plots
from .session import ModelCache, ResultCache, Session, normalise_source
from .whatif import Analysis, WhatIf, run_analysis, stale_reasons, what_if

log = logging.getLogger(__name__)

MODELS = ModelCache(max_items=2)
ORIGINAL_RESULTS = ResultCache()  # (model key, what, ...) -> perplexity / speed of a shared original

EVAL_SETS = ("wikitext2", "ptb", "c4")
EVAL_LABELS = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4"}
CALIB_CHOICES = [("C4 (train)", "c4"), ("WikiText-2", "wikitext2"), ("PTB", "ptb"),
                 ("Data-free (sampled from the model)", "data-free"), ("Local file…", "file")]
QUICK_WINDOWS = 8
EVAL_SEQ_LEN = 512
MAX_REMOVE = 8
DEFAULT_DEPTH = 4
BUSY_WAIT_S = 120
STAGE_LABELS = {
    "load": "Loading model", "calibration": "Calibration data", "capture": "Capturing block inputs",
    "layer-removal": "Layer removal", "fisher": "Fisher scores", "neuron-pruning": "Neuron pruning",
    "evaluate": "Evaluating", "auto-sweep": "Auto: trying layer counts", "copy": "Copying model",
    "speed": "Generation speed",
}
# what a comparison needs first (ratio, perplexity, speed, size), then how each run was made
RESULT_COLUMNS = ["run", "model", "realised ratio", "ppl wikitext2", "ppl ptb", "ppl c4", "tokens/s", "params",
                  "weights MB", "disk MB", "removed layers", "target", "score", "mask tuning", "calibration", "eval",
                  "prune s"]
USER_ERRORS = (ModelLoadError, DataError, UnsupportedModelError, ImpossibleRatioError, ValueError,
               FileExistsError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)


# -------------------------------------------------------------------------------------------- plumbing


def _message(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text[0].upper() + text[1:] if text else text


def user_errors(fn):
    """Turn exceptions into ``gr.Error`` toasts with a readable message (the traceback goes to the log)."""

    def convert(err: BaseException) -> gr.Error:
        if isinstance(err, gr.Error):
            return err
        if isinstance(err, Cancelled):
            return gr.Error("The run was stopped; nothing was changed.", title="Cancelled", print_exception=False)
        if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
            return gr.Error("Out of memory. Try fewer calibration samples, a shorter length, or a smaller model.",
                            duration=None, title="Out of memory", print_exception=False)
        if isinstance(err, USER_ERRORS):
            log.info("%s: %s", fn.__name__, err)
            return gr.Error(_message(err), duration=None, title="Cannot do that", print_exception=False)
        log.exception("unexpected error in %s", fn.__name__)
        return gr.Error(f"Unexpected error ({type(err).__name__}): {_message(err)}. Details are in the server log.",
                        duration=None, title="Something went wrong", print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - every error becomes a message
                raise convert(err) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise convert(err) from None
    return wrapper


class Bridge:
    """Core ``PruneEvent``s and plain steps -> ``gr.Progress``; raises ``Cancelled`` once the tab asked to stop."""

    def __init__(self, progress, session: Session, prefix: str = ""):
        self.progress = progress
        self.session = session
        self.prefix = prefix
        self.stage_seconds: dict[str, float] = {}
        self._stage = None
        self._since = time.perf_counter()

    def check(self) -> None:
        if self.session.cancel.is_set():
            raise Cancelled("cancelled from the GUI")

    def _enter(self, stage: str) -> None:
        now = time.perf_counter()
        if self._stage is not None:
            self.stage_seconds[self._stage] = self.stage_seconds.get(self._stage, 0.0) + now - self._since
        self._stage, self._since = stage, now

    def finish(self) -> dict[str, float]:
        self._enter(None)
        return self.stage_seconds

    def step(self, desc: str, fraction: float | None = None, stage: str | None = None) -> None:
        self.check()
        if stage is not None and stage != self._stage:
            self._enter(stage)
        with contextlib.suppress(Exception):  # progress is cosmetic
            self.progress(fraction, desc=f"{self.prefix}{desc}")

    def __call__(self, event: PruneEvent) -> None:
        label = STAGE_LABELS.get(event.stage, event.stage)
        detail = f" — {event.message}" if event.message else ""
        self.check()
        if event.stage != self._stage:
            self._enter(event.stage)
        with contextlib.suppress(Exception):
            if event.total:
                self.progress((min(event.step, event.total), event.total), desc=f"{self.prefix}{label}{detail}",
                              unit="steps")
            else:
                self.progress(None, desc=f"{self.prefix}{label}{detail}")


@contextlib.contextmanager
def _exclusive(session: Session):
    """One heavy task per tab at a time; a cancelled task still unwinding is waited for."""
    if not session.busy.acquire(timeout=BUSY_WAIT_S):
        raise gr.Error("Another task of this tab is still running; wait for it or press Cancel.",
                       title="Busy", print_exception=False)
    try:
        session.cancel.clear()
        yield
    finally:
        session.busy.release()


def export_available() -> bool:
    try:
        from comp_core.export import save_pruned  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem just hides the feature
        return False
    return True


def speed_available() -> bool:
    try:
        from comp_core.speed import measure_speed  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _tokens_per_second(value) -> float | None:
    """Batch-1 greedy decode speed out of ``comp_core.speed.measure_speed``'s report (or a dict / number)."""
    per_batch = value.get("decode_tps") if isinstance(value, dict) else getattr(value, "decode_tps", None)
    if isinstance(per_batch, dict) and per_batch:
        stat = per_batch.get(1, per_batch.get("1", next(iter(per_batch.values()))))
        median = stat.get("median") if isinstance(stat, dict) else getattr(stat, "median", stat)
        if isinstance(median, (int, float)):
            return float(median)
    for name in ("tokens_per_s", "tokens_per_second"):
        found = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
        if isinstance(found, (int, float)):
            return float(found)
    return float(value) if isinstance(value, (int, float)) else None


# a quick measurement for the GUI: batch 1, short prompt, two timed rounds (the bench uses more)
SPEED_SETTINGS = {"prefill_tokens": 128, "decode_tokens": 32, "batch_sizes": (1,), "repeats": 2,
                  "measure_memory": False}


# ---------------------------------------------------------------------------------------- model + data


def _model_name(session: Session) -> str:
    loaded = session.loaded
    if loaded is None:
        return "—"
    if loaded.kind == "bundled":
        return "SmolLM2-135M-Instruct"
    return Path(loaded.source).name if loaded.kind in ("hf-folder", "gguf") else loaded.source


def _ensure_model(session: Session, source: str, bridge: Bridge):
    key = normalise_source(source)
    if session.loaded is not None and session.model_key == key:
        return session.loaded
    bridge.step(f"Loading model {key} …", stage="load")
    loaded, _ = MODELS.get(key)
    if loaded.tokenizer is None:
        raise ModelLoadError(f"{key} has no tokenizer; calibration, evaluation and generation need one")
    get_adapter(loaded.model)  # unsupported architectures fail here, with the adapter's explanation
    session.set_model(key, loaded)
    return loaded


def _calib_key(calib: str, calib_file: str, n_samples, seq_len, seed) -> tuple:
    name = (calib_file or "").strip() if calib == "file" else calib
    if calib == "file" and not name:
        raise DataError("choose a local calibration file (.txt, .txt.gz, .jsonl, .jsonl.gz or .json.gz)")
    try:
        n, length, s = int(n_samples), int(seq_len), int(seed)
    except (TypeError, ValueError):
        raise DataError("sample count, length and seed must be whole numbers") from None
    if not 1 <= n <= 1024 or not 8 <= length <= 8192:
        raise DataError("use 1–1024 calibration samples of 8–8192 tokens")
    return name, n, length, s


def _ensure_samples(session: Session, calib, calib_file, n_samples, seq_len, seed, bridge: Bridge):
    key = _calib_key(calib, calib_file, n_samples, seq_len, seed)
    if session.samples is not None and session.calib_key == key:
        return session.samples
    name, n, length, s = key
    bridge.step(f"Calibration data: {name}, {n} × {length} tokens …", stage="calibration")
    samples = get_calibration(name, session.loaded.tokenizer, n, length, s, model=session.loaded.model)
    session.samples, session.calib_key = samples, key
    return samples


def _calib_text(key: tuple | None) -> str:
    if not key:
        return "—"
    name, n, length, seed = key
    return f"{Path(name).name if '/' in name else name} {n}×{length} s{seed}"


def _n_layers(session: Session) -> int | None:
    if session.loaded is None:
        return None
    return len(get_adapter(session.loaded.model).blocks(session.loaded.model))


def _dense_kinds(session: Session) -> list[str]:
    if session.loaded is None:
        return []
    return [d.kind for d in get_adapter(session.loaded.model).denses]


def model_card(session: Session, error: str = "") -> str:
    """The sidebar's model summary (Markdown)."""
    if error:
        return f"<div class='cx-error'>⚠ {error}</div>"
    loaded = session.loaded
    if loaded is None:
        return "<span class='cx-muted'>No model loaded yet — <b>Analyse</b> or <b>Prune</b> loads it.</span>"
    n_layers = _n_layers(session)
    params = count_parameters(loaded.model)
    where = {"bundled": "bundled", "hf-folder": "folder", "hf-hub": "hub", "gguf": "GGUF"}.get(loaded.kind, loaded.kind)
    family = get_adapter(loaded.model).family
    calib = f" · calibration {_calib_text(session.calib_key)}" if session.calib_key else ""
    return (f"<b>{_model_name(session)}</b> <span class='cx-muted'>({where}, {family})</span><br>"
            f"{n_layers} layers · {params / 1e6:.1f} M parameters · loaded in {loaded.seconds:.1f} s{calib}")


def _protected_value(session: Session, protected) -> tuple[int, ...] | None:
    """The dropdown's layers, or None (the core default) before a model filled it."""
    if protected is None or session.loaded is None:
        return None
    n = _n_layers(session)
    return tuple(sorted({int(p) for p in protected if 0 <= int(p) < n}))


def default_protected(n_layers: int) -> list[int]:
    return sorted(CompConfig().protected_layers(n_layers))


DEFAULT_DENSE_KINDS = CompConfig().dense_kinds  # the core's measured default (None would mean every dense)
DEFAULT_REMOVE = CompConfig().remove_layers if isinstance(CompConfig().remove_layers, int) else 1


def make_config(ratio, n_remove, auto, protected, score, mask_tuning, inputs, dense_kinds,
                all_kinds: list[str] | None = None, depth: int = MAX_REMOVE) -> CompConfig:
    """CompConfig from control values. ``dense_kinds``: the ticked kinds; None, or no model known yet
    (``all_kinds`` empty), means the core's default; every kind ticked means None (all)."""
    if dense_kinds is None or not all_kinds:
        kinds = DEFAULT_DENSE_KINDS
    else:
        chosen = tuple(k for k in all_kinds if k in set(dense_kinds))
        kinds = None if set(chosen) == set(all_kinds) else chosen
    return CompConfig(ratio=float(ratio), remove_layers="auto" if auto else int(n_remove),
                      protected=protected, score=score or "diag", mask_tuning=bool(mask_tuning),
                      inputs=inputs or "identical", dense_kinds=kinds, auto_max_layers=int(depth))


def default_kinds(all_kinds: list[str]) -> list[str]:
    return list(all_kinds) if DEFAULT_DENSE_KINDS is None else [k for k in all_kinds if k in DEFAULT_DENSE_KINDS]


def _session_config(session: Session, ratio, n_remove, auto, protected, score, mask_tuning, inputs, dense_kinds,
                    depth=DEFAULT_DEPTH) -> CompConfig:
    return make_config(ratio, n_remove, auto, _protected_value(session, protected), score, mask_tuning, inputs,
                       dense_kinds, _dense_kinds(session), depth)


def _control_updates(session: Session, keep_protected=None, keep_kinds=None):
    """Dropdown / checkbox / slider updates once a model is known (layer count, dense kinds)."""
    n = _n_layers(session)
    kinds = _dense_kinds(session)
    protected = default_protected(n) if keep_protected is None else sorted(int(p) for p in keep_protected)
    chosen_kinds = default_kinds(kinds) if not keep_kinds else [k for k in keep_kinds if k in kinds]
    candidates = n - len(protected)
    return (gr.update(choices=[(f"layer {i}", i) for i in range(n)], value=protected),
            gr.update(choices=kinds, value=chosen_kinds),
            gr.update(maximum=max(1, min(MAX_REMOVE, candidates))))


@user_errors
def load(session: Session, source, calib, calib_file, n_samples, seq_len, seed, progress=gr.Progress()):
    """Load the model and the calibration samples; returns (model card, protected, dense kinds, remove slider)."""
    bridge = Bridge(progress, session)
    with _exclusive(session):
        try:
            previous = session.model_key
            _ensure_model(session, source, bridge)
            _ensure_samples(session, calib, calib_file, n_samples, seq_len, seed, bridge)
        except (ModelLoadError, DataError, UnsupportedModelError, ValueError) as err:
            gr.Warning(_message(err), title="Cannot load")
            return model_card(session, _message(err)), gr.update(), gr.update(), gr.update()
        changed = previous != session.model_key
    protected, kinds, slider = _control_updates(session)
    if not changed:  # same model: keep what the user chose
        protected, kinds = gr.update(), gr.update()
    return model_card(session), protected, kinds, slider


# ------------------------------------------------------------------------------------------- analysis


def plan_summary(session: Session, plan: WhatIf | None, stale: list[str] | None = None, auto: bool = False) -> str:
    """Markdown: the parameter count of the plan now shown, and what the analysis does not cover."""
    if session.analysis is None or plan is None:
        if session.loaded is None:
            return "<span class='cx-muted'>Click <b>Analyse</b> to compute layer importances and the plan.</span>"
        params = count_parameters(session.loaded.model)
        return (f"<span class='cx-muted'>{params / 1e6:.1f} M parameters. Click <b>Analyse</b> to see what COMP "
                "would remove.</span>")
    total = plan.params_total
    lines = []
    if plan.message:
        lines.append(f"<div class='cx-error'>⚠ {plan.message}</div>")
    removed = (f"layer {plan.removed[0]} removed" if len(plan.removed) == 1 else
               f"layers {', '.join(map(str, plan.removed))} removed" if plan.removed else "no layer removed")
    rows = [("original", total, None)]
    if not plan.message:
        rows += [(removed, plan.params_removed_layers, plan.params_removed_layers / total),
                 (f"neurons in {len(plan.layer_ratios)} layers", plan.params_removed_neurons,
                  plan.params_removed_neurons / total),
                 ("after pruning", plan.params_after, -plan.planned_ratio)]
    def cell(name, share):
        if share is None:
            return ""
        return f"{share:+.1%}" if name == "after pruning" else f"{share:.1%}"

    table = "<table class='cx-plan'>" + "".join(
        f"<tr><td>{name}</td><td>{value / 1e6:,.2f} M</td><td>{cell(name, share)}</td></tr>"
        for name, value, share in rows) + "</table>"
    lines.append(table)
    if plan.note:
        lines.append(f"<div class='cx-note'>{plan.note}</div>")
    if auto:
        lines.append("<div class='cx-note'>Auto: Prune tries 0…N removed layers (one full prune each) and keeps "
                     "the lowest calibration loss; the bars show the slider's value.</div>")
    if stale:
        lines.append(f"<div class='cx-note'>Changed since the analysis: {', '.join(stale)}. The neuron maps show "
                     "the analysed plan; Prune uses the new settings. Analyse again to refresh them.</div>")
    if session.analysis_calib_key and session.calib_key and session.analysis_calib_key != session.calib_key:
        lines.append("<div class='cx-note'>The calibration data changed since the analysis.</div>")
    return "\n".join(lines)


def layer_figures(session: Session, plan: WhatIf | None):
    """(redundancy curve, removal history, ratio bars) for the current what-if."""
    a: Analysis | None = session.analysis
    if a is None or plan is None:
        msg = "Click Analyse to compute layer importances."
        figs = (plots.empty_figure(msg, "Layer importance"), plots.empty_figure(msg, "Iterative removal"),
                plots.empty_figure(msg, "Allocated pruning ratio per layer"))
    else:
        removed = plan.removed
        after = plan.importances if removed and not plan.message else None
        curve = plots.redundancy_curve(a.plan.initial_importance, plan.protected, removed,
                                       a.removal.removal_order, after=after)
        history = plots.removal_history(a.removal.history, a.removal.removal_order, a.n_layers,
                                        highlight=plan.n_remove if plan.n_remove <= a.depth else None)
        bars = plots.ratio_bars(a.n_layers, plan.layer_ratios, plan.protected, removed, target=plan.ratio,
                                layer_params=a.plan.layer_params, message=plan.message,
                                title=f"Allocated pruning ratio per layer · target {plan.ratio:.0%}")
        figs = (curve, history, bars)
    session.figures.update(zip(("redundancy_curve", "removal_history", "ratio_bars"), figs))
    return figs


def _what_if(session: Session, ratio, n_remove, protected, cfg: CompConfig | None = None) -> WhatIf | None:
    """The what-if for the controls; ``cfg`` (the current settings) gives the caps of the ticked denses."""
    if session.analysis is None:
        return None
    caps = None
    if cfg is not None and session.loaded is not None and cfg.dense_kinds != session.analysis.cfg.dense_kinds:
        caps = layer_caps(session.loaded.model, cfg)
    return what_if(session.analysis, float(ratio), int(n_remove), _protected_value(session, protected), caps)


def _detail_layers(session: Session, kind: str) -> list[int]:
    a = session.analysis
    if a is None or kind not in a.heatmaps:
        return []
    scores, _ = a.heatmaps[kind]
    return [i for i in range(scores.shape[0]) if not bool(np.isnan(scores[i]).all())]


def heatmap_figure(session: Session, kind: str, sort: bool = False):
    a: Analysis | None = session.analysis
    if a is None or not kind or kind not in a.heatmaps:
        fig = plots.empty_figure("Analyse to see every neuron's importance.", "Neuron importance", height=360)
    else:
        scores, pruned = a.heatmaps[kind]
        notes = {i: "removed" for i in a.plan.removed_layers}
        notes.update({i: "protected" for i in a.plan.protected})
        name = next((d.name for d in a.plan.dense_reports if d.kind == kind), kind)
        title = (f"Neuron importance · {name} · {int(pruned.sum()):,} of {int((~np.isnan(scores)).sum()):,}"
                 f" pruned (red) · plan {a.plan_ratio:.0%}, {len(a.plan.removed_layers)} layers removed")
        fig = plots.neuron_heatmap(scores, pruned, kind, sort=bool(sort), row_notes=notes, title=title)
    session.figures["neuron_heatmap"] = fig
    return fig


def detail_figure(session: Session, kind: str, layer):
    a: Analysis | None = session.analysis
    layers = _detail_layers(session, kind)
    if a is None or layer is None or int(layer) not in layers:
        fig = plots.empty_figure("Choose a layer to see one dense in detail.", "One dense in detail", height=340)
    else:
        layer = int(layer)
        report = a.plan.dense(layer, kind)
        scores, pruned = a.heatmaps[kind]
        title = (f"Layer {layer} · {report.name} · {report.n_removed} of {report.d_in} inputs pruned · "
                 f"fit error {report.error_no_tuning:.3g} → {report.error_tuned:.3g} with {report.compensation}")
        fig = plots.dense_detail(scores[layer, :report.d_in], pruned[layer, :report.d_in], title)
    session.figures["dense_detail"] = fig
    return fig


def _default_detail_layer(session: Session, kind: str):
    layers = _detail_layers(session, kind)
    if not layers:
        return None
    a = session.analysis
    return max(layers, key=lambda i: (a.plan.layer_ratios.get(i, 0.0), -i))


def _default_kind(kinds: list[str]) -> str | None:
    """The MLP's down projection (OPT's fc2 has the same kind) is the widest, most telling heatmap."""
    if "down" in kinds:
        return "down"
    return kinds[0] if kinds else None


@user_errors
def analyse(session: Session, source, calib, calib_file, n_samples, seq_len, seed, ratio, n_remove, auto, protected,
            score, mask_tuning, inputs, dense_kinds, depth, progress=gr.Progress()):
    """Load if needed, analyse, and return every figure of the Analyse tab plus control updates."""
    bridge = Bridge(progress, session)
    started = time.perf_counter()
    with _exclusive(session):
        previous = session.model_key
        _ensure_model(session, source, bridge)
        fresh_model = previous != session.model_key
        if fresh_model:  # the dropdowns still hold the previous model's (or no) choices
            protected = default_protected(_n_layers(session))
            dense_kinds = None
        _ensure_samples(session, calib, calib_file, n_samples, seq_len, seed, bridge)
        cfg = _session_config(session, ratio, n_remove, False, protected, score, mask_tuning, inputs, dense_kinds,
                              depth)
        bridge.step("Copying the model (the original stays untouched) …", stage="copy")
        analysis = run_analysis(session.loaded.model, session.samples, cfg, int(depth), on_event=bridge)
        session.analysis, session.analysis_calib_key = analysis, session.calib_key
        stages = bridge.finish()
    seconds = time.perf_counter() - started
    plan = what_if(analysis, cfg.ratio, cfg.remove_layers, cfg.protected)
    curve, history, bars = layer_figures(session, plan)
    kinds = analysis.kinds
    kind = _default_kind(kinds)
    layer = _default_detail_layer(session, kind)
    heat = heatmap_figure(session, kind)
    detail = detail_figure(session, kind, layer)
    timing = " · ".join(f"{STAGE_LABELS.get(k, k).lower()} {v:.1f} s" for k, v in stages.items() if v >= 0.05)
    order = " → ".join(str(i) for i in analysis.removal.removal_order) or "—"
    status = (f"<b>Analysed in {seconds:.1f} s</b> <span class='cx-muted'>({timing})</span><br>"
              f"Removal order (least important first, measured to {analysis.depth}): {order}")
    if analysis.plan_ratio is not None and abs(analysis.plan_ratio - cfg.ratio) > 1e-9:
        status += (f"<div class='cx-note'>The target {cfg.ratio:.0%} cannot be reached with these settings; the "
                   f"neuron maps show the nearest reachable plan ({analysis.plan_ratio:.1%}).</div>")
    protected_u, kinds_u, slider_u = _control_updates(session)
    if not fresh_model:  # keep what the user chose
        protected_u, kinds_u = gr.update(), gr.update()
    return (curve, history, bars, heat, detail, plan_summary(session, plan, auto=bool(auto)), status,
            model_card(session), protected_u, kinds_u, slider_u,
            gr.update(choices=kinds, value=kind),
            gr.update(choices=[(f"layer {i}", i) for i in _detail_layers(session, kind)], value=layer))


@user_errors
def update_plan(session: Session, ratio, n_remove, auto, protected, score, mask_tuning, inputs, dense_kinds):
    """Instant what-if: (curve, history, bars, plan summary) for the current controls, no pruning."""
    cfg, stale = None, []
    if session.analysis is not None:
        cfg = _session_config(session, ratio, n_remove, False, protected, score, mask_tuning, inputs, dense_kinds)
        stale = stale_reasons(session.analysis, cfg)
    plan = _what_if(session, ratio, n_remove, protected, cfg)
    curve, history, bars = layer_figures(session, plan)
    return curve, history, bars, plan_summary(session, plan, stale, auto=bool(auto))


@user_errors
def update_heatmap(session: Session, kind, sort):
    """(layer × neuron map, detail layer choices) for another dense kind or ordering."""
    layer = _default_detail_layer(session, kind)
    return (heatmap_figure(session, kind, sort),
            gr.update(choices=[(f"layer {i}", i) for i in _detail_layers(session, kind)], value=layer),
            detail_figure(session, kind, layer))


@user_errors
def update_detail(session: Session, kind, layer):
    return detail_figure(session, kind, layer)


# ------------------------------------------------------------------------------------------ prune + eval


def _weights_mb(model) -> float:
    seen, total = set(), 0
    for p in model.parameters():
        key = (p.data_ptr(), tuple(p.shape))
        if key not in seen:
            seen.add(key)
            total += p.numel() * p.element_size()
    for b in model.buffers():
        if b.dtype in (torch.int64, torch.int32):  # kept-index buffers of compacted linears are saved too
            total += b.numel() * b.element_size()
    return total / 1e6


def _original_row(session: Session) -> dict:
    """The session's row for the loaded original (created on first use)."""
    name = _model_name(session)
    for row in session.runs:
        if row["run"] == "original" and row["key"] == session.model_key:
            return row
    model = session.loaded.model
    row = {"run": "original", "key": session.model_key, "model": name, "target": 0.0, "realised ratio": 0.0,
           "removed layers": "", "score": "", "mask tuning": "", "calibration": "",
           "params": count_parameters(model), "weights MB": _weights_mb(model), "disk MB": None,
           "eval": "", "tokens/s": None, "prune s": None}
    session.runs.insert(sum(1 for r in session.runs if r["run"] == "original"), row)
    return row


def results_table(session: Session) -> pd.DataFrame:
    """Every run of the session, formatted for reading (numbers stay numbers in ``session.runs``)."""
    def fmt(value, spec):
        if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
            return "—" if spec else ""
        return format(value, spec) if spec else str(value)

    specs = {"target": ".0%", "realised ratio": ".2%", "weights MB": ",.0f", "disk MB": ",.0f",
             "ppl wikitext2": ",.2f", "ppl ptb": ",.2f", "ppl c4": ",.2f", "tokens/s": ",.1f", "prune s": ",.1f"}
    columns = [c for c in RESULT_COLUMNS if c != "tokens/s" or speed_available()]
    rows = []
    for run in session.runs:
        row = {}
        for col in columns:
            value = run.get(col)
            if col == "params":
                row[col] = f"{value / 1e6:,.2f} M" if value else "—"
            elif col in ("target", "realised ratio") and run["run"] == "original":
                row[col] = "0%"
            else:
                row[col] = fmt(value, specs.get(col, ""))
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def results_plot(session: Session):
    fig = plots.ppl_vs_ratio(session.runs, EVAL_SETS)
    session.figures["ppl_vs_ratio"] = fig
    return fig


@user_errors
def run_prune(session: Session, source, calib, calib_file, n_samples, seq_len, seed, ratio, n_remove, auto,
              protected, score, mask_tuning, inputs, dense_kinds, depth, progress=gr.Progress()):
    """Prune a private copy of the original; returns (status, results table, ppl plot, model card)."""
    bridge = Bridge(progress, session)
    with _exclusive(session):
        _ensure_model(session, source, bridge)
        _ensure_samples(session, calib, calib_file, n_samples, seq_len, seed, bridge)
        cfg = _session_config(session, ratio, n_remove, auto, protected, score, mask_tuning, inputs, dense_kinds,
                              depth)
        session.drop_pruned()  # free the previous pruned copy before making a new one
        bridge.step("Copying the model (the original stays untouched) …", stage="copy")
        work = copy.deepcopy(session.loaded.model)
        started = time.perf_counter()
        pruned, result = prune(work, session.samples, cfg, on_event=bridge, inplace=True)
        seconds = time.perf_counter() - started
        del work
        stages = bridge.finish()
        _original_row(session)
        run_id = f"R{sum(1 for r in session.runs if r['run'] != 'original') + 1}"
        session.pruned, session.result, session.pruned_run = pruned, result, run_id
        removed = result.plan.removed_layers
        session.runs.append({
            "run": run_id, "key": session.model_key, "model": _model_name(session), "target": cfg.ratio,
            "realised ratio": result.realised_ratio,
            "removed layers": ",".join(str(i) for i in removed) or "none",
            "score": cfg.score, "mask tuning": "on" if cfg.mask_tuning else "off",
            "calibration": _calib_text(session.calib_key), "params": result.params_after,
            "weights MB": _weights_mb(pruned), "disk MB": None, "eval": "", "tokens/s": None, "prune s": seconds,
        })
    timing = " · ".join(f"{STAGE_LABELS.get(k, k).lower()} {v:.1f} s" for k, v in stages.items() if v >= 0.05)
    sweep = ""
    if result.plan.auto_sweep:
        tried = ", ".join(f"{s['remove_layers']}: {s['calibration_loss']:.3f}" if s.get("calibration_loss")
                          is not None else f"{s['remove_layers']}: impossible" for s in result.plan.auto_sweep)
        sweep = f"<br>Auto sweep (layers: calibration loss): {tried}"
    status = (f"<b>{run_id}: pruned {result.realised_ratio:.2%}</b> of the parameters "
              f"({result.params_before / 1e6:,.2f} M → {result.params_after / 1e6:,.2f} M) in {seconds:.1f} s; "
              f"removed layers: {', '.join(map(str, removed)) or 'none'}."
              f"<br><span class='cx-muted'>{timing}</span>{sweep}<br>Next: <b>Evaluate</b> to compare perplexity.")
    return status, results_table(session), results_plot(session), model_card(session)


def _eval_seq_len(model) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or EVAL_SEQ_LEN
    return int(min(EVAL_SEQ_LEN, limit))


def _perplexity(model, tokens, seq_len, windows, bridge: Bridge, label: str) -> float:
    def on_progress(done, total):
        bridge.check()
        with contextlib.suppress(Exception):
            bridge.progress((done, total), desc=f"Perplexity · {label}", unit="windows")
    return perplexity(model, tokens, seq_len, max_windows=windows, on_progress=on_progress).ppl


def _speed(model, tokenizer):
    from comp_core.speed import measure_speed

    accepted = inspect.signature(measure_speed).parameters
    settings = {k: v for k, v in SPEED_SETTINGS.items() if k in accepted}
    return _tokens_per_second(measure_speed(model, tokenizer, **settings))


@user_errors
def run_evaluate(session: Session, datasets, mode, with_speed, progress=gr.Progress()):
    """Perplexity (and speed) of the original and the latest pruned model; returns (status, table, plot)."""
    if session.loaded is None:
        raise gr.Error("Load a model first (Analyse or Prune loads it).", title="Nothing to evaluate",
                       print_exception=False)
    datasets = [d for d in (datasets or []) if d in EVAL_SETS]
    if not datasets:
        raise gr.Error("Tick at least one evaluation data set.", title="Nothing to evaluate", print_exception=False)
    bridge = Bridge(progress, session)
    quick = mode != "full"
    windows = QUICK_WINDOWS if quick else None
    started = time.perf_counter()
    with _exclusive(session):
        loaded = session.loaded
        seq_len = _eval_seq_len(loaded.model)
        original = _original_row(session)
        targets = [("original", loaded.model, original, True)]
        if session.pruned is not None:
            run_row = next(r for r in session.runs if r["run"] == session.pruned_run and r["key"] == session.model_key)
            targets.append((session.pruned_run, session.pruned, run_row, False))
        eval_text = f"{'quick' if quick else 'full'} {seq_len}"
        lines = []
        for ds in datasets:
            bridge.step(f"Tokenising {EVAL_LABELS[ds]} …", stage="evaluate")
            tokens = get_eval_tokens(ds, loaded.tokenizer)
            for name, model, row, shared in targets:
                key = (session.model_key, "ppl", ds, windows, seq_len)
                value = ORIGINAL_RESULTS.get(key) if shared else None
                if value is None:
                    value = _perplexity(model, tokens, seq_len, windows, bridge, f"{EVAL_LABELS[ds]} · {name}")
                    if shared:
                        ORIGINAL_RESULTS.put(key, value)
                row[f"ppl {ds}"] = value
                row["eval"] = eval_text
            if len(targets) == 2:
                lines.append(f"{EVAL_LABELS[ds]}: {original[f'ppl {ds}']:.2f} → {targets[1][2][f'ppl {ds}']:.2f}")
            else:
                lines.append(f"{EVAL_LABELS[ds]}: {original[f'ppl {ds}']:.2f}")
        if with_speed and speed_available():
            for name, model, row, shared in targets:
                bridge.step(f"Generation speed · {name} …", stage="speed")
                key = (session.model_key, "speed")
                value = ORIGINAL_RESULTS.get(key) if shared else None
                if value is None:
                    value = _speed(model, loaded.tokenizer)
                    if shared and value is not None:
                        ORIGINAL_RESULTS.put(key, value)
                row["tokens/s"] = value
    seconds = time.perf_counter() - started
    who = f"original → {session.pruned_run}" if len(targets) == 2 else "original only (prune to compare)"
    status = (f"<b>Evaluated in {seconds:.1f} s</b> ({who}; {'first ' + str(QUICK_WINDOWS) if quick else 'all'} "
              f"windows of {seq_len} tokens)<br>Perplexity " + " · ".join(lines))
    return status, results_table(session), results_plot(session)


# ---------------------------------------------------------------------------------------------- try it


def _encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt")
        ids = encoded["input_ids"] if not isinstance(encoded, torch.Tensor) else encoded
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, chat: bool = True) -> tuple[str, float]:
    """Greedy continuation of ``prompt`` and its speed (new tokens / s)."""
    ids = _encode_prompt(tokenizer, prompt, chat).to(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(max_new_tokens),
                             do_sample=False, repetition_penalty=1.1, pad_token_id=pad)
    seconds = time.perf_counter() - started
    new = out[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), new.numel() / max(seconds, 1e-9)


@user_errors
def run_generate(session: Session, prompt, max_new_tokens, chat):
    """Generator: (original text, pruned text), the original first."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise gr.Error("Type a prompt first.", title="Nothing to generate", print_exception=False)
    if session.loaded is None:
        raise gr.Error("Load a model first (Analyse or Prune loads it).", title="No model", print_exception=False)
    tokenizer = session.loaded.tokenizer
    pending = "<span class='cx-muted'>generating…</span>"
    none = "<span class='cx-muted'>Prune a model to compare.</span>"
    yield pending, pending if session.pruned is not None else none
    text, speed = generate_text(session.loaded.model, tokenizer, prompt, max_new_tokens, chat)
    left = _gen_card(text, speed)
    yield left, pending if session.pruned is not None else none
    if session.pruned is not None:
        text, speed = generate_text(session.pruned, tokenizer, prompt, max_new_tokens, chat)
        yield left, _gen_card(text, speed, session.pruned_run)


def _gen_card(text: str, speed: float, run: str | None = None) -> str:
    import html
    body = html.escape(text) or "<i>(empty)</i>"
    tag = f"{run} · " if run else ""
    return f"<div class='cx-gen'>{body}</div><div class='cx-muted'>{tag}{speed:.1f} tokens/s</div>"


# ---------------------------------------------------------------------------------------------- export


@user_errors
def save_model(session: Session, folder, overwrite):
    """Save the latest pruned model with the core's export; returns (status, results table)."""
    if session.pruned is None:
        raise gr.Error("Prune a model first.", title="Nothing to save", print_exception=False)
    if not export_available():
        raise gr.Error("Saving needs comp_core.export, which is not available in this install.",
                       title="Export unavailable", print_exception=False)
    from comp_core.export import folder_bytes, save_pruned

    folder = (folder or "").strip()
    if not folder:
        raise gr.Error("Type a folder to save into.", title="No folder", print_exception=False)
    with _exclusive(session):
        try:
            path = save_pruned(session.pruned, session.loaded.tokenizer, folder, session.result,
                               overwrite=bool(overwrite))
        except FileExistsError as err:
            hint = "" if overwrite else " Tick “Replace if it exists” or choose another folder."
            raise gr.Error(f"{_message(err).split(';')[0]}.{hint}", duration=None, title="Folder exists",
                           print_exception=False) from None
        size = folder_bytes(path) / 1e6
        for row in session.runs:
            if row["run"] == session.pruned_run and row["key"] == session.model_key:
                row["disk MB"] = size
    return (f"Saved <b>{session.pruned_run}</b> to <code>{path}</code> ({size:,.1f} MB). Load it with "
            f"<code>comp_core.export.load_pruned(path)</code>.", results_table(session))


def _png_available() -> bool:
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    return True


def _write_figures(session: Session, folder: Path, png: bool) -> tuple[list[Path], str]:
    files, note = [], ""
    figures = {k: v for k, v in session.figures.items() if v is not None}
    if not figures:
        return files, "no figures yet"
    html_path = folder / "figures.html"
    parts = []
    for i, (name, fig) in enumerate(figures.items()):
        parts.append(f"<h2 style='font-family:sans-serif'>{name.replace('_', ' ')}</h2>"
                     + fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    html_path.write_text("<!doctype html><meta charset='utf-8'><title>comp-explorer figures</title>"
                         + "\n".join(parts), encoding="utf-8")
    files.append(html_path)
    if png:
        if not _png_available():
            return files, "PNG needs the kaleido package; the figures are in figures.html"
        try:
            for name, fig in figures.items():
                path = folder / f"{name}.png"
                fig.write_image(str(path), format="png", width=1100, height=fig.layout.height or 400, scale=2)
                files.append(path)
        except Exception as err:  # noqa: BLE001 - kaleido needs a Chrome/Chromium; fall back to HTML
            log.warning("PNG export failed: %s", err)
            note = "PNG export needs Chrome/Chromium for kaleido; the figures are in figures.html"
    return files, note


@user_errors
def make_downloads(session: Session, what, with_scores, progress=gr.Progress()):
    """Files for the download box: plan/report JSON, results CSV, figures (HTML, PNG); returns (files, status)."""
    what = set(what or [])
    if not what:
        raise gr.Error("Tick what to download.", title="Nothing chosen", print_exception=False)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = session.workdir / stamp
    folder.mkdir(parents=True, exist_ok=True)
    files, notes = [], []
    plan = session.analysis.plan if session.analysis is not None else (
        session.result.plan if session.result is not None else None)
    if "plan" in what:
        if plan is None:
            notes.append("no plan yet (Analyse first)")
        else:
            path = folder / "comp_plan.json"
            path.write_text(json.dumps(plan.to_dict(with_scores=bool(with_scores)), indent=1))
            files.append(path)
    if "report" in what:
        if session.result is None:
            notes.append("no pruning report yet (Prune first)")
        else:
            report = session.result.to_dict(with_scores=bool(with_scores))
            row = next((r for r in session.runs if r["run"] == session.pruned_run), None)
            report["gui_run"] = {k: v for k, v in (row or {}).items() if k != "key"}
            path = folder / f"comp_report_{session.pruned_run}.json"
            path.write_text(json.dumps(report, indent=1, default=str))
            files.append(path)
    if "runs" in what:
        if not session.runs:
            notes.append("no runs yet")
        else:
            path = folder / "runs.csv"
            pd.DataFrame([{k: v for k, v in r.items() if k != "key"} for r in session.runs]).to_csv(path, index=False)
            files.append(path)
    if "figures" in what or "png" in what:
        progress(None, desc="Rendering figures …")
        written, note = _write_figures(session, folder, png="png" in what)
        files += written
        if note:
            notes.append(note)
    status = f"{len(files)} file(s) ready." + (f" <span class='cx-muted'>({'; '.join(notes)})</span>" if notes else "")
    return [str(f) for f in files] or None, status


def request_cancel(session: Session) -> str:
    """Ask the running task of this tab to stop at its next step."""
    session.cancel.set()
    return "<span class='cx-muted'>Stopping… the current step finishes first.</span>"
