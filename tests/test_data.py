"""comp_core.data: calibration / evaluation protocols on the shared/data mirror and on small local files."""
from __future__ import annotations

import gzip
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from comp_core import data
from comp_core.data import DataError, get_calibration, get_eval_text, get_eval_tokens, load_texts

from tests.helpers import BOS_ID, make_tiny_tokenizer, small_llama


def _shared_data() -> Path | None:
    env = os.environ.get(data.DATA_DIR_ENV)
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return path if (path / "wikitext2" / "wiki.test.raw").is_file() else None


SHARED = _shared_data()
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared/data mirror not found (set COMP_DATA_DIR)")


@pytest.fixture()
def shared_data(monkeypatch) -> Path:
    monkeypatch.setenv(data.DATA_DIR_ENV, str(SHARED))
    return SHARED


@pytest.fixture()
def tok():
    return make_tiny_tokenizer()


@pytest.fixture()
def no_hub(monkeypatch):
    """No local mirror and no `datasets` package: the situation of a fresh offline install."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    lines = "".join(json.dumps({"text": d, "url": "x"}) + "\n" for d in docs)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


LONG_TEXT = " ".join(f"Sentence number {i} talks about the river, the bridge and the library." for i in range(200))


# ---------------------------------------------------------------------------------------------- names


def test_data_dir_unset_is_none(monkeypatch, tmp_path):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.data_dir() is None
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.data_dir() == tmp_path


def test_unknown_name_lists_valid_names(tok):
    with pytest.raises(DataError) as info:
        get_calibration("wikitext103", tok)
    message = str(info.value)
    for name in ("'c4'", "'wikitext2'", "'ptb'", "'data-free'", ".jsonl"):
        assert name in message
    with pytest.raises(ValueError, match="valid names"):  # DataError is a ValueError
        get_eval_tokens("data-free", tok)


def test_missing_data_dir_and_no_datasets_package(tok, no_hub):
    with pytest.raises(DataError) as info:
        get_eval_tokens("wikitext2", tok)
    message = str(info.value)
    assert "COMP_DATA_DIR" in message and "wiki.test.raw" in message and "datasets" in message
    with pytest.raises(DataError, match=r"c4-train\.00000-of-01024"):
        get_calibration("c4", tok)
    with pytest.raises(DataError, match=r"ptb\.train\.txt"):
        get_calibration("ptb", tok)


def test_data_dir_without_the_file_names_expected_path(tok, monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataError) as info:
        get_eval_tokens("ptb", tok)
    assert str(tmp_path / "ptb" / "ptb.test.txt") in str(info.value)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "nope"))
    with pytest.raises(DataError, match="not a directory"):
        load_texts("c4", "validation")


def test_hub_path_uses_sparsegpt_load_dataset_calls(tok, monkeypatch):
    calls = []

    class FakeDatasets:
        @staticmethod
        def load_dataset(*args, **kwargs):
            calls.append((args, kwargs))
            if args[0] == "wikitext":
                return {"text": [" = Title = \n", "", " Body text here . \n"]}
            if args[0] == "ptb_text_only":
                return {"sentence": ["a b c", "d e f"]}
            return [{"text": "doc one"}, {"text": "doc two"}]

    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    assert get_eval_text("wikitext2") == " = Title = \n\n\n\n\n Body text here . \n"
    assert get_eval_text("ptb") == "a b c d e f"
    assert get_eval_text("c4") == "doc one doc two"
    assert calls[0] == (("wikitext", "wikitext-2-raw-v1"), {"split": "test"})
    assert calls[1] == (("ptb_text_only", "penn_treebank"), {"split": "test"})
    assert calls[2] == (
        ("allenai/c4",),
        {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "split": "validation"},
    )


def test_hub_failure_becomes_data_error(tok, monkeypatch):
    class OfflineDatasets:
        @staticmethod
        def load_dataset(*args, **kwargs):
            raise ConnectionError("no network")

    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", OfflineDatasets)
    with pytest.raises(DataError, match="no network.*COMP_DATA_DIR"):
        get_calibration("wikitext2", tok)


@pytest.mark.parametrize("n_samples, seq_len", [(0, 16), (-1, 16), (2, 1), (2, 0), (2.5, 16)])
def test_calibration_argument_checks(tok, tmp_path, n_samples, seq_len):
    path = tmp_path / "a.txt"
    path.write_text(LONG_TEXT)
    with pytest.raises(ValueError, match="n_samples|seq_len"):
        get_calibration(str(path), tok, n_samples, seq_len)


# ------------------------------------------------------------------------------------------ local files


def test_local_txt_calibration_shapes_and_seeds(tok, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(LONG_TEXT, encoding="utf-8")
    a = get_calibration(str(path), tok, n_samples=5, seq_len=32, seed=1)
    b = get_calibration(str(path), tok, n_samples=5, seq_len=32, seed=1)
    c = get_calibration(str(path), tok, n_samples=5, seq_len=32, seed=2)
    assert a.shape == (5, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < len(tok) and int(a.min()) >= 0
    # every window is a contiguous slice of the one tokenised stream
    stream = tok(LONG_TEXT, return_tensors="pt").input_ids[0]
    windows = stream.unfold(0, 32, 1)  # (T-31, 32)
    for row in a:
        assert (windows == row).all(dim=1).any()


def test_txt_gz_and_jsonl_gz(tok, tmp_path):
    gz = tmp_path / "notes.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as handle:
        handle.write(LONG_TEXT)
    assert get_calibration(str(gz), tok, 3, 16).shape == (3, 16)
    assert get_eval_text(str(gz)) == LONG_TEXT

    docs = [LONG_TEXT[:2000], LONG_TEXT[2000:4000], "short"]
    jz = _write_jsonl(tmp_path / "docs.jsonl.gz", docs)
    samples = get_calibration(str(jz), tok, 4, 64, seed=3)
    assert samples.shape == (4, 64)
    assert get_eval_text(str(jz)) == " ".join(docs)
    assert load_texts(str(jz)) == docs


def test_jsonl_documents_are_sampled_within_one_document(tok, tmp_path):
    docs = [f"Document {k}: " + " ".join(f"word{k}x{i}" for i in range(120)) for k in range(4)]
    path = _write_jsonl(tmp_path / "docs.jsonl", docs)
    samples = get_calibration(str(path), tok, 6, 24, seed=0)
    streams = [tok(d, return_tensors="pt").input_ids[0].unfold(0, 24, 1) for d in docs]
    for row in samples:
        assert any((s == row).all(dim=1).any() for s in streams)


def test_jsonl_with_only_short_documents_falls_back_to_concatenation(tok, tmp_path, caplog):
    docs = [f"Short note {i} about apples." for i in range(30)]
    path = _write_jsonl(tmp_path / "short.jsonl", docs)
    with caplog.at_level("WARNING", logger="comp_core.data"):
        samples = get_calibration(str(path), tok, 4, 40, seed=0)
    assert samples.shape == (4, 40)
    assert "falling back" in caplog.text
    stream = tok("\n\n".join(docs), return_tensors="pt").input_ids[0].unfold(0, 40, 1)
    for row in samples:
        assert (stream == row).all(dim=1).any()


@pytest.mark.parametrize("content", ["", "   \n\n  \t\n"])
def test_empty_text_file_raises(tok, tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(DataError, match="no usable text"):
        get_calibration(str(path), tok)
    with pytest.raises(DataError, match="no usable text"):
        get_eval_tokens(str(path), tok)


def test_bad_jsonl_raises(tok, tmp_path):
    empty_docs = _write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no usable text"):
        get_calibration(str(empty_docs), tok)
    no_text = tmp_path / "notext.jsonl"
    no_text.write_text('{"body": "hello"}\n')
    with pytest.raises(DataError, match="'text' field"):
        get_calibration(str(no_text), tok)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2"):
        load_texts(str(broken))


def test_missing_or_unsupported_local_file(tok, tmp_path):
    with pytest.raises(DataError, match="file not found"):
        get_calibration(str(tmp_path / "missing.txt"), tok)
    other = tmp_path / "table.csv"
    other.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        get_calibration(str(other), tok)


def test_stream_shorter_than_a_window_raises(tok, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("only a few words")
    with pytest.raises(DataError, match="need more than seq_len=128"):
        get_calibration(str(path), tok, 2, 128)


# ---------------------------------------------------------------------------------------- shared mirror


@needs_shared
def test_wikitext2_rows_and_eval_protocol(tok, shared_data):
    rows = load_texts("wikitext2", "test")
    assert len(rows) == 4358
    assert sum(1 for r in rows if r) == 2891
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    text = get_eval_text("wikitext2")
    assert text == "\n\n".join(rows)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    tokens = get_eval_tokens("wikitext2", tok)
    assert tokens.dim() == 2 and tokens.shape[0] == 1 and tokens.dtype == torch.long
    assert int(tokens[0, 0]) == BOS_ID  # tokenizer defaults: one BOS at the start, as SparseGPT
    assert tok.decode(tokens[0], skip_special_tokens=True) == text
    assert int(tokens.max()) < len(tok)


@needs_shared
def test_eval_tokens_are_cached_and_copied(tok, shared_data):
    first = get_eval_tokens("wikitext2", tok)
    first[0, :10] = -1  # callers may edit their copy
    second = get_eval_tokens("wikitext2", tok)
    assert int(second.min()) >= 0
    assert any(key[0] == "eval" and key[1] == "wikitext2" for key in data._TOKEN_CACHE)


@needs_shared
def test_ptb_eval_protocol(shared_data):
    sentences = load_texts("ptb", "test")
    assert len(sentences) == 3761
    assert all(s == s.strip() for s in sentences)
    assert get_eval_text("ptb") == " ".join(sentences)
    assert len(load_texts("ptb", "valid")) == 3370


@needs_shared
def test_c4_calibration_from_train_documents(tok, shared_data):
    a = get_calibration("c4", tok, n_samples=10, seq_len=128, seed=0)
    b = get_calibration("c4", tok, n_samples=10, seq_len=128, seed=0)
    c = get_calibration("c4", tok, n_samples=10, seq_len=128, seed=1)
    assert a.shape == (10, 128) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= int(a.min()) and int(a.max()) < len(tok)
    docs = load_texts("c4", "train")
    assert len(docs) == 1000 and docs[0].startswith("Beginners BBQ Class Taking Place in Missoula!")


@needs_shared
def test_c4_eval_uses_first_1100_validation_documents(shared_data):
    docs = load_texts("c4", "validation")
    assert len(docs) == 2000
    assert get_eval_text("c4", "test") == " ".join(docs[:1100])
    assert get_eval_text("c4", "validation") == " ".join(docs[:1100])


@needs_shared
def test_wikitext2_calibration_uses_validation_when_no_train(tok, shared_data, caplog):
    with caplog.at_level("INFO", logger="comp_core.data"):
        a = get_calibration("wikitext2", tok, n_samples=4, seq_len=64, seed=0)
    assert "validation" in caplog.text
    b = get_calibration("wikitext2", tok, n_samples=4, seq_len=64, seed=0)
    c = get_calibration("wikitext2", tok, n_samples=4, seq_len=64, seed=5)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)
    text = tok.decode(a[0], skip_special_tokens=True)
    assert text in " ".join(load_texts("wikitext2", "validation"))


def test_ptb_calibration_reads_gzipped_train_split(tok, monkeypatch, tmp_path):
    # A small copy in the mirror's layout (the real train split is 5 MB: too slow for a unit test).
    (tmp_path / "ptb").mkdir()
    lines = [f" the company said its profit rose N N in the quarter number {i} \n" for i in range(50)]
    with gzip.open(tmp_path / "ptb" / "ptb.train.txt.gz", "wt") as handle:
        handle.writelines(lines)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    samples = get_calibration("ptb", tok, n_samples=3, seq_len=32, seed=0)
    assert samples.shape == (3, 32)
    joined = " ".join(line.strip() for line in lines)
    for row in samples:
        assert tok.decode(row, skip_special_tokens=True) in joined


# ------------------------------------------------------------------------------------------- data-free


def test_data_free_calibration(tok):
    model = small_llama()
    model.train()
    a = get_calibration("data-free", tok, n_samples=3, seq_len=12, seed=0, model=model)
    b = get_calibration("data-free", tok, n_samples=3, seq_len=12, seed=0, model=model)
    c = get_calibration("data-free", tok, n_samples=3, seq_len=12, seed=1, model=model)
    assert a.shape == (3, 12) and a.dtype == torch.long
    assert (a[:, 0] == BOS_ID).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < 512
    assert model.training  # mode restored


class _NoBosTokenizer:
    """Just what data-free sampling reads from a tokenizer, without a BOS token."""

    bos_token_id = None

    def __len__(self) -> int:
        return 512


def test_data_free_without_bos_starts_from_random_tokens():
    model = small_llama()
    tok = _NoBosTokenizer()
    samples = get_calibration("data-free", tok, n_samples=4, seq_len=5, seed=0, model=model)
    assert samples.shape == (4, 5) and int(samples.max()) < 512
    assert len(set(samples[:, 0].tolist())) > 1


def test_data_free_needs_model(tok):
    with pytest.raises(DataError, match="model"):
        get_calibration("data-free", tok, 2, 8)


# ------------------------------------------------------------------ what counts as available without a data folder

class _Answer:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture()
def hub_probe(monkeypatch):
    """No data folder and ``datasets`` installed; ``probe.answer`` decides what the hub's endpoint does, and
    ``probe.requests`` records the URLs asked."""

    class Probe:
        answer = "timeout"
        requests: list[str] = []

    def urlopen(request, timeout):
        Probe.requests.append(request.full_url)
        assert timeout <= data.HUB_PROBE_TIMEOUT_S
        if Probe.answer == "ok":
            return _Answer()
        if Probe.answer == "404":
            raise urllib.error.HTTPError(request.full_url, 404, "not found", {}, None)
        raise urllib.error.URLError(TimeoutError("timed out") if Probe.answer == "timeout" else "no name")

    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    for name in data.HUB_OFFLINE_ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(data, "_datasets_installed", lambda: True)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    data.hub_reachable.cache_clear()
    yield Probe
    data.hub_reachable.cache_clear()


@pytest.mark.parametrize("answer, available", [("timeout", False), ("no-dns", False), ("ok", True), ("404", True)])
def test_named_sets_count_as_available_only_when_the_hub_answers(hub_probe, answer, available):
    """An importable `datasets` (lm-eval brings it) on an offline machine must not preselect WikiText-2."""
    hub_probe.answer = answer
    assert data.is_available("wikitext2") is available
    assert data.is_available("c4") is available
    assert len(hub_probe.requests) == 1  # asked once per process
    assert data.is_available("sample") and data.is_available("data-free")


def test_offline_switch_and_missing_package_ask_nothing(hub_probe, monkeypatch):
    hub_probe.answer = "ok"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not data.is_available("wikitext2")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    data.hub_reachable.cache_clear()
    monkeypatch.setattr(data, "_datasets_installed", lambda: False)
    assert not data.is_available("wikitext2")
    assert hub_probe.requests == []


def test_the_gui_defaults_follow_what_can_be_read(hub_probe):
    from ui.common import data_note, default_calibration, default_eval_sets

    hub_probe.answer = "no-dns"
    assert default_eval_sets() == ["sample"] and default_calibration("c4") == "data-free"
    assert "sample text" in data_note()
