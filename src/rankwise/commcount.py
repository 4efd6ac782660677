"""Count the collectives a piece of code issues, and the bytes they move (per rank), by op.

    with CommCounter() as comm:
        optimizer.step()
    comm.bytes, comm.counts        # {"all_gather_into_tensor": 3, ...}

A ``TorchDispatchMode`` that sees every c10d / functional collective dispatched in this process: FSDP2's own
all-gathers and reduce-scatters, DTensor's redistributions, and ``torch.distributed`` calls. ``bytes`` are those of
the tensors each op is given (the input of an all-gather, the whole buffer of an all-reduce), summed per op name;
``wire_bytes`` what each rank sends under the ring algorithms, with p ranks: an all-gather (p - 1) x its input, a
reduce-scatter (p - 1) / p x its input, an all-reduce 2 (p - 1) / p x its buffer (anything else: its bytes). The
second is the one to compare an all-gather with an all-reduce by: given equal inputs, an all-gather moves more
the more ranks there are.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")
SKIP = ("wait_tensor", "barrier", "monitored_barrier", "_wrap_tensor_autograd")


class CommCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.supports_higher_order_operators = True
        self.counts: Counter[str] = Counter()
        self.by_op: Counter[str] = Counter()
        self.wire_by_op: Counter[str] = Counter()

    @property
    def bytes(self) -> int:
        return sum(self.by_op.values())

    @property
    def wire_bytes(self) -> float:
        return sum(self.wire_by_op.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        if any(t.__name__ == "DTensor" for t in types):
            return NotImplemented  # let DTensor desugar the op into plain ops and collectives, then see those
        packet = func._schema.name.split("::")
        if len(packet) == 2 and packet[0] in NAMESPACES:
            name = packet[1].rstrip("_")
            if name not in SKIP:
                self.counts[name] += 1
                nbytes = sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs or {}))
                             if isinstance(t, torch.Tensor) and not t.is_meta)
                self.by_op[name] += nbytes
                self.wire_by_op[name] += nbytes * _ring_factor(name)
        return func(*args, **(kwargs or {}))


def _ring_factor(name: str) -> float:
    """What one rank sends per byte given to collective ``name`` under the ring algorithm (module docstring)."""
    import torch.distributed as dist

    p = dist.get_world_size() if dist.is_initialized() else 1
    if "all_gather" in name or "allgather" in name:
        return p - 1
    if "reduce_scatter" in name:
        return (p - 1) / p
    if "all_reduce" in name or "allreduce" in name:
        return 2 * (p - 1) / p
    return 1.0
