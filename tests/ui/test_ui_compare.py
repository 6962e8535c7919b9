"""Compare tab: handlers (streaming rows, cancel, plan views) on a tiny Llama folder, and its pure figures."""
from __future__ import annotations

import numpy as np
import pytest

gr = pytest.importorskip("gradio")

from tests.ui.test_ui_handlers import HAVE_DATA, data_args, no_progress, save_tiny_llama  # noqa: E402
from comp_core import settings  # noqa: E402
from ui import common, plots  # noqa: E402
from ui.session import Session  # noqa: E402
from ui.tabs import compare  # noqa: E402

needs_data = pytest.mark.skipif(not HAVE_DATA, reason="no local data sets (COMP_DATA_DIR)")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-compare")))


def _run(session, folder, methods=("comp-layers", "comp"), ratios="0.2, 0.3", windows=2, on_yield=None,
         sparsities=compare.DEFAULT_SPARSITIES, tasks=None, task_items=4):
    outputs = []
    for out in compare.run_compare(session, *data_args(folder), list(methods), ratios, ["wikitext2"], windows,
                                   sparsities, tasks, task_items, progress=no_progress):
        outputs.append(out)
        if on_yield is not None:
            on_yield(out)
    return outputs


def test_parse_ratios():
    assert settings.parse_ratios("0.2, 0.3", allow_zero=False) == (0.2, 0.3)
    assert settings.parse_ratios("20% 30%;0.2", allow_zero=False) == (0.2, 0.3)
    for bad in ("", "0.2, x", "1.5", "0"):
        with pytest.raises(ValueError):
            settings.parse_ratios(bad, allow_zero=False)


def test_parse_sparsities_and_target_labels():
    assert settings.parse_sparsities(compare.DEFAULT_SPARSITIES) == ("0.5", "2:4")
    assert settings.parse_sparsities("50%; 4:8 0.5") == ("0.5", "4:8")
    for bad in ("", "2:4, x", "0", "3:2"):
        with pytest.raises(ValueError):
            settings.parse_sparsities(bad)
    assert compare.target_label({"target": 0.3, "sparsity": None}) == "30%"
    assert compare.target_label({"target": 0.0, "sparsity": "2:4"}) == "2:4"
    assert compare.target_label({"target": 0.2, "sparsity": "2:4"}) == "20% + 2:4"
    assert compare.target_label({"target": 0.0}) == "0%"


def test_sparsity_grid_maps_a_composed_plan_back_to_the_original_layers():
    from types import SimpleNamespace

    reports = [SimpleNamespace(layer=j, kind=k, sparsity=0.5 if k == "q" else 0.25) for j in range(3)
               for k in ("q", "down")]
    plan = SimpleNamespace(dense_reports=reports, n_layers=3)
    grid, kinds = compare.sparsity_grid(plan)
    assert kinds == ["q", "down"] and grid.shape == (3, 2) and grid[0].tolist() == [0.5, 0.25]
    grid, _ = compare.sparsity_grid(plan, layers=[0, 2, 3], n_layers=4)  # layer 1 was removed first
    assert np.isnan(grid[1]).all() and grid[3].tolist() == [0.5, 0.25]


def test_default_methods_are_registered_structured_ones():
    from comp_core.methods import get_method

    chosen = compare.default_methods()
    assert chosen[0] == "comp" and set(chosen) <= set(settings.COMPARE_METHODS)
    assert all(get_method(m).kind == "structured" for m in chosen)
    assert "comp" in compare.method_summaries()
    assert not set(chosen) & {"magnitude", "wanda", "sparsegpt", "apt", "comp+nm"}  # listed, not preselected


@needs_data
def test_compare_streams_rows_and_shows_where_each_method_cut(folder):
    session = Session()
    outputs = _run(session, folder)
    tables = [out[1] for out in outputs if hasattr(out[1], "shape")]
    sizes = [len(t) for t in tables]
    assert sizes == sorted(sizes) and sizes[-1] == 5 and len(set(sizes)) >= 4  # rows arrive one by one
    status, table, figure, select, note, kind, bars, heat, card = outputs[-1]
    assert "6 layers" in card
    assert "Compared in" in status
    assert list(table["method"]) == ["original", "comp-layers", "comp", "comp-layers", "comp"]
    assert list(table["#"]) == ["C1", "C2", "C3", "C4", "C5"]
    assert all(float(v.replace(",", "")) > 1 for v in table["ppl wikitext2"])
    assert {t.name for t in figure.data} == {"original", "comp-layers", "comp"}
    assert figure.layout.yaxis.type == "log"
    assert [v for _, v in select["choices"]] == ["C2", "C3", "C4", "C5"] and select["value"] == "C5"
    # the last row (comp at 30 %): removed layers and neuron cuts
    assert "comp @ 30%" in note and kind["value"] == "down"
    assert "layer removed" in {t.name for t in bars.data}
    assert heat.data[0].type == "heatmap"
    # comp-layers removes whole layers only: bars but no neuron map
    note, kind, bars, heat = compare.show_plan(session, "C2", None)
    assert "comp-layers" in note and not heat.data
    # plans are kept light: no refit weights or masks
    assert all(d.new_weight is None and d.mask is None for r in session.compare_rows if r["plan"]
               for d in r["plan"].dense_reports)

    # a second run appends rows; the original is not measured twice for the same windows
    _run(session, folder, methods=["comp"], ratios="0.25")
    assert [r["method"] for r in session.compare_rows][-1] == "comp" and len(session.compare_rows) == 6
    assert sum(r["method"] == "original" for r in session.compare_rows) == 1
    cleared = compare.clear_rows(session)
    assert session.compare_rows == [] and len(cleared[1]) == 0


@needs_data
def test_compare_masks_and_composed_rows(folder):
    session = Session()
    status, table, figure, select, note, kind, bars, heat, card = _run(
        session, folder, methods=["comp", "magnitude", "comp+nm"], ratios="0.3", windows=1,  # 30 %: the tiny model needs a removed layer
        sparsities="0.5, 2:4")[-1]
    assert "ratios 30% · sparsities 0.5, 2:4" in status
    # structured at every ratio, masks at every sparsity, composed at every pair
    assert list(table["method"]) == ["original", "comp", "comp+nm", "comp+nm", "magnitude", "magnitude"]
    assert list(table["target"]) == ["0%", "30%", "30% + 0.5", "30% + 2:4", "0.5", "2:4"]
    assert {"sparsity", "zeros in linears", "zeros of all params"} <= set(table.columns)
    masks = table[table["method"] == "magnitude"]
    assert set(masks["realised ratio"]) == {compare.NOTHING_REMOVED} and list(masks["sparsity"]) == ["0.5", "2:4"]
    assert all(v == "50.0%" for v in masks["zeros in linears"])
    assert table.iloc[1]["sparsity"] == "" and table.iloc[1]["zeros of all params"] == ""
    composed = table[table["method"] == "comp+nm"]
    assert all(v.startswith("30.") for v in composed["realised ratio"])
    # the figure: structured and composed lines by realised ratio, masks in a second panel by pattern
    names = {t.name: t for t in figure.data}
    assert {"original", "comp", "comp+nm 0.5", "comp+nm 2:4", "magnitude"} <= set(names)
    assert names["magnitude"].xaxis == "x2" and list(figure.layout.xaxis2.ticktext) == ["0.5", "2:4"]
    assert names["comp+nm 2:4"].xaxis == "x" and figure.layout.yaxis.type == "log"
    # the last row (magnitude 2:4) is shown: zeroed share per layer and per dense, no dense to choose
    assert select["value"] == "C6" and "C6 · magnitude @ 2:4" in [c[0] for c in select["choices"]]
    assert "nothing removed" in note and "2:4 masks" in note and kind["visible"] is False
    assert bars.data[0].name == "weights zeroed" and len(bars.data[0].x) == 6
    assert all(0.4 < y <= 0.5 for y in bars.data[0].y)
    assert heat.data[0].type == "heatmap" and list(heat.data[0].x) == ["q", "k", "v", "o", "gate", "up", "down"]
    assert np.allclose(np.asarray(heat.data[0].z, dtype=float), 0.5)
    # a composed row: the structural bars and, by default, the sparsity map with the removed layer marked
    row = next(r for r in session.compare_rows if r["method"] == "comp+nm" and r["sparsity"] == "2:4")
    note, kind, bars, heat = compare.show_plan(session, row["#"], None)
    assert "then 2:4 masks" in note and kind["value"] == compare.MASK_VIEW and kind["visible"] is True
    assert "layer removed" in {t.name for t in bars.data}
    z = np.asarray(heat.data[0].z, dtype=float)
    removed = row["plan"].removed_layers
    assert removed and all(np.isnan(z[i]).all() for i in removed)
    assert any("removed" in t for t in heat.layout.yaxis.ticktext)
    note, kind, bars, heat = compare.show_plan(session, row["#"], "down")
    assert "Neuron importance" in heat.layout.title.text
    # mask plans are kept light too
    assert all(d.scores.numel() == 0 for r in session.compare_rows if r["kind"] == "unstructured"
               for d in r["plan"].dense_reports)
    # only mask methods ticked: the ratios are not read
    _run(session, folder, methods=["magnitude"], ratios="not used", windows=1, sparsities="4:8")
    assert session.compare_rows[-1]["sparsity"] == "4:8"
    with pytest.raises(gr.Error, match="N:M"):
        _run(session, folder, methods=["magnitude"], sparsities="2:x")


@needs_data
@pytest.mark.skipif(not common.zeroshot_tasks(), reason="lm-eval or the local zero-shot copies missing")
def test_compare_with_zero_shot_tasks(folder):
    """Ticked tasks: every row gets acc columns and their mean; a second run on the same windows, sets and
    tasks reuses the original's row, a new task measures the original again."""
    session = Session()
    status, table, *_ = _run(session, folder, methods=["magnitude"], sparsities="0.5", windows=1,
                             tasks=["boolq"], task_items=3)[-1]
    assert list(table["method"]) == ["original", "magnitude"]
    assert {"acc boolq", "mean acc"} <= set(table.columns)
    assert list(table.columns).index("acc boolq") > list(table.columns).index("ppl wikitext2")
    assert all(0.0 <= r["acc boolq"] <= 1.0 and r["mean acc"] == r["acc boolq"] for r in session.compare_rows)
    assert "3 items/task" in session.compare_rows[0]["eval"]
    _run(session, folder, methods=["magnitude"], sparsities="2:4", windows=1, tasks=["boolq"], task_items=3)
    assert [r["method"] for r in session.compare_rows] == ["original", "magnitude", "magnitude"]
    _run(session, folder, methods=["magnitude"], sparsities="2:4", windows=1, tasks=["piqa"], task_items=3)
    assert [r["method"] for r in session.compare_rows][-2:] == ["original", "magnitude"]
    with pytest.raises(gr.Error, match="Items per task"):
        _run(session, folder, methods=["magnitude"], tasks=["boolq"], task_items="x")


@needs_data
def test_cancel_keeps_the_finished_rows(folder):
    session = Session()

    def cancel_after_first_row(out):
        if hasattr(out[1], "shape") and len(out[1]) >= 1:
            compare.cancel(session)

    outputs = _run(session, folder, ratios="0.2, 0.3, 0.4", on_yield=cancel_after_first_row)
    status = outputs[-1][0]
    assert "Stopped" in status and 1 <= len(session.compare_rows) < 7
    assert not session.busy.locked()


@needs_data
def test_an_unreachable_ratio_is_a_row_with_a_note(folder):
    session = Session()
    status, table, *_ = _run(session, folder, methods=["comp"], ratios="0.75", windows=1)[-1]
    assert "could not be pruned" in status
    row = session.compare_rows[-1]
    assert row["error"] and "impossible" in row["note"] and row["plan"] is None
    assert table.iloc[-1]["realised ratio"] == "—"


def test_compare_refuses_bad_input_with_messages(folder):
    session = Session()
    with pytest.raises(gr.Error, match="Tick at least one method"):
        list(compare.run_compare(session, *data_args(folder), [], "0.2", ["wikitext2"], 2, progress=no_progress))
    with pytest.raises(gr.Error, match="not a ratio"):
        list(compare.run_compare(session, *data_args(folder), ["comp"], "0.2, abc", ["wikitext2"], 2,
                                 progress=no_progress))


# ------------------------------------------------------------------------------------------------ figures


def test_compare_ppl_one_line_per_method_from_the_original():
    rows = [{"method": "original", "realised ratio": 0.0, "target": 0.0, "ppl wikitext2": 20.0},
            {"method": "comp", "realised ratio": 0.2, "target": 0.2, "ppl wikitext2": 30.0},
            {"method": "comp", "realised ratio": 0.3, "target": 0.3, "ppl wikitext2": 45.0},
            {"method": "flap", "realised ratio": 0.21, "target": 0.2, "ppl wikitext2": 80.0},
            {"method": "flap", "realised ratio": None, "target": 0.3, "error": "impossible"}]
    fig = plots.compare_ppl(rows, ["wikitext2"], order=["comp", "flap"])
    assert [t.name for t in fig.data] == ["original", "comp", "flap"]
    assert list(fig.data[1].x) == [0.0, 0.2, 0.3] and list(fig.data[2].y) == [20.0, 80.0]
    assert fig.layout.yaxis.type == "log" and list(fig.layout.yaxis.tickvals) == [20, 50, 100]
    assert fig.data[1].line.color != fig.data[2].line.color
    close = plots.compare_ppl([{**r, "ppl wikitext2": 500.0 + i} for i, r in enumerate(rows[:3])], ["wikitext2"])
    assert close.layout.yaxis.tickvals is None  # plotly's ticks: no 1-2-5 tick falls between 500 and 502
    two = plots.compare_ppl([{**r, "ppl ptb": 50.0} for r in rows[:3]], ["wikitext2", "ptb"], order=["comp"])
    assert {t.line.dash for t in two.data if t.mode == "lines+markers"} == {"solid", "dash"}
    assert not any(t.xaxis == "x2" for t in fig.data)  # no mask rows: one panel
    empty = plots.compare_ppl(rows[:1], ["wikitext2"])
    assert not empty.data and "Run a comparison" in empty.layout.annotations[0].text


def test_removed_share_bars_and_row_notes():
    fig = plots.removed_share_bars(6, {2: 5, 3: 10, 4: 0}, [10] * 6, removed_layers=[3], protected=[0, 1, 5])
    names = [t.name for t in fig.data]
    assert names == ["neurons pruned", "layer removed", "protected"]
    assert list(fig.data[0].x) == [2] and list(fig.data[0].y) == [0.5]
    assert plots.row_notes([3], [0, 5]) == {3: "removed", 0: "protected", 5: "protected"}
    nothing = plots.removed_share_bars(3, {}, [10] * 3)
    assert "nothing removed" in nothing.layout.annotations[-1].text
    assert plots.method_color("comp", ["comp", "flap"]) == plots.method_color("comp", ["comp"])
    assert isinstance(plots.method_color("unknown", []), str)
    assert np.isfinite(fig.layout.yaxis.range[1])


def test_compare_ppl_puts_mask_rows_in_a_panel_by_pattern():
    rows = [{"method": "original", "kind": "-", "realised ratio": 0.0, "target": 0.0, "ppl wikitext2": 20.0},
            {"method": "comp", "kind": "structured", "realised ratio": 0.2, "target": 0.2, "ppl wikitext2": 30.0},
            {"method": "comp+nm", "kind": "composed", "realised ratio": 0.2, "target": 0.2, "sparsity": "2:4",
             "ppl wikitext2": 60.0},
            {"method": "wanda", "kind": "unstructured", "realised ratio": 0.0, "target": 0.0, "sparsity": "2:4",
             "ppl wikitext2": 40.0, "zeros of all params": 0.38},
            {"method": "wanda", "kind": "unstructured", "realised ratio": 0.0, "target": 0.0, "sparsity": "0.5",
             "ppl wikitext2": 25.0},
            {"method": "magnitude", "kind": "unstructured", "realised ratio": 0.0, "target": 0.0,
             "sparsity": "2:4", "ppl wikitext2": 90.0},
            {"method": "magnitude", "kind": "unstructured", "realised ratio": None, "target": 0.0,
             "sparsity": "4:8", "error": "failed"}]
    fig = plots.compare_ppl(rows, ["wikitext2"], order=["comp", "comp+nm", "magnitude", "wanda"])
    by_name = {t.name: t for t in fig.data if t.name}
    assert list(by_name) == ["original", "comp", "comp+nm 2:4", "wanda", "magnitude"]
    assert list(by_name["comp+nm 2:4"].x) == [0.2]  # a composed line does not start at the original
    assert list(fig.layout.xaxis2.ticktext) == ["0.5", "2:4"]  # patterns by share, failed rows left out
    wanda, magnitude = by_name["wanda"], by_name["magnitude"]
    assert (wanda.xaxis, wanda.mode) == ("x2", "markers") and list(wanda.y) == [25.0, 40.0]
    assert wanda.x[1] < 1 < magnitude.x[0]  # side by side around the 2:4 category
    assert wanda.customdata[1][1] == "38.0%" and wanda.marker.color != magnitude.marker.color
    reference = next(t for t in fig.data if t.xaxis == "x2" and t.mode == "lines")
    assert list(reference.y) == [20.0, 20.0]  # the original's perplexity across the mask panel
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"
    assert "realised ratio" in fig.layout.xaxis.title.text and fig.layout.xaxis2.title.text == "sparsity pattern"
    only_masks = plots.compare_ppl([rows[0], rows[3]], ["wikitext2"])
    assert [t.name for t in only_masks.data if t.name] == ["original", "wanda"]
    assert plots.pattern_order("0.5") < plots.pattern_order("2:4") < plots.pattern_order("4:8") \
        < plots.pattern_order("0.6")


def test_sparsity_bars_and_heatmap():
    fig = plots.sparsity_bars(6, {2: 0.49, 3: 0.48, 4: 0.49}, protected=[0, 1, 5], pattern_share=0.5,
                              layer_params=[100] * 6)
    assert [t.name for t in fig.data] == ["weights zeroed", "left dense", "pattern: 50% of each linear"]
    assert list(fig.data[0].x) == [2, 3, 4] and list(fig.data[1].x) == [0, 1, 5]
    assert fig.data[-1].name == "pattern: 50% of each linear" and list(fig.data[-1].y) == [0.5, 0.5]
    composed = plots.sparsity_bars(4, {0: 0.5, 2: 0.5, 3: 0.5}, removed=[1])
    assert "layer removed" in [t.name for t in composed.data]
    none = plots.sparsity_bars(3, {})
    assert "no masks" in none.layout.annotations[-1].text
    values = np.array([[0.5, 0.5], [np.nan, np.nan], [0.25, 0.75]], dtype=np.float32)
    heat = plots.sparsity_heatmap(values, ["q", "down"], row_notes={1: "removed"})
    assert heat.data[0].type == "heatmap" and list(heat.data[0].x) == ["q", "down"]
    assert (heat.data[0].zmin, heat.data[0].zmax) == (0.0, 1.0)
    assert list(heat.data[0].text[0]) == ["50.0%", "50.0%"] and list(heat.data[0].text[1]) == ["", ""]
    assert "1 · removed" in list(heat.layout.yaxis.ticktext)
    # a pattern that zeroes every dense alike: said once in the title, not "50.0%" in every cell
    same = plots.sparsity_heatmap(np.full((3, 2), 0.5, dtype=np.float32), ["q", "down"])
    assert all(t == "" for row in same.data[0].text for t in row)
    assert "every masked dense is 50.0% zero" in same.layout.title.text


@needs_data
def test_compare_with_ratios_of_the_transformer_blocks(folder):
    """Ratios read as shares of the transformer blocks: each row removes that share of the blocks, and the table
    shows both shares and says which the target was."""
    session = Session()
    outputs = list(compare.run_compare(session, *data_args(folder), ["comp"], "0.3", ["wikitext2"], 2,
                                       compare.DEFAULT_SPARSITIES, None, 4, "blocks", progress=no_progress))
    table = outputs[-1][1]
    row = next(r for r in session.compare_rows if r["method"] == "comp")
    assert row["of blocks"] == pytest.approx(0.3, abs=0.01)  # the share asked for, of the blocks
    assert row["realised ratio"] < row["of blocks"]  # fewer of all: the vocabulary table stays
    assert row["ratio of"] == "blocks" and compare.target_label(row) == "30% of blocks"
    cells = table[table["method"] == "comp"].iloc[0]
    assert cells["target"] == "30% of blocks" and cells["of blocks"].startswith("30.")


def test_every_method_of_a_comparison_has_its_own_colour():
    """comp and shortgpt once shared a colour (registry position modulo the palette); the colours now follow
    the methods of the comparison, so up to len(METHOD_COLORS) methods never share one."""
    from comp_core.methods import method_names

    session = Session()
    methods = [m for m in method_names() if m != "comp"][:12] + ["comp"]
    session.compare_rows = [{"method": m, "key": "k", "eval": "e"} for m in methods]
    order = compare.methods_in(session)
    colours = [plots.method_color(m, order) for m in methods]
    assert len(set(colours)) == len(methods)
    assert order[0] == "comp"  # registry order: COMP keeps the theme's first colour
