"""Routed adapters as parameterizations: the SMoRA/MixLoRA/LoRA equivalences, FlyLoRA, training-loop hooks."""

import pytest
import torch
from torch import nn

from rankwise.adapters.lora import LoRA
from rankwise.adapters.moe.layers import FlyLoRA, MixLoRA, SMoRA, balance_step
from rankwise.errors import RankwiseError

D_IN, D_OUT = 12, 9


def _base(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(D_IN, D_OUT).double()


def _randomize(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def test_mixlora_equals_loop_over_lora_experts():
    """E experts of rank r with a top-k softmax router == the naive mixture sum_e g_e (alpha/r) B_e A_e x."""
    base, experts, r, k, alpha = _base(), 4, 3, 2, 6.0
    moe = _randomize(MixLoRA(base, r, alpha, num_experts=experts, top_k=k).double())
    x = torch.randn(20, D_IN, dtype=torch.float64)
    y = moe(x, base(x))
    probs = torch.softmax(x @ moe.router.t(), -1)
    top = probs.topk(k, -1)
    ref = base(x).clone()
    for e in range(experts):  # reference: one LoRA per expert, a loop is fine here
        a_e, b_e = moe.lora_A[e * r:(e + 1) * r], moe.lora_B[:, e * r:(e + 1) * r]
        gate = (top.values * (top.indices == e)).sum(-1) / top.values.sum(-1)
        ref = ref + gate[:, None] * (alpha / r) * (x @ a_e.t() @ b_e.t())
    torch.testing.assert_close(y, ref)


def test_experts_of_rank_r_equal_smora_with_block_activation():
    """MixLoRA(E experts, rank r, top-k) == SMoRA(R = E r ranks, top k*r) whose router scores are tied by blocks."""
    base, experts, r, k, alpha = _base(), 4, 3, 2, 6.0
    x = torch.randn(30, D_IN, dtype=torch.float64)
    for path in ("masked", "gathered"):
        moe = _randomize(MixLoRA(base, r, alpha, num_experts=experts, top_k=k, path=path).double())
        # SMoRA's softmax spreads an expert's gate over its r tied ranks (g_e / r) and scales by alpha / (k r):
        # alpha' = alpha k r gives the same per-rank coefficient alpha g_e / r.
        smora = SMoRA(base, experts * r, alpha * k * r, top_k=k * r, gate="softmax", path=path).double()
        with torch.no_grad():
            smora.lora_A.copy_(moe.lora_A)
            smora.lora_B.copy_(moe.lora_B)
            smora.router.copy_(moe.router.repeat_interleave(r, dim=0))
        torch.testing.assert_close(smora(x, base(x)), moe(x, base(x)))


@pytest.mark.parametrize("path", ["masked", "gathered"])
def test_smora_all_ranks_unit_gates_is_plain_lora(path):
    base, rank, alpha = _base(), 6, 5.0
    smora = _randomize(SMoRA(base, rank, alpha, top_k=rank, gate="unit", path=path).double())
    lora = LoRA(base, rank, alpha).double()
    with torch.no_grad():
        lora.lora_A.copy_(smora.lora_A)
        lora.lora_B.copy_(smora.lora_B)
    x = torch.randn(2, 7, D_IN, dtype=torch.float64)
    torch.testing.assert_close(smora(x, base(x)), lora(x, base(x)))
    torch.testing.assert_close(smora.delta_weight(), lora.delta_weight())


def test_smora_activates_only_top_k_ranks():
    """Output and gradient of B touch exactly the k ranks the router picked for the token."""
    base = _base()
    smora = _randomize(SMoRA(base, 8, 4.0, top_k=3).double())
    x = torch.randn(1, D_IN, dtype=torch.float64)
    smora(x, base(x)).sum().backward()
    picked = (x @ smora.router.t()).topk(3, -1).indices[0]
    used = smora.lora_B.grad.abs().sum(0).nonzero().flatten()
    assert sorted(used.tolist()) == sorted(picked.tolist())
    with pytest.raises(RankwiseError, match="no single Delta W"):
        smora.delta_weight()


@pytest.mark.parametrize("path", ["masked", "gathered"])
def test_flylora_matches_dense_reference(path):
    base, rank, k, alpha = _base(), 10, 3, 6.0
    fly = _randomize(FlyLoRA(base, rank, alpha, top_k=k, density=0.25, path=path).double())
    assert [n for n, _ in fly.named_parameters()] == ["lora_B"]  # no router parameters, A frozen
    nnz = (fly.fly_A != 0).sum(1)
    assert bool((nnz == 3).all())  # ceil(0.25 * 12)
    x = torch.randn(25, D_IN, dtype=torch.float64)
    h = x @ fly.fly_A.t()
    mask = torch.zeros_like(h).scatter_(-1, h.abs().topk(k, -1).indices, 1.0)
    ref = base(x) + (alpha / k) * (h * mask) @ fly.lora_B.t()
    torch.testing.assert_close(fly(x, base(x)), ref)


def test_flylora_all_ranks_is_lora_with_frozen_a():
    base = _base()
    fly = _randomize(FlyLoRA(base, 5, 5.0, top_k=5).double())
    x = torch.randn(4, D_IN, dtype=torch.float64)
    torch.testing.assert_close(fly(x, base(x)), base(x) + x @ fly.delta_weight().t())


def test_loss_free_balancer_moves_bias_against_load():
    base = _base()
    smora = SMoRA(base, 6, 4.0, top_k=2).double().train()
    smora.step_load.copy_(torch.tensor([10.0, 0, 0, 0, 0, 2]))
    balance_step(smora, 0.5)
    assert smora.select_bias.tolist() == [-0.5, 0.5, 0.5, 0.5, 0.5, 0.0]  # mean load 2: expert 5 is on target
    assert float(smora.step_load.sum()) == 0.0


def test_bad_options_raise_clear_errors():
    base = _base()
    with pytest.raises(RankwiseError, match="top_k"):
        SMoRA(base, 4, 1.0, top_k=5)
    with pytest.raises(RankwiseError, match="gate"):
        SMoRA(base, 4, 1.0, top_k=2, gate="relu")
    with pytest.raises(RankwiseError, match="path"):
        FlyLoRA(base, 4, 1.0, top_k=2, path="sparse")
    with pytest.raises(RankwiseError, match="density"):
        FlyLoRA(base, 4, 1.0, top_k=2, density=0.0)
    with pytest.raises(RankwiseError, match="num_experts"):
        MixLoRA(base, 2, 1.0, num_experts=0)
