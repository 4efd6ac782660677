"""Gradient corrections for LoRA factors, as optimizer wrappers: ``LoRAPro(AdamW(...), loras)``.

With ``Delta W = s B A`` and full gradient ``G = dL/dW``, autograd gives ``g_A = s B^T G`` and ``g_B = s G A^T``; a
factor step ``(dA, dB)`` moves ``W`` by ``s (B dA + dB A)`` (first order). Both corrections only need ``g_A, g_B``:

- LoRA-Pro (Wang et al. 2024): replace the gradients by ``g_A' = (B^T B)^+ g_A / s^2`` and
  ``g_B' = (I - P_B) g_B (A A^T)^+ / s^2`` (the solution with ``X = 0``), so the equivalent gradient
  ``s (B g_A' + g_B' A) = P_B G + (I - P_B) G P_A`` is the closest one to ``G`` in Frobenius norm
  (``P_B = B (B^T B)^+ B^T``, ``P_A = A^T (A A^T)^+ A``).
- AltLoRA (alternating projections): even steps move only ``B`` with ``g_B (A A^T)^+ / s^2`` (equivalent gradient
  ``G P_A``; first, since LoRA starts at ``B = 0``), odd steps only ``A`` with ``g_A'`` (equivalent ``P_B G``).

Layers with the same factor shapes are corrected in one batched computation.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch

from ..errors import RankwiseError
from .lora import LoRA


class _Correction(torch.optim.Optimizer):
    """Shares ``param_groups`` and ``state`` with the wrapped optimizer, so schedulers and checkpoints see one."""

    def __init__(self, optimizer: torch.optim.Optimizer, loras: list[LoRA]):
        if not loras or not all(isinstance(m, LoRA) for m in loras):
            raise RankwiseError(f"{type(self).__name__} corrects LoRA factors; pass a non-empty list of LoRA adapters")
        self.optimizer = optimizer
        groups: dict[tuple, list[LoRA]] = defaultdict(list)
        for m in loras:
            groups[(tuple(m.lora_A.shape), tuple(m.lora_B.shape), m.scaling, m.lora_A.device)].append(m)
        self.shape_groups = list(groups.values())
        self.steps = 0
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.state = optimizer.state

    @staticmethod
    def _grads(group: list[LoRA]) -> tuple[torch.Tensor, ...] | None:
        if any(m.lora_A.grad is None or m.lora_B.grad is None for m in group):
            return None
        dtype = torch.promote_types(group[0].lora_A.dtype, torch.float32)  # bf16 factors: solve in fp32
        return tuple(torch.stack(ts).to(dtype) for ts in (
            [m.lora_A.detach() for m in group], [m.lora_B.detach() for m in group],
            [m.lora_A.grad for m in group], [m.lora_B.grad for m in group]))

    def correct(self) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.correct()
        self.optimizer.step()
        self.steps += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {**self.optimizer.state_dict(), "correction_steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.steps = state_dict.pop("correction_steps", 0)
        self.optimizer.load_state_dict(state_dict)
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state


def _write(group: list[LoRA], name: str, grads: torch.Tensor | None) -> None:
    for i, m in enumerate(group):
        p = getattr(m, name)
        p.grad = None if grads is None else grads[i].to(p.dtype)


def projected_grads(a, b, ga, gb, s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``(B^T B)^+ g_A / s^2``, ``(I - P_B) g_B (A A^T)^+ / s^2``, ``g_B (A A^T)^+ / s^2``), batched."""
    bb = torch.linalg.pinv(b.mT @ b)
    aa = torch.linalg.pinv(a @ a.mT)
    ga_new = bb @ ga / s**2
    gb_a = gb @ aa / s**2
    gb_new = gb_a - b @ (bb @ (b.mT @ gb_a))
    return ga_new, gb_new, gb_a


class LoRAPro(_Correction):
    def correct(self) -> None:
        for group in self.shape_groups:
            g = self._grads(group)
            if g is not None:
                ga, gb, _ = projected_grads(*g, group[0].scaling)
                _write(group, "lora_A", ga)
                _write(group, "lora_B", gb)


class AltLoRA(_Correction):
    def correct(self) -> None:
        for group in self.shape_groups:
            g = self._grads(group)
            if g is None:
                continue
            ga, _, gb = projected_grads(*g, group[0].scaling)
            if self.steps % 2 == 0:
                _write(group, "lora_A", None)
                _write(group, "lora_B", gb)
            else:
                _write(group, "lora_A", ga)
                _write(group, "lora_B", None)
