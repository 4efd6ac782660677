"""SST against an independent oracle of the paper's update, step for step, across draws and re-SVDs.

Reference: Zhao et al., "Sparse Spectral Training and Inference on Euclidean and Hyperbolic Neural Networks"
(arXiv 2405.15481), Algorithm 1 and Secs. 4.1-4.5: ``W = U diag(sigma) V^T`` from the SVD of the init weight; every
step AdamW on all of ``sigma`` (gradient ``u_i^T G v_i``) and on the sampled columns ``U[:, I]``, ``V[:, I]`` with
the enhanced gradient ``G v_i`` / ``G^T u_i`` (``G = dL/dW``); then unit columns and ``sigma = max(sigma, 0)``;
every T3 steps a new ``I`` ~ multinomial without replacement of ``1/2 (1/k + sigma_i / sum sigma)`` and fresh Adam
state for the vectors; every T2 draws a re-SVD of ``U diag(sigma) V^T`` first (and fresh state for ``sigma``).

The oracle keeps the full ``U``, ``V`` and ``sigma`` as plain tensors, gets ``G`` from autograd through a dense leaf
``W``, applies a hand-written AdamW to the masked columns and re-SVDs the dense product with ``torch.linalg.svd``;
rankwise splits active / frozen storage, uses its own backward and a QR-reduced SVD. Singular vectors are compared
through the products (an SVD fixes them only up to sign). The target weights get a well-separated spectrum away from
0 (``linspace(1, 0.1)``): where singular values coincide, or sit clamped at 0, an SVD's vectors are not unique and
two correct implementations part ways at the next re-SVD.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from ref_model import TOL, batches, loss_of, tiny_llama
from torch import nn

from rankwise import methods
from rankwise.methods import OptimConfig

RANK, T3, T2, LR, WD, STEPS, SEED = 8, 4, 2, 1e-3, 0.1, 32, 5
BETAS, EPS = (0.9, 0.999), 1e-6  # a fresh Adam step is g / (|g| + eps): 1e-8 would amplify fp32 noise of
# near-zero gradient entries by lr / eps = 1e5 right after every draw


class OracleSST(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        U, s, Vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
        self.U, self.s, self.V = U.float(), s.float(), Vh.t().float()
        self.k = s.numel()
        self.W = None

    def forward(self, x):
        self.W = ((self.U * self.s) @ self.V.t()).requires_grad_(True)
        return F.linear(x, self.W)

    def product(self):
        return (self.U * self.s) @ self.V.t()

    def draw(self, layer: int, t: int):
        sigma = self.s.double().clamp_min(0)
        p = 0.5 / self.k + 0.5 * sigma / sigma.sum()
        g = torch.Generator().manual_seed((SEED * 1_000_003 + layer) * 1_000_033 + t)
        self.active = torch.multinomial(p, RANK, replacement=False, generator=g)
        self.vec_state = [torch.zeros(self.U.shape[0], RANK), torch.zeros(self.U.shape[0], RANK),
                          torch.zeros(self.V.shape[0], RANK), torch.zeros(self.V.shape[0], RANK), 0]

    def resvd(self):
        U, s, Vh = torch.linalg.svd(self.product().double(), full_matrices=False)
        self.U, self.s, self.V = U.float(), s.float(), Vh.t().float()
        self.sigma_state = [torch.zeros(self.k), torch.zeros(self.k), 0]


def adamw(p, g, m, v, t, decay):
    p = p * (1 - LR * decay)
    m.mul_(BETAS[0]).add_((1 - BETAS[0]) * g)
    v.mul_(BETAS[1]).add_((1 - BETAS[1]) * g * g)
    denom = (v.sqrt() / (1 - BETAS[1] ** t) ** 0.5) + EPS
    return p - LR / (1 - BETAS[0] ** t) * m / denom


@torch.no_grad()
def oracle_step(layers: list[OracleSST], step: int):
    for layer in layers:
        G, A = layer.W.grad, layer.active
        g_sigma = torch.einsum("ik,ij,jk->k", layer.U, G, layer.V)
        g_U, g_V = G @ layer.V[:, A], G.t() @ layer.U[:, A]
        ms, vs, ts = layer.sigma_state
        layer.sigma_state[2] = ts = ts + 1
        layer.s = adamw(layer.s, g_sigma, ms, vs, ts, decay=0.0)  # a vector: no weight decay
        mU, vU, mV, vV, t = layer.vec_state
        layer.vec_state[4] = t = t + 1
        U_new, V_new = adamw(layer.U[:, A], g_U, mU, vU, t, WD), adamw(layer.V[:, A], g_V, mV, vV, t, WD)
        layer.U[:, A] = U_new / U_new.norm(dim=0)
        layer.V[:, A] = V_new / V_new.norm(dim=0)
        layer.s = layer.s.clamp(min=0)
    if step % T3 == 0:
        for i, layer in enumerate(layers):
            if (step // T3) % T2 == 0:
                layer.resvd()
            layer.draw(i, step // T3)


def oracle_model(base: nn.Module):
    model = copy.deepcopy(base)
    names = targets(model)
    layers = [OracleSST(model.get_submodule(n)) for n in names]
    for i, (n, layer) in enumerate(zip(names, layers)):
        model.set_submodule(n, layer)
        layer.sigma_state = [torch.zeros(layer.k), torch.zeros(layer.k), 0]
        layer.draw(i, 0)
    return model, layers


def targets(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ("attn" in n or "mlp" in n)]


@torch.no_grad()
def separated_spectra(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for n in targets(model):
        w = model.get_submodule(n).weight
        (m, k), q = w.shape, min(w.shape)
        left = torch.linalg.qr(torch.randn(m, q, generator=g))[0]
        right = torch.linalg.qr(torch.randn(w.shape[1], q, generator=g))[0]
        w.copy_((left * torch.linspace(1.0, 0.1, q)) @ right.t())
    return model


def test_sst_equals_the_oracle_over_draws_and_resvds():
    base = separated_spectra(tiny_llama(seed=0))
    method = methods.get("sst", rank=RANK, resample_every=T3, resamples_per_svd=T2, seed=SEED)
    ours = method.prepare(copy.deepcopy(base))
    ref, oracle = oracle_model(base)
    assert len(oracle) == len(method.layers) == 14
    shapes = {tuple(layer.U.shape[:1]) + (layer.V.shape[0],) for layer in method.layers}
    assert {(64, 64), (32, 64), (96, 64), (64, 96)} <= shapes
    opt = method.build_optimizer(ours, OptimConfig(lr=LR, weight_decay=WD, betas=BETAS, eps=EPS))
    opt_ref = methods.Method().build_optimizer(ref, OptimConfig(lr=LR, weight_decay=WD, betas=BETAS, eps=EPS))
    trace, draws_checked = [], 0
    for step, batch in enumerate(batches(STEPS), start=1):
        for model, o in ((ours, opt), (ref, opt_ref)):
            o.zero_grad(set_to_none=True)
            loss_of(model, batch).backward()
            o.step()
        method.after_step(step, ours, opt)
        oracle_step(oracle, step)
        for a, b in zip(method.layers, oracle):
            if step % T3 == 0:
                # the same draw (as a set: fp32 ties between near-equal sampling keys may order it otherwise)
                assert torch.equal(a.perm[:RANK].sort().values, b.active.sort().values)
                draws_checked += 1
        diff = max(max((a.dense_weight() - b.product()).abs().max().item(),
                       (a.sigma - b.s).abs().max().item()) for a, b in zip(method.layers, oracle))
        ours_params = dict(ours.named_parameters())
        rest = max((ours_params[n] - q).abs().max().item() for n, q in ref.named_parameters())  # embeddings, norms
        trace.append(max(diff, rest))
    assert max(trace) <= TOL, trace
    assert draws_checked == 14 * (STEPS // T3)
    start = [base.get_submodule(n).weight for n in targets(base)]
    assert max((a.dense_weight() - w).abs().max().item() for a, w in zip(method.layers, start)) > 1e3 * TOL
