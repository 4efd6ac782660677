"""``badam`` preset == the badam package (1.4, ``badam.BlockOptimizer`` wrapping ``torch.optim.AdamW``), step for step.

BAdam's defaults: blocks inferred from the names (``model.layers.N.``: a layer with its norms), embeddings, final norm
and head frozen, ``switch_mode="descending"``, state cleared at every switch, and the switch after step k when
(k + 1) % switch_block_every == 0 (the first block trains one step less: rankwise's ``block_phase=1``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from ref_model import TOL, moved, side_by_side, tiny_llama
from rankwise.optim import build

badam = pytest.importorskip("badam")

LR, GAP, STEPS = 3e-3, 4, 30  # 7 switches
# Every switch restarts Adam, whose first steps are ~lr * g / (|g| + eps): with eps 1e-8 a gradient entry near zero
# turns a rounding difference of ~1e-10 into a weight difference of ~lr, and the two runs part chaotically (measured:
# 1.4e-3 apart after 30 steps at lr 1e-3, 1.2e-7 with eps 1e-3). eps 1e-4 on both sides keeps the comparison about
# the method, not about rounding.
EPS = 1e-4


def reference(model, lr=LR, wd=0.0, order="descending", eps=EPS):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BAdam warns that it expects fp16/bf16 weights
        base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, eps=eps)
        return badam.BlockOptimizer(base, list(model.named_parameters()), switch_block_every=GAP, switch_mode=order,
                                    verbose=0)


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else None


def run(order: str, wd: float, options: dict | None = None, layers: int = 2, eps: float = EPS, lr: float = LR):
    model = tiny_llama(0, layers=layers)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    holder, untouched = {}, []

    def ours(m):
        holder["opt"] = build("badam", m, lr=lr, eps=eps, weight_decay=wd, update_gap=GAP, block_order=order,
                              **(options or {}))
        holder["prev"] = {n: p.detach().clone() for n, p in m.named_parameters()}
        return holder["opt"]

    def after(step, m, ref):
        opt = holder["opt"]
        group = opt.param_groups[0]
        active = opt._active(group, opt._period(group, step - 1)[0])
        for n, p in m.named_parameters():
            if layer_of(n) not in active:  # inactive layers, embeddings, final norm, head: bit-identical
                untouched.append(torch.equal(p, holder["prev"][n]))
        holder["prev"] = {n: p.detach().clone() for n, p in m.named_parameters()}

    diff, trace, a, b = side_by_side(ours, lambda m: reference(m, lr, wd, order, eps), steps=STEPS, model=model,
                                     after_step=after)
    return diff, trace, a, b, start, untouched


@pytest.mark.parametrize("order,wd", [("descending", 0.1), ("ascending", 0.0)])
def test_badam_preset_matches_badam_block_optimizer(order, wd):
    diff, trace, ours, ref, start, untouched = run(order, wd)
    assert diff <= TOL, trace
    assert moved(ours) > 1000 * TOL
    assert untouched and all(untouched)
    for n, p in ours.named_parameters():
        if layer_of(n) is None:  # frozen by default in BAdam
            assert torch.equal(p, start[n]), n
        else:
            assert not torch.equal(p, start[n]), n  # every layer, norms included, was trained at some point


def test_badam_random_order_matches_with_the_same_permutations(monkeypatch):
    """BAdam's random mode: a permutation per pass, popped from its end; fed rankwise's permutations (BAdam draws
    from torch's global generator), the runs agree step for step."""
    from rankwise.optim.blocks import _perm

    real, calls = torch.randperm, []

    def randperm(n, *args, **kwargs):
        if "generator" in kwargs:
            return real(n, *args, **kwargs)
        calls.append(n)
        return torch.tensor(_perm(n, len(calls) - 1)[::-1])  # seed 0: rankwise's pass c uses seed 0 * 1_000_003 + c

    monkeypatch.setattr(torch, "randperm", randperm)
    diff, trace, ours, _, _, untouched = run("random", 0.05, layers=3)
    assert len(calls) >= 3  # the run crossed passes over the 3 layers
    assert diff <= TOL, trace
    assert moved(ours) > 1000 * TOL and all(untouched)


def test_todays_behaviour_stays_available_as_options():
    """Embeddings, final norm and head trained with AdamW every step (``outside="train"``)."""
    model = tiny_llama(0)
    opt = build("badam", model, outside="train", update_gap=GAP)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in trained for p in model.parameters())
