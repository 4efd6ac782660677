"""NOLA (Koohpayegani et al. 2024): ``Delta W = s B A`` with ``A = sum_k alpha_k A_k`` and ``B = sum_k beta_k B_k``
over ``k`` frozen random bases regenerated from the layer's seed. Only the ``2 k`` coefficients are trained and
stored, so the count is independent of ``r``.

Bases: ``A_k ~ N(0, 1/in)``, ``B_k ~ N(0, 1/r)``; coefficients: ``alpha ~ N(0, 1/k)``, ``beta = 0`` (Delta W = 0).
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RankwiseError
from .base import Parameterization, parameterization, seeded


@parameterization("nola")
class NOLA(Parameterization):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 seed: int = 0, num_bases: int = 64):
        super().__init__(base, r, alpha, dropout, rslora, seed)
        if not isinstance(num_bases, int) or num_bases <= 0:
            raise RankwiseError(f"nola num_bases must be a positive integer, got {num_bases!r}")
        w = base.weight
        self.num_bases = num_bases
        self.register_buffer("bases_A", seeded((num_bases, r, self.in_features), seed, 1 / math.sqrt(self.in_features),
                                               w), persistent=False)
        self.register_buffer("bases_B", seeded((num_bases, self.out_features, r), seed + 1, 1 / math.sqrt(r), w),
                             persistent=False)
        self.nola_alpha = nn.Parameter(seeded((num_bases,), seed + 2, 1 / math.sqrt(num_bases), w))
        self.nola_beta = nn.Parameter(torch.zeros(num_bases, device=w.device, dtype=w.dtype))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A): one contraction each over the bases."""
        a = torch.tensordot(self.nola_alpha, self.bases_A, dims=1)
        b = torch.tensordot(self.nola_beta, self.bases_B, dims=1)
        return b, a

    def delta_weight(self) -> torch.Tensor:
        b, a = self.factors()
        return self.scaling * (b @ a)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        b, a = self.factors()
        h = F.linear(self.drop(x), a.to(x.dtype))
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, self.r), b.t().to(h.dtype),
                           alpha=self.scaling).view(out.shape)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"nola_alpha": self.nola_alpha.detach(), "nola_beta": self.nola_beta.detach()}

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.nola_alpha.copy_(tensors["nola_alpha"])
            self.nola_beta.copy_(tensors["nola_beta"])
