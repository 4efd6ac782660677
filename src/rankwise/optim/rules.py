"""Update rules: the stateful *inner* rule on the projected gradient, the state-free *residual* rule on the rest.

An inner rule turns a gradient ``g`` (any shape; the projected (r, D) one, or a full one for plain params) into a
direction ``u = c * n`` with the update ``p <- p - lr * u``: ``n`` the normalized direction, ``c`` a scalar
step-size factor (``gain``: sqrt(bc2)/bc1 for ``adamw_hf``, 1 for the others). Its state (moments, a float32 scalar
``step`` as in ``torch.optim``) lives in the param's optimizer state; moments may be fp32 for a lower-precision
gradient (``state_bits``), the direction is in the gradient's dtype. It can reset its moments, or rotate them into a
new basis (``R = P_new^T P_old``) when the projector refreshes. ``directions`` is ``direction`` for many params with
``torch._foreach_*`` ops (the batched step); ``apply_`` updates params by their whole gradients (plain params,
selected blocks) and may fuse the step: Adam / AdamW as ``torch.optim.AdamW`` (``addcdiv``, bit for bit), ``adamw_hf``
as galore-torch's and Fira's unprojected params.

A residual rule turns ``Gt - w P P^T Gt`` (w = ``subspace_weight``: 1, Fira's ``scale``, or 0 for APOLLO, which scales
the raw full gradient) into a direction applied with its own learning rate (``lr * residual_lr_scale``), next to the
inner update ``inner_weight * P u`` (``scale``; 0 for APOLLO); only the ``GradientScaling`` rules (fira, fira_exact,
apollo, apollo_tensor) keep state (one scalar, the limiter's previous norm).
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
    decay_after: ClassVar[bool] = False  # decoupled decay of the updated weights (transformers' AdamW), not before
    unsigned: ClassVar[tuple[str, ...]] = ()  # moments that are never negative (an unsigned map when quantized)

    def init(self, state: State, like: torch.Tensor) -> None:
        state["step"] = torch.tensor(0.0)
        for k in self.moments:
            state[k] = torch.zeros_like(like, memory_format=torch.preserve_format)

    def reset(self, state: State) -> None:
        state["step"].zero_()
        for k in self.moments:
            state[k].zero_()

    def drop(self, state: State) -> None:
        """Free the moments (a block that goes inactive), with their quantization scales if stored low-bit."""
        for k in [k for k in state if k == "step" or k.split(".")[0] in self.moments]:
            del state[k]

    def rotate(self, state: State, r: torch.Tensor) -> None:
        """Express the moments in a new basis: first moments are linear, ``m <- R m``."""
        for k in self.moments:
            state[k] = r.to(state[k].dtype) @ state[k]

    def direction(self, g: torch.Tensor, state: State, group: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def directions(self, gs: list[torch.Tensor], states: list[State], group: dict[str, Any]) -> list[torch.Tensor]:
        """``direction`` of many params at once with ``torch._foreach_*`` ops, the same arithmetic elementwise
        (what ``SplitOptimizer``'s batched step calls; rules without it take the per-param path)."""
        raise NotImplementedError

    def apply_(self, params: list[torch.Tensor], gs: list[torch.Tensor], states: list[State], group: dict[str, Any],
               lr: float) -> None:
        """``p <- p - lr * direction(g)`` for whole gradients (plain params, selected blocks), both paths; rules may
        fuse it (Adam: torch's ``addcdiv``). Default: one ``direction`` per param."""
        for p, g, state in zip(params, gs, states):
            p.add_(self.direction(g, state, group), alpha=-lr)

    def gain(self, state: State, group: dict[str, Any]) -> float:
        """The step-size factor c of the last direction, u = c * n (1 unless the rule has one)."""
        return 1.0


def _count(states: list[State]) -> list[float]:
    """``step += 1`` for every state; the new step counts as floats (the states' ``step`` live on the CPU)."""
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1)
    return [s.item() for s in steps]


class Adam(InnerRule):
    """Adam (Kingma & Ba 2015) in ``torch.optim``'s arithmetic: u = (m / bc1) / (sqrt(v / bc2) + eps).
    Weight decay is L2 (added to the gradient)."""

    name = "adam"
    moments = ("exp_avg", "exp_avg_sq")
    unsigned = ("exp_avg_sq",)
    coupled_decay = True

    def rotate(self, state: State, r: torch.Tensor) -> None:
        """``m <- R m``; the second moment is not linear in the basis, so ``v <- (R * R) v``: the diagonal of
        ``R diag(v) R^T`` (exact when R is a permutation, e.g. ``coordinates``; non-negative always)."""
        r = r.to(state["exp_avg"].dtype)
        state["exp_avg"] = r @ state["exp_avg"]
        state["exp_avg_sq"] = (r * r) @ state["exp_avg_sq"]

    def direction(self, g: torch.Tensor, state: State, group: dict[str, Any]) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"].item()
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g.to(m.dtype), 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
        return (m / (1 - beta1 ** t)).div_(denom).to(g.dtype)

    def directions(self, gs, states, group):
        ts, ms, denom = self._moments(gs, states, group)
        u = torch._foreach_div(ms, [1 - group["betas"][0] ** t for t in ts])
        torch._foreach_div_(u, denom)
        return u

    def apply_(self, params, gs, states, group, lr):
        """``torch.optim.AdamW``'s (foreach and for-loop) arithmetic: p <- p - (lr / bc1) * m / denom."""
        ts, ms, denom = self._moments(gs, states, group)
        torch._foreach_addcdiv_(params, ms, denom, [(lr / (1 - group["betas"][0] ** t)) * -1 for t in ts])

    @staticmethod
    def _moments(gs, states, group):
        """Moment updates; (steps, first moments, sqrt(v / bc2) + eps) for many params."""
        beta1, beta2 = group["betas"]
        ts = _count(states)
        ms, vs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** t) for t in ts])
        torch._foreach_add_(denom, group["eps"])
        return ts, ms, denom


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay ``p <- p (1 - lr wd)``."""

    name = "adamw"
    coupled_decay = False


class AdamWHF(Adam):
    """AdamW in the arithmetic of transformers' ``AdamW`` (``optimization.py``), which galore-torch 1.0
    (``galore_torch/adamw.py``) and fira 1.0.2 (``fira/fira_adamw.py``) copy:

        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2,   u = sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
        p <- p - lr u,   then   p <- p - lr wd p   (decay of the *updated* weights)

    The bias correction multiplies the step, so eps is not rescaled by sqrt(bc2) as in ``torch.optim.AdamW``; the
    references' default eps is 1e-6.
    """

    name = "adamw_hf"
    coupled_decay = False
    decay_after = True

    def direction(self, g: torch.Tensor, state: State, group: dict[str, Any]) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        state["step"] += 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        return (m / v.sqrt().add_(group["eps"])).mul_(self.gain(state, group)).to(g.dtype)

    def directions(self, gs, states, group):
        beta1, beta2 = group["betas"]
        ts, n = self._normalized(gs, states, group)
        torch._foreach_mul_(n, [math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t) for t in ts])
        return n

    def apply_(self, params, gs, states, group, lr):
        """galore-torch's / Fira's arithmetic for an unprojected param: p <- p - step_size * (m / denom),
        step_size = lr * sqrt(bc2) / bc1 (one ``add_`` per distinct step count)."""
        beta1, beta2 = group["betas"]
        ts, n = self._normalized(gs, states, group)
        by_step: dict[float, list[int]] = {}
        for i, t in enumerate(ts):
            by_step.setdefault(t, []).append(i)
        for t, idx in by_step.items():
            step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
            torch._foreach_add_([params[i] for i in idx], [n[i] for i in idx], alpha=-step_size)

    @staticmethod
    def _normalized(gs, states, group):
        """Moment updates; (steps, m / (sqrt(v) + eps)) for many params."""
        beta1, beta2 = group["betas"]
        ts = _count(states)
        ms, vs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, gs, alpha=1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, group["eps"])
        return ts, torch._foreach_div(ms, denom)

    def gain(self, state: State, group: dict[str, Any]) -> float:
        beta1, beta2 = group["betas"]
        t = state["step"].item()
        return math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)


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
        return g.add(buf, alpha=mu) if group["nesterov"] else buf.to(g.dtype)

    def directions(self, gs, states, group):
        mu = group["momentum"]
        bufs = [s["momentum_buffer"] for s in states]
        first = [s["step"].item() == 0 for s in states]
        if any(first):
            torch._foreach_copy_([b for b, f in zip(bufs, first) if f], [g for g, f in zip(gs, first) if f])
        if not all(first):
            later = [b for b, f in zip(bufs, first) if not f]
            torch._foreach_mul_(later, mu)
            torch._foreach_add_(later, [g for g, f in zip(gs, first) if not f])
        _count(states)
        return torch._foreach_add(gs, bufs, alpha=mu) if group["nesterov"] else bufs

    def apply_(self, params, gs, states, group, lr):
        torch._foreach_add_(params, self.directions(gs, states, group), alpha=-lr)


INNER_RULES: dict[str, type[InnerRule]] = {r.name: r for r in (Adam, AdamW, AdamWHF, SGDMomentum)}


class ResidualRule:
    name: ClassVar[str]
    needs_subspace: ClassVar[bool] = False  # uses the projected gradient and inner update (not for block selection)
    state_keys: ClassVar[tuple[str, ...]] = ()

    def direction(self, resid: torch.Tensor, g_low: torch.Tensor | None, u_low: torch.Tensor | None,
                  state: State, group: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def column_scale(self, gt: torch.Tensor, g_low: torch.Tensor, u_low: torch.Tensor, state: State,
                     group: dict[str, Any], basis: torch.Tensor | None) -> torch.Tensor | float | None:
        """For rules linear in the residual, c with direction = (Gt - w P P^T Gt) * c (c per column or scalar): the
        optimizer then never forms the residual, it applies ``P (. - w g_low c)`` and ``Gt c`` (one matmul fewer).
        ``basis`` is P (d, r), dense, for rules that ``needs_subspace`` (else None). None for non-linear rules
        (``direction`` is used)."""
        return None

    def column_scales(self, gt: torch.Tensor, g_low: torch.Tensor, u_low: torch.Tensor, states: list[State],
                      group: dict[str, Any], basis: torch.Tensor | None) -> torch.Tensor | float:
        """``column_scale`` of B matrices of one shape at once (``SplitOptimizer``'s batched step): ``gt`` (B, d, D),
        ``g_low`` / ``u_low`` (B, r, D), ``basis`` (B, d, r) or None; c as (B, D), (B,) (a scalar per matrix) or
        one float for all. Only the linear rules the batched step lists (``batched.BATCHED_RESIDUAL``) have it."""
        raise NotImplementedError

    def subspace_weight(self, group: dict[str, Any]) -> float:
        """w: how much of the in-subspace part ``P P^T Gt`` the residual removes (1: the exact complement)."""
        return 1.0

    def inner_weight(self, group: dict[str, Any]) -> float:
        """The multiplier of the back-projected inner update ``P u`` (``scale``; 0 when the inner rule only feeds the
        residual rule, APOLLO)."""
        return group["scale"]


class Drop(ResidualRule):
    """GaLore, BAdam, LISA: the residual is discarded (never even computed)."""

    name = "drop"


class SGDResidual(ResidualRule):
    """FRUGAL's state-free SGD on the residual (``inactive_update_rule="sgd"``)."""

    name = "sgd"

    def direction(self, resid, g_low, u_low, state, group):
        return resid

    def column_scale(self, gt, g_low, u_low, state, group, basis):
        return 1.0

    def column_scales(self, gt, g_low, u_low, states, group, basis):
        return 1.0


class SignSGDResidual(ResidualRule):
    """FRUGAL's default state-free rule (arXiv 2411.07837, Alg. 1): signSGD on the residual,
    ``p <- p - lr * inactive_lr_scale * sign(G - P P^T G)``."""

    name = "signsgd"

    def direction(self, resid, g_low, u_low, state, group):
        return resid.sign()


class GradientScaling(ResidualRule):
    """The part Fira and APOLLO share: a scaling of the (residual) gradient from the low-rank inner rule's ratio,
    with Fira's norm-growth limiter. With the inner direction u = c * n (c: the inner rule's ``gain``,
    sqrt(bc2)/bc1 for ``adamw_hf``) and g = P^T Gt:

        phi_j = ||n_:,j|| / (||g_:,j|| + 1e-8)  per column j   (``tensorwise``: phi = ||n|| / (||g|| + 1e-8))
        S = (Gt - w P g) * phi                                 (w = ``subspace_weight``)
        if ||S|| / ||S_prev|| > gamma:  S <- S * gamma ||S_prev|| / ||S||        (limiter, gamma = 1.01)
        direction = c * alpha * S                              (alpha = ``multiplier``)

    phi and the limiter see the direction before the step-size factor, and ``residual_norm`` keeps ||S|| of that
    uncorrected S. The update is linear in Gt, so the optimizer applies it without forming S (``column_scale``).
    """

    needs_subspace = True
    state_keys = ("residual_norm",)
    gamma = 1.01
    tensorwise: ClassVar[bool] = False

    def multiplier(self, group: dict[str, Any]) -> float:
        return 1.0

    def column_scale(self, gt, g_low, u_low, state, group, basis):
        """``column_scales`` of one matrix: a batch of one, so both steps run the same ops."""
        c = self.column_scales(gt[None], g_low[None], u_low[None], [state], group,
                               None if basis is None else basis[None])
        return c[0]

    def column_scales(self, gt, g_low, u_low, states, group, basis):
        """phi / limiter per column (or per matrix), times c * alpha, of B matrices of one shape: (B, D) ((B,) when
        ``tensorwise``); sets each state's ``residual_norm``, and limits when the states have one (all or none).
        ||S|| comes from column norms without forming S (g_j = P^T G_j): ||G_j - w P g_j||^2 = ||G_j||^2 -
        2w ||g_j||^2 + w^2 g_j^T (P^T P) g_j, exact even where P is orthonormal only to the precision of its SVD (an
        fp32 basis for fp64 weights).

        Each op treats a matrix's slice as it would the matrix alone (the reductions run along the slice, bit for bit
        on the CPU), and the per-matrix scalars (the inner rule's gain, whose step counts may differ, and the
        limiter) enter through foreach ops over the slices: each is the one-matrix op with a Python float or a 0-d
        tensor. A (B, 1) tensor of them would not be: it rounds the gain to the gradient's dtype, and its dims
        promote a bf16 phi to the limiter's fp32."""
        inner = make_inner(group["inner"])
        gains = [inner.gain(s, group) for s in states]
        w = self.subspace_weight(group)
        low_sq, u_sq = g_low.square().sum(1), u_low.square().sum(1)  # (B, D): squared column norms
        if self.tensorwise:
            phi = _per_matrix(torch._foreach_div, u_sq.sum(1).sqrt(), gains) / (low_sq.sum(1).sqrt() + 1e-8)
        else:
            phi = _per_matrix(torch._foreach_div, u_sq.sqrt(), gains) / (low_sq.sqrt() + 1e-8)
        resid_sq = gt.square().sum(1)
        if w:
            back_sq = torch.bmm(torch.bmm(basis.transpose(1, 2), basis), g_low).mul_(g_low).sum(1)  # ||P g_j||^2
            resid_sq = (resid_sq - 2 * w * low_sq + w * w * back_sq).clamp(min=0)
        norm = (phi.square().view(len(states), -1) * resid_sq).sum(1).sqrt()  # (B,)
        if "residual_norm" in states[0]:
            prev = torch.stack([s["residual_norm"] for s in states])
            limiter = torch.clamp(norm / (prev + 1e-8), min=self.gamma) / self.gamma
            phi = _per_matrix(torch._foreach_div, phi, list(limiter.unbind(0)))
            norm = norm / limiter
        for state, n in zip(states, norm.to(torch.promote_types(norm.dtype, torch.float32)).unbind(0)):
            state["residual_norm"] = n.clone()  # >= fp32; a tensor of its own, not a view of the batch
        return _per_matrix(torch._foreach_mul, phi, [gain * self.multiplier(group) for gain in gains])


def _per_matrix(op: Any, x: torch.Tensor, scalars: list) -> torch.Tensor:
    """The foreach ``op`` of each slice ``x[i]`` with ``scalars[i]`` (a number or a 0-d tensor), restacked."""
    return torch.stack(op(list(x.unbind(0)), scalars))


class FiraResidual(GradientScaling):
    """Fira (Chen et al. 2024, arXiv 2410.01623, Eq. 7-9) as fira 1.0.2's ``fira/fira_adamw.py`` computes it: the
    ``GradientScaling`` of the residual ``G - alpha P P^T G`` (w = alpha = ``scale``), per column, next to GaLore's
    ``alpha P u``. The code's residual subtracts ``alpha P P^T G`` (its ``project_back`` applies alpha);
    ``fira_exact`` subtracts ``P P^T G``, the orthogonal complement the paper's Eq. 7 writes.
    """

    name = "fira"

    def subspace_weight(self, group):
        return group["scale"]


class FiraExactResidual(FiraResidual):
    """``fira`` with the exact orthogonal complement ``G - P P^T G`` as the residual (the paper's Eq. 7), whatever
    ``scale`` is; a rankwise option, not Fira's code."""

    name = "fira_exact"

    def subspace_weight(self, group):
        return 1.0


class APOLLOScaling(GradientScaling):
    """APOLLO (Zhu et al. 2024, arXiv 2412.05270, Alg. 1) as apollo-torch's ``apollo.py`` computes it: the
    ``GradientScaling`` of the *raw full* gradient (w = 0), channel-wise, and nothing else — the low-rank inner
    update only feeds the scaling factors (``inner_weight`` 0):

        W <- W - lr * c * sqrt(scale) * limiter(G * phi)       (c = sqrt(bc2)/bc1 with ``adamw_hf``)

    ``scale`` is apollo-torch's ``scale`` (1 for APOLLO, 128 for APOLLO-Mini; the paper's alpha = sqrt(scale)).
    apollo-torch's ``scale_front`` (sqrt(scale) applied before the limiter, its 60M/130M APOLLO-Mini scripts) only
    moves the limiter's 1e-8 and multiplies its stored norm by sqrt(scale): the limiter here sees G * phi.
    """

    name = "apollo"

    def subspace_weight(self, group):
        return 0.0

    def inner_weight(self, group):
        return 0.0

    def multiplier(self, group):
        return math.sqrt(group["scale"])


class APOLLOTensorScaling(APOLLOScaling):
    """APOLLO-Mini's tensor-wise scaling (``scale_type="tensor"``): one phi = ||n|| / (||P^T G|| + 1e-8) for the
    whole matrix, with rank 1 in the paper."""

    name = "apollo_tensor"
    tensorwise = True


RESIDUAL_RULES: dict[str, type[ResidualRule]] = {r.name: r for r in (Drop, SGDResidual, SignSGDResidual, FiraResidual,
                                                                   FiraExactResidual, APOLLOScaling,
                                                                   APOLLOTensorScaling)}


def make_inner(name: str) -> InnerRule:
    if name not in INNER_RULES:
        raise RankwiseError(f"unknown inner rule {name!r}; valid inner rules: {', '.join(INNER_RULES)}")
    return INNER_RULES[name]()


def make_residual(name: str) -> ResidualRule:
    if name not in RESIDUAL_RULES:
        raise RankwiseError(f"unknown residual rule {name!r}; valid residual rules: {', '.join(RESIDUAL_RULES)}")
    return RESIDUAL_RULES[name]()
