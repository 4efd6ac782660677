"""DoRA's fast path: the weight norm from ``||W||^2 + 2s<W, BA> + s^2||BA||^2`` equals the direct norm, is computed
once per update of the factors (cached on their versions), and the fused forward equals PEFT's expression."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.adapters.lora import LoRA


def layer(bias: bool = True, out: int = 48, inp: int = 80) -> tuple[nn.Linear, LoRA]:
    torch.manual_seed(0)
    base = nn.Linear(inp, out, bias=bias).requires_grad_(False)
    dora = LoRA(base, r=4, alpha=8.0, dora=True)
    with torch.no_grad():
        dora.lora_B.normal_(0, 0.1)
        dora.lora_magnitude_vector.mul_(torch.rand(out) + 0.5)
    return base, dora


def test_norm_identity_equals_the_direct_norm_and_is_cached_per_update():
    base, dora = layer()
    direct = torch.linalg.norm(base.weight + dora.scaling * dora.lora_B @ dora.lora_A, dim=1)
    assert torch.allclose(dora.dora_norm(base.weight), direct, rtol=1e-6, atol=0)
    assert dora.dora_norm(base.weight) is dora.dora_norm(base.weight)  # cached
    opt = torch.optim.SGD(dora.parameters(), lr=0.5)
    x = torch.randn(3, 80)
    dora(x, base(x), base).square().sum().backward()
    opt.step()  # the factors change in place: the cache key (their versions) changes with them
    direct = torch.linalg.norm(base.weight + dora.scaling * dora.lora_B @ dora.lora_A, dim=1)
    assert torch.allclose(dora.dora_norm(base.weight).detach(), direct.detach(), rtol=1e-6, atol=0)


def test_fused_forward_and_gradients_equal_peft_expression():
    for bias in (True, False):
        base, dora = layer(bias)
        x = torch.randn(2, 5, 80, requires_grad=True)
        probe = torch.randn(2, 5, 48)
        leaves = (x, dora.lora_A, dora.lora_B, dora.lora_magnitude_vector)

        def peft_forward(out):
            """PEFT's DoraLinearLayer: out + (g - 1) W x + g s B A x, the norm of W + s B A detached."""
            lora_w = (dora.lora_B @ dora.lora_A).detach()
            g = dora.lora_magnitude_vector / torch.linalg.norm(base.weight + dora.scaling * lora_w, dim=1).detach()
            lora_out = F.linear(F.linear(x, dora.lora_A), dora.lora_B)
            return out + (g - 1) * F.linear(x, base.weight) + g * lora_out * dora.scaling

        results = []
        for forward in (lambda out: dora(x, out, base), peft_forward):
            y = forward(base(x))
            grads = torch.autograd.grad((y * probe).sum(), leaves)
            results.append((y.detach(), grads))
        (ours, ours_g), (ref, ref_g) = results
        assert (ours - ref).abs().max() <= 1e-5
        for a, b in zip(ours_g, ref_g):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
