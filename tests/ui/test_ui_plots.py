"""ui.plots: pure data -> figure functions (no gradio, no model), including the 30 × 1536 heatmap's cost."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

pytest.importorskip("plotly")

from ui import plots  # noqa: E402


def _names(fig) -> list[str]:
    return [t.name for t in fig.data]


def test_redundancy_curve_marks_protected_and_removed():
    imp = [0.9, 0.3, 0.1, 0.02, 0.12, 0.4]
    fig = plots.redundancy_curve(imp, protected=[0, 1, 5], removed=[3], removal_order=[3, 2],
                                 after={0: 0.8, 1: 0.3, 2: 0.11, 4: 0.13, 5: 0.41})
    assert _names(fig) == ["before removal", "after removing 1", "protected", "removed"]
    removed = fig.data[-1]
    assert list(removed.x) == [3] and list(removed.text) == ["#1"]
    assert fig.layout.xaxis.title.text == "layer"
    assert fig.layout.yaxis.type == "log"  # 0.9 / 0.02 > 30 would squash the small ones on a linear axis


def test_removal_history_one_line_per_step_and_victims():
    history = [{0: 0.5, 1: 0.1, 2: 0.2}, {0: 0.5, 2: 0.25}]
    fig = plots.removal_history(history, [1], n_layers=3, highlight=1)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert len(lines) == 2 and lines[1].line.width > lines[0].line.width
    victims = fig.data[-1]
    assert list(victims.x) == [1] and list(victims.y) == [0.1]


def test_ratio_bars_show_removed_protected_target_and_message():
    fig = plots.ratio_bars(6, {2: 0.3, 4: 0.25}, protected=[0, 1, 5], removed=[3], target=0.2,
                           layer_params=[10] * 6)
    assert _names(fig) == ["neurons pruned", "layer removed", "protected", "target 20% of all parameters"]
    assert list(fig.data[1].y) == [1.0]
    assert list(fig.data[3].y) == [0.2, 0.2]  # the target line, named in the legend: no label over the bars
    assert not fig.layout.annotations
    msg = plots.ratio_bars(6, {}, message="Ratio 95% is impossible with 1 removed layers: " + "x " * 60)
    assert "impossible" in msg.layout.annotations[-1].text and "<br>" in msg.layout.annotations[-1].text


def test_heatmap_30_by_1536_is_fast_and_compact():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(30, 1536)).astype(np.float32)
    scores[[0, 1, 29, 12]] = np.nan  # protected and removed rows
    pruned = rng.random((30, 1536)) < 0.3
    pruned[np.isnan(scores)] = False
    started = time.perf_counter()
    fig = plots.neuron_heatmap(scores, pruned, "down", row_notes={0: "protected", 12: "removed"})
    payload = fig.to_json()
    seconds = time.perf_counter() - started
    assert seconds < 3.0, seconds  # ~0.1 s on a laptop; generous for a busy 2-core CI box
    assert len(payload) < 500_000, len(payload)  # float32 scores + uint8 overlay, base64-encoded
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
    ticks = list(fig.layout.yaxis.ticktext)
    assert "0 · protected" in ticks and "12 · removed" in ticks
    json.loads(payload)


def test_heatmap_sorted_puts_pruned_neurons_first():
    scores = np.array([[3.0, 1.0, 2.0, np.nan]], dtype=np.float32)
    pruned = np.array([[False, True, False, False]])
    fig = plots.neuron_heatmap(scores, pruned, "o", sort=True)
    z = np.asarray(fig.data[0].z, dtype=np.float32)
    overlay = np.asarray(fig.data[1].z)
    assert z[0, :3].tolist() == [1.0, 2.0, 3.0] and np.isnan(z[0, 3])
    assert overlay[0].tolist() == [1, 0, 0, 0]


def test_dense_detail_outlines_every_pruned_neuron():
    scores = np.linspace(-3, 0, 1536, dtype=np.float32)
    pruned = np.zeros(1536, dtype=bool)
    pruned[:400] = True
    fig = plots.dense_detail(scores, pruned, "layer 3 · down")
    outlined = next(t for t in fig.data if t.type == "scatter" and t.marker.symbol == "square-open")
    assert len(outlined.x) == 400
    assert fig.data[0].z.shape[0] * fig.data[0].z.shape[1] >= 1536


def test_ppl_vs_ratio_and_empty_figure():
    runs = [{"run": "original", "realised ratio": 0.0, "ppl wikitext2": 20.0},
            {"run": "R1", "realised ratio": 0.2, "ppl wikitext2": 35.0, "ppl ptb": None},
            {"run": "R2", "realised ratio": 0.3, "ppl wikitext2": float("nan")}]
    fig = plots.ppl_vs_ratio(runs)
    assert _names(fig) == ["wikitext2"] and list(fig.data[0].text) == ["original", "R1"]
    assert fig.layout.yaxis.type == "log"
    empty = plots.ppl_vs_ratio([{"run": "R1", "realised ratio": 0.2}])
    assert not empty.data and "Evaluate" in empty.layout.annotations[0].text


def test_ppl_vs_ratio_shows_mask_runs_apart_from_the_line():
    runs = [{"run": "original", "realised ratio": 0.0, "ppl wikitext2": 20.0},
            {"run": "R1", "kind": "structured", "realised ratio": 0.2, "ppl wikitext2": 35.0},
            {"run": "R2", "kind": "unstructured", "sparsity": "2:4", "realised ratio": 0.0, "ppl wikitext2": 30.0}]
    fig = plots.ppl_vs_ratio(runs)
    assert _names(fig) == ["wikitext2 · masks", "wikitext2"]
    masks, line = fig.data
    assert list(masks.x) == [0.0] and list(masks.text) == ["R2 2:4"] and masks.mode == "markers+text"
    assert list(line.text) == ["original", "R1"]  # the line runs through removals only
    assert plots.is_mask_row(runs[2]) and not plots.is_mask_row(runs[1])


def _distance_matrix(n_layers: int) -> list[list[float]]:
    """D[n-1][l] growing with the span n, NaN where l + n > n_layers, as Plan.layer_distance holds it."""
    return [[0.02 * n + 0.001 * layer if layer + n <= n_layers else math.nan for layer in range(n_layers)]
            for n in range(1, n_layers + 1)]


def test_layer_similarity_figure_maps_spans_and_marks_the_removed_layers():
    fig = plots.layer_similarity_figure(_distance_matrix(6), removed=[3, 4], n_layers=6)
    heat, marks = fig.data
    assert heat.type == "heatmap" and list(heat.x) == list(range(6)) and list(heat.y) == list(range(1, 7))
    z = np.asarray(heat.z, dtype=float)
    assert z.shape == (6, 6) and np.isnan(z[1, 5]) and z[1, 4] == pytest.approx(0.044)  # l=4, n=2: 4 → 6 = L
    assert "low = similar" in heat.colorbar.title.text
    assert heat.text[2][3] == "layers 3→6: input of layer 3 vs output of the last layer, distance 0.063"
    assert heat.text[0][2] == "layers 2→3: input of layer 2 vs input of layer 3, distance 0.022"
    assert heat.text[5][1] == ""  # 1 + 6 > 6: no such span
    assert marks.name == "removed by the plan" and list(marks.x) == [3, 4] and list(marks.y) == [1, 1]
    assert list(marks.customdata) == pytest.approx([0.023, 0.024])
    assert fig.layout.showlegend and fig.layout.xaxis.title.text == "first layer l"
    assert fig.layout.title.text.startswith("How much the hidden state changes")
    json.loads(fig.to_json())  # NaN cells serialise


def test_layer_similarity_figure_takes_the_json_form_and_says_when_there_is_none():
    from_json = [[None if math.isnan(v) else v for v in row] for row in _distance_matrix(4)]
    fig = plots.layer_similarity_figure(from_json, removed=[], n_layers=4)
    assert len(fig.data) == 1 and not fig.layout.showlegend  # nothing removed: no marker, no legend
    assert np.isnan(np.asarray(fig.data[0].z, dtype=float)[3, 1])
    empty = plots.layer_similarity_figure(None, removed=[2], n_layers=4)
    assert not empty.data and "Analyse with COMP" in empty.layout.annotations[0].text
    with pytest.raises(ValueError, match="6 layers has 6×6 values, got 4×4"):
        plots.layer_similarity_figure(from_json, removed=[], n_layers=6)


def _search_record(improved: bool = True):
    from comp_core.results import SearchRecord

    return SearchRecord(layers=[2, 3, 4], one_shot={2: 0.30, 3: 0.25, 4: 0.20}, searched={2: 0.35, 3: 0.20, 4: 0.20},
                        levels=[2, -2, 0], fitness=[0.08, 0.07, 0.065], seconds=[0.1, 1.2, 2.3],
                        start_kl=0.081, final_kl=0.064 if improved else 0.081, improved=improved, unit_params=100,
                        levels_each_side=3, database_mb=120.0, reference_mb=4.0, database_seconds=30.0,
                        search_seconds=60.0, evaluations=40, generations=2, holdout=8, tokens_scored=4096)


def test_search_figure_shows_both_allocations_and_the_fitness_curve():
    fig = plots.search_figure(_search_record(), 7, protected=[0, 1, 6], removed=[5])
    names = _names(fig)
    assert names == ["layer removed whole", plots.SEARCH_RULE, plots.SEARCH_FOUND, "protected", plots.SEARCH_CURVE,
                     f"start: {plots.SEARCH_RULE}"]
    rule, found = fig.data[1], fig.data[2]
    assert list(rule.x) == [2, 3, 4] and list(rule.y) == [0.30, 0.25, 0.20]
    assert list(found.y) == [0.35, 0.20, 0.20] and rule.marker.color != found.marker.color
    assert fig.layout.barmode == "group"
    curve, start = fig.data[4], fig.data[5]
    assert list(curve.x) == [0, 1, 2] and list(curve.y) == [0.08, 0.07, 0.065]
    assert list(curve.customdata) == [0.1, 1.2, 2.3]  # seconds since the start, in the hover
    assert (list(start.x), list(start.y)) == ([0], [0.08])  # the one-shot start, marked
    assert curve.xaxis == "x2" and rule.xaxis == "x"  # two panels
    assert list(fig.data[3].x) == [0, 1, 6]  # the removed layer is shaded, not marked protected
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].x0 == 4.55
    title = fig.layout.title.text  # the decisive figures, on all held-out text
    assert "0.081 → 0.064" in title and "21% closer" in title and "8 held-out texts" in title
    assert plots.SEARCH_KEPT_RULE not in title
    assert "KL to the original" in fig.layout.yaxis2.title.text


def test_search_figure_says_when_the_rules_shares_were_kept():
    fig = plots.search_figure(_search_record(improved=False), 7)
    assert "searched (not kept)" in _names(fig) and "protected" not in _names(fig)
    assert plots.SEARCH_KEPT_RULE in fig.layout.title.text and "KL 0.081" in fig.layout.title.text
    json.loads(fig.to_json())  # serialisable for the browser and the report
