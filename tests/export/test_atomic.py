"""Saving survives interruption: kill -9 at random moments, a full disk, a folder that cannot be written.

Each case leaves either no folder, the old folder intact, or the new one complete, and never a partial
folder the next save or a reader would trip over.
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from comp_core.cli import main
from comp_core.export.folder import save_pruned

from tests.helpers import make_tiny_model


def _complete(folder: Path) -> str:
    """The ``marker`` of a complete saved folder (config, readable weights, report); fails on a partial one."""
    assert (folder / "config.json").is_file(), sorted(p.name for p in folder.iterdir())
    json.loads((folder / "config.json").read_text())
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 0
    return json.loads((folder / "comp_report.json").read_text())["pruning"]["marker"]


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_kill_9_during_save_leaves_old_or_new_folder_never_half(tmp_path):
    model = make_tiny_model("llama")
    out = tmp_path / "saved"
    started = time.perf_counter()
    save_pruned(model, None, out, {"marker": "first"})
    one_save = time.perf_counter() - started
    rng = random.Random(0)
    markers = {"first"}
    for kill in range(20):
        marker = f"kill-{kill}"
        pid = os.fork()
        if pid == 0:  # child: overwrite the folder again and again until killed
            try:
                for i in range(1000):
                    save_pruned(model, None, out, {"marker": f"{marker}-{i}"}, overwrite=True)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 2.5 * one_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        found = _complete(out)  # the folder is always there and complete: old or new, never half
        assert found in markers or found.startswith(marker), found
        markers.add(found)
    save_pruned(model, None, out, {"marker": "last"}, overwrite=True)  # sweeps what the killed writers left
    assert _complete(out) == "last"
    assert _leftovers(tmp_path, "saved") == []
    assert len(markers) > 2  # some kills landed after a save had completed, so both cases were exercised


def _failing_save(monkeypatch, err: OSError):
    """save_pretrained writes part of a shard, then fails like a full disk / a denied write would."""
    from transformers import PreTrainedModel

    def save_pretrained(self, folder, *args, **kwargs):
        Path(folder, "model.safetensors").write_bytes(b"\0" * 1024)
        raise err

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_pretrained)


@pytest.mark.parametrize("err", [OSError(errno.ENOSPC, "No space left on device"),
                                 PermissionError(errno.EACCES, "Permission denied")], ids=["disk-full", "denied"])
def test_failed_save_leaves_no_partial_folder_and_keeps_the_old_one(tmp_path, monkeypatch, err):
    model = make_tiny_model("llama")
    out = tmp_path / "saved"
    save_pruned(model, None, out, {"marker": "old"})
    _failing_save(monkeypatch, err)
    with pytest.raises(OSError):
        save_pruned(model, None, out, {"marker": "new"}, overwrite=True)
    with pytest.raises(OSError):
        save_pruned(model, None, tmp_path / "fresh", {"marker": "new"})
    assert _complete(out) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


@pytest.mark.parametrize("err", [OSError(errno.ENOSPC, "No space left on device"),
                                 PermissionError(errno.EACCES, "Permission denied")], ids=["disk-full", "denied"])
def test_cli_reports_a_failed_save_in_one_line(tiny_folder, tmp_path, monkeypatch, capsys, err):
    _failing_save(monkeypatch, err)
    code = main(["prune", "--model", str(tiny_folder), "--calib", "sample", "--n-samples", "2", "--seq-len", "16",
                 "--out", str(tmp_path / "pruned"), "--quiet", "--threads", "1"])
    message = capsys.readouterr().err
    assert code == 2 and "Traceback" not in message
    assert err.strerror in message and len(message.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    torch.set_num_threads(1)
