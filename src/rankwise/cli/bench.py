"""``rankwise bench``: pre-train every method on the same tokens, seed and schedule; compare perplexity, memory and
throughput. Writes results.csv, results.md, bench.json, ppl_vs_memory.png and loss_curves.png to --out."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..bench.presets import PRESETS

    p = sub.add_parser("bench", help="benchmark pre-training methods on one budget", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="presets:\n" + "\n".join(f"  {k:<11} {v.description}" for k, v in PRESETS.items()))
    p.add_argument("--suite", choices=["pretrain", "multitask"], default="pretrain",
                   help="pretrain (default): the methods below on one pre-training budget; multitask: LoRA, MixLoRA, "
                        "SMoRA, FlyLoRA fine-tuned on the multi-task mixture at equal activated rank (docs/moe.md)")
    p.add_argument("--preset", default="tiny", help="benchmark preset (default tiny; see below)")
    p.add_argument("--methods", help="comma-separated methods, each NAME or NAME:KEY=VALUE:KEY=VALUE "
                                     "(default: the preset's 8: full, galore, fira, frugal, lowrank, lowrank-rr, "
                                     "relora, sltrain)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's; warmup keeps its fraction)")
    p.add_argument("--rank", "--r", dest="rank", type=int, help="rank of every method that has one")
    p.add_argument("--budget", help="run only methods whose planned memory (rankwise plan: weights, gradients, "
                                    "optimizer state, activations of one micro-batch) fits, e.g. 24GiB or 24GB")
    p.add_argument("--out", default="bench-out", help="output folder (default bench-out)")
    p.add_argument("--seed", type=int, default=0, help="seed of init and data order (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch (default: the preset's)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's)")
    p.add_argument("--lr", type=float, help="base learning rate; per-method multipliers still apply")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: the preset's")
    p.add_argument("--data", help="data source (default: the preset's)")
    p.add_argument("--eval-batches", type=int, help="validation batches (default: the preset's)")
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
    if args.suite == "multitask":
        from ..bench.multitask import config_from_args, markdown_table, run_multitask_suite

        rows = run_multitask_suite(config_from_args(args), args.out)
        print(markdown_table(rows))
        print(f"wrote {args.out}/results.json, results.md, multitask.png, routing_*.png")
        return 0
    from ..bench.report import print_table
    from ..bench.runner import BenchConfig, run_bench

    overrides = {"batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "dtype": args.dtype,
                 "data": args.data, "eval_batches": args.eval_batches}
    cfg = BenchConfig(preset=args.preset, methods=_split_methods(args.methods) if args.methods else None,
                      steps=args.steps, rank=args.rank, budget=args.budget, out=args.out, seed=args.seed,
                      device=args.device, isolate=not args.in_process,
                      overrides={k: v for k, v in overrides.items() if v is not None})
    rows = run_bench(cfg)
    print_table(rows, f"rankwise bench --preset {args.preset}")
    print(f"wrote {args.out}/results.csv, results.md, bench.json, ppl_vs_memory.png, loss_curves.png")
    return 0 if all(r.get("status") == "ok" for r in rows) else 1
