"""Tab ⑤: several methods, the same calibration and evaluation windows, one table and one figure.

Run calls ``comp_core.evaluate.compare.compare_methods`` in a worker thread and streams its rows (``on_row``) into
the table as they finish; progress and Cancel go through the session's ``Bridge`` as everywhere else.
Rows stay in the session across runs. For every row with a per-layer plan, the same layer and neuron views
as the Analyse tab show where that method cut; mask rows (weights zeroed, none removed) show their zeros per
layer and per dense instead, and composed rows both.

Structured methods run at every target ratio, mask methods at every sparsity, composed methods at every
(ratio, sparsity) pair, as ``compare_methods`` schedules them. "Also searched" adds, for every ticked method
with layer shares to search (``sidebar.search_refusal``), the row label "NAME@search" (``compare.SEARCHED``):
the same method with searched layer shares, written "NAME · searched" and drawn in a colour of its own next to
its method's. A searched mask method runs at the unstructured sparsities only (an N:M pattern has no share to
search).
"""
from __future__ import annotations

import contextvars
import dataclasses
import queue
import threading
import time
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pandas as pd

from comp_core import Cancelled, CompPlan, settings
from comp_core.evaluate.compare import SEARCHED, compare_methods
from comp_core.methods import get_method, method_names, setting_names
from comp_core.settings import COMPARE_METHODS
from comp_core.math.sparsity import SparsityPattern
from comp_core.methods.comp.whatif import neuron_maps

from .. import common, plots, sidebar
from ..session import Session

DEFAULT_RATIOS = "0.2, 0.3"
DEFAULT_SPARSITIES = "0.5, 2:4"
POLL_S = 0.5  # how often the streaming handler looks for rows and progress
STATUS_EVERY_S = 1.0  # at most one progress-only update a second
COLUMNS_HEAD = ["#", "method", "kind", "target", "realised ratio", "of blocks"]
COLUMNS_MASKS = ["sparsity", "zeros in linears", "zeros of all params"]  # shown once a row has masks
COLUMNS_TAIL = ["prune s", "peak RSS MB", "saved MB", "eval", "calibration", "note"]
NOTHING_REMOVED = "masks: nothing removed"
MASK_VIEW = "zeros"  # the dense dropdown's entry for a composed row's sparsity map


def base_method(label: str) -> str:
    """The registered method of a row label: "comp@search" → "comp"."""
    return label[: -len(SEARCHED)] if label.endswith(SEARCHED) else label


def method_label(label: str) -> str:
    """A row label as a person reads it: "comp@search" → "comp · searched"; other labels unchanged."""
    return f"{base_method(label)} · searched" if label.endswith(SEARCHED) else label


def searched_labels(methods: list[str], sparsities: list[str]) -> list[str]:
    """"NAME@search" for every method of ``methods`` with layer shares to search at some of ``sparsities``
    (mask methods need an unstructured one: N:M fixes the zeros of every group)."""
    out = []
    for method in methods:
        if sidebar.search_refusal(method):
            continue
        if sidebar.uses(method, "sparsity") and not any(not _is_nm(p) for p in sparsities):
            continue
        out.append(f"{method}{SEARCHED}")
    return out


def _is_nm(pattern: str | None) -> bool:
    return bool(pattern) and SparsityPattern.parse(pattern).is_nm


def _skipped(row) -> bool:
    """A searched mask method's row at an N:M pattern: refused by the core, and said once in the status."""
    return row.method.endswith(SEARCHED) and _is_nm(getattr(row, "sparsity", None)) and bool(row.error)


def default_methods() -> list[str]:
    names = method_names()
    return [m for m in COMPARE_METHODS if m in names]


def method_summaries() -> str:
    """HTML: every registered method with its kind and one-line summary."""
    rows = "".join(f"<tr><td><b>{n}</b></td><td>{get_method(n).kind}</td><td>{get_method(n).summary}</td></tr>"
                   for n in method_names())
    return f"<table class='cx-plan cx-methods'>{rows}</table>"


def _light(plan: CompPlan | None, masks: bool = False) -> CompPlan | None:
    """The plan without refit weights, masks and the removal measurement: what the views need, kept small.
    A mask plan's per-column scores go too (its views read ``sparsity`` and ``layer_ratios``)."""
    if plan is None:
        return None
    drop = {"scores": plan.dense_reports[0].scores[:0]} if masks and plan.dense_reports else {}
    dense = [dataclasses.replace(d, mask=None, new_weight=None, **drop) for d in plan.dense_reports]
    return dataclasses.replace(plan, dense_reports=dense, removal=None,
                               sparse_plan=_light(plan.sparse_plan, masks=True))


def _has_plan(method: str) -> bool:
    """Whether ``method`` (a row label; "original" is none) reports a per-layer plan worth showing."""
    method = base_method(method)
    return method in method_names() and get_method(method).method.has_plan


def target_label(record: dict) -> str:
    """"30%", "2:4" (masks) or "20% + 2:4" (composed): what a row asked for."""
    of = " of blocks" if record.get("ratio of") == "blocks" else ""
    ratio = f"{record['target']:.0%}{of}" if record.get("target") or not record.get("sparsity") else ""
    return " + ".join(t for t in (ratio, record.get("sparsity") or "") if t)


def row_record(row, number: int, *, model_key: str | None, eval_tag: str, calibration: str) -> dict:
    """A ``CompareRow`` as the session keeps it: the table's numbers plus the (light) plan for the views."""
    record = {"#": f"C{number}", "key": model_key, "method": row.method, "kind": row.kind,
              "target": row.target_ratio, "realised ratio": row.realised_ratio,
              "of blocks": getattr(row, "realised_block_ratio", None), "ratio of": getattr(row, "ratio_of", "all"),
              "sparsity": getattr(row, "sparsity", None), "zeros in linears": getattr(row, "linear_sparsity", None),
              "zeros of all params": getattr(row, "zero_share", None),
              "prune s": row.prune_seconds, "peak RSS MB": row.peak_rss_mb,
              "saved MB": row.saved_bytes / 2**20 if row.saved_bytes is not None else None,
              "eval": eval_tag, "calibration": calibration if row.method != "original" else "",
              "note": row.error or "; ".join(getattr(row, "notes", None) or []), "error": row.error,
              "plan": (_light(row.plan, masks=row.kind == "unstructured")
                       if getattr(row, "plan", None) is not None and _has_plan(row.method) else None)}
    record.update({f"ppl {name}": value for name, value in (row.ppl or {}).items()})
    if getattr(row, "accuracy", None):
        common.set_accuracy(record, row.accuracy)
    return record


def _sets_in(rows: list[dict]) -> list[str]:
    return [ds for ds in common.EVAL_SETS if any(f"ppl {ds}" in r for r in rows)]


def compare_table(session: Session) -> pd.DataFrame:
    """Every comparison row of the session, formatted for reading."""
    rows = session.compare_rows
    masks = COLUMNS_MASKS if any(r.get("sparsity") for r in rows) else []
    cols = (COLUMNS_HEAD + masks + [f"ppl {ds}" for ds in _sets_in(rows)] + common.accuracy_columns(rows)
            + COLUMNS_TAIL)
    specs = {"realised ratio": ".2%", "of blocks": ".1%", "prune s": ",.1f", "peak RSS MB": ",.0f",
             "saved MB": ",.1f", **{c: ",.2f" for c in cols if c.startswith("ppl ")},
             **{c: ".3f" for c in cols if c.startswith("acc ") or c == "mean acc"}}
    out = []
    for r in rows:
        cells = {c: common.fmt(r.get(c), specs.get(c, ""), empty="—" if c in specs else "") for c in cols}
        cells["target"] = target_label(r)
        cells["method"] = method_label(r["method"])
        if r.get("sparsity"):
            cells.update({c: common.fmt(r.get(c), ".1%") for c in COLUMNS_MASKS[1:]})
            if plots.is_mask_row(r) and r.get("realised ratio") is not None:
                cells["realised ratio"], cells["of blocks"] = NOTHING_REMOVED, ""
        out.append(cells)
    return pd.DataFrame(out, columns=cols)


def methods_in(session: Session) -> list[str]:
    """The row labels of this session's comparison in registry order, each searched label right after its
    method's: their colours, the same in every figure of the tab, are distinct for up to
    ``len(theme.METHOD_COLORS)`` labels (a searched row has a colour of its own)."""
    present = {r["method"] for r in session.compare_rows}
    ordered = [label for m in method_names() for label in (m, f"{m}{SEARCHED}") if label in present]
    return ordered + sorted(present - set(ordered))


def compare_figure(session: Session):
    """Perplexity vs realised ratio for the rows comparable with the latest run (same model and windows)."""
    rows = session.compare_rows
    if rows:
        last = rows[-1]
        rows = [r for r in rows if r["key"] == last["key"] and r["eval"] == last["eval"]]
    what = "Perplexity per method" if any(plots.is_mask_row(r) for r in rows) else (
        "Perplexity vs realised ratio, per method")
    title = f"{what} · {rows[-1]['eval']}" if rows else None
    order = methods_in(session)
    fig = plots.compare_ppl(rows, _sets_in(rows), order=order, names={m: method_label(m) for m in order},
                            **({"title": title} if title else {}))
    session.figures["compare_ppl"] = fig
    return fig


def plan_choices(session: Session) -> list[tuple[str, str]]:
    return [(f"{r['#']} · {method_label(r['method'])} @ {target_label(r)}", r["#"]) for r in session.compare_rows
            if r.get("plan") is not None]


def _record(session: Session, row_id) -> dict | None:
    return next((r for r in session.compare_rows if r["#"] == row_id and r.get("plan") is not None), None)


def _kinds(plan: CompPlan) -> list[str]:
    return list(dict.fromkeys(d.kind for d in plan.dense_reports if d.n_removed > 0)) or list(
        dict.fromkeys(d.kind for d in plan.dense_reports))


def _default_kind(kinds: list[str]) -> str | None:
    return "down" if "down" in kinds else (kinds[0] if kinds else None)


def sparsity_grid(plan: CompPlan, layers: list[int] | None = None, n_layers: int | None = None
                  ) -> tuple[np.ndarray, list[str]]:
    """(zero share [n_layers, n_kinds] float32, NaN where a layer has no masked dense of that kind; the kinds)
    from a mask plan's ``dense_reports[*].sparsity``. ``layers`` maps the plan's layer indices to the rows
    (a composed method masks the smaller model: its layer j is original layer ``layers[j]``)."""
    kinds = list(dict.fromkeys(d.kind for d in plan.dense_reports))
    rows = n_layers if n_layers is not None else plan.n_layers
    grid = np.full((rows, len(kinds)), np.nan, dtype=np.float32)
    for d in plan.dense_reports:
        layer = layers[d.layer] if layers is not None else d.layer
        if d.sparsity is not None and 0 <= layer < rows:
            grid[layer, kinds.index(d.kind)] = d.sparsity
    return grid, kinds


def _kept_layers(plan: CompPlan) -> list[int] | None:
    """Original indices of the layers a structured plan kept (the composed mask stage's layer order)."""
    kept = [i for i in range(plan.n_layers) if i not in set(plan.removed_layers)]
    sparse = plan.sparse_plan
    return kept if sparse is not None and sparse.n_layers == len(kept) else None


def _pattern_share(label) -> float | None:
    try:
        return SparsityPattern.parse(label).fraction
    except (ValueError, TypeError):
        return None


def _mask_summary(record: dict) -> str:
    linear, zeros = record.get("zeros in linears"), record.get("zeros of all params")
    parts = [f"{record['sparsity']} masks"]
    if linear is not None:
        parts.append(f"{linear:.1%} of the masked linears' weights zero")
    if zeros is not None:
        parts.append(f"{zeros:.1%} of all parameters")
    return " · ".join(parts)


def _sparsity_map(plan: CompPlan, label: str, layers: list[int] | None = None, n_layers: int | None = None,
                  notes: dict[int, str] | None = None):
    grid, kinds = sparsity_grid(plan, layers, n_layers)
    dense = {i: "dense" for i in range(grid.shape[0]) if np.isnan(grid[i]).all()}
    return plots.sparsity_heatmap(grid, kinds, row_notes={**dense, **(notes or {})},
                                  title=f"Share of zero weights per dense · {label}")


def plan_views(session: Session, row_id, kind=None):
    """(summary HTML, kind dropdown update, per-layer bars, per-dense map) of one row's plan.

    Structured rows: removed share per layer and the neuron map of one dense kind. Mask rows: the zeroed
    share of every layer and the layers × dense kinds sparsity map (no dense to choose). Composed rows:
    the structural bars, and either the sparsity map (default) or one kind's neuron map."""
    record = _record(session, row_id)
    if record is None:
        empty = "Run a comparison, then choose a row to see where its method cut."
        return ("<span class='cx-muted'>No plan chosen.</span>", gr.update(choices=[], value=None, visible=True),
                plots.empty_figure(empty, "Removed parameters per layer"),
                plots.empty_figure(empty, "Neuron importance", height=360))
    plan: CompPlan = record["plan"]
    label = f"{method_label(record['method'])} @ {target_label(record)}"
    notes = "".join(f"<div class='cx-note'>{n}</div>" for n in plan.notes)
    if plots.is_mask_row(record):
        summary = (f"<b>{record['#']} · {label}</b>: {_mask_summary(record)} · nothing removed, so the "
                   f"parameter count stays{notes}")
        bars = plots.sparsity_bars(plan.n_layers, plan.layer_ratios, plan.protected,
                                   pattern_share=_pattern_share(record["sparsity"]), layer_params=plan.layer_params,
                                   title=f"Zeroed share of each layer's parameters · {label}")
        heat = _sparsity_map(plan, label)
        session.figures["compare_bars"], session.figures["compare_heatmap"] = bars, heat
        return summary, gr.update(choices=[], value=None, visible=False), bars, heat
    kinds = _kinds(plan)
    choices = list(kinds)
    composed = plan.sparse_plan is not None
    if composed:
        choices = [(f"{MASK_VIEW} (masks)", MASK_VIEW)] + [(k, k) for k in kinds]
    values = [c[1] if isinstance(c, tuple) else c for c in choices]
    kind = kind if kind in values else (MASK_VIEW if composed else _default_kind(kinds))
    removed = ", ".join(map(str, plan.removed_layers)) or "none"
    pruned_layers = sum(1 for i, n in plan.removed_per_layer.items() if n and i not in plan.removed_layers)
    realised = record["realised ratio"]
    masks = f" · then {_mask_summary(record)}" if composed and record.get("sparsity") else ""
    summary = (f"<b>{record['#']} · {label}</b>: realised {realised:.2%} · removed layers: {removed} · "
               f"neurons pruned in {pruned_layers} layers{masks}{notes}" if realised is not None else label)
    bars = plots.removed_share_bars(plan.n_layers, plan.removed_per_layer, plan.layer_params, plan.removed_layers,
                                    plan.protected, title=f"Removed parameters per layer · {label}",
                                    color=plots.method_color(record["method"], methods_in(session)))
    maps = neuron_maps(plan)
    if kind == MASK_VIEW:
        heat = _sparsity_map(plan.sparse_plan, label, _kept_layers(plan), plan.n_layers,
                             {i: "removed" for i in plan.removed_layers})
    elif kind in maps:
        scores, pruned = maps[kind]
        name = next((d.name for d in plan.dense_reports if d.kind == kind), kind)
        heat = plots.neuron_heatmap(scores, pruned, kind, sort=True, row_notes=plots.row_notes(plan.removed_layers,
                                                                                    plan.protected),
                                    title=f"Neuron importance · {name} · {int(pruned.sum()):,} pruned (red) · {label}")
    else:
        heat = plots.empty_figure(f"{method_label(record['method'])} removes whole layers only: no neuron map.",
                                  "Neuron importance", height=360)
    session.figures["compare_bars"], session.figures["compare_heatmap"] = bars, heat
    return summary, gr.update(choices=choices, value=kind, visible=True), bars, heat


def _outputs(session: Session, status: str, select=None):
    """(status, table, figure, plan selector) after a change of the rows."""
    choices = plan_choices(session)
    value = select if select in [c[1] for c in choices] else (choices[-1][1] if choices else None)
    return status, compare_table(session), compare_figure(session), gr.update(choices=choices, value=value)


def _grid_text(ratios: list[float], sparsities: list[str]) -> str:
    """"ratios 20%, 30% · sparsities 0.5, 2:4" (the targets the methods ran at)."""
    parts = ([f"ratios {', '.join(f'{r:.0%}' for r in ratios)}"] if ratios else []) + (
        [f"sparsities {', '.join(sparsities)}"] if sparsities else [])
    return " · ".join(parts)


def _wants_original(session: Session, eval_tag: str, eval_sets: list[str], tasks: list[str] = ()) -> bool:
    """Whether the session still lacks the original's perplexity (and accuracy) on these windows, sets and
    tasks."""
    return not any(r["method"] == "original" and r["key"] == session.model_key and r["eval"] == eval_tag
                   and all(f"ppl {ds}" in r for ds in eval_sets) and all(f"acc {t}" in r for t in tasks)
                   for r in session.compare_rows)


@common.user_errors
def run_compare(session: Session, source, calib, calib_file, n_samples, seq_len, seed, methods, ratios, eval_sets,
                windows, sparsities=DEFAULT_SPARSITIES, tasks=None, task_items=common.ZEROSHOT_QUICK_LIMIT,
                ratio_of="all", searched=False, search_generations=sidebar.DEFAULT_GENERATIONS,
                progress=gr.Progress()):
    """Generator: (status, table, figure, plan selector, 4 plan views, model card) after every finished row.

    ``ratios`` are read only when a ticked method has a ratio, ``sparsities`` only when one has a sparsity.
    ``searched``: also each method that has layer shares to search, searched (``search_generations``)."""
    known = method_names()
    methods = [m for m in (methods or []) if m in known]
    if not methods:
        raise common.fail("Tick at least one method to compare.", "Nothing to compare")
    wants = {m: set(setting_names(m)) & {"ratio", "sparsity"} for m in methods}  # the targets each one takes
    ratio_list = (list(settings.parse_ratios(ratios, allow_zero=False)) if any("ratio" in w for w in wants.values())
                  else [])
    sparsity_list = list(settings.parse_sparsities(sparsities)) if any("sparsity" in w for w in wants.values()) else []
    eval_sets = [d for d in (eval_sets or []) if d in common.EVAL_SETS]
    if not eval_sets:
        raise common.fail("Tick at least one evaluation data set.", "Nothing to compare")
    extra = searched_labels(methods, sparsity_list) if searched else []
    if searched and not extra:
        raise common.fail("None of the ticked methods has layer shares to search (at these sparsities): untick "
                          "'also searched', or tick a method such as comp.", "Nothing to search")
    search = {label: sidebar.search_values(base_method(label), "search", search_generations) for label in extra}
    labels = [label for m in methods for label in (m, f"{m}{SEARCHED}") if label in set(methods) | set(extra)]
    n_windows = settings.parse_count(windows, "Windows")
    tasks = list(tasks or [])
    task_limit = settings.parse_count(task_items, "Items per task")
    bridge = common.Bridge(progress, session)
    no_views = (gr.update(),) * 5  # the plan views and the model card
    started = time.perf_counter()
    with common.exclusive(session):
        common.ensure_model(session, source, bridge)
        common.ensure_samples(session, calib, calib_file, n_samples, seq_len, seed, bridge)
        loaded = session.loaded
        eval_len = common.eval_seq_len(loaded.model)
        eval_tag = f"{n_windows or 'all'}×{eval_len}" + (f", {task_limit or 'all'} items/task" if tasks else "")
        calibration = common.calib_text(session.calib_key)
        unstructured = [p for p in sparsity_list if not _is_nm(p)]
        jobs = sum((len(ratio_list) if "ratio" in wants[base_method(label)] else 1)
                   * (len(unstructured if label in search else sparsity_list)
                      if "sparsity" in wants[base_method(label)] else 1) for label in labels)
        slower = "; searched rows take a few minutes more each" if extra else ""
        yield *_outputs(session, f"<b>Comparing {len(labels)} methods</b> ({_grid_text(ratio_list, sparsity_list)}"
                                 f"; {jobs} prunes{slower}) …"), *no_views[1:], common.model_card(session)
        with_original = _wants_original(session, eval_tag, eval_sets, tasks)
        results: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                compare_methods(loaded.model, loaded.tokenizer, session.samples, labels, ratio_list, eval_sets,
                                sparsities=sparsity_list or None, max_windows=n_windows, eval_seq_len=eval_len,
                                measure_bytes=True, ratio_of=ratio_of or "all", settings=search,
                                include_original=with_original, tasks=tasks, task_limit=task_limit,
                                on_event=bridge,
                                on_row=lambda row: None if _skipped(row) else results.put(("row", row)))
                results.put(("done", None))
            except BaseException as err:  # noqa: BLE001 - handed to the generator, which reports it
                results.put(("error", err))

        worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True,
                                  name="compare")
        worker.start()
        new_rows, shown, last_yield = 0, "", 0.0
        stopped = None
        try:
            while True:
                try:
                    kind, item = results.get(timeout=POLL_S)
                except queue.Empty:
                    if bridge.last != shown and time.perf_counter() - last_yield >= STATUS_EVERY_S:
                        shown, last_yield = bridge.last, time.perf_counter()
                        yield (f"<b>Comparing…</b> {new_rows} rows done · {shown}",) + (gr.update(),) * 3 + no_views
                    continue
                if kind == "row":
                    new_rows += 1
                    session.compare_rows.append(row_record(item, len(session.compare_rows) + 1,
                                                           model_key=session.model_key, eval_tag=eval_tag,
                                                           calibration=calibration))
                    last_yield = time.perf_counter()
                    yield *_outputs(session, f"<b>Comparing…</b> {new_rows} rows done · {bridge.last}"), *no_views
                elif kind == "error":
                    if not isinstance(item, Cancelled):
                        raise item
                    stopped = item
                    break
                else:
                    break
        finally:
            if worker.is_alive():  # the generator was closed early: stop the worker before freeing the tab
                session.cancel.set()
                worker.join()
    seconds = time.perf_counter() - started
    failed = sum(1 for r in session.compare_rows[len(session.compare_rows) - new_rows:] if r["error"])
    failures = (f"<div class='cx-note'>{failed} of them could not be pruned at their ratio; the note column "
                "says why.</div>" if failed else "")
    if stopped is not None:
        status = f"<b>Stopped</b> after {new_rows} new rows ({seconds:.1f} s); the finished rows are kept."
    else:
        status = (f"<b>Compared in {seconds:.1f} s</b>: {new_rows} new rows ({len(labels)} methods; "
                  f"{_grid_text(ratio_list, sparsity_list)}; {eval_tag} tokens of {', '.join(eval_sets)}). Each "
                  "method runs with its registered defaults at each of its targets.")
        if extra:
            generations = next(iter(search.values()))["search_generations"]
            masks = [label for label in extra if sidebar.uses(base_method(label), "sparsity")]
            status += (f" Rows marked <b>· searched</b> searched their layer shares ({generations} generations)"
                       + (f"; a searched mask method runs at shares only ({', '.join(unstructured)}): an N:M "
                          "pattern has no per-layer share to search" if masks and len(unstructured) < len(sparsity_list)
                          else "") + ".")
    status_, table, figure, select = _outputs(session, status + failures)
    chosen = select["value"]
    yield (status_, table, figure, select, *plan_views(session, chosen), common.model_card(session))


def clear_rows(session: Session):
    """Forget the session's comparison rows."""
    session.compare_rows.clear()
    return (*_outputs(session, "<span class='cx-muted'>Rows cleared.</span>"), *plan_views(session, None))


@common.user_errors
def show_plan(session: Session, row_id, kind):
    return plan_views(session, row_id, kind)


def cancel(session: Session) -> str:
    common.request_cancel(session)
    return "<b>Stopping…</b> the current step finishes first; the finished rows are kept."


# --------------------------------------------------------------------------------------------- layout


def build() -> SimpleNamespace:
    t = SimpleNamespace()
    t.status = gr.HTML("<span class='cx-muted'>Choose methods, ratios and evaluation windows, then press "
                       "<b>Run comparison</b>. It uses the model and calibration data chosen on the left; every "
                       "method prunes its own copy.</span>", elem_id="compare-status", elem_classes=["cx-status"])
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            t.methods = gr.CheckboxGroup([(n, n) for n in method_names()], value=default_methods(),
                                         label="Methods", elem_id="compare-methods",
                                         info="structured ones run at every target ratio; mask ones (magnitude, "
                                              "wanda, sparsegpt, …) at every sparsity; comp+nm at every pair")
            with gr.Row(equal_height=True):
                t.searched = gr.Checkbox(label="also run each method with searched layer shares", value=False,
                                         elem_id="compare-searched", scale=3,
                                         info="adds a row '… · searched' for every ticked method that has layer "
                                              "shares to search; a few minutes more per row on a CPU")
                t.search_generations = gr.Number(value=sidebar.DEFAULT_GENERATIONS, precision=0, minimum=1,
                                                 maximum=sidebar.MAX_GENERATIONS, label="search generations",
                                                 visible=False, elem_id="compare-search-generations", scale=1,
                                                 min_width=110)
            with gr.Accordion("What each method does", open=False):
                gr.HTML(method_summaries())
        with gr.Column(scale=2, min_width=260):
            with gr.Row():
                t.ratios = gr.Textbox(value=DEFAULT_RATIOS, label="Target ratios", elem_id="compare-ratios",
                                      info="shares of the parameters to remove, e.g. 0.2, 0.3", min_width=120)
                t.ratio_of = gr.Radio([("of all parameters", "all"), ("of the transformer blocks", "blocks")],
                                      value="all", label="Ratios are shares", elem_id="compare-ratio-of",
                                      min_width=120)
                t.sparsities = gr.Textbox(value=DEFAULT_SPARSITIES, label="Sparsities (masks)",
                                          elem_id="compare-sparsities", min_width=120,
                                          info="0.5 = half of each linear; N:M = N zeros in every M (2:4, 4:8)")
            with gr.Row():
                t.sets = gr.CheckboxGroup([(common.EVAL_LABELS[d], d) for d in common.EVAL_SETS],
                                          value=common.default_eval_sets(), label="Perplexity on",
                                          elem_id="compare-sets",
                                          scale=2)
                t.windows = gr.Number(value=common.QUICK_WINDOWS, precision=0, minimum=0, label="Windows",
                                      info="of 512 tokens; 0 = all", elem_id="compare-windows", scale=1,
                                      min_width=90)
            offered = common.zeroshot_tasks()
            with gr.Row(visible=bool(offered)):
                t.tasks = gr.CheckboxGroup(offered, value=[], label="Zero-shot accuracy (lm-eval)",
                                           elem_id="compare-tasks", scale=2)
                t.task_items = gr.Number(value=common.ZEROSHOT_QUICK_LIMIT, precision=0, minimum=0,
                                         label="Items per task", info="the harness's first N; 0 = all",
                                         elem_id="compare-task-items", scale=1, min_width=90)
    with gr.Row():
        t.run = gr.Button("Run comparison", variant="primary", elem_id="btn-compare")
        t.cancel = gr.Button("Cancel", variant="stop", elem_id="btn-compare-cancel")
        t.clear = gr.Button("Clear rows", elem_id="btn-compare-clear")
    t.table = gr.Dataframe(headers=COLUMNS_HEAD + ["ppl wikitext2"] + COLUMNS_TAIL, value=None, interactive=False,
                           wrap=False, label="Comparison rows of this session", elem_id="compare-table",
                           max_height=300)
    t.plot = gr.Plot(plots.empty_figure("Run a comparison to see perplexity against the realised ratio.",
                                        "Perplexity vs realised ratio, per method"), show_label=False,
                     elem_id="plot-compare")
    gr.HTML("<div class='cx-h3'>Where each method cut</div>")
    with gr.Row():
        t.plan = gr.Dropdown(choices=[], value=None, label="Row", scale=2, elem_id="compare-plan")
        t.kind = gr.Dropdown(choices=[], value=None, label="Dense", scale=1, elem_id="compare-kind")
    t.plan_note = gr.HTML("<span class='cx-muted'>No plan chosen.</span>", elem_id="compare-plan-note")
    t.bars = gr.Plot(plots.empty_figure("Run a comparison, then choose a row.", "Removed parameters per layer"),
                     show_label=False, elem_id="plot-compare-bars")
    t.heatmap = gr.Plot(plots.empty_figure("Run a comparison, then choose a row.", "Neuron importance", height=360),
                        show_label=False, elem_id="plot-compare-heatmap")
    return t


def wire(t: SimpleNamespace, session: gr.State, c: SimpleNamespace, heavy: dict) -> list:
    """Run (streaming), Cancel, Clear and the plan views; returns the events the sidebar's Cancel stops."""
    views = [t.plan_note, t.kind, t.bars, t.heatmap]
    t.searched.change(lambda on: gr.update(visible=bool(on)), t.searched, t.search_generations, queue=False,
                      show_progress="hidden")
    t.run.click(run_compare, [session, *c.data, t.methods, t.ratios, t.sets, t.windows, t.sparsities, t.tasks,
                              t.task_items, t.ratio_of, t.searched, t.search_generations],
                [t.status, t.table, t.plot, t.plan, *views, c.card], show_progress_on=[t.status], **heavy)
    # cooperative: the worker stops at its next step and the handler reports the rows it kept
    t.cancel.click(cancel, session, t.status, queue=False)
    t.clear.click(clear_rows, session, [t.status, t.table, t.plot, t.plan, *views], queue=False)
    t.plan.input(show_plan, [session, t.plan, t.kind], views, show_progress="minimal")
    t.kind.input(show_plan, [session, t.plan, t.kind], views, show_progress="minimal")
    return []
