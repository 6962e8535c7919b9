"""Checks made before minutes of work, so that a run that cannot finish fails in its first second.

Each check raises one clear ``ValueError`` (or ``OSError`` subclass for the file system) and changes nothing:
the model's context length against a requested sequence length, and an output folder's writability, free
space and the model's exportability against a ``--out``.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from torch import nn
from .export.folder import plan_export

# config attributes that hold a model's number of positions, first found wins (Llama/OPT/Qwen: the first)
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
# the safetensors file also holds a header and the tokenizer/config files: leave room for them
_SPACE_MARGIN = 1.1
_SPACE_SLACK_BYTES = 16 * 2**20


class OutputNotWritableError(PermissionError):
    """The output folder (or its parent) cannot be written."""


class NoSpaceError(OSError):
    """The output file system has less free space than the saved model needs."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.args[1]


def max_positions(model: nn.Module) -> int | None:
    """The number of token positions ``model`` was built for, from its config (None when it does not say)."""
    config = getattr(model, "config", None)
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_context(model: nn.Module | None, seq_len: int, what: str = "seq_len") -> None:
    """Refuse sequences longer than the model's positions: they either fail deep inside attention or run
    for minutes on positions the model never saw."""
    limit = max_positions(model) if model is not None else None
    if limit is not None and seq_len > limit:
        raise ValueError(f"{what}={seq_len} is longer than the model's context of {limit} positions "
                         f"(config.max_position_embeddings); use {what} <= {limit}")


def expected_save_bytes(model: nn.Module, ratio: float = 0.0) -> int:
    """Bytes the safetensors of ``model`` take after removing ``ratio`` of its parameters (an upper bound:
    mask methods zero weights but save them all, so they pass ratio 0)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:  # a streamed model's blocks are meta: same sizes
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return int(total * (1.0 - max(0.0, min(1.0, ratio))))


def check_output_folder(path: str | os.PathLike, needed_bytes: int = 0) -> Path:
    """Make sure ``path`` can be created or replaced and that ``needed_bytes`` fit beside it.

    Writes (and removes) one probe file in the nearest existing ancestor, which is where the save's staging
    folder goes; nothing is left behind. Returns the absolute path."""
    path = Path(path).expanduser().absolute()
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputNotWritableError(f"cannot save to {path}: {parent} is not a folder")
    probe = parent / f".comp-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
    except OSError as err:
        raise OutputNotWritableError(f"cannot save to {path}: {parent} is not writable ({err.strerror})") from None
    probe.rmdir()
    free = shutil.disk_usage(parent).free
    needed = int(needed_bytes * _SPACE_MARGIN) + _SPACE_SLACK_BYTES if needed_bytes else 0
    if needed > free:
        raise NoSpaceError(f"cannot save to {path}: the model needs about {needed / 2**20:.0f} MiB, "
                           f"{parent} has {free / 2**20:.0f} MiB free")
    return path


def check_exportable(model: nn.Module) -> None:
    """Refuse a model whose family the export does not cover, before it is pruned rather than after.

    Plans the export of the model as it is (on the meta device, sharing its tensors: no copy, no file), so the
    check is the export's own rules, not a second list of families."""
    try:
        plan_export(model)
    except Exception as err:  # unknown family, no adapter, a config export cannot rebuild: all say "cannot save"
        reason = f"{type(err).__name__}: {err}" if isinstance(err, KeyError) else str(err)
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise ValueError(f"a model of type '{model_type}' cannot be saved (--out): {reason}") from None


__all__ = ["NoSpaceError", "OutputNotWritableError", "check_context", "check_exportable", "check_output_folder",
           "expected_save_bytes", "max_positions"]
