"""LOST (``lost``): the SVD split at init, forward / backward against dense autograd, parameter counts, training,
bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rankwise_testing import quick_config
from torch import nn

from rankwise import methods
from rankwise.errors import RankwiseError
from rankwise.models import build_model, count_params
from rankwise.reparam import ChannelSparseLowRankLinear


@pytest.mark.parametrize("shape", [(48, 48), (80, 40), (40, 80)])
def test_init_splits_the_svd_into_the_dominant_part_and_channels_of_the_residual(shape):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=False)
    W = linear.weight.detach()
    rank, gamma = 6, 0.3
    layer = ChannelSparseLowRankLinear(linear.weight, None, rank, sparsity=0.1, gamma=gamma, svd_rank=10**6)
    U, s, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    top = (U[:, :rank] * s[:rank]) @ Vh[:rank]
    # low-rank part = the rank-r truncation; with every remaining component the split is exact: W_r + W_comp = W
    torch.testing.assert_close((layer.lora_B @ layer.lora_A).double(), top, rtol=0, atol=1e-6)
    comp = (U[:, rank:] * s[rank:]) @ Vh[rank:]
    torch.testing.assert_close(top + comp, W.double(), rtol=0, atol=1e-6)
    n = max(1, int(0.1 * shape[1]))
    norms = comp.norm(dim=0)
    chosen = layer.sparse_channels
    assert chosen.numel() == n and torch.equal(chosen, chosen.sort().values)
    assert norms[chosen].min() >= norms[torch.isin(torch.arange(shape[1]), chosen, invert=True)].max()
    mask = torch.zeros(shape[1], dtype=torch.bool)
    mask[chosen] = True
    torch.testing.assert_close(layer.dense_weight().double(), gamma * top + (1 - gamma) * W.double() * mask,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.lora_A.norm(dim=1), layer.lora_B.norm(dim=0), rtol=1e-5, atol=0)  # balanced


def test_forward_and_backward_equal_autograd_of_the_dense_weight():
    torch.manual_seed(0)
    linear = nn.Linear(40, 24, bias=True)
    layer = ChannelSparseLowRankLinear(linear.weight, linear.bias, 5, sparsity=0.2, gamma=0.6)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 7, 40, requires_grad=True)
    y = layer(x)
    copies = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    sparse = torch.zeros(24, 40).index_copy(1, layer.sparse_channels, copies["sparse_values"])
    W = 0.6 * copies["lora_B"] @ copies["lora_A"] + 0.4 * sparse
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, W, copies["bias"])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, copies[n].grad, rtol=1e-4, atol=1e-6, msg=n)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_param_counts_equal_the_formula():
    total = count_params(build_model("tiny", device="meta"))[1]
    shapes = [(256, 256)] * 4 + [(688, 256)] * 2 + [(256, 688)]  # (out, in): channels are input columns
    model = methods.get("lost", rank=8, sparsity=0.05).prepare(build_model("tiny", device="meta"))
    dense = 4 * sum(m * n for m, n in shapes)
    lost = 4 * sum(8 * (m + n) + m * max(1, int(0.05 * n)) for m, n in shapes)
    assert count_params(model) == (total - dense + lost,) * 2


def test_training_lost_lowers_the_loss(corpus):
    from rankwise.train import train

    model = build_model("tiny", vocab_size=corpus.vocab_size, seed=0, num_hidden_layers=2)
    small = dict(steps=8, batch_size=4, seq_len=32, warmup_steps=2, eval_batches=2, lr=3e-3)
    m = train(quick_config(method="lost", method_options={"rank": 16}, **small), model=model, corpus=corpus).metrics
    assert m["final_eval_loss"] < m["initial_eval_loss"] - 0.2


@pytest.mark.parametrize("options, message", [
    ({"rank": 256}, r"rank must be in \[1, 255\]"),
    ({"sparsity": 0}, r"sparsity \(the fraction of input channels in the sparse part\) must be in \(0, 1\)"),
    ({"gamma": 1.5}, r"gamma \(the low-rank part's weight\) must be in \[0, 1\]"),
    ({"sparse_svd_rank": 0}, "sparse_svd_rank must be a positive"),
])
def test_bad_options_raise_one_clear_error(options, message):
    with pytest.raises(RankwiseError, match=message):
        methods.get("lost", **options).prepare(build_model("tiny", device="meta"))


@pytest.mark.parametrize("name", ["lost", "sst"])
def test_plain_model_is_the_same_function_as_nn_linears(name):
    from rankwise.models import plain_model

    model = methods.get(name, rank=16).prepare(build_model("tiny", vocab_size=512, seed=0, num_hidden_layers=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        batch = torch.randint(0, 512, (2, 16))
        before = model(input_ids=batch).logits
        plain = plain_model(model)
        assert not any(isinstance(m, ChannelSparseLowRankLinear) for m in plain.modules())
        assert isinstance(plain.model.layers[0].mlp.down_proj, nn.Linear)
        torch.testing.assert_close(plain(input_ids=batch).logits, before, rtol=1e-4, atol=1e-4)
