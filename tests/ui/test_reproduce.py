"""ui.reproduce: the report's command lines rebuild the GUI's settings through the CLI's own parser."""
from __future__ import annotations

import shlex

import pytest

from comp_core import cli
from comp_core.settings import settings_for
from ui import reproduce


def _round_trip(command: str):
    words = shlex.split(command)
    assert words[:2] == ["comp-explorer", "prune"]
    args = cli.build_parser().parse_args(words[1:])
    return args, cli._settings(args.method, args, args.ratio, args.settings)


@pytest.mark.parametrize("method, chosen", [
    ("comp", dict(ratio=0.3, protected=[0, 1, 7], comp={"score": "diag", "mask_tuning": False,
                                                          "dense_kinds": ("down",), "remove_layers": 2})),
    ("comp", dict(ratio=0.25)),
    ("flap", dict(ratio=0.2)),
    ("wanda", dict(sparsity="2:4")),
    ("comp+nm", dict(ratio=0.15, sparsity="4:8")),
    ("comp", dict(ratio=0.3, values={"allocation": "search", "search_generations": 2})),
    ("wanda", dict(sparsity="0.6", values={"allocation": "search"})),
    ("flap", dict(ratio=0.2, values={"allocation": "search", "search_generations": 7})),
])
def test_the_command_rebuilds_the_same_settings(method, chosen):
    settings = settings_for(method, **chosen)
    command = reproduce.prune_command(method, settings, source="/models/my model", out="runs/R1",
                                      calibration=("wikitext2", 16, 256, 3), eval_sets=["wikitext2", "ptb"])
    args, rebuilt = _round_trip(command)
    assert rebuilt == settings
    assert (args.model, args.calib, args.n_samples, args.seq_len, args.seed) == ("/models/my model", "wikitext2",
                                                                                   16, 256, 3)
    assert args.out == "runs/R1" and args.eval == "wikitext2,ptb"


def test_only_changed_settings_are_written_and_the_bundled_model_needs_no_flag():
    settings = settings_for("comp")
    command = reproduce.prune_command("comp", settings, source="bundled", out="pruned",
                                      calibration=("c4", 64, 512, 0))
    assert "--set" not in command and "--model" not in command and "--ratio" not in command
    assert _round_trip(command)[1] == settings
    assert reproduce.eval_command("pruned", ["wikitext2"]) == "comp-explorer eval --model pruned --eval wikitext2"


def test_a_searched_run_writes_its_allocation_and_budget():
    """The report's command redoes a searched run: allocation=search and the generations, also at the default
    (the budget decides what the search finds, so the command keeps it if the default changes)."""
    for generations in (2, settings_for("comp").search_generations):
        settings = settings_for("comp", ratio=0.25, values={"allocation": "search", "search_generations": generations})
        command = reproduce.prune_command("comp", settings, source="bundled", out="pruned",
                                          calibration=("c4", 64, 512, 0))
        assert "--set allocation=search" in command and f"--set search_generations={generations}" in command
        assert _round_trip(command)[1] == settings
    one_shot = reproduce.prune_command("comp", settings_for("comp", ratio=0.25), source="bundled", out="pruned",
                                       calibration=("c4", 64, 512, 0))
    assert "allocation" not in one_shot and "search_generations" not in one_shot
