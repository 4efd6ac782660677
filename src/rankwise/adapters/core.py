"""LoRA-XS (Bałazy et al. 2024) and LoRA-SB (Ponkshe et al. 2024): ``Delta W = s B R A`` with ``B`` (out x r) and
``A`` (r x in) frozen and only the ``r x r`` core ``R`` trained: ``r^2`` trainable parameters per layer.

- ``init="svd"`` (LoRA-XS): ``B = U_r S_r``, ``A = V_r^T`` from the truncated SVD of the base weight, ``R = 0``.
- ``init="update"`` (LoRA-SB): ``B = U_r``, ``A = V_r^T`` from the truncated SVD of the negative calibration
  gradient ``-G = U S V^T`` and ``R = (eta / s) S_r``, so ``s B R A = eta [-G]_r``: the best rank-r approximation
  of one full fine-tuning SGD step of size ``eta`` (set by ``inits.init_lora_sb``).

``B`` and ``A`` are derived from data (not random), so they are stored in the file next to ``R``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import RankwiseError
from .base import Parameterization, parameterization


@parameterization("lora-xs")
class CoreLoRA(Parameterization):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 seed: int = 0):
        super().__init__(base, r, alpha, dropout, rslora, seed)
        if r > min(self.in_features, self.out_features):
            raise RankwiseError(f"lora-xs rank {r} exceeds min(in, out) = {min(self.in_features, self.out_features)}"
                                " of a target layer; use a smaller --r")
        w = base.weight
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
        self.register_buffer("core_B", (u[:, :r] * s[:r]).to(w.dtype))
        self.register_buffer("core_A", vh[:r].contiguous().to(w.dtype))
        self.core_R = nn.Parameter(torch.zeros(r, r, device=w.device, dtype=w.dtype))

    def set_factors(self, b: torch.Tensor, r0: torch.Tensor, a: torch.Tensor) -> None:
        with torch.no_grad():
            self.core_B.copy_(b)
            self.core_A.copy_(a)
            self.core_R.copy_(r0)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.core_B @ self.core_R @ self.core_A)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = self.drop(x) @ (self.core_R @ self.core_A).t()  # (r x r)(r x in): cheaper than an extra N x r matmul
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, self.r), self.core_B.t(),
                           alpha=self.scaling).view(out.shape)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"core_A": self.core_A, "core_B": self.core_B, "core_R": self.core_R.detach()}

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.set_factors(tensors["core_B"], tensors["core_R"], tensors["core_A"])
