"""Tab ④: save the pruned model (core export, or a GGUF for llama.cpp) and download the plan, report, runs,
comparison and figures."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from .. import common
from ..session import Session
from .runs import results_table
from comp_core.export.folder import folder_bytes, save_pruned
from comp_core.export.gguf import export_gguf, resolve_source_gguf

log = logging.getLogger(__name__)


@common.user_errors
def save_model(session: Session, folder, overwrite):
    """Save the latest pruned model with the core's export; returns (status, results table)."""
    if session.pruned is None:
        raise common.fail("Prune a model first.", "Nothing to save")
    if not (folder or "").strip():
        raise common.fail("Type a folder to save into.", "No folder")
    folder = common.export_path(folder)
    with common.exclusive(session):
        try:
            path = save_pruned(session.pruned, session.loaded.tokenizer, folder, session.result,
                               overwrite=bool(overwrite), source=session.loaded.source)
        except FileExistsError as err:
            hint = "" if overwrite else " Tick “Replace if it exists” or choose another folder."
            raise gr.Error(f"{common.message(err).split(';')[0]}.{hint}", duration=None, title="Folder exists",
                           print_exception=False) from None
        size = folder_bytes(path) / 1e6
        for row in session.runs:
            if row["run"] == session.pruned_run and row["key"] == session.model_key:
                row["disk MB"] = size
    return (f"Saved <b>{session.pruned_run}</b> to <code>{path}</code> ({size:,.1f} MB). Load it with "
            f"<code>comp_core.load_pruned(path)</code>.", results_table(session))


@common.user_errors
def export_gguf_file(session: Session, path, file_type, ff_multiple32, overwrite):
    """Write the latest pruned model as a GGUF for llama.cpp (core ``gguf_export``); returns the status."""
    if session.pruned is None:
        raise common.fail("Prune a model first.", "Nothing to export")
    if not (path or "").strip():
        raise common.fail("Type a .gguf file name to write.", "No file")
    path = common.export_path(path)
    with common.exclusive(session):
        try:
            report = export_gguf(session.pruned, path, tokenizer=session.loaded.tokenizer,
                                 file_type=file_type or "f16", source_gguf=resolve_source_gguf(session.loaded.source),
                                 params_original=session.result.params_before if session.result else None,
                                 ff_multiple=32 if ff_multiple32 else 1, overwrite=bool(overwrite))
        except FileExistsError as err:
            hint = "" if overwrite else " Tick “Replace if it exists” or choose another file."
            raise gr.Error(f"{common.message(err).split(';')[0]}.{hint}", duration=None, title="File exists",
                           print_exception=False) from None
    share = f", {report.share_of_original:.1%} of the original's weights" if report.share_of_original else ""
    notes = "".join(f"<br><span class='cx-muted'>{note}</span>" for note in report.notes)
    return (f"Wrote <code>{report.path}</code>: llama.cpp architecture <b>{report.arch}</b>, {report.file_type}, "
            f"{report.file_bytes / 1e6:,.1f} MB, {report.params_file:,} weights in the file{share}; tokenizer "
            f"{report.tokenizer}.{notes}")


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


@common.user_errors
def make_downloads(session: Session, what, with_scores, progress=gr.Progress()):
    """Files for the download box: plan/report JSON, runs and comparison CSV, figures (HTML, PNG);
    returns (files, status)."""
    what = set(what or [])
    if not what:
        raise common.fail("Tick what to download.", "Nothing chosen")
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
    for name, rows, empty in (("runs", session.runs, "no runs yet"),
                              ("compare", session.compare_rows, "no comparison yet")):
        if name not in what:
            continue
        if not rows:
            notes.append(empty)
            continue
        path = folder / f"{name}.csv"
        pd.DataFrame([{k: v for k, v in r.items() if k not in ("key", "plan")} for r in rows]).to_csv(path, index=False)
        files.append(path)
    if "figures" in what or "png" in what:
        progress(None, desc="Rendering figures …")
        written, note = _write_figures(session, folder, png="png" in what)
        files += written
        if note:
            notes.append(note)
    status = f"{len(files)} file(s) ready." + (f" <span class='cx-muted'>({'; '.join(notes)})</span>" if notes else "")
    return [str(f) for f in files] or None, status


def build(default_folder: str | None = None) -> SimpleNamespace:
    """``default_folder``: the pruned model's folder (absolute; ``~/comp-explorer/pruned`` when None); the GGUF
    file defaults to the same name with ``.gguf``."""
    folder = Path(common.export_path(default_folder or "pruned"))
    t = SimpleNamespace()
    gr.HTML(f"<div class='cx-help'>Files are written to <code>{folder.parent}</code> unless you type another "
            "path; a relative path goes under that folder.</div>", elem_id="export-where")
    with gr.Group():
        gr.HTML("<div class='cx-h3'>Save the pruned model</div><div class='cx-help'>A physically smaller "
                "safetensors folder with its tokenizer and <code>comp_report.json</code>; reload it with "
                "<code>comp_core.load_pruned(folder)</code>.</div>")
        with gr.Row(equal_height=True):
            t.folder = gr.Textbox(label="Folder", value=str(folder), scale=4, elem_id="export-folder")
            t.overwrite = gr.Checkbox(label="Replace if it exists", value=False, scale=1)
            t.save = gr.Button("Save model", variant="primary", scale=1, elem_id="btn-save")
        t.save_status = gr.HTML("")
    with gr.Group():
        gr.HTML("<div class='cx-h3'>Export GGUF for llama.cpp</div><div class='cx-help'>One file that llama.cpp "
                "(and Ollama, LM Studio…) runs: per-layer widths as llama.cpp's <code>deci</code> architecture, "
                "pruned o_proj columns restored as zeros (the file reports the share of weights it really "
                "holds), tokenizer copied from the source GGUF when there is one.</div>")
        with gr.Row(equal_height=True):
            t.gguf_path = gr.Textbox(label="GGUF file", value=f"{folder}.gguf", scale=4, elem_id="export-gguf-path")
            t.gguf_type = gr.Radio(["f16", "q8_0"], value="f16", label="Weights", scale=1)
            t.gguf_pad = gr.Checkbox(label="FFN widths ×32", value=False, scale=1,
                                     info="zero channels so q8_0 quantises every down_proj")
            t.gguf_overwrite = gr.Checkbox(label="Replace if it exists", value=False, scale=1)
            t.gguf_save = gr.Button("Export GGUF", variant="primary", scale=1, elem_id="btn-export-gguf")
        t.gguf_status = gr.HTML("")
    gr.HTML("<div class='cx-h3'>Downloads</div>")
    with gr.Row(equal_height=True):
        t.what = gr.CheckboxGroup([("Plan (JSON)", "plan"), ("Pruning report (JSON)", "report"),
                                   ("Runs table (CSV)", "runs"), ("Comparison (CSV)", "compare"),
                                   ("Figures (interactive HTML)", "figures"), ("Figures (PNG)", "png")],
                                  value=["plan", "report", "runs", "compare", "figures"], label="Include", scale=4)
        t.scores = gr.Checkbox(label="Neuron scores in JSON", value=False, scale=1,
                               info="every dense's per-neuron scores (a few MB)")
        t.prepare = gr.Button("Prepare files", scale=1, elem_id="btn-prepare")
    t.download_status = gr.HTML("")
    t.files = gr.File(label="Files", file_count="multiple", interactive=False, elem_id="download-files")
    return t


def wire(t: SimpleNamespace, session: gr.State, results_table: gr.Dataframe, heavy: dict) -> list:
    """Save and Prepare files; ``results_table`` is the runs tab's table (its disk MB column)."""
    t.save.click(save_model, [session, t.folder, t.overwrite], [t.save_status, results_table], **heavy)
    t.gguf_save.click(export_gguf_file, [session, t.gguf_path, t.gguf_type, t.gguf_pad, t.gguf_overwrite],
                      [t.gguf_status], **heavy)
    t.prepare.click(make_downloads, [session, t.what, t.scores], [t.files, t.download_status],
                    show_progress_on=[t.download_status])
    return []
