"""Optimizer-state bytes equal the analytic formulas; state_dict round-trips resume bit-exactly; layer-wise mode."""

from __future__ import annotations

import io

import pytest
import torch

from optim_helpers import batch, micro_model, train_steps, single_thread  # noqa: F401 (autouse fixture)
from rankwise.metrics import optimizer_state_bytes
from rankwise.optim import SplitOptimizer, build, param_groups

R = 8
F32 = 4


def shapes(model):
    groups = param_groups(model)
    projected = [tuple(p.shape) for p in groups[0]["params"]]
    plain = [p.numel() for g in groups[1:] for p in g["params"]]
    return projected, plain


def plain_bytes(plain):  # AdamW: exp_avg + exp_avg_sq (float32) + a float32 step, per tensor
    return sum(2 * n * F32 + 4 for n in plain)


@pytest.mark.parametrize("name,per_matrix", [
    ("galore", lambda m, n: min(m, n) * R * F32 + 2 * R * max(m, n) * F32 + 4),   # basis + 2 moments + step
    ("fira", lambda m, n: min(m, n) * R * F32 + 2 * R * max(m, n) * F32 + 4 + 4),  # + limiter's previous norm
    ("frugal", lambda m, n: min(m, n) * R * F32 + 2 * R * max(m, n) * F32 + 4),   # signSGD residual: nothing
    ("apollo", lambda m, n: 2 * R * max(m, n) * F32 + 4 + 4),  # no basis (a seed), moments, step, limiter
    ("apollo-mini", lambda m, n: 2 * R * max(m, n) * F32 + 4 + 4),
])
def test_state_bytes_subspace_presets(name, per_matrix):
    model = micro_model()
    extra = {"projector": "svd", "density": None} if name == "frugal" else {}  # FRUGAL's SVD mode
    opt = build(name, model, rank=R, update_gap=2, **extra)
    train_steps(model, opt, range(3))  # across a refresh
    projected, plain = shapes(model)
    expected = sum(per_matrix(m, n) for m, n in projected) + plain_bytes(plain)
    assert optimizer_state_bytes(opt) == expected == opt.expected_state_bytes()


@pytest.mark.parametrize("projector,basis", [("rsvd", lambda d: d * R * F32), ("random", lambda d: 0),
                                             ("coordinates", lambda d: 8 * R)])
def test_state_bytes_projectors(projector, basis):
    model = micro_model()
    opt = build("galore", model, rank=R, projector=projector, update_gap=2)
    train_steps(model, opt, range(3))
    projected, plain = shapes(model)
    expected = sum(basis(min(s)) + 2 * R * max(s) * F32 + 4 for s in projected) + plain_bytes(plain)
    assert optimizer_state_bytes(opt) == expected == opt.expected_state_bytes()


@pytest.mark.parametrize("projector,kept,entries", [("randk", lambda m, n: R * max(m, n), lambda m, n, k: k),
                                                    ("columns", lambda m, n: R, lambda m, n, k: m * k),
                                                    ("rows", lambda m, n: R, lambda m, n, k: k * n)])
def test_state_bytes_coordinate_subsets(projector, kept, entries):
    """int64 indices + AdamW moments of the kept entries + the step, per matrix."""
    model = micro_model()
    opt = build("frugal", model, projector=projector, density=None, rank=R, update_gap=2)
    train_steps(model, opt, range(3))
    projected, plain = shapes(model)
    expected = sum(8 * kept(m, n) + 2 * entries(m, n, kept(m, n)) * F32 + 4 for m, n in projected)
    assert optimizer_state_bytes(opt) == expected + plain_bytes(plain) == opt.expected_state_bytes()


@pytest.mark.parametrize("name,options", [("badam", {}), ("lisa", {"active_blocks": 1}),
                                          ("lisa", {"active_blocks": 1, "moments": "reset"}), ("frugal", {})])
def test_state_bytes_block_presets(name, options):
    """Full AdamW state for the params of selected blocks (BAdam, FRUGAL: this period's; LISA: every block selected
    so far, kept), for the plain params that train, and nothing else (BAdam's frozen embeddings and head)."""
    model = micro_model()
    opt = build(name, model, update_gap=2, **options)
    group = opt.param_groups[0]
    blocked = [p for g in opt.param_groups if g.get("project", True) for p in g["params"]]
    plain = [p for g in opt.param_groups if not g.get("project", True) for p in g["params"]]
    seen = set()
    for step in range(6):
        train_steps(model, opt, range(step, step + 1))
        period = opt._period(group, step)[0]
        selected = opt._active(group, period)
        seen |= selected
        holding = {opt._block[p] for p in blocked if "exp_avg" in opt.state[p]}
        assert holding == (seen if opt.param_groups[0]["moments"] == "keep" else selected)
        held = [p for p in blocked + plain if "exp_avg" in opt.state[p]]
        assert optimizer_state_bytes(opt) == sum(2 * p.numel() * F32 + 4 for p in held)
        assert optimizer_state_bytes(opt) == opt.expected_state_bytes(period)
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    outside = [n for n, p in model.named_parameters() if id(p) not in in_optimizer]
    assert outside == (["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] if name == "badam" else [])


@pytest.mark.parametrize("order,expected", [("descending", [{1}, {0}, {0}, {1}, {1}, {0}]),
                                            ("ascending", [{0}, {1}, {1}, {0}, {0}, {1}])])
def test_badam_cycles_through_layers_in_order(order, expected):
    """BAdam switches after step k when (k + 1) % switch_block_every == 0: its first block trains one step less."""
    model = micro_model()
    opt = build("badam", model, update_gap=2, block_order=order)
    group = opt.param_groups[0]
    seen = []
    for step in range(6):
        train_steps(model, opt, range(step, step + 1))
        seen.append({opt._block[p] for p in group["params"] if "exp_avg" in opt.state[p]})
    assert seen == expected


def test_meta_device_formula_needs_no_memory():
    from rankwise.models import build_model

    model = build_model("llama-60m", device="meta")
    opt = build("galore", model, rank=128)
    adamw = build("adamw", model)
    assert 0 < opt.expected_state_bytes() < adamw.expected_state_bytes()
    assert adamw.expected_state_bytes() == sum(2 * p.numel() * F32 + 4 for p in model.parameters())


def snapshot(model, opt) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("name,options", [
    ("galore", {"projector": "rsvd"}), ("fira", {}), ("frugal", {"projector": "random", "moments": "rotate"}),
    ("frugal", {"projector": "coordinates"}), ("badam", {"block_order": "random"}), ("lisa", {}),
    ("frugal", {}), ("frugal", {"projector": "randk", "moments": "rotate"}), ("frugal", {"projector": "columns"}),
    ("apollo", {}), ("apollo-mini", {}), ("galore", {"stagger": True}), ("apollo", {"stagger": True}),
    ("frugal", {"projector": "columns", "stagger": True}),
])
def test_state_dict_round_trip_resumes_bit_exact(name, options):
    kw = {"update_gap": 2, "lr": 1e-2, **options, **({} if name in ("badam", "lisa") else {"rank": R})}
    model = micro_model()
    opt = build(name, model, **kw)
    train_steps(model, opt, range(3))
    saved = snapshot(model, opt)
    train_steps(model, opt, range(3, 7))

    model2 = micro_model(seed=1)
    opt2 = build(name, model2, **kw)
    state = torch.load(io.BytesIO(saved), weights_only=False)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    train_steps(model2, opt2, range(3, 7))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["galore", "fira", "lisa", "apollo"])
def test_layerwise_matches_step_and_frees_grads(name):
    """Updating inside post-accumulate-grad hooks gives the same weights; no gradient survives backward."""
    kw = {"rank": R} if name != "lisa" else {}
    a, b = micro_model(), micro_model()
    opt_a = build(name, a, update_gap=2, lr=1e-2, **kw)
    opt_b = build(name, b, update_gap=2, lr=1e-2, layerwise=True, **kw)
    train_steps(a, opt_a, range(5))
    train_steps(b, opt_b, range(5))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    x = batch(9)
    b(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is None for p in b.parameters())
