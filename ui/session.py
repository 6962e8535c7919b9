"""Per-process caches (read-only originals) and per-browser-session state.

Loaded originals are heavy (540 MB for the bundled model in float32), so one process keeps a few of them,
keyed by source, and every session borrows them read-only. Anything that mutates a model — even
temporarily, as the core's capture hooks do — runs on a private deep copy, so concurrent sessions can keep
running forward passes (evaluation, generation) on the shared original. Each session owns its pruned copy,
its analysis, its table of runs and its comparison rows; ``Session.close`` frees them when Gradio drops the
session.
"""
from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from comp_core import LoadedModel, load_model

log = logging.getLogger(__name__)

BUNDLED = "bundled"
_SERVER_TEMP: Path | None = None  # every session's download folder lives inside it; removed when the process exits


def server_temp_folder() -> Path:
    """This process's temporary folder (created on first use). Sessions put their download folders inside it,
    so stopping the server (Ctrl-C, a kill that lets Python exit) removes them all, even for browser tabs that
    never said goodbye."""
    global _SERVER_TEMP
    if _SERVER_TEMP is None or not _SERVER_TEMP.exists():
        _SERVER_TEMP = Path(tempfile.mkdtemp(prefix="comp-explorer-"))
        atexit.register(shutil.rmtree, _SERVER_TEMP, ignore_errors=True)
    return _SERVER_TEMP


def normalise_source(source: str | None) -> str:
    """One key per model: "bundled", an absolute path (folders, .gguf files) or a hub id."""
    text = (source or "").strip()
    if not text or text.lower() == BUNDLED:
        return BUNDLED
    path = Path(text).expanduser()
    if path.exists():
        return str(path.resolve())
    return text


class ModelCache:
    """Up to ``max_items`` loaded originals, least recently used dropped first; one load per key at a time.

    The models are shared by every session: treat them as read-only.
    """

    def __init__(self, max_items: int = 2, loader: Callable[..., LoadedModel] = load_model):
        self.max_items = max_items
        self.loader = loader
        self._items: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}

    def get(self, source: str | None, **kwargs) -> tuple[LoadedModel, bool]:
        """(loaded model, whether it came from this cache)."""
        key = normalise_source(source)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key], True
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # a second session asking for the same model waits for the first load
            with self._lock:
                if key in self._items:
                    return self._items[key], True
            loaded = self.loader(None if key == BUNDLED else key, **kwargs)
            with self._lock:
                self._items[key] = loaded
                while len(self._items) > self.max_items:
                    dropped, _ = self._items.popitem(last=False)
                    log.info("model cache: dropped %s", dropped)
            return loaded, False

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class ResultCache:
    """Small thread-safe dict for figures of the shared originals (perplexity, speed), keyed by tuples."""

    def __init__(self):
        self._items: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple):
        with self._lock:
            return self._items.get(key)

    def put(self, key: tuple, value) -> None:
        with self._lock:
            self._items[key] = value


@dataclass
class Session:
    """Everything one browser tab owns. Mutated in place by the handlers (Gradio keeps the object)."""

    model_key: str | None = None
    source_was_empty: bool = False  # no model path was typed, so the bundled default was loaded
    loaded: LoadedModel | None = None
    controls_key: str | None = None  # the model whose layers / dense kinds the sidebar's controls hold (None: none)
    calib_key: tuple | None = None
    samples: Any = None  # LongTensor[n, seq_len]
    analysis: Any = None  # ui.tabs.analyse.Analysis (its plan, settings and calibration key)
    what_if: Any = None  # the what-if the Analyse tab shows now (comp_core.methods.comp.whatif.WhatIf)
    neuron_view_key: tuple | None = None  # what the neuron maps on screen say (to skip re-sending them)
    pruned: Any = None  # the latest pruned model (a private copy)
    result: Any = None  # its PruneResult
    pruned_run: str | None = None  # run id of ``pruned``
    runs: list[dict] = field(default_factory=list)
    run_settings: dict[str, Any] = field(default_factory=dict)  # run id -> the settings dataclass it ran with
    answers: dict[str, Any] = field(default_factory=dict)  # run id -> ui.report.Answers from Try it
    all_columns: bool = False  # the runs table shows every column (else the few a comparison needs)
    protected_fixed: list | None = None  # protected layers after refusing typed entries (its echo keeps the note)
    compare_rows: list[dict] = field(default_factory=list)  # Compare tab: one dict per row, kept across runs
    figures: dict[str, Any] = field(default_factory=dict)  # name -> plotly figure, for export
    cancel: threading.Event = field(default_factory=threading.Event)
    busy: threading.Lock = field(default_factory=threading.Lock)
    _workdir: Path | None = None

    @classmethod
    def new(cls) -> "Session":
        return cls()

    def __deepcopy__(self, memo):  # gr.State deep-copies initial values; a fresh Session is made per tab anyway
        return self

    @property
    def workdir(self) -> Path:
        """A private temporary folder for downloads (removed by ``close``, and with the server's folder at exit)."""
        if self._workdir is None or not self._workdir.exists():
            self._workdir = Path(tempfile.mkdtemp(prefix="session-", dir=server_temp_folder()))
        return self._workdir

    def set_model(self, key: str, loaded: LoadedModel) -> None:
        """Switch to another original: everything derived from the old one is dropped (the runs table stays)."""
        self.model_key, self.loaded = key, loaded
        self.calib_key = self.samples = None
        self.analysis = None
        self.drop_pruned()
        self.figures.clear()

    def controls_filled(self) -> bool:
        """Whether the sidebar's protected-layer and dense-kind controls were filled for the current model; until
        they are, their (empty) values mean "the defaults", not "nothing"."""
        return self.model_key is not None and self.controls_key == self.model_key

    def drop_pruned(self) -> None:
        self.pruned = self.result = self.pruned_run = None

    def close(self) -> None:
        """Free the heavy objects and the download folder (Gradio's State delete_callback)."""
        self.cancel.set()
        self.loaded = self.samples = self.analysis = None
        self.compare_rows.clear()
        self.drop_pruned()
        self.figures.clear()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
