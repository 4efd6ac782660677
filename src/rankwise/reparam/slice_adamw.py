"""AdamW with one step counter per row or column of a matrix, so that a slice's state can restart on its own.

SwitchLoRA resets the moments *and* the step of the rank vectors it switches (reference: asfsdsf/SwitchLoRA,
``switchlora/optimizer.py``, ``StepAdamW``): the restarted slice then gets Adam's bias correction
``1 - beta^t`` of its own age ``t``, not of the whole tensor's. A group with ``slice_dim`` 0 keeps a ``(rows, 1)``
float32 step, ``slice_dim`` 1 a ``(1, cols)`` one, ``slice_dim`` None the usual scalar; otherwise the update is
torch's AdamW (decoupled decay ``p *= 1 - lr wd``, then ``p -= lr m_hat / (sqrt(v_hat) + eps)``), batched with
``torch._foreach_*`` over each group.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch


class SliceAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable[dict[str, Any]], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "slice_dim": None})

    @staticmethod
    def _step_shape(p: torch.Tensor, dim: int | None) -> tuple[int, ...]:
        if dim is None:
            return ()
        return (p.shape[0], 1) if dim == 0 else (1, p.shape[1])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch keeps a loaded ``step`` where the checkpoint put it (the CPU); the slice steps live with their
        parameters (a switch masks them in place before the update)."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            if "step" in state and state["step"].device != p.device:
                state["step"] = state["step"].to(p.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(self._step_shape(p, group["slice_dim"]), dtype=torch.float32,
                                                device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                states.append(state)
            grads = [p.grad for p in params]
            steps = [s["step"] for s in states]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            torch._foreach_add_(steps, 1.0)
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            bc1 = torch._foreach_pow(beta1, steps)  # -> lr / (1 - beta1^t), per slice
            torch._foreach_neg_(bc1)
            torch._foreach_add_(bc1, 1.0)
            torch._foreach_reciprocal_(bc1)
            torch._foreach_mul_(bc1, lr)
            bc2 = torch._foreach_pow(beta2, steps)  # -> sqrt(1 - beta2^t)
            torch._foreach_neg_(bc2)
            torch._foreach_add_(bc2, 1.0)
            torch._foreach_sqrt_(bc2)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, bc2)
            torch._foreach_add_(denom, eps)
            update = torch._foreach_mul(exp_avgs, bc1)
            torch._foreach_div_(update, denom)
            torch._foreach_sub_(params, [u.to(p.dtype) for u, p in zip(update, params)])
        return loss
