"""WeLore: data-agnostic, one-shot, non-uniform rank reduction (Jaiswal et al. 2024, "From GaLore to WeLore: How
Low-Rank Weights Non-uniformly Emerge from Low-Rank Gradients", arXiv 2407.11239; VITA-Group/WeLore).

Rank selection (the authors' ``adaptive_rank_pruning``): each matrix's singular values are min-max normalised to
[0, 1]; one global threshold ``tau`` prunes, in every matrix, the singular values below it. Matrices with a
heavy-tailed spectrum (most values near the bottom) lose many ranks, flat ones few. The authors look ``tau`` up in a
table per target; here it is solved for exactly: ``tau`` is the ``ceil(ratio * total)``-th smallest normalised value
over all matrices, so the fraction of all ranks removed is ``ratio`` (up to ties).

Split (the authors' ``min_ratio``): a matrix whose own reduction exceeds ``min_ratio`` is a low-rank component (LRC)
and becomes ``W_k = U_k S_k V_k^T``, stored as ``B A`` (``B = U_k S_k^{1/2}``, ``A = S_k^{1/2} V_k^T``, trainable:
WeLore fine-tunes only the LRCs) when that has fewer parameters than ``W``, else as the dense rank-k matrix (same
function). The others (N-LRCs) are left unchanged.

PEFT form (``peft_form``, ``rankwise compress --peft``): the LRCs as a LoRA adapter with per-layer ranks
(``rank_pattern``) over a base whose LRC weights are zero.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RankwiseError
from .layers import linear_weights
from .spectra import batched_svdvals, serial_lapack


class LowRankLinear(nn.Module):
    """``y = B (A x) + b``: a rank-k linear layer (``A``: k x in, ``B``: out x k)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = A.shape[1], B.shape[0], A.shape[0]
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (x @ self.A.T.to(x.dtype)) @ self.B.T.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``out x in`` weight ``B A`` (for analysis and export)."""
        return self.B @ self.A

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def normalized_spectrum(s: torch.Tensor) -> torch.Tensor:
    """``(s - min s) / (max s - min s)`` along the last dimension (zeros for a constant spectrum)."""
    lo, hi = s.min(-1, keepdim=True).values, s.max(-1, keepdim=True).values
    return torch.where(hi > lo, (s - lo) / (hi - lo).clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))


def welore_ranks(spectra: dict[str, torch.Tensor], ratio: float) -> dict[str, int]:
    """Rank kept per matrix so that a ``ratio`` fraction of all ranks is removed, by one global threshold on the
    min-max normalised spectra (WeLore). ``ratio = 0`` keeps every rank."""
    if not 0.0 <= ratio < 1.0:
        raise RankwiseError(f"compression ratio must be in [0, 1) (the fraction of ranks removed), got {ratio}")
    if not spectra:
        raise RankwiseError("no matrix to compress")
    names = list(spectra)
    normed = {n: normalized_spectrum(spectra[n].float()) for n in names}
    flat = torch.cat([normed[n] for n in names])
    n_prune = math.ceil(ratio * flat.numel() - 1e-9)
    if n_prune == 0:
        return {n: spectra[n].numel() for n in names}
    tau = torch.sort(flat).values[n_prune - 1]
    # prune values <= tau: exactly n_prune of them without ties (each matrix's minimum is 0, so tau >= 0)
    return {n: int((normed[n] > tau).sum().clamp_min(1)) for n in names}


def uniform_ranks(spectra: dict[str, torch.Tensor], ratio: float) -> dict[str, int]:
    """The baseline: every matrix loses the same ``ratio`` of its ranks."""
    if not 0.0 <= ratio < 1.0:
        raise RankwiseError(f"compression ratio must be in [0, 1), got {ratio}")
    return {n: max(1, round(s.numel() * (1 - ratio))) for n, s in spectra.items()}


@dataclass
class CompressionReport:
    ranks: dict[str, int]          # rank kept per compressed matrix (LRCs)
    full_ranks: dict[str, int]
    lrc: list[str]                 # matrices replaced by their low-rank approximation
    params_before: int
    params_after: int

    @property
    def rank_reduction(self) -> float:
        """Fraction of all ranks removed (over every analyzed matrix)."""
        total = sum(self.full_ranks.values())
        kept = sum(self.ranks.get(n, r) for n, r in self.full_ranks.items())
        return 1 - kept / total

    @property
    def param_ratio(self) -> float:
        return self.params_after / self.params_before

    def as_dict(self) -> dict:
        return {"rank_reduction": self.rank_reduction, "params_before": self.params_before,
                "params_after": self.params_after, "param_ratio": self.param_ratio, "lrc": self.lrc,
                "ranks": self.ranks, "full_ranks": self.full_ranks}


@torch.no_grad()
def compress(model: nn.Module, ratio: float, min_ratio: float = 0.0, rank_rule: str = "welore",
             include_output: bool = False) -> CompressionReport:
    """Replace, in place, every linear layer whose WeLore rank reduction exceeds ``min_ratio`` by its best rank-k
    approximation (``LowRankLinear`` when that saves parameters). ``rank_rule="uniform"`` gives the baseline."""
    if not 0.0 <= min_ratio < 1.0:
        raise RankwiseError(f"min_ratio must be in [0, 1), got {min_ratio}")
    rules = {"welore": welore_ranks, "uniform": uniform_ranks}
    if rank_rule not in rules:
        raise RankwiseError(f"unknown rank rule {rank_rule!r}; valid: {', '.join(rules)}")
    weights = linear_weights(model, include_output)
    spectra = batched_svdvals(weights)
    full = {n: s.numel() for n, s in spectra.items()}
    wanted = rules[rank_rule](spectra, ratio)
    params_before = sum(p.numel() for p in model.parameters())
    lrc = [n for n in weights if wanted[n] < full[n] and (full[n] - wanted[n]) / full[n] > min_ratio]
    groups: dict[tuple, list[str]] = {}
    for n in lrc:
        groups.setdefault(tuple(weights[n].shape), []).append(n)
    for names in groups.values():  # one batched SVD per shape
        w = torch.stack([weights[n].float() for n in names])
        with serial_lapack(w.device):
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
        for i, n in enumerate(names):
            k = wanted[n]
            root = s[i, :k].sqrt()
            B, A = u[i, :, :k] * root, root[:, None] * vh[i, :k]
            old = model.get_submodule(n)
            dtype = old.weight.dtype
            out_f, in_f = old.weight.shape
            if k * (out_f + in_f) < out_f * in_f:
                bias = None if old.bias is None else old.bias.detach().clone()
                model.set_submodule(n, LowRankLinear(A.to(dtype), B.to(dtype), bias).to(old.weight.device))
            else:
                old.weight.copy_((B @ A).to(dtype))
    return CompressionReport({n: wanted[n] for n in lrc}, full, lrc, params_before,
                             sum(p.numel() for p in model.parameters()))


def lrc_parameters(model: nn.Module) -> list[nn.Parameter]:
    """WeLore's fine-tuning set: the factors of every ``LowRankLinear`` (everything else stays frozen)."""
    return [p for m in model.modules() if isinstance(m, LowRankLinear) for p in (m.A, m.B)]


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Replace every ``LowRankLinear`` by an ``nn.Linear`` holding ``B A`` (same function), in place, so that the
    model saves and loads as a plain transformers model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LowRankLinear):
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.A.device,
                              dtype=m.A.dtype)
            dense.weight.copy_(m.weight)
            if m.bias is not None:
                dense.bias.copy_(m.bias)
            model.set_submodule(name, dense)
    return model


@torch.no_grad()
def peft_form(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """WeLore's model in PEFT's format: ``(base, adapted)``. ``base`` is ``model`` with every ``LowRankLinear``
    replaced by an ``nn.Linear`` of zero weight (bias kept); ``adapted`` is a copy of ``base`` with a LoRA adapter
    holding each LRC's ``B``, ``A`` at its own rank (``rank_pattern``) with ``alpha = rank`` (``alpha_pattern``:
    scaling 1), so ``adapted`` computes what ``model`` does and training its adapter is WeLore's LRC fine-tuning
    (only the low-rank components' factors train). ``save_adapter(adapted, ...)`` writes the per-layer ranks."""
    from ..adapters import active_parameterizations, apply

    factors = {n: (m.A.detach().clone(), m.B.detach().clone()) for n, m in model.named_modules()
               if isinstance(m, LowRankLinear)}
    if not factors:
        raise RankwiseError("the model has no low-rank component (LowRankLinear) to write as a LoRA adapter; "
                            "compress it with a --ratio that factors some layers")
    base = densify(copy.deepcopy(model))
    for n in factors:
        base.get_submodule(n).weight.zero_()
    adapted = copy.deepcopy(base)
    ranks = {n: a.shape[0] for n, (a, _) in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    apply(adapted, "lora", r=r, alpha=float(r), target=list(factors),
          rank_pattern={n: k for n, k in ranks.items() if k != r},
          alpha_pattern={n: float(k) for n, k in ranks.items() if k != r})
    for key, layer in active_parameterizations(adapted).items():
        a, b = factors[key.rsplit(".", 1)[0]]
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    return base, adapted


FACTORS_FILE = "welore.safetensors"  # not model.safetensors: plain transformers cannot read factored layers


def save_factored(model: nn.Module, directory: str | os.PathLike) -> dict[str, int]:
    """Write ``model`` with its ``LowRankLinear`` layers as factors: ``config.json`` + ``welore.safetensors`` (every
    tensor of the state dict, ``<layer>.A`` / ``<layer>.B`` for the factored ones), so the saving shows on disk.
    Returns the factored layers and their ranks (``load_factored`` needs them, from ``welore.json``)."""
    from safetensors.torch import save_file

    model.config.save_pretrained(directory)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(directory, FACTORS_FILE), metadata={"format": "pt"})
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


@torch.no_grad()
def load_factored(directory: str | os.PathLike) -> nn.Module:
    """The model ``save_factored`` wrote (``welore.json`` names the factored layers and ranks)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    meta_path = os.path.join(directory, "welore.json")
    if not os.path.exists(meta_path):
        raise RankwiseError(f"{directory!r} holds {FACTORS_FILE} but no welore.json (the factored layers' ranks); "
                            "write it again with rankwise compress")
    factored = json.loads(open(meta_path).read()).get("factored", {})
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    for name, k in factored.items():
        old = model.get_submodule(name)
        bias = None if old.bias is None else torch.empty_like(old.bias)
        model.set_submodule(name, LowRankLinear(old.weight.new_empty(k, old.in_features),
                                               old.weight.new_empty(old.out_features, k), bias))
    state = load_file(os.path.join(directory, FACTORS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RankwiseError(f"{directory!r}: {FACTORS_FILE} does not match its config (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    return model
