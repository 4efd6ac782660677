"""``rankwise eval``: validation loss and perplexity of a trained run (its checkpoint), optionally on other data."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run", description=__doc__)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of `rankwise train`")
    p.add_argument("--data", help="evaluate on another source (tokenized with the run's tokenizer settings)")
    p.add_argument("--eval-batches", type=int, help="validation batches (default: the run's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..train import evaluate_checkpoint

    result = evaluate_checkpoint(args.run_dir, data=args.data, eval_batches=args.eval_batches)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['method']} ({result['data']}): eval loss {result['eval_loss']:.4f}, "
              f"ppl {result['eval_ppl']:.2f} at seq-len {result['seq_len']} over {result['tokens']:,} tokens")
    return 0
