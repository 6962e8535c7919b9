"""The block loop's plumbing, written once: capture block inputs, replay blocks, collect Grams with hooks.

Capture runs the model once on the calibration batch with pre-forward hooks on every block: block 0's
hook keeps the hidden states, and every block's hook keeps the keyword arguments the model passes it
(attention mask, rotary position embeddings, …), which can differ per block (sliding-window layers), and
then the forward is stopped at the last block. Afterwards each block can be replayed alone on any hidden
states, so only one block's activations are ever alive.

Calibration forwards may run in bfloat16 autocast (``forward_precision``): the linears and attention of a
float32 model then take bf16 inputs with float32 accumulation while the residual stream stays float32 —
2.6× faster per block on a CPU with AMX/AVX512-BF16, and the statistics are still taken in float32/float64
of exactly what the autocast linears read. ``FORWARD_DTYPES`` and ``resolve_forward_dtype`` say when.

The capture forward runs every block but the last anyway; with ``observe`` it runs the last one too and
shows each block's input and output to the caller, so a measurement over the unpruned model (the layer
importances that start the removal search) costs no pass of its own.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from ..models.adapters import ArchAdapter
from ..runtime import release_free_memory


FORWARD_DTYPES = ("auto", "float32", "bfloat16")
_FORWARD_DTYPE: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("forward_dtype", default=None)


def fast_bfloat16(device: torch.device | str) -> bool:
    """Whether bf16 matrix products are native (not emulated) here: CUDA with bf16, or a CPU with AMX or
    AVX512-BF16 (elsewhere bf16 autocast on CPU is slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                    or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    return False


def resolve_forward_dtype(setting: str, model: nn.Module) -> torch.dtype | None:
    """The autocast dtype of calibration forwards for a setting of ``FORWARD_DTYPES`` (None = plain).

    "auto" = bfloat16 for a float32 model on hardware with native bf16 products, else plain; "bfloat16"
    forces it (slow where emulated); "float32" never. A model stored in bf16/fp16 always runs as it is."""
    if setting not in FORWARD_DTYPES:
        raise ValueError(f"forward dtype must be one of {FORWARD_DTYPES}, got '{setting}'")
    param = next(model.parameters())
    if setting == "float32" or param.dtype != torch.float32:
        return None
    if setting == "bfloat16" or fast_bfloat16(param.device):
        return torch.bfloat16
    return None


@contextlib.contextmanager
def forward_precision(dtype: torch.dtype | None) -> Iterator[None]:
    """Within, capture and block replays run under autocast to ``dtype`` (None: as stored)."""
    token = _FORWARD_DTYPE.set(dtype)
    try:
        yield
    finally:
        _FORWARD_DTYPE.reset(token)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    dtype = _FORWARD_DTYPE.get()
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass early (never escapes ``capture_block_inputs``)."""


@contextlib.contextmanager
def calibration_context(model: nn.Module) -> Iterator[None]:
    """no_grad, eval mode and KV cache off for the duration; restored afterwards."""
    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    model.eval()
    model.config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache


@dataclass
class BlockInputs:
    """Calibration hidden states entering block 0, in batches, and the kwargs each block receives.

    ``kwargs[b][i]`` is what original block i got for batch b; it is keyed by the block *object* too
    (``kwargs_for``), so it stays valid after blocks are removed from the list.
    """

    hidden: list[torch.Tensor]  # per batch: (batch, seq, d_model)
    kwargs: list[dict[int, dict]] = field(default_factory=list)
    block_ids: dict[int, int] = field(default_factory=dict)  # id(block) -> original index

    def kwargs_for(self, block: nn.Module, batch: int) -> dict:
        return self.kwargs[batch][self.block_ids[id(block)]]


# observe(block index, hidden states entering it, hidden states leaving it), once per block and batch
BlockObserver = Callable[[int, torch.Tensor, torch.Tensor], None]


def capture_block_inputs(model: nn.Module, adapter: ArchAdapter, samples: torch.Tensor, *, batch_size: int = 8,
                         offload: torch.device | str | None = None,
                         observe: BlockObserver | None = None) -> BlockInputs:
    """Inputs of block 0 and per-block kwargs for calibration ``samples`` (n, seq_len) token ids; with
    ``observe``, also every block's input and output on the way (the forward then runs the last block too)."""
    blocks = adapter.blocks(model)
    device = next(model.parameters()).device
    captured = BlockInputs(hidden=[], block_ids={id(b): i for i, b in enumerate(blocks)})
    last = len(blocks) - 1

    def make_hook(index: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            rest["use_cache"] = False
            rest.pop("past_key_values", None)
            rest.pop("past_key_value", None)
            captured.kwargs[-1][index] = _to(rest, offload)
            if index == 0:
                captured.hidden.append(hidden.detach().to(offload) if offload is not None else hidden.detach())
            if index == last and observe is None:
                raise _StopForward
        return hook

    def make_observer(index: int):
        def hook(_module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            observe(index, hidden, output[0] if isinstance(output, (tuple, list)) else output)
            if index == last:
                raise _StopForward
        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    if observe is not None:
        handles += [b.register_forward_hook(make_observer(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with calibration_context(model):
            for start in range(0, samples.shape[0], batch_size):
                captured.kwargs.append({})
                batch = samples[start:start + batch_size].to(device)
                try:
                    with _autocast(device):
                        model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
                release_free_memory()
    finally:
        for h in handles:
            h.remove()
    return captured


def _to(obj, device):
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One block forward on captured kwargs; returns hidden states whatever the block's return type."""
    device = next(block.parameters()).device
    with _autocast(device):
        out = block(hidden.to(device), **_to(kwargs, device))
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.to(hidden.dtype)  # autocast may hand back bf16 where a block ends in a linear (OPT, GPT-2)


def replay(block: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """Run ``block`` on every calibration batch; outputs stay on the inputs' device."""
    return [run_block(block, h, kw).to(h.device) for h, kw in zip(inputs, kwargs)]
