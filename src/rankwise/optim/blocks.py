"""Block selection across parameters: which blocks get the stateful rule this period.

A block is a set of parameters with one block id (a transformer layer, or a single tensor). Every ``update_gap``
steps a selector picks k of the n blocks, k = ``active_blocks`` or, with ``density`` rho, k = round(rho n) (FRUGAL's
``num_active_blocks``). Inside a selected block the inner rule sees the full gradient; outside, the residual rule
sees all of it (``drop``: the block is frozen, untouched — no update and no weight decay). With ``moments="reset"``
the moments of a block are freed when it goes inactive and start from zero at every period (BAdam, FRUGAL); with
``"keep"`` an inactive block keeps them untouched and resumes them when selected again (LISA through torch AdamW,
which skips parameters without a gradient). The selection is a pure function of (period, seed), so resuming is exact.

Orders (``block_order``), period p, blocks b_0 < ... < b_{n-1}:

=========== ==================================================================================================
ascending   b_{(pk + j) mod n}, j < k                          (BAdam ``switch_mode="ascending"``, FRUGAL)
descending  b_{(n - 1 - pk - j) mod n}, j < k                  (BAdam's class default, FRUGAL's C4 scripts)
mirror      pairs b_i, b_{n-1-i}, i = (pk/2 + j) mod (n//2)    (FRUGAL; k even)
random      the next k of a stream of random permutations, one permutation per pass over the blocks (BAdam)
sample      k blocks uniformly without replacement, drawn afresh each period (FRUGAL ``random``, LISA)
=========== ==================================================================================================
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import RankwiseError

ORDERS = ("ascending", "descending", "mirror", "random", "sample")


def _perm(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def active_count(n: int, active_blocks: int, density: float | None) -> int:
    """k = round(density n) when ``density`` is set (FRUGAL), else ``active_blocks``, at most n."""
    k = round(n * density) if density is not None else active_blocks
    if k < 1:
        raise RankwiseError(f"density {density} selects no block out of {n} (round({n} * {density}) = 0); raise "
                            "density or give active_blocks instead")
    return min(k, n)


class BlockSelector:
    name: ClassVar[str]
    default_order: ClassVar[str]

    def __init__(self, order: str, k: int):
        self.order = order
        self.k = k

    def active(self, blocks: list[int], period: int, seed: int) -> set[int]:
        """The k block ids trained in ``period`` (``blocks`` sorted)."""
        n, k = len(blocks), self.k
        if self.order == "ascending":
            return {blocks[(period * k + j) % n] for j in range(k)}
        if self.order == "descending":
            return {blocks[(n - 1 - period * k - j) % n] for j in range(k)}
        if self.order == "mirror":
            if k % 2 or n < 2:
                raise RankwiseError(f"block_order 'mirror' activates pairs of blocks: the number of active blocks "
                                    f"({k} of {n}) must be even")
            half = n // 2
            firsts = [(period * (k // 2) + j) % half for j in range(k // 2)]
            return {blocks[i] for i in firsts} | {blocks[n - 1 - i] for i in firsts}
        if self.order == "random":
            start = period * k
            return {blocks[_perm(n, seed * 1_000_003 + pos // n)[pos % n]] for pos in range(start, start + k)}
        return {blocks[i] for i in _perm(n, seed * 1_000_003 + period)[:k]}


class Cycle(BlockSelector):
    """BAdam (Luo et al. 2024, arXiv 2404.02827) and FRUGAL's blockwise projection (arXiv 2411.07837): k blocks at a
    time in ``block_order`` (default ascending)."""

    name = "block"
    default_order = "ascending"


class Sample(BlockSelector):
    """LISA (Pan et al. 2024, arXiv 2403.17919, Alg. 1): every period, k layers sampled uniformly without replacement
    are trained, the rest frozen (LMFlow's script: 1 layer every 20 steps); ``block_order`` is always ``sample``."""

    name = "layers"
    default_order = "sample"


BLOCK_SELECTORS: dict[str, type[BlockSelector]] = {s.name: s for s in (Cycle, Sample)}


def make_selector(name: str, order: str, active_blocks: int, density: float | None, n: int) -> BlockSelector:
    if order not in ORDERS:
        raise RankwiseError(f"unknown block_order {order!r}; valid: {', '.join(ORDERS)}")
    if active_blocks < 1:
        raise RankwiseError(f"active_blocks must be >= 1, got {active_blocks}")
    cls = BLOCK_SELECTORS[name]
    return cls(order if cls is Cycle else "sample", active_count(n, active_blocks, density))
