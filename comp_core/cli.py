"""``comp-explorer`` console script: analyze, prune, eval, compare, bench-speed, export-gguf.

Only this module touches argparse; ``comp_core.settings`` turns the arguments into a method's settings (the
same parsing as the GUI's) and ``run`` hands each command to its handler in :data:`COMMANDS`.
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
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .data import DEFAULT_CALIBRATION, default_calibration_size, get_calibration
from .evaluate.compare import compare_methods, rows_table
from .evaluate.report import evaluate_model
from .evaluate.speed import compare_speed
from .events import PruneEvent
from .export.folder import save_pruned
from .export.gguf import export_gguf_folder, resolve_source_gguf
from .heal import HealSettings, heal, teacher_targets
from .math.allocation import ImpossibleRatioError
from .math.scoring import SCORES
from .methods import analyze_with, get_method, method_names, prune_with, settings_over_all
from .methods.comp import PAPER_CALIBRATION
from .models.loading import load_model
from .models.streaming import stream_stats
from .preflight import check_context, check_exportable, check_output_folder, expected_save_bytes
from .runtime import (RATIO_BASES, RATIO_BASIS_HELP, configure_threads, count_parameters, cuda_peak_mb, cuda_peaks_mb,
                      is_out_of_memory, out_of_memory_message, peak_rss_mb, stage)
from .settings import (COMPARE_METHODS, EVAL_SETS, SettingsError, parse_assignment, parse_dense_kinds,
                       parse_eval_sets, parse_layers, parse_ratios, parse_remove_layers, parse_sparsities,
                       settings_for, split_per_method, uses_comp_settings)

log = logging.getLogger("comp_core")


def _arg(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` from a ``comp_core.settings`` parser, keeping its message."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except SettingsError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = parse.__name__
    return convert


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(t for t in text.replace(" ", "").split(",") if t)
    if not names:
        raise argparse.ArgumentTypeError("expected at least one name")
    return names


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



# COMP's own flags (dest -> CompConfig field); other methods take their settings through --set
COMP_FLAGS = {"remove_layers": "remove_layers", "granularity": "granularity", "score": "score",
              "dense_kinds": "dense_kinds", "no_mask_tuning": "mask_tuning", "inputs": "inputs"}


def _add_ratio_of(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ratio-of", choices=RATIO_BASES, default="all",
                   help="what --ratio is a share of: " + "; ".join(f"'{b}', {RATIO_BASIS_HELP[b]}" for b in RATIO_BASES)
                        + " (default: all; a share of the blocks becomes the share of all it means before the "
                          "method runs, and the report gives both)")


def _add_method_settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protect", type=_arg(parse_layers), default=None,
                   help="comma-separated layers never pruned (default: the method's; COMP: first two and last)")
    p.add_argument("--set", dest="settings", type=_arg(parse_assignment), action="append", default=[], metavar="KEY=VALUE",
                   help="any setting of the method's settings dataclass, e.g. --set compensation=mask "
                        "(compare: METHOD.KEY=VALUE); repeatable")
    comp = p.add_argument_group("COMP settings (--method comp and its ablations)")
    comp.add_argument("--paper", action="store_true",
                      help="the COMP paper's setting: 10 × 128 calibration tokens, mask tuning only, the diagonal "
                           "score, one removed layer (flags given beside it still win)")
    comp.add_argument("--remove-layers", type=_arg(parse_remove_layers), default=None,
                      help="blocks to remove before neuron pruning, 'min' (default: as few as the ratio needs, "
                           "none on the bundled model up to ~50 %%) or 'auto' (sweep)")
    comp.add_argument("--granularity", choices=("hybrid", "layers", "neurons"), default=None)
    comp.add_argument("--score", choices=tuple(SCORES), default=None, help="neuron importance score")
    comp.add_argument("--dense-kinds", default=None,
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
    analyze = sub.add_parser("analyze", help="layer importances, removal order, per-layer ratios, neuron scores")
    prune = sub.add_parser("prune", help="prune (COMP by default) and optionally evaluate perplexity before/after")
    for p in (analyze, prune):
        _add_common(p)
        p.add_argument("--method", default="comp", choices=method_names(), help="pruning method (default: comp)")
        p.add_argument("--ratio", default="0.2",
                       help="share of the parameters to remove (of all of them unless --ratio-of blocks): 0.2 or "
                            "20%% (default 0.2)")
        _add_ratio_of(p)
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
    compare.add_argument("--methods", type=_name_list, default=COMPARE_METHODS,
                         help=f"comma-separated, from: {', '.join(method_names())}; NAME@search runs a method "
                              "with the searched per-layer allocation (e.g. comp,comp@search)")
    compare.add_argument("--ratio", default="0.2",
                         help="comma-separated ratios for the structured methods, e.g. 0.2,0.3 or 20%%,30%% "
                              "(shares of all parameters unless --ratio-of blocks)")
    _add_ratio_of(compare)
    compare.add_argument("--sparsity", default="0.5",
                         help="comma-separated patterns for the mask methods: a share (0.5) or N:M (2:4, 4:8)")
    compare.add_argument("--set", dest="settings", type=_arg(parse_assignment), action="append", default=[],
                         metavar="METHOD.KEY=VALUE", help="a setting of one method, e.g. flap.compensation=none")
    compare.add_argument("--no-bytes", action="store_true", help="skip saving each model to measure its size")
    compare.add_argument("--tasks", type=_name_list, default=None,
                         help="zero-shot lm-eval tasks scored on every row (needs the 'eval' extra)")
    compare.add_argument("--limit", type=int, default=None, help="score only each task's first N items")
    _add_calibration(compare)
    _add_eval(compare, default="wikitext2")
    heal_cmd = sub.add_parser("heal", help="heal a pruned model by distillation from the original (offline top-k "
                                           "targets; LoRA merged, all block weights, or norms only)")
    _add_common(heal_cmd)
    heal_cmd.add_argument("--teacher", default=None,
                          help="the original model (as --model takes it; default: the source recorded in the pruned "
                               "folder's comp_report.json)")
    budget = heal_cmd.add_argument_group("budget (at least one; both: whichever ends first)")
    budget.add_argument("--minutes", type=float, default=None, help="wall-clock minutes of training")
    budget.add_argument("--steps", type=int, default=None, help="optimiser steps")
    what = heal_cmd.add_mutually_exclusive_group()
    what.add_argument("--lora-rank", type=int, default=None, help="LoRA adapters of this rank (the default, rank 8)")
    what.add_argument("--full", action="store_true", help="train every weight of the blocks")
    what.add_argument("--norms-only", action="store_true", help="train only the norms and biases (cheapest)")
    heal_cmd.add_argument("--lr", type=float, default=None, help="peak learning rate (default: by mode)")
    heal_cmd.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    heal_cmd.add_argument("--top-k", type=int, default=64, help="teacher tokens kept per position (default 64)")
    heal_cmd.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    _add_calibration(heal_cmd)  # the healing text: never the evaluation windows
    _add_eval(heal_cmd, default=None)
    heal_cmd.add_argument("--out", default=None, help="save the healed model to this folder")
    heal_cmd.add_argument("--overwrite", action="store_true", help="replace an existing saved model in --out")
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
    """``export-gguf``: reads the folder itself, so it needs none of ``_with_model``'s loading."""
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


def _comp_flags(args: argparse.Namespace) -> dict[str, Any]:
    """COMP's own flags that were given, as ``CompConfig`` fields (--no-mask-tuning → mask_tuning=False)."""
    given = {dest: getattr(args, dest, None) for dest in COMP_FLAGS}
    comp: dict[str, Any] = {}
    for dest, value in given.items():
        if value is None:
            continue
        if dest == "no_mask_tuning":
            comp["mask_tuning"] = not value
        elif dest == "dense_kinds":
            comp["dense_kinds"] = parse_dense_kinds(value)
        else:
            comp[COMP_FLAGS[dest]] = value
    return comp


def _settings(method: str, args: argparse.Namespace, ratio: str | float, extra: Sequence[tuple[str, str]]):
    """The settings dataclass of ``method`` from the command line: ratio, --sparsity, --protect, --paper,
    COMP's flags, --set (``comp_core.settings.settings_for`` builds it)."""
    comp = _comp_flags(args)
    if comp and not uses_comp_settings(method):  # named as typed: the flags, not the fields
        flags = ", ".join("--" + d.replace("_", "-") for d in COMP_FLAGS if getattr(args, d, None) is not None)
        raise SettingsError(f"{flags}: COMP settings, not settings of method '{method}' (use --set KEY=VALUE)")
    sparsity = getattr(args, "sparsity", None)
    return settings_for(method, ratio=ratio, sparsity=sparsity if isinstance(sparsity, str) else None,
                        protected=getattr(args, "protect", None), comp=comp,
                        paper=getattr(args, "paper", False), overrides=extra)


def _check_lengths(model, args, eval_names: Sequence[str]) -> None:
    """Calibration and evaluation windows within the model's context, before any of them is made."""
    if getattr(args, "seq_len", None) is not None:
        check_context(model, args.seq_len, "--seq-len")
    if eval_names:
        check_context(model, args.eval_seq_len, "--eval-seq-len")


@dataclass
class _Run:
    """What a model command's handler works with and fills in: the loaded model and the report."""

    args: argparse.Namespace
    loaded: Any
    eval_names: tuple[str, ...]
    progress: _Progress
    report: dict
    timings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the user should know (set too short, model not saved)

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def evaluate(self, model, names: Sequence[str], label: str, tasks: Sequence[str] = ()):
        """Perplexity on ``names`` (and zero-shot ``tasks``) through ``evaluate_model``; notes kept once."""
        args = self.args
        measured = evaluate_model(model, self.tokenizer, sets=names, seq_len=args.eval_seq_len,
                                  max_windows=args.max_windows, tasks=tasks, task_limit=getattr(args, "limit", None),
                                  batch_size=getattr(args, "batch_size", 1), quiet=args.quiet,
                                  on_event=self.progress, timings=self.timings, label=label)
        self.notes.extend(n for n in measured.notes if n not in self.notes)
        return measured

    def calibration(self):
        """The calibration samples the command line asked for (recorded in the report)."""
        args = self.args
        with stage("calibration", self.timings):
            samples = get_calibration(args.calib, self.tokenizer, args.n_samples, args.seq_len, args.seed,
                                      model=self.model)
        self.report["calibration"] = {"name": args.calib, "n_samples": args.n_samples, "seq_len": args.seq_len,
                                      "seed": args.seed}
        return samples


def _bench_speed(run: _Run) -> None:
    args = run.args
    with stage("bench_speed", run.timings):
        comparison = compare_speed(run.model, args.pruned, device=args.device, repeats=args.repeats,
                                   decode_tokens=args.decode_tokens)
    run.report["speed"] = comparison.to_dict()
    run.report["speed_table"] = comparison.to_markdown()


def _eval(run: _Run) -> None:
    args = run.args
    run.report["params"] = count_parameters(run.model)
    if args.limit is not None and not args.tasks:
        raise ValueError("--limit applies to zero-shot --tasks (perplexity uses --max-windows)")
    names = run.eval_names or (() if args.tasks else ("wikitext2",))
    _check_lengths(run.model, args, names)
    measured = run.evaluate(run.model, names, "model", tasks=args.tasks or ())
    if measured.zeroshot is not None:
        run.report["zeroshot"] = measured.zeroshot.to_dict()
        run.report["table"] = measured.zeroshot.table()
    if names:
        run.report["ppl"] = measured.ppl_dict()


def _compare(run: _Run) -> None:
    args = run.args
    if args.limit is not None and not args.tasks:
        raise ValueError("--limit applies to zero-shot --tasks (perplexity uses --max-windows)")
    for name in args.methods:
        get_method(name)
    per_method = split_per_method(list(args.methods), args.settings)
    sparsities = parse_sparsities(args.sparsity, allow_zero=True)  # every setting checked before minutes of work
    ratios = parse_ratios(args.ratio)
    for ratio in ratios:
        for name in args.methods:
            _settings(name, args, ratio, per_method[name])
    _check_lengths(run.model, args, run.eval_names)
    samples = run.calibration()
    settings = {name: {k: v for k, v in vars(_settings(name, args, ratios[0], per_method[name])).items()
                       if k not in ("ratio", "sparsity")} for name in args.methods}
    with stage("compare", run.timings):
        rows = compare_methods(run.model, run.tokenizer, samples, list(args.methods), list(ratios),
                               list(run.eval_names), ratio_of=args.ratio_of, sparsities=list(sparsities),
                               max_windows=args.max_windows,
                               eval_seq_len=args.eval_seq_len, settings=settings, measure_bytes=not args.no_bytes,
                               tasks=list(args.tasks or []), task_limit=args.limit, on_event=run.progress)
    run.report["eval"] = {"sets": list(run.eval_names), "seq_len": args.eval_seq_len,
                          "max_windows": args.max_windows, "tasks": list(args.tasks or []), "task_limit": args.limit}
    run.report["rows"] = [r.to_dict() for r in rows]
    run.report["table"] = rows_table(rows, list(run.eval_names))


def _prepare(run: _Run):
    """``analyze`` and ``prune``: the method's settings, checked with the model, then the calibration samples."""
    args = run.args
    settings = _settings(args.method, args, args.ratio, args.settings)
    over_all, _ = settings_over_all(run.model, settings, args.ratio_of)  # a ratio of the blocks checked now
    _check_lengths(run.model, args, run.eval_names)
    out = getattr(args, "out", None)
    if out:  # a family export does not cover, or a full disk, found now rather than after pruning
        check_exportable(run.model)
        check_output_folder(out, expected_save_bytes(run.model, getattr(over_all, "ratio", 0.0)))
    return settings, run.calibration()


def _analyze(run: _Run) -> None:
    settings, samples = _prepare(run)
    with stage("analyze", run.timings):
        plan = analyze_with(run.args.method, run.model, samples, settings, ratio_of=run.args.ratio_of,
                            on_event=run.progress)
    run.report.update(plan.to_dict(with_scores=run.args.scores))


def _prune(run: _Run) -> None:
    args, report = run.args, run.report
    settings, samples = _prepare(run)
    if run.eval_names:
        report["ppl_before"] = run.evaluate(run.model, run.eval_names, "before").ppl_dict()
    with stage("prune", run.timings):
        pruned, result = prune_with(args.method, run.model, samples, settings, ratio_of=args.ratio_of,
                                    on_event=run.progress, inplace=True)
    result_dict = result.to_dict()
    plan = result_dict.pop("plan")
    report.update(result_dict)
    report["layer_importance"] = plan["initial_importance"]
    report["removal_order"] = plan["removal_order"]
    report["auto_sweep"] = plan["auto_sweep"]
    report["config"] = plan["config"]
    report["notes"] = plan["notes"]
    if run.eval_names:
        report["ppl_after"] = run.evaluate(pruned, run.eval_names, "after").ppl_dict()
    if args.out:
        with stage("save", run.timings):
            report["saved_to"] = str(save_pruned(pruned, run.tokenizer, args.out, result,
                                                 overwrite=args.overwrite, source=run.loaded.source))
    else:
        report["saved_to"] = None  # the summary says how to keep it


HEAL_TEXT = (128, 256)  # default healing text: sequences × tokens of the calibration source


def _recorded_report(source: str | None) -> dict:
    """A saved folder's comp_report.json ({} for anything else)."""
    if source is None or not os.path.isdir(source):
        return {}
    path = os.path.join(source, "comp_report.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _heal(run: _Run) -> None:
    """Distil the original's next-token distribution into the pruned model (``comp_core.heal``)."""
    args, report = run.args, run.report
    mode = "full" if args.full else "norms" if args.norms_only else "lora"
    settings = HealSettings(mode=mode, steps=args.steps, minutes=args.minutes, learning_rate=args.lr,
                            batch_size=args.batch_size, top_k=args.top_k, temperature=args.temperature,
                            lora_rank=args.lora_rank or HealSettings.lora_rank, seed=args.seed)
    recorded = _recorded_report(args.model)
    teacher_source = args.teacher or recorded.get("export", {}).get("source")
    if teacher_source is None:
        raise ValueError("which model is the teacher? --model has no recorded source (comp_report.json); give "
                         "--teacher (the original model, as --model takes it)")
    _check_lengths(run.model, args, run.eval_names)
    n, seq_len = args.n_samples or HEAL_TEXT[0], args.seq_len or HEAL_TEXT[1]
    with stage("teacher", run.timings):
        teacher = load_model(None if teacher_source == "bundled" else teacher_source, dtype=args.dtype,
                             device=args.device, trust_remote_code=args.trust_remote_code).model
        text = get_calibration(args.calib, run.tokenizer, n, seq_len, args.seed, model=teacher)
        targets = teacher_targets(teacher, text, settings.top_k, settings.temperature,
                                  on_batch=lambda done, total: run.progress(PruneEvent(
                                      "teacher", done, total, "the original's answers on the healing text")))
        del teacher  # offline distillation: the teacher's targets are all the student needs
    report["teacher"] = teacher_source
    report["calibration"] = {"name": args.calib, "n_samples": n, "seq_len": seq_len, "seed": args.seed}
    if run.eval_names:
        report["ppl_before"] = run.evaluate(run.model, run.eval_names, "before").ppl_dict()
    with stage("heal", run.timings):
        healed, record = heal(run.model, targets, settings, text=f"{args.calib}: {n} × {seq_len} tokens, seed "
                              f"{args.seed}", on_event=run.progress, inplace=True)
    report["heal"] = record.to_dict()
    if run.eval_names:
        report["ppl_after"] = run.evaluate(healed, run.eval_names, "after").ppl_dict()
    if args.out:
        with stage("save", run.timings):
            report["saved_to"] = str(save_pruned(healed, run.tokenizer, args.out, recorded.get("pruning"),
                                                 overwrite=args.overwrite, source=teacher_source,
                                                 heal=record.to_dict()))
    else:
        report["saved_to"] = None


def _with_model(handler: Callable[[_Run], None]) -> Callable[[argparse.Namespace], dict]:
    """A command that loads the model first: data folder, threads, progress, timings and the memory figures
    around ``handler``, the same for every such command."""
    def command(args: argparse.Namespace) -> dict:
        if args.data_dir:
            os.environ["COMP_DATA_DIR"] = args.data_dir
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
            report: dict = {"command": args.command, "model": loaded.source, "streamed": loaded.streamed}
            if loaded.device_map is not None:
                report["device_map"] = {k: str(v) for k, v in loaded.device_map.items()}
            run = _Run(args, loaded, parse_eval_sets(getattr(args, "eval", None)), progress, report, timings)
            handler(run)
            if run.notes:
                report["notes"] = report.get("notes", []) + run.notes
        finally:
            progress.close()
        report["seconds"] = time.perf_counter() - start
        report["peak_rss_mb"] = peak_rss_mb()
        if cuda_peak_mb() is not None:
            report["cuda_peak_mb"] = cuda_peak_mb()
            if len(peaks := cuda_peaks_mb()) > 1:
                report["cuda_peaks_mb"] = peaks
        if report.get("streamed"):
            stats = stream_stats(loaded.model)
            report["streaming"] = dataclasses.asdict(stats) if stats is not None else None
        report["timings"] = timings
        return report

    command.__doc__ = handler.__doc__
    return command


# command name -> what runs it (every command returns the report ``--json`` prints)
COMMANDS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "analyze": _with_model(_analyze),
    "prune": _with_model(_prune),
    "eval": _with_model(_eval),
    "compare": _with_model(_compare),
    "bench-speed": _with_model(_bench_speed),
    "heal": _with_model(_heal),
    "export-gguf": _export_gguf,
}


def run(args: argparse.Namespace) -> dict:
    """Execute one parsed command; returns the report (also what ``--json`` prints)."""
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return COMMANDS[args.command](args)


def _print_table(report: dict) -> None:
    rows = []
    for key in ("model", "path", "arch", "file_type", "file_bytes", "params_file", "params_model", "restored_zeros",
                "params_original", "share_of_original", "tokenizer", "saved_to", "realised_ratio",
                "realised_block_ratio", "params_before", "params_after", "block_params_before", "block_params_after",
                "params", "zero_share", "block_zero_share", "removed_layers", "compensation", "ppl", "ppl_before",
                "ppl_after", "seconds", "peak_rss_mb", "cuda_peak_mb"):
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
    if key in ("realised_ratio", "realised_block_ratio", "share_of_original", "zero_share", "block_zero_share"):
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
        blocks = report.get("realised_block_ratio")
        of_blocks = f" ({blocks:.1%} of the decoder blocks)" if blocks is not None else ""
        lines.append(f"Removed {ratio:.1%} of all parameters{of_blocks}, {_millions(report['params_before'])} → "
                     f"{_millions(report['params_after'])}, in {report['seconds']:.0f} s, peak memory "
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
