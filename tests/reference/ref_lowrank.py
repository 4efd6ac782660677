"""Helpers for the GaLore / Fira fidelity tests: the references' param split, built independently of rankwise, and a
teacher-forced variant of ``side_by_side``.

Why two kinds of run. A refresh takes the SVD of one gradient, and LAPACK's float32 SVD picks the signs of singular
vectors discontinuously: a perturbation of 1e-12 in a 1e-3-sized gradient flips some of them (measured with this
torch/MKL build). With moments kept across the refresh, a flipped sign reverses that direction's momentum, so two
float32 runs whose weights differ by rounding part at some refresh — galore-torch against itself with one weight
moved by 1 ulp parts by 1.3e-3 within 30 steps. So:

- ``fp64`` runs free for all steps: the references (and rankwise) take the SVD of the gradient cast to float32,
  and rounding differences of fp64 arithmetic (~1e-16) never change that cast, so both sides get the same basis.
- fp32 runs are *teacher-forced*: after every step the difference is recorded and our weights are set to the
  reference's, so both see bit-identical gradients (and bases); moments, bases and limiter state still evolve on
  each side independently. A wrong side, a sign-inconsistent SVD or other arithmetic shows at the first step or
  the first refresh.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ref_model import max_weight_diff, side_by_side

TARGETS = ("attn", "mlp")


def reference_groups(model: nn.Module, weight_decay: float, **projection: Any) -> list[dict[str, Any]]:
    """The split of galore-torch's ``torchrun_main.py`` (github.com/jiaweizzhao/GaLore) and Fira's ``divide_params``
    (``fira/__init__.py``): every ``nn.Linear`` whose module name contains "attn" or "mlp" is projected, with
    ``projection`` (rank, update_proj_gap, scale / alpha, proj_type) in its group; all other params form plain
    groups of the same optimizer. Weight decay as rankwise's ``param_groups``: matrices decay, 1-D params do not
    (the references take one optimizer-wide ``weight_decay``; this is the split both sides are run on)."""
    projected = {id(m.weight) for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and any(t in name for t in TARGETS)}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if id(p) in projected], "weight_decay": weight_decay, **projection},
              {"params": [p for p in params if id(p) not in projected and p.dim() >= 2],
               "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) not in projected and p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def teacher_forced(make_ours: Callable[[nn.Module], torch.optim.Optimizer],
                   make_ref: Callable[[nn.Module], torch.optim.Optimizer], steps: int,
                   after_step: Callable[[int, nn.Module, nn.Module], None] | None = None
                   ) -> tuple[list[float], nn.Module]:
    """``side_by_side`` with our weights reset to the reference's after every step. Returns (max |dW| of each step's
    update, the reference model)."""
    trace: list[float] = []

    def sync(step: int, ours: nn.Module, ref: nn.Module) -> None:
        if after_step is not None:
            after_step(step, ours, ref)
        trace.append(max_weight_diff(ours, ref))
        with torch.no_grad():
            for a, b in zip(ours.parameters(), ref.parameters()):
                a.copy_(b)

    _, _, _, ref = side_by_side(make_ours, make_ref, steps=steps, after_step=sync)
    return trace, ref
