"""Tab ②: the latest prune, evaluation of original vs pruned, and the session's table of runs.

Prune runs the method chosen in the sidebar through the registry (``prune_with``). When the method is COMP
and nothing changed since Analyse — same model, calibration and every COMP setting — the analysed plan is
applied as it is (``apply_plan``: seconds instead of a second full measurement); any change, including a
what-if move of the ratio, layers or protected set, prunes from scratch. The status says which path ran.
A run with searched layer shares (the sidebar's "Layer shares") always measures and searches; its figure
(``plots.search_figure``: the rule's shares beside the searched ones, and the search's fitness per generation)
shows under the status and goes into the report.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, is_dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from comp_core import CompPlan, count_parameters, get_eval_tokens
from comp_core.evaluate.report import SpeedSettings, evaluate_model
from comp_core.methods import get_method, prune_with
from comp_core.methods.comp import apply_plan
from comp_core.methods.comp.whatif import changed_settings

from .. import common, plots, report, reproduce, sidebar
from ..session import Session

# what a comparison needs first (ratio, perplexity, speed, size), then how each run was made
# (mask runs: the realised ratio says that nothing was removed; sparsity and zeros say what the masks did)
RESULT_COLUMNS = ["run", "model", "method", "layer shares", "realised ratio", "of blocks", "sparsity", "zeros of all params",
                  "ppl wikitext2", "ppl ptb", "ppl c4", "ppl sample", "tokens/s", "params", "weights MB", "disk MB",
                  "removed layers", "target", "score", "mask tuning", "calibration", "eval", "prune s", "peak MB",
                  "path"]
# the compact table a person reads at a glance (every column behind "all columns"); perplexity columns only
# where some run has a value
COMPACT_COLUMNS = ["run", "method", "realised ratio", "of blocks", "params", "weights MB", "tokens/s"]
NOTHING_REMOVED = "masks: nothing removed"
SEARCHED = "searched"  # the runs table's "layer shares" of a searched run ("rule" for the method's own)
NO_SEARCH = ("Prune with <b>Layer shares: searched</b> (left) to see how the search moved the pruning between "
             "layers.")
# a quick measurement for the GUI: batch 1, short prompt, two timed rounds (the bench uses more)
SPEED_SETTINGS = SpeedSettings(prefill_tokens=128, decode_tokens=32, batch_sizes=(1,), repeats=2,
                               measure_memory=False)


# the words of the table, one line each, where they appear
EXPLAIN = ("<b>target</b>: the share asked for · <b>realised ratio</b>: the share of all parameters (the model's learned numbers, the vocabulary table "
           "included) the pruned model no longer has · <b>of blocks</b>: the same count as a share of the "
           "transformer blocks alone · <b>ppl</b> (perplexity): how unsure the model is of the next word in real "
           "text — lower is better; the original's is the reference · <b>tokens/s</b>: words-pieces generated per "
           "second on this machine.")


def columns(rows: list[dict] | None = None, compact: bool = False) -> list[str]:
    """The table's columns; zero-shot accuracies follow the perplexities once a run has them. ``compact``: the
    few a comparison needs, with the perplexity and accuracy columns some run has measured."""
    cols = list(RESULT_COLUMNS)
    at = cols.index("ppl sample") + 1
    cols = cols[:at] + common.accuracy_columns(rows or []) + cols[at:]
    if not compact:
        return cols
    measured = [c for c in cols if (c.startswith("ppl ") or c.startswith("acc ") or c == "mean acc")
                and any(r.get(c) is not None for r in rows or [])]
    keep = COMPACT_COLUMNS[:4] + measured + COMPACT_COLUMNS[4:]
    if any(r.get("layer shares") == SEARCHED for r in rows or []):
        keep.insert(keep.index("method") + 1, "layer shares")
    if any(plots.is_mask_row(r) for r in rows or []):
        keep.insert(keep.index("realised ratio") + 1, "zeros of all params")
    return keep


# ---------------------------------------------------------------------------------------- prune


def plan_to_apply(session: Session, settings) -> tuple[CompPlan | None, str]:
    """The analysed plan when Prune's settings are exactly the analysed ones; otherwise None and why not."""
    a = session.analysis
    if getattr(settings, "searched", False):
        return None, "the layer shares are searched, which prunes every layer again at several shares"
    if a is None:
        return None, "no analysis to reuse"
    if type(settings) is not type(a.cfg):
        return None, "the analysis is COMP's; this method measures its own"
    if a.model_key != session.model_key or a.calib_key != session.calib_key:
        return None, "the model or the calibration data changed since Analyse"
    if abs(a.plan_ratio - a.cfg.ratio) > 1e-12:
        return None, "the analysed target was unreachable"
    changed = changed_settings(a.cfg, settings, a.n_layers)
    if changed:
        return None, f"changed since Analyse: {', '.join(changed)}"
    if not a.plan.fitted:
        return None, "Analyse decides the cuts; Prune measures again and fits the weights that stay"
    return a.plan, ""


def _setting(settings, name: str, labels: dict | None = None) -> str:
    """A setting for the runs table, or "" when the method has no such setting."""
    value = getattr(settings, name, None)
    if value is None:
        return ""
    return (labels or {}).get(value, str(value))


def original_row(session: Session) -> dict:
    """The session's row for the loaded original (created on first use)."""
    for row in session.runs:
        if row["run"] == "original" and row["key"] == session.model_key:
            return row
    model = session.loaded.model
    row = {"run": "original", "key": session.model_key, "model": common.model_name(session), "method": "",
           "kind": "", "target": 0.0, "realised ratio": 0.0, "sparsity": "", "zeros of all params": None,
           "zeros in linears": None, "removed layers": "", "score": "", "mask tuning": "",
           "calibration": "", "params": count_parameters(model), "weights MB": common.weights_mb(model),
           "disk MB": None, "eval": "", "tokens/s": None, "prune s": None, "peak MB": None, "path": ""}
    session.runs.insert(sum(1 for r in session.runs if r["run"] == "original"), row)
    return row


def results_table(session: Session) -> pd.DataFrame:
    """Every run of the session, formatted for reading (numbers stay numbers in ``session.runs``); the compact
    columns unless the person asked for all of them."""
    specs = {"target": ".0%", "realised ratio": ".2%", "of blocks": ".1%", "weights MB": ",.0f", "disk MB": ",.0f",
             "ppl wikitext2": ",.2f", "ppl ptb": ",.2f", "ppl c4": ",.2f", "ppl sample": ",.2f", "tokens/s": ",.1f", "prune s": ",.1f",
             "peak MB": ",.0f"}
    cols = columns(session.runs, compact=not session.all_columns)
    specs.update({c: ".3f" for c in cols if c.startswith("acc ") or c == "mean acc"})
    rows = []
    for run in session.runs:
        row = {}
        for col in cols:
            value = run.get(col)
            if col == "params":
                row[col] = f"{value / 1e6:,.2f} M" if value else "—"
            elif col in ("target", "realised ratio", "of blocks") and run["run"] == "original":
                row[col] = "0%"
            elif col in ("realised ratio", "of blocks") and plots.is_mask_row(run):
                row[col] = NOTHING_REMOVED if col == "realised ratio" else ""
            elif col == "zeros of all params":
                row[col] = common.fmt(value, ".2%", empty="")
            else:
                row[col] = common.fmt(value, specs.get(col, ""), empty="—" if col in specs else "")
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def results_plot(session: Session):
    fig = plots.ppl_vs_ratio(session.runs, common.EVAL_SETS)
    session.figures["ppl_vs_ratio"] = fig
    return fig


@common.user_errors
def run_prune(session: Session, source, calib, calib_file, n_samples, seq_len, seed, ratio, n_remove, auto,
              protected, score, mask_tuning, inputs, dense_kinds, depth, method=sidebar.DEFAULT_METHOD,
              sparsity=None, ratio_of="all", allocation=None, search_generations=None, progress=gr.Progress()):
    """Prune a private copy of the original; returns (status, results table, ppl plot, model card, summary card,
    search figure).

    ``sparsity``: the pattern of mask and composed methods (None: the method's default); ``allocation`` and
    ``search_generations``: the sidebar's "Layer shares" (``sidebar.search_values``)."""
    method = method or sidebar.DEFAULT_METHOD
    entry = get_method(method)
    if sidebar.uses(method, "ratio") and not sidebar.uses(method, "sparsity") and float(ratio or 0) <= 0:
        raise common.fail("A target ratio of 0 removes nothing, so there is nothing to prune: set the share of "
                          "parameters to remove above 0. The previous run stays as it was.", "Nothing to prune")
    bridge = common.Bridge(progress, session)
    with common.exclusive(session):
        memory = common.RunMemory()
        common.ensure_model(session, source, bridge)
        common.ensure_samples(session, calib, calib_file, n_samples, seq_len, seed, bridge)
        protected, dense_kinds = sidebar.unfilled_defaults(session, protected, dense_kinds)
        settings = sidebar.method_settings(session, method, ratio, n_remove, auto, protected, score, mask_tuning,
                                           inputs, dense_kinds, depth, sparsity, ratio_of, allocation,
                                           search_generations)
        plan, why_not = plan_to_apply(session, settings)
        # the previous pruned copy stays until this run succeeds: a cancelled or failed run changes nothing
        bridge.step("Copying the model (the original stays untouched) …", stage="copy")
        work = copy.deepcopy(session.loaded.model)
        started = time.perf_counter()
        if plan is not None:
            bridge.step("Applying the analysed plan …", stage="apply")
            pruned, result = apply_plan(work, plan, inplace=True)
            result.method, result.kind = method, entry.kind
            path = "applied the analysed plan (nothing measured again)"
        else:
            pruned, result = prune_with(method, work, session.samples, settings, on_event=bridge, inplace=True)
            path = f"measured and pruned ({why_not})"
        seconds = time.perf_counter() - started
        del work
        stages = bridge.finish()
        original_row(session)
        run_id = f"R{sum(1 for r in session.runs if r['run'] != 'original') + 1}"
        session.pruned, session.result, session.pruned_run = pruned, result, run_id
        session.run_settings[run_id] = settings
        removed = result.plan.removed_layers
        extra = result.extra or {}
        session.runs.append({
            "run": run_id, "key": session.model_key, "model": common.model_name(session), "method": method,
            "kind": entry.kind, "target": getattr(settings, "ratio", None), "realised ratio": result.realised_ratio,
            "layer shares": (SEARCHED if result.plan.search is not None
                             else "rule" if get_method(method).method.searchable else ""),
            "of blocks": result.realised_block_ratio, "pruned at": datetime.now(),
            "sparsity": extra.get("sparsity") or "", "zeros of all params": extra.get("zero_share"),
            "zeros in linears": extra.get("linear_sparsity"),
            "removed layers": ",".join(str(i) for i in removed) or "none",
            "score": _setting(settings, "score"),
            "mask tuning": _setting(settings, "mask_tuning", {True: "on", False: "off"}),
            "calibration": common.calib_text(session.calib_key), "params": result.params_after,
            "weights MB": common.weights_mb(pruned), "disk MB": None, "eval": "", "tokens/s": None,
            "prune s": seconds, "peak MB": memory.peak_mb,
            "path": "plan applied" if plan is not None else "measured",
        })
    sweep = ""
    if result.plan.auto_sweep:
        tried = ", ".join(f"{s['remove_layers']}: {s['calibration_loss']:.3f}" if s.get("calibration_loss")
                          is not None else f"{s['remove_layers']}: impossible" for s in result.plan.auto_sweep)
        sweep = f"Auto sweep (layers: calibration loss): {tried}"
    masks = mask_text(extra)
    blocks = (f" ({result.realised_block_ratio:.1%} of the transformer blocks)"
              if result.realised_block_ratio is not None else "")
    if entry.kind == "unstructured":
        what = (f"<b>{run_id}: {method}</b> set weights to zero in {seconds:.0f} s — {masks}. Nothing was removed, "
                "so the model has as many parameters as before.")
    else:
        layers = f"whole layers removed: {', '.join(map(str, removed))}" if removed else "no whole layer removed"
        then = f"; then {masks}" if masks else ""
        what = (f"<b>{run_id}: {result.realised_ratio:.1%} fewer parameters</b>{blocks} with <b>{method}</b> "
                f"({result.params_before / 1e6:,.1f} M → {result.params_after / 1e6:,.1f} M) in {seconds:.0f} s; "
                f"{layers}{then}.")
    details = [f"Path: {path}", f"{memory.text()}{common.placement_note(session)}", common.stage_text(stages), sweep,
               *result.plan.notes]
    searched = search_text(result.plan.search, method)
    status = (f"{what}{searched} Next: <b>Evaluate</b> below to measure the quality."
              + common.details_html(details))
    return (status, results_table(session), results_plot(session), common.model_card(session),
            summary_card(session), search_plot(session))


def search_text(record, method: str) -> str:
    """One plain sentence on a searched run (KL start → final, time, the database's memory), or ""."""
    if record is None:
        return ""
    took = common.duration_text(record.database_seconds + record.search_seconds)
    memory = f"{record.database_mb:,.0f}" if record.database_mb >= 10 else f"{record.database_mb:.1f}"
    held = f"{record.holdout} held-out calibration text{'s' if record.holdout != 1 else ''}"
    if record.improved:
        closer = 1 - record.final_kl / record.start_kl if record.start_kl > 0 else 0.0
        return (f" The layer shares were searched: on {held}, the pruned model's next-word predictions are "
                f"{closer:.0%} closer to the original's than with {method}'s own rule (KL divergence "
                f"{record.start_kl:.4g} → "
                f"{record.final_kl:.4g}; {record.generations} generations in {took}, "
                f"{memory} MB of pruned layer copies held meanwhile).")
    return (f" The search found no layer shares closer to the original than {method}'s own rule on {held} "
            f"(KL divergence {record.start_kl:.4g}; {record.generations} generations in {took}, "
            f"{memory} MB of pruned layer copies held meanwhile), so the rule's shares were kept.")


def search_plot(session: Session):
    """The Prune tab's search figure: the latest run's searched shares, or hidden (with a figure saying how to
    get one) when that run was not searched."""
    plan = session.result.plan if session.result is not None else None
    if plan is None or plan.search is None:
        session.figures.pop("search", None)
        return gr.update(value=plots.empty_figure(NO_SEARCH, "Searched layer shares"), visible=False)
    fig = plots.search_figure(plan.search, plan.n_layers, plan.protected, plan.removed_layers)
    session.figures["search"] = fig
    return gr.update(value=fig, visible=True)



# ---------------------------------------------------------------------------------------- summary and report


def latest_summary(session: Session) -> report.RunSummary | None:
    """The card's figures for the latest pruned run against the original (None before any run)."""
    if session.pruned_run is None:
        return None
    run = next((r for r in session.runs if r["run"] == session.pruned_run and r["key"] == session.model_key), None)
    if run is None:
        return None
    settings = session.run_settings.get(session.pruned_run)
    chosen = asdict(settings) if is_dataclass(settings) else {}
    method_summary = get_method(run["method"]).summary
    if run.get("layer shares") == SEARCHED:
        method_summary += "; layer shares searched so the pruned model answers most like the original"
    return report.summary_from_rows(
        original_row(session), run, method_summary=method_summary,
        block_removed_share=run.get("of blocks"), n_layers=common.n_layers(session), settings=chosen,
        answers=session.answers.get(session.pruned_run), eval_labels=common.EVAL_LABELS,
        pruned_at=run.get("pruned at"), evaluated_at=run.get("evaluated at"))


def summary_card(session: Session) -> str:
    """The card at the top of the tab: the latest run in words a non-expert reads, or how to get one."""
    summary = latest_summary(session)
    if summary is None:
        return ("<div class='cx-muted'>Press <b>Prune</b> (left): a summary of what was removed and what it costs "
                "in quality appears here.</div>")
    return report.summary_card_html(summary)


def reproduce_commands(session: Session, out: str) -> list[str]:
    """The CLI commands that prune and evaluate the latest run again."""
    run = next(r for r in session.runs if r["run"] == session.pruned_run and r["key"] == session.model_key)
    sets = [ds for ds in common.EVAL_SETS if run.get(f"ppl {ds}") is not None] or ["wikitext2"]
    settings = session.run_settings[session.pruned_run]
    return [reproduce.prune_command(run["method"], settings, source=session.model_key or reproduce.BUNDLED,
                                    calibration=session.calib_key, out=out, eval_sets=sets),
            reproduce.eval_command(out, sets)]


@common.user_errors
def export_report(session: Session, folder):
    """Write the one-page report of the latest run (card, plots, plan, settings, versions, commands) into
    ``folder``; returns (note, download file)."""
    summary = latest_summary(session)
    if summary is None:
        raise common.fail("Prune a model first: the report describes the latest pruned run.", "Nothing to report")
    where = Path(common.export_path(folder or str(common.default_export_folder())))
    name = f"comp-explorer-report-{session.pruned_run}.html"
    figures = report_figures(session)
    page = report.report_html(summary, figures, plan_rows=report.plan_table_rows(session.result.plan),
                              versions=report.software_versions(),
                              commands=reproduce_commands(session, f"pruned-{session.pruned_run}"))
    try:
        written = report.write_report(where / name, page)
    except report.ReportError as err:
        raise common.fail(str(err), "Cannot write the report") from None
    download = report.write_report(session.workdir / name, page)  # a copy the browser may fetch
    note = (f"Report written to <code>{written}</code> — one page that opens in any browser without this app "
            "or the internet; send it as it is, or print it to PDF from the browser.")
    return note, gr.update(value=str(download), visible=True)


def report_figures(session: Session) -> dict:
    """caption (plain words) -> figure for the report: quality against size, where the latest run cut, and
    the analysis's views of the model when there is one."""
    plan = session.result.plan
    figures = {}
    if "ppl_vs_ratio" in session.figures:
        figures["Quality against how much was removed"] = session.figures["ppl_vs_ratio"]
    if session.result.kind == "unstructured":
        figures["Where the weights were set to zero"] = plots.sparsity_bars(
            plan.n_layers, plan.layer_ratios, plan.protected, layer_params=plan.layer_params,
            title="Zeroed share of each layer's parameters")
    else:
        figures["Where the parameters were removed"] = plots.removed_share_bars(
            plan.n_layers, plan.removed_per_layer, plan.layer_params, plan.removed_layers, plan.protected)
    if plan.search is not None and "search" in session.figures:
        figures["How the search moved the pruning between layers"] = session.figures["search"]
    if session.analysis is not None and session.analysis.model_key == session.model_key:
        for key, caption in (("redundancy_curve", "How much each layer changes what passes through it"),
                             ("layer_similarity", "How similar the hidden state stays across layers")):
            if key in session.figures:
                figures[caption] = session.figures[key]
    return figures


def mask_text(extra: dict) -> str:
    """"2:4 masks: 49.9% of the masked linears' weights are zero (38.5% of all parameters)", or "" without."""
    if not extra or not extra.get("sparsity"):
        return ""
    linear, zeros = extra.get("linear_sparsity"), extra.get("zero_share")
    share = f"{linear:.1%} of the masked linears' weights are zero" if linear is not None else "weights zeroed"
    of_all = f" ({zeros:.1%} of all parameters)" if zeros is not None else ""
    return f"{extra['sparsity']} masks: {share}{of_all}"


# ---------------------------------------------------------------------------------------- evaluate


def _measure(session: Session, targets, datasets, tasks, with_speed, quick, windows, limit, seq_len, bridge,
             lines: list[str], accuracy_lines: list[str]) -> None:
    """Evaluate's measurements (``comp_core.evaluate.report.evaluate_model``) into the ``targets``' rows (copies);
    the shared original's figures are measured once per model and reused. Fills ``lines`` / ``accuracy_lines``."""
    loaded = session.loaded
    eval_text = f"{'quick' if quick else 'full'} {seq_len}"
    tokens = {}
    for ds in datasets:
        bridge.step(f"Tokenising {common.EVAL_LABELS[ds]} …", stage="evaluate")
        tokens[ds] = get_eval_tokens(ds, loaded.tokenizer)
    keys = {**{("ppl", ds): (session.model_key, "ppl", ds, windows, seq_len) for ds in datasets},
            **{("acc", t): (session.model_key, "zeroshot", t, limit) for t in tasks},
            ("speed",): (session.model_key, "speed")}
    for name, model, row, shared in targets:
        cached = {what: common.ORIGINAL_RESULTS.get(key) if shared else None for what, key in keys.items()}
        measured = evaluate_model(
            model, loaded.tokenizer, sets=[ds for ds in datasets if cached[("ppl", ds)] is None], seq_len=seq_len,
            max_windows=windows, tokens=tokens, tasks=[t for t in tasks if cached[("acc", t)] is None],
            task_limit=limit, speed=SPEED_SETTINGS if with_speed and cached[("speed",)] is None else None,
            label=name, on_event=bridge)
        found = {**{("ppl", ds): v for ds, v in measured.ppl.items()},
                 **{("acc", t): v for t, v in measured.accuracy.items()}}
        if measured.speed is not None:
            found[("speed",)] = measured.decode_tokens_per_s
        if shared:
            for what, value in found.items():
                if value is not None:
                    common.ORIGINAL_RESULTS.put(keys[what], value)
        values = {**{k: v for k, v in cached.items() if v is not None}, **found}
        for ds in datasets:
            row[f"ppl {ds}"] = values[("ppl", ds)]
        if datasets or tasks:
            row["eval"] = eval_text
            row["evaluated at"] = datetime.now()
        common.set_accuracy(row, {t: values[("acc", t)] for t in tasks if values.get(("acc", t)) is not None})
        if with_speed:
            row["tokens/s"] = values.get(("speed",))
    original = targets[0][2]
    for ds in datasets:
        label = common.EVAL_LABELS[ds]
        if len(targets) == 2:
            lines.append(f"{label}: {original[f'ppl {ds}']:.2f} → {targets[1][2][f'ppl {ds}']:.2f}")
        else:
            lines.append(f"{label}: {original[f'ppl {ds}']:.2f}")
    for t in tasks:
        values = [row.get(f"acc {t}") for _, _, row, _ in targets]
        accuracy_lines.append(f"{t}: " + " → ".join(common.fmt(v, ".3f") for v in values))


@common.user_errors
def run_evaluate(session: Session, datasets, mode, with_speed, tasks=None, progress=gr.Progress(track_tqdm=True)):
    """Perplexity, zero-shot accuracy (lm-eval) and speed of the original and the latest pruned model;
    returns (status, table, plot). The original's figures are measured once per model and reused."""
    if session.loaded is None:
        raise common.fail("Load a model first (Analyse or Prune loads it).", "Nothing to evaluate")
    datasets = [d for d in (datasets or []) if d in common.EVAL_SETS]
    tasks = list(tasks or [])
    if not datasets and not tasks:
        raise common.fail("Tick at least one evaluation data set or zero-shot task.", "Nothing to evaluate")
    bridge = common.Bridge(progress, session)
    quick = mode != "full"
    windows = common.QUICK_WINDOWS if quick else None
    limit = common.ZEROSHOT_QUICK_LIMIT if quick else None
    started = time.perf_counter()
    with common.exclusive(session):
        memory = common.RunMemory()
        loaded = session.loaded
        seq_len = common.eval_seq_len(loaded.model)
        had_original = any(r["run"] == "original" and r["key"] == session.model_key for r in session.runs)
        original_live = original_row(session)
        # figures go into copies, written to the session's rows only once everything is measured: a cancelled or
        # failed evaluation leaves the table as it was
        original = dict(original_live)
        live = [original_live]
        targets = [("original", loaded.model, original, True)]
        if session.pruned is not None:
            run_row = next(r for r in session.runs if r["run"] == session.pruned_run and r["key"] == session.model_key)
            live.append(run_row)
            targets.append((session.pruned_run, session.pruned, dict(run_row), False))
        lines: list[str] = []
        accuracy_lines: list[str] = []
        try:
            _measure(session, targets, datasets, tasks, with_speed, quick, windows, limit, seq_len, bridge, lines,
                     accuracy_lines)
        except BaseException:
            if not had_original:
                session.runs.remove(original_live)
            raise
        for row, (_, _, staged, _) in zip(live, targets):
            row.update(staged)
    seconds = time.perf_counter() - started
    who = f"original → {session.pruned_run}" if len(targets) == 2 else "original only (prune to compare)"
    parts = []
    if lines:
        parts.append(f"Perplexity ({'first ' + str(common.QUICK_WINDOWS) if quick else 'all'} windows of "
                     f"{seq_len} tokens) " + " · ".join(lines))
    if accuracy_lines:
        parts.append(f"Zero-shot accuracy ({'first ' + str(limit) + ' items' if quick else 'all items'} per task; "
                     "acc_norm where the task has it, else acc) " + " · ".join(accuracy_lines))
    status = (f"<b>Evaluated in {seconds:.1f} s</b> ({who}; {memory.text()}{common.placement_note(session)})<br>"
              + "<br>".join(parts))
    return status, results_table(session), results_plot(session), summary_card(session)


# --------------------------------------------------------------------------------------------- layout


@common.user_errors
def show_columns(session: Session, all_columns):
    session.all_columns = bool(all_columns)
    return results_table(session)


def build(export_folder: str | None = None) -> SimpleNamespace:
    t = SimpleNamespace()
    t.card = gr.HTML(summary_card(Session()), elem_id="summary-card")
    with gr.Row(equal_height=True):
        folder = Path(export_folder).parent if export_folder else common.default_export_folder()
        t.report_folder = gr.Textbox(value=str(folder),
                                     label="Report folder", scale=4, elem_id="report-folder",
                                     info="the one-page report (HTML) of the latest run is written here")
        t.report = gr.Button("Export report", scale=1, elem_id="btn-report")
        t.report_file = gr.File(label="Download", visible=False, scale=2, elem_id="report-file")
    t.report_note = gr.HTML("", elem_id="report-note")
    t.prune_status = gr.HTML("<span class='cx-muted'>Press <b>Prune</b> (left) to prune a copy of the model with "
                             "the chosen method. The original stays loaded and untouched, so every run starts "
                             "from it.</span>", elem_id="prune-status", elem_classes=["cx-status"])
    t.search_plot = gr.Plot(plots.empty_figure(NO_SEARCH, "Searched layer shares"), show_label=False,
                            visible=False, elem_id="plot-search")
    with gr.Row(equal_height=True):
        t.datasets = gr.CheckboxGroup([(common.EVAL_LABELS[d], d) for d in common.EVAL_SETS],
                                      value=common.default_eval_sets(), label="Perplexity on", scale=2,
                                      elem_id="eval-sets")
        t.mode = gr.Radio([(f"Quick ({common.QUICK_WINDOWS} windows)", "quick"), ("Full test set", "full")],
                          value="quick", label="Evaluation", scale=2,
                          info=f"quick = first {common.QUICK_WINDOWS} windows of 512 tokens; full is slow on a CPU")
        t.speed = gr.Checkbox(label="Generation speed", value=True, scale=1)
    offered = common.zeroshot_tasks()
    with gr.Row(equal_height=True):
        t.tasks = gr.CheckboxGroup(offered, value=[], label="Zero-shot accuracy (lm-evaluation-harness)",
                                   elem_id="eval-tasks", visible=bool(offered), scale=5,
                                   info=f"quick = first {common.ZEROSHOT_QUICK_LIMIT} items of each task; about a "
                                        "minute per task and model on a CPU")
        if not offered:
            gr.HTML(f"<span class='cx-muted'>{common.zeroshot_note()}</span>", elem_id="eval-tasks-missing")
        t.evaluate = gr.Button("Evaluate", variant="primary", scale=1, elem_id="btn-evaluate")
    if common.data_note():
        gr.HTML(f"<div class='cx-note'>{common.data_note()}</div>", elem_id="data-note")
    t.eval_status = gr.HTML("", elem_id="eval-status")
    t.table = gr.Dataframe(headers=columns(compact=True), value=None, interactive=False, wrap=False,
                           label="Runs of this session", elem_id="results-table", max_height=260)
    t.all_columns = gr.Checkbox(label="all columns", value=False, elem_id="all-columns",
                                info="how each run was made: settings, calibration, timings, memory, where it was saved")
    gr.HTML(f"<div class='cx-explain'>{EXPLAIN}</div>", elem_id="runs-explain")
    t.plot = gr.Plot(plots.empty_figure("Evaluate a run to see perplexity against the realised ratio.",
                                        "Perplexity vs realised ratio"), show_label=False, elem_id="plot-ppl")
    return t


def wire(t: SimpleNamespace, session: gr.State, tabs, c: SimpleNamespace, start, heavy: dict) -> list:
    """Prune (from the sidebar) and Evaluate; returns the events Cancel stops."""
    pruned = c.prune.click(start("runs"), None, [tabs, c.cancel_note], queue=False).then(
        run_prune, [session, *c.data, *c.settings, c.method, c.sparsity, c.ratio_of, c.allocation, c.generations],
        [t.prune_status, t.table, t.plot, c.card, t.card, t.search_plot],
        show_progress_on=[t.prune_status], **heavy)
    evaluated = t.evaluate.click(start(), None, c.cancel_note, queue=False).then(
        run_evaluate, [session, t.datasets, t.mode, t.speed, t.tasks], [t.eval_status, t.table, t.plot, t.card],
        show_progress_on=[t.eval_status], **heavy)
    t.all_columns.input(show_columns, [session, t.all_columns], t.table, queue=False)
    t.report.click(export_report, [session, t.report_folder], [t.report_note, t.report_file])
    return [pruned, evaluated]
