"""PiSSA, LoRA-GA and LoRA-SB inits: the identities they promise, checked against closed forms."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import logits, small_model, tokens

from rankwise import adapters
from rankwise.errors import RankwiseError

TARGET = ["q_proj", "v_proj", "down_proj"]


def batches(n: int = 2) -> list[torch.Tensor]:
    return [tokens(4, 33, seed=10 + i) for i in range(n)]


def truncated(m: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return (u[:, lo:hi] * s[lo:hi]) @ vh[lo:hi]


def test_pissa_residual_plus_adapter_reconstructs_weight():
    model, x = small_model(), tokens()
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(tuple(TARGET))}
    ref = logits(model, x)
    adapters.apply(model, "lora", r=4, alpha=8, target=TARGET)
    adapters.init_pissa(model)
    for path, layer in adapters.adapter_layers(model).items():
        lora = layer.adapters["default"]
        w_res = layer.base_layer.weight
        assert torch.allclose(w_res + lora.delta_weight(), original[path], atol=1e-6)
        assert torch.allclose(lora.delta_weight().double(), truncated(original[path], 0, 4), atol=1e-5)
        assert torch.allclose(w_res.double(), truncated(original[path], 4, 64), atol=1e-5)
    assert torch.allclose(logits(model, x), ref, atol=1e-5)


def _layer_grads(model, batch_list):
    """d loss / d W_eff of each adapted layer, by autograd through the adapter (dense equivalent)."""
    return adapters.calibration_gradients(model, batch_list, list(adapters.adapter_layers(model)))


def test_lora_ga_first_step_is_rank_2r_gradient_approximation():
    model, x, data = small_model(), tokens(), batches()
    ref = logits(model, x)
    r, alpha, gamma = 4, 8.0, 16.0
    adapters.init_lora_ga(model, data, r=r, alpha=alpha, target=TARGET, gamma=gamma)
    assert torch.allclose(logits(model, x), ref, atol=1e-5)  # residual base: function unchanged at step 0
    full = _layer_grads(model, data)  # gradient w.r.t. the effective weight, same as before the init
    from rankwise.train import lm_loss
    sum(lm_loss(model, b) / len(data) for b in data).backward()
    for path, layer in adapters.adapter_layers(model).items():
        lora = layer.adapters["default"]
        s, c2 = lora.scaling, lora.out_features ** 0.5 / gamma
        equivalent = s * (lora.lora_B @ lora.lora_A.grad + lora.lora_B.grad @ lora.lora_A)
        expected = s**2 * c2 * truncated(full[path], 0, 2 * r)
        assert torch.allclose(equivalent.double(), expected, atol=1e-7, rtol=1e-4), path


def test_lora_sb_core_is_update_approximation():
    model, data = small_model(), batches()
    r, alpha, eta = 4, 8.0, 0.1
    grads = adapters.calibration_gradients(model, data, adapters.find_targets(model, TARGET))
    adapters.init_lora_sb(model, data, r=r, alpha=alpha, target=TARGET, eta=eta)
    for path, layer in adapters.adapter_layers(model).items():
        core = layer.adapters["default"]
        assert torch.allclose(core.delta_weight().double(), eta * truncated(-grads[path], 0, r), atol=1e-7)
        eye = torch.eye(r)
        assert torch.allclose(core.core_B.T @ core.core_B, eye, atol=1e-5)
        assert torch.allclose(core.core_A @ core.core_A.T, eye, atol=1e-5)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 6 * r * r


def test_gradient_inits_need_batches_and_room():
    with pytest.raises(RankwiseError, match="at least one calibration batch"):
        adapters.init_lora_ga(small_model(), [], r=4, target=TARGET)
    with pytest.raises(RankwiseError, match="2r <= min"):
        adapters.init_lora_ga(small_model(), batches(), r=40, target=TARGET)
