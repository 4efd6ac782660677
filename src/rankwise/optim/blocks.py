"""Block selection across parameters: which blocks (transformer layers) get the stateful rule this period.

Inside a selected block the inner rule sees the full gradient (an identity "projection"); outside, the residual rule
sees all of it (``drop``: frozen). Moments of a block are freed when it goes inactive and start from zero when it is
selected again. The selection is a pure function of (period, seed), so resuming is exact.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import RankwiseError


class BlockSelector:
    name: ClassVar[str]

    def __init__(self, order: str = "ascending", active_blocks: int = 1):
        self.order = order
        self.active_blocks = active_blocks

    def active(self, blocks: list[int], period: int, seed: int) -> set[int]:
        raise NotImplementedError


class Cycle(BlockSelector):
    """BAdam (Luo et al. 2024, arXiv 2404.02827): block coordinate descent, one block at a time, cycling through all
    blocks in ``order`` (ascending, descending, or a fresh random permutation per cycle); reference recipe switches
    every 50 steps (``switch_block_every``)."""

    name = "block"
    orders = ("ascending", "descending", "random")

    def active(self, blocks: list[int], period: int, seed: int) -> set[int]:
        cycle, i = divmod(period, len(blocks))
        if self.order == "descending":
            return {blocks[-1 - i]}
        if self.order == "random":
            perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed + cycle))
            return {blocks[int(perm[i])]}
        return {blocks[i]}


class Sample(BlockSelector):
    """LISA (Pan et al. 2024, arXiv 2403.17919, Alg. 1): every period, ``active_blocks`` layers sampled uniformly
    without replacement are trained, the rest frozen; LMFlow's script uses 1 layer every 20 steps. (LISA also always
    trains the embedding and LM head: those are plain params here.)"""

    name = "layers"

    def active(self, blocks: list[int], period: int, seed: int) -> set[int]:
        perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed * 1_000_003 + period))
        return {blocks[int(i)] for i in perm[: self.active_blocks]}


BLOCK_SELECTORS: dict[str, type[BlockSelector]] = {s.name: s for s in (Cycle, Sample)}


def make_selector(name: str, order: str, active_blocks: int) -> BlockSelector:
    if order not in Cycle.orders:
        raise RankwiseError(f"unknown block_order {order!r}; valid: {', '.join(Cycle.orders)}")
    if active_blocks < 1:
        raise RankwiseError(f"active_blocks must be >= 1, got {active_blocks}")
    return BLOCK_SELECTORS[name](order, active_blocks)
