"""Plumbing every tab shares: error messages, progress, one task per tab, the shared originals, model and
calibration loading, and small formatting helpers. No pruning math, no layout.

Handlers are plain functions over a :class:`~ui.session.Session` and control values. Gradio calls them from
worker threads; tests call them directly (``progress`` defaults to a ``gr.Progress`` that does nothing outside
an event). Every error a user can cause comes back as a ``gr.Error`` with a plain-language message, never a
traceback (``user_errors``).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
from pathlib import Path

import gradio as gr
import torch

from comp_core import (Cancelled, DataError, ImpossibleRatioError, ModelLoadError, PruneEvent, UnsupportedModelError,
                       count_parameters, get_adapter, get_calibration, settings)
from comp_core.data import is_available
from comp_core.runtime import (cuda_peak_mb, cuda_peaks_mb, is_out_of_memory, out_of_memory_message, peak_rss_mb,
                              reset_peak_memory)

from comp_core.models.loading import check_load_options, load_model

from .session import ModelCache, ResultCache, Session, normalise_source
from comp_core.evaluate import zeroshot
from comp_core.evaluate.zeroshot import DEFAULT_TASKS

log = logging.getLogger(__name__)

MODELS = ModelCache(max_items=2)


def set_load_options(stream: str = "auto", device_map: str | None = None, max_memory: str | None = None) -> None:
    """How the GUI loads models (``load_model``'s ``stream``: auto, on, off; ``device_map``/``max_memory`` to
    spread them over GPUs): launch.py --stream, --device-map, --max-memory. Bad values are refused here, at start
    (``check_load_options``, a ``ValueError``)."""
    global MODELS
    check_load_options(stream, device_map, max_memory)
    MODELS = ModelCache(max_items=2, loader=functools.partial(load_model, stream=stream, device_map=device_map,
                                                              max_memory=max_memory))


ORIGINAL_RESULTS = ResultCache()  # (model key, what, ...) -> perplexity / speed of a shared original

EVAL_SETS = settings.EVAL_SETS  # the core's one list (the CLI's --eval takes the same names)
EVAL_LABELS = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4", "sample": "Sample text (shipped)"}
QUICK_WINDOWS = 8
ZEROSHOT_QUICK_LIMIT = 50  # items per zero-shot task in quick mode (the harness's first N)
EVAL_SEQ_LEN = 512
BUSY_WAIT_S = 120
STAGE_LABELS = {
    "load": "Loading model", "calibration": "Calibration data", "capture": "Capturing block inputs",
    "layer-removal": "Layer removal", "fisher": "Fisher scores", "neuron-pruning": "Neuron pruning",
    "evaluate": "Evaluating", "auto-sweep": "Auto: trying layer counts", "copy": "Copying model",
    "speed": "Generation speed", "compare": "Comparing", "apply": "Applying the plan",
    "search-database": "Search: pruning each layer at every share", "search": "Searching layer shares",
}
USER_ERRORS = (ModelLoadError, DataError, UnsupportedModelError, ImpossibleRatioError, ValueError,
               OSError)  # OSError: missing, existing or unwritable files, a full disk


# ---------------------------------------------------------------------------------------- errors, progress


def message(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text[0].upper() + text[1:] if text else text


def to_gr_error(err: BaseException, where: str = "handler") -> gr.Error:
    """The toast for an exception: a readable message for users' mistakes, the traceback only in the log."""
    if isinstance(err, gr.Error):
        return err
    if isinstance(err, Cancelled):
        return gr.Error("The run was stopped; nothing was changed.", title="Cancelled", print_exception=False)
    if is_out_of_memory(err):  # with the memory figures: peak RSS, what is available now (CUDA peak on a GPU)
        log.warning("%s: %s", where, err)
        return gr.Error(message(out_of_memory_message(err)), duration=None, title="Out of memory",
                        print_exception=False)
    if isinstance(err, USER_ERRORS):
        log.info("%s: %s", where, err)
        return gr.Error(message(err), duration=None, title="Cannot do that", print_exception=False)
    log.error("unexpected error in %s", where, exc_info=err)
    return gr.Error(f"Unexpected error ({type(err).__name__}): {message(err)}. Details are in the server log.",
                    duration=None, title="Something went wrong", print_exception=False)


def user_errors(fn):
    """Turn exceptions into ``gr.Error`` toasts with a readable message (the traceback goes to the log)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - every error becomes a message
                raise to_gr_error(err, fn.__name__) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise to_gr_error(err, fn.__name__) from None
    return wrapper


def fail(text: str, title: str) -> gr.Error:
    """A user-facing refusal (no traceback anywhere)."""
    return gr.Error(text, title=title, print_exception=False)


class Bridge:
    """Core ``PruneEvent``s and plain steps -> ``gr.Progress``; raises ``Cancelled`` once the tab asked to stop.

    ``last`` keeps the latest description, so a streaming handler can show it in its own status text too.
    """

    def __init__(self, progress, session: Session, prefix: str = ""):
        self.progress = progress
        self.session = session
        self.prefix = prefix
        self.stage_seconds: dict[str, float] = {}
        self.last = ""
        self._stage = None
        self._since = time.perf_counter()
        self._first_step = 0

    def check(self) -> None:
        if self.session.cancel.is_set():
            raise Cancelled("cancelled from the GUI")

    def _enter(self, stage: str | None) -> None:
        now = time.perf_counter()
        if self._stage is not None:
            self.stage_seconds[self._stage] = self.stage_seconds.get(self._stage, 0.0) + now - self._since
        self._stage, self._since = stage, now

    def finish(self) -> dict[str, float]:
        self._enter(None)
        return self.stage_seconds

    def _eta(self, event: PruneEvent) -> str:
        """" · about 40 s left" in this stage, from its pace so far (steps of one stage take about as long)."""
        done = event.step - self._first_step  # steps since this stage's first event (its clock's start)
        if done <= 0 or event.stage != self._stage or event.step >= event.total:
            return ""
        left = (time.perf_counter() - self._since) / done * (event.total - event.step)
        return f" · about {duration_text(left)} left" if left >= 1 else ""

    def _show(self, fraction, desc: str, **kwargs) -> None:
        self.last = desc
        with contextlib.suppress(Exception):  # progress is cosmetic
            self.progress(fraction, desc=f"{self.prefix}{desc}", **kwargs)

    def step(self, desc: str, fraction: float | None = None, stage: str | None = None) -> None:
        self.check()
        if stage is not None and stage != self._stage:
            self._enter(stage)
        self._show(fraction, desc)

    def __call__(self, event: PruneEvent) -> None:
        label = STAGE_LABELS.get(event.stage, event.stage)
        detail = f" — {event.message}" if event.message else ""
        self.check()
        if event.stage != self._stage:
            self._enter(event.stage)
            self._first_step = event.step
        if event.stage == "evaluate" and "set" in event.metrics:  # perplexity windows of one set and model
            name = event.metrics["set"]
            self._show((min(event.step, event.total), event.total),
                       f"Perplexity · {EVAL_LABELS.get(name, name)} · {event.metrics.get('model', '')}", unit="windows")
        elif event.total:
            self._show((min(event.step, event.total), event.total), f"{label}{detail}{self._eta(event)}",
                       unit="steps")
        else:
            self._show(None, f"{label}{detail}")


def details_html(lines, summary: str = "details") -> str:
    """A collapsed "details" section: how a run went, in the words the library and its tests use (paths,
    timings, autocast, compensation). Plain text first, this on demand — never styled as a warning.
    ``lines`` are the app's own HTML fragments (no user text)."""
    lines = [str(line).strip(" ·") for line in lines if line]
    if not lines:
        return ""
    items = "".join(f"<li>{line}</li>" for line in lines)
    return f"<details class='cx-details'><summary>{summary}</summary><ul>{items}</ul></details>"


def millions(count: int) -> str:
    """"135 M", "0.29 M", "1.2 B": a parameter count read at a glance."""
    if count >= 1e9:
        return f"{count / 1e9:,.1f} B"
    return f"{count / 1e6:,.0f} M" if count >= 1e7 else f"{count / 1e6:,.2f} M"


def duration_text(seconds: float) -> str:
    """"40 s", "3 min", "1 h 5 min": a time a person reads at a glance."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def stage_text(stages: dict[str, float]) -> str:
    """"capturing block inputs 1.2 s · layer removal 3.4 s" for the stages that took any time."""
    return " · ".join(f"{STAGE_LABELS.get(k, k).lower()} {v:.1f} s" for k, v in stages.items() if v >= 0.05)


@contextlib.contextmanager
def exclusive(session: Session):
    """One heavy task per tab at a time; a cancelled task still unwinding is waited for."""
    if not session.busy.acquire(timeout=BUSY_WAIT_S):
        raise fail("Another task of this tab is still running; wait for it or press Cancel.", "Busy")
    try:
        session.cancel.clear()
        yield
    finally:
        session.busy.release()


def request_cancel(session: Session) -> str:
    """Ask the running task of this tab to stop at its next step."""
    session.cancel.set()
    return "<span class='cx-muted'>Stopping… the current step finishes first.</span>"


def cancel_finished(session: Session) -> str:
    """Clears the "Stopping…" note once the stopped task has let go of the tab (at most ``BUSY_WAIT_S``)."""
    if session.busy.acquire(timeout=BUSY_WAIT_S):
        session.busy.release()
    return ""


def default_export_folder() -> Path:
    """Where the Export tab saves unless the person types another path: one absolute folder in the home
    directory, named on the tab, not a relative path inside wherever the server was started."""
    return Path.home() / "comp-explorer"


def export_path(text: str | None) -> str:
    """A typed export path, absolute: a relative one goes under ``default_export_folder()``."""
    path = Path((text or "").strip()).expanduser()
    return str(path if path.is_absolute() else default_export_folder() / path)


def default_eval_sets() -> list[str]:
    """WikiText-2 where a local copy (or the hub) has it; otherwise the text shipped with the package."""
    return ["wikitext2"] if is_available("wikitext2") else ["sample"]


def default_calibration(name: str) -> str:
    """``name`` when it can be read here; otherwise data-free calibration (samples from the model itself)."""
    return name if name == "file" or is_available(name) else "data-free"


def data_note() -> str:
    """What the page says when the data sets are not available locally ("" when they are)."""
    if is_available("wikitext2"):
        return ""
    return ("WikiText-2 is not available locally (set <code>COMP_DATA_DIR</code> to a folder with "
            "<code>wikitext2/wiki.test.raw</code>, or run where the Hugging Face hub answers, with the "
            "<code>hub</code> extra installed): perplexity uses the "
            "short <b>sample text</b> shipped with comp-explorer, which is not comparable with published "
            "WikiText-2 figures, and calibration defaults to <b>data-free</b> (text sampled from the model).")


def zeroshot_tasks() -> list[str]:
    """The zero-shot tasks the GUI offers: none without lm-eval, else those runnable with this data folder."""
    return zeroshot.runnable_tasks() if zeroshot.harness_installed() else []


def zeroshot_note() -> str:
    """Why no zero-shot task is offered (HTML), or "" when some are."""
    if not zeroshot.harness_installed():
        return ("Zero-shot accuracy needs lm-evaluation-harness: <code>pip install -e '.[eval]'</code>")
    if not zeroshot.runnable_tasks():
        return (f"No zero-shot task has a local copy under <code>${zeroshot.DATA_DIR_ENV}/"
                f"{zeroshot.ZEROSHOT_FOLDER}</code>.")
    return ""


def accuracy_columns(rows: list[dict]) -> list[str]:
    """"acc <task>" columns present in any of ``rows``, in the standard task order, then "mean acc"."""
    present = {k[4:] for r in rows for k in r if k.startswith("acc ")}
    tasks = [t for t in DEFAULT_TASKS if t in present] + sorted(present - set(DEFAULT_TASKS))
    return [f"acc {t}" for t in tasks] + (["mean acc"] if tasks else [])


def set_accuracy(row: dict, accuracy: dict[str, float]) -> None:
    """Store per-task accuracies in a table row and refresh its mean over every task it has."""
    row.update({f"acc {task}": value for task, value in accuracy.items()})
    values = [v for k, v in row.items() if k.startswith("acc ") and isinstance(v, (int, float))]
    row["mean acc"] = sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------- model + data


def model_name(session: Session) -> str:
    loaded = session.loaded
    if loaded is None:
        return "—"
    if loaded.kind == "bundled":
        return "SmolLM2-135M-Instruct"
    return Path(loaded.source).name if loaded.kind in ("hf-folder", "gguf") else loaded.source


def ensure_model(session: Session, source: str, bridge: Bridge):
    """The session's original for ``source`` (loaded once per process, shared read-only)."""
    key = normalise_source(source)
    session.source_was_empty = not (source or "").strip()
    if session.loaded is not None and session.model_key == key:
        return session.loaded
    bridge.step(f"Loading model {key} …" if not session.source_was_empty
                else "No model path typed: loading the bundled SmolLM2-135M-Instruct …", stage="load")
    loaded, _ = MODELS.get(key)
    if loaded.tokenizer is None:
        raise ModelLoadError(f"{key} has no tokenizer; calibration, evaluation and generation need one")
    get_adapter(loaded.model)  # unsupported architectures fail here, with the adapter's explanation
    session.set_model(key, loaded)
    return loaded


def calib_key(calib: str, calib_file: str, n_samples, seq_len, seed) -> tuple:
    name = (calib_file or "").strip() if calib == "file" else calib
    if calib == "file" and not name:
        raise DataError("choose a local calibration file (.txt, .txt.gz, .jsonl, .jsonl.gz or .json.gz)")
    try:
        n, length, s = int(n_samples), int(seq_len), int(seed)
    except (TypeError, ValueError):
        raise DataError("sample count, length and seed must be whole numbers") from None
    if not 1 <= n <= 1024 or not 8 <= length <= 8192:
        raise DataError("use 1–1024 calibration samples of 8–8192 tokens")
    return name, n, length, s


def ensure_samples(session: Session, calib, calib_file, n_samples, seq_len, seed, bridge: Bridge):
    key = calib_key(calib, calib_file, n_samples, seq_len, seed)
    if session.samples is not None and session.calib_key == key:
        return session.samples
    name, n, length, s = key
    bridge.step(f"Calibration data: {name}, {n} × {length} tokens …", stage="calibration")
    samples = get_calibration(name, session.loaded.tokenizer, n, length, s, model=session.loaded.model)
    session.samples, session.calib_key = samples, key
    return samples


def calib_text(key: tuple | None) -> str:
    if not key:
        return "—"
    name, n, length, seed = key
    return f"{Path(name).name if '/' in name else name} {n}×{length} s{seed}"


def n_layers(session: Session) -> int | None:
    if session.loaded is None:
        return None
    return len(get_adapter(session.loaded.model).blocks(session.loaded.model))


def dense_kinds(session: Session) -> list[str]:
    if session.loaded is None:
        return []
    return [d.kind for d in get_adapter(session.loaded.model).denses]


def model_card(session: Session, error: str = "") -> str:
    """The sidebar's model summary (HTML)."""
    if error:
        return f"<div class='cx-error'>⚠ {error}</div>"
    loaded = session.loaded
    if loaded is None:
        return "<span class='cx-muted'>No model loaded yet — <b>Analyse</b> or <b>Prune</b> loads it.</span>"
    params = count_parameters(loaded.model)
    where = {"bundled": "bundled", "hf-folder": "folder", "hf-hub": "hub", "gguf": "GGUF"}.get(loaded.kind, loaded.kind)
    family = get_adapter(loaded.model).family
    calib = f" · calibration {calib_text(session.calib_key)}" if session.calib_key else ""
    return (f"<b>{model_name(session)}</b> <span class='cx-muted'>({where}, {family})</span><br>"
            f"{n_layers(session)} layers · {params / 1e6:.1f} M parameters · loaded in {loaded.seconds:.1f} s{calib}"
            f"{placement_note(session)}"
            + ("<br><span class='cx-muted'>No model path was typed, so this is the bundled model.</span>"
               if session.source_was_empty else ""))


class RunMemory:
    """The peak memory of one GUI run: the process's peak is reset when the run starts (``reset_peak_memory``),
    so each run shows its own; ``text()`` for the status line. Another session running at the same time
    shares the process, so its allocations count too."""

    def __init__(self) -> None:
        self.per_run = reset_peak_memory()

    @property
    def peak_mb(self) -> float:
        return peak_rss_mb()

    def text(self) -> str:
        cuda = cuda_peak_mb()
        per_gpu = " on the fullest GPU" if len(cuda_peaks_mb()) > 1 else ""
        figures = f"peak memory {self.peak_mb:,.0f} MiB" + (f" · CUDA peak {cuda:,.0f} MiB{per_gpu}" if cuda else "")
        return figures if self.per_run else f"{figures} (the process's peak so far)"


def placement_note(session: Session) -> str:
    """Where the model's weights are when that is not plain memory: streamed from disk, or spread over GPUs."""
    loaded = session.loaded
    if loaded is None:
        return ""
    if loaded.streamed:
        return " · <b>streamed</b> from disk, one block at a time"
    if loaded.device_map:
        devices = sorted({str(v) for v in loaded.device_map.values()})
        return f" · <b>spread over</b> {len(devices)} device(s) ({', '.join(devices)}) by a device map"
    return ""


def weights_mb(model) -> float:
    """Bytes of the parameters (and kept-index buffers), in MB; a streamed model's blocks count at their size
    on disk's dtype though they are not in memory."""
    seen, total = set(), 0
    for p in model.parameters():
        key = ("meta", id(p)) if p.is_meta else (p.data_ptr(), tuple(p.shape))
        if key not in seen:
            seen.add(key)
            total += p.numel() * p.element_size()
    for b in model.buffers():
        if b.dtype in (torch.int64, torch.int32):  # kept-index buffers of compacted linears are saved too
            total += b.numel() * b.element_size()
    return total / 1e6


def eval_seq_len(model) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or EVAL_SEQ_LEN
    return int(min(EVAL_SEQ_LEN, limit))


def fmt(value, spec: str = "", empty: str = "—") -> str:
    """A table cell: numbers formatted, missing values as a dash."""
    if value is None or value == "" or (isinstance(value, float) and value != value):
        return empty
    return format(value, spec) if spec else str(value)
