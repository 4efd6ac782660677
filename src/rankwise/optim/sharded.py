"""Projection under FSDP2 without gathering: the right basis of a row-sharded weight, and its distributed refresh.

With ``side="shard"`` (``projectors.SIDES``) a weight W (m, n) that FSDP2 shards by rows (``Shard(0)``, rank i holds
G_i, m_i x n) is projected on the right basis Q (n x r, replicated on every rank, small). In the canonical
orientation Gt = G^T (n, m), ``Shard(1)``:

=====================  =================  ===========================  ========================
tensor                 shape              placement                    communication per step
=====================  =================  ===========================  ========================
basis Q                n x r              ``Replicate``                none (refresh: below)
projected Q^T G_i^T    r x m_i            ``Shard(1)``                 none
moments                r x m_i            ``Shard(1)``                 none
back-projection Q u    n x m_i            ``Shard(1)`` (= W's rows)    none
Fira column stats      m_i                ``Shard(0)``, one per row    one scalar all-reduce
=====================  =================  ===========================  ========================

``basis="sharded"`` (``BASES``) keeps Q as a ``Shard(0)`` DTensor instead (n_i = n/N rows per rank, ``torch.chunk``
sizes when N does not divide n: rank 0 holds ceil(n/N) rows, the last ones fewer or none), so that the state per rank
is the single-process state / N (``Replicate`` costs n r on every rank). The step that uses Q all-gathers it (n x r
per matrix: r/m of FSDP's own all-gather of that weight), uses the whole, and keeps only its local rows again
(``whole_basis``); a refresh's replicated result is sliced, no communication. The gathered Q is the stored Q
bit for bit, so both options compute the same numbers.

DTensor's sharding rules keep every one of those products local (Replicate @ Shard(1) -> Shard(1)); the state is
``DTensor`` throughout, so ``torch.distributed.checkpoint`` saves it and reshards it to another world size. Fira's
statistics are norms over each column of Gt, i.e. over each *row* of G: along the sharded axis every rank holds whole
rows, so they are local; only the total ||S|| of the limiter needs a scalar all-reduce.

Refresh. ``svd``: the SVD of the whole gradient (DTensor all-gathers it, once per ``update_gap`` steps), exact.
``rsvd``: ``range_finder`` below, a randomized range finder with power iterations (Halko, Martinsson & Tropp 2011,
Alg. 4.3 + 5.1) on Gt Gt^T = sum_i G_i^T G_i, whose products need one all-reduce of an n x k matrix each
(k = r + oversample): O(n k) communication instead of an m x n all-gather. ``random`` / ``coordinates``: only the
shared seed (every rank draws the same basis).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from ..errors import RankwiseError

State = dict
# where the basis Q of ``side="shard"`` lives between steps under FSDP2 (module docstring)
BASES = ("replicated", "sharded")
BASIS_PROJECTORS = ("svd", "rsvd")  # the projectors that store a basis tensor


def is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def plain_as_replicated(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Inside: plain tensors mixed with DTensors count as replicated (a seeded basis, kept indices)."""
    if not is_dtensor(t):
        return contextlib.nullcontext()
    from torch.distributed.tensor.experimental import implicit_replication

    return implicit_replication()


def check_basis(basis: str, side: str, projector: str) -> None:
    """``basis`` is valid and applies: ``sharded`` needs ``side="shard"`` and a projector that stores a basis."""
    if basis not in BASES:
        raise RankwiseError(f"unknown basis {basis!r}; valid: {', '.join(BASES)}")
    if basis == "sharded" and side != "shard":
        raise RankwiseError(f"basis='sharded' shards the right basis of side='shard' over the ranks, but side is "
                            f"{side!r}: pass side='shard' too (under side='auto' FSDP already keeps the basis "
                            "sharded between steps, and gathers it with the gradient at every step)")
    if basis == "sharded" and projector not in BASIS_PROJECTORS:
        raise RankwiseError(f"basis='sharded' shards a stored basis, and projector {projector!r} stores none (only "
                            f"{' and '.join(BASIS_PROJECTORS)} do): drop the basis option")


@contextlib.contextmanager
def whole_basis(state: State, keep: str | None, needed: bool = True) -> Iterator[None]:
    """Inside: ``state["basis"]`` whole on every rank (a sharded DTensor basis is all-gathered, n x r; if not
    ``needed``, e.g. before an SVD refresh replaces it, it is dropped instead). On exit a DTensor basis is stored as
    ``keep`` says: ``sharded`` -> ``Shard(0)``, this rank's rows (a copy: the whole one is freed; no communication),
    ``replicated`` -> whole. ``keep=None`` (``side="auto"``) and plain tensors (one process, DDP): untouched."""
    basis = state.get("basis")
    if keep is not None and basis is not None and is_dtensor(basis) and not basis.placements[0].is_replicate():
        from torch.distributed.tensor import Replicate

        if needed:
            state["basis"] = basis.redistribute(basis.device_mesh, [Replicate()])
        else:
            del state["basis"]
    yield
    basis = state.get("basis")
    if keep == "sharded" and basis is not None and is_dtensor(basis) and basis.placements[0].is_replicate():
        from torch.distributed.tensor import Shard

        state["basis"] = basis.redistribute(basis.device_mesh, [Shard(0)])


def range_finder(gt: torch.Tensor, rank: int, oversample: int, power_iters: int, warm: torch.Tensor | None,
                 seed: int, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """Top-``rank`` left singular vectors of ``gt`` (n, m), estimated from its local columns ``gt`` (n, m_i).

        Q_0 = qr([warm, Omega])          Omega (n, k - r) Gaussian from ``seed`` (the same on every rank)
        Q_j = qr(reduce(gt (gt^T Q_{j-1})))   j = 1..q: one all-reduce of n x k each
        W = reduce(gt (gt^T Q_q)),  Q_q^T W = V L V^T (eigh),  basis = Q_q V[:, top r]   (Rayleigh-Ritz)

    ``reduce`` sums an (n, k) matrix over the ranks (identity in one process: the same arithmetic)."""
    a = gt.float()
    n = a.shape[0]
    k = min(n, rank + oversample)
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same numbers on any device (and on meta)
    start = torch.randn(n, k - (rank if warm is not None else 0), generator=g).to(a.device)
    if warm is not None:
        start = torch.cat([warm.float(), start], dim=1)
    q = torch.linalg.qr(start).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(reduce(a @ (a.t() @ q))).Q
    w = reduce(a @ (a.t() @ q))
    _, vecs = torch.linalg.eigh(q.t() @ w)  # ascending
    return (q @ vecs[:, -rank:].flip(1)).to(gt.dtype).contiguous()


def refresh_rsvd(gt: torch.Tensor, state: State, rank: int, oversample: int, power_iters: int, seed: int) -> None:
    """``state["basis"]`` <- ``range_finder`` of ``gt`` (a ``Shard(1)`` DTensor: local columns, all-reduced n x k
    products, a ``Replicate`` result; or a plain tensor)."""
    warm = state.get("basis")
    if not is_dtensor(gt):
        state["basis"] = range_finder(gt, rank, oversample, power_iters, warm, seed)
        return
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate

    mesh = gt.device_mesh
    group = mesh.get_group()

    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=group)
        return t

    basis = range_finder(gt.to_local(), rank, oversample, power_iters,
                         None if warm is None else warm.to_local(), seed, reduce)
    state["basis"] = DTensor.from_local(basis, mesh, [Replicate()], run_check=False)
