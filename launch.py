#!/usr/bin/env python3
"""Start the comp-explorer GUI: ``.venv/bin/python launch.py`` serves http://127.0.0.1:7860 with the bundled model.

Binds to 127.0.0.1 only, unless ``--host`` (e.g. 0.0.0.0) or ``--share`` (a public Gradio link) is given.
Data sets are read from ``$COMP_DATA_DIR`` (``--data-dir`` sets it; default ../shared/data when that exists).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
GUI_PACKAGES = ("gradio", "plotly", "pandas", "kaleido")  # the 'gui' extra of pyproject.toml


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="COMP Explorer: a GUI for post-training structured pruning of LLMs")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public *.gradio.live link (off by default)")
    p.add_argument("--browser", action="store_true", help="open the page in the default web browser")
    p.add_argument("--model", default="bundled",
                   help="preselected model: bundled (default), a HF id, a local folder or a .gguf file")
    p.add_argument("--calib", default="c4", help="preselected calibration set: c4, wikitext2, ptb, data-free")
    p.add_argument("--data-dir", default=None, help="folder with local data sets (sets COMP_DATA_DIR)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all available)")
    p.add_argument("--export-folder", default=None,
                   help="preselected folder for saving pruned models (default ~/comp-explorer/pruned; a relative "
                        "path is taken from the current folder)")
    p.add_argument("--stream", default="auto", choices=("auto", "on", "off"),
                   help="read folder models' blocks from disk one at a time (models larger than memory); auto "
                        "(default): when the weights exceed a quarter of the available memory")
    p.add_argument("--device-map", default=None,
                   help="spread models over several GPUs with accelerate: auto, balanced, balanced_low_0, "
                        "sequential, or a JSON file of module -> GPU")
    p.add_argument("--max-memory", default=None, help="with --device-map: per-GPU limit for the weights, e.g. "
                                                      "0=20GiB,1=22GiB (default: 80%% of each GPU's free memory)")
    p.add_argument("--log-level", default="INFO", help="logging level of the server log")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.data_dir:
        os.environ["COMP_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
    elif not os.environ.get("COMP_DATA_DIR") and (ROOT.parent / "shared" / "data").is_dir():
        os.environ["COMP_DATA_DIR"] = str(ROOT.parent / "shared" / "data")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home

    try:
        from comp_core.runtime import configure_threads
    except ModuleNotFoundError as err:  # the core's dependencies are not in this Python (e.g. the system one)
        if (err.name or "").split(".")[0] in ("comp_core", "ui"):
            raise
        print(f"launch.py: error: {err.name} is not installed in this Python ({sys.executable}). Run `make app`, "
              "or `.venv/bin/python launch.py` after `make install`.", file=sys.stderr)
        return 2

    try:
        from ui.app import build_app, launch_kwargs
    except ImportError as err:  # gradio, plotly, pandas or kaleido missing: the GUI extra is not installed
        missing = (err.name or "").split(".")[0]
        if missing not in GUI_PACKAGES:
            raise
        print(f"launch.py: error: the GUI needs the 'gui' extra ({missing} is not installed); install it with "
              "`pip install -e '.[gui]'` (or run `make app`)", file=sys.stderr)
        return 2

    threads = configure_threads(args.threads)
    from ui import common

    try:
        common.set_load_options(args.stream, args.device_map, args.max_memory)
    except ValueError as err:
        print(f"launch.py: error: {err}", file=sys.stderr)
        return 2
    export_folder = str(Path(args.export_folder).expanduser().resolve()) if args.export_folder else None
    demo = build_app(default_source=args.model, default_calib=args.calib, export_folder=export_folder)
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    print(f"comp-explorer serves on {url} ({threads} torch threads): open it in a browser"
          f"{'' if args.browser else ' (--browser opens one)'}; Ctrl+C stops it.", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, inbrowser=args.browser,
                show_error=False, footer_links=[], **launch_kwargs())
    return 0


if __name__ == "__main__":
    sys.exit(main())
