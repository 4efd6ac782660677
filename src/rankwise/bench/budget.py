"""Planned memory for ``--budget``, from the planner (``rankwise.plan``: meta-device counts of weights, gradients and
optimizer state, plus its activation estimate at the preset's micro-batch), and the optimizer-state size formula
the bench reports when a run ends right after a state reset."""

from __future__ import annotations

import torch

from ..errors import RankwiseError


def planned_bytes(model: str, method: str, options: dict, batch: int, seq: int, dtype: str,
                  vocab_size: int | None = None) -> int:
    """Total planned training memory (``rankwise.plan``); ``dtype`` is the loop's (bf16 = fp32 weights + autocast)."""
    from ..plan import plan

    return plan(model, method, options=options, batch=batch, seq=seq, dtype="amp" if dtype == "bf16" else "fp32",
                vocab_size=vocab_size).total


def optimizer_state_estimate(optimizer: torch.optim.Optimizer) -> int:
    """``SplitOptimizer.expected_state_bytes`` when available; Adam(W): two moments + a float32 step per param."""
    if hasattr(optimizer, "expected_state_bytes"):
        return int(optimizer.expected_state_bytes())
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return sum(2 * p.numel() * p.element_size() + 4 for g in optimizer.param_groups for p in g["params"])
    raise RankwiseError(f"no state-size formula for {type(optimizer).__name__}")
