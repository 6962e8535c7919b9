"""Security defaults: no remote code unless asked, no pickles loaded, no raw torch.load anywhere."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from comp_core.cli import build_parser
from comp_core.models.loading import ModelLoadError, load_model

from tests.helpers import ROOT  # noqa: E402
SOURCES = [*sorted((ROOT / "comp_core").rglob("*.py")), *sorted((ROOT / "ui").rglob("*.py")), ROOT / "launch.py"]


def _remote_code_folder(tiny_folder: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A model folder whose config asks for its own Python code, which would leave a marker file if run."""
    folder = tmp_path / "remote-code"
    shutil.copytree(tiny_folder, folder)
    marker = tmp_path / "code-ran"
    (folder / "evil_config.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil_config.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_remote_code_is_refused_unless_explicitly_trusted(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr("builtins.input", lambda *a, **k: (_ for _ in ()).throw(EOFError()))  # no prompt answers
    folder, marker = _remote_code_folder(tiny_folder, tmp_path)
    with pytest.raises(ModelLoadError):
        load_model(folder)
    assert not marker.exists()


def test_the_cli_and_the_library_default_to_no_remote_code():
    import inspect

    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    for command in (["prune"], ["analyze"], ["eval"], ["compare"], ["bench-speed", "--pruned", "x"]):
        assert build_parser().parse_args(command).trust_remote_code is False


def test_pickle_weights_are_never_loaded(tiny_folder, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_folder, folder)
    for weights in folder.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="only safetensors"):
        load_model(folder)


@pytest.mark.parametrize("pattern", [r"\btorch\.load\(", r"\bpickle\.loads?\(", r"trust_remote_code\s*=\s*True",
                                     r"weights_only\s*=\s*False", r"use_safetensors\s*=\s*False"])
def test_no_source_file_loads_untrusted_pickles_or_enables_remote_code(pattern):
    hits = [f"{path.relative_to(ROOT)}:{i}" for path in SOURCES
            for i, line in enumerate(path.read_text().splitlines(), 1)
            if re.search(pattern, line) and not line.lstrip().startswith("#")]
    assert hits == []
