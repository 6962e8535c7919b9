"""comp_core.settings: one parser for the CLI and the GUI, and comp_core.evaluate.report: one evaluation."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from comp_core import CompConfig, cli
from comp_core.evaluate.report import EvalReport, SpeedSettings, evaluate_model
from comp_core.methods import make_settings
from comp_core.methods.comp import PAPER_SETTINGS
from comp_core.settings import (COMPARE_METHODS, EVAL_SETS, SettingsError, parse_assignment, parse_count, parse_eval_sets,
                                parse_layers, parse_overrides, parse_ratio, parse_ratios, parse_remove_layers,
                                parse_sparsities, parse_sparsity, settings_for, split_per_method)

from tests.helpers import make_tiny_model


# ------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, ratio", [("0.2", 0.2), (0.2, 0.2), ("20%", 0.2), ("50%", 0.5), (" 35 % ", 0.35),
                                         ("0", 0.0)])
def test_a_ratio_is_a_share_or_a_percentage(text, ratio):
    assert parse_ratio(text) == pytest.approx(ratio)


@pytest.mark.parametrize("text", ["1.5", "1", "-0.1", "150%", "nan"])
def test_a_ratio_out_of_range_names_the_range(text):
    with pytest.raises(SettingsError, match=r"out of range.*\[0, 1\)"):
        parse_ratio(text)


def test_a_ratio_that_is_no_number_says_what_to_type():
    with pytest.raises(SettingsError, match="'abc' is not a ratio.*0.2 or 20%"):
        parse_ratio("abc")
    with pytest.raises(SettingsError, match=r"\(0, 1\)"):
        parse_ratio("0", allow_zero=False)
    assert issubclass(SettingsError, ValueError)  # every face already reports ValueErrors


def test_ratio_lists():
    assert parse_ratios("0.1,0.2") == (0.1, 0.2)
    assert parse_ratios("20% 30%;0.2") == (0.2, 0.3)  # duplicates dropped, order kept
    assert parse_ratios(["0.3", 0.1]) == (0.3, 0.1)
    with pytest.raises(SettingsError, match="comma-separated numbers"):
        parse_ratios("0.2,x")
    with pytest.raises(SettingsError, match="one or more ratios"):
        parse_ratios(" ")


def test_sparsity_patterns():
    assert [parse_sparsity(t) for t in ("2:4", " 4 : 8 ", "50%", 0.6, "0.50")] == ["2:4", "4:8", "0.5", "0.6", "0.5"]
    assert parse_sparsities("0.5, 2:4 50%") == ("0.5", "2:4")
    with pytest.raises(SettingsError, match="masks nothing"):
        parse_sparsity("0")
    assert parse_sparsity("0", allow_zero=True) == "0"
    for bad in ("3:2", "half", "1.5", ""):
        with pytest.raises(SettingsError, match="2:4"):
            parse_sparsity(bad)


def test_protected_layers_refuse_what_the_model_lacks():
    assert parse_layers("0,1,29") == (0, 1, 29)
    assert parse_layers([29, "1", 1, 0], n_layers=30) == (0, 1, 29)
    assert parse_layers("-1", n_layers=30) == (-1,)  # from the end, as CompConfig reads it
    with pytest.raises(SettingsError, match="'abc' is not a layer number"):
        parse_layers("0,abc")
    with pytest.raises(SettingsError, match=r"layer 99 does not exist: the model has layers 0\.\.29"):
        parse_layers("0,99", n_layers=30)


def test_other_controls():
    assert [parse_count(v, "Windows") for v in ("8", 8.0, "", None, 0, "-1")] == [8, 8, None, None, None, None]
    with pytest.raises(SettingsError, match="Windows must be a whole number"):
        parse_count("eight", "Windows")
    assert parse_remove_layers("2") == 2 and parse_remove_layers("auto") == "auto"
    with pytest.raises(SettingsError, match=">= 0"):
        parse_remove_layers("-2")
    assert parse_eval_sets("wikitext2,ptb") == ("wikitext2", "ptb") and parse_eval_sets(None) == ()
    with pytest.raises(SettingsError, match="unknown evaluation set 'imagenet'; choose from wikitext2"):
        parse_eval_sets("sample,imagenet")
    assert parse_assignment("refit=never") == ("refit", "never")
    with pytest.raises(SettingsError, match="KEY=VALUE"):
        parse_assignment("refit")
    assert split_per_method(["flap", "comp"], [("flap.compensation", "none")]) == {
        "flap": [("compensation", "none")], "comp": []}
    with pytest.raises(SettingsError, match="METHOD.KEY=VALUE with METHOD one of flap"):
        split_per_method(["flap"], [("compensation", "none")])


def test_key_value_overrides_are_typed_by_the_method():
    assert parse_overrides("comp", [("damp", "0.05"), ("mask_tuning", "off")]) == {"damp": 0.05, "mask_tuning": False}
    with pytest.raises(SettingsError, match="nosuch: not a setting of method 'flap'; its settings are: "):
        parse_overrides("flap", [("nosuch", "1")])


# ------------------------------------------------------------------------------------------- settings


def test_settings_for_is_the_registry_with_the_controls():
    assert settings_for("comp", ratio="30%", paper=True) == make_settings("comp", ratio=0.3, **PAPER_SETTINGS)
    layers = settings_for("comp-layers", ratio=0.25, protected="0,5", comp={"score": "obs"},
                          overrides=[("damp", "0.02")])
    assert layers == make_settings("comp-layers", ratio=0.25, protected=(0, 5), score="obs", damp=0.02)
    assert layers.granularity == "layers"  # the variant's registered default stays
    masks = settings_for("wanda", ratio=0.3, sparsity="50%")
    assert masks == make_settings("wanda", sparsity="0.5") and not hasattr(masks, "ratio")
    assert settings_for("comp+nm", ratio=0.2, sparsity="4:8") == make_settings("comp+nm", ratio=0.2, sparsity="4:8")


def test_settings_for_refuses_what_a_method_does_not_have():
    with pytest.raises(SettingsError, match="--paper is COMP's setting, not one of method 'flap'"):
        settings_for("flap", paper=True)
    with pytest.raises(SettingsError, match="score: COMP settings, not settings of method 'flap'"):
        settings_for("flap", comp={"score": "obs"})
    with pytest.raises(SettingsError, match="unknown importance score 'bogus'"):
        settings_for("comp", comp={"score": "bogus"})
    with pytest.raises(SettingsError, match="out of range"):
        settings_for("magnitude", ratio="1.5")  # checked even for a method without a ratio


# ------------------------------------------------------------------------------------------- both faces


def _cli_settings(*argv: str):
    args = cli.build_parser().parse_args(["prune", *argv])
    return cli._settings(args.method, args, args.ratio, args.settings)


def _gui_settings(method: str, ratio, protected=None, score=None, sparsity=None, session=None):
    from ui import sidebar
    from ui.session import Session

    return sidebar.method_settings(session or Session(), method, ratio, 0, False, protected, score, True,
                                   "identical", None, 4, sparsity)


def test_fifty_percent_means_half_in_both_faces():
    pytest.importorskip("gradio")
    assert _cli_settings("--ratio", "50%").ratio == 0.5
    assert _gui_settings("comp", "50%").ratio == 0.5
    assert _gui_settings("wanda-sp", "50%").ratio == 0.5
    assert _cli_settings("--method", "magnitude", "--sparsity", "50%").sparsity == "0.5"
    assert _gui_settings("magnitude", 0.2, sparsity="50%").sparsity == "0.5"
    args = cli.build_parser().parse_args(["compare", "--ratio", "20%,0.3", "--sparsity", "50%,2:4"])
    assert (parse_ratios(args.ratio), parse_sparsities(args.sparsity)) == ((0.2, 0.3), ("0.5", "2:4"))


def test_the_faces_build_the_same_comp_settings():
    pytest.importorskip("gradio")
    cli_cfg = _cli_settings("--ratio", "0.3", "--remove-layers", "0", "--protect", "0,5", "--score", "obs",
                            "--inputs", "identical")
    gui_cfg = _gui_settings("comp", 0.3, protected=None, score="obs")
    assert type(cli_cfg) is type(gui_cfg) is CompConfig
    assert cli_cfg == settings_for("comp", ratio=0.3, protected=(0, 5), comp=dict(
        remove_layers=0, score="obs", inputs="identical"))
    assert gui_cfg == settings_for("comp", ratio=0.3, comp=dict(
        remove_layers=0, score="obs", inputs="identical", mask_tuning=True, auto_max_layers=4))


def test_the_gui_refuses_layers_the_model_lacks(monkeypatch):
    pytest.importorskip("gradio")
    from ui import common
    from ui.session import Session

    session = Session()
    session.loaded = SimpleNamespace(model=None)
    monkeypatch.setattr(common, "n_layers", lambda _session: 30)
    monkeypatch.setattr(common, "dense_kinds", lambda _session: ["down", "o"])
    assert _gui_settings("comp", 0.2, protected=[29, 0], session=session).protected == (0, 29)
    with pytest.raises(SettingsError, match="'abc' is not a layer number"):
        _gui_settings("comp", 0.2, protected=["abc"], session=session)
    with pytest.raises(SettingsError, match=r"layer 99 does not exist: the model has layers 0\.\.29"):
        _gui_settings("comp", 0.2, protected=[0, 99], session=session)


def test_the_sidebar_default_score_is_the_core_default():
    pytest.importorskip("gradio")
    from ui import sidebar

    assert sidebar.DEFAULT_SCORE == CompConfig().score
    assert _gui_settings("comp", 0.2, score=None).score == CompConfig().score  # no "diag" fallback of its own
    assert _gui_settings("comp", 0.2, score="").score == CompConfig().score


def test_one_list_of_evaluation_sets_and_of_compared_methods():
    pytest.importorskip("gradio")
    from ui import common
    from ui.tabs import compare

    assert cli.EVAL_SETS is EVAL_SETS and common.EVAL_SETS is EVAL_SETS
    assert cli.build_parser().parse_args(["compare"]).methods is COMPARE_METHODS
    assert compare.default_methods() == list(COMPARE_METHODS)


def test_guards_for_imports_that_cannot_fail_are_gone():
    pytest.importorskip("gradio")
    from ui import common
    from ui.tabs import compare, runs

    assert not hasattr(common, "export_available") and not hasattr(common, "speed_available")
    assert not hasattr(compare, "compare_available")
    assert not hasattr(runs, "inspect") and not hasattr(runs, "tokens_per_second")
    assert isinstance(runs.SPEED_SETTINGS, SpeedSettings)


def test_the_cli_dispatches_every_command_through_its_table():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(cli.COMMANDS) == set(commands)
    assert all(callable(handler) for handler in cli.COMMANDS.values())


def test_the_cli_refuses_a_bad_ratio_with_the_range():
    with pytest.raises(SettingsError, match=r"ratio 150% is out of range.*\[0, 1\)"):
        _cli_settings("--ratio", "150%")
    with pytest.raises(SettingsError, match="'abc' is not a ratio"):
        _cli_settings("--method", "magnitude", "--ratio", "abc")
    with pytest.raises(SettingsError, match="--score: COMP settings, not settings of method 'flap'"):
        _cli_settings("--method", "flap", "--score", "obs")


# ------------------------------------------------------------------------------------------- evaluation


def test_evaluate_model_measures_what_is_asked():
    model = make_tiny_model("llama")
    vocab = model.config.vocab_size
    stream = torch.randint(0, vocab, (1, 100), generator=torch.Generator().manual_seed(0))
    events = []
    timings: dict = {}
    report = evaluate_model(model, None, sets=["own"], tokens={"own": stream}, seq_len=32, max_windows=5,
                            speed=SpeedSettings(prefill_tokens=8, decode_tokens=2, batch_sizes=(1,), repeats=1,
                                                measure_memory=False),
                            label="tiny", on_event=events.append, timings=timings)
    assert isinstance(report, EvalReport)
    assert report.windows == {"own": 3} and math.isfinite(report.ppl["own"]) and report.ppl["own"] > 1
    assert report.ppl_dict() == {"own": report.ppl["own"], "own_windows": 3}
    assert report.notes == ["own: its text holds 3 windows of 32 tokens, so 3 were evaluated, not the 5 "
                            "--max-windows asked for"]
    assert report.decode_tokens_per_s == report.speed.decode_tps[1].median > 0
    assert report.accuracy == {} and report.zeroshot is None
    assert {e.stage for e in events} == {"evaluate", "speed"}
    assert {e.metrics.get("set") for e in events if e.stage == "evaluate"} == {"own"}
    assert "eval_tiny_own" in timings and "speed_tiny" in timings
    assert evaluate_model(model, None).ppl == {} and evaluate_model(model, None).speed is None
