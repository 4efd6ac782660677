import math

import pytest
import torch

from rankwise.analysis.fast_lora_grad import (LoRAFactors, exact_lora_grad, fast_lora_grad, feature_rank,
                                              monomial_exponents, polynomial_features, taylor_degree)
from rankwise.errors import RankwiseError

L, D, R = 48, 4, 2


def instance(seed: int = 0):
    """X with max(||X W_Q||_max, ||X W_K||_max) = 1 (scale X by Gamma to set the bound), adapters with B != 0."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = (LoRAFactors(rnd(D, D), 0.5 * rnd(D, R), 0.5 * rnd(R, D), alpha=2.0) for _ in range(3))
    x = rnd(L, D)
    x = x / max((x @ q.merged()).abs().max(), (x @ k.merged()).abs().max())
    return x, q, k, v, rnd(L, D)


def rel_err(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max()).item() for n in b)


def test_features_reproduce_the_taylor_kernel():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    for degree in (0, 1, 3, 5):
        kernel = polynomial_features(q, degree) @ polynomial_features(k, degree).T
        dot = q @ k.T
        taylor = sum(dot ** j / math.factorial(j) for j in range(degree + 1))
        torch.testing.assert_close(kernel, taylor, rtol=1e-12, atol=1e-12)
        assert monomial_exponents(3, degree).shape[0] == feature_rank(3, degree) == math.comb(3 + degree, degree)


def test_converges_to_autograd_on_the_exact_loss():
    x, q, k, v, y = instance()
    exact = exact_lora_grad(2.0 * x, q, k, v, y, scale=1 / D)
    assert set(exact) == {"A_Q", "B_Q", "A_K", "B_K", "A_V", "B_V"}
    errors = [rel_err(fast_lora_grad(2.0 * x, q, k, v, y, degree=g, scale=1 / D), exact) for g in (1, 3, 6, 14)]
    assert all(b < a for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-11


def test_error_decreases_as_the_norm_bound_tightens():
    """Same weights, X scaled so that ||X W_Q||_max, ||X W_K||_max <= Gamma: at a fixed degree the error falls with
    Gamma, and stays within the Taylor-remainder scale e^{2b} b^{g+1} / (g+1)! with b = s d Gamma^2."""
    x, q, k, v, y = instance(3)
    for degree in (2, 4):
        errors = []
        for gamma in (2.0, 1.0, 0.5, 0.25):
            exact = exact_lora_grad(gamma * x, q, k, v, y, scale=1 / D)
            errors.append(rel_err(fast_lora_grad(gamma * x, q, k, v, y, degree=degree, scale=1 / D), exact))
        assert all(b < a for a, b in zip(errors, errors[1:])), errors
        assert errors[-1] < 1e-4 * errors[0]


def _dense_formula(x, q, k, v, y, degree, scale):
    """The paper's gradient with exp replaced by the polynomial, evaluated with dense L x L matrices."""
    Q, K, V = x @ q.merged(), x @ k.merged(), x @ v.merged()
    S = scale * Q @ K.T
    A = sum(S ** j / math.factorial(j) for j in range(degree + 1))
    P = A / A.sum(1, keepdim=True)
    out = P @ V
    dO = out - y
    dS = P * (dO @ V.T) - (dO * out).sum(1, keepdim=True) * P
    dW = {"Q": x.T @ (scale * dS @ K), "K": x.T @ (scale * dS.T @ Q), "V": x.T @ (P.T @ dO)}
    grads = {}
    for t, f in (("Q", q), ("K", k), ("V", v)):
        grads[f"B_{t}"] = f.scaling * dW[t] @ f.A.T
        grads[f"A_{t}"] = f.scaling * f.B.T @ dW[t]
    return grads


def test_low_rank_chain_equals_the_dense_computation_exactly():
    """The factorised algebra is exact: only the polynomial approximates (checked here at a large bound, where the
    approximation itself is poor)."""
    x, q, k, v, y = instance(5)
    for degree in (1, 2, 3):
        fast = fast_lora_grad(3.0 * x, q, k, v, y, degree=degree, scale=0.7)
        dense = _dense_formula(3.0 * x, q, k, v, y, degree, 0.7)
        assert rel_err(fast, dense) < 1e-11


def test_taylor_degree_meets_its_bound():
    for b in (0.1, 0.5, 1.0, 3.0):
        g = taylor_degree(b, 1e-3)
        assert math.exp(2 * b) * b ** (g + 1) / math.factorial(g + 1) <= 1e-3
        if g > 0:
            assert math.exp(2 * b) * b ** g / math.factorial(g) > 1e-3
    assert taylor_degree(0.0) == 0


def test_bad_inputs():
    x, q, k, v, y = instance()
    with pytest.raises(RankwiseError, match="degree"):
        fast_lora_grad(x, q, k, v, y, degree=-1)
    with pytest.raises(RankwiseError, match="same L"):
        fast_lora_grad(x, q, k, v, y[:-1])
    with pytest.raises(RankwiseError, match="scale"):
        fast_lora_grad(x, q, k, v, y, scale=0.0)
    with pytest.raises(RankwiseError, match="eps"):
        taylor_degree(1.0, eps=2.0)
