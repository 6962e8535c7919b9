"""comp_core.runtime: device/dtype parsing, threads, memory readings, stage timings, parameter counting, what a
ratio is a share of."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from tests.helpers import small_llama

from comp_core import runtime
from comp_core.runtime import (RATIO_BASES, SettingsError, StageTimer, check_ratio_of, configure_threads,
                               count_parameters, current_rss_mb, peak_rss_mb, ratio_over, ratio_over_all,
                               resolve_device, resolve_dtype, stage)

VOCAB, HIDDEN = 512, 32


def test_count_parameters_counts_tied_embeddings_once():
    tied, untied = (small_llama(tie=tie, max_position_embeddings=64) for tie in (True, False))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert count_parameters(untied) - count_parameters(tied) == VOCAB * HIDDEN
    # Same as summing the distinct parameters by hand.
    assert count_parameters(untied) == sum(p.numel() for p in untied.parameters())


def test_count_parameters_dedupes_shared_memory_across_parameter_objects():
    a = torch.nn.Linear(4, 3, bias=False)
    b = torch.nn.Linear(4, 3, bias=False)
    b.weight = torch.nn.Parameter(a.weight.data)  # different Parameter object, same storage
    model = torch.nn.Sequential(a, b)
    assert a.weight is not b.weight and a.weight.data_ptr() == b.weight.data_ptr()
    assert count_parameters(model) == 12
    assert count_parameters(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3))) == 30


def test_count_parameters_meta_device():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    assert count_parameters(model) == 4 * 3 + 3 + 3 * 2 + 2


def test_a_ratio_of_the_blocks_is_that_many_block_parameters_out_of_all():
    assert RATIO_BASES == ("all", "blocks")
    # Gemma 3 270M in round numbers: 268 M parameters, 168 M of them the embedding, 100 M in the blocks
    assert ratio_over_all(0.1, "all", 268, 100) == 0.1  # the share of all: unchanged, whatever the counts
    assert ratio_over_all(0.27, "blocks", 268, 100) == pytest.approx(0.27 * 100 / 268)  # 27 % of the blocks ≈ 10 %
    assert ratio_over_all(0.2, "blocks", 1000, 400) == pytest.approx(0.08)
    assert ratio_over_all(0.0, "blocks", 1000, 400) == 0.0
    assert ratio_over_all(0.5, "blocks", 400, 400) == 0.5  # a model of blocks only: both shares are one
    assert ratio_over("blocks", 0.08, 1000, 400) == pytest.approx(0.2)  # the way back
    assert ratio_over("blocks", 0.1, 268, 100) == pytest.approx(0.268)
    assert ratio_over("all", 0.08, 1000, 400) == 0.08
    assert ratio_over("blocks", 0.7, 1000, 400) == pytest.approx(1.75)  # more than the blocks hold: said, not capped


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, float("nan")])
def test_a_ratio_of_the_blocks_that_cannot_be_met_is_refused(ratio):
    with pytest.raises(SettingsError, match=r"ratio over the decoder blocks must be in \[0, 1\)"):
        ratio_over_all(ratio, "blocks", 1000, 400)


def test_a_ratio_basis_is_checked_by_name_and_counts_that_make_no_sense_are_refused():
    from comp_core import settings

    assert settings.SettingsError is SettingsError and issubclass(SettingsError, ValueError)  # one class, every face
    assert check_ratio_of("blocks") == "blocks"
    for bad in ("layers", "All", ""):
        with pytest.raises(SettingsError, match=rf"ratio_of={bad!r}: a ratio is a share of 'all' \(every parameter"
                                                r".*'blocks' \(the decoder blocks' parameters only"):
            ratio_over_all(0.2, bad, 1000, 400)
    for block_params in (0, 1001):
        with pytest.raises(SettingsError, match="cannot read a ratio over the decoder blocks"):
            ratio_over_all(0.2, "blocks", 1000, block_params)


def test_stage_records_positive_time_and_peak_rss():
    timings: dict = {}
    with stage("load", timings):
        time.sleep(0.01)
    assert set(timings) == {"load"}
    assert set(timings["load"]) == {"seconds", "peak_rss_mb"}
    assert timings["load"]["seconds"] >= 0.01
    assert timings["load"]["peak_rss_mb"] > 0


def test_stage_accumulates_repeats_and_records_on_error():
    timer = StageTimer()
    for _ in range(2):
        with timer("step"):
            time.sleep(0.005)
    assert timer.timings["step"]["seconds"] >= 0.01
    with pytest.raises(RuntimeError):
        with stage("boom", timer.timings):
            raise RuntimeError("x")
    assert timer.timings["boom"]["seconds"] >= 0


def test_rss_readings_are_plausible():
    now = current_rss_mb()
    assert 1 < now < 1_000_000
    assert peak_rss_mb() >= now * 0.95  # the high-water mark is at least what we use now (page rounding aside)
    status = Path("/proc/self/status")
    if status.is_file():  # Linux: agrees with the kernel's own VmRSS / VmHWM lines
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        vm_rss_mb = int(fields["VmRSS"].split()[0]) / 1024
        assert abs(current_rss_mb() - vm_rss_mb) < 16
        assert peak_rss_mb() >= int(fields["VmHWM"].split()[0]) / 1024 - 16


def test_configure_threads_defaults_caps_and_is_idempotent(monkeypatch):
    original = torch.get_num_threads()
    try:
        available = runtime.available_cpus()
        assert 1 <= available <= (os.cpu_count() or available)
        assert configure_threads() == available == torch.get_num_threads()
        assert configure_threads() == available  # idempotent
        assert configure_threads(1) == 1 == torch.get_num_threads()
        assert configure_threads(available + 100) == available  # never above what is available
        with pytest.raises(ValueError):
            configure_threads(0)
        monkeypatch.setattr(runtime, "available_cpus", lambda: 1)
        assert configure_threads(8) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(original)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    with pytest.raises(ValueError, match="unknown device|unsupported device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_resolve_dtype():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("FP16") is torch.float16
    assert resolve_dtype("torch.bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="auto"):
        resolve_dtype("auto")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype(torch.int8)


def test_release_free_memory_hands_pages_back_and_keeps_live_tensors():
    """glibc's malloc_trim is found on glibc Linux (a no-op elsewhere); releasing never touches live data."""
    import platform

    live = torch.arange(1_000_000, dtype=torch.float64)
    garbage = [torch.ones(4096) for _ in range(256)]
    del garbage
    assert runtime.release_free_memory() is None
    assert runtime.release_free_memory() is None  # twice is as harmless as once
    assert float(live.sum()) == 999_999 * 1_000_000 / 2
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert runtime._libc_malloc_trim() is not None
