"""LoRA-LEGO (Zhao et al. 2024, "Merging LoRAs like Playing LEGO"): rank-wise merging of several LoRAs.

Each rank ``i`` of a LoRA is a unit ``(a_i, b_i)`` contributing ``c b_i a_i^T`` (``c`` = scaling x merge weight).
Units are made comparable (the scale ``c`` folded in and split so that ``|a_i| = |b_i|``; the sign fixed so that the
largest entry of ``a_i`` is positive, since ``(a, b)`` and ``(-a, -b)`` are the same unit), clustered into ``k``
groups by k-means on ``[a_i; b_i]``, and each cluster's centroid becomes one rank of the merged LoRA (parameter
averaging). Output-norm reweighting then scales the merged update so that ``|Delta W_merged X|_F`` equals the mean
of the merged LoRAs' ``|Delta W_j X|_F`` (``X``: calibration inputs, or the identity, i.e. Frobenius norms), which
undoes the norm shrinkage of averaging. One LoRA of rank ``R`` merged with ``k = R`` is reproduced exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ...errors import RankwiseError
from ..inject import adapter_layers, apply
from ..lora import LoRA


def canonical_units(b: torch.Tensor, a: torch.Tensor, coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Units of ``coef * b @ a`` as rows (R x in, R x out) with ``coef`` folded in, equal norms and a fixed sign."""
    b = b.t() * coef                                                   # R x out; a is R x in
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    t = (nb / na.clamp_min(1e-30)).sqrt().where(na > 0, torch.ones_like(na))
    a, b = a * t, b / t
    sign = a.gather(1, a.abs().argmax(dim=1, keepdim=True)).sign()
    sign = sign.where(sign != 0, torch.ones_like(sign))
    return a * sign, b * sign


def kmeans(points: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding (vectorized); returns the cluster of each point (n,)."""
    n = points.shape[0]
    g = torch.Generator().manual_seed(seed)
    centers = points[torch.randint(n, (1,), generator=g)]
    for _ in range(1, k):  # k-means++: next center with probability proportional to the squared distance
        d2 = torch.cdist(points, centers).min(dim=1).values.square().cpu()
        pick = torch.multinomial(d2 / d2.sum(), 1, generator=g) if d2.sum() > 0 else torch.randint(n, (1,), generator=g)
        centers = torch.cat([centers, points[pick.to(points.device)]])
    assign = torch.cdist(points, centers).argmin(dim=1)
    for _ in range(iters):
        sums = torch.zeros_like(centers).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).to(points.dtype).unsqueeze(1)
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
        new = torch.cdist(points, centers).argmin(dim=1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def _output_norm(b: torch.Tensor, a: torch.Tensor, inputs: torch.Tensor | None) -> torch.Tensor:
    """``|b a X|_F`` (``X`` = identity if None) from the factors: ``trace((b^T b)(a X X^T a^T))``."""
    ax = a if inputs is None else a @ inputs.t()
    return ((b.t() @ b) * (ax @ ax.t())).sum().clamp_min(0).sqrt()


def lego_merge_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]], k: int,
                       inputs: torch.Tensor | None = None, iters: int = 50, seed: int = 0,
                       reweight: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge LoRAs ``[(B_j, A_j, c_j)]`` (``Delta W_j = c_j B_j A_j``) of one layer into ``(B, A)`` of rank ``k``
    with ``Delta W = B A``. ``inputs`` (n x in) calibrates the output-norm reweighting."""
    if not factors:
        raise RankwiseError("lora_lego_merge needs at least one LoRA")
    units = [canonical_units(b.double(), a.double(), c) for b, a, c in factors]
    total = sum(u[0].shape[0] for u in units)
    if not 1 <= k <= total:
        raise RankwiseError(f"lora_lego_merge k must be in [1, {total}] (the total number of rank units), got {k}")
    a_units, b_units = torch.cat([u[0] for u in units]), torch.cat([u[1] for u in units])
    in_dim = a_units.shape[1]
    assign = kmeans(torch.cat([a_units, b_units], dim=1), k, iters, seed)
    counts = torch.bincount(assign, minlength=k).to(a_units.dtype).clamp_min(1).unsqueeze(1)
    a_m = torch.zeros(k, in_dim, dtype=a_units.dtype, device=a_units.device).index_add_(0, assign, a_units) / counts
    b_m = torch.zeros(k, b_units.shape[1], dtype=a_units.dtype, device=a_units.device).index_add_(
        0, assign, b_units) / counts
    b_m = b_m.t()
    if reweight:
        x = None if inputs is None else inputs.double()
        target = torch.stack([_output_norm(u[1].t(), u[0], x) for u in units]).mean()
        got = _output_norm(b_m, a_m, x)
        if got > 0:
            b_m = b_m * (target / got)
    dtype = factors[0][0].dtype
    return b_m.to(dtype), a_m.to(dtype)


@torch.no_grad()
def lora_lego_merge(model: nn.Module, adapter_names: Sequence[str], k: int, merged_name: str = "lego",
                    weights: Sequence[float] | None = None, inputs: dict[str, torch.Tensor] | None = None,
                    iters: int = 50, seed: int = 0, reweight: bool = True) -> nn.Module:
    """Add LoRA ``merged_name`` of rank ``k`` (alpha = k, scaling 1) merging the LoRA adapters ``adapter_names`` of
    ``model`` layer by layer (each weighted by ``weights``, default 1); it becomes the active adapter.
    ``inputs``: optional module name -> calibration inputs (n x in) for the output-norm reweighting.

    With ``rankwise.adapters.load_adapter(model, folder, adapter_name=...)`` for each file and ``save_adapter``
    after, this is ``rankwise merge --rankwise``; the result is a plain (PEFT-loadable) LoRA.
    """
    names = list(adapter_names)
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise RankwiseError(f"got {len(weights)} weights for {len(names)} adapters; give one weight per adapter")
    layers = {p: layer for p, layer in adapter_layers(model).items() if any(n in layer.adapters for n in names)}
    if not layers:
        raise RankwiseError(f"the model has none of the adapters {names}; load them with adapters.load_adapter first")
    merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, layer in layers.items():
        factors = []
        for n, w in zip(names, weights):
            p = layer.adapters[n] if n in layer.adapters else None
            if p is None:
                continue
            if not isinstance(p, LoRA) or p.init_A is not None:
                raise RankwiseError(f"adapter {n!r} at {path} is not a plain LoRA ({type(p).__name__}); LoRA-LEGO "
                                    "merges LoRA adapters")
            factors.append((p.lora_B, p.lora_A, p.scaling * w))
        merged[path] = lego_merge_factors(factors, k, (inputs or {}).get(path), iters, seed, reweight)
    apply(model, method="lora", r=k, alpha=float(k), target=list(layers), adapter_name=merged_name)
    for path, (b, a) in merged.items():
        lora = layers[path].adapters[merged_name]
        lora.lora_B.copy_(b)
        lora.lora_A.copy_(a)
    return model
