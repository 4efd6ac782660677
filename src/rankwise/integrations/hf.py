"""Any rankwise method inside ``transformers.Trainer``.

    from rankwise.integrations.hf import rankwise_setup
    setup = rankwise_setup(model, "galore", args, rank=64)           # args: transformers.TrainingArguments
    trainer = Trainer(model=setup.model, args=args, train_dataset=ds, optimizers=setup.optimizers,
                      callbacks=setup.callbacks)

``rankwise_setup`` prepares the model as the method wants it (adapters injected and the base frozen, or
reparameterized layers), builds the method's optimizer with the learning rate, weight decay, Adam betas and epsilon
of ``args``, and rankwise's schedule (linear warmup over ``args.warmup_steps``, cosine to ``min_lr_ratio``, times the
method's ``lr_factor`` — ReLoRA's re-warmups). The callback runs the method's ``after_step`` (ReLoRA merges,
refactorizations, MoE balancing) after every optimizer step. Trainer clips gradients itself (``max_grad_norm``).

Not carried over: a method's auxiliary loss (``aux_loss``, the MoE balance loss): Trainer computes the loss; add it in
a ``compute_loss`` override if you need it. Gradient-initialized adapters (LoRA-GA, LoRA-SB) need calibration
batches: pass ``calibration=[token id tensors]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import methods as methods_mod
from ..errors import RankwiseError
from ..methods import Method, OptimConfig
from ..train import cosine_with_warmup


@dataclass
class RankwiseSetup:
    """What ``Trainer`` needs: the prepared model, ``optimizers=(optimizer, scheduler)`` and ``callbacks``."""

    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    callbacks: list[Any] = field(default_factory=list)

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        return self.optimizer, self.scheduler


def _callback(method: Method, optimizer: torch.optim.Optimizer):
    from transformers import TrainerCallback

    class RankwiseCallback(TrainerCallback):
        """Runs ``method.after_step(step, model, optimizer)`` after each optimizer step."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            method.after_step(state.global_step, model, optimizer)

    return RankwiseCallback()


def rankwise_setup(model: nn.Module, method: str | Method, args, min_lr_ratio: float = 0.1,
                   calibration: list[torch.Tensor] | None = None, **options: Any) -> RankwiseSetup:
    """Prepare ``model`` for ``method`` (a registered name with ``options``, or a built ``Method``) and build its
    optimizer, schedule and callback from ``args`` (``transformers.TrainingArguments``, ``max_steps`` > 0)."""
    if isinstance(method, str):
        method = methods_mod.get(method, **options)
    elif options:
        raise RankwiseError("options go with a method name; a built Method already has its options")
    total = getattr(args, "max_steps", -1)
    if not isinstance(total, int) or total <= 0:
        raise RankwiseError("set TrainingArguments(max_steps=N): rankwise's schedule needs the number of steps")
    if not 0 <= min_lr_ratio <= 1:
        raise RankwiseError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if method.calibration_batches:
        if not calibration:
            raise RankwiseError(f"method {method.name!r} initializes from gradients: pass calibration=[batches of "
                                "token ids, shape (B, T+1)] to rankwise_setup")
        method.calibrate(model, calibration)
    model = method.prepare(model)
    cfg = OptimConfig(lr=args.learning_rate, weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                      eps=args.adam_epsilon)
    optimizer = method.build_optimizer(model, cfg)
    warmup = args.get_warmup_steps(total) if hasattr(args, "get_warmup_steps") else int(args.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, warmup, total, min_lr_ratio) * method.lr_factor(s))
    return RankwiseSetup(model, method, optimizer, scheduler, [_callback(method, optimizer)])
