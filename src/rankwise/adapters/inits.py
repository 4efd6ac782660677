"""Data- and weight-driven initializations (each leaves a documented identity that the tests check).

- PiSSA (Meng et al. 2024): ``W = U S V^T``; ``B0 = U_r S_r^{1/2} / sqrt(s)``, ``A0 = S_r^{1/2} V_r^T / sqrt(s)``
  so ``s B0 A0 = U_r S_r V_r^T`` (the principal part) and the base becomes the residual ``W - s B0 A0``.
- LoRA-GA (Wang et al. 2024): ``G = U S V^T`` (mean gradient of ``W`` over calibration batches);
  ``A0 = c V_{:r}^T``, ``B0 = c U_{r:2r}`` with ``c = d_out^{1/4} / sqrt(gamma)``; the base becomes
  ``W - s B0 A0``. Then the first LoRA step's equivalent gradient ``s^2 (B0 B0^T G + G A0^T A0)`` is ``s^2 c^2``
  times the best rank-2r approximation of ``G``.
- LoRA-SB (Ponkshe et al. 2024): ``-G = U S V^T``; ``B = U_r``, ``A = V_r^T``, ``R0 = (eta / s) S_r``, so the
  initial update ``s B R0 A = eta [-G]_r`` approximates one full fine-tuning step of size ``eta``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import RankwiseError
from .base import AdapterLinear, is_conv1d
from .core import CoreLoRA
from .inject import Target, adapter_layers, apply, base_linear, find_targets
from .lora import LoRA


def _lora_layers(model: nn.Module, adapter_name: str, kind: type) -> dict[str, tuple[AdapterLinear, Any]]:
    found = {p: (layer, layer.adapters[adapter_name]) for p, layer in adapter_layers(model).items()
             if adapter_name in layer.adapters}
    if not found or not all(isinstance(a, kind) for _, a in found.values()):
        raise RankwiseError(f"adapter {adapter_name!r} is not a {kind.__name__} adapter of this model")
    return found


@torch.no_grad()
def _set_residual(layer: AdapterLinear, lora: LoRA, b0: torch.Tensor, a0: torch.Tensor) -> None:
    w = layer.linear.weight
    lora.set_residual_init(b0.to(w.dtype), a0.to(w.dtype))
    w.copy_((w.float() - lora.scaling * (b0 @ a0)).to(w.dtype))


@torch.no_grad()
def init_pissa(model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """PiSSA: the adapter holds the top-r singular part of each base weight, the base keeps the residual."""
    for layer, lora in _lora_layers(model, adapter_name, LoRA).values():
        u, s, vh = torch.linalg.svd(layer.linear.weight.float(), full_matrices=False)
        root = (s[:lora.r] / lora.scaling).sqrt()
        _set_residual(layer, lora, u[:, :lora.r] * root, root[:, None] * vh[:lora.r])
    return model


def calibration_gradients(model: nn.Module, batches: Iterable[torch.Tensor], paths: list[str]) -> dict[str, torch.Tensor]:
    """Mean gradient of the LM loss w.r.t. the weight of each linear in ``paths`` (fp32, ``(out, in)`` also for a
    ``Conv1D``), other params untouched."""
    from ..train import lm_loss

    batches = list(batches)
    if not batches:
        raise RankwiseError("gradient-based adapter inits need at least one calibration batch")
    layers = {p: (model.get_submodule(p).base_layer if isinstance(model.get_submodule(p), AdapterLinear)
                  else model.get_submodule(p)) for p in paths}
    weights = {p: m.weight for p, m in layers.items()}
    saved = {id(q): (q.requires_grad, q.grad) for q in model.parameters()}
    for q in model.parameters():
        q.requires_grad_(False)
        q.grad = None
    for w in weights.values():
        w.requires_grad_(True)
    try:
        for batch in batches:
            lm_loss(model, batch).div(len(batches)).backward()
        grads = {p: (w.grad.t() if is_conv1d(layers[p]) else w.grad).detach().float().clone()
                 for p, w in weights.items()}
    finally:
        for q in model.parameters():
            q.requires_grad_(saved[id(q)][0])
            q.grad = saved[id(q)][1]
    return grads


def init_lora_ga(model: nn.Module, batches: Iterable[torch.Tensor] | None = None, r: int = 8, alpha: float = 16.0,
                 target: Target = ("q_proj", "v_proj"), gamma: float = 16.0, adapter_name: str = "default",
                 grads: dict[str, torch.Tensor] | None = None, **options: Any) -> nn.Module:
    """Add a LoRA-GA adapter: LoRA whose first step follows the top-2r singular directions of the gradient.

    ``grads`` (module path -> mean gradient) may be given instead of ``batches`` (e.g. computed by ``calibrate``).
    """
    if not gamma > 0:
        raise RankwiseError(f"lora-ga gamma must be > 0, got {gamma}")
    paths = find_targets(model, target)
    for p in paths:
        layer = base_linear(model, p)
        if 2 * r > min(layer.in_features, layer.out_features):
            raise RankwiseError(f"lora-ga needs 2r <= min(in, out) of every target; {p} has "
                                f"{layer.out_features} x {layer.in_features}, r = {r}")
    grads = grads if grads is not None else calibration_gradients(model, batches or [], paths)
    apply(model, "lora", r=r, alpha=alpha, target=paths, adapter_name=adapter_name, **options)
    with torch.no_grad():
        for path, (layer, lora) in _lora_layers(model, adapter_name, LoRA).items():
            u, _, vh = torch.linalg.svd(grads[path], full_matrices=False)
            c = lora.out_features ** 0.25 / math.sqrt(gamma)
            _set_residual(layer, lora, c * u[:, r:2 * r], c * vh[:r])
    return model


def init_lora_sb(model: nn.Module, batches: Iterable[torch.Tensor] | None = None, r: int = 8, alpha: float = 16.0,
                 target: Target = ("q_proj", "v_proj"), eta: float = 1e-3, adapter_name: str = "default",
                 grads: dict[str, torch.Tensor] | None = None, **options: Any) -> nn.Module:
    """Add a LoRA-SB adapter: frozen ``B, A`` spanning the top-r singular subspace of the negative gradient and the
    core initialised to the rank-r approximation of one SGD step of size ``eta``."""
    if not eta >= 0:
        raise RankwiseError(f"lora-sb eta must be >= 0, got {eta}")
    paths = find_targets(model, target)
    grads = grads if grads is not None else calibration_gradients(model, batches or [], paths)
    apply(model, "lora-xs", r=r, alpha=alpha, target=paths, adapter_name=adapter_name, **options)
    with torch.no_grad():
        for path, (_, core) in _lora_layers(model, adapter_name, CoreLoRA).items():
            u, s, vh = torch.linalg.svd(-grads[path], full_matrices=False)
            core.set_factors(u[:, :r], torch.diag(s[:r]) * (eta / core.scaling), vh[:r])
    return model
