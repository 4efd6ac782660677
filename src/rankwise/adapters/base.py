"""The shared base of every adapter: a ``Parameterization`` of Delta W, and ``AdapterLinear``, which wraps an
``nn.Linear`` (or transformers' GPT-2 ``Conv1D``) and holds named parameterizations.

    y = W x + b + sum_{active, unmerged a} Delta W_a x        (dropout, if any, applies to x on the adapter path)

A method is one small module: a ``Parameterization`` subclass registered with ``@parameterization(name)`` that
defines its factors, ``delta_weight()``, a fused ``forward(x, out)`` (returns ``out + Delta W x``), and how it is
written to / read from a file (``export_state`` / ``import_state``; keys are suffixes after the module path, in
PEFT's layout). Injection, merge, save and load (``inject.py``, ``io.py``) only use this interface.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RankwiseError

PARAMETERIZATIONS: dict[str, type["Parameterization"]] = {}


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and relatives): ``y = x W + b`` with ``W`` stored ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and getattr(module, "nf", None) is not None \
        and getattr(module, "weight", None) is not None and module.weight.dim() == 2


class LinearView:
    """A ``Conv1D`` seen as an ``nn.Linear``: ``weight`` is the ``(out, in)`` transpose view of the stored ``(in, out)``
    weight (no copy: in-place writes such as a merge reach the ``Conv1D``), so every parameterization computes in the
    ``nn.Linear`` convention. PEFT's ``fan_in_fan_out=True`` (peft/tuners/lora/layer.py, ``transpose``)."""

    fan_in_fan_out = True

    def __init__(self, layer: nn.Module):
        self.layer = layer

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight.t()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    @property
    def in_features(self) -> int:
        return self.layer.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.layer.weight.shape[1]


def as_linear(layer: nn.Module) -> nn.Module | LinearView:
    """``layer`` in the ``nn.Linear`` convention (weight ``(out, in)``): itself, or a ``LinearView`` of a ``Conv1D``."""
    return LinearView(layer) if is_conv1d(layer) else layer


def parameterization(name: str) -> Callable[[type["Parameterization"]], type["Parameterization"]]:
    """Class decorator: register a ``Parameterization`` under ``name`` (the ``method`` of ``adapters.apply``)."""

    def deco(cls: type[Parameterization]) -> type[Parameterization]:
        if name in PARAMETERIZATIONS and PARAMETERIZATIONS[name] is not cls:
            raise RuntimeError(f"parameterization {name!r} registered twice")
        cls.kind = name
        PARAMETERIZATIONS[name] = cls
        return cls

    return deco


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that depends only on the global seed and the module's name (stable across processes)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def seeded(shape: tuple[int, ...], seed: int, std: float, like: torch.Tensor) -> torch.Tensor:
    """A Gaussian tensor drawn on the CPU from ``seed`` (identical on every device), moved next to ``like``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(device=like.device, dtype=like.dtype)


_SHARED: dict[tuple, Any] = {}


def shared(key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, computed once per ``key`` and reused: frozen random bases shared by every layer (and every model)
    asking for the same key cost memory once. Regenerated from their seed, never stored in checkpoints."""
    if key not in _SHARED:
        _SHARED[key] = make()
    return _SHARED[key]


class Parameterization(nn.Module):
    """``Delta W`` of one linear layer (``out x in``), with scaling ``alpha / r`` (or ``alpha / sqrt(r)``, rsLoRA).

    Subclasses set ``peft_type`` to PEFT's name when PEFT can load their files ("LORA"), and define
    ``delta_weight``, ``forward``, ``export_state`` / ``import_state``. Frozen factors are buffers; only the trained
    tensors are ``nn.Parameter``. Options arrive as keyword arguments (validated by the subclass).
    """

    kind: ClassVar[str] = ""
    peft_type: ClassVar[str | None] = None
    uses_base: bool = False  # forward / delta_weight take the base layer (DoRA normalizes W + Delta W)
    # file tensors that may be absent (then rebuilt, e.g. random bases regenerated from their seed)
    optional_keys: ClassVar[tuple[str, ...]] = ()
    # tensors shared by every layer: written once as base_model.<key> (model_keys) and / or per layer (shared_keys)
    model_keys: ClassVar[tuple[str, ...]] = ()
    shared_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 seed: int = 0):
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise RankwiseError(f"adapter rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise RankwiseError(f"adapter dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.fan_in_fan_out = bool(getattr(base, "fan_in_fan_out", False))  # the base is a Conv1D (PEFT's field)
        self.r, self.alpha, self.dropout, self.rslora, self.seed = r, float(alpha), float(dropout), rslora, seed
        self.scaling = self.alpha / (math.sqrt(r) if rslora else r)
        self.options: dict[str, Any] = {}  # what ``adapters.apply`` was given (global seed), written to files
        # adapter-wide settings written to PEFT files (set by ``adapters.apply`` / ``load_adapter``)
        self.exclude: Any = None  # exclude_modules
        self.train_bias = "none"  # bias: none / all / lora_only
        self.modules_to_save: list[str] | None = None

    @classmethod
    def model_options(cls, bases: list[nn.Linear], options: dict[str, Any]) -> dict[str, Any]:
        """Options that depend on every target layer of the adapter (e.g. the size of bases shared by all of them);
        ``adapters.apply`` and ``load_adapter`` add them to each layer's options."""
        return {}

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout and self.training else x

    def delta_weight(self) -> torch.Tensor:
        """``Delta W`` as an ``out x in`` matrix (for merging and tests)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out + Delta W drop(x)``; subclasses fuse the scaling and the add into their last matmul."""
        return out + F.linear(self.drop(x), self.delta_weight().to(x.dtype))

    def export_state(self) -> dict[str, torch.Tensor]:
        """The tensors written to a file, keyed by suffix after the module path (e.g. ``lora_A.weight``)."""
        raise NotImplementedError

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of ``export_state`` (shapes already validated by ``check_state``)."""
        raise NotImplementedError

    def _import_with_bases(self, tensors: dict[str, torch.Tensor], trained: tuple[str, ...],
                           bases: tuple[str, ...]) -> None:
        """``import_state`` of a shared-basis method (VeRA, RandLoRA): copy the ``trained`` tensors into their
        parameters; stored ``bases`` replace the regenerated ones (PEFT does the same), in the trained tensors'
        device and dtype."""
        like = getattr(self, trained[0])
        with torch.no_grad():
            for k in trained:
                getattr(self, k).copy_(tensors[k])
        for k in bases:
            if k in tensors:
                setattr(self, k, tensors[k].to(device=like.device, dtype=like.dtype))

    def file_shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensor names and shapes a file must hold for this layer (``optional_keys`` may be absent)."""
        return {k: tuple(v.shape) for k, v in self.export_state().items()}

    @classmethod
    def file_layers(cls, config: dict[str, Any], grouped: dict[str, dict[str, torch.Tensor]]
                    ) -> dict[str, dict[str, torch.Tensor]]:
        """A file's tensors per layer (``{module path: {suffix: tensor}}``) as ``check_state`` / ``import_state``
        take them (AdaLoRA re-expands its pruned triplets); by default unchanged."""
        return grouped

    def prepare_base(self, base: nn.Linear) -> None:
        """Called once when the adapter is attached to ``base`` (residual inits move their initial part out of it)."""

    def check_state(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Raise ``RankwiseError`` unless ``tensors`` has exactly the keys and shapes ``export_state`` produces."""
        expected = self.file_shapes()
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        missing = sorted(set(expected) - set(got) - set(self.optional_keys))
        extra = sorted(set(got) - set(expected))
        if missing or extra:
            raise RankwiseError(f"adapter file does not fit {where}: missing tensors {missing or 'none'}, "
                                f"unexpected tensors {extra or 'none'} (was it saved with another method or model?)")
        for k, shape in expected.items():
            if k in got and got[k] != shape:
                raise RankwiseError(f"adapter tensor {where}.{k} has shape {list(got[k])} but this model needs "
                                    f"{list(shape)} (different r or base model?)")


class AdapterLinear(nn.Module):
    """An ``nn.Linear`` or ``Conv1D`` (``base_layer``, frozen, kept as is) plus named adapters (``adapters[name]``:
    ``Parameterization``), which see the base through ``linear`` (the ``nn.Linear`` convention).

    ``active`` adapters add their ``Delta W x``; ``merged`` ones are folded into ``base_layer.weight`` instead;
    ``disabled`` bypasses all unmerged adapters.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self._merged_deltas: dict[str, torch.Tensor] = {}

    @property
    def linear(self) -> nn.Module | LinearView:
        """The base layer in the ``nn.Linear`` convention (weight ``(out, in)``)."""
        return as_linear(self.base_layer)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.disabled:
            return out
        for name in self.active:
            if name not in self.merged:
                a = self.adapters[name]
                out = a(x, out, self.linear) if a.uses_base else a(x, out)
        return out

    def _delta(self, name: str) -> torch.Tensor:
        a = self.adapters[name]
        return a.delta_weight(self.linear) if a.uses_base else a.delta_weight()

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """``W <- W + Delta W`` (computed in fp32); the adapter stops contributing in ``forward``."""
        if name in self.merged:
            return
        w = self.linear.weight
        delta = self._delta(name).float()
        if self.adapters[name].uses_base:  # it depends on W: keep it for an exact unmerge
            self._merged_deltas[name] = delta
        w.copy_((w.float() + delta).to(w.dtype))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        w = self.linear.weight
        delta = self._merged_deltas.pop(name) if name in self._merged_deltas else self._delta(name).float()
        w.copy_((w.float() - delta).to(w.dtype))
        self.merged.remove(name)

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}, disabled={self.disabled}"
