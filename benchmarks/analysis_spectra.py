"""Batched spectra vs a per-matrix loop: every linear layer of a preset, the same singular values.

    python benchmarks/analysis_spectra.py --preset tiny --repeats 5

``batched_svdvals`` stacks equal-shaped matrices into one ``torch.linalg.svdvals`` call (one per shape group); the
anchor calls ``torch.linalg.svdvals`` once per matrix. Median of repeats, same process, one thread for both.
A second line compares ``batched_svdvals`` (which pins LAPACK to one thread) with the same stacked call left on
``--threads`` threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rankwise.analysis import batched_svdvals, linear_weights
from rankwise.models import build_model


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    weights = {n: w.detach() for n, w in linear_weights(build_model(args.preset)).items()}
    batched = batched_svdvals(weights)
    for n, w in weights.items():
        torch.testing.assert_close(batched[n], torch.linalg.svdvals(w), rtol=1e-4, atol=1e-5)
    t_batched = median_time(lambda: batched_svdvals(weights), args.repeats)
    t_loop = median_time(lambda: [torch.linalg.svdvals(w) for w in weights.values()], args.repeats)
    shapes = len({tuple(w.shape) for w in weights.values()})
    print(f"{args.preset}: {len(weights)} matrices in {shapes} shape groups; batched {t_batched:.3f} s, "
          f"loop {t_loop:.3f} s, loop / batched = {t_loop / t_batched:.2f}x (median of {args.repeats})")
    groups: dict[tuple, list[torch.Tensor]] = {}
    for w in weights.values():
        groups.setdefault(tuple(w.shape), []).append(w)
    stacks = [torch.stack(ws) for ws in groups.values()]
    torch.set_num_threads(args.threads)
    t_threaded = median_time(lambda: [torch.linalg.svdvals(s) for s in stacks], args.repeats)
    t_serial = median_time(lambda: batched_svdvals(weights), args.repeats)
    print(f"stacked svdvals on {args.threads} threads {t_threaded:.3f} s vs batched_svdvals (serial LAPACK) "
          f"{t_serial:.3f} s: {t_threaded / t_serial:.2f}x")


if __name__ == "__main__":
    main()
