"""Bad input that used to be found late (or never) is refused first, in one line, before any pruning.

Every test drives the console script (``comp_core.cli.main``) as a user would; ``prune_with`` is replaced by a
tripwire where the point is that the check comes *before* the minutes of work.
"""
from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import comp_core.cli
from comp_core.cli import main
from comp_core.models.loading import ModelLoadError, load_model

COMMON = ["--calib", "sample", "--n-samples", "2", "--seq-len", "16", "--quiet", "--threads", "1"]


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    torch.set_num_threads(1)
    return code, capsys.readouterr().err


@pytest.fixture
def tripwire(monkeypatch):
    """Fails the test if pruning starts."""
    def prune_with(*args, **kwargs):
        raise AssertionError("pruning started although the run could not finish")

    monkeypatch.setattr(comp_core.cli, "prune_with", prune_with)


def _with_layers(tiny_folder: Path, tmp_path: Path, layers: int) -> Path:
    folder = tmp_path / f"layers-{layers}"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("layers", [8, 4], ids=["config-has-more-layers", "config-has-fewer-layers"])
def test_config_that_disagrees_with_its_weights_is_refused(tiny_folder, tmp_path, capsys, layers):
    folder = _with_layers(tiny_folder, tmp_path, layers)
    with pytest.raises(ModelLoadError, match="does not match the safetensors weights"):
        load_model(folder)
    code, err = run(capsys, "eval", "--model", str(folder), "--eval", "sample", "--quiet", "--threads", "1")
    assert code == 2 and "does not match the safetensors weights" in err
    assert "newly initialized" not in err and "Traceback" not in err


def test_calibration_longer_than_the_context_is_refused_first(tiny_folder, capsys, tripwire):
    code, err = run(capsys, "prune", "--model", str(tiny_folder), *COMMON, "--seq-len", "100000")
    assert code == 2 and "context of 256 positions" in err and "--seq-len" in err


def test_evaluation_window_longer_than_the_context_is_refused_first(tiny_folder, capsys, tripwire):
    code, err = run(capsys, "prune", "--model", str(tiny_folder), *COMMON, "--eval", "sample",
                    "--eval-seq-len", "4096")
    assert code == 2 and "context of 256 positions" in err and "--eval-seq-len" in err


def test_output_under_a_file_is_refused_before_pruning(tiny_folder, tmp_path, capsys, tripwire):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = run(capsys, "prune", "--model", str(tiny_folder), *COMMON, "--out", str(blocker / "pruned"))
    assert code == 2 and "not a folder" in err and "Traceback" not in err


def test_unwritable_output_folder_is_refused_before_pruning(tiny_folder, tmp_path, capsys, tripwire, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):  # root ignores chmod, so the denial is simulated where it happens
        if Path(self).absolute().parent == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, err = run(capsys, "prune", "--model", str(tiny_folder), *COMMON, "--out", str(locked / "pruned"))
    assert code == 2 and "not writable" in err and "Traceback" not in err
    assert list(locked.iterdir()) == []


def test_full_disk_is_refused_before_pruning(tiny_folder, tmp_path, capsys, tripwire, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    code, err = run(capsys, "prune", "--model", str(tiny_folder), *COMMON, "--out", str(tmp_path / "pruned"))
    assert code == 2 and "MiB free" in err and "Traceback" not in err
    assert not (tmp_path / "pruned").exists()


def test_model_type_the_export_cannot_save_is_refused_before_pruning(tiny_folder, tmp_path, capsys, tripwire,
                                                                      monkeypatch):
    real = comp_core.cli.load_model

    def load_unsaveable(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded.model.config.model_type = "mystery"  # prunable by its modules, unknown to the export
        return loaded

    monkeypatch.setattr(comp_core.cli, "load_model", load_unsaveable)
    code, err = run(capsys, "prune", "--model", str(tiny_folder), *COMMON, "--out", str(tmp_path / "pruned"))
    assert code == 2 and "cannot be saved" in err and "mystery" in err
    assert not (tmp_path / "pruned").exists()


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 93458415616 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    MemoryError(),
], ids=["cpu-allocator", "cuda", "python"])
def test_out_of_memory_is_reported_with_the_memory_figures(tiny_folder, capsys, monkeypatch, error):
    def prune_with(*args, **kwargs):
        raise error

    monkeypatch.setattr(comp_core.cli, "prune_with", prune_with)
    code, err = run(capsys, "prune", "--model", str(tiny_folder), *COMMON)
    assert code == 3 and "out of memory" in err and "MiB" in err and "peak RSS" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
