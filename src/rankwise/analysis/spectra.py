"""Spectral metrics of matrices, batched over stacks of equal-shaped matrices.

Every function takes singular values ``s`` of shape ``(..., k)`` (descending, as ``torch.linalg.svdvals`` returns
them) and reduces the last dimension, so one call covers every matrix of a shape group.

- effective rank (Roy & Vetterli 2007): ``exp(H(p))`` with ``p_i = s_i / sum_j s_j``; equals k for k equal values.
- energy rank at ``tau``: the smallest k with ``sum_{i<=k} s_i^2 >= tau * sum_i s_i^2`` (90% / 99% energy).
- stable rank: ``||W||_F^2 / ||W||_2^2 = sum_i s_i^2 / s_1^2``.
- principal angles between column spaces of orthonormal ``U1``, ``U2``: ``cos theta_i = svdvals(U1^T U2)``
  (Björck & Golub 1973); ``subspace_overlap = mean cos^2 theta`` is 1 for the same subspace, r/d for random ones.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import RankwiseError


def group_by_shape(mats: dict[str, torch.Tensor]) -> dict[tuple[int, ...], list[str]]:
    """Names of ``mats`` grouped by shape (one batched linear-algebra call per group)."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, m in mats.items():
        if m.dim() != 2:
            raise RankwiseError(f"{name!r} has shape {list(m.shape)}; spectra need 2-D matrices")
        groups.setdefault(tuple(m.shape), []).append(name)
    return groups


@contextlib.contextmanager
def serial_lapack(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run CPU SVDs on one thread: on stacks of small matrices, threaded LAPACK gains nothing and, on busy cores,
    loses badly (16 x 256 x 256 ``svdvals``: 0.17 s on 1 thread vs 6-13 s on 2 loaded cores, measured here)."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def batched_svdvals(mats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Singular values (fp32, descending) of every matrix, one ``torch.linalg.svdvals`` per shape group."""
    out: dict[str, torch.Tensor] = {}
    for names in group_by_shape(mats).values():
        stack = torch.stack([mats[n].detach().float() for n in names])
        with serial_lapack(stack.device):
            s = torch.linalg.svdvals(stack)
        out.update(zip(names, s.unbind(0)))
    return out


def batched_top_subspaces(mats: dict[str, torch.Tensor], rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(singular values, top-``rank`` left singular vectors) per matrix, one ``torch.linalg.svd`` per shape group."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for names in group_by_shape(mats).values():
        stack = torch.stack([mats[n].detach().float() for n in names])
        with serial_lapack(stack.device):
            u, s, _ = torch.linalg.svd(stack, full_matrices=False)
        u = u[..., : min(rank, u.shape[-1])]
        out.update({n: (s[i], u[i]) for i, n in enumerate(names)})
    return out


def effective_rank(s: torch.Tensor) -> torch.Tensor:
    """Entropy effective rank ``exp(-sum p log p)``, ``p = s / sum s`` (Roy & Vetterli 2007); 0 for a zero matrix."""
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    h = -(p * torch.log(p.clamp_min(torch.finfo(s.dtype).tiny))).sum(-1)
    return torch.where(total.squeeze(-1) > 0, torch.exp(h), torch.zeros_like(h))


def energy_rank(s: torch.Tensor, tau: float) -> torch.Tensor:
    """Smallest k whose top-k singular values hold a ``tau`` fraction of ``sum s^2`` (int64; 0 for a zero matrix)."""
    if not 0.0 < tau <= 1.0:
        raise RankwiseError(f"energy fraction must be in (0, 1], got {tau}")
    e = s.square()
    cum = e.cumsum(-1)
    # relative slack so that tau = 1 is reached despite rounding in the cumulative sum
    need = tau * cum[..., -1:] * (1 - 4 * torch.finfo(s.dtype).eps)
    return torch.where(cum[..., -1] > 0, (cum < need).sum(-1) + 1, torch.zeros_like(cum[..., -1], dtype=torch.long))


def stable_rank(s: torch.Tensor) -> torch.Tensor:
    """``||W||_F^2 / ||W||_2^2``; 0 for a zero matrix."""
    top = s[..., 0].square()
    return torch.where(top > 0, s.square().sum(-1) / top.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(top))


def principal_angles(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of orthonormal ``u1``, ``u2`` (``..., d, r``)."""
    with serial_lapack(u1.device):
        cos = torch.linalg.svdvals(u1.transpose(-2, -1) @ u2).clamp(0.0, 1.0)
    return torch.arccos(cos)


def subspace_overlap(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """``||U1^T U2||_F^2 / r`` = mean squared cosine of the principal angles (1: same subspace)."""
    return (u1.transpose(-2, -1) @ u2).square().sum((-2, -1)) / u1.shape[-1]


def spectrum_metrics(s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every rank metric of a (batch of) spectrum, plus the full rank ``k`` for normalisation."""
    return {"effective_rank": effective_rank(s), "energy90_rank": energy_rank(s, 0.90),
            "energy99_rank": energy_rank(s, 0.99), "stable_rank": stable_rank(s),
            "full_rank": torch.full(s.shape[:-1], s.shape[-1])}
