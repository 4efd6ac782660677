"""Operations on reparameterized models: swap target linears, refactorize ``B A``, reset or prune optimizer state."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import RankwiseError

TARGETS = ("attn", "mlp")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


def parse_targets(target: str) -> tuple[str, ...]:
    """``"attn,mlp"`` -> ``("attn", "mlp")``; ``"all-linear"`` -> every linear but the LM head."""
    parts = tuple(t.strip() for t in target.split(",") if t.strip())
    if not parts:
        raise RankwiseError(f"target {target!r} names no module; use substrings of module names such as attn,mlp "
                            "or q_proj,v_proj, or all-linear")
    return parts


def target_linears(model: nn.Module, targets: Iterable[str] = TARGETS, full_rank_ends: int = 0) -> list[str]:
    """Names of the ``nn.Linear`` modules to reparameterize: those whose name contains one of ``targets`` (or every
    linear inside the transformer blocks for ``all-linear``), minus the first and last ``full_rank_ends`` blocks."""
    targets = tuple(targets)
    if full_rank_ends < 0:
        raise RankwiseError(f"full_rank_ends must be >= 0, got {full_rank_ends}")
    found: list[tuple[str, int]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        layer = _LAYER.search(name)
        selected = layer is not None if targets == ("all-linear",) else any(t in name for t in targets)
        if selected:
            found.append((name, int(layer.group(1)) if layer else -1))
    if not found:
        raise RankwiseError(f"no nn.Linear module name contains any of {', '.join(targets)}; use substrings of the "
                            "model's module names (e.g. attn,mlp or q_proj,v_proj) or all-linear")
    if full_rank_ends:
        layers = sorted({i for _, i in found if i >= 0})
        keep = set(layers[:full_rank_ends]) | set(layers[-full_rank_ends:])
        found = [(n, i) for n, i in found if i not in keep]
        if not found:
            raise RankwiseError(f"full_rank_ends={full_rank_ends} keeps all {len(layers)} blocks full-rank; "
                                f"use at most {(len(layers) - 1) // 2}")
    return [n for n, _ in found]


def replace_linears(model: nn.Module, names: list[str], build: Callable[[nn.Linear], nn.Module]) -> list[nn.Module]:
    """Swap each named ``nn.Linear`` for ``build(linear)`` in place; returns the new modules in order."""
    new = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = build(getattr(parent, child))
        setattr(parent, child, module)
        new.append(module)
    return new


def check_rank(rank: int, modules: Iterable[nn.Linear], full: bool = False) -> None:
    """``1 <= rank < min(m, n)`` of every target (``full``: ``rank == min(m, n)`` allowed too)."""
    smallest = min(min(m.in_features, m.out_features) for m in modules)
    top = smallest if full else smallest - 1
    if not 0 < rank <= top:
        where = "at most" if full else "below"
        raise RankwiseError(f"rank must be in [1, {top}] ({where} the smallest target dimension {smallest}), "
                            f"got {rank}")


def grouped(items: list, key: Callable) -> list[list]:
    """``items`` grouped by ``key(item)`` (first-seen order), so that equal shapes can share one batched op."""
    groups: dict = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return list(groups.values())


def product_svd(Bs: torch.Tensor, As: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched thin SVD of ``B A`` (``B``: b x m x k, ``A``: b x k x n) without forming the m x n product.

    Thin QR of ``B`` and ``A^T`` reduces it to the SVD of the k x k core ``R_B R_A^T``: O((m + n) k^2).
    Returns ``(U, s, Vh)`` with ``B A = U diag(s) Vh``, ``s`` descending.
    """
    qb, rb = torch.linalg.qr(Bs)
    qa, ra = torch.linalg.qr(As.transpose(1, 2))
    u, s, vh = torch.linalg.svd(rb @ ra.transpose(1, 2))
    return qb @ u, s, vh @ qa.transpose(1, 2)


@torch.no_grad()
def refactorize(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Re-factor each ``B A`` into balanced factors in place: ``B A = U S V^T``, ``B <- U S^1/2``, ``A <- S^1/2 V^T``.

    Uses ``product_svd`` (never the m x n product); pairs of equal shapes are processed as one batch, in float64.
    """
    for group in grouped(pairs, lambda p: (tuple(p[0].shape), tuple(p[1].shape), p[0].device, p[0].dtype)):
        u, s, vh = product_svd(torch.stack([B for B, _ in group]).double(), torch.stack([A for _, A in group]).double())
        root = s.sqrt()
        new_B, new_A = u * root.unsqueeze(1), vh * root.unsqueeze(2)
        for (B, A), nb, na in zip(group, new_B, new_A):
            B.copy_(nb)
            A.copy_(na)


def reset_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
    """Forget the optimizer state of ``params`` (moments and step): their next update starts like a fresh Adam."""
    for p in params:
        optimizer.state.pop(p, None)


@torch.no_grad()
def reset_slices(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], keep: list[torch.Tensor]) -> None:
    """Zero the optimizer state of ``params`` where ``keep`` (a bool mask broadcastable to each) is False: every state
    tensor of the parameter's rank (moments, and ``SliceAdamW``'s per-slice steps), in one ``_foreach_mul_``."""
    tensors, masks = [], []
    for p, k in zip(params, keep):
        for v in (optimizer.state.get(p) or {}).values():
            if torch.is_tensor(v) and v.dim() == p.dim():
                tensors.append(v)
                masks.append(k)
    if tensors:
        torch._foreach_mul_(tensors, masks)


@torch.no_grad()
def prune_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], ratio: float,
                mode: str = "magnitude") -> None:
    """Zero a fraction ``ratio`` of every parameter-shaped state tensor of ``params`` (ReLoRA's partial reset).

    ``magnitude``: the smallest-|value| entries of each tensor (per key, as ReLoRA); ``random``: one uniform random
    mask per parameter, shared by its moments. The step counters are kept.
    """
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        moments = [v for v in state.values() if torch.is_tensor(v) and v.shape == p.shape]
        if mode == "random":
            keep = torch.rand(p.shape, device=p.device) >= ratio
            for v in moments:
                v.mul_(keep)
            continue
        k = int(ratio * p.numel())
        if k == 0:
            continue
        for v in moments:
            threshold = v.abs().flatten().kthvalue(k).values
            v.mul_(v.abs() > threshold)
