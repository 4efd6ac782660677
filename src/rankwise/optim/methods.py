"""The optimizer presets as training-loop methods: ``rankwise train --method galore --rank 64 ...``.

Every method trains all parameters (full-parameter training); only the optimizer changes. ``cfg.lr``,
``weight_decay`` and ``betas`` come from the loop's ``OptimConfig``; options come from the CLI (``--rank``,
``--update-gap``, ``--scale``, ``--opt KEY=VALUE``, e.g. ``--opt state_bits=8`` for 8-bit moments in any of them).
Every projection method takes ``stagger`` (``--opt stagger=true``): its matrices refresh at staggered steps
instead of all at once (``SplitOptimizer``), off by default. GaLore, Fira and FRUGAL take ``side``
(``--opt side=shard``: the shard-local projection for FSDP2) and with it ``basis`` (``--opt basis=sharded``: the
basis sharded over the ranks between steps, state per rank = single-process state / N; docs/distributed.md).

eps: the ``eps`` option if given (``--opt eps=1e-8``); else the preset's reference default where it has one
(``galore``, ``fira``, ``apollo``, ``apollo-mini``: 1e-6, as galore-torch's, Fira's and apollo-torch's AdamW); else the loop's ``cfg.eps`` (torch's 1e-8). So
``OptimConfig.eps`` — which the training loop never sets, and the HF integration fills from ``adam_epsilon`` — does
not silently replace a reference default; pass the option to change it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..methods import Method, OptimConfig, register
from . import lowbit, sharded
from .presets import PRESETS, build


class SplitMethod(Method):
    """Builds ``rankwise.optim.build(preset, model, **options)`` with the loop's hyper-parameters."""

    def __init__(self, preset: str, **options: Any):
        lowbit.check(options.get("state_bits", PRESETS[preset].get("state_bits")))  # before anything is built
        if "basis" in options:
            sharded.check_basis(options["basis"], options.get("side", "auto"),
                                options.get("projector", PRESETS[preset].get("projector", "svd")))
        self.preset = preset
        self.optimizer_options = options

    def fsdp_refusal(self) -> str | None:
        option = lambda k: self.optimizer_options.get(k, PRESETS[self.preset].get(k))  # noqa: E731
        if option("state_bits"):
            return ("its low-bit optimizer state is quantized by bitsandbytes / torchao kernels, which take whole "
                    "tensors, not DTensor shards; drop state_bits (32-bit state)")
        if option("residual") == "apollo_tensor" and option("side") != "shard":
            return ("its tensor-wise scaling updates a row-sharded weight in place across shards; pass "
                    "--opt side=shard (shard-local: the same rule, only scalar all-reduces)")
        return None

    def build_optimizer(self, model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
        options = dict(self.optimizer_options)
        include_embeddings = options.pop("include_embeddings", False)
        if options.get("eps") is None:
            options["eps"] = PRESETS[self.preset].get("eps", cfg.eps)
        return build(self.preset, model, include_embeddings=include_embeddings, lr=cfg.lr,
                     weight_decay=cfg.weight_decay, betas=cfg.betas, **options)


@register("galore", "optim", "GaLore: AdamW in the top-r SVD subspace of each gradient, residual dropped")
def galore(rank: int = 128, update_gap: int = 200, scale: float = 0.25, projector: str = "svd",
           moments: str = "keep", inner: str = "adamw_hf", eps: float | None = None, layerwise: bool = False,
           include_embeddings: bool = False, seed: int = 0, state_bits: int | None = None, stagger: bool = False,
           side: str = "auto", basis: str = "replicated") -> Method:
    """galore-torch 1.0's GaLoreAdamW; ``projector="rsvd"``, ``moments="rotate"``, ``inner="adamw"`` are rankwise's
    options beyond it (docs/fidelity-galore-fira.md)."""
    return SplitMethod("galore", **locals())


@register("galore-8bit", "optim", "8-bit GaLore: GaLore with AdamW's moments block-wise quantized to 8 bits")
def galore_8bit(rank: int = 128, update_gap: int = 200, scale: float = 0.25, projector: str = "svd",
                moments: str = "keep", inner: str = "adamw", eps: float | None = None, state_bits: int = 8,
                layerwise: bool = False, include_embeddings: bool = False, seed: int = 0) -> Method:
    """galore-torch 1.0's GaLoreAdamW8bit (``galore_adamw8bit`` in its torchrun_main.py): bitsandbytes' 8-bit
    blockwise AdamW on the projected gradient and on the other params; ``state_bits=4`` is torchao's 4-bit state."""
    return SplitMethod("galore-8bit", **locals())


@register("adamw-8bit", "optim", "8-bit AdamW: AdamW on full gradients, moments block-wise quantized to 8 bits")
def adamw_8bit(state_bits: int = 8, eps: float | None = None, layerwise: bool = False) -> Method:
    """bitsandbytes' AdamW8bit (8-bit Adam, arXiv 2110.02861); ``state_bits=4``: torchao's AdamW4bit state."""
    return SplitMethod("adamw-8bit", **locals())


@register("fira", "optim", "Fira: GaLore + the residual scaled by the inner update's gain, norm-growth limiter")
def fira(rank: int = 128, update_gap: int = 200, scale: float = 0.25, projector: str = "svd",
         moments: str = "keep", inner: str = "adamw_hf", residual: str = "fira", eps: float | None = None,
         layerwise: bool = False, include_embeddings: bool = False, seed: int = 0,
         state_bits: int | None = None, stagger: bool = False, side: str = "auto",
         basis: str = "replicated") -> Method:
    """fira 1.0.2's FiraAdamW; ``residual="fira_exact"`` (residual G - P P^T G) and GaLore's options beyond it."""
    return SplitMethod("fira", **locals())


@register("apollo", "optim", "APOLLO: the raw gradient scaled per channel by a random-projection low-rank Adam's ratio")
def apollo(rank: int = 256, update_gap: int = 200, scale: float = 1.0, projector: str = "gaussian",
           residual: str = "apollo", moments: str = "keep", inner: str = "adamw_hf", eps: float | None = None,
           layerwise: bool = False, include_embeddings: bool = False, seed: int = 0, stagger: bool = False,
           side: str = "auto") -> Method:
    """apollo-torch's ``APOLLOAdamW`` with ``scale_type="channel"`` (arXiv 2412.05270): ``scale`` is its ``scale``
    (the update is multiplied by sqrt(scale)); ``residual="apollo_tensor"`` is its tensor-wise scaling."""
    return SplitMethod("apollo", **locals())


@register("apollo-mini", "optim", "APOLLO-Mini: the raw gradient scaled tensor-wise from a rank-1 random-projection Adam")
def apollo_mini(rank: int = 1, update_gap: int = 200, scale: float = 128.0, projector: str = "gaussian",
                residual: str = "apollo_tensor", moments: str = "keep", inner: str = "adamw_hf",
                eps: float | None = None, layerwise: bool = False, include_embeddings: bool = False,
                seed: int = 0, stagger: bool = False, side: str = "auto") -> Method:
    """apollo-torch's ``APOLLOAdamW`` with ``scale_type="tensor"``, rank 1, scale 128 (the update times sqrt(128))."""
    return SplitMethod("apollo-mini", **locals())


@register("frugal", "optim", "FRUGAL: AdamW on a density fraction of the tensors (or a subspace), signSGD on the rest")
def frugal(projector: str = "block", density: float | None = 0.25, rank: int | None = None, update_gap: int = 200,
           block_order: str = "sample", residual: str = "signsgd", proj_params_lr_scale: float = 1.0,
           inactive_lr_scale: float = 1.0, moments: str = "reset", layerwise: bool = False,
           include_embeddings: bool = False, seed: int = 0, state_bits: int | None = None, stagger: bool = False,
           side: str = "auto", basis: str = "replicated") -> Method:
    """FRUGAL's options by their names there: ``projector`` block (``--optimizer frugal`` = ``block_adamw``), svd /
    random / coordinates (``galore_adamw`` with proj_type svd / random / randperm) or columns / rows / randk
    (``coord_adamw``, the fine-tuning ``frugal``); ``residual`` = ``inactive_update_rule`` (signsgd, sgd, drop);
    ``rank`` (subspace / coordinate modes) replaces ``density``. Active lr = lr * proj_params_lr_scale, state-free
    lr = lr * proj_params_lr_scale * inactive_lr_scale."""
    if rank is not None and projector not in ("block", "layers"):
        density = None
    options = dict(projector=projector, density=density, update_gap=update_gap, block_order=block_order,
                   residual=residual, scale=proj_params_lr_scale,
                   residual_lr_scale=proj_params_lr_scale * inactive_lr_scale, moments=moments, layerwise=layerwise,
                   include_embeddings=include_embeddings, seed=seed, state_bits=state_bits, stagger=stagger,
                   side=side, basis=basis)
    if projector not in ("block", "layers"):
        options["blocks"] = "linears"
    return SplitMethod("frugal", **options, **({} if rank is None else {"rank": rank}))


@register("badam", "optim", "BAdam: AdamW on one transformer layer at a time (norms included), the rest frozen")
def badam(update_gap: int = 50, block_order: str = "descending", residual: str = "drop", outside: str = "freeze",
          include_embeddings: bool = False, include_lm_head: bool = False, layerwise: bool = False,
          seed: int = 0, state_bits: int | None = None) -> Method:
    """badam's ``BlockOptimizer`` defaults: ``switch_block_every`` 50, ``switch_mode`` descending (its README
    recommends random with 100), embeddings and head frozen (``outside="train"`` trains them with AdamW)."""
    return SplitMethod("badam", **locals())


@register("lisa", "optim", "LISA: AdamW on randomly sampled layers (+ embeddings and head), resampled periodically")
def lisa(update_gap: int = 20, active_blocks: int = 2, moments: str = "keep", residual: str = "drop",
         layerwise: bool = False, seed: int = 0, state_bits: int | None = None) -> Method:
    """LMFlow's ``lisa_interval_steps`` 20 and ``lisa_activated_layers`` 2 (its script: 1); ``moments="reset"``
    frees a frozen layer's moments (LMFlow's torch AdamW keeps them)."""
    return SplitMethod("lisa", **locals())


@register("split", "optim", "any SplitOptimizer combination: projector x inner x residual x moments")
def split(projector: str = "svd", inner: str = "adamw", residual: str = "drop", rank: int = 128,
          update_gap: int = 200, scale: float = 1.0, moments: str = "keep", residual_lr_scale: float = 1.0,
          power_iters: int = 2, oversample: int = 8, block_order: str = "ascending", active_blocks: int = 1,
          density: float | None = None, block_phase: int = 0, momentum: float = 0.9, eps: float | None = None,
          layerwise: bool = False, include_embeddings: bool = False, seed: int = 0,
         state_bits: int | None = None, stagger: bool = False) -> Method:
    return SplitMethod("split", **locals())
