"""Every bench section in one run; regenerates docs/RESULTS.md from what it measured.

    COMP_DATA_DIR=../shared/data python bench/run_all.py --quick            # under an hour on 2 CPU cores
    COMP_DATA_DIR=../shared/data python bench/run_all.py                    # full protocols (hours on a CPU)
    python bench/run_all.py --quick --sections ablations,cost                # some sections only
    python bench/run_all.py --sections protocol                              # whole test sets at 2048 (~25 min)
    python bench/run_all.py --sections levers                                # COMP's default levers (~30 min)

Writes ``<out>/<section>.json`` (raw numbers) and the figures (HTML, PNG when kaleido can render) under
``<out>``, copies the figures to ``docs/results/`` and rewrites ``docs/RESULTS.md``: every table with the
command, the settings and the machine that produced it. A section that fails is reported in RESULTS.md
with its error and makes the run exit non-zero; the other sections still run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import os
import shutil
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import ROOT, Section, git_revision, machine  # noqa: E402

SECTIONS = ("quality", "ablations", "calibration", "cost", "analyse_cost", "levers", "protocol", "search")
# COMP's default levers (~30 min), the whole-test-set protocol (~25 min) and the searched allocation (~2 h) are
# not part of --quick: it keeps their last results unless they are asked for with --sections
QUICK_SECTIONS = ("quality", "ablations", "calibration", "cost", "analyse_cost")
DOCS = ROOT / "docs"


def run_section(name: str, quick: bool, out: Path, command: str) -> Section:
    module = importlib.import_module(name)
    start = time.perf_counter()
    try:
        section = module.run(quick, out)
    except Exception as err:  # noqa: BLE001 - reported in RESULTS.md, the other sections still run
        traceback.print_exc()
        section = Section(name=name, title=f"{name} (failed)", markdown=f"**This section failed:** "
                          f"`{type(err).__name__}: {err}`", data={"error": repr(err)})
    section.seconds = time.perf_counter() - start
    section.provenance = {"command": command, "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                          "revision": git_revision(), "mode": "quick" if quick else "full"}
    (out / f"{name}.json").write_text(json.dumps({"name": name, "title": section.title, "seconds": section.seconds,
                                                  "provenance": section.provenance, "markdown": section.markdown,
                                                  "data": section.data, "figures": section.figures},
                                                 indent=1, default=str))
    print(f"[run_all] {name}: {section.seconds:.0f} s", file=sys.stderr, flush=True)
    return section


# the provenance line ``write_results`` puts under every section
PROVENANCE = re.compile(r"^_Measured by `(?P<command>.+?)` \((?P<mode>\w+) mode\) on (?P<finished>.+?) at commit "
                        r"`(?P<revision>\w+)` in (?P<minutes>[\d.]+) min\._$")


def _title_of(name: str) -> str | None:
    """The title a bench module gives its section (``Section(name=..., title=...)`` in ``bench/<name>.py``)."""
    match = re.search(r'Section\(name="' + re.escape(name) + r'",\s*title="([^"{]+)"', (BENCH / f"{name}.py").read_text())
    return match.group(1) if match else None


def section_in_results(name: str) -> Section | None:
    """A section as docs/RESULTS.md shows it now, for a run whose output folder lacks its JSON (a fresh
    checkout): its Markdown (figure links included) and provenance, so rewriting the file never drops it."""
    title, path = _title_of(name), DOCS / "RESULTS.md"
    if title is None or not path.is_file():
        return None
    for chunk in path.read_text().split("\n## ")[1:]:
        head, _, body = chunk.partition("\n")
        if head.strip() != title:
            continue
        lines = body.strip("\n").splitlines()
        made = PROVENANCE.match(lines[-1]) if lines else None
        if made is None:  # a line of another form (a section run on its own): kept as it is
            line = lines[-1] if lines and lines[-1].startswith("_") else None
            return Section(name=name, title=title, markdown="\n".join(lines[:-1] if line else lines).strip(),
                           provenance={"line": line} if line else {})
        provenance = {k: made.group(k) for k in ("command", "mode", "finished", "revision")}
        return Section(name=name, title=title, markdown="\n".join(lines[:-1]).strip(),
                       seconds=float(made.group("minutes")) * 60, provenance=provenance)
    return None


def earlier_section(name: str, out: Path) -> Section | None:
    """A section measured by an earlier run into the same folder (so a partial run keeps the others), else the
    one docs/RESULTS.md holds now."""
    path = out / f"{name}.json"
    if not path.is_file():
        return section_in_results(name)
    saved = json.loads(path.read_text())
    if "markdown" not in saved:
        return None
    return Section(name=name, title=saved["title"], markdown=saved["markdown"], data=saved.get("data", {}),
                   figures=saved.get("figures", []), seconds=saved.get("seconds", 0.0),
                   provenance=saved.get("provenance", {}))


def figure_links(section: Section, out: Path, figures_dir: Path) -> str:
    """Copy the section's figures next to RESULTS.md; PNGs shown inline, HTML linked."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in section.figures:
        shutil.copyfile(out / name, figures_dir / name)
        rel = f"{figures_dir.name}/{name}"
        lines.append(f"![{name}]({rel})" if name.endswith(".png") else f"[interactive: {name}]({rel})")
    return "\n\n".join(lines)


def write_results(sections: list[Section], quick: bool, out: Path, seconds: float, command: str) -> Path:
    figures_dir = DOCS / "results"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# Measured results",
        "",
        f"Last rewritten by `{command}` on {stamp} at commit `{git_revision()}`; every section names the run that "
        f"measured it (command, mode, time) underneath. Machine: {machine()}. Raw numbers: the JSON files under `{out}`; this file "
        "is rewritten by every run, do not edit it by hand.",
        "",
        "Zero-shot accuracy comes from lm-evaluation-harness itself (`comp_core.evaluate.zeroshot` wraps the loaded model "
        "in its HFLM and runs its task configs on the local copies); `tests/evaluate/test_zeroshot.py::"
        "test_eval_tasks_equals_a_plain_harness_run` checks that our command and a plain `lm_eval` run over the "
        "same data give identical metrics.",
        "",
        "Contents: " + " · ".join(f"[{s.title}](#{_anchor(s.title)})" for s in sections),
    ]
    for section in sections:
        parts += ["", f"## {section.title}", "", section.markdown, ""]
        links = figure_links(section, out, figures_dir) if section.figures else ""
        if links:
            parts += [links, ""]
        made = section.provenance
        if made.get("line"):
            parts.append(made["line"])
            continue
        parts.append(f"_Measured by `{made['command']}` ({made['mode']} mode) on {made['finished']} at commit "
                     f"`{made['revision']}` in {section.seconds / 60:.1f} min._" if made else
                     f"_Section time: {section.seconds / 60:.1f} min._")
    path = DOCS / "RESULTS.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def _anchor(title: str) -> str:
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -")
    return keep.strip().replace(" ", "-")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quick protocols (under an hour on 2 CPU cores)")
    parser.add_argument("--out", default="bench-out", help="folder for the JSON and figure files")
    parser.add_argument("--sections", default=None, help=f"comma-separated, from {', '.join(SECTIONS)} (default: "
                        f"all; with --quick: {', '.join(QUICK_SECTIONS)})")
    parser.add_argument("--rewrite", action="store_true",
                        help="run nothing: rewrite RESULTS.md from the JSON files already under --out")
    args = parser.parse_args()
    default = QUICK_SECTIONS if args.quick else SECTIONS
    names = [] if args.rewrite else [n for n in (args.sections or ",".join(default)).split(",") if n]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if not os.environ.get("COMP_DATA_DIR") and (ROOT.parent / "shared" / "data").is_dir():
        os.environ["COMP_DATA_DIR"] = str(ROOT.parent / "shared" / "data")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    command = "python bench/run_all.py" + (" --rewrite" if args.rewrite else (" --quick" if args.quick else "") + (
        f" --sections {args.sections}" if args.sections else ""))
    sections = []
    for name in SECTIONS:
        section = run_section(name, args.quick, out, command) if name in names else earlier_section(name, out)
        if section is not None:
            sections.append(section)
    path = write_results(sections, args.quick, out, time.perf_counter() - start, command)
    failed = [s.name for s in sections if s.name in names and s.data.get("error")]
    print(f"[run_all] wrote {path} in {(time.perf_counter() - start) / 60:.1f} min"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
