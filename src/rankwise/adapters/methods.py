"""Adapter methods for the training loop: ``rankwise train --method lora --r 8 --alpha 16 --target q_proj,v_proj``.

``prepare`` injects the adapter (freezing the base), gradient-based inits (LoRA-GA, LoRA-SB) use the batches the
loop passes to ``calibrate``, and ``build_optimizer`` builds AdamW over the adapter parameters (learning rate times
``lr_scale``); the gradient-corrected methods get their own optimizers (LoRA-Pro, AltLoRA) or wrap AdamW
(LoRA-Pro-lite).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import RankwiseError
from ..methods import Method, OptimConfig, decay_groups, register
from .adalora import AdaLoRA, AdaLoRAAllocator, check_schedule
from .corrections import AltLoRA, LoRAPro, LoRAProLite
from .inject import active_parameterizations, apply, find_targets
from .inits import calibration_gradients, init_lora_ga, init_lora_sb, init_pissa
from .lora import LoRA

DEFAULT_TARGET = "q_proj,v_proj"


def resolve_target(model: nn.Module, target: str) -> str:
    """The default ``q_proj,v_proj`` (LoRA's W_q, W_v) on a model that has both; on one without them (GPT-2's fused
    ``c_attn``, a plain MLP) every linear layer but the output (``all-linear``). Other targets are kept."""
    if target != DEFAULT_TARGET:
        return target
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return target if {"q_proj", "v_proj"} <= names else "all-linear"


def resolve_rank(r: int | None, rank: int | None, default: int = 8) -> int:
    if r is not None and rank is not None and r != rank:
        raise RankwiseError(f"got both r={r} and rank={rank}; give one of --r / --rank")
    value = r if r is not None else rank if rank is not None else default
    if not isinstance(value, int) or value <= 0:
        raise RankwiseError(f"adapter rank must be a positive integer, got {value!r}")
    return value


class AdapterMethod(Method):
    """Fine-tune a (pre-trained) model through adapter ``kind`` (a registered parameterization)."""

    def __init__(self, kind: str, r: int, alpha: float, target: str, dropout: float, seed: int, lr_scale: float,
                 init: str | None = None, correction: str | None = None, calibration_batches: int = 0,
                 init_options: dict[str, Any] | None = None, correction_options: dict[str, Any] | None = None,
                 **options: Any):
        if not lr_scale > 0:
            raise RankwiseError(f"lr_scale must be > 0, got {lr_scale}")
        if calibration_batches < 0:
            raise RankwiseError(f"calibration_batches must be >= 0, got {calibration_batches}")
        self.kind, self.init, self.correction, self.lr_scale = kind, init, correction, lr_scale
        self.apply_options = dict(r=r, alpha=alpha, target=target, dropout=dropout, seed=seed, **options)
        self.init_options = init_options or {}
        self.correction_options = correction_options or {}
        self.calibration_batches = calibration_batches
        self.grads: dict[str, torch.Tensor] | None = None

    def fsdp_refusal(self) -> str | None:
        if self.correction in ("lora-pro", "altlora"):
            instead = "lora-pro-lite" if self.correction == "lora-pro" else "lora"
            return (f"{self.correction}'s optimizer combines the factors with plain tensors of its own (not DTensor "
                    f"shards); --method {instead} runs under FSDP")
        return None

    def resolved_options(self) -> dict[str, Any]:
        return {"r": self.apply_options["r"]}

    def calibrate(self, model: nn.Module, batches: list[torch.Tensor]) -> None:
        target = resolve_target(model, self.apply_options["target"])
        self.grads = calibration_gradients(model, batches, find_targets(model, target))

    def prepare(self, model: nn.Module) -> nn.Module:
        options = {**self.apply_options, "target": resolve_target(model, self.apply_options["target"])}
        if self.init in ("lora-ga", "lora-sb"):
            if self.grads is None:
                raise RankwiseError(f"{self.init} initializes from gradients: it needs calibration batches "
                                    "(the training loop passes them; or call adapters.init_"
                                    f"{self.init.replace('-', '_')}(model, batches, ...) directly)")
            init = init_lora_ga if self.init == "lora-ga" else init_lora_sb
            model = init(model, grads=self.grads, **options, **self.init_options)
            self.grads = None
            return model
        apply(model, self.kind, **options)
        if self.init == "pissa":
            init_pissa(model)
        return model

    def build_optimizer(self, model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
        groups, lr = decay_groups(model, cfg.weight_decay), cfg.lr * self.lr_scale
        if self.correction is None:
            return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)
        loras = [m for m in active_parameterizations(model).values() if isinstance(m, LoRA)]
        if self.correction == "lora-pro":
            return LoRAPro(groups, loras, lr=lr, betas=cfg.betas, eps=cfg.eps, **self.correction_options)
        if self.correction == "altlora":
            return AltLoRA(groups, loras, lr=lr, beta=cfg.betas[0], **self.correction_options)
        return LoRAProLite(torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps), loras)


class AdaLoRAMethod(AdapterMethod):
    """AdaLoRA: ``prepare`` builds the allocator over the model's AdaLoRA layers, ``build_optimizer`` hooks it after
    every optimizer step (importance, budget, masks: no extra call in the loop), ``aux_loss`` is the orthogonality
    regularizer. ``total_step`` defaults to the run's schedule length (``set_total_steps``)."""

    def __init__(self, schedule: dict[str, Any], **common: Any):
        super().__init__("adalora", **common)
        self.schedule = schedule
        self.allocator: AdaLoRAAllocator | None = None
        if schedule["total_step"] is not None:
            check_schedule(common["r"], schedule)

    def fsdp_refusal(self) -> str | None:
        return ("its budget allocator masks the singular values with whole (not DTensor) tensors; --method lora "
                "or dora runs under FSDP")

    def set_total_steps(self, steps: int) -> None:
        if self.schedule["total_step"] is None:
            self.schedule["total_step"] = steps
            check_schedule(self.apply_options["r"], self.schedule)

    def prepare(self, model: nn.Module) -> nn.Module:
        apply(model, "adalora", **self.apply_options, **self.schedule)
        layers = [m for m in active_parameterizations(model).values() if isinstance(m, AdaLoRA)]
        self.allocator = AdaLoRAAllocator(layers, self.schedule)
        return model

    def build_optimizer(self, model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
        optimizer = super().build_optimizer(model, cfg)
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.allocator.after_optimizer_step(opt))
        return optimizer

    def aux_loss(self, model: nn.Module) -> torch.Tensor | None:
        return self.allocator.orthogonal_regularizer() if self.schedule["orth_reg_weight"] > 0 else None

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.allocator.step = step  # the loop's step (a skipped non-finite step took no optimizer step)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.allocator.step if self.allocator else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.allocator.step = int(state.get("step", 0))


def _common(r, rank, alpha, target, dropout, seed, lr_scale, default_r: int = 8) -> dict[str, Any]:
    return dict(r=resolve_rank(r, rank, default_r), alpha=alpha, target=target, dropout=dropout, seed=seed, lr_scale=lr_scale)


@register("lora", "adapters", "LoRA: Delta W = (alpha/r) B A, B = 0 at init (Hu et al. 2021)")
def _lora(r: int | None = None, rank: int | None = None, alpha: float = 16.0, target: str = DEFAULT_TARGET,
          dropout: float = 0.0, seed: int = 0, lr_scale: float = 1.0, init: str = "default") -> Method:
    return AdapterMethod("lora", init=init, **_common(r, rank, alpha, target, dropout, seed, lr_scale))


@register("rslora", "adapters", "rank-stabilized LoRA: scaling alpha/sqrt(r) (Kalajdzievski 2023)")
def _rslora(r: int | None = None, rank: int | None = None, alpha: float = 16.0, target: str = DEFAULT_TARGET,
            dropout: float = 0.0, seed: int = 0, lr_scale: float = 1.0) -> Method:
    return AdapterMethod("lora", rslora=True, **_common(r, rank, alpha, target, dropout, seed, lr_scale))


@register("dora", "adapters", "DoRA: LoRA with a trained magnitude per output, m (W + s B A) / ||W + s B A|| (PEFT's)")
def _dora(r: int | None = None, rank: int | None = None, alpha: float = 16.0, target: str = DEFAULT_TARGET,
          dropout: float = 0.0, seed: int = 0, lr_scale: float = 1.0) -> Method:
    return AdapterMethod("lora", dora=True, **_common(r, rank, alpha, target, dropout, seed, lr_scale))


@register("adalora", "adapters", "AdaLoRA: SVD-form P diag(E) Q, triplets pruned by importance to a budget (PEFT's)")
def _adalora(r: int | None = None, rank: int | None = None, alpha: float = 8.0, target: str = DEFAULT_TARGET,
             dropout: float = 0.0, seed: int = 0, lr_scale: float = 1.0, target_r: int = 8, tinit: int = 0,
             tfinal: int = 0, delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85,
             orth_reg_weight: float = 0.5, total_step: int | None = None) -> Method:
    """Zhang et al. 2023 (arXiv 2303.10512) as PEFT 0.21 computes it; ``r`` is PEFT's ``init_r`` (default 12),
    ``delta_t`` its ``deltaT``, ``alpha`` its ``lora_alpha`` (default 8); ``total_step`` defaults to the run's
    steps. PEFT's defaults everywhere."""
    schedule = dict(target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=delta_t, beta1=beta1, beta2=beta2,
                    orth_reg_weight=orth_reg_weight, total_step=total_step)
    return AdaLoRAMethod(schedule, **_common(r, rank, alpha, target, dropout, seed, lr_scale, 12))


@register("pissa", "adapters", "PiSSA: LoRA initialised with the top-r singular part, residual base")
def _pissa(r: int | None = None, rank: int | None = None, alpha: float = 16.0, target: str = DEFAULT_TARGET,
           dropout: float = 0.0, seed: int = 0, lr_scale: float = 0.25) -> Method:
    return AdapterMethod("lora", init="pissa", **_common(r, rank, alpha, target, dropout, seed, lr_scale))


@register("lora-ga", "adapters", "LoRA-GA: LoRA initialised from the top-2r singular vectors of the gradient")
def _lora_ga(r: int | None = None, rank: int | None = None, alpha: float = 16.0, target: str = DEFAULT_TARGET,
             dropout: float = 0.0, seed: int = 0, lr_scale: float = 1.0, gamma: float = 16.0,
             calibration_batches: int = 4) -> Method:
    return AdapterMethod("lora", init="lora-ga", calibration_batches=calibration_batches,
                         init_options={"gamma": gamma}, **_common(r, rank, alpha, target, dropout, seed, lr_scale))


@register("lora-xs", "adapters", "LoRA-XS: frozen SVD factors of W, trainable r x r core")
def _lora_xs(r: int | None = None, rank: int | None = None, alpha: float = 16.0, target: str = DEFAULT_TARGET,
             dropout: float = 0.0, seed: int = 0, lr_scale: float = 1.0) -> Method:
    return AdapterMethod("lora-xs", **_common(r, rank, alpha, target, dropout, seed, lr_scale))


@register("lora-sb", "adapters", "LoRA-SB: r x r core, factors and core from the update approximation")
def _lora_sb(r: int | None = None, rank: int | None = None, alpha: float = 16.0, target: str = DEFAULT_TARGET,
             dropout: float = 0.0, seed: int = 0, lr_scale: float = 1.0, eta: float = 1e-3,
             calibration_batches: int = 4) -> Method:
    return AdapterMethod("lora-xs", init="lora-sb", calibration_batches=calibration_batches,
                         init_options={"eta": eta}, **_common(r, rank, alpha, target, dropout, seed, lr_scale))


@register("nola", "adapters", "NOLA: A, B as combinations of seeded random bases; only 2k coefficients trained")
def _nola(r: int | None = None, rank: int | None = None, alpha: float = 16.0, target: str = DEFAULT_TARGET,
          dropout: float = 0.0, seed: int = 0, lr_scale: float = 1.0, num_bases: int = 64) -> Method:
    return AdapterMethod("nola", num_bases=num_bases, **_common(r, rank, alpha, target, dropout, seed, lr_scale))


@register("vera", "adapters", "VeRA: shared frozen random A, B; trainable scaling vectors (PEFT's)")
def _vera(r: int | None = None, rank: int | None = None, alpha: float = 256.0, target: str = DEFAULT_TARGET,
          dropout: float = 0.0, seed: int = 0, lr_scale: float = 10.0, d_init: float = 0.1,
          shared_seed: int = 0) -> Method:
    """VeRA's trainable count barely depends on r, so its default rank is high (256, PEFT's) and, with few
    parameters, so is its learning rate (``lr_scale=10``). ``alpha`` is unused: VeRA has no alpha / r factor.
    ``shared_seed`` is PEFT's ``projection_prng_key``."""
    return AdapterMethod("vera", d_init=d_init, shared_seed=shared_seed,
                         **_common(r, rank, alpha, target, dropout, seed, lr_scale, 256))


@register("randlora", "adapters", "RandLoRA: full-rank update from scaled shared random low-rank bases (PEFT's)")
def _randlora(r: int | None = None, rank: int | None = None, alpha: float = 640.0, target: str = DEFAULT_TARGET,
              dropout: float = 0.0, seed: int = 0, lr_scale: float = 1.0, shared_seed: int = 0,
              sparse: bool = False, very_sparse: bool = False) -> Method:
    """PEFT's defaults (r = 32). Its large scaling already amplifies the diagonal scalings, so the learning rate
    is the loop's (``lr_scale=1``). Scaling ``alpha / r`` with PEFT's default ``alpha = 640``; ``sparse`` / ``very_sparse``: ternary bases."""
    return AdapterMethod("randlora", shared_seed=shared_seed, sparse=sparse, very_sparse=very_sparse,
                         **_common(r, rank, alpha, target, dropout, seed, lr_scale, 32))


@register("lora-pro", "adapters", "LoRA-Pro: Adam on the equivalent full gradient, re-projected onto the factors")
def _lora_pro(r: int | None = None, rank: int | None = None, alpha: float = 16.0, target: str = DEFAULT_TARGET,
              dropout: float = 0.0, seed: int = 0, lr_scale: float = 1.0, delta: float = 1e-8,
              bias_step_offset: int = 0) -> Method:
    """The paper's algorithm (Adam moments of the m x n equivalent gradient, optimal X, SGD step on A and B):
    full fine-tuning's optimizer memory. ``bias_step_offset=1`` reproduces the reference code's bias correction."""
    return AdapterMethod("lora", correction="lora-pro", correction_options=dict(delta=delta,
                         bias_step_offset=bias_step_offset), **_common(r, rank, alpha, target, dropout, seed, lr_scale))


@register("lora-pro-lite", "adapters", "LoRA-Pro's X = 0 adjusted factor gradients stepped by AdamW (LoRA memory)")
def _lora_pro_lite(r: int | None = None, rank: int | None = None, alpha: float = 16.0, target: str = DEFAULT_TARGET,
                   dropout: float = 0.0, seed: int = 0, lr_scale: float = 1.0) -> Method:
    """Not the paper's algorithm; see docs/adapters.md for its measured quality."""
    return AdapterMethod("lora", correction="lora-pro-lite", **_common(r, rank, alpha, target, dropout, seed,
                                                                       lr_scale))


@register("altlora", "adapters", "AltLoRA: alternating projected momentum updates of A and B (switch every 10)")
def _altlora(r: int | None = None, rank: int | None = None, alpha: float = 16.0, target: str = DEFAULT_TARGET,
             dropout: float = 0.0, seed: int = 0, lr_scale: float = 100.0, reg: float = 1e-5,
             alternate_every: int = 10) -> Method:
    """The reference optimizer: first moment only (beta = the loop's beta1), momentum transported at each update;
    ``alternate_every=0`` updates both factors every step. With no second moment the step is ``lr`` times the
    preconditioned gradient, not an Adam-sized step, so the loop's Adam learning rate is scaled by
    ``lr_scale=100`` (the reference has no such factor: its ``lr`` is this method's ``lr * lr_scale``)."""
    return AdapterMethod("lora", correction="altlora", correction_options=dict(reg=reg,
                         alternate_every=alternate_every), **_common(r, rank, alpha, target, dropout, seed, lr_scale))
