"""Save a masked (sparse) model in the compressed-tensors sparse format, and read it back.

``save_compressed(model, tokenizer, path, pattern)`` writes what ``comp_core.export.save_pruned`` writes
(config, tokenizer, comp_report.json; ``comp_<type>`` when the model has ``IndexedInputLinear`` denses,
as an RIA-permuted model does) but stores the weights of the sparse denses with a compressed-tensors
sparsity compressor, and records it in ``config.json`` under ``quantization_config.sparsity_config`` —
the steps llm-compressor's wrapped ``save_pretrained`` takes (compress, save, ``ModelCompressor.update_config``):

* ``"2:4"`` -> ``sparse-24-bitmask``: per dense ``<dense>.compressed`` (d_out, d_in/2) kept values,
  ``<dense>.bitmask`` (d_out, ⌈d_in/8⌉) uint8 packed positions, ``<dense>.shape``. The N:M groups must be
  contiguous in the *stored* column order — which is why RIA stores a permuted weight permuted;
* anything else (``"0.5"``, ``"4:8"``) -> ``sparse-bitmask``: ``compressed`` (nonzeros, flat),
  ``bitmask``, ``row_offsets`` (int64, one per row), ``shape``.

A dense is compressed only where that is lossless and smaller: sparse-24-bitmask needs at most 2 nonzeros in
every 4 consecutive stored weights (a protected, dense block is left as it is), sparse-bitmask is used where it
takes fewer bytes than the dense tensor. Embeddings, norms, biases and index buffers stay as they are.

The sparse compressors exist in compressed-tensors up to **0.14.0.1**; later releases removed them
(0.20's ``ModelCompressor`` says the Sparse24 format "is no longer supported as of compressed-tensors>0.14.0").
0.14.0.1 declares ``transformers<5`` although the code paths used here work with transformers 5, so it is
installed with ``pip install --no-deps compressed-tensors==0.14.0.1 loguru``. ``load_compressed`` rebuilds
the model from the folder's config and decompresses every weight (a stock transformers load would hand the
folder to its compressed-tensors quantizer instead).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from .atomic import replace_folder
from .folder import REPORT_FILE, _check_replaceable, folder_bytes, plan_export, save_pruned
from ..models.adapters import get_adapter
from ..math.sparsity import SparsityPattern, zero_counts
from ..models.pruned import register_all
from ..runtime import resolve_device

logger = logging.getLogger(__name__)

PACKAGE = "compressed-tensors"
LAST_SPARSE_VERSION = "0.14.0.1"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={LAST_SPARSE_VERSION} loguru"
FORMAT_24 = "sparse-24-bitmask"
FORMAT_BITMASK = "sparse-bitmask"
FORMATS = (FORMAT_24, FORMAT_BITMASK)


class SparseFormatUnavailable(ImportError):
    """compressed-tensors is missing, or is a release without its sparse compressors."""


def _compressed_tensors():
    """The package, checked to have the sparse-bitmask compressors; raises ``SparseFormatUnavailable``."""
    try:
        with warnings.catch_warnings():  # its import calls torch.jit.script_method, deprecated in torch 2.13
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated",
                                    category=DeprecationWarning)
            import compressed_tensors
    except ImportError as err:
        raise SparseFormatUnavailable(
            f"saving in the compressed-tensors sparse format needs the '{PACKAGE}' package, which is not "
            f"installed: {INSTALL_HINT}") from err
    try:
        from compressed_tensors.compressors.sparse_compressors import (  # noqa: F401
            BitmaskCompressor, Sparse24BitMaskCompressor)
    except ImportError as err:
        version = getattr(compressed_tensors, "__version__", "?")
        raise SparseFormatUnavailable(
            f"'{PACKAGE}' {version} has no sparse compressors (sparse-bitmask / sparse-24-bitmask were removed "
            f"after {LAST_SPARSE_VERSION}): {INSTALL_HINT}") from err
    return compressed_tensors


def available() -> tuple[bool, str]:
    """(True, version) when ``save_compressed`` can run, else (False, the reason and the install command)."""
    try:
        return True, _compressed_tensors().__version__
    except SparseFormatUnavailable as err:
        return False, str(err)


def format_for(pattern: "SparsityPattern | str") -> str:
    """``sparse-24-bitmask`` for 2:4, ``sparse-bitmask`` for every other pattern."""
    pattern = SparsityPattern.parse(pattern)
    return FORMAT_24 if (pattern.n, pattern.m) == (2, 4) else FORMAT_BITMASK


def _holds_24(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every 4 consecutive stored weights of every row (lossless sparse-24-bitmask)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def _bitmask_bytes(weight: torch.Tensor) -> int:
    rows, cols = weight.shape
    return int((weight != 0).sum()) * weight.element_size() + rows * ((cols + 7) // 8) + rows * 8


def compressible_denses(model: nn.Module, fmt: str) -> dict[str, nn.Module]:
    """Full module name -> dense for the block denses that ``fmt`` stores losslessly (and, for
    sparse-bitmask, in fewer bytes than dense)."""
    adapter = get_adapter(model)
    wanted = {id(adapter.dense(block, spec.name)) for block in adapter.blocks(model) for spec in adapter.denses}
    chosen = {}
    for name, module in model.named_modules():
        if id(module) not in wanted:
            continue
        weight = module.weight.detach()
        if fmt == FORMAT_24:
            ok = _holds_24(weight)
        else:
            ok = _bitmask_bytes(weight) < weight.numel() * weight.element_size()
        if ok:
            chosen[name] = module
    return chosen


def save_compressed(model: nn.Module, tokenizer, path: str | os.PathLike, pattern: "SparsityPattern | str", *,
                    report: dict | None = None, overwrite: bool = False, fmt: str | None = None,
                    max_shard_size: int | str = "2GB") -> Path:
    """Save a masked model with its sparse denses in compressed-tensors' sparse format; returns the folder.

    ``pattern`` ("2:4", "4:8", "0.5"...) picks the format (``format_for``) unless ``fmt`` names one.
    ``report`` goes to comp_report.json as in ``save_pruned``, next to a ``"sparse_export"`` record with the
    format, the compressed denses and the weight bytes of the dense and the compressed files. Raises
    ``SparseFormatUnavailable`` (an ImportError) naming the package when it cannot run, ``ValueError`` when
    no dense holds the format, ``FileExistsError`` as ``save_pruned`` does. The model is not modified.
    """
    ct = _compressed_tensors()
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.config import SparsityCompressionConfig
    from safetensors.torch import load_file, save_file

    pattern = SparsityPattern.parse(pattern)
    fmt = fmt or format_for(pattern)
    if fmt not in FORMATS:
        raise ValueError(f"unknown sparse format '{fmt}'; choose one of {', '.join(FORMATS)}")
    path = Path(path).expanduser().absolute()
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
        _check_replaceable(path)
    export_model = plan_export(model).model  # the class and names the folder is saved with
    targets = sorted(compressible_denses(export_model, fmt))
    if not targets:
        raise ValueError(f"no linear of this model is stored losslessly as {fmt} (pattern {pattern.label}): "
                         "prune it first, with the same pattern")
    config = SparsityCompressionConfig.load_from_registry(
        fmt, targets=targets, ignore=[], global_sparsity=zero_counts(model, [])["zero_share"],
        sparsity_structure="2:4" if fmt == FORMAT_24 else "unstructured")
    compressor = BaseCompressor.load_from_registry(fmt, config=config)

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.sparse-{uuid.uuid4().hex[:8]}"
    try:
        save_pruned(model, tokenizer, staging, report, max_shard_size=max_shard_size)
        dense_bytes = folder_bytes(staging, ".safetensors")
        renamed: dict[str, str] = {}  # new key -> shard file, for a sharded checkpoint's index
        for shard in sorted(staging.glob("*.safetensors")):
            state = load_file(shard)
            compressed = compressor.compress(state, compression_targets=set(targets))
            save_file({k: v.contiguous() for k, v in compressed.items()}, shard, metadata={"format": "pt"})
            renamed.update({key: shard.name for key in compressed})
        index = staging / "model.safetensors.index.json"
        if index.is_file():
            with open(index) as f:
                data = json.load(f)
            data["weight_map"] = dict(sorted(renamed.items()))
            with open(index, "w") as f:
                json.dump(data, f, indent=2)
        ModelCompressor(sparsity_config=config).update_config(str(staging))
        compressed_bytes = folder_bytes(staging, ".safetensors")
        with open(staging / REPORT_FILE) as f:
            saved = json.load(f)
        saved["sparse_export"] = {
            "format": fmt, "pattern": pattern.label, "compressed_tensors_version": ct.__version__,
            "compressed_denses": len(targets), "dense_weight_bytes": dense_bytes,
            "compressed_weight_bytes": compressed_bytes, "loader": "comp_core.export.load_compressed"}
        with open(staging / REPORT_FILE, "w") as f:
            json.dump(saved, f, indent=1)
        replace_folder(staging, path, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved %s as %s: %d denses compressed, %d -> %d weight bytes", path, fmt, len(targets),
                dense_bytes, compressed_bytes)
    return path


def load_compressed(path: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Load a folder written by ``save_compressed``: ``(model, tokenizer)`` with every weight decompressed.

    Every parameter and buffer must come from the folder (only a tied LM head may be absent); anything
    missing or unexpected raises ``ValueError``.
    """
    _compressed_tensors()
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import SparsityCompressionConfig
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


    register_all()
    path = Path(path).expanduser()
    with open(path / "config.json") as f:
        raw = json.load(f)
    sparsity = (raw.get("quantization_config") or {}).get("sparsity_config") or {}
    if sparsity.get("format") not in FORMATS:
        raise ValueError(f"{path}/config.json has no compressed-tensors sparsity_config of format "
                         f"{' or '.join(FORMATS)}; is it a folder written by save_compressed?")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # decompressed here, not by transformers' quantizer
    compressor = BaseCompressor.load_from_registry(
        sparsity["format"], config=SparsityCompressionConfig.load_from_registry(sparsity["format"], **sparsity))
    state = {name: tensor for name, tensor in compressor.decompress(str(path))}
    model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)  # real buffers (rotary frequencies)
    result = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if not (tied and k.endswith("lm_head.weight"))]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path} does not match its config: missing {missing[:5]}, "
                         f"unexpected {list(result.unexpected_keys)[:5]}")
    if tied:
        model.tie_weights()
    model = model.to(resolve_device(device)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer

