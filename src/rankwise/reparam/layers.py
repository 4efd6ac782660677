"""Weight-space parameterizations of a linear layer, trained from scratch.

- ``LowRankLinear``: ``W = B A`` with ``B`` (out x r), ``A`` (r x in): ``r (in + out)`` parameters.
- ``SparseLowRankLinear`` (SLTrain, Han et al. 2024): ``W = (alpha / r) B A + S`` where ``S`` has a random, fixed
  support of ``floor(delta * out * in)`` entries; only its values (and their flat indices, a buffer) are stored.
  Optionally ``tanh(c) B A + S`` with a trained scalar ``c`` (``trainable_scaling``).
- ``ReLoRALinear`` (ReLoRA, Lialin et al. 2023): ``W + (alpha / r) B A`` with ``W`` frozen; ``merge_and_reinit``
  folds ``B A`` into ``W`` and restarts the factors (``B = 0``), which leaves the function unchanged.

Every layer exposes ``factors() -> (B, A)`` (the trainable low-rank pair, refactorized by ``ops.refactorize``) and
``dense_weight()`` (the effective ``out x in`` matrix, for tests and export).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _kaiming_uniform_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    """``nn.Linear``'s default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5))."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        if t.device.type == "meta":
            return t
        return t.uniform_(-bound, bound)


class LowRankLinear(nn.Module):
    """``y = x (B A)^T + b``: a rank-``r`` linear layer trained from scratch.

    Init: ``A, B ~ N(0, s^2)`` i.i.d. with ``s^2 = std / sqrt(r)``, so every entry of ``B A`` has variance ``std^2``
    (the dense layer's init, e.g. LLaMA's ``initializer_range`` 0.02) and the factors are balanced.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, std: float = 0.02,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        s = math.sqrt(std / math.sqrt(rank))
        if self.lora_A.device.type != "meta":
            with torch.no_grad():
                self.lora_A.normal_(0.0, s)
                self.lora_B.normal_(0.0, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B, self.bias)

    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.lora_B, self.lora_A

    def dense_weight(self) -> torch.Tensor:
        return self.lora_B @ self.lora_A

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}"


def _compose(B: torch.Tensor, A: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scale: float,
             dtype: torch.dtype) -> torch.Tensor:
    """The dense ``scale * B A + S`` in ``dtype`` (a transient: it is never saved for backward)."""
    w = (B.to(dtype) @ A.to(dtype)).mul_(scale)
    w.view(-1).index_add_(0, indices, values.to(dtype))
    return w


class _SparseLowRankFunction(torch.autograd.Function):
    """``F.linear(x, scale * B A + S, bias)`` that saves only ``x`` and the factors, not the dense weight.

    Backward rebuilds ``W`` and forms ``G = g^T x`` once: ``dB = scale G A^T``, ``dA = scale B^T G``,
    ``dvalues = G.flat[indices]`` (a gather), ``dx = g W``. Computation runs in ``dtype`` (the autocast dtype).
    """

    @staticmethod
    def forward(ctx, x, B, A, values, indices, bias, scale: float, dtype: torch.dtype):
        x = x.to(dtype)
        ctx.save_for_backward(x, B, A, values, indices)
        ctx.scale, ctx.dtype, ctx.has_bias = scale, dtype, bias is not None
        w = _compose(B, A, values, indices, scale, dtype)
        return F.linear(x, w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, B, A, values, indices = ctx.saved_tensors
        scale, dtype = ctx.scale, ctx.dtype
        g = grad_out.to(dtype).reshape(-1, grad_out.shape[-1])
        grad_x = grad_B = grad_A = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ _compose(B, A, values, indices, scale, dtype)).view(x.shape)
        if any(ctx.needs_input_grad[1:4]):
            gw = g.t() @ x.reshape(-1, x.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_B = (gw @ A.to(dtype).t()).mul_(scale).to(B.dtype)
            if ctx.needs_input_grad[2]:
                grad_A = (B.to(dtype).t() @ gw).mul_(scale).to(A.dtype)
            if ctx.needs_input_grad[3]:
                grad_values = gw.view(-1).index_select(0, indices).to(values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_bias = g.sum(0)
        return grad_x, grad_B, grad_A, grad_values, None, grad_bias, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class SparseLowRankLinear(nn.Module):
    """SLTrain: ``W = (alpha / r) B A + S``, ``S`` supported on ``floor(delta * out * in)`` random fixed positions.

    Stored: ``lora_B`` (out x r, zeros), ``lora_A`` (r x in) and ``sparse_values`` (nnz) as parameters initialised
    like ``nn.Linear`` (U(+-1/sqrt(in))), ``sparse_indices`` (nnz flat row-major positions, sorted, int32 when they
    fit) as a buffer: no dense mask anywhere; the bias, if any, is U(+-1/sqrt(out)). Initialised as SLTrain's
    ``SpLoRaLinear`` (andyjm3/SLTrain, ``splora/splora_linear.py``), drawing from the global generator in its
    order (bias, A, support, values), so the same seed gives the same layer. ``trainable_scaling`` replaces
    ``alpha / r`` by ``tanh(c)``, ``c`` a trained scalar starting at 1 (the reference's option of that name).
    Defaults follow SLTrain's scripts (r=128, alpha=32, delta=0.03).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, density: float = 0.03, alpha: float = 32.0,
                 bias: bool = False, trainable_scaling: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.density, self.alpha, self.trainable_scaling = density, alpha, trainable_scaling
        kw = {"device": device, "dtype": dtype}
        numel = in_features * out_features
        nnz = int(density * numel)
        self.bias = nn.Parameter(_kaiming_uniform_(torch.empty(out_features, **kw), out_features)) if bias else None
        self.lora_A = nn.Parameter(_kaiming_uniform_(torch.empty(rank, in_features, **kw), in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.scaling = nn.Parameter(torch.ones(1, **kw)) if trainable_scaling else None
        index_dtype = torch.int32 if numel < 2**31 else torch.int64
        if self.lora_A.device.type == "meta":
            indices = torch.empty(nnz, dtype=index_dtype, device="meta")
        else:
            perm = torch.randperm(numel)[:nnz]
            indices = perm.sort().values.to(device=self.lora_A.device, dtype=index_dtype)
        self.register_buffer("sparse_indices", indices)
        self.sparse_values = nn.Parameter(_kaiming_uniform_(torch.empty(nnz, **kw), in_features))

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``tanh(c)`` with ``trainable_scaling`` (as a float: for reading, not for autograd)."""
        return self.scaling.tanh().item() if self.scaling is not None else self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaling is None:
            A, scale = self.lora_A, self.alpha / self.rank
        else:  # the reference's form: the scale folded into A, so autograd gives dc
            A, scale = self.lora_A * self.scaling.tanh().to(self.lora_A.dtype), 1.0
        return _SparseLowRankFunction.apply(x, self.lora_B, A, self.sparse_values, self.sparse_indices,
                                            self.bias, scale, _compute_dtype(x))

    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.lora_B, self.lora_A

    def dense_weight(self) -> torch.Tensor:
        if self.scaling is None:
            return _compose(self.lora_B, self.lora_A, self.sparse_values, self.sparse_indices,
                            self.alpha / self.rank, self.lora_A.dtype)
        return _compose(self.lora_B, self.lora_A * self.scaling.tanh(), self.sparse_values, self.sparse_indices,
                        1.0, self.lora_A.dtype)

    def extra_repr(self) -> str:
        scale = "tanh(trained)" if self.trainable_scaling else f"alpha={self.alpha}"
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"density={self.density}, nnz={self.sparse_values.numel()}, {scale}"


class ReLoRALinear(nn.Module):
    """ReLoRA: ``y = x W^T + (alpha / r) x (B A)^T + b`` with ``W`` frozen (the dense init) and ``B A`` trained.

    ``merge_and_reinit`` sets ``W <- W + (alpha / r) B A``, ``B <- 0``, ``A <- U(+-1/sqrt(in))``: the layer's
    function is unchanged at the merge, and the next cycle learns a new rank-``r`` increment.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 32.0):
        super().__init__()
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        self.alpha, self.scale = alpha, alpha / rank
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = base.bias
        self.lora_A = nn.Parameter(_kaiming_uniform_(torch.empty(rank, self.in_features, **kw), self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.lora_B, self.lora_A

    def dense_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merge_and_reinit(self) -> None:
        self.weight.addmm_(self.lora_B, self.lora_A, alpha=self.scale)
        self.lora_B.zero_()
        _kaiming_uniform_(self.lora_A, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"alpha={self.alpha}"


class ChannelSparseLowRankLinear(nn.Module):
    """LOST (Li et al. 2025, arXiv 2508.02668): ``y = gamma x (B A)^T + (1 - gamma) x[:, I] W_s^T + b``.

    Init from the SVD of the layer's init weight ``W = U S V^T``: ``B = U_r S_r^1/2``, ``A = S_r^1/2 V_r^T`` (the
    dominant rank-``r`` part); ``I`` = the ``max(1, floor(sparsity * in))`` input channels with the largest L2
    column norm of the next ``k = min(svd_rank, min(m, n) - r)`` singular components
    ``W_comp = U_{r:r+k} S_{r:r+k} V_{r:r+k}^T`` (sorted); ``W_s = W[:, I]`` (out x |I|), the init weight's columns
    there, as in the reference code (JiaxiLi1/LOST-Low-rank-and-Sparse-Training-for-Large-Language-Models,
    ``HybridSparseLinear.initialize_mask``). ``B``, ``A`` and ``W_s`` are trained; ``I`` is a fixed buffer.
    Dense equivalent: ``gamma B A + (1 - gamma) S`` with ``S[:, I] = W_s`` and zeros elsewhere.
    """

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None, rank: int, sparsity: float = 0.05,
                 gamma: float = 0.5, svd_rank: int = 256):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.rank, self.sparsity, self.gamma = rank, sparsity, gamma
        kw = {"device": weight.device, "dtype": weight.dtype}
        n_channels = max(1, int(sparsity * self.in_features))
        if weight.device.type == "meta":
            B, A = torch.empty(self.out_features, rank, **kw), torch.empty(rank, self.in_features, **kw)
            channels = torch.empty(n_channels, dtype=torch.long, device="meta")
            values = torch.empty(self.out_features, n_channels, **kw)
        else:
            U, s, Vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
            root = s[:rank].sqrt()
            B, A = (U[:, :rank] * root).to(**kw), (root.unsqueeze(1) * Vh[:rank]).to(**kw)
            k = min(svd_rank, s.numel() - rank)
            comp = (U[:, rank:rank + k] * s[rank:rank + k]) @ Vh[rank:rank + k]
            channels = comp.norm(dim=0).topk(n_channels).indices.sort().values
            values = weight.detach()[:, channels].clone()
        self.lora_A, self.lora_B = nn.Parameter(A.contiguous()), nn.Parameter(B.contiguous())
        self.sparse_values = nn.Parameter(values)
        self.register_buffer("sparse_channels", channels)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(F.linear(x, self.lora_A), self.lora_B)
        sparse = F.linear(x.index_select(-1, self.sparse_channels), self.sparse_values)
        out = low.mul(self.gamma).add_(sparse, alpha=1.0 - self.gamma)
        return out if self.bias is None else out + self.bias

    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.lora_B, self.lora_A

    def dense_weight(self) -> torch.Tensor:
        w = (self.lora_B @ self.lora_A).mul(self.gamma)
        return w.index_add(1, self.sparse_channels, self.sparse_values, alpha=1.0 - self.gamma)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"channels={self.sparse_channels.numel()}, gamma={self.gamma}, bias={self.bias is not None}"
