"""The README's screenshots, taken the way a person uses the app: launch.py with the bundled model, then
Load → Analyse → Prune → Evaluate → Try it → the summary card, in Debian's chromium at 1440×900.

    COMP_DATA_DIR=../shared/data python tools/screenshots.py --out docs/images

Writes gui.png (the first screen after Analyse), summary-card.png and prune-evaluate.png (after Evaluate and
Try it), try-it.png,
compare.png (three methods) and report.png (the exported report, opened from disk without the server).
Needs playwright and chromium (apt-get install chromium); a few minutes on two CPU cores.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--compare", action="store_true", help="also the Compare tab (three methods, minutes)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = _port()
    work = Path(tempfile.mkdtemp(prefix="comp-shots-"))
    server = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--port", str(port),
                               "--export-folder", str(work / "pruned")], cwd=ROOT,
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
            browser.close()
        print(f"screenshots in {out}; report {report}; server log {work / 'server.log'}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
