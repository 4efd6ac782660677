"""``rankwise bench``: pre-train every method on the same tokens and schedule, for several seeds, at tuned learning
rates and (optionally) matched memory; compare perplexity, memory and throughput, and check the papers' claims.

Writes results.csv, summary.csv, results.md, claims.md, bench.json, ppl_vs_memory.png and loss_curves.png to --out
(with --tune also tuned.json and lr_sensitivity.png). A rerun with the same --out resumes: finished runs are kept.

  rankwise bench --preset tiny --out runs/bench                    # 10 methods x 3 seeds at the shipped lrs
  rankwise bench --preset tiny --tune --match-memory preset --out runs/protocol   # the full protocol
  rankwise bench --methods full:lr_scale=3,galore:rank=16 --seeds 2 --steps 100
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..bench.presets import PRESETS

    p = sub.add_parser("bench", help="benchmark pre-training methods (seeds, tuned lrs, matched memory, claims)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="presets:\n" + "\n".join(f"  {k:<11} {v.description}" for k, v in PRESETS.items()))
    p.add_argument("--suite", choices=["pretrain", "multitask"], default="pretrain",
                   help="pretrain (default): the methods below on one pre-training budget; multitask: LoRA, MixLoRA, "
                        "SMoRA, FlyLoRA fine-tuned on the multi-task mixture at equal activated rank (docs/moe.md)")
    p.add_argument("--preset", default="tiny", help="benchmark preset (default tiny; see below)")
    p.add_argument("--methods", help="comma-separated methods, each NAME or NAME:KEY=VALUE:KEY=VALUE; lr_scale=K "
                                     "multiplies the tuned lr (default: the preset's core; tiny: full, galore, fira, "
                                     "frugal, lowrank, lowrank-rr, relora, lora, sltrain; its memory frontier: "
                                     "full,galore,galore-8bit,apollo,apollo-mini,sst,lost,switchlora)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's; warmup keeps its fraction)")
    p.add_argument("--rank", "--r", dest="rank", type=int, help="rank of every method that has one")
    p.add_argument("--seeds", type=int, help="runs per method, seeds --seed, --seed + 1, ... (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="first seed of init and data order (default 0)")
    p.add_argument("--match-memory", help="comma-separated budgets for weights + gradients + optimizer state, e.g. "
                                          "60MiB or 100%%,80%%,60%% (of full-rank AdamW's), or 'preset' (the preset's "
                                          "budgets): each method's rank is chosen to land within "
                                          "--memory-tolerance of each")
    p.add_argument("--memory-tolerance", type=float, default=0.05, help="for --match-memory (default 0.05 = 5%%)")
    p.add_argument("--budget", help="run only methods whose planned memory (rankwise plan: weights, gradients, "
                                    "optimizer state, activations of one micro-batch) fits, e.g. 24GiB or 24GB")
    p.add_argument("--tune", action="store_true", help="tune every method's lr first (successive halving over a "
                                                       "log-spaced grid), then run the bench at the tuned lrs")
    p.add_argument("--tune-only", action="store_true", help="tune and write tuned.json, lr_sensitivity.png; no bench")
    p.add_argument("--tune-points", type=int, help="lrs in the grid (default: the preset's, 7)")
    p.add_argument("--tune-span", type=float, help="ratio of the grid's largest to smallest lr (default 64)")
    p.add_argument("--tune-seeds", type=int, default=1, help="seeds per tuning trial (default 1)")
    p.add_argument("--ship-tuned", action="store_true",
                   help="after --tune, store tuned.json as the preset's shipped lrs "
                        "(src/rankwise/bench/tuned_lrs.json)")
    p.add_argument("--tuned", help="a tuned.json to take the lrs from (default: the shipped lrs)")
    p.add_argument("--out", default="bench-out", help="output folder (default bench-out); rerun to resume")
    p.add_argument("--jobs", type=int, help="runs at a time, each its own process (default: cores // --threads on "
                                            "CPU, 1 on a GPU); does not change the numbers")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of each run (default 1); part of the "
                                                          "configuration, since the thread count changes rounding")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch (default: the preset's)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's)")
    p.add_argument("--lr", type=float, help="base learning rate instead of the tuned ones (per-method "
                                                      "multipliers still apply)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: the preset's")
    p.add_argument("--data", help="data source (default: the preset's)")
    p.add_argument("--eval-batches", type=int, help="validation batches (default: the preset's)")
    p.add_argument("--log", choices=["tensorboard", "wandb"],
                   help="also log each run to TensorBoard (OUT/runs/<method>/<budget>/seed<N>/tensorboard) or Weights & Biases")
    p.add_argument("--in-process", action="store_true",
                   help="run methods in this process instead of one fresh process each (peak memory then mixes)")
    p.set_defaults(func=run)


def _split_methods(text: str) -> list[str]:
    """``full,galore:rank=32:update_gap=100`` -> ``["full", "galore:rank=32,update_gap=100"]``."""
    specs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, *options = item.split(":")
        specs.append(name + (":" + ",".join(options) if options else ""))
    return specs


def run(args: argparse.Namespace) -> int:
    from ..paths import check_out_dir

    check_out_dir(args.out)
    if args.log:
        from ..loggers import check_logger

        check_logger(args.log)  # before any run starts
    if args.suite == "multitask":
        from ..bench.multitask import config_from_args, markdown_table, run_multitask_suite

        rows = run_multitask_suite(config_from_args(args), args.out)
        print(markdown_table(rows))
        print(f"wrote {args.out}/results.json, results.md, multitask.png, routing_*.png")
        return 0
    import json
    import shlex
    import sys
    from pathlib import Path

    from ..bench.report import aggregate, print_table
    from ..bench.runner import BenchConfig, run_bench, ship_tuned
    from ..errors import RankwiseError

    if args.ship_tuned and not (args.tune or args.tune_only):
        raise RankwiseError("--ship-tuned stores the lrs that --tune finds; add --tune (or --tune-only)")
    overrides = {"batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "dtype": args.dtype,
                 "data": args.data, "eval_batches": args.eval_batches, "log": args.log}
    budgets = [b.strip() for b in args.match_memory.split(",") if b.strip()] if args.match_memory else None
    if args.match_memory is not None and not budgets:
        raise RankwiseError("--match-memory needs at least one budget, e.g. 60MiB or 80%")
    cfg = BenchConfig(preset=args.preset, methods=_split_methods(args.methods) if args.methods else None,
                      steps=args.steps, rank=args.rank, budget=args.budget, match_memory=budgets,
                      memory_tolerance=args.memory_tolerance, seeds=args.seeds, seed=args.seed, tune=args.tune,
                      tune_only=args.tune_only, tune_points=args.tune_points, tune_span=args.tune_span,
                      tune_seeds=args.tune_seeds, tuned=args.tuned, out=args.out, device=args.device,
                      isolate=not args.in_process, jobs=args.jobs, threads=args.threads,
                      overrides={k: v for k, v in overrides.items() if v is not None})
    rows = run_bench(cfg)
    out = Path(args.out)
    if args.ship_tuned:
        path = ship_tuned(out / "tuned.json", "rankwise " + shlex.join(sys.argv[1:]))
        print(f"stored the tuned lrs of preset {args.preset} in {path}")
    if args.tune_only:
        print(f"wrote {out}/tuned.json, lr_sensitivity.png")
        return 0
    reference = json.loads((out / "bench.json").read_text()).get("reference")
    print_table(aggregate(rows), f"rankwise bench --preset {args.preset}", reference)
    print((out / "claims.md").read_text())
    print(f"wrote {out}/results.csv, summary.csv, results.md, claims.md, bench.json, ppl_vs_memory.png, "
          "loss_curves.png" + (", tuned.json, lr_sensitivity.png" if args.tune else ""))
    return 0 if all(r.get("status") == "ok" for r in rows) else 1
