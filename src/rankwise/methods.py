"""Methods: the plug points of the training loop, as an interface and a registry.

A method may (a) transform the model (adapters, reparameterizations) and (b) build the optimizer; it may also act
after each optimizer step (ReLoRA merges, refactorization), scale the learning rate (re-warmup) and add an auxiliary
loss (router balance). The training loop only ever talks to this interface.

Families register their methods in their own modules (listed in ``BUILTIN_MODULES``) with ``@register``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import RankwiseError


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer hyper-parameters that the training loop owns (the schedule scales ``lr``)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable params split nanoGPT-style: matrices decay, vectors (norms, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class Method:
    """Full-rank training with AdamW: the baseline, and the default behaviour of every hook."""

    name = "full"
    calibration_batches = 0  # > 0: the loop passes this many training batches to ``calibrate`` before ``prepare``

    def calibrate(self, model: nn.Module, batches: list[torch.Tensor]) -> None:
        """See data before training (e.g. LoRA-GA's gradient-based init); ``batches`` are (B, T+1) token ids."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """Transform the model before training (in place or not); return the model to train."""
        return model

    def set_total_steps(self, steps: int) -> None:
        """The number of optimizer steps the run's schedule spans; the loop calls it before ``prepare`` (AdaLoRA's
        budget schedule ends there unless given its own ``total_step``)."""

    def build_optimizer(self, model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
        return torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)

    def lr_factor(self, step: int) -> float:
        """Multiplier on the scheduled learning rate at ``step`` (a pure function of the step, so resume is exact)."""
        return 1.0

    def aux_loss(self, model: nn.Module) -> torch.Tensor | None:
        """An extra loss term added to the LM loss (e.g. a router's load-balancing loss)."""
        return None

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called after optimizer step ``step`` (1-based) — periodic merges, refactorizations, resets."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        """The options this method was built with (recorded in metrics and results)."""
        return dict(getattr(self, "options", {}))

    def resolved_options(self) -> dict[str, Any]:
        """Values the method chose for options given as ``None`` (e.g. an adapter's ``r`` defaults to 8)."""
        return {}

    def fsdp_refusal(self) -> str | None:
        """Why this method cannot run on FSDP2-sharded (``DTensor``) parameters, and what to do instead; ``None``
        when it can (every registered method is run under FSDP by ``tests/distributed/test_fsdp_methods.py``)."""
        return None


@dataclass(frozen=True)
class MethodInfo:
    name: str
    family: str
    description: str
    factory: Callable[..., Method]

    def annotations(self) -> dict[str, str]:
        """Option names and their type annotations, as text."""
        return {k: v.annotation if isinstance(v.annotation, str) else getattr(v.annotation, "__name__", "")
                for k, v in inspect.signature(self.factory).parameters.items()
                if v.annotation is not inspect.Parameter.empty}

    def options(self) -> dict[str, Any]:
        """Option names and defaults the factory accepts (``None`` where the method resolves the default itself)."""
        return {k: (None if v.default is inspect.Parameter.empty else v.default)
                for k, v in inspect.signature(self.factory).parameters.items()
                if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)}

    def defaults(self) -> dict[str, Any]:
        """``options()`` with each ``None`` replaced by the value a method built with no options uses."""
        opts = self.options()
        if any(v is None for v in opts.values()):
            resolved = self.factory().resolved_options()
            opts = {k: resolved.get(k, v) if v is None else v for k, v in opts.items()}
        return opts


_REGISTRY: dict[str, MethodInfo] = {}

# integer options that count something and must be >= 1 whatever the method
POSITIVE_OPTIONS = ("rank", "r", "update_gap")


def _check_option(method: str, key: str, value: Any, annotation: str) -> None:
    """``value`` has the type the factory's annotation names (int / float / bool / str, or None when optional),
    is finite, and is >= 1 for the counting options (rank, r, update_gap)."""
    words = set(re.findall(r"[A-Za-z_]+", annotation))
    where = f"method {method!r} option {key}"
    if isinstance(value, float) and not math.isfinite(value):
        raise RankwiseError(f"{where} must be a finite number, got {value!r}")
    checks = {"bool": lambda v: isinstance(v, bool), "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "str": lambda v: isinstance(v, str) or (key == "target" and isinstance(v, (list, tuple))),
              "None": lambda v: v is None}
    named = [t for t in checks if t in words]
    if named and not (words - set(checks) - {"Optional"}) and not any(checks[t](value) for t in named):
        kinds = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}
        want = " or ".join(kinds[t] for t in named if t != "None")
        raise RankwiseError(f"{where} must be {want}, got {value!r}")
    if key in POSITIVE_OPTIONS and checks["int"](value) and value < 1:
        raise RankwiseError(f"{where} must be a positive integer, got {value}")

# Modules that register methods when imported; each family owns one line.
BUILTIN_MODULES = [
    "rankwise.methods",
    "rankwise.optim.methods",
    "rankwise.reparam.methods",
    "rankwise.adapters.methods",
    "rankwise.adapters.moe.methods",
]


def register(name: str, family: str, description: str) -> Callable[[Callable[..., Method]], Callable[..., Method]]:
    """Decorator: register ``factory(**options) -> Method`` under ``name``."""

    def deco(factory: Callable[..., Method]) -> Callable[..., Method]:
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise RuntimeError(f"method {name!r} registered twice")
        _REGISTRY[name] = MethodInfo(name, family, description, factory)
        return factory

    return deco


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def available() -> list[MethodInfo]:
    _load_builtins()
    return sorted(_REGISTRY.values(), key=lambda m: (m.family != "full", m.family, m.name))


def info(name: str) -> MethodInfo:
    _load_builtins()
    if name not in _REGISTRY:
        raise RankwiseError(f"unknown method {name!r}; valid methods: {', '.join(m.name for m in available())} "
                            "(`rankwise methods` describes them)")
    return _REGISTRY[name]


def get(name: str, **options: Any) -> Method:
    """Build method ``name``; options that are ``None`` are left at the method's defaults."""
    meta = info(name)
    options = {k: v for k, v in options.items() if v is not None}
    valid = meta.options()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise RankwiseError(f"method {name!r} does not take option(s) {', '.join(unknown)}; "
                            f"valid options: {', '.join(valid) or 'none'}")
    for key, value in options.items():
        _check_option(name, key, value, meta.annotations().get(key, ""))
    try:
        method = meta.factory(**options)
    except RankwiseError:
        raise
    except (TypeError, ValueError) as e:  # a factory's own check, in its own words
        raise RankwiseError(f"method {name!r}: {e}") from None
    method.name = name
    method.options = options
    return method


@register("full", "full", "full-rank training with AdamW (the baseline)")
def _full() -> Method:
    return Method()
