"""The ``galore`` preset is galore-torch 1.0's ``GaLoreAdamW``, step for step (issue 11, items 1-3).

Same tiny LLaMA (square q/o, k/v with m < n, gate/up with m > n), same batches, 30 steps with a refresh every 5
(6 refreshes, moments kept across them), rank 8, scale 0.25, the reference's own eps default (1e-6) on both sides
(rankwise's preset default, not passed). Free-running in fp64, teacher-forced in fp32 (why: ``ref_lowrank``).
"""

from __future__ import annotations

import pytest

from ref_lowrank import reference_groups, teacher_forced
from ref_model import TOL, moved, side_by_side, tiny_llama
from rankwise.optim import build

galore_torch = pytest.importorskip("galore_torch")

STEPS, GAP, RANK, SCALE, LR = 30, 5, 8, 0.25, 2e-3
FP64_TOL = 1e-12  # fp64 rounding only; eps 1e-8 instead of 1e-6, or decay before the step, are >= 1e-6 apart


def galore_pair(weight_decay: float, **ours):
    def make_ours(model):
        return build("galore", model, rank=RANK, update_gap=GAP, scale=SCALE, lr=LR, weight_decay=weight_decay,
                     **ours)

    def make_ref(model):
        groups = reference_groups(model, weight_decay, rank=RANK, update_proj_gap=GAP, scale=SCALE, proj_type="std")
        return galore_torch.GaLoreAdamW(groups, lr=LR, no_deprecation_warning=True)

    return make_ours, make_ref


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_galore_preset_matches_galore_torch_fp64(weight_decay):
    diff, trace, ours, _ = side_by_side(*galore_pair(weight_decay), steps=STEPS, model=tiny_llama(0).double())
    assert STEPS // GAP >= 3  # refreshes at steps 0, 5, ..., 25 with kept moments: every basis sign must agree
    assert max(trace) <= min(TOL, FP64_TOL), f"max |dW| per step: {trace}"
    assert moved(ours) > 1000 * TOL  # the weights moved far more than the tolerance


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_galore_preset_matches_galore_torch_step_for_step_fp32(weight_decay):
    trace, ref = teacher_forced(*galore_pair(weight_decay), steps=STEPS)
    assert len(trace) == STEPS and max(trace) <= TOL, f"max |dW| per step: {trace}"
    assert moved(ref) > 1000 * TOL


def test_galore_layerwise_matches_galore_torch():
    """The per-layer (hook) update computes the same step."""
    diff, trace, _, _ = side_by_side(*galore_pair(0.1, layerwise=True), steps=STEPS, model=tiny_llama(0).double())
    assert max(trace) <= FP64_TOL, f"max |dW| per step: {trace}"


@pytest.mark.parametrize("option", [{"inner": "adamw", "eps": 1e-8}, {"eps": 1e-8}, {"moments": "rotate"}])
def test_rankwise_options_are_not_the_preset(option):
    """torch's AdamW arithmetic (eps 1e-8, decay before the step), another eps, rotated moments: each is another
    optimizer, and the comparison above tells it apart from GaLoreAdamW."""
    diff, _, _, _ = side_by_side(*galore_pair(0.1, **option), steps=10, model=tiny_llama(0).double())
    assert diff > 1e-6
