"""EoRA (Liu et al. 2024, arXiv 2410.21271): training-free low-rank compensation of a compressed model in the
eigenspace of calibration activations.

For a linear layer with original weight ``W``, compressed weight ``W_c`` (quantized, or WeLore's low-rank) and
calibration inputs ``X`` (in x tokens), the compression error ``dW = W - W_c`` is projected into the eigenspace of
``X X^T = Q Lambda Q^T``, truncated to rank ``r`` there and mapped back:

    Q' = Q Lambda^{1/2},     dW Q' = U S V^T,     Delta W = (U_r S_r V_r^T) Q'^{-1} = B A,
    B = U_r S_r^{1/2},       A = S_r^{1/2} V_r^T Lambda^{-1/2} Q^T

Since ``||(dW - M) X||_F = ||(dW - M) Q'||_F``, ``Delta W`` is the rank-r ``M`` of least output error on the
calibration data (Eckart-Young in the whitened space); plain SVD truncation of ``dW`` minimises ``||dW - M||_F``
instead. Non-positive eigenvalues are raised to the smallest positive one (the authors' ``EoRA/eora.py``).

As in the authors' code, layers are compensated block by block: the activations of block ``i`` are collected with
blocks ``< i`` already compressed and compensated, so each block corrects for the error its inputs carry.
``compensate`` attaches each ``B A`` as a LoRA adapter named ``eora`` (scaling 1) on the compressed layer, so
``adapters.save_adapter(model, DIR, "eora")`` writes it in PEFT's format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RankwiseError

ADAPTER = "eora"
_BLOCK = re.compile(r"\.(\d+)\.")


def eora_factors(dw: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B A`` the rank-``rank`` EoRA approximation of ``dw`` (out x in) for inputs whose second
    moment is ``gram`` (in x in, ``X X^T``), computed in float64."""
    if not isinstance(rank, int) or rank <= 0:
        raise RankwiseError(f"EoRA rank must be a positive integer, got {rank!r}")
    lam, q = torch.linalg.eigh(gram.double())
    positive = lam[lam > 0]
    if positive.numel() == 0:
        raise RankwiseError("the calibration activations of a layer are all zero; EoRA needs calibration data")
    lam = torch.where(lam > 0, lam, positive.min())
    root = lam.sqrt()
    u, s, vh = torch.linalg.svd(dw.double() @ (q * root), full_matrices=False)
    r = min(rank, s.numel())
    half = s[:r].sqrt()
    b = u[:, :r] * half
    a = (half[:, None] * vh[:r]) @ (q / root).T
    return b.to(dw.dtype), a.to(dw.dtype)


def svd_factors(dw: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: plain truncated SVD of ``dw`` (the authors' ``--lowrank_method svd``)."""
    u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
    half = s[:rank].sqrt()
    return (u[:, :rank] * half).to(dw.dtype), (half[:, None] * vh[:rank]).to(dw.dtype)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``out x in`` matrix a (compressed) linear layer applies, in fp32."""
    from ..quant import dequantize

    return dequantize(module.weight, torch.float32).detach()


def _groups(names: list[str]) -> list[list[str]]:
    """Layer names grouped by transformer block (the first ``.N.`` in the name), in block order; the rest last."""
    blocks: dict[int, list[str]] = {}
    rest = []
    for n in names:
        m = _BLOCK.search(f".{n}.")
        (blocks.setdefault(int(m.group(1)), []) if m else rest).append(n)
    return [blocks[i] for i in sorted(blocks)] + ([rest] if rest else [])


@torch.no_grad()
def _grams(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``X X^T`` (float64, summed over every token) of each named layer's input on ``batches``."""
    grams: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model(input_ids=batch[:, :-1].to(device))
    finally:
        for h in handles:
            h.remove()
    return grams


@dataclass
class Compensation:
    rank: int
    layers: list[str]
    weighted_error_before: float   # sum over layers of ||dW X||_F^2 / ||W X||_F^2 (mean), compressed
    weighted_error_after: float    # the same with the compensation added

    def as_dict(self) -> dict:
        return {"eora_rank": self.rank, "eora_layers": len(self.layers),
                "eora_weighted_error_before": self.weighted_error_before,
                "eora_weighted_error_after": self.weighted_error_after}


@torch.no_grad()
def compensate(model: nn.Module, compressed: dict[str, nn.Module], batches: list[torch.Tensor], rank: int,
               method: str = "eigen") -> Compensation:
    """Replace, in place, each layer ``name`` of ``model`` (still original) by ``compressed[name]`` plus its EoRA
    compensation (``method="svd"``: the plain SVD baseline), block by block on the calibration ``batches``."""
    from ..adapters.inject import attach, build_parameterization

    if method not in ("eigen", "svd"):
        raise RankwiseError(f"unknown compensation {method!r}; valid: eigen, svd")
    if not batches:
        raise RankwiseError("EoRA needs calibration batches (--calib-batches > 0)")
    names = list(compressed)
    before, after = [], []
    for group in _groups(names):
        grams = _grams(model, group, batches)
        params = {}
        for n in group:
            w = dense_weight(model.get_submodule(n))
            dw = w - dense_weight(compressed[n])
            b, a = eora_factors(dw, grams[n], rank) if method == "eigen" else svd_factors(dw, rank)
            g = grams[n].float()
            norm = torch.trace(w @ g @ w.T).clamp_min(1e-30)
            before.append((torch.trace(dw @ g @ dw.T) / norm).item())
            rest = dw - b @ a
            after.append((torch.trace(rest @ g @ rest.T) / norm).item())
            base = compressed[n]
            model.set_submodule(n, base)
            param = build_parameterization("lora", base, {"r": b.shape[1], "alpha": float(b.shape[1])}, n)
            param.import_state({"lora_A.weight": a.to(param.lora_A.dtype), "lora_B.weight": b.to(param.lora_B.dtype)})
            params[n] = param.eval()
        attach(model, ADAPTER, params)
    return Compensation(rank, names, sum(before) / len(before), sum(after) / len(after))
