"""RandLoRA (Albert et al. 2025), parameterized as PEFT 0.21 (peft/tuners/randlora): a full-rank update from
``n = ceil(min(in, out) / r)`` frozen random rank-r bases with trainable diagonal scalings.

With ``mn = min(in, out)``, ``mx = max(in, out)`` and one pair of bases shared by every adapted layer,
``A`` (r x 1 x mn_max) and ``B`` (mx_max x n_max x r), sliced per layer:

    U_A[(i, j), :] = lambda[i, j] A[i, 0, :mn] * gamma[j, :]      (r n x mn; one A for all n bases, gamma on the
    U_B = B[:mx, :n, :] flattened to mx x (n r)                    min side)
    M = U_B U_A (mx x mn),   Delta W = s M if in <= out else s M^T,   s = alpha / r (PEFT default alpha 640)

The flattening orders of ``U_A`` (i n + j) and ``U_B`` (j r + i) differ, exactly as in PEFT. Bases (PEFT's exact
tensors, from ``torch.Generator().manual_seed(shared_seed)``): default, Kaiming-uniform (a = sqrt(5)) drawn in
bfloat16 (PEFT's dtype where bf16 is available), ``A`` first, then ``B`` one ``(mx_max, 1, r)`` block per basis,
each divided by its std; ``sparse``: ternary {-1, 0, 1} with P(±1) = 1/6 each; ``very_sparse``: P(±1) = 1/(2 sqrt(
mn_max)); both from ``torch.rand`` thresholds, divided by the std. Trainable per layer: ``n (r + mn)``. Init:
``lambda = 0`` (Delta W = 0), ``gamma = 1 / max(n, mn)``.

Files are PEFT's ``RANDLORA`` format with the bases stored (``save_projection=True``, PEFT writes them under every
layer; here one tensor in memory); a file without them regenerates them from the key.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import RankwiseError
from .base import Parameterization, parameterization, shared
from .lora import refuse_unsupported

# (fan_in_fan_out is accepted either way: PEFT, like rankwise, sets it from the layer type, True for Conv1D)
_UNSUPPORTED = {"bias": "none", "modules_to_save": None, "layers_to_transform": None}


def random_bases(key: int, r: int, mx: int, mn: int, sparse: bool = False,
                 very_sparse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """RandLoRA's shared ``(A, B)`` of shapes ``(r, 1, mn)`` and ``(mx, ceil(mn / r), r)`` (fp32 values)."""
    g = torch.Generator().manual_seed(key)
    n = math.ceil(mn / r)
    if sparse or very_sparse:
        p = 1 / (2 * math.sqrt(mn)) if very_sparse else 1 / 6
        a, b = torch.rand((r, 1, mn), generator=g), torch.rand((mx, n, r), generator=g)
        a, b = [(t > 1 - p).float() - (t < p).float() for t in (a, b)]
        return a / a.std(), b / b.std()

    def kaiming(shape: tuple[int, ...]) -> torch.Tensor:
        return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=g)

    a = kaiming((r, 1, mn))
    b = torch.cat([kaiming((mx, 1, r)) for _ in range(n)], dim=1)
    return (a / a.std()).float(), (b / b.std()).float()


@parameterization("randlora")
class RandLoRA(Parameterization):
    peft_type = "RANDLORA"
    optional_keys = ("randlora_A", "randlora_B")
    shared_keys = ("randlora_A", "randlora_B")  # one tensor for all layers, written under every layer (PEFT's)
    model_keys = ("randlora_A", "randlora_B")  # and once as base_model.<key>

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 seed: int = 0, shared_seed: int = 0, sparse: bool = False, very_sparse: bool = False,
                 basis_shape: list[int] | None = None):
        """``basis_shape`` = (out_max, in_max) over all targets, set by ``adapters.apply`` / ``load_adapter``."""
        super().__init__(base, r, alpha, dropout, rslora, seed)
        if rslora:
            raise RankwiseError("randlora scales by alpha / r as in PEFT; rslora does not apply to it")
        out_max, in_max = basis_shape or (self.out_features, self.in_features)
        if out_max < self.out_features or in_max < self.in_features:
            raise RankwiseError(f"randlora basis_shape {[out_max, in_max]} is smaller than a target "
                                f"({self.out_features} x {self.in_features})")
        w = base.weight
        self.mn, self.mx = min(self.in_features, self.out_features), max(self.in_features, self.out_features)
        self.num_bases = math.ceil(self.mn / r)
        self.shared_seed, self.sparse, self.very_sparse = int(shared_seed), bool(sparse), bool(very_sparse)
        self.basis_shape = [out_max, in_max]
        mx, mn = max(out_max, in_max), min(out_max, in_max)
        a, b = shared(("randlora", self.shared_seed, r, mx, mn, self.sparse, self.very_sparse, w.dtype, w.device),
                      lambda: tuple(t.to(device=w.device, dtype=w.dtype) for t in
                                    random_bases(self.shared_seed, r, mx, mn, self.sparse, self.very_sparse)))
        self.register_buffer("randlora_A", a, persistent=False)
        self.register_buffer("randlora_B", b, persistent=False)
        n = self.num_bases
        self.randlora_lambda = nn.Parameter(torch.zeros(r, n, device=w.device, dtype=w.dtype))
        self.randlora_gamma = nn.Parameter(torch.full((n, self.mn), 1 / max(n, self.mn), device=w.device,
                                                      dtype=w.dtype))

    @classmethod
    def model_options(cls, bases: list[nn.Linear], options: dict[str, Any]) -> dict[str, Any]:
        return {"basis_shape": [max(b.out_features for b in bases), max(b.in_features for b in bases)]}

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U_B, U_A)``: ``mx x (n r)`` and ``(r n) x mn``."""
        n = self.num_bases
        u_a = (self.randlora_lambda[:, :, None] * self.randlora_A[:, :, :self.mn] * self.randlora_gamma[None])
        u_b = self.randlora_B[:self.mx, :n, :].flatten(start_dim=1)
        return u_b, u_a.flatten(end_dim=1)

    def delta_weight(self) -> torch.Tensor:
        u_b, u_a = self.factors()
        m = self.scaling * (u_b @ u_a)
        return m if self.in_features == self.mn else m.t()

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        u_b, u_a = self.factors()
        x = self.drop(x).to(u_a.dtype)
        if self.in_features == self.mn:  # x (.., mn) -> (.., r n) -> (.., mx)
            h = x @ u_a.t() @ u_b.t()
        else:  # x (.., mx) -> (.., n r) -> (.., mn)
            h = x @ u_b @ u_a
        return out + h * self.scaling

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"randlora_lambda": self.randlora_lambda.detach(), "randlora_gamma": self.randlora_gamma.detach(),
                "randlora_A": self.randlora_A, "randlora_B": self.randlora_B}

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self._import_with_bases(tensors, ("randlora_lambda", "randlora_gamma"), self.shared_keys)

    @classmethod
    def peft_fields(cls, adapters: dict[str, Parameterization]) -> dict[str, Any]:
        a = next(iter(adapters.values()))
        return {"r": a.r, "randlora_alpha": a.alpha, "randlora_dropout": a.dropout,
                "projection_prng_key": a.shared_seed, "save_projection": True, "sparse": a.sparse,
                "very_sparse": a.very_sparse, "init_weights": True}

    @classmethod
    def options_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        refuse_unsupported(config, _UNSUPPORTED)
        try:
            return {"r": int(config["r"]), "alpha": float(config.get("randlora_alpha", 640)),
                    "dropout": float(config.get("randlora_dropout", 0.0)),
                    "shared_seed": int(config.get("projection_prng_key", 0)),
                    "sparse": bool(config.get("sparse", False)), "very_sparse": bool(config.get("very_sparse", False))}
        except (KeyError, TypeError, ValueError) as e:
            raise RankwiseError(f"RANDLORA adapter config lacks a valid {e} (r is required)") from None
