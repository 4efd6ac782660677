"""Workers for the exact-resume and equivalence tests: gloo processes on 127.0.0.1, the ``mini`` preset."""

from __future__ import annotations

import torch
import torch.distributed as dist

from rankwise.train import TrainConfig, train

MINI = dict(preset="mini", vocab_size=2048, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=0, dtype="fp32",
            eval_every=0, eval_batches=2, quiet=True)
# the methods of the exact-resume test: refresh every 2 steps, so that the resumed half (steps 3-4) refreshes
METHODS = {
    "full": dict(method="full"),
    "galore": dict(method="galore", method_options={"rank": 8, "update_gap": 2}),
    "fira": dict(method="fira", method_options={"rank": 8, "update_gap": 2}),
    "frugal": dict(method="frugal", method_options={"update_gap": 2}),
    # shard-local projection (side="shard"): exact SVD at refresh, the distributed range finder, Fira's statistics
    "galore_shard": dict(method="galore", method_options={"rank": 8, "update_gap": 2, "side": "shard"}),
    "galore_rsvd_shard": dict(method="galore", method_options={"rank": 8, "update_gap": 2, "side": "shard",
                                                                "projector": "rsvd"}),
    "fira_shard": dict(method="fira", method_options={"rank": 8, "update_gap": 2, "side": "shard"}),
    # the basis sharded over the ranks between steps (basis="sharded"): the same numbers as the replicated one above
    "galore_shard_basis": dict(method="galore", method_options={"rank": 8, "update_gap": 2, "side": "shard",
                                                                 "basis": "sharded"}),
    "galore_rsvd_shard_basis": dict(method="galore", method_options={"rank": 8, "update_gap": 2, "side": "shard",
                                                                      "projector": "rsvd", "basis": "sharded"}),
    # APOLLO's channel / tensor-wise scaling on the shard-local side: only scalar all-reduces (the norms)
    "apollo_shard": dict(method="apollo", method_options={"rank": 8, "update_gap": 2, "side": "shard"}),
    "apollo_mini_shard": dict(method="apollo-mini", method_options={"update_gap": 2, "side": "shard"}),
    # layer-wise updates in FSDP2's post-reduce-scatter hooks, on the last of 2 micro-batches (no clipping possible)
    "galore_layerwise": dict(method="galore", grad_accum=2, grad_clip=0.0,
                             method_options={"rank": 8, "update_gap": 2, "side": "shard", "layerwise": True}),
}


class StepComm:
    """Records the collectives of every ``SplitOptimizer.step`` (``CommCounter``) while installed."""

    def __init__(self) -> None:
        self.steps: list[tuple[dict, int]] = []

    def __enter__(self) -> "StepComm":
        from rankwise.commcount import CommCounter
        from rankwise.optim import SplitOptimizer

        self._original = original = SplitOptimizer.step
        record = self.steps

        def step(opt, closure=None):
            with CommCounter() as comm:
                out = original(opt, closure)
            record.append((dict(comm.counts), comm.bytes, comm.wire_bytes))
            return out

        SplitOptimizer.step = step
        return self

    def __exit__(self, *exc) -> None:
        from rankwise.optim import SplitOptimizer

        SplitOptimizer.step = self._original


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{**MINI, **overrides})


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def losses(res) -> list[float]:
    return [r["loss"] for r in res.history]


def scenarios(run_dir: str, methods: dict, steps: int, equivalence_steps: int, parallel: str = "fsdp") -> dict:
    """For each method: ``steps`` straight vs ``steps / 2`` + resume (a fresh optimizer and model, DCP) +
    ``steps / 2``; and full-rank AdamW over ``equivalence_steps`` (compared with one process by the test)."""
    out: dict = {}
    if equivalence_steps:
        out["equivalence"] = losses(train(config(method="full", steps=equivalence_steps, parallel=parallel)))
    for name, opts in methods.items():
        with StepComm() as comm:
            straight = train(config(steps=steps, parallel=parallel, **opts))
        where = f"{run_dir}/{name}"
        first = train(config(steps=steps, stop_at=steps // 2, out=where, parallel=parallel, **opts))
        second = train(config(steps=steps, out=where, resume=where, parallel=parallel, **opts))
        out[name] = {"straight": (losses(straight), full_state(straight.model)), "comm": comm.steps,
                     "state_bytes": straight.metrics["optimizer_state_bytes"],
                     "weight_bytes": sum(_local(p).numel() * p.element_size() for p in straight.model.parameters()),
                     "resumed": (losses(first) + losses(second), full_state(second.model))}
    return out


def worker(rank: int, world: int, port: int, run_dir: str, result_path: str, methods: list[str], steps: int,
           equivalence_steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = scenarios(run_dir, {m: METHODS[m] for m in methods}, steps, equivalence_steps)
        if rank == 0:
            torch.save(results, result_path)
    finally:
        dist.destroy_process_group()



def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Every optimizer-state entry as a whole tensor (DTensors gathered), keyed by parameter name and entry."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        for key, v in optimizer.state.get(p, {}).items():
            out[f"{name}/{key}"] = ((v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                                    if isinstance(v, torch.Tensor) else v)
    return out


def restore(run_dir: str, **overrides) -> tuple[dict, dict]:
    """What ``train(..., resume=run_dir)`` holds right after loading the checkpoint, before its first step: the
    model and optimizer built as ``train`` builds them, then ``Parallelism.load``."""
    from rankwise import checkpoint as ckpt
    from rankwise import distributed
    from rankwise import methods as methods_mod
    from rankwise.data import prepare
    from rankwise.methods import OptimConfig
    from rankwise.train import _build_model

    cfg = config(parallel="fsdp", **overrides)
    par = distributed.setup(cfg.parallel, cfg.batch_size, torch.device("cpu"))
    method = methods_mod.get(cfg.method, **cfg.method_options)
    model = _build_model(cfg, None, method, prepare(vocab_size=cfg.vocab_size).vocab_size, None, par.device)
    par.wrap(model)
    optimizer = method.build_optimizer(model, OptimConfig(cfg.lr, cfg.weight_decay, cfg.betas))
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)  # as train's: the groups get their initial_lr
    par.load(model, optimizer, ckpt.load(run_dir), run_dir)
    return full_state(model), optimizer_state(model, optimizer)


def run(overrides: dict) -> tuple[list[float], dict, dict]:
    """(losses, whole weights, whole optimizer state) of one ``train`` under FSDP, or of a ``restore`` (no losses)
    when ``overrides`` names ``restore``."""
    overrides = dict(overrides)
    if "restore" in overrides:
        return ([], *restore(overrides.pop("restore"), **overrides))
    res = train(config(parallel="fsdp", **overrides))
    return losses(res), full_state(res.model), optimizer_state(res.model, res.optimizer)


def run_worker(rank: int, world: int, port: int, result_path: str, runs: dict[str, dict]) -> None:
    """``run`` each of ``runs`` (name -> overrides) in order on ``world`` gloo processes; rank 0 saves the results."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = {name: run(overrides) for name, overrides in runs.items()}
        if rank == 0:
            torch.save(out, result_path)
    finally:
        dist.destroy_process_group()


def method_worker(rank: int, world: int, port: int, result_path: str, runs: dict[str, dict]) -> None:
    """Train each of ``runs`` under FSDP; rank 0 saves its losses, or the ``RankwiseError`` that refused it."""
    from rankwise.errors import RankwiseError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = {}
        for name, overrides in runs.items():
            try:
                out[name] = losses(train(config(parallel="fsdp", **overrides)))
            except RankwiseError as e:
                out[name] = str(e)
        if rank == 0:
            torch.save(out, result_path)
    finally:
        dist.destroy_process_group()
