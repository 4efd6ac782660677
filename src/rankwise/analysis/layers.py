"""Per-layer spectra of a model's weights and gradients, and how the gradient subspace drifts between batches.

    report = analyze_model(model, batches, rank=8)      # batches: any iterable of (B, T+1) token-id tensors
    report.rows[0]["weight_effective_rank"], report.rows[0]["drift_overlap"]

Gradients are taken at fixed weights (nothing is updated): the spectrum is that of the gradient summed over the
batches, and the drift compares the top-``rank`` left singular subspaces of the gradients of consecutive batches.
That drift is the floor under any projector's staleness (GaLore refreshes ``P`` from one batch's gradient and keeps
it ``update_gap`` steps): a subspace that already moves between two batches at the same weights will not be fitted
better by a shorter refresh interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..errors import RankwiseError
from ..progress import Progress
from .spectra import batched_svdvals, batched_top_subspaces, principal_angles, spectrum_metrics, subspace_overlap

METRICS = ("effective_rank", "energy90_rank", "energy99_rank", "stable_rank")


def linear_weights(model: nn.Module, include_output: bool = False) -> dict[str, nn.Parameter]:
    """The weight of every ``nn.Linear`` by module name (the LM head only with ``include_output``)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    found = {name: m.weight for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and (include_output or m is not head)}
    if not found:
        raise RankwiseError(f"{type(model).__name__} has no nn.Linear layer to analyze")
    return found


@dataclass
class LayerReport:
    """One row per matrix (JSON-ready) plus the spectra behind it."""

    rows: list[dict]
    weight_spectra: dict[str, torch.Tensor]
    grad_spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: int = 0


def _metric_rows(spectra: dict[str, torch.Tensor], prefix: str) -> dict[str, dict[str, float]]:
    """Metrics of every spectrum, computed batched per length."""
    out: dict[str, dict[str, float]] = {n: {} for n in spectra}
    by_len: dict[int, list[str]] = {}
    for n, s in spectra.items():
        by_len.setdefault(s.numel(), []).append(n)
    for names in by_len.values():
        metrics = spectrum_metrics(torch.stack([spectra[n] for n in names]))
        for key, values in metrics.items():
            if key == "full_rank":
                continue
            for n, v in zip(names, values.tolist()):
                out[n][f"{prefix}_{key}"] = float(v)
    return out


def analyze_model(model: nn.Module, batches: Iterable[torch.Tensor] | None = None, rank: int = 8,
                  include_output: bool = False, progress: Progress | None = None) -> LayerReport:
    """Weight spectra of every linear layer and, given ``batches``, gradient spectra and subspace drift.

    ``batches`` holds (B, T+1) token ids: inputs ``[:, :-1]``, next-token targets ``[:, 1:]``. The model's
    ``requires_grad`` flags, gradients and train/eval mode are restored afterwards. ``progress`` counts one unit for
    the weight spectra, one per batch and one for the gradient spectra.
    """
    progress = progress or Progress("analyze", 0, plain=False, bar=False)
    if not isinstance(rank, int) or rank <= 0:
        raise RankwiseError(f"rank must be a positive integer, got {rank!r}")
    weights = linear_weights(model, include_output)
    with progress.stage("weight spectra"):
        w_spectra = batched_svdvals(weights)
    rows = {n: {"name": n, "shape": list(w.shape), "full_rank": min(w.shape)} for n, w in weights.items()}
    for n, m in _metric_rows(w_spectra, "weight").items():
        rows[n].update(m)
    report = LayerReport([], w_spectra)
    if batches is not None:
        grad_sum, drift, count = _gradients(model, weights, batches, rank, progress)
        if count == 0:
            raise RankwiseError("no batch to take gradients from; give at least one batch (two for drift)")
        with progress.stage("gradient spectra"):
            report.grad_spectra = batched_svdvals(grad_sum)
        report.batches = count
        for n, m in _metric_rows(report.grad_spectra, "grad").items():
            rows[n].update(m)
        for n, (overlap, angle) in drift.items():
            rows[n].update(drift_overlap=overlap, drift_max_angle_deg=angle)
    report.rows = list(rows.values())
    return report


def _gradients(model: nn.Module, weights: dict[str, nn.Parameter], batches: Iterable[torch.Tensor], rank: int,
               progress: Progress):
    """Summed gradients over ``batches`` and the mean drift between consecutive batches' top-``rank`` subspaces."""
    from ..train import lm_loss

    flags = {p: p.requires_grad for p in model.parameters()}
    saved = {p: p.grad for p in model.parameters()}
    was_training = model.training
    device = next(iter(weights.values())).device
    grad_sum: dict[str, torch.Tensor] = {}
    overlap_sum: dict[str, float] = {}
    angle_sum: dict[str, float] = {}
    prev: dict[str, torch.Tensor] | None = None
    count = pairs = 0
    try:
        model.eval()  # no dropout: the drift is the data's, not the noise's
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            if batch.dim() != 2 or batch.shape[1] < 2:
                raise RankwiseError(f"each batch must be (batch, seq_len + 1) token ids, got shape {list(batch.shape)}")
            lm_loss(model, batch.to(device)).backward()
            grads = {n: w.grad.detach().float() for n, w in weights.items()}
            for w in weights.values():
                w.grad = None
            for n, g in grads.items():
                grad_sum[n] = grad_sum[n] + g if n in grad_sum else g.clone()
            tops = {n: u for n, (_, u) in batched_top_subspaces(grads, rank).items()}
            if prev is not None:
                _accumulate_drift(prev, tops, overlap_sum, angle_sum)
                pairs += 1
            prev, count = tops, count + 1
            progress.finish(info=f"gradient batch {count}")
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = saved[p]
        model.train(was_training)
    drift = {n: (overlap_sum[n] / pairs, angle_sum[n] / pairs) for n in overlap_sum} if pairs else {}
    return grad_sum, drift, count


def _accumulate_drift(prev: dict[str, torch.Tensor], cur: dict[str, torch.Tensor], overlap_sum: dict[str, float],
                      angle_sum: dict[str, float]) -> None:
    """Add this pair's subspace overlap and largest principal angle (degrees), batched per shape."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for n, u in cur.items():
        groups.setdefault(tuple(u.shape), []).append(n)
    for names in groups.values():
        u1 = torch.stack([prev[n] for n in names])
        u2 = torch.stack([cur[n] for n in names])
        overlaps = subspace_overlap(u1, u2).tolist()
        angles = principal_angles(u1, u2)[..., -1].tolist()
        for n, o, a in zip(names, overlaps, angles):
            overlap_sum[n] = overlap_sum.get(n, 0.0) + o
            angle_sum[n] = angle_sum.get(n, 0.0) + math.degrees(a)
