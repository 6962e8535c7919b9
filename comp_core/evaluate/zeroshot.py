"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness, on the model in memory.

``evaluate_tasks(model, tokenizer, ["boolq", "piqa"], limit=100)`` wraps the already-loaded model in the
harness's ``HFLM`` and runs ``lm_eval.simple_evaluate``: the harness's own prompts (``doc_to_text``,
``doc_to_target``, ``doc_to_choice``, ``process_docs``) and metrics (``acc``, ``acc_norm``), its first-N
``limit``. The harness is an optional dependency (``pip install -e '.[eval]'``), imported lazily.

Where the items come from follows :mod:`comp_core.data`: when ``COMP_DATA_DIR`` is set, the tasks of
``LOCAL_TASKS`` are read *only* from ``<COMP_DATA_DIR>/zeroshot/<task>/`` (the layout of the shared/data
mirror), converted at load time to the rows and field names of the Hugging Face data set the harness's
task config names, and handed to that same config through its ``custom_dataset`` hook (``task_config``);
nothing else in the config changes. Any other task name, and every task when ``COMP_DATA_DIR`` is unset, is
the harness's task as shipped, which loads its data from the hub.

Local copies and how each becomes what the harness reads:

* ``boolq``: ``boolq/val.jsonl.gz`` (SuperGLUE dev, 3,270): ``label`` "true"/"false" -> 1/0 (``aps/super_glue``);
* ``piqa``: ``piqa/valid.jsonl`` + ``valid-labels.lst`` (1,838): ``goal, sol1, sol2`` + ``label`` (``baber/piqa``);
* ``winogrande``: ``winogrande/dev.jsonl`` (+ ``dev-labels.lst``, checked) (1,267, ``winogrande_xl`` validation);
* ``arc_easy``: ``arc_easy/ARC-Easy-Test.jsonl`` (2,376, the split the harness scores) and ``ARC-Easy-Dev.jsonl``
  (validation): ``question.stem`` -> ``question``, ``question.choices`` -> ``choices{text, label}``
  (``allenai/ai2_arc``);
* ``hellaswag``: ``hellaswag/hellaswag_val_full.txt.bz2`` (llama.cpp's 6 lines an item, 10,042). That file keeps
  only ``activity_label: ctx`` after its own clean-up, so ``ctx_a``/``ctx_b`` are rebuilt (``_split_hellaswag_ctx``)
  for the harness's ``ctx_a + " " + ctx_b.capitalize()``; scores are close to, not guaranteed equal to, the
  original jsonl's (see the folder's PROVENANCE.md).

``arc_challenge`` has no local copy: it runs only where the hub is reachable (``NO_LOCAL_COPY``).
"""
from __future__ import annotations

import bz2
import contextlib
import functools
import gzip
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data import DATA_DIR_ENV, DataError, data_dir, json_records
from ..events import ProgressCallback, emit

log = logging.getLogger(__name__)

ZEROSHOT_FOLDER = "zeroshot"  # under $COMP_DATA_DIR
INSTALL_HINT = "pip install -e '.[eval]'"
DEFAULT_TASKS = ("boolq", "piqa", "winogrande", "arc_easy", "arc_challenge", "hellaswag")
NO_LOCAL_COPY = {
    "arc_challenge": "ARC-Challenge has no local copy in the data folder; it runs only where the Hugging Face hub "
                     "is reachable",
}


class ZeroShotError(ValueError):
    """The harness is missing, a task is unknown, or its data could not be loaded."""


Rows = list[dict]


@dataclass(frozen=True)
class LocalTask:
    """One harness task with a local copy: ``files[split]`` under ``<data dir>/zeroshot/<folder>/``.

    ``read(paths)`` turns ``{split: Path}`` into ``{split: rows}`` with the hub data set's field names.
    """

    folder: str
    files: dict[str, tuple[str, ...]]  # split -> candidate file names (first existing wins); extras below
    read: Callable[[dict[str, Path]], dict[str, Rows]]
    description: str
    note: str = ""


# ---------------------------------------------------------------------------------------------- reading


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _lines(path: Path) -> list[str]:
    try:
        with _open_text(path) as handle:
            return handle.read().splitlines()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({exc})") from exc


def _jsonl(path: Path) -> Rows:
    rows = [record for _, record in json_records(path, _lines(path))]
    if not rows:
        raise DataError(f"{path}: no items")
    return rows


def _labels(path: Path, allowed: set[str], n: int, items: Path) -> list[str]:
    labels = [line.strip() for line in _lines(path) if line.strip()]
    if len(labels) != n:
        raise DataError(f"{path}: {len(labels)} labels for {n} items in {items}")
    bad = sorted(set(labels) - allowed)
    if bad:
        raise DataError(f"{path}: unexpected labels {bad[:5]}; expected {sorted(allowed)}")
    return labels


def _fields(path: Path, rows: Rows, needed: Sequence[str]) -> None:
    for i, row in enumerate(rows):
        missing = [k for k in needed if k not in row]
        if missing:
            raise DataError(f"{path}: item {i} lacks {missing}")


def read_boolq(paths: dict[str, Path]) -> dict[str, Rows]:
    """SuperGLUE BoolQ: ``question, passage, idx, label`` with ``label`` 0 (False) / 1 (True), as ``aps/super_glue``."""
    path = paths["validation"]
    rows = _jsonl(path)
    _fields(path, rows, ("question", "passage", "idx", "label"))
    out = []
    for row in rows:
        label = row["label"]
        if isinstance(label, str):
            label = {"true": True, "false": False}.get(label.strip().lower(), label)
        if not isinstance(label, bool):
            raise DataError(f"{path}: item {row['idx']} has label {row['label']!r}; expected true/false")
        out.append({"question": row["question"], "passage": row["passage"], "idx": int(row["idx"]),
                    "label": int(label)})
    return {"validation": out}


def read_piqa(paths: dict[str, Path]) -> dict[str, Rows]:
    """PIQA: ``goal, sol1, sol2`` from the jsonl and ``label`` (0/1) from the labels file, as ``baber/piqa``."""
    path = paths["validation"]
    rows = _jsonl(path)
    _fields(path, rows, ("goal", "sol1", "sol2"))
    labels = _labels(paths["validation-labels"], {"0", "1"}, len(rows), path)
    return {"validation": [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
                           for r, y in zip(rows, labels)]}


def read_winogrande(paths: dict[str, Path]) -> dict[str, Rows]:
    """WinoGrande: ``sentence, option1, option2, answer`` ("1"/"2", a string as on the hub); labels file checked."""
    path = paths["validation"]
    rows = _jsonl(path)
    _fields(path, rows, ("sentence", "option1", "option2", "answer"))
    out = [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": str(r["answer"])}
           for r in rows]
    if "validation-labels" in paths:
        labels = _labels(paths["validation-labels"], {"1", "2"}, len(out), path)
        wrong = [i for i, (r, y) in enumerate(zip(out, labels)) if r["answer"] != y]
        if wrong:
            raise DataError(f"{path}: answers of items {wrong[:5]} differ from {paths['validation-labels']}")
    bad = [i for i, r in enumerate(out) if r["answer"] not in ("1", "2") or "_" not in r["sentence"]]
    if bad:
        raise DataError(f"{path}: items {bad[:5]} lack a '_' blank or an answer of '1'/'2'")
    return {"validation": out}


def read_arc(paths: dict[str, Path]) -> dict[str, Rows]:
    """ARC (official jsonl): ``id, question, choices{text, label}, answerKey``, as ``allenai/ai2_arc``."""
    out = {}
    for split, path in paths.items():
        rows = []
        for i, row in enumerate(_jsonl(path)):
            try:
                question = row["question"]
                choices = question["choices"]
                converted = {"id": row["id"], "question": question["stem"],
                             "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                             "answerKey": row["answerKey"]}
            except (KeyError, TypeError) as exc:
                raise DataError(f"{path}: item {i} lacks {exc}; expected id, question.stem, question.choices, "
                                "answerKey") from exc
            if converted["answerKey"] not in converted["choices"]["label"]:
                raise DataError(f"{path}: item {i} answerKey {converted['answerKey']!r} is not a choice label")
            rows.append(converted)
        out[split] = rows
    return out


_SENTENCE_END = re.compile(r"[.!?] ")


def _split_hellaswag_ctx(ctx: str) -> tuple[str, str]:
    """(``ctx_a``, ``ctx_b``) from the joined context the text file keeps.

    On the hub, ActivityNet items have ``ctx_b`` = the unfinished last sentence (lower case, e.g. "he"), which the
    harness capitalises; WikiHow items end on a full stop with ``ctx_b`` empty. So: a context that ends on
    ``.``/``!``/``?``/a quote has no ``ctx_b``; otherwise ``ctx_b`` is what follows the last sentence end.
    """
    if not ctx or ctx[-1] in ".!?\"'":
        return ctx, ""
    ends = [m.end() for m in _SENTENCE_END.finditer(ctx)]
    if not ends:
        return ctx, ""
    return ctx[:ends[-1] - 1], ctx[ends[-1]:]


def read_hellaswag(paths: dict[str, Path]) -> dict[str, Rows]:
    """llama.cpp's HellaSwag text (6 lines an item: ``activity_label: ctx``, gold label, 4 endings) -> hub fields
    ``activity_label, ctx_a, ctx_b, ctx, endings, label`` (``label`` a string, as on the hub)."""
    path = paths["validation"]
    lines = _lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or len(lines) % 6:
        raise DataError(f"{path}: {len(lines)} lines; expected 6 lines an item (context, label, 4 endings)")
    rows = []
    for start in range(0, len(lines), 6):
        head, label, *endings = lines[start:start + 6]
        activity, sep, ctx = head.partition(": ")
        if not sep or label.strip() not in ("0", "1", "2", "3"):
            raise DataError(f"{path}:{start + 1}: expected 'activity: context' then a label 0-3, got {head[:60]!r}, "
                            f"{label!r}")
        ctx_a, ctx_b = _split_hellaswag_ctx(ctx)
        rows.append({"ind": start // 6, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
                     "endings": endings, "label": label.strip()})
    return {"validation": rows}


LOCAL_TASKS: dict[str, LocalTask] = {
    "boolq": LocalTask("boolq", {"validation": ("val.jsonl.gz", "val.jsonl")}, read_boolq, "BoolQ (SuperGLUE dev)"),
    "piqa": LocalTask("piqa", {"validation": ("valid.jsonl",), "validation-labels": ("valid-labels.lst",)},
                      read_piqa, "PIQA validation"),
    "winogrande": LocalTask("winogrande", {"validation": ("dev.jsonl",), "validation-labels": ("dev-labels.lst",)},
                            read_winogrande, "WinoGrande 1.1 dev (winogrande_xl)"),
    "arc_easy": LocalTask("arc_easy", {"test": ("ARC-Easy-Test.jsonl",), "validation": ("ARC-Easy-Dev.jsonl",)},
                          read_arc, "ARC-Easy (test scored, dev as validation)"),
    "hellaswag": LocalTask("hellaswag", {"validation": ("hellaswag_val_full.txt.bz2", "hellaswag_val_full.txt")},
                           read_hellaswag, "HellaSwag validation (llama.cpp text format)",
                           note="llama.cpp text copy: ctx_a/ctx_b rebuilt and text pre-cleaned, so scores are close "
                                "to, not guaranteed equal to, the original jsonl's"),
}
_OPTIONAL_FILES = {("winogrande", "validation-labels")}

# The harness's configs of DEFAULT_TASKS inside lm_eval/tasks/, read directly: looking a name up in the full task
# index means building it (about 15k configs, seconds). Other names go through the index.
HARNESS_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
}


def _local_root(root: str | Path | None) -> Path | None:
    if root is not None:
        return Path(root).expanduser()
    return data_dir()


def local_files(task: str, root: str | Path | None = None) -> dict[str, Path]:
    """``{split: Path}`` of a local task under ``<root or $COMP_DATA_DIR>/zeroshot/``; a missing file is a
    DataError naming the expected path."""
    spec = LOCAL_TASKS[task]
    base = _local_root(root)
    if base is None:
        raise DataError(f"{task}: {DATA_DIR_ENV} is not set; point it at a folder holding "
                        f"{ZEROSHOT_FOLDER}/{spec.folder}/{' and '.join(f[0] for f in spec.files.values())}")
    folder = base / ZEROSHOT_FOLDER / spec.folder
    paths = {}
    for split, names in spec.files.items():
        found = next((folder / n for n in names if (folder / n).is_file()), None)
        if found is None:
            if (task, split) in _OPTIONAL_FILES:
                continue
            expected = " or ".join(str(folder / n) for n in names)
            raise DataError(f"{spec.description}: local file not found under {DATA_DIR_ENV}={base}: "
                            f"expected {expected}")
        paths[split] = found
    return paths


def harness_installed() -> bool:
    """Whether lm-eval can be imported (without importing it: it takes seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec("lm_eval") is not None
    except (ImportError, ValueError):
        return False


def runnable_tasks(root: str | Path | None = None) -> list[str]:
    """The standard tasks (``DEFAULT_TASKS``) that can run here: with a data folder, those whose local copy
    is complete; without one, all of them (they load from the hub)."""
    base = _local_root(root)
    if base is None:
        return list(DEFAULT_TASKS)
    out = []
    for task in DEFAULT_TASKS:
        if task not in LOCAL_TASKS:
            continue
        try:
            local_files(task, base)
        except DataError:
            continue
        out.append(task)
    return out


def load_local_docs(task: str, root: str | Path | None = None) -> dict[str, Rows]:
    """The local copy of ``task`` as ``{split: rows}`` with the hub data set's field names (see module doc)."""
    if task not in LOCAL_TASKS:
        raise ZeroShotError(f"no local copy of {task!r}; local tasks: {', '.join(LOCAL_TASKS)}"
                            + (f" ({NO_LOCAL_COPY[task]})" if task in NO_LOCAL_COPY else ""))
    return LOCAL_TASKS[task].read(local_files(task, root))


# ---------------------------------------------------------------------------------------------- harness


def require_harness():
    """``lm_eval`` (imported lazily), or a ZeroShotError naming the install command."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (HFLM)
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as exc:
        missing = "lm-eval" if exc.name in (None, "lm_eval") else f"{exc.name}, which lm-eval needs,"
        raise ZeroShotError(f"zero-shot tasks need lm-evaluation-harness (lm-eval 0.4): {missing} is not installed; "
                            f"{INSTALL_HINT}") from exc
    return lm_eval


def harness_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=2)
def _task_manager(full: bool):
    """The harness's TaskManager: the full index (seconds to build) only when a task is looked up by name; tasks
    passed as whole config dicts need no index."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=full)


def harness_config(task: str) -> dict | None:
    """The harness's own config of a ``HARNESS_YAML`` task (its YAML with includes merged and ``!function``s
    resolved, as its task index would load it), or None for any other name or a moved file."""
    require_harness()
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    if task not in HARNESS_YAML:
        return None
    path = Path(lm_eval.tasks.__file__).parent / HARNESS_YAML[task]
    if not path.is_file():
        return None
    config = load_yaml(path, resolve_func=True)
    if config.get("task") != task:
        return None
    config.pop("tag", None)  # the index drops it too when it builds a single task
    return config


def task_config(task: str, root: str | Path | None = None) -> dict:
    """The harness's own config of a ``LOCAL_TASKS`` task (its YAML, functions resolved) reading the local copy.

    Only the data source changes: ``custom_dataset`` returns the converted rows as a ``datasets.DatasetDict``,
    ``dataset_path`` names the local folder, and a split without a local file (the train split) is dropped.
    Prompts, targets, choices, ``process_docs``, metrics and version stay the harness's.
    """
    paths = local_files(task, root)  # missing files fail here, before anything is read
    config = harness_config(task)
    if config is None:
        entry = _task_manager(True).task_index.get(task)  # the file moved in this lm-eval version
        if entry is None or entry.yaml_path is None:
            raise ZeroShotError(f"lm-eval {harness_version()} has no task config for {task!r}")
        from lm_eval.tasks._yaml_loader import load_yaml

        config = load_yaml(entry.yaml_path, resolve_func=True)
        config.pop("tag", None)
    splits = {s for s in paths if s in ("train", "validation", "test")}
    for key, split in (("training_split", "train"), ("validation_split", "validation"), ("test_split", "test")):
        if config.get(key) and split not in splits:
            config[key] = None
    if config.get("fewshot_split") not in (None, *splits):
        config["fewshot_split"] = None
    config.update(task=task, dataset_path=str(next(iter(paths.values())).parent), dataset_name=None,
                  dataset_kwargs=None, custom_dataset=functools.partial(_local_dataset, task, tuple(paths.items())))
    return config


def _local_dataset(task: str, paths: tuple[tuple[str, Path], ...], **_metadata):
    """``custom_dataset`` hook: the harness calls it with the task's metadata, which the local copy ignores."""
    import datasets

    rows = LOCAL_TASKS[task].read(dict(paths))
    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs) for split, docs in rows.items()})


def task_specs(tasks: Sequence[str], root: str | Path | None = None) -> tuple[list, dict[str, str]]:
    """What to hand ``simple_evaluate`` for each task name, and where its data comes from.

    With a data folder (``root`` or ``$COMP_DATA_DIR``), ``LOCAL_TASKS`` become local configs (``task_config``)
    and other tasks load from the hub (with a warning); without one, every task is the harness's own. A task of
    ``HARNESS_YAML`` is its config dict (``harness_config``), any other a name for the harness's index.
    """
    base = _local_root(root)
    specs: list = []
    sources: dict[str, str] = {}
    for task in tasks:
        if base is not None and task in LOCAL_TASKS:
            config = task_config(task, base)
            specs.append(config)
            sources[task] = config["dataset_path"]
        else:
            if base is not None:
                log.warning("%s: %s; lm-eval loads it from the Hugging Face hub", task,
                            NO_LOCAL_COPY.get(task, f"no local copy under {DATA_DIR_ENV}={base} "
                                                    f"(local tasks: {', '.join(LOCAL_TASKS)})"))
            specs.append(harness_config(task) or task)
            sources[task] = "hub"
    return specs, sources


def _hub_hint(task: str, base: Path | None) -> str:
    if task in NO_LOCAL_COPY:
        return NO_LOCAL_COPY[task]
    if task in LOCAL_TASKS and base is None:
        spec = LOCAL_TASKS[task]
        return (f"set {DATA_DIR_ENV} to a folder holding {ZEROSHOT_FOLDER}/{spec.folder}/"
                f"{' and '.join(f[0] for f in spec.files.values())} (e.g. the shared/data mirror)")
    return f"local copies exist only for {', '.join(LOCAL_TASKS)}"


def build_tasks(tasks: Sequence[str], root: str | Path | None = None) -> tuple[dict, dict[str, str]]:
    """Instantiate the harness's Task objects (this loads every data set) -> ``({name: Task}, sources)``.

    Fails with one clear ZeroShotError per bad task before any model time is spent: an unknown name, a hub data
    set that cannot be reached, a local file missing (DataError).
    """
    require_harness()
    if not tasks:
        raise ZeroShotError("no zero-shot tasks given")
    if len(set(tasks)) != len(tasks):
        raise ZeroShotError(f"a task is listed twice: {', '.join(tasks)}")
    base = _local_root(root)
    specs, sources = task_specs(tasks, base)
    built: dict = {}
    for name, spec in zip(tasks, specs):
        by_name = isinstance(spec, str)
        manager = _task_manager(by_name)
        if by_name and name not in manager.task_index:
            raise ZeroShotError(f"unknown lm-eval task {name!r} (lm-eval {harness_version()} lists "
                                f"{len(manager.all_tasks)} tasks; see `lm-eval ls tasks`)")
        try:
            loaded = manager.load([spec])["tasks"]
        except DataError:
            raise
        except Exception as exc:  # network, missing hub data set, a harness error while loading
            where = "from the Hugging Face hub" if sources[name] == "hub" else f"from {sources[name]}"
            raise ZeroShotError(f"{name}: lm-eval could not load its data {where}: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''} ({_hub_hint(name, base)})") from exc
        built.update(loaded)
    return built, sources


@dataclass
class ZeroShotReport:
    """The harness's output for some tasks: ``results[task]`` is its metrics dict as it names them
    (``"acc,none"``, ``"acc_stderr,none"``, ``"acc_norm,none"``, ...), ``n_samples[task]`` its
    ``{"original", "effective"}`` item counts; ``sources[task]`` a local folder or ``"hub"``."""

    results: dict[str, dict]
    n_samples: dict[str, dict]
    versions: dict[str, object]
    sources: dict[str, str]
    limit: int | None
    num_fewshot: int | None
    batch_size: int
    seconds: float
    harness: str = field(default_factory=lambda: f"lm-eval {harness_version()}")

    def metric(self, task: str, name: str) -> float | None:
        value = self.results.get(task, {}).get(f"{name},none")
        return value if isinstance(value, (int, float)) else None

    def headline(self) -> dict[str, float]:
        """One accuracy per task, the one pruning papers tabulate (LLM-Pruner, Wanda, COMP): acc_norm where the
        harness reports it (piqa, arc, hellaswag), else acc (boolq, winogrande)."""
        out = {}
        for task in self.results:
            value = self.metric(task, "acc_norm")
            value = self.metric(task, "acc") if value is None else value
            if value is not None:
                out[task] = float(value)
        return out

    def to_dict(self) -> dict:
        notes = {t: LOCAL_TASKS[t].note for t, s in self.sources.items()
                 if s != "hub" and t in LOCAL_TASKS and LOCAL_TASKS[t].note}
        return {"harness": self.harness, "limit": self.limit, "num_fewshot": self.num_fewshot,
                "batch_size": self.batch_size, "results": self.results, "n_samples": self.n_samples,
                "versions": self.versions, "sources": self.sources, "notes": notes, "seconds": self.seconds,
                "headline": self.headline()}

    def table(self) -> str:
        """A markdown table: items scored, acc and acc_norm with their standard errors (– where a task has none)."""
        def cell(task: str, name: str) -> str:
            value, err = self.metric(task, name), self.metric(task, f"{name}_stderr")
            if value is None:
                return "–"
            return f"{value:.4f} ± {err:.4f}" if err is not None else f"{value:.4f}"

        lines = ["| task | n | acc | acc_norm | data |", "|---|---:|---:|---:|---|"]
        for task in self.results:
            n = self.n_samples.get(task, {})
            count = f"{n.get('effective', '?')}/{n.get('original', '?')}"
            source = "hub" if self.sources.get(task) == "hub" else "local"
            lines.append(f"| {task} | {count} | {cell(task, 'acc')} | {cell(task, 'acc_norm')} | {source} |")
        return "\n".join(lines)


@contextlib.contextmanager
def _quiet_harness(quiet: bool) -> Iterator[None]:
    """The harness warns about things this wrapper does on purpose (a model object, custom data sets, --limit):
    keep its loggers at ERROR unless the caller asked for INFO/DEBUG logs; ``quiet`` also hides the ``datasets``
    progress bars (the harness's own tqdm bars stay)."""
    import datasets

    loggers = [logging.getLogger("lm_eval")]
    before = [lg.level for lg in loggers]
    bars = datasets.is_progress_bar_enabled()
    if quiet or logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    if quiet:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        for lg, level in zip(loggers, before):
            lg.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def evaluate_tasks(model, tokenizer, tasks: Sequence[str], *, limit: int | None = None, batch_size: int = 1,
                   num_fewshot: int | None = None, root: str | Path | None = None, quiet: bool = False,
                   on_event: ProgressCallback | None = None) -> ZeroShotReport:
    """Run lm-eval's tasks on ``model`` (any loaded causal LM, pruned or not) with ``tokenizer``.

    ``limit``: the harness's first-N items of each task (None = all). ``batch_size``: HFLM's. ``num_fewshot``:
    None keeps each task's default (0 for the tasks above). ``root`` overrides ``$COMP_DATA_DIR``.
    The model is evaluated where it is (its device and dtype); it is not modified.
    """
    if tokenizer is None:
        raise ZeroShotError("zero-shot evaluation needs a tokenizer; the model was loaded without one")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ZeroShotError(f"limit must be an integer >= 1, got {limit!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ZeroShotError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    lm_eval = require_harness()
    from lm_eval.models.huggingface import HFLM

    start = time.perf_counter()
    with _quiet_harness(quiet):
        emit(on_event, "zeroshot", 0, 2, f"loading {', '.join(tasks)}")
        built, sources = build_tasks(list(tasks), root)
        emit(on_event, "zeroshot", 1, 2, f"evaluating {len(built)} task(s)")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(model=lm, tasks=list(built.values()), limit=limit, num_fewshot=num_fewshot,
                                         task_manager=_task_manager(False), log_samples=False)
    emit(on_event, "zeroshot", 2, 2, "done")
    if output is None:  # only non-zero ranks of a distributed run get None
        raise ZeroShotError("lm-eval returned no results")
    results = {task: dict(output["results"][task]) for task in built if task in output["results"]}
    return ZeroShotReport(results=results, n_samples={t: dict(output.get("n-samples", {}).get(t, {})) for t in results},
                          versions={t: output.get("versions", {}).get(t) for t in results},
                          sources={t: sources.get(t, "hub") for t in results}, limit=limit, num_fewshot=num_fewshot,
                          batch_size=batch_size, seconds=time.perf_counter() - start)
