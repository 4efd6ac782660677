"""RandLoRA (Albert et al. 2025): a full-rank update from ``n = ceil(min(in, out) / r)`` frozen random rank-r
bases, each with trainable diagonal scalings:

    Delta W = s sum_{i=1..n} B_i diag(lambda_i) A_i diag(gamma_i)

``B_i`` (out x r) and ``A_i`` (r x in) are shared by every layer of the same shape and regenerated from the seed.
Trainable per layer: ``n (r + in)``. Init: ``lambda = 0`` (Delta W = 0), ``gamma = 1 / n``.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from .base import Parameterization, parameterization, shared_random


@parameterization("randlora")
class RandLoRA(Parameterization):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 seed: int = 0, shared_seed: int = 0):
        super().__init__(base, r, alpha, dropout, rslora, seed)
        w = base.weight
        n = math.ceil(min(self.in_features, self.out_features) / r)
        self.num_bases, self.shared_seed = n, shared_seed
        self.register_buffer("rand_A", shared_random("randlora_A", (n, r, self.in_features), shared_seed,
                                                     1 / math.sqrt(self.in_features), w), persistent=False)
        self.register_buffer("rand_B", shared_random("randlora_B", (n, self.out_features, r), shared_seed,
                                                     1 / math.sqrt(r), w), persistent=False)
        self.randlora_lambda = nn.Parameter(torch.zeros(n, r, device=w.device, dtype=w.dtype))
        self.randlora_gamma = nn.Parameter(torch.full((n, self.in_features), 1 / n, device=w.device, dtype=w.dtype))

    def delta_weight(self) -> torch.Tensor:
        a = self.rand_A * self.randlora_gamma[:, None, :] * self.randlora_lambda[:, :, None]  # diag(l_i) A_i diag(g_i)
        return self.scaling * torch.einsum("nor,nri->oi", self.rand_B, a)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # all n bases in two batched contractions: (N, in) -> (N, n*r) -> (N, out)
        a = (self.rand_A * self.randlora_gamma[:, None, :] * self.randlora_lambda[:, :, None]).to(x.dtype)
        h = self.drop(x).reshape(-1, self.in_features) @ a.reshape(-1, self.in_features).t()
        b = self.rand_B.permute(1, 0, 2).reshape(self.out_features, -1).to(h.dtype)
        return torch.addmm(out.reshape(-1, out.shape[-1]), h, b.t(), alpha=self.scaling).view(out.shape)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"randlora_lambda": self.randlora_lambda.detach(), "randlora_gamma": self.randlora_gamma.detach()}

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.randlora_lambda.copy_(tensors["randlora_lambda"])
            self.randlora_gamma.copy_(tensors["randlora_gamma"])
