"""Refactorization (exact product, balanced factors), optimizer-state reset and pruning, target selection."""

from __future__ import annotations

import pytest
import torch

from rankwise.errors import RankwiseError
from rankwise.models import build_model
from rankwise.reparam import prune_state, refactorize, reset_state, target_linears


def test_refactorize_keeps_the_product_and_balances_the_factors():
    torch.manual_seed(0)
    shapes = [(30, 4, 20), (30, 4, 20), (20, 4, 30), (50, 6, 10)]  # two of the same shape: one batched group
    pairs = [(torch.randn(m, r) * 3, torch.randn(r, n) / 5) for m, r, n in shapes]
    products = [(B @ A).clone() for B, A in pairs]
    refactorize(pairs)
    for (B, A), product in zip(pairs, products):
        torch.testing.assert_close(B @ A, product, rtol=1e-5, atol=1e-5)  # fp32 tolerance
        s = torch.linalg.svdvals(product)[: B.shape[1]]
        # balanced: B^T B = A A^T = diag(singular values of B A)
        torch.testing.assert_close(B.t() @ B, torch.diag(s), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(A @ A.t(), torch.diag(s), rtol=1e-4, atol=1e-4)


def _adam_with_state(params):
    opt = torch.optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def test_reset_state_forgets_exactly_the_given_params():
    a, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))
    opt = _adam_with_state([a, b])
    reset_state(opt, [a])
    assert a not in opt.state and set(opt.state[b]) == {"step", "exp_avg", "exp_avg_sq"}
    a.grad = torch.ones_like(a)
    b.grad = torch.ones_like(b)
    opt.step()  # the reset parameter restarts like a fresh AdamW (step 1, bias-corrected)
    assert float(opt.state[a]["step"]) == 1.0 and float(opt.state[b]["step"]) == 2.0


def test_prune_state_magnitude_zeroes_the_smallest_entries_per_moment():
    p = torch.nn.Parameter(torch.randn(10, 10))
    opt = _adam_with_state([p])
    state = opt.state[p]
    before = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")}
    prune_state(opt, [p], 0.9, "magnitude")
    for key, old in before.items():
        kept = state[key] != 0
        assert int(kept.sum()) == 10
        assert old.abs()[kept].min() >= old.abs()[~kept].max()  # the 10 largest survive, unchanged
        torch.testing.assert_close(state[key][kept], old[kept], rtol=0, atol=0)
    assert float(state["step"]) == 1.0


def test_prune_state_random_shares_one_mask_between_moments():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(100, 50))
    opt = _adam_with_state([p])
    prune_state(opt, [p], 0.99, "random")
    m, v = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]
    assert torch.equal(m != 0, v != 0)
    assert 0 < int((m != 0).sum()) < 150  # ~1% of 5000 kept


def test_target_linears_selects_block_projections_and_keeps_ends_full_rank():
    model = build_model("tiny", device="meta")
    names = target_linears(model)
    assert len(names) == 4 * 7 and "lm_head" not in names
    assert all(".self_attn." in n or ".mlp." in n for n in names)
    assert len(target_linears(model, ["all-linear"])) == 4 * 7
    inner = target_linears(model, full_rank_ends=1)
    assert {n.split(".")[2] for n in inner} == {"1", "2"}
    assert target_linears(model, ["q_proj", "v_proj"]) == [f"model.layers.{i}.self_attn.{p}"
                                                         for i in range(4) for p in ("q_proj", "v_proj")]
    with pytest.raises(RankwiseError, match="no nn.Linear"):
        target_linears(model, ["conv"])
    with pytest.raises(RankwiseError, match="full_rank_ends=2 keeps all 4 blocks"):
        target_linears(model, full_rank_ends=2)
