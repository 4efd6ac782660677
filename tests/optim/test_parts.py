"""Projectors and residual rules against closed forms; bad input."""

from __future__ import annotations

import math

import pytest
import torch

from optim_helpers import micro_model, train_steps, single_thread  # noqa: F401 (autouse fixture)
from rankwise.errors import RankwiseError
from rankwise.optim import SplitOptimizer, build
from rankwise.optim.projectors import PROJECTORS, canonical, make_projector


def known_spectrum(m: int, n: int, r: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A = U diag(s) V^T with a top-r block (10 .. 5) well above the tail (<= 1), and U[:, :r]."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64)).Q
    s = torch.cat([torch.linspace(10, 5, r, dtype=torch.float64), torch.logspace(0, -3, m - r, dtype=torch.float64)])
    return ((u * s) @ v.t()).float(), u[:, :r].float()


def cos_largest_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos of the largest principal angle between span(a) and span(b) (both orthonormal)."""
    return torch.linalg.svdvals(a.t().double() @ b.double()).min().item()


@pytest.mark.parametrize("power_iters,min_cos", [(1, 0.999), (2, 0.9999)])
def test_rsvd_spans_top_subspace(power_iters, min_cos):
    """Cold start: sin(angle) <~ (s_{r+1} / s_r)^(2q+1) = 0.2^(2q+1) (Halko et al. 2011, Thm 9.2 / Cor. 10.10)."""
    a, top = known_spectrum(96, 160, 12)
    state = {}
    proj = make_projector("rsvd", 12, power_iters=power_iters)
    proj.fit(a, state, seed=0)
    basis = state["basis"]
    assert torch.allclose(basis.t() @ basis, torch.eye(12), atol=1e-5)
    assert cos_largest_angle(basis, top) > min_cos
    # ordered like the SVD: the k-th basis vector matches the k-th singular vector up to sign
    assert torch.allclose((basis * top).sum(0).abs(), torch.ones(12), atol=1e-3)


def test_rsvd_warm_start_tracks_a_rotated_subspace():
    """One power iteration from the previous basis recovers a slowly rotated top subspace (the refresh regime)."""
    a, _ = known_spectrum(96, 160, 12)
    state = {}
    proj = make_projector("rsvd", 12, power_iters=1)
    proj.fit(a, state, seed=0)
    rot = torch.linalg.matrix_exp(0.05 * (lambda x: x - x.t())(torch.randn(96, 96, generator=torch.Generator()
                                                                            .manual_seed(3))))
    b = rot @ a
    proj.fit(b, state, seed=1)
    exact = torch.linalg.svd(b.double())[0][:, :12].float()
    assert cos_largest_angle(state["basis"], exact) > 0.9999


def test_svd_random_coordinates_projectors_are_orthonormal_projections():
    g = torch.randn(24, 40)
    for name in (n for n, cls in PROJECTORS.items() if cls.orthonormal):
        proj, state = make_projector(name, 6), {}
        proj.fit(g, state, seed=5)
        h = proj.handle(state, g)
        p = proj.dense(h, 24)
        assert torch.allclose(p.t() @ p, torch.eye(6), atol=1e-5), name
        low = proj.down(g, h)
        assert torch.allclose(low, p.t() @ g, atol=1e-5), name
        assert torch.allclose(proj.up(low, h, 24), p @ p.t() @ g, atol=1e-5), name
        assert torch.allclose(proj.residual(g, low, h), g - p @ p.t() @ g, atol=1e-5), name
    state = {}
    make_projector("svd", 6).fit(g, state, seed=0)
    assert cos_largest_angle(state["basis"], torch.linalg.svd(g)[0][:, :6]) > 0.9999


@pytest.mark.parametrize("m,n", [(24, 24), (30, 10), (10, 30)])
def test_svd_refresh_is_the_svd_of_g_itself_on_galores_side(m, n):
    """Right projection (P = V[:, :r]) when m >= n, squares included; left (U[:, :r]) otherwise; bit for bit the
    singular vectors of G (not of G^T, whose signs differ), as galore-torch's ``get_orthogonal_matrix``."""
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(m + n))
    gt = canonical(g)
    assert gt.shape == (min(m, n), max(m, n)) and (gt.data_ptr() == g.data_ptr())
    assert (gt.stride() != g.stride()) == (m >= n)  # transposed view exactly when m >= n
    state = {}
    make_projector("svd", 5).refresh(g, state, seed=0)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.equal(state["basis"], (vh[:5].t() if m >= n else u[:, :5]).contiguous())


def reference_fira(grads, lr, scale, r, eps=1e-8, betas=(0.9, 0.999), gamma=1.01):
    """Fira by hand as the paper writes it (arXiv 2410.01623 Eq. 7-9: residual G - P P^T G, phi on the Adam update
    itself), torch's Adam arithmetic: one matrix (m < n), basis fixed after step 1."""
    w = torch.zeros_like(grads[0], dtype=torch.float64)
    p = torch.linalg.svd(grads[0].double())[0][:, :r]
    m = v = torch.zeros(r, grads[0].shape[1], dtype=torch.float64)
    prev = None
    for t, g in enumerate(grads, 1):
        g = g.double()
        low = p.t() @ g
        m = betas[0] * m + (1 - betas[0]) * low
        v = betas[1] * v + (1 - betas[1]) * low ** 2
        u = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        phi = u.norm(dim=0) / (low.norm(dim=0) + 1e-8)
        s = (g - p @ low) * phi
        if prev is not None and s.norm() / prev > gamma:
            s = s * (gamma * prev / s.norm())
        prev = s.norm()
        w = w - lr * (scale * p @ u + s)
    return w


def test_fira_exact_residual_matches_the_paper():
    """``fira_exact`` with ``adamw`` (gain 1, so phi sees the whole update) is the paper's equations; the ``fira``
    preset (Fira's code) is checked against the fira package in tests/reference/test_ref_fira.py."""
    torch.manual_seed(0)
    grads = [torch.randn(12, 20) * (1 + 3 * (t == 3)) for t in range(5)]  # a spike at t=3 triggers the limiter
    w = torch.nn.Parameter(torch.zeros(12, 20))
    opt = SplitOptimizer([w], projector="svd", residual="fira_exact", rank=4, scale=0.25, lr=0.1, update_gap=100)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    assert torch.allclose(w.detach().double(), reference_fira(grads, 0.1, 0.25, 4), atol=1e-5)


@pytest.mark.parametrize("rule,f", [("signsgd", torch.sign), ("sgd", lambda x: x)])
def test_frugal_residual_is_state_free_sign_or_sgd(rule, f):
    """One step from zero: W = -lr * scale * P u - lr * rls * f(G - P P^T G), u = Adam's first step = sign-ish."""
    torch.manual_seed(1)
    g = torch.randn(30, 10)  # m > n: projected on the right (the transpose is canonical)
    w = torch.nn.Parameter(torch.zeros(30, 10))
    opt = SplitOptimizer([w], projector="svd", residual=rule, rank=3, lr=0.1, residual_lr_scale=0.5, eps=1e-8)
    w.grad = g.clone()
    opt.step()
    q = torch.linalg.svd(g.t())[0][:, :3]  # basis of the 10-dim side
    low = q.t() @ g.t()
    u = low / (low.abs() + 1e-8)
    expected = -0.1 * (q @ u).t() - 0.1 * 0.5 * f(g - (q @ low).t())
    assert torch.allclose(w.detach(), expected, atol=1e-6)
    assert set(opt.state[w]) == {"step", "exp_avg", "exp_avg_sq", "basis", "updates"}


def test_gaussian_projector_preserves_norms_and_is_not_stored():
    """APOLLO's P has N(0, 1/r) entries: E[P P^T] = I, so ||P^T g|| ~ ||g|| (an orthonormal P keeps sqrt(r/d) of
    it); the same seed gives the same P, and the state holds no tensor."""
    g = torch.randn(128, 300, generator=torch.Generator().manual_seed(0))
    proj, state = make_projector("gaussian", 32), {}
    proj.refresh(g.t(), state, seed=7)  # (300, 128): m >= n, a right projection of the 128 side
    h = proj.handle(state, g)
    assert h.shape == (128, 32) and torch.equal(h, proj.handle(state, g))
    ratio = (h.t() @ g).norm(dim=0) / g.norm(dim=0)
    assert abs(ratio.mean().item() - 1) < 0.05 and ratio.min() > 0.5
    assert not any(torch.is_tensor(v) for v in state.values())


def grads_with_norm_growth(factor: float, steps: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(12, 20, generator=gen)
    return [base * factor ** t + 0.01 * torch.randn(12, 20, generator=gen) for t in range(steps)]


@pytest.mark.parametrize("residual", ["apollo", "apollo_tensor"])
def test_apollo_with_unit_scaling_is_sgd_on_the_raw_gradient(residual):
    """With momentum-free SGD as the inner rule, u = P^T G and every factor ||u_j|| / ||g_j|| is 1 (to 1e-8):
    APOLLO is then SGD with lr * sqrt(scale) on the raw full gradient, while norms shrink; when they grow by more
    than 1.01x a step, the limiter caps each update's norm at 1.01x the previous one."""
    for factor in (0.9, 1.5):
        w = torch.nn.Parameter(torch.zeros(12, 20, dtype=torch.float64))
        opt = SplitOptimizer([w], projector="gaussian", inner="sgd", momentum=0.0, residual=residual, rank=4,
                             scale=4.0, lr=0.1, update_gap=2)
        updates, before = [], w.detach().clone()
        for g in grads_with_norm_growth(factor):
            w.grad = g.double()
            opt.step()
            updates.append(w.detach() - before)
            before = w.detach().clone()
        if factor < 1:
            for u, g in zip(updates, grads_with_norm_growth(factor)):
                assert torch.allclose(u, -0.1 * 2.0 * g.double(), rtol=1e-6, atol=0)
        else:
            norms = [u.norm().item() for u in updates]
            assert norms[0] == pytest.approx(0.2 * grads_with_norm_growth(factor)[0].norm().item(), rel=1e-6)
            assert all(b == pytest.approx(1.01 * a, rel=1e-6) for a, b in zip(norms, norms[1:]))


@pytest.mark.parametrize("residual,rank", [("apollo_tensor", 1), ("apollo", 3)])
def test_apollo_scale_is_the_norm_ratio_of_the_low_rank_adam(residual, rank):
    """One step from zero (no limiter yet): W = -lr * c * sqrt(scale) * G * s with s = ||n|| / ||P^T G|| for the
    whole tensor (APOLLO-Mini) or per column of the long side (APOLLO), n = m / (sqrt(v) + eps); no basis stored."""
    g = torch.randn(10, 30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # m < n: left
    w = torch.nn.Parameter(torch.zeros(10, 30, dtype=torch.float64))
    opt = SplitOptimizer([w], projector="gaussian", inner="adamw_hf", residual=residual, rank=rank, scale=128.0,
                         lr=0.01, eps=1e-6)
    w.grad = g.clone()
    opt.step()
    proj, state = make_projector("gaussian", rank), {}
    proj.refresh(g, state, seed=1)  # apollo-torch's first seed: the param's 1-based position
    low = proj.handle(state, g).t() @ g
    n = 0.1 * low / ((0.001 * low.square()).sqrt() + 1e-6)
    if rank == 1:
        s = n.norm() / (low.norm() + 1e-8)
    else:
        s = n.norm(dim=0) / (low.norm(dim=0) + 1e-8)
    gain = math.sqrt(1 - 0.999) / (1 - 0.9)
    assert torch.allclose(w.detach(), -0.01 * gain * math.sqrt(128) * g * s, rtol=1e-12, atol=0)
    assert set(opt.state[w]) == {"step", "exp_avg", "exp_avg_sq", "seed", "right", "residual_norm", "updates"}
    assert opt.state[w]["exp_avg"].shape == (rank, 30)


# --------------------------------------------------------------------------------------------- bad input
def test_rank_errors_name_the_parameter():
    model = micro_model()
    with pytest.raises(RankwiseError, match=r"rank 33 .*model\.layers\.0\.self_attn\.q_proj\.weight.*min\(m, n\) = 32"):
        build("galore", model, rank=33)
    with pytest.raises(RankwiseError, match="rank must be a positive integer"):
        build("galore", model, rank=0)


@pytest.mark.parametrize("key,value,valid", [("projector", "pca", "svd, rsvd, random, gaussian, coordinates, randk, "
                                                              "columns, rows, block, layers"),
                                             ("residual", "adam", "drop, sgd, signsgd, fira, fira_exact, apollo, "
                                                          "apollo_tensor"),
                                             ("inner", "lion", "adam, adamw, adamw_hf, sgd"),
                                             ("moments", "zero", "keep, reset, rotate")])
def test_unknown_part_lists_valid_ones(key, value, valid):
    with pytest.raises(RankwiseError, match=f"unknown {key} '{value}'; valid: {valid}"):
        SplitOptimizer([torch.nn.Parameter(torch.zeros(4, 4))], rank=2, **{key: value})


def test_block_selector_rejects_fira_and_rotated_moments():
    with pytest.raises(RankwiseError, match="needs a subspace projector"):
        build("badam", micro_model(), residual="fira")
    with pytest.raises(RankwiseError, match="use moments='reset'"):
        build("lisa", micro_model(), moments="rotate")


def test_sparse_and_complex_gradients_are_refused():
    w = torch.nn.Parameter(torch.zeros(6, 4))
    opt = SplitOptimizer([w], rank=2)
    w.grad = torch.eye(6, 4).to_sparse()
    with pytest.raises(RankwiseError, match="sparse gradients"):
        opt.step()
    c = torch.nn.Parameter(torch.zeros(6, 4, dtype=torch.complex64))
    opt = SplitOptimizer([c], rank=2)
    c.grad = torch.ones(6, 4, dtype=torch.complex64)
    with pytest.raises(RankwiseError, match="complex gradients"):
        opt.step()


def test_param_without_gradient_is_skipped():
    model = micro_model()
    frozen = model.model.layers[1].mlp.down_proj.weight
    before = frozen.detach().clone()
    opt = build("fira", model, rank=4, update_gap=1)
    x = torch.randint(0, 128, (2, 9))
    for _ in range(2):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        frozen.grad = None  # e.g. an unused branch
        opt.step()
        opt.zero_grad()
    assert torch.equal(frozen, before) and not opt.state[frozen]
    assert math.isfinite(loss.item())
    train_steps(model, opt, range(1))


def test_eps_precedence_option_then_reference_default_then_loop():
    """galore/fira default to their references' eps (1e-6) whatever the loop's OptimConfig says; ``eps`` as a method
    option wins; presets without a reference default take the loop's."""
    from rankwise import methods
    from rankwise.methods import OptimConfig

    def eps(name, cfg=OptimConfig(), **options):
        opt = methods.get(name, **({"rank": 4} if name != "badam" else {}), **options).build_optimizer(
            micro_model(), cfg)
        return {g["eps"] for g in opt.param_groups}, {g["inner"] for g in opt.param_groups}

    assert eps("galore") == ({1e-6}, {"adamw_hf"}) and eps("fira", OptimConfig(eps=1e-7)) == ({1e-6}, {"adamw_hf"})
    assert eps("galore", eps=1e-8, inner="adamw") == ({1e-8}, {"adamw"})
    assert eps("split", OptimConfig(eps=1e-7)) == ({1e-7}, {"adamw"}) and eps("badam")[0] == {1e-8}
