"""LoRA (Hu et al. 2021): ``Delta W = s B A`` with ``A`` (r x in), ``B`` (out x r), ``s = alpha / r`` or, with
rsLoRA (Kalajdzievski 2023), ``s = alpha / sqrt(r)``. Trainable: ``r (in + out)`` per layer.

Inits (``init=``, PEFT 0.21's ``init_lora_weights``, peft/tuners/lora/layer.py):

- ``"default"``: A ~ U(±1/sqrt(in)) (Kaiming-uniform with a = sqrt(5)), B = 0;
- ``"gaussian"``: A ~ N(0, 1/r^2) (std 1/r), B = 0;
- residual inits, which set non-zero factors and take ``s B0 A0`` out of the base weight when attached:
  ``"pissa"`` (``W = U S V^T``: ``B0 = U_r (S_r/s)^{1/2}``, ``A0 = (S_r/s)^{1/2} V_r^T``), ``"pissa_niter_K"``
  (the same from ``torch.svd_lowrank(W, r, niter=K)``) and ``"olora"`` (``W = Q R``: ``B0 = Q_r``, ``A0 = R_r``).

Residual inits keep ``B0, A0`` as buffers, so the saved adapter is a plain LoRA of rank ``2r`` relative to the
*original* base, ``s (B A - B0 A0) = s [B, B0] [A; -A0]``, which PEFT loads unchanged. A PEFT file saved with a
residual init as-is (``init_lora_weights="pissa"``, ...) loads the way PEFT loads it: the init is re-run on the fresh
base, then the file's factors replace ``B0, A0``.

DoRA (Liu et al. 2024; PEFT's ``use_dora``, peft/tuners/lora/dora.py), ``dora=True``: a trained magnitude ``m``
(out), initialised to the row norms of ``W + s B A``, and ``W_eff = (m / ||W + s B A||) (W + s B A)`` per output
row, with the norm detached from the gradient (the paper's sec. 4.3). Forward:
``out + (g - 1) W x + g s B A x``, ``g = m / ||W + s B A||`` (the base output, minus its bias, is reused).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RankwiseError
from .base import Parameterization, parameterization

LORA_INITS = ("default", "gaussian", "pissa", "pissa_niter_K", "olora")
_NITER = re.compile(r"pissa_niter_(\d+)")
# LoraConfig fields (PEFT 0.21) rankwise does not implement, with the value that means "off"
# (fan_in_fan_out is accepted either way: PEFT, like rankwise, sets it from the layer type, True for Conv1D)
_UNSUPPORTED = {"layers_to_transform": None, "use_qalora": False, "lora_bias": False,
                "trainable_token_indices": None, "layer_replication": None, "megatron_config": None,
                "target_parameters": None, "alora_invocation_tokens": None, "use_bdlora": None, "arrow_config": None,
                "kasa_config": None, "velora_config": None, "monteclora_config": None}
# init_lora_weights values whose base change rankwise cannot reproduce from the file and the base alone
_UNSUPPORTED_INITS = {"corda": "CorDA (needs the calibration covariances)", "loftq": "LoftQ (quantizes the base)",
                      "lora_ga": "PEFT's LoRA-GA (needs the calibration gradients)"}


def refuse_unsupported(config: dict[str, Any], fields: dict[str, Any]) -> None:
    """Raise unless every PEFT config field in ``fields`` is absent or at its "off" value."""
    for field, off in fields.items():
        value = config.get(field, off)
        if value != off and value not in (None, {}, [], False):
            raise RankwiseError(f"this PEFT {config.get('peft_type')} adapter sets {field}={value!r}, which rankwise "
                                f"does not support; save it from PEFT without {field}")


@torch.no_grad()
def residual_factors(weight: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B0, A0)`` of a residual init from ``weight`` (fp32), PEFT's equations (peft/tuners/lora/layer.py
    ``pissa_init`` / ``olora_init``). ``pissa_niter_K`` draws from torch's global generator, as PEFT does."""
    w = weight.float()
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return q[:, :r].contiguous(), rr[:r].contiguous()
    niter = _NITER.fullmatch(init)
    if niter:
        u, s, v = torch.svd_lowrank(w, r, niter=int(niter.group(1)))
        vh = v.t()
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    root = (s / scaling).sqrt()
    return u * root, root[:, None] * vh


@parameterization("lora")
class LoRA(Parameterization):
    peft_type = "LORA"

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 seed: int = 0, init: str = "default", dora: bool = False):
        super().__init__(base, r, alpha, dropout, rslora, seed)
        if init not in ("default", "gaussian", "pissa", "olora") and not _NITER.fullmatch(str(init)):
            raise RankwiseError(f"unknown LoRA init {init!r}; valid: {', '.join(LORA_INITS)} (K = power iterations)"
                                " (LoRA-GA: method lora-ga)")
        w = base.weight
        self.init = init
        g = torch.Generator().manual_seed(seed)
        if init == "gaussian":
            a = torch.randn(r, self.in_features, generator=g) / r
        else:  # nn.Linear's init, kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
            a = (torch.rand(r, self.in_features, generator=g) * 2 - 1) / math.sqrt(self.in_features)
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        self.register_buffer("init_A", None)
        self.register_buffer("init_B", None)
        self.saved_rank: int | None = None  # rank pairs past it are zero (LoRA-Squeeze annealing): files hold fewer
        self._residual_pending = False
        self.dora = self.uses_base = bool(dora)
        if self.dora:  # DoRA's magnitude m = ||W + s B A|| per output row (B = 0 or B0 A0 with W the original)
            with torch.no_grad():
                self.lora_magnitude_vector = nn.Parameter(torch.linalg.norm(w.float(), dim=1).to(w.dtype))
        if init in ("default", "gaussian"):
            return
        if r > min(self.in_features, self.out_features):
            raise RankwiseError(f"LoRA init {init!r} needs r <= min(in, out); a target is {self.out_features} x "
                                f"{self.in_features}, r = {r}")
        if _NITER.fullmatch(init):  # PEFT builds lora_A, lora_B as nn.Linear (global-RNG draws) before the SVD
            torch.empty(r, self.in_features).uniform_()
            torch.empty(self.out_features, r).uniform_()
        b0, a0 = residual_factors(w, r, self.scaling, init)
        self.set_residual_init(b0.to(w.dtype), a0.to(w.dtype))
        self._residual_pending = True

    def prepare_base(self, base: nn.Linear) -> None:
        """Residual inits built here (not by ``inits.init_pissa``) move ``s B0 A0`` out of the base on attach."""
        if self._residual_pending:
            with torch.no_grad():
                w = base.weight
                w.copy_((w.float() - self.scaling * (self.init_B.float() @ self.init_A.float())).to(w.dtype))
            self._residual_pending = False

    def set_residual_init(self, b0: torch.Tensor, a0: torch.Tensor) -> None:
        """Start from ``B0, A0`` (the caller subtracts ``s B0 A0`` from the base)."""
        with torch.no_grad():
            self.lora_A.copy_(a0)
            self.lora_B.copy_(b0)
        self.init_A, self.init_B = a0.detach().clone(), b0.detach().clone()

    @torch.no_grad()
    def dora_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W + s B A||`` per output row (fp32, no gradient: the paper's sec. 4.3) without forming ``W + s B A``:

            ||W_i||^2 + 2 s (B o W A^T)_i 1 + s^2 (B o B (A A^T))_i 1

        ``||W_i||^2`` is computed once per frozen weight and the whole norm once per update of ``A, B`` (cached on
        their versions), so micro-batches and evaluation reuse it; the cost is one ``out x in x r`` product."""
        a, b = self.lora_A, self.lora_B
        key = (a._version, b._version, a.data_ptr(), b.data_ptr(), id(weight), weight._version)
        cached = getattr(self, "_dora_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        if type(weight).__name__ in ("NF4Tensor", "Int8Tensor"):
            from ..quant import dequantize

            w = dequantize(weight, torch.float32)
        else:
            w = weight.float()
        w_key = (id(weight), weight._version, weight.data_ptr())
        w_cached = getattr(self, "_weight_norm_cache", None)
        if w_cached is None or w_cached[0] != w_key:
            w_cached = (w_key, w.square().sum(1))
            self._weight_norm_cache = w_cached
        a32, b32, s = a.float(), b.float(), self.scaling
        cross = (b32 * (w @ a32.t())).sum(1)
        own = (b32 * (b32 @ (a32 @ a32.t()))).sum(1)
        norm = (w_cached[1] + 2 * s * cross + s * s * own).clamp_min(0).sqrt()
        self._dora_cache = (key, norm)
        return norm

    def dora_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """DoRA (Liu et al. 2024): ``m / ||W + s B A||`` per output row, the norm detached (the paper's sec. 4.3)."""
        return self.lora_magnitude_vector / self.dora_norm(weight).to(self.lora_magnitude_vector.dtype)

    def delta_weight(self, base: nn.Linear | None = None) -> torch.Tensor:
        if not self.dora:
            return self.scaling * (self.lora_B @ self.lora_A)
        if base is None:
            raise RankwiseError("a DoRA update depends on the base weight: pass the base layer (or use merge)")
        w = base.weight
        return self.dora_scale(w)[:, None] * (w + self.scaling * (self.lora_B @ self.lora_A)) - w

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Linear | None = None) -> torch.Tensor:
        if self.dora:  # PEFT's DoraLinearLayer: out + (g - 1) W x + g s B A x, g = m / ||W + s B A||
            scale = self.dora_scale(base.weight)
            if self.dropout and self.training:  # the base output of the dropped-out input is needed
                x = self.drop(x)
                base_out = F.linear(x, base.weight.to(x.dtype))
                lora_out = F.linear(F.linear(x, self.lora_A), self.lora_B)
                return out + ((scale - 1) * base_out + scale * lora_out * self.scaling)
            # = g (W x + s B A x) + b: LoRA's fused GEMM, then one scaling of its output (no second base product)
            h = F.linear(x, self.lora_A)
            y = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, self.r), self.lora_B.t(),
                            alpha=self.scaling).view(out.shape)
            scale = scale.to(y.dtype)
            if base.bias is None:
                return y * scale
            bias = base.bias.to(y.dtype)
            return torch.addcmul(bias, y - bias, scale)
        h = F.linear(self.drop(x), self.lora_A)
        # out + s h B^T in one GEMM: no scaled copy, no separate add
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, self.r), self.lora_B.t(),
                           alpha=self.scaling).view(out.shape)

    def export_state(self) -> dict[str, torch.Tensor]:
        magnitude = {"lora_magnitude_vector": self.lora_magnitude_vector.detach()} if self.dora else {}
        if self.init_A is None:
            k = self.saved_rank or self.r
            return {"lora_A.weight": self.lora_A.detach()[:k], "lora_B.weight": self.lora_B.detach()[:, :k],
                    **magnitude}
        return {"lora_A.weight": torch.cat([self.lora_A.detach(), -self.init_A]),
                "lora_B.weight": torch.cat([self.lora_B.detach(), self.init_B], dim=1), **magnitude}

    def file_shapes(self) -> dict[str, tuple[int, ...]]:
        """A file holds the trained factors (a residual-init file saved as-is: the init is re-run on load)."""
        magnitude = {"lora_magnitude_vector": (self.out_features,)} if self.dora else {}
        return {"lora_A.weight": tuple(self.lora_A.shape), "lora_B.weight": tuple(self.lora_B.shape), **magnitude}

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.lora_A.copy_(tensors["lora_A.weight"])
            self.lora_B.copy_(tensors["lora_B.weight"])
            if self.dora:
                self.lora_magnitude_vector.copy_(tensors["lora_magnitude_vector"])

    def file_rank_alpha(self) -> tuple[int, float]:
        """(r, lora_alpha) of the saved file: rank doubles for residual inits, alpha keeps the scaling; a layer with
        ``saved_rank`` k is written at rank k with the alpha that keeps its scaling (LoRA-Squeeze's per-layer ranks
        become PEFT's ``rank_pattern`` / ``alpha_pattern``)."""
        if self.init_A is None:
            if self.saved_rank is not None and self.saved_rank != self.r:
                k = self.saved_rank
                return k, self.scaling * (math.sqrt(k) if self.rslora else k)
            return self.r, self.alpha
        return 2 * self.r, self.alpha * (math.sqrt(2) if self.rslora else 2)

    @classmethod
    def peft_fields(cls, adapters: dict[str, "LoRA"]) -> dict[str, Any]:
        """``r`` / ``lora_alpha``: the most common per-layer values; other layers go to ``rank_pattern`` /
        ``alpha_pattern`` under their full module names."""
        ranks = {p: a.file_rank_alpha() for p, a in adapters.items()}
        r, alpha = (Counter(v[i] for v in ranks.values()).most_common(1)[0][0] for i in (0, 1))
        first = next(iter(adapters.values()))
        return {"r": r, "lora_alpha": alpha, "lora_dropout": first.dropout, "use_rslora": first.rslora,
                "init_lora_weights": True, "use_dora": first.dora, "bias": first.train_bias,
                "modules_to_save": first.modules_to_save,
                "rank_pattern": {p: v[0] for p, v in ranks.items() if v[0] != r},
                "alpha_pattern": {p: v[1] for p, v in ranks.items() if v[1] != alpha}}

    @classmethod
    def options_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        refuse_unsupported(config, _UNSUPPORTED)
        if config.get("bias", "none") not in ("none", "all", "lora_only"):
            raise RankwiseError(f"this PEFT LORA adapter sets bias={config['bias']!r}; rankwise supports bias "
                                "none / all / lora_only")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str):
            for prefix, what in _UNSUPPORTED_INITS.items():
                if init.lower().startswith(prefix):
                    raise RankwiseError(f"this PEFT LoRA adapter sets init_lora_weights={init!r}: {what} changes the "
                                        "base weights in a way rankwise cannot rebuild; convert it to plain LoRA in "
                                        "PEFT (save_pretrained with path_initial_model_for_weight_conversion)")
        # residual inits are re-run on the base; the others do not touch it and load as plain LoRA
        residual = None
        if isinstance(init, str) and init.lower() == "olora":
            residual = "olora"
        elif isinstance(init, str) and init.startswith("pissa"):
            if init != "pissa" and not _NITER.fullmatch(init):
                raise RankwiseError(f"init_lora_weights={init!r} is neither 'pissa' nor 'pissa_niter_<K>'")
            residual = init
        try:
            options = {"r": int(config["r"]), "alpha": float(config["lora_alpha"]),
                       "dropout": float(config.get("lora_dropout", 0.0)),
                       "rslora": bool(config.get("use_rslora", False)),
                       "rank_pattern": {str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()},
                       "alpha_pattern": {str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()}}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RankwiseError(f"adapter config lacks a valid {e} (r and lora_alpha are required; rank_pattern / "
                                "alpha_pattern map module names to numbers)") from None
        options = {k: v for k, v in options.items() if v != {}}
        if config.get("use_dora"):
            options["dora"] = True
        return {**options, "init": residual} if residual else options
