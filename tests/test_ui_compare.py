"""Compare tab: handlers (streaming rows, cancel, plan views) on a tiny Llama folder, and its pure figures."""
from __future__ import annotations

import numpy as np
import pytest

gr = pytest.importorskip("gradio")

from test_ui_handlers import HAVE_DATA, data_args, no_progress, save_tiny_llama  # noqa: E402
from ui import plots  # noqa: E402
from ui.session import Session  # noqa: E402
from ui.tabs import compare  # noqa: E402

needs_data = pytest.mark.skipif(not HAVE_DATA, reason="no local data sets (COMP_DATA_DIR)")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-compare")))


def _run(session, folder, methods=("comp-layers", "comp"), ratios="0.2, 0.3", windows=2, on_yield=None):
    outputs = []
    for out in compare.run_compare(session, *data_args(folder), list(methods), ratios, ["wikitext2"], windows,
                                   progress=no_progress):
        outputs.append(out)
        if on_yield is not None:
            on_yield(out)
    return outputs


def test_parse_ratios():
    assert compare.parse_ratios("0.2, 0.3") == [0.2, 0.3]
    assert compare.parse_ratios("20% 30%;0.2") == [0.2, 0.3]
    for bad in ("", "0.2, x", "1.5", "0"):
        with pytest.raises(ValueError):
            compare.parse_ratios(bad)


def test_default_methods_are_registered_structured_ones():
    from comp_core.methods import get_method

    chosen = compare.default_methods()
    assert chosen[0] == "comp" and set(chosen) <= set(compare.PRESELECTED)
    assert all(get_method(m).kind == "structured" for m in chosen)
    assert "comp" in compare.method_summaries()


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
