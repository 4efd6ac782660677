"""VeRA (Kopiczko et al. 2024): ``Delta W = s diag(lambda_b) B diag(lambda_d) A`` with ``A`` (r x in) and ``B``
(out x r) frozen random matrices shared by every layer of the same shape (regenerated from the seed, never stored)
and only the scaling vectors ``lambda_d`` (r) and ``lambda_b`` (out) trained: ``r + out`` per layer.

Init (the paper's): ``lambda_b = 0`` (Delta W = 0), ``lambda_d = d_init`` (0.1).
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RankwiseError
from .base import Parameterization, parameterization, shared_random


@parameterization("vera")
class VeRA(Parameterization):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 seed: int = 0, d_init: float = 0.1, shared_seed: int = 0):
        super().__init__(base, r, alpha, dropout, rslora, seed)
        if not d_init > 0:
            raise RankwiseError(f"vera d_init must be > 0, got {d_init}")
        w = base.weight
        self.d_init, self.shared_seed = float(d_init), shared_seed
        self.register_buffer("vera_A", shared_random("vera_A", (r, self.in_features), shared_seed,
                                                     1 / math.sqrt(self.in_features), w), persistent=False)
        self.register_buffer("vera_B", shared_random("vera_B", (self.out_features, r), shared_seed,
                                                     1 / math.sqrt(r), w), persistent=False)
        self.vera_lambda_d = nn.Parameter(torch.full((r,), self.d_init, device=w.device, dtype=w.dtype))
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=w.device, dtype=w.dtype))

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.vera_lambda_b[:, None] * self.vera_B) @ (self.vera_lambda_d[:, None] * self.vera_A)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.drop(x), self.vera_A.to(x.dtype)) * self.vera_lambda_d
        return out + self.scaling * self.vera_lambda_b * F.linear(h, self.vera_B.to(h.dtype))

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b.detach(), "vera_lambda_d": self.vera_lambda_d.detach()}

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.vera_lambda_b.copy_(tensors["vera_lambda_b"])
            self.vera_lambda_d.copy_(tensors["vera_lambda_d"])
