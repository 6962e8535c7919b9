"""bench-speed's load memory is each model's own: measured in a fresh process whose peak owes nothing to ours."""
from __future__ import annotations

import numpy as np

from comp_core.export.folder import save_pruned
from comp_core.evaluate.speed import load_memory

from tests.helpers import make_tiny_model

BALLAST_MIB = 1024


def test_load_peak_is_the_child_process_own_not_the_parents(tmp_path):
    folder = save_pruned(make_tiny_model("llama"), None, tmp_path / "tiny")
    ballast = np.ones(BALLAST_MIB * 2**20 // 8)  # this process now peaks 1 GiB higher than the child ever will
    memory = load_memory(folder)
    del ballast
    # a tiny model: the child's own peak above its bare start is the transformers import plus a few MiB;
    # getrusage's ru_maxrss would report this (parent) process's peak, inherited across exec
    assert 0 < memory["load_peak_rss_mb"] < BALLAST_MIB * 0.6, memory
    assert memory["load_rss_mb"] <= memory["load_peak_rss_mb"] + 1
