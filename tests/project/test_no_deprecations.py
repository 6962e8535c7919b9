"""A whole run (data-free calibration, pruning, evaluation, export, reload, generation, decode timing) emits no
deprecation warning: the project keeps up with transformers and torch instead of printing their notices."""
from __future__ import annotations

import warnings

import pytest
import torch

import comp_core.runtime as runtime
from comp_core.cli import main

DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _as_errors():
    caught = warnings.catch_warnings()
    caught.__enter__()
    for category in DEPRECATIONS:
        warnings.simplefilter("error", category)
    return caught


def _run(folder, out) -> None:
    from comp_core import load_pruned
    from comp_core.evaluate.speed import greedy_decode

    code = main(["prune", "--model", str(folder), "--calib", "data-free", "--n-samples", "2", "--seq-len", "16",
                 "--eval", "sample", "--max-windows", "2", "--eval-seq-len", "16", "--out", str(out),
                 "--quiet", "--threads", "1"])
    assert code == 0
    model, _ = load_pruned(out)
    prompt = torch.tensor([[1, 2, 3, 4]])
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False)
    greedy_decode(model, prompt, 3)


def test_a_whole_run_emits_no_deprecation_warning(tiny_folder, tmp_path):
    caught = _as_errors()
    try:
        _run(tiny_folder, tmp_path / "pruned")
    finally:
        caught.__exit__(None, None, None)
        torch.set_num_threads(1)


def test_the_check_would_catch_the_deprecated_cache_argument(tiny_folder, tmp_path, monkeypatch):
    """Passing the KV cache as ``past_key_values`` (deprecated in transformers 5.2x) is what the check above guards."""
    import inspect

    from transformers import LlamaForCausalLM

    if "cache" not in inspect.signature(LlamaForCausalLM.forward).parameters:
        pytest.skip("this transformers has no `cache` argument yet")
    monkeypatch.setattr(runtime, "_cache_argument", lambda model: "past_key_values")
    caught = _as_errors()
    try:
        with pytest.raises(FutureWarning, match="past_key_values"):
            _run(tiny_folder, tmp_path / "pruned")
    finally:
        caught.__exit__(None, None, None)
        torch.set_num_threads(1)
