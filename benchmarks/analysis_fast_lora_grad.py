"""fast_lora_grad (polynomial method, Hu et al. 2024 / Alman & Song 2023) vs autograd on the exact loss.

    python benchmarks/analysis_fast_lora_grad.py --out runs/analysis_fast_lora_grad

1. Error vs the norm bound: one instance (L, d, rank-2 adapters on Q, K, V), X rescaled so that
   max(||X W_Q||_max, ||X W_K||_max) = Gamma; relative max-entry error of the six adapter gradients per degree,
   written as a PNG and a table (sqrt(log L) printed for reference).
2. Time vs L at fixed d and degree: median of repeats, exact (autograd, L x L attention) / fast ratio, one thread.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from rankwise.analysis.fast_lora_grad import LoRAFactors, exact_lora_grad, fast_lora_grad, feature_rank
from rankwise.analysis.report import line_plot, write_json


def instance(L: int, d: int, r: int = 2, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q, k, v = (LoRAFactors(rnd(d, d), 0.5 * rnd(d, r), 0.5 * rnd(r, d), alpha=2.0) for _ in range(3))
    x = rnd(L, d)
    x = x / max((x @ q.merged()).abs().max(), (x @ k.merged()).abs().max())
    return x, q, k, v, rnd(L, d)


def rel_err(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max()).item() for n in b)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=4)
    ap.add_argument("--L", type=int, default=256)
    ap.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    ap.add_argument("--gammas", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--time-lengths", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--time-degree", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/analysis_fast_lora_grad")
    args = ap.parse_args()
    torch.set_num_threads(1)
    scale = 1 / args.d  # Alman & Song's exp(Q K^T / d): |score| <= Gamma^2

    x, q, k, v, y = instance(args.L, args.d)
    errors = {g: [] for g in args.degrees}
    for gamma in args.gammas:
        exact = exact_lora_grad(gamma * x, q, k, v, y, scale)
        for g in args.degrees:
            errors[g].append(rel_err(fast_lora_grad(gamma * x, q, k, v, y, degree=g, scale=scale), exact))
    print(f"relative max error of the adapter gradients (L={args.L}, d={args.d}; sqrt(log L) = "
          f"{math.sqrt(math.log(args.L)):.2f})\n")
    print("| Gamma | " + " | ".join(f"degree {g} (R={feature_rank(args.d, g)})" for g in args.degrees) + " |")
    print("|---" * (len(args.degrees) + 1) + "|")
    for i, gamma in enumerate(args.gammas):
        print(f"| {gamma} | " + " | ".join(f"{errors[g][i]:.1e}" for g in args.degrees) + " |")
    out = Path(args.out)
    line_plot({f"degree {g}": (args.gammas, errors[g]) for g in args.degrees}, out / "error_vs_bound.png",
              "Gamma = max(||X W_Q||_max, ||X W_K||_max)", "relative max error vs autograd",
              f"fast_lora_grad error vs the norm bound (L={args.L}, d={args.d})", logx=True, logy=True)

    timing = []
    for L in args.time_lengths:
        x, q, k, v, y = instance(L, args.d, dtype=torch.float32)
        x = 0.5 * x
        fast = median_time(lambda: fast_lora_grad(x, q, k, v, y, degree=args.time_degree, scale=scale), args.repeats)
        exact = median_time(lambda: exact_lora_grad(x, q, k, v, y, scale), args.repeats)
        timing.append({"L": L, "fast_s": fast, "exact_s": exact, "exact_over_fast": exact / fast})
    print(f"\ntime, degree {args.time_degree} (R={feature_rank(args.d, args.time_degree)}), d={args.d}, fp32, "
          f"1 thread, median of {args.repeats}\n")
    print("| L | fast (s) | autograd exact (s) | exact / fast |\n|---|---|---|---|")
    for t in timing:
        print(f"| {t['L']} | {t['fast_s']:.4f} | {t['exact_s']:.4f} | {t['exact_over_fast']:.1f}x |")
    write_json({"gammas": args.gammas, "errors": {str(g): e for g, e in errors.items()}, "timing": timing},
               out / "fast_lora_grad.json")


if __name__ == "__main__":
    main()
