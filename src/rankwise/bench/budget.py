"""Memory for ``--budget`` and ``--match-memory``, from the planner (``rankwise.plan``: meta-device counts of
weights, gradients and optimizer state, plus its activation estimate at the preset's micro-batch), and the
optimizer-state size formula the bench reports when a run ends right after a state reset.

``--match-memory SIZE`` picks, per method, the rank whose *training memory* (weights + gradients + optimizer state,
the planner's count, which equals the measured ``train_mem_bytes`` of a run) is closest to ``SIZE``; a method is
kept when that is within ``tolerance`` of ``SIZE``. Memory is affine in the rank for every built-in method, so two
plans give a candidate, checked exactly against its neighbours (bisection if the check fails).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RankwiseError

MIB = 2**20


def planned_bytes(model: str, method: str, options: dict, batch: int, seq: int, dtype: str,
                  vocab_size: int | None = None) -> int:
    """Total planned training memory (``rankwise.plan``); ``dtype`` is the loop's (bf16 = fp32 weights + autocast)."""
    from ..plan import plan

    return plan(model, method, options=options, batch=batch, seq=seq, dtype="amp" if dtype == "bf16" else "fp32",
                vocab_size=vocab_size).total


def train_memory(model: str, method: str, options: dict[str, Any], dtype: str, vocab_size: int | None) -> int:
    """Planned weights + gradients + optimizer state (no activations) of ``method`` on ``model``; any failure of the
    options on the model (a rank larger than a matrix, a bad value) becomes one ``RankwiseError``."""
    from ..plan import plan

    try:
        p = plan(model, method, options=options, batch=1, seq=1, dtype="amp" if dtype == "bf16" else "fp32",
                 vocab_size=vocab_size)
    except RankwiseError:
        raise
    except Exception as e:  # noqa: BLE001 — a method's own check (e.g. rank > min(m, n)) in whatever type it raises
        raise RankwiseError(f"method {method!r} with options {options} does not build on {model!r}: "
                            f"{type(e).__name__}: {e}") from None
    b = p.bytes
    return b["weights_trainable"] + b["weights_frozen"] + b["gradients"] + b["optimizer_state"]


def parse_budget(text: str) -> tuple[str, float | int]:
    """``"60MiB"`` -> ("bytes", n); ``"80%"`` -> ("fraction", 0.8) of full-rank AdamW's training memory."""
    from ..plan import parse_bytes

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%\s*", text)
    if m:
        frac = float(m.group(1)) / 100
        if not 0 < frac:
            raise RankwiseError(f"memory budget must be positive, got {text!r}")
        return "fraction", frac
    return "bytes", parse_bytes(text)


@dataclass(frozen=True)
class Match:
    """The outcome of matching one method to one budget: the chosen rank and its memory, or why not."""

    rank: int | None
    bytes: int | None
    target: int
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


def match_rank(model: str, method: str, options: dict[str, Any], target: int, dtype: str, vocab_size: int | None,
               tolerance: float = 0.05, max_rank: int | None = None) -> Match:
    """The rank (1..``max_rank``, default the hidden size) whose training memory is closest to ``target`` bytes."""
    from .. import methods
    from ..plan import _config, _dims

    def within(n: int) -> bool:
        return abs(n / target - 1) <= tolerance

    if "rank" not in methods.info(method).options():
        n = train_memory(model, method, options, dtype, vocab_size)
        reason = "" if within(n) else (f"has no rank to tune: its {n / MIB:.1f} MiB is not within "
                                       f"{tolerance:.0%} of {target / MIB:.1f} MiB")
        return Match(None, n, target, reason)
    top = max_rank or _dims(_config(model, vocab_size))["hidden"]
    cache: dict[int, int | None] = {}

    def need(r: int) -> int | None:
        if r not in cache:
            try:
                cache[r] = train_memory(model, method, {**options, "rank": r}, dtype, vocab_size)
            except RankwiseError:  # rank invalid for some matrix
                cache[r] = None
        return cache[r]

    def fits(r: int) -> bool:
        n = need(r)
        return n is not None and n <= target

    lo_n = need(1)
    if lo_n is None:
        raise RankwiseError(f"method {method!r} does not build at rank 1 on {model!r}")
    if lo_n > target:
        best = 1
    else:  # the largest rank that fits: affine guess, checked; else bisection
        best = None
        a, b = need(1), need(min(top, 9))
        if b is not None and b > a:
            guess = int(max(1, min(top, 1 + (target - a) * (min(top, 9) - 1) // (b - a))))
            if fits(guess) and (guess == top or not fits(guess + 1)):
                best = guess
        if best is None:
            lo, hi = 1, top
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
            best = lo
        above = need(best + 1) if best < top else None
        if above is not None and abs(above - target) < abs(need(best) - target):
            best += 1
    n = need(best)
    if within(n):
        return Match(best, n, target)
    side = "even rank 1 needs" if n > target else f"its largest rank ({best}) reaches only"
    return Match(None, n, target, f"cannot reach {target / MIB:.1f} MiB within {tolerance:.0%}: {side} "
                                  f"{n / MIB:.1f} MiB")


def optimizer_state_estimate(optimizer: torch.optim.Optimizer) -> int:
    """``SplitOptimizer.expected_state_bytes`` when available; Adam(W): two moments + a float32 step per param."""
    if hasattr(optimizer, "expected_state_bytes"):
        return int(optimizer.expected_state_bytes())
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return sum(2 * p.numel() * p.element_size() + 4 for g in optimizer.param_groups for p in g["params"])
    raise RankwiseError(f"no state-size formula for {type(optimizer).__name__}")
