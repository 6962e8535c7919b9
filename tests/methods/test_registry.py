"""comp_core.methods.registry: what holds for every registered structured method through ``prune_with``."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import ARCHS, make_calib, make_tiny_model


@settings(max_examples=8, deadline=None, database=None)
@given(st.sampled_from(ARCHS), st.integers(0, 1000), st.sampled_from(["comp", "wanda-sp", "flap", "magnitude-sp"]))
def test_ratio_zero_is_the_identity(arch, seed, method):
    from comp_core.methods import make_settings, prune_with

    model = make_tiny_model(arch, seed=seed)
    calib = make_calib(seed)
    with torch.no_grad():
        before = model(calib[:2]).logits
    pruned, result = prune_with(method, model, calib, make_settings(method, ratio=0.0))
    with torch.no_grad():
        after = pruned(calib[:2]).logits
    assert result.realised_ratio == 0.0 and math.isclose(result.params_after, result.params_before)
    assert torch.equal(before, after)
