"""Sparse Spectral Training (SST; Zhao et al. 2024, arXiv 2405.15481): ``W = U diag(sigma) V^T``.

The layer keeps the full spectrum, ``k = min(m, n)`` singular triplets initialised from the SVD of the layer's init
weight. Every step all of ``sigma`` is trained; of the singular vectors only ``r`` sampled pairs ``(u_i, v_i)`` are
trained (the *active* ones, stored as parameters), the other ``k - r`` are frozen buffers without gradient or
optimizer state (the paper's Sec. 4.5 memory layout). ``perm`` maps storage to spectrum:
``[U_active, U_frozen] = U[:, perm]`` and ``sigma[perm]`` are their singular values, so
``W = [U_active, U_frozen] diag(sigma[perm]) [V_active, V_frozen]^T``.

Gradients (Sec. 4.2, ``G = dL/dW``): ``d sigma_i = u_i^T G v_i``; SST's *enhanced* gradient for the vectors drops
the ``sigma_i`` factor of the chain rule, ``d u_i = G v_i`` and ``d v_i = G^T u_i``, so that vectors of small
singular values still move (``enhanced_gradient=False`` gives the plain chain rule, ``sigma_i G v_i``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import _compute_dtype
from .ops import grouped, product_svd


def _spectrum(U_a, U_f, V_a, V_f, sigma, perm, dtype):
    """``[U_a, U_f]``, ``[V_a, V_f]`` and ``sigma[perm]`` in ``dtype`` (the storage order)."""
    return (torch.cat([U_a, U_f], 1).to(dtype), torch.cat([V_a, V_f], 1).to(dtype),
            sigma.index_select(0, perm).to(dtype))


class _SpectralFunction(torch.autograd.Function):
    """``F.linear(x, U diag(sigma) V^T, bias)`` saving only ``x`` (and the parameters), never the dense weight.

    Backward forms ``G = g^T x`` once and ``U^T G`` (k x n), whose first ``r`` rows are ``(G^T U_active)^T``:
    ``d sigma[perm] = rowsum(U^T G * V^T)``, ``d U_active = G V_active``, ``d V_active = G^T U_active`` (times
    ``sigma_active`` unless ``enhanced``), ``dx = g W``.
    """

    @staticmethod
    def forward(ctx, x, U_a, V_a, sigma, U_f, V_f, perm, bias, enhanced: bool, dtype: torch.dtype):
        x = x.to(dtype)
        ctx.save_for_backward(x, U_a, V_a, sigma, U_f, V_f, perm)
        ctx.enhanced, ctx.dtype, ctx.has_bias = enhanced, dtype, bias is not None
        U, V, s = _spectrum(U_a, U_f, V_a, V_f, sigma, perm, dtype)
        return F.linear(x, (U * s) @ V.t(), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, U_a, V_a, sigma, U_f, V_f, perm = ctx.saved_tensors
        dtype, r = ctx.dtype, U_a.shape[1]
        U, V, s = _spectrum(U_a, U_f, V_a, V_f, sigma, perm, dtype)
        g = grad_out.to(dtype).reshape(-1, grad_out.shape[-1])
        grad_x = grad_U = grad_V = grad_sigma = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ ((U * s) @ V.t())).view(x.shape)
        if any(ctx.needs_input_grad[1:4]):
            gw = g.t() @ x.reshape(-1, x.shape[-1])
            ug = U.t() @ gw
            scale = 1.0 if ctx.enhanced else s[:r]
            if ctx.needs_input_grad[1]:
                grad_U = ((gw @ V[:, :r]) * scale).to(U_a.dtype)
            if ctx.needs_input_grad[2]:
                grad_V = (ug[:r].t() * scale).to(V_a.dtype)
            if ctx.needs_input_grad[3]:
                grad_sigma = torch.empty_like(sigma).index_copy_(0, perm, (ug * V.t()).sum(1).to(sigma.dtype))
        if ctx.has_bias and ctx.needs_input_grad[7]:
            grad_bias = g.sum(0)
        return grad_x, grad_U, grad_V, grad_sigma, None, None, None, grad_bias, None, None


class SpectralLinear(nn.Module):
    """SST's layer: ``y = x (U diag(sigma) V^T)^T + b`` with ``r`` active singular-vector pairs (see module doc).

    Stored: ``U`` (out x r), ``V`` (in x r) and ``sigma`` (k) as parameters; ``U_frozen`` (out x (k - r)),
    ``V_frozen`` (in x (k - r)) and ``perm`` (k) as buffers: ``r (m + n) + k`` trained numbers, ``k (m + n)`` stored.
    """

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None, rank: int, enhanced_gradient: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.rank, self.k, self.enhanced_gradient = rank, min(weight.shape), enhanced_gradient
        kw = {"device": weight.device, "dtype": weight.dtype}
        if weight.device.type == "meta":
            U, s, V = (torch.empty(self.out_features, self.k, **kw), torch.empty(self.k, **kw),
                       torch.empty(self.in_features, self.k, **kw))
        else:
            U, s, Vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
            U, s, V = U.to(**kw), s.to(**kw), Vh.t().to(**kw)
        self.U = nn.Parameter(U[:, :rank].contiguous())
        self.V = nn.Parameter(V[:, :rank].contiguous())
        self.sigma = nn.Parameter(s)
        self.register_buffer("U_frozen", U[:, rank:].contiguous())
        self.register_buffer("V_frozen", V[:, rank:].contiguous())
        self.register_buffer("perm", torch.arange(self.k, device=weight.device))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SpectralFunction.apply(x, self.U, self.V, self.sigma, self.U_frozen, self.V_frozen, self.perm,
                                       self.bias, self.enhanced_gradient, _compute_dtype(x))

    def dense_weight(self) -> torch.Tensor:
        U, V, s = _spectrum(self.U, self.U_frozen, self.V, self.V_frozen, self.sigma, self.perm, self.sigma.dtype)
        return (U * s) @ V.t()

    def spectrum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)``, all ``k`` columns in spectrum order (column ``i`` belongs to ``sigma[i]``)."""
        U, V, _ = _spectrum(self.U, self.U_frozen, self.V, self.V_frozen, self.sigma, self.perm, self.sigma.dtype)
        return (torch.empty_like(U).index_copy_(1, self.perm, U), torch.empty_like(V).index_copy_(1, self.perm, V))

    @torch.no_grad()
    def set_spectrum(self, U: torch.Tensor, sigma: torch.Tensor, V: torch.Tensor, active: torch.Tensor) -> None:
        """Store ``U diag(sigma) V^T`` (columns in spectrum order) with the ``r`` indices ``active`` trained."""
        frozen = torch.ones(self.k, dtype=torch.bool, device=active.device)
        frozen[active] = False
        perm = torch.cat([active, torch.arange(self.k, device=active.device)[frozen]])
        r = self.rank
        self.sigma.copy_(sigma)
        self.perm.copy_(perm)
        self.U.copy_(U[:, perm[:r]])
        self.V.copy_(V[:, perm[:r]])
        self.U_frozen.copy_(U[:, perm[r:]])
        self.V_frozen.copy_(V[:, perm[r:]])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, " \
               f"active={self.rank}, bias={self.bias is not None}, enhanced_gradient={self.enhanced_gradient}"


def sampling_probabilities(sigma: torch.Tensor, uniform_mix: float) -> torch.Tensor:
    """``p_i = mix / k + (1 - mix) sigma_i / sum(sigma)``: SST's multinomial over the spectrum (``mix = 0``:
    proportional to ``sigma``, as the abstract words it; the ICML 2025 text, as far as we could read it, writes
    ``p(i) = (1/m + Sigma_i / sum_j Sigma_j) / 2``, i.e. ``mix = 1/2``)."""
    sigma = sigma.detach().double().clamp_min(0)
    uniform = torch.full_like(sigma, 1.0 / sigma.numel())
    total = sigma.sum()
    return uniform if total <= 0 else uniform_mix * uniform + (1 - uniform_mix) * sigma / total


def sample_active(sigma: torch.Tensor, rank: int, uniform_mix: float, generator: torch.Generator) -> torch.Tensor:
    """``rank`` distinct indices drawn from ``sampling_probabilities`` (multinomial without replacement, on CPU so
    that a seed gives the same draw on every device). Zero probabilities (``sigma_i = 0`` with ``mix = 0``) become
    1e-30, so that ``rank`` distinct indices exist; they are drawn only once the rest is exhausted."""
    p = sampling_probabilities(sigma, uniform_mix).cpu()
    p = torch.where(p > 0, p, torch.full_like(p, 1e-30))
    return torch.multinomial(p, rank, replacement=False, generator=generator).to(sigma.device)


def round_generator(seed: int, layer: int, resample: int) -> torch.Generator:
    """The generator of layer ``layer``'s ``resample``-th draw: a pure function of (seed, layer, step)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + layer) * 1_000_033 + resample)


@torch.no_grad()
def project_(layers: list[SpectralLinear]) -> None:
    """After each optimizer step (Sec. 4.1): unit-normalize the active singular vectors (the magnitudes live in
    ``sigma``) and clamp ``sigma >= 0`` (``max(sigma, 0)``), for all layers at once."""
    if not layers:
        return
    vectors = [p for layer in layers for p in (layer.U, layer.V)]
    torch._foreach_div_(vectors, [v.norm(dim=0, keepdim=True).clamp_min_(1e-30) for v in vectors])
    torch._foreach_clamp_min_([layer.sigma for layer in layers], 0.0)


@torch.no_grad()
def resvd(layers: list[SpectralLinear]) -> None:
    """Re-SVD (Algorithm 1, end of each round): ``U diag(sigma) V^T = U' diag(sigma') V'^T``, restoring orthonormal
    singular vectors without changing the product (``ops.product_svd`` in float64, batched over equal shapes).
    The active indices are kept as positions; callers resample right after."""
    for group in grouped(layers, lambda l: (l.out_features, l.in_features, l.sigma.device, l.sigma.dtype)):
        spectra = [layer.spectrum() for layer in group]
        Bs = torch.stack([U * layer.sigma for (U, _), layer in zip(spectra, group)]).double()
        As = torch.stack([V.t() for _, V in spectra]).double()
        U, s, Vh = product_svd(Bs, As)
        for layer, u, si, vh in zip(group, U, s, Vh):
            dtype = layer.sigma.dtype
            layer.set_spectrum(u.to(dtype), si.to(dtype), vh.t().to(dtype), layer.perm[:layer.rank].clone())
