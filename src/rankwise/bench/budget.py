"""Planned training memory of a method, from shapes alone (``device="meta"``): weights + gradients + optimizer state.

Activations are not included (they depend on batch, sequence length and checkpointing, and are the same order for
every method here); the ``--budget`` filter therefore compares the memory that the methods actually change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .. import methods
from ..errors import RankwiseError
from ..methods import OptimConfig
from ..models import build_model

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_size(text: str) -> int:
    """``24GB`` / ``24GiB`` / ``24G`` / ``500MB`` -> bytes (binary units: a "24GB" GPU holds 24 GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise RankwiseError(f"cannot read memory size {text!r}; use a number with a unit, e.g. 24GB, 80GiB, 512MB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class MemoryPlan:
    weights: int  # every parameter and buffer, trainable or frozen
    grads: int  # one gradient per trainable parameter
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer_state


def optimizer_state_estimate(optimizer: torch.optim.Optimizer) -> int:
    """``SplitOptimizer.expected_state_bytes`` when available; Adam(W): two moments + a float32 step per param."""
    if hasattr(optimizer, "expected_state_bytes"):
        return int(optimizer.expected_state_bytes())
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return sum(2 * p.numel() * p.element_size() + 4 for g in optimizer.param_groups for p in g["params"])
    raise RankwiseError(f"no state-size formula for {type(optimizer).__name__}; run without --budget")


def plan(model_preset: str, method: str, options: dict, vocab_size: int | None = None) -> MemoryPlan:
    """Build the preset on the meta device, apply ``method`` and its optimizer, and count bytes (fp32 master
    weights, as the training loop keeps them; bf16 autocast only changes activations)."""
    model = build_model(model_preset, vocab_size=vocab_size, device="meta")
    m = methods.get(method, **options)
    model = m.prepare(model)
    optimizer = m.build_optimizer(model, OptimConfig())
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return MemoryPlan(weights, grads, optimizer_state_estimate(optimizer))
