"""The ``apollo`` and ``apollo-mini`` presets against an independent oracle of APOLLO's equations (issue 14, item 1).

apollo-torch (github.com/zhuhanqing/APOLLO) is CC-BY-NC, so it is never installed or imported here: ``ApolloOracle``
restates, separately from rankwise's parts, what the paper (Zhu et al. 2024, arXiv 2412.05270, Alg. 1) and
apollo-torch's ``APOLLOAdamW`` compute, per param of the projected group (the "attn"/"mlp" linears):

    every update_proj_gap steps:  P ~ N(0, 1/r), (m, r) if m < n else (r, n), from the param's seed chain
    R = P^T G (m < n) or G P^T (m >= n)                            the low-rank gradient (Eq. 3)
    M, V = Adam moments of R;  N = M / (sqrt(V) + eps)             transformers' AdamW arithmetic
    s = ||N_j|| / (||R_j|| + 1e-8) per channel (the long side's columns), or ||N|| / (||R|| + 1e-8) (APOLLO-Mini)
    S = G * s;  if ||S|| > 1.01 ||S_prev||: S <- S * 1.01 ||S_prev|| / ||S||       (Fira's norm-growth limiter)
    W <- W - lr * sqrt(1 - b2^t) / (1 - b1^t) * sqrt(scale) * S,   then  W <- W - lr * wd * W

and plain AdamW (the same arithmetic) on every other param. Seeds: the param's 1-based position in the optimizer,
advanced at every refresh to the 15th int64 a CPU generator seeded with it draws.

Same tiny LLaMA as the GaLore/Fira fidelity tests (square q/o, k/v with m < n, gate/up with m > n), same batches,
30 steps with a refresh every 5 (6 refreshes), free-running in fp64 (weights and limiter state to 1e-12) and
teacher-forced in fp32.
"""

from __future__ import annotations

import math

import pytest
import torch

from ref_lowrank import reference_groups, teacher_forced
from ref_model import TOL, moved, side_by_side, tiny_llama
from rankwise.optim import build

STEPS, GAP, LR = 30, 5, 1e-2
FP64_TOL = 1e-12
CASES = {"apollo": dict(rank=8, scale=1.0, scale_type="channel"),
         "apollo-mini": dict(rank=1, scale=128.0, scale_type="tensor")}


def chained_seed(seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 ** 63 - 1, (15,), generator=gen).tolist()[-1]


class ApolloOracle(torch.optim.Optimizer):
    """APOLLO by its equations (module docstring); a group with ``rank`` is projected."""

    def __init__(self, groups, lr, betas=(0.9, 0.999), eps=1e-6, gamma=1.01):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))
        self.gamma = gamma
        self.limited = 0  # steps where the limiter acted, over all matrices
        position = 0
        for group in self.param_groups:
            for p in group["params"]:
                position += 1
                self.state[p]["seed"] = position

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                g, st = p.grad, self.state[p]
                rank = group.get("rank")
                st.setdefault("t", 0)
                if rank:
                    right = g.shape[0] >= g.shape[1]
                    if st["t"] % group["gap"] == 0:
                        shape = (rank, g.shape[1]) if right else (g.shape[0], rank)
                        gen = torch.Generator(device=g.device).manual_seed(st["seed"])
                        st["proj"] = (torch.randn(shape, generator=gen, device=g.device) / math.sqrt(rank)).to(g.dtype)
                        st["seed"] = chained_seed(st["seed"])
                    r = g @ st["proj"].t() if right else st["proj"].t() @ g
                else:
                    r = g
                if "m" not in st:
                    st["m"], st["v"] = torch.zeros_like(r), torch.zeros_like(r)
                st["t"] += 1
                t = st["t"]
                st["m"] = b1 * st["m"] + (1 - b1) * r
                st["v"] = b2 * st["v"] + (1 - b2) * r * r
                n = st["m"] / (st["v"].sqrt() + group["eps"])
                step_size = group["lr"] * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
                if rank:
                    if group["scale_type"] == "channel":
                        axis = 1 if right else 0  # reduce over the rank axis: one factor per channel of G
                        s = n.norm(dim=axis) / (r.norm(dim=axis) + 1e-8)
                        scaled = g * (s[:, None] if right else s[None, :])
                    else:
                        scaled = g * (n.norm() / (r.norm() + 1e-8))
                    norm = scaled.norm()
                    if "prev" in st:
                        limiter = max(norm / (st["prev"] + 1e-8), self.gamma) / self.gamma
                        self.limited += int(limiter > 1)
                        scaled, norm = scaled / limiter, norm / limiter
                    st["prev"] = norm
                    update = scaled * math.sqrt(group["scale"])
                else:
                    update = n
                p.sub_(step_size * update)
                p.sub_(group["lr"] * group["weight_decay"] * p)


def apollo_pair(name: str, weight_decay: float, **ours):
    case = CASES[name]
    opts: dict = {}

    def make_ours(model):
        opts["ours"] = build(name, model, rank=case["rank"], update_gap=GAP, lr=LR, weight_decay=weight_decay,
                             **ours)
        return opts["ours"]

    def make_ref(model):
        groups = reference_groups(model, weight_decay, gap=GAP, **case)
        opts["ref"] = ApolloOracle(groups, lr=LR)
        return opts["ref"]

    def limiter_states(ours, ref):
        so, sr = opts["ours"].state, opts["ref"].state
        return [(so[a]["residual_norm"].item(), sr[b]["prev"].item())
                for a, b in zip(ours.parameters(), ref.parameters()) if "prev" in sr[b]]

    return make_ours, make_ref, limiter_states, opts


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_apollo_preset_matches_the_oracle_fp64(name, weight_decay):
    make_ours, make_ref, limiter_states, opts = apollo_pair(name, weight_decay)
    states = []
    diff, trace, ours, _ = side_by_side(make_ours, make_ref, steps=STEPS, model=tiny_llama(0).double(),
                                        after_step=lambda step, a, b: states.append(limiter_states(a, b)))
    assert STEPS // GAP >= 3 and len(trace) == STEPS
    assert max(trace) <= min(TOL, FP64_TOL), f"max |dW| per step: {trace}"
    assert moved(ours) > 1000 * TOL
    assert all(len(s) == 14 for s in states)  # 7 projected matrices x 2 layers
    for step, pairs in enumerate(states, 1):
        for a, b in pairs:
            assert a == pytest.approx(b, rel=1e-12), f"limiter state at step {step}: {a} vs the oracle's {b}"
    assert opts["ref"].limited > 0  # the norm-growth limiter acted in these runs


@pytest.mark.parametrize("name", CASES)
def test_apollo_preset_matches_the_oracle_step_for_step_fp32(name):
    """Teacher-forced: APOLLO-Mini at lr 1e-2 times sqrt(128) moves this tiny model by ~0.1 per step, so two fp32
    runs amplify rounding (1e-7 at step 1) until they part; resetting our weights to the oracle's after every step
    keeps them on the same gradients while moments, seeds and limiter state evolve independently."""
    make_ours, make_ref, _, _ = apollo_pair(name, 0.1)
    trace, ref = teacher_forced(make_ours, make_ref, steps=STEPS)
    assert len(trace) == STEPS and max(trace) <= TOL, f"max |dW| per step: {trace}"
    assert moved(ref) > 1000 * TOL


def test_apollo_layerwise_matches_the_oracle():
    make_ours, make_ref, _, _ = apollo_pair("apollo", 0.1, layerwise=True)
    _, trace, _, _ = side_by_side(make_ours, make_ref, steps=STEPS, model=tiny_llama(0).double())
    assert max(trace) <= FP64_TOL, f"max |dW| per step: {trace}"


@pytest.mark.parametrize("name,option", [("apollo", {"projector": "random"}), ("apollo", {"residual": "apollo_tensor"}),
                                         ("apollo-mini", {"residual": "apollo"}), ("apollo", {"scale": 2.0}),
                                         ("apollo", {"inner": "adamw", "eps": 1e-8})])
def test_other_options_are_not_the_preset(name, option):
    """An orthonormal random basis (its P^T G is sqrt(r/d) smaller, so the factors are larger), the other
    granularity, another scale, torch's AdamW arithmetic: each is another optimizer, and the oracle tells it apart."""
    make_ours, make_ref, _, _ = apollo_pair(name, 0.0, **option)
    diff, _, _, _ = side_by_side(make_ours, make_ref, steps=10, model=tiny_llama(0).double())
    assert diff > 1e-6
