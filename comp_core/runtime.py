"""Small runtime helpers shared by the library, the CLI and the UI.

* :func:`resolve_device` / :func:`resolve_dtype` turn user strings into torch objects, with errors a user can act on.
* :func:`configure_threads` sets the torch CPU thread count to what this process may actually use.
* :func:`peak_rss_mb` / :func:`current_rss_mb` read process memory without psutil.
* :func:`stage` (or :class:`StageTimer`) records wall time and peak RSS of a named step into a plain dict.
* :func:`count_parameters` counts each distinct weight tensor once (tied embeddings count once).
* :func:`ratio_over_all` turns a ratio over the decoder blocks into the share of all parameters a method works
  with (:data:`RATIO_BASES`); a value that cannot be used is a :class:`SettingsError`.
* :func:`is_out_of_memory` / :func:`out_of_memory_message` recognise a failed allocation and say it in one line.

Nothing here imports transformers; only ``torch`` and the standard library.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import os
import resource
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Iterator

import torch

logger = logging.getLogger(__name__)

# Accepted spellings -> dtype. "auto" is not here: only model loading can decide what "auto" means.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@functools.cache
def _libc_malloc_trim():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def prefer_mapped_allocations(threshold: int = 256 * 1024) -> bool:
    """Serve every allocation above ``threshold`` bytes with its own mapping (glibc ``mallopt``), so freeing a
    tensor returns its memory at once. glibc's default threshold grows to 32 MB as large blocks are freed,
    after which the many 1–32 MB tensors of a block's statistics come from the heap, whose high-water mark
    stays resident: measured 2.21 → 1.92 GB peak for one 2048/4096-wide block. What streaming turns on (a
    few more page faults, for a peak that does not creep); False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, int(4 * threshold)))
    except (OSError, AttributeError):
        return False


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Calibration forwards allocate and free activations of many sizes; glibc keeps the freed pages and its
    heap only grows (measured: +900 MB of resident memory after one bf16 capture of 32 k tokens on the bundled
    model, +90 MB with the pages returned). Called between batches and blocks, it costs milliseconds."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available, else CPU) -> ``torch.device``.

    Raises ``ValueError`` when CUDA (or a CUDA index) is asked for but is not there, or the name is unknown.
    """
    if isinstance(name, torch.device):
        text = str(name)
    else:
        text = (name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto") from err
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{name}' was requested but CUDA is not available "
                             "(no GPU, or a CPU-only torch build); use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device '{name}' was requested but only {count} CUDA device(s) exist "
                             f"(cuda:0..cuda:{count - 1})")
        return device
    raise ValueError(f"unsupported device '{name}'; use cpu, cuda, cuda:N or auto")


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or fp32/bf16/fp16, or a ``torch.dtype``) -> ``torch.dtype``.

    ``"auto"`` is rejected here: it depends on the checkpoint, so :func:`comp_core.models.loading.load_model`
    resolves it itself.
    """
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"unsupported dtype {name}; use float32, bfloat16 or float16")
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype '{name}'; use float32, bfloat16 or float16"
                         + (" ('auto' is only understood by load_model)" if key == "auto" else ""))
    return DTYPES[key]


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota when one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def configure_threads(n: int | None = None) -> int:
    """Set ``torch.set_num_threads`` to ``n`` (default: :func:`available_cpus`), never above what is available.

    Idempotent: calling it again with the same argument changes nothing. Returns the thread count in effect.
    """
    limit = available_cpus()
    if n is None:
        want = limit
    else:
        if int(n) < 1:
            raise ValueError(f"thread count must be >= 1, got {n}")
        want = int(n)
        if want > limit:
            logger.warning("asked for %d threads but only %d CPU(s) are available; using %d", want, limit, limit)
            want = limit
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
        logger.debug("torch CPU threads set to %d", want)
    return want


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's own memory. ``getrusage``'s
    ``ru_maxrss`` is kept across ``exec``, so a child started by a large parent (``bench-speed``'s fresh
    loading process) would report the parent's peak; it is only the fallback elsewhere."""
    hwm = _proc_kb("/proc/self/status", "VmHWM:")
    if hwm is not None:
        return hwm / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kB, macOS reports bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def reset_peak_memory() -> bool:
    """Start a new peak: Linux resets ``VmHWM`` to the current resident set on writing 5 to
    /proc/self/clear_refs, and torch resets its CUDA peak. Returns False where the RSS peak cannot be reset
    (the figures then stay process-lifetime peaks). What a long-lived process (the GUI) calls before each run
    so that each run's peak is its own."""
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cuda_peaks_mb() -> dict[int, float]:
    """Peak CUDA memory torch allocated on each GPU since the last reset, in MiB (empty without CUDA)."""
    if not torch.cuda.is_available():
        return {}
    return {i: torch.cuda.max_memory_allocated(i) / 2**20 for i in range(torch.cuda.device_count())}


def cuda_peak_mb() -> float | None:
    """The largest per-GPU peak since the last reset, in MiB (None without CUDA): what has to fit on one card."""
    peaks = cuda_peaks_mb()
    return max(peaks.values()) if peaks else None


def current_rss_mb() -> float:
    """Current resident set size in MiB, from ``/proc/self/statm``; falls back to :func:`peak_rss_mb` elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


class RssSampler:
    """Peak resident memory *during* a block of code, sampled every ``interval`` seconds in a thread.

    ``getrusage``'s high-water mark never falls, so in one process that runs several methods it says
    nothing about the later ones; sampling the current RSS does (it can miss a spike shorter than the
    interval, so the figure is a lower bound of the true peak)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = None
        self._thread = None

    def __enter__(self) -> "RssSampler":
        import threading

        self.peak_mb = current_rss_mb()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self.peak_mb = max(self.peak_mb, current_rss_mb())
        self._thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())


@dataclass
class StageTimer:
    """Collects ``{stage name: {"seconds": s, "peak_rss_mb": m}}`` into ``timings``.

    ``with timer("prune"): ...`` times one step. A name used twice adds up its seconds (handy in loops).
    ``peak_rss_mb`` is the process high-water mark when the stage ended: it never goes down from one stage
    to the next, so the stage that raised it is the one where it jumps. A stage is recorded even if its
    body raises.
    """

    timings: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            entry = self.timings.setdefault(name, {"seconds": 0.0, "peak_rss_mb": 0.0})
            entry["seconds"] += seconds
            entry["peak_rss_mb"] = max(entry["peak_rss_mb"], peak_rss_mb())
            logger.debug("stage %s: %.2f s, peak RSS %.0f MiB", name, seconds, entry["peak_rss_mb"])


@contextlib.contextmanager
def stage(name: str, timings: dict) -> Iterator[None]:
    """Context manager: time the body and store seconds + peak RSS under ``timings[name]`` (see :class:`StageTimer`)."""
    with StageTimer(timings)(name):
        yield


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters, each distinct tensor counted once.

    ``Module.parameters()`` already skips a Parameter object seen twice; this also dedupes different Parameter
    objects that share memory (same device, data pointer and shape), as tied embeddings can. Meta tensors have
    no memory, so they are deduped by identity only.
    """
    seen: set = set()
    total = 0
    for param in model.parameters():
        ptr = param.data_ptr() if param.device.type != "meta" else 0
        key = ("id", id(param)) if ptr == 0 else (param.device, ptr, tuple(param.shape))
        if key in seen:
            continue
        seen.add(key)
        total += param.numel()
    return total


class SettingsError(ValueError):
    """A control's value cannot be used; the message says what would be accepted (``comp_core.settings``
    raises it for everything a person types; it lives here so the core's own checks can raise it too)."""


# What a ratio is a share of: "all" parameters (embeddings, final norm and head included; what every method
# works with) or the decoder "blocks" only (for a model whose embedding dominates, 10 % of all can be 27 % of
# its blocks). Wherever a ratio is set (``prune_with``, ``analyze_with``, ``compare_methods``, --ratio-of).
RATIO_BASES: tuple[str, ...] = ("all", "blocks")
RATIO_BASIS_HELP = {"all": "every parameter, embeddings included",
                    "blocks": "the decoder blocks' parameters only, without the embeddings, final norm and head"}


def check_ratio_of(ratio_of: str) -> str:
    """``ratio_of`` if it is one of :data:`RATIO_BASES`; a :class:`SettingsError` naming them otherwise."""
    if ratio_of not in RATIO_BASES:
        choices = " or ".join(f"'{b}' ({RATIO_BASIS_HELP[b]})" for b in RATIO_BASES)
        raise SettingsError(f"ratio_of={ratio_of!r}: a ratio is a share of {choices}")
    return ratio_of


def _blocks_share(params_total: int, block_params: int) -> float:
    """The decoder blocks' share of all parameters, checked."""
    if not 0 < block_params <= params_total:
        raise SettingsError(f"cannot read a ratio over the decoder blocks: the model counts {block_params:,} "
                            f"block parameters of {params_total:,} in all")
    return block_params / params_total


def ratio_over_all(ratio: float, ratio_of: str, params_total: int, block_params: int) -> float:
    """The share of all ``params_total`` parameters that removing ``ratio`` of ``ratio_of`` means: ``ratio``
    itself for "all", ``ratio`` × ``block_params`` / ``params_total`` for "blocks" (``block_params``: the decoder
    blocks' parameters, ``models.adapters.count_block_parameters``). A ratio over the blocks must lie in
    [0, 1): all of them would leave no model."""
    check_ratio_of(ratio_of)
    if ratio_of == "all":
        return ratio
    if math.isnan(ratio) or not 0.0 <= ratio < 1.0:
        raise SettingsError(f"a ratio over the decoder blocks must be in [0, 1) (removing every block leaves no "
                            f"model), got {ratio:g}")
    return ratio * _blocks_share(params_total, block_params)


def ratio_over(ratio_of: str, ratio_all: float, params_total: int, block_params: int) -> float:
    """The inverse of :func:`ratio_over_all`: a share of all parameters (``ratio_all``) read as a share of
    ``ratio_of`` (for "blocks" it can exceed 1 where more than the blocks hold would go)."""
    check_ratio_of(ratio_of)
    return ratio_all if ratio_of == "all" else ratio_all / _blocks_share(params_total, block_params)


def _cache_argument(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of ``model.forward``: ``cache`` since transformers 5.2x (where
    ``past_key_values`` is deprecated, to go in 5.40), ``past_key_values`` before."""
    import inspect

    parameters = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def with_cache(model: torch.nn.Module, cache) -> dict:
    """Keyword arguments that pass ``cache`` to ``model`` under the name its transformers version expects."""
    return {_cache_argument(model): cache}


def cache_of(output):
    """The KV cache a forward returned (``output.cache``, or ``past_key_values`` on older transformers)
    without touching the deprecated attribute when the new one exists."""
    if "cache" in output:
        return output["cache"]
    return output.get("past_key_values")


def is_out_of_memory(err: BaseException) -> bool:
    """True for a failed allocation: ``MemoryError``, CUDA's ``OutOfMemoryError`` or the CPU allocator's
    ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def available_memory_mb() -> float | None:
    """``MemAvailable`` of /proc/meminfo in MiB (None where there is no /proc)."""
    available = _proc_kb("/proc/meminfo", "MemAvailable:")
    return available / 1024 if available is not None else None


def _proc_kb(path: str, key: str) -> int | None:
    """The kB figure of line ``key`` in a /proc file (``VmHWM:``, ``MemAvailable:``); None where unreadable."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def out_of_memory_message(err: BaseException) -> str:
    """One line for a failed allocation: what failed and the memory figures a user needs to size the run."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    figures = [f"peak RSS {peak_rss_mb():.0f} MiB"]
    available = available_memory_mb()
    if available is not None:
        figures.append(f"{available:.0f} MiB available now")
    if isinstance(err, torch.OutOfMemoryError) and torch.cuda.is_available():
        figures.append(f"CUDA peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    return (f"out of memory ({first}); {', '.join(figures)}; try fewer or shorter calibration sequences "
            "(--n-samples/--seq-len), --dtype bfloat16 or a machine with more memory")


HUB_ENDPOINT_ENV = "HF_ENDPOINT"


def hub_answers(path: str, timeout: float) -> bool:
    """Whether the Hugging Face hub (``$HF_ENDPOINT`` or huggingface.co) answers a HEAD request for ``path`` within
    ``timeout`` seconds; any HTTP answer counts (a 401/404 still means the hub is there). Lets a load or a data
    set fail in seconds on an offline machine instead of after the libraries' retries."""
    endpoint = os.environ.get(HUB_ENDPOINT_ENV, "https://huggingface.co").rstrip("/")
    request = urllib.request.Request(f"{endpoint}/{path.lstrip('/')}", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError) as exc:  # no route, no name resolution, refused, timed out, bad endpoint
        logger.info("the Hugging Face hub does not answer (%s)", exc)
        return False
