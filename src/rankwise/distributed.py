"""Multi-process training with PyTorch's own engines: DDP, or FSDP2 (``torch.distributed.fsdp.fully_shard``).

    torchrun --nproc-per-node 2 -m rankwise train --method galore --rank 64 --parallel fsdp
    rankwise train --nproc 2 --method galore --rank 64 --parallel fsdp      # the same, launched for you

The training loop calls this module only when ``WORLD_SIZE > 1`` (or a process group is already initialised); a
single process never touches it. Every rank reads the same global batch and keeps its contiguous slice of
``batch_size / world`` rows; each rank's loss is the mean over equally many tokens, so the gradient averaged by DDP /
reduce-scattered by FSDP is exactly the single-process gradient of the global batch.

FSDP2 shards every parameter along dim 0 (rows) over the ranks; each decoder layer is one communication unit. The
optimizer sees ``DTensor`` parameters and gradients, so any ``torch.optim`` optimizer works unchanged, and so do the
projection optimizers (``rankwise.optim.SplitOptimizer``): operations without a sharded rule — ``torch.linalg.svd``
on the gradient, the products with the basis — make DTensor all-gather their inputs, so the projector is computed
on the full gradient and the update is exactly the single-process one. What those operations return is replicated;
``reshard_state`` (after every step) re-shards each replicated optimizer-state tensor along dim 0 (a local slice,
no communication), so GaLore's basis and low-rank moments are kept sharded between steps, like FSDP's weights.

Checkpoints under FSDP are written with ``torch.distributed.checkpoint`` (each rank writes its shards) into
``OUT/checkpoint_dcp-STEP``; rank 0 then writes ``checkpoint.pt`` (scheduler, method, RNG, step, config) naming that
folder, atomically — the commit point — and removes older folders. Under DDP rank 0 writes the usual single-file
checkpoint. Either resumes with any world size, and ``rankwise eval`` reads both.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import RankwiseError
from .metrics import tensor_bytes

MODES = ("ddp", "fsdp")
SHARDED_DIR = "checkpoint_dcp"


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int
    world: int
    mode: str
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(mode: str, batch_size: int, device: torch.device) -> Dist | None:
    """Join the job described by torchrun's environment (or an initialised process group); None when alone."""
    if mode not in MODES:
        raise RankwiseError(f"unknown parallel mode {mode!r}; valid: {', '.join(MODES)}")
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size()
    if world == 1:
        return None
    check_batch(batch_size, world)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return Dist(dist.get_rank(), world, mode, device)


def check_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise RankwiseError(f"batch size {batch_size} is not divisible by the world size {world}: every rank takes "
                            f"batch_size / world sequences; use a batch size that is a multiple of {world}")


def shard_batch(batch: torch.Tensor, d: Dist | None) -> torch.Tensor:
    """This rank's contiguous slice of the global batch."""
    return batch if d is None else batch.chunk(d.world)[d.rank]


def mean(value: float, d: Dist | None) -> float:
    """The mean of a per-rank scalar over the ranks (e.g. the loss of each rank's slice)."""
    if d is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item() / d.world


def wrap(model: nn.Module, d: Dist | None) -> nn.Module:
    """The module to run forward/backward through: ``model`` itself, DDP around it, or ``model`` sharded in place."""
    if d is None:
        return model
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    blocks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    for layer in (blocks[0] if blocks else []):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reshard_model(model: nn.Module) -> None:
    """Put FSDP2's sharded parameters back on ``model`` after a forward without backward (evaluation).

    The root FSDP unit keeps its parameters unsharded after forward (it expects the backward next); after a no-grad
    forward nothing reshards them, so ``model.parameters()`` then yields the *unsharded* tensors of the embedding,
    final norm and LM head, not the sharded ones that receive the gradients and that the optimizer holds. A
    gradient-norm list built then misses those three gradients (measured: norm 4.48 instead of 5.17 at step 1 of the
    tiny model, clipping left them unscaled) — the cause of both the FSDP / single-process loss gap and the resume
    difference (a resumed run skips the initial evaluation, so its list was complete). A no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def scalar(t: torch.Tensor, d: Dist | None) -> float:
    """A (possibly DTensor) scalar as a float, e.g. the norm returned by ``clip_grad_norm_`` under FSDP."""
    if d is None:
        return t.item()
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).item()


def reshard_state(optimizer: torch.optim.Optimizer, d: Dist | None) -> None:
    """Under FSDP, turn every replicated optimizer-state DTensor into a dim-0 shard (no communication): what the
    all-gather design (``side="auto"``) computes comes back replicated. Groups with ``side="shard"`` are skipped:
    their basis is meant to be replicated and their moments are already sharded."""
    if d is None or d.mode != "fsdp":
        return
    from torch.distributed.tensor import DTensor, Replicate, Shard

    for group in optimizer.param_groups:
        if group.get("side") == "shard":  # placed by the optimizer itself (rankwise.optim.sharded): kept as is
            continue
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if (isinstance(value, DTensor) and value.ndim >= 1
                        and all(isinstance(x, Replicate) for x in value.placements)):
                    state[key] = value.redistribute(value.device_mesh, [Shard(0)])


def local_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Optimizer-state bytes held by this rank (the local shards of DTensors)."""
    from torch.distributed.tensor import DTensor

    return tensor_bytes([{k: v.to_local() if isinstance(v, DTensor) else v for k, v in s.items()}
                         for s in optimizer.state.values()])


# ------------------------------------------------------------------------------------------------- checkpoints
def save(d: Dist, model: nn.Module, optimizer: torch.optim.Optimizer, payload: dict[str, Any], out: Path,
         step: int) -> None:
    """Write a checkpoint from every rank (``payload`` is everything but model and optimizer)."""
    from . import checkpoint as ckpt

    if d.mode == "ddp":
        if d.main:
            ckpt.save_atomic({**payload, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
                             out / ckpt.CHECKPOINT_FILE)
        dist.barrier()
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"{SHARDED_DIR}-{step}"
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(out / name))
    dist.barrier()
    if d.main:
        ckpt.save_atomic({**payload, "sharded": name}, out / ckpt.CHECKPOINT_FILE)
        for old in out.glob(f"{SHARDED_DIR}-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load(d: Dist | None, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
         run_dir: str) -> None:
    """Restore model and optimizer from ``state`` (a loaded ``checkpoint.pt``), sharded or not, any world size."""
    if "sharded" not in state:
        if d is not None and d.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
            reshard_state(optimizer, d)
            return
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return
    if d is None or d.mode != "fsdp":
        raise RankwiseError(f"the checkpoint in {run_dir!r} was written sharded by FSDP; resume it with "
                            "--parallel fsdp (any number of processes)")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optimizer": osd}
    dcp.load(sd, checkpoint_id=str(Path(run_dir) / state["sharded"]))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    reshard_state(optimizer, d)


def load_full_model(model: nn.Module, state: dict[str, Any], run_dir: str) -> None:
    """Load a checkpoint's weights into an unsharded ``model`` in a single process (``rankwise eval``)."""
    if "sharded" not in state:
        model.load_state_dict(state["model"])
        return
    import torch.distributed.checkpoint as dcp

    sd = {"model": model.state_dict()}
    dcp.load(sd, checkpoint_id=str(Path(run_dir) / state["sharded"]), no_dist=True)
    model.load_state_dict(sd["model"])


# ------------------------------------------------------------------------------------------------------ launch
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, fn, *args: Any) -> Any:
    """Run ``fn(*args)`` in ``nproc`` processes on this machine with torchrun's machinery (loopback rendezvous);
    returns rank 0's result."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                          rdzv_endpoint=f"127.0.0.1:{free_port()}", run_id=f"rankwise-{os.getpid()}",
                          max_restarts=0, monitor_interval=0.1)
    return elastic_launch(config, fn)(*args)[0]
