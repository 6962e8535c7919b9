"""COMP's measured defaults (issue 15) and what makes them fast: the fewest removed layers, the paper's
setting one flag away, statistics only for the prunable denses (bf16 calibration forwards:
tests/loop/test_capture.py)."""
from __future__ import annotations

import pytest

from comp_core import CompConfig, ImpossibleRatioError, count_parameters, get_adapter, prune
from comp_core.cli import build_parser, main
from comp_core.data import DEFAULT_CALIBRATION, default_calibration_size
from comp_core.methods.comp import PAPER_CALIBRATION, PAPER_SETTINGS, layer_caps
from comp_core.methods.comp.run import fewest_layers

from tests.helpers import make_calib, make_tiny_model


def test_the_defaults_are_the_measured_ones():
    cfg = CompConfig()
    assert (cfg.remove_layers, cfg.refit, cfg.score, cfg.dense_kinds) == ("min", "blend", "activation", ("down", "o"))
    assert DEFAULT_CALIBRATION == (64, 512) and default_calibration_size("c4") == (64, 512)
    assert default_calibration_size("data-free") == PAPER_CALIBRATION == (10, 128)
    # the shipped sample holds ~1,500 tokens: 64 × 512 would repeat it many times over at 25× the cost
    assert default_calibration_size("sample") == default_calibration_size(" Sample") == (10, 128)
    # paired inputs cannot hold out folds: the default compensation falls back, an explicit blend is refused
    assert CompConfig(inputs="paired").refit == "auto"
    with pytest.raises(ValueError, match="blend"):
        CompConfig(inputs="paired", refit="blend")


def test_fewest_layers_closes_the_gap_the_caps_leave():
    blocks = [100] * 6
    caps = [0.5] * 6
    candidates = [2, 3, 4]  # 150 parameters prunable at the caps
    total = 1000
    assert fewest_layers(0.10, total, blocks, caps, candidates, candidates) == 0  # 100 ≤ 150
    assert fewest_layers(0.15, total, blocks, caps, candidates, candidates) == 0  # exactly at the caps
    # 200 to remove: one removal takes 100 off the budget and 50 off the capacity: 100 ≤ 100
    assert fewest_layers(0.20, total, blocks, caps, candidates, candidates) == 1
    assert fewest_layers(0.25, total, blocks, caps, candidates, candidates) == 2
    assert fewest_layers(0.9, total, blocks, caps, candidates, candidates) == 3  # never more than exist
    assert fewest_layers(0.2, total, blocks, caps, [], []) == 0


def test_min_removes_a_layer_only_where_neuron_pruning_cannot_reach_the_ratio():
    model = make_tiny_model("llama")
    calib = make_calib()
    caps = layer_caps(model, CompConfig())
    blocks = [sum(p.numel() for p in b.parameters()) for b in get_adapter(model).blocks(model)]
    candidates = [2, 3, 4]
    reachable = sum(caps[i] * blocks[i] for i in candidates) / count_parameters(model)
    low, high = 0.5 * reachable, min(reachable + 0.05, 0.5)
    _, light = prune(model, calib, CompConfig(ratio=low))
    assert light.plan.removed_layers == [] and abs(light.realised_ratio - low) < 0.01
    with pytest.raises(ImpossibleRatioError):
        prune(model, calib, CompConfig(ratio=high, remove_layers=0))
    _, heavy = prune(model, calib, CompConfig(ratio=high))
    assert len(heavy.plan.removed_layers) >= 1 and abs(heavy.realised_ratio - high) < 0.01


def test_paper_flag_sets_the_papers_setting_and_budget(tiny_folder, tmp_path, capsys):
    import json

    folder = tiny_folder
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and more text number {i}." for i in range(3000)))
    args = ["prune", "--model", str(folder), "--calib", str(text), "--ratio", "0.2", "--json", "--quiet",
            "--threads", "1"]
    assert main([*args, "--paper"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {k: report["config"][k] for k in PAPER_SETTINGS} == PAPER_SETTINGS
    assert report["calibration"] == {"name": str(text), "n_samples": 10, "seq_len": 128, "seed": 0}
    assert len(report["removed_layers"]) == 1
    assert main([*args, "--paper", "--remove-layers", "0", "--n-samples", "4", "--seq-len", "32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["remove_layers"] == 0 and report["config"]["refit"] == "never"  # flags beside win
    assert (report["calibration"]["n_samples"], report["calibration"]["seq_len"]) == (4, 32)
    parsed = build_parser().parse_args(["prune"])
    assert parsed.n_samples is None and parsed.seq_len is None and parsed.paper is False
    assert main(["prune", "--method", "wanda-sp", "--paper", "--model", str(folder)]) == 2
    assert "--paper is COMP's setting" in capsys.readouterr().err


def test_plan_reports_and_measures_only_the_prunable_denses():
    model = make_tiny_model("llama")
    _, result = prune(model, make_calib(), CompConfig(ratio=0.15, dense_kinds=("down",)))
    assert {d.kind for d in result.plan.dense_reports} == {"down"}
    assert all(d.n_removed > 0 for d in result.plan.dense_reports)
    assert abs(result.realised_ratio - 0.15) < 0.01


