"""Learning-rate tuning by successive halving (Jamieson & Talwalkar 2016; Li et al. 2018, Hyperband's inner loop).

Per method: ``points`` learning rates log-spaced over ``span`` x around a centre; every lr runs the first rung (a
short horizon: the whole warmup + cosine schedule compressed to a fraction of the steps), the best ``ceil(n / eta)``
go on to the next rung, and so on to the full horizon. The tuned lr is the one with the lowest mean final validation
loss at the full horizon. If that lr is the smallest or largest of the lrs run at the full horizon, the short rungs
may have dropped a better neighbour (a short horizon favours other lrs than the full one), so its grid neighbour on
that side runs the full horizon too, until the best full-horizon lr has a full-horizon lr on each side or is at
the grid's end (``edge_extension``; the same rule for every method). The objective is injected, so the search itself
is tested on a synthetic bowl.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ..errors import RankwiseError


def lr_grid(centre: float, points: int, span: float) -> list[float]:
    """``points`` log-spaced lrs from ``centre / sqrt(span)`` to ``centre * sqrt(span)``."""
    if not isinstance(points, int) or points < 2:
        raise RankwiseError(f"the lr grid needs at least 2 points, got {points!r}; use --tune-points 7 (the default)")
    if not (span > 1 and math.isfinite(span)):
        raise RankwiseError(f"the lr grid's span must be a finite ratio > 1, got {span!r}; use --tune-span 64")
    if not (centre > 0 and math.isfinite(centre)):
        raise RankwiseError(f"the lr grid's centre must be a positive lr, got {centre!r}")
    return [centre * span ** (k / (points - 1) - 0.5) for k in range(points)]


def rung_steps(steps: int, rungs: tuple[float, ...]) -> list[int]:
    """The horizon of each rung in steps (fractions of ``steps``; the last rung is the full horizon)."""
    if not rungs or rungs[-1] != 1.0 or any(not 0 < a < b for a, b in zip(rungs, rungs[1:])) or rungs[0] <= 0:
        raise RankwiseError(f"tune rungs must increase to 1.0 (the full horizon), got {rungs}")
    return [max(1, round(steps * f)) for f in rungs]


@dataclass(frozen=True)
class Trial:
    lr: float
    steps: int
    losses: tuple[float, ...]  # one final validation loss per seed (inf: the run failed or went non-finite)

    @property
    def mean(self) -> float:
        return sum(self.losses) / len(self.losses)

    @property
    def sd(self) -> float:
        n = len(self.losses)
        if n < 2 or not math.isfinite(self.mean):
            return 0.0
        return math.sqrt(sum((x - self.mean) ** 2 for x in self.losses) / (n - 1))

    def to_dict(self) -> dict:
        return {"lr": self.lr, "steps": self.steps, "losses": list(self.losses), "mean": self.mean, "sd": self.sd}


def successive_halving(lrs: list[float], horizons: list[int], eta: int,
                       objective: Callable[[list[float], int], list[list[float]]]) -> tuple[float, list[Trial]]:
    """Run ``objective(lrs, steps) -> losses per lr (one per seed)`` rung by rung; return the best lr and every trial.

    Each rung keeps the ``ceil(n / eta)`` lrs with the lowest mean loss (ties: the smaller lr, the safer one); then the
    full horizon extends past its best lr while that lr is at the edge of the full-horizon lrs (module docstring).
    """
    if eta < 2:
        raise RankwiseError(f"successive halving needs eta >= 2, got {eta}")
    alive, trials = list(lrs), []
    for i, steps in enumerate(horizons):
        losses = objective(alive, steps)
        rung = [Trial(lr, steps, tuple(x if math.isfinite(x) else math.inf for x in ls))
                for lr, ls in zip(alive, losses)]
        trials += rung
        ranked = sorted(rung, key=lambda t: (t.mean, t.lr))
        if i + 1 < len(horizons):
            alive = sorted(t.lr for t in ranked[:math.ceil(len(ranked) / eta)])
    grid = sorted(lrs)
    while True:
        final = sorted((t for t in trials if t.steps == horizons[-1]), key=lambda t: t.lr)
        best = min(final, key=lambda t: (t.mean, t.lr))
        k = grid.index(best.lr)
        side = -1 if best.lr == final[0].lr else 1 if best.lr == final[-1].lr else 0
        if not math.isfinite(best.mean) or side == 0 or not 0 <= k + side < len(grid):
            break
        extra = grid[k + side]
        trials.append(Trial(extra, horizons[-1], tuple(x if math.isfinite(x) else math.inf
                                                       for x in objective([extra], horizons[-1])[0])))
    if not math.isfinite(best.mean):
        raise RankwiseError("every lr of the grid failed or diverged at the full horizon; widen or lower the grid "
                            "(--tune-span, --lr)")
    return best.lr, trials
