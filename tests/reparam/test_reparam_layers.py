"""The parameterized layers: exact parameter counts, gradients vs autograd, SLTrain's storage, ReLoRA's merge."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankwise.reparam import LowRankLinear, ReLoRALinear, SparseLowRankLinear
from rankwise.reparam.layers import _SparseLowRankFunction


def test_lowrank_params_and_init_variance():
    torch.manual_seed(0)
    layer = LowRankLinear(688, 256, rank=32, std=0.02)
    assert sum(p.numel() for p in layer.parameters()) == 32 * (688 + 256)
    w = layer.dense_weight().detach()
    assert w.shape == (256, 688)
    # every entry of B A has variance r * s^4 = std^2 (176k samples: the std estimate is within a few percent)
    assert w.std().item() == pytest.approx(0.02, rel=0.05)
    x = torch.randn(3, 5, 688)
    torch.testing.assert_close(layer(x), x @ w.t(), rtol=1e-5, atol=1e-6)


def _reference_sparse_lowrank(x, B, A, values, indices, scale, bias):
    """W = scale B A + S with S built as a dense matrix (the slow, obvious way), differentiated by autograd."""
    s = torch.zeros(B.shape[0] * A.shape[1], dtype=values.dtype).index_put((indices.long(),), values)
    return F.linear(x, scale * B @ A + s.view(B.shape[0], A.shape[1]), bias)


def test_sltrain_stores_exactly_delta_mn_values_and_no_dense_mask():
    torch.manual_seed(0)
    m, n, delta = 96, 80, 0.03
    layer = SparseLowRankLinear(n, m, rank=8, density=delta, alpha=32)
    nnz = int(delta * m * n)
    assert layer.sparse_values.numel() == nnz == layer.sparse_indices.numel()
    assert {name: b.shape for name, b in layer.named_buffers()} == {"sparse_indices": (nnz,)}
    assert layer.sparse_indices.dtype == torch.int32
    idx = layer.sparse_indices.long()
    assert bool((idx[1:] > idx[:-1]).all()) and 0 <= idx.min() and idx.max() < m * n  # sorted, distinct, in range
    assert sum(p.numel() for p in layer.parameters()) == 8 * (m + n) + nnz
    # at init B = 0: the dense weight is exactly S, with nnz non-zeros bounded by 1/sqrt(in)
    w = layer.dense_weight().detach()
    assert int((w != 0).sum()) == nnz and w.abs().max() <= 1 / math.sqrt(n)


def test_sltrain_forward_and_gradients_match_autograd_reference():
    torch.manual_seed(0)
    layer = SparseLowRankLinear(12, 10, rank=3, density=0.2, alpha=6, bias=True).double()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.bias.normal_()
    x = torch.randn(2, 4, 12, dtype=torch.float64, requires_grad=True)
    params = [x, layer.lora_B, layer.lora_A, layer.sparse_values, layer.bias]
    out = layer(x)
    ref = _reference_sparse_lowrank(x, layer.lora_B, layer.lora_A, layer.sparse_values, layer.sparse_indices,
                                    layer.scale, layer.bias)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)

    def fn(x, B, A, values, bias):
        return _SparseLowRankFunction.apply(x, B, A, values, layer.sparse_indices, bias, layer.scale, torch.float64)

    assert torch.autograd.gradcheck(fn, tuple(params))


def test_sltrain_saves_no_dense_weight_for_backward():
    layer = SparseLowRankLinear(64, 48, rank=4, density=0.05)
    x = torch.randn(3, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = layer(x)
    assert (48, 64) not in saved and (64, 48) not in saved
    out.sum().backward()
    assert layer.sparse_values.grad.shape == layer.sparse_values.shape


def test_sltrain_under_bf16_autocast_matches_bf16_reference():
    torch.manual_seed(0)
    layer = SparseLowRankLinear(32, 24, rank=4, density=0.1)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters())
    ref = x @ layer.dense_weight().detach().t()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_relora_merge_keeps_the_function_and_restarts_the_factors():
    torch.manual_seed(0)
    base = nn.Linear(40, 30)
    layer = ReLoRALinear(base, rank=4, alpha=8)
    assert not layer.weight.requires_grad and torch.equal(layer.lora_B, torch.zeros(30, 4))
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 4 * (40 + 30) + 30  # factors + bias
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x = torch.randn(16, 40)
    for _ in range(3):
        layer(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert layer.lora_B.abs().sum() > 0 and layer.weight.grad is None
    before = layer(x).detach()
    w_before, delta = layer.weight.detach().clone(), (layer.scale * layer.lora_B @ layer.lora_A).detach()
    a_before = layer.lora_A.detach().clone()
    layer.merge_and_reinit()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight, w_before + delta)
    assert torch.equal(layer.lora_B, torch.zeros(30, 4)) and not torch.equal(layer.lora_A, a_before)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(40)


@pytest.mark.parametrize("layer_cls", ["lowrank", "sltrain", "relora"])
def test_layers_build_on_meta_without_allocating(layer_cls):
    with torch.device("meta"):
        if layer_cls == "lowrank":
            layer = LowRankLinear(2048, 5461, rank=512)
        elif layer_cls == "sltrain":
            layer = SparseLowRankLinear(2048, 5461, rank=512)
        else:
            layer = ReLoRALinear(nn.Linear(2048, 5461, bias=False), rank=512)
    assert all(t.device.type == "meta" for t in [*layer.parameters(), *layer.buffers()])
    expected = {"lowrank": 512 * (2048 + 5461), "sltrain": 512 * (2048 + 5461) + int(0.03 * 2048 * 5461),
                "relora": 512 * (2048 + 5461) + 2048 * 5461}[layer_cls]
    assert sum(p.numel() for p in layer.parameters()) == expected
