"""Staggered refresh (issue 14, item 6): the j-th of a group's n projected matrices refreshes at t = j * gap // n
(mod gap) and at t = 0, instead of all of them every ``gap`` steps; nothing else changes."""

from __future__ import annotations

import math

import pytest
import torch

from optim_helpers import micro_model, train_steps, single_thread  # noqa: F401 (autouse fixture)
from rankwise.errors import RankwiseError
from rankwise.optim import SplitOptimizer, build

GAP, STEPS = 4, 13


def refresh_steps(name: str, key: str, stagger: bool, **options) -> list[list[int]]:
    """Per projected matrix, the updates at which its basis / index set changed (update 0 always)."""
    model = micro_model()
    opt = build(name, model, update_gap=GAP, stagger=stagger, **options)
    projected = [p for p in opt.param_groups[0]["params"]]
    seen: list[list[int]] = [[] for _ in projected]
    last: list = [None] * len(projected)
    for t in range(STEPS):
        train_steps(model, opt, range(t, t + 1))
        for i, p in enumerate(projected):
            value = opt.state[p][key]
            value = value.clone() if torch.is_tensor(value) else value
            if last[i] is None or not (torch.equal(value, last[i]) if torch.is_tensor(value) else value == last[i]):
                seen[i].append(t)
            last[i] = value
    return seen


@pytest.mark.parametrize("name,key,options", [("galore", "seed", {"projector": "random", "rank": 4}),
                                              ("frugal", "index", {"projector": "columns", "rank": 4}),
                                              ("apollo", "seed", {"rank": 4})])
def test_refresh_steps_are_staggered_as_designed(name, key, options):
    plain = refresh_steps(name, key, False, **options)
    n = len(plain)
    assert n == 14 and all(s == list(range(0, STEPS, GAP)) for s in plain)  # all at once: a spike every GAP
    staggered = refresh_steps(name, key, True, **options)
    for j, steps in enumerate(staggered):
        offset = j * GAP // n
        assert steps == sorted({0} | set(range(offset or GAP, STEPS, GAP))), (j, offset, steps)
    per_step = [sum(t in s for s in staggered) for t in range(1, STEPS)]
    assert max(per_step) == math.ceil(n / GAP) and min(per_step) >= n // GAP  # spread evenly over the gap


def galore_by_hand(grads: list[torch.Tensor], refresh: set[int], rank: int, lr: float, scale: float,
                   betas=(0.9, 0.999), eps=1e-8) -> torch.Tensor:
    """GaLore (svd basis on the smaller side, torch's Adam arithmetic, moments kept) with the given refresh steps."""
    right = grads[0].shape[0] >= grads[0].shape[1]
    w = torch.zeros_like(grads[0])
    m = v = None
    for t, g in enumerate(grads):
        if t in refresh:
            u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
            p = (vh[:rank].t() if right else u[:, :rank]).to(g.dtype)
        gt = g.t() if right else g
        low = p.t() @ gt
        if m is None:
            m, v = torch.zeros_like(low), torch.zeros_like(low)
        m = m + (1 - betas[0]) * (low - m)
        v = betas[1] * v + (1 - betas[1]) * low * low
        step = t + 1
        direction = (m / (1 - betas[0] ** step)) / (v.sqrt() / math.sqrt(1 - betas[1] ** step) + eps)
        update = p @ direction
        w = w - lr * scale * (update.t() if right else update)
    return w


def test_a_staggered_run_differs_only_in_refresh_times():
    """Independent matrices (their own gradients): each follows GaLore exactly, refreshed at its own times."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 10), (10, 6), (8, 8), (6, 10), (10, 6)]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for _ in range(11)] for s in shapes]
    results = {}
    for stagger in (False, True):
        params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
        opt = SplitOptimizer(params, projector="svd", inner="adamw", rank=2, update_gap=3, scale=0.5, lr=0.1,
                             stagger=stagger)
        for t in range(11):
            for p, g in zip(params, grads):
                p.grad = g[t].clone()
            opt.step()
        results[stagger] = params
    for j, (p, q, g) in enumerate(zip(results[False], results[True], grads)):
        offset = j * 3 // len(shapes)
        assert torch.allclose(p.detach(), galore_by_hand(g, set(range(0, 11, 3)), 2, 0.1, 0.5), rtol=0, atol=1e-12)
        times = {0} | set(range(offset or 3, 11, 3))
        assert torch.allclose(q.detach(), galore_by_hand(g, times, 2, 0.1, 0.5), rtol=0, atol=1e-12)
        assert (offset == 0) == torch.equal(p, q)  # offset 0: the same schedule, so the same weights


def test_stagger_bad_input():
    with pytest.raises(RankwiseError, match="stagger must be True or False"):
        SplitOptimizer([torch.nn.Parameter(torch.zeros(4, 4))], rank=2, stagger="yes")
    with pytest.raises(RankwiseError, match="use block_phase"):
        build("badam", micro_model(), stagger=True)
