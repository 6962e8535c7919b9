"""Calibration and evaluation text, following SparseGPT's ``datautils.py`` protocol.

Two entry points:

* ``get_calibration(name, tokenizer, n_samples, seq_len, seed)`` -> ``LongTensor[n_samples, seq_len]``
* ``get_eval_tokens(name, tokenizer, split)`` -> ``LongTensor[1, T]`` (one stream; the caller windows it)

Named sets are ``"c4"``, ``"wikitext2"`` and ``"ptb"`` (plus ``"data-free"`` for calibration only, and
``"sample"``, a short text shipped in the package for machines without the data sets); any other name is read
as a local file (``.txt``, ``.txt.gz``, ``.jsonl``, ``.jsonl.gz``, ``.json.gz``).

Where the text comes from: when ``COMP_DATA_DIR`` is set, named sets are read *only* from that folder,
laid out as ``DATA_LAYOUT`` below (the layout of the shared/data mirror), so a firewalled user gets
the same numbers as a connected one. When it is unset, the Hugging Face hub is tried through a lazy
``import datasets``, with the same ``load_dataset`` calls SparseGPT uses. If neither works a
``DataError`` says what to set and which file names are expected. Nothing is downloaded silently
when a local copy was asked for.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
import os
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .preflight import check_context
from .runtime import cache_of, hub_answers, with_cache

log = logging.getLogger(__name__)

DATA_DIR_ENV = "COMP_DATA_DIR"
DATA_FREE = "data-free"
SPLITS = ("train", "validation", "test")
LOCAL_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json.gz")
C4_EVAL_DOCS = 1100  # SparseGPT: ``valdata[:1100]``

_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}


class DataError(ValueError):
    """Calibration / evaluation text could not be found or has no usable content."""


@dataclass(frozen=True)
class _NamedSet:
    """A named text set: where its splits live locally and how to fetch them from the hub.

    ``files[split]`` lists candidate file names under ``<data dir>/<folder>/`` (first existing wins);
    ``kind`` says how a file is parsed: "rows" (one row per line), "jsonl" (documents with a text field).
    """

    folder: str
    kind: str
    files: dict[str, tuple[str, ...]]
    eval_join: str  # how evaluation rows are joined into one string
    calib_join: str  # how the calibration split's rows are joined (streams only; c4 samples documents)
    description: str


DATA_LAYOUT: dict[str, _NamedSet] = {
    "wikitext2": _NamedSet(
        folder="wikitext2",
        kind="rows",
        files={
            "train": ("wiki.train.raw",),
            "validation": ("wiki.valid.raw",),
            "test": ("wiki.test.raw",),
        },
        eval_join="\n\n",
        calib_join=" ",
        description="WikiText-2 raw (wikitext-2-raw-v1)",
    ),
    "ptb": _NamedSet(
        folder="ptb",
        kind="rows",
        files={
            "train": ("ptb.train.txt", "ptb.train.txt.gz"),
            "validation": ("ptb.valid.txt", "ptb.valid.txt.gz"),
            "test": ("ptb.test.txt", "ptb.test.txt.gz"),
        },
        eval_join=" ",
        calib_join=" ",
        description="Penn Treebank (ptb_text_only)",
    ),
    "c4": _NamedSet(
        folder="c4",
        kind="jsonl",
        files={
            # The full shards SparseGPT uses win when present; otherwise the shared/data samples.
            "train": ("c4-train.00000-of-01024.json.gz", "c4-train.00000-of-01024.first1000.jsonl.gz"),
            "validation": ("c4-validation.00000-of-00008.json.gz", "c4-validation.sample2000.jsonl.gz"),
        },
        eval_join=" ",
        calib_join="\n\n",  # only for the too-few-long-documents fallback
        description="C4 (allenai/c4, en)",
    ),
}
DATASETS: tuple[str, ...] = tuple(DATA_LAYOUT)
CALIBRATION_SETS: tuple[str, ...] = (*DATASETS, DATA_FREE)
# Texts shipped inside the package (written for the project, public domain; texts/PROVENANCE.md), so a machine
# without COMP_DATA_DIR or network can still calibrate and evaluate. Read like a local .txt file.
SHIPPED: dict[str, Path] = {"sample": Path(__file__).resolve().parent / "texts" / "sample.txt"}

# SparseGPT's C4 shards (``data_files``), read through ``datasets`` when no local mirror is set
_HUB_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


def data_dir() -> Path | None:
    """The local data mirror named by ``$COMP_DATA_DIR``, or None when unset (no guessing)."""
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


HUB_OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
HUB_PROBE_TIMEOUT_S = 3.0


def _datasets_installed() -> bool:
    return importlib.util.find_spec("datasets") is not None


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the named sets can come from the Hugging Face hub here: the ``datasets`` package is installed,
    the hub is not switched off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) and its endpoint answers within
    ``timeout`` seconds. Asked once per process: an importable ``datasets`` alone (lm-eval brings it) says
    nothing on an offline machine, where every load would fail after the page had preselected it."""
    if not _datasets_installed():
        return False
    if any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in HUB_OFFLINE_ENVS):
        return False
    if hub_answers("api/datasets/allenai/c4", timeout):
        return True
    log.info("named data sets need %s (the Hugging Face hub does not answer)", DATA_DIR_ENV)
    return False


def is_available(name: str) -> bool:
    """Whether ``name`` can really be read here: shipped, data-free, a local copy under ``$COMP_DATA_DIR``,
    or (with it unset) a Hugging Face hub that answers (``hub_reachable``)."""
    key = name.strip().lower()
    if key in SHIPPED or key == DATA_FREE:
        return True
    if key not in DATA_LAYOUT:
        return Path(name).expanduser().is_file()
    root = data_dir()
    if root is None:
        return hub_reachable()
    split = "validation" if key == "c4" else "test"
    return _local_file_for(key, split, root) is not None


def _normalise_split(split: str) -> str:
    split = _SPLIT_ALIASES.get(split.strip().lower(), split.strip().lower())
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def _layout_text(key: str) -> str:
    spec = DATA_LAYOUT[key]
    names = [f"{spec.folder}/{' or '.join(files)} ({split})" for split, files in spec.files.items()]
    return "; ".join(names)


def _unknown_name_error(name: str, allowed: Sequence[str]) -> DataError:
    return DataError(
        f"unknown data set {name!r}: valid names are {', '.join(repr(n) for n in (*allowed, *SHIPPED))}, "
        f"or a path to a local file ending in {', '.join(LOCAL_SUFFIXES)}"
    )


def _resolve(name: str, allowed: Sequence[str]) -> tuple[str, Path | None]:
    """Map a user-facing name to (registry key, None) or ("file", path)."""
    key = name.strip().lower()
    if key in SHIPPED:
        return "file", SHIPPED[key]
    if key in allowed:
        return key, None
    path = Path(name).expanduser()
    if path.is_file() or str(path).lower().endswith(LOCAL_SUFFIXES):
        if not str(path).lower().endswith(LOCAL_SUFFIXES):
            raise DataError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        return "file", path
    raise _unknown_name_error(name, allowed)


# --------------------------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({exc})") from exc


def json_records(path: Path, lines: Sequence[str]) -> list[tuple[int, dict]]:
    """The JSON objects of a JSON-lines file's ``lines`` with their line numbers (blank lines skipped); a
    ``DataError`` naming ``path`` and the line of the first one that is not a JSON object."""
    records = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object")
        records.append((line_no, record))
    return records


def _read_jsonl(path: Path) -> list[str]:
    """Documents' ``text`` fields, in file order (blank lines ignored)."""
    docs: list[str] = []
    for line_no, record in json_records(path, _read_text(path).splitlines()):
        if not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{line_no}: expected a JSON object with a string 'text' field")
        docs.append(record["text"])
    return docs


def _wikitext_rows(text: str) -> list[str]:
    """HF ``wikitext-2-raw-v1`` rows: the file's lines (newline kept), whitespace-only lines as ""."""
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def _check_usable(rows: Sequence[str], where: str) -> None:
    if not any(row.strip() for row in rows):
        raise DataError(f"{where}: no usable text (empty file or only whitespace / empty documents)")


@dataclass(frozen=True)
class _Source:
    """Rows of one split plus an identity string for the token cache."""

    rows: Sequence[str]
    origin: str


class _Column(Sequence):
    """Lazy ``Sequence[str]`` over one column of a HF ``Dataset`` (C4's train shard has 356k documents)."""

    def __init__(self, dataset, column: str):
        self._dataset = dataset
        self._column = column

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._dataset[index][self._column]


def _local_file_for(key: str, split: str, root: Path) -> Path | None:
    spec = DATA_LAYOUT[key]
    for file_name in spec.files.get(split, ()):
        path = root / spec.folder / file_name
        if path.is_file():
            return path
    return None


def _file_origin(path: Path) -> str:
    """Identity of a file's current contents for the token cache (path, size, modification time)."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _named_origin(key: str, split: str) -> str:
    root = data_dir()
    if root is None:
        return f"hub:{key}:{split}"
    path = _local_file_for(key, split, root)
    return _file_origin(path) if path is not None else f"missing:{root}"


def _load_local(key: str, split: str, root: Path) -> _Source:
    spec = DATA_LAYOUT[key]
    if not root.is_dir():
        raise DataError(f"{DATA_DIR_ENV}={root} is not a directory; expected a folder holding {_layout_text(key)}")
    if split not in spec.files:
        raise DataError(f"{key!r} has no {split!r} split; available: {', '.join(spec.files)}")
    path = _local_file_for(key, split, root)
    if path is None:
        expected = " or ".join(str(root / spec.folder / f) for f in spec.files[split])
        raise DataError(
            f"{spec.description} {split} split not found under {DATA_DIR_ENV}={root}: expected {expected}. "
            f"Full layout for {key!r}: {_layout_text(key)}"
        )
    if spec.kind == "jsonl":
        rows: list[str] = _read_jsonl(path)
    elif key == "wikitext2":
        rows = _wikitext_rows(_read_text(path))
    else:  # ptb: HF ``sentence`` = each line stripped
        rows = [line.strip() for line in _read_text(path).splitlines()]
    _check_usable(rows, str(path))
    return _Source(rows, _file_origin(path))


def _load_hub(key: str, split: str) -> _Source:
    """Same ``load_dataset`` calls as SparseGPT's datautils; any failure becomes a DataError with a fix."""
    hint = f"Set {DATA_DIR_ENV} to a local copy (e.g. the shared/data mirror) holding {_layout_text(key)}."
    try:
        import datasets  # lazy: an optional dependency ("hub" extra)
    except ImportError as exc:
        raise DataError(
            f"cannot load {key!r} ({split}): {DATA_DIR_ENV} is not set and the 'datasets' package is not installed. "
            + hint
        ) from exc
    try:
        if key == "wikitext2":
            dataset = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            rows: Sequence[str] = list(dataset["text"])
        elif key == "ptb":
            dataset = datasets.load_dataset("ptb_text_only", "penn_treebank", split=split)
            rows = list(dataset["sentence"])
        else:
            if split not in _HUB_C4_FILES:
                raise DataError(f"'c4' has no {split!r} split; available: {', '.join(_HUB_C4_FILES)}")
            dataset = datasets.load_dataset("allenai/c4", data_files={split: _HUB_C4_FILES[split]}, split=split)
            rows = _Column(dataset, "text")
    except DataError:
        raise
    except Exception as exc:  # network, missing script, hub errors: all mean "no data"
        raise DataError(f"cannot load {key!r} ({split}) from the Hugging Face hub: {exc}. " + hint) from exc
    if isinstance(rows, list):
        _check_usable(rows, f"hub {key} {split}")
    return _Source(rows, f"hub:{key}:{split}")


def _load_named(key: str, split: str) -> _Source:
    root = data_dir()
    return _load_local(key, split, root) if root is not None else _load_hub(key, split)


def _load_file(path: Path) -> tuple[_Source, bool]:
    """(source, is_documents): jsonl files hold documents, text files one whole text."""
    is_docs = str(path).lower().endswith((".jsonl", ".jsonl.gz", ".json.gz"))
    rows = _read_jsonl(path) if is_docs else [_read_text(path)]
    _check_usable(rows, str(path))
    return _Source(rows, _file_origin(path)), is_docs


def load_texts(name: str, split: str = "test") -> list[str]:
    """The raw rows of a split: WikiText-2 rows as HF lists them, PTB sentences, or C4/jsonl documents.

    Useful to inspect what a protocol joins; a local ``.txt`` file gives one row (its whole text).
    """
    key, path = _resolve(name, DATASETS)
    if path is not None:
        return list(_load_file(path)[0].rows)
    return list(_load_named(key, _normalise_split(split)).rows)


# ------------------------------------------------------------------------------------------ tokenising

_TOKEN_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_TOKEN_CACHE_SIZE = 6


def clear_token_cache() -> None:
    """Forget cached token streams (they are keyed by tokenizer name, so a retrained tokenizer needs this)."""
    _TOKEN_CACHE.clear()


def _encode(tokenizer, text: str) -> torch.Tensor:
    """``tokenizer(text).input_ids`` as ``LongTensor[T]`` with the tokenizer's default special tokens."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids  # (1, T)
    return ids[0].to(torch.long)


def _encode_cached(tokenizer, text_fn, key: tuple) -> torch.Tensor:
    """Tokenise once per (source, protocol, tokenizer); returns a copy so callers may edit it."""
    tok_name = getattr(tokenizer, "name_or_path", "") or ""
    if not tok_name:  # an anonymous tokenizer cannot be told apart from another one: never cache
        return _encode(tokenizer, text_fn())
    full_key = (*key, type(tokenizer).__name__, tok_name, len(tokenizer))
    if full_key not in _TOKEN_CACHE:
        _TOKEN_CACHE[full_key] = _encode(tokenizer, text_fn())
        while len(_TOKEN_CACHE) > _TOKEN_CACHE_SIZE:
            _TOKEN_CACHE.popitem(last=False)
    _TOKEN_CACHE.move_to_end(full_key)
    return _TOKEN_CACHE[full_key].clone()


# ------------------------------------------------------------------------------------------ evaluation


def get_eval_text(name: str, split: str = "test") -> str:
    """The evaluation string the standard protocol tokenises (see ``get_eval_tokens``)."""
    key, path = _resolve(name, DATASETS)
    if path is not None:
        source, is_docs = _load_file(path)
        return " ".join(source.rows) if is_docs else source.rows[0]
    split = _normalise_split(split)
    if key == "c4" and split == "test":
        split = "validation"  # C4 has no test split; SparseGPT evaluates on validation
    source = _load_named(key, split)
    rows = source.rows[:C4_EVAL_DOCS] if key == "c4" else source.rows
    return DATA_LAYOUT[key].eval_join.join(rows)


def get_eval_tokens(name: str, tokenizer, split: str = "test") -> torch.LongTensor:
    """One token stream ``LongTensor[1, T]`` for perplexity, tokenised once as SparseGPT/Wanda do.

    Protocol (``tokenizer(text, return_tensors="pt").input_ids`` with the tokenizer's default
    special tokens, so a Llama tokenizer adds one BOS at the very start):

    * ``wikitext2``: the split's HF rows (file lines, whitespace-only lines as ``""``) joined with ``"\\n\\n"``;
    * ``ptb``: the split's sentences (lines stripped) joined with ``" "`` (SparseGPT's ``ptb_new`` on test);
    * ``c4``: the first 1100 validation documents joined with ``" "`` (``split="test"`` means validation).
      SparseGPT then keeps only ``256 * seq_len`` tokens; here the full stream is returned and the caller
      decides how many windows to use;
    * local ``.txt[.gz]``: the whole text; ``.jsonl[.gz]``: all documents joined with ``" "`` (split ignored).

    Results are cached in-process per (set, split, source file, tokenizer name and size).
    """
    key, path = _resolve(name, DATASETS)
    if path is not None:
        origin = _file_origin(path)
    else:
        split = _normalise_split(split)
        origin = _named_origin(key, "validation" if key == "c4" and split == "test" else split)
    ids = _encode_cached(tokenizer, lambda: get_eval_text(name, split), ("eval", key, split, origin))
    if ids.numel() < 2:
        raise DataError(f"{name!r} ({split}) tokenises to {ids.numel()} token(s); nothing to evaluate")
    return ids.unsqueeze(0)  # (1, T)


# ----------------------------------------------------------------------------------------- calibration


def _check_calibration_args(n_samples: int, seq_len: int) -> None:
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")


def _random_windows(stream: torch.Tensor, n_samples: int, seq_len: int, rng: random.Random, what: str) -> torch.Tensor:
    """SparseGPT's windows: start ``i = rng.randint(0, T - seq_len - 1)``, take ``stream[i:i+seq_len]``."""
    total = stream.numel()
    if total <= seq_len:
        raise DataError(f"{what} has only {total} tokens; need more than seq_len={seq_len} for one window")
    starts = [rng.randint(0, total - seq_len - 1) for _ in range(n_samples)]
    return torch.stack([stream[i : i + seq_len] for i in starts])  # (n, seq_len)


def _document_windows(
    docs: Sequence[str], tokenizer, n_samples: int, seq_len: int, seed: int, what: str
) -> torch.Tensor:
    """C4 protocol with a fallback; see ``get_calibration``."""
    rng = random.Random(seed)
    n_docs = len(docs)
    lengths: dict[int, int] = {}  # doc index -> token count (memo; SparseGPT re-tokenises)
    long_ids: dict[int, torch.Tensor] = {}
    samples: list[torch.Tensor] = []
    while len(samples) < n_samples:
        index = rng.randint(0, n_docs - 1)
        if index not in lengths:
            ids = _encode(tokenizer, docs[index])
            lengths[index] = ids.numel()
            if ids.numel() > seq_len:
                long_ids[index] = ids
        if lengths[index] > seq_len:
            ids = long_ids[index]
            start = rng.randint(0, ids.numel() - seq_len - 1)
            samples.append(ids[start : start + seq_len])
        elif len(lengths) == n_docs and len(long_ids) < n_samples:
            log.warning(
                "%s: only %d of %d documents are longer than seq_len=%d tokens (need %d); "
                "falling back to random windows of all documents joined with '\\n\\n'",
                what, len(long_ids), n_docs, seq_len, n_samples,
            )
            stream = _encode(tokenizer, "\n\n".join(doc for doc in docs if doc.strip()))
            return _random_windows(stream, n_samples, seq_len, random.Random(seed), what)
    return torch.stack(samples)  # (n, seq_len)


def _data_free(model, tokenizer, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Sample ``n_samples`` sequences from the model itself (top-k 50, temperature 1, seeded, on CPU)."""
    if model is None:
        raise DataError("'data-free' calibration samples text from the model: pass model=...")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)  # CPU: same samples whatever the model's device
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is not None and 0 <= bos < vocab:
        first = torch.full((n_samples, 1), bos, dtype=torch.long)
    else:
        high = min(vocab, len(tokenizer)) if tokenizer is not None else vocab
        first = torch.randint(0, high, (n_samples, 1), generator=generator)
    tokens = [first]  # list of (n, 1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            past = None
            step_input = first.to(device)
            for _ in range(seq_len - 1):
                out = model(input_ids=step_input, use_cache=True, **with_cache(model, past))
                past = cache_of(out)
                logits = out.logits[:, -1, :].float()  # (n, V)
                top_values, top_ids = logits.topk(min(50, logits.shape[-1]), dim=-1)  # (n, k)
                probs = torch.softmax(top_values / 1.0, dim=-1).cpu()  # temperature 1.0
                choice = torch.multinomial(probs, 1, generator=generator)  # (n, 1)
                next_ids = top_ids.cpu().gather(1, choice)  # (n, 1)
                tokens.append(next_ids)
                step_input = next_ids.to(device)
    finally:
        model.train(was_training)
    return torch.cat(tokens, dim=1)  # (n, seq_len)


# The calibration budget every entry point uses by default: 64 sequences × 512 tokens (32 768 tokens) of a
# corpus — the knee of perplexity against seconds in docs/RESULTS.md ("levers"). Sampling from the model
# (data-free) costs a generation per token, and the shipped sample holds 1,520 SmolLM2 tokens, so both keep the
# paper's 10 × 128: with 64 × 512 the sample's windows would overlap many times over (no more information, 25
# times the tokens), and a first run on a laptop would take minutes instead of about one.
DEFAULT_CALIBRATION = (64, 512)
SHORT_SOURCE_CALIBRATION = (10, 128)


def default_calibration_size(name: str) -> tuple[int, int]:
    """(n_samples, seq_len) used when a user names a calibration source but no size."""
    key = name.strip().lower()
    return SHORT_SOURCE_CALIBRATION if key == DATA_FREE or key in SHIPPED else DEFAULT_CALIBRATION


def get_calibration(
    name: str,
    tokenizer,
    n_samples: int = DEFAULT_CALIBRATION[0],
    seq_len: int = DEFAULT_CALIBRATION[1],
    seed: int = 0,
    *,
    model=None,
) -> torch.LongTensor:
    """``n_samples`` calibration sequences of ``seq_len`` tokens, ``LongTensor[n_samples, seq_len]`` on CPU.

    Protocol (SparseGPT ``datautils.py``, with a local ``random.Random(seed)`` instead of the global RNG,
    which draws the same numbers as ``random.seed(seed)``):

    * ``c4`` (train split) and local ``.jsonl[.gz]`` files, documents: repeat ``n_samples`` times:
      draw ``d = rng.randint(0, n_docs - 1)`` until ``tokenizer(doc_d)`` has more than ``seq_len`` tokens,
      then ``i = rng.randint(0, len - seq_len - 1)`` and take tokens ``[i, i + seq_len)`` (documents may
      repeat). Fallback: if every document has been tokenised and fewer than ``n_samples`` are longer
      than ``seq_len``, all documents are joined with ``"\\n\\n"`` and the stream rule below is used with
      a fresh ``random.Random(seed)`` (a warning is logged).
    * ``wikitext2`` / ``ptb``, streams: the train split's rows (the validation split when the local mirror
      has no train file, as for WikiText-2 in shared/data; logged) are joined with ``" "`` and tokenised
      once; each sample is ``stream[i : i + seq_len]`` with ``i = rng.randint(0, T - seq_len - 1)``.
    * local ``.txt[.gz]`` files: the whole text tokenised once, then the stream rule.
    * ``"data-free"``: sequences sampled from ``model`` starting at BOS (a random token if the tokenizer
      has none), top-k 50, temperature 1.0, seeded CPU ``torch.Generator``; needs ``model=``.

    Tokenisation uses the tokenizer's default special tokens, as SparseGPT does.
    """
    _check_calibration_args(n_samples, seq_len)
    check_context(model, seq_len)  # before reading, tokenising or sampling anything
    if name.strip().lower() == DATA_FREE:
        return _data_free(model, tokenizer, n_samples, seq_len, seed)
    key, path = _resolve(name, CALIBRATION_SETS)
    if path is not None:
        source, is_docs = _load_file(path)
        if is_docs:
            return _document_windows(source.rows, tokenizer, n_samples, seq_len, seed, str(path))
        stream = _encode_cached(tokenizer, lambda: source.rows[0], ("calib", "file", source.origin))
        return _random_windows(stream, n_samples, seq_len, random.Random(seed), str(path))
    if key == "c4":
        source = _load_named("c4", "train")
        return _document_windows(source.rows, tokenizer, n_samples, seq_len, seed, "c4 train")
    split = "train"
    root = data_dir()
    if root is not None and _local_file_for(key, "train", root) is None and _local_file_for(key, "validation", root):
        log.info("%s: no train split under %s; calibrating on the validation split", key, root)
        split = "validation"
    source = _load_named(key, split)
    join = DATA_LAYOUT[key].calib_join
    stream = _encode_cached(tokenizer, lambda: join.join(source.rows), ("calib", key, split, source.origin))
    return _random_windows(stream, n_samples, seq_len, random.Random(seed), f"{key} {split}")
