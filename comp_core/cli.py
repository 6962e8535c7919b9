"""``comp-explorer`` console script: analyze, prune, eval.

Only this module touches argparse; it turns arguments into a ``CompConfig`` and calls the library.
Progress goes to stderr (tqdm), results to stdout (a table, or one JSON object with ``--json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from typing import Sequence

from .data import DEFAULT_CALIBRATION, default_calibration_size
from .events import PruneEvent
from .methods.comp import PAPER_CALIBRATION, PAPER_SETTINGS
from .math.scoring import SCORES

log = logging.getLogger("comp_core")

EVAL_SETS = ("wikitext2", "ptb", "c4", "sample")  # sample: shipped, needs no data folder


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _remove_layers(text: str) -> int | str:
    if text in ("auto", "min"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, 'min' or 'auto', got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError("--remove-layers must be >= 0")
    return value


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(t for t in text.replace(" ", "").split(",") if t)
    if not names:
        raise argparse.ArgumentTypeError("expected at least one name")
    return names


def _ratio_list(text: str) -> tuple[float, ...]:
    try:
        ratios = tuple(float(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if not ratios:
        raise argparse.ArgumentTypeError("expected at least one ratio")
    return ratios


def _dense_kinds(text: str) -> tuple[str, ...] | str:
    return "all" if text == "all" else tuple(t for t in text.replace(" ", "").split(",") if t)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF folder or id (safetensors), a .gguf file, or omit for the bundled SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16 (GPU)")
    p.add_argument("--stream", default="auto", choices=("auto", "on", "off"),
                   help="read a folder model's blocks from disk one at a time (models larger than memory); "
                        "auto (default): when its weights exceed a quarter of the available memory")
    p.add_argument("--device-map", default=None,
                   help="spread the model over several GPUs with accelerate: auto, balanced, balanced_low_0, "
                        "sequential, or a JSON file of module -> GPU; takes the place of --device")
    p.add_argument("--max-memory", default=None,
                   help="with --device-map: what the weights may take on each GPU, e.g. 0=20GiB,1=22GiB "
                        "(default: 80%% of each GPU's free memory)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code (off by default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores available)")
    p.add_argument("--data-dir", default=None, help="folder with local copies of the data sets (sets COMP_DATA_DIR)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_eval(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--eval", default=default, help=f"perplexity data set(s), comma-separated: {', '.join(EVAL_SETS)}"
                   + ("" if default else " (default: none)"))
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows (quick check)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="window length for perplexity (default 512)")


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    return key.strip(), value


# COMP's own flags (dest -> CompConfig field); other methods take their settings through --set
COMP_FLAGS = {"remove_layers": "remove_layers", "granularity": "granularity", "score": "score",
              "dense_kinds": "dense_kinds", "no_mask_tuning": "mask_tuning", "inputs": "inputs"}


def _add_method_settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protect", type=_int_list, default=None,
                   help="comma-separated layers never pruned (default: the method's; COMP: first two and last)")
    p.add_argument("--set", dest="settings", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="any setting of the method's settings dataclass, e.g. --set compensation=mask "
                        "(compare: METHOD.KEY=VALUE); repeatable")
    comp = p.add_argument_group("COMP settings (--method comp and its ablations)")
    comp.add_argument("--paper", action="store_true",
                      help="the COMP paper's setting: 10 × 128 calibration tokens, mask tuning only, the diagonal "
                           "score, one removed layer (flags given beside it still win)")
    comp.add_argument("--remove-layers", type=_remove_layers, default=None,
                      help="blocks to remove before neuron pruning, 'min' (default: as few as the ratio needs, "
                           "none on the bundled model up to ~50 %%) or 'auto' (sweep)")
    comp.add_argument("--granularity", choices=("hybrid", "layers", "neurons"), default=None)
    comp.add_argument("--score", choices=tuple(SCORES), default=None, help="neuron importance score")
    comp.add_argument("--dense-kinds", type=_dense_kinds, default=None,
                      help="denses whose input neurons may be pruned, e.g. 'down,o' or 'all' (default: library default)")
    comp.add_argument("--no-mask-tuning", action="store_true", default=None, help="prune without the least-squares mask")
    comp.add_argument("--inputs", choices=("identical", "accumulated", "paired"), default=None,
                      help="calibration inputs of each layer: 'identical' from the unpruned model (paper), "
                           "'accumulated' from the pruned one, 'paired' the paper's accumulated form: inputs from "
                           "the pruned model, target from the unpruned one")


def _add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="c4", help="calibration set: c4, wikitext2, ptb, data-free, sample (shipped) or a local file")
    p.add_argument("--n-samples", type=int, default=None,
                   help=f"calibration sequences (default {DEFAULT_CALIBRATION[0]}; data-free and --paper: "
                        f"{PAPER_CALIBRATION[0]})")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per calibration sequence (default {DEFAULT_CALIBRATION[1]}; data-free and "
                        f"--paper: {PAPER_CALIBRATION[1]})")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comp-explorer", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    from .methods import method_names

    analyze = sub.add_parser("analyze", help="layer importances, removal order, per-layer ratios, neuron scores")
    prune = sub.add_parser("prune", help="prune (COMP by default) and optionally evaluate perplexity before/after")
    for p in (analyze, prune):
        _add_common(p)
        p.add_argument("--method", default="comp", choices=method_names(), help="pruning method (default: comp)")
        p.add_argument("--ratio", type=float, default=0.2, help="share of all parameters to remove (default 0.2)")
        p.add_argument("--sparsity", default=None,
                       help="mask methods: a share of every pruned linear (0.5) or N:M (2:4, 4:8); default 0.5")
        _add_method_settings(p)
        _add_calibration(p)
    analyze.add_argument("--scores", action="store_true", help="include every neuron score in the JSON")
    _add_eval(prune, default=None)
    prune.add_argument("--out", default=None, help="save the pruned model to this folder (safetensors + report)")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing saved model in --out")
    speed = sub.add_parser("bench-speed", help="original vs pruned: size, load memory, prefill and decode speed")
    _add_common(speed)
    speed.add_argument("--pruned", required=True, help="folder written by `prune --out`")
    speed.add_argument("--repeats", type=int, default=5)
    speed.add_argument("--decode-tokens", type=int, default=64)
    evaluate = sub.add_parser("eval", help="perplexity and/or zero-shot accuracy (lm-evaluation-harness) of a model")
    _add_common(evaluate)
    _add_eval(evaluate, default="wikitext2")
    evaluate.set_defaults(eval=None)  # wikitext2 unless --tasks is given alone (see run)
    evaluate.add_argument("--tasks", type=_name_list, default=None,
                          help="zero-shot lm-eval tasks, comma-separated, e.g. boolq,piqa,winogrande,arc_easy,"
                               "arc_challenge,hellaswag (needs the 'eval' extra); with --tasks, perplexity runs only "
                               "if --eval is given, otherwise eval measures wikitext2 perplexity")
    evaluate.add_argument("--limit", type=int, default=None, help="score only each task's first N items (quick check)")
    evaluate.add_argument("--batch-size", type=int, default=1, help="batch size of the harness's model wrapper")
    compare = sub.add_parser("compare", help="several methods on the same calibration sample: one table")
    _add_common(compare)
    compare.add_argument("--methods", type=_name_list, default=("comp", "flap", "shortgpt", "wanda-sp", "magnitude-sp"),
                         help=f"comma-separated, from: {', '.join(method_names())}")
    compare.add_argument("--ratio", type=_ratio_list, default=(0.2,),
                         help="comma-separated ratios for the structured methods, e.g. 0.2,0.3")
    compare.add_argument("--sparsity", type=_name_list, default=("0.5",),
                         help="comma-separated patterns for the mask methods: a share (0.5) or N:M (2:4, 4:8)")
    compare.add_argument("--set", dest="settings", type=_setting, action="append", default=[],
                         metavar="METHOD.KEY=VALUE", help="a setting of one method, e.g. flap.compensation=none")
    compare.add_argument("--no-bytes", action="store_true", help="skip saving each model to measure its size")
    compare.add_argument("--tasks", type=_name_list, default=None,
                         help="zero-shot lm-eval tasks scored on every row (needs the 'eval' extra)")
    compare.add_argument("--limit", type=int, default=None, help="score only each task's first N items")
    _add_calibration(compare)
    _add_eval(compare, default="wikitext2")
    gguf = sub.add_parser("export-gguf", help="write a saved (pruned) Llama-family model as a GGUF for llama.cpp")
    gguf.add_argument("folder", help="folder written by `prune --out` (or a stock Llama folder)")
    gguf.add_argument("output", help="the .gguf file to write")
    gguf.add_argument("--type", dest="file_type", choices=("f16", "q8_0"), default="f16",
                      help="weight type: f16 (default) or q8_0 (rows not a multiple of 32 stay f16)")
    gguf.add_argument("--source-gguf", default=None,
                      help="GGUF to copy the tokenizer metadata from: a .gguf path or 'bundled' (default: the "
                           "source recorded in comp_report.json, else the folder's HF tokenizer)")
    gguf.add_argument("--ff-multiple", type=int, default=1,
                      help="round every FFN width up to a multiple of this with zero channels (32: q8_0 then "
                           "quantises every down_proj; default 1: exact widths)")
    gguf.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    gguf.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def _export_gguf(args: argparse.Namespace) -> dict:
    """``export-gguf``: no model loading of its own beyond the folder, so it stays apart from ``run``."""
    from .export.gguf import export_gguf_folder, resolve_source_gguf

    if not os.path.isdir(args.folder):
        raise FileNotFoundError(f"{args.folder} is not a folder; pass one written by `comp-explorer prune --out`")
    source = resolve_source_gguf(args.source_gguf) if args.source_gguf else None
    if args.source_gguf and source is None:
        raise ValueError(f"--source-gguf {args.source_gguf}: not a .gguf file or 'bundled'")
    start = time.perf_counter()
    report = export_gguf_folder(args.folder, args.output, file_type=args.file_type, source_gguf=source,
                                ff_multiple=args.ff_multiple, overwrite=args.overwrite).to_dict()
    report["command"] = "export-gguf"
    report["seconds"] = time.perf_counter() - start
    return report


class _Progress:
    """PruneEvents → one tqdm bar per stage on stderr."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.stage = None

    def __call__(self, event: PruneEvent) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if event.stage != self.stage or self.bar is None or self.bar.total != event.total:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(total=event.total, desc=event.stage, file=sys.stderr, leave=False)
        self.bar.n = event.step
        self.bar.set_postfix_str(event.message[:60], refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _settings(method: str, args, ratio: float, extra: list[tuple[str, str]]):
    """The settings dataclass of ``method`` from the command line: ratio, --protect, COMP's flags, --set."""
    from .methods import get_method, make_settings, parse_setting
    from .methods.comp import CompConfig

    fields = get_method(method).settings_class.__dataclass_fields__
    overrides: dict = {"ratio": ratio} if "ratio" in fields else {}
    given = {dest: getattr(args, dest, None) for dest in COMP_FLAGS}
    given = {dest: value for dest, value in given.items() if value is not None}
    if getattr(args, "paper", False):
        if get_method(method).settings_class is not CompConfig:
            raise ValueError(f"--paper is COMP's setting, not one of method '{method}'")
        overrides.update(PAPER_SETTINGS)
    if get_method(method).settings_class is CompConfig:
        for dest, value in given.items():
            if dest == "no_mask_tuning":
                overrides["mask_tuning"] = not value
            elif dest == "dense_kinds":
                overrides["dense_kinds"] = None if value == "all" else value
            else:
                overrides[COMP_FLAGS[dest]] = value
    elif given:
        flags = ", ".join("--" + d.replace("_", "-") for d in given)
        raise ValueError(f"{flags}: COMP settings, not settings of method '{method}' (use --set KEY=VALUE)")
    if "sparsity" in fields and getattr(args, "sparsity", None) and not isinstance(args.sparsity, tuple):
        overrides["sparsity"] = args.sparsity
    if getattr(args, "protect", None) is not None:
        overrides["protected"] = args.protect
    for key, value in extra:
        overrides[key] = parse_setting(method, key, value)
    return make_settings(method, **overrides)


def _compare_settings(methods: list[str], items: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {m: [] for m in methods}
    for key, value in items:
        method, dot, name = key.rpartition(".")
        if not dot or method not in out:
            raise ValueError(f"--set {key}={value}: write METHOD.KEY=VALUE with METHOD one of {', '.join(methods)}")
        out[method].append((name, value))
    return out


def _evaluate(model, tokenizer, names: list[str], args, progress, timings: dict, label: str,
              notes: list[str]) -> dict[str, float]:
    """Perplexity on each set; a set too short for ``--max-windows`` says so in ``notes``."""
    from .data import get_eval_tokens
    from .evaluate.loss import perplexity
    from .runtime import stage

    out = {}
    for name in names:
        with stage(f"eval_{label}_{name}", timings):
            tokens = get_eval_tokens(name, tokenizer)
            result = perplexity(model, tokens, args.eval_seq_len, max_windows=args.max_windows,
                                on_progress=lambda i, n: progress(PruneEvent("evaluate", i, n, f"{label} {name}")))
        out[name] = result.ppl
        out[f"{name}_windows"] = result.n_windows
        short = (f"{name}: its text holds {result.n_windows} windows of {args.eval_seq_len} tokens, so "
                 f"{result.n_windows} were evaluated, not the {args.max_windows} --max-windows asked for")
        if args.max_windows and result.n_windows < args.max_windows and short not in notes:
            notes.append(short)
    return out


def _check_lengths(model, args, eval_names: list[str]) -> None:
    """Calibration and evaluation windows within the model's context, before any of them is made."""
    from .preflight import check_context

    if getattr(args, "seq_len", None) is not None:
        check_context(model, args.seq_len, "--seq-len")
    if eval_names:
        check_context(model, args.eval_seq_len, "--eval-seq-len")


def run(args: argparse.Namespace) -> dict:
    """Execute one parsed command; returns the report (also what ``--json`` prints)."""
    if args.command == "export-gguf":
        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
        return _export_gguf(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.data_dir:
        os.environ["COMP_DATA_DIR"] = args.data_dir
    from .data import get_calibration
    from .methods import analyze_with, prune_with
    from .models.loading import load_model
    from .preflight import check_exportable, check_output_folder, expected_save_bytes
    from .runtime import configure_threads, count_parameters, cuda_peak_mb, cuda_peaks_mb, peak_rss_mb, stage

    out = getattr(args, "out", None)
    if out and os.path.exists(out) and not args.overwrite:  # fail before minutes of pruning, not after
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace a saved model there")
    if out:
        check_output_folder(out)
    configure_threads(args.threads)
    progress = _Progress(enabled=not args.quiet)
    timings: dict = {}
    start = time.perf_counter()
    try:
        with stage("load", timings):
            loaded = load_model(args.model, dtype=args.dtype, device=args.device,
                                trust_remote_code=args.trust_remote_code, stream=args.stream,
                                device_map=args.device_map, max_memory=args.max_memory)
        model, tokenizer = loaded.model, loaded.tokenizer
        report: dict = {"command": args.command, "model": loaded.source, "streamed": loaded.streamed}
        notes: list[str] = []  # what the user should know about this run (set too short, model not saved)
        if loaded.device_map is not None:
            report["device_map"] = {k: str(v) for k, v in loaded.device_map.items()}
        eval_names = [n for n in (getattr(args, "eval", None) or "").split(",") if n]
        for name in eval_names:
            if name not in EVAL_SETS:
                raise ValueError(f"unknown evaluation set '{name}'; choose from {', '.join(EVAL_SETS)}")
        if args.command == "bench-speed":
            from .evaluate.speed import compare_speed

            with stage("bench_speed", timings):
                comparison = compare_speed(model, args.pruned, device=args.device, repeats=args.repeats,
                                           decode_tokens=args.decode_tokens)
            report["speed"] = comparison.to_dict()
            report["speed_table"] = comparison.to_markdown()
        elif args.command == "eval":
            report["params"] = count_parameters(model)
            if args.limit is not None and not args.tasks:
                raise ValueError("--limit applies to zero-shot --tasks (perplexity uses --max-windows)")
            if args.tasks:
                from .evaluate.zeroshot import evaluate_tasks

                with stage("zeroshot", timings):
                    zeroshot = evaluate_tasks(model, tokenizer, args.tasks, limit=args.limit,
                                              batch_size=args.batch_size, quiet=args.quiet, on_event=progress)
                report["zeroshot"] = zeroshot.to_dict()
                report["table"] = zeroshot.table()
            elif not eval_names:
                eval_names = ["wikitext2"]
            if eval_names:
                _check_lengths(model, args, eval_names)
                report["ppl"] = _evaluate(model, tokenizer, eval_names, args, progress, timings, "model", notes)
        elif args.command == "compare":
            from .evaluate.compare import compare_methods, rows_table
            from .methods import get_method
            from .math.sparsity import SparsityPattern

            if args.limit is not None and not args.tasks:
                raise ValueError("--limit applies to zero-shot --tasks (perplexity uses --max-windows)")
            for name in args.methods:
                get_method(name)
            per_method = _compare_settings(list(args.methods), args.settings)
            for sparsity in args.sparsity:  # every setting checked before minutes of work
                SparsityPattern.parse(sparsity)
            for ratio in args.ratio:
                for name in args.methods:
                    _settings(name, args, ratio, per_method[name])
            _check_lengths(model, args, eval_names)
            with stage("calibration", timings):
                samples = get_calibration(args.calib, tokenizer, args.n_samples, args.seq_len, args.seed, model=model)
            settings = {name: {k: v for k, v in vars(_settings(name, args, args.ratio[0], per_method[name])).items()
                               if k not in ("ratio", "sparsity")} for name in args.methods}
            with stage("compare", timings):
                rows = compare_methods(model, tokenizer, samples, list(args.methods), list(args.ratio), eval_names,
                                       sparsities=list(args.sparsity), max_windows=args.max_windows, eval_seq_len=args.eval_seq_len,
                                       settings=settings, measure_bytes=not args.no_bytes,
                                       tasks=list(args.tasks or []), task_limit=args.limit, on_event=progress)
            report["calibration"] = {"name": args.calib, "n_samples": args.n_samples, "seq_len": args.seq_len,
                                     "seed": args.seed}
            report["eval"] = {"sets": eval_names, "seq_len": args.eval_seq_len, "max_windows": args.max_windows,
                              "tasks": list(args.tasks or []), "task_limit": args.limit}
            report["rows"] = [r.to_dict() for r in rows]
            report["table"] = rows_table(rows, eval_names)
        else:
            settings = _settings(args.method, args, args.ratio, args.settings)
            _check_lengths(model, args, eval_names)
            if out:  # a family export does not cover, or a full disk, found now rather than after pruning
                check_exportable(model)
                check_output_folder(out, expected_save_bytes(model, getattr(settings, "ratio", 0.0)))
            with stage("calibration", timings):
                samples = get_calibration(args.calib, tokenizer, args.n_samples, args.seq_len, args.seed, model=model)
            report["calibration"] = {"name": args.calib, "n_samples": args.n_samples, "seq_len": args.seq_len,
                                     "seed": args.seed}
            if args.command == "analyze":
                with stage("analyze", timings):
                    plan = analyze_with(args.method, model, samples, settings, on_event=progress)
                report.update(plan.to_dict(with_scores=args.scores))
            else:
                if eval_names:
                    report["ppl_before"] = _evaluate(model, tokenizer, eval_names, args, progress, timings, "before",
                                                     notes)
                with stage("prune", timings):
                    pruned, result = prune_with(args.method, model, samples, settings, on_event=progress, inplace=True)
                result_dict = result.to_dict()
                plan = result_dict.pop("plan")
                report.update(result_dict)
                report["layer_importance"] = plan["initial_importance"]
                report["removal_order"] = plan["removal_order"]
                report["auto_sweep"] = plan["auto_sweep"]
                report["config"] = plan["config"]
                report["notes"] = plan["notes"]
                if eval_names:
                    report["ppl_after"] = _evaluate(pruned, tokenizer, eval_names, args, progress, timings, "after",
                                                    notes)
                if args.out:
                    from .export.folder import save_pruned

                    with stage("save", timings):
                        report["saved_to"] = str(save_pruned(pruned, tokenizer, args.out, result,
                                                             overwrite=args.overwrite, source=loaded.source))
                else:
                    report["saved_to"] = None  # the summary says how to keep it
        if notes:
            report["notes"] = report.get("notes", []) + notes
    finally:
        progress.close()
    report["seconds"] = time.perf_counter() - start
    report["peak_rss_mb"] = peak_rss_mb()
    if cuda_peak_mb() is not None:
        report["cuda_peak_mb"] = cuda_peak_mb()
        if len(peaks := cuda_peaks_mb()) > 1:
            report["cuda_peaks_mb"] = peaks
    if report.get("streamed"):
        from .models.streaming import stream_stats

        stats = stream_stats(model)
        report["streaming"] = dataclasses.asdict(stats) if stats is not None else None
    report["timings"] = timings
    return report


def _print_table(report: dict) -> None:
    rows = []
    for key in ("model", "path", "arch", "file_type", "file_bytes", "params_file", "params_model", "restored_zeros",
                "params_original", "share_of_original", "tokenizer", "saved_to", "realised_ratio", "params_before",
                "params_after", "params", "removed_layers", "compensation", "ppl", "ppl_before", "ppl_after", "seconds",
                "peak_rss_mb", "cuda_peak_mb"):
        if report.get(key) is not None:
            rows.append((key, _format_value(key, report[key])))
    if "calibration" in report:
        c = report["calibration"]
        rows.insert(1, ("calibration", f"{c['name']} {c['n_samples']}×{c['seq_len']} tokens, seed {c['seed']}"))
    if report.get("streaming"):
        st = report["streaming"]
        rows.append(("streamed", f"blocks read {st['reads']} times ({st['bytes_read'] / 2**30:.2f} GiB), "
                                 f"{st['spills']} changed blocks spilled"))
    if "layer_ratios" in report:
        rows.append(("layer_ratios", ", ".join(f"{k}:{v:.2f}" for k, v in report["layer_ratios"].items())))
    if "speed_table" in report:
        print(report["speed_table"])
    if "table" in report:
        print(report["table"])
    if "timings" in report:
        rows.append(("stages", ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in report["timings"].items())))
    rows += [("note", note) for note in report.get("notes", [])]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _format_value(key: str, value) -> str:
    """A table cell a person reads: seconds to 0.1, megabytes whole, ratios as percentages, other floats to
    4 significant digits."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_format_value(k, v)}" for k, v in value.items())
    if not isinstance(value, float):
        return str(value)
    if key == "seconds":
        return f"{value:.1f}"
    if key.endswith("_mb"):
        return f"{value:,.0f}"
    if key in ("realised_ratio", "share_of_original"):
        return f"{value:.2%}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4g}"


def _millions(count: int) -> str:
    return f"{count / 1e6:,.1f} M"


def summary(report: dict, argv: Sequence[str]) -> list[str]:
    """A few plain lines after a prune: what it removed, how long it took, perplexity before → after, and
    the next command to try (saving it, or using what was saved)."""
    if report.get("command") != "prune":
        return []
    ratio = report.get("realised_ratio")
    lines = []
    if ratio is not None and "params_before" in report:
        lines.append(f"Removed {ratio:.1%} of the parameters ({_millions(report['params_before'])} → "
                     f"{_millions(report['params_after'])}) in {report['seconds']:.0f} s, peak memory "
                     f"{report['peak_rss_mb'] / 1024:.1f} GB.")
    before, after = report.get("ppl_before", {}), report.get("ppl_after", {})
    for name, value in before.items():
        if name.endswith("_windows") or name not in after:
            continue
        windows = before.get(f"{name}_windows")
        lines.append(f"Perplexity on {name} ({windows} window{'s' if windows != 1 else ''}; lower is better): "
                     f"{value:.2f} before, {after[name]:.2f} after.")
    command = "comp-explorer " + shlex.join(argv)
    if report.get("saved_to"):
        lines.append(f"Saved to {report['saved_to']}. Next: comp-explorer bench-speed "
                     f"--pruned {shlex.quote(report['saved_to'])}   (original vs pruned: size, memory, speed)")
    else:
        lines.append(f"Not saved. Next, to keep it: {command} --out pruned")
    return lines


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename and err.strerror and str(err.filename) not in text:
        text = f"{err.filename}: {err.strerror}"
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    from .math.allocation import ImpossibleRatioError
    from .runtime import is_out_of_memory, out_of_memory_message

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if hasattr(args, "calib"):  # a size not given: the project's default budget (the paper's with --paper)
        default = PAPER_CALIBRATION if getattr(args, "paper", False) else default_calibration_size(args.calib)
        args.n_samples = default[0] if args.n_samples is None else args.n_samples
        args.seq_len = default[1] if args.seq_len is None else args.seq_len
    try:
        report = run(args)
    except (ValueError, ImpossibleRatioError, OSError) as err:  # OSError: missing/existing/unwritable, disk full
        print(f"comp-explorer: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except MemoryError as err:
        print(f"comp-explorer: error: {out_of_memory_message(err)}", file=sys.stderr)
        return 3
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        print(f"comp-explorer: error: {out_of_memory_message(err)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("comp-explorer: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(report, default=_jsonable))
    else:
        _print_table(report)
        for line in summary(report, argv):
            print(line)
    return 0


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


if __name__ == "__main__":
    raise SystemExit(main())
