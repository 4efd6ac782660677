"""LOST against an oracle of the paper's equations, step for step (30 AdamW steps, square and rectangular layers).

Reference: Li et al., "LOST: Low-rank and Sparse Pre-training for Large Language Models" (arXiv 2508.02668): the SVD
of each init weight ``W = U S V^T`` gives the dominant part ``W_l = U_r S_r V_r^T`` (factors ``U_r S_r^1/2`` and
``S_r^1/2 V_r^T``); the channel-wise sparse part keeps the input channels with the largest L2 column norm of the
next singular components ``W_comp`` (``sparse_svd_rank`` of them), initialised from ``W``'s columns there (the
reference code, JiaxiLi1/LOST-Low-rank-and-Sparse-Training-for-Large-Language-Models, ``HybridSparseLinear``);
``y = gamma x W_l^T + (1 - gamma) x[:, I] W_s^T``, both parts trained. The oracle builds the dense
``gamma B A + (1 - gamma) S`` with a scatter and lets autograd differentiate it; rankwise runs the two paths
factorized.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from ref_model import TOL, batches, loss_of, max_weight_diff, tiny_llama
from torch import nn

from rankwise import methods
from rankwise.methods import OptimConfig
from rankwise.reparam import ChannelSparseLowRankLinear

RANK, SPARSITY, GAMMA, SVD_RANK, LR, STEPS = 8, 0.05, 0.5, 16, 1e-3, 30


class OracleLOST(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        W = linear.weight.detach()
        U, s, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        self.lora_A = nn.Parameter((s[:RANK, None].sqrt() * Vh[:RANK]).float())
        self.lora_B = nn.Parameter((U[:, :RANK] * s[:RANK].sqrt()).float())
        band = slice(RANK, RANK + min(SVD_RANK, s.numel() - RANK))
        w_comp = U[:, band] @ torch.diag(s[band]) @ Vh[band]
        keep = max(1, int(SPARSITY * W.shape[1]))
        self.channels = torch.sort(torch.topk(torch.linalg.vector_norm(w_comp, dim=0), keep).indices).values
        self.values = nn.Parameter(W[:, self.channels].clone())

    def weight(self):
        sparse = torch.zeros(self.lora_B.shape[0], self.lora_A.shape[1]).index_copy(1, self.channels, self.values)
        return GAMMA * self.lora_B @ self.lora_A + (1 - GAMMA) * sparse

    def forward(self, x):
        return F.linear(x, self.weight())


def test_lost_init_and_steps_equal_the_oracle():
    base = tiny_llama(seed=0)
    method = methods.get("lost", rank=RANK, sparsity=SPARSITY, gamma=GAMMA, sparse_svd_rank=SVD_RANK)
    ours = method.prepare(copy.deepcopy(base))
    ref = copy.deepcopy(base)
    names = [n for n, m in ref.named_modules() if isinstance(m, nn.Linear) and ("attn" in n or "mlp" in n)]
    for n in names:
        ref.set_submodule(n, OracleLOST(ref.get_submodule(n)))
    pairs = [(ours.get_submodule(n), ref.get_submodule(n)) for n in names]
    assert all(isinstance(a, ChannelSparseLowRankLinear) for a, _ in pairs) and len(pairs) == 14
    assert {tuple(a.dense_weight().shape) for a, _ in pairs} == {(64, 64), (32, 64), (96, 64), (64, 96)}
    for a, b in pairs:  # the same split, channel for channel
        assert torch.equal(a.sparse_channels, b.channels)
        assert (a.dense_weight() - b.weight()).abs().max() <= 1e-6
    start = copy.deepcopy(ours)
    opt = method.build_optimizer(ours, OptimConfig(lr=LR, weight_decay=0.1))
    opt_ref = methods.Method().build_optimizer(ref, OptimConfig(lr=LR, weight_decay=0.1))
    trace = []
    for batch in batches(STEPS):
        for model, o in ((ours, opt), (ref, opt_ref)):
            o.zero_grad(set_to_none=True)
            loss_of(model, batch).backward()
            o.step()
        trace.append(max(max_weight_diff(ours, ref),
                         max((a.dense_weight() - b.weight()).abs().max().item() for a, b in pairs)))
    assert max(trace) <= TOL, trace
    assert max_weight_diff(ours, start) > 1e3 * TOL
