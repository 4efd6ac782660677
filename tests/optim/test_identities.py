"""Exact identities: the split optimizer reduces to torch.optim's AdamW / SGD when the subspace is everything."""

from __future__ import annotations

import pytest
import torch

from optim_helpers import max_diff, micro_model, train_steps, single_thread  # noqa: F401 (autouse fixture)
from rankwise.optim import SplitOptimizer, build

STEPS = 8


def full_rank_groups(model: torch.nn.Module, **options) -> list[dict]:
    """One group per matrix with rank = min(m, n) (the whole space), vectors plain."""
    groups = [{"params": [p], "rank": min(p.shape), **options} for p in model.parameters() if p.dim() == 2]
    return groups + [{"params": [p for p in model.parameters() if p.dim() < 2], "project": False, **options}]


@pytest.mark.parametrize("moments,update_gap", [("keep", 3), ("reset", 100), ("rotate", 3)])
def test_coordinates_full_rank_adamw_is_torch_adamw(moments, update_gap):
    """Adam is elementwise: keeping every row (a random permutation, re-drawn every 3 steps) is AdamW exactly when
    the moments follow the permutation (``rotate``) or no refresh happens (``reset`` with a long gap); ``keep``
    leaves the moments in the old order, so it must differ."""
    ours, ref = micro_model(), micro_model()
    opt = SplitOptimizer(full_rank_groups(ours), projector="coordinates", inner="adamw", residual="drop",
                         update_gap=update_gap, moments=moments, lr=3e-3, weight_decay=0.1)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1, foreach=False)
    la, lb = train_steps(ours, opt, range(STEPS)), train_steps(ref, torch_opt, range(STEPS))
    if moments == "keep":  # a new permutation with old moments kept scrambles them: must differ from AdamW
        assert max_diff(ours, ref) > 1e-4
    else:
        assert max_diff(ours, ref) < 1e-6
        assert la == pytest.approx(lb, abs=1e-6)


@pytest.mark.parametrize("projector", ["randk", "columns", "rows"])
@pytest.mark.parametrize("moments", ["rotate", "keep"])
def test_coordinate_subsets_at_full_density_are_torch_adamw(projector, moments):
    """Every entry / column / row kept (density 1, a new random order every 3 steps): AdamW exactly when the moments
    are carried to the new index order (``rotate``); ``keep`` leaves them in the old positions and must differ."""
    ours, ref = micro_model(), micro_model()
    groups = [{"params": [p for p in ours.parameters() if p.dim() == 2]},
              {"params": [p for p in ours.parameters() if p.dim() < 2], "project": False}]
    opt = SplitOptimizer(groups, projector=projector, density=1.0, inner="adamw", residual="signsgd",
                         update_gap=3, moments=moments, lr=3e-3, weight_decay=0.1)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1, foreach=False)
    train_steps(ours, opt, range(STEPS))
    train_steps(ref, torch_opt, range(STEPS))
    if moments == "keep":
        assert max_diff(ours, ref) > 1e-4
    else:
        assert max_diff(ours, ref) < 1e-6


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("batched", [True, False])
def test_adamw_preset_is_torch_adamw(foreach, batched):
    """The plain path (no projection) with the preset's decay groups is torch's AdamW on the same groups, bit for
    bit (its foreach and for-loop forms; our batched and per-param steps)."""
    ours, ref = micro_model(), micro_model()
    opt = build("adamw", ours, lr=3e-3, weight_decay=0.1)
    opt.batched = batched
    ref_params = dict(ref.named_parameters())
    ids = {id(p): n for n, p in ours.named_parameters()}
    torch_opt = torch.optim.AdamW([{"params": [ref_params[ids[id(p)]] for p in g["params"]],
                                    "weight_decay": g["weight_decay"]} for g in opt.param_groups],
                                  lr=3e-3, foreach=foreach)
    train_steps(ours, opt, range(STEPS))
    train_steps(ref, torch_opt, range(STEPS))
    assert max_diff(ours, ref) == 0


@pytest.mark.parametrize("moments,update_gap,nesterov", [("rotate", 3, False), ("rotate", 2, True),
                                                        ("keep", 100, False), ("reset", 100, False)])
def test_svd_full_rank_sgd_momentum_is_torch_sgd(moments, update_gap, nesterov):
    """P P^T = I and momentum is linear: SGD-momentum in the SVD basis is SGD-momentum, across refreshes when the
    buffer is rotated (m <- P_new^T P_old m)."""
    ours, ref = micro_model(), micro_model()
    opt = SplitOptimizer(full_rank_groups(ours), projector="svd", inner="sgd", residual="drop", scale=1.0,
                         update_gap=update_gap, moments=moments, lr=0.05, momentum=0.9, nesterov=nesterov,
                         weight_decay=0.01)
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.01,
                                foreach=False)
    train_steps(ours, opt, range(STEPS))
    train_steps(ref, torch_opt, range(STEPS))
    assert max_diff(ours, ref) < 1e-6


def test_svd_sgd_momentum_keep_across_refresh_is_not_sgd():
    """The same run with a refresh every 3 steps and moments kept in the old basis is *not* SGD — the identity above
    is a real property of ``rotate``, not an artefact of the test."""
    ours, ref = micro_model(), micro_model()
    opt = SplitOptimizer(full_rank_groups(ours), projector="svd", inner="sgd", update_gap=3, moments="keep", lr=0.05)
    train_steps(ours, opt, range(STEPS))
    train_steps(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), range(STEPS))
    assert max_diff(ours, ref) > 1e-4
