"""Published methods as presets of ``SplitOptimizer`` (a few lines each), and the param split they train with.

    opt = rankwise.optim.build("galore", model, rank=64, lr=1e-2)   # or build(name, params_or_groups, ...)

Which parameters are projected: the weights of the attention and MLP linears (GaLore's ``target_modules_list =
["attn", "mlp"]``); embeddings, LM head and norms get the plain rule (AdamW), embeddings optionally projected.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import RankwiseError
from .optimizer import SplitOptimizer

TARGETS = ("attn", "mlp")

# name -> SplitOptimizer options. Sources: GaLore README / torchrun_main.py (rank 128, update_proj_gap 200,
# galore_scale 0.25), Fira README (alpha 0.25, same gap), FRUGAL README (update_gap 200, signSGD residual,
# inactive_lr_scale 1.0 for pre-training, reset_statistics=True), BAdam (switch_block_every 50, ascending),
# LISA / LMFlow script (lisa_activated_layers 1, lisa_interval_steps 20).
# galore / fira: galore-torch 1.0's GaLoreAdamW and fira 1.0.2's FiraAdamW are transformers' AdamW (``adamw_hf``,
# default eps 1e-6) on every param, projected or not (docs/fidelity-galore-fira.md).
PRESETS: dict[str, dict[str, Any]] = {
    "adamw": dict(project=False),
    "split": dict(),  # SplitOptimizer's own defaults: every option is the caller's
    "galore": dict(projector="svd", inner="adamw_hf", residual="drop", rank=128, update_gap=200, scale=0.25,
                   moments="keep", eps=1e-6),
    "fira": dict(projector="svd", inner="adamw_hf", residual="fira", rank=128, update_gap=200, scale=0.25,
                 moments="keep", eps=1e-6),
    "frugal": dict(projector="svd", inner="adamw", residual="signsgd", rank=128, update_gap=200, scale=1.0,
                   moments="reset", residual_lr_scale=1.0),
    "badam": dict(projector="block", inner="adamw", residual="drop", update_gap=50, block_order="ascending",
                  moments="reset"),
    "lisa": dict(projector="layers", inner="adamw", residual="drop", update_gap=20, active_blocks=1,
                 moments="reset"),
}

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


def param_groups(model: nn.Module, weight_decay: float = 0.0, include_embeddings: bool = False,
                 targets: Iterable[str] = TARGETS) -> list[dict[str, Any]]:
    """Trainable params split into: projected (target linears' weights, with names and layer ids as block ids),
    plain matrices (embeddings, LM head; decayed), plain vectors (norms, biases; not decayed)."""
    targets = tuple(targets)
    projected: dict[int, str] = {}
    for mname, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(t in mname for t in targets) and module.weight.requires_grad:
            projected[id(module.weight)] = f"{mname}.weight"
    if include_embeddings:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is not None and emb.weight.requires_grad:
            projected[id(emb.weight)] = "embeddings"
    proj, names, blocks, mats, vecs = [], [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in projected:
            proj.append(p)
            names.append(name)
            layer = _LAYER.search(name)
            blocks.append(int(layer.group(1)) if layer else -1)
        else:
            (mats if p.dim() >= 2 else vecs).append(p)
    if not proj:
        raise RankwiseError(f"no trainable nn.Linear module matches the targets {', '.join(targets)}; "
                            "the model has nothing to project")
    groups = [{"params": proj, "names": names, "blocks": blocks, "weight_decay": weight_decay},
              {"params": mats, "project": False, "weight_decay": weight_decay},
              {"params": vecs, "project": False, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build(name: str, params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
          include_embeddings: bool = False, **overrides: Any) -> SplitOptimizer:
    """The preset ``name`` (adamw, galore, fira, frugal, badam, lisa, split) with ``overrides`` on ``params`` — a
    model (split by ``param_groups``) or anything ``torch.optim`` accepts (then every 2-D tensor is projected).

    A preset's options apply to every param group (``galore`` / ``fira``: ``adamw_hf`` on the plain groups too, as
    every param is inside the reference's ``GaLoreAdamW`` / ``FiraAdamW``)."""
    if name not in PRESETS:
        raise RankwiseError(f"unknown optimizer preset {name!r}; valid presets: {', '.join(PRESETS)}")
    options = {**PRESETS[name], **overrides}
    if isinstance(params, nn.Module):
        params = param_groups(params, options.get("weight_decay", 0.0), include_embeddings)
        if not options.pop("project", True):
            params = [{**g, "project": False} for g in params]
    return SplitOptimizer(params, **options)
