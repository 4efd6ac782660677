"""The weight-space parameterizations as training-loop methods: ``rankwise train --method lowrank --rank 64``.

``prepare`` swaps the target linears (attention and MLP projections of the transformer blocks) for the
parameterized layers; embeddings, LM head and norms stay dense and trainable. The optimizer is the baseline AdamW
on the trainable parameters (SwitchLoRA: ``SliceAdamW``, the same rule with a step per rank vector). ``after_step``
refactorizes / merges and resets optimizer state; ``lr_factor`` gives ReLoRA's jagged re-warmup; SwitchLoRA switches
in a step pre-hook. All of it is a pure function of the step (and of the method's saved generator), so resume is
exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import RankwiseError
from ..methods import Method, OptimConfig, register
from .layers import ChannelSparseLowRankLinear, LowRankLinear, ReLoRALinear, SparseLowRankLinear
from .ops import (check_rank, parse_targets, prune_state, refactorize, replace_linears, reset_slices, reset_state,
                  target_linears)
from .slice_adamw import SliceAdamW
from .sst import SpectralLinear, project_, resvd, round_generator, sample_active
from .switchlora import SwitchLoRALinear, switch_count

STATE_RESETS = ("magnitude", "random", "full")


class ReparamMethod(Method):
    """Swap target linears for ``build_layer(linear)``; every ``refactor_every`` steps re-balance the factors by
    SVD (``ops.refactorize``) and, with ``reset_moments``, forget their optimizer state (Glentis et al. 2025)."""

    def __init__(self, rank: int, target: str = "attn,mlp", full_rank_ends: int = 0, refactor_every: int = 0,
                 reset_moments: bool = False):
        if refactor_every < 0:
            raise RankwiseError(f"refactor_every must be >= 0 (0 = never), got {refactor_every}")
        if reset_moments and not refactor_every:
            raise RankwiseError("reset_moments resets the moments at each refactorization; set refactor_every > 0 "
                                "too (e.g. --opt refactor_every=200)")
        self.rank, self.targets, self.full_rank_ends = rank, parse_targets(target), full_rank_ends
        self.refactor_every, self.reset_moments = refactor_every, reset_moments
        self.layers: list[nn.Module] = []

    def build_layer(self, linear: nn.Linear, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> nn.Module:
        names = target_linears(model, self.targets, self.full_rank_ends)
        check_rank(self.rank, [model.get_submodule(n) for n in names])
        self.layers = replace_linears(model, names, lambda linear: self.build_layer(linear, model))
        return model

    def factor_params(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.factors()]

    def refactor_due(self, step: int) -> bool:
        return bool(self.refactor_every) and step % self.refactor_every == 0

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.refactor_due(step):
            refactorize([layer.factors() for layer in self.layers])
            if self.reset_moments:
                reset_state(optimizer, self.factor_params())


class LowRankMethod(ReparamMethod):
    def build_layer(self, linear: nn.Linear, model: nn.Module) -> nn.Module:
        std = getattr(getattr(model, "config", None), "initializer_range", 0.02)
        w = linear.weight
        return LowRankLinear(linear.in_features, linear.out_features, self.rank, bias=linear.bias is not None,
                             std=std, device=w.device, dtype=w.dtype)


class SLTrainMethod(ReparamMethod):
    def __init__(self, rank: int, density: float, alpha: float, target: str, trainable_scaling: bool = False):
        if not 0 < density < 1:
            raise RankwiseError(f"density must be in (0, 1), got {density}")
        if not alpha > 0:
            raise RankwiseError(f"alpha must be > 0, got {alpha}")
        super().__init__(rank, target)
        self.density, self.alpha, self.trainable_scaling = density, alpha, trainable_scaling

    def build_layer(self, linear: nn.Linear, model: nn.Module) -> nn.Module:
        w = linear.weight
        return SparseLowRankLinear(linear.in_features, linear.out_features, self.rank, self.density, self.alpha,
                                   bias=linear.bias is not None, trainable_scaling=self.trainable_scaling,
                                   device=w.device, dtype=w.dtype)


class ReLoRAMethod(ReparamMethod):
    """ReLoRA: every ``reset_every`` steps merge ``B A`` into ``W``, restart the factors, prune (or drop) their
    optimizer state, and re-warm the learning rate linearly over ``restart_warmup`` steps (the jagged schedule).

    Default state reset: random pruning of 99% of the factors' moments with one mask shared by both moments (as in
    the benchmark's ReLoRA scripts). ReLoRA's per-moment magnitude pruning (``state_reset=magnitude``) can keep a
    first moment whose second moment was zeroed, a huge step right after the merge unless the re-warmup is long.
    """

    def __init__(self, rank: int, alpha: float, reset_every: int, restart_warmup: int, state_reset: str,
                 prune_ratio: float, target: str, refactor_every: int, reset_moments: bool):
        if reset_every <= 0:
            raise RankwiseError(f"reset_every must be a positive number of steps, got {reset_every}")
        if not 0 <= restart_warmup < reset_every:
            raise RankwiseError(f"restart_warmup must be in [0, reset_every={reset_every}), got {restart_warmup}")
        if state_reset not in STATE_RESETS:
            raise RankwiseError(f"unknown state_reset {state_reset!r}; valid: {', '.join(STATE_RESETS)}")
        if not 0 <= prune_ratio <= 1:
            raise RankwiseError(f"prune_ratio must be in [0, 1], got {prune_ratio}")
        if not alpha > 0:
            raise RankwiseError(f"alpha must be > 0, got {alpha}")
        super().__init__(rank, target, refactor_every=refactor_every, reset_moments=reset_moments)
        self.alpha, self.reset_every, self.restart_warmup = alpha, reset_every, restart_warmup
        self.state_reset, self.prune_ratio = state_reset, prune_ratio

    def build_layer(self, linear: nn.Linear, model: nn.Module) -> nn.Module:
        return ReLoRALinear(linear, self.rank, self.alpha)

    def refactor_due(self, step: int) -> bool:
        return super().refactor_due(step) and step % self.reset_every != 0  # a merge restarts the factors anyway

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().after_step(step, model, optimizer)
        if step % self.reset_every:
            return
        for layer in self.layers:
            layer.merge_and_reinit()
        if self.state_reset == "full":
            reset_state(optimizer, self.factor_params())
        else:
            prune_state(optimizer, self.factor_params(), self.prune_ratio, self.state_reset)

    def lr_factor(self, step: int) -> float:
        """``step`` optimizer steps are done; the next one is ``step % reset_every`` steps after the last merge."""
        since = step % self.reset_every
        if step < self.reset_every or since >= self.restart_warmup:
            return 1.0
        return (since + 1) / (self.restart_warmup + 1)


class SSTMethod(ReparamMethod):
    """Sparse Spectral Training (Zhao et al. 2024, arXiv 2405.15481, Algorithm 1) on ``reparam.sst.SpectralLinear``.

    After every step: ``sst.project_`` (unit singular vectors, ``sigma >= 0``). Every ``resample_every`` steps (an
    *iteration*, the paper's T3) a new active set is drawn per layer (``sst.sample_active``) and the optimizer state
    of the active vectors is dropped (they start a fresh Adam, the paper's reset); every ``resamples_per_svd``
    draws (a *round*; ``None``: ``ceil(min(m, n) / rank)``, so a round visits about every vector) the layer is
    re-SVD'd first (``sst.resvd``) and ``sigma``'s state dropped too. The draws are a pure function of
    (seed, layer, step), so resume is exact.
    """

    def fsdp_refusal(self) -> str | None:
        return ("its re-SVD and singular-vector projection normalize across the rows FSDP splits; --method lost or "
                "sltrain runs under FSDP")

    def __init__(self, rank: int, resample_every: int, resamples_per_svd: int | None, uniform_mix: float,
                 enhanced_gradient: bool, seed: int, target: str):
        if resample_every < 1:
            raise RankwiseError(f"resample_every must be a positive number of steps, got {resample_every}")
        if resamples_per_svd is not None and resamples_per_svd < 1:
            raise RankwiseError(f"resamples_per_svd must be a positive number of draws (or unset for "
                                f"ceil(min(m, n) / rank)), got {resamples_per_svd}")
        if not 0 <= uniform_mix <= 1:
            raise RankwiseError(f"uniform_mix must be in [0, 1] (0: proportional to sigma), got {uniform_mix}")
        super().__init__(rank, target)
        self.resample_every, self.resamples_per_svd = resample_every, resamples_per_svd
        self.uniform_mix, self.enhanced_gradient, self.seed = uniform_mix, enhanced_gradient, seed

    def build_layer(self, linear: nn.Linear, model: nn.Module) -> nn.Module:
        return SpectralLinear(linear.weight, linear.bias, self.rank, self.enhanced_gradient)

    def prepare(self, model: nn.Module) -> nn.Module:
        names = target_linears(model, self.targets, self.full_rank_ends)
        check_rank(self.rank, [model.get_submodule(n) for n in names], full=True)
        self.layers = replace_linears(model, names, lambda linear: self.build_layer(linear, model))
        if self.layers[0].sigma.device.type != "meta":
            self.resample(0)
        return model

    def round_length(self, layer: SpectralLinear) -> int:
        return self.resamples_per_svd or math.ceil(layer.k / self.rank)

    def resample(self, step: int) -> None:
        """Draw every layer's active set for the iteration that starts after ``step``."""
        t = step // self.resample_every
        for i, layer in enumerate(self.layers):
            active = sample_active(layer.sigma, self.rank, self.uniform_mix, round_generator(self.seed, i, t))
            U, V = layer.spectrum()
            layer.set_spectrum(U, layer.sigma.detach().clone(), V, active)

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        project_(self.layers)
        if step % self.resample_every:
            return
        t = step // self.resample_every
        due = [layer for layer in self.layers if t % self.round_length(layer) == 0]
        resvd(due)
        reset_state(optimizer, [layer.sigma for layer in due])
        self.resample(step)
        reset_state(optimizer, [p for layer in self.layers for p in (layer.U, layer.V)])


class LOSTMethod(ReparamMethod):
    def __init__(self, rank: int, sparsity: float, gamma: float, sparse_svd_rank: int, target: str):
        if not 0 < sparsity < 1:
            raise RankwiseError(f"sparsity (the fraction of input channels in the sparse part) must be in (0, 1), "
                                f"got {sparsity}")
        if not 0 <= gamma <= 1:
            raise RankwiseError(f"gamma (the low-rank part's weight) must be in [0, 1], got {gamma}")
        if sparse_svd_rank < 1:
            raise RankwiseError(f"sparse_svd_rank must be a positive number of singular components, "
                                f"got {sparse_svd_rank}")
        super().__init__(rank, target)
        self.sparsity, self.gamma, self.sparse_svd_rank = sparsity, gamma, sparse_svd_rank

    def build_layer(self, linear: nn.Linear, model: nn.Module) -> nn.Module:
        return ChannelSparseLowRankLinear(linear.weight, linear.bias, self.rank, self.sparsity, self.gamma,
                                          self.sparse_svd_rank)
class SwitchLoRAMethod(ReparamMethod):
    """SwitchLoRA: ReLoRA's layer whose rank vectors are switched for pool candidates before every optimizer step.

    The switch runs in a step pre-hook of the optimizer, after the backward and the gradient clipping, as in the
    reference's loop (``switch_lora`` then ``optimizer.step``): per layer ``SwitchLoRALinear.switch`` moves
    ``switch_count`` vectors (one uniform draw per layer from the method's own generator), then, batched over all
    layers with ``torch._foreach_mul_``, the counterpart slices' moments and step counters are zeroed and the
    gradients of frozen slices are zeroed. The optimizer is ``SliceAdamW`` (per-row step for ``A``, per-column for
    ``B``). The generator and the step count are the method's state; pools, slots and counters are model buffers.
    """

    def fsdp_refusal(self) -> str | None:
        return ("its switches index candidate pools of whole (not DTensor) tensors; --method relora runs under "
                "FSDP")

    def __init__(self, rank: int, alpha: float, interval: float, descent_steps: int, frozen_steps: int, seed: int,
                 target: str, full_rank_ends: int):
        if not interval > 0:
            raise RankwiseError(f"interval must be > 0 (steps between switches of one vector), got {interval}")
        if frozen_steps < 0:
            raise RankwiseError(f"frozen_steps must be >= 0, got {frozen_steps}")
        if interval < 2 * frozen_steps:
            raise RankwiseError(f"interval ({interval}) must be at least 2 x frozen_steps ({frozen_steps}): a "
                                "vector must not be switched while it is frozen; raise interval or lower frozen_steps")
        if descent_steps < 1:
            raise RankwiseError(f"descent_steps must be a positive number of steps (the paper: 0.1 x the run's "
                                f"steps), got {descent_steps}")
        if not alpha > 0:
            raise RankwiseError(f"alpha must be > 0, got {alpha}")
        super().__init__(rank, target, full_rank_ends)
        self.alpha, self.interval, self.descent_steps, self.frozen_steps = alpha, interval, descent_steps, frozen_steps
        self.generator = torch.Generator().manual_seed(seed)
        self.done = 0  # optimizer steps completed: the next update is the reference's update_step ``done``

    def build_layer(self, linear: nn.Linear, model: nn.Module) -> nn.Module:
        return SwitchLoRALinear(linear, self.rank, self.alpha)

    def build_optimizer(self, model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
        factors = {id(p) for layer in self.layers for p in layer.factors()}
        rows = [layer.lora_A for layer in self.layers]
        cols = [layer.lora_B for layer in self.layers]
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in factors]
        groups = [{"params": rows, "slice_dim": 0, "weight_decay": cfg.weight_decay},
                  {"params": cols, "slice_dim": 1, "weight_decay": cfg.weight_decay},
                  {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = SliceAdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.switch(opt))
        return optimizer

    @torch.no_grad()
    def switch(self, optimizer: torch.optim.Optimizer) -> None:
        """One switching round (reference ``switch_lora``): switch, reset and freeze the counterparts, mask grads.

        A layer's switched rows of ``A`` make ``B[:, rows]`` the counterpart, its switched columns of ``B`` make
        ``A[cols]`` one: their moments and steps are zeroed, they are frozen for ``frozen_steps`` steps (this one
        included), and the gradients of every frozen slice are zeroed before the update."""
        draws = torch.rand(len(self.layers), generator=self.generator, dtype=torch.float64).tolist()
        slices, resets = [], []  # (param, frozen counter, mask of its slices whose counterpart was switched)
        for layer, u in zip(self.layers, draws):
            rows, cols = layer.switch(switch_count(self.rank, self.done, self.interval, self.descent_steps, u))
            slices += [(layer.lora_A, layer.frozen_A.unsqueeze(1)), (layer.lora_B, layer.frozen_B.unsqueeze(0))]
            resets += [cols.unsqueeze(1), rows.unsqueeze(0)]
        reset_slices(optimizer, [p for p, _ in slices], [~reset for reset in resets])
        frozen = [f for _, f in slices]
        for f, reset in zip(frozen, resets):
            f.masked_fill_(reset, self.frozen_steps)
        grads = [(p.grad, f == 0) for p, f in slices if p.grad is not None]
        if grads:
            torch._foreach_mul_([g for g, _ in grads], [live for _, live in grads])
        torch._foreach_sub_(frozen, 1)
        torch._foreach_clamp_min_(frozen, 0)

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.done = step

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.done = int(state["done"])


@register("lowrank", "reparam", "W = B A trained from scratch (rank r); optional SVD refactorization + moment reset")
def lowrank(rank: int = 128, target: str = "attn,mlp", full_rank_ends: int = 0, refactor_every: int = 0,
            reset_moments: bool = False) -> Method:
    return LowRankMethod(rank, target, full_rank_ends, refactor_every, reset_moments)


@register("lowrank-rr", "reparam", "low-rank W = B A + weight refactorization and momentum reset (Glentis et al.)")
def lowrank_rr(rank: int = 128, target: str = "attn,mlp", full_rank_ends: int = 0, refactor_every: int = 200,
               reset_moments: bool = True) -> Method:
    return LowRankMethod(rank, target, full_rank_ends, refactor_every, reset_moments)


@register("relora", "reparam", "ReLoRA: frozen W + B A, merged and restarted every reset_every steps, jagged LR")
def relora(rank: int = 128, alpha: float = 32.0, reset_every: int = 1000, restart_warmup: int = 100,
           state_reset: str = "random", prune_ratio: float = 0.99, target: str = "attn,mlp",
           refactor_every: int = 0, reset_moments: bool = False) -> Method:
    return ReLoRAMethod(rank, alpha, reset_every, restart_warmup, state_reset, prune_ratio, target, refactor_every,
                        reset_moments)


@register("switchlora", "reparam", "SwitchLoRA: frozen W + B A whose rank vectors are switched for candidates, "
                                   "a few per step, at a decaying frequency")
def switchlora(rank: int = 128, alpha: float = 1.0, interval: float = 40.0, descent_steps: int = 1000,
               frozen_steps: int = 5, seed: int = 0, target: str = "attn,attention,mlp",
               full_rank_ends: int = 0) -> Method:
    """The reference's defaults (asfsdsf/SwitchLoRA ``add_parse_switch_lora_args``): rank 128, ``lora_alpha`` 1,
    ``switch_lora_interval`` 40, ``adam_warm_step`` 5, targets attn / attention / mlp. ``descent_steps`` is the
    reference's ``switch_lora_descent_rate x num_training_steps`` (0.1 x the run's steps: set it to steps / 10)."""
    return SwitchLoRAMethod(rank, alpha, interval, descent_steps, frozen_steps, seed, target, full_rank_ends)


@register("sltrain", "reparam", "SLTrain: W = (alpha/r) B A + S, S sparse on a random fixed support (density)")
def sltrain(rank: int = 128, density: float = 0.03, alpha: float = 32.0, target: str = "attn,attention,mlp",
            trainable_scaling: bool = False) -> Method:
    """SLTrain's ``SpLoRaModel``: the linears whose names contain attn / attention / mlp; ``trainable_scaling``
    trains ``tanh(c)`` in place of ``alpha / r``."""
    return SLTrainMethod(rank, density, alpha, target, trainable_scaling)


@register("sst", "reparam", "Sparse Spectral Training: W = U diag(s) V^T, all s and r sampled vector pairs trained, "
                            "resampled every resample_every steps, re-SVD each round")
def sst(rank: int = 128, resample_every: int = 200, resamples_per_svd: int | None = None, uniform_mix: float = 0.5,
        enhanced_gradient: bool = True, seed: int = 0, target: str = "attn,mlp") -> Method:
    """SST (arXiv 2405.15481): ``rank`` active singular-vector pairs per layer (``rank = min(m, n)``: all of them);
    ``uniform_mix=0`` samples proportionally to sigma, ``enhanced_gradient=false`` uses the plain chain rule."""
    return SSTMethod(rank, resample_every, resamples_per_svd, uniform_mix, enhanced_gradient, seed, target)


@register("lost", "reparam", "LOST: gamma B A + (1-gamma) channel-sparse W_s, split from the SVD of the init weight")
def lost(rank: int = 128, sparsity: float = 0.05, gamma: float = 0.5, sparse_svd_rank: int = 256,
         target: str = "attn,mlp") -> Method:
    """LOST (arXiv 2508.02668): dominant rank-``rank`` SVD part + the ``sparsity`` fraction of input channels chosen
    by the norm of the next ``sparse_svd_rank`` singular components; trained with AdamW."""
    return LOSTMethod(rank, sparsity, gamma, sparse_svd_rank, target)
