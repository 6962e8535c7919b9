"""Several GPUs through accelerate's device maps (``comp_core.models.placement``).

On this CPU-only machine a block-level map onto the CPU still dispatches through accelerate's hooks (one hook
per block, as on several GPUs), so these tests check that every method, the copy a prune makes, the export
and the CLI work through them and give the plain run's result exactly. The GPU tests at the end run where
two CUDA devices exist.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from comp_core.cli import main
from comp_core.export.folder import load_pruned, save_pruned
from comp_core.methods.registry import get_method, method_names, prune_with
from comp_core.models.loading import ModelLoadError, load_model
from comp_core.models.placement import (DeviceMapError, check_device_map, is_dispatched, parse_device_map,
                                        parse_max_memory, place_on_devices, plan_device_map, split_blocks_map)

from tests.helpers import ARCHS, make_calib, make_tiny_model

METHODS = method_names()
SPARSE = tuple(m for m in METHODS if get_method(m).kind == "unstructured")


def settings_for(method: str) -> dict:
    return {"sparsity": 0.5} if method in SPARSE else {"ratio": 0.2}


def on_cpu_with_hooks(model):
    """The model dispatched block by block onto the CPU: accelerate's hooks, as on several GPUs."""
    return place_on_devices(model, {k: "cpu" for k in split_blocks_map(model, [0, 1])})


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_parse_device_map_strategies_json_and_files(tmp_path):
    assert parse_device_map("Auto") == "auto" and parse_device_map("balanced_low_0") == "balanced_low_0"
    assert parse_device_map('{"": 0}') == {"": 0}
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"model.embed_tokens": 0, "lm_head": "cuda:1"}))
    assert parse_device_map(str(path)) == {"model.embed_tokens": 0, "lm_head": "cuda:1"}
    with pytest.raises(DeviceMapError, match="neither one of auto"):
        parse_device_map(str(tmp_path / "missing.json"))
    path.write_text("{not json")
    with pytest.raises(DeviceMapError, match="not valid JSON"):
        parse_device_map(str(path))
    path.write_text("[]")
    with pytest.raises(DeviceMapError, match="JSON object"):
        parse_device_map(str(path))


def test_parse_max_memory():
    assert parse_max_memory("0=20GiB, 1=1.5GB,2=512") == {0: 20 * 2**30, 1: 1_500_000_000, 2: 512}
    assert parse_max_memory(None) is None
    for bad in ("cuda=20GiB", "0=lots", "", "0"):
        with pytest.raises(DeviceMapError):
            parse_max_memory(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_split_blocks_map_places_whole_blocks_and_ties(arch):
    model = make_tiny_model(arch)
    device_map = split_blocks_map(model, [0, 1])
    check_device_map(model, device_map)  # every weight placed, no block split
    blocks = [k for k in device_map if k.rsplit(".", 1)[-1].isdigit()]
    assert [device_map[b] for b in blocks] == [0, 0, 0, 1, 1, 1]
    embed = next(k for k in device_map if k.endswith("embed_tokens"))
    assert device_map[embed] == 0
    if model.config.tie_word_embeddings:
        assert device_map["lm_head"] == device_map[embed]


def test_check_device_map_refuses_what_pruning_cannot_use():
    model = make_tiny_model("llama")
    good = split_blocks_map(model, [0, 1])
    offloaded = {**good, "model.layers.5": "cpu"}
    with pytest.raises(DeviceMapError, match="does not fit on the GPUs.*model.layers.5.*--stream on"):
        check_device_map(model, offloaded)
    with pytest.raises(DeviceMapError, match="'disk'"):
        check_device_map(model, {k: "disk" for k in good})
    split = {k: v for k, v in good.items() if k != "model.layers.2"}
    split.update({"model.layers.2.self_attn": 0, "model.layers.2.mlp": 1, "model.layers.2.input_layernorm": 0,
                  "model.layers.2.post_attention_layernorm": 0})
    with pytest.raises(DeviceMapError, match="splits block model.layers.2"):
        check_device_map(model, split)
    missing = {k: v for k, v in good.items() if k != "lm_head"}
    with pytest.raises(DeviceMapError, match="does not place every weight"):
        check_device_map(model, missing)
    with pytest.raises(DeviceMapError, match="unknown device 'gpu7'"):
        check_device_map(model, {**good, "lm_head": "gpu7"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU is visible")
def test_inferred_map_without_a_gpu_says_what_to_do(tiny_folder):
    with pytest.raises(DeviceMapError, match="none is visible"):
        plan_device_map(make_tiny_model("llama"), "auto")
    with pytest.raises(ModelLoadError, match="none is visible"):
        load_model(tiny_folder, device_map="balanced")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_prunes_through_the_hooks_as_without(method):
    calib, ids = make_calib(), make_calib(seed=1)[:2]
    plain, plain_result = prune_with(method, make_tiny_model("llama"), calib, inplace=True, **settings_for(method))
    original = on_cpu_with_hooks(make_tiny_model("llama"))
    assert is_dispatched(original)
    before = logits(original, ids)
    pruned, result = prune_with(method, original, calib, **settings_for(method))  # prunes a deep copy
    assert torch.equal(logits(pruned, ids), logits(plain, ids))
    assert torch.equal(logits(original, ids), before)  # the copy's hooks drive the copy, not the original
    assert result.params_after == plain_result.params_after
    zeros = sum(int((p == 0).sum()) for p in pruned.parameters())
    assert zeros == sum(int((p == 0).sum()) for p in plain.parameters())
    assert (zeros > 0.3 * result.params_before if method in SPARSE else result.params_after < result.params_before)


@pytest.mark.parametrize("arch", ARCHS)
def test_comp_through_the_hooks_saves_the_same_model(arch, tmp_path):
    calib, ids = make_calib(), make_calib(seed=1)[:2]
    plain, _ = prune_with("comp", make_tiny_model(arch), calib, inplace=True, ratio=0.2, remove_layers=1)
    pruned, _ = prune_with("comp", on_cpu_with_hooks(make_tiny_model(arch)), calib, inplace=True, ratio=0.2,
                           remove_layers=1)
    save_pruned(pruned, None, tmp_path / "out")
    back, _ = load_pruned(tmp_path / "out")
    assert not is_dispatched(back)
    assert torch.equal(logits(back, ids), logits(plain, ids))


def test_deep_copy_of_a_dispatched_model_is_independent():
    model = on_cpu_with_hooks(make_tiny_model("llama"))
    twin = copy.deepcopy(model)
    ids = make_calib(seed=2)[:1]
    with torch.no_grad():
        twin.model.layers[0].mlp.down_proj.weight.zero_()
    assert not torch.equal(logits(twin, ids), logits(model, ids))
    assert torch.equal(logits(model, ids), logits(make_tiny_model("llama"), ids))


def test_load_model_places_a_folder_and_refuses_streaming_with_a_map(tiny_folder, tmp_path):
    model = load_model(tiny_folder).model
    path = tmp_path / "map.json"
    path.write_text(json.dumps({k: "cpu" for k in split_blocks_map(model, [0, 1])}))
    loaded = load_model(tiny_folder, device_map=str(path))
    assert loaded.device_map is not None and set(loaded.device_map.values()) == {"cpu"}
    assert is_dispatched(loaded.model) and not loaded.streamed
    ids = make_calib(seed=3)[:2]
    assert torch.equal(logits(loaded.model, ids), logits(model, ids))
    with pytest.raises(ModelLoadError, match="exclude each other"):
        load_model(tiny_folder, device_map=str(path), stream="on")
    with pytest.raises(ModelLoadError, match="GPU=SIZE"):
        load_model(tiny_folder, device_map=str(path), max_memory="lots")


def test_cli_prune_with_a_device_map_reports_it_and_matches(tiny_folder, tmp_path, capsys):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({k: "cpu" for k in split_blocks_map(load_model(tiny_folder).model, [0, 1])}))
    common = ["prune", "--model", str(tiny_folder), "--ratio", "0.2", "--calib", "sample", "--n-samples", "4",
              "--seq-len", "32", "--eval", "sample", "--max-windows", "2", "--eval-seq-len", "64", "--json", "--quiet"]
    reports = []
    for extra in ([], ["--device-map", str(path)]):
        assert main(common + extra) == 0
        out = capsys.readouterr().out
        reports.append(json.loads(out[out.index("{"):]))
    plain, placed = reports
    assert "device_map" not in plain and placed["device_map"]["model.layers.3"] == "cpu"
    assert placed["params_after"] == plain["params_after"]
    assert placed["ppl_after"]["sample"] == pytest.approx(plain["ppl_after"]["sample"], rel=1e-6)
    assert main(common + ["--device-map", str(path), "--stream", "on"]) == 2
    assert "exclude each other" in capsys.readouterr().err


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@two_gpus
@pytest.mark.parametrize("method", ("comp", "flap", "sparsegpt"))
def test_two_gpus_prune_like_one_cpu(method):
    calib, ids = make_calib(), make_calib(seed=1)[:2]
    plain, plain_result = prune_with(method, make_tiny_model("llama").double(), calib, inplace=True,
                                     **settings_for(method))
    model = make_tiny_model("llama").double()
    place_on_devices(model, split_blocks_map(model, [0, 1]))
    pruned, result = prune_with(method, model, calib, inplace=True, **settings_for(method))
    assert result.params_after == plain_result.params_after
    assert {p.device.index for p in pruned.parameters()} == {0, 1}
    torch.testing.assert_close(logits(pruned, ids).cpu(), logits(plain, ids), rtol=1e-6, atol=1e-6)


@two_gpus
def test_inferred_balanced_map_uses_both_gpus(tiny_folder):
    loaded = load_model(tiny_folder, device_map="balanced")
    assert {str(v) for v in loaded.device_map.values()} <= {"0", "1"}
    ids = make_calib(seed=3)[:2]
    torch.testing.assert_close(logits(loaded.model, ids).cpu(), logits(load_model(tiny_folder).model, ids),
                               rtol=1e-4, atol=1e-4)


def test_gui_load_options_check_the_map_at_start(tiny_folder, tmp_path):
    pytest.importorskip("gradio")
    from ui import common

    with pytest.raises(ModelLoadError, match="neither one of auto"):
        common.set_load_options("auto", str(tmp_path / "nope.json"))
    with pytest.raises(ModelLoadError, match="stream must be one of"):
        common.set_load_options("sometimes")
    with pytest.raises(ModelLoadError, match="exclude each other"):
        common.set_load_options("on", "auto")
    path = tmp_path / "map.json"
    path.write_text(json.dumps({k: "cpu" for k in split_blocks_map(load_model(tiny_folder).model, [0, 1])}))
    try:
        common.set_load_options("auto", str(path))
        loaded, _ = common.MODELS.get(str(tiny_folder))
        assert is_dispatched(loaded.model) and "spread over" in common.placement_note(
            type("S", (), {"loaded": loaded})())
    finally:
        common.set_load_options("auto")
