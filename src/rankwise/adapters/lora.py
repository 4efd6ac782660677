"""LoRA (Hu et al. 2021): ``Delta W = s B A`` with ``A`` (r x in), ``B`` (out x r), ``s = alpha / r`` or, with
rsLoRA (Kalajdzievski 2023), ``s = alpha / sqrt(r)``. Trainable: ``r (in + out)`` per layer.

Inits (``init=``): ``"default"`` (A Kaiming-uniform, B = 0, PEFT's), ``"gaussian"`` (A ~ N(0, 1/r), B = 0).
The residual inits (PiSSA, LoRA-GA, ``inits.py``) set non-zero factors and subtract ``s B0 A0`` from the base; they
keep ``B0, A0`` as buffers so that the saved adapter is a plain LoRA of rank ``2r`` relative to the *original* base,
``s (B A - B0 A0) = s [B, B0] [A; -A0]``, which PEFT loads unchanged.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RankwiseError
from .base import Parameterization, parameterization

LORA_INITS = ("default", "gaussian")


@parameterization("lora")
class LoRA(Parameterization):
    peft_type = "LORA"

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 seed: int = 0, init: str = "default"):
        super().__init__(base, r, alpha, dropout, rslora, seed)
        if init not in LORA_INITS:
            raise RankwiseError(f"unknown LoRA init {init!r}; valid: {', '.join(LORA_INITS)} "
                                "(PiSSA / LoRA-GA: methods pissa / lora-ga)")
        w = base.weight
        self.init = init
        g = torch.Generator().manual_seed(seed)
        if init == "default":  # nn.Linear's init: U(-1/sqrt(in), 1/sqrt(in))
            a = (torch.rand(r, self.in_features, generator=g) * 2 - 1) / math.sqrt(self.in_features)
        else:
            a = torch.randn(r, self.in_features, generator=g) / math.sqrt(r)
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        self.register_buffer("init_A", None)
        self.register_buffer("init_B", None)

    def set_residual_init(self, b0: torch.Tensor, a0: torch.Tensor) -> None:
        """Start from ``B0, A0`` (the caller subtracts ``s B0 A0`` from the base)."""
        with torch.no_grad():
            self.lora_A.copy_(a0)
            self.lora_B.copy_(b0)
        self.init_A, self.init_B = a0.detach().clone(), b0.detach().clone()

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.drop(x), self.lora_A)
        # out + s h B^T in one GEMM: no scaled copy, no separate add
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, self.r), self.lora_B.t(),
                           alpha=self.scaling).view(out.shape)

    def export_state(self) -> dict[str, torch.Tensor]:
        if self.init_A is None:
            return {"lora_A.weight": self.lora_A.detach(), "lora_B.weight": self.lora_B.detach()}
        return {"lora_A.weight": torch.cat([self.lora_A.detach(), -self.init_A]),
                "lora_B.weight": torch.cat([self.lora_B.detach(), self.init_B], dim=1)}

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.lora_A.copy_(tensors["lora_A.weight"])
            self.lora_B.copy_(tensors["lora_B.weight"])

    def file_rank_alpha(self) -> tuple[int, float]:
        """(r, lora_alpha) of the saved file: rank doubles for residual inits, alpha keeps the scaling."""
        if self.init_A is None:
            return self.r, self.alpha
        return 2 * self.r, self.alpha * (math.sqrt(2) if self.rslora else 2)
