"""Multi-process training with PyTorch's own engines: DDP, or FSDP2 (``torch.distributed.fsdp.fully_shard``).

    torchrun --nproc-per-node 2 -m rankwise train --method galore --rank 64 --parallel fsdp
    rankwise train --nproc 2 --method galore --rank 64 --parallel fsdp      # the same, launched for you

The training loop talks to one ``Parallelism`` object (``setup``): ``Parallelism`` itself in a single process,
``DDP`` or ``FSDP`` under torchrun (``WORLD_SIZE > 1``) or an initialised process group. The loop is the same for
all three: it wraps the model, slices the batch, averages scalars, calls ``after_step``, saves and loads through the
object, and never asks which strategy it has. Every rank reads the same global batch and keeps its contiguous slice of
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
checkpoint. Either resumes with any world size, one process included (DCP reshards by global offsets), and
``rankwise eval`` reads both.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import RankwiseError
from .metrics import optimizer_state_bytes, tensor_bytes

MODES = ("ddp", "fsdp")
SHARDED_DIR = "checkpoint_dcp"


class Parallelism:
    """The training loop's parallel strategy (torchtitan's idea: applied to the model, called by a plain loop).

    This base class is one process: every call is the identity or the single-process action. ``DDP`` and ``FSDP``
    (below) override what differs; the loop never asks which one it has."""

    mode: str | None = None

    def __init__(self, device: torch.device, rank: int = 0, world: int = 1) -> None:
        self.device, self.rank, self.world = device, rank, world

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files (metrics, logs, config, the checkpoint's commit point)."""
        return self.rank == 0

    def check(self, method: Any) -> None:
        """Refuse, before anything is built or written, a method this strategy cannot run."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run forward/backward through."""
        return model

    def shard_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of the global batch."""
        return batch

    def mean(self, value: float) -> float:
        """The mean of a per-rank scalar over the ranks (e.g. the loss of each rank's slice)."""
        return value

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank, so that every rank decides alike."""
        return flag

    def scalar(self, t: torch.Tensor) -> float:
        """A (possibly DTensor) scalar as a float, e.g. the norm of the gradients."""
        return t.item()

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called after every optimizer step (FSDP: re-shard what came back replicated)."""

    def state_bytes(self, optimizer: torch.optim.Optimizer) -> int:
        """Optimizer-state bytes held by this process."""
        return optimizer_state_bytes(optimizer)

    def describe(self) -> dict[str, Any]:
        """What the run's metrics record of the strategy."""
        return {}

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, payload: dict[str, Any], out: Path,
             step: int) -> None:
        """Write the checkpoint of ``step`` into ``out`` atomically (``payload``: all but model and optimizer)."""
        from . import checkpoint as ckpt

        ckpt.save_atomic({**payload, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
                         out / ckpt.CHECKPOINT_FILE)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], run_dir: str) -> None:
        """Restore model and optimizer from ``state`` (a loaded ``checkpoint.pt``), written by any world size: a
        sharded (FSDP) checkpoint is read whole with ``torch.distributed.checkpoint`` (``no_dist``)."""
        if "sharded" not in state:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            return
        _load_sharded(model, optimizer, Path(run_dir) / state["sharded"], no_dist=True)


class DDP(Parallelism):
    """``DistributedDataParallel`` around the model; rank 0 writes the usual single-file checkpoint."""

    mode = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def shard_batch(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.chunk(self.world)[self.rank]

    def mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def any(self, flag: bool) -> bool:
        return self.mean(float(flag)) > 0

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world, "parallel": self.mode}

    def save(self, model, optimizer, payload, out, step) -> None:
        if self.main:
            super().save(model, optimizer, payload, out, step)
        dist.barrier()

    def load(self, model, optimizer, state, run_dir) -> None:
        if "sharded" in state:
            raise RankwiseError(f"the checkpoint in {run_dir!r} was written sharded by FSDP; resume it with "
                                "--parallel fsdp (any number of processes), or in one process")
        super().load(model, optimizer, state, run_dir)


class FSDP(DDP):
    """FSDP2 (``fully_shard``): each decoder layer and the root one unit on a 1-D mesh; checkpoints through
    ``torch.distributed.checkpoint``, every rank writing its shards."""

    mode = "fsdp"

    def check(self, method: Any) -> None:
        reason = method.fsdp_refusal()
        if reason is not None:
            raise RankwiseError(f"--parallel fsdp cannot run --method {method.name}: {reason}; or keep the method "
                                "and use --parallel ddp")

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        blocks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        for layer in (blocks[0] if blocks else []):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def scalar(self, t: torch.Tensor) -> float:
        from torch.distributed.tensor import DTensor

        return (t.full_tensor() if isinstance(t, DTensor) else t).item()

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        reshard_state(optimizer)

    def state_bytes(self, optimizer: torch.optim.Optimizer) -> int:
        return local_state_bytes(optimizer)

    def save(self, model, optimizer, payload, out, step) -> None:
        """Every rank writes its shards into ``OUT/checkpoint_dcp-STEP``; then rank 0 writes ``checkpoint.pt``
        naming that folder (the commit point) and removes older folders."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from . import checkpoint as ckpt

        name = f"{SHARDED_DIR}-{step}"
        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(out / name))
        dist.barrier()
        if self.main:
            ckpt.save_atomic({**payload, "sharded": name}, out / ckpt.CHECKPOINT_FILE)
            for old in out.glob(f"{SHARDED_DIR}-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def load(self, model, optimizer, state, run_dir) -> None:
        if "sharded" in state:
            _load_sharded(model, optimizer, Path(run_dir) / state["sharded"])
        else:  # a single-file checkpoint (one process or DDP): every rank takes its shards of the whole tensors
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=_by_name(model, optimizer, state["optimizer"]),
                           options=StateDictOptions(full_state_dict=True))
        reshard_state(optimizer)


STRATEGIES: dict[str, type[Parallelism]] = {"ddp": DDP, "fsdp": FSDP}


def setup(mode: str, batch_size: int, device: torch.device) -> Parallelism:
    """Join the job described by torchrun's environment (or an initialised process group); ``Parallelism`` (one
    process) when alone."""
    if mode not in MODES:
        raise RankwiseError(f"unknown parallel mode {mode!r}; valid: {', '.join(MODES)}")
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Parallelism(device)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size()
    if world == 1:
        return Parallelism(device)
    check_batch(batch_size, world)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return STRATEGIES[mode](device, dist.get_rank(), world)


def check_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise RankwiseError(f"batch size {batch_size} is not divisible by the world size {world}: every rank takes "
                            f"batch_size / world sequences; use a batch size that is a multiple of {world}")


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


def reshard_state(optimizer: torch.optim.Optimizer) -> None:
    """Turn every replicated optimizer-state DTensor into a dim-0 shard (no communication): what the all-gather
    design (``side="auto"``) computes comes back replicated. Groups with ``side="shard"`` are skipped: their basis is
    placed by the optimizer itself (``rankwise.optim.sharded``) and their moments are already sharded."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    for group in optimizer.param_groups:
        if group.get("side") == "shard":
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
def _load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, no_dist: bool = False) -> None:
    """Read a DCP checkpoint into ``model`` and ``optimizer`` as they are placed now: DCP reshards every tensor by
    its global offsets, so the world size that wrote it does not matter (``no_dist``: one process, whole tensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optimizer": osd}
    dcp.load(sd, checkpoint_id=str(folder), no_dist=no_dist)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])


def _by_name(model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict[str, Any]) -> dict[str, Any]:
    """``torch.optim``'s state dict (params numbered in the groups' order) keyed by parameter names instead, the
    form ``set_state_dict`` reads: the same model and method number their params alike in any world size."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {order[i]: s for i, s in osd["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in osd["param_groups"]]}


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
