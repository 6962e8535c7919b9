"""End to end in a real browser: ``launch.py`` on a free port, driven by Playwright with Debian's chromium.

tiny Llama folder → bad model shows a message → Analyse → plots rendered → instant what-if → Prune (measured
again: the ratio moved) → Evaluate → the results table has a row; then the Compare tab: two methods, two ratios,
two windows, plus one mask method (magnitude) at 2:4 → rows streamed into the table, the perplexity plot (masks
in their own panel), the mask row's sparsity views and one structured method's layer/neuron views rendered.
Screenshots go to the test's tmp dir (printed with ``-s``; the Compare tab also to /tmp/compare_tab.png, its mask
views to /tmp/compare_masks.png). Last, searched layer shares: the sidebar's Layer shares controls, and
plot-search after a searched COMP prune of 2 generations (/tmp/search_prune.png).
Skipped when playwright, chromium or the local data sets are missing (CI installs chromium: see .ci/run).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("gradio")

from tests.ui.test_ui_handlers import DATA, HAVE_DATA, save_tiny_llama  # noqa: E402

from tests.helpers import ROOT  # noqa: E402
CHROMIUM = os.environ.get("COMP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync"]
STARTUP_S = 180  # importing gradio + transformers on a busy 2-core box

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)"),
    pytest.mark.skipif(not HAVE_DATA, reason="no local data sets (COMP_DATA_DIR)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    folder = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-browser"))
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "COMP_DATA_DIR": str(DATA), "GRADIO_ANALYTICS_ENABLED": "False",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--model", str(folder),
                                 "--calib", "wikitext2", "--port", str(port), "--threads", "1",
                                 "--export-folder", str(tmp_path_factory.mktemp("export") / "pruned")],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"launch.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not start in {STARTUP_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, str(folder), log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        yield browser
        browser.close()


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _traces(page, plot_id: str, selector: str) -> int:
    return page.locator(f"#{plot_id} .js-plotly-plot {selector}").count()


def _open(browser, url: str, width: int = 1366, height: int = 768):
    """A page of the app, loaded (``wait_until="load"``: Gradio keeps a connection open, so "networkidle"
    never comes), with its page errors collected in the returned list."""
    page = browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url, wait_until="load")
    page.wait_for_selector("#btn-analyse", timeout=60_000)
    return page, errors


def test_analyse_prune_evaluate_in_a_browser(app_url, browser, tmp_path):
    url, folder, log_path = app_url
    page, errors = _open(browser, url)
    assert "COMP Explorer" in page.title()
    source = page.locator("#model-source").locator("textarea, input").first
    assert source.input_value() == folder  # preselected by --model: nothing to type

    # a bad choice: a clear message in the page, no traceback
    source.fill(str(tmp_path / "no-such-model"))
    page.click("#btn-load")
    page.wait_for_selector("#model-card >> text=No such file or folder", timeout=60_000)
    assert "Traceback" not in page.content()
    source.fill(folder)  # a corrected path: the card no longer shows the old path's error
    page.wait_for_selector("#model-card >> text=No model loaded yet", timeout=30_000)
    assert "No such file" not in page.locator("#model-card").inner_text()

    # analyse (the tiny model: one removed layer, 30 %)
    _set_number(page, "n-remove", 1)
    _set_number(page, "ratio", 0.3)
    started = time.perf_counter()
    page.click("#btn-analyse")
    page.wait_for_selector("#analysis-status >> text=Analysed in", timeout=120_000)
    timings = {"analyse": time.perf_counter() - started}
    page.wait_for_function("document.querySelectorAll('#plot-heatmap .js-plotly-plot .heatmaplayer image').length > 0",
                           timeout=30_000)
    assert _traces(page, "plot-curve", ".scatterlayer .trace") >= 3  # curve, after-removal, protected, removed
    assert _traces(page, "plot-bars", ".barlayer .trace") >= 2  # pruned neurons + the removed layer
    assert _traces(page, "plot-history", ".scatterlayer .trace") >= 2
    assert page.locator("#plot-detail .js-plotly-plot").count() == 1
    # the layer-similarity matrix (input of layer l against input of layer l + n), from the same analysis
    page.wait_for_function("document.querySelectorAll('#plot-similarity .heatmaplayer image').length > 0",
                           timeout=30_000)
    # the neuron map is the readable, sorted view by default
    assert page.locator("#plot-heatmap .xtitle", has_text="sorted by score").count() == 1
    page.screenshot(path=str(tmp_path / "1-analysed.png"))

    # a typed ratio beyond the slider's range: box and slider back in step, and a line that says why
    _set_number(page, "ratio", 0.99)
    page.wait_for_selector("#ratio-warning >> text=beyond the highest target", timeout=30_000)
    assert page.locator("#ratio input[type=number]").input_value() == "0.8"
    _set_number(page, "ratio", 0.3)
    page.wait_for_function("!document.querySelector('#ratio-warning').innerText.trim()", timeout=30_000)

    # protected layers typed by hand: what is not a layer number of this model is named and left out
    chips = page.locator("#protected .token").count()
    for typed, why in (("abc", "is not a layer number"), ("99", "does not exist")):
        box = page.locator("#protected input").first
        box.fill(typed)
        box.press("Enter")
        page.wait_for_selector(f"#protected-note >> text={why}", timeout=30_000)
        page.wait_for_function(f"document.querySelectorAll('#protected .token').length === {chips}", timeout=30_000)

    # a what-if past the measured removal order: the neuron map says it shows the analysed plan, and a button
    # measures the order further on demand
    _set_number(page, "n-remove", 2)
    page.wait_for_selector("#btn-deeper:visible", timeout=30_000)
    assert "measure it to 2" in page.locator("#plan-summary").inner_text()
    page.click("#btn-deeper")
    page.wait_for_selector("#btn-deeper", state="hidden", timeout=120_000)
    page.wait_for_selector("#plot-heatmap >> text=the plan above differs", timeout=30_000)
    assert "layers" in page.locator("#plan-summary").inner_text()
    _set_number(page, "n-remove", 1)
    page.wait_for_function("!document.querySelector('#plot-heatmap').innerText.includes('the plan above differs')",
                           timeout=30_000)

    # what-if: the bars follow the ratio slider without pruning anything
    _set_number(page, "ratio", 0.25)
    page.wait_for_selector("#plot-bars >> text=target 25%", timeout=30_000)
    assert "25.0%" in page.locator("#plan-summary").inner_text()

    # prune (switches to the runs tab) and evaluate
    started = time.perf_counter()
    page.click("#btn-prune")
    page.wait_for_selector("#prune-status >> text=fewer parameters", timeout=120_000)
    timings["prune"] = time.perf_counter() - started
    status = page.locator("#prune-status")
    assert "R1:" in status.inner_text()
    # the library's words (path, autocast, compensation) sit in a collapsed "details" section
    assert "measured and pruned (changed since Analyse: target ratio)" not in status.inner_text()
    assert "measured and pruned (changed since Analyse: target ratio)" in status.text_content()
    # the summary card, in plain words, before any evaluation
    card = page.locator("#summary-card")
    assert "fewer parameters" in card.inner_text() and "Evaluate" in card.inner_text()
    started = time.perf_counter()
    page.click("#btn-evaluate")
    page.wait_for_selector("#eval-status >> text=Evaluated in", timeout=120_000)
    timings["evaluate"] = time.perf_counter() - started
    table = page.locator("#results-table")
    page.wait_for_selector("#results-table >> text=R1", timeout=30_000)
    assert table.locator("[role=grid]").get_attribute("aria-rowcount") == "3"  # header, original, R1
    run_row = table.locator("[role=row]", has_text="R1").first.inner_text()
    assert "25" in run_row  # the realised ratio column (25.0x %)
    cells = table.locator("[role=row]", has_text="R1").first.locator("[role=gridcell], td")
    headers = table.locator("[role=columnheader]").all_inner_texts()
    ppl = cells.nth([t.strip() for t in headers].index("ppl wikitext2")).inner_text().strip()
    assert float(ppl.replace(",", "")) > 1, ppl
    assert _traces(page, "plot-ppl", ".scatterlayer .trace") == 1
    assert "→" in card.inner_text() and "lower is better" in card.inner_text()  # quality before → after
    assert "score" not in headers and "peak MB" not in headers  # compact by default
    page.locator("#all-columns input").check()
    page.wait_for_selector("#results-table [role=columnheader] >> text=peak MB", timeout=30_000)
    page.locator("#all-columns input").uncheck()
    shot = tmp_path / "2-runs.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # one answer before and after: headings say which model and its size; the card shows the pair
    page.get_by_role("tab", name="③ Try it").click()
    page.locator("#prompt textarea").fill("The river")
    page.click("#btn-generate")
    page.wait_for_selector("#gen-pruned >> text=tokens/s", timeout=120_000)
    assert "M parameters" in page.locator("#gen-original-head").inner_text()
    assert "Pruned · R1" in page.locator("#gen-pruned-head").text_content()
    page.get_by_role("tab", name="② Prune & evaluate").click()
    assert "The river" in card.inner_text()

    # the report: one self-contained page, opened from disk without the server
    report_dir = tmp_path / "reports"
    page.locator("#report-folder").locator("textarea, input").first.fill(str(report_dir))
    page.click("#btn-report")
    page.wait_for_selector("#report-note >> text=Report written to", timeout=60_000)
    written = report_dir / "comp-explorer-report-R1.html"
    assert written.is_file() and "https://" not in written.read_text().split("<script")[0]
    offline = browser.new_context(offline=True).new_page()
    offline.goto(written.as_uri(), wait_until="load")
    offline.wait_for_selector(".js-plotly-plot svg.main-svg", timeout=30_000)
    assert "fewer parameters" in offline.inner_text("body") and "comp-explorer prune" in offline.inner_text("body")
    assert "How similar the hidden state stays across layers" in offline.inner_text("body")
    offline.screenshot(path=str(tmp_path / "3-report.png"), full_page=True)
    offline.context.close()
    assert not errors, errors

    # a second browser session has its own state: no model, no runs
    other = browser.new_context(viewport={"width": 1366, "height": 768}).new_page()
    other.goto(url)
    other.wait_for_selector("#model-card >> text=No model loaded yet", timeout=60_000)
    other.get_by_role("tab", name="② Prune & evaluate").click()
    other_table = other.locator("#results-table").inner_text()
    assert "original" not in other_table and "R1" not in other_table
    other.context.close()
    assert "R1" in page.locator("#results-table").inner_text()

    # the Export tab saves into one absolute folder it names (not a path relative to the server's folder)
    page.get_by_role("tab", name="④ Export").click()
    export_folder = page.locator("#export-folder").locator("textarea, input").first.input_value()
    assert Path(export_folder).is_absolute() and export_folder.endswith("pruned"), export_folder
    assert str(Path(export_folder).parent) in page.locator("#export-where").inner_text()
    assert page.locator("#export-gguf-path").locator("textarea, input").first.input_value() == export_folder + ".gguf"

    server_log = log_path.read_text()
    assert "Traceback" not in server_log, server_log[-3000:]
    print(f"\nscreenshots in {tmp_path}; GUI timings on the tiny model: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


def test_compare_tab_in_a_browser(app_url, browser):
    url, _folder, log_path = app_url
    page, errors = _open(browser, url)
    page.get_by_role("tab", name="⑤ Compare methods").click()
    methods = page.locator("#compare-methods")
    methods.wait_for(timeout=30_000)
    for box in methods.locator("input[type=checkbox]").all():
        box.uncheck()
    for name in ("comp-layers", "comp", "magnitude"):
        methods.get_by_label(name, exact=True).check()
    ratios = page.locator("#compare-ratios textarea, #compare-ratios input").first
    ratios.fill("0.2, 0.3")
    sparsities = page.locator("#compare-sparsities textarea, #compare-sparsities input").first
    assert sparsities.input_value() == "0.5, 2:4"
    sparsities.fill("2:4")
    _set_number(page, "compare-windows", 2)

    started = time.perf_counter()
    page.click("#btn-compare")
    page.wait_for_selector("#compare-status >> text=Compared in", timeout=240_000)
    seconds = time.perf_counter() - started
    table = page.locator("#compare-table")
    page.wait_for_function("document.querySelector('#compare-table [role=grid]')"
                           "?.getAttribute('aria-rowcount') === '7'", timeout=30_000)  # header, original, 5 rows
    text = table.inner_text()
    assert "comp-layers" in text and "original" in text and "C6" in text
    mask_row = table.locator("[role=row]", has_text="C6").first.inner_text()
    assert "magnitude" in mask_row and "2:4" in mask_row and "nothing removed" in mask_row, mask_row
    headers = [h.strip() for h in table.locator("[role=columnheader]").all_inner_texts()]
    assert "sparsity" in headers and "zeros of all params" in headers, headers
    page.wait_for_function("document.querySelectorAll('#plot-compare .js-plotly-plot .scatterlayer .trace')"
                           ".length >= 4", timeout=30_000)  # the original, one line per method, the masks
    legend = page.eval_on_selector_all("#plot-compare .legendtext", "els => els.map(e => e.textContent)")
    assert {"original", "comp-layers", "comp", "magnitude"} <= set(legend), legend
    assert page.locator("#plot-compare .x2tick text", has_text="2:4").count() == 1  # the masks' panel
    # the last row (magnitude at 2:4): zeroed share per layer and the layers × denses sparsity map
    page.wait_for_selector("#compare-plan-note >> text=magnitude @ 2:4", timeout=30_000)
    assert "nothing removed" in page.locator("#compare-plan-note").inner_text()
    page.wait_for_selector("#plot-compare-bars >> text=Zeroed share", timeout=30_000)
    assert _traces(page, "plot-compare-bars", ".barlayer .trace") >= 1
    page.wait_for_function("document.querySelectorAll('#plot-compare-heatmap .heatmaplayer image').length > 0",
                           timeout=30_000)
    assert page.locator("#plot-compare-heatmap .heatmaplayer text", has_text="50.0%").count() == 0  # said once:
    assert "every masked dense is 50.0% zero" in page.locator("#plot-compare-heatmap .gtitle").text_content()
    page.locator("#tab-compare").screenshot(path="/tmp/compare_masks.png")
    # where comp at 30 % cut: layer bars and the neuron map
    page.locator("#compare-plan input").click()
    page.get_by_role("option", name="C5 · comp @ 30%").click()
    page.wait_for_selector("#compare-plan-note >> text=comp @ 30%", timeout=30_000)
    page.wait_for_selector("#plot-compare-bars >> text=Removed parameters", timeout=30_000)
    assert _traces(page, "plot-compare-bars", ".barlayer .trace") >= 2  # pruned neurons + a removed layer
    page.wait_for_function("document.querySelectorAll('#plot-compare-heatmap .heatmaplayer image').length > 0",
                           timeout=30_000)
    page.locator("#tab-compare").screenshot(path="/tmp/compare_tab.png")
    page.screenshot(path="/tmp/compare_page.png", full_page=True)
    assert Path("/tmp/compare_tab.png").stat().st_size > 10_000
    assert not errors, errors
    server_log = log_path.read_text()
    assert "Traceback" not in server_log, server_log[-3000:]
    print(f"\ncompare on the tiny model: {seconds:.1f} s; screenshot /tmp/compare_tab.png")


def test_searched_layer_shares_in_a_browser(app_url, browser):
    """Layer shares: 'searched' shows the generations box, a method with nothing to search hides both with a
    line that says why, and a searched prune (2 generations) draws plot-search under the status."""
    url, _folder, log_path = app_url
    page, errors = _open(browser, url, 1440, 900)
    assert page.locator("#allocation").is_visible() and not page.locator("#search-generations").is_visible()
    page.locator("#allocation").get_by_label("searched against the original's answers (slower)").check()
    page.wait_for_selector("#search-generations", state="visible", timeout=30_000)
    assert "a few minutes more" in page.locator("#allocation-note").inner_text()
    _set_number(page, "search-generations", 2)
    # shortgpt has no per-layer shares: both controls go, a line says why; back to comp, they return
    page.locator("#method input").click()
    page.get_by_role("option", name="shortgpt", exact=True).click()
    page.wait_for_selector("#allocation-note >> text=no per-layer shares to search", timeout=30_000)
    assert not page.locator("#allocation").is_visible() and not page.locator("#search-generations").is_visible()
    page.locator("#method input").click()
    page.get_by_role("option", name="comp", exact=True).click()
    page.wait_for_selector("#search-generations", state="visible", timeout=30_000)
    assert page.locator("#search-generations input[type=number]").input_value() == "2"

    _set_number(page, "n-remove", 1)
    _set_number(page, "ratio", 0.3)
    started = time.perf_counter()
    page.click("#btn-prune")
    page.wait_for_selector("#prune-status >> text=fewer parameters", timeout=240_000)
    seconds = time.perf_counter() - started
    status = page.locator("#prune-status").inner_text()
    assert "layer shares were searched" in status or "search found no layer shares" in status, status
    page.wait_for_selector("#plot-search .js-plotly-plot", timeout=30_000)
    assert _traces(page, "plot-search", ".barlayer .trace") == 2  # the rule's shares beside the searched ones
    legend = page.eval_on_selector_all("#plot-search .legendtext", "els => els.map(e => e.textContent)")
    assert "each method's rule" in legend and any(t.startswith("searched") for t in legend), legend
    assert _traces(page, "plot-search", ".scatterlayer .trace") >= 2  # the fitness curve and its start
    page.locator("#plot-search").scroll_into_view_if_needed()
    page.screenshot(path="/tmp/search_prune.png")
    assert not errors, errors
    server_log = log_path.read_text()
    assert "Traceback" not in server_log, server_log[-3000:]
    print(f"\nsearched prune on the tiny model: {seconds:.1f} s; screenshot /tmp/search_prune.png")
