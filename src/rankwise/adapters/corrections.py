"""Gradient-corrected optimizers for LoRA factors: LoRA-Pro, its memory-light variant, and AltLoRA.

With ``Delta W = s B A`` and full gradient ``G = dL/dW``, autograd gives ``g_A = s B^T G`` and ``g_B = s G A^T``; a
factor step ``(dA, dB)`` moves ``W`` by ``s (B dA + dB A)`` (first order). Notation: ``P_B = B (B^T B)^-1 B^T``.

- ``LoRAPro`` (Wang et al. 2024, Algorithm 1; reference: mrflogs/LoRA-Pro, the ``lorapro_full_adjustment`` step in
  ``DeepSpeed-0.15.1/deepspeed/runtime/zero/stage_1_and_2.py``): each step forms the equivalent gradient
  ``g~ = s (B g_A' + g_B' A)`` from the ``X = 0`` adjusted gradients, keeps Adam moments of that ``m x n`` matrix,
  turns the Adam direction ``D`` back into factor gradients ``s B^T D``, ``s D A^T``, adjusts them with the optimal
  ``X`` (Sylvester equation ``B^T B X + X A A^T = -(1/s) (B^T B)^-1 B^T D A^T``) and takes an SGD step on ``A`` and
  ``B``. State: two ``m x n`` moments per layer (full fine-tuning's).
- ``LoRAProLite``: the memory-light variant, the ``X = 0`` adjusted gradients fed to a wrapped optimizer (AdamW on
  the factors): ``g_A' = (B^T B)^+ g_A / s^2``, ``g_B' = (I - P_B) g_B (A A^T)^+ / s^2``.
- ``AltLoRA`` (Yu et al. 2025, Algorithm 1; reference: LucasXinYu/AltLoRA, class ``altlora`` in
  ``optimizer_new.py`` and the A/B switching in ``logtrainer.py``): ``A`` moves along the bias-corrected EMA of
  ``(B^T B + reg)^-1 g_A``, whose momentum is first transported into the current basis by
  ``(B^T B + reg)^-1 B^T B_old`` (``B_old``: ``B`` at ``A``'s previous update), and symmetrically for ``B``; no
  second moment. Steps ``1 .. k-1`` update both factors (``A`` first), then blocks of ``k`` steps alternate ``A``
  only, ``B`` only, ... (``k = alternate_every``, 10 in the reference).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch

from ..errors import RankwiseError
from .lora import LoRA


def _check_loras(name: str, loras: list[LoRA]) -> None:
    if not loras or not all(isinstance(m, LoRA) for m in loras):
        raise RankwiseError(f"{name} corrects LoRA factors; pass a non-empty list of LoRA adapters")


class _Correction(torch.optim.Optimizer):
    """Shares ``param_groups`` and ``state`` with the wrapped optimizer, so schedulers and checkpoints see one."""

    def __init__(self, optimizer: torch.optim.Optimizer, loras: list[LoRA]):
        _check_loras(type(self).__name__, loras)
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


def projected_grads(a, b, ga, gb, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(``(B^T B)^+ g_A / s^2``, ``(I - P_B) g_B (A A^T)^+ / s^2``), batched: LoRA-Pro's adjustment with ``X = 0``."""
    bb = torch.linalg.pinv(b.mT @ b)
    aa = torch.linalg.pinv(a @ a.mT)
    ga_new = bb @ ga / s**2
    gb_a = gb @ aa / s**2
    return ga_new, gb_a - b @ (bb @ (b.mT @ gb_a))


class LoRAProLite(_Correction):
    """LoRA-Pro's ``X = 0`` adjusted gradients, stepped by the wrapped optimizer (no ``m x n`` state).

    Not the paper's algorithm: the wrapped AdamW normalizes each factor's adjusted gradient separately, so the
    update is no longer the Adam step of the equivalent gradient.
    """

    def correct(self) -> None:
        for group in self.shape_groups:
            g = self._grads(group)
            if g is not None:
                ga, gb = projected_grads(*g, group[0].scaling)
                _write(group, "lora_A", ga)
                _write(group, "lora_B", gb)


class _FactorOptimizer(torch.optim.Optimizer):
    """An optimizer over the factors of ``loras`` only: every trainable parameter in ``params`` must be one."""

    def __init__(self, params: Iterable[Any], loras: list[LoRA], defaults: dict[str, Any]):
        _check_loras(type(self).__name__, loras)
        super().__init__(params, defaults)
        owned = {id(p) for m in loras for p in (m.lora_A, m.lora_B)}
        self.group_of: dict[int, dict[str, Any]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in owned:
                    raise RankwiseError(f"{type(self).__name__} steps LoRA factors only, but got a parameter of "
                                        f"shape {list(p.shape)} that is neither lora_A nor lora_B of the given "
                                        "adapters; train only the adapter (adapters.apply freezes the rest)")
                self.group_of[id(p)] = group
        missing = [m for m in loras if id(m.lora_A) not in self.group_of or id(m.lora_B) not in self.group_of]
        if missing:
            raise RankwiseError(f"{type(self).__name__}: {len(missing)} of the given LoRA adapters have factors "
                                "outside the optimizer's parameters; pass all of lora_A and lora_B")
        self.loras = loras

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """One update of every LoRA layer (``_step_layer``), in the order of ``loras``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for m in self.loras:
            self._step_layer(m)
        return loss

    def _step_layer(self, m: LoRA) -> None:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but the state keeps its saved dtypes: torch would cast the fp32 moments (and counters) of
        bf16 factors to bf16."""
        super().load_state_dict(state_dict)
        params = {i: p for saved, group in zip(state_dict["param_groups"], self.param_groups)
                  for i, p in zip(saved["params"], group["params"])}
        for i, saved in state_dict["state"].items():
            p = params[i]
            for key, value in saved.items():
                if torch.is_tensor(value) and key != "step":
                    self.state[p][key] = value.to(device=p.device, copy=True)


def _sylvester(p: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``X`` with ``P X + X Q = C`` for symmetric PSD ``P, Q`` (not both singular on a pair of eigenvectors):
    ``P = U diag(l) U^T``, ``Q = V diag(m) V^T``, ``X = U [(U^T C V) / (l_i + m_j)] V^T``."""
    lp, u = torch.linalg.eigh(p)
    lq, v = torch.linalg.eigh(q)
    return u @ ((u.mT @ c @ v) / (lp[:, None] + lq[None, :])) @ v.mT


class LoRAPro(_FactorOptimizer):
    """LoRA-Pro with Adam (the paper's Algorithm 1, as in the reference step function); see the module docstring.

    Per LoRA layer (``A``: r x n, ``B``: m x r, ``s`` its scaling), at step ``t``:

        g~  = s (B g_A' + g_B' A),   g_A' = (B^T B + d I)^-1 g_A / s^2,
                                     g_B' = (I - B (B^T B + d I)^-1 B^T) g_B (A A^T + d I)^-1 / s^2
        M <- b1 M + (1 - b1) g~,  V <- b2 V + (1 - b2) g~^2
        D  = (M / (1 - b1^t')) / (sqrt(V) / sqrt(1 - b2^t') + eps),   t' = t + bias_step_offset
        X  solves  B^T B X + X A A^T = -(B^T B + d I)^-1 B^T D A^T / s
        A <- A - lr ((B^T B + d I)^-1 B^T D / s + X A + wd A)
        B <- B - lr ((I - B (B^T B + d I)^-1 B^T) D A^T (A A^T + d I)^-1 / s - B X + wd B)

    ``delta`` (``d``) is the reference's 1e-8 ridge on the inverses. ``bias_step_offset=1`` reproduces the reference
    code, which increments its step counter before the adjustment and so bias-corrects step ``t`` as ``t + 1``; the
    default 0 is the paper's (and Adam's) correction. The ``r x r`` solves run in float64.
    """

    def __init__(self, params: Iterable[Any], loras: list[LoRA], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 delta: float = 1e-8, bias_step_offset: int = 0):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise RankwiseError(f"LoRA-Pro betas must be in [0, 1), got {betas}")
        if delta < 0 or eps < 0:
            raise RankwiseError(f"LoRA-Pro delta and eps must be >= 0, got delta={delta}, eps={eps}")
        if bias_step_offset not in (0, 1):
            raise RankwiseError(f"bias_step_offset must be 0 (paper) or 1 (reference code), got {bias_step_offset}")
        super().__init__(params, loras, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.delta, self.bias_step_offset = delta, bias_step_offset

    def _step_layer(self, m: LoRA) -> None:
        if m.lora_A.grad is None or m.lora_B.grad is None:
            return
        A, B, s = m.lora_A, m.lora_B, m.scaling
        group = self.group_of[id(A)]
        beta1, beta2 = group["betas"]
        dtype = torch.promote_types(A.dtype, torch.float32)  # m x n work; everything of size r x (m or n): float64
        f64 = torch.float64
        a, b = A.detach().to(f64), B.detach().to(f64)
        eye = torch.eye(m.r, dtype=f64, device=a.device)
        aa, bb = a @ a.T, b.T @ b
        aa_inv, bb_inv = torch.linalg.pinv(aa + self.delta * eye), torch.linalg.pinv(bb + self.delta * eye)

        def adjusted(ga: torch.Tensor, gb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            gb_a = gb @ aa_inv
            return bb_inv @ ga / s**2, (gb_a - b @ (bb_inv @ (b.T @ gb_a))) / s**2

        ga0, gb0 = adjusted(A.grad.to(f64), B.grad.to(f64))
        a32, b32 = a.to(dtype), b.to(dtype)
        g_eq = s * (b32 @ ga0.to(dtype) + gb0.to(dtype) @ a32)
        state = self.state[A]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(g_eq)
            state["exp_avg_sq"] = torch.zeros_like(g_eq)
        state["step"] += 1
        t = state["step"].item() + self.bias_step_offset
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g_eq, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g_eq, g_eq, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"])
        d = (exp_avg / (1 - beta1**t)) / denom

        ga1, gb1 = s * (b32.T @ d).to(f64), s * (d @ a32.T).to(f64)  # the factor gradients of the Adam direction
        x = _sylvester(bb, aa, -(bb_inv @ ga1 @ a.T) / s**2)
        da, db = adjusted(ga1, gb1)
        for p, u, w in ((A, da + x @ a, a), (B, db - b @ x, b)):
            g = self.group_of[id(p)]
            if g["weight_decay"]:
                u = u + g["weight_decay"] * w
            p.copy_((w - g["lr"] * u).to(p.dtype))


class AltLoRA(_FactorOptimizer):
    """AltLoRA (Algorithm 1 of the paper, as the reference ``altlora`` optimizer and trainer run it).

    For ``A`` (when it is updated; ``t_A`` counts its own updates, ``B_old`` is ``B`` at its previous one, zeros at
    first):

        Pinv = (B^T B + reg I)^-1
        M_A <- b1 (Pinv B^T B_old) M_A + (1 - b1) Pinv g_A
        A   <- (A - lr / (1 - b1^t_A) M_A) (1 - lr wd)

    then for ``B`` (with the already updated ``A`` in a joint step): ``Qinv = (A A^T + reg I)^-1``,
    ``M_B <- b1 M_B (A_old A^T Qinv) + (1 - b1) g_B Qinv``, ``B <- (B - lr / (1 - b1^t_B) M_B) (1 - lr wd)``.
    Schedule over the optimizer steps ``t = 1, 2, ...`` with ``k = alternate_every``: ``t < k`` both, then ``A`` on
    ``[k, 2k)``, ``B`` on ``[2k, 3k)``, ... ``alternate_every=0`` always updates both (the reference script's
    ``lora_alt = False``). The gradient of the factor that rests is ignored.
    """

    def __init__(self, params: Iterable[Any], loras: list[LoRA], lr: float = 1e-3, beta: float = 0.9,
                 weight_decay: float = 0.0, reg: float = 1e-5, alternate_every: int = 10):
        if not 0.0 <= beta < 1.0:
            raise RankwiseError(f"AltLoRA beta must be in [0, 1), got {beta}")
        if reg < 0:
            raise RankwiseError(f"AltLoRA reg must be >= 0, got {reg}")
        if not isinstance(alternate_every, int) or alternate_every < 0:
            raise RankwiseError(f"alternate_every must be an integer >= 0 (0 = always both), got {alternate_every}")
        super().__init__(params, loras, dict(lr=lr, beta=beta, weight_decay=weight_decay))
        self.reg, self.alternate_every = reg, alternate_every

    def phase(self, t: int) -> tuple[bool, bool]:
        """(update A, update B) at optimizer step ``t`` (1-based)."""
        k = self.alternate_every
        if not k or t < k:
            return True, True
        return (True, False) if (t // k) % 2 else (False, True)

    def _step_layer(self, m: LoRA) -> None:
        sched = self.state[m.lora_A].setdefault("schedule_step", torch.zeros((), dtype=torch.float32))
        sched += 1
        do_a, do_b = self.phase(int(sched.item()))
        if do_a and m.lora_A.grad is not None:
            self._update(m, m.lora_A, m.lora_B, left=True)
        if do_b and m.lora_B.grad is not None:
            self._update(m, m.lora_B, m.lora_A, left=False)

    def _update(self, m: LoRA, p: torch.nn.Parameter, other: torch.nn.Parameter, left: bool) -> None:
        group = self.group_of[id(p)]
        dtype = torch.promote_types(p.dtype, torch.float32)
        o = other.detach().to(dtype)
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
            state["other_old"] = torch.zeros(other.shape, dtype=dtype, device=p.device)
        state["step"] += 1
        eye = torch.eye(m.r, dtype=torch.float64, device=p.device)
        gram = (o.T @ o) if left else (o @ o.T)
        precon = torch.linalg.inv(gram.double() + self.reg * eye).to(dtype)
        g, mom, old = p.grad.to(dtype), state["exp_avg"], state["other_old"]
        if left:  # A: M <- b1 (Pinv B^T B_old) M + (1 - b1) Pinv g_A
            mom.copy_(group["beta"] * (precon @ (o.T @ old)) @ mom + (1 - group["beta"]) * (precon @ g))
        else:     # B: M <- b1 M (A_old A^T Qinv) + (1 - b1) g_B Qinv
            mom.copy_(group["beta"] * mom @ ((old @ o.T) @ precon) + (1 - group["beta"]) * (g @ precon))
        new = p.detach().to(dtype) - group["lr"] / (1 - group["beta"] ** state["step"].item()) * mom
        if group["weight_decay"]:
            new.mul_(1 - group["lr"] * group["weight_decay"])
        p.copy_(new.to(p.dtype))
        old.copy_(o)
