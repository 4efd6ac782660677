"""The multi-task comparison (LoRA, MixLoRA, SMoRA, FlyLoRA at equal activated rank) with its default settings,
the same as ``rankwise bench --suite multitask``; prints the markdown table.

    python benchmarks/moe_multitask.py --out bench-multitask [--steps 200] [--pretrain-steps 200]
"""

from __future__ import annotations

import argparse

import torch

from rankwise.bench.multitask import MultitaskConfig, markdown_table, run_multitask_suite


def main() -> None:
    d = MultitaskConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-multitask")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = run_multitask_suite(MultitaskConfig(steps=args.steps, pretrain_steps=args.pretrain_steps, seed=args.seed),
                               args.out)
    print(markdown_table(rows))
    for r in rows:
        print(r["method"], f"{r.get('train_seconds', 0):.0f}s")


if __name__ == "__main__":
    main()
