"""Training-step time of our optimizers vs ``torch.optim.AdamW`` and vs ``galore-torch``'s GaLoreAdamW.

    python benchmarks/optim_step_time.py --preset tiny --rank 64 --steps 20 --repeats 5
    python benchmarks/optim_step_time.py --preset tiny --rank 64 --steps 10 --repeats 5 --cpu-time \
        --optimizers torch-adamw galore-torch adamw galore fira frugal galore@perparam fira@perparam

Same model, same batch, same process. Each optimizer runs ``steps`` full training steps (forward + backward +
optimizer step) at steady state (after the step-0 subspace fit; ``update_gap`` is longer than the run), repeated
``repeats`` times in interleaved order; reported: median seconds per step, and ours / anchor ratios (anchor:
``torch.optim.AdamW(foreach=True)``; ``torch-adamw-loop`` is its ``foreach=False``). The optimizer step alone is timed
too (the part that differs). ``NAME@perparam`` is preset NAME with ``SplitOptimizer.batched = False`` (the per-param
path; the batched step's before / after in one run). ``--opt-only`` times ``optimizer.step()`` alone on one fixed
set of gradients (no forward / backward: quicker and steadier on a loaded machine; the same arithmetic per step).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

from rankwise.models import build_model
from rankwise.optim import build, param_groups


def galore_torch(model: torch.nn.Module, rank: int, lr: float):
    """galore-torch 1.0's GaLoreAdamW with its README's grouping (target linears projected, the rest plain)."""
    from galore_torch import GaLoreAdamW

    groups = param_groups(model)
    return GaLoreAdamW([{"params": groups[0]["params"], "rank": rank, "update_proj_gap": 10**6, "scale": 0.25,
                         "proj_type": "std"}, *({"params": g["params"]} for g in groups[1:])], lr=lr)


def make(name: str, model: torch.nn.Module, rank: int, lr: float):
    if name in ("torch-adamw", "torch-adamw-loop"):
        return torch.optim.AdamW(model.parameters(), lr=lr, foreach=name == "torch-adamw")
    if name == "galore-torch":
        return galore_torch(model, rank, lr)
    name, _, path = name.partition("@")
    from rankwise.optim.presets import PRESETS

    preset, projector = (name, "") if name in PRESETS else name.rpartition("-")[::2]  # galore-random: a projector
    kw = {} if preset in ("adamw", "adamw-8bit", "badam", "lisa") else {"rank": 1 if preset == "apollo-mini" else rank}
    if projector:
        kw["projector"] = projector
    opt = build(preset, model, lr=lr, update_gap=10**6, **kw)
    opt.batched = path != "perparam"
    return opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cpu-time", action="store_true",
                    help="1 thread, process CPU time instead of wall time (robust on a shared, loaded machine)")
    ap.add_argument("--optimizers", nargs="+", default=["torch-adamw", "adamw", "galore", "galore-torch", "fira",
                                                         "frugal", "galore-rsvd", "galore-random", "badam", "lisa"])
    ap.add_argument("--opt-only", action="store_true", help="time optimizer.step() alone, on fixed gradients")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1 if args.cpu_time else min(2, torch.get_num_threads()))
    global clock
    clock = time.process_time if args.cpu_time else time.perf_counter
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = build_model(args.preset, vocab_size=8192, device=device)
    x = torch.randint(0, 8192, (args.batch_size, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    runs = {}
    for name in args.optimizers:
        model = copy.deepcopy(base)
        opt = make(name, model, args.rank, 1e-4)
        runs[name] = (model, opt)
        step(model, opt, x, device)  # the step-0 fit / state allocation: not steady state
    totals: dict[str, list[float]] = {n: [] for n in runs}
    opt_only: dict[str, list[float]] = {n: [] for n in runs}
    if args.opt_only:
        for model, opt in runs.values():
            model(input_ids=x[:, :-1], labels=x[:, :-1]).loss.backward()
    for _ in range(args.repeats):
        for name, (model, opt) in runs.items():
            for _ in range(args.steps):
                t_total, t_opt = opt_step(opt, device) if args.opt_only else step(model, opt, x, device)
                totals[name].append(t_total)
                opt_only[name].append(t_opt)
    med = {n: statistics.median(v) for n, v in totals.items()}
    med_opt = {n: statistics.median(v) for n, v in opt_only.items()}
    print(f"{'CPU time, 1 thread' if args.cpu_time else 'wall time'}: {args.preset} on {device}, batch {args.batch_size}x{args.seq_len}, rank {args.rank}, "
          f"median of {args.repeats}x{args.steps} steps")
    print("| optimizer | step ms | / torch AdamW | / galore-torch | optimizer.step ms | step-only / torch AdamW | "
          "step-only / galore-torch |")
    print("|---|---|---|---|---|---|---|")
    g, go = med.get("galore-torch"), med_opt.get("galore-torch")
    for n in runs:
        print(f"| {n} | {med[n] * 1e3:.1f} | {med[n] / med['torch-adamw']:.3f} | "
              f"{(f'{med[n] / g:.3f}' if g else '-')} | {med_opt[n] * 1e3:.2f} | "
              f"{med_opt[n] / med_opt['torch-adamw']:.3f} | {(f'{med_opt[n] / go:.3f}' if go else '-')} |")


clock = time.perf_counter


def step(model, opt, x, device) -> tuple[float, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = clock()
    loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
    loss.backward()
    sync()
    t1 = clock()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    t2 = clock()
    return t2 - t0, t2 - t1


def opt_step(opt, device) -> tuple[float, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = clock()
    opt.step()
    sync()
    t = clock() - t0
    return t, t


if __name__ == "__main__":
    main()
