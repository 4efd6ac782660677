"""Training-loop methods ``smora``, ``mixlora``, ``flylora``: the adapter framework's ``AdapterMethod`` plus the
router's balance loss (``aux_loss``) and the loss-free balancer (``after_step``).

    rankwise train --method smora --r 64 --opt top_k=8 --target q_proj,v_proj
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import RankwiseError
from ...methods import Method, register
from ..methods import DEFAULT_TARGET, AdapterMethod, resolve_rank
from ..inject import active_parameterizations
from ..lora import LoRA
from .layers import balance_step, routed_layers
from .squeeze import anneal_rank


class RoutedAdapterMethod(AdapterMethod):
    """``AdapterMethod`` for routed parameterizations: ``aux_coef`` weighs the Switch balance loss (routers with
    parameters), ``bias_lr`` drives the auxiliary-loss-free balancer after each step (0 = off)."""

    def __init__(self, kind: str, aux_coef: float, bias_lr: float, **options: Any):
        if not aux_coef >= 0 or not bias_lr >= 0:
            raise RankwiseError(f"{kind} aux_coef and bias_lr must be >= 0, got {aux_coef} and {bias_lr}")
        super().__init__(kind, **options)
        self.aux_coef, self.bias_lr = aux_coef, bias_lr

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        for layer in routed_layers(model).values():
            layer.aux_coef = self.aux_coef
        return model

    def aux_loss(self, model: nn.Module) -> torch.Tensor | None:
        """``aux_coef`` times the mean over layers of the last forward's Switch loss (``E sum_e f_e P_e``)."""
        if not self.aux_coef:
            return None
        layers = routed_layers(model).values()
        losses = [layer.aux for layer in layers if layer.aux is not None]
        for layer in layers:
            layer.aux = None
        return self.aux_coef * torch.stack(losses).mean() if losses else None

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for layer in routed_layers(model).values():
            if self.bias_lr:
                balance_step(layer, self.bias_lr)
            else:
                layer.step_load.zero_()


class SqueezeMethod(AdapterMethod):
    """LoRA whose rank is annealed from ``r`` to ``final_rank`` during training (LoRA-Squeeze in training): at steps
    ``start, start + every, ...`` up to ``end`` each LoRA is replaced by its best rank-``r_t`` approximation, ``r_t``
    falling linearly, with the dropped ranks exactly zero (they stay zero) and the optimizer state of the layer reset.
    After training, ``squeeze_lora(model, final_rank)`` shrinks the shapes exactly."""

    def __init__(self, final_rank: int, start: int, end: int, every: int, **options: Any):
        super().__init__("lora", **options)
        r = options["r"]
        if not 1 <= final_rank <= r or not 1 <= start <= end or every < 1:
            raise RankwiseError(f"lora-squeeze needs 1 <= final_rank <= r ({r}), 1 <= start <= end and every >= 1; "
                                f"got final_rank={final_rank}, start={start}, end={end}, every={every}")
        self.final_rank, self.start, self.end, self.every = final_rank, start, end, every

    def rank_at(self, step: int) -> int:
        """Target rank after step ``step`` (linear from r at ``start`` to ``final_rank`` at ``end``)."""
        r = self.apply_options["r"]
        frac = min(1.0, max(0.0, (step - self.start) / max(1, self.end - self.start)))
        return round(r - frac * (r - self.final_rank)) if step >= self.start else r

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if step < self.start or step > self.end or (step - self.start) % self.every and step != self.end:
            return
        rank = self.rank_at(step)
        for layer in active_parameterizations(model).values():
            if isinstance(layer, LoRA):
                anneal_rank(layer, rank, optimizer)


def _common(r: int | None, rank: int | None, default_rank: int, alpha: float, target: str, dropout: float,
            seed: int, lr_scale: float) -> dict[str, Any]:
    return dict(r=resolve_rank(r, rank, default_rank), alpha=alpha, target=target, dropout=dropout, seed=seed,
                lr_scale=lr_scale)


@register("smora", "moe", "SMoRA: one LoRA of rank r, each rank an expert; a router activates top_k ranks per token")
def _smora(r: int | None = None, rank: int | None = None, top_k: int = 8, alpha: float = 16.0,
           target: str = DEFAULT_TARGET, gate: str = "scaled-softmax", aux_coef: float = 0.0, bias_lr: float = 1e-3,
           path: str = "masked", dropout: float = 0.0, seed: int = 0, lr_scale: float = 1.0) -> Method:
    return RoutedAdapterMethod("smora", aux_coef, bias_lr, top_k=top_k, gate=gate, path=path,
                               **_common(r, rank, 64, alpha, target, dropout, seed, lr_scale))


@register("mixlora", "moe", "MixLoRA-style MoE: num_experts LoRA experts of rank r, top_k router, balance loss")
def _mixlora(r: int | None = None, rank: int | None = None, num_experts: int = 8, top_k: int = 2,
             alpha: float = 16.0, target: str = DEFAULT_TARGET, gate: str = "softmax", aux_coef: float = 0.01,
             bias_lr: float = 0.0, path: str = "masked", dropout: float = 0.0, seed: int = 0,
             lr_scale: float = 1.0) -> Method:
    return RoutedAdapterMethod("mixlora", aux_coef, bias_lr, num_experts=num_experts, top_k=top_k, gate=gate,
                               path=path, **_common(r, rank, 4, alpha, target, dropout, seed, lr_scale))


@register("flylora", "moe", "FlyLoRA: frozen sparse random A as implicit router, top_k ranks of B active per token")
def _flylora(r: int | None = None, rank: int | None = None, top_k: int = 8, alpha: float = 16.0,
             target: str = DEFAULT_TARGET, density: float = 0.25, bias_lr: float = 1e-3, path: str = "masked",
             dropout: float = 0.0, seed: int = 0, lr_scale: float = 1.0) -> Method:
    return RoutedAdapterMethod("flylora", 0.0, bias_lr, top_k=top_k, density=density, path=path,
                               **_common(r, rank, 64, alpha, target, dropout, seed, lr_scale))


@register("lora-squeeze", "moe", "LoRA annealed in training from rank r to final_rank by truncated SVD (LoRA-Squeeze)")
def _lora_squeeze(r: int | None = None, rank: int | None = None, final_rank: int = 4, start: int = 50,
                  end: int = 150, every: int = 25, alpha: float = 16.0, target: str = DEFAULT_TARGET,
                  dropout: float = 0.0, seed: int = 0, lr_scale: float = 1.0) -> Method:
    return SqueezeMethod(final_rank, start, end, every, **_common(r, rank, 16, alpha, target, dropout, seed, lr_scale))
