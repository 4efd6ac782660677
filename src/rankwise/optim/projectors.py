"""Projectors: the low-dimensional part of a 2-D gradient, and its way back.

Every projector works on the gradient in a canonical orientation ``Gt`` of shape (d, D), d = min(m, n): the gradient
itself when m < n, its transpose (a view) when m >= n. This is GaLore's ``proj_type="std"`` rule (Zhao et al. 2024,
galore-torch ``galore_projector.py``; the same in Fira and FRUGAL): a right projection when m >= n — square matrices
included — a left one otherwise, so the basis ``P`` (d x r) is the smallest possible and the low-rank gradient
``P^T Gt`` has shape (r, D).

A projector is stateless; what it needs between steps lives in the parameter's optimizer state (so it is counted by
``optimizer_state_bytes`` and saved by ``state_dict``):

========== ============================================ =========================
name       basis                                        state
========== ============================================ =========================
svd        top-r singular vectors of G on its smaller   ``basis`` d x r
           side (GaLore), from the SVD of G itself
rsvd       randomized range finder, q power iterations, ``basis`` d x r
           warm-started from the previous basis
random     orthonormalized Gaussian (seeded)            ``seed`` (a Python int)
gaussian   N(0, 1/r) entries, not orthonormalized       ``seed``, ``right`` (Python
           (APOLLO), seeds chained per refresh          int, bool)
coordinates r of the d rows of Gt (FRUGAL's ``randperm``)  ``index`` r int64
========== ============================================ =========================

Coordinate subsets (``COORDINATE_SUBSETS``) keep a random index set S of the (m, n) gradient in its own orientation,
as FRUGAL's ``CoordinateProjector`` does: ``randk`` (single entries, RandK), ``columns`` (FRUGAL's ``coord_choice``
default) and ``rows``; S is stored as ``index`` (int64) and redrawn every ``update_gap`` steps.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..errors import RankwiseError

State = dict[str, Any]


def canonical(g: torch.Tensor) -> torch.Tensor:
    """``g`` as (d, D) with d = min(m, n): a view, transposed when m >= n (GaLore's right projection)."""
    return g.t() if g.shape[0] >= g.shape[1] else g


def generator(device: torch.device, seed: int) -> torch.Generator | None:
    """A seeded generator on ``device`` (None on ``meta``, which has none: shapes only, for the planner)."""
    return None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)


def mix(*xs: int) -> int:
    """A deterministic seed from integers (period, param index, user seed)."""
    h = 0
    for x in xs:
        h = (h * 0x9E3779B97F4A7C15 + x + 0x632BE59BD9B4E019) % (1 << 61)
    return h


# which side of an (m, n) gradient the basis spans: ``auto`` the smaller one (GaLore's rule, ``canonical``);
# ``shard`` always the right one (n x r), so that a weight sharded by rows (FSDP2's Shard(0)) projects locally:
# G_i Q is (m/p, r) on rank i, and the moments and the back-projection stay local (``rankwise.optim.sharded``)
SIDES = ("auto", "shard")


def orient(g: torch.Tensor, side: str = "auto") -> torch.Tensor:
    """``g`` as (d, D) with the basis side first: ``canonical(g)`` for ``auto``, ``g.t()`` for ``shard``."""
    return g.t() if side == "shard" else canonical(g)


class Projector:
    """Base class. ``refresh`` picks a new basis at a refresh (into the param's state); ``handle`` gives, once per
    step, what ``down``/``up``/``residual`` need (the dense basis, or the kept indices)."""

    name: ClassVar[str]
    orthonormal: ClassVar[bool] = True  # P^T P = I

    def __init__(self, rank: int):
        self.rank = rank

    def seed(self, state: State, base: int, index: int, period: int) -> int:
        """The seed ``refresh`` gets for ``period`` of param ``index`` (``base``: the user's seed); by default a
        pure function of the three, so resuming is exact."""
        return mix(base, index, period)

    def refresh(self, g: torch.Tensor, state: State, seed: int, side: str = "auto") -> None:
        """Choose the basis for the coming period from the gradient ``g`` (m, n) in its own orientation (what the
        optimizer calls; by default ``fit`` on ``orient(g, side)``)."""
        self.fit(orient(g, side), state, seed)

    def fit(self, gt: torch.Tensor, state: State, seed: int) -> None:
        """Choose the basis for the coming period from the canonical gradient ``gt`` (d, D)."""
        raise NotImplementedError

    def handle(self, state: State, gt: torch.Tensor) -> torch.Tensor:
        """This step's basis P (d x r) (subclasses may return something cheaper, e.g. indices)."""
        return state["basis"]

    def handles(self, states: list[State], gts: list[torch.Tensor]) -> torch.Tensor:
        """``handle`` of many matrices of one shape, stacked: (B, d, r) (``SplitOptimizer``'s batched step)."""
        return torch.stack([self.handle(s, g) for s, g in zip(states, gts)])

    def dense(self, h: torch.Tensor, d: int) -> torch.Tensor:
        """P as a dense (d, r) matrix, from a handle."""
        return h

    def down(self, gt: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """P^T Gt, shape (r, D)."""
        return h.t() @ gt

    def up(self, low: torch.Tensor, h: torch.Tensor, d: int) -> torch.Tensor:
        """P L, shape (d, D)."""
        return h @ low

    def residual(self, gt: torch.Tensor, low: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Gt - P P^T Gt, the part of the gradient outside the subspace (``low`` = P^T Gt)."""
        return gt - self.up(low, h, gt.shape[0])


class SVD(Projector):
    """Exact: P = the top-r singular vectors of G = U S V^T on its smaller side (GaLore, arXiv 2403.03507, Alg. 2):
    V[:, :r] when m >= n (right), U[:, :r] otherwise.

    ``refresh`` decomposes G itself, as galore-torch's ``get_orthogonal_matrix`` does, not its canonical transpose:
    singular vectors are defined up to sign, and the SVD of G^T returns other signs than the SVD of G, which would
    make kept moments disagree with the reference's after every refresh. ``fit(gt)`` decomposes ``gt`` as given.
    """

    name = "svd"

    def refresh(self, g: torch.Tensor, state: State, seed: int, side: str = "auto") -> None:
        u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
        right = side == "shard" or g.shape[0] >= g.shape[1]  # the side ``orient`` puts first
        basis = vh[: self.rank].t() if right else u[:, : self.rank]
        state["basis"] = basis.to(g.dtype).contiguous()

    def fit(self, gt: torch.Tensor, state: State, seed: int) -> None:
        u, _, _ = torch.linalg.svd(gt.float(), full_matrices=False)
        state["basis"] = u[:, : self.rank].to(gt.dtype).contiguous()


class RandomizedSVD(Projector):
    """Randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1) with ``power_iters`` subspace
    iterations, started from the previous basis plus ``oversample`` fresh Gaussian columns, then Rayleigh-Ritz
    (eigenvectors of the small Gram matrix) to keep the top-r directions, largest first.

    Cost ~ 2 (q + 1) d D (r + p) flops instead of a full SVD's O(d^2 D); the warm start makes a few iterations enough
    because the gradient's top subspace drifts slowly between refreshes. Not GaLore's basis to the last bit (a
    different subspace estimate, other signs): a rankwise option, never a preset's default.
    """

    name = "rsvd"

    def __init__(self, rank: int, power_iters: int = 2, oversample: int = 8):
        super().__init__(rank)
        self.power_iters = power_iters
        self.oversample = oversample

    def fit(self, gt: torch.Tensor, state: State, seed: int) -> None:
        a = gt.float()
        d = a.shape[0]
        k = min(d, self.rank + self.oversample)
        warm = "basis" in state
        start = torch.randn(d, k - (self.rank if warm else 0), device=a.device, generator=generator(a.device, seed))
        if warm:
            start = torch.cat([state["basis"].float(), start], dim=1)
        q = torch.linalg.qr(start).Q
        for _ in range(self.power_iters):
            q = torch.linalg.qr(a @ torch.linalg.qr(a.t() @ q).Q).Q
        b = q.t() @ a  # (k, D); the eigenvectors of B B^T rotate Q onto A's top left singular directions
        _, vecs = torch.linalg.eigh(b @ b.t())  # ascending eigenvalues = squared singular values
        state["basis"] = (q @ vecs[:, -self.rank:].flip(1)).to(gt.dtype).contiguous()


class RandomGaussian(Projector):
    """Orthonormalized Gaussian basis regenerated from its seed at every step, so nothing but the seed (a Python int,
    no tensor) is stored; costs a (d, r) QR per step. The random-subspace variant of GaLore-style methods (e.g.
    FRUGAL's ablations, arXiv 2411.07837)."""

    name = "random"

    def fit(self, gt: torch.Tensor, state: State, seed: int) -> None:
        state["seed"] = seed

    def handle(self, state: State, gt: torch.Tensor) -> torch.Tensor:
        g = torch.randn(gt.shape[0], self.rank, device=gt.device, generator=generator(gt.device, state["seed"]))
        return torch.linalg.qr(g).Q.to(gt.dtype)

    def handles(self, states: list[State], gts: list[torch.Tensor]) -> torch.Tensor:
        d, device = gts[0].shape[0], gts[0].device
        g = torch.stack([torch.randn(d, self.rank, device=device, generator=generator(device, s["seed"]))
                         for s in states])
        return torch.linalg.qr(g).Q.to(gts[0].dtype)  # one batched QR


class Coordinates(Projector):
    """A random subset of r rows of Gt, P = I[:, idx]: FRUGAL's ``GaLoreProjector(proj_type="randperm")`` (r of the
    columns of G when m >= n, of its rows otherwise; arXiv 2411.07837). Single entries: ``randk``.
    Projection is indexing, no matmul; with r = d it is a permutation, so Adam (elementwise) on the projected gradient
    is exactly Adam."""

    name = "coordinates"

    def fit(self, gt: torch.Tensor, state: State, seed: int) -> None:
        perm = torch.randperm(gt.shape[0], generator=generator(torch.device("cpu"), seed))
        state["index"] = perm[: self.rank].to(gt.device)

    def handle(self, state: State, gt: torch.Tensor) -> torch.Tensor:
        return state["index"]

    def dense(self, h: torch.Tensor, d: int) -> torch.Tensor:
        return torch.eye(d, device=h.device)[:, h]

    def down(self, gt: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return gt.index_select(0, h)

    def up(self, low: torch.Tensor, h: torch.Tensor, d: int) -> torch.Tensor:
        return low.new_zeros(d, low.shape[1]).index_copy_(0, h, low)

    def residual(self, gt: torch.Tensor, low: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return gt.index_fill(0, h, 0)


def next_seed(seed: int) -> int:
    """APOLLO's seed chain (apollo-torch ``random_projector.py``): the 15th int64 drawn from a CPU generator seeded
    with ``seed``."""
    draws = torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=torch.Generator().manual_seed(seed))
    return int(draws[-1])


class Gaussian(Projector):
    """APOLLO's random projection (Zhu et al. 2024, arXiv 2412.05270, Sec. 4.1; apollo-torch ``random_projector.py``):
    i.i.d. N(0, 1/r) entries, *not* orthonormalized, so E[P P^T] = I and ||P^T g|| ~ ||g|| (Johnson-Lindenstrauss):
    the low-rank gradient keeps the scale of the full one, which APOLLO's scaling factors rely on (an orthonormal P
    shrinks it by sqrt(r/d)). Like ``random`` it is regenerated from its seed every step, never stored.

    As apollo-torch draws it: float32, shape (d, r) for a left projection (m < n) and (r, d), transposed, for a right
    one, divided by sqrt(r), then cast to the gradient's dtype. The first period's seed is ``base + index + 1``
    (apollo-torch: the param's 1-based position in the optimizer, base 0); each refresh advances it by ``next_seed``.
    """

    name = "gaussian"
    orthonormal = False

    def seed(self, state: State, base: int, index: int, period: int) -> int:
        return next_seed(state["seed"]) if "seed" in state else base + index + 1

    def refresh(self, g: torch.Tensor, state: State, seed: int, side: str = "auto") -> None:
        state["seed"] = seed
        state["right"] = side == "shard" or g.shape[0] >= g.shape[1]

    def fit(self, gt: torch.Tensor, state: State, seed: int) -> None:
        state["seed"], state["right"] = seed, False

    def handle(self, state: State, gt: torch.Tensor) -> torch.Tensor:
        d, r = gt.shape[0], self.rank
        z = torch.randn((r, d) if state["right"] else (d, r), device=gt.device,
                        generator=generator(gt.device, state["seed"])) / math.sqrt(r)
        return (z.t() if state["right"] else z).to(gt.dtype)

    def handles(self, states: list[State], gts: list[torch.Tensor]) -> torch.Tensor:
        """``handle`` of matrices of one shape and side (``right`` alike: the batched step's buckets), stacked in
        the layout ``handle`` gives each (a right basis: the transpose of a contiguous (r, d) draw), so that every
        slice of a ``bmm`` has the per-param strides."""
        d, r, device, right = gts[0].shape[0], self.rank, gts[0].device, states[0]["right"]
        shape = (r, d) if right else (d, r)
        z = torch.stack([torch.randn(shape, device=device, generator=generator(device, s["seed"])) for s in states])
        z = z / math.sqrt(r)
        return (z.transpose(1, 2) if right else z).to(gts[0].dtype)


PROJECTORS: dict[str, type[Projector]] = {p.name: p for p in (SVD, RandomizedSVD, RandomGaussian, Gaussian,
                                                              Coordinates)}


class CoordinateSubset:
    """A random index set S along one axis of G (m, n) (``dim`` 0: rows, 1: columns) or over its flattened entries
    (``dim`` None: RandK): G_S is ``down``, the update goes back with ``add_``, the residual is G with G_S zeroed.
    FRUGAL (arXiv 2411.07837, ``frugal/coordinate_projector.py``) keeps int(rho * length) of them."""

    def __init__(self, name: str, dim: int | None, unit: str):
        self.name, self.dim, self.unit = name, dim, unit

    def length(self, shape: torch.Size) -> int:
        """How many units (entries, columns or rows) there are to choose from."""
        return shape[0] * shape[1] if self.dim is None else shape[self.dim]

    def count(self, shape: torch.Size, rank: int, density: float | None) -> int:
        """|S|: int(density * length) (FRUGAL), else ``rank`` columns / rows, or rank * max(m, n) entries for RandK
        (as many as a rank-r projection keeps)."""
        if density is not None:
            return int(self.length(shape) * density)
        return rank * max(shape) if self.dim is None else rank

    def shape(self, shape: torch.Size, k: int) -> tuple[int, ...]:
        """Shape of G_S for |S| = k."""
        return (k,) if self.dim is None else (k, shape[1]) if self.dim == 0 else (shape[0], k)

    def pick(self, shape: torch.Size, k: int, seed: int, device: torch.device) -> torch.Tensor:
        perm = torch.randperm(self.length(shape), generator=generator(torch.device("cpu"), seed))
        return perm[:k].to(device)

    def down(self, g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return g.reshape(-1).index_select(0, idx) if self.dim is None else g.index_select(self.dim, idx)

    def add_(self, p: torch.Tensor, idx: torch.Tensor, low: torch.Tensor, alpha: float) -> None:
        """p_S += alpha * low."""
        if self.dim is None:
            p.view(-1).index_add_(0, idx, low, alpha=alpha)
        else:
            p.index_add_(self.dim, idx, low, alpha=alpha)

    def zero(self, g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """G with G_S = 0 (a new tensor)."""
        if self.dim is None:
            return g.reshape(-1).index_fill(0, idx, 0).view_as(g)
        return g.index_fill(self.dim, idx, 0)

    def carry(self, moment: torch.Tensor, old: torch.Tensor, new: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """A moment of S_old re-expressed on S_new (``moments="rotate"``): kept where an index is in both, zero for
        new ones (R = P_new^T P_old for 0/1 bases; exact for both moments)."""
        full_shape = (self.length(shape),) + ((() if self.dim is None else (shape[1 - self.dim],)))
        if self.dim == 1:
            moment = moment.t()
        full = moment.new_zeros(full_shape).index_copy_(0, old, moment).index_select(0, new)
        return full.t().contiguous() if self.dim == 1 else full


COORDINATE_SUBSETS: dict[str, CoordinateSubset] = {c.name: c for c in (
    CoordinateSubset("randk", None, "entries"), CoordinateSubset("columns", 1, "columns"),
    CoordinateSubset("rows", 0, "rows"))}


def make_projector(name: str, rank: int, **options: Any) -> Projector:
    if name not in PROJECTORS:
        raise RankwiseError(f"unknown projector {name!r}; valid projectors: {', '.join(PROJECTORS)} "
                            f"(and the coordinate subsets {', '.join(COORDINATE_SUBSETS)}, the block selectors block, "
                            "layers)")
    return PROJECTORS[name](rank, **options)
