"""Models larger than memory: a model whose blocks live on disk and come into memory one at a time.

``open_streamed(folder)`` builds the model's skeleton on the meta device, loads only what is outside the
blocks (embedding, final norm, head, rotary tables) and marks every block *streamed*: its parameters are
read from the folder's safetensors shards when the block is needed and dropped again afterwards. Two ways
a block comes in:

* **held** (``resident(block)``): the block loop holds each block while it replays it, collects its
  statistics and lets the method prune it, so the block is read once per visit, not once per batch;
* **transient**: any other forward (the capture forward, perplexity, generation) loads a block in a
  pre-forward hook and drops it after its forward hook; at most one transient block is in memory.

A block the method changed (the loop is told, and in-place updates are caught by the tensors' version
counters) is written to a spill folder when it is dropped, and read from there the next time: the pruned
model can be evaluated and saved (``export.save_pruned`` streams it shard by shard) without ever being
whole in memory. Peak memory ≈ one block + embedding/head + calibration activations + one block's
statistics, whatever the depth (docs/streaming.md; ``bench/streaming.py`` measures it).

Tensors are read with plain file reads (no mmap): mapped pages would count in the process's resident set
while the mapping lives, and the page cache they go through instead does not.

A streamed model deep-copies like any other (the copy shares the read-only source and spill files), which
is what keeps ``prune(model)`` (a copy) and the GUI's original/pruned pair working on it.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import math
import os
import shutil
import struct
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..runtime import available_memory_mb, prefer_mapped_allocations, release_free_memory
from .adapters import get_adapter
from .pruned import register_all

logger = logging.getLogger(__name__)

STREAM_MODES = ("auto", "on", "off")
# "auto" streams a folder whose weights (in the loading dtype) exceed this share of the available memory:
# the in-memory path holds the model, a working copy in the GUI and the statistics of a block on top.
AUTO_SHARE_OF_AVAILABLE = 0.25

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class StreamingError(ValueError):
    """A folder cannot be streamed, or a streamed model was used in a way that needs it whole."""


# ------------------------------------------------------------------------------------------ safetensors files

@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are in a safetensors file."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """The tensor table of one safetensors file (8-byte little-endian header length, JSON header, data)."""
    path = str(path)
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    table = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise StreamingError(f"{path}: tensor {name} has dtype {info['dtype']}, which streaming cannot read")
        start, end = info["data_offsets"]
        table[name] = TensorEntry(path, _DTYPES[info["dtype"]], tuple(info["shape"]), base + start, base + end)
    return table


def folder_index(folder: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every tensor of a model folder's safetensors files (sharded or not), by name."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise StreamingError(f"{folder} holds no *.safetensors file")
    index: dict[str, TensorEntry] = {}
    for f in files:
        for name, entry in read_header(f).items():
            if name in index:
                raise StreamingError(f"tensor {name} is in both {index[name].file} and {f}")
            index[name] = entry
    return index


def read_tensors(entries: dict[str, TensorEntry]) -> dict[str, torch.Tensor]:
    """Read tensors into fresh CPU memory, file by file, in offset order."""
    out = {}
    by_file = sorted(entries.items(), key=lambda item: (item[1].file, item[1].start))
    for file, group in itertools.groupby(by_file, key=lambda item: item[1].file):
        with open(file, "rb", buffering=0) as f:
            for name, e in group:
                raw = torch.empty(e.end - e.start, dtype=torch.uint8)
                f.seek(e.start)
                view = memoryview(raw.numpy())
                done = 0
                while done < len(view):
                    n = f.readinto(view[done:])
                    if not n:
                        raise StreamingError(f"{file} ends inside tensor {name}; the file is truncated")
                    done += n
                out[name] = raw.view(e.dtype).reshape(e.shape) if raw.numel() else torch.empty(e.shape, dtype=e.dtype)
    return out


def weight_bytes(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> int:
    """Bytes of a folder's tensors, as stored or (``dtype``) once converted for loading."""
    index = folder_index(folder)
    if dtype is None:
        return sum(e.end - e.start for e in index.values())
    size = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(e.shape) * (size if e.dtype.is_floating_point else e.dtype.itemsize) for e in index.values())


class ShardWriter:
    """Writes a model folder's weights one shard at a time (``model-0000k-of-0000n.safetensors``) and the
    index that maps every tensor to its shard: what a writer uses that never holds the whole model."""

    def __init__(self, folder: str | os.PathLike, n_files: int):
        self.folder = Path(folder)
        self.n_files = n_files
        self.weight_map: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.total = 0

    def write(self, tensors: dict[str, torch.Tensor], number: int) -> None:
        from safetensors.torch import save_file

        name = f"model-{number:05d}-of-{self.n_files:05d}.safetensors"
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(self.folder / name), metadata={"format": "pt"})
        for key, value in tensors.items():
            self.weight_map[key] = name
            self.shapes[key] = tuple(value.shape)
            self.total += value.numel() * value.element_size()

    def write_index(self) -> None:
        with open(self.folder / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))},
                      f, indent=2)


# ------------------------------------------------------------------------------------------------ spill folder

_SPILL_PREFIX = "comp-stream-"
_OWNER_FILE = "owner.pid"


def _sweep_stale(root: Path) -> None:
    """Remove spill folders whose process is gone (killed before its clean-up could run)."""
    for folder in root.glob(f"{_SPILL_PREFIX}*"):
        try:
            pid = int((folder / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or still being created
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # another user's live process
            pass


class SpillArea:
    """A temporary folder for the blocks a method changed; shared by a model and its deep copies (files are
    written once and never changed, so sharing them is safe). Removed when the last user is gone."""

    def __init__(self, root: str | os.PathLike | None = None):
        root = root or os.environ.get("COMP_STREAM_SPILL") or None
        _sweep_stale(Path(root or tempfile.gettempdir()))
        self.path = Path(tempfile.mkdtemp(prefix=_SPILL_PREFIX, dir=root))
        (self.path / _OWNER_FILE).write_text(str(os.getpid()))
        self._counter = itertools.count()
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def __deepcopy__(self, memo) -> "SpillArea":
        return self

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> Path:
        from safetensors.torch import save_file

        path = self.path / f"block-{index}-{next(self._counter)}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
        return path


# --------------------------------------------------------------------------------------------- the block store

@dataclass
class StreamStats:
    """What streaming did: block reads (from the source and the spill folder) and spilled blocks."""

    reads: int = 0
    spills: int = 0
    bytes_read: int = 0


class BlockStore:
    """Reads a streamed model's blocks from the source folder (or the spill folder once changed) and drops
    them again. Its state lives on the blocks themselves (``_comp_*`` attributes), so a deep copy of the
    model carries a consistent copy of it."""

    def __init__(self, index: dict[str, TensorEntry], prefix: str, device: torch.device,
                 spill: SpillArea | None = None):
        self.index = index
        self.prefix = prefix  # "model.layers"
        self.device = device
        self.spill = spill or SpillArea()
        self.spilled: dict[int, dict[str, TensorEntry]] = {}  # original block index -> its spilled tensors
        self.transient: nn.Module | None = None
        self.stats = StreamStats()
        # one forward at a time through the blocks: GUI sessions share a loaded original, and a block another
        # thread is running must not be dropped under it (taken in the pre-forward hook, freed after the forward)
        self.lock = threading.RLock()

    def __deepcopy__(self, memo) -> "BlockStore":
        """A copy for a deep-copied model: same source and spill folder (read-only files), its own state."""
        with self.lock:
            clone = BlockStore.__new__(BlockStore)
            memo[id(self)] = clone
            clone.index = self.index
            clone.prefix = self.prefix
            clone.device = self.device
            clone.spill = self.spill
            clone.spilled = dict(self.spilled)
            clone.transient = copy.deepcopy(self.transient, memo)
            clone.stats = StreamStats()
            clone.lock = threading.RLock()
            return clone

    # -- loading and dropping -------------------------------------------------------------------------------

    def _entries(self, block: nn.Module) -> dict[str, TensorEntry]:
        own = getattr(block, "_comp_entries", None)  # a block of its own (``stream_copy``), not the model's i-th
        if own is not None:
            return own
        i = block._comp_index
        if i in self.spilled:
            return self.spilled[i]
        return {name: self.index[f"{self.prefix}.{i}.{name}"] for name, _ in _local_parameters(block)}

    def load(self, block: nn.Module) -> None:
        if block._comp_loaded is not None:
            return
        # ordinary tensors even under an evaluation's inference mode: a later in-place change must be possible
        # and must show in the version counters
        with torch.inference_mode(False), torch.no_grad():
            self._load(block)

    def _load(self, block: nn.Module) -> None:
        if self.transient is not None and self.transient is not block:
            self.release(self.transient)
        entries = self._entries(block)
        missing = [name for name, _ in _local_parameters(block) if name not in entries]
        if missing:
            raise StreamingError(f"block {block._comp_index}: the checkpoint has no tensor for {missing[:4]}")
        tensors = read_tensors(entries)
        self.stats.reads += 1
        self.stats.bytes_read += sum(e.end - e.start for e in entries.values())
        snapshot = {}
        for name, (module, pname, param) in _local_parameters(block):
            value = tensors[name]
            if tuple(value.shape) != tuple(param.shape):
                raise StreamingError(f"block {block._comp_index}: {name} has shape {tuple(value.shape)} in the "
                                     f"checkpoint but {tuple(param.shape)} in the config")
            # no gradient: autocast caches its casts of weights that need one, for the whole forward, which
            # would keep every streamed block's bf16 copy alive until the capture forward ends
            new = nn.Parameter(value.to(device=self.device, dtype=param.dtype), requires_grad=False)
            module._parameters[pname] = new
            snapshot[name] = (id(new), new._version)
        block._comp_loaded = snapshot

    def release(self, block: nn.Module) -> None:
        """Drop the block's tensors, writing them to the spill folder first when they changed."""
        if block._comp_loaded is None:
            return
        if self.transient is block:
            self.transient = None
        params = dict((name, m[2]) for name, m in _local_parameters(block))
        changed = block._comp_modified or set(params) != set(block._comp_loaded) or any(
            (id(p), p._version) != block._comp_loaded[name] for name, p in params.items())
        if changed:
            path = self.spill.write(block._comp_index, params)
            entries = {name: e for name, e in read_header(path).items()}
            if getattr(block, "_comp_entries", None) is not None:
                block._comp_entries = entries
            else:
                self.spilled[block._comp_index] = entries
            self.stats.spills += 1
        with torch.inference_mode(False):  # ordinary (meta) tensors, as from ``load``
            for _, (module, pname, param) in _local_parameters(block):
                module._parameters[pname] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                         requires_grad=False)
        block._comp_loaded = None
        block._comp_modified = False
        release_free_memory()


def _local_parameters(block: nn.Module) -> list[tuple[str, tuple[nn.Module, str, nn.Parameter]]]:
    """(name inside the block, (owning module, attribute name, parameter)) for every parameter of a block."""
    out = []
    for mname, module in block.named_modules():
        for pname, param in module._parameters.items():
            if param is not None:
                out.append((f"{mname}.{pname}" if mname else pname, (module, pname, param)))
    return out


def _pre_forward(block: nn.Module, args, kwargs) -> None:
    store: BlockStore = block._comp_store
    store.lock.acquire()
    if block._comp_loaded is None:
        store.load(block)
        if block._comp_held == 0:
            store.transient = block


def _post_forward(block: nn.Module, args, kwargs, output) -> None:
    """Runs even when the forward raised (``always_call``), so the lock is always given back."""
    store: BlockStore = block._comp_store
    try:
        if block._comp_held == 0:
            store.release(block)
    finally:
        store.lock.release()


# ------------------------------------------------------------------------------------------------ public API

def is_streamed(model_or_block: nn.Module) -> bool:
    """Whether a model (or block) streams its blocks from disk."""
    if hasattr(model_or_block, "_comp_store"):
        return True
    return getattr(model_or_block, "_comp_streamed", False)


@contextlib.contextmanager
def resident(block: nn.Module, *, modifies: bool = False) -> Iterator[nn.Module]:
    """Keep a streamed block in memory for the duration (a no-op for ordinary blocks). ``modifies``: the body
    changes the block, so it is spilled when dropped even if no tensor was replaced."""
    store: BlockStore | None = getattr(block, "_comp_store", None)
    if store is None:
        yield block
        return
    with store.lock:
        store.load(block)
        if store.transient is block:
            store.transient = None
        block._comp_held += 1
    try:
        yield block
    finally:
        with store.lock:
            if modifies:
                block._comp_modified = True
            block._comp_held -= 1
            if block._comp_held == 0:
                store.release(block)


def copy_block(block: nn.Module) -> nn.Module:
    """A deep copy of a block; for a resident streamed block, one that shares its model's store (so that
    ``stream_copy`` can later make it a streamed block of its own) and runs without reading or dropping."""
    store: BlockStore | None = getattr(block, "_comp_store", None)
    if store is None:
        return copy.deepcopy(block)
    if block._comp_loaded is None:
        raise StreamingError("copy a streamed block only while it is resident (inside ``resident``)")
    with store.lock:
        clone = copy.deepcopy(block, {id(store): store})
    clone._comp_held = 1  # resident until ``stream_copy``: its forwards neither read nor drop it
    return clone


def stream_copy(clone: nn.Module, original: nn.Module) -> int:
    """Make ``clone`` (a ``copy_block`` of the resident streamed block ``original``, since changed, e.g. pruned)
    a streamed block of its own that can stand in the model's block list: the tensors that differ from the
    original's go to the spill folder, the equal ones are read from wherever the original's are; its memory is
    given back. Returns the bytes written. This is how a searched allocation keeps its database of pruned
    blocks on disk."""
    store: BlockStore = clone._comp_store
    originals = dict((name, m[2]) for name, m in _local_parameters(original))
    source = store._entries(original)
    own, unchanged = {}, {}
    for name, (_, _, param) in _local_parameters(clone):
        before = originals.get(name)
        if (before is not None and before.shape == param.shape and before.dtype == param.dtype
                and torch.equal(before, param)):
            unchanged[name] = source[name]
        else:
            own[name] = param
    entries = dict(unchanged)
    written = store.spill.write(clone._comp_index, own) if own else None
    if written is not None:
        entries.update(read_header(written))
    with torch.inference_mode(False):
        for _, (module, pname, param) in _local_parameters(clone):
            module._parameters[pname] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                     requires_grad=False)
    clone._comp_entries = entries
    clone._comp_written = written  # its own file: the only one ``discard_copy`` may delete
    clone._comp_loaded = None
    clone._comp_held = 0
    clone._comp_modified = False
    release_free_memory()
    return sum(p.numel() * p.element_size() for p in own.values())


def discard_copy(clone: nn.Module) -> None:
    """Delete the file a ``stream_copy`` wrote, once no model will use it (a variant the search did not keep);
    the tensors it shared with its original stay where they are."""
    written = getattr(clone, "_comp_written", None)
    if written is not None:
        Path(written).unlink(missing_ok=True)
        clone._comp_written = None


def mark_modified(block: nn.Module) -> None:
    """Tell a streamed block that it changed (the block loop does when a visitor says so)."""
    if hasattr(block, "_comp_store"):
        block._comp_modified = True


def stream_stats(model: nn.Module) -> StreamStats | None:
    store = _model_store(model)
    return store.stats if store is not None else None


def _model_store(model: nn.Module) -> BlockStore | None:
    for module in model.modules():
        store = getattr(module, "_comp_store", None)
        if store is not None:
            return store
    return None


def choose_streaming(mode: str | bool, folder: str | os.PathLike, dtype: torch.dtype | None) -> bool:
    """Whether to stream a folder model: "on"/"off", or "auto" = its weights exceed ``AUTO_SHARE_OF_AVAILABLE``
    of the memory available now."""
    if isinstance(mode, bool):
        return mode
    if mode not in STREAM_MODES:
        raise ValueError(f"stream must be one of {STREAM_MODES}, got '{mode}'")
    if mode != "auto":
        return mode == "on"

    available = available_memory_mb()
    if available is None:
        return False
    size = weight_bytes(folder, dtype)
    stream = size > AUTO_SHARE_OF_AVAILABLE * available * 2**20
    if stream:
        logger.info("streaming %s: its weights (%.2f GiB) exceed %.0f %% of the available memory (%.2f GiB)",
                    folder, size / 2**30, 100 * AUTO_SHARE_OF_AVAILABLE, available / 1024)
    return stream


def open_streamed(folder: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                  trust_remote_code: bool = False, spill_dir: str | os.PathLike | None = None) -> nn.Module:
    """A model of ``folder`` whose blocks stay on disk until needed (module docstring). ``dtype`` None: the
    checkpoint's own. Everything outside the blocks is loaded now; raises ``StreamingError`` when the
    folder's tensor names do not match the model's."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    register_all()
    prefer_mapped_allocations()  # freed block tensors and statistics go back to the OS, not to the heap
    folder = Path(folder)
    index = folder_index(folder)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    device = torch.device(device)
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    prefix = _module_name(model, blocks)
    store = BlockStore(index, prefix, device, SpillArea(spill_dir))

    block_params = {f"{prefix}.{i}.{name}" for i, b in enumerate(blocks) for name, _ in _local_parameters(b)}
    outside = [(name, p) for name, p in model.named_parameters(remove_duplicate=True) if name not in block_params]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out_emb = model.get_output_embeddings()
    wanted = {}
    for name, _ in outside:
        if name in index:
            wanted[name] = index[name]
        elif not (tied and out_emb is not None and name.startswith(_module_name(model, out_emb))):
            raise StreamingError(f"{folder}: the checkpoint has no tensor '{name}' (its names do not follow the "
                                 "model's own); load it without streaming (--stream off)")
    buffers = {name: index[name] for name, _ in model.named_buffers() if name in index}
    values = read_tensors({**wanted, **buffers})
    for name, value in values.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._parameters:
            old = module._parameters[attr]
            if tuple(old.shape) != tuple(value.shape):
                raise StreamingError(f"{folder}: {name} has shape {tuple(value.shape)} in the checkpoint but "
                                     f"{tuple(old.shape)} in the config")
            module._parameters[attr] = nn.Parameter(value.to(device=device, dtype=old.dtype),
                                                    requires_grad=old.requires_grad)
        else:
            module._buffers[attr] = value.to(device=device)
    if tied:
        model.tie_weights()
    for name, buf in model.named_buffers():  # rotary tables and other computed buffers
        if buf.device != device:
            module_name, _, attr = name.rpartition(".")
            model.get_submodule(module_name)._buffers[attr] = buf.to(device)
    left = [name for name, p in model.named_parameters() if p.is_meta and name not in block_params]
    if left:
        raise StreamingError(f"{folder}: no weights for {left[:4]}")
    for i, block in enumerate(blocks):
        block._comp_store = store
        block._comp_index = i
        block._comp_loaded = None
        block._comp_held = 0
        block._comp_modified = False
        block.register_forward_pre_hook(_pre_forward, with_kwargs=True)
        block.register_forward_hook(_post_forward, with_kwargs=True, always_call=True)
    model._comp_streamed = True
    model.eval()
    return model


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)
