"""``SplitOptimizer``'s batched step: the per-parameter update (``SplitOptimizer._update``) of many parameters at once.

Same arithmetic, op for op, as the per-param path, which stays both the reference and the fallback:

- plain params and block-selector params (selected: the inner rule; inactive: the residual rule on the whole
  gradient): the rules' ``torch._foreach_*`` forms (``InnerRule.directions``), across shapes; on the CPU, params
  larger than ``CPU_FOREACH_NUMEL`` in tiles of that many elements (``_tiles``: views, elementwise the same ops), and
  the weight decay per foreach list (``_decayed``), so that each list's data stays in cache across the rule's ops;
- projected matrices of one shape (in their own orientation, so each slice of a ``torch.bmm`` has the strides, and
  on the CPU the BLAS call, of the per-param product; ``Gaussian.handles`` stacks APOLLO's bases in that layout too)
  and rank: P^T Gt and P u as ``bmm`` on stacked gradients and bases, the inner rule on the (r, D) slices with
  foreach ops (on the CPU with the residual dropped, GaLore, each slice's own products instead: a CPU ``bmm`` is one
  gemm per slice, so stacking the gradients only added a copy). Refreshes (one SVD per matrix, as the references
  take it, so the bases are theirs to the sign) and moment init / reset / rotation stay per param: they happen once
  per ``update_gap``.
- residual rules on the stack: signSGD of Gt - P P^T Gt; the linear ones (sgd, and the ``GradientScaling`` rules
  fira, fira_exact, apollo, apollo_tensor) as P (a u - rls w g c) by ``bmm`` (when a or w is nonzero; APOLLO: neither)
  plus Gt * c by a foreach ``addcmul_``, c from ``ResidualRule.column_scales`` on the stack: column norms as
  reductions along each slice, the limiter's previous norms gathered from and its new ones put back into each
  state, the per-matrix gain (step counts may differ) and limiter applied by foreach ops over the slices (each the
  per-matrix op with a Python float or 0-d tensor); the per-param ``column_scale`` is a batch of one of it.

Bit-exact on the CPU in fp32 (``tests/optim/test_batched.py``, single-threaded) and fp64. Not in bf16: torch's
in-place CPU ``_foreach_mul_`` by a scalar rounds the scalar to bf16 first, unlike ``mul_`` (the inner rules' foreach
forms; ``column_scales`` uses out-of-place foreach ops, exact there). On several threads, a full sum of more than
32768 elements (the tensor-wise or limiter norm of a matrix that wide) is split across threads for one matrix but not
for a stack. The state stays per param, exactly as the per-param path keeps it (``state_dict``
unchanged). Stacks hold at most ``BATCH_NUMEL`` elements, which bounds the transient memory of the batched step (a
matrix larger than that is a batch of one); foreach lists of CPU tensors ``CPU_FOREACH_NUMEL``, so that each list's
data stays in cache. Everything else takes the per-param path: inner rules, residual rules and projectors whose exact
type is not in the ``BATCHED_*`` tables (a subclass or a new rule opts in by being added there, once it has the
batched forms), ``coordinates`` and coordinate subsets, layer-wise hooks, ``side="shard"``, ``state_bits``
(quantized moments), params, gradients or states that are not plain dense tensors (DTensor), and states with keys
this module does not know.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .blocks import BLOCK_SELECTORS
from .projectors import (PROJECTORS, SVD, Gaussian, Projector, RandomGaussian, RandomizedSVD, canonical,
                         make_projector)
from .rules import (Adam, AdamW, AdamWHF, APOLLOScaling, APOLLOTensorScaling, Drop, FiraExactResidual, FiraResidual,
                    InnerRule, ResidualRule, SGDMomentum, SGDResidual, SignSGDResidual, State, make_inner,
                    make_residual)

if TYPE_CHECKING:
    from .optimizer import SplitOptimizer

BATCH_NUMEL = 1 << 24  # elements per stacked gradient (64 MiB in fp32)
# elements per foreach list (and per tile of a larger param) on the CPU, where a foreach op is a loop of per-tensor
# kernels: a list that fits in cache keeps its data there across the rule's ops (measured on the tiny preset: 1.5x
# slower with one list of everything; adamw_hf on its 8192 x 256 embedding and head: 25 ms untiled, 10 / 8.5 / 7.4 ms
# in tiles of 2^16 / 2^17 / 2^18, torch's AdamW(foreach) 16 ms, one thread; 2^16-2^18 alike within noise in the step)
CPU_FOREACH_NUMEL = 1 << 17
BATCHED_INNER = (Adam, AdamW, AdamWHF, SGDMomentum)
BATCHED_RESIDUAL = (Drop, SGDResidual, SignSGDResidual, FiraResidual, FiraExactResidual, APOLLOScaling,
                    APOLLOTensorScaling)
BATCHED_PROJECTORS = (SVD, RandomizedSVD, RandomGaussian, Gaussian)
# the residual rule of a whole gradient (an inactive block): sign(G), G
WHOLE_RESIDUAL = {SignSGDResidual: torch._foreach_sign, SGDResidual: list}


def _plain(t: Any) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)


def _runs(sizes: list[int], numel: int) -> list[slice]:
    """Consecutive runs of items of ``sizes`` elements with at most ``numel`` elements each (a larger item alone)."""
    out: list[slice] = []
    start, n = 0, 0
    for i, size in enumerate(sizes):
        if i > start and n + size > numel:
            out.append(slice(start, i))
            start, n = i, 0
        n += size
    return [*out, slice(start, len(sizes))] if sizes else out


def _chunks(ps: list[torch.Tensor], numel: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of ``ps`` with at most ``numel`` elements each (a larger tensor alone)."""
    return [ps[r] for r in _runs([p.numel() for p in ps], numel)]


def _foreach_numel(ps: list[torch.Tensor]) -> int:
    return CPU_FOREACH_NUMEL if ps and ps[0].device.type == "cpu" else BATCH_NUMEL


def _tiles(inner: InnerRule, ps: list[torch.Tensor], gs: list[torch.Tensor], states: list[State]
           ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[State], list[State]]:
    """On the CPU, every (contiguous) param larger than ``CPU_FOREACH_NUMEL`` cut into tiles of that many elements:
    views of the param, its gradient and its moments, each tile with a copy of the step count. An elementwise rule
    updates a tile as it would the whole tensor, bit for bit, but the tile stays in cache across the rule's ops (a
    whole embedding streams from memory once per op: measured 2-3x slower for AdamW on the tiny preset's 8192 x 256
    embedding and head). Returns the tiles' params, gradients, states, and the states whose step the caller counts
    (once) when all their tiles are done."""
    n = CPU_FOREACH_NUMEL
    if not ps or ps[0].device.type != "cpu":
        return ps, gs, states, []
    tp: list[torch.Tensor] = []
    tg: list[torch.Tensor] = []
    ts: list[State] = []
    tiled: list[State] = []
    for p, g, state in zip(ps, gs, states):
        moments = {k: state[k] for k in inner.moments}
        if p.numel() <= n or not all(t.is_contiguous() for t in (p, g, *moments.values())):
            tp.append(p)
            tg.append(g)
            ts.append(state)
            continue
        views = p.view(-1).split(n)
        tp += views
        tg += g.view(-1).split(n)
        cut = {k: m.view(-1).split(n) for k, m in moments.items()}
        ts += [{"step": state["step"].clone(), **{k: c[i] for k, c in cut.items()}} for i in range(len(views))]
        tiled.append(state)
    return tp, tg, ts, tiled


def _decayed(inner: InnerRule, group: dict[str, Any], ps: list[torch.Tensor], gs: list[torch.Tensor],
             update: Callable[[list[torch.Tensor], list[torch.Tensor]], None]) -> None:
    """``update(ps, gs)`` with the group's weight decay wd, as the per-param step applies it: added to the gradients
    (``coupled_decay``: Adam, SGD), or ``p <- p (1 - lr wd)`` before the update (AdamW) or after it (``adamw_hf``).
    Called per foreach list, so that a tile is decayed while it is in cache."""
    lr, wd = group["lr"], group["weight_decay"]
    if wd and inner.coupled_decay:
        gs = torch._foreach_add(gs, ps, alpha=wd)
    elif wd and not inner.decay_after:
        torch._foreach_mul_(ps, 1 - lr * wd)
    update(ps, gs)
    if wd and inner.decay_after:
        torch._foreach_add_(ps, ps, alpha=-lr * wd)


def batched_step(opt: SplitOptimizer, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Update the ``params`` of ``group`` (each with a gradient) that the batched path covers; return the others,
    untouched, for the per-param path."""
    inner, residual = make_inner(group["inner"]), make_residual(group["residual"])
    if (type(inner) not in BATCHED_INNER or type(residual) not in BATCHED_RESIDUAL or group.get("state_bits")
            or group.get("side", "auto") != "auto"):  # side="shard" (FSDP2's local projection): the per-param path
        return params
    proj = PROJECTORS.get(group["projector"])
    known = {"updates", "step", *inner.moments, "basis", "seed", "right", *residual.state_keys}
    rest, plain, active, inactive = [], [], [], []
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        g, state = p.grad, opt.state[p]
        if not (_plain(p) and _plain(g) and g.layout == torch.strided and not g.is_complex()
                and known.issuperset(state) and all(_plain(v) for v in state.values() if torch.is_tensor(v))):
            rest.append(p)
            continue
        t = state.get("updates", 0)
        if not opt._projected(p, group):
            plain.append(p)
        elif group["projector"] in BLOCK_SELECTORS:
            if opt._frozen(p, group, state, t):  # untouched, not even decayed
                state["updates"] = t + 1
                continue
            period, offset = opt._period(group, t)
            if opt._block[p] in opt._active(group, period):
                if "step" not in state or (offset == 0 and group["moments"] == "reset"):
                    inner.init(state, g)
                active.append(p)
            else:
                if group["moments"] == "reset":
                    inner.drop(state)
                inactive.append(p)
        elif proj in BATCHED_PROJECTORS:
            # one bucket: one limiter case (all states with a previous norm, or none) and one gaussian side
            key = (tuple(p.shape), opt._rank(p, group), p.dtype, p.device, "residual_norm" in state,
                   state.get("right"))
            buckets.setdefault(key, []).append(p)
        else:
            rest.append(p)
    done = plain + active + inactive + [p for ps in buckets.values() for p in ps]
    if not done:
        return rest
    lr = group["lr"]
    for ps, step_lr in ((plain, lr), (active, lr * group["scale"])):
        states = [opt.state[p] for p in ps]
        for p, s in zip(ps, states):
            if "step" not in s:
                inner.init(s, p.grad)
        tp, tg, ts, tiled = _tiles(inner, ps, [p.grad for p in ps], states)
        for run in _runs([p.numel() for p in tp], _foreach_numel(tp)):
            _decayed(inner, group, tp[run], tg[run], lambda p, g: inner.apply_(p, g, ts[run], group, step_lr))
        if tiled:
            torch._foreach_add_([s["step"] for s in tiled], 1)
    for chunk in _chunks(inactive, _foreach_numel(inactive)):
        _decayed(inner, group, chunk, [p.grad for p in chunk], lambda p, g: torch._foreach_add_(
            p, WHOLE_RESIDUAL[type(residual)](g), alpha=-lr * group["residual_lr_scale"]))
    for (shape, rank, *_), ps in buckets.items():
        projector = make_projector(group["projector"], rank, **(
            {"power_iters": group["power_iters"], "oversample": group["oversample"]} if proj is RandomizedSVD else {}))
        for chunk in _chunks(ps, BATCH_NUMEL):
            _decayed(inner, group, chunk, [p.grad for p in chunk],
                     lambda p, g: _subspace(opt, group, projector, inner, residual, p, g))
    for p in done:
        state = opt.state[p]
        state["updates"] = state.get("updates", 0) + 1
    return rest


def _subspace(opt: SplitOptimizer, group: dict[str, Any], proj: Projector, inner: InnerRule,
              residual: ResidualRule, ps: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """``SplitOptimizer._subspace_update`` of matrices of one shape and rank, ``grads`` their (decayed) gradients."""
    moments = group["moments"]
    states = [opt.state[p] for p in ps]
    schedule = [opt._schedule(p, group, s.get("updates", 0)) for p, s in zip(ps, states)]  # (refresh, period)
    gts = [canonical(g) for g in grads]
    d = gts[0].shape[0]
    old: dict[int, torch.Tensor] = {}
    for i, (p, state, (refresh, period)) in enumerate(zip(ps, states, schedule)):
        if refresh:
            if moments == "rotate" and "step" in state:
                old[i] = proj.dense(proj.handle(state, gts[i]), d)
            proj.refresh(p.grad, state, proj.seed(state, group["seed"], opt._index[p], period))
    h = proj.handles(states, gts)  # (B, d, r)
    # GaLore on the CPU: only P^T Gt needs the gradient, and a bmm there is one gemm per slice anyway; the slices' own
    # products skip stacking (a copy of every gradient: measured 4% of GaLore's step on tiny)
    per_slice = type(residual) is Drop and h.device.type == "cpu"
    if per_slice:
        lows = [h[i].t() @ gts[i] for i in range(len(gts))]
    else:
        stacked = torch.stack(grads) if len(grads) > 1 else grads[0].unsqueeze(0)  # a batch of one: no copy
        gt = stacked.transpose(1, 2) if ps[0].shape[0] >= ps[0].shape[1] else stacked  # canonical, per-param strides
        low = torch.bmm(h.transpose(1, 2), gt)  # (B, r, D)
        lows = list(low.unbind(0))
    for i, (state, (refresh, _)) in enumerate(zip(states, schedule)):
        if "step" not in state:
            inner.init(state, lows[i])
        elif refresh and moments == "reset":
            inner.reset(state)
        elif i in old:
            inner.rotate(state, proj.dense(h[i], d).t() @ old[i])
    u = torch.stack(inner.directions(lows, states, group))
    pts = [canonical(p) for p in ps]
    lr, a, rls = group["lr"], residual.inner_weight(group), group["residual_lr_scale"]
    if per_slice:
        torch._foreach_add_(pts, [h[i] @ u[i] for i in range(len(pts))], alpha=-lr * a)
    elif type(residual) is Drop:
        torch._foreach_add_(pts, list(torch.bmm(h, u).unbind(0)), alpha=-lr * a)
    elif type(residual) is SignSGDResidual:  # not linear: the residual itself, Gt - P P^T Gt
        torch._foreach_add_(pts, list(torch.bmm(h, u).unbind(0)), alpha=-lr * a)
        resid = (gt - torch.bmm(h, low)).sign_()
        torch._foreach_add_(pts, list(resid.unbind(0)), alpha=-lr * rls)
    else:  # linear (sgd, fira, apollo): a P u + rls (Gt - w P g) c = P (a u - rls w g c) + rls Gt c
        c = residual.column_scales(gt, low, u, states, group, h if residual.needs_subspace else None)
        w = residual.subspace_weight(group)
        if a or w:  # APOLLO: neither (the inner rule only feeds the scaling of Gt)
            x = u.mul(a).sub_(low * (c.view(len(ps), 1, -1) if torch.is_tensor(c) else c), alpha=rls * w)
            torch._foreach_add_(pts, list(torch.bmm(h, x).unbind(0)), alpha=-lr)
        if torch.is_tensor(c):  # per column (D,) or per matrix (0-d), as the per-param step's addcmul_
            torch._foreach_addcmul_(pts, gts, list(c.unbind(0)), value=-lr * rls)
        else:
            torch._foreach_add_(pts, gts, alpha=-lr * rls * c)
