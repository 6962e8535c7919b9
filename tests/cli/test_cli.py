"""The console script end to end on a tiny model folder: JSON keys, realised ratio, clear errors."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from comp_core.cli import main

from tests.helpers import DATA  # noqa: E402
needs_data = pytest.mark.skipif(not (DATA / "wikitext2" / "wiki.test.raw").exists(), reason="no local data sets")


@pytest.fixture(autouse=True)
def data_folder_and_threads_restored(monkeypatch):
    """The data folder for every command here, and torch's thread count back after `--threads` changed it
    (conftest's one_thread still runs: this fixture no longer shadows it)."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("COMP_DATA_DIR", str(DATA))
    yield
    torch.set_num_threads(threads)


def run_json(capsys, *args: str) -> dict:
    code = main([*args, "--json", "--quiet", "--threads", "1"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def test_prune_json_has_the_promised_fields(tiny_folder, capsys):  # shipped text: runs without the data folder
    report = run_json(capsys, "prune", "--model", str(tiny_folder), "--ratio", "0.3", "--remove-layers", "1",
                      "--calib", "sample", "--n-samples", "4", "--seq-len", "32", "--eval", "sample",
                      "--max-windows", "2", "--eval-seq-len", "64")
    for key in ("realised_ratio", "params_before", "params_after", "removed_layers", "layer_ratios", "ppl_before",
                "ppl_after", "seconds", "peak_rss_mb", "timings"):
        assert key in report, key
    assert abs(report["realised_ratio"] - 0.3) < 0.01
    assert report["params_after"] == round(report["params_before"] * (1 - report["realised_ratio"]))
    assert len(report["removed_layers"]) == 1 and report["removed_layers"][0] not in (0, 1, 5)
    assert set(report["layer_ratios"]) == {str(i) for i in range(2, 5)} - {str(report["removed_layers"][0])}
    assert report["ppl_before"]["sample_windows"] == 2
    assert math.isfinite(report["ppl_after"]["sample"]) and report["ppl_after"]["sample"] > 1
    assert report["peak_rss_mb"] > 0 and report["timings"]["prune"]["seconds"] > 0


def test_analyze_does_not_prune_and_reports_scores(tiny_folder, capsys):
    report = run_json(capsys, "analyze", "--model", str(tiny_folder), "--ratio", "0.35", "--remove-layers", "2",
                      "--calib", "sample", "--n-samples", "4", "--seq-len", "32", "--scores",
                      "--dense-kinds", "all")
    assert len(report["removal_order"]) == 2
    assert len(report["importance_history"]) == 3
    assert len(report["initial_importance"]) == 6
    assert abs(report["planned_ratio"] - 0.35) < 0.01
    down = [d for d in report["denses"] if d["kind"] == "down"]
    assert down and all(len(d["scores"]) == 128 for d in down)
    assert all(len(d["pruned_index"]) == d["n_removed"] for d in report["denses"])


@needs_data
def test_eval_command(tiny_folder, capsys):
    report = run_json(capsys, "eval", "--model", str(tiny_folder), "--eval", "wikitext2,ptb", "--max-windows", "1",
                      "--eval-seq-len", "64")
    assert set(report["ppl"]) >= {"wikitext2", "ptb"}
    assert report["params"] > 0


@pytest.mark.parametrize("args, message", [
    (["prune", "--model", "/no/such/folder"], "no such file"),
    (["prune", "--ratio", "1.5"], "ratio"),
    (["prune", "--protect", "0,1,2,3,4,5"], "protected"),
    (["prune", "--ratio", "0.95"], "impossible"),
    (["eval", "--eval", "imagenet"], "unknown evaluation set"),
])
def test_bad_input_gives_a_clear_error(tiny_folder, capsys, args, message):
    if "--model" not in args:
        args = [*args, "--model", str(tiny_folder)]
    args = [*args, "--calib", "sample", "--n-samples", "2", "--seq-len", "16"] if args[0] == "prune" else args
    code = main([*args, "--quiet", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err.lower()
    assert "Traceback" not in err


def test_empty_calibration_file_is_rejected(tiny_folder, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    code = main(["prune", "--model", str(tiny_folder), "--calib", str(empty), "--seq-len", "16", "--quiet",
                 "--threads", "1"])
    assert code == 2
    assert "empty" in capsys.readouterr().err.lower()


def test_prune_out_saves_a_reloadable_model_and_bench_speed_reads_it(tiny_folder, tmp_path, capsys):
    from comp_core import count_parameters, load_pruned

    out = tmp_path / "pruned"
    common = ["--model", str(tiny_folder), "--calib", "sample", "--n-samples", "4", "--seq-len", "32"]
    report = run_json(capsys, "prune", *common, "--ratio", "0.3", "--out", str(out))
    assert report["saved_to"] == str(out) and (out / "comp_report.json").exists()
    model, tokenizer = load_pruned(out)
    assert count_parameters(model) == report["params_after"] and tokenizer is not None
    code = main(["prune", *common, "--out", str(out), "--quiet"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    speed = run_json(capsys, "bench-speed", "--model", str(tiny_folder), "--pruned", str(out), "--repeats", "1",
                     "--decode-tokens", "2")
    assert "speed" in speed and "|" in speed["speed_table"]


def test_a_first_run_ends_with_a_rounded_summary_and_the_next_command(tiny_folder, capsys):
    """No --out, a set shorter than --max-windows: the table is rounded, the short set and the unsaved model
    are said, and the last line is the command that keeps the model."""
    args = ["prune", "--model", str(tiny_folder), "--ratio", "0.3", "--calib", "sample", "--n-samples", "4",
            "--seq-len", "32", "--eval", "sample", "--max-windows", "50", "--eval-seq-len", "256", "--quiet",
            "--threads", "1"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    table = dict(line.split(None, 1) for line in lines if line and not line[0].isupper())
    assert "." in table["seconds"] and len(table["seconds"].split(".")[1]) == 1
    assert table["peak_rss_mb"].replace(",", "").isdigit()
    assert table["realised_ratio"].endswith("%")
    windows = int(table["ppl_before"].split("sample_windows=")[1])
    assert 1 <= windows < 50
    assert any(f"holds {windows} windows of 256 tokens" in line for line in lines if line.startswith("note"))
    assert lines[-3].startswith("Removed 30.") and "parameters" in lines[-3]
    assert lines[-2].startswith(f"Perplexity on sample ({windows} window")
    assert lines[-1] == f"Not saved. Next, to keep it: comp-explorer {' '.join(args)} --out pruned"


def test_a_saved_run_points_at_the_speed_comparison(tiny_folder, tmp_path, capsys):
    out = tmp_path / "kept"
    assert main(["prune", "--model", str(tiny_folder), "--ratio", "0.3", "--calib", "sample", "--n-samples", "4",
                 "--seq-len", "32", "--out", str(out), "--quiet", "--threads", "1"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"Saved to {out}. Next: comp-explorer bench-speed --pruned {out}   (original vs pruned: size, " \
                   "memory, speed)"


def test_prune_and_analyse_a_ratio_of_the_blocks(tiny_folder, capsys):
    """--ratio-of blocks: the method removes 30 % of the blocks' parameters (23.2 % of all in the tiny Llama);
    the JSON, the table and the summary give both shares."""
    common = ["--model", str(tiny_folder), "--ratio", "30%", "--ratio-of", "blocks", "--remove-layers", "0",
              "--calib", "sample", "--n-samples", "4", "--seq-len", "32"]
    report = run_json(capsys, "prune", *common)
    blocks, total = report["block_params_before"], report["params_before"]
    assert (blocks, total) == (221_952, 287_552)
    assert report["config"]["requested"] == {"ratio": 0.3, "ratio_of": "blocks"}
    assert report["config"]["ratio"] == pytest.approx(0.3 * blocks / total)
    assert abs(report["realised_block_ratio"] - 0.3) < 0.01
    assert report["params_before"] - report["params_after"] == blocks - report["block_params_after"]
    plan = run_json(capsys, "analyze", *common)
    assert plan["planned_block_ratio"] == pytest.approx(report["realised_block_ratio"])
    assert plan["config"]["requested"] == {"ratio": 0.3, "ratio_of": "blocks"}
    assert main(["prune", *common, "--quiet", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = dict(line.split(None, 1) for line in lines if line and not line[0].isupper())
    assert table["realised_block_ratio"] == f"{report['realised_block_ratio']:.2%}"
    assert lines[-2].startswith(f"Removed {report['realised_ratio']:.1%} of all parameters "
                                f"({report['realised_block_ratio']:.1%} of the decoder blocks), 0.3 M → 0.2 M, in ")


def test_heal_distils_the_recorded_original_into_a_saved_pruned_model(tiny_folder, tmp_path, capsys):
    """`heal` finds the teacher in the pruned folder's report, trains on the shipped text, saves a folder that
    reloads and records the heal; the perplexity on held text falls."""
    from comp_core import load_pruned

    pruned = tmp_path / "pruned"
    run_json(capsys, "prune", "--model", str(tiny_folder), "--ratio", "0.3", "--calib", "sample", "--n-samples", "4",
             "--seq-len", "32", "--out", str(pruned))
    healed = tmp_path / "healed"
    report = run_json(capsys, "heal", "--model", str(pruned), "--steps", "12", "--full", "--lr", "1e-3",
                      "--calib", "sample", "--n-samples", "8", "--seq-len", "32", "--eval", "sample",
                      "--max-windows", "2", "--eval-seq-len", "64", "--out", str(healed))
    assert report["teacher"] == str(tiny_folder)
    assert report["heal"]["mode"] == "full" and report["heal"]["steps"] == 12
    assert report["calibration"] == {"name": "sample", "n_samples": 8, "seq_len": 32, "seed": 0}
    assert report["ppl_after"]["sample"] < report["ppl_before"]["sample"]
    saved = json.loads((healed / "comp_report.json").read_text())
    assert saved["heal"]["steps"] == 12 and saved["pruning"]["realised_ratio"] == pytest.approx(0.3, abs=0.01)
    assert saved["export"]["source"] == str(tiny_folder)
    model, _ = load_pruned(healed)
    assert sum(p.numel() for p in model.parameters()) == saved["export"]["params"]
    code = main(["heal", "--model", str(tiny_folder), "--quiet", "--threads", "1"])  # no budget
    assert code == 2 and "budget" in capsys.readouterr().err
