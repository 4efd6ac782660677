"""Low-bit optimizer state: how an inner rule's moments are *stored* (``state_bits``), not how they are computed.

Between steps a moment of >= ``MIN_NUMEL`` entries is kept block-wise quantized: for each block of B consecutive
entries x_b, an fp32 absmax s_b = max |x_b| and one code per entry, the index of the value of a fixed quantization
map q nearest to x / s_b (8-bit Adam, Dettmers et al. 2021, arXiv 2110.02861, Sec. 2: block-wise quantization with
the dynamic tree map, signed for first moments / momentum, unsigned for the second moment). At a step the optimizer
``unpack``s the moments to fp32 (x = s_b q[code]), the inner rule runs its usual fp32 arithmetic on them (and any
reset / rotation on refresh), and ``pack`` quantizes the updated moments again; the update itself uses the fp32
moments, as bitsandbytes' and torchao's kernels do. Smaller moments (norms, biases, small projected matrices) stay
fp32, as in bitsandbytes (``min_8bit_size=4096``; torchao has the same threshold but keeps the param's dtype).

- ``state_bits=8``: bitsandbytes' ``quantize_blockwise`` / ``dequantize_blockwise`` with B = 256 and the dynamic
  map of its 8-bit optimizers (signed / unsigned): exactly its ``AdamW8bit`` state. n + 4 ceil(n / 256) bytes.
- ``state_bits=4``: torchao's 4-bit state (Li et al. 2023, arXiv 2309.01507; ``torchao.optim.quant_utils``): B = 128,
  a signed dynamic map with 3 exponent bits for m, a linear map without zero for v, two codes per byte.
  n / 2 + 4 n / 128 bytes (needs n % 128 == 0 and an even last dim, else the moment stays fp32).

The quantization maps are constants (one per device, not state); codes are laid out in the parameter's orientation
(a tall matrix's projected moment as (m, r), as galore-torch's ``GaLoreAdamW8bit`` stores it), so blocks are the
reference's. Why these libraries: docs/optim.md ("Low-bit optimizer state").
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import RankwiseError

STATE_BITS = (None, 8, 4)
MIN_NUMEL = 4096  # smaller moments stay fp32 (bitsandbytes' min_8bit_size, torchao's threshold)
BLOCK = {8: 256, 4: 128}
INSTALL = "pip install 'rankwise[lowbit]' (bitsandbytes for 8-bit, torchao for 4-bit state)"
_MAPS: dict[tuple[int, bool, str], torch.Tensor] = {}


def scale_key(moment: str, bits: int) -> str:
    """The state key of a quantized moment's per-block absmax (the codes replace the moment under its own key)."""
    return f"{moment}.absmax{bits}"


def is_scale(key: str) -> bool:
    return key.endswith((".absmax8", ".absmax4"))


def check(bits: Any) -> None:
    if bits not in STATE_BITS:
        raise RankwiseError(f"state_bits must be 8, 4 or None (moments in the parameter's dtype), got {bits!r}")
    if bits is not None:
        _library(bits)


def _library(bits: int):
    try:
        if bits == 8:
            import bitsandbytes.functional as lib
        else:
            import logging

            logging.getLogger("torchao").setLevel(logging.ERROR)
            from torchao.optim import quant_utils as lib
    except ImportError:
        raise RankwiseError(f"state_bits={bits} needs the low-bit extra: {INSTALL}") from None
    return lib


def _map(bits: int, signed: bool, device: torch.device) -> torch.Tensor:
    key = (bits, signed, str(device))
    if key not in _MAPS:
        if bits == 8:
            values = _library(8).create_dynamic_map(signed=signed)
        else:
            from torchao.optim.subclass_4bit import get_qmap_signed, get_qmap_unsigned

            values = torch.tensor(get_qmap_signed() if signed else get_qmap_unsigned())
        _MAPS[key] = values.to(device=device, dtype=torch.float32)
    return _MAPS[key]


def quantized(shape: tuple[int, ...] | torch.Size, bits: int | None) -> bool:
    """Whether a moment of this (storage) shape is kept quantized."""
    n = math.prod(shape)
    if bits is None or n < MIN_NUMEL:
        return False
    return bits == 8 or (n % BLOCK[4] == 0 and shape[-1] % 2 == 0)


def moment_bytes(shape: tuple[int, ...], element_size: int, bits: int | None) -> int:
    """Bytes of one moment of ``shape`` (in the parameter's orientation) and elements of ``element_size`` bytes."""
    n = math.prod(shape)
    if bits is None:
        return n * element_size
    if not quantized(shape, bits):
        return 4 * n
    return (n + 4 * -(-n // BLOCK[8])) if bits == 8 else (n // 2 + 4 * n // BLOCK[4])


def encode(x: torch.Tensor, bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of an fp32 tensor: codes uint8 of x's shape (8-bit) or with the last dim halved (4-bit)."""
    lib, qmap = _library(bits), _map(bits, signed, x.device)
    x = x.float().contiguous()
    if bits == 8:
        codes, qs = lib.quantize_blockwise(x, code=qmap, blocksize=BLOCK[8])
        return codes, qs.absmax
    scaled, absmax = lib.scale_tensor(x.view(-1), BLOCK[4])
    codes = lib.quantize_4bit_with_qmap(scaled, qmap)
    return ((codes[::2] << 4) | codes[1::2]).view(*x.shape[:-1], x.shape[-1] // 2), absmax


def decode(codes: torch.Tensor, absmax: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """The fp32 tensor (codes, absmax) stand for."""
    lib, qmap = _library(bits), _map(bits, signed, codes.device)
    if bits == 8:
        return lib.dequantize_blockwise(codes, absmax=absmax, code=qmap, blocksize=BLOCK[8])
    pairs = torch.stack([codes >> 4, codes & 0b1111], dim=-1).view(-1)
    return lib.dequant_with_qmap(pairs, qmap, absmax).view(*codes.shape[:-1], 2 * codes.shape[-1])


def unpack(state: dict[str, Any], moments: tuple[str, ...], unsigned: tuple[str, ...], transposed: bool) -> None:
    """Replace every quantized moment in ``state`` by its fp32 value (``transposed``: stored as its transpose)."""
    for k in moments:
        for bits in (8, 4):
            absmax = state.pop(scale_key(k, bits), None)
            if absmax is not None:
                x = decode(state[k], absmax, bits, k not in unsigned)
                state[k] = x.t() if transposed else x


def pack(state: dict[str, Any], moments: tuple[str, ...], unsigned: tuple[str, ...], transposed: bool,
         bits: int | None) -> None:
    """Quantize the moments of ``state`` (large ones; small ones become fp32) for ``bits`` (None: leave them)."""
    if bits is None:
        return
    for k in moments:
        x = state.get(k)
        if x is None:
            continue
        stored = x.t() if transposed else x
        if quantized(stored.shape, bits):
            state[k], state[scale_key(k, bits)] = encode(stored, bits, k not in unsigned)
        elif x.dtype != torch.float32:
            state[k] = x.float()
