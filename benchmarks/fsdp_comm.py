"""GaLore under FSDP2 on CPU (gloo): the all-gather design (``side=auto``) vs shard-local (``side=shard``), its basis
replicated (``basis=replicated``, no per-step collective) or sharded (``basis=sharded``: state / N, one n x r
all-gather per matrix and step).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/fsdp_comm.py --world 2 4 --layers 2 --steps 3

Per design, per rank, side by side in one launch per world size:
- bytes communicated per step, counted by wrapping the collectives (``rankwise.commcount.CommCounter``: the bytes
  given to them, and what a rank sends under the ring algorithms, which compares all-gathers with all-reduces):
  FSDP2's own (forward + backward: parameter all-gathers, gradient reduce-scatters) and the optimizer's, on a step
  without refresh and on a refresh step;
- optimizer state per rank (exact, local shards) and / single-process state;
- peak memory of the optimizer step: the most bytes allocated at once above the step's start, from the profiler's
  allocation timeline (``torch.profiler``, ``profile_memory``; an op's own transients are netted) on one extra step
  without refresh, not timed;
- step time (optimizer only, median), as a ratio to ``torch.optim.AdamW`` (foreach) stepping the same sharded model.

Model: the ``small`` preset's shapes (hidden 512, FFN 1376: every projected matrix >= 512 x 512), ``--layers``
decoder layers, vocab 2048. Bytes and state are exact; step times are milliseconds on gloo and move by ~30% between
identical runs on a 2-core CPU (docs/distributed.md has a measured table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from rankwise.commcount import CommCounter  # noqa: E402
from rankwise.distributed import FSDP, free_port  # noqa: E402
from rankwise.metrics import optimizer_state_bytes  # noqa: E402

DESIGNS = {"all-gather (side=auto, svd)": dict(side="auto", projector="svd"),
           "shard-local (side=shard, svd)": dict(side="shard", projector="svd"),
           "shard-local (side=shard, rsvd)": dict(side="shard", projector="rsvd"),
           "shard-local, sharded basis (svd)": dict(side="shard", projector="svd", basis="sharded"),
           "shard-local, sharded basis (rsvd)": dict(side="shard", projector="rsvd", basis="sharded")}


def _model(layers: int):
    from rankwise.models import build_model

    return build_model("small", vocab_size=2048, seed=0, num_hidden_layers=layers)


def _shard(model, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _loss(model, batch):
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def step_peak(fn) -> int:
    """Bytes: the peak of the running total of what ``fn``'s profiled ops allocate and free (CPU tensors). Each op's
    own net bytes count from its start when it allocates, from its end when it frees (a wrapper such as
    ``Optimizer.step`` frees its temporaries after its children ran)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end, e.self_cpu_memory_usage)
                    for e in prof.events() if e.self_cpu_memory_usage)
    now = peak = 0
    for _, delta in deltas:
        now += delta
        peak = max(peak, now)
    return peak


def _measure(make_opt, args, rank: int, world: int) -> dict:
    model = _shard(_model(args.layers), world)
    opt = make_opt(model)
    par = FSDP(torch.device("cpu"), rank, world)  # what the training loop calls after each step
    g = torch.Generator().manual_seed(0)
    rows, peak = [], 0

    def step() -> None:
        opt.step()
        par.after_step(opt)

    for i in range(args.steps + 1):  # the last one: the memory profile
        batch = torch.randint(0, 2048, (args.batch, args.seq + 1), generator=g).chunk(world)[rank]
        with CommCounter() as fsdp_comm:
            _loss(model, batch).backward()
        dist.barrier()
        if i == args.steps:
            peak = step_peak(step)
        else:
            with CommCounter() as opt_comm:
                t0 = time.perf_counter()
                step()
                dt = time.perf_counter() - t0
            rows.append({"fsdp_bytes": fsdp_comm.bytes, "opt_bytes": opt_comm.bytes, "fsdp_wire": fsdp_comm.wire_bytes,
                         "opt_wire": opt_comm.wire_bytes, "opt_counts": dict(opt_comm.counts), "time": dt})
        opt.zero_grad(set_to_none=True)
    return {"refresh": rows[0], "steady": rows[1:], "state_local": par.state_bytes(opt),
            "state_global": optimizer_state_bytes(opt), "peak": peak}


def worker(rank: int, world: int, port: int, args, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from rankwise.optim import build

    out = {"AdamW (torch, foreach)": _measure(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True),
                                              args, rank, world)}
    for name, opts in DESIGNS.items():
        out[name] = _measure(lambda m: build("galore", m, rank=args.rank, update_gap=200, lr=1e-3, **opts),
                             args, rank, world)
    if rank == 0:
        with open(path, "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


def single_state(args) -> dict:
    from rankwise.optim import build

    model = _model(args.layers)
    res = {}
    for name, opts in DESIGNS.items():
        opt = build("galore", model, rank=args.rank, update_gap=200, lr=1e-3, **opts)
        res[name] = opt.expected_state_bytes()
    res["AdamW (torch, foreach)"] = 2 * 4 * sum(p.numel() for p in model.parameters()) + 4 * sum(
        1 for _ in model.parameters())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="the first refreshes, the others do not")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args()
    single = single_state(args)
    report = {}
    for world in args.world:
        path = f"/tmp/rankwise_fsdp_comm_{os.getpid()}_{world}.json"
        mp.spawn(worker, args=(world, free_port(), args, path), nprocs=world)
        with open(path) as f:
            report[world] = json.load(f)
        os.remove(path)
        base = statistics.median(r["time"] for r in report[world]["AdamW (torch, foreach)"]["steady"])
        print(f"\nworld {world} (per rank 0; MiB = 2^20 bytes)")
        print("| design | FSDP bytes/step | optimizer bytes/step | optimizer bytes at refresh | state/rank | "
              "state/rank x world / single | step peak | step time / AdamW |")
        print("|---|---|---|---|---|---|---|---|")
        mib = 2 ** 20
        for name, r in report[world].items():
            steady, refresh = r["steady"], r["refresh"]
            opt_bytes = statistics.median(s["opt_bytes"] for s in steady)
            opt_wire = statistics.median(s["opt_wire"] for s in steady)
            t = statistics.median(s["time"] for s in steady)
            print(f"| {name} | {steady[0]['fsdp_bytes'] / mib:.2f} / {steady[0]['fsdp_wire'] / mib:.2f} MiB | "
                  f"{opt_bytes / mib:.3f} / {opt_wire / mib:.3f} MiB | "
                  f"{refresh['opt_bytes'] / mib:.2f} / {refresh['opt_wire'] / mib:.2f} MiB | "
                  f"{r['state_local'] / mib:.2f} MiB | {r['state_local'] * world / single[name]:.3f} | "
                  f"{r['peak'] / mib:.1f} MiB | {t / base:.2f} |")
        print("bytes: given to the collectives / sent by this rank under the ring algorithms "
              "(rankwise.commcount.CommCounter)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
