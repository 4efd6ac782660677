"""Computational-limits diagnostic: the norms that decide whether LoRA's attention gradients admit a fast algorithm.

Hu et al. 2024 (arXiv 2406.03136) show that rank-r LoRA gradients of attention can be approximated in almost linear
time iff the max-entry norms of ``X W_Q`` and ``X W_K`` (pretrained weights plus the adapter ``alpha B A / r``) stay
below ``Gamma = o(sqrt(log L))`` (the threshold of Alman & Song 2023 for attention itself). This module measures, on
real batches, per attention layer:

- ``x_max`` = ||X||_max (the layer input after its norm), and for Q, K, V: ``*_base`` = ||X W*||_max,
  ``*_adapter`` = ||X alpha B A / r||_max (0 without an adapter) and ``*_total`` = ||X W||_max;
- ``gamma`` = max(q_total, k_total) * sqrt(s * d_head): the entry bound rescaled so that every score obeys
  |s <q, k>| <= gamma^2 (s = the layer's score scale, 1/sqrt(d_head) in LLaMA; for s = 1/d this is Alman & Song's B);
- ``score_max`` = the largest |s <q, k>| actually seen (pre-RoPE), the range the polynomial must cover;
- ``ratio`` = gamma / sqrt(log L) and ``below_threshold`` = ratio < 1. The theorem is asymptotic (o(.) hides
  constants), so this flag is an indicator, not a proof;
- ``degree`` = the Taylor degree keeping exp within relative 1e-3 on [-score_max, score_max],
  ``feature_rank`` = C(d_head + degree, degree) and ``fast_cheaper`` = feature_rank * d_head < L: whether the
  polynomial method (``fast_lora_grad``) would do less work than the exact L^2 d_head computation at this L.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from ..errors import RankwiseError
from .fast_lora_grad import feature_rank, taylor_degree


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules with ``q_proj``, ``k_proj`` and ``v_proj`` children (LLaMA, Mistral, Qwen, ... attention)."""
    found = {n: m for n, m in model.named_modules()
             if all(isinstance(getattr(m, p, None), nn.Module) for p in ("q_proj", "k_proj", "v_proj"))}
    if not found:
        raise RankwiseError(f"{type(model).__name__} has no attention module with q_proj/k_proj/v_proj children; "
                            "the computational-limits diagnostic needs LLaMA-style attention")
    return found


def _head_dim(attn: nn.Module, model: nn.Module) -> int:
    hd = getattr(attn, "head_dim", None)
    if hd is None:
        cfg = model.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(hd)


class _Recorder:
    """Forward hooks on one attention's projections: running max-entry norms, and the max |score| per batch."""

    def __init__(self, attn: nn.Module, head_dim: int, scale: float):
        self.head_dim, self.scale = head_dim, scale
        self.stats = {k: 0.0 for k in ("x_max", "q_base", "q_adapter", "q_total", "k_base", "k_adapter", "k_total",
                                       "v_base", "v_adapter", "v_total", "score_max")}
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        for p in ("q", "k", "v"):
            proj = getattr(attn, f"{p}_proj")
            self.handles.append(proj.register_forward_hook(self._total(p)))
            base = getattr(proj, "base_layer", None)
            if isinstance(base, nn.Module):
                self.handles.append(base.register_forward_hook(self._base(p)))

    def _bump(self, key: str, t: torch.Tensor) -> None:
        self.stats[key] = max(self.stats[key], t.detach().abs().max().item())

    def _base(self, p: str):
        def hook(module, inputs, output):
            self.out[f"{p}_base"] = output.detach()
        return hook

    def _total(self, p: str):
        def hook(module, inputs, output):
            out = output.detach()
            self._bump("x_max", inputs[0])
            self._bump(f"{p}_total", out)
            base = self.out.pop(f"{p}_base", None)
            self._bump(f"{p}_base", out if base is None else base)
            if base is not None:
                self._bump(f"{p}_adapter", out - base)
            self.out[p] = out
            if p == "k" and "q" in self.out:
                self._scores(self.out.pop("q"), out)
        return hook

    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> None:
        b, t, _ = q.shape
        qh = q.reshape(b, t, -1, self.head_dim).transpose(1, 2)           # B x H x T x d
        kh = k.reshape(b, t, -1, self.head_dim).transpose(1, 2)           # B x H_kv x T x d
        if kh.shape[1] != qh.shape[1]:                                   # grouped-query attention
            kh = kh.repeat_interleave(qh.shape[1] // kh.shape[1], dim=1)
        self._bump("score_max", self.scale * (qh.float() @ kh.float().transpose(-2, -1)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def attention_norms(model: nn.Module, batches: Iterable[torch.Tensor], eps: float = 1e-3) -> list[dict]:
    """One row per attention layer (see the module docstring), maxima over every batch (B x T+1 token ids; the
    model reads ``[:, :-1]``). ``L`` is the sequence length the model saw."""
    attns = attention_modules(model)
    recorders = {}
    for name, attn in attns.items():
        hd = _head_dim(attn, model)
        recorders[name] = _Recorder(attn, hd, float(getattr(attn, "scaling", hd ** -0.5)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    length = 0
    try:
        for batch in batches:
            if batch.dim() != 2 or batch.shape[1] < 3:
                raise RankwiseError(f"each batch must be (batch, seq_len + 1) token ids, got shape {list(batch.shape)}")
            length = max(length, batch.shape[1] - 1)
            model(input_ids=batch[:, :-1].to(device))
    finally:
        for r in recorders.values():
            r.remove()
        model.train(was_training)
    if length == 0:
        raise RankwiseError("no batch given; the diagnostic needs at least one batch of token ids")
    rows = []
    threshold = math.sqrt(math.log(length))
    for name, rec in recorders.items():
        s = dict(rec.stats)
        gamma = max(s["q_total"], s["k_total"]) * math.sqrt(rec.scale * rec.head_dim)
        degree = taylor_degree(s["score_max"], eps)
        rank = feature_rank(rec.head_dim, degree)
        rows.append({"layer": name, **s, "gamma": gamma, "seq_len": length, "threshold": threshold,
                     "ratio": gamma / threshold, "below_threshold": gamma < threshold, "degree": degree,
                     "feature_rank": rank, "fast_cheaper": rank * rec.head_dim < length})
    return rows
