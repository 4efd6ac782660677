"""Training-loop methods ``smora``, ``mixlora``, ``flylora``: inject the routed adapters, add the balance loss
(``aux_loss``) and run the loss-free balancer (``after_step``).

    rankwise train --method smora --rank 64 --opt top_k=8 --target q_proj,v_proj
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import RankwiseError
from ...methods import Method, register
from ..inject import apply
from .layers import balance_step, routed_layers


class RoutedAdapterMethod(Method):
    """Freeze the model, inject parameterization ``kind`` into ``target``; ``aux_coef`` weighs the Switch balance
    loss (routers with parameters only), ``bias_lr`` drives the loss-free balancer (0 = off)."""

    def __init__(self, kind: str, rank: int, alpha: float, target: str, aux_coef: float, bias_lr: float,
                 **options: Any):
        if aux_coef < 0 or bias_lr < 0:
            raise RankwiseError(f"{kind} aux_coef and bias_lr must be >= 0, got {aux_coef} and {bias_lr}")
        self.kind, self.rank, self.alpha, self.target = kind, rank, alpha, target
        self.aux_coef, self.bias_lr, self.layer_options = aux_coef, bias_lr, options

    def prepare(self, model: nn.Module) -> nn.Module:
        apply(model, method=self.kind, r=self.rank, alpha=self.alpha, target=self.target, **self.layer_options)
        for layer in routed_layers(model).values():
            layer.aux_coef = self.aux_coef
        return model

    def aux_loss(self, model: nn.Module) -> torch.Tensor | None:
        if not self.aux_coef:
            return None
        losses = [layer.aux for layer in routed_layers(model).values() if layer.aux is not None]
        for layer in routed_layers(model).values():
            layer.aux = None
        return self.aux_coef * torch.stack(losses).mean() if losses else None

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for layer in routed_layers(model).values():
            if self.bias_lr:
                balance_step(layer, self.bias_lr)
            else:
                layer.step_load.zero_()


@register("smora", "moe", "SMoRA: one LoRA of rank R, each rank an expert, a router picks top_k ranks per token")
def smora(rank: int = 64, top_k: int = 8, alpha: float = 16.0, target: str = "q_proj,v_proj",
          gate: str = "scaled-softmax", aux_coef: float = 0.0, bias_lr: float = 1e-3, path: str = "masked",
          dropout: float = 0.0, seed: int = 0) -> Method:
    return RoutedAdapterMethod("smora", rank, alpha, target, aux_coef, bias_lr, top_k=top_k, gate=gate, path=path,
                               dropout=dropout, seed=seed)


@register("mixlora", "moe", "MixLoRA-style MoE: num_experts LoRA experts of rank r, top_k router, balance loss")
def mixlora(rank: int = 4, num_experts: int = 8, top_k: int = 2, alpha: float = 16.0, target: str = "q_proj,v_proj",
            gate: str = "softmax", aux_coef: float = 0.01, bias_lr: float = 0.0, path: str = "masked",
            dropout: float = 0.0, seed: int = 0) -> Method:
    return RoutedAdapterMethod("mixlora", rank, alpha, target, aux_coef, bias_lr, num_experts=num_experts,
                               top_k=top_k, gate=gate, path=path, dropout=dropout, seed=seed)


@register("flylora", "moe", "FlyLoRA: frozen sparse random A as implicit router, top_k ranks of B trained")
def flylora(rank: int = 64, top_k: int = 8, alpha: float = 16.0, target: str = "q_proj,v_proj",
            density: float = 0.25, bias_lr: float = 1e-3, path: str = "masked", dropout: float = 0.0,
            seed: int = 0) -> Method:
    return RoutedAdapterMethod("flylora", rank, alpha, target, 0.0, bias_lr, top_k=top_k, density=density, path=path,
                               dropout=dropout, seed=seed)
