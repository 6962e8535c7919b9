"""``compare_methods`` and ``comp-explorer compare`` / ``--method`` on a tiny model folder, with evaluation
text this test writes itself (no shared data needed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from comp_core import data
from comp_core.cli import main
from comp_core.evaluate.compare import compare_methods, rows_table

from tests.tiny_tokenizer import _CORPUS

from tests.helpers import make_calib


@pytest.fixture
def own_data(monkeypatch, tmp_path) -> Path:
    """A data folder in the WikiText-2 layout, filled with the tiny tokenizer's own corpus."""
    folder = tmp_path / "data"
    (folder / "wikitext2").mkdir(parents=True)
    for split in ("test", "train"):
        (folder / "wikitext2" / f"wiki.{split}.raw").write_text((_CORPUS + "\n\n") * 6)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(folder))
    data.clear_token_cache()
    yield folder
    data.clear_token_cache()


def test_compare_methods_rows(own_data, tiny_folder):
    from comp_core import load_model

    loaded = load_model(str(tiny_folder))
    seen = []
    rows = compare_methods(loaded.model, loaded.tokenizer, make_calib(), ["comp", "wanda-sp", "shortgpt"], [0.2, 0.6],
                           ["wikitext2"], max_windows=2, eval_seq_len=64, on_row=seen.append)
    assert seen == rows
    assert [r.method for r in rows] == ["original", "comp", "wanda-sp", "shortgpt"] * 1 + ["comp", "wanda-sp", "shortgpt"]
    original = rows[0]
    assert original.realised_ratio == 0.0 and original.saved_bytes > 0
    for r in rows[1:]:
        if r.error:
            assert r.method == "comp" and r.target_ratio == 0.6 and "impossible" in r.error
            continue
        assert r.realised_ratio == pytest.approx(1 - r.params_after / original.params_after)
        assert r.ppl["wikitext2"] > 0 and r.prune_seconds >= 0 and r.peak_rss_mb > 0
        assert 0 < r.saved_bytes < original.saved_bytes
        assert r.plan is not None and r.plan.method == r.method
    assert rows[4].error  # comp cannot reach 60 % with its caps and protected layers
    table = rows_table(rows, ["wikitext2"])
    assert table.count("\n") == len(rows) + 1 and "error:" in table
    json.dumps([r.to_dict() for r in rows])  # serialisable


def test_compare_runs_a_method_with_its_searched_allocation_as_its_own_row(own_data, tiny_folder):
    from comp_core import load_model

    loaded = load_model(str(tiny_folder))
    rows = compare_methods(loaded.model, loaded.tokenizer, make_calib(), ["wanda-sp+mask", "wanda-sp+mask@search"],
                           [0.2], ["wikitext2"], max_windows=2, eval_seq_len=64, measure_bytes=False,
                           settings={"wanda-sp+mask@search": {"search_generations": 2}})
    one_shot, searched = rows[1], rows[2]
    assert (one_shot.method, searched.method) == ("wanda-sp+mask", "wanda-sp+mask@search")
    assert one_shot.plan.search is None and searched.plan.search.generations == 2
    assert searched.realised_ratio == pytest.approx(0.2, abs=0.01)
    with pytest.raises(ValueError, match="no per-layer levels to search; methods that search: comp"):
        compare_methods(loaded.model, loaded.tokenizer, make_calib(), ["shortgpt@search"], [0.2], ["wikitext2"])


def test_compare_methods_with_a_ratio_of_the_blocks(own_data, tiny_folder):
    from comp_core import count_parameters, load_model
    from comp_core.models.adapters import count_block_parameters

    loaded = load_model(str(tiny_folder))
    total, blocks = count_parameters(loaded.model), count_block_parameters(loaded.model)
    rows = compare_methods(loaded.model, loaded.tokenizer, make_calib(), ["wanda-sp", "shortgpt", "wanda"], [0.3],
                           ["wikitext2"], ratio_of="blocks", max_windows=1, eval_seq_len=64, measure_bytes=False)
    original, wanda_sp, shortgpt, wanda = rows
    assert (original.realised_ratio, original.realised_block_ratio) == (0.0, 0.0)
    assert [(r.target_ratio, r.ratio_of) for r in rows[1:3]] == [(0.3, "blocks")] * 2
    assert abs(wanda_sp.realised_block_ratio - 0.3) < 0.01  # 30 % of the blocks: 23.2 % of all
    assert abs(shortgpt.realised_block_ratio - 0.3) <= 1 / 12 + 1e-9  # whole blocks: within half of one
    for r in (wanda_sp, shortgpt):
        assert r.realised_ratio * total == pytest.approx(r.realised_block_ratio * blocks, abs=1e-6)
    assert wanda.realised_block_ratio == 0.0 and 0.45 < wanda.block_zero_share < 0.5  # half of the linears, not norms
    assert wanda.zero_share == pytest.approx(wanda.block_zero_share * blocks / total)
    table = rows_table(rows, ["wikitext2"])
    assert "| realised of all | realised of blocks |" in table and "zeros of blocks" in table
    assert f"| 30% of blocks | {wanda_sp.realised_ratio:.2%} | {wanda_sp.realised_block_ratio:.2%} |" in table
    assert wanda_sp.to_dict()["realised_block_ratio"] == wanda_sp.realised_block_ratio
    assert wanda_sp.to_dict()["ratio_of"] == "blocks"


def test_compare_rejects_bad_input_before_any_work(own_data, tiny_folder):
    from comp_core import load_model

    loaded = load_model(str(tiny_folder))
    with pytest.raises(ValueError, match="unknown method"):
        compare_methods(loaded.model, loaded.tokenizer, make_calib(), ["comp", "nope"], [0.2], ["wikitext2"])
    with pytest.raises(ValueError, match="ratio must be in"):
        compare_methods(loaded.model, loaded.tokenizer, make_calib(), ["comp"], [1.5], ["wikitext2"])
    with pytest.raises(ValueError, match="ratio_of='layers': a ratio is a share of 'all'"):
        compare_methods(loaded.model, loaded.tokenizer, make_calib(), ["comp"], [0.2], ["wikitext2"], ratio_of="layers")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--quiet", "--threads", "1"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_compare_json(own_data, tiny_folder, capsys):
    code, out, err = run_cli(capsys, "compare", "--model", str(tiny_folder), "--methods", "comp,magnitude-sp",
                             "--ratio", "0.2,0.3", "--calib", "wikitext2", "--n-samples", "4", "--seq-len", "32",
                             "--eval", "wikitext2", "--max-windows", "2", "--eval-seq-len", "64",
                             "--set", "magnitude-sp.compensation=mask", "--json")
    assert code == 0, err
    report = json.loads(out)
    rows = report["rows"]
    assert [(r["method"], r["target_ratio"]) for r in rows] == [
        ("original", 0.0), ("comp", 0.2), ("magnitude-sp", 0.2), ("comp", 0.3), ("magnitude-sp", 0.3)]
    for r in rows:
        for key in ("method", "kind", "realised_ratio", "ppl", "prune_seconds", "peak_rss_mb", "saved_bytes"):
            assert key in r
    assert all(abs(r["realised_ratio"] - r["target_ratio"]) < 0.01 for r in rows[1:])
    assert report["calibration"] == {"name": "wikitext2", "n_samples": 4, "seq_len": 32, "seed": 0}


@pytest.mark.parametrize("args, message", [
    (["compare", "--methods", "comp,nope"], "unknown method 'nope'"),
    (["compare", "--methods", "comp", "--set", "compensation=mask"], "METHOD.KEY=VALUE"),
    (["compare", "--methods", "wanda-sp", "--set", "wanda-sp.tau=3"], "tau: not a setting"),
    (["prune", "--method", "wanda-sp", "--score", "obs"], "--score: COMP settings"),
    (["prune", "--method", "shortgpt", "--set", "n_layers=many"], "n_layers"),
    (["compare", "--ratio", "0.2,x"], "comma-separated numbers"),
    (["compare", "--ratio-of", "layers"], "--ratio-of: invalid choice: 'layers'"),
    (["prune", "--ratio-of", "embedding"], "--ratio-of: invalid choice: 'embedding'"),
])
def test_cli_method_errors_are_clear(own_data, tiny_folder, capsys, args, message):
    try:
        code = main([*args, "--model", str(tiny_folder), "--quiet", "--threads", "1"])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2
    assert message in captured.err
    assert "Traceback" not in captured.err


def test_cli_prune_with_another_method(own_data, tiny_folder, capsys):
    code, out, err = run_cli(capsys, "prune", "--model", str(tiny_folder), "--method", "shortgpt", "--ratio", "0.3",
                             "--calib", "wikitext2", "--n-samples", "4", "--seq-len", "32", "--set", "n_layers=2",
                             "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["method"] == "shortgpt" and report["kind"] == "structured"
    assert len(report["removed_layers"]) == 2
    assert sum(report["removed_per_layer"].values()) == report["params_before"] - report["params_after"]


def test_cli_compare_a_ratio_of_the_blocks(own_data, tiny_folder, capsys):
    code, out, err = run_cli(capsys, "compare", "--model", str(tiny_folder), "--methods", "wanda-sp", "--ratio", "30%",
                             "--ratio-of", "blocks", "--calib", "wikitext2", "--n-samples", "4", "--seq-len", "32",
                             "--eval", "wikitext2", "--max-windows", "1", "--eval-seq-len", "64", "--no-bytes",
                             "--json")
    assert code == 0, err
    report = json.loads(out)
    row = report["rows"][1]
    assert (row["method"], row["target_ratio"], row["ratio_of"]) == ("wanda-sp", 0.3, "blocks")
    assert abs(row["realised_block_ratio"] - 0.3) < 0.01 and row["realised_ratio"] < 0.25  # 23.2 % of all
    assert "| 30% of blocks |" in report["table"]
