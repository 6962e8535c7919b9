"""Searched layer shares in the GUI: the sidebar's "Layer shares" controls, a searched prune in the Prune tab
(status sentence, plot-search, report, never the analysed plan), and searched rows in the Compare tab; on the
tiny Llama folder with 2 generations."""
from __future__ import annotations

import pytest

gr = pytest.importorskip("gradio")

from comp_core.methods import method_names  # noqa: E402
from comp_core.settings import SettingsError, settings_for  # noqa: E402
from tests.ui.test_ui_handlers import HAVE_DATA, data_args, no_progress, plan_args, save_tiny_llama  # noqa: E402
from ui import plots, sidebar  # noqa: E402
from ui.session import Session  # noqa: E402
from ui.tabs import analyse as analyse_tab  # noqa: E402
from ui.tabs import compare, runs  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-search")))


def _settings(method, allocation="search", generations=2, sparsity=None, auto=False, inputs="identical"):
    return sidebar.method_settings(Session(), method, 0.3, 1, auto, None, "diag", True, inputs, None, 3, sparsity,
                                   "all", allocation, generations)


# ------------------------------------------------------------------------------------------- sidebar


def test_searched_shares_reach_the_settings_of_every_searchable_method():
    comp = _settings("comp")
    assert (comp.allocation, comp.search_generations) == ("search", 2)
    assert comp == settings_for("comp", ratio=0.3, comp=dict(remove_layers=1, score="diag", mask_tuning=True,
                                                             inputs="identical", auto_max_layers=3),
                                values=dict(allocation="search", search_generations=2))
    assert _settings("wanda-sp", generations=40).search_generations == 40
    wanda = _settings("wanda", sparsity="0.5", generations=7.0)  # gr.Number may hand a float
    assert (wanda.allocation, wanda.search_generations, wanda.sparsity) == ("search", 7, "0.5")
    assert _settings("comp", allocation="one-shot").allocation == "one-shot"
    assert _settings("comp", allocation=None).allocation == "one-shot"  # a control never filled: the rule


def test_methods_without_shares_to_search_keep_their_rule_and_the_sidebar_says_why():
    """Their controls are hidden with a line that says why, so a 'searched' left over from another method is
    ignored, never half-applied."""
    assert not hasattr(_settings("shortgpt"), "allocation")
    assert _settings("wanda", sparsity="2:4").allocation == "one-shot"
    assert _settings("comp-layers").allocation == "one-shot"
    assert not hasattr(_settings("comp+nm", sparsity="2:4"), "allocation")
    for method, sparsity, why in (("shortgpt", None, "no per-layer shares to search"),
                                  ("comp+nm", "2:4", "no per-layer shares to search"),
                                  ("wanda", "2:4", "the 2:4 pattern"),
                                  ("comp-layers", None, "whole layers only")):
        radio, box, note = sidebar.search_controls(method, sparsity, "search")
        assert radio["visible"] is False and box["visible"] is False
        assert why in note and "Layer shares" in note
    radio, box, note = sidebar.search_controls("comp", "2:4", "search")  # COMP has no pattern: searchable
    assert radio["visible"] is True and box["visible"] is True and "a few minutes more" in note
    radio, box, note = sidebar.search_controls("wanda", "0.5", "one-shot")
    assert radio["visible"] is True and box["visible"] is False and note == ""
    searchable = [m for m in method_names() if not sidebar.search_refusal(m)]
    assert {"comp", "flap", "wanda-sp", "magnitude", "wanda"} <= set(searchable)
    assert "shortgpt" not in searchable and "comp+nm" not in searchable


def test_bad_search_choices_are_refused_in_the_sidebars_words():
    for bad in (0, 501, 2.5, "many"):
        with pytest.raises(SettingsError, match="search generations: type a whole number from 1 to 500"):
            _settings("comp", generations=bad)
    with pytest.raises(SettingsError, match="untick 'auto'"):
        _settings("comp", auto=True)
    with pytest.raises(SettingsError, match="identical or accumulated inputs"):
        _settings("comp", inputs="paired")
    assert _settings("comp", allocation="one-shot", auto=True).remove_layers == "auto"  # the rule: no refusal


# ------------------------------------------------------------------------------------------- prune tab


def test_a_searched_prune_measures_shows_its_figure_and_reports_it(folder, tmp_path):
    session = Session()
    analyse_tab.analyse(session, *data_args(folder), *plan_args(), progress=no_progress)
    # searched: the analysed plan is never applied, whatever else matches (a search prunes every layer again)
    searched = sidebar.method_settings(session, "comp", *plan_args()[:-1], 3, None, "all", "search", 2)
    assert runs.plan_to_apply(session, searched) == (
        None, "the layer shares are searched, which prunes every layer again at several shares")
    out = runs.run_prune(session, *data_args(folder), *plan_args(), method="comp", allocation="search",
                         search_generations=2, progress=no_progress)
    status, table, _, _, card, figure = out
    record = session.result.plan.search
    assert record is not None and record.generations == 2
    assert "the layer shares are searched" in status and session.runs[-1]["path"] == "measured"
    words = "closer to the original's than with comp's own rule" if record.improved else "the rule's shares were kept"
    assert "The layer shares were searched" in status or "The search found no layer shares" in status
    assert words in status and "KL divergence" in status and "MB of pruned layer copies" in status
    assert status.index("KL divergence") < status.index("<details")  # the sentence, then the details
    assert figure["visible"] is True and session.figures["search"] is figure["value"]
    names = [t.name for t in figure["value"].data]
    assert plots.SEARCH_RULE in names and plots.SEARCH_CURVE in names
    assert list(table["layer shares"]) == ["", "searched"]
    assert "layer shares searched" in card
    assert "How the search moved the pruning between layers" in runs.report_figures(session)
    assert any("--set allocation=search" in c and "--set search_generations=2" in c
               for c in runs.reproduce_commands(session, "out"))
    # the next run uses the method's rule: the figure goes away, and out of the report
    *_, figure = runs.run_prune(session, *data_args(folder), *plan_args(), method="comp", allocation="one-shot",
                                search_generations=2, progress=no_progress)
    assert figure["visible"] is False and "search" not in session.figures
    assert "How the search moved the pruning between layers" not in runs.report_figures(session)
    assert session.runs[-1]["layer shares"] == "rule"


# ------------------------------------------------------------------------------------------- compare tab


def test_searched_labels_read_as_words_and_get_their_own_colour():
    assert compare.method_label("comp@search") == "comp · searched" and compare.method_label("flap") == "flap"
    assert compare.base_method("wanda@search") == "wanda"
    assert compare.searched_labels(["comp", "shortgpt", "wanda", "comp+nm", "comp-layers"], ["0.5", "2:4"]) == [
        "comp@search", "wanda@search"]
    assert compare.searched_labels(["comp", "wanda"], ["2:4"]) == ["comp@search"]  # N:M: nothing to search
    session = Session()
    session.compare_rows = [{"method": m, "key": "k", "eval": "e"}
                            for m in ("flap", "comp@search", "original", "comp", "flap@search")]
    order = compare.methods_in(session)
    assert order == ["comp", "comp@search", "flap", "flap@search", "original"]  # each next to its method
    colours = [plots.method_color(m, order) for m in order]
    assert len(set(colours)) == len(order)


@pytest.mark.skipif(not HAVE_DATA, reason="no local data sets (COMP_DATA_DIR): the compare tab calibrates on them")
def test_compare_runs_searched_rows_beside_their_methods(folder):
    session = Session()
    outputs = list(compare.run_compare(session, *data_args(folder), ["comp", "shortgpt", "wanda"], "0.3",
                                       ["wikitext2"], 2, "0.5, 2:4", None, 4, "all", True, 2,
                                       progress=no_progress))
    status, table, figure, select, *_ = outputs[-1]
    labels = [r["method"] for r in session.compare_rows]
    assert labels.count("comp@search") == 1 and labels.count("wanda@search") == 1  # wanda at 0.5 only
    assert "shortgpt@search" not in labels and not any(r["error"] for r in session.compare_rows)
    assert "· searched" in status and "(2 generations)" in status and "N:M pattern" in status
    assert {"comp · searched", "wanda · searched"} <= set(table["method"])
    legend = {t.name for t in figure.data}
    assert {"comp", "comp · searched", "wanda", "wanda · searched"} <= legend
    searched = next(r for r in session.compare_rows if r["method"] == "comp@search")
    assert searched["plan"] is not None and searched["plan"].search is not None
    assert any(label == f"{searched['#']} · comp · searched @ 30%" for label, _ in select["choices"])
    note, *_ = compare.plan_views(session, searched["#"])
    assert "comp · searched @ 30%" in note
    with pytest.raises(gr.Error, match="layer shares to search"):
        list(compare.run_compare(session, *data_args(folder), ["shortgpt"], "0.3", ["wikitext2"], 2, "0.5", None, 4,
                                 "all", True, 2, progress=no_progress))
