"""Folders that appear complete or not at all: write into a hidden staging folder, then swap it into place.

A kill at any moment (``kill -9`` included) leaves the target either absent, its old contents intact, or the
new contents complete, never half of each: a new target is one ``rename``; an existing one is exchanged with the
staging folder in one ``renameat2(RENAME_EXCHANGE)`` call (Linux ≥ 3.15), and only then is the old copy deleted.
Where the exchange is unavailable the old folder is renamed aside first, which leaves a short window without
the target; :func:`recover` puts such an aside folder back. Staging and aside folders carry the writer's pid, so
:func:`sweep` removes the ones a killed writer left behind.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import uuid
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_STAGING, _ASIDE = "partial", "old"


def staging_path(target: Path) -> Path:
    """A fresh hidden sibling of ``target`` to write into (``.<name>.partial-<pid>-<random>``)."""
    return target.parent / f".{target.name}.{_STAGING}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _aside_path(target: Path) -> Path:
    return target.parent / f".{target.name}.{_ASIDE}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the system call is missing or refused (then nothing changed)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(staging: Path, target: Path, overwrite: bool) -> None:
    """Move the complete ``staging`` folder to ``target``; an existing ``target`` only with ``overwrite``."""
    if not (target.exists() or target.is_symlink()):
        os.rename(staging, target)
        return
    if not overwrite:  # appeared while we were writing
        raise FileExistsError(f"{target} appeared while saving; nothing was replaced")
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old contents
        return
    aside = _aside_path(target)
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _writer_alive(name: str) -> bool:
    try:
        pid = int(name.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(target: Path) -> None:
    """Put back an old folder a killed writer had moved aside (only where the exchange was unavailable)."""
    if target.exists():
        return
    asides = sorted(target.parent.glob(f".{target.name}.{_ASIDE}-*"), key=lambda p: p.stat().st_mtime)
    for aside in reversed(asides):
        if not _writer_alive(aside.name):
            os.rename(aside, target)
            return


def sweep(target: Path) -> list[Path]:
    """Remove staging/aside folders of ``target`` whose writer is gone; returns what was removed."""
    recover(target)
    removed = []
    for kind in (_STAGING, _ASIDE):
        for leftover in target.parent.glob(f".{target.name}.{kind}-*"):
            if not _writer_alive(leftover.name):
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover)
    return removed
