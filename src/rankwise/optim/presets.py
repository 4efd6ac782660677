"""Published methods as presets of ``SplitOptimizer`` (a few lines each), and the param split they train with.

    opt = rankwise.optim.build("galore", model, rank=64, lr=1e-2)   # or build(name, params_or_groups, ...)

Which parameters are projected: the weights of the attention and MLP linears (GaLore's ``target_modules_list =
["attn", "mlp"]``); embeddings, LM head and norms get the plain rule (AdamW), embeddings optionally projected. The
block presets split differently (``param_groups``' ``blocks`` / ``outside``): FRUGAL's blocks are those weight
tensors, BAdam's and LISA's whole layers with their norms; BAdam leaves embeddings, final norm and head out (frozen).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import RankwiseError
from .optimizer import SplitOptimizer

TARGETS = ("attn", "mlp")

# name -> SplitOptimizer options (and param-split options, see ``SPLIT_OPTIONS``). Sources: GaLore README /
# torchrun_main.py (rank 128, update_proj_gap 200, galore_scale 0.25), Fira README (alpha 0.25, same gap); galore /
# fira: galore-torch 1.0's GaLoreAdamW and fira 1.0.2's FiraAdamW are transformers' AdamW (``adamw_hf``, default eps
# 1e-6) on every param, projected or not (docs/fidelity-galore-fira.md). FRUGAL
# (github.com/fzmushko/FRUGAL, README + proj_optimizer_templates.py): ``--optimizer frugal`` is ``BlockAdamW`` -
# density 0.25 of the projectable tensors, block_order random (a fresh draw per period), update_gap 200, signSGD
# (lr * proj_params_lr_scale * inactive_lr_scale, both 1.0) on the others, reset_statistics; BAdam (badam 1.4,
# ``BlockOptimizer``): one transformer layer (norms included) at a time, switch_block_every 50, switch_mode
# descending, embeddings / final norm / head frozen, every active param decayed; LISA (LMFlow
# ``DynamicLayerActivationCallback`` + ``lisa_activated_layers`` 2, ``lisa_interval_steps`` 20): whole layers sampled
# afresh, embeddings / final norm / head always trained, torch AdamW keeping a frozen layer's moments. APOLLO
# (github.com/zhuhanqing/APOLLO, README "Hyperparameter choices" + scripts/pretrain_c4/*.sh, apollo-torch's
# ``APOLLOAdamW``): random projection (``proj="random"``, ``proj_type="std"``), ``update_proj_gap`` 200, moments kept;
# APOLLO ``scale_type="channel"``, rank 256, scale 1; APOLLO-Mini ``"tensor"``, rank 1, scale 128; transformers' AdamW
# arithmetic (eps 1e-6, decay after the update) on every param, the "attn"/"mlp" linears projected.
# 8-bit: galore-8bit is galore-torch 1.0's GaLoreAdamW8bit (bitsandbytes' blockwise 8-bit AdamW on the projected
# gradient; torch's AdamW arithmetic, eps 1e-8); adamw-8bit is bitsandbytes' AdamW8bit (``lowbit``).
PRESETS: dict[str, dict[str, Any]] = {
    "adamw": dict(project=False),
    "split": dict(),  # SplitOptimizer's own defaults: every option is the caller's
    "galore": dict(projector="svd", inner="adamw_hf", residual="drop", rank=128, update_gap=200, scale=0.25,
                   moments="keep", eps=1e-6),
    "galore-8bit": dict(projector="svd", inner="adamw", residual="drop", rank=128, update_gap=200, scale=0.25,
                        moments="keep", eps=1e-8, state_bits=8),
    "adamw-8bit": dict(project=False, state_bits=8),
    "fira": dict(projector="svd", inner="adamw_hf", residual="fira", rank=128, update_gap=200, scale=0.25,
                 moments="keep", eps=1e-6),
    "apollo": dict(projector="gaussian", inner="adamw_hf", residual="apollo", rank=256, update_gap=200, scale=1.0,
                   moments="keep", eps=1e-6),
    "apollo-mini": dict(projector="gaussian", inner="adamw_hf", residual="apollo_tensor", rank=1, update_gap=200,
                        scale=128.0, moments="keep", eps=1e-6),
    "frugal": dict(projector="block", inner="adamw", residual="signsgd", density=0.25, update_gap=200,
                   block_order="sample", scale=1.0, moments="reset", residual_lr_scale=1.0, blocks="tensors"),
    "badam": dict(projector="block", inner="adamw", residual="drop", update_gap=50, block_order="descending",
                  block_phase=1, moments="reset", blocks="layers", outside="freeze", decay_vectors=True),
    "lisa": dict(projector="layers", inner="adamw", residual="drop", update_gap=20, active_blocks=2,
                 moments="keep", blocks="layers", outside="train"),
}

# options of ``param_groups`` (how a model's params are split), not of ``SplitOptimizer``
SPLIT_OPTIONS = ("blocks", "outside", "decay_vectors", "include_lm_head", "targets")
BLOCKINGS = ("linears", "tensors", "layers")

def linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' GPT-2 ``Conv1D`` (weight stored (in, out); a projection does not care)."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and getattr(module, "weight", None)
                                             is not None and module.weight.dim() == 2)


def _chosen_weights(model: nn.Module, targets: Iterable[str] | None) -> set[int]:
    """ids of the trainable weights of linear-like modules whose names contain a target. ``targets=None``: GaLore's
    ("attn", "mlp") when some module is named so, else every linear-like module but the output head."""
    linears = [(name, m) for name, m in model.named_modules() if linear_like(m) and m.weight.requires_grad]
    if targets is None:
        matched = [(n, m) for n, m in linears if any(t in n for t in TARGETS)]
        if not matched:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            matched = [(n, m) for n, m in linears if m is not head]
    else:
        targets = tuple(targets)
        matched = [(n, m) for n, m in linears if any(t in n for t in targets)]
        if not matched:
            raise RankwiseError(f"no trainable linear layer (nn.Linear or Conv1D) of {type(model).__name__} has a "
                                f"name containing {', '.join(map(repr, targets))}; pass targets that name some of "
                                "its modules (see model.named_modules()), or targets=None")
    return {id(m.weight) for n, m in matched}


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


def param_groups(model: nn.Module, weight_decay: float = 0.0, include_embeddings: bool = False,
                 targets: Iterable[str] | None = None, blocks: str = "linears", outside: str = "train",
                 decay_vectors: bool = False, include_lm_head: bool = False) -> list[dict[str, Any]]:
    """Trainable params split into projected / blocked groups and plain ones (AdamW on full gradients).

    Projected weights: those of the linear layers (``nn.Linear``, GPT-2's ``Conv1D``) whose module names contain one
    of ``targets``; by default GaLore's ("attn", "mlp") when the model has such modules, else every linear layer but
    the output head (so a plain MLP works too).

    ``blocks`` says what the first groups hold and which block ids they carry (for block selectors):
    ``linears`` the target linears' weights, block id = layer index; ``tensors`` the same weights, one block each
    (FRUGAL's ``BlockOptimizer``); ``layers`` every param of each layer, norms included (BAdam, LISA), as a matrix
    and a vector group sharing the block ids. ``include_embeddings``: the input embedding joins them (projected, or
    with ``layers`` a block of its own before the first layer; BAdam's ``include_embedding``); ``include_lm_head``
    (``layers`` only): every remaining param (head, final norm) is a block after the last layer (BAdam's
    ``include_lm_head``). The rest is ``outside``: ``train`` (plain groups) or ``freeze`` (left out: untouched).
    Matrices are decayed; vectors (norms, biases) only with ``decay_vectors``.
    """
    if blocks not in BLOCKINGS:
        raise RankwiseError(f"unknown blocks {blocks!r}; valid: {', '.join(BLOCKINGS)}")
    if outside not in ("train", "freeze"):
        raise RankwiseError(f"unknown outside {outside!r}; valid: train, freeze")
    if include_lm_head and blocks != "layers":
        raise RankwiseError("include_lm_head makes the head a block of its own: it needs blocks='layers'")
    vector_decay = weight_decay if decay_vectors else 0.0
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    emb = model.get_input_embeddings() if include_embeddings and hasattr(model, "get_input_embeddings") else None
    emb_id = id(emb.weight) if emb is not None and emb.weight.requires_grad else None
    if blocks == "layers":
        layer_of = {id(p): int(m.group(1)) for n, p in named if (m := _LAYER.search(n))}
        if not layer_of:
            raise RankwiseError("no parameter name has a layer index (layers.N., h.N., layer.N., blocks.N.): "
                                "blocks='layers' needs transformer layers")
        first, last = min(layer_of.values()), max(layer_of.values())
        if emb_id is not None:
            layer_of[emb_id] = first - 1
        if include_lm_head:
            layer_of.update({id(p): last + 1 for n, p in named if id(p) not in layer_of})
        inside = [(n, p) for n, p in named if id(p) in layer_of]
        ids = sorted(set(layer_of.values()))
        groups = []
        for matrices, wd in ((True, weight_decay), (False, vector_decay)):
            part = [(n, p) for n, p in inside if (p.dim() >= 2) == matrices]
            groups.append({"params": [p for n, p in part], "names": [n for n, p in part],
                           "blocks": [layer_of[id(p)] for n, p in part], "block_ids": ids, "weight_decay": wd})
        groups = [g for g in groups if g["params"]]
    else:
        chosen = _chosen_weights(model, targets)
        if emb_id is not None:
            chosen.add(emb_id)
        inside = [(n, p) for n, p in named if id(p) in chosen]
        if not inside:
            raise RankwiseError(f"{type(model).__name__} has no trainable linear layer (nn.Linear or Conv1D) to "
                                "project; use the 'adamw' preset, or pass its parameters as a list (every 2-D "
                                "tensor is then projected)")
        ids = [int(m.group(1)) if (m := _LAYER.search(n)) else -1 for n, p in inside]
        groups = [{"params": [p for n, p in inside], "names": [n for n, p in inside],
                   "blocks": ids if blocks == "linears" else list(range(len(inside))), "weight_decay": weight_decay}]
    if outside == "train":
        taken = {id(p) for g in groups for p in g["params"]}
        rest = [p for n, p in named if id(p) not in taken]
        groups += [g for g in ({"params": [p for p in rest if p.dim() >= 2], "project": False,
                                "weight_decay": weight_decay},
                               {"params": [p for p in rest if p.dim() < 2], "project": False,
                                "weight_decay": vector_decay}) if g["params"]]
    return groups


def build(name: str, params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
          include_embeddings: bool = False, **overrides: Any) -> SplitOptimizer:
    """The preset ``name`` (adamw, galore, fira, apollo, apollo-mini, frugal, badam, lisa, split) with ``overrides`` on ``params`` — a
    model (split by ``param_groups``, whose options ``SPLIT_OPTIONS`` may be overridden too) or anything
    ``torch.optim`` accepts (then every 2-D tensor is projected / a block).

    A preset's options apply to every param group (``galore`` / ``fira``: ``adamw_hf`` on the plain groups too, as
    every param is inside the reference's ``GaLoreAdamW`` / ``FiraAdamW``)."""
    if name not in PRESETS:
        raise RankwiseError(f"unknown optimizer preset {name!r}; valid presets: {', '.join(PRESETS)}")
    options = {**PRESETS[name], **overrides}
    split = {k: options.pop(k) for k in SPLIT_OPTIONS if k in options}
    if isinstance(params, nn.Module) and not options.get("project", True):  # plain AdamW: nothing to find
        trainable = [p for p in params.parameters() if p.requires_grad]
        wd = options.get("weight_decay", 0.0)
        params = [g for g in ({"params": [p for p in trainable if p.dim() >= 2], "weight_decay": wd},
                              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}) if g["params"]]
    elif isinstance(params, nn.Module):
        params = param_groups(params, options.get("weight_decay", 0.0), include_embeddings, **split)
    elif given := [k for k in SPLIT_OPTIONS if k in overrides]:
        raise RankwiseError(f"{', '.join(given)} split a model's parameters: pass the model to build(), not a "
                            "list of parameters or groups")
    return SplitOptimizer(params, **options)
