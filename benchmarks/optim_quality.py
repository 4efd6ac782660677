"""Validation loss after N steps on the tiny preset, every optimizer preset at the same rank, same data and seed.

    python benchmarks/optim_quality.py --steps 200 --rank 64 --lr 2e-3 1e-2

Prints one markdown row per (lr, method): final eval loss, its change from the initial loss, optimizer-state MiB.
"""

from __future__ import annotations

import argparse
import json

import torch

from rankwise.train import TrainConfig, train

METHODS = ("full", "galore", "fira", "apollo", "apollo-mini", "frugal", "badam", "lisa")


def parse(spec: str) -> tuple[str, dict]:
    """``galore`` or ``galore:projector=rsvd,moments=reset``."""
    method, _, rest = spec.partition(":")
    return method, dict(kv.split("=", 1) for kv in rest.split(",") if kv)


def run(spec: str, steps: int, rank: int, lr: float, seed: int = 0) -> dict:
    method, extra = parse(spec)
    options = {"rank": rank, **extra} if method in ("galore", "fira", "apollo", "frugal", "split") else extra
    cfg = TrainConfig(preset="tiny", method=method, method_options=options, steps=steps, batch_size=8, seq_len=64,
                      lr=lr, warmup_steps=max(1, steps // 10), dtype="fp32", eval_every=0, eval_batches=8,
                      seed=seed, quiet=True)
    m = train(cfg).metrics
    return {"method": spec, "lr": lr, "rank": rank if options else None, "steps": steps,
            "initial_eval_loss": m["initial_eval_loss"], "final_eval_loss": m["final_eval_loss"],
            "optimizer_state_bytes": m["optimizer_state_bytes"], "tokens_per_s": m["tokens_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--lr", type=float, nargs="+", default=[2e-3])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help="NAME or NAME:KEY=VALUE,...")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    print("| lr | method | rank | eval loss (init -> final) | state MiB | tokens/s |")
    print("|---|---|---|---|---|---|")
    for lr in args.lr:
        for method in args.methods:
            r = run(method, args.steps, args.rank, lr)
            rows.append(r)
            print(f"| {lr:g} | {method} | {r['rank'] or '-'} | {r['initial_eval_loss']:.3f} -> "
                  f"{r['final_eval_loss']:.3f} | {r['optimizer_state_bytes'] / 2**20:.1f} | "
                  f"{r['tokens_per_s']:,.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
