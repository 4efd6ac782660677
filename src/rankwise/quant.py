"""A frozen quantized base (QLoRA-style): ``--quantize nf4|int8`` on the base model's linear weights.

    model = adapters.apply(model, method="lora", r=8, target="all-linear")
    quantize_base(model, "nf4")      # every frozen nn.Linear (not the output layer) -> QuantizedLinear

The weights are torchao tensors (``pip install 'rankwise[quant]'``), pure PyTorch, so the same code runs on CPU
(tests, CI), CUDA and the ``meta`` device (the planner counts their real bytes):

- ``nf4``: QLoRA's 4-bit NormalFloat (Dettmers et al. 2023), torchao's ``NF4Tensor``: blocks of 64 weights share
  an absmax scale, the scales are themselves quantized to int8 in blocks ("double quantization"; torchao's scaler
  block is 256, here the largest divisor of the block count <= 256 so that any multiple-of-64 matrix quantizes).
- ``int8``: symmetric per-output-row absmax int8 (``W ~= s_i q_ij``, ``q`` in [-128, 127]), torchao's ``Int8Tensor``.

``QuantizedLinear.forward`` dequantizes the weight, multiplies, and dequantizes again in backward (only the
quantized tensor is kept for backward, never a full-precision copy): ``y = x deq(Q)^T + b``. Adapters wrap it
unchanged (``AdapterLinear.base_layer``), so every adapter method trains on top of a quantized base.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import RankwiseError

SCHEMES = ("nf4", "int8")
NF4_BLOCK = 64            # weights per absmax block (QLoRA's and torchao's default)
NF4_SCALER_BLOCK = 256    # scales per double-quantization block (torchao's default), reduced to fit when needed
DEVICES = ("cpu", "cuda", "meta")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INSTALL = "pip install 'rankwise[quant]' (torchao)"


def require_torchao(what: str = "--quantize") -> None:
    """Import torchao (quietly: it logs about optional kernels it cannot load) or raise one clear error."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        raise RankwiseError(f"{what} needs the quantization extra: {INSTALL}") from None


def check_scheme(scheme: str | None) -> None:
    if scheme is not None and scheme not in SCHEMES:
        raise RankwiseError(f"unknown --quantize {scheme!r}; valid: {', '.join(SCHEMES)}")


def _scaler_block(n_blocks: int) -> int:
    return max(d for d in range(1, min(NF4_SCALER_BLOCK, n_blocks) + 1) if n_blocks % d == 0)


def quantize_tensor(w: torch.Tensor, scheme: str, where: str = "weight") -> torch.Tensor:
    """``w`` (out x in) as a torchao quantized tensor of ``scheme`` (same shape, dtype and device)."""
    check_scheme(scheme)
    require_torchao()
    if w.device.type not in DEVICES:
        raise RankwiseError(f"--quantize runs on {', '.join(DEVICES[:2])}; {where} is on {w.device.type} "
                            "(use --device cpu or cuda)")
    if w.dtype not in DTYPES:
        raise RankwiseError(f"--quantize takes fp32, bf16 or fp16 weights; {where} is {w.dtype} "
                            "(convert the model first)")
    if w.dim() != 2:
        raise RankwiseError(f"--quantize quantizes matrices; {where} has shape {list(w.shape)}")
    w = w.detach().contiguous()
    if scheme == "nf4":
        from torchao.quantization import NF4Tensor

        if w.numel() % NF4_BLOCK:
            raise RankwiseError(f"nf4 quantizes blocks of {NF4_BLOCK} weights; {where} has {w.numel()} "
                                f"(shape {list(w.shape)}); use --quantize int8 or leave it out of the model")
        return NF4Tensor.from_tensor(w, NF4_BLOCK, _scaler_block(w.numel() // NF4_BLOCK))
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    return Int8Tensor.from_hp(w, PerRow())


def is_quantized(t: torch.Tensor) -> bool:
    return type(t).__name__ in ("NF4Tensor", "Int8Tensor")


def dequantize(w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense matrix a quantized tensor stands for (plain tensors pass through), in ``dtype``."""
    if type(w).__name__ == "NF4Tensor":
        dense = w.get_original_weight()
    elif type(w).__name__ == "Int8Tensor":
        dense = w.dequantize(torch.float32)
    else:
        dense = w
    return dense.to(dtype or w.dtype)


def clone_quantized(w: torch.Tensor) -> torch.Tensor:
    """An exact copy of a quantized tensor (torchao's NF4 ``clone`` re-quantizes with default block sizes)."""
    names, ctx = w.__tensor_flatten__()
    inner = {n: getattr(w, n).clone() for n in names if getattr(w, n) is not None}
    return type(w).__tensor_unflatten__(inner, ctx, w.shape, w.stride())


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: a tensor subclass (a quantized weight) counts its inner tensors."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
    return t.numel() * t.element_size()


class _DequantMatmul(torch.autograd.Function):
    """``x deq(Q)^T``: dequantizes in forward and again in backward, saving only the quantized ``Q``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight, ctx.x_dtype = weight, x.dtype
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), dequantize(weight, dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (grad @ dequantize(ctx.weight, grad.dtype)).to(ctx.x_dtype), None


class QuantizedLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored quantized (``scheme``) and dequantized on the fly."""

    def __init__(self, linear: nn.Linear, scheme: str, where: str = "weight"):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.scheme = linear.in_features, linear.out_features, scheme
        self.weight = nn.Parameter(quantize_tensor(linear.weight, scheme, where), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _DequantMatmul.apply(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def __deepcopy__(self, memo: dict) -> "QuantizedLinear":
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k != "_parameters"})
        new._parameters = {"weight": nn.Parameter(clone_quantized(self.weight), requires_grad=False),
                           "bias": copy.deepcopy(self.bias, memo)}
        return new

    def dense(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``deq(Q)`` in ``dtype`` (same function up to ``dtype``'s rounding)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device,
                        dtype=dtype)
        with torch.no_grad():
            out.weight.copy_(dequantize(self.weight, dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        out.requires_grad_(False)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A quantized weight is assigned, a dense one quantized (``copy_`` into a quantized tensor cannot do it)."""
        for name in ("weight", "bias"):
            key, current = prefix + name, getattr(self, name)
            if current is None:
                continue
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            value = state_dict[key]
            if tuple(value.shape) != tuple(current.shape):
                error_msgs.append(f"size mismatch for {key}: got {list(value.shape)}, expected {list(current.shape)}")
            elif name == "weight":
                value = value.to(current.device) if is_quantized(value) else quantize_tensor(value, self.scheme, key)
                self.weight = nn.Parameter(value, requires_grad=False)
            else:
                with torch.no_grad():
                    current.copy_(value)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


def _output_layers(model: nn.Module) -> set[int]:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return set() if out is None else {id(out)}


def quantize_base(model: nn.Module, scheme: str) -> nn.Module:
    """Replace, in place, every frozen ``nn.Linear`` (the base layers adapters wrap; not the output layer) by a
    ``QuantizedLinear``; returns ``model``. Raises if there is nothing frozen to quantize."""
    check_scheme(scheme)
    require_torchao()
    skip = _output_layers(model)
    found = [(name, m) for name, m in model.named_modules()
             if type(m) is nn.Linear and id(m) not in skip and not m.weight.requires_grad]
    if not found:
        raise RankwiseError("--quantize quantizes the frozen base of an adapter method, but this model has no frozen "
                            "linear layer; use an adapter method (e.g. --method lora)")
    for name, m in found:
        model.set_submodule(name, QuantizedLinear(m, scheme, name))
    # DDP must not broadcast them (quantization is deterministic, every rank holds the same tensors)
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = ignored + [f"{name}.weight" for name, _ in found]
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def dequantize_base(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Inverse of ``quantize_base`` up to the quantization: every ``QuantizedLinear`` becomes a plain ``nn.Linear``
    holding ``deq(Q)`` in ``dtype``, in place; returns ``model``."""
    for name, m in quantized_layers(model).items():
        model.set_submodule(name, m.dense(dtype))
    return model


def quantize_method_base(model: nn.Module, method: Any, scheme: str) -> nn.Module:
    """``quantize_base`` after ``method.prepare``: the training loop's and the planner's ``--quantize``.

    Only adapter methods freeze the base; the base is quantized after the adapter's init, so residual inits (PiSSA,
    LoRA-GA) quantize the residual ``W - s B0 A0`` (QPiSSA-style) and their factors see full-precision weights."""
    from .adapters.methods import AdapterMethod

    check_scheme(scheme)
    if not isinstance(method, AdapterMethod):
        raise RankwiseError(f"--quantize freezes and quantizes the base of an adapter method; method "
                            f"{getattr(method, 'name', type(method).__name__)!r} trains the base weights. Use an "
                            "adapter method (`rankwise methods`, family adapters), e.g. --method lora")
    return quantize_base(model, scheme)
