"""LoRA-Squeeze: compress a LoRA of rank ``R`` to rank ``r`` by the truncated SVD of ``Delta W = s B A``, computed
from the factors (``Delta W`` is never formed), post hoc or as rank annealing during training.

Randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1) on the operator ``M = B A``: sketch ``Y = B (A W)``
with a Gaussian ``W`` (in x l), optional power iterations, ``Q = qr(Y)``, then the SVD of the small ``(Q^T B) A``.
Since ``rank(M) <= R``, a sketch of ``l >= R`` columns captures the range exactly: for ``R <= r + oversample`` the
result is the exact truncated SVD, i.e. the Frobenius-optimal rank-``r`` approximation (Eckart-Young).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import RankwiseError
from ..inject import active_parameterizations
from ..lora import LoRA


def factored_svd(b: torch.Tensor, a: torch.Tensor, rank: int, oversample: int = 8, power_iters: int = 2,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U (out x rank), S (rank), Vh (rank x in)`` of ``b @ a`` (out x R times R x in), computed in >= fp32."""
    inner = b.shape[1]
    if not 1 <= rank <= min(inner, b.shape[0], a.shape[1]):
        raise RankwiseError(f"squeeze rank must be in [1, {min(inner, b.shape[0], a.shape[1])}], got {rank}")
    dtype = torch.promote_types(b.dtype, torch.float32)
    b, a = b.to(dtype), a.to(dtype)
    width = min(rank + oversample, inner)
    g = torch.Generator(device="cpu").manual_seed(seed)
    y = b @ (a @ torch.randn(a.shape[1], width, generator=g, dtype=dtype).to(a.device))   # out x l
    q = torch.linalg.qr(y).Q
    for _ in range(power_iters if width < inner else 0):    # exact range already when l >= R
        z = torch.linalg.qr(a.t() @ (b.t() @ q)).Q           # in x l
        q = torch.linalg.qr(b @ (a @ z)).Q
    u, s, vh = torch.linalg.svd((q.t() @ b) @ a, full_matrices=False)
    return (q @ u)[:, :rank], s[:rank], vh[:rank]


def squeezed_factors(layer: LoRA, rank: int, **svd_options) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B', A')`` of rank ``rank`` with ``s' B' A'`` the best rank-``rank`` approximation of ``s B A`` (``s'`` is
    the scaling of rank ``rank``); singular values split evenly: ``B' = U sqrt(S s/s')``, ``A' = sqrt(.) Vh``."""
    if layer.init_A is not None:
        raise RankwiseError("squeeze a residual-init LoRA (PiSSA / LoRA-GA) after merge_and_unload, not in place")
    u, s, vh = factored_svd(layer.lora_B.detach(), layer.lora_A.detach(), rank, **svd_options)
    new_scaling = layer.alpha / (math.sqrt(rank) if layer.rslora else rank)
    root = (s * layer.scaling / new_scaling).sqrt()
    return (u * root).to(layer.lora_B.dtype), (root[:, None] * vh).to(layer.lora_A.dtype)


def energy_rank(layer: LoRA, energy: float, max_rank: int) -> int:
    """The smallest ``k <= max_rank`` whose top-``k`` singular values of ``s B A`` hold ``energy`` of ``||s B A||_F^2``
    (exact: the SVD of the rank-``R`` product from its factors)."""
    if not 0.0 < energy <= 1.0:
        raise RankwiseError(f"squeeze energy must be in (0, 1], got {energy}")
    b, a = layer.lora_B.detach(), layer.lora_A.detach()
    _, s, _ = factored_svd(b, a, min(b.shape[1], b.shape[0], a.shape[1]))  # every singular value (exact)
    captured = (s.square().cumsum(0) / s.square().sum().clamp_min(torch.finfo(s.dtype).tiny))
    return int(min(max_rank, int((captured < energy - 1e-7).sum()) + 1))


@torch.no_grad()
def squeeze_lora(model: nn.Module, rank: int, energy: float | None = None, **svd_options) -> nn.Module:
    """Post hoc: every active LoRA of ``model`` becomes a rank-``rank`` LoRA (new, smaller parameters); with
    ``energy``, each layer gets its own rank, the smallest keeping that fraction of its update's energy (at most
    ``rank``), saved as PEFT's ``rank_pattern``."""
    loras = [p for p in active_parameterizations(model).values() if isinstance(p, LoRA)]
    if not loras:
        raise RankwiseError("squeeze_lora found no active LoRA adapter in the model")
    for layer in loras:
        layer_rank = rank if energy is None else energy_rank(layer, energy, rank)
        b, a = squeezed_factors(layer, layer_rank, **svd_options)
        layer.r, layer.saved_rank = layer_rank, None
        layer.scaling = layer.alpha / (math.sqrt(layer_rank) if layer.rslora else layer_rank)
        layer.lora_B, layer.lora_A = nn.Parameter(b), nn.Parameter(a)
    return model


@torch.no_grad()
def anneal_rank(layer: LoRA, rank: int, optimizer: torch.optim.Optimizer | None = None, **svd_options) -> None:
    """In training: keep the shapes, put the best rank-``rank`` factorization in the first ``rank`` ranks and zeros
    in the others. A zero rank pair ``(a_i, b_i) = 0`` has zero gradient, so it stays zero; the layer's optimizer
    state is dropped (its moments were for the old basis)."""
    u, s, vh = factored_svd(layer.lora_B, layer.lora_A, rank, **svd_options)
    root = s.sqrt()
    layer.lora_B.zero_()[:, :rank] = (u * root).to(layer.lora_B.dtype)
    layer.lora_A.zero_()[:rank] = (root[:, None] * vh).to(layer.lora_A.dtype)
    layer.saved_rank = rank  # files hold the first ``rank`` pairs (the others are zero)
    if optimizer is not None:
        optimizer.state.pop(layer.lora_A, None)
        optimizer.state.pop(layer.lora_B, None)
