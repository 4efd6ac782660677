"""The routed-LoRA kernels against dense references: values, gradients, gates, balance loss."""

import pytest
import torch

from rankwise.adapters.moe.kernels import (dense_gates, dense_reference, gathered_lora, masked_lora, rank_indices,
                                           switch_balance_loss, topk_route)


def _factors(n=12, d_in=10, d_out=7, experts=6, group=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    rank = experts * group
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(rank, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d_out, rank, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(n, experts, generator=g, dtype=torch.float64, requires_grad=True)
    return x, a, b, logits


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("gate", ["softmax", "scaled-softmax", "unit"])
def test_masked_and_gathered_match_dense_reference(group, gate):
    x, a, b, logits = _factors(group=group)
    k, experts, s = 2, logits.shape[1], 0.7
    out0 = torch.randn(x.shape[0], b.shape[0], dtype=torch.float64)
    idx, vals = topk_route(logits, k, gate)
    gates = dense_gates(idx, vals, experts, group)
    assert gates.shape == (x.shape[0], experts * group) and int((gates != 0).sum(1).max()) == k * group
    ref = out0 + dense_reference(x, a, b, gates, s)
    masked = masked_lora(x @ a.t(), gates, b, out0, s)
    gathered = gathered_lora(x, a, b, rank_indices(idx, group), vals.repeat_interleave(group, -1), out0, s)
    torch.testing.assert_close(masked, ref)
    torch.testing.assert_close(gathered, ref)
    w = torch.randn_like(ref)
    grads = [torch.autograd.grad((y * w).sum(), (x, a, b, logits), allow_unused=True, retain_graph=True)
             for y in (ref, masked, gathered)]
    for got in grads[1:]:
        for g_ref, g in zip(grads[0], got):
            if g_ref is None:
                assert g is None
            else:
                torch.testing.assert_close(g, g_ref)
    if gate != "unit":  # the router learns through the gate values
        assert grads[0][3].abs().sum() > 0


def test_gates_normalisation_and_selection_bias():
    _, _, _, logits = _factors(n=50, experts=8)
    idx, vals = topk_route(logits, 3, "softmax")
    torch.testing.assert_close(vals.sum(-1), torch.ones(50, dtype=torch.float64))
    assert torch.equal(idx, logits.topk(3, -1).indices)
    _, scaled = topk_route(logits, 3, "scaled-softmax")
    torch.testing.assert_close(scaled, 3 * vals)
    # a large bias on expert 5 forces its selection, but the gate values stay softmax of the raw logits
    bias = torch.zeros(8, dtype=torch.float64)
    bias[5] = 100.0
    idx_b, vals_b = topk_route(logits, 3, "softmax", bias)
    assert bool((idx_b == 5).any(-1).all())
    torch.testing.assert_close(vals_b, torch.softmax(logits.gather(-1, idx_b), -1))


def test_rank_indices_are_the_expert_blocks():
    idx = torch.tensor([[2, 0]])
    assert rank_indices(idx, 3).tolist() == [[6, 7, 8, 0, 1, 2]]


def test_switch_balance_loss_closed_forms_and_gradient():
    experts = 4
    uniform = torch.full((8, experts), 1 / experts)
    idx = torch.arange(8).remainder(experts).unsqueeze(-1)  # every expert twice
    assert switch_balance_loss(uniform, idx).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, experts)
    collapsed[:, 0] = 1.0
    assert switch_balance_loss(collapsed, torch.zeros(8, 1, dtype=torch.long)).item() == pytest.approx(experts)
    # gradient reaches the router weights and pushes probability away from the overloaded expert
    router = torch.randn(experts, 5, requires_grad=True)
    x = torch.randn(64, 5)
    logits = x @ router.t()
    idx, _ = topk_route(logits, 1, "softmax")
    loss = switch_balance_loss(torch.softmax(logits, -1), idx)
    (grad,) = torch.autograd.grad(loss, router)
    assert grad.abs().sum() > 0
    step = router - 0.1 * grad
    with torch.no_grad():
        lower = switch_balance_loss(torch.softmax(x @ step.t(), -1), idx)
    assert lower < loss
