"""``rankwise plan``: will a run fit? Bytes of weights, gradients, optimizer state and activations, before starting.

    rankwise plan --model llama-7b --method galore --rank 128 --batch 1 --seq 2048 --dtype bf16 --budget 24GB
    rankwise plan --model llama-7b --rank 128 --compare --png methods.png
    rankwise plan --model llama-7b --method lora --rank 64 --target all-linear --budget 24GB

With --budget: whether it fits, the largest rank that does, and when it does not, what activation checkpointing
and layer-wise updates would make of it.
"""

from __future__ import annotations

import argparse
import json

from .train import parse_value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="memory plan of a run (no allocation: meta device)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-7b", help="model preset or transformers config path (default llama-7b)")
    p.add_argument("--method", default="full", help="a registered method (`rankwise methods`; default full)")
    p.add_argument("--rank", "--r", dest="rank", type=int, help="rank of the method")
    p.add_argument("--target", help="adapter methods: modules to adapt, as in `rankwise train --target` (names, "
                                    "comma-separated, a regex, or all-linear)")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--dtype", default="bf16", help="bf16 (pure bf16), fp32, or amp (fp32 weights, bf16 autocast = "
                                                   "`rankwise train --dtype bf16`) (default bf16)")
    p.add_argument("--budget", help="memory budget, e.g. 24GB (10^9 B) or 24GiB: says whether it fits and the "
                                    "largest rank that does")
    p.add_argument("--checkpointing", action="store_true", help="total with activation checkpointing")
    p.add_argument("--quantize", choices=["nf4", "int8"], help="adapter methods: a frozen 4-bit / int8 base "
                                                              "(`rankwise train --quantize`), counted in real bytes")
    p.add_argument("--world", type=int, default=1, help="number of processes: bytes per rank (default 1)")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                   help="with --world: ddp (replicated) or fsdp (sharded: weights, gradients, state / world)")
    p.add_argument("--period", type=int, default=0,
                   help="the refresh period whose optimizer state to count (block selectors: FRUGAL, BAdam, LISA "
                        "hold other blocks in each; default 0, the first)")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="any other method option (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--compare", action="store_true", help="every method side by side (--rank where it applies)")
    p.add_argument("--methods", help="with --compare: comma-separated subset of methods")
    p.add_argument("--png", help="with --compare: write a stacked bar chart here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import RankwiseError
    from ..paths import check_out_file
    from ..plan import bar_chart, compare, compare_table, plan

    check_out_file(args.png, "--png")
    options = {}
    for item in args.opt or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RankwiseError(f"--opt takes KEY=VALUE, got {item!r}")
        options[key.replace("-", "_")] = parse_value(value)
    if args.target is not None and not args.compare:
        options["target"] = args.target
    common = dict(batch=args.batch, seq=args.seq, dtype=args.dtype, budget=args.budget,
                  checkpointing=args.checkpointing, options=options, quantize=args.quantize, world=args.world,
                  parallel=args.parallel, period=args.period)
    if not args.compare:
        if args.png or args.methods:
            raise RankwiseError("--png and --methods go with --compare")
        result = plan(args.model, args.method, rank=args.rank, **common)
        print(result.json() if args.json else result.table())
        return 0
    names = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    plans = compare(args.model, rank=args.rank, methods=names, progress=True, target=args.target, **common)
    if args.png:
        bar_chart(plans, args.png)
    print(json.dumps([p.to_dict() for p in plans], indent=1) if args.json else compare_table(plans))
    return 0
