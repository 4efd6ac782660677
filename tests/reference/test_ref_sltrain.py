"""SLTrain: same seed -> the same layers as the reference, then step for step under the reference's optimizer.

Reference: github.com/andyjm3/SLTrain @ 2335d62c75df9b0f0441604eb04fde21b06693e4: ``splora/splora_linear.py``
(``SpLoRaLinear``: bias U(+-1/sqrt(out)), A kaiming-uniform(a=sqrt(5)), B = 0, optional trained scalar ``tanh(c)``
with ``c = 1`` in place of ``alpha / r``, support ``randperm(m n)[:int(delta m n)]`` sorted, values
U(+-1/sqrt(in)); forward ``x (B (scale A) + S)^T + b`` via ``sparse-lora/sparse_linear.cpp``), ``splora_model.py``
(``SpLoRaModel``: every ``nn.Linear`` whose name contains attn / mlp / attention, in ``named_modules`` order) and
``train_utils.py`` (``--optimizer adam``: ``torch.optim.Adam(lr, weight_decay=0)``). The oracle layer below
re-derives those equations with plain autograd (a dense ``W`` built by ``scatter_add_``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from ref_model import TOL, batches, loss_of, max_weight_diff
from torch import nn

from rankwise import methods
from rankwise.methods import OptimConfig
from rankwise.reparam import SparseLowRankLinear

RANK, ALPHA, DENSITY, LR, STEPS = 8, 32.0, 0.03, 1e-3, 30


def biased_llama(seed: int = 0) -> nn.Module:
    """ref_model's tiny LLaMA shapes (q/o 64x64, k/v 32x64, gate/up 96x64, down 64x96), with biases everywhere."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager", attention_bias=True, mlp_bias=True)
    return LlamaForCausalLM(cfg).float()


class OracleSpLoRa(nn.Module):
    """The reference layer's equations; parameters registered in the reference's order."""

    def __init__(self, n_in: int, n_out: int, r: int, sp_ratio: float, alpha: float, bias: bool,
                 trainable_scaling: bool):
        super().__init__()
        if bias:
            self.bias = nn.Parameter(torch.zeros(n_out))
            nn.init.uniform_(self.bias, -1 / math.sqrt(n_out), 1 / math.sqrt(n_out))
        else:
            self.bias = None
        self.lora_A = nn.Parameter(torch.empty(r, n_in))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(n_out, r))
        self.trainable = trainable_scaling
        self.scaling = nn.Parameter(torch.tensor([1.0])) if trainable_scaling else alpha / r
        self.index = torch.sort(torch.randperm(n_in * n_out)[:int(sp_ratio * n_in * n_out)])[0]
        self.values = nn.Parameter(torch.empty(self.index.numel()))
        nn.init.uniform_(self.values, -1 / math.sqrt(n_in), 1 / math.sqrt(n_in))

    def weight(self) -> torch.Tensor:
        scale = self.scaling.tanh() if self.trainable else self.scaling
        w = self.lora_B @ (self.lora_A * scale)
        return w.reshape(-1).scatter_add(0, self.index, self.values).reshape(w.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


def reference_model(base: nn.Module, seed: int, trainable_scaling: bool) -> nn.Module:
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(t in name for t in ("attn", "mlp", "attention")):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, OracleSpLoRa(
                module.in_features, module.out_features, RANK, DENSITY, ALPHA, module.bias is not None,
                trainable_scaling))
    return model


def ours_model(base: nn.Module, seed: int, trainable_scaling: bool):
    method = methods.get("sltrain", rank=RANK, density=DENSITY, alpha=ALPHA, trainable_scaling=trainable_scaling)
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    return method, method.prepare(model)


def layer_pairs(ours: nn.Module, ref: nn.Module):
    a = [m for m in ours.modules() if isinstance(m, SparseLowRankLinear)]
    b = [m for m in ref.modules() if isinstance(m, OracleSpLoRa)]
    assert len(a) == len(b) == 14
    return list(zip(a, b))


@pytest.mark.parametrize("trainable_scaling", [False, True])
def test_sltrain_same_seed_same_layers_then_step_for_step(trainable_scaling):
    base = biased_llama()
    method, ours = ours_model(base, 1, trainable_scaling)
    ref = reference_model(base, 1, trainable_scaling)
    for a, b in layer_pairs(ours, ref):  # the init, draw for draw
        assert torch.equal(a.sparse_indices.long(), b.index)
        assert torch.equal(a.bias, b.bias) and torch.equal(a.lora_B, b.lora_B)
        assert (a.lora_A - b.lora_A).abs().max() <= 1e-7 and (a.sparse_values - b.values).abs().max() <= 1e-7
        assert (a.dense_weight() - b.weight()).abs().max() <= 1e-6
        assert a.bias.abs().max() <= 1 / math.sqrt(a.out_features)
        if a.out_features < a.in_features:  # k/v: U(+-1/sqrt(out)) is wider than nn.Linear's U(+-1/sqrt(in))
            assert a.bias.abs().max() > 1 / math.sqrt(a.in_features)
    assert [n for n, _ in ours.named_parameters()] == [n.replace(".values", ".sparse_values")
                                                       for n, _ in ref.named_parameters()]
    start = copy.deepcopy(ours)
    opt_ours = method.build_optimizer(ours, OptimConfig(lr=LR, weight_decay=0.0))
    opt_ref = torch.optim.Adam(ref.parameters(), lr=LR, weight_decay=0.0)
    trace = []
    for batch in batches(STEPS):
        for m, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad(set_to_none=True)
            loss_of(m, batch).backward()
            opt.step()
        trace.append(max_weight_diff(ours, ref))
    assert max(trace) <= TOL, trace
    assert max((a.dense_weight() - b.weight()).abs().max().item() for a, b in layer_pairs(ours, ref)) <= TOL
    assert max_weight_diff(ours, start) > 1e3 * TOL
    if trainable_scaling:
        a, b = layer_pairs(ours, ref)[0]
        assert a.scaling.item() != 1.0 and abs(a.scaling.item() - b.scaling.item()) <= TOL
