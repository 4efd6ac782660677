"""Update rules: the stateful *inner* rule on the projected gradient, the state-free *residual* rule on the rest.

An inner rule turns a gradient ``g`` (any shape; the projected (r, D) one, or a full one for plain params) into a
direction ``u`` with the update ``p <- p - lr * u``; its state (moments, a float32 scalar ``step`` as in
``torch.optim``) lives in the param's optimizer state. It can reset its moments, or rotate them into a new basis
(``R = P_new^T P_old``) when the projector refreshes.

A residual rule turns ``Gt - P P^T Gt`` into a direction applied with its own learning rate
(``lr * residual_lr_scale``); only ``fira`` keeps state (one scalar).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..errors import RankwiseError

State = dict[str, Any]


class InnerRule:
    name: ClassVar[str]
    moments: ClassVar[tuple[str, ...]]
    coupled_decay: ClassVar[bool]  # weight decay added to the gradient (Adam, SGD) rather than to the weights (AdamW)

    def init(self, state: State, like: torch.Tensor) -> None:
        state["step"] = torch.tensor(0.0)
        for k in self.moments:
            state[k] = torch.zeros_like(like, memory_format=torch.preserve_format)

    def reset(self, state: State) -> None:
        state["step"].zero_()
        for k in self.moments:
            state[k].zero_()

    def drop(self, state: State) -> None:
        """Free the moments (a block that goes inactive)."""
        for k in ("step", *self.moments):
            state.pop(k, None)

    def rotate(self, state: State, r: torch.Tensor) -> None:
        """Express the moments in a new basis: first moments are linear, ``m <- R m``."""
        for k in self.moments:
            state[k] = r @ state[k]

    def direction(self, g: torch.Tensor, state: State, group: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError


class Adam(InnerRule):
    """Adam (Kingma & Ba 2015) in ``torch.optim``'s arithmetic: u = (m / bc1) / (sqrt(v / bc2) + eps).
    Weight decay is L2 (added to the gradient)."""

    name = "adam"
    moments = ("exp_avg", "exp_avg_sq")
    coupled_decay = True

    def rotate(self, state: State, r: torch.Tensor) -> None:
        """``m <- R m``; the second moment is not linear in the basis, so ``v <- (R * R) v``: the diagonal of
        ``R diag(v) R^T`` (exact when R is a permutation, e.g. ``coordinates``; non-negative always)."""
        state["exp_avg"] = r @ state["exp_avg"]
        state["exp_avg_sq"] = (r * r) @ state["exp_avg_sq"]

    def direction(self, g: torch.Tensor, state: State, group: dict[str, Any]) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"].item()
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
        return (m / (1 - beta1 ** t)).div_(denom)


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay ``p <- p (1 - lr wd)``."""

    name = "adamw"
    coupled_decay = False


class SGDMomentum(InnerRule):
    """SGD with heavy-ball momentum in ``torch.optim.SGD``'s arithmetic (buffer = g at the first step, then
    ``mu buf + g``; Nesterov optional) — FRUGAL's theory case (arXiv 2411.07837, Sec. 5). Momentum is linear, so with
    a full-rank basis and ``rotate`` it is exactly SGD-momentum."""

    name = "sgd"
    moments = ("momentum_buffer",)
    coupled_decay = True

    def direction(self, g: torch.Tensor, state: State, group: dict[str, Any]) -> torch.Tensor:
        mu = group["momentum"]
        buf = state["momentum_buffer"]
        if state["step"].item() == 0:
            buf.copy_(g)
        else:
            buf.mul_(mu).add_(g)
        state["step"] += 1
        return g.add(buf, alpha=mu) if group["nesterov"] else buf


INNER_RULES: dict[str, type[InnerRule]] = {r.name: r for r in (Adam, AdamW, SGDMomentum)}


class ResidualRule:
    name: ClassVar[str]
    needs_subspace: ClassVar[bool] = False  # uses the projected gradient and inner update (not for block selection)
    state_keys: ClassVar[tuple[str, ...]] = ()

    def direction(self, resid: torch.Tensor, g_low: torch.Tensor | None, u_low: torch.Tensor | None,
                  state: State, group: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def column_scale(self, gt: torch.Tensor, g_low: torch.Tensor, u_low: torch.Tensor,
                     state: State) -> torch.Tensor | float | None:
        """For rules linear in the residual, c with direction = (Gt - P P^T Gt) * c (c per column or scalar): the
        optimizer then never forms the residual, it applies ``P (. - g_low c)`` and ``Gt c`` (one matmul fewer).
        None for non-linear rules (``direction`` is used)."""
        return None


class Drop(ResidualRule):
    """GaLore, BAdam, LISA: the residual is discarded (never even computed)."""

    name = "drop"


class SGDResidual(ResidualRule):
    """FRUGAL's state-free SGD on the residual (``inactive_update_rule="sgd"``)."""

    name = "sgd"

    def direction(self, resid, g_low, u_low, state, group):
        return resid

    def column_scale(self, gt, g_low, u_low, state):
        return 1.0


class SignSGDResidual(ResidualRule):
    """FRUGAL's default state-free rule (arXiv 2411.07837, Alg. 1): signSGD on the residual,
    ``p <- p - lr * inactive_lr_scale * sign(G - P P^T G)``."""

    name = "signsgd"

    def direction(self, resid, g_low, u_low, state, group):
        return resid.sign()


class FiraResidual(ResidualRule):
    """Fira (Chen et al. 2024, arXiv 2410.01623, Eq. 7-9; ``optimizer_torch/fira_adamw.py``): the residual scaled
    column-wise by phi_j = ||u_:,j|| / ||(P^T G)_:,j|| — the inner rule's own gain in that column — then the
    norm-growth limiter: if ||S_t|| / ||S_{t-1}|| > gamma, S_t is rescaled so the ratio is gamma (gamma = 1.01).

    Difference from the reference code, on purpose: Fira's code subtracts ``alpha * P P^T G`` (its ``project_back``
    applies the scale), we subtract the exact in-subspace part ``P P^T G`` as the paper's Eq. 7 writes it.
    """

    name = "fira"
    needs_subspace = True
    state_keys = ("residual_norm",)
    gamma = 1.01

    def column_scale(self, gt, g_low, u_low, state):
        """phi / limiter per column. ||S|| comes from column norms without forming S: P has orthonormal columns, so
        ||G_j - P g_j||^2 = ||G_j||^2 - ||g_j||^2 (Pythagoras), and ||S||^2 = sum_j phi_j^2 (||G_j||^2 - ||g_j||^2)."""
        low_sq = g_low.square().sum(0)
        phi = u_low.square().sum(0).sqrt() / (low_sq.sqrt() + 1e-8)  # one factor per column of the (r, D) gradient
        norm = (phi.square() * (gt.square().sum(0) - low_sq).clamp(min=0)).sum().sqrt()
        if "residual_norm" in state:
            limiter = torch.clamp(norm / (state["residual_norm"] + 1e-8), min=self.gamma) / self.gamma
            phi = phi / limiter
            norm = norm / limiter
        state["residual_norm"] = norm.float().reshape(())
        return phi


RESIDUAL_RULES: dict[str, type[ResidualRule]] = {r.name: r for r in (Drop, SGDResidual, SignSGDResidual, FiraResidual)}


def make_inner(name: str) -> InnerRule:
    if name not in INNER_RULES:
        raise RankwiseError(f"unknown inner rule {name!r}; valid inner rules: {', '.join(INNER_RULES)}")
    return INNER_RULES[name]()


def make_residual(name: str) -> ResidualRule:
    if name not in RESIDUAL_RULES:
        raise RankwiseError(f"unknown residual rule {name!r}; valid residual rules: {', '.join(RESIDUAL_RULES)}")
    return RESIDUAL_RULES[name]()
