"""LoRA-Pro-lite and AltLoRA: the corrected factor steps give the closed-form equivalent gradients (exact
identities; the step-for-step comparisons with the references are in tests/reference/)."""

from __future__ import annotations

import copy

import pytest
import torch

from rankwise.adapters import AltLoRA, LoRAPro, LoRAProLite
from rankwise.adapters.base import AdapterLinear
from rankwise.adapters.lora import LoRA
from rankwise.errors import RankwiseError

IN, OUT, R = 24, 16, 3


def layer(seed: int = 0) -> tuple[AdapterLinear, LoRA, torch.Tensor, torch.Tensor]:
    """A LoRA layer with non-zero factors and a loss; returns (layer, lora, full gradient G, input)."""
    torch.manual_seed(seed)
    base = torch.nn.Linear(IN, OUT).double()
    lora = LoRA(base, R, alpha=6.0).double()
    with torch.no_grad():
        lora.lora_B.normal_()
        lora.lora_A.normal_()
    wrapped = AdapterLinear(base)
    wrapped.adapters["default"] = lora
    wrapped.active = ["default"]
    base.requires_grad_(False)
    x, target = torch.randn(32, IN, dtype=torch.float64), torch.randn(32, OUT, dtype=torch.float64)
    w = (base.weight + lora.delta_weight()).detach().requires_grad_(True)
    ((x @ w.T + base.bias - target) ** 2).sum().backward()  # same loss through a dense W: G = dL/dW
    ((wrapped(x) - target) ** 2).sum().backward()
    return wrapped, lora, w.grad, x


def projectors(lora: LoRA) -> tuple[torch.Tensor, torch.Tensor]:
    b, a = lora.lora_B.detach(), lora.lora_A.detach()
    return b @ torch.linalg.solve(b.T @ b, b.T), a.T @ torch.linalg.solve(a @ a.T, a)


def equivalent(lora: LoRA, ga: torch.Tensor, gb: torch.Tensor) -> torch.Tensor:
    return lora.scaling * (lora.lora_B.detach() @ ga + gb @ lora.lora_A.detach())


def test_lora_pro_lite_equivalent_gradient_is_the_closed_form_projection():
    _, lora, g, _ = layer()
    a0, b0 = lora.lora_A.detach().clone(), lora.lora_B.detach().clone()
    opt = LoRAProLite(torch.optim.SGD(lora.parameters(), lr=1.0), [lora])
    opt.step()
    ga, gb = a0 - lora.lora_A.detach(), b0 - lora.lora_B.detach()  # SGD(lr=1) applied the corrected grads
    with torch.no_grad():
        lora.lora_A.copy_(a0)
        lora.lora_B.copy_(b0)
    pb, pa = projectors(lora)
    eye = torch.eye(OUT, dtype=g.dtype)
    g_eq = equivalent(lora, ga, gb)
    assert torch.allclose(g_eq, pb @ g + (eye - pb) @ g @ pa, atol=1e-9)
    # optimality: the residual is orthogonal to the tangent space {B X + Y A}
    x, y = torch.randn(R, IN, dtype=g.dtype), torch.randn(OUT, R, dtype=g.dtype)
    residual = g - g_eq
    assert abs((residual * (b0 @ x)).sum()) < 1e-8 and abs((residual * (y @ a0)).sum()) < 1e-8


def test_altlora_alternates_a_then_b_with_projected_gradients():
    """beta = 0, reg = 0: an A step moves W by -lr s^2 P_B G, a B step by -lr s^2 G P_A (exactly, per factor)."""
    wrapped, lora, g, x = layer(1)
    lr, s = 1e-3, lora.scaling
    opt = AltLoRA(list(lora.parameters()), [lora], lr=lr, beta=0.0, reg=0.0, alternate_every=1)
    pb, _ = projectors(lora)
    a0, b0 = lora.lora_A.detach().clone(), lora.lora_B.detach().clone()
    opt.step()  # step 1 with k = 1: A only
    assert torch.equal(lora.lora_B.detach(), b0)
    assert torch.allclose(s * b0 @ (lora.lora_A.detach() - a0), -lr * s**2 * pb @ g, atol=1e-12)
    opt.zero_grad()
    w = (wrapped.base_layer.weight + lora.delta_weight()).detach().requires_grad_(True)
    target = torch.randn(32, OUT, dtype=torch.float64)
    ((x @ w.T + wrapped.base_layer.bias - target) ** 2).sum().backward()
    ((wrapped(x) - target) ** 2).sum().backward()
    _, pa = projectors(lora)
    a1, b1 = lora.lora_A.detach().clone(), lora.lora_B.detach().clone()
    opt.step()  # step 2: only B
    assert torch.equal(lora.lora_A.detach(), a1)
    assert torch.allclose(s * (lora.lora_B.detach() - b1) @ a1, -lr * s**2 * w.grad @ pa, atol=1e-12)


def test_faithful_optimizers_step_only_lora_factors():
    _, lora, _, _ = layer(3)
    other = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.float64))
    for cls in (LoRAPro, AltLoRA):
        with pytest.raises(RankwiseError, match="steps LoRA factors only"):
            cls([lora.lora_A, lora.lora_B, other], [lora])
        with pytest.raises(RankwiseError, match="outside the optimizer"):
            cls([lora.lora_A], [lora])
    with pytest.raises(RankwiseError, match="bias_step_offset"):
        LoRAPro(list(lora.parameters()), [lora], bias_step_offset=2)
    with pytest.raises(RankwiseError, match="alternate_every"):
        AltLoRA(list(lora.parameters()), [lora], alternate_every=-1)


def test_wrappers_share_state_with_scheduler_and_checkpoints():
    _, lora, _, _ = layer(2)
    opt = LoRAProLite(torch.optim.AdamW(lora.parameters(), lr=0.1), [lora])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    opt.step()
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    state = opt.state_dict()
    assert state["correction_steps"] == 1 and len(opt.state) == 2
    fresh = LoRAProLite(torch.optim.AdamW(lora.parameters(), lr=0.1), [lora])
    fresh.load_state_dict(state)
    assert fresh.steps == 1 and torch.equal(fresh.state[lora.lora_A]["exp_avg"], opt.state[lora.lora_A]["exp_avg"])
    with pytest.raises(RankwiseError, match="corrects LoRA factors"):
        LoRAProLite(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), [])


def _fit(lora: LoRA, opt, base: torch.nn.Linear, x: torch.Tensor, target: torch.Tensor, steps: range) -> None:
    wrapped = AdapterLinear(base)
    wrapped.adapters["default"] = lora
    wrapped.active = ["default"]
    for i in steps:
        opt.zero_grad()
        ((wrapped(x[i]) - target[i]) ** 2).sum().backward()
        opt.step()


@pytest.mark.parametrize("make", [
    lambda ps, lo: LoRAPro(ps, lo, lr=1e-2),
    lambda ps, lo: AltLoRA(ps, lo, lr=1e-2, alternate_every=2),
], ids=["lora-pro", "altlora"])
def test_faithful_optimizers_resume_exactly_from_a_state_dict(make):
    _, lora, _, _ = layer(4)
    base = torch.nn.Linear(IN, OUT).double().requires_grad_(False)
    x, target = torch.randn(6, 16, IN, dtype=torch.float64), torch.randn(6, 16, OUT, dtype=torch.float64)
    straight = copy.deepcopy(lora)
    _fit(straight, make(list(straight.parameters()), [straight]), base, x, target, range(6))
    first = copy.deepcopy(lora)
    opt = make(list(first.parameters()), [first])
    _fit(first, opt, base, x, target, range(3))
    second = copy.deepcopy(first)  # a fresh process: new factors, new optimizer, state from the checkpoint
    resumed = make(list(second.parameters()), [second])
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    _fit(second, resumed, base, x, target, range(3, 6))  # crosses AltLoRA's switches at steps 2 and 4
    assert torch.equal(second.lora_A, straight.lora_A) and torch.equal(second.lora_B, straight.lora_B)
    assert not torch.equal(second.lora_A, lora.lora_A)


def test_lora_pro_state_keeps_fp32_moments_for_bf16_factors_across_a_load():
    _, lora, _, _ = layer(5)
    lora = lora.to(torch.bfloat16)
    lora.lora_A.grad, lora.lora_B.grad = torch.randn_like(lora.lora_A), torch.randn_like(lora.lora_B)
    opt = LoRAPro(list(lora.parameters()), [lora])
    opt.step()
    fresh = LoRAPro(list(lora.parameters()), [lora])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[lora.lora_A]["exp_avg"].dtype == torch.float32
    assert torch.equal(fresh.state[lora.lora_A]["exp_avg_sq"], opt.state[lora.lora_A]["exp_avg_sq"])
