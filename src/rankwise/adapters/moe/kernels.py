"""Vectorized kernels of rank-wise mixtures of LoRA experts (pure tensor functions, no loop over experts or ranks).

One LoRA of total rank ``R`` (``A``: R x in, ``B``: out x R) whose ranks are split into ``E = R / group`` experts
of ``group`` consecutive ranks each. A token ``x`` activates ``k`` experts with gates ``g`` (zero elsewhere):

    Delta y = s * B diag(expand(g)) A x = s * sum_{e in topk(x)} g_e B_e A_e x          (SMoRA eq. 3, MixLoRA)

``group = 1`` is SMoRA (each rank an expert), ``group = r`` is MixLoRA with ``E`` experts of rank ``r``, all gates 1
is plain LoRA. Two equivalent evaluations: ``masked`` (dense ``x A^T``, multiplied by the sparse gate matrix, one
GEMM with ``B``: best when k / E is large or rows are short) and ``gathered`` (per token, only the ``k * group``
active rows of ``A`` and ``B`` are gathered and multiplied: FLOPs scale with the activated rank).
"""

from __future__ import annotations

import torch

GATES = ("softmax", "scaled-softmax", "unit")


def topk_route(logits: torch.Tensor, k: int, gate: str = "softmax",
               select_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` experts per row of ``logits`` (N x E) and their gates (N x k).

    ``softmax``: softmax over the selected logits (Mixtral / MixLoRA, gates sum to 1); ``scaled-softmax``: the same
    times ``k`` (gates average 1, so a uniform router reproduces LoRA's scale); ``unit``: every selected gate is 1
    (pure block activation, no gradient to the router). ``select_bias`` (E) shifts only the *selection*
    (auxiliary-loss-free balancing, DeepSeek-V3 / FlyLoRA), never the gate values.
    """
    scores = logits if select_bias is None else logits + select_bias
    idx = scores.topk(k, dim=-1).indices
    if gate == "unit":
        return idx, torch.ones(idx.shape, dtype=logits.dtype, device=logits.device)
    vals = torch.softmax(logits.gather(-1, idx), dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    vals = vals.to(logits.dtype)
    return idx, vals * k if gate == "scaled-softmax" else vals


def dense_gates(idx: torch.Tensor, vals: torch.Tensor, num_experts: int, group: int) -> torch.Tensor:
    """The (N x E*group) rank-gate matrix: ``vals`` scattered at the experts ``idx``, each repeated ``group`` times."""
    g = torch.zeros(idx.shape[0], num_experts, dtype=vals.dtype, device=vals.device).scatter(-1, idx, vals)
    return g if group == 1 else g.repeat_interleave(group, dim=-1)


def rank_indices(idx: torch.Tensor, group: int) -> torch.Tensor:
    """Expert indices (N x k) -> the ranks they own (N x k*group), rank ``e * group + j`` for ``j < group``."""
    if group == 1:
        return idx
    return (idx.unsqueeze(-1) * group + torch.arange(group, device=idx.device)).flatten(-2)


def masked_lora(h: torch.Tensor, gates: torch.Tensor, lora_B: torch.Tensor, out: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """``out + s (h * gates) B^T`` for precomputed ``h = x A^T`` (N x R) and dense gates (N x R), one GEMM."""
    return torch.addmm(out, h * gates.to(h.dtype), lora_B.t().to(h.dtype), alpha=scaling)


def gathered_lora(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, ranks: torch.Tensor,
                  gates: torch.Tensor, out: torch.Tensor, scaling: float) -> torch.Tensor:
    """``out + s sum_j gates[:, j] B[:, ranks[:, j]] (A[ranks[:, j]] x)``: only active ranks are touched.

    ``ranks``, ``gates``: (N x K). Costs ``N K (in + out)`` multiply-adds, like a LoRA of rank ``K``.
    """
    a = lora_A.to(x.dtype)[ranks]                                   # N x K x in
    h = torch.bmm(a, x.unsqueeze(-1)).squeeze(-1) * gates.to(x.dtype)  # N x K
    b = lora_B.t().to(x.dtype)[ranks]                               # N x K x out
    return out + scaling * torch.bmm(h.unsqueeze(1), b).squeeze(1)


def dense_reference(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, gates: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """Per token ``s B diag(gates_n) A x_n`` with the full ``out x in`` matrix of each token (tests only: slow)."""
    w = torch.einsum("or,nr,ri->noi", lora_B, gates, lora_A)
    return scaling * torch.einsum("noi,ni->no", w, x)


def switch_balance_loss(probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E sum_e f_e P_e`` (Fedus et al. 2021, eq. 4; MixLoRA's aux loss).

    ``probs``: router softmax over all E experts (N x E); ``idx``: selected experts (N x k). ``f_e`` is the fraction
    of selections that went to ``e`` (no gradient), ``P_e`` the mean probability (carries the gradient). Equals 1
    for a perfectly uniform router, up to ``E`` when everything goes to one expert.
    """
    num_experts = probs.shape[-1]
    counts = torch.zeros(num_experts, device=idx.device, dtype=probs.dtype).index_add_(
        0, idx.reshape(-1), torch.ones(idx.numel(), device=idx.device, dtype=probs.dtype))
    f = counts / idx.numel()
    return num_experts * (f * probs.mean(0)).sum()


def expert_counts(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many (token, slot) selections each expert received (E,), as float64 for accumulation."""
    return torch.bincount(idx.reshape(-1), minlength=num_experts).double()


def flylora_topk(h: torch.Tensor, k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """FlyLoRA's implicit router: per token the ``k`` ranks with the largest ``|h| (+ bias)``, ``h = A x`` (N x R)."""
    scores = h.detach().abs()
    return (scores if bias is None else scores + bias).topk(k, dim=-1).indices

