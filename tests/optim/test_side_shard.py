"""``side="shard"``: the right basis (n x r) whatever the shape, against an oracle of the update; the range finder
against the SVD."""

import pytest
import torch

from rankwise.errors import RankwiseError
from rankwise.optim import SplitOptimizer
from rankwise.optim.sharded import range_finder


def _oracle_adamw(w, grads, rank, gap, lr, betas=(0.9, 0.999), eps=1e-8):
    """W (m, n) <- W - lr * (Q u)^T, Q = top-r right singular vectors of G at each refresh, u = torch AdamW on
    Q^T G^T (r, m), moments kept across refreshes (GaLore's recipe with the basis on the right)."""
    w = w.clone()
    m1 = v = q = None
    for t, g in enumerate(grads, 1):
        if (t - 1) % gap == 0:
            q = torch.linalg.svd(g, full_matrices=False).Vh[:rank].t()
        low = q.t() @ g.t()
        if m1 is None:
            m1, v = torch.zeros_like(low), torch.zeros_like(low)
        m1 = betas[0] * m1 + (1 - betas[0]) * low
        v = betas[1] * v + (1 - betas[1]) * low * low
        u = (m1 / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        w -= lr * (q @ u).t()
    return w


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)])
def test_side_shard_projects_on_the_right_basis_as_the_oracle(shape):
    torch.manual_seed(0)
    w0 = torch.randn(shape, dtype=torch.float64)
    grads = [torch.randn(shape, dtype=torch.float64) for _ in range(5)]
    p = torch.nn.Parameter(w0.clone())
    opt = SplitOptimizer([p], projector="svd", inner="adamw", rank=3, update_gap=2, lr=1e-2, side="shard")
    for g in grads:
        p.grad = g.clone()
        opt.step()
    state = opt.state[p]
    assert state["basis"].shape == (shape[1], 3) and state["exp_avg"].shape == (3, shape[0])
    assert torch.allclose(p.detach(), _oracle_adamw(w0, grads, 3, 2, 1e-2), atol=1e-10)
    assert opt.expected_state_bytes() == 8 * (shape[1] * 3 + 2 * 3 * shape[0]) + 4


def test_side_auto_keeps_galores_smaller_side():
    p = torch.nn.Parameter(torch.randn(12, 20))
    p.grad = torch.randn(12, 20)
    opt = SplitOptimizer([p], projector="svd", rank=3, update_gap=2)
    opt.step()
    assert opt.state[p]["basis"].shape == (12, 3) and opt.state[p]["exp_avg"].shape == (3, 20)


def test_range_finder_finds_the_top_right_subspace():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 4, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(30, 4, dtype=torch.float64))
    g = u @ torch.diag(torch.tensor([10.0, 8, 6, 4], dtype=torch.float64)) @ v.t()
    g += 1e-3 * torch.randn(40, 30, dtype=torch.float64)
    q = range_finder(g.t(), rank=4, oversample=4, power_iters=2, warm=None, seed=0)
    assert q.shape == (30, 4)
    assert torch.allclose(q.t() @ q, torch.eye(4, dtype=torch.float64), atol=1e-5)  # computed in float32
    assert torch.allclose(q @ q.t(), v @ v.t(), atol=1e-3)
    # the columns come largest first: the first is the top right singular vector up to sign
    top = torch.linalg.svd(g, full_matrices=False).Vh[0]
    assert abs(float(q[:, 0] @ top)) == pytest.approx(1.0, abs=1e-6)


def test_unknown_side_is_a_clear_error():
    with pytest.raises(RankwiseError, match="unknown side 'left'; valid: auto, shard"):
        SplitOptimizer([torch.nn.Parameter(torch.randn(4, 4))], side="left")


def test_sharded_basis_is_a_no_op_in_one_process():
    """``basis="sharded"`` shards a DTensor basis over FSDP2's ranks; plain tensors keep the whole basis, and the
    numbers are those of ``basis="replicated"`` (the multi-rank runs: tests/distributed/test_fsdp_exact.py)."""
    torch.manual_seed(0)
    w0, grads = torch.randn(12, 20), [torch.randn(12, 20) for _ in range(3)]
    out = []
    for basis in ("replicated", "sharded"):
        p = torch.nn.Parameter(w0.clone())
        opt = SplitOptimizer([p], projector="rsvd", rank=3, update_gap=2, side="shard", basis=basis)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        assert opt.state[p]["basis"].shape == (20, 3)
        out.append(p.detach())
    assert torch.equal(*out)


@pytest.mark.parametrize("options, message", [
    (dict(basis="rows"), "unknown basis 'rows'; valid: replicated, sharded"),
    (dict(basis="sharded"), "basis='sharded' shards the right basis of side='shard'.*pass side='shard' too"),
    (dict(basis="sharded", side="shard", projector="random"), "projector 'random' stores none.*drop the basis"),
])
def test_bad_basis_is_a_clear_error_in_the_optimizer_and_the_method(options, message):
    from rankwise import methods

    with pytest.raises(RankwiseError, match=message):
        SplitOptimizer([torch.nn.Parameter(torch.randn(4, 4))], **options)
    with pytest.raises(RankwiseError, match=message):
        methods.get("galore", **options)  # before any model or optimizer is built
