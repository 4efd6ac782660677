"""WeLore vs uniform rank reduction: validation perplexity vs the fraction of ranks removed, on a trained preset.

    python benchmarks/analysis_welore.py --preset tiny --steps 300 --ratios 0 0.1 0.2 0.3 0.4 0.5 0.6 \
        --finetune-steps 60 --out runs/analysis_welore
    rankwise analyze --model runs/analysis_welore/base --out runs/analysis_welore/analysis

Trains the preset full-rank once (rankwise.train), then for each ratio compresses a fresh copy with WeLore's global
threshold and with the uniform baseline (same fraction of ranks in every matrix), and measures ppl on the same
validation windows. With --finetune-steps, the WeLore model at --finetune-ratio is then fine-tuned with only its
low-rank components trainable (WeLore's LRC fine-tuning) and compared with the uniform model fine-tuned the same way.
Prints a markdown table (ppl ratio uniform / WeLore: > 1 means WeLore is better) and writes welore.json + a PNG.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from rankwise.analysis import compress, lrc_parameters
from rankwise.analysis.inputs import perplexity
from rankwise.analysis.report import line_plot, write_json
from rankwise.data import Batches, prepare
from rankwise.train import TrainConfig, train


def finetune(model: torch.nn.Module, steps: int, seq_len: int, lr: float, corpus) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lrc_parameters(model):
        p.requires_grad_(True)
    cfg = TrainConfig(steps=steps, batch_size=8, seq_len=seq_len, lr=lr, warmup_steps=max(1, steps // 10),
                      dtype="fp32", eval_every=0, eval_batches=1, seed=1, quiet=True)
    train(cfg, model=model, corpus=corpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--finetune-steps", type=int, default=0)
    ap.add_argument("--finetune-ratio", type=float, default=0.5)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--out", default="runs/analysis_welore")
    args = ap.parse_args()
    torch.set_num_threads(1)  # two OpenMP threads on the shared 2-core box were far slower than one

    corpus = prepare()
    t0 = time.perf_counter()
    base = train(TrainConfig(preset=args.preset, steps=args.steps, batch_size=8, seq_len=args.seq_len, lr=args.lr,
                             warmup_steps=args.steps // 10, dtype="fp32", eval_every=0, eval_batches=1, quiet=True),
                 corpus=corpus).model.eval()
    print(f"trained {args.preset} for {args.steps} steps in {time.perf_counter() - t0:.0f} s")
    out = Path(args.out)
    base.save_pretrained(out / "base")  # for `rankwise analyze --model OUT/base`
    val = Batches(corpus.val, 8, args.seq_len).eval_batches(args.eval_batches)
    rows = []
    for ratio in args.ratios:
        row = {"ratio": ratio}
        for rule in ("welore", "uniform"):
            model = copy.deepcopy(base)
            rep = compress(model, ratio, rank_rule=rule)
            row[f"{rule}_ppl"] = perplexity(model, val)
            row[f"{rule}_param_ratio"] = rep.param_ratio
            row[f"{rule}_rank_reduction"] = rep.rank_reduction
            if args.finetune_steps and abs(ratio - args.finetune_ratio) < 1e-9:
                finetune(model, args.finetune_steps, args.seq_len, args.finetune_lr, corpus)
                row[f"{rule}_ppl_finetuned"] = perplexity(model, val)
        rows.append(row)
        print(json.dumps(row))
    write_json({"preset": args.preset, "steps": args.steps, "rows": rows}, out / "welore.json")
    line_plot({rule: ([r[f"{rule}_rank_reduction"] for r in rows], [r[f"{rule}_ppl"] for r in rows])
               for rule in ("welore", "uniform")}, out / "welore_ppl.png", "fraction of ranks removed",
              "validation perplexity", f"one-shot rank reduction, {args.preset} ({args.steps} steps)", logy=True)
    print("\n| ranks removed | WeLore ppl | uniform ppl | uniform / WeLore | WeLore params | uniform params |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['welore_rank_reduction']:.2f} | {r['welore_ppl']:.2f} | {r['uniform_ppl']:.2f} | "
              f"{r['uniform_ppl'] / r['welore_ppl']:.2f} | {r['welore_param_ratio']:.1%} | "
              f"{r['uniform_param_ratio']:.1%} |")
    for r in rows:
        if "welore_ppl_finetuned" in r:
            print(f"\nafter {args.finetune_steps} LRC-only fine-tuning steps at ratio {r['ratio']}: WeLore ppl "
                  f"{r['welore_ppl_finetuned']:.2f}, uniform ppl {r['uniform_ppl_finetuned']:.2f}")


if __name__ == "__main__":
    main()
