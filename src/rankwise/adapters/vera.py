"""VeRA (Kopiczko et al. 2024), parameterized as PEFT 0.21 (peft/tuners/vera):

    Delta W = diag(lambda_b) B[:out] diag(lambda_d) A[:, :in]        (no alpha / r factor)

``A`` (r x in_max) and ``B`` (out_max x r) are one pair of frozen Kaiming-uniform matrices shared by every adapted
layer, sized to the largest ``in`` / ``out`` among them and sliced per layer. They are PEFT's exact tensors:
``g = torch.Generator().manual_seed(shared_seed)`` (PEFT's ``projection_prng_key``), then ``A ~ U(±sqrt(6/in_max))``
and ``B ~ U(±sqrt(6/r))`` drawn from ``g`` in that order. Trainable per layer: ``lambda_d`` (r) and ``lambda_b``
(out). Init (the paper's): ``lambda_b = 0`` (Delta W = 0), ``lambda_d = d_init`` (0.1).

Files are PEFT's ``VERA`` format, with the bases stored once (``base_model.vera_A`` / ``vera_B``, PEFT's
``save_projection=True``); a file without them regenerates them from the key.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RankwiseError
from .base import Parameterization, parameterization, shared
from .lora import refuse_unsupported

# (fan_in_fan_out is accepted either way: PEFT, like rankwise, sets it from the layer type, True for Conv1D)
_UNSUPPORTED = {"bias": "none", "modules_to_save": None, "layers_to_transform": None}


def kaiming_bases(key: int, r: int, out_max: int, in_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's shared ``(A, B)``: Kaiming-uniform (fan_in, gain sqrt(2)) from one CPU generator seeded with ``key``."""
    g = torch.Generator().manual_seed(key)
    bound_a, bound_b = math.sqrt(6 / in_max), math.sqrt(6 / r)
    a = torch.empty(r, in_max).uniform_(-bound_a, bound_a, generator=g)
    b = torch.empty(out_max, r).uniform_(-bound_b, bound_b, generator=g)
    return a, b


@parameterization("vera")
class VeRA(Parameterization):
    peft_type = "VERA"
    optional_keys = ("vera_A", "vera_B")
    model_keys = ("vera_A", "vera_B")  # written once per file as base_model.<key>

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 seed: int = 0, d_init: float = 0.1, shared_seed: int = 0, basis_shape: list[int] | None = None):
        """``alpha`` is not used (VeRA has no alpha / r factor); ``basis_shape`` = (out_max, in_max) over all
        targets, set by ``adapters.apply`` / ``load_adapter`` (default: this layer's shape)."""
        super().__init__(base, r, alpha, dropout, rslora, seed)
        if not d_init > 0:
            raise RankwiseError(f"vera d_init must be > 0, got {d_init}")
        if rslora:
            raise RankwiseError("vera has no alpha / r scaling, so rslora does not apply to it")
        out_max, in_max = basis_shape or (self.out_features, self.in_features)
        if out_max < self.out_features or in_max < self.in_features:
            raise RankwiseError(f"vera basis_shape {[out_max, in_max]} is smaller than a target "
                                f"({self.out_features} x {self.in_features})")
        w = base.weight
        self.scaling = 1.0
        self.d_init, self.shared_seed, self.basis_shape = float(d_init), int(shared_seed), [out_max, in_max]
        a, b = shared(("vera", self.shared_seed, r, out_max, in_max, w.dtype, w.device),
                      lambda: tuple(t.to(device=w.device, dtype=w.dtype) for t in
                                    kaiming_bases(self.shared_seed, r, out_max, in_max)))
        self.register_buffer("vera_A", a, persistent=False)
        self.register_buffer("vera_B", b, persistent=False)
        self.vera_lambda_d = nn.Parameter(torch.full((r,), self.d_init, device=w.device, dtype=w.dtype))
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=w.device, dtype=w.dtype))

    @classmethod
    def model_options(cls, bases: list[nn.Linear], options: dict[str, Any]) -> dict[str, Any]:
        return {"basis_shape": [max(b.out_features for b in bases), max(b.in_features for b in bases)]}

    def delta_weight(self) -> torch.Tensor:
        b = self.vera_lambda_b[:, None] * self.vera_B[:self.out_features]
        return b @ (self.vera_lambda_d[:, None] * self.vera_A[:, :self.in_features])

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = self.vera_lambda_d * F.linear(self.drop(x), self.vera_A[:, :self.in_features].to(x.dtype))
        return out + self.vera_lambda_b * F.linear(h, self.vera_B[:self.out_features].to(h.dtype))

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b.detach(), "vera_lambda_d": self.vera_lambda_d.detach(),
                "vera_A": self.vera_A, "vera_B": self.vera_B}

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self._import_with_bases(tensors, ("vera_lambda_b", "vera_lambda_d"), self.model_keys)

    @classmethod
    def peft_fields(cls, adapters: dict[str, Parameterization]) -> dict[str, Any]:
        a = next(iter(adapters.values()))
        return {"r": a.r, "projection_prng_key": a.shared_seed, "save_projection": True,
                "vera_dropout": a.dropout, "d_initial": a.d_init, "init_weights": True}

    @classmethod
    def options_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        refuse_unsupported(config, _UNSUPPORTED)
        try:
            return {"r": int(config["r"]), "alpha": 1.0, "dropout": float(config.get("vera_dropout", 0.0)),
                    "d_init": float(config.get("d_initial", 0.1)),
                    "shared_seed": int(config.get("projection_prng_key", 0))}
        except (KeyError, TypeError, ValueError) as e:
            raise RankwiseError(f"VERA adapter config lacks a valid {e} (r is required)") from None
