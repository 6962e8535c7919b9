"""Tokenizer metadata for a GGUF file: copied from a source GGUF, or built from a Hugging Face tokenizer.

Copying is exact: every ``tokenizer.*`` key of the source file (vocabulary, merges, token types, special ids,
pre-tokenizer name, chat template) is written again unchanged, so llama.cpp tokenises as it did for the source.

Building from a Hugging Face (fast) tokenizer supports two kinds, read from its ``tokenizer.json``:

* ``gpt2``: byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen…): tokens, merges, token types;
* ``llama``: SentencePiece-style BPE with byte fallback (Llama 2, Mistral, TinyLlama…): tokens, scores,
  token types, through ``gguf.vocab.LlamaHfVocab``.

Unigram / WordPiece tokenizers and slow-only SentencePiece files are refused with ``GGUFExportError``.
llama.cpp picks a gpt2 tokenizer's pre-tokenizer regex by *name*; the name is only known here for the plain
GPT-2 byte-level pre-tokenizer ("gpt-2"), otherwise "default" is written and the returned description says so
(llama.cpp may then split some text differently; pass ``pre=`` with llama.cpp's name, or use a source GGUF).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import GGUFExportError

TokenizerWriter = Callable[[Any], str]
SUPPORTED_KINDS = ("gpt2 (byte-level BPE)", "llama (SentencePiece-style BPE with byte fallback)")


def copy_from_gguf(source: str | os.PathLike, vocab_size: int) -> tuple[TokenizerWriter, str]:
    """(writer function, description) copying every ``tokenizer.*`` key of ``source``."""
    from gguf import GGUFReader, GGUFValueType

    source = Path(source)
    reader = GGUFReader(source)
    fields = {name: f for name, f in reader.fields.items() if name.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFExportError(f"{source} holds no tokenizer.ggml.tokens to copy")
    n_tokens = len(tokens.data)
    if n_tokens != vocab_size:
        raise GGUFExportError(f"{source} has {n_tokens} tokens but the model's vocabulary is {vocab_size}; "
                              "is it the file the model was loaded from?")
    values = []
    for name, f in fields.items():
        main = f.types[0]
        sub = f.types[-1] if main == GGUFValueType.ARRAY else None
        values.append((name, f.contents(), main, sub))

    def write(writer) -> str:
        for name, value, main, sub in values:
            writer.add_key_value(name, value, main, sub)
        return described

    described = f"copied from {source.name} ({len(values)} tokenizer keys)"
    return write, described


def _tokenizer_json(tokenizer, folder: Path) -> dict:
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError("the tokenizer has no tokenizer.json (a slow tokenizer); GGUF export builds "
                              f"{' or '.join(SUPPORTED_KINDS)} tokenizers from a fast tokenizer, or copies one "
                              "from a source GGUF")
    return json.loads(path.read_text(encoding="utf-8"))


def tokenizer_kind(data: dict) -> str:
    """"gpt2" or "llama" for a tokenizer.json; ``GGUFExportError`` naming the supported kinds otherwise."""
    model = data.get("model") or {}
    decoder = (data.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and not model.get("byte_fallback", False) and decoder == "ByteLevel":
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback", False):
        return "llama"
    raise GGUFExportError(f"tokenizer model '{model.get('type')}' (decoder '{decoder}') is not supported by the GGUF "
                          f"export; supported: {', '.join(SUPPORTED_KINDS)}; or copy it from a source GGUF")


def pre_tokenizer_name(data: dict) -> str | None:
    """llama.cpp's pre-tokenizer name when it is known from tokenizer.json alone (plain GPT-2 byte level)."""
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return None


def _gpt2_tokens(tokenizer, data: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    from gguf import TokenType

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(TokenType.NORMAL)
    return tokens, types


def from_hf(tokenizer, vocab_size: int, pre: str | None = None) -> tuple[TokenizerWriter, str]:
    """(writer function, description) of ``tokenizer``'s metadata (see the module docstring)."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="comp-gguf-tok-") as tmp:
        folder = Path(tmp)
        data = _tokenizer_json(tokenizer, folder)
        kind = tokenizer_kind(data)
        if kind == "gpt2":
            tokens, types = _gpt2_tokens(tokenizer, data, vocab_size)
            scores = None
            special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
        else:
            vocab = gguf.vocab.LlamaHfVocab(folder)
            entries = list(vocab.all_tokens())
            if len(entries) > vocab_size:
                raise GGUFExportError(f"the tokenizer has {len(entries)} tokens, the model's vocabulary {vocab_size}")
            tokens = [text.decode("utf-8") if isinstance(text, bytes) else text for text, _, _ in entries]
            scores = [float(score) for _, score, _ in entries]
            types = [int(t) for _, _, t in entries]
            for i in range(len(tokens), vocab_size):
                tokens.append(f"[PAD{i}]")
                scores.append(-1000.0)
                types.append(gguf.TokenType.UNUSED)
            special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    pre_name = pre or (pre_tokenizer_name(data) if kind == "gpt2" else None)
    unknown_pre = kind == "gpt2" and pre_name is None

    def write(writer) -> str:
        writer.add_tokenizer_model(kind)
        if kind == "gpt2":
            writer.add_tokenizer_pre(pre_name or "default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        if scores is not None:
            writer.add_token_scores(scores)
        special.add_to_gguf(writer, quiet=True)
        return described

    described = f"built from the HF tokenizer ({kind}" + (f", pre-tokenizer '{pre_name}'" if pre_name else "") + ")"
    if unknown_pre:
        described += ("; its pre-tokenizer has no llama.cpp name known here, so 'default' was written and llama.cpp "
                      "may split some text differently (pass the llama.cpp name, or export from the source GGUF)")
    return write, described
