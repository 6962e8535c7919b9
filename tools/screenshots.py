"""The README's screenshots, taken the way a person uses the app: launch.py with the bundled model, then
Load → Analyse → Prune → Evaluate → Try it → the summary card, in Debian's chromium at 1440×900.

    COMP_DATA_DIR=../shared/data python tools/screenshots.py --out docs/images

Writes gui.png (the first screen after Analyse), summary-card.png and prune-evaluate.png (after Evaluate and
Try it), try-it.png,
compare.png (three methods) and report.png (the exported report, opened from disk without the server).
``--search N`` adds search.png: COMP with searched layer shares (N generations), the Prune tab's status and
its search figure; ``--only-search`` takes that one alone (Load → searched → Prune), e.g.

    COMP_DATA_DIR=../shared/data python tools/screenshots.py --only-search --search 10 --samples 8 --threads 1

Needs playwright and chromium (apt-get install chromium); a few minutes on two CPU cores (a search: minutes more).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def search_shot(page, out: Path, generations: int) -> None:
    """search.png: a COMP prune with searched layer shares, its status sentence and its figure."""
    page.locator("#allocation").get_by_label("searched against the original's answers (slower)").check()
    page.wait_for_selector("#search-generations", state="visible", timeout=60_000)
    _set_number(page, "search-generations", generations)
    page.click("#btn-prune")
    page.wait_for_selector("#prune-status >> text=fewer parameters", timeout=3_600_000)
    page.wait_for_selector("#plot-search .js-plotly-plot", timeout=60_000)
    page.wait_for_timeout(1500)
    page.evaluate("document.querySelector('#prune-status').scrollIntoView({block: 'start'})")
    page.screenshot(path=str(out / "search.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--compare", action="store_true", help="also the Compare tab (three methods, minutes)")
    parser.add_argument("--search", type=int, default=0, metavar="GENERATIONS",
                        help="also search.png: COMP with searched layer shares, GENERATIONS generations (minutes)")
    parser.add_argument("--only-search", action="store_true", help="take search.png alone (needs --search)")
    parser.add_argument("--threads", type=int, default=None, help="the app's torch threads (launch.py --threads)")
    args = parser.parse_args()
    if args.only_search and args.search < 1:
        parser.error("--only-search needs --search GENERATIONS (>= 1)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = _port()
    work = Path(tempfile.mkdtemp(prefix="comp-shots-"))
    threads = ["--threads", str(args.threads)] if args.threads else []
    server = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--port", str(port),
                               "--export-folder", str(work / "pruned"), *threads], cwd=ROOT,
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
                              stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(360):
            try:
                if urllib.request.urlopen(url, timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(url, wait_until="load")
            page.wait_for_selector("#btn-analyse", timeout=120_000)
            _set_number(page, "n-samples", args.samples)
            _set_number(page, "seq-len", args.tokens)
            if args.only_search:
                search_shot(page, out, args.search)
                browser.close()
                print(f"search.png in {out}; server log {work / 'server.log'}")
                return
            page.click("#btn-analyse")
            page.wait_for_selector("#analysis-status >> text=Analysed in", timeout=900_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out / "gui.png"))
            page.click("#btn-prune")
            page.wait_for_selector("#prune-status >> text=fewer parameters", timeout=900_000)
            page.click("#btn-evaluate")
            page.wait_for_selector("#eval-status >> text=Evaluated in", timeout=900_000)
            page.get_by_role("tab", name="③ Try it").click()
            page.click("#btn-generate")
            page.wait_for_selector("#gen-pruned >> text=tokens/s", timeout=600_000)
            page.screenshot(path=str(out / "try-it.png"))
            page.get_by_role("tab", name="② Prune & evaluate").click()
            page.wait_for_timeout(800)
            page.locator("#summary-card").screenshot(path=str(out / "summary-card.png"))
            page.screenshot(path=str(out / "prune-evaluate.png"))
            page.locator("#report-folder").locator("textarea, input").first.fill(str(work / "reports"))
            page.click("#btn-report")
            page.wait_for_selector("#report-note >> text=Report written to", timeout=120_000)
            report = next((work / "reports").glob("*.html"))
            offline = browser.new_context(offline=True, viewport={"width": 1440, "height": 900}).new_page()
            offline.goto(report.as_uri(), wait_until="load")
            offline.wait_for_selector(".js-plotly-plot svg.main-svg", timeout=60_000)
            offline.screenshot(path=str(out / "report.png"))
            if args.compare:
                page.get_by_role("tab", name="⑤ Compare methods").click()
                page.locator("#compare-ratios").locator("textarea, input").first.fill("0.2")
                page.click("#btn-compare")
                page.wait_for_selector("#compare-status >> text=Compared in", timeout=1_800_000)
                page.wait_for_timeout(1500)
                page.screenshot(path=str(out / "compare.png"), full_page=True)
            if args.search:
                search_shot(page, out, args.search)
            browser.close()
        print(f"screenshots in {out}; report {report}; server log {work / 'server.log'}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
