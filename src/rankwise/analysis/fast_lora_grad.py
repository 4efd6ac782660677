"""Almost-linear LoRA gradients of one attention head in the bounded-norm regime (a reference implementation).

Hu et al. 2024, "Computational Limits of Low-Rank Adaptation (LoRA) Fine-Tuning for Transformer Models"
(arXiv 2406.03136), Sections 3-4: for the LoRA loss of one attention head

    L = 1/2 || D^{-1} exp(s X W_Q W_K^T X^T) X W_V - Y ||_F^2,   W_mu = W*_mu + (alpha / r) B_mu A_mu,
    D = diag(exp(s X W_Q W_K^T X^T) 1_L),

the gradients w.r.t. the adapters can be approximated in L^{1+o(1)} time when the entries of Q = X W_Q and
K = X W_K are bounded by Gamma = o(sqrt(log L)); above that threshold no truly sub-quadratic algorithm exists
(assuming SETH). The algorithm is the polynomial method of Alman & Song 2023 ("Fast Attention Requires Bounded
Entries", arXiv 2302.13214): exp(s <q, k>) on |s <q, k>| <= Gamma^2 is replaced by a degree-g polynomial
P(<q, k>) = <phi(q), phi(k)>, so the L x L attention matrix is never formed but kept as U V^T with
U = phi(Q), V = phi(K) of rank R = C(d + g, g); every later factor (the Hadamard product with dO V^T, the row
normalisation) keeps a low-rank form (the paper's "chained low-rank approximations"), giving O(L R d^2) work.

Here P is the degree-g Taylor polynomial of exp (the papers use a Chebyshev-type polynomial of slightly lower
degree; any polynomial works with the same algebra), and phi lists the monomials q^a / sqrt(a!) (|a| <= g),
because <q, k>^j / j! = sum_{|a| = j} q^a k^a / a!. With P = exp the result is the exact gradient; the error
therefore comes only from the polynomial, whose relative error per entry on |x| <= b is at most
e^{2b} b^{g+1} / (g+1)! (Taylor remainder), which shrinks as the norm bound tightens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import RankwiseError


@dataclass
class LoRAFactors:
    """One projection: frozen ``weight`` (d_in x d_out, applied as ``X @ weight``) and LoRA factors
    ``B`` (d_in x r), ``A`` (r x d_out) with scaling ``alpha / r`` (the paper's convention)."""

    weight: torch.Tensor
    B: torch.Tensor
    A: torch.Tensor
    alpha: float = 1.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.A.shape[0]

    def merged(self) -> torch.Tensor:
        return self.weight + self.scaling * self.B @ self.A


@lru_cache(maxsize=32)
def monomial_exponents(d: int, degree: int) -> torch.Tensor:
    """Every multi-index ``a`` in N^d with ``|a| <= degree`` (rows, int64): C(d + degree, degree) of them."""
    rows = [[]]
    for _ in range(d):
        rows = [r + [e] for r in rows for e in range(degree + 1 - sum(r))]
    return torch.tensor(rows, dtype=torch.long)


def polynomial_features(x: torch.Tensor, degree: int) -> torch.Tensor:
    """``phi(x)`` (``L x R``) with ``<phi(q), phi(k)> = sum_{j<=degree} <q, k>^j / j!`` (monomials / sqrt(a!))."""
    exps = monomial_exponents(x.shape[-1], degree).to(x.device)                      # R x d
    powers = x.unsqueeze(-1) ** torch.arange(degree + 1, device=x.device, dtype=x.dtype)  # L x d x (g+1)
    cols = torch.arange(x.shape[-1], device=x.device)
    mono = powers[:, cols, exps].prod(-1)                                              # L x R
    log_fact = torch.lgamma(exps.to(x.dtype) + 1).sum(-1)
    return mono * torch.exp(-0.5 * log_fact)


def feature_rank(d: int, degree: int) -> int:
    """Rank ``C(d + g, g)`` of the polynomial factorisation of the attention matrix."""
    return math.comb(d + degree, degree)


def taylor_degree(bound: float, eps: float = 1e-3, max_degree: int = 10_000) -> int:
    """Smallest g whose Taylor remainder keeps every entry of exp on [-bound, bound] within relative ``eps``:
    ``e^{2 bound} bound^{g+1} / (g+1)! <= eps`` (``max_degree`` if none up to it does)."""
    if bound < 0 or not 0 < eps < 1:
        raise RankwiseError(f"need bound >= 0 and eps in (0, 1), got bound={bound}, eps={eps}")
    for g in range(max_degree + 1):
        if 2 * bound + (g + 1) * math.log(max(bound, 1e-300)) - math.lgamma(g + 2) <= math.log(eps):
            return g
    return max_degree


def lora_attention_loss(x: torch.Tensor, q: LoRAFactors, k: LoRAFactors, v: LoRAFactors, y: torch.Tensor,
                        scale: float = 1.0) -> torch.Tensor:
    """The paper's LoRA loss of one head, exactly (quadratic in L): ``1/2 ||softmax(s Q K^T) V - Y||_F^2``."""
    scores = scale * (x @ q.merged()) @ (x @ k.merged()).T
    out = torch.softmax(scores, dim=-1) @ (x @ v.merged())
    return 0.5 * (out - y).square().sum()


def fast_lora_grad(x: torch.Tensor, q: LoRAFactors, k: LoRAFactors, v: LoRAFactors, y: torch.Tensor,
                   degree: int = 6, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Gradients of ``lora_attention_loss`` w.r.t. ``A_Q, B_Q, A_K, B_K, A_V, B_V`` in O(L R d^2) time and
    O(L R + R d^2) memory, without forming any L x L matrix (keys ``"A_Q"``, ``"B_Q"``, ...).

    ``x``: L x d_in, ``y``: L x d_v; projections map d_in to d (Q, K) and d_v (V).
    """
    if x.dim() != 2 or y.dim() != 2 or y.shape[0] != x.shape[0]:
        raise RankwiseError(f"x must be L x d and y L x d_v with the same L, got {list(x.shape)}, {list(y.shape)}")
    if not isinstance(degree, int) or degree < 0:
        raise RankwiseError(f"degree must be a non-negative integer, got {degree!r}")
    if scale <= 0:
        raise RankwiseError(f"scale must be > 0, got {scale}")
    root = math.sqrt(scale)
    Q, K, V = x @ q.merged(), x @ k.merged(), x @ v.merged()
    U = polynomial_features(root * Q, degree)                  # attention ~ U W^T   (L x R each)
    W = polynomial_features(root * K, degree)
    rows = U @ W.sum(0)                                        # D = diag(U W^T 1)
    out = (U @ (W.T @ V)) / rows[:, None]                      # D^{-1} U W^T V
    dO = out - y
    delta = (dO * out).sum(-1)                                 # delta_i = <dP_i, P_i> = <dO_i, O_i>
    Un = U / rows[:, None]                                     # P = Un W^T

    # dS = P o (dO V^T) - diag(delta) P  (softmax backward). P o (dO V^T) = (Un * dO) (W * V)^T, rank R d_v,
    # applied through R x d_v x d cores so that only L x R x d_v products are ever formed.
    core_k = torch.einsum("ja,jb,jc->abc", W, V, K)            # R x d_v x d
    dS_K = torch.einsum("ia,ib,abc->ic", Un, dO, core_k) - delta[:, None] * (Un @ (W.T @ K))
    core_q = torch.einsum("ia,ib,ic->abc", Un, dO, Q)
    dS_T_Q = torch.einsum("ja,jb,abc->jc", W, V, core_q) - W @ (Un.T @ (delta[:, None] * Q))
    dV = W @ (Un.T @ dO)                                       # P^T dO

    grads: dict[str, torch.Tensor] = {}
    for tag, f, dproj in (("Q", q, scale * dS_K), ("K", k, scale * dS_T_Q), ("V", v, dV)):
        dW = x.T @ dproj                                       # dL/dW_mu (d_in x d_out)
        grads[f"B_{tag}"] = f.scaling * dW @ f.A.T
        grads[f"A_{tag}"] = f.scaling * f.B.T @ dW
    return grads


def exact_lora_grad(x: torch.Tensor, q: LoRAFactors, k: LoRAFactors, v: LoRAFactors, y: torch.Tensor,
                    scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The same gradients by autograd through the exact (quadratic) loss, for checks."""
    leaves = {f"{n}_{t}": getattr(f, n).detach().clone().requires_grad_(True)
              for t, f in (("Q", q), ("K", k), ("V", v)) for n in ("A", "B")}
    fs = {t: LoRAFactors(f.weight, leaves[f"B_{t}"], leaves[f"A_{t}"], f.alpha) for t, f in (("Q", q), ("K", k),
                                                                                            ("V", v))}
    loss = lora_attention_loss(x, fs["Q"], fs["K"], fs["V"], y, scale)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads))
