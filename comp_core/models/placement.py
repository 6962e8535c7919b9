"""Several GPUs through accelerate's device maps: which device each block of an in-memory model lives on.

Pruning goes block by block, so a model spread over GPUs needs nothing of its own: each block stays on its
GPU, the block loop replays it there and gathers and solves its statistics there (``loop`` reads the block's
own device), and the hidden states pass from GPU to GPU through accelerate's hooks (``dispatch_model``).
The map comes from accelerate too (``infer_auto_device_map`` over the GPUs' free memory, or a map the user
writes); this module only checks that pruning can work on it:

* **no offload**: a map that leaves modules on the CPU or disk next to GPUs makes accelerate keep their
  weights outside the modules, where pruning cannot change them. This project's offload is streaming
  (``comp_core.models.streaming``: one block at a time on one device), which such a model should use instead.
* **whole blocks**: pruning replaces the denses inside a block, so a block is never split across devices.
"""
from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .adapters import get_adapter

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# share of each GPU's free memory the weights may fill when the map is inferred: the rest holds the
# calibration activations, one block's statistics and their solves
WEIGHT_SHARE = 0.8
OFFLOAD_DEVICES = ("cpu", "disk")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

DeviceMap = dict[str, "int | str"]


class DeviceMapError(ValueError):
    """A device map pruning cannot use, or one that cannot be made here; the message says what to do."""


def parse_device_map(spec: str | Path | dict) -> str | DeviceMap:
    """A strategy name (``STRATEGIES``), a JSON object (module name -> GPU index, "cuda:N", or "cpu"), or the
    path of a JSON file holding one -> the strategy or the map."""
    if isinstance(spec, dict):
        return dict(spec)
    text = str(spec).strip()
    if text.lower() in STRATEGIES:
        return text.lower()
    if text.startswith("{"):
        source, raw = "the device map", text
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise DeviceMapError(f"device map '{text}' is neither one of {', '.join(STRATEGIES)} nor a JSON file")
        source, raw = str(path), path.read_text()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DeviceMapError(f"{source} is not valid JSON: {err}") from None
    if not isinstance(value, dict) or not value:
        raise DeviceMapError(f"{source} must be a JSON object of module name -> device, e.g. "
                             '{"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 1}')
    return value


def parse_max_memory(text: str | dict | None) -> dict[int | str, int] | None:
    """``"0=20GiB,1=22GiB"`` (GPU index = size; units B/KB/MB/GB/TB and KiB…TiB) -> accelerate's max_memory."""
    if text is None or isinstance(text, dict):
        return text
    limits: dict[int | str, int] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        device, _, size = part.partition("=")
        match = _SIZE.match(size)
        if not device.strip().isdigit() or match is None:
            raise DeviceMapError(f"max memory '{part}': expected GPU=SIZE, e.g. 0=20GiB,1=22GiB")
        limits[int(device)] = int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])
    if not limits:
        raise DeviceMapError("max memory is empty; expected GPU=SIZE pairs, e.g. 0=20GiB,1=22GiB")
    return limits


def gpu_memory() -> dict[int, int]:
    """Free bytes per visible CUDA device (empty without CUDA)."""
    if not torch.cuda.is_available():
        return {}
    return {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}


def plan_device_map(model: nn.Module, spec: str | DeviceMap,
                    max_memory: dict[int | str, int] | None = None) -> DeviceMap:
    """The device map ``model`` will be dispatched with: inferred by accelerate for a strategy (over
    ``max_memory``, default ``WEIGHT_SHARE`` of each GPU's free memory), or ``spec`` itself (``place_on_devices``
    checks it)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(spec, str):
        if max_memory is None:
            free = gpu_memory()
            if not free:
                raise DeviceMapError("a device map spreads the model over GPUs, and none is visible here; use "
                                     "--device cpu, or --stream on to prune a model larger than memory")
            max_memory = {i: int(b * WEIGHT_SHARE) for i, b in free.items()}
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        if spec.startswith("balanced"):
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             low_zero=spec == "balanced_low_0")
        return dict(infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split))
    return dict(spec)


def block_names(model: nn.Module) -> list[str]:
    """Module paths of the model's decoder blocks, in order."""
    path_of = {id(m): name for name, m in model.named_modules()}
    return [path_of[id(b)] for b in get_adapter(model).blocks(model)]


def split_blocks_map(model: nn.Module, devices: list[int | str]) -> DeviceMap:
    """A block-level device map that splits the blocks into ``len(devices)`` contiguous runs of near-equal
    length, one per device; what comes before the first block (embeddings) goes with the first device, the
    rest (final norm, head) with the last. A map to write by hand when the inferred one is not wanted (or to
    exercise the hooks on one device)."""
    if not devices:
        raise DeviceMapError("split_blocks_map needs at least one device")
    blocks = block_names(model)
    device_of = {name: devices[i * len(devices) // len(blocks)] for i, name in enumerate(blocks)}
    device_map: DeviceMap = {}
    seen_block = False

    def walk(prefix: str, module: nn.Module) -> None:
        nonlocal seen_block
        for name, child in module.named_children():
            path = prefix + name
            if path in device_of:
                device_map[path], seen_block = device_of[path], True
            elif any(b.startswith(path + ".") for b in blocks):
                walk(path + ".", child)
            elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                device_map[path] = devices[-1] if seen_block else devices[0]

    walk("", model)
    from accelerate.utils import find_tied_parameters

    def key_of(param: str) -> str | None:
        return next((k for k in device_map if param == k or param.startswith(k + ".")), None)

    for group in find_tied_parameters(model):  # a tied head shares the embedding's weight: one device for both
        order = list(device_map)
        keys = sorted({k for k in map(key_of, group) if k is not None}, key=order.index)  # the embedding first
        for k in keys[1:]:
            device_map[k] = device_map[keys[0]]
    return device_map


def check_device_map(model: nn.Module, device_map: DeviceMap) -> None:
    """Raise ``DeviceMapError`` unless every weight is placed, nothing is offloaded next to a GPU, and no block
    is split; the message names the modules at fault."""
    from accelerate.utils import check_device_map as covers_every_weight

    try:
        covers_every_weight(model, device_map)
    except ValueError as err:
        raise DeviceMapError(f"the device map does not place every weight: {err}") from None
    values = {str(v) for v in device_map.values()}
    offloaded = [name or "(the whole model)" for name, v in device_map.items() if str(v) in OFFLOAD_DEVICES]
    if offloaded and values - set(OFFLOAD_DEVICES):
        shown = ", ".join(offloaded[:6]) + (f" and {len(offloaded) - 6} more" if len(offloaded) > 6 else "")
        raise DeviceMapError(
            f"the model does not fit on the GPUs: the device map offloads {shown} to the CPU or disk, where "
            "pruning cannot change the weights; give the GPUs more room (--max-memory), load fewer bytes "
            "(--dtype bfloat16), or stream the model one block at a time (--stream on --device cuda)")
    if "disk" in values:
        raise DeviceMapError("a device map cannot place modules on 'disk'; stream the model instead (--stream on)")
    blocks = block_names(model)
    for name in device_map:
        for block in blocks:
            if name.startswith(block + "."):
                raise DeviceMapError(f"the device map splits block {block} ('{name}'); place whole blocks, "
                                     "because pruning replaces the denses inside them")
    for name, value in device_map.items():
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            continue  # a GPU index (torch.device(int) needs the accelerator to be there)
        try:
            torch.device(str(value))
        except (RuntimeError, TypeError, ValueError):
            raise DeviceMapError(f"device map entry '{name}': unknown device {value!r} "
                                 "(a GPU index, 'cuda:N' or 'cpu')") from None


def place_on_devices(model: nn.Module, device_map: DeviceMap) -> nn.Module:
    """Dispatch ``model`` over ``device_map`` (checked first) with accelerate's hooks, which move each
    module's inputs to its device; returns it, with ``hf_device_map`` set as transformers does."""
    from accelerate import dispatch_model

    check_device_map(model, device_map)
    with _quiet_false_offload_warning(device_map):
        model = dispatch_model(model, device_map=device_map, force_hooks=len(device_map) > 1)
    model.hf_device_map = dict(device_map)
    return model


def is_dispatched(model: nn.Module) -> bool:
    """Whether ``model`` was placed with a device map (accelerate hooks move activations between devices)."""
    return bool(getattr(model, "hf_device_map", None)) and hasattr(model, "_hf_hook")


@contextmanager
def _quiet_false_offload_warning(device_map: DeviceMap) -> Iterator[None]:
    """accelerate warns that parameters were offloaded whenever a map names "cpu", even when the CPU is the
    only device and nothing is offloaded; that one case is silenced."""
    logger = logging.getLogger("accelerate.big_modeling")
    quiet = {str(v) for v in device_map.values()} == {"cpu"}
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
