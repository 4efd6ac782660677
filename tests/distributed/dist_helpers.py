"""Worker processes for the distributed tests: 2 ranks, gloo on 127.0.0.1, CPU."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from rankwise.train import TrainConfig, train

BASE = dict(preset="tiny", steps=4, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=0, dtype="fp32",
            eval_every=0, eval_batches=2, quiet=True)
# moments reset at the refresh: the update is then invariant to the signs of the SVD's singular vectors, which flip
# with reduction-order rounding (LAPACK's float32 signs are discontinuous); kept moments would turn a flipped sign
# into a reversed momentum in that direction, a difference of the size of the step (docs/fidelity-galore-fira.md).
# eps 1e-8 (not the preset's 1e-6) dates from an FSDP bug since fixed (the clipping norm missed the root unit's
# gradients after an evaluation: distributed.reshard_model); kept so that these runs stay comparable
GALORE = dict(method="galore", method_options={"rank": 8, "update_gap": 2, "scale": 1.0, "moments": "reset",
                                               "eps": 1e-8})


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{**BASE, **overrides})


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def summary(res, with_state: bool = True) -> dict:
    from rankwise.metrics import optimizer_state_bytes

    out = {"losses": [r["loss"] for r in res.history], "metrics": res.metrics}
    if with_state:
        out["state"] = full_state(res.model)
        out["global_state_bytes"] = optimizer_state_bytes(res.optimizer)
    return out


def scenarios(run_dir: str) -> dict:
    """Every multi-process run of the test module, in one launch (starting processes is the slow part)."""
    results = {"ddp_full": summary(train(config(parallel="ddp"))),
               "fsdp_full": summary(train(config(parallel="fsdp"))),
               "ddp_galore": summary(train(config(parallel="ddp", **GALORE))),
               "fsdp_galore": summary(train(config(parallel="fsdp", **GALORE)))}
    first = train(config(parallel="fsdp", out=run_dir, stop_at=2, **GALORE))
    second = train(config(parallel="fsdp", out=run_dir, resume=run_dir, **GALORE))
    results["fsdp_resumed"] = {"losses": [r["loss"] for r in first.history + second.history],
                               "state": full_state(second.model), "metrics": second.metrics}
    return results


def worker(rank: int, world: int, port: int, run_dir: str, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = scenarios(run_dir)
        if rank == 0:
            torch.save(results, result_path)
    finally:
        dist.destroy_process_group()


def wrong_batch_worker(rank: int, world: int, port: int, result_path: str) -> None:
    from rankwise.errors import RankwiseError

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        train(config(batch_size=5))
    except RankwiseError as e:
        if rank == 0:
            with open(result_path, "w") as f:
                f.write(str(e))
    finally:
        dist.destroy_process_group()
    os.environ.pop("WORLD_SIZE", None)
