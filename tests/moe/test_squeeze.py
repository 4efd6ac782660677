"""LoRA-Squeeze: exact at the same rank, Eckart-Young optimal below it, rank annealing keeps zero ranks zero."""

import pytest
import torch
from torch import nn

from rankwise.adapters.lora import LoRA
from rankwise.adapters.moe.squeeze import anneal_rank, factored_svd, squeeze_lora, squeezed_factors
from rankwise.errors import RankwiseError


def _lora(rank=12, d_in=40, d_out=30, seed=0, rslora=False):
    torch.manual_seed(seed)
    layer = LoRA(nn.Linear(d_in, d_out).double(), rank, 8.0, rslora=rslora).double()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_A.normal_()
    return layer


def test_factored_svd_is_exact_when_the_sketch_covers_the_rank():
    layer = _lora()  # R = 12 <= 5 + 8: the sketch spans range(B A) exactly
    m = layer.lora_B @ layer.lora_A
    u, s, vh = factored_svd(layer.lora_B.detach(), layer.lora_A.detach(), 5, oversample=8, power_iters=0)
    torch.testing.assert_close(s, torch.linalg.svdvals(m)[:5])
    torch.testing.assert_close(u.t() @ u, torch.eye(5, dtype=u.dtype))
    torch.testing.assert_close(vh @ vh.t(), torch.eye(5, dtype=u.dtype))


def test_factored_svd_with_a_short_sketch_converges_with_power_iterations():
    """R = 24 > l = 7: randomized; with a decaying spectrum two power iterations recover the top singular values."""
    g = torch.Generator().manual_seed(3)
    qb = torch.linalg.qr(torch.randn(50, 24, generator=g, dtype=torch.float64)).Q
    qa = torch.linalg.qr(torch.randn(60, 24, generator=g, dtype=torch.float64)).Q
    sigma = 0.5 ** torch.arange(24, dtype=torch.float64)
    b, a = qb * sigma, qa.t()
    _, s, _ = factored_svd(b, a, 5, oversample=2, power_iters=2)
    torch.testing.assert_close(s, sigma[:5], rtol=1e-6, atol=0)
    _, s0, _ = factored_svd(b, a, 5, oversample=2, power_iters=0)
    assert float((s0 - sigma[:5]).abs().max()) > float((s - sigma[:5]).abs().max())


@pytest.mark.parametrize("rslora", [False, True])
def test_squeeze_to_same_rank_is_exact_and_lower_rank_is_eckart_young(rslora):
    layer = _lora(rslora=rslora)
    dw = layer.delta_weight().detach()
    b, a = squeezed_factors(layer, 12)
    torch.testing.assert_close(layer.scaling * b @ a, dw)
    s = torch.linalg.svdvals(dw)
    for r in (1, 4, 7):
        b, a = squeezed_factors(layer, r)
        scale = layer.alpha / (r ** 0.5 if rslora else r)
        err = torch.linalg.norm(scale * b @ a - dw)
        torch.testing.assert_close(err, s[r:].square().sum().sqrt())  # the Eckart-Young minimum


def test_squeeze_lora_replaces_parameters_and_keeps_the_best_approximation():
    layer = _lora()
    dw = layer.delta_weight().detach()
    model = nn.ModuleDict({"q_proj": nn.Linear(40, 30).double()})
    from rankwise.adapters.inject import attach
    attach(model, "default", {"q_proj": layer})
    squeeze_lora(model, 3, oversample=9)  # sketch of 12 >= R columns: exact
    assert layer.lora_A.shape == (3, 40) and layer.lora_B.shape == (30, 3) and layer.r == 3
    s = torch.linalg.svdvals(dw)
    torch.testing.assert_close(torch.linalg.norm(layer.delta_weight() - dw), s[3:].square().sum().sqrt())
    with pytest.raises(RankwiseError, match="squeeze rank"):
        factored_svd(layer.lora_B.detach(), layer.lora_A.detach(), 5)


def test_anneal_rank_keeps_dropped_ranks_at_zero_under_training():
    layer = _lora()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x = torch.randn(16, 40, dtype=torch.float64)
    layer(x, torch.zeros(16, 30, dtype=torch.float64)).square().sum().backward()
    opt.step()
    best = torch.linalg.svdvals(layer.delta_weight().detach())
    anneal_rank(layer, 4, opt)
    assert layer.lora_A not in opt.state and layer.lora_B not in opt.state
    torch.testing.assert_close(torch.linalg.svdvals(layer.delta_weight().detach())[:4], best[:4])
    for _ in range(3):
        opt.zero_grad()
        layer(x, torch.zeros(16, 30, dtype=torch.float64)).square().sum().backward()
        opt.step()
    assert float(layer.lora_A.detach()[4:].abs().max()) == 0.0
    assert float(layer.lora_B.detach()[:, 4:].abs().max()) == 0.0


def test_lora_squeeze_method_anneals_rank_during_training(corpus):
    from rankwise_testing import quick_config
    from rankwise import methods
    from rankwise.adapters.inject import active_parameterizations
    from rankwise.train import train

    method = methods.get("lora-squeeze", r=8, final_rank=2, start=1, end=3, every=1)
    assert [method.rank_at(s) for s in (1, 2, 3, 9)] == [8, 5, 2, 2]
    res = train(quick_config(method="lora-squeeze", method_options={"r": 8, "final_rank": 2, "start": 1, "end": 3,
                                                                     "every": 1}, steps=4, seq_len=16, batch_size=2,
                             eval_batches=1), corpus=corpus)
    for layer in active_parameterizations(res.model).values():
        # the dropped rank pairs are exactly zero after training on: Delta W has rank <= 2
        assert float(layer.lora_A.detach()[2:].abs().max()) == 0.0
        assert float(layer.lora_B.detach()[:, 2:].abs().max()) == 0.0
        assert float(layer.lora_B.detach()[:, :2].abs().max()) > 0
    with pytest.raises(RankwiseError, match="final_rank"):
        methods.get("lora-squeeze", r=4, final_rank=8)
