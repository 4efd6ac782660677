"""The ``fira`` preset is fira 1.0.2's ``FiraAdamW``, step for step (issue 11, items 1-4).

Same tiny LLaMA (square q/o, k/v with m < n, gate/up with m > n), same batches, 30 steps with a refresh every 5
(6 refreshes), rank 8, alpha (our ``scale``) 0.25, the reference's eps default (1e-6) on both sides. Besides the
weights, the norm-growth limiter's state (Fira's ``scaling_grad``, our ``residual_norm``) must agree at every step.
Free-running in fp64, teacher-forced in fp32 (why: ``ref_lowrank``).
"""

from __future__ import annotations

import pytest
import torch

from ref_lowrank import reference_groups, teacher_forced
from ref_model import TOL, moved, side_by_side, tiny_llama
from rankwise.optim import build

fira = pytest.importorskip("fira")

STEPS, GAP, RANK, SCALE, LR = 30, 5, 8, 0.25, 2e-3
FP64_TOL = 1e-12  # fp64 rounding only


def fira_pair(weight_decay: float, **ours):
    def make_ours(model):
        return build("fira", model, rank=RANK, update_gap=GAP, scale=SCALE, lr=LR, weight_decay=weight_decay, **ours)

    def make_ref(model):
        groups = reference_groups(model, weight_decay, rank=RANK, update_proj_gap=GAP, alpha=SCALE, proj_type="std")
        return fira.FiraAdamW(groups, lr=LR, no_deprecation_warning=True)

    return make_ours, make_ref


class LimiterLog:
    """Keeps both optimizers; after every step records (ours, reference) limiter state of every projected matrix."""

    def __init__(self, weight_decay: float, **ours):
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.steps: list[list[tuple[float, float]]] = []
        make_ours, make_ref = fira_pair(weight_decay, **ours)
        self.make_ours = lambda model: self.opts.setdefault("ours", make_ours(model))
        self.make_ref = lambda model: self.opts.setdefault("ref", make_ref(model))

    def __call__(self, step, ours, ref):
        so, sr = self.opts["ours"].state, self.opts["ref"].state
        self.steps.append([(so[a]["residual_norm"].item(), sr[b]["scaling_grad"].item())
                           for a, b in zip(ours.parameters(), ref.parameters()) if "scaling_grad" in sr[b]])

    def check(self, rel: float) -> None:
        assert len(self.steps) == STEPS and all(len(s) == 14 for s in self.steps)  # 7 matrices x 2 layers
        for step, pairs in enumerate(self.steps, 1):
            for a, b in pairs:
                assert a == pytest.approx(b, rel=rel), f"limiter state at step {step}: {a} vs Fira's {b}"


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fira_preset_matches_fira_fp64(weight_decay):
    log = LimiterLog(weight_decay)
    diff, trace, ours, _ = side_by_side(log.make_ours, log.make_ref, steps=STEPS, model=tiny_llama(0).double(),
                                        after_step=log)
    assert STEPS // GAP >= 3
    assert max(trace) <= min(TOL, FP64_TOL), f"max |dW| per step: {trace}"
    assert moved(ours) > 1000 * TOL
    log.check(rel=1e-12)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fira_preset_matches_fira_step_for_step_fp32(weight_decay):
    log = LimiterLog(weight_decay)
    trace, ref = teacher_forced(log.make_ours, log.make_ref, steps=STEPS, after_step=log)
    assert max(trace) <= TOL, f"max |dW| per step: {trace}"
    assert moved(ref) > 1000 * TOL
    log.check(rel=1e-5)


@pytest.mark.parametrize("option", [{"residual": "fira_exact"}, {"inner": "adamw", "eps": 1e-8}])
def test_rankwise_options_are_not_the_preset(option):
    """``fira_exact`` (residual G - P P^T G, the paper's Eq. 7, not the code's G - alpha P P^T G) and torch's AdamW
    arithmetic are other optimizers, and the comparison above tells them apart from FiraAdamW."""
    diff, _, _, _ = side_by_side(*fira_pair(0.0, **option), steps=10, model=tiny_llama(0).double())
    assert diff > 1e-6
