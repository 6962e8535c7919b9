"""ui.report: the summary card a non-expert reads and the one-page self-contained HTML report.

The card and the report are pure (a RunSummary in, HTML out); the numbers asserted here are the summary's, formatted
as a reader sees them. The browser test opens the written report from disk in Debian's chromium (skipped without
playwright or chromium, like tests/ui/test_ui_browser.py) and writes a screenshot to /tmp/report-page.png.
"""
from __future__ import annotations

import errno
import html
import os
import platform
import re
import shutil
from datetime import datetime

import pytest

pytest.importorskip("plotly")

from comp_core import CompConfig, prune  # noqa: E402
from comp_core.methods import prune_with  # noqa: E402
from tests.helpers import make_calib, make_tiny_model  # noqa: E402
from ui import plots  # noqa: E402
from ui import report as rp  # noqa: E402

CHROMIUM = os.environ.get("COMP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync"]
SETTINGS = {"ratio": 0.2, "score": "comp", "mask_tuning": True, "protected": [0, 1, 29], "remove_layers": "auto"}
COMMANDS = ['comp-explorer prune --model HuggingFaceTB/SmolLM2-135M --method comp --ratio 20% '
            '--calib wikitext2 --set "protected=0,1,29" --out pruned-R2',
            "comp-explorer eval --model pruned-R2 --eval wikitext2"]
VERSIONS = {"python": "3.12.3", "torch": "2.13.0", "transformers": "5.25.0", "gradio": "6.31.0",
            "comp-explorer": "0.1.0"}


def structured(**changes) -> rp.RunSummary:
    """COMP at 20 % on the bundled model, evaluated, with one answer before and after."""
    values = dict(
        model="SmolLM2-135M", method="comp",
        method_summary="COMP: iterative layer removal + input-neuron pruning with mask tuning (hybrid)",
        kind="structured", run_id="R2", params_before=134_515_008, params_after=107_612_006,
        weights_mb_before=538.1, weights_mb_after=430.6, removed_share=0.2, block_removed_share=0.27,
        ppl_before={"WikiText-2": 32.94, "PTB": 51.2}, ppl_after={"WikiText-2": 58.62, "PTB": 90.4},
        tokens_per_s_before=41.2, tokens_per_s_after=53.6,
        answers=rp.Answers("Explain in two sentences why the sky is blue.",
                           "Sunlight scatters off air molecules; blue light scatters most.",
                           "The sky is blue because of the sun and the air."),
        removed_layers=[3, 7, 12, 20], n_layers=30, calibration="wikitext2 128×512 s0", settings=dict(SETTINGS),
        prune_seconds=41.7, pruned_at=datetime(2025, 3, 1, 10, 15), evaluated_at=datetime(2025, 3, 1, 10, 18))
    values.update(changes)
    return rp.RunSummary(**values)


def masked() -> rp.RunSummary:
    return structured(method="sparsegpt", method_summary="SparseGPT: OBS one weight at a time with lazy batch updates",
                      kind="unstructured", params_after=134_515_008, weights_mb_after=538.1, removed_share=0.0,
                      block_removed_share=0.0, removed_layers=[], sparsity_pattern="2:4", linear_sparsity=0.5,
                      zero_share=0.3851, tokens_per_s_after=40.9, ppl_after={"WikiText-2": 40.3})


def figures() -> dict:
    runs = [{"run": "original", "realised ratio": 0.0, "ppl wikitext2": 32.94, "kind": ""},
            {"run": "R1", "realised ratio": 0.1, "ppl wikitext2": 38.0, "kind": "structured"},
            {"run": "R2", "realised ratio": 0.2, "ppl wikitext2": 58.62, "kind": "structured"}]
    layer_params = [3_500_000] * 30
    gone = (3, 7, 12, 20)
    removed = {i: layer_params[i] for i in gone} | {i: 700_000 for i in range(2, 29) if i not in gone}
    return {
        "Quality against how much was removed": plots.ppl_vs_ratio(runs, ["wikitext2"]),
        "Where the parameters were removed": plots.removed_share_bars(30, removed, layer_params, [3, 7, 12, 20],
                                                                      [0, 1, 29]),
        "How much each block is needed": plots.redundancy_curve([0.9 - i * 0.02 for i in range(30)], [0, 1, 29],
                                                                [3, 7, 12, 20], [3, 7, 12, 20]),
    }


def rows() -> list[dict]:
    def row(i: int) -> dict:
        if i in (3, 7, 12, 20):
            return {"layer": i, "importance": 0.9 - i * 0.02, "ratio": 1.0, "removed": "whole block"}
        if i in (0, 1, 29):
            return {"layer": i, "importance": 0.9 - i * 0.02, "ratio": 0.0, "removed": "nothing (protected)"}
        return {"layer": i, "importance": 0.9 - i * 0.02, "ratio": 0.2, "removed": 700_000}
    return [row(i) for i in range(30)]


def page(s: rp.RunSummary | None = None, figs: dict | None = None) -> str:
    return rp.report_html(s or structured(), figures() if figs is None else figs, plan_rows=rows(), versions=VERSIONS,
                          commands=COMMANDS, generated_at=datetime(2025, 3, 1, 11, 0))


def text(markup: str) -> str:
    """The words of a piece of HTML (tags dropped, entities decoded, spaces collapsed)."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<style>.*?</style>|<[^>]+>", " ", markup, flags=re.S)))


# ------------------------------------------------------------------------------------------------ card


def test_a_structured_run_card_shows_both_shares_sizes_and_quality_in_words():
    card = rp.summary_card_html(structured())
    words = text(card)
    assert "20% fewer parameters" in words
    assert "27% of the transformer blocks' parameters" in words
    assert "134.5 M → 107.6 M parameters" in words
    assert "538 MB → 431 MB" in words and "−20%" in words
    assert "perplexity 32.9 → 58.6" in words
    assert "+78%: noticeably worse" in words and "lower is better" in words
    assert "noticeably less sure of the next word" in words
    assert "PTB 51.2 → 90.4" in words  # the other set, in small print
    assert "1.3× tokens/s" in words and "41.2 → 53.6" in words
    assert "4 of 30 blocks removed whole (layers 3, 7, 12, 20)" in words
    assert rp.PERPLEXITY_HELP in words and f"title='{rp.PERPLEXITY_HELP}'" in card
    assert "Original" in words and "The sky is blue because of the sun and the air." in words
    assert "R2 · SmolLM2-135M pruned with comp" in words and "mask tuning (hybrid)" in words
    assert "<style>" in card and ".cx-card " in card  # self-contained


def test_the_card_without_a_block_share_still_reads():
    words = text(rp.summary_card_html(structured(block_removed_share=None, answers=None, tokens_per_s_after=None)))
    assert "20% fewer parameters" in words and "transformer blocks' parameters" not in words
    assert "One answer" not in words and "Speed not measured" in words


def test_before_evaluation_the_card_says_to_evaluate():
    words = text(rp.summary_card_html(structured(ppl_before={}, ppl_after={}, tokens_per_s_before=None,
                                                 tokens_per_s_after=None)))
    assert "not evaluated yet — press Evaluate" in words
    assert "Quality is not known yet" in words and "perplexity 32.9" not in words
    assert "20% fewer parameters" in words  # the size is known without evaluating


def test_the_original_evaluated_alone_is_not_a_comparison():
    words = text(rp.summary_card_html(structured(ppl_after={})))
    assert "not evaluated yet — press Evaluate" in words


def test_a_mask_run_card_says_nothing_was_removed_and_shows_the_sparsity():
    words = text(rp.summary_card_html(masked()))
    assert "Nothing removed" in words and "fewer parameters" not in words
    assert "Weights set to zero in a 2:4 pattern (2 of every 4 weights)" in words
    assert "50% of the pruned layers' weights are zero" in words and "39% of all parameters are zero" in words
    assert "134.5 M parameters, the zeros included" in words
    assert "538 MB → 538 MB" in words
    assert "same size on disk unless it is stored in a sparse format" in words
    assert "R2 · SmolLM2-135M masked with sparsegpt" in words
    assert "perplexity 32.9 → 40.3" in words and "+22%: somewhat worse" in words
    assert "1.0× tokens/s" in words and "about the same speed (zeros are still computed)" in words


def test_a_composed_run_shows_the_removal_and_the_masks():
    words = text(rp.summary_card_html(structured(kind="composed", sparsity_pattern="2:4", linear_sparsity=0.5)))
    assert "20% fewer parameters" in words
    assert "then weights set to zero in a 2:4 pattern" in words and "unless stored sparse" in words
    unstructured = text(rp.summary_card_html(structured(kind="unstructured", sparsity_pattern="0.5")))
    assert "Weights set to zero anywhere in each pruned layer (unstructured, 50%)" in unstructured


MUCH_WORSE = "much worse — try a lower ratio or healing"


@pytest.mark.parametrize("after, band", [(8.0, "better"), (10.5, "nearly unchanged"), (13.0, "somewhat worse"),
                                         (20.0, "noticeably worse"), (30.0, MUCH_WORSE), (float("inf"), MUCH_WORSE)])
def test_perplexity_bands(after, band):
    assert rp.ppl_band(10.0, after)[1] == band


def test_every_user_string_is_escaped():
    attack = "<script>alert(1)</script>"
    s = structured(model=f"/models/{attack}", calibration=f"file {attack}", method_summary=attack,
                   answers=rp.Answers(attack, f"a & {attack}", f"<img src=x onerror=alert(2)>"),
                   settings={attack: attack})
    card = rp.summary_card_html(s)
    report = page(s, figs={})
    for markup in (card, report):
        assert attack not in markup and "<img src=x" not in markup
        assert html.escape(attack) in markup
    assert "a &amp; &lt;script&gt;" in card


# ---------------------------------------------------------------------------------------------- report


def test_the_report_inlines_plotly_once_and_draws_every_figure():
    figs = figures()
    report = page(figs=figs)
    assert report.count("Plotly.newPlot") == len(figs) == 3
    assert report.count("* plotly.js v") == 1  # the library's banner: inlined once
    for n in range(len(figs)):
        assert f'id="cx-plot-{n}"' in report
    for caption in figs:
        assert caption in report
    assert '"displaylogo": false' in report  # no "Produced with Plotly" link in the modebar


def test_the_report_fetches_nothing_from_outside():
    report = page()
    assert rp.external_references(report) == []
    assert not re.search(r"<script[^>]*\bsrc=", report, re.I)
    assert not re.search(r"<link\b", report, re.I)
    assert "fonts.googleapis" not in report and "cdn.plot.ly/plotly" not in report
    assert "@font-face" not in report


def test_external_references_sees_tags_and_css_but_not_script_text():
    outside = ("<script src='https://cdn.plot.ly/plotly.js'></script><link rel=stylesheet href=//fonts.x/a.css>"
               "<style>@import 'http://x/y.css'; .a{background:url(https://x/z.png)}</style>"
               "<div style=\"background: url('http://x/w.png')\"></div>")
    assert rp.external_references(outside) == ["https://cdn.plot.ly/plotly.js", "//fonts.x/a.css", "http://x/y.css",
                                               "https://x/z.png", "http://x/w.png"]
    inside = ("<script>var a = '<a href=\"https://plotly.com/\">';</script><p>https://example.com</p>"
              "<a href='#plan'>p</a>")
    assert rp.external_references(inside) == []
    # a model path that looks like an address is text, not a fetch
    assert rp.external_references(page(structured(model="https://huggingface.co/x"), figs={})) == []


def test_a_figure_that_would_fetch_an_image_is_refused():
    fig = plots.empty_figure("x")
    fig.add_layout_image(source="https://example.com/logo.png", x=0, y=0)
    with pytest.raises(rp.ReportError, match="would not open offline"):
        page(figs={"logo": fig})


def test_the_report_holds_the_card_plan_settings_versions_and_commands():
    report = page()
    words = text(report)
    assert "<title>SmolLM2-135M pruned with comp (R2)</title>" in report
    assert "Report made on 2025-03-01 at 11:00 with comp-explorer 0.1.0" in words
    assert "perplexity 32.9 → 58.6" in words and "20% fewer parameters" in words
    for name, value in SETTINGS.items():
        assert f"<code>{name}</code>" in report
    assert "0, 1, 29" in words and "auto" in words
    for name, version in VERSIONS.items():
        assert f"<td>{name}</td><td>{version}</td>" in report
    for command in COMMANDS:
        assert html.escape(command) in report
    assert "<pre class='cx-report-commands'>" in report
    assert "Layer" in words and "Importance" in words and "whole block" in words and "700,000 parameters" in words
    assert report.count("cx-report-gone") == 4 + 1  # the four removed blocks (and the CSS rule)
    assert "seconds to prune 41.7" in words and "pruned at 2025-03-01 10:15" in words
    assert "calibration data wikitext2 128×512 s0" in words
    assert "@media print" in report and "@page" in report


def test_a_report_without_plots_plan_or_commands_still_reads():
    report = rp.report_html(structured(settings={}), {}, plan_rows=None, versions={}, commands=[])
    words = text(report)
    assert "Plotly" not in report and "The plan" not in words and "Reproduce" not in words
    assert "The method's defaults." in words and "with comp-explorer" not in words


def test_plan_rows_from_real_plans():
    model, calib = make_tiny_model("llama"), make_calib()
    _, result = prune(model, calib, CompConfig(ratio=0.3, remove_layers=1))
    plan = result.plan
    got = rp.plan_table_rows(plan)
    assert [r["layer"] for r in got] == list(range(plan.n_layers))
    assert set(got[0]) == {"layer", "importance", "ratio", "removed"}
    for i in plan.removed_layers:
        assert got[i]["removed"] == "whole block" and got[i]["ratio"] == 1.0
    for i, n in plan.removed_per_layer.items():
        if i not in plan.removed_layers:
            assert got[i]["removed"] == f"{n:,} parameters"
            assert got[i]["ratio"] == pytest.approx(n / plan.layer_params[i])
    share = result.realised_block_ratio  # what the card shows beside the share of all
    assert share == pytest.approx(sum(plan.removed_per_layer.values()) / sum(plan.layer_params))
    assert share > result.realised_ratio  # the embeddings are kept, so the blocks lose a larger share

    _, masks = prune_with("magnitude", make_tiny_model("llama"), None, sparsity="2:4")
    got = rp.plan_table_rows(masks.plan)
    assert all(r["removed"] == "nothing (weights set to zero)" for r in got)
    assert all(r["ratio"] == pytest.approx(0.5, abs=0.05) for r in got)
    assert masks.realised_block_ratio == 0.0


def test_summary_from_the_runs_table_rows():
    original = {"run": "original", "model": "SmolLM2-135M", "method": "", "kind": "", "params": 134_515_008,
                "weights MB": 538.1, "ppl wikitext2": 32.94, "ppl ptb": None, "tokens/s": 41.2, "realised ratio": 0.0}
    run = {"run": "R2", "model": "SmolLM2-135M", "method": "comp", "kind": "structured", "realised ratio": 0.2,
           "params": 107_612_006, "weights MB": 430.6, "ppl wikitext2": 58.62, "ppl ptb": None, "tokens/s": 53.6,
           "removed layers": "3,7,12,20", "calibration": "wikitext2 128×512 s0", "sparsity": "",
           "zeros of all params": None, "zeros in linears": None, "prune s": 41.7, "target": 0.2}
    s = rp.summary_from_rows(original, run, method_summary="COMP: …", block_removed_share=0.27, n_layers=30,
                             settings=SETTINGS, eval_labels={"wikitext2": "WikiText-2"})
    assert (s.run_id, s.method, s.kind, s.removed_share, s.removed_layers) == ("R2", "comp", "structured", 0.2,
                                                                                [3, 7, 12, 20])
    assert s.ppl_before == {"WikiText-2": 32.94} and s.ppl_after == {"WikiText-2": 58.62}
    assert (s.params_before, s.params_after, s.weights_mb_before, s.tokens_per_s_after) == (134_515_008, 107_612_006,
                                                                                             538.1, 53.6)
    assert "perplexity 32.9 → 58.6" in text(rp.summary_card_html(s))
    none = rp.summary_from_rows(original, {**run, "removed layers": "none"})
    assert none.removed_layers == [] and none.ppl_before == {"wikitext2": 32.94}


def test_software_versions(monkeypatch):
    found = rp.software_versions()
    assert list(found) == ["python", "torch", "transformers", "gradio", "comp-explorer"]
    assert found["python"] == platform.python_version() and found["torch"][0].isdigit()
    real = rp.importlib.metadata.version

    def version(name):
        if name == "gradio":
            raise rp.importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(rp.importlib.metadata, "version", version)
    assert rp.software_versions()["gradio"] == "not installed"


# ----------------------------------------------------------------------------------------------- write


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_report_creates_the_folders_and_writes_the_page(tmp_path):
    target = tmp_path / "reports" / "2025" / "R2.html"
    got = rp.write_report(str(target), "<p>ünïcode ✓</p>")
    assert got == target and target.read_text(encoding="utf-8") == "<p>ünïcode ✓</p>"
    assert _leftovers(target.parent) == []
    rp.write_report(target, "<p>second</p>")  # an existing report is replaced whole
    assert target.read_text(encoding="utf-8") == "<p>second</p>"


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rp.os, "replace", full)
    target = tmp_path / "R2.html"
    with pytest.raises(rp.ReportWriteError, match="Could not write the report to .*No space left.*nothing was changed"):
        rp.write_report(target, page(figs={}))
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_a_failed_write_does_not_clobber_an_existing_report(tmp_path, monkeypatch):
    target = tmp_path / "R2.html"
    target.write_text("the report sent yesterday", encoding="utf-8")

    def full(_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rp.os, "fsync", full)  # the disk fills while the new copy is written
    with pytest.raises(rp.ReportWriteError):
        rp.write_report(target, page(figs={}))
    assert target.read_text(encoding="utf-8") == "the report sent yesterday"
    assert _leftovers(tmp_path) == []


def test_an_unwritable_place_gives_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(rp.ReportWriteError, match="Could not create the folder .*not-a-folder.* choose a folder"):
        rp.write_report(blocker / "R2.html", "<p>x</p>")
    with pytest.raises(rp.ReportWriteError, match="is a folder; give the report a file name"):
        rp.write_report(tmp_path, "<p>x</p>")
    assert issubclass(rp.ReportWriteError, Exception) and blocker.read_text() == "a file where the folder should be"


# --------------------------------------------------------------------------------------------- browser


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")
def test_the_written_report_renders_offline_in_a_browser(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    figs = figures()
    target = rp.write_report(tmp_path / "report" / "R2.html", page(figs=figs))
    outside: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            view = browser.new_page(viewport={"width": 1440, "height": 900})
            view.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("file:", "data:", "blob:",
                                                                                        "about:")) else None)
            errors: list[str] = []
            view.on("pageerror", lambda err: errors.append(str(err)))
            view.goto(target.as_uri())
            for n in range(len(figs)):
                view.wait_for_selector(f"#cx-plot-{n} svg.main-svg", timeout=30_000)
                assert view.locator(f"#cx-plot-{n} svg.main-svg").count() >= 1
                assert view.locator(f"#cx-plot-{n} .plot path, #cx-plot-{n} .point").count() > 0  # traces drawn
            assert view.get_by_text("20% fewer parameters").is_visible()
            assert view.get_by_text("perplexity 32.9 → 58.6").is_visible()
            assert view.get_by_text("+78%: noticeably worse").is_visible()
            view.screenshot(path=str(tmp_path / "report-page.png"), full_page=True)
            view.screenshot(path="/tmp/report-page.png", full_page=True)
        finally:
            browser.close()
    assert errors == [] and outside == []
