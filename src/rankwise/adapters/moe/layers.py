"""Rank-wise mixtures of LoRA experts as adapter parameterizations (``adapters.apply(model, method="smora", ...)``).

- ``smora`` (Zhao et al. 2025, "Each Rank Could be an Expert"): one LoRA of rank ``R`` whose ranks are experts; a
  linear router per layer scores the ``R`` ranks from the token, top-``k`` ranks are active.
- ``mixlora`` (Li et al. 2024, MixLoRA): ``E`` LoRA experts of rank ``r``, top-``k`` router, Switch balance loss;
  the same kernel as SMoRA with rank groups of size ``r``.
- ``flylora`` (Zou et al. 2025): implicit router: ``A`` is a frozen sparse random projection, the ``k`` ranks with
  the largest ``|A x|`` are active in the trainable ``B``; no router parameters.

Scaling is ``alpha / (active ranks)`` for SMoRA and FlyLoRA (a token sees a LoRA of rank ``k`` with LoRA's scale)
and ``alpha / r`` per expert for MixLoRA (gates sum to 1). The update depends on the token, so these adapters can
be merged into the base only when every rank is always active with unit gates (``top_k = R``, ``gate="unit"``).

Every layer keeps routing statistics (non-persistent buffers): ``usage`` (selections per expert since the last
``reset_usage``) and ``step_load`` (since the last balancing update); ``aux`` holds the last training forward's
balance loss (``None`` when ``aux_coef`` is 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import RankwiseError
from ..base import Parameterization, parameterization
from .kernels import (GATES, dense_gates, expert_counts, flylora_topk, gathered_lora, masked_lora, rank_indices,
                      switch_balance_loss, topk_route)

PATHS = ("masked", "gathered")


def _check(kind: str, top_k: int, num_experts: int, path: str) -> None:
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise RankwiseError(f"{kind} top_k must be an integer in [1, {num_experts}] (the number of experts), "
                            f"got {top_k!r}")
    if path not in PATHS:
        raise RankwiseError(f"unknown {kind} path {path!r}; valid: {', '.join(PATHS)}")


class RoutedLoRA(Parameterization):
    """``E`` experts of ``group`` consecutive ranks of one LoRA (``A``: E*group x in, ``B``: out x E*group) and a
    linear router (E x in); top-``k`` experts per token (``kernels`` module docstring)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, rslora: bool, seed: int, *,
                 num_experts: int, group: int, top_k: int, gate: str, path: str, scaling_rank: int):
        super().__init__(base, r, alpha, dropout, rslora, seed)
        _check(self.kind, top_k, num_experts, path)
        if gate not in GATES:
            raise RankwiseError(f"unknown {self.kind} gate {gate!r}; valid: {', '.join(GATES)}")
        self.num_experts, self.group, self.top_k, self.gate, self.path = num_experts, group, top_k, gate, path
        self.total_rank = num_experts * group
        self.scaling = self.alpha / (math.sqrt(scaling_rank) if rslora else scaling_rank)
        w = base.weight
        g = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(self.in_features)  # nn.Linear's init for A and the router, B = 0 (Delta W = 0)
        a = (torch.rand(self.total_rank, self.in_features, generator=g) * 2 - 1) * bound
        router = (torch.rand(num_experts, self.in_features, generator=g) * 2 - 1) * bound
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.total_rank, device=w.device, dtype=w.dtype))
        self.router = nn.Parameter(router.to(device=w.device, dtype=w.dtype))
        self.register_buffer("select_bias", torch.zeros(num_experts, device=w.device, dtype=torch.float32))
        self.register_buffer("usage", torch.zeros(num_experts, device=w.device, dtype=torch.float64), persistent=False)
        self.register_buffer("step_load", torch.zeros(num_experts, device=w.device, dtype=torch.float64),
                             persistent=False)
        self.aux_coef = 0.0
        self.aux: torch.Tensor | None = None

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts (N x k) and gates (N x k) from the router's ``logits`` (N x E); records statistics and aux loss."""
        bias = self.select_bias if bool(self.select_bias.any()) else None
        idx, vals = topk_route(logits, self.top_k, self.gate, bias)
        counts = expert_counts(idx.detach(), self.num_experts)
        self.usage += counts
        if self.training:
            self.step_load += counts
            if self.aux_coef and torch.is_grad_enabled():
                self.aux = switch_balance_loss(torch.softmax(logits, dim=-1, dtype=torch.float32), idx)
        return idx, vals

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x2, out2 = x.reshape(-1, self.in_features), out.reshape(-1, self.out_features)
        if self.path == "masked" and not (self.dropout and self.training):
            # router and down-projection read the same x: one GEMM with [A; W_router]
            hz = F.linear(x2, torch.cat([self.lora_A, self.router]).to(x.dtype))
            h, logits = hz.split([self.total_rank, self.num_experts], dim=-1)
            idx, vals = self.route(logits)
            gates = dense_gates(idx, vals, self.num_experts, self.group)
            return masked_lora(h, gates, self.lora_B, out2, self.scaling).view(out.shape)
        idx, vals = self.route(F.linear(x2, self.router.to(x.dtype)))
        xd = self.drop(x2)
        if self.path == "gathered":
            gates = vals if self.group == 1 else vals.repeat_interleave(self.group, dim=-1)
            y = gathered_lora(xd, self.lora_A, self.lora_B, rank_indices(idx, self.group), gates, out2, self.scaling)
        else:
            h = F.linear(xd, self.lora_A.to(x.dtype))
            y = masked_lora(h, dense_gates(idx, vals, self.num_experts, self.group), self.lora_B, out2, self.scaling)
        return y.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        if self.top_k != self.num_experts or self.gate != "unit":
            raise RankwiseError(f"{self.kind}'s update depends on each token's routing, so it has no single Delta W "
                                "to merge; only top_k = number of experts with gate='unit' (a plain LoRA) merges")
        return self.scaling * (self.lora_B @ self.lora_A)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A.detach(), "lora_B.weight": self.lora_B.detach(),
                "router.weight": self.router.detach(), "router.select_bias": self.select_bias}

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.lora_A.copy_(tensors["lora_A.weight"])
            self.lora_B.copy_(tensors["lora_B.weight"])
            self.router.copy_(tensors["router.weight"])
            self.select_bias.copy_(tensors["router.select_bias"])

    def activated_params(self) -> int:
        """Trainable parameters one token uses: its active ranks of ``A`` and ``B`` plus the whole router."""
        return self.top_k * self.group * (self.in_features + self.out_features) + self.router.numel()


@parameterization("smora")
class SMoRA(RoutedLoRA):
    """Each rank an expert: ``r`` is the total rank ``R``; ``top_k`` ranks active per token."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 seed: int = 0, top_k: int = 8, gate: str = "scaled-softmax", path: str = "masked"):
        super().__init__(base, r, alpha, dropout, rslora, seed, num_experts=r, group=1, top_k=top_k, gate=gate,
                         path=path, scaling_rank=top_k)


@parameterization("mixlora")
class MixLoRA(RoutedLoRA):
    """``num_experts`` LoRA experts of rank ``r`` each; ``top_k`` experts per token, gates summing to 1."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 seed: int = 0, num_experts: int = 8, top_k: int = 2, gate: str = "softmax", path: str = "masked"):
        if not isinstance(num_experts, int) or num_experts < 1:
            raise RankwiseError(f"mixlora num_experts must be a positive integer, got {num_experts!r}")
        super().__init__(base, r, alpha, dropout, rslora, seed, num_experts=num_experts, group=r, top_k=top_k,
                         gate=gate, path=path, scaling_rank=r)


def sparse_projection(rank: int, in_features: int, density: float, seed: int) -> torch.Tensor:
    """FlyLoRA's frozen ``A``: each row has ``ceil(density * in)`` non-zeros at random columns, drawn from
    ``N(0, 1 / nnz)`` so that ``a_i . x`` keeps the scale of ``x``."""
    g = torch.Generator().manual_seed(seed)
    nnz = max(1, math.ceil(density * in_features))
    cols = torch.rand(rank, in_features, generator=g).argsort(dim=-1)[:, :nnz]
    a = torch.zeros(rank, in_features)
    return a.scatter_(1, cols, torch.randn(rank, nnz, generator=g) / math.sqrt(nnz))


@parameterization("flylora")
class FlyLoRA(Parameterization):
    """``Delta y = (alpha / k) B[:, S(x)] (A x)[S(x)]``, ``S(x)`` = top-``k`` of ``|A x| + bias``; ``A`` frozen sparse
    random (rebuilt from the seed, never stored), ``B`` trained (``out x R``), ``bias`` updated by the load balancer.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 seed: int = 0, top_k: int = 8, density: float = 0.25, path: str = "masked"):
        super().__init__(base, r, alpha, dropout, rslora, seed)
        _check("flylora", top_k, r, path)
        if not 0.0 < density <= 1.0:
            raise RankwiseError(f"flylora density must be in (0, 1], got {density}")
        self.top_k, self.density, self.path, self.num_experts = top_k, float(density), path, r
        self.scaling = self.alpha / (math.sqrt(top_k) if rslora else top_k)
        w = base.weight
        self.register_buffer("fly_A", sparse_projection(r, self.in_features, density, seed).to(w.device, w.dtype),
                             persistent=False)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        self.register_buffer("select_bias", torch.zeros(r, device=w.device, dtype=torch.float32))
        self.register_buffer("usage", torch.zeros(r, device=w.device, dtype=torch.float64), persistent=False)
        self.register_buffer("step_load", torch.zeros(r, device=w.device, dtype=torch.float64), persistent=False)
        self.aux_coef = 0.0
        self.aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x2, out2 = self.drop(x).reshape(-1, self.in_features), out.reshape(-1, self.out_features)
        h = F.linear(x2, self.fly_A.to(x.dtype))                                  # N x R, the implicit router
        idx = flylora_topk(h, self.top_k, self.select_bias if bool(self.select_bias.any()) else None)
        counts = expert_counts(idx, self.num_experts)
        self.usage += counts
        if self.training:
            self.step_load += counts
        if self.path == "gathered":
            hk = h.gather(-1, idx)                                                # N x k
            b = self.lora_B.t().to(x.dtype)[idx]                                  # N x k x out
            y = out2 + self.scaling * torch.bmm(hk.unsqueeze(1), b).squeeze(1)
        else:
            mask = torch.zeros_like(h).scatter_(-1, idx, 1.0)
            y = masked_lora(h, mask, self.lora_B, out2, self.scaling)
        return y.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        if self.top_k != self.num_experts:
            raise RankwiseError("flylora's update depends on each token's top-k ranks, so it has no single Delta W "
                                "to merge; only top_k = r (a LoRA with frozen A) merges")
        return self.scaling * (self.lora_B @ self.fly_A)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"lora_B.weight": self.lora_B.detach(), "router.select_bias": self.select_bias}

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.lora_B.copy_(tensors["lora_B.weight"])
            self.select_bias.copy_(tensors["router.select_bias"])

    def activated_params(self) -> int:
        """Trainable parameters one token uses: ``k`` columns of ``B`` (``A`` is frozen, there is no router)."""
        return self.top_k * self.out_features


ROUTED = (RoutedLoRA, FlyLoRA)


def routed_layers(model: nn.Module) -> dict[str, RoutedLoRA | FlyLoRA]:
    """Every routed parameterization of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ROUTED)}


@torch.no_grad()
def balance_step(layer: RoutedLoRA | FlyLoRA, bias_lr: float) -> None:
    """Auxiliary-loss-free balancing (Wang et al. 2024; FlyLoRA's bias): raise the selection bias of under-loaded
    experts and lower that of over-loaded ones by ``bias_lr`` (sign of the load error), then clear the load."""
    load = layer.step_load
    if load.sum() > 0:
        layer.select_bias += bias_lr * torch.sign(load.mean() - load).float()
    load.zero_()
