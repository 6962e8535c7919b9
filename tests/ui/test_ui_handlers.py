"""The GUI's event functions (ui.sidebar, ui.tabs.*) called directly (no server, no browser) on a tiny Llama folder."""
from __future__ import annotations

import json
import re
import os
from pathlib import Path

import pytest
import torch

gr = pytest.importorskip("gradio")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from comp_core import count_parameters, settings  # noqa: E402
from ui import common, sidebar  # noqa: E402
from ui.tabs import analyse as analyse_tab  # noqa: E402
from ui.tabs import export as export_tab  # noqa: E402
from ui.tabs import runs  # noqa: E402
from ui.tabs import try_it  # noqa: E402
from ui.session import Session  # noqa: E402

from tests.helpers import make_tiny_tokenizer, save_tiny_llama  # noqa: F401  (save_tiny_llama: the other GUI tests import it from here)

from tests.helpers import DATA  # noqa: E402
HAVE_DATA = (DATA / "wikitext2" / "wiki.test.raw").is_file()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="no local data sets (COMP_DATA_DIR)")


def no_progress(*_args, **_kwargs):
    return None


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    if HAVE_DATA:
        os.environ.setdefault("COMP_DATA_DIR", str(DATA))
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


CALIB = "wikitext2" if HAVE_DATA else "data-free"


def data_args(folder, calib=CALIB):
    return [folder, calib, "", 8, 32, 0]


def plan_args(ratio=0.3, n_remove=1, auto=False, protected=None, score="diag", mask=True, kinds=None, depth=3):
    return [ratio, n_remove, auto, protected, score, mask, "identical", kinds, depth]


@pytest.fixture(scope="module")
def analysed(folder):
    session = Session()
    out = analyse_tab.analyse(session, *data_args(folder), *plan_args(), progress=no_progress)
    return session, out


@pytest.mark.filterwarnings("ignore:No such file or folder")
def test_load_reports_a_bad_source_in_the_page(tmp_path):
    session = Session()
    card, *_ = sidebar.load(session, str(tmp_path / "missing"), "c4", "", 8, 32, 0, progress=no_progress)
    assert "cx-error" in card and "no such file or folder" in card.lower()
    assert session.loaded is None


def test_load_fills_the_controls(folder):
    session = Session()
    card, protected, kinds, slider = sidebar.load(session, *data_args(folder), progress=no_progress)
    assert "6 layers" in card and session.samples.shape == (8, 32)
    assert protected["value"] == [0, 1, 5]
    assert kinds["choices"] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert kinds["value"] == [k for k in kinds["choices"] if k in sidebar.DEFAULT_DENSE_KINDS]  # the core's default
    assert slider["maximum"] == 3


def test_analyse_returns_every_figure(analysed):
    session, out = analysed
    curve, history, bars, heat, detail, similarity, plan_md, deeper, status, card, protected, kinds, slider, kind, layer, \
        sort = out
    n = session.analysis.n_layers  # the layer-similarity matrix: layer l (x) against span n (y)
    assert similarity.data[0].type == "heatmap" and len(similarity.data[0].z) == n
    assert "Analysed in" in status and "candidates to remove first" in status and "removal order measured 3 deep" in status
    assert [t.name for t in curve.data][:1] == ["before removal"] and len(bars.data) >= 2
    assert len(history.data) == 1 + 3 + 1  # steps 0..3 and the victims
    assert heat.data[0].type == "heatmap" and kind["value"] == "down"
    assert sort["value"] is True and "sorted by score" in heat.layout.xaxis.title.text  # the readable view first
    assert layer["value"] in [c[1] for c in layer["choices"]]
    assert "after pruning" in plan_md
    assert deeper["visible"] is False  # the controls ask for no more than was measured
    assert session.analysis.depth == 3
    assert {"redundancy_curve", "ratio_bars", "neuron_heatmap", "dense_detail"} <= set(session.figures)


def test_what_if_updates_without_recomputing(analysed):
    session, _ = analysed
    analysis = session.analysis
    curve, history, bars, plan_md, deeper, heat, detail, similarity = analyse_tab.update_plan(
        session, 0.33, 2, False, [0, 1, 5], "diag", True, "identical", ["q", "k", "v", "o", "gate", "up", "down"],
        "down", True, None)
    assert session.analysis is analysis
    assert "target 33%" in bars.layout.title.text and "-33.0%" in plan_md
    removed_trace = next(t for t in bars.data if t.name == "layer removed")
    assert sorted(removed_trace.x) == sorted(analysis.removal.removal_order[:2])
    # the neuron map now says it shows the analysed plan, and labels the rows the what-if removes
    assert "the plan above differs" in heat.layout.title.text and "analysed plan 30%" in heat.layout.title.text
    ticks = dict(zip(heat.layout.yaxis.tickvals, heat.layout.yaxis.ticktext))
    assert all(ticks[i] == f"{i} · removed" for i in analysis.removal.removal_order[:2])
    marks = next(t for t in similarity.data if t.name == "removed by the plan")  # the what-if's removal, marked
    assert sorted(marks.x) == sorted(analysis.removal.removal_order[:2])
    _, _, bars, plan_md, *_ = analyse_tab.update_plan(session, 0.79, 1, False, [0, 1, 5], "obs", True, "identical", None)
    assert "impossible" in plan_md and "importance score" in plan_md  # explained, not raised


def test_what_if_past_the_measured_order_offers_to_measure_it(folder):
    session = Session()
    analyse_tab.analyse(session, *data_args(folder), *plan_args(n_remove=0, depth=0), progress=no_progress)
    assert session.analysis.depth == 0  # Analyse measures no removal the plan does not make
    _, _, _, plan_md, deeper, *_ = analyse_tab.update_plan(session, 0.3, 2, False, [0, 1, 5], "diag", True,
                                                          "identical", None, "down", True, None)
    assert deeper["visible"] is True and "2 layers" in deeper["value"] and "measure it to 2" in plan_md
    _, _, bars, plan_md, deeper, heat, _, _ = analyse_tab.measure_more(
        session, 0.3, 2, False, [0, 1, 5], "diag", True, "identical", None, "down", True, None, progress=no_progress)
    assert session.analysis.depth == 2 and deeper["visible"] is False
    assert "layers" in plan_md and "removed" in plan_md and "measure it" not in plan_md
    removed_trace = next(t for t in bars.data if t.name == "layer removed")
    assert sorted(removed_trace.x) == sorted(session.analysis.removal.removal_order)


def test_heatmap_and_detail_switch_dense(analysed):
    session, _ = analysed
    assert set(session.analysis.kinds) == {"o", "down"}  # the prunable denses: only they are measured
    heat, layer, detail = analyse_tab.update_heatmap(session, "o", True)
    assert "self_attn.o_proj" in heat.layout.title.text
    assert layer["value"] is not None
    detail = analyse_tab.update_detail(session, "o", layer["value"])
    assert f"Layer {layer['value']}" in detail.layout.title.text


def test_prune_twice_does_not_compound_and_keeps_the_original(folder):
    session = Session()
    sidebar.load(session, *data_args(folder), progress=no_progress)
    original = session.loaded.model
    before = {k: v.clone() for k, v in original.state_dict().items()}
    n_before = count_parameters(original)
    for _ in range(2):
        status, table, fig, card, summary, search = runs.run_prune(session, *data_args(folder),
                                                                   *plan_args(ratio=0.3), progress=no_progress)
        assert "30.0% fewer parameters" in status and "30% fewer parameters" in summary
        assert search["visible"] is False  # the method's own layer shares: no search figure
        assert "not evaluated yet" in summary  # the card says what to do next
        assert session.result.params_before == n_before
    assert count_parameters(original) == n_before
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())
    assert list(table["run"]) == ["original", "R1", "R2"]
    assert session.runs[1]["params"] == session.runs[2]["params"] < n_before


def test_ratio_zero_says_there_is_nothing_to_prune_and_keeps_the_previous_run(folder):
    session = Session()
    runs.run_prune(session, *data_args(folder), *plan_args(ratio=0.3), progress=no_progress)
    previous, previous_run = session.pruned, session.pruned_run
    for zero in (0, 0.0, "0"):
        with pytest.raises(gr.Error) as err:
            runs.run_prune(session, *data_args(folder), *plan_args(ratio=zero), progress=no_progress)
        assert err.value.title == "Nothing to prune" and "removes nothing" in err.value.message
    assert session.pruned is previous and session.pruned_run == previous_run == "R1"
    assert [r["run"] for r in session.runs] == ["original", "R1"]

def test_errors_become_messages_not_tracebacks(folder):
    session = Session()
    with pytest.raises(gr.Error) as err:  # down + o inputs, capped at 90 %, cannot give 75 % of this tiny model
        runs.run_prune(session, *data_args(folder), *plan_args(ratio=0.75, n_remove=1), progress=no_progress)
    assert "impossible" in err.value.message and "Traceback" not in err.value.message
    assert err.value.title == "Cannot do that" and session.pruned is None
    with pytest.raises(gr.Error):
        runs.run_evaluate(Session(), ["wikitext2"], "quick", False, progress=no_progress)
    with pytest.raises(gr.Error, match="file"):
        analyse_tab.analyse(Session(), folder, "file", "", 8, 32, 0, *plan_args(), progress=no_progress)


def test_cancel_stops_a_prune(folder):
    session = Session()
    sidebar.load(session, *data_args(folder), progress=no_progress)

    def cancel_soon(*_args, **_kwargs):
        common.request_cancel(session)

    with pytest.raises(gr.Error) as err:
        runs.run_prune(session, *data_args(folder), *plan_args(), progress=cancel_soon)
    assert err.value.title == "Cancelled" and session.pruned is None and not session.runs
    assert not session.busy.locked()


def test_sessions_keep_separate_state(folder):
    first, second = Session(), Session()
    runs.run_prune(first, *data_args(folder), *plan_args(ratio=0.3), progress=no_progress)
    sidebar.load(second, *data_args(folder), progress=no_progress)
    assert second.pruned is None and second.runs == [] and first.runs
    assert first.loaded.model is second.loaded.model  # the original is shared, read-only
    first.close()
    assert first.pruned is None and second.loaded is not None


@needs_data
def test_evaluate_fills_the_table_and_the_plot(folder):
    session = Session()
    runs.run_prune(session, *data_args(folder), *plan_args(ratio=0.3), progress=no_progress)
    status, table, fig, card = runs.run_evaluate(session, ["wikitext2"], "quick", True, progress=no_progress)
    assert "Evaluated in" in status and "→" in status
    original, pruned = (session.runs[0]["ppl wikitext2"], session.runs[1]["ppl wikitext2"])
    assert f"{original:.1f} → {pruned:.1f}" in card and "lower is better" in card  # the card, in plain words
    assert list(table.columns) == ["run", "method", "realised ratio", "of blocks", "ppl wikitext2", "params",
                                   "weights MB", "tokens/s"]  # compact: only the measured perplexity
    row = table[table["run"] == "R1"].iloc[0]
    assert float(row["ppl wikitext2"].replace(",", "")) > 1
    assert float(row["tokens/s"].replace(",", "")) > 0
    assert [t.name for t in fig.data] == ["wikitext2"] and len(fig.data[0].x) == 2


@needs_data
@pytest.mark.skipif(not common.zeroshot_tasks(), reason="lm-eval or the local zero-shot copies missing")
def test_evaluate_zero_shot_adds_accuracy_columns_and_reuses_the_original(folder, monkeypatch):
    """Evaluate with tasks: acc columns for both rows, the original scored once per (task, limit)."""
    monkeypatch.setattr(common, "ZEROSHOT_QUICK_LIMIT", 4)
    calls = []
    real = runs.evaluate_model

    def counting(model, tokenizer, **kwargs):
        if kwargs.get("tasks"):
            calls.append((tuple(kwargs["tasks"]), kwargs["task_limit"]))
        return real(model, tokenizer, **kwargs)

    monkeypatch.setattr(runs, "evaluate_model", counting)
    session = Session()
    session.all_columns = True
    runs.run_prune(session, *data_args(folder), *plan_args(ratio=0.3), progress=no_progress)
    status, table, _, _ = runs.run_evaluate(session, [], "quick", False, ["boolq", "piqa"], progress=no_progress)
    assert "Zero-shot accuracy (first 4 items" in status and "boolq:" in status and "Perplexity" not in status
    assert {"acc boolq", "acc piqa", "mean acc"} <= set(table.columns)
    assert list(table.columns).index("acc boolq") > list(table.columns).index("ppl c4")
    for run in session.runs:
        assert 0.0 <= run["acc boolq"] <= 1.0 and 0.0 <= run["acc piqa"] <= 1.0
        assert run["mean acc"] == pytest.approx((run["acc boolq"] + run["acc piqa"]) / 2)
    assert calls == [(("boolq", "piqa"), 4), (("boolq", "piqa"), 4)]
    runs.run_evaluate(session, [], "quick", False, ["boolq"], progress=no_progress)
    assert calls[-1] == (("boolq",), 4) and len(calls) == 3  # only the pruned model scored again
    with pytest.raises(gr.Error, match="zero-shot task"):
        runs.run_evaluate(session, [], "quick", False, [], progress=no_progress)


def test_generate_side_by_side(folder):
    session = Session()
    runs.run_prune(session, *data_args(folder), *plan_args(ratio=0.3), progress=no_progress)
    outputs = list(try_it.run_generate(session, "The river", 8, True))
    answers, card = outputs[-1]
    original, pruned = answers.split("id='gen-pruned'>")[0], answers.split("id='gen-pruned'>")[1]
    assert "tokens/s" in original and "R1" in pruned
    assert "M parameters" in answers and "Pruned · R1" in answers  # each answer says what made it
    answers = session.answers["R1"]
    assert answers.prompt == "The river" and answers.after is not None
    assert "The river" in card  # the card and the report show the pair


def test_downloads_and_save(folder, tmp_path):
    session = Session()
    session.all_columns = True
    analyse_tab.analyse(session, *data_args(folder), *plan_args(), progress=no_progress)
    runs.run_prune(session, *data_args(folder), *plan_args(ratio=0.3), progress=no_progress)
    files, status = export_tab.make_downloads(session, ["plan", "report", "runs", "figures"], True, progress=no_progress)
    names = {Path(f).name for f in files}
    assert {"comp_plan.json", "comp_report_R1.json", "runs.csv", "figures.html"} <= names
    plan = json.loads(Path(next(f for f in files if f.endswith("comp_plan.json"))).read_text())
    assert "scores" in plan["denses"][0] and plan["removed_layers"] == session.analysis.plan.removed_layers
    status, table = export_tab.save_model(session, str(tmp_path / "saved"), False)
    assert "Saved" in status and (tmp_path / "saved" / "config.json").is_file()
    assert table[table["run"] == "R1"].iloc[0]["disk MB"] != "—"
    with pytest.raises(gr.Error, match="exists"):
        export_tab.save_model(session, str(tmp_path / "saved"), False)
    workdir = session.workdir
    session.close()
    assert not workdir.exists()


def test_build_app_and_launch_defaults():
    import launch
    from ui.app import build_app, launch_kwargs

    demo = build_app(default_source="/some/folder")
    assert isinstance(demo, gr.Blocks)
    assert "COMP Explorer" in demo.title
    args = launch.parse_args([])
    assert (args.host, args.port, args.share, args.model) == ("127.0.0.1", 7860, False, "bundled")
    assert "cx-header" in launch_kwargs()["css"]


def test_comp_settings_follow_the_core_defaults():
    from comp_core.settings import chosen_dense_kinds, settings_for

    every = ["q", "k", "v", "o", "gate", "up", "down"]

    def config(ticked, all_kinds, **comp):
        return settings_for("comp", ratio=0.2, comp={**comp, **chosen_dense_kinds(ticked, all_kinds)})

    assert config(None, every).dense_kinds == sidebar.DEFAULT_DENSE_KINDS
    assert config([], []).dense_kinds == sidebar.DEFAULT_DENSE_KINDS  # nothing loaded yet: "default"
    assert config(every, every).dense_kinds is None
    cfg = settings_for("comp", ratio=0.25, protected=(0, 29), comp=dict(
        remove_layers="auto", score="obs", mask_tuning=False, inputs="accumulated", auto_max_layers=5,
        **chosen_dense_kinds(["down", "q"], every)))
    assert (cfg.dense_kinds, cfg.remove_layers, cfg.auto_max_layers) == (("q", "down"), "auto", 5)
    assert cfg.protected == (0, 29) and cfg.score == "obs" and not cfg.mask_tuning


def test_prune_after_analyse_measures_and_cuts_what_the_analysis_showed(folder):
    """Analyse decides the cuts without fitting the kept weights (it costs no more than a prune); Prune then
    measures, fits, and cuts exactly the inputs the analysis showed."""
    session = Session()
    analyse_tab.analyse(session, *data_args(folder), *plan_args(), progress=no_progress)
    plan = session.analysis.plan
    assert not plan.fitted
    status, *_ = runs.run_prune(session, *data_args(folder), *plan_args(), progress=no_progress)
    assert "Analyse decides the cuts" in status and session.runs[-1]["path"] == "measured"
    pruned = {(d.layer, d.name): d.pruned_index.tolist() for d in session.result.plan.dense_reports}
    assert pruned == {(d.layer, d.name): d.pruned_index.tolist() for d in plan.dense_reports}
    assert session.result.params_after == plan.planned_params_after
    # another method: measured, and said why
    status, *_ = runs.run_prune(session, *data_args(folder), *plan_args(), method="comp-layers",
                                progress=no_progress)
    assert "measured and pruned" in status and "granularity" in status


def test_method_dropdown_runs_any_registered_method(folder):
    from comp_core.methods import method_names

    from comp_core.methods import get_method

    other = next(n for n in method_names() if not sidebar.uses_comp_controls(n)
                 and get_method(n).kind == "structured")
    note, group, ratio, sparsity = sidebar.select_method(other)
    assert group["visible"] is False and "Only the target ratio applies" in note
    assert ratio["visible"] is True and sparsity["visible"] is False
    assert sidebar.select_method("comp")[1]["visible"] is True
    assert [v for _, v in sidebar.method_choices()] == method_names()
    session = Session()
    status, table, *_ = runs.run_prune(session, *data_args(folder), *plan_args(ratio=0.3), method=other,
                                       progress=no_progress)
    assert f"with <b>{other}</b>" in status and "no analysis to reuse" in status
    row = session.runs[-1]
    assert row["method"] == other and row["score"] == "" and session.result.method == other
    assert list(table["method"]) == ["", other]


def test_method_settings_follow_the_registry(folder):
    session = Session()
    sidebar.load(session, *data_args(folder), progress=no_progress)
    layers = sidebar.method_settings(session, "comp-layers", 0.3, 2, False, [0, 5], "obs", False, "identical",
                                     None, 3)
    assert (layers.granularity, layers.remove_layers, layers.protected, layers.score) == ("layers", 2, (0, 5), "obs")
    comp = sidebar.method_settings(session, "comp", 0.3, 2, False, [0, 5], "obs", False, "identical", None, 3)
    from comp_core.settings import settings_for
    assert comp == settings_for("comp", ratio=0.3, protected=[0, 5], comp=dict(
        remove_layers=2, score="obs", mask_tuning=False, inputs="identical", auto_max_layers=3))


def test_sidebar_shows_the_sparsity_for_mask_and_composed_methods():
    note, group, ratio, sparsity = sidebar.select_method("magnitude")
    assert (group["visible"], ratio["visible"], sparsity["visible"]) == (False, False, True)
    assert "Only the sparsity applies" in note and "removes none" in note
    note, group, ratio, sparsity = sidebar.select_method("comp+nm")
    assert (group["visible"], ratio["visible"], sparsity["visible"]) == (False, True, True)
    assert "target ratio" in note and "sparsity" in note
    _, _, ratio, sparsity = sidebar.select_method("comp")
    assert (ratio["visible"], sparsity["visible"]) == (True, False)
    assert settings.parse_sparsity("2:4") == "2:4" and settings.parse_sparsity(" 4 : 8 ") == "4:8"
    assert settings.parse_sparsity("50%") == "0.5" and settings.parse_sparsity(0.6) == "0.6"
    for bad in ("", "0", "1.5", "4:2", "half"):
        with pytest.raises(ValueError):
            settings.parse_sparsity(bad)
    session = Session()
    masks = sidebar.method_settings(session, "magnitude", 0.3, 1, False, None, "diag", True, "identical", None, 3,
                                    "2:4")
    assert masks.sparsity == "2:4" and not hasattr(masks, "ratio")
    assert sidebar.method_settings(session, "wanda", *plan_args()[:-1], 3, None).sparsity == "0.5"  # the default
    both = sidebar.method_settings(session, "comp+nm", *plan_args(ratio=0.25)[:-1], 3, "4:8")
    assert (both.ratio, both.sparsity) == (0.25, "4:8")


def test_prune_with_a_mask_method_says_nothing_was_removed(folder):
    session = Session()
    session.all_columns = True
    status, table, fig, *_ = runs.run_prune(session, *data_args(folder), *plan_args(), method="magnitude",
                                            sparsity="2:4", progress=no_progress)
    assert "R1: magnitude</b> set weights to zero" in status and "2:4 masks" in status
    assert "Nothing was removed" in status
    assert "pruned 0.00%" not in status
    row = table[table["run"] == "R1"].iloc[0]
    assert row["realised ratio"] == runs.NOTHING_REMOVED and row["sparsity"] == "2:4"
    assert row["zeros of all params"].endswith("%") and 30 < float(row["zeros of all params"][:-1]) < 50
    assert row["params"] == table[table["run"] == "original"].iloc[0]["params"]  # nothing removed
    original = table[table["run"] == "original"].iloc[0]
    assert original["sparsity"] == "" and original["zeros of all params"] == ""
    assert session.runs[-1]["zeros in linears"] == pytest.approx(0.5)
    with pytest.raises(gr.Error, match="N:M"):
        runs.run_prune(session, *data_args(folder), *plan_args(), method="magnitude", sparsity="2:x",
                       progress=no_progress)
    # composed: the structural ratio, then the masks
    status, table, *_ = runs.run_prune(session, *data_args(folder), *plan_args(ratio=0.2), method="comp+nm",
                                       sparsity="2:4", progress=no_progress)
    assert re.search(r"R2: 20\.\d% fewer parameters", status) and "then 2:4 masks" in status
    row = table[table["run"] == "R2"].iloc[0]
    assert row["realised ratio"].startswith("20.") and row["sparsity"] == "2:4"


def test_a_streamed_model_prunes_evaluates_and_exports_in_the_gui(folder, tmp_path, monkeypatch):
    """launch.py --stream on: the card says the model is streamed, each run reports its own peak memory, and
    the export writes the same model the in-memory GUI does."""
    monkeypatch.setattr(common, "MODELS", common.MODELS)  # restored after the test
    common.set_load_options("on")
    session = Session()
    card, *_ = sidebar.load(session, *data_args(folder), progress=no_progress)
    assert "streamed" in card and session.loaded.streamed
    session.all_columns = True
    status, table, *_ = runs.run_prune(session, *data_args(folder), *plan_args(ratio=0.3), progress=no_progress)
    assert "streamed" in status and "peak memory" in status
    row = next(r for r in session.runs if r["run"] == session.pruned_run)
    assert row["peak MB"] > 100 and "peak MB" in table.columns
    status, *_ = runs.run_evaluate(session, ["sample"], "quick", False, progress=no_progress)
    assert "peak memory" in status
    streamed_ppl = row["ppl sample"]

    common.set_load_options("off")
    whole = Session()
    sidebar.load(whole, *data_args(folder), progress=no_progress)
    assert not whole.loaded.streamed
    runs.run_prune(whole, *data_args(folder), *plan_args(ratio=0.3), progress=no_progress)
    runs.run_evaluate(whole, ["sample"], "quick", False, progress=no_progress)
    whole_row = next(r for r in whole.runs if r["run"] == whole.pruned_run)
    assert whole_row["params"] == row["params"]
    assert streamed_ppl == pytest.approx(whole_row["ppl sample"], rel=1e-4)


# ------------------------------------------------------------------- leftovers: cancel note, temp folders, paths

def test_cancel_note_clears_once_the_stopped_task_lets_go():
    import threading
    import time

    session = Session.new()
    assert "Stopping" in common.request_cancel(session)
    assert common.cancel_finished(session) == ""  # nothing running: cleared at once
    session.busy.acquire()
    threading.Timer(0.3, session.busy.release).start()  # a task still unwinding for 0.3 s
    started = time.perf_counter()
    assert common.cancel_finished(session) == ""
    assert time.perf_counter() - started >= 0.25  # the note stayed until the task had stopped
    assert session.busy.acquire(blocking=False)  # and the tab is free again
    session.busy.release()


def test_session_folders_live_in_one_server_folder_removed_at_exit(tmp_path):
    """Stopping the server removes every session's download folder, also of tabs that never closed."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    script = ("from ui.session import Session, server_temp_folder\n"
              "a, b = Session.new(), Session.new()\n"
              "(a.workdir / 'plan.json').write_text('{}'); b.workdir\n"
              "print(server_temp_folder(), a.workdir.parent == b.workdir.parent == server_temp_folder())\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    folder, same = done.stdout.split()
    assert same == "True" and Path(folder).parent == tmp_path
    assert not Path(folder).exists() and list(tmp_path.iterdir()) == []


def test_export_paths_are_absolute_and_named(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert common.default_export_folder() == tmp_path / "comp-explorer"
    assert common.export_path("pruned") == str(tmp_path / "comp-explorer" / "pruned")
    assert common.export_path("~/elsewhere/x.gguf") == str(tmp_path / "elsewhere" / "x.gguf")
    assert common.export_path("/abs/folder") == "/abs/folder"
    with gr.Blocks():
        tab = export_tab.build()
    assert tab.folder.value == str(tmp_path / "comp-explorer" / "pruned")
    assert tab.gguf_path.value == str(tmp_path / "comp-explorer" / "pruned.gguf")
    with gr.Blocks():
        tab = export_tab.build("/data/models/mine")
    assert (tab.folder.value, tab.gguf_path.value) == ("/data/models/mine", "/data/models/mine.gguf")
    import launch
    assert launch.parse_args([]).export_folder is None


def test_an_empty_model_path_says_it_loads_the_bundled_model(folder, monkeypatch):
    from comp_core import load_model

    tiny = load_model(folder)
    asked = []
    monkeypatch.setattr(common.MODELS, "get", lambda key, **kw: asked.append(key) or (tiny, False))
    steps = []

    class Steps:
        def step(self, text, stage=None):
            steps.append(text)

    session = Session()
    common.ensure_model(session, "  ", Steps())
    assert asked == ["bundled"] and "bundled" in steps[0] and "No model path typed" in steps[0]
    assert "No model path was typed, so this is the bundled model" in common.model_card(session)
    common.ensure_model(session, folder, Steps())
    assert "No model path was typed" not in common.model_card(session)
