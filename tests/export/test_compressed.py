"""Saving masked models in compressed-tensors' sparse format: round trip, targets, sizes, the missing package."""
from __future__ import annotations

import builtins
import json

import pytest
import torch

import comp_core.methods.ria  # noqa: F401  (registers "ria")
from comp_core.export import compressed as sparse_export
from comp_core.export.folder import folder_bytes
from comp_core.methods import prune_with
from comp_core.export.compressed import (FORMAT_24, FORMAT_BITMASK, SparseFormatUnavailable, format_for,
                                     load_compressed, save_compressed)
from comp_core.models.surgery import IndexedInputLinear
from tests.helpers import make_calib, make_tiny_model

AVAILABLE, WHY = sparse_export.available()
needs_package = pytest.mark.skipif(not AVAILABLE, reason=f"compressed-tensors sparse format unavailable: {WHY}")


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_format_follows_the_pattern():
    assert format_for("2:4") == FORMAT_24
    assert format_for("4:8") == FORMAT_BITMASK and format_for("0.5") == FORMAT_BITMASK


def test_missing_package_names_it(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_compressed_tensors(name, *args, **kwargs):
        if name.startswith("compressed_tensors"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_compressed_tensors)
    model = make_tiny_model("llama")
    with pytest.raises(SparseFormatUnavailable, match="compressed-tensors") as err:
        save_compressed(model, None, tmp_path / "out", "2:4")
    assert "pip install" in str(err.value) and isinstance(err.value, ImportError)
    assert not (tmp_path / "out").exists()
    ok, why = sparse_export.available()
    assert not ok and "compressed-tensors" in why


@needs_package
@pytest.mark.parametrize("arch, label, method", [("llama", "2:4", "magnitude"), ("opt", "2:4", "wanda"),
                                                 ("qwen3", "4:8", "wanda"), ("mistral", "0.5", "magnitude")])
def test_round_trip_gives_the_same_weights(arch, label, method, tmp_path):
    model, tokens = make_tiny_model(arch), make_calib()
    pruned, result = prune_with(method, model, None if method == "magnitude" else tokens, sparsity=label)
    path = save_compressed(pruned, None, tmp_path / "sparse", label, report=result)
    config = json.loads((path / "config.json").read_text())
    sparsity = config["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == format_for(label)
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert len(sparsity["targets"]) == 6 * (6 if arch == "opt" else 7)  # every dense of every block
    loaded, _ = load_compressed(path)
    _same_weights(pruned, loaded)
    assert torch.equal(_logits(loaded, tokens), _logits(pruned, tokens))
    record = json.loads((path / "comp_report.json").read_text())["sparse_export"]
    assert record["compressed_weight_bytes"] == folder_bytes(path, ".safetensors")
    assert record["compressed_weight_bytes"] < record["dense_weight_bytes"]


@needs_package
def test_compressed_keys_replace_the_dense_weights(tmp_path):
    from safetensors import safe_open

    pruned, _ = prune_with("magnitude", make_tiny_model("llama"), None, sparsity="2:4")
    path = save_compressed(pruned, None, tmp_path / "sparse", "2:4")
    with safe_open(path / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert "model.layers.0.mlp.down_proj.compressed" in keys
        assert "model.layers.0.mlp.down_proj.weight" not in keys
        values = f.get_tensor("model.layers.0.mlp.down_proj.compressed")
        bitmask = f.get_tensor("model.layers.0.mlp.down_proj.bitmask")
    down = pruned.model.layers[0].mlp.down_proj.weight
    assert values.shape == (down.shape[0], down.shape[1] // 2) and bitmask.dtype == torch.uint8
    assert "model.embed_tokens.weight" in keys  # embeddings stay dense


@needs_package
def test_permuted_ria_model_round_trips(tmp_path):
    model, tokens = make_tiny_model("qwen2"), make_calib()
    pruned, result = prune_with("ria", model, tokens, sparsity="2:4")
    assert any(isinstance(m, IndexedInputLinear) for m in pruned.modules())
    path = save_compressed(pruned, None, tmp_path / "ria", "2:4", report=result)
    loaded, _ = load_compressed(path)
    assert json.loads((path / "config.json").read_text())["model_type"] == "comp_qwen2"
    _same_weights(pruned, loaded)
    assert (_logits(loaded, tokens) - _logits(pruned, tokens)).abs().max() <= 1e-5


@needs_package
def test_dense_blocks_are_left_uncompressed(tmp_path):
    model, tokens = make_tiny_model("llama"), make_calib()
    pruned, _ = prune_with("wanda", model, tokens, sparsity="2:4", protected=(0,))
    path = save_compressed(pruned, None, tmp_path / "sparse", "2:4")
    targets = json.loads((path / "config.json").read_text())["quantization_config"]["sparsity_config"]["targets"]
    assert len(targets) == 5 * 7 and not any(".layers.0." in t for t in targets)
    loaded, _ = load_compressed(path)
    _same_weights(pruned, loaded)


@needs_package
def test_unpruned_model_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(ValueError, match="prune it first"):
        save_compressed(make_tiny_model("llama"), None, tmp_path / "dense", "2:4")
    assert not any(tmp_path.iterdir())


@needs_package
def test_existing_folder_needs_overwrite(tmp_path):
    pruned, _ = prune_with("magnitude", make_tiny_model("opt"), None, sparsity="4:8")
    path = save_compressed(pruned, None, tmp_path / "sparse", "4:8")
    with pytest.raises(FileExistsError):
        save_compressed(pruned, None, path, "4:8")
    save_compressed(pruned, None, path, "4:8", overwrite=True)
    _same_weights(pruned, load_compressed(path)[0])
